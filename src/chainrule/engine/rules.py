"""The primitive table: every operation chainrule can differentiate, with its rule.

Each entry mirrors one `jax.lax` primitive and has

* an implementation (a public `jax.lax` call on untraced values), and
* its VJP makers, written right below it, one per argument, in the form
  `(ans, *primals, **params) -> (g -> cotangent)`.

The rules are written with the traced ops defined in this file (`mul`, `neg`,
`reduce_sum`, ...), never with `jax.numpy`, so a backward pass run on Tracers is
itself recorded and can be differentiated again (higher-order derivatives).

Un-broadcasting lives in exactly one helper, `unbroadcast`.

The call-like primitives of a jaxpr (`jit`, `custom_jvp_call`,
`custom_vjp_call`) are not array operations; they are interpreted by the jaxpr
replay front end (`chainrule.engine.replay`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from chainrule.engine import host
from chainrule.engine.core import Primitive, Tracer, raw

PRIMITIVES: dict[str, Primitive] = {}
"""Every primitive chainrule can trace, keyed by its `jax.lax` name."""


def primitive(
    name: str,
    impl: Callable,
    params: Sequence[str] = (),
    *,
    host: Callable | None = None,
    cls: type = Primitive,
    **kwargs,
) -> Primitive:
    """Creates a primitive and enters it in `PRIMITIVES`.

    `host` is the NumPy implementation used for concrete CPU values (see
    `chainrule.engine.host`); it must give `impl`'s result, dtype included.
    `cls` is a `Primitive` subclass for the few primitives whose rule treats all
    operands at once (variadic operands, multiple results, integer indices).
    """
    prim = cls(name, impl, params, host_impl=host, **kwargs)
    PRIMITIVES[name] = prim
    return prim


def defvjp(prim: Primitive, *makers: Callable | None) -> None:
    """Registers one VJP maker per argument of `prim` (None: not differentiable)."""
    prim.vjp_makers = makers


# --- helpers (untraced shape logic and constants) ----------------------------


def shape_of(x: Any) -> tuple[int, ...]:
    x = raw(x)
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x)) if shape is None else tuple(shape)


def dtype_of(x: Any):
    return raw(x).dtype if hasattr(raw(x), "dtype") else np.result_type(x)


def full_like(x: Any, value: float):
    """A constant with the shape and dtype of `x` (never traced).

    Outside JAX transformations it is a NumPy array: creating it costs no XLA
    dispatch. Under `jit`/`vmap` it is a `lax.full`, so no large literal is
    baked into the compiled program.
    """
    if isinstance(raw(x), jax.core.Tracer):
        return lax.full(shape_of(x), value, dtype_of(x))
    return np.full(shape_of(x), value, dtype_of(x))


def zeros_like(x: Any):
    return full_like(x, 0)


def const(x: Any, value: float):
    """`value` as a scalar of `x`'s dtype, for use in rules."""
    return np.asarray(value, dtype=dtype_of(x))


def argsort(seq: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(range(len(seq)), key=seq.__getitem__))


# --- elementwise arithmetic ---------------------------------------------------


def _broadcasting(op: Callable) -> Callable:
    """A binary lax op that also takes operands of NumPy-broadcastable shapes.

    On the host, the dynamic front end records binary ops without explicit
    broadcasts (NumPy broadcasts by itself, and the rules un-broadcast their
    cotangents); if such a node's VJP later meets JAX values (e.g. a
    cotangent passed to `vjp_fn`), this keeps the lax call legal. Operands of
    equal shapes, the only kind seen under `jit`, pass straight through.
    """

    def impl(x, y):
        xs, ys = np.shape(x), np.shape(y)
        if xs != ys and xs and ys:
            shape = np.broadcast_shapes(xs, ys)
            x, y = jnp.broadcast_to(x, shape), jnp.broadcast_to(y, shape)
        return op(x, y)

    impl.__name__ = getattr(op, "__name__", "binary")
    return impl


