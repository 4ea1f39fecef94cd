"""Elementwise primitives: arithmetic, comparisons, selection, powers,
exponentials, logarithms, trigonometric and special functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from chainrule.engine import host
from chainrule.engine.core import Primitive, raw
from chainrule.engine.core import bind as core_bind
from chainrule.engine.rules.registry import (
    const,
    defvjp,
    dtype_of,
    full_like,
    primitive,
    shape_of,
    zeros_like,
)
from chainrule.engine.rules.shape import (
    broadcast_in_dim,
    conj,
    convert_element_type,
    is_complex,
    unbroadcast,
)

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
            try:
                shape = np.broadcast_shapes(xs, ys)
            except ValueError:  # (lax refuses them in its own words: JAX's TypeError)
                return op(x, y)
            x, y = jnp.broadcast_to(x, shape), jnp.broadcast_to(y, shape)
        return op(x, y)

    impl.__name__ = getattr(op, "__name__", "binary")
    return impl


# Binary lax primitives take equal shapes, or a rank-0 operand with an array;
# their rules sum the cotangent back to each operand's shape with `unbroadcast`.


def _host_div(x, y):
    """lax.div: true division for floats; for integers XLA's: rounding toward
    zero, -1 (all bits set) for a zero divisor, and the minimum over -1 is the
    minimum (NumPy gives 0 for a zero divisor)."""
    if np.result_type(x).kind not in "iu":
        return np.true_divide(x, y)
    with np.errstate(divide="ignore", over="ignore"):
        q = np.floor_divide(x, y)
        q = q + ((q < 0) & (q * y != x)).astype(q.dtype)
    zero = np.equal(y, 0)
    return np.where(zero, np.array(-1).astype(q.dtype), q) if zero.any() else q


def _host_rem(x, y):
    """lax.rem: C's fmod, the sign of the dividend; for integers XLA's: the
    dividend for a zero divisor (NumPy gives 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.fmod(x, y)
    if np.result_type(x).kind not in "iu":
        return r
    zero = np.equal(y, 0)
    return np.where(zero, x, r).astype(r.dtype) if zero.any() else r


add_p = primitive("add", _broadcasting(lax.add), host=np.add)
sub_p = primitive("sub", _broadcasting(lax.sub), host=np.subtract)


class _Mul(Primitive):
    """`mul`; JAX's `out_dtype` parameter (multiply in a wider dtype) is the
    product of the operands converted to it, so each conversion's own rule
    brings the cotangents back to the operands' dtypes."""

    def apply(self, trace, args, params):
        out_dtype = params.get("out_dtype")
        if out_dtype is not None:
            args = [convert_element_type(a, out_dtype) for a in args]
        return [core_bind(self, *args)]


mul_p = primitive("mul", _broadcasting(lax.mul), host=np.multiply, cls=_Mul)
mul_p.implied_params = frozenset({"out_dtype"})  # taken by `_Mul.apply`
div_p = primitive("div", _broadcasting(lax.div), host=_host_div)
neg_p = primitive("neg", lax.neg, host=np.negative)
add_any_p = primitive("add_any", _broadcasting(lax.add), host=np.add)
add, sub, mul, div, neg = add_p.bind, sub_p.bind, mul_p.bind, div_p.bind, neg_p.bind


defvjp(
    add_p,
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(y)),
    formulas=("1", "1"),
)
defvjp(
    add_any_p,
    lambda ans, x, y: lambda g: g,
    lambda ans, x, y: lambda g: g,
    formulas=("1", "1"),
)
defvjp(
    sub_p,
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(neg(g), shape_of(y)),
    formulas=("1", "-1"),
)


