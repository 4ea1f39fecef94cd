"""Array semantics on chainrule's ops, and `ArrayTracer`, the Tracer with operators.

The functions here give `jax.numpy` semantics (dtype promotion, broadcasting,
matmul's rules) on top of the lax-level ops of `rules`, with fast paths that
decide from types alone when there is nothing to promote or broadcast (the
common case); `chainrule.numpy` re-exports them. `ArrayTracer`'s operators
(`+ - * / ** @`, comparisons) and array methods (`.sum()`, `.T`,
`.reshape()`, ...) are these functions. Everything else a `jax.Array` has
(indexing, `.at[]`, `.var()`, ...) is `jax.core.Tracer`'s own: JAX's
implementation, whose primitives reach chainrule's trace like any JAX code.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as jax_config
from jax._src.array import ArrayImpl as _ArrayImpl  # concrete jax.Arrays (JAX 0.10)
from jax._src.numpy.util import _rank_promotion_warning_or_error

from chainrule.engine import core, host, rules
from chainrule.engine.core import Tracer, raw

# --- dtype promotion and broadcasting, as jax.numpy does them -----------------


def _result_type(*args: Any):
    return jnp.result_type(*(raw(a) for a in args))


def _as_operand(x: Any, dtype) -> Any:
    if isinstance(x, Tracer):
        return rules.convert_element_type(x, dtype)
    if isinstance(x, (int, float, np.generic, np.ndarray)):
        with host.FLUSHING:  # (a subnormal converted as XLA converts it: to zero)
            out = np.asarray(x, dtype=dtype)  # lax takes NumPy operands; no XLA dispatch
        if isinstance(x, np.ndarray) and out is not x:
            core.carry_untraced(x, out)  # (a converted untraced value is still one)
        return out
    if isinstance(x, jax.Array) and x.dtype == dtype:
        return x  # as it is: `jnp.asarray(x, dtype)` would drop a weak type
    return jnp.asarray(x, dtype=dtype)


def _is_python_scalar(x: Any) -> bool:
    """A Python number: weakly typed in JAX. `np.float64` subclasses `float`, but
    a NumPy scalar is strongly typed (`f32_array + np.float64(1)` is float64 in
    JAX with 64-bit types enabled), so it is not one."""
    return isinstance(x, (int, float)) and not isinstance(x, np.generic)


_FLOATS = frozenset(np.dtype(d) for d in (jnp.bfloat16, np.float16, np.float32, np.float64))


def _common_dtype(args: tuple[Any, ...]):
    """The result dtype without the promotion lattice, in the common case: every
    array operand (at least one a Tracer) has one dtype and the Python numbers
    beside them are weakly typed ones that keep it (an int beside any array, a
    float beside floating arrays). None otherwise."""
    dtype, traced, literal = None, False, None
    for a in args:
        if _is_python_scalar(a):
            if isinstance(a, bool):
                return None
            literal = float if isinstance(a, float) or literal is float else int
            continue
        if isinstance(a, Tracer):
            traced, value = True, raw(a)
            if getattr(value, "weak_type", False):  # weak typing needs the lattice
                return None
        elif isinstance(a, np.ndarray) or (
            isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and not a.weak_type
        ):
            value = a
        else:
            return None
        if dtype is None:
            dtype = value.dtype
        elif value.dtype != dtype:
            return None
    if not traced or (literal is float and dtype not in _FLOATS) or (literal and dtype.kind == "b"):
        return None
    return dtype


def broadcast_to(x: Any, shape: Sequence[int]) -> Any:
    """Broadcasts `x` to `shape` with NumPy's rule, recording `broadcast_in_dim`."""
    shape, xshape = tuple(shape), rules.shape_of(x)
    if xshape == shape:
        return x
    lead = len(shape) - len(xshape)
    return rules.broadcast_in_dim(x, shape, tuple(range(lead, len(shape))))


