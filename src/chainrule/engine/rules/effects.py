"""Primitives around the computation rather than in it: random numbers and bits,
placement, printing and callbacks.

* **Randomness and bits** (`random_seed`, `random_bits`, `random_split`, ...,
  `shift_left`, `population_count`, `clz`): integer and key values, which
  carry no gradient. Dropout, noise injection and reparameterisation work
  because the randomness enters the loss through ordinary float operations
  (`x * mask`, `mu + sigma * eps`), which carry the gradient.
* **Placement** (`device_put`, `sharding_constraint`, `optimization_barrier`):
  identities for the values, so the cotangent passes through; a sharding
  constraint is also applied to the cotangent, as JAX does. So does
  `xla_metadata_value` (`jax.experimental.xla_metadata.set_xla_metadata(x,
  ...)`, XLA attributes on a value): the value keeps them, the cotangent
  passes through without them, as in JAX.
* **Printing and callbacks**: `jax.debug.print` (`debug_print`) and
  `jax.debug.callback` (`debug_callback`) see the primal values, as under
  `jax.grad`, and record nothing; so does `checkify.check` (`check`).
  `pure_callback` and `io_callback` run Python that chainrule cannot see
  into: on values that need a gradient they raise the `ValueError` JAX
  raises, with the user's line and the fix.

Each JAX primitive is bound as it is (`jax_prim.bind`) with every parameter
JAX emitted, so nothing about it changes but the tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax._src import callback, checkify, debugging, dispatch, pjit, xla_metadata
from jax._src import core as jcore  # set_current_trace (JAX 0.10, pinned)
from jax._src import mesh as mesh_lib
from jax._src.lax import lax as jax_lax
from jax._src.random import core as jax_random_core
from jax._src.random import prng as jax_prng
from jax._src.random import threefry2x32 as jax_threefry

from chainrule.engine import host
from chainrule.engine.core import Primitive, Tracer, raw, user_frame
from chainrule.engine.rules.registry import PRIMITIVES, defvjp, primitive, zeros_like
from chainrule.errors import CallbackDifferentiationError


def bound(jax_prim: Any):
    """The implementation that binds the JAX primitive itself."""

    def impl(*args: Any, **params: Any) -> Any:
        # a host value as JAX gets it: some of JAX's batching rules (reduce_scatter's
        # for an unbatched operand) hand a NumPy operand back as it is
        args = [host.to_jax(a) if isinstance(a, host.HOST_TYPES) else a for a in args]
        return jax_prim.bind(*args, **params)

    impl.__name__ = f"{jax_prim.name}_impl"
    return impl


def passthrough(jax_prim: Any, params: Sequence[str] = (), **kwargs: Any) -> Primitive:
    """A table entry for `jax_prim`, bound as it is with the parameters `params`."""
    return primitive(
        jax_prim.name,
        bound(jax_prim),
        params,
        multiple_results=jax_prim.multiple_results,
        **kwargs,
    )


# --- randomness and bits: no gradient ------------------------------------------------

# (jax.random.PRNGKey(0) is `random_seed` then `random_unwrap`; jax.random.key(0) is
# `random_seed`; each sampler unwraps nothing and draws `random_bits`, then turns bits
# into floats with shifts, `or` and `bitcast_convert_type`.)
_NON_DIFFERENTIABLE = (
    (jax_prng.random_seed_p, ("impl",)),
    (jax_prng.random_bits_p, ("bit_width", "shape")),
    (jax_prng.random_wrap_p, ("impl",)),
    (jax_prng.random_unwrap_p, ()),
    (jax_prng.random_split_p, ("shape",)),
    (jax_prng.random_fold_in_p, ()),
    (jax_random_core.random_clone_p, ()),
    (jax_threefry.threefry2x32_p, ()),
    (jax_lax.shift_left_p, ()),
    (jax_lax.shift_right_logical_p, ()),
    (jax_lax.shift_right_arithmetic_p, ()),
    (jax_lax.population_count_p, ()),
    (jax_lax.clz_p, ()),
)
for _jax_prim, _params in _NON_DIFFERENTIABLE:
    passthrough(_jax_prim, _params, differentiable=False)


# --- placement: the cotangent passes through ---------------------------------------------


class _Identities(Primitive):
    """A primitive of several operands that returns them, placed or fenced
    (`device_put`, `optimization_barrier`): each output's cotangent is its
    operand's. Zeros stand for outputs that got no cotangent."""

    def vjp(self, g: Any, node: Any) -> list[Any]:
        cts = list(g) if isinstance(g, tuple) else [g]
        return [cts[i] if cts[i] is not None else zeros_like(node.ans[i]) for i in node.argnums]