defvjp(
    mul_p,
    lambda ans, x, y: lambda g: unbroadcast(mul(g, y), shape_of(x)),
    lambda ans, x, y: lambda g: unbroadcast(mul(x, g), shape_of(y)),
    formulas=("y", "x"),
)
defvjp(
    div_p,
    lambda ans, x, y: lambda g: unbroadcast(div(g, y), shape_of(x)),
    # g / y**2 first, then x: as JAX orders it, so that where g * x underflows
    # the answer is JAX's inf, not 0 * inf = NaN.
    lambda ans, x, y: lambda g: unbroadcast(neg(mul(mul(g, integer_pow(y, -2)), x)), shape_of(y)),
    formulas=("1/y", "-x/y**2"),
)
defvjp(neg_p, lambda ans, x: lambda g: neg(g), formulas=("-1",))

# Comparisons and logic: no gradient; their outputs are never traced. NumPy's
# give XLA's bits, so they also fold constants (`exact_on_host`).


def _logic(name: str, impl: Any, host_impl: Any) -> Primitive:
    return primitive(name, impl, host=host_impl, differentiable=False, exact_on_host=True)


eq_p = _logic("eq", _broadcasting(lax.eq), np.equal)
ne_p = _logic("ne", _broadcasting(lax.ne), np.not_equal)
lt_p = _logic("lt", _broadcasting(lax.lt), np.less)
le_p = _logic("le", _broadcasting(lax.le), np.less_equal)
gt_p = _logic("gt", _broadcasting(lax.gt), np.greater)
ge_p = _logic("ge", _broadcasting(lax.ge), np.greater_equal)
and_p = _logic("and", lax.bitwise_and, np.bitwise_and)
or_p = _logic("or", lax.bitwise_or, np.bitwise_or)
not_p = _logic("not", lax.bitwise_not, np.invert)
xor_p = primitive("xor", lax.bitwise_xor, host=np.bitwise_xor, differentiable=False)


def _host_bitcast(x, new_dtype):
    """lax.bitcast_convert_type for equal item sizes (NumPy's view)."""
    x = np.asarray(x)
    new = np.dtype(new_dtype)
    return x.view(new) if new.itemsize == x.dtype.itemsize else NotImplemented


# The bits of a float as an integer (jnp.signbit, so jax.scipy.special.gamma): no
# gradient flows through it.
bitcast_convert_type_p = primitive(
    "bitcast_convert_type",
    lambda x, new_dtype: lax.bitcast_convert_type(x, new_dtype),
    ("new_dtype",),
    host=_host_bitcast,
    differentiable=False,
)
is_finite_p = primitive("is_finite", lax.is_finite, host=np.isfinite, differentiable=False)


def _host_sign(x):
    """lax.sign: XLA keeps a zero's sign (sign(-0) is -0; NumPy's is +0)."""
    out = np.sign(x)
    return np.copysign(out, x) if out.dtype.kind == "f" else out


sign_p = primitive("sign", lax.sign, host=_host_sign, differentiable=False)
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
        on_false, on_true = cases
        unsigned = _UNSIGNED.get(on_true.dtype)
        if (
            unsigned is not None
            and which.size >= _SELECT_BY_BITS
            and on_false.dtype == on_true.dtype
            and on_false.shape == on_true.shape == which.shape
        ):
            return _select_bits(which, on_false, on_true, unsigned)
        return np.where(which, on_true, on_false)
    return np.choose(which, cases)


def _select_bits(which, on_false, on_true, unsigned):
    """`np.where(which, on_true, on_false)` by masking the bits: the same values to
    the bit (NaN payloads, signed zeros), without `np.where`'s branch per element,
    which is several times slower on a mask without pattern (ReLU's)."""
    mask = which.view(np.uint8).astype(unsigned)
    np.negative(mask, out=mask)  # all ones where `which` holds
    out = np.bitwise_and(on_true.view(unsigned), mask)
    np.invert(mask, out=mask)
    np.bitwise_or(out, np.bitwise_and(on_false.view(unsigned), mask), out=out)
    return out.view(on_true.dtype)


_SELECT_BY_BITS = 4096  # from this size, `_select_bits` is the faster one
_UNSIGNED = {  # a dtype -> the unsigned integer of its width
    np.dtype(np.float32): np.uint32,
    np.dtype(np.float64): np.uint64,
    np.dtype(np.int32): np.uint32,
}


