"""Linear algebra: `dot_general`."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from jax import lax
from jax._src.lax import lax as lax_internal  # ragged_dot_general_p (JAX 0.10, pinned)

from chainrule.engine import host
from chainrule.engine.rules.registry import argsort, defvjp, dtype_of, primitive, shape_of
from chainrule.engine.rules.shape import convert_element_type, transpose

# --- linear algebra -------------------------------------------------------------


_DOT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _host_dot_general(x, y, dimension_numbers, precision=None, preferred_element_type=None, **_):
    """lax.dot_general as one `np.matmul` of (batch, free, contracted) layouts."""
    dtype = x.dtype if preferred_element_type is None else np.dtype(preferred_element_type)
    narrowed = None
    if dtype not in _DOT_DTYPES or x.dtype != dtype or y.dtype != dtype:
        if preferred_element_type is None or dtype not in _DOT_DTYPES:
            return NotImplemented
        if x.dtype == y.dtype and x.dtype in _DOT_DTYPES and x.dtype.itemsize > dtype.itemsize:
            narrowed = dtype  # XLA multiplies in the operands' dtype, then rounds
        else:
            x, y = np.asarray(x, dtype), np.asarray(y, dtype)
    if _may_differ_from_xla(x, y, dimension_numbers):
        # BLAS may split the product over its own threads, which do not flush
        # subnormals to zero (see `chainrule.engine.host`): XLA computes it
        return NotImplemented
    out = _host_matmul(x, y, dimension_numbers)
    return out if narrowed is None else out.astype(narrowed)


def _may_differ_from_xla(x, y, dimension_numbers) -> bool:
    """Whether BLAS may compute x . y in its worker threads and the result may
    then differ from XLA's (a partial sum may be subnormal): the product has
    at least `_BLAS_THREADED` multiply-adds and `_may_underflow`. (x.size *
    y.size bounds the multiply-adds from above: small products stop there.)"""
    if x.size * y.size < _BLAS_THREADED:
        return False
    (contracting, _), (batch, _) = dimension_numbers
    inner = math.prod(x.shape[d] for d in contracting) * math.prod(x.shape[d] for d in batch)
    return x.size * y.size // max(inner, 1) >= _BLAS_THREADED and _may_underflow(x, y)


def _may_underflow(x, y) -> bool:
    """Whether a partial sum of the products x_i * y_j may be subnormal.

    It cannot when every nonzero product is a multiple of twice the smallest
    normal number `tiny`: then so is every sum of them, and every rounding of
    such a sum, so each partial sum is zero or a normal number. An exact
    product (as a fused multiply-add takes it) of x in [2^ex, 2^(ex+1)) and y in
    [2^ey, 2^(ey+1)) is a multiple of 2^(ex + ey - 2m), m the mantissa width:
    so ex + ey >= log2(2 tiny) + 2m suffices, checked on the smallest nonzero
    magnitudes (their exponent fields, read from the bits).
    """
    mantissa, bias = _FLOAT_LAYOUT[x.dtype]
    sx, sy = host.smallest_magnitude(x), host.smallest_magnitude(y)
    if not sx or not sy:  # an operand of zeros: every product is zero
        return False
    ex, ey = sx >> mantissa, sy >> mantissa  # biased exponents; 0 for a subnormal
    if not ex or not ey:  # a subnormal operand, which XLA reads as zero
        return True
    return (ex - bias) + (ey - bias) < (2 - bias) + 2 * mantissa


# dtype -> (mantissa width, exponent bias): log2(tiny) = 1 - bias.
_FLOAT_LAYOUT = {np.dtype(np.float32): (23, 127), np.dtype(np.float64): (52, 1023)}


# From about this many multiply-adds (OpenBLAS's own threshold is m*n*k >= 65536 x 4),
# BLAS may compute in its worker threads, whose floating-point mode is not this thread's.
_BLAS_THREADED = 65536


def _host_matmul(x, y, dimension_numbers):
    (xc, yc), (xb, yb) = dimension_numbers
    if not xb and len(xc) == 1 and x.ndim <= 2 and y.ndim <= 2:  # plain matrix products
        xm = x.T if x.ndim == 2 and xc[0] == 0 else x
        ym = y.T if y.ndim == 2 and yc[0] == 1 else y
        return np.matmul(xm, ym)
    xf = [d for d in range(x.ndim) if d not in xc and d not in xb]
    yf = [d for d in range(y.ndim) if d not in yc and d not in yb]
    batch = [x.shape[d] for d in xb]
    k = math.prod(x.shape[d] for d in xc)
    m, n = math.prod(x.shape[d] for d in xf), math.prod(y.shape[d] for d in yf)
    xt = np.transpose(x, (*xb, *xf, *xc)).reshape(*batch, m, k)
    yt = np.transpose(y, (*yb, *yc, *yf)).reshape(*batch, k, n)
    out_shape = (*batch, *(x.shape[d] for d in xf), *(y.shape[d] for d in yf))
    return np.matmul(xt, yt).reshape(out_shape)


dot_general_p = primitive(
    "dot_general",
    lambda x, y, dimension_numbers, precision=None, preferred_element_type=None: lax.dot_general(
        x, y, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
    ),
    ("dimension_numbers", "precision", "preferred_element_type"),
    host=_host_dot_general,
)


def dot_general(x, y, dimension_numbers, precision=None, preferred_element_type=None) -> Any:
    (xc, yc), (xb, yb) = dimension_numbers
    dn = ((tuple(xc), tuple(yc)), (tuple(xb), tuple(yb)))
    return dot_general_p.bind(
        x,
        y,
        dimension_numbers=dn,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _consecutive(*lengths: int) -> list[tuple[int, ...]]:
    """Splits 0, 1, 2, ... into consecutive runs of the given lengths."""
    out, start = [], 0
    for n in lengths:
        out.append(tuple(range(start, start + n)))
        start += n
    return out


def _dot_lhs_cotangent(
    g, x, y, dimension_numbers, precision, preferred_element_type, swap_ans=False
):
    """The cotangent of dot_general's left operand `x` (or right, with swap_ans).

    `g` has dimensions (batch..., x free..., y free...); contracting it with `y`
    over y's free and batch dimensions gives x's batch, free and contracting
    dimensions, which a transpose puts back in x's order.
    """
    dims, out_perm = _dot_cotangent_plan(
        dimension_numbers, len(shape_of(x)), len(shape_of(y)), swap_ans
    )
    x_bar = transpose(
        dot_general(g, y, dims, precision=precision, preferred_element_type=preferred_element_type),
        out_perm,
    )
    return convert_element_type(x_bar, dtype_of(x))


@functools.lru_cache(maxsize=1024)
def _dot_cotangent_plan(dimension_numbers, x_ndim: int, y_ndim: int, swap_ans: bool):
    """The dot_general and transpose of `_dot_lhs_cotangent` (pure shape logic, cached)."""
    (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
    x_free = [d for d in range(x_ndim) if d not in x_contract and d not in x_batch]
    y_free = [d for d in range(y_ndim) if d not in y_contract and d not in y_batch]
    if swap_ans:
        g_batch, g_y, _ = _consecutive(len(x_batch), len(y_free), len(x_free))
    else:
        g_batch, _, g_y = _consecutive(len(x_batch), len(x_free), len(y_free))
    dims = ((g_y, tuple(y_free)), (g_batch, tuple(y_batch)))
    x_contract_in_y_order = [x_contract[i] for i in argsort(y_contract)]
    out_perm = argsort(list(x_batch) + x_free + x_contract_in_y_order)
    return dims, out_perm


def _dot_rhs_cotangent(g, x, y, dimension_numbers, precision, preferred_element_type):
    (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
    swapped = ((y_contract, x_contract), (y_batch, x_batch))
    return _dot_lhs_cotangent(g, y, x, swapped, precision, preferred_element_type, swap_ans=True)


defvjp(
    dot_general_p,
    lambda ans, x, y, **p: lambda g: _dot_lhs_cotangent(g, x, y, **p),
    lambda ans, x, y, **p: lambda g: _dot_rhs_cotangent(g, x, y, **p),
)


# --- ragged_dot_general (grouped matmuls, mixture-of-experts layers) ----------------


ragged_dot_general_p = primitive(
    "ragged_dot_general",
    lambda lhs, rhs, group_sizes, ragged_dot_dimension_numbers, **params: lax.ragged_dot_general(
        lhs, rhs, group_sizes, ragged_dot_dimension_numbers, **params
    ),
    ("ragged_dot_dimension_numbers", "precision", "preferred_element_type", "group_offset"),
)


def _ragged_dot_cotangent(which: int):
    """The cotangent of lhs (0) or rhs (1) when the lhs's ragged dimension is a
    free (non-contracting) one, as for `lax.ragged_dot`: each is a ragged dot of
    the output cotangent with the other operand, transposed to the operand's
    layout. (JAX transposes only this mode; the others raise here as there.)"""

    def maker(ans, lhs, rhs, group_sizes, ragged_dot_dimension_numbers, precision,
              preferred_element_type, group_offset):  # fmt: skip
        rdn = ragged_dot_dimension_numbers
        if group_offset is not None:
            raise NotImplementedError("chainrule: ragged_dot_general with group_offset")
        (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
        lhs_rank, rhs_rank = len(shape_of(lhs)), len(shape_of(rhs))
        mode, ragged = lax_internal._ragged_dot_mode_and_dim(lhs_rank, rdn)
        if mode != lax_internal.RaggedDotMode.RAGGED_NONCONTRACTING:
            raise NotImplementedError(
                f"chainrule (like JAX) differentiates ragged_dot_general only when the lhs's "
                f"ragged dimension is a non-contracting one, not in mode {mode.name}"
            )
        l_kept = [d for d in range(lhs_rank) if d not in lc and d not in lb]
        r_group = list(rdn.rhs_group_dimensions)
        r_kept = [d for d in range(rhs_rank) if d not in rc and d not in rb and d not in r_group]
        batch, l_out, r_out = _consecutive(len(lb), len(l_kept), len(r_kept))
        dtype = dtype_of(lhs if which == 0 else rhs)

        def vjp(g):
            if which == 0:
                dims = lax_internal.RaggedDotDimensionNumbers(
                    dot_dimension_numbers=((r_out, r_kept), (batch, rb)),
                    lhs_ragged_dimensions=[len(lb) + l_kept.index(ragged)],
                    rhs_group_dimensions=r_group,
                )
                out = lax.ragged_dot_general(
                    g,
                    rhs,
                    group_sizes,
                    dims,
                    precision=precision,
                    preferred_element_type=preferred_element_type,
                )
                order = [*lb, *l_kept, *(np.take(lc, np.argsort(rc)).tolist())]
            else:
                dims = lax_internal.RaggedDotDimensionNumbers(
                    dot_dimension_numbers=((l_kept, l_out), (lb, batch)),
                    lhs_ragged_dimensions=[ragged],
                    rhs_group_dimensions=[],
                )
                out = lax.ragged_dot_general(
                    lhs,
                    g,
                    group_sizes,
                    dims,
                    precision=precision,
                    preferred_element_type=preferred_element_type,
                )
                order = [*r_group, *rb, *(np.take(rc, np.argsort(lc)).tolist()), *r_kept]
            return convert_element_type(transpose(out, argsort(order)), dtype)

        return vjp

    return maker


defvjp(ragged_dot_general_p, _ragged_dot_cotangent(0), _ragged_dot_cotangent(1), None)
