"""The dynamic front end: Tracers that record operations as Python runs them.

Operators (`+ - * / ** @`, comparisons, indexing) and array methods (`.sum()`,
`.T`, `.reshape()`, ...) on a `Tracer` record nodes immediately, PyTorch-style,
so Python control flow on concrete values just works outside `jax.jit`. The
functions here give `jax.numpy` semantics (dtype promotion, broadcasting) on
top of the lax-level ops of `rules`; `chainrule.numpy` re-exports them.

Anything without a hand-written fast path (e.g. fancy indexing) is recorded
with `lift`: the `jax.numpy` function is captured as a jaxpr and replayed.
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chainrule.engine import core, host, replay, rules
from chainrule.engine.core import Tracer, raw

# --- dtype promotion and broadcasting, as jax.numpy does them -----------------


def _result_type(*args: Any):
    return jnp.result_type(*(raw(a) for a in args))


def _as_operand(x: Any, dtype) -> Any:
    if isinstance(x, Tracer):
        return rules.convert_element_type(x, dtype)
    if isinstance(x, (int, float, np.generic, np.ndarray)):
        return np.asarray(x, dtype=dtype)  # lax takes NumPy operands; no XLA dispatch
    if isinstance(x, jax.Array) and x.dtype == dtype:
        return x  # as it is: `jnp.asarray(x, dtype)` would drop a weak type
    return jnp.asarray(x, dtype=dtype)


_PYTHON_SCALARS = (int, float)


try:  # the type of concrete jax.Arrays, for exact type checks on the hot path
    from jax._src.array import ArrayImpl as _ArrayImpl
except ImportError:  # pragma: no cover - another JAX release
    _ArrayImpl = type(None)

_FLOATS = frozenset(np.dtype(d) for d in (jnp.bfloat16, np.float16, np.float32, np.float64))


def _common_dtype(args: tuple[Any, ...]):
    """The result dtype without the promotion lattice, in the common case: every
    array operand (at least one a Tracer) has one dtype and the Python numbers
    beside them are weakly typed ones that keep it (an int beside any array, a
    float beside floating arrays). None otherwise."""
    dtype, traced, literal = None, False, None
    for a in args:
        if isinstance(a, _PYTHON_SCALARS):
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


def _promote_dtypes(args: tuple[Any, ...], inexact: bool = False) -> list[Any]:
    dtype = _common_dtype(args)
    if dtype is not None and (dtype in _FLOATS or not inexact):
        return [np.asarray(a, dtype) if isinstance(a, _PYTHON_SCALARS) else a for a in args]
    dtype = _result_type(*args)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    if all(_is_weak(a) for a in args):  # as in JAX, the result stays weakly typed:
        # lax takes the Python numbers as they are and keeps the weak type.
        # A Python int beside floats becomes a float, as lax wants one kind.
        inexact_result = jnp.issubdtype(dtype, jnp.inexact)
        return [
            (float(a) if inexact_result and not isinstance(a, bool) else a)
            if isinstance(a, _PYTHON_SCALARS)
            else _as_operand(a, dtype)
            for a in args
        ]
    return [_as_operand(a, dtype) for a in args]


def _is_weak(x: Any) -> bool:
    """Weakly typed, as JAX means it: a Python number or a value made from one."""
    return isinstance(x, _PYTHON_SCALARS) or bool(getattr(raw(x), "weak_type", False))


def promote(*args: Any, inexact: bool = False) -> list[Any]:
    """Converts `args` to one dtype and a broadcast-compatible shape."""
    ops = _promote_dtypes(args, inexact)
    shapes = [rules.shape_of(a) for a in ops]
    first = shapes[0]
    if all(s == first or not s for s in shapes):
        return ops  # lax takes a rank-0 operand beside an array as it is
    if host.host_operands(tuple(raw(a) for a in ops)) is not None:
        # The operation runs with NumPy, which broadcasts by itself (and says
        # so when shapes do not broadcast); the VJP rules of the binary
        # primitives un-broadcast their cotangents anyway.
        return ops
    shape = tuple(np.broadcast_shapes(*shapes))
    return [_broadcast_to(a, shape) for a in ops]


def _named(f: Callable, op: Callable, kind: str) -> Callable:
    """Marks `f` for naming after its public name (see the end of this module)."""
    f._chainrule_doc = (  # type: ignore[attr-defined]
        f"{kind} `{{name}}`, as in jax.numpy (dtype promotion, broadcasting); records on "
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
    if kind is float or kind is int:
        return np.asarray(other, dtype)
    if kind is Tracer or kind is np.ndarray or (kind is _ArrayImpl and not other.weak_type):
        ov = other.value if kind is Tracer else other
        if ov.dtype == dtype and (
            ov.shape == tv.shape
            or not ov.shape
            or not tv.shape
            # both on the host: NumPy broadcasts by itself (see `promote`)
            or (type(tv) is np.ndarray and type(ov) is np.ndarray)
        ):
            return other
    return None


def _is_float_tracer(x: Any) -> bool:
    """A Tracer of a strongly typed floating dtype: nothing for `promote` to do
    for a unary op or reduction (the common case, decided from types alone)."""
    if type(x) is not Tracer:
        return False
    v = x.value
    return v.dtype in _FLOATS and not getattr(v, "weak_type", False)


def _binary(op: Callable, inexact: bool = False) -> Callable:
    def f(x, y):
        if type(x) is Tracer:
            fast = _fast_operand(x, y, inexact)
            if fast is not None:
                return op(x, fast)
        elif type(y) is Tracer:
            fast = _fast_operand(y, x, inexact)
            if fast is not None:
                return op(fast, y)
        return op(*promote(x, y, inexact=inexact))

    return _named(f, op, "Elementwise binary")


def _unary(op: Callable) -> Callable:
    def f(x):
        if not _is_float_tracer(x):
            (x,) = promote(x, inexact=True)
        return op(x)

    return _named(f, op, "Elementwise")


add = _binary(rules.add)
subtract = _binary(rules.sub)
multiply = _binary(rules.mul)
true_divide = divide = _binary(rules.div, inexact=True)
maximum = _binary(rules.maximum)
minimum = _binary(rules.minimum)
arctan2 = _binary(rules.atan2_p.bind, inexact=True)
less, less_equal = _binary(rules.lt), _binary(rules.le)
greater, greater_equal = _binary(rules.gt), _binary(rules.ge)
equal, not_equal = _binary(rules.eq), _binary(rules.ne)

negative = _unary(rules.neg)
sin, cos, tan = _unary(rules.sin), _unary(rules.cos), _unary(rules.tan_p.bind)
arcsin, arccos, arctan = (_unary(p.bind) for p in (rules.asin_p, rules.acos_p, rules.atan_p))
sinh, cosh, tanh = _unary(rules.sinh), _unary(rules.cosh), _unary(rules.tanh)
arcsinh, arccosh, arctanh = (_unary(p.bind) for p in (rules.asinh_p, rules.acosh_p, rules.atanh_p))
exp, exp2, log = _unary(rules.exp), _unary(rules.exp2_p.bind), _unary(rules.log)
log1p, expm1 = _unary(rules.log1p_p.bind), _unary(rules.expm1_p.bind)
sqrt, cbrt, square = _unary(rules.sqrt), _unary(rules.cbrt_p.bind), _unary(rules.square_p.bind)
abs = absolute = _unary(rules.abs_)
sign = _unary(rules.sign)


def power(x: Any, y: Any) -> Any:
    """x ** y; an integer exponent records `integer_pow`, as jax.numpy does."""
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        if not _is_float_tracer(x):
            (x,) = promote(x)
        return rules.integer_pow(x, int(y))
    return rules.pow_(*promote(x, y, inexact=True))


def where(condition: Any, x: Any, y: Any) -> Any:
    """Selects `x` where `condition` holds, else `y` (jax.numpy.where with 3 args)."""
    x, y = promote(x, y)
    cond = jnp.asarray(raw(condition), dtype=bool)
    shape = tuple(np.broadcast_shapes(cond.shape, rules.shape_of(x)))
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


def _reduction(op: Callable) -> Callable:
    def f(x, axis=None, keepdims=False):
        (x,) = promote(x)
        shape = rules.shape_of(x)
        axes = _axes(axis, len(shape))
        out = op(x, axes)
        if keepdims:
            out = rules.reshape(out, tuple(1 if d in axes else n for d, n in enumerate(shape)))
        return out

    return _named(f, op, "Reduction")


sum = _reduction(rules.reduce_sum)
max = amax = _reduction(lambda x, axes: rules.reduce_max_p.bind(x, axes=axes))
min = amin = _reduction(lambda x, axes: rules.reduce_min_p.bind(x, axes=axes))


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    if not _is_float_tracer(x):
        (x,) = promote(x, inexact=True)
    shape = rules.shape_of(x)
    axes = _axes(axis, len(shape))
    total = rules.reduce_sum(x, axes)
    out = rules.div(total, rules.const(total, math.prod(shape[d] for d in axes)))
    if keepdims:
        out = rules.reshape(out, tuple(1 if d in axes else n for d, n in enumerate(shape)))
    return out


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
    if -1 in shape:
        known = int(np.prod([n for n in shape if n != -1]))
        shape = tuple(size // known if n == -1 else n for n in shape)
    return rules.reshape(x, shape)


def ravel(x: Any) -> Any:
    return reshape(x, (-1,))


def transpose(x: Any, *axes: Any) -> Any:
    if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
        axes = axes[0]
    if type(x) is not Tracer:  # a Tracer already has an array dtype: nothing to promote
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


def _transposed_from(y: Any) -> Tracer | None:
    """For `y = w.T` recorded on the tape (w a 2-D Tracer), the Tracer `w` again.

    A Tracer is only a box (value, node, level): re-boxing the transpose's
    operand with its node and level gives exactly the Tracer that was
    transposed, and gradients reach `w` through that node as before.
    """
    if type(y) is not Tracer:
        return None
    node = y.node
    if (
        node.prim is not rules.transpose_p
        or node.argnums != (0,)
        or node.params.get("permutation") != (1, 0)
        or node.primals is None
    ):
        return None
    return Tracer(node.primals[0], node.parents[0], y.level)


_ARRAY_TYPES = (np.ndarray, _ArrayImpl)


def _same_strong_float(x: Any, y: Any) -> bool:
    """A Tracer and a Tracer or concrete array, of one floating dtype, neither
    weakly typed: nothing for `promote_dtypes_only` to do (decided from types)."""
    kx, ky = type(x), type(y)
    if kx is not Tracer and ky is not Tracer:
        return False
    a = x.value if kx is Tracer else x if kx in _ARRAY_TYPES else None
    b = y.value if ky is Tracer else y if ky in _ARRAY_TYPES else None
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
        raise TypeError(f"matmul: operands must be at least 1-D, got shapes {xs} and {ys}")
    if len(xs) == 1 and len(ys) == 1:
        return rules.dot_general(x, y, (((0,), (0,)), ((), ())))
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


def lift(fun: Callable) -> Callable:
    """Makes any JAX function accept Tracers, by capturing and replaying it.

    Without Tracers among the arguments `fun` runs as it is.
    """

    @functools.wraps(fun)
    def lifted(*args: Any, **kwargs: Any) -> Any:
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        traced = [i for i, x in enumerate(leaves) if isinstance(x, Tracer)]
        if not traced:
            return fun(*args, **kwargs)

        def flat_fun(*xs):
            full = list(leaves)
            for i, x in zip(traced, xs, strict=True):
                full[i] = x
            a, k = jax.tree_util.tree_unflatten(tree, full)
            return fun(*a, **k)

        level = core.top_level(leaves[i] for i in traced)
        outs, out_tree = replay.replay(flat_fun, [leaves[i] for i in traced], level)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    return lifted


def getitem(x: Any, index: Any) -> Any:
    """`x[index]` with all of numpy's indexing, recorded through jax.numpy's own."""
    if isinstance(index, Tracer):
        raise TypeError(
            "chainrule: an array index must be an integer array, not a differentiated "
            f"value ({index!r}). Convert it with .astype(int) outside the gradient."
        )
    return lift(operator.getitem)(x, index)


# --- Tracer methods ---------------------------------------------------------------


def _flip(f: Callable) -> Callable:
    return lambda self, other: f(other, self)


def _no_numpy(self: Tracer, *args: Any, **kwargs: Any):
    raise TypeError(
        f"A chainrule.Tracer ({self!r}) was converted to a NumPy array, which would drop "
        "its gradient. Use jax.numpy or chainrule.numpy functions on traced values, not "
        "numpy ones."
    )


class _AtIndexer:
    """`x.at[index].set/add/multiply/min/max/get(...)`, recorded through jax.numpy."""

    def __init__(self, x: Tracer, index: Any = None):
        self.x, self.index = x, index

    def __getitem__(self, index: Any) -> _AtIndexer:
        return _AtIndexer(self.x, index)

    def __getattr__(self, method: str) -> Callable:
        index = self.index

        def update(*args: Any, **kwargs: Any) -> Any:
            return lift(lambda v, *a: getattr(v.at[index], method)(*a, **kwargs))(self.x, *args)

        return update


def _array_method_fallback(self: Tracer, name: str) -> Any:
    """Array methods and properties without a fast path (`x.var()`, `x.cumsum()`, ...)
    run `jax.Array`'s own, recorded through jaxpr replay."""
    attr = getattr(jax.Array, name, None)
    if attr is None or name.startswith("__"):
        raise AttributeError(f"chainrule.Tracer (like jax.Array) has no attribute {name!r}")
    if isinstance(attr, property) or not callable(attr):
        return lift(lambda v: getattr(v, name))(self)
    return functools.partial(lift(lambda v, *a, **k: getattr(v, name)(*a, **k)), self)