def _broadcast_to(x: Any, shape: tuple[int, ...]) -> Any:
    # lax's binary primitives take a rank-0 operand beside an array as it is.
    return x if rules.shape_of(x) == () else broadcast_to(x, shape)


def _check_python_int(x: int) -> None:
    """Raises JAX's OverflowError for a Python int outside the default integer
    type (int32, or int64 with 64-bit types on), which JAX converts every Python
    int to before it promotes: `x * 2**40` raises in JAX even for a float `x`."""
    if -(2**31) <= x < 2**31:
        return
    dtype = jax.dtypes.canonicalize_dtype(np.int64)
    info = np.iinfo(dtype)
    if not info.min <= x <= info.max:
        raise OverflowError(f"Python int {x} too large to convert to {dtype}")


def _promote_dtypes(args: tuple[Any, ...], inexact: bool = False) -> list[Any]:
    for a in args:
        if type(a) is int:
            _check_python_int(a)
    dtype = _common_dtype(args)
    if dtype is not None and (dtype in _FLOATS or not inexact):
        return [np.asarray(a, dtype) if _is_python_scalar(a) else a for a in args]
    dtype, weak = jax.dtypes.result_type(*(raw(a) for a in args), return_weak_type_flag=True)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    if weak:  # as in JAX, the result stays weakly typed (also beside a boolean or
        # integer array: a weakly typed float joins it as a weak float):
        # lax takes the Python numbers as they are and keeps the weak type.
        # A Python int beside floats becomes a float (beside complex numbers a
        # complex), as lax wants one kind.
        # An array operand is weakly typed `dtype` after, as in `jax.numpy`: a
        # weak int array beside a weak float is converted to a weak float.
        inexact_result = jnp.issubdtype(dtype, jnp.inexact)
        kind = complex if jnp.issubdtype(dtype, jnp.complexfloating) else float
        return [
            (kind(a) if inexact_result else a)  # (True is 1.0 beside a weak float)
            if _is_python_scalar(a)
            else a
            if _is_weak(a) and rules.dtype_of(a) == dtype
            else _as_weak_operand(a, dtype)
            for a in args
        ]
    return [_as_operand(a, dtype) for a in args]


def _as_weak_operand(x: Any, dtype: Any) -> Any:
    """A strongly typed operand (a boolean or integer array) converted to the
    weakly typed `dtype` of a result it joins, as `jax.numpy` converts it."""
    return rules.convert_element_type(x, dtype, weak_type=True)


def _is_weak(x: Any) -> bool:
    """Weakly typed, as JAX means it: a Python number or a value made from one."""
    return _is_python_scalar(x) or bool(getattr(raw(x), "weak_type", False))


def _check_rank_promotion(name: str, *args: Any) -> None:
    """`jax_numpy_rank_promotion` ('warn' or 'raise') for operands of
    different nonzero ranks, as jax.numpy's `name` checks them."""
    if jax_config.numpy_rank_promotion.value != "allow":
        shapes = [rules.shape_of(a) for a in args]
        if len({len(s) for s in shapes if s}) > 1:
            _rank_promotion_warning_or_error(name, shapes)


def promote(*args: Any, inexact: bool = False, name: str | None = None) -> list[Any]:
    """Converts `args` to one dtype and a broadcast-compatible shape. `name`:
    the jax.numpy function whose rank promotion (operands of different ranks)
    `jax_numpy_rank_promotion` governs ('warn' or 'raise'), as in jax.numpy."""
    ops = _promote_dtypes(args, inexact)
    shapes = [rules.shape_of(a) for a in ops]
    first = shapes[0]
    if all(s == first or not s for s in shapes):
        return ops  # lax takes a rank-0 operand beside an array as it is
    if name is not None:
        _check_rank_promotion(name, *ops)
    if host.host_operands(tuple(raw(a) for a in ops)) is not None:
        # The operation runs with NumPy, which broadcasts by itself (and says
        # so when shapes do not broadcast); the VJP rules of the binary
        # primitives un-broadcast their cotangents anyway. Operands of
        # different ranks that do not broadcast are refused as jax.numpy
        # refuses them (`lax.broadcast_shapes`' ValueError); those of one rank
        # by the lax primitive, as in JAX (its TypeError).
        if len({len(s) for s in shapes if s}) > 1:
            jax.lax.broadcast_shapes(*shapes)
        return ops
    if len({len(s) for s in shapes if s}) > 1:
        shape = jax.lax.broadcast_shapes(*shapes)  # (jax.numpy's ValueError)
    else:
        try:
            shape = np.broadcast_shapes(*shapes)
        except ValueError:
            return ops  # (the lax primitive refuses them: JAX's TypeError)
    return [_broadcast_to(a, tuple(shape)) for a in ops]