select_n_p = primitive(
    "select_n", lax.select_n, host=_host_select_n, cls=_SelectN, exact_on_host=True
)


def select_n(which: Any, *cases: Any) -> Any:
    return select_n_p.bind(which, *cases)


def masked_product(mask: Any, x: Any) -> Any:
    """`mask * x` for a boolean `mask` of `x`'s shape, as XLA computes it when
    the conversion and the product are one program (a `jnp.multiply`, any
    `jit` body): `select(mask, x, 0)`, so a NaN or infinity where the mask is
    False gives 0, not NaN (`jnp.sum(mask * jnp.log(p))` with p = 0 there).
    Its VJP is select's: no NaN in the gradient either."""
    zeros = zeros_like(x)
    value = raw(x)
    if getattr(value, "weak_type", False):  # zeros of x's weak type, so the result has it
        zeros = convert_element_type(zeros, value.dtype, weak_type=True)
    return select_n(mask, zeros, x)


def masks_as_xla_does(mask_dtype: Any, out_dtype: Any) -> bool:
    """Whether XLA's CPU compiler rewrites `convert(mask) * x` into a select for
    these dtypes: a boolean mask and a float or complex product, except
    bfloat16 (computed in float32 on the CPU, where the pattern is lost)."""
    out = np.dtype(out_dtype)
    return np.dtype(mask_dtype) == np.bool_ and out.kind in "fc" and out != jnp.bfloat16


def _signed_zero_extremum(np_op: Any, negative_zero_loses: bool) -> Callable:
    """XLA's max or min: -0 orders below +0 (max(+0, -0) is +0, min is -0).
    NumPy answers `y` for equal operands, so only where `y` is the zero that
    XLA would not choose (-0 for max: `negative_zero_loses`; +0 for min) and
    `x` is a zero too does the answer become `x`. A scalar `y` (`maximum(x,
    0.0)`) is one test in Python."""

    def host(x, y):
        out = np_op(x, y)
        if out.dtype.kind != "f":
            return out
        if np.ndim(y) == 0:
            value = float(y)
            if value != 0.0 or (math.copysign(1.0, value) < 0) != negative_zero_loses:
                return out
            wrong: Any = True
        else:
            wrong = np.equal(y, 0) & (np.signbit(y) == negative_zero_loses)
            if not wrong.any():
                return out
        return np.where(wrong & np.equal(x, 0), x, out).astype(out.dtype, copy=False)

    return host


_host_max = _signed_zero_extremum(np.maximum, negative_zero_loses=True)
_host_min = _signed_zero_extremum(np.minimum, negative_zero_loses=False)
max_p = primitive("max", _broadcasting(lax.max), host=_host_max)
min_p = primitive("min", _broadcasting(lax.min), host=_host_min)
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
defvjp(
    max_p,
    *_chooser_vjps,
    formulas=("where(x > y, 1, where(x == y, 0.5, 0))", "where(y > x, 1, where(x == y, 0.5, 0))"),
)
defvjp(
    min_p,
    *_chooser_vjps,
    formulas=("where(x < y, 1, where(x == y, 0.5, 0))", "where(y < x, 1, where(x == y, 0.5, 0))"),
)

clamp_p = primitive("clamp", lax.clamp, host=lambda lo, x, hi: _host_min(_host_max(x, lo), hi))
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
    # in the formulas, clamp's operands (lo, x, hi) are x, y, z
    formulas=(
        "where((x > y) & (x < z), 1, 0)",
        "where((y > x) & (y < z), 1, 0)",
        "where(z < y, 1, 0)",
    ),
)

# --- powers, exponentials, logarithms ----------------------------------------


