"""Sorting and ranking: `sort` (several operands, `num_keys`), `top_k`, `approx_top_k`.

Each output element is one input element moved to a new place, so each rule
sends the output's cotangent back to where the element came from: a
`scatter-add` along the sorted dimension at the positions the forward pass
chose. Ties follow JAX: `sort` is recorded with an iota sorted alongside (as
JAX's own rule does), so the positions are exactly the permutation of that
sort; `top_k`'s positions are its index output.

Integer results (`jnp.argsort`, the indices of `top_k`) carry no gradient and
pass through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import lax
from jax.extend.core import primitives as jax_primitives

from chainrule.engine import core
from chainrule.engine.core import Primitive, raw, zeros_like
from chainrule.engine.rules.indexing import scatter_add_p
from chainrule.engine.rules.registry import primitive, shape_of
from chainrule.engine.rules.shape import iota_p, reshape


def _scatter_along(g: Any, positions: Any, axis: int, x: Any) -> Any:
    """The transpose of `take_along_axis(x, positions, axis)`: each element of `g`
    is added at its position along `axis` of zeros shaped as `x`."""
    rank = len(shape_of(x))
    others = tuple(d for d in range(rank) if d != axis)
    dn = lax.ScatterDimensionNumbers(
        update_window_dims=(),
        inserted_window_dims=(axis,),
        scatter_dims_to_operand_dims=(axis,),
        operand_batching_dims=others,
        scatter_indices_batching_dims=others,
    )
    return scatter_add_p.bind(
        zeros_like(x),
        reshape(positions, shape_of(positions) + (1,)),
        g,
        dimension_numbers=dn,
        indices_are_sorted=False,
        unique_indices=False,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


# --- comparisons in the total order sorts use (searchsorted emits them) ---------------
# -0.0 < 0.0 and NaNs at the ends: no gradient, no NumPy version (NumPy has no
# such comparison), so they run through JAX.

for _name in ("eq_to", "le_to", "lt_to"):
    primitive(_name, getattr(jax_primitives, _name + "_p").bind, differentiable=False)


# --- sort ----------------------------------------------------------------------------


def _host_sort(*operands, dimension, is_stable, num_keys):
    """NumPy's stable sort gives XLA's stable order for real keys (NaN last,
    -0.0 equal to 0.0); XLA's unstable sort may order ties otherwise."""
    keys = operands[:num_keys]
    if not is_stable or not all(
        np.issubdtype(k.dtype, np.floating) or np.issubdtype(k.dtype, np.integer) for k in keys
    ):
        return NotImplemented
    if num_keys == 1:
        order = np.argsort(keys[0], axis=dimension, kind="stable")
    else:  # lexsort's last key is its primary one
        order = np.lexsort(keys[::-1], axis=dimension)
    return [np.take_along_axis(op, order, dimension) for op in operands]


class _Sort(Primitive):
    """sort records the permutation too: an iota is sorted alongside the
    operands (never a key), as in JAX's rule, so ties resolve exactly as the
    sort did and the rule needs no second sort."""

    def apply(self, trace, args, params):
        params = self.taken(params)
        shape = shape_of(args[0])
        index_dtype = np.int32 if max(shape, default=0) < 2**31 else np.int64
        dimension = params["dimension"]
        if isinstance(raw(args[0]), np.ndarray):  # eager, on the host: no XLA call
            along = [1] * len(shape)
            along[dimension] = shape[dimension]
            iota = np.broadcast_to(
                np.arange(shape[dimension], dtype=index_dtype).reshape(along), shape
            )
        else:
            iota = iota_p.bind(dtype=index_dtype, shape=shape, dimension=dimension)
        *outs, _ = core.bind(self, *args, iota, **params)
        return outs

    def vjp(self, g, node):
        *_, permutation = node.ans
        dimension = node.params["dimension"]
        out = []
        for i in node.argnums:
            x = node.primals[i]
            ct = g[i]
            if ct is None:
                out.append(zeros_like(x))
            else:
                out.append(_scatter_along(ct, permutation, dimension, x))
        return out


sort_p = primitive(
    "sort",
    lambda *operands, dimension, is_stable, num_keys: lax.sort_p.bind(
        *operands, dimension=dimension, is_stable=is_stable, num_keys=num_keys
    ),
    ("dimension", "is_stable", "num_keys"),
    host=_host_sort,
    multiple_results=True,
    cls=_Sort,
)


# --- top_k and approx_top_k ----------------------------------------------------------


class _TopK(Primitive):
    """(values, indices) = top_k(x): values' cotangent goes back to `indices`."""

    def vjp(self, g, node):
        (x,) = node.primals
        ct_values, _ = g
        if ct_values is None:
            return [zeros_like(x)]
        _, indices = node.ans
        axis = self.axis(node.params, len(shape_of(x)))
        return [_scatter_along(ct_values, indices, axis, x)]

    def axis(self, params: dict[str, Any], rank: int) -> int:
        axis = params["axis"] if self.name == "top_k" else params["reduction_dimension"]
        return axis % rank if rank else 0


top_k_p = primitive(
    "top_k",
    lambda x, k, axis: lax.top_k(x, k, axis=axis),
    ("k", "axis"),
    multiple_results=True,
    cls=_TopK,
)


def _approx_top_k(
    x,
    k,
    reduction_dimension,
    recall_target,
    is_max_k,
    reduction_input_size_override,
    aggregate_to_topk,
):
    approx = lax.approx_max_k if is_max_k else lax.approx_min_k
    return approx(
        x,
        k,
        reduction_dimension=reduction_dimension,
        recall_target=recall_target,
        reduction_input_size_override=reduction_input_size_override,
        aggregate_to_topk=aggregate_to_topk,
    )


approx_top_k_p = primitive(
    "approx_top_k",
    _approx_top_k,
    (
        "k",
        "reduction_dimension",
        "recall_target",
        "is_max_k",
        "reduction_input_size_override",
        "aggregate_to_topk",
    ),
    multiple_results=True,
    cls=_TopK,
)