def _named(f: Callable, name: str, kind: str) -> Callable:
    """Gives a generated function its public name and a docstring."""
    f.__name__ = f.__qualname__ = name
    f.__doc__ = (
        f"{kind} `{name}`, as in jax.numpy (dtype promotion, broadcasting); records on "
        "chainrule's tape when given Tracers."
    )
    return f


def _fast_operand(t: Tracer, other: Any, inexact: bool) -> Any:
    """`other` ready to meet the Tracer `t` in a binary op with no promotion or
    broadcasting to do (the common case, decided from types alone), else None:
    a Python number beside floats, or a Tracer or array of `t`'s dtype and shape
    (or rank 0)."""
    if not _is_float_tracer(t):
        return None
    tv = t.value
    dtype = tv.dtype
    kind = type(other)
    if kind is float:
        return np.asarray(other, dtype)
    if kind is int:
        _check_python_int(other)
        return np.asarray(other, dtype)
    if kind is np.float32 or kind is np.float64:  # a NumPy scalar: strongly typed
        return np.asarray(other) if other.dtype == dtype else None
    if kind is ArrayTracer or kind is np.ndarray or (kind is _ArrayImpl and not other.weak_type):
        ov = other.value if kind is ArrayTracer else other
        if ov.dtype == dtype and (
            ov.shape == tv.shape
            or not ov.shape
            or not tv.shape
            # both on the host: NumPy broadcasts by itself (see `promote`),
            # unless rank promotion is to be warned about or refused
            or (
                type(tv) is np.ndarray
                and type(ov) is np.ndarray
                and (
                    ov.ndim == tv.ndim
                    or (
                        jax_config.numpy_rank_promotion.value == "allow"
                        and _broadcastable(tv.shape, ov.shape)  # (else `promote` says why not)
                    )
                )
            )
        ):
            return other
    return None


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(m == n or m == 1 or n == 1 for m, n in zip(reversed(a), reversed(b), strict=False))


def _is_float_tracer(x: Any) -> bool:
    """A Tracer of a strongly typed floating dtype: nothing for `promote` to do
    for a unary op or reduction (the common case, decided from types alone)."""
    if type(x) is not ArrayTracer:
        return False
    v = x.value
    return v.dtype in _FLOATS and not getattr(v, "weak_type", False)


def _binary(name: str, op: Callable, inexact: bool = False, ordering: bool = False) -> Callable:
    def f(x, y):
        if type(x) is ArrayTracer:
            fast = _fast_operand(x, y, inexact)
            if fast is not None:
                return op(x, fast)
        elif type(y) is ArrayTracer:
            fast = _fast_operand(y, x, inexact)
            if fast is not None:
                return op(fast, y)
        x, y = promote(x, y, inexact=inexact, name=name)
        if ordering and jnp.issubdtype(rules.dtype_of(x), jnp.complexfloating):
            # complex numbers compare lexicographically, as in jax.numpy
            real_x, real_y = rules.real(x), rules.real(y)
            by_imag = op(rules.imag(x), rules.imag(y))
            return rules.select_n(rules.eq(real_x, real_y), op(real_x, real_y), by_imag)
        return op(x, y)

    return _named(f, name, "Elementwise binary")


