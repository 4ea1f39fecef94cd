"""Indexing primitives: padding, slicing, concatenation, dynamic slices,
gather and scatter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax import lax
from jax._src.lax import lax as lax_internal  # unstack_p (JAX 0.10, pinned)
from jax.extend.core import primitives as jax_primitives

from chainrule.engine.core import Primitive, raw
from chainrule.engine.rules.elementwise import add, mul, neg, select_n, sub
from chainrule.engine.rules.registry import (
    const,
    defvjp,
    dtype_of,
    primitive,
    shape_of,
    zeros_like,
)
from chainrule.engine.rules.shape import reduce_sum, reshape
from chainrule.errors import NoVJPRuleError


def _host_pad(x, padding_value, padding_config):
    """lax.pad: interior padding, then edge padding (negative edges crop)."""
    x = np.asarray(x)
    grown = [(max(lo, 0), max(hi, 0), it) for lo, hi, it in padding_config]
    shape = [
        lo + (n + (n - 1) * it if n else 0) + hi
        for (lo, hi, it), n in zip(grown, x.shape, strict=True)
    ]
    out = np.full(shape, padding_value, dtype=x.dtype)
    out[
        tuple(
            slice(lo, lo + ((n - 1) * (it + 1) + 1 if n else 0), it + 1)
            for (lo, _, it), n in zip(grown, x.shape, strict=True)
        )
    ] = x
    crop = tuple(
        slice(-min(lo, 0), size + min(hi, 0))
        for (lo, hi, _), size in zip(padding_config, shape, strict=True)
    )
    return out[crop]


pad_p = primitive("pad", lax.pad, ("padding_config",), host=_host_pad)


def pad(x: Any, padding_value: Any, padding_config: Sequence[tuple[int, int, int]]) -> Any:
    return pad_p.bind(x, padding_value, padding_config=tuple(map(tuple, padding_config)))


def _pad_operand_vjp(ans, x, padding_value, padding_config):
    def vjp(g):
        unpad = [(-lo, -hi, 0) for lo, hi, _ in padding_config]
        unpadded = pad(g, const(g, 0), unpad)
        steps = tuple(interior + 1 for _, _, interior in padding_config)
        return slice_(unpadded, (0,) * len(steps), shape_of(unpadded), steps)

    return vjp


def _pad_value_vjp(ans, x, padding_value, padding_config):
    def vjp(g):
        everything = tuple(range(len(shape_of(g))))
        t_operand = _pad_operand_vjp(ans, x, padding_value, padding_config)(g)
        return sub(reduce_sum(g, everything), reduce_sum(t_operand, everything))

    return vjp


defvjp(pad_p, _pad_operand_vjp, _pad_value_vjp)

slice_p = primitive(
    "slice",
    lax.slice,
    ("start_indices", "limit_indices", "strides"),
    host=lambda x, start_indices, limit_indices, strides=None: x[
        tuple(
            slice(lo, hi, 1 if strides is None else strides[d])
            for d, (lo, hi) in enumerate(zip(start_indices, limit_indices, strict=True))
        )
    ],
    exact_on_host=True,
)


def slice_(x: Any, start_indices, limit_indices, strides=None) -> Any:
    if strides is not None and all(s == 1 for s in strides):
        strides = None
    return slice_p.bind(
        x,
        start_indices=tuple(start_indices),
        limit_indices=tuple(limit_indices),
        strides=None if strides is None else tuple(strides),
    )


def _slice_vjp(ans, x, start_indices, limit_indices, strides):
    def vjp(g):
        xshape, gshape = shape_of(x), shape_of(g)
        if strides is None:
            config = [
                (lo, n - hi, 0)
                for lo, hi, n in zip(start_indices, limit_indices, xshape, strict=True)
            ]
        else:
            real_limits = [
                lo + (m - 1) * s + 1 if m else lo
                for lo, m, s in zip(start_indices, gshape, strides, strict=True)
            ]
            config = [
                (lo, n - hi, s - 1 if m else 0)
                for lo, hi, n, s, m in zip(
                    start_indices, real_limits, xshape, strides, gshape, strict=True
                )
            ]
        return pad(g, const(g, 0), config)

    return vjp


defvjp(slice_p, _slice_vjp)


class _Concatenate(Primitive):
    """concatenate takes any number of operands: its rule slices `g` per operand."""

    def vjp(self, g, node):
        d = node.params["dimension"]
        sizes = [shape_of(x)[d] for x in node.primals]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        gshape = shape_of(g)
        out = []
        for i in node.argnums:
            lo, hi = [0] * len(gshape), list(gshape)
            lo[d], hi[d] = int(starts[i]), int(starts[i + 1])
            out.append(slice_(g, lo, hi))
        return out


concatenate_p = primitive(
    "concatenate",
    lambda *xs, dimension: lax.concatenate(xs, dimension),
    ("dimension",),
    host=lambda *xs, dimension: np.concatenate(xs, dimension),
    cls=_Concatenate,
    exact_on_host=True,
)


def concatenate(xs: Sequence[Any], dimension: int) -> Any:
    return concatenate_p.bind(*xs, dimension=dimension)


class _Stack(Primitive):
    """stack(*xs, axis): operand i gets the slice of `g` at position i along `axis`."""

    def vjp(self, g, node):
        axis = node.params["axis"]
        gshape = shape_of(g)
        out = []
        for i in node.argnums:
            lo, hi = [0] * len(gshape), list(gshape)
            lo[axis], hi[axis] = i, i + 1
            out.append(reshape(slice_(g, lo, hi), shape_of(node.primals[i])))
        return out


stack_p = primitive(
    "stack",
    lambda *xs, axis: lax.stack(xs, axis),
    ("axis",),
    host=lambda *xs, axis: np.stack(xs, axis),
    cls=_Stack,
)


def stack(xs: Sequence[Any], axis: int) -> Any:
    return stack_p.bind(*xs, axis=axis)


tile_p = primitive(
    "tile", lambda x, reps: lax.tile(x, reps), ("reps",), host=lambda x, reps: np.tile(x, reps)
)


def _tile_vjp(ans, x, reps):
    """Each copy's cotangent is summed: view g as (r0, n0, r1, n1, ...), sum the r's."""
    xshape = shape_of(x)
    if len(reps) != len(xshape):
        raise NotImplementedError(
            f"chainrule: tile with {len(reps)} reps for a rank-{len(xshape)} operand"
        )
    interleaved = tuple(d for r, n in zip(reps, xshape, strict=True) for d in (r, n))
    copies = tuple(range(0, 2 * len(xshape), 2))
    return lambda g: reduce_sum(reshape(g, interleaved), copies)


defvjp(tile_p, _tile_vjp)


class _Split(Primitive):
    """split's outputs are one node; its rule concatenates their cotangents."""

    def vjp(self, g, node):
        axis = node.params["axis"]
        cts = [zeros_like(a) if ct is None else ct for ct, a in zip(g, node.ans, strict=True)]
        return [concatenate(cts, axis)]


