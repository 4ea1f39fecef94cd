"""Structural primitives: type conversion and identities, complex parts, broadcasting,
reshaping, transposition and summation (with `unbroadcast`, the one helper
that sums a broadcast cotangent back to its operand's shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax import dtypes, lax
from jax._src.lax import lax as lax_internal  # weakly typed conversion (JAX 0.10, pinned)

from chainrule.engine import host
from chainrule.engine.core import Tracer, raw
from chainrule.engine.rules.registry import (
    argsort,
    defvjp,
    dtype_of,
    full_like,
    primitive,
    shape_of,
)

# --- identities and type conversion -------------------------------------------

stop_gradient_p = primitive(
    "stop_gradient", lax.stop_gradient, host=lambda x: x, differentiable=False
)

copy_p = primitive("copy", lambda x: x, host=lambda x: x, exact_on_host=True)
defvjp(copy_p, lambda ans, x: lambda g: g, formulas=("1",))

reduce_precision_p = primitive(
    "reduce_precision", lax.reduce_precision, ("exponent_bits", "mantissa_bits")
)
defvjp(
    reduce_precision_p,
    lambda ans, x, exponent_bits, mantissa_bits: (
        lambda g: reduce_precision_p.bind(
            g, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits
        )
    ),
    formulas=("1",),
)


def retyped(x: Any, new_dtype: Any, weak_type: bool) -> Any:
    """`x` (a JAX value) as `new_dtype`, weakly typed or not as asked: JAX's own
    conversion, the one that sets a weak type (`lax.convert_element_type`
    always gives a strong one). chainrule's one way to type a result as JAX
    does (a converted mask, a derivative, a constant output)."""
    return lax_internal._convert_element_type(x, new_dtype, weak_type=weak_type)


def _convert(x: Any, new_dtype: Any, weak_type: bool = False) -> Any:
    """lax's conversion; complex to real keeps the real part (as JAX's primitive
    does), without the warning `lax.convert_element_type` gives users for it.
    A weakly typed result (`jax.numpy` converts a boolean or integer array
    joining a weak float so) is weakly typed here too: it steers promotion."""
    if np.issubdtype(dtype_of(x), np.complexfloating) and not np.issubdtype(
        new_dtype, np.complexfloating
    ):
        x = lax.real(x)
    if weak_type:
        return retyped(x, new_dtype, weak_type=True)
    return lax.convert_element_type(x, new_dtype)


def _host_convert(x: Any, new_dtype: Any, weak_type: bool = False) -> Any:
    new_dtype = np.dtype(new_dtype)
    if new_dtype.kind == "c" or weak_type:  # complex values and weakly
        return NotImplemented  # typed ones stay JAX's (see `host`)
    x = np.asarray(x)
    if not (host.host_dtype(x.dtype) and host.host_dtype(new_dtype)):
        return NotImplemented  # (half precision: XLA's conversions, see `host.host_dtype`)
    if x.dtype.kind == "f" and new_dtype.kind in "iu":
        return _float_to_integer(x, new_dtype)
    return x.astype(new_dtype)


def _float_to_integer(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """XLA's conversion: toward zero, saturating at the integer type's limits
    (infinities too), NaN to 0. NumPy's cast is the processor's, which wraps
    (-1.0 to uint8 is 255) or gives the minimum (NaN to int32)."""
    info = np.iinfo(dtype)
    whole = np.trunc(x)
    # (the limits rounded to x's dtype: a whole number at or beyond one saturates)
    high, low = whole >= info.max, whole <= info.min
    keep = ~(high | low | np.isnan(x))
    out = np.where(keep, whole, 0).astype(dtype)
    out[high] = info.max
    out[low] = info.min
    return out


def _exact_convert(
    operands: tuple[Any, ...], new_dtype: Any, weak_type: bool = False, **_: Any
) -> bool:
    """Conversions NumPy (with `_float_to_integer`) and XLA do alike: to strong
    types (NumPy has no weak ones)."""
    return not weak_type


convert_element_type_p = primitive(
    "convert_element_type",
    _convert,
    ("new_dtype", "weak_type"),
    host=_host_convert,
    exact_on_host=_exact_convert,
)


def weakly_typed(x: Any, weak: bool) -> Any:
    """`x` of the same dtype, weakly typed or not as asked (unchanged if it
    already is): a chainrule Tracer by a recorded conversion (differentiable,
    and an enclosing transform sees the type), a JAX value by JAX's own
    conversion; a NumPy value (strong, no weak type to set) as it is."""
    if isinstance(x, Tracer):
        if getattr(raw(x), "weak_type", False) == weak:
            return x
        return convert_element_type_p.bind(x, new_dtype=dtype_of(x), weak_type=weak)
    if getattr(x, "weak_type", weak) == weak:
        return x
    return retyped(x, dtype_of(x), weak_type=weak)


def convert_element_type(x: Any, new_dtype: Any, weak_type: bool = False) -> Any:
    """`x` as `new_dtype` (weakly typed with `weak_type`, as `jax.numpy` converts
    a boolean or integer array joining a weak float)."""
    if weak_type:
        return convert_element_type_p.bind(x, new_dtype=np.dtype(new_dtype), weak_type=True)
    if dtype_of(x) == np.dtype(new_dtype):
        return x
    return convert_element_type_p.bind(x, new_dtype=np.dtype(new_dtype))


defvjp(
    convert_element_type_p,
    # (x's dtype as JAX types it: a Python number converted on the host is a
    # NumPy float64 even without x64, where JAX's is float32)
    lambda ans, x, new_dtype, weak_type=False: (
        lambda g: convert_element_type(g, dtypes.canonicalize_dtype(dtype_of(x)))
    ),
    formulas=("1",),
)

# --- complex parts ----------------------------------------------------------------
# JAX's convention: a cotangent ct pairs with a tangent t as Re(ct * t), with no
# conjugate. So a holomorphic f has the VJP g -> g * f'(z) (the real rules, as
# they are), and the gradient of a real loss L(z) is dL/dx - i dL/dy, the
# numbers `jax.grad` gives. Only the maps that are not holomorphic (these four,
# and abs) need rules of their own; each is linear over the reals, so its VJP
# is its transpose under that pairing.

real_p = primitive("real", lax.real)
imag_p = primitive("imag", lax.imag)
complex_p = primitive("complex", lax.complex)
conj_p = primitive("conj", lambda x, input_dtype=None: lax.conj(x), ("input_dtype",))
real, imag, complex_ = real_p.bind, imag_p.bind, complex_p.bind


def is_complex(x: Any) -> bool:
    return np.issubdtype(dtype_of(x), np.complexfloating)


def conj(x: Any) -> Any:
    return conj_p.bind(x, input_dtype=dtype_of(x))


defvjp(real_p, lambda ans, x: lambda g: convert_element_type(g, dtype_of(x)))  # g + 0i
defvjp(imag_p, lambda ans, x: lambda g: conj(complex_(full_like(g, 0), g)))  # -i g
defvjp(
    complex_p,  # x + i y
    lambda ans, x, y: lambda g: unbroadcast(real(g), shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(imag(conj(g)), shape_of(y)),  # -Im g
)
defvjp(
    conj_p,  # conj of a real x is x + 0i, whose cotangent is the real part
    lambda ans, x, input_dtype: lambda g: conj(g) if is_complex(x) else real(g),
)

iota_p = primitive(
    "iota",
    lambda dtype, shape, dimension: lax.broadcasted_iota(dtype, shape, dimension),
    ("dtype", "shape", "dimension"),
    differentiable=False,
)

# --- shapes: broadcasting, reshaping, slicing ---------------------------------


def _host_broadcast_in_dim(x, shape, broadcast_dimensions, sharding=None):
    expanded = [1] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
        expanded[d] = np.shape(x)[i]
    return np.broadcast_to(np.reshape(x, expanded), shape)


broadcast_in_dim_p = primitive(
    "broadcast_in_dim",
    lax.broadcast_in_dim,
    ("shape", "broadcast_dimensions"),
    host=_host_broadcast_in_dim,
    exact_on_host=True,
)


def broadcast_in_dim(x: Any, shape: Sequence[int], broadcast_dimensions: Sequence[int]) -> Any:
    return broadcast_in_dim_p.bind(
        x, shape=tuple(shape), broadcast_dimensions=tuple(broadcast_dimensions)
    )


defvjp(
    broadcast_in_dim_p,
    lambda ans, x, shape, broadcast_dimensions: (
        lambda g: unbroadcast(g, shape_of(x), broadcast_dimensions)
    ),
)

reshape_p = primitive(
    "reshape",
    lambda x, new_sizes, dimensions=None: lax.reshape(x, new_sizes, dimensions),
    ("new_sizes", "dimensions"),
    host=lambda x, new_sizes, dimensions=None: np.reshape(
        x if dimensions is None else np.transpose(x, dimensions), new_sizes
    ),
    exact_on_host=True,
)


def reshape(x: Any, new_sizes: Sequence[int]) -> Any:
    return reshape_p.bind(x, new_sizes=tuple(new_sizes), dimensions=None)


def _reshape_vjp(ans, x, new_sizes, dimensions):
    if dimensions is None:
        return lambda g: reshape(g, shape_of(x))
    # reshape with `dimensions` transposes first (jnp.column_stack emits it):
    # undo the reshape into the transposed shape, then the transpose
    transposed = tuple(shape_of(x)[d] for d in dimensions)
    return lambda g: transpose(reshape(g, transposed), argsort(dimensions))


defvjp(reshape_p, _reshape_vjp)

squeeze_p = primitive(
    "squeeze",
    lax.squeeze,
    ("dimensions",),
    host=lambda x, dimensions: np.squeeze(x, tuple(dimensions)),
    exact_on_host=True,
)
defvjp(squeeze_p, lambda ans, x, dimensions: lambda g: reshape(g, shape_of(x)))

transpose_p = primitive(
    "transpose",
    lax.transpose,
    ("permutation",),
    host=lambda x, permutation: np.transpose(x, permutation),
    exact_on_host=True,
)


def transpose(x: Any, permutation: Sequence[int]) -> Any:
    permutation = tuple(permutation)
    if permutation == tuple(range(len(permutation))):
        return x
    return transpose_p.bind(x, permutation=permutation)


defvjp(transpose_p, lambda ans, x, permutation: lambda g: transpose(g, argsort(permutation)))

rev_p = primitive(
    "rev",
    lax.rev,
    ("dimensions",),
    host=lambda x, dimensions: np.flip(x, tuple(dimensions)),
    exact_on_host=True,
)
defvjp(rev_p, lambda ans, x, dimensions: lambda g: rev_p.bind(g, dimensions=dimensions))


# --- reductions ----------------------------------------------------------------

reduce_sum_p = primitive(
    "reduce_sum",
    lambda x, axes: lax.reduce_sum(x, axes),
    ("axes",),
    host=lambda x, axes, out_sharding=None: np.add.reduce(x, tuple(axes), dtype=x.dtype),
)


def reduce_sum(x: Any, axes: Sequence[int]) -> Any:
    return reduce_sum_p.bind(x, axes=tuple(axes))


def kept_dims(x: Any, axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in range(len(shape_of(x))) if d not in axes)


defvjp(
    reduce_sum_p,
    lambda ans, x, axes: lambda g: broadcast_in_dim(g, shape_of(x), kept_dims(x, axes)),
)


def unbroadcast(g: Any, shape: Sequence[int], dims: Sequence[int] | None = None) -> Any:
    """Sums the cotangent `g` of a broadcast value back to the operand's `shape`.

    Args:
      g: cotangent of the broadcast result.
      shape: the operand's shape before broadcasting.
      dims: for `broadcast_in_dim`, which dimension of `g` each operand
        dimension became; default is NumPy's rule (align on the right).
    """
    shape = tuple(shape)
    gshape = shape_of(g)
    if gshape == shape:
        return g
    if dims is None:
        dims = range(len(gshape) - len(shape), len(gshape))
    dims = tuple(dims)
    summed = tuple(d for d in range(len(gshape)) if d not in dims) + tuple(
        d for d, n in zip(dims, shape, strict=True) if n == 1 and gshape[d] != 1
    )
    if summed:
        g = reduce_sum(g, tuple(sorted(summed)))
    return reshape(g, shape) if shape_of(g) != shape else g