def _unary(name: str, op: Callable) -> Callable:
    def f(x):
        if not _is_float_tracer(x):
            (x,) = promote(x, inexact=True)
        return op(x)

    return _named(f, name, "Elementwise")


def _masked(x: Any, y: Any) -> tuple[Any, Any] | None:
    """`(mask, other)` when `x * y` is a boolean mask (of the result's shape)
    times a float or complex array (`jax.numpy` then computes it as a select:
    see `rules.masked_product`), else None."""
    for mask, other in ((x, y), (y, x)):
        dtype = getattr(mask, "dtype", None)
        if dtype is None or dtype != np.bool_ or isinstance(mask, Tracer):
            continue
        other_dtype = getattr(raw(other), "dtype", None)
        if other_dtype is None or not rules.masks_as_xla_does(dtype, other_dtype):
            return None
        if np.shape(mask) == np.broadcast_shapes(np.shape(mask), rules.shape_of(other)):
            return mask, other
    return None


def multiply(x: Any, y: Any) -> Any:
    """x * y, as in jax.numpy (dtype promotion, broadcasting); a boolean mask
    times an array is a select, as XLA computes `jnp.multiply` (a NaN where
    the mask is False gives 0); records on chainrule's tape when given Tracers."""
    if type(x) is ArrayTracer:  # (the fast paths first: a mask never takes one)
        fast = _fast_operand(x, y, False)
        if fast is not None:
            return rules.mul(x, fast)
    elif type(y) is ArrayTracer:
        fast = _fast_operand(y, x, False)
        if fast is not None:
            return rules.mul(fast, y)
    masked = _masked(x, y)
    if masked is not None:
        _check_rank_promotion("multiply", x, y)
        mask, other = masked
        (other,) = promote(other)
        return rules.masked_product(mask, broadcast_to(other, np.shape(mask)))
    return rules.mul(*promote(x, y, name="multiply"))


add = _binary("add", rules.add)
subtract = _binary("subtract", rules.sub)
true_divide = divide = _binary("divide", rules.div, inexact=True)
maximum = _binary("maximum", rules.maximum)
minimum = _binary("minimum", rules.minimum)
arctan2 = _binary("arctan2", rules.atan2_p.bind, inexact=True)
less = _binary("less", rules.lt, ordering=True)
less_equal = _binary("less_equal", rules.le, ordering=True)
greater = _binary("greater", rules.gt, ordering=True)
greater_equal = _binary("greater_equal", rules.ge, ordering=True)
equal, not_equal = _binary("equal", rules.eq), _binary("not_equal", rules.ne)

negative = _unary("negative", rules.neg)
sin, cos, tan = _unary("sin", rules.sin), _unary("cos", rules.cos), _unary("tan", rules.tan_p.bind)
arcsin = _unary("arcsin", rules.asin_p.bind)
arccos = _unary("arccos", rules.acos_p.bind)
arctan = _unary("arctan", rules.atan_p.bind)
sinh, cosh, tanh = (
    _unary("sinh", rules.sinh),
    _unary("cosh", rules.cosh),
    _unary("tanh", rules.tanh),
)
arcsinh = _unary("arcsinh", rules.asinh_p.bind)
arccosh = _unary("arccosh", rules.acosh_p.bind)
arctanh = _unary("arctanh", rules.atanh_p.bind)
exp, exp2, log = (
    _unary("exp", rules.exp),
    _unary("exp2", rules.exp2_p.bind),
    _unary("log", rules.log),
)
log1p, expm1 = _unary("log1p", rules.log1p_p.bind), _unary("expm1", rules.expm1_p.bind)
sqrt, cbrt = _unary("sqrt", rules.sqrt), _unary("cbrt", rules.cbrt_p.bind)
square = _unary("square", rules.square_p.bind)
abs = absolute = _unary("abs", rules.abs_)
sign = _unary("sign", rules.sign)