def _host_integer_pow(x, y):
    """x**y as XLA computes it, to the bit: square-and-multiply (JAX lowers
    `integer_pow` so), then one division for a negative power. (`np.power`
    rounds differently in about a third of cases, and a product that XLA
    flushes to zero stays finite in it: `1/y` differentiated at y = 1e-19 is
    -inf in JAX.)"""
    if y < 0 and np.result_type(x).kind in "iu":
        return NotImplemented
    if y == 2:  # (the common case, at once)
        return np.multiply(x, x)
    x = np.asarray(x)
    if y == 0:
        return np.ones_like(x)
    if y == 1:
        return np.array(x)  # a new array, as any result
    n, acc = abs(y), None
    while n > 0:
        if n & 1:
            acc = x if acc is None else np.multiply(acc, x)
        n >>= 1
        if n > 0:
            x = np.multiply(x, x)
    return np.divide(np.ones((), acc.dtype), acc) if y < 0 else acc


def _host_pow(x, y):
    """`lax.pow` with NumPy: an integer exponent counts as x's dtype (as JAX
    lowers it; `np.power(float32, int32)` would be float64), and NumPy's
    shortcut for a scalar exponent 0.5 (a square root) gives C's `pow` at -0
    and -inf, as XLA does: pow(-0, 0.5) = +0, pow(-inf, 0.5) = +inf."""
    x, y = np.asarray(x), np.asarray(y)
    if y.dtype != x.dtype:
        y = y.astype(x.dtype)
    out = np.power(x, y)
    if y.ndim == 0 and y == 0.5 and x.dtype.kind == "f":
        out = np.where((x == 0) | (x == -np.inf), np.abs(x), out)
    return out


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


defvjp(integer_pow_p, _integer_pow_vjp, formulas=("where(y == 0, 0, y * x**(y - 1))",))

square_p = primitive("square", lax.square, host=np.square)
square = square_p.bind
defvjp(square_p, lambda ans, x: lambda g: mul(g, mul(const(x, 2), x)), formulas=("2*x",))

pow_p = primitive("pow", _broadcasting(lax.pow), host=_host_pow)
pow_ = pow_p.bind
log_p = primitive("log", lax.log, host=np.log)
log = log_p.bind


def _replace_zero(x: Any) -> Any:
    return select_n(eq(x, const(x, 0)), x, full_like(x, 1))


def _pow_base_vjp(ans, x, y):
    """d/dx x**y = y * x**(y-1). As in JAX, an integer exponent (jnp.power with
    an int array) counts as x's dtype and gives exactly 0 where it is 0 (x = 0
    included); a float exponent 0 at x = 0 gives 0 * inf = nan, as JAX's does."""
    if jnp.issubdtype(dtype_of(y), jnp.inexact):  # (bfloat16 is not NumPy's inexact)
        return lambda g: unbroadcast(mul(g, mul(y, pow_(x, sub(y, const(y, 1))))), shape_of(x))
    y = convert_element_type(y, dtype_of(x))

    def vjp(g):
        d = mul(y, pow_(x, sub(y, const(y, 1))))
        y_is_zero = eq(y, const(y, 0))
        if shape_of(y_is_zero) != shape_of(d):
            lead = len(shape_of(d)) - len(shape_of(y_is_zero))
            y_is_zero = broadcast_in_dim(
                y_is_zero, shape_of(d), tuple(range(lead, len(shape_of(d))))
            )
        d = select_n(y_is_zero, d, zeros_like(d))
        return unbroadcast(mul(g, d), shape_of(x))

    return vjp


defvjp(
    pow_p,
    _pow_base_vjp,
    lambda ans, x, y: lambda g: unbroadcast(mul(g, mul(log(_replace_zero(x)), ans)), shape_of(y)),
    formulas=("y * x**(y - 1)", "log(where(x == 0, 1, x)) * out"),
)

sqrt_p = primitive("sqrt", lax.sqrt, host=np.sqrt)
rsqrt_p = primitive("rsqrt", lax.rsqrt, host=lambda x: np.reciprocal(np.sqrt(x)))
cbrt_p = primitive("cbrt", lax.cbrt, host=np.cbrt)
exp_p = primitive("exp", lax.exp, host=np.exp)
# (no NumPy version: XLA's exp2, sinh and cosh are up to 67, 25 and 24 float32
# ulp from the platform's libm over their range; eagerly JAX computes them)
exp2_p = primitive("exp2", lax.exp2)
log1p_p = primitive("log1p", lax.log1p, host=np.log1p)
expm1_p = primitive("expm1", lax.expm1, host=np.expm1)
sqrt, rsqrt, exp = sqrt_p.bind, rsqrt_p.bind, exp_p.bind

