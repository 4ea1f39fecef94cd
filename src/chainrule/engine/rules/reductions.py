"""Reductions other than sums: max, min, argmax/argmin, products, a user's
`lax.reduce`, boolean and bitwise ones, and the cumulative reductions."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np
from jax import lax
from jax._src import core as jcore  # eval_jaxpr (JAX 0.10, pinned)
from jax._src.lax.other import logaddexp  # the combine JAX's cumlogsumexp rule scans with
from jax.extend.core import primitives as jax_primitives

from chainrule.engine.core import Primitive, raw, vjp_flat, zeros_like
from chainrule.engine.rules.elementwise import div, eq, mul
from chainrule.engine.rules.registry import defvjp, dtype_of, primitive, shape_of
from chainrule.engine.rules.shape import (
    broadcast_in_dim,
    convert_element_type,
    kept_dims,
    reduce_sum,
)
from chainrule.errors import NoVJPRuleError


def _host_extremum(np_op: Any, sign_wins: bool) -> Callable:
    """XLA's reduce_max (`sign_wins` False) or reduce_min (True): where the
    answer is a zero, it is -0 if -0 wins and one of the zeros is -0 (min), or
    if no zero is +0 (max); NumPy's reduction takes whichever zero came first."""

    def host(x, axes, out_sharding=None):
        if not np.size(x):
            return NotImplemented
        axes = tuple(axes)
        out = np_op.reduce(x, axes)
        if out.dtype.kind != "f" or not np.any(np.equal(out, 0)):
            return out
        zeros = np.equal(x, 0)
        negative = np.any(zeros & np.signbit(x), axes)
        if not sign_wins:  # max: -0 only where every zero is -0
            negative = ~np.any(zeros & ~np.signbit(x), axes)
        fixed = np.where(np.equal(out, 0), np.where(negative, -0.0, 0.0), out)
        return fixed.astype(out.dtype, copy=False)

    return host


reduce_max_p = primitive(
    "reduce_max",
    lambda x, axes: lax.reduce_max(x, axes),
    ("axes",),
    host=_host_extremum(np.maximum, sign_wins=False),
)
reduce_min_p = primitive(
    "reduce_min",
    lambda x, axes: lax.reduce_min(x, axes),
    ("axes",),
    host=_host_extremum(np.minimum, sign_wins=True),
)


def _reduce_chooser_vjp(ans, x, axes):
    """The cotangent goes to the chosen element(s); ties share it evenly (as JAX)."""

    def vjp(g):
        kept = kept_dims(x, axes)
        xshape = shape_of(x)
        chosen = convert_element_type(
            eq(raw(x), broadcast_in_dim(raw(ans), xshape, kept)), dtype_of(g)
        )
        counts = reduce_sum(chosen, tuple(axes))
        return mul(broadcast_in_dim(div(g, counts), xshape, kept), chosen)

    return vjp


defvjp(reduce_max_p, _reduce_chooser_vjp)
defvjp(reduce_min_p, _reduce_chooser_vjp)

argmax_p = primitive(
    "argmax",
    lambda x, axes, index_dtype: lax.argmax(x, axes[0], index_dtype),
    ("axes", "index_dtype"),
    host=lambda x, axes, index_dtype: np.argmax(x, axes[0]).astype(index_dtype),
    differentiable=False,
)
argmin_p = primitive(
    "argmin",
    lambda x, axes, index_dtype: lax.argmin(x, axes[0], index_dtype),
    ("axes", "index_dtype"),
    host=lambda x, axes, index_dtype: np.argmin(x, axes[0]).astype(index_dtype),
    differentiable=False,
)


def _host_cumsum(x, axis, reverse=False):
    if reverse:
        return np.flip(np.cumsum(np.flip(x, axis), axis, dtype=x.dtype), axis)
    return np.cumsum(x, axis, dtype=x.dtype)


cumsum_p = primitive(
    "cumsum",
    lambda x, axis, reverse=False: lax.cumsum(x, axis, reverse),
    ("axis", "reverse"),
    host=_host_cumsum,
)
defvjp(
    cumsum_p,
    lambda ans, x, axis, reverse: lambda g: cumsum_p.bind(g, axis=axis, reverse=not reverse),
)


# --- cumulative reductions other than sums -------------------------------------------
# JAX defines their derivatives as those of the parallel prefix scan
# `lax.associative_scan(combine, x)`, whatever the backend computes the
# forward pass with. The rule is therefore chainrule's own VJP of that scan
# (its slices, pads and combines, each by its rule), run in the backward pass:
# the same derivative as JAX's, ties of cummax/cummin and zeros of cumprod
# included, and differentiable again.


def _cumulative_vjp(combine):
    def maker(ans, x, axis, reverse):
        def scan(x):
            return [lax.associative_scan(combine, x, axis=axis, reverse=reverse)]

        return lambda g: vjp_flat(scan, [x], [g])[0]

    return maker