split_p = primitive(
    "split",
    lambda x, sizes, axis: lax.split(x, sizes, axis),
    ("sizes", "axis"),
    host=lambda x, sizes, axis: np.split(x, np.cumsum(sizes)[:-1], axis),
    multiple_results=True,
    cls=_Split,
)


class _Unstack(Primitive):
    """unstack's outputs are one node; its rule stacks their cotangents back."""

    def vjp(self, g, node):
        cts = [zeros_like(a) if ct is None else ct for ct, a in zip(g, node.ans, strict=True)]
        return [stack(cts, node.params["axis"])]


unstack_p = primitive(
    "unstack",
    lambda x, axis: lax_internal.unstack_p.bind(x, axis=axis),
    ("axis",),
    host=lambda x, axis: list(np.moveaxis(x, axis, 0)),
    multiple_results=True,
    cls=_Unstack,
)


class _DynamicSlice(Primitive):
    """Index operands are integers: only the array operand(s) get cotangents."""

    def vjp(self, g, node):
        if self.name == "dynamic_slice":
            x, *idx = node.primals
            assert node.argnums == (0,), node.argnums
            return [dynamic_update_slice(zeros_like(x, dtype_of(g)), g, idx)]
        x, update, *idx = node.primals
        rules = {
            0: lambda: dynamic_update_slice(g, zeros_like(update, dtype_of(g)), idx),
            1: lambda: dynamic_slice(g, idx, shape_of(update)),
        }
        return [rules[i]() for i in node.argnums]