defvjp(sqrt_p, lambda ans, x: lambda g: mul(g, div(const(x, 0.5), ans)), formulas=("1/(2*out)",))
defvjp(
    rsqrt_p,
    lambda ans, x: lambda g: mul(g, mul(const(x, -0.5), div(ans, x))),
    formulas=("-out/(2*x)",),
)
defvjp(
    cbrt_p,
    lambda ans, x: lambda g: mul(g, mul(const(x, 1 / 3), integer_pow(ans, -2))),
    formulas=("1/(3*out**2)",),
)
defvjp(exp_p, lambda ans, x: lambda g: mul(g, ans), formulas=("out",))
defvjp(
    exp2_p,
    lambda ans, x: lambda g: mul(mul(const(x, math.log(2)), g), ans),
    formulas=("log(2) * out",),
)
defvjp(log_p, lambda ans, x: lambda g: div(g, x), formulas=("1/x",))
defvjp(log1p_p, lambda ans, x: lambda g: div(g, add(x, const(x, 1))), formulas=("1/(1 + x)",))
defvjp(expm1_p, lambda ans, x: lambda g: mul(g, add(ans, const(ans, 1))), formulas=("out + 1",))

# --- trigonometric, hyperbolic and special functions --------------------------

sin_p = primitive("sin", lax.sin, host=np.sin)
cos_p = primitive("cos", lax.cos, host=np.cos)
tan_p = primitive("tan", lax.tan, host=np.tan)


def _host_asin(x):
    # XLA's formula, not np.arcsin: with subnormals flushed they differ in
    # [tiny, 2 tiny), where x / (1 + sqrt(1 - x**2)) underflows (to 0 in XLA).
    return 2 * np.arctan2(x, 1 + np.sqrt((1 - x) * (1 + x)))


asin_p = primitive("asin", lax.asin, host=_host_asin)
acos_p = primitive("acos", lax.acos, host=np.arccos)
atan_p = primitive("atan", lax.atan, host=np.arctan)
sinh_p = primitive("sinh", lax.sinh)
cosh_p = primitive("cosh", lax.cosh)
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


# The derivatives below are JAX's, term for term (`square` where JAX writes it,
# the factors in its order once transposed): the same rounding, and the same
# NaN, infinity or signed zero where a term overflows or underflows (arctan''
# at the largest float is NaN in JAX, as 0 * inf; x * x would give 0 there).


def _one_minus_square(x: Any) -> Any:
    return sub(const(x, 1), square(x))


defvjp(sin_p, lambda ans, x: lambda g: mul(g, cos(x)), formulas=("cos(x)",))
defvjp(cos_p, lambda ans, x: lambda g: mul(g, neg(sin(x))), formulas=("-sin(x)",))
defvjp(
    tan_p,
    lambda ans, x: lambda g: mul(g, add(const(x, 1), square(ans))),
    formulas=("1 + out**2",),
)
defvjp(
    asin_p,
    lambda ans, x: lambda g: mul(g, rsqrt(_one_minus_square(x))),
    formulas=("1/sqrt(1 - x**2)",),
)
defvjp(
    acos_p,
    lambda ans, x: lambda g: mul(g, neg(rsqrt(_one_minus_square(x)))),
    formulas=("-1/sqrt(1 - x**2)",),
)
defvjp(
    atan_p, lambda ans, x: lambda g: div(g, add(const(x, 1), square(x))), formulas=("1/(1 + x**2)",)
)
defvjp(sinh_p, lambda ans, x: lambda g: mul(g, cosh(x)), formulas=("cosh(x)",))
defvjp(cosh_p, lambda ans, x: lambda g: mul(g, sinh(x)), formulas=("sinh(x)",))