# Binary lax primitives take equal shapes, or a rank-0 operand with an array;
# their rules sum the cotangent back to each operand's shape with `unbroadcast`.


def _host_div(x, y):
    """lax.div: true division for floats, rounding toward zero for integers."""
    if np.result_type(x).kind not in "iu":
        return np.true_divide(x, y)
    q = np.floor_divide(x, y)
    return q + ((q < 0) & (q * y != x)).astype(q.dtype)


add_p = primitive("add", _broadcasting(lax.add), host=np.add)
sub_p = primitive("sub", _broadcasting(lax.sub), host=np.subtract)
mul_p = primitive("mul", _broadcasting(lax.mul), host=np.multiply)
div_p = primitive("div", _broadcasting(lax.div), host=_host_div)
neg_p = primitive("neg", lax.neg, host=np.negative)
add_any_p = primitive("add_any", _broadcasting(lax.add), host=np.add)
add, sub, mul, div, neg = add_p.bind, sub_p.bind, mul_p.bind, div_p.bind, neg_p.bind


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


defvjp(
    add_p,
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(y)),
)
defvjp(add_any_p, lambda ans, x, y: lambda g: g, lambda ans, x, y: lambda g: g)
defvjp(
    sub_p,
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(neg(g), shape_of(y)),
)
defvjp(
    mul_p,
    lambda ans, x, y: lambda g: unbroadcast(mul(g, y), shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(mul(x, g), shape_of(y)),
)
defvjp(
    div_p,
    lambda ans, x, y: lambda g: unbroadcast(div(g, y), shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(mul(mul(neg(g), x), integer_pow(y, -2)), shape_of(y)),
)
defvjp(neg_p, lambda ans, x: lambda g: neg(g))

# Comparisons and logic: no gradient; their outputs are never traced.
eq_p = primitive("eq", _broadcasting(lax.eq), host=np.equal, differentiable=False)
ne_p = primitive("ne", _broadcasting(lax.ne), host=np.not_equal, differentiable=False)
lt_p = primitive("lt", _broadcasting(lax.lt), host=np.less, differentiable=False)
le_p = primitive("le", _broadcasting(lax.le), host=np.less_equal, differentiable=False)
gt_p = primitive("gt", _broadcasting(lax.gt), host=np.greater, differentiable=False)
ge_p = primitive("ge", _broadcasting(lax.ge), host=np.greater_equal, differentiable=False)
and_p = primitive("and", lax.bitwise_and, host=np.bitwise_and, differentiable=False)
or_p = primitive("or", lax.bitwise_or, host=np.bitwise_or, differentiable=False)
not_p = primitive("not", lax.bitwise_not, host=np.invert, differentiable=False)
xor_p = primitive("xor", lax.bitwise_xor, host=np.bitwise_xor, differentiable=False)
is_finite_p = primitive("is_finite", lax.is_finite, host=np.isfinite, differentiable=False)
sign_p = primitive("sign", lax.sign, host=np.sign, differentiable=False)
floor_p = primitive("floor", lax.floor, host=np.floor, differentiable=False)
ceil_p = primitive("ceil", lax.ceil, host=np.ceil, differentiable=False)
round_p = primitive(
    "round",
    lambda x, rounding_method=0: lax.round(x, rounding_method),
    ("rounding_method",),
    differentiable=False,
)
eq, ne, lt, le, gt, ge = eq_p.bind, ne_p.bind, lt_p.bind, le_p.bind, gt_p.bind, ge_p.bind
logical_and, sign, floor = and_p.bind, sign_p.bind, floor_p.bind


class _SelectN(Primitive):
    """select_n(which, *cases): case i gets `g` where it was selected, 0 elsewhere."""

    def vjp(self, g, node):
        which, *cases = node.primals
        return [
            select_n(which, *(g if j == i - 1 else zeros_like(g) for j in range(len(cases))))
            for i in node.argnums
        ]


def _host_select_n(which, *cases):
    if len(cases) == 2 and which.dtype == np.bool_:
        return np.where(which, cases[1], cases[0])
    return np.choose(which, cases)


select_n_p = primitive("select_n", lax.select_n, host=_host_select_n, cls=_SelectN)


def select_n(which: Any, *cases: Any) -> Any:
    return select_n_p.bind(which, *cases)


max_p = primitive("max", _broadcasting(lax.max), host=np.maximum)
min_p = primitive("min", _broadcasting(lax.min), host=np.minimum)
maximum, minimum = max_p.bind, min_p.bind


@jax.jit
def _balanced_eq_mask(x: Any, ans: Any, y: Any):
    x_won = jnp.equal(x, ans).astype(ans.dtype)  # jnp: operands may be broadcastable
    tied = jnp.equal(y, ans).astype(ans.dtype)
    return x_won / (1 + tied)


def _balanced_eq(x: Any, ans: Any, y: Any):
    """1 where x was chosen, 1/2 where x and y tied, 0 elsewhere (JAX's convention).

    A constant (no gradient flows through the comparison), computed in one
    compiled call, or with NumPy on host values.
    """
    x, ans, y = raw(x), raw(ans), raw(y)
    if host.host_operands((x, ans, y)) is not None:
        x, ans, y = host.host_operands((x, ans, y))
        x_won = np.equal(x, ans).astype(ans.dtype)
        return x_won / (1 + np.equal(y, ans).astype(ans.dtype))
    return _balanced_eq_mask(x, ans, y)


_chooser_vjps = (  # max and min: the cotangent follows the chosen operand
    lambda ans, x, y: lambda g: unbroadcast(mul(g, _balanced_eq(x, ans, y)), shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(mul(g, _balanced_eq(y, ans, x)), shape_of(y)),
)
defvjp(max_p, *_chooser_vjps)
defvjp(min_p, *_chooser_vjps)

clamp_p = primitive("clamp", lax.clamp, host=lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi))
defvjp(
    clamp_p,
    lambda ans, lo, x, hi: (
        lambda g: unbroadcast(
            select_n(logical_and(gt(lo, x), lt(lo, hi)), zeros_like(g), g), shape_of(lo)
        )
    ),
    lambda ans, lo, x, hi: lambda g: select_n(logical_and(gt(x, lo), lt(x, hi)), zeros_like(g), g),
    lambda ans, lo, x, hi: (
        lambda g: unbroadcast(select_n(lt(hi, x), zeros_like(g), g), shape_of(hi))
    ),
)

# --- powers, exponentials, logarithms ----------------------------------------


def _host_integer_pow(x, y):
    if y < 0 and np.result_type(x).kind in "iu":
        return NotImplemented
    if y == 2:
        return np.multiply(x, x)
    return np.power(x, np.asarray(y, np.result_type(x)))


integer_pow_p = primitive(
    "integer_pow", lambda x, y: lax.integer_pow(x, y), ("y",), host=_host_integer_pow
)


def integer_pow(x: Any, y: int) -> Any:
    return integer_pow_p.bind(x, y=y)


def _integer_pow_vjp(ans, x, y):
    """d/dx x**y = y * x**(y-1), with x**1 = x and x**0 = 1 spelled out (no extra ops)."""
    if y == 0:
        return lambda g: zeros_like(g)
    if y == 1:
        return lambda g: g
    if y == 2:
        return lambda g: mul(g, mul(const(x, 2), x))
    return lambda g: mul(g, mul(const(x, y), integer_pow(x, y - 1)))


defvjp(integer_pow_p, _integer_pow_vjp)

square_p = primitive("square", lax.square, host=np.square)
defvjp(square_p, lambda ans, x: lambda g: mul(g, mul(const(x, 2), x)))

pow_p = primitive("pow", _broadcasting(lax.pow), host=np.power)
pow_ = pow_p.bind
log_p = primitive("log", lax.log, host=np.log)
log = log_p.bind


def _replace_zero(x: Any) -> Any:
    return select_n(eq(x, const(x, 0)), x, full_like(x, 1))


defvjp(
    pow_p,
    lambda ans, x, y: (
        lambda g: unbroadcast(mul(g, mul(y, pow_(x, sub(y, const(y, 1))))), shape_of(x))
    ),
    lambda ans, x, y: lambda g: unbroadcast(mul(g, mul(log(_replace_zero(x)), ans)), shape_of(y)),
)

sqrt_p = primitive("sqrt", lax.sqrt, host=np.sqrt)
rsqrt_p = primitive("rsqrt", lax.rsqrt, host=lambda x: np.reciprocal(np.sqrt(x)))
cbrt_p = primitive("cbrt", lax.cbrt, host=np.cbrt)
exp_p = primitive("exp", lax.exp, host=np.exp)
exp2_p = primitive("exp2", lax.exp2, host=np.exp2)
log1p_p = primitive("log1p", lax.log1p, host=np.log1p)
expm1_p = primitive("expm1", lax.expm1, host=np.expm1)
sqrt, rsqrt, exp = sqrt_p.bind, rsqrt_p.bind, exp_p.bind

defvjp(sqrt_p, lambda ans, x: lambda g: mul(g, div(const(x, 0.5), ans)))
defvjp(rsqrt_p, lambda ans, x: lambda g: mul(g, mul(const(x, -0.5), div(ans, x))))
defvjp(cbrt_p, lambda ans, x: lambda g: mul(g, mul(const(x, 1 / 3), integer_pow(ans, -2))))
defvjp(exp_p, lambda ans, x: lambda g: mul(g, ans))
defvjp(exp2_p, lambda ans, x: lambda g: mul(g, mul(const(x, math.log(2)), ans)))
defvjp(log_p, lambda ans, x: lambda g: div(g, x))
defvjp(log1p_p, lambda ans, x: lambda g: div(g, add(x, const(x, 1))))
defvjp(expm1_p, lambda ans, x: lambda g: mul(g, add(ans, const(ans, 1))))

# --- trigonometric, hyperbolic and special functions --------------------------

sin_p = primitive("sin", lax.sin, host=np.sin)
cos_p = primitive("cos", lax.cos, host=np.cos)
tan_p = primitive("tan", lax.tan, host=np.tan)
asin_p = primitive("asin", lax.asin, host=np.arcsin)
acos_p = primitive("acos", lax.acos, host=np.arccos)
atan_p = primitive("atan", lax.atan, host=np.arctan)
sinh_p = primitive("sinh", lax.sinh, host=np.sinh)
cosh_p = primitive("cosh", lax.cosh, host=np.cosh)
tanh_p = primitive("tanh", lax.tanh, host=np.tanh)
asinh_p = primitive("asinh", lax.asinh, host=np.arcsinh)
acosh_p = primitive("acosh", lax.acosh, host=np.arccosh)
atanh_p = primitive("atanh", lax.atanh, host=np.arctanh)
atan2_p = primitive("atan2", _broadcasting(lax.atan2), host=np.arctan2)
logistic_p = primitive(
    "logistic", lax.logistic, host=lambda x: np.reciprocal(np.exp(np.negative(x)) + x.dtype.type(1))
)
erf_p = primitive("erf", lax.erf)
erf_inv_p = primitive("erf_inv", lax.erf_inv)
abs_p = primitive("abs", lax.abs, host=np.abs)
sin, cos, sinh, cosh = sin_p.bind, cos_p.bind, sinh_p.bind, cosh_p.bind
tanh, logistic, abs_ = tanh_p.bind, logistic_p.bind, abs_p.bind


def _one_minus_square(x: Any) -> Any:
    return sub(const(x, 1), mul(x, x))


defvjp(sin_p, lambda ans, x: lambda g: mul(g, cos(x)))
defvjp(cos_p, lambda ans, x: lambda g: mul(g, neg(sin(x))))
defvjp(tan_p, lambda ans, x: lambda g: mul(g, add(const(x, 1), mul(ans, ans))))
defvjp(asin_p, lambda ans, x: lambda g: mul(g, rsqrt(_one_minus_square(x))))
defvjp(acos_p, lambda ans, x: lambda g: mul(g, neg(rsqrt(_one_minus_square(x)))))
defvjp(atan_p, lambda ans, x: lambda g: div(g, add(const(x, 1), mul(x, x))))
defvjp(sinh_p, lambda ans, x: lambda g: mul(g, cosh(x)))
defvjp(cosh_p, lambda ans, x: lambda g: mul(g, sinh(x)))
defvjp(tanh_p, lambda ans, x: lambda g: mul(g, _one_minus_square(ans)))
defvjp(asinh_p, lambda ans, x: lambda g: mul(g, rsqrt(add(mul(x, x), const(x, 1)))))
defvjp(
    acosh_p, lambda ans, x: lambda g: mul(g, rsqrt(mul(sub(x, const(x, 1)), add(x, const(x, 1)))))
)
defvjp(atanh_p, lambda ans, x: lambda g: div(g, _one_minus_square(x)))
defvjp(
    atan2_p,
    lambda ans, x, y: lambda g: unbroadcast(mul(g, div(y, add(mul(x, x), mul(y, y)))), shape_of(x)),
    lambda ans, x, y: (
        lambda g: unbroadcast(mul(g, div(neg(x), add(mul(x, x), mul(y, y)))), shape_of(y))
    ),
)
defvjp(logistic_p, lambda ans, x: lambda g: mul(g, mul(ans, sub(const(ans, 1), ans))))
defvjp(
    erf_p,
    lambda ans, x: lambda g: mul(g, mul(const(x, 2 / math.sqrt(math.pi)), exp(neg(mul(x, x))))),
)
defvjp(
    erf_inv_p,
    lambda ans, x: lambda g: mul(g, mul(const(x, math.sqrt(math.pi) / 2), exp(mul(ans, ans)))),
)
# abs'(0) = +1, as in JAX 0.10 (PyTorch uses sign(0) = 0 here; chainrule agrees with jax.grad).
defvjp(abs_p, lambda ans, x: lambda g: select_n(ge(x, const(x, 0)), neg(g), g))

rem_p = primitive("rem", lax.rem, host=np.fmod)
defvjp(
    rem_p,
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(x)),
    lambda ans, x, y: (
        lambda g: unbroadcast(
            mul(neg(g), mul(sign(div(x, y)), floor(abs_(div(x, y))))), shape_of(y)
        )
    ),
)

# --- identities and type conversion -------------------------------------------

stop_gradient_p = primitive(
    "stop_gradient", lax.stop_gradient, host=lambda x: x, differentiable=False
)
stop_gradient = stop_gradient_p.bind

copy_p = primitive("copy", lambda x: x, host=lambda x: x)
defvjp(copy_p, lambda ans, x: lambda g: g)

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
)