def _lifted_operator(op: Callable) -> Callable:
    return lambda self, other: lift(op)(self, other)


_METHODS: dict[str, Any] = {
    "__add__": add,
    "__radd__": _flip(add),
    "__sub__": subtract,
    "__rsub__": _flip(subtract),
    "__mul__": multiply,
    "__rmul__": _flip(multiply),
    "__truediv__": divide,
    "__rtruediv__": _flip(divide),
    "__pow__": power,
    "__rpow__": _flip(power),
    "__matmul__": matmul,
    "__rmatmul__": _flip(matmul),
    "__lt__": less,
    "__le__": less_equal,
    "__gt__": greater,
    "__ge__": greater_equal,
    "__eq__": equal,
    "__ne__": not_equal,
    "__neg__": negative,
    "__pos__": lambda self: self,
    "__abs__": abs,
    "__getitem__": getitem,
    "__floordiv__": _lifted_operator(operator.floordiv),
    "__rfloordiv__": _flip(_lifted_operator(operator.floordiv)),
    "__mod__": _lifted_operator(operator.mod),
    "__rmod__": _flip(_lifted_operator(operator.mod)),
    "at": property(lambda self: _AtIndexer(self)),
    "__getattr__": _array_method_fallback,
    "__len__": lambda self: len(raw(self)),
    "__iter__": lambda self: (self[i] for i in range(len(raw(self)))),
    "__bool__": lambda self: bool(raw(self)),
    "__float__": lambda self: float(raw(self)),
    "__int__": lambda self: int(raw(self)),
    "__array__": _no_numpy,
    "item": lambda self: raw(self).item(),
    "sum": sum,
    "mean": mean,
    "max": max,
    "min": min,
    "argmax": argmax,
    "argmin": argmin,
    "reshape": reshape,
    "transpose": transpose,
    "ravel": ravel,
    "flatten": ravel,
    "squeeze": squeeze,
    "dot": dot,
    "clip": clip,
    "astype": lambda self, dtype: _as_operand(self, dtype),
    "T": property(lambda self: transpose(self)),
    "mT": property(
        lambda self: transpose(self, (*range(self.ndim - 2), self.ndim - 1, self.ndim - 2))
    ),
}

for _name, _method in _METHODS.items():
    setattr(Tracer, _name, _method)

for _name, _fn in list(globals().items()):  # name the generated functions: cnp.sin is "sin"
    if callable(_fn) and hasattr(_fn, "_chainrule_doc") and not _name.startswith("_"):
        if getattr(_fn, "__name__", "f") == "f":
            _fn.__name__ = _fn.__qualname__ = _name
            _fn.__doc__ = _fn._chainrule_doc.format(name=_name)
Tracer.__hash__ = None  # type: ignore[assignment]  # like jax arrays: __eq__ is elementwise