def _tanh_vjp(ans, x):
    """JAX's (g + g * out) * (1 - out), transposed: t = g * (1 - out), t + t * out."""

    def vjp(g):
        t = mul(g, sub(const(ans, 1), ans))
        return add(t, mul(t, ans))

    return vjp


defvjp(tanh_p, _tanh_vjp, formulas=("1 - out**2",))
defvjp(
    asinh_p,
    lambda ans, x: lambda g: mul(g, rsqrt(add(square(x), const(x, 1)))),
    formulas=("1/sqrt(x**2 + 1)",),
)
# (as JAX's rules are written, so the rounding and the infinities agree: x**2 - 1
# gives +inf at x = -1 where (x - 1)(x + 1) gives rsqrt(-0) = -inf, and the
# factored 1/(1 + x) * 1/(1 - x) stays accurate near |x| = 1, where 1 - x**2
# cancels)
defvjp(
    acosh_p,
    lambda ans, x: lambda g: mul(g, rsqrt(sub(square(x), const(x, 1)))),
    formulas=("1/sqrt(x**2 - 1)",),
)
defvjp(
    atanh_p,
    lambda ans, x: (
        lambda g: mul(div(const(x, 1), add(const(x, 1), x)), div(g, sub(const(x, 1), x)))
    ),
    formulas=("1/((1 + x) * (1 - x))",),
)
defvjp(
    atan2_p,
    lambda ans, x, y: lambda g: unbroadcast(mul(g, div(y, add(square(x), square(y)))), shape_of(x)),
    lambda ans, x, y: (
        lambda g: unbroadcast(mul(g, div(neg(x), add(square(x), square(y)))), shape_of(y))
    ),
    formulas=("y/(x**2 + y**2)", "-x/(x**2 + y**2)"),
)
defvjp(
    logistic_p,
    lambda ans, x: lambda g: mul(g, mul(ans, sub(const(ans, 1), ans))),
    formulas=("out * (1 - out)",),
)
defvjp(
    erf_p,
    lambda ans, x: lambda g: mul(mul(const(x, 2 / math.sqrt(math.pi)), g), exp(neg(square(x)))),
    formulas=("2 * exp(-x**2) / sqrt(pi)",),
)
defvjp(
    erf_inv_p,
    lambda ans, x: lambda g: mul(mul(const(x, math.sqrt(math.pi) / 2), g), exp(square(ans))),
    formulas=("sqrt(pi) * exp(out**2) / 2",),
)


def _abs_vjp(ans, x):
    """abs'(0) = +1 for reals, as in JAX 0.10 (PyTorch uses sign(0) = 0 here;
    chainrule agrees with jax.grad). For complex x (|x| is not holomorphic: see
    `shape.real`), g * conj(x) / |x|, and 0 at 0, as JAX's."""
    if not is_complex(x):
        # JAX's select(x >= 0, g, -g) transposed is select(x >= 0, g, 0) plus
        # -select(x >= 0, 0, g): where x < 0, 0 - g, so a zero cotangent gives
        # +0 there (neg(g) would give -0: 1/grad was -inf where JAX's is +inf)
        return lambda g: select_n(ge(x, const(x, 0)), sub(zeros_like(g), g), g)
    dtype = dtype_of(x)
    direction = div(conj(x), _replace_zero(convert_element_type(ans, dtype)))
    return lambda g: mul(convert_element_type(g, dtype), direction)


defvjp(abs_p, _abs_vjp, formulas=("where(x >= 0, 1, -1)",))

rem_p = primitive("rem", lax.rem, host=_host_rem)
defvjp(
    rem_p,
    lambda ans, x, y: lambda g: unbroadcast(g, shape_of(x)),
    lambda ans, x, y: (
        lambda g: unbroadcast(
            mul(neg(g), mul(sign(div(x, y)), floor(abs_(div(x, y))))), shape_of(y)
        )
    ),
    formulas=("1", "-sign(x/y) * floor(abs(x/y))"),
)