# No NumPy versions: XLA orders -0.0 below 0.0 in max/min and multiplies in its
# own order, so NumPy's accumulate would not give exactly the same values.
def _cumulative(name: str, impl, combine) -> Primitive:
    prim = primitive(
        name, lambda x, axis, reverse=False: impl(x, axis, reverse), ("axis", "reverse")
    )
    defvjp(prim, _cumulative_vjp(combine))
    return prim


cumprod_p = _cumulative("cumprod", lax.cumprod, lax.mul)
cummax_p = _cumulative("cummax", lax.cummax, lax.max)
cummin_p = _cumulative("cummin", lax.cummin, lax.min)
cumlogsumexp_p = _cumulative("cumlogsumexp", lax.cumlogsumexp, logaddexp)


# --- products and generic reductions -------------------------------------------------
# As for the cumulative ones, JAX differentiates reduce_prod and `lax.reduce`
# through a balanced tree of the reducer (halves combined pairwise, the odd
# half padded with the initial value): a product's derivative is then right
# with zeros in the input (one zero or several), where dividing by x is not.


def _tree_reduce(reducer, init_values, xs, axes):
    """`reducer` (arrays -> arrays, elementwise) applied pairwise along `axes`."""
    shape = shape_of(xs[0])
    rest = tuple(d for d in range(len(shape)) if d not in axes)
    n = int(np.prod([shape[a] for a in axes], dtype=np.int64))
    flat = (n,) + tuple(shape[d] for d in rest)
    xs = [lax.reshape(x, flat, tuple(axes) + rest) for x in xs]
    while n > 1:
        half = (n + 1) // 2
        firsts = [lax.slice_in_dim(x, 0, half) for x in xs]
        seconds = [lax.slice_in_dim(x, half, n) for x in xs]
        if n - half != half:
            config = [(0, 1, 0)] + [(0, 0, 0)] * len(rest)
            seconds = [
                lax.pad(x, init, config) for x, init in zip(seconds, init_values, strict=True)
            ]
        xs = list(reducer(*firsts, *seconds))
        n = half
    if n == 0:
        return [
            lax.full(flat[1:], init, dtype_of(x)) for x, init in zip(xs, init_values, strict=True)
        ]
    return [lax.squeeze(x, (0,)) for x in xs]


reduce_prod_p = primitive("reduce_prod", lambda x, axes: lax.reduce_prod(x, axes), ("axes",))


def _reduce_prod_vjp(ans, x, axes):
    one = np.ones((), dtype_of(x))

    def product(x):
        return _tree_reduce(lambda a, b: [lax.mul(a, b)], [one], [x], axes)

    return lambda g: vjp_flat(product, [x], [g])[0]


defvjp(reduce_prod_p, _reduce_prod_vjp)


class _Reduce(Primitive):
    """`lax.reduce` with a user's reducer (a jaxpr over scalars): operands, then
    as many initial values. Only the operands are differentiated, as in JAX."""

    def vjp(self, g, node):
        n = len(node.primals) // 2
        if any(i >= n for i in node.argnums):
            raise NoVJPRuleError(
                "reduce",
                detail="its initial values are differentiated; JAX does not define that "
                "either. Pass constant initial values (e.g. 0.0 for a sum)",
            )
        operands, init_values = node.primals[:n], node.primals[n:]
        jaxpr, dimensions = node.params["jaxpr"], node.params["dimensions"]
        rest = len(shape_of(operands[0])) - len(dimensions)

        def reducer(*args):
            fun = partial(jcore.eval_jaxpr, jaxpr.jaxpr, jaxpr.consts)
            for _ in range(rest + 1):  # the jaxpr takes scalars
                fun = jax.vmap(fun)
            return fun(*args)

        def reduction(*diff):
            full = list(operands)
            for i, x in zip(node.argnums, diff, strict=True):
                full[i] = x
            return _tree_reduce(reducer, init_values, full, dimensions)

        cts = [zeros_like(a) if ct is None else ct for ct, a in zip(g, node.ans, strict=True)]
        return vjp_flat(reduction, [operands[i] for i in node.argnums], cts)


reduce_p = primitive(
    "reduce",
    lambda *args, computation, jaxpr, dimensions: jax_primitives.reduce_p.bind(
        *args, computation=computation, jaxpr=jaxpr, dimensions=tuple(dimensions)
    ),
    ("computation", "jaxpr", "dimensions"),
    multiple_results=True,
    cls=_Reduce,
)


# --- boolean and bitwise reductions (no gradient) ------------------------------------


def _bitwise_reduction(name: str, ufunc) -> Primitive:
    jax_prim = getattr(jax_primitives, name + "_p")
    return primitive(
        name,
        lambda x, axes: jax_prim.bind(x, axes=tuple(axes)),
        ("axes",),
        host=lambda x, axes: ufunc.reduce(x, tuple(axes)),
        differentiable=False,
    )


reduce_and_p = _bitwise_reduction("reduce_and", np.bitwise_and)
reduce_or_p = _bitwise_reduction("reduce_or", np.bitwise_or)
reduce_xor_p = _bitwise_reduction("reduce_xor", np.bitwise_xor)