def power(x: Any, y: Any) -> Any:
    """x ** y; a concrete integer exponent (a Python or NumPy integer, a 0-d
    integer array) records `integer_pow`, as jax.numpy does."""
    if not isinstance(y, jax.core.Tracer):
        try:
            n = operator.index(y)
        except TypeError:
            pass
        else:
            if not _is_float_tracer(x):
                (x,) = promote(x)
            return rules.integer_pow(x, n)
    if not isinstance(y, Tracer) and np.issubdtype(rules.dtype_of(y), np.integer):
        # an integer array exponent stays integer, as in jax.numpy (x**0 has
        # derivative 0 even at x = 0, where a float exponent 0 gives nan)
        _check_rank_promotion("power", x, y)
        (x,) = promote(x, inexact=True)
        return rules.pow_(x, y)
    return rules.pow_(*promote(x, y, inexact=True, name="power"))


def where(condition: Any, x: Any, y: Any) -> Any:
    """Selects `x` where `condition` holds, else `y` (jax.numpy.where with 3 args)."""
    x, y = promote(x, y)
    cond = jnp.asarray(raw(condition), dtype=bool)
    shape = tuple(np.broadcast_shapes(cond.shape, rules.shape_of(x), rules.shape_of(y)))
    x, y = broadcast_to(x, shape), broadcast_to(y, shape)
    cond = jnp.broadcast_to(cond, shape)
    return rules.select_n(cond, y, x)


