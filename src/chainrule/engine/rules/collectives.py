"""`jax.shard_map` and the collectives used inside it.

* `shard_map` is one node (like `cond`): its forward pass is JAX's
  `shard_map` of the body on the primal values; its VJP is a `shard_map` of
  the body's VJP, taken by chainrule on each shard (`core.vjp_flat`, which
  re-runs the body's forward pass there), with the output cotangents sharded
  as the outputs were and the input cotangents as the inputs. With
  `check_vma=False` it scales and sums as JAX's transpose does (an output
  cotangent is divided among the shards that replicate it; an input
  cotangent is summed over the axes its spec does not mention).
* The collectives' VJPs are the transposes JAX defines in
  `jax/_src/lax/parallel.py`: `psum_invariant` <-> `pvary` (sum of a
  varying value / broadcast of an invariant one), `psum` -> `psum`,
  `all_gather` <-> `reduce_scatter`, `ppermute` -> the inverse permutation,
  `all_to_all` -> `all_to_all` with split and concat axes swapped,
  `all_gather_invariant` -> this shard's slice, `pbroadcast` -> the sum, on
  the source. `pmax`/`pmin`, which `jax.grad` cannot differentiate, pass the
  cotangent to the shards holding the extreme value, split equally among
  ties (as `reduce_max`'s rule does within one array).

Each collective's VJP binds the table's own collectives, so it can be
differentiated again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
from jax._src import config
from jax._src import core as jcore  # typeof, the Trace interface (JAX 0.10, pinned)
from jax._src import shard_map as jax_shard_map
from jax._src.interpreters import partial_eval as pe
from jax._src.lax import parallel

from chainrule.engine import core
from chainrule.engine.core import Node, Primitive, raw, vjp_flat
from chainrule.engine.rules.calls import _cotangents
from chainrule.engine.rules.effects import passthrough, reshard_p
from chainrule.engine.rules.registry import PRIMITIVES, defvjp, shape_of

# --- sums and broadcasts over mesh axes ---------------------------------------------------

psum_invariant_p = passthrough(parallel.psum_invariant_p, ("axes",))
pvary_p = passthrough(jcore.pvary_p, ("axes",))
defvjp(psum_invariant_p, lambda ans, x, axes: lambda g: pvary_p.bind(g, axes=axes))
defvjp(pvary_p, lambda ans, x, axes: lambda g: psum_invariant_p.bind(g, axes=axes))

psum_p = passthrough(parallel.psum_p, ("axes", "axis_index_groups"))


def _psum_vjp(ans, x, axes, axis_index_groups):
    """psum over named axes is a sum then a broadcast, so its transpose sums
    again (JAX's rule); positional axes are broadcast back."""
    named = tuple(a for a in axes if not isinstance(a, int))
    positional = [a for a in axes if isinstance(a, int)]
    shape = shape_of(x)

    def vjp(g):
        if positional:
            kept = [d for d in range(len(shape)) if d not in positional]
            g = lax.broadcast_in_dim(g, shape, kept)
        if named:
            g = psum_p.bind(g, axes=named, axis_index_groups=axis_index_groups)
        return g

    return vjp


defvjp(psum_p, _psum_vjp)

axis_index_p = passthrough(parallel.axis_index_p, ("axis_name",), differentiable=False)


def _extreme_vjp(ans, x, axes, axis_index_groups):
    """pmax/pmin: to the shards holding the extreme value, ties split equally.

    As the sum of the members' values times their shares, `psum(x * share)`:
    where `x` varies over the axes (`shard_map` typing the mesh axes) the result
    is invariant, and the cotangent, the same on every shard, goes to the
    shares as `psum_invariant`'s does; elsewhere (a `vmap` axis name, or
    `check_vma=False`) the cotangents of the members are summed first, as
    `psum`'s transpose sums them."""
    if axis_index_groups is not None:
        raise NotImplementedError("pmax/pmin with axis_index_groups: no VJP rule")
    manual = getattr(jcore.typeof(raw(x)), "manual_axis_type", None)  # (JAX 0.10's vma)
    typed = set(axes) <= getattr(manual, "varying", frozenset())

    def vjp(g):
        hit = lax.convert_element_type(lax.eq(x, ans), g.dtype)
        if not typed:
            g = psum_p.bind(g, axes=tuple(axes), axis_index_groups=None)
        # (`lax.psum` binds psum_invariant for a varying value, psum otherwise)
        return g * hit / lax.psum(hit, axes)

    return vjp


for _jax_prim in (parallel.pmax_p, parallel.pmin_p):
    defvjp(passthrough(_jax_prim, ("axes", "axis_index_groups")), _extreme_vjp)

# --- moving data between shards ---------------------------------------------------------

ppermute_p = passthrough(parallel.ppermute_p, ("axis_name", "perm"))
defvjp(
    ppermute_p,
    lambda ans, x, axis_name, perm: (
        lambda g: ppermute_p.bind(
            g, axis_name=axis_name, perm=tuple((dst, src) for src, dst in perm)
        )
    ),
)

_A2A = ("axis_name", "split_axis", "concat_axis", "axis_index_groups", "tiled")
all_to_all_p = passthrough(parallel.all_to_all_p, _A2A)
defvjp(
    all_to_all_p,
    lambda ans, x, split_axis, concat_axis, **params: (
        lambda g: all_to_all_p.bind(g, split_axis=concat_axis, concat_axis=split_axis, **params)
    ),
)

_GATHER = ("axis_name", "axis_index_groups", "axis_size", "tiled")
all_gather_p = passthrough(parallel.all_gather_p, ("all_gather_dimension", *_GATHER))
reduce_scatter_p = passthrough(parallel.reduce_scatter_p, ("scatter_dimension", *_GATHER))
defvjp(
    all_gather_p,
    lambda ans, x, all_gather_dimension, **params: (
        lambda g: reduce_scatter_p.bind(g, scatter_dimension=all_gather_dimension, **params)
    ),
)
defvjp(
    reduce_scatter_p,
    lambda ans, x, scatter_dimension, **params: (
        lambda g: all_gather_p.bind(g, all_gather_dimension=scatter_dimension, **params)
    ),
)

all_gather_invariant_p = passthrough(
    parallel.all_gather_invariant_p, ("all_gather_dimension", "axis_name", "axis_size", "tiled")
)


def _all_gather_invariant_vjp(ans, x, all_gather_dimension, axis_name, axis_size, tiled):
    """This shard's slice of the cotangent."""

    def vjp(g):
        size = shape_of(g)[all_gather_dimension] // axis_size
        start = axis_index_p.bind(axis_name=axis_name) * size
        piece = lax.dynamic_slice_in_dim(g, start, size, all_gather_dimension)
        return piece if tiled else lax.squeeze(piece, (all_gather_dimension,))

    return vjp


defvjp(all_gather_invariant_p, _all_gather_invariant_vjp)

pbroadcast_p = passthrough(parallel.pbroadcast_p, ("axis_name", "source"))


def _pbroadcast_vjp(ans, x, axis_name, source):
    """Every shard received the source's value: the source gets the sum."""

    def vjp(g):
        total = psum_p.bind(g, axes=tuple(axis_name), axis_index_groups=None)
        is_source = axis_index_p.bind(axis_name=axis_name) == source
        return lax.select(is_source, total, lax.full_like(total, 0))

    return vjp


defvjp(pbroadcast_p, _pbroadcast_vjp)


# --- shard_map ------------------------------------------------------------------------------


def _stage(fun: Any, args: Sequence[Any], params: dict[str, Any]) -> tuple[dict, list, Any]:
    """The body `jax.shard_map` hands a trace, as the jaxpr JAX would stage:
    (the `shard_map` equation's parameters, its constants, the outputs' tree)."""
    mesh, manual = params["mesh"], params["newly_manual_axes"]
    check_vma, in_specs = params["check_vma"], params["in_specs"]
    shard = jax_shard_map.shard_aval
    in_avals = [
        shard(mesh, manual, check_vma, s, jcore.typeof(a))
        for s, a in zip(in_specs, args, strict=True)
    ]
    manual_mesh = jax_shard_map._as_manual_mesh(mesh, manual)
    with (
        jax_shard_map._extend_axis_env(mesh, manual),
        jax_shard_map.use_abstract_mesh(manual_mesh),
        config._check_vma(check_vma),
    ):
        in_tree = jax_shard_map.FlatTree.flatten((in_avals, {}))
        jaxpr, out_data = pe.trace_to_jaxpr(
            fun, in_tree, params["debug_info"], fun_returns_flat_tree=True
        )
        out_avals, out_specs = out_data.unpack_aux()
        if check_vma:  # JAX's error for an out_spec that claims replication wrongly
            jax_shard_map._check_mats(mesh, out_specs, out_avals)
        jaxpr, consts = pe.separate_consts(jaxpr)
    staged = dict(
        mesh=mesh,
        in_specs=(*(jax_shard_map._repspec(jcore.typeof(c)) for c in consts), *in_specs),
        out_specs=tuple(out_specs),
        jaxpr=jaxpr.jaxpr,
        check_vma=check_vma,
        newly_manual_axes=manual,
    )
    return staged, list(consts), out_avals


def _shard_map_impl(*args: Any, **params: Any) -> list[Any]:
    prim = jax_shard_map.shard_map_p
    return list(prim.bind(*args, **prim.get_bind_params(params)))


def _unmentioned_size(mesh: Any, spec: Any, manual: Any) -> tuple[list, int]:
    axes = jax_shard_map._unmentioned2(mesh, spec, manual)
    return axes, math.prod(mesh.shape[a] for a in axes)


def _typed_as(ct: Any, primal: Any) -> Any:
    """`ct` placed as `primal` is. On an explicit mesh an array's sharding is
    part of its type and `shard_map` checks its operands' against `in_specs`;
    a cotangent made without a placement (a reduction's broadcast) is moved
    to its primal's, the type JAX's cotangents have."""
    want = jcore.typeof(raw(primal)).sharding
    if want.mesh.empty or not want.mesh._any_axis_explicit:
        return ct
    if jcore.typeof(raw(ct)).sharding == want:
        return ct
    return reshard_p.bind(ct, dst_sharding=want, concrete_mesh=None)


class _ShardMap(Primitive):
    """`shard_map`: one node; VJP = a `shard_map` of the body's VJP (module docstring)."""

    def process_shard_map(self, trace: Any, prim: Any, fun: Any, tracers: Sequence[Any], params):
        """`Trace.process_shard_map`: `jax.shard_map` called on chainrule's values.
        The body is staged as JAX stages it, then applied as this primitive."""
        staged, consts, out_avals = _stage(fun, tracers, params)
        with trace.active():
            outs = self.apply(trace, [*consts, *tracers], staged)
        return out_avals.update(outs)

    def vjp(self, g: Any, node: Node) -> list[Any]:
        params = node.params
        mesh, manual, check_vma = params["mesh"], params["newly_manual_axes"], params["check_vma"]
        in_specs = [s.to_ct_spec() for s in params["in_specs"]]
        out_specs = [s.to_ct_spec() for s in params["out_specs"]]
        body = params["jaxpr"]
        primals = list(node.primals)
        cts = [_typed_as(ct, o) for ct, o in zip(_cotangents(g, node.ans), node.ans, strict=True)]
        diff = [i for i, p in enumerate(primals) if core.is_differentiable(raw(p))]
        if not check_vma:  # a replicated output's cotangent, divided among its copies
            cts = [
                ct / n if (n := _unmentioned_size(mesh, s, manual)[1]) != 1 else ct
                for ct, s in zip(cts, out_specs, strict=True)
            ]

        def per_shard(*args: Any) -> tuple[Any, ...]:
            ops, out_cts = list(args[: len(primals)]), list(args[len(primals) :])

            def forward(*diff_ops: Any) -> list[Any]:
                full = list(ops)
                for i, x in zip(diff, diff_ops, strict=True):
                    full[i] = x
                return jcore.eval_jaxpr(body, (), *full)

            op_cts = vjp_flat(forward, [ops[i] for i in diff], out_cts)
            if not check_vma:  # summed over the axes an input is replicated on
                op_cts = [
                    psum_p.bind(ct, axes=tuple(axes), axis_index_groups=None)
                    if (axes := _unmentioned_size(mesh, in_specs[i], manual)[0])
                    else ct
                    for i, ct in zip(diff, op_cts, strict=True)
                ]
            return tuple(op_cts)

        op_cts = jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(*params["in_specs"], *out_specs),
            out_specs=tuple(in_specs[i] for i in diff),
            axis_names=manual,
            check_vma=check_vma,
        )(*primals, *cts)
        by_operand = dict(zip(diff, op_cts, strict=True))
        return [by_operand[i] for i in node.argnums]


PRIMITIVES["shard_map"] = _ShardMap(
    "shard_map",
    _shard_map_impl,
    ("mesh", "in_specs", "out_specs", "jaxpr", "check_vma", "newly_manual_axes"),
    multiple_results=True,
)
