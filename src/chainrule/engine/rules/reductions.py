"""Reductions other than sums: max, min, argmax/argmin, cumulative sums."""

from __future__ import annotations

import numpy as np
from jax import lax

from chainrule.engine.core import raw
from chainrule.engine.rules.elementwise import div, eq, mul
from chainrule.engine.rules.registry import defvjp, dtype_of, primitive, shape_of
from chainrule.engine.rules.shape import (
    broadcast_in_dim,
    convert_element_type,
    kept_dims,
    reduce_sum,
)

reduce_max_p = primitive(
    "reduce_max",
    lambda x, axes: lax.reduce_max(x, axes),
    ("axes",),
    host=lambda x, axes, out_sharding=None: (
        np.maximum.reduce(x, tuple(axes)) if np.size(x) else NotImplemented
    ),
)
reduce_min_p = primitive(
    "reduce_min",
    lambda x, axes: lax.reduce_min(x, axes),
    ("axes",),
    host=lambda x, axes, out_sharding=None: (
        np.minimum.reduce(x, tuple(axes)) if np.size(x) else NotImplemented
    ),
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