def _clamped_window(x, idx, sizes) -> tuple[slice, ...]:
    """lax clamps start indices so that the window lies inside `x`."""
    starts = [min(max(int(i), 0), n - s) for i, n, s in zip(idx, np.shape(x), sizes, strict=True)]
    return tuple(slice(i, i + s) for i, s in zip(starts, sizes, strict=True))


def _host_dynamic_update_slice(x, update, *idx):
    out = np.array(x)
    out[_clamped_window(x, idx, np.shape(update))] = update
    return out


# The primitives themselves, not the `lax.dynamic_slice` wrappers: the indices
# here are a jaxpr's, already normalised, and the wrappers would wrap a
# negative (out-of-bounds) index a second time where the primitive clamps it.
dynamic_slice_p = primitive(
    "dynamic_slice",
    lambda x, *idx, slice_sizes: jax_primitives.dynamic_slice_p.bind(
        x, *idx, slice_sizes=tuple(slice_sizes)
    ),
    ("slice_sizes",),
    host=lambda x, *idx, slice_sizes: x[_clamped_window(x, idx, slice_sizes)],
    cls=_DynamicSlice,
)
dynamic_update_slice_p = primitive(
    "dynamic_update_slice",
    lambda x, update, *idx: jax_primitives.dynamic_update_slice_p.bind(x, update, *idx),
    host=_host_dynamic_update_slice,
    cls=_DynamicSlice,
)


def dynamic_slice(x: Any, idx: Sequence[Any], slice_sizes: Sequence[int]) -> Any:
    return dynamic_slice_p.bind(x, *idx, slice_sizes=tuple(slice_sizes))


def dynamic_update_slice(x: Any, update: Any, idx: Sequence[Any]) -> Any:
    return dynamic_update_slice_p.bind(x, update, *idx)


gather_p = primitive(
    "gather",
    lambda x, indices, **p: lax.gather(x, indices, **p),
    (
        "dimension_numbers",
        "slice_sizes",
        "indices_are_sorted",
        "unique_indices",
        "mode",
        "fill_value",
    ),
)
scatter_add_p = primitive(
    "scatter-add",
    lambda x, indices, updates, **p: lax.scatter_add(x, indices, updates, **p),
    ("dimension_numbers", "indices_are_sorted", "unique_indices", "mode"),
    implied_params=("update_jaxpr", "update_consts"),  # the combiner: add
)


def _gather_vjp(
    ans,
    x,
    indices,
    dimension_numbers,
    slice_sizes,
    indices_are_sorted,
    unique_indices,
    mode,
    fill_value,
):
    dn = dimension_numbers
    scatter_dn = lax.ScatterDimensionNumbers(
        update_window_dims=dn.offset_dims,
        inserted_window_dims=dn.collapsed_slice_dims,
        scatter_dims_to_operand_dims=dn.start_index_map,
        operand_batching_dims=dn.operand_batching_dims,
        scatter_indices_batching_dims=dn.start_indices_batching_dims,
    )
    return lambda g: scatter_add_p.bind(
        zeros_like(x, dtype_of(g)),  # (in g's dtype, as JAX's transpose: it may be wider)
        indices,
        g,
        dimension_numbers=scatter_dn,
        indices_are_sorted=indices_are_sorted,
        unique_indices=unique_indices,
        mode=mode,
    )


def _scatter_as_gather(dn, x, updates) -> tuple[lax.GatherDimensionNumbers, tuple[int, ...]]:
    """The gather that reads, for each element of `updates`, the position it writes."""
    gather_dn = lax.GatherDimensionNumbers(
        offset_dims=dn.update_window_dims,
        collapsed_slice_dims=dn.inserted_window_dims,
        start_index_map=dn.scatter_dims_to_operand_dims,
        operand_batching_dims=dn.operand_batching_dims,
        start_indices_batching_dims=dn.scatter_indices_batching_dims,
    )
    window = iter(dn.update_window_dims)
    ushape = shape_of(updates)
    slice_sizes = tuple(
        1 if i in dn.inserted_window_dims or i in dn.operand_batching_dims else ushape[next(window)]
        for i in range(len(shape_of(x)))
    )
    return gather_dn, slice_sizes