def clip(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002 - numpy's names
    if min is not None:
        x = maximum(min, x)
    if max is not None:
        x = minimum(max, x)
    return x


# --- reductions -----------------------------------------------------------------


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    return tuple(sorted(operator.index(a) % builtins.max(ndim, 1) for a in axis))


def _strong(x: Any) -> Any:
    """`x` strongly typed: `jax.numpy`'s reductions and `astype` give a strong
    result for a weak operand (one made from a Python number)."""
    return rules.weakly_typed(x, False)


_HALF = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def _reduction(name: str, op: Callable, upcast: bool = False) -> Callable:
    def f(x, axis=None, keepdims=False):
        (x,) = promote(x)
        shape = rules.shape_of(x)
        axes = _axes(axis, len(shape))
        dtype = rules.dtype_of(x)
        if upcast and dtype in _HALF:  # summed in float32 and rounded once, as jax.numpy
            out = rules.convert_element_type(
                op(rules.convert_element_type(x, np.float32), axes), dtype
            )
        else:
            out = op(x, axes)
        if keepdims:
            out = rules.reshape(out, tuple(1 if d in axes else n for d, n in enumerate(shape)))
        return _strong(out)

    return _named(f, name, "Reduction")


sum = _reduction("sum", rules.reduce_sum, upcast=True)
max = amax = _reduction("max", lambda x, axes: rules.reduce_max_p.bind(x, axes=axes))
min = amin = _reduction("min", lambda x, axes: rules.reduce_min_p.bind(x, axes=axes))


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    if not _is_float_tracer(x):
        (x,) = promote(x, inexact=True)
    shape = rules.shape_of(x)
    axes = _axes(axis, len(shape))
    dtype = rules.dtype_of(x)
    if dtype in _HALF:  # computed in float32 and rounded once, as jax.numpy
        x = rules.convert_element_type(x, np.float32)
    total = rules.reduce_sum(x, axes)
    out = rules.div(total, rules.const(total, math.prod(shape[d] for d in axes)))
    if dtype in _HALF:
        out = rules.convert_element_type(out, dtype)
    if keepdims:
        out = rules.reshape(out, tuple(1 if d in axes else n for d, n in enumerate(shape)))
    return _strong(out)


def argmax(x: Any, axis: Any = None) -> Any:
    return jnp.argmax(raw(x), axis=axis)


def argmin(x: Any, axis: Any = None) -> Any:
    return jnp.argmin(raw(x), axis=axis)


# --- shapes -----------------------------------------------------------------------


def reshape(x: Any, *shape: Any) -> Any:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    (x,) = promote(x)
    size = int(np.prod(rules.shape_of(x)))
    if shape.count(-1) > 1:
        raise TypeError(f"can only specify one unknown axis size with a `-1` value, got {shape}")
    if -1 in shape:
        known = int(np.prod([n for n in shape if n != -1]))
        shape = tuple(size // known if known and n == -1 else n for n in shape)
    if int(np.prod(shape)) != size:
        raise TypeError(  # (jax.numpy's error, which the same method raises under JAX)
            f"cannot reshape array of shape {rules.shape_of(x)} (size {size}) into shape "
            f"{shape} (size {int(np.prod(shape))})"
        )
    return rules.reshape(x, shape)


def ravel(x: Any) -> Any:
    return reshape(x, (-1,))


def transpose(x: Any, *axes: Any) -> Any:
    if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
        axes = axes[0]
    if type(x) is not ArrayTracer:  # a Tracer already has an array dtype: nothing to promote
        (x,) = promote(x)
    ndim = len(rules.shape_of(x))
    perm = tuple(reversed(range(ndim))) if not axes else tuple(a % ndim for a in axes)
    return rules.transpose(x, perm)


def expand_dims(x: Any, axis: int) -> Any:
    shape = list(rules.shape_of(x))
    shape.insert(axis % (len(shape) + 1), 1)
    return reshape(x, tuple(shape))


def squeeze(x: Any, axis: Any = None) -> Any:
    shape = rules.shape_of(x)
    axes = (
        tuple(d for d, n in enumerate(shape) if n == 1) if axis is None else _axes(axis, len(shape))
    )
    return reshape(x, tuple(n for d, n in enumerate(shape) if d not in axes))


def concatenate(arrays: Sequence[Any], axis: int = 0) -> Any:
    arrays = promote_dtypes_only(*arrays)
    return rules.concatenate(arrays, axis % len(rules.shape_of(arrays[0])))


def stack(arrays: Sequence[Any], axis: int = 0) -> Any:
    return concatenate([expand_dims(a, axis) for a in arrays], axis)


def _transposed_from(y: Any) -> ArrayTracer | None:
    """For `y = w.T` recorded on the tape (w a 2-D Tracer), the Tracer `w` again.

    A Tracer is only a box (value, node, level): re-boxing the transpose's
    operand with its node and level gives exactly the Tracer that was
    transposed, and gradients reach `w` through that node as before.
    """
    if type(y) is not ArrayTracer:
        return None
    node = y.node
    if (
        node.prim is not rules.transpose_p
        or node.argnums != (0,)
        or node.params.get("permutation") != (1, 0)
        or node.primals is None
    ):
        return None
    return ArrayTracer(node.primals[0], node.parents[0], y._trace)


_ARRAY_TYPES = (np.ndarray, _ArrayImpl)


def _same_strong_float(x: Any, y: Any) -> bool:
    """A Tracer and a Tracer or concrete array, of one floating dtype, neither
    weakly typed: nothing for `promote_dtypes_only` to do (decided from types)."""
    kx, ky = type(x), type(y)
    if kx is not ArrayTracer and ky is not ArrayTracer:
        return False
    a = x.value if kx is ArrayTracer else x if kx in _ARRAY_TYPES else None
    b = y.value if ky is ArrayTracer else y if ky in _ARRAY_TYPES else None
    return (
        a is not None
        and b is not None
        and a.dtype == b.dtype
        and a.dtype in _FLOATS
        and not getattr(a, "weak_type", False)
        and not getattr(b, "weak_type", False)
    )


def promote_dtypes_only(*args: Any) -> list[Any]:
    return _promote_dtypes(args)


def matmul(x: Any, y: Any) -> Any:
    """Matrix product with numpy's rules (1-D operands, broadcast batch dims)."""
    if not _same_strong_float(x, y):
        x, y = promote_dtypes_only(x, y)
    xs, ys = rules.shape_of(x), rules.shape_of(y)
    if len(xs) == 2 and len(ys) == 2 and xs[1] == ys[0]:  # the common case
        w = _transposed_from(y)
        if w is not None:  # x @ w.T (a linear layer): contract with w directly, so the
            # backward pass skips the transpose's rule
            return rules.dot_general(x, w, (((1,), (1,)), ((), ())))
        return rules.dot_general(x, y, (((1,), (0,)), ((), ())))
    if not xs or not ys:
        which = 0 if not xs else 1  # (JAX's error type and wording)
        raise ValueError(
            f"matmul input operand {which} must have ndim at least 1, but it has ndim 0"
        )
    if len(xs) == 1 and len(ys) == 1:
        return rules.dot_general(x, y, (((0,), (0,)), ((), ())))
    # a vector and a matrix: one dot_general contracting the vector's only
    # dimension, as jax.numpy emits it (no reshapes around it to record)
    if len(xs) == 1 and len(ys) == 2 and xs[0] == ys[0]:
        w = _transposed_from(y)
        if w is not None:  # v @ w.T: contract with w directly
            return rules.dot_general(x, w, (((0,), (1,)), ((), ())))
        return rules.dot_general(x, y, (((0,), (0,)), ((), ())))
    if len(xs) == 2 and len(ys) == 1 and xs[1] == ys[0]:
        return rules.dot_general(x, y, (((1,), (0,)), ((), ())))
    x2 = reshape(x, (1, *xs)) if len(xs) == 1 else x
    y2 = reshape(y, (*ys, 1)) if len(ys) == 1 else y
    xs2, ys2 = rules.shape_of(x2), rules.shape_of(y2)
    if xs2[-1] != ys2[-2]:
        raise TypeError(  # JAX raises TypeError for this too
            f"matmul: dot_general requires contracting dimensions to have the same size; got "
            f"shapes {xs} @ {ys} ({xs2[-1]} != {ys2[-2]})."
        )
    batch = tuple(np.broadcast_shapes(xs2[:-2], ys2[:-2]))
    if len(xs2) == 2 and not batch:
        out = rules.dot_general(x2, y2, (((1,), (0,)), ((), ())))
    else:
        x2 = _broadcast_leading(x2, batch)
        y2 = _broadcast_leading(y2, batch)
        nb = len(batch)
        out = rules.dot_general(x2, y2, (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))))
    if len(xs) == 1:
        out = squeeze(out, -2)
    if len(ys) == 1:
        out = squeeze(out, -1)
    return out