# device_put's cotangent keeps the placement the backward pass gives it (JAX moves it
# back to the source device; values are equal either way).
device_put_p = passthrough(
    dispatch.device_put_p, ("devices", "srcs", "copy_semantics"), cls=_Identities
)
# lax.optimization_barrier: the cotangents pass through unfenced, as in JAX.
optimization_barrier_p = passthrough(jax_lax.optimization_barrier_p, cls=_Identities)


def optimization_barrier(values: Sequence[Any]) -> list[Any]:
    """`lax.optimization_barrier` on a flat list of values, through the table."""
    return list(optimization_barrier_p.bind(*values)) if values else []


# set_xla_metadata(x, key=value): the value as it is, with XLA attributes under jit
xla_metadata_value_p = passthrough(xla_metadata.xla_metadata_value_p, ("xla_metadata_kvs",))
defvjp(xla_metadata_value_p, lambda ans, x, **params: lambda g: g)

_CONSTRAINT = ("sharding", "layout", "context_mesh", "unconstrained_dims")
sharding_constraint_p = passthrough(pjit.sharding_constraint_p, _CONSTRAINT)
defvjp(
    sharding_constraint_p,
    lambda ans, x, **params: lambda g: sharding_constraint_p.bind(g, **params),
)


# --- printing and callbacks ---------------------------------------------------------------


class _Effect(Primitive):
    """`jax.debug.print` / `jax.debug.callback`: runs on the primal values (what
    `jax.grad` prints) on the trace outside, records nothing, returns nothing."""

    def __init__(self, jax_prim: Any):
        super().__init__(jax_prim.name, bound(jax_prim), differentiable=False)
        self.jax_prim = jax_prim

    def apply(self, trace, args, params):
        primals = [a.value if isinstance(a, Tracer) and a._trace is trace else a for a in args]
        with jcore.set_current_trace(trace.parent):
            return self.jax_prim.bind(*primals, **params)


# (`checkify.check`'s `check` too: `checkify.checkify(cr.grad(f))` sees the primal
# values a check tests, as with jax.grad)
for _jax_prim in (debugging.debug_print_p, debugging.debug_callback_p, checkify.check_p):
    PRIMITIVES[_jax_prim.name] = _Effect(_jax_prim)


class _Opaque(Primitive):
    """`pure_callback` / `io_callback`: Python code chainrule cannot see into. On
    values that need no gradient it runs as it is; on traced values it raises
    the `ValueError` `jax.grad` raises, with the user's line and the fix."""

    def __init__(self, jax_prim: Any, what: str):
        super().__init__(jax_prim.name, bound(jax_prim), differentiable=False)
        self.what = what

    def apply(self, trace, args, params):
        raise CallbackDifferentiationError(self.what, self.name, user_frame())


PRIMITIVES["pure_callback"] = _Opaque(callback.pure_callback_p, "Pure callbacks")
PRIMITIVES["io_callback"] = _Opaque(callback.io_callback_p, "IO callbacks")


# --- more placement: reshard, layouts, and sharding inspection ------------------------------

# jax.sharding.reshard: the value is the same, placed differently; its cotangent is
# placed back as the operand was (as JAX's transpose does).
reshard_p = passthrough(pjit.reshard_p, ("dst_sharding", "concrete_mesh"))


def _reshard_vjp(ans, x, dst_sharding, concrete_mesh):
    def vjp(g):
        source = jcore.typeof(raw(x)).sharding
        if source.mesh.empty:  # an operand with no mesh (host values): nothing to undo
            return g
        with mesh_lib.use_abstract_mesh(source.mesh):
            return reshard_p.bind(g, dst_sharding=source, concrete_mesh=concrete_mesh)

    return vjp


defvjp(reshard_p, _reshard_vjp)

# a layout constraint (memory layout only) applies to the cotangent too, as in JAX
layout_constraint_p = passthrough(pjit.layout_constraint_p, ("layout",))
defvjp(
    layout_constraint_p,
    lambda ans, x, layout: lambda g: layout_constraint_p.bind(g, layout=layout),
)

# jax.debug.inspect_array_sharding: shows the primal's sharding, records nothing
PRIMITIVES["inspect_sharding"] = _Effect(debugging.inspect_sharding_p)