convert_element_type_p = primitive(
    "convert_element_type",
    lambda x, new_dtype: lax.convert_element_type(x, new_dtype),
    ("new_dtype",),
    host=lambda x, new_dtype: np.asarray(x).astype(new_dtype),
)


def convert_element_type(x: Any, new_dtype: Any) -> Any:
    if dtype_of(x) == np.dtype(new_dtype):
        return x
    return convert_element_type_p.bind(x, new_dtype=np.dtype(new_dtype))


defvjp(
    convert_element_type_p, lambda ans, x, new_dtype: lambda g: convert_element_type(g, dtype_of(x))
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
    host=lambda x, new_sizes, dimensions=None: (
        np.reshape(x, new_sizes) if dimensions is None else NotImplemented
    ),
)


def reshape(x: Any, new_sizes: Sequence[int]) -> Any:
    return reshape_p.bind(x, new_sizes=tuple(new_sizes), dimensions=None)


def _reshape_vjp(ans, x, new_sizes, dimensions):
    if dimensions is not None:
        raise NotImplementedError("chainrule: reshape with `dimensions` is not supported")
    return lambda g: reshape(g, shape_of(x))


defvjp(reshape_p, _reshape_vjp)

squeeze_p = primitive(
    "squeeze",
    lax.squeeze,
    ("dimensions",),
    host=lambda x, dimensions: np.squeeze(x, tuple(dimensions)),
)
defvjp(squeeze_p, lambda ans, x, dimensions: lambda g: reshape(g, shape_of(x)))