def _broadcast_leading(x: Any, batch: tuple[int, ...]) -> Any:
    shape = rules.shape_of(x)
    target = (*batch, *shape[-2:])
    if shape == target:
        return x
    lead = len(target) - len(shape)
    return rules.broadcast_in_dim(x, target, tuple(range(lead, len(target))))


def dot(x: Any, y: Any) -> Any:
    if not rules.shape_of(x) or not rules.shape_of(y):
        return multiply(x, y)
    return matmul(x, y)


def zeros_like(x: Any, dtype: Any = None) -> Any:
    return jnp.zeros_like(raw(x), dtype=dtype)


def ones_like(x: Any, dtype: Any = None) -> Any:
    return jnp.ones_like(raw(x), dtype=dtype)


def asarray(x: Any, dtype: Any = None) -> Any:
    if isinstance(x, Tracer):
        return x if dtype is None else _as_operand(x, dtype)
    return jnp.asarray(x, dtype=dtype)


# --- the Tracer with operators --------------------------------------------------------


# the operand types JAX's operators accept (`jax.Array`s include tracers, np.generic
# the ml_dtypes scalars); for another type an operator returns NotImplemented, so
# that Python tries the other operand's reflected method (a sparse matrix's
# `__rmatmul__`, a user's array-like class)
_OPERAND_TYPES = (int, float, complex, np.generic, np.ndarray, jax.Array)
# (the common ones, by exact type: `isinstance` with jax.Array, an abstract class,
# costs a few hundred nanoseconds per operator otherwise)
_COMMON_OPERANDS = frozenset({float, int, np.ndarray, np.float32, np.float64, _ArrayImpl})