def _scatter_add_updates_vjp(
    ans, x, indices, updates, dimension_numbers, indices_are_sorted, unique_indices, mode
):
    gather_dn, slice_sizes = _scatter_as_gather(dimension_numbers, x, updates)
    return lambda g: gather_p.bind(
        g,
        indices,
        dimension_numbers=gather_dn,
        slice_sizes=slice_sizes,
        indices_are_sorted=indices_are_sorted,
        unique_indices=unique_indices,
        mode=mode,
        fill_value=0,
    )


class _Scatter(Primitive):
    """scatter (`x.at[i].set(u)`): overwritten positions of `x` get no cotangent;
    each update gets the cotangent of the position it won (with duplicate
    indices only the update that was written counts, found by scattering ids)."""

    def apply(self, trace, args, params):
        if params.get("update_jaxpr") is not None:  # x.at[i].apply(fn): fn is the combiner
            taken = {k: params[k] for k in _SCATTER_APPLY_PARAMS}
            return [scatter_apply_p.bind(*args, **taken)]
        return super().apply(trace, args, params)

    def vjp(self, g, node):
        x, indices, updates = node.primals
        dn, mode = node.params["dimension_numbers"], node.params["mode"]
        gather_dn, slice_sizes = _scatter_as_gather(dn, x, updates)
        ushape = shape_of(updates)
        ids = np.arange(1, int(np.prod(ushape)) + 1, dtype=np.int32).reshape(ushape)
        written = lax.scatter(
            np.zeros(shape_of(x), np.int32), raw(indices), ids, dn,
            indices_are_sorted=node.params["indices_are_sorted"],
            unique_indices=node.params["unique_indices"], mode=mode,
        )  # fmt: skip
        won = lax.eq(
            lax.gather(written, raw(indices), gather_dn, slice_sizes, mode=mode, fill_value=0), ids
        )
        out = []
        for i in node.argnums:
            if i == 0:
                out.append(select_n(lax.eq(written, np.int32(0)), zeros_like(g), g))
            elif i == 2:
                read = gather_p.bind(
                    g, indices, dimension_numbers=gather_dn, slice_sizes=slice_sizes,
                    indices_are_sorted=node.params["indices_are_sorted"],
                    unique_indices=node.params["unique_indices"], mode=mode, fill_value=0,
                )  # fmt: skip
                out.append(select_n(won, zeros_like(read), read))
        return out


scatter_p = primitive(
    "scatter",
    lambda x, indices, updates, **p: lax.scatter(x, indices, updates, **p),
    ("dimension_numbers", "indices_are_sorted", "unique_indices", "mode"),
    cls=_Scatter,
    implied_params=("update_jaxpr", "update_consts"),  # the combiner: replace
)


class _ScatterApply(Primitive):
    """`x.at[i].apply(fn)` (`lax.scatter_apply`): JAX's scatter with `fn` as its
    combiner. Its value is JAX's; like JAX, chainrule has no derivative for it."""

    def vjp(self, g, node):
        raise NoVJPRuleError(
            "scatter",
            detail="x.at[...].apply(fn) applies fn inside the scatter, which JAX does not "
            "differentiate either ('scatter_apply JVP not implemented'); write "
            "x.at[i].set(fn(x[i])) instead",
        )


_SCATTER_APPLY_PARAMS = (
    *("dimension_numbers", "indices_are_sorted", "unique_indices", "mode"),
    *("update_jaxpr", "update_consts"),
)
scatter_apply_p = _ScatterApply(
    "scatter_apply",
    lambda x, indices, updates, **p: jax_primitives.scatter_p.bind(x, indices, updates, **p),
    _SCATTER_APPLY_PARAMS,
)


defvjp(gather_p, _gather_vjp, None)
defvjp(scatter_add_p, lambda ans, x, *a, **p: lambda g: g, None, _scatter_add_updates_vjp)

_SCATTER_PARAMS = ("dimension_numbers", "indices_are_sorted", "unique_indices", "mode")

scatter_sub_p = primitive(
    "scatter-sub",
    lambda x, indices, updates, **p: lax.scatter_sub(x, indices, updates, **p),
    _SCATTER_PARAMS,
    implied_params=("update_jaxpr", "update_consts"),  # the combiner: subtract
)


def _scatter_sub_updates_vjp(ans, x, indices, updates, **params):
    read = _scatter_add_updates_vjp(ans, x, indices, updates, **params)
    return lambda g: neg(read(g))