transpose_p = primitive(
    "transpose",
    lax.transpose,
    ("permutation",),
    host=lambda x, permutation: np.transpose(x, permutation),
)


def transpose(x: Any, permutation: Sequence[int]) -> Any:
    permutation = tuple(permutation)
    if permutation == tuple(range(len(permutation))):
        return x
    return transpose_p.bind(x, permutation=permutation)


defvjp(transpose_p, lambda ans, x, permutation: lambda g: transpose(g, argsort(permutation)))

rev_p = primitive(
    "rev", lax.rev, ("dimensions",), host=lambda x, dimensions: np.flip(x, tuple(dimensions))
)
defvjp(rev_p, lambda ans, x, dimensions: lambda g: rev_p.bind(g, dimensions=dimensions))


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


class _DynamicSlice(Primitive):
    """Index operands are integers: only the array operand(s) get cotangents."""

    def vjp(self, g, node):
        if self.name == "dynamic_slice":
            x, *idx = node.primals
            assert node.argnums == (0,), node.argnums
            return [dynamic_update_slice(zeros_like(x), g, idx)]
        x, update, *idx = node.primals
        rules = {
            0: lambda: dynamic_update_slice(g, zeros_like(update), idx),
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


dynamic_slice_p = primitive(
    "dynamic_slice",
    lambda x, *idx, slice_sizes: lax.dynamic_slice(x, idx, slice_sizes),
    ("slice_sizes",),
    host=lambda x, *idx, slice_sizes: x[_clamped_window(x, idx, slice_sizes)],
    cls=_DynamicSlice,
)
dynamic_update_slice_p = primitive(
    "dynamic_update_slice",
    lambda x, update, *idx: lax.dynamic_update_slice(x, update, idx),
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
        zeros_like(x),
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
)


defvjp(gather_p, _gather_vjp, None)
defvjp(scatter_add_p, lambda ans, x, *a, **p: lambda g: g, None, _scatter_add_updates_vjp)

# --- reductions ----------------------------------------------------------------

reduce_sum_p = primitive(
    "reduce_sum",
    lambda x, axes: lax.reduce_sum(x, axes),
    ("axes",),
    host=lambda x, axes, out_sharding=None: np.add.reduce(x, tuple(axes), dtype=x.dtype),
)


def reduce_sum(x: Any, axes: Sequence[int]) -> Any:
    return reduce_sum_p.bind(x, axes=tuple(axes))


def _kept_dims(x: Any, axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in range(len(shape_of(x))) if d not in axes)


defvjp(
    reduce_sum_p,
    lambda ans, x, axes: lambda g: broadcast_in_dim(g, shape_of(x), _kept_dims(x, axes)),
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
        kept = _kept_dims(x, axes)
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

# --- linear algebra -------------------------------------------------------------


_DOT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _host_dot_general(x, y, dimension_numbers, precision=None, preferred_element_type=None, **_):
    """lax.dot_general as one `np.matmul` of (batch, free, contracted) layouts."""
    dtype = x.dtype if preferred_element_type is None else np.dtype(preferred_element_type)
    if dtype not in _DOT_DTYPES or x.dtype != dtype or y.dtype != dtype:
        if preferred_element_type is None or dtype not in _DOT_DTYPES:
            return NotImplemented
        x, y = np.asarray(x, dtype), np.asarray(y, dtype)
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


def add_cotangents(a: Any, b: Any) -> Any:
    """Accumulates two cotangents; tuples (multiple-results nodes) add elementwise."""
    if isinstance(a, tuple):
        return tuple(
            y if x is None else x if y is None else add_cotangents(x, y)
            for x, y in zip(a, b, strict=True)
        )
    return add_any_p.bind(a, b)


def is_traced(x: Any) -> bool:
    return isinstance(x, Tracer)