def _operator(f: Callable, flip: bool = False, equality: str = "") -> Callable:
    """`f` as the operator method of a Tracer, as JAX's operators take their
    other operand: `__jax_array__` converts it; a type JAX does not accept
    gives NotImplemented (`equality`, the symbol of `==` or `!=`: a test
    with a list, tuple, dict or set raises, as in JAX)."""

    def method(self: Any, other: Any) -> Any:
        if type(other) not in _COMMON_OPERANDS and not isinstance(other, _OPERAND_TYPES):
            convert = getattr(other, "__jax_array__", None)
            if convert is not None:
                other = convert()
            elif equality and type(other) in (dict, list, set, tuple):
                raise TypeError(
                    f"unsupported operand type(s) for {equality}: "
                    f"{type(self).__name__!r} and {type(other).__name__!r}"
                )
            else:
                return NotImplemented
        return f(other, self) if flip else f(self, other)

    method.__name__ = f.__name__
    return method


def _transpose_last_two(x: Any) -> Any:
    n = len(rules.shape_of(x))
    return transpose(x, (*range(n - 2), n - 1, n - 2))


def _method(name: str, fast: Callable, max_args: int, keywords: frozenset = frozenset()):
    """An array method: `fast` when called as it supports, else jax.Array's own."""

    def method(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) <= max_args and kwargs.keys() <= keywords:
            return fast(self, *args, **kwargs)
        return jax.core.Tracer.__getattr__(self, name)(*args, **kwargs)

    method.__name__ = name
    return method


_REDUCTION_KWARGS = frozenset({"axis", "keepdims"})


class ArrayTracer(Tracer):
    """The `Tracer` every transform boxes its values in: operators and array
    methods with fast paths (the functions above); whatever else `jax.Array`
    offers comes from `jax.core.Tracer` and runs JAX's own implementation."""

    __slots__ = ()
    __hash__ = None  # like jax arrays: __eq__ is elementwise

    __add__, __radd__ = _operator(add), _operator(add, flip=True)
    __sub__, __rsub__ = _operator(subtract), _operator(subtract, flip=True)
    __mul__, __rmul__ = _operator(multiply), _operator(multiply, flip=True)
    __truediv__, __rtruediv__ = _operator(divide), _operator(divide, flip=True)
    __pow__, __rpow__ = _operator(power), _operator(power, flip=True)
    __matmul__, __rmatmul__ = _operator(matmul), _operator(matmul, flip=True)
    __lt__, __le__ = _operator(less), _operator(less_equal)
    __gt__, __ge__ = _operator(greater), _operator(greater_equal)
    __eq__ = _operator(equal, equality="==")
    __ne__ = _operator(not_equal, equality="!=")
    __neg__, __abs__ = negative, abs

    def __pos__(self):
        return self

    sum = _method("sum", sum, 1, _REDUCTION_KWARGS)
    mean = _method("mean", mean, 1, _REDUCTION_KWARGS)
    max = _method("max", max, 1, _REDUCTION_KWARGS)
    min = _method("min", min, 1, _REDUCTION_KWARGS)
    argmax = _method("argmax", argmax, 1, frozenset({"axis"}))
    argmin = _method("argmin", argmin, 1, frozenset({"axis"}))
    reshape = _method("reshape", reshape, 8)
    transpose = _method("transpose", transpose, 8)
    ravel = flatten = _method("ravel", ravel, 0)
    squeeze = _method("squeeze", squeeze, 1, frozenset({"axis"}))
    dot = _method("dot", dot, 1)
    clip = _method("clip", clip, 2, frozenset({"min", "max"}))

    def astype(self, dtype: Any) -> Any:
        return _strong(_as_operand(self, dtype))

    T = property(transpose)
    mT = property(_transpose_last_two)


_COMMON_OPERANDS = _COMMON_OPERANDS | {ArrayTracer}