defvjp(scatter_sub_p, lambda ans, x, *a, **p: lambda g: g, None, _scatter_sub_updates_vjp)

scatter_mul_p = primitive(
    "scatter-mul",
    lambda x, indices, updates, **p: lax.scatter_mul(x, indices, updates, **p),
    _SCATTER_PARAMS,
    implied_params=("update_jaxpr", "update_consts"),  # the combiner: multiply
)


def _scatter_mul_operand_vjp(ans, x, indices, updates, **params):
    """out = x * (the product of the updates at each position): linear in x."""
    return lambda g: scatter_mul_p.bind(g, indices, updates, **params)


def _scatter_mul_updates_vjp(ans, x, indices, updates, **params):
    """With unique indices each update multiplies one position: its cotangent is
    g * x there. With duplicates JAX defines no rule, and neither do we."""
    if not params["unique_indices"]:
        raise NoVJPRuleError(
            "scatter-mul",
            detail="its gradient with respect to the updates (the factors of "
            "x.at[i].multiply(y), the divisors of .divide, the exponents of .power) "
            "is defined only for unique indices, as in JAX. If your indices have no "
            "duplicates, say so: x.at[i].multiply(y, unique_indices=True)",
        )
    read = _scatter_add_updates_vjp(ans, x, indices, updates, **params)
    return lambda g: read(mul(g, x))


defvjp(scatter_mul_p, _scatter_mul_operand_vjp, None, _scatter_mul_updates_vjp)


class _ScatterExtremal(Primitive):
    """scatter-min / scatter-max. JAX's rule, transposed: a position of `x` keeps
    its cotangent unless an update replaced it; when several values tie for the
    result (updates among themselves, or with the original), they share the
    cotangent evenly. The shares are JAX's, computed from the primal values
    with JAX's gathers and scatters (their default modes included), so
    out-of-bounds indices give what `jax.grad` gives."""

    def vjp(self, g, node):
        x, indices, updates = node.primals
        dn, mode = node.params["dimension_numbers"], node.params["mode"]
        gather_dn, slice_sizes = _scatter_as_gather(dn, x, updates)
        x_, indices_, updates_, ans_ = raw(x), raw(indices), raw(updates), raw(node.ans)
        one = np.ones((), updates_.dtype)

        def read(a):
            return lax.gather(a, indices_, gather_dn, slice_sizes)

        def count(where):
            return read(lax.scatter_add(lax.full_like(x_, 0), indices_, where, dn))

        zeros, ones = lax.full_like(updates_, 0), lax.full_like(updates_, 1)
        target = read(ans_)
        won, kept = lax.eq(updates_, target), lax.eq(read(x_), target)
        winners, references = count(lax.select(won, ones, zeros)), count(ones)
        share = lax.div(one, lax.add(winners, one))  # shared with the original value
        updates_coef = lax.select(won, lax.select(kept, share, lax.div(one, winners)), zeros)
        operand_coef = lax.div(lax.sub(lax.select(kept, share, zeros), one), references)
        at_updates = gather_p.bind(
            g, indices, dimension_numbers=gather_dn, slice_sizes=slice_sizes,
            indices_are_sorted=node.params["indices_are_sorted"],
            unique_indices=node.params["unique_indices"], mode=mode, fill_value=0,
        )  # fmt: skip
        out = []
        for i in node.argnums:
            if i == 0:
                replaced = scatter_add_p.bind(
                    zeros_like(g), indices, mul(at_updates, operand_coef), dimension_numbers=dn,
                    indices_are_sorted=False, unique_indices=False,
                    mode=lax.GatherScatterMode.FILL_OR_DROP,
                )  # fmt: skip
                out.append(add(g, replaced))
            elif i == 2:
                out.append(mul(at_updates, updates_coef))
        return out


scatter_min_p = primitive(
    "scatter-min",
    lambda x, indices, updates, **p: lax.scatter_min(x, indices, updates, **p),
    _SCATTER_PARAMS,
    cls=_ScatterExtremal,
    implied_params=("update_jaxpr", "update_consts"),  # the combiner: min
)
scatter_max_p = primitive(
    "scatter-max",
    lambda x, indices, updates, **p: lax.scatter_max(x, indices, updates, **p),
    _SCATTER_PARAMS,
    cls=_ScatterExtremal,
    implied_params=("update_jaxpr", "update_consts"),  # the combiner: max
)
