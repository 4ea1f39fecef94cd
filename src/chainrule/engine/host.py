"""Eager evaluation on the host: concrete CPU values computed with NumPy.

Outside `jax.jit`, every `jax.numpy` operation is one XLA dispatch, which costs
10-50 µs on a small CPU even for a scalar; NumPy does the same arithmetic on the
same CPU in about 1 µs. So when a transform (`cr.grad`, `cr.vjp`, ...) is
called on concrete float32/float64 arrays and JAX's default backend is the CPU,

* its inputs are unboxed as read-only NumPy views of the same memory
  (`to_host`, no copy);
* each primitive with a NumPy implementation (the `host` column of the
  primitive table in `chainrule.engine.rules`) runs that instead of its
  `jax.lax` implementation whenever all its operands are host values
  (`host_operands`); a primitive without one runs through JAX as before;
* results are handed back as `jax.Array`s at the transform's boundary
  (`to_jax`), so callers see exactly what `jax.grad` returns.

Subnormal numbers get XLA's treatment, so eager and jitted results agree to
the last denormal. XLA's CPU kernels flush subnormals to zero (as inputs of
arithmetic and as results); NumPy keeps them. So host evaluation runs inside
`evaluating()`, and each primitive's NumPy work (and a whole backward pass)
inside `FLUSHING`, which puts the thread's SSE unit in flush-to-zero /
denormals-are-zero mode; the user's own Python and NumPy arithmetic between
primitives keeps the thread's mode, as under `jax.grad`. A value
holding a subnormal never enters a NumPy computation: differentiated inputs,
constants and JAX results are checked where they become host values
(`has_subnormal`), and one holding a subnormal is left to JAX. Where that
mode cannot be set (not x86-64 Linux), host evaluation is off and JAX
evaluates everything.

Under `jax.jit`, `jax.vmap` or on a GPU the values are JAX tracers or device
arrays, none of this applies, and the compiled program is unchanged.

Set the environment variable `CHAINRULE_HOST_EAGER=0` (or call
`set_enabled(False)`) to evaluate everything with JAX.

Examples:
  >>> import jax, jax.numpy as jnp, chainrule as cr
  >>> w = jnp.array([1.0, 2.0], jnp.float32)  # typed: runs on the host
  >>> g = cr.grad(lambda w: (w * w).sum())(w)
  >>> isinstance(g, jax.Array), g.dtype.name, g.tolist()
  (True, 'float32', [2.0, 4.0])
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import dtypes
from jax._src import config as _jax_config
from jax._src import core as _jax_core
from jax._src.array import ArrayImpl as _ArrayImpl  # concrete jax.Arrays (JAX 0.10)
from jax._src.lib import xla_client as _xc
from jax._src.literals import TypedNdArray as _TypedNdArray  # a jaxpr literal (JAX 0.10)

TypedNdArray = _TypedNdArray  # (also the type of JAX's float0 zero cotangents)

HOST_TYPES = (np.ndarray, np.generic)  # host values: NumPy arrays and scalars
_HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def host_dtype(dtype: Any) -> bool:
    """Whether NumPy computes in `dtype` as XLA does on the CPU: float32, float64,
    integers and booleans. float16, bfloat16 and the float8s stay JAX's (XLA
    computes them in float32 and accumulates sums in float32; NumPy's float16
    and ml_dtypes' types round every step, and ml_dtypes' are not even NumPy
    floats to `dtype.kind`); complex values too (see `host_operands`)."""
    return dtype in _HOST_OK


_HOST_OK = frozenset(
    [*_HOST_DTYPES, np.dtype(np.bool_)] + [np.dtype(f"{k}{n}") for k in "iu" for n in (1, 2, 4, 8)]
)
# Per dtype: its unsigned integer of the same width, the mask of the magnitude's
# bits, and the bits of the smallest normal number, minus one.
_BITS = {
    np.dtype(np.float32): (np.uint32, np.uint32(0x7FFFFFFF), np.uint32(0x007FFFFF)),
    np.dtype(np.float64): (
        np.uint64,
        np.uint64(0x7FFFFFFFFFFFFFFF),
        np.uint64(0x000FFFFFFFFFFFFF),
    ),
}
_enabled = os.environ.get("CHAINRULE_HOST_EAGER", "1").lower() not in ("0", "false", "no")
_on_cpu: bool | None = None


# --- XLA's handling of subnormals: the thread's floating-point mode -------------------


# glibc's `femode_t` on x86-64 (C2x `fegetmode`/`fesetmode`) is 8 bytes: the
# x87 control word, 2 reserved bytes, then the SSE control register MXCSR. Read
# as one little-endian 64-bit integer, MXCSR is its upper half.
_FTZ_DAZ = 0x8040 << 32  # MXCSR bits: flush-to-zero (15), denormals-are-zero (6)


def _libm() -> Any:
    """glibc's libm with `fegetmode`/`fesetmode`, on x86-64 only; else None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        get, set_ = lib.fegetmode, lib.fesetmode
    except (OSError, AttributeError):
        return None
    # Called with `ctypes.byref` of a `c_uint64` only; without `argtypes` to
    # check, a call costs half as much (and their int result is not read).
    get.restype = set_.restype = None
    return lib


_LIBM = _libm()


class _State(threading.local):
    """Per thread: the open `evaluating()` contexts, and what the outermost
    one restores on exit."""

    def __init__(self) -> None:
        self.depth = 0  # how many `evaluating()` contexts are open
        self.host = False  # whether host evaluation is on in them (`enabled()` on entry)
        self.converted: dict[int, tuple[jax.Array, np.ndarray | None]] = {}  # `_converted`
        self.smallest: dict[int, tuple[np.ndarray, int]] = {}  # `smallest_magnitude`
        self.errstate: Any = None
        # the mode before (a `femode_t`), and the same with FTZ/DAZ on
        self.saved, self.flushing = ctypes.c_uint64(), ctypes.c_uint64()
        self.saved_ref, self.flushing_ref = ctypes.byref(self.saved), ctypes.byref(self.flushing)
        self.restore = False  # whether `FLUSHING` must change the mode (in `evaluating()`)
        self.flush_depth = 0  # how many `FLUSHING` contexts are open
        self.unflushed: list[int] = []  # `flush_depth` outside each `UNFLUSHED` context


_state = _State()


class evaluating:  # noqa: N801 - used as a context manager, like np.errstate
    """Context manager around a transform's work on host values.

    NumPy's floating-point warnings are off (like XLA, an overflow gives inf
    and an invalid operation NaN, silently). The outermost context of a
    thread reads the floating-point mode, for `FLUSHING` to switch to XLA's
    (subnormals flushed) around chainrule's own NumPy work and back; inner
    ones only count. Host evaluation happens only inside this context, and
    only where `enabled()` says so on entry to the outermost one.
    """

    __slots__ = ()

    def __enter__(self) -> evaluating:
        st = _state  # (a thread-local: its attributes are read once each)
        depth = st.depth
        if not depth:
            errstate = st.errstate = np.errstate(all="ignore")
            errstate.__enter__()
            restore = False
            if _LIBM is not None:
                _LIBM.fegetmode(st.saved_ref)
                mode = st.saved.value
                if mode & _FTZ_DAZ != _FTZ_DAZ:
                    st.flushing.value = mode | _FTZ_DAZ
                    restore = True
            st.restore = restore
            st.host = enabled() and _untransformed()
        st.depth = depth + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        st = _state
        depth = st.depth = st.depth - 1
        if not depth:
            st.host = False
            st.restore = False  # (`FLUSHING` outside a transform call changes nothing)
            st.converted.clear()
            st.smallest.clear()
            st.errstate.__exit__(*exc)
            st.errstate = None


# `fesetmode` itself (called only where `_state.restore` says the mode must change;
# `Primitive.evaluate_on_host`, the hot path, inlines `FLUSHING` with it)
set_mode = _LIBM.fesetmode if _LIBM is not None else None


class _Flushing:
    """`FLUSHING`: a context manager around chainrule's own NumPy work inside
    `evaluating()` (a primitive's NumPy version, a conversion, a backward
    pass): the thread's SSE unit flushes subnormal results to zero and reads
    subnormal operands as zero, as XLA's CPU kernels do, and the caller's mode
    is back on exit. Only there: the user's function runs between primitives,
    and its own Python and NumPy arithmetic (`math.exp(-710.0) > 0`,
    `np.float32(1e-39) * 1e5`) sees the mode it sees under `jax.grad`. Nested
    contexts only count."""

    __slots__ = ()

    def __enter__(self) -> None:
        st = _state
        depth = st.flush_depth
        st.flush_depth = depth + 1
        if not depth and st.restore:
            set_mode(st.flushing_ref)

    def __exit__(self, *exc: Any) -> None:
        st = _state
        depth = st.flush_depth = st.flush_depth - 1
        if not depth and st.restore:
            set_mode(st.saved_ref)


FLUSHING = _Flushing()


class _Unflushed:
    """`UNFLUSHED`: the caller's floating-point mode again, inside `FLUSHING`,
    for the user's own Python run from chainrule's work (a custom_vjp's bwd, a
    custom_jvp's rule, called from a backward pass): JAX calls them in the
    thread's own mode, so `math.exp(-710.0) > 0` is True there. `FLUSHING`
    entered inside starts afresh; the flushing mode is back on exit."""

    __slots__ = ()

    def __enter__(self) -> None:
        st = _state
        depth = st.flush_depth
        st.unflushed.append(depth)
        if depth:
            st.flush_depth = 0
            if st.restore:
                set_mode(st.saved_ref)

    def __exit__(self, *exc: Any) -> None:
        st = _state
        depth = st.flush_depth = st.unflushed.pop()
        if depth and st.restore:
            set_mode(st.flushing_ref)


UNFLUSHED = _Unflushed()


def has_subnormal(x: Any) -> bool:
    """Whether a float32/float64 NumPy value holds a subnormal number (which
    XLA reads as zero and NumPy does not).

    The test reads the bits, as integers: inside `evaluating()` a float
    comparison would itself read the subnormal as zero.
    """
    bits = _BITS.get(x.dtype)
    if bits is None:
        return False
    unsigned, magnitude, tiny = bits
    if x.ndim == 0:  # a scalar: Python integers are faster than array operations
        m = int(x.view(unsigned)) & int(magnitude)
        return 0 < m <= int(tiny)
    if x.size <= _SMALL_SIZE:
        return _has_subnormal_small(x)
    return 0 < smallest_magnitude(x) <= int(tiny)


# Arrays up to this size are tested all at once in one Python integer
# (`_has_subnormal_small`): three NumPy calls and a reduction cost about 3 us
# whatever the size; the integer test is under 1 us for up to ~100 elements.
_SMALL_SIZE = 128
_LANE_MASKS: dict[tuple[np.dtype, int], tuple[int, int, int, int, int]] = {}


def _has_subnormal_small(x: np.ndarray) -> bool:
    """`has_subnormal` for a small float32/float64 array, testing every element
    at once in the bits of one Python integer (its bytes read in the
    machine's byte order, as the masks are built).

    Each element is a lane of the integer. Per lane, masking keeps the mantissa
    M (or the exponent field E) and adding the mask again carries into the
    field's next bit exactly when the field is nonzero, never out of the lane:
    M + M < 2 M + 1, the exponent's lowest bit; E + E < 2^width, as E's top bit
    is below the sign. An element is subnormal iff its mantissa is nonzero and
    its exponent field zero.
    """
    key = (x.dtype, x.size)
    masks = _LANE_MASKS.get(key)
    if masks is None:
        masks = _LANE_MASKS[key] = _lane_masks(x.dtype, x.size)
    mantissa, exponent, exponent_low, sign, shift = masks
    v = int.from_bytes(x.tobytes(), sys.byteorder)
    mantissa_nonzero = ((v & mantissa) + mantissa) & exponent_low
    exponent_nonzero = ((v & exponent) + exponent) & sign
    return bool((mantissa_nonzero << shift) & ~exponent_nonzero & sign)


def _lane_masks(dtype: np.dtype, n: int) -> tuple[int, int, int, int, int]:
    """The masks of `_has_subnormal_small`, repeated over `n` lanes."""
    unsigned, _, tiny = _BITS[dtype]
    width = 8 * dtype.itemsize
    mantissa_bits = int(tiny).bit_length()  # 23 or 52

    def lanes(value: int) -> int:
        return int.from_bytes(np.full(n, value, unsigned).tobytes(), sys.byteorder)

    mantissa = (1 << mantissa_bits) - 1
    sign = 1 << (width - 1)
    exponent = sign - 1 - mantissa
    return (
        lanes(mantissa),
        lanes(exponent),
        lanes(mantissa + 1),
        lanes(sign),
        width - 1 - mantissa_bits,
    )


def smallest_magnitude(x: np.ndarray) -> int:
    """The bits of the smallest nonzero |x| of a float32/float64 array, as an
    integer (0 when every entry is zero): its exponent field is
    `bits >> (mantissa width)`; below the smallest normal's bits it is subnormal.

    Inside `evaluating()` the answer for a large read-only array (a converted
    `jax.Array`, or a view of the whole of one, such as its transpose) is
    remembered for the rest of the call: a loss reads its weights in the
    forward and again in the backward pass.
    """
    unsigned, magnitude, _ = _BITS[x.dtype]
    key = None
    if _state.depth and x.size >= _REMEMBERED_SIZE:
        whole = x.base if isinstance(x.base, np.ndarray) and x.base.size == x.size else x
        if not whole.flags.writeable:  # (nothing can change it during the call)
            key = id(whole)
            hit = _state.smallest.get(key)
            if hit is not None and hit[0] is whole:
                return hit[1]
    # |x|'s bits minus one, wrapping zero round to the largest integer: the
    # minimum is the smallest nonzero magnitude's bits minus one.
    m = np.bitwise_and(x.view(unsigned), magnitude)
    np.subtract(m, unsigned(1), out=m)
    smallest = (int(m.min()) + 1) & int(magnitude) if m.size else 0
    if key is not None:
        if len(_state.smallest) >= _REMEMBERED_MAX:
            _state.smallest.clear()
        _state.smallest[key] = (whole, smallest)
    return smallest


# Arrays from this size have their smallest magnitude remembered (`smallest_magnitude`);
# at most this many per call.
_REMEMBERED_SIZE = 4096
_REMEMBERED_MAX = 64


def is_unchecked_constant(x: Any) -> bool:
    """Whether `x` is a NumPy array or scalar not computed here (a constant of
    the user's, say), whose subnormals `has_subnormal` must look for."""
    return isinstance(x, HOST_TYPES) and type(x) is not HostArray


def set_enabled(enabled: bool) -> bool:
    """Turns host evaluation on or off (from the next transform call on);
    returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def enabled() -> bool:
    """Whether transforms start on the host: switched on, JAX runs on the CPU
    and neither `jax_debug_nans` nor `jax_debug_infs` is set."""
    global _on_cpu
    if not _enabled or _LIBM is None:
        return False
    if _jax_config.debug_nans.value or _jax_config.debug_infs.value:
        return False  # JAX checks each eager primitive's result for them; NumPy would not
    if _on_cpu is None:
        # One process on the CPU: every array's buffer is local (no addressability checks).
        _on_cpu = jax.default_backend() == "cpu" and jax.process_count() == 1
    if _on_cpu and _jax_config.default_device.value is not None:
        # under `jax.default_device(...)` JAX places results there; the host
        # path hands them back on its own device, so it runs only if that is it
        return _default_device_is_host_device()
    return _on_cpu


def _default_device_is_host_device() -> bool:
    wanted = _jax_config.default_device.value
    if isinstance(wanted, str):
        try:
            wanted = jax.devices(wanted)[0]
        except RuntimeError:
            return False
    return wanted == _host_device()[0]


def _untransformed() -> bool:
    """Whether no JAX transformation is tracing: a transform called under one on
    concrete values (`checkify.checkify` and `jax.make_jaxpr` stage a function
    closed over its arguments) must stage its work there, as `jax.grad` does,
    not fold it to constants with NumPy (checkify's checks would miss it)."""
    return type(_jax_core.trace_ctx.trace) is _jax_core.EvalTrace


def to_host(x: Any) -> Any:
    """A differentiated input as a read-only NumPy view, when it may run on the host.

    Concrete CPU `jax.Array`s and NumPy arrays of float32/float64 qualify (after
    JAX's dtype canonicalization, so float64 becomes float32 without x64).
    Weakly typed values (Python scalars) stay JAX values: their dtype promotion
    has no NumPy equivalent. The view never owns its memory, so `to_jax` copies
    it rather than aliasing the caller's buffer.
    """
    if not (_state.host if _state.depth else enabled()):
        return None
    # a concrete jax.Array (any other one is a tracer), tested by type as in
    # `host_operands`: `isinstance(x, jax.Array)` is slow
    if type(x) is _ArrayImpl:
        if x.weak_type or x.dtype not in _HOST_DTYPES or _spread(x):
            return None
        out = np.asarray(x)  # a read-only view of the array's CPU buffer
        return None if has_subnormal(out) else out
    if isinstance(x, np.ndarray):
        dtype = dtypes.canonicalize_dtype(x.dtype)
        if dtype not in _HOST_DTYPES:
            return None
        out = np.asarray(x, dtype=dtype).view()
        out.flags.writeable = False
        return None if has_subnormal(out) else out
    return None


def _integer_op_as_jax(name: str) -> Any:
    """`HostArray`'s operator `name`: on integers and booleans, JAX's (XLA's
    division and remainder by zero, shifts past the width, `/` to a float of
    JAX's width, negative powers), on a jax.Array of the same value; NumPy's
    on floats, where the two agree but in promotion (`_op_as_jax`)."""
    numpy_op = _op_as_jax(name)

    def op(self, other):
        if self.dtype.kind in "iub" and not isinstance(other, _jax_core.Tracer):
            return getattr(to_jax(np.asarray(self), copy=True), name)(other)
        return numpy_op(self, other)

    op.__name__ = name
    return op


def _op_as_jax(name: str) -> Any:
    """`HostArray`'s operator `name`: NumPy's where its result has the dtype
    JAX's promotion gives, else JAX's on a jax.Array of the same value. They
    differ where the operands' dtypes differ: float32 times an int32 array, a
    NumPy float64 scalar or one of JAX's weakly typed literals is float64 to
    NumPy and float32 to JAX (a custom_jvp rule's primal of the wrong dtype
    under nested differentiation raised JAX's dtype check)."""
    numpy_op = getattr(np.ndarray, name)

    def op(self, other):
        out = numpy_op(self, other)
        kind = type(other)
        if out is NotImplemented or (
            (kind is HostArray or kind is np.ndarray) and other.dtype == self.dtype
        ):
            return out
        if getattr(out, "dtype", self.dtype) == self.dtype and kind in (int, float, bool):
            return out  # (a Python number beside an array: weak in both)
        if getattr(out, "dtype", None) != jax.numpy.result_type(self, other):
            return getattr(to_jax(np.asarray(self), copy=True), name)(other)
        return out

    op.__name__ = name
    return op


def _holds_tracer(arg: Any) -> bool:
    """A JAX tracer, or an index tuple holding one."""
    if type(arg) is tuple:
        return any(isinstance(a, _jax_core.Tracer) for a in arg)
    return isinstance(arg, _jax_core.Tracer)


def _method_as_jax(name: str) -> Any:
    """`HostArray`'s method `name` (one NumPy and jax.Array share): JAX's when
    an argument is a JAX tracer (`x.take(i)` in a `fori_loop` body), as on
    the jax.Array JAX would have handed over; NumPy's otherwise."""
    numpy_method = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        if any(map(_holds_tracer, (*args, *kwargs.values()))):
            return getattr(to_jax(np.asarray(self), copy=True), name)(*args, **kwargs)
        return numpy_method(self, *args, **kwargs)

    method.__name__ = name
    return method


class HostArray(np.ndarray):
    """A NumPy array handed to user code as JAX hands a `jax.Array`: immutable.

    Values computed on the host reach the user's function (a `jax.numpy` call on
    constants, a custom_jvp body evaluated eagerly). With JAX, `x *= y` rebinds
    `x` to a new array; on a plain NumPy array it would write into memory that
    other names, or the tape's saved values, still hold: a silently wrong
    gradient. Here the in-place operators compute a new array, as JAX's do.
    """

    def __iadd__(self, other):
        return self + other

    def __isub__(self, other):
        return self - other

    def __imul__(self, other):
        return self * other

    def __itruediv__(self, other):
        return self / other

    def __ifloordiv__(self, other):
        return self // other

    def __imod__(self, other):
        return self % other

    def __ipow__(self, other):
        return self**other

    def __imatmul__(self, other):
        return self @ other

    def __iand__(self, other):
        return self & other

    def __ior__(self, other):
        return self | other

    def __ixor__(self, other):
        return self ^ other

    def __ilshift__(self, other):
        return self << other

    def __irshift__(self, other):
        return self >> other

    # indexed by a tracer of a loop the user's code traces (`x[i]` in a
    # `fori_loop` body): as the jax.Array JAX would have handed over
    __getitem__ = _method_as_jax("__getitem__")

    # promotion as JAX's
    __add__ = _op_as_jax("__add__")
    __radd__ = _op_as_jax("__radd__")
    __sub__ = _op_as_jax("__sub__")
    __rsub__ = _op_as_jax("__rsub__")
    __mul__ = _op_as_jax("__mul__")
    __rmul__ = _op_as_jax("__rmul__")
    __matmul__ = _op_as_jax("__matmul__")
    __rmatmul__ = _op_as_jax("__rmatmul__")

    # integers' and booleans' arithmetic as JAX's; methods given a JAX tracer as JAX's
    __truediv__ = _integer_op_as_jax("__truediv__")
    __rtruediv__ = _integer_op_as_jax("__rtruediv__")
    __floordiv__ = _integer_op_as_jax("__floordiv__")
    __rfloordiv__ = _integer_op_as_jax("__rfloordiv__")
    __mod__ = _integer_op_as_jax("__mod__")
    __rmod__ = _integer_op_as_jax("__rmod__")
    __divmod__ = _integer_op_as_jax("__divmod__")
    __rdivmod__ = _integer_op_as_jax("__rdivmod__")
    __pow__ = _integer_op_as_jax("__pow__")
    __rpow__ = _integer_op_as_jax("__rpow__")
    __lshift__ = _integer_op_as_jax("__lshift__")
    __rlshift__ = _integer_op_as_jax("__rlshift__")
    __rshift__ = _integer_op_as_jax("__rshift__")
    __rrshift__ = _integer_op_as_jax("__rrshift__")
    take = _method_as_jax("take")
    clip = _method_as_jax("clip")
    dot = _method_as_jax("dot")
    searchsorted = _method_as_jax("searchsorted")
    repeat = _method_as_jax("repeat")
    compress = _method_as_jax("compress")
    choose = _method_as_jax("choose")

    def __getattr__(self, name: str) -> Any:
        # jax.Array's API beyond NumPy's (`.at[]`, `.block_until_ready()`, ...),
        # on a jax.Array of the same value: code written for JAX keeps working.
        if name.startswith("__") or not hasattr(jax.Array, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(to_jax(np.asarray(self), copy=True), name)


def is_plain_host_value(x: Any) -> bool:
    """A NumPy array or scalar of the host's, not one of JAX's typed literals."""
    return isinstance(x, (np.ndarray, np.generic)) and type(x) is not _TypedNdArray


HOST_DTYPES = _HOST_OK  # (`host_dtype`'s set, for the hot path's own tests)
# The exact types of host values (`core._bind_on_host` tests them by type): NumPy
# arrays, `HostArray`s and the NumPy scalars of the host dtypes (NumPy's results
# on 0-d arrays); not JAX's typed literals, whose weak type NumPy cannot keep.
PLAIN_TYPES = frozenset([np.ndarray, HostArray, *(d.type for d in _HOST_OK)])


def immutable(x: Any) -> Any:
    """`x` as a `HostArray` if it is a NumPy array (no copy), a strongly typed
    literal of JAX's (JAX's `custom_vjp` call makes one of a NumPy argument)
    or scalar (NumPy's result on 0-d arrays: a value computed here, never the
    user's), else unchanged."""
    kind = type(x)
    if kind is np.ndarray or (kind is _TypedNdArray and not x.weak_type):
        return x.view(HostArray)
    if isinstance(x, np.generic):
        return np.asarray(x).view(HostArray)
    return x


def host_operands(args: tuple[Any, ...], check: bool = False) -> tuple[Any, ...] | None:
    """`args` as NumPy values if a primitive may run on the host, else None.

    A primitive runs on the host when at least one operand is a host value and
    the rest are host values, concrete CPU arrays (read as NumPy views, e.g.
    arrays a loss closes over) or Python numbers (given the first array's
    dtype, as lax does for weakly typed literals). A JAX tracer among the
    operands means JAX is tracing: the primitive then runs through JAX.
    Complex values always run through JAX: NumPy's complex functions are not
    XLA's to the last bit (and branch cuts), so they stay JAX's. So does a
    primitive with an operand holding a subnormal number that was not computed
    here: a converted array or number, and, with `check`, a NumPy array or
    scalar (a constant of the user's; `Trace.record` checks those itself, and
    values computed here under `evaluating()` are flushed already). And so do
    weakly typed numbers (Python numbers, JAX's typed literals, weakly typed
    arrays) beside no strongly typed number, as a NumPy mask selecting
    between two Python floats in `jnp.where(x > 0, 1.0, 0.0)`: JAX's result
    is weakly typed there, which a NumPy result cannot be (it would promote
    a float32 computation to float64 under x64).
    Host evaluation happens only inside `evaluating()`.
    """
    if not _state.host:
        return None
    seen_host = seen_strong = seen_weak = False
    out = None  # a copy of `args` once one needs converting
    for i, a in enumerate(args):
        if isinstance(a, HOST_TYPES):
            dtype = a.dtype
            if not host_dtype(dtype):
                return None
            kind = dtype.kind
            if kind == "f" and check and is_unchecked_constant(a) and has_subnormal(a):
                return None
            if not seen_strong and kind in "iuf":
                # (a weakly typed literal of a jaxpr, the `2.0` of `a * 2`
                # under `jit`, is not a strong number: beside a weak array the
                # result is weak, JAX's)
                if type(a) is _TypedNdArray and a.weak_type:
                    seen_weak = True
                else:
                    seen_strong = True
            seen_host = True
            continue
        if type(a) is _ArrayImpl:  # a concrete jax.Array (any other one is a tracer):
            # (tested by type, as `isinstance(a, jax.Array)` is slow)
            dtype = a.dtype
            if not host_dtype(dtype):
                return None  # complex, half precision, an extended dtype (PRNG keys): JAX's
            if not seen_strong:
                if a.weak_type:
                    seen_weak = True
                elif dtype.kind in "iuf":
                    seen_strong = True
            a = _converted(a)
        elif isinstance(a, (int, float)):  # a Python number (np.float64 is a float too)
            seen_weak = seen_weak or type(a) is not bool  # (JAX's bool is strong)
            dtype = _literal_dtype(a, args)
            if dtype is None:
                return None
            try:
                a = np.asarray(a, dtype=dtype)
            except OverflowError:  # (an int out of a narrow type's range: XLA's
                return None  # conversion wraps it, NumPy refuses; JAX's then)
            if a.dtype.kind == "f" and has_subnormal(a):
                return None
        else:  # a JAX tracer (JAX is tracing: the primitive runs through JAX), or other
            return None
        if a is None:
            return None
        if out is None:
            out = list(args)
        out[i] = a
    if not seen_host or (seen_weak and not seen_strong):
        # (weakly typed numbers beside no strong one, as a select of weak cases
        # by a NumPy mask: JAX's result is weakly typed, which NumPy cannot say)
        return None
    return args if out is None else tuple(out)


def constant_operands(args: tuple[Any, ...], literals: bool) -> tuple[Any, ...] | None:
    """`args` as NumPy values if every one is a concrete constant of a strong
    real type: a CPU `jax.Array`, a NumPy value, or (with `literals`) a literal
    that JAX typed (`jax.numpy`'s `TypedInt`/`TypedFloat`, the Python numbers
    given to a `jit`-wrapped function), else None. A constant holding a
    subnormal is JAX's (see `host_operands`). Inside `evaluating()` only."""
    if not _state.host:
        return None
    out = []
    for a in args:
        if isinstance(a, HOST_TYPES):
            if not host_dtype(a.dtype) or (a.dtype.kind == "f" and has_subnormal(a)):
                return None
        elif isinstance(a, jax.core.Tracer):
            return None
        elif isinstance(a, jax.Array):
            if not host_dtype(a.dtype) or a.weak_type:
                return None  # (an extended dtype, PRNG keys, first: they have no weak_type)
            a = _converted(a)
            if a is None:
                return None
        elif (
            literals
            and isinstance(a, (int, float))
            and isinstance(getattr(a, "dtype", None), np.dtype)
        ):
            a = np.asarray(a, a.dtype)
            if a.dtype.kind == "f" and has_subnormal(a):
                return None
        else:
            return None
        out.append(a)
    return tuple(out)


def _converted(x: jax.Array) -> np.ndarray | None:
    """A concrete CPU array as a NumPy view, or None if it holds a subnormal.

    Remembered for the rest of the transform call (a loss reads its data
    arrays at every layer, forward and backward): a `jax.Array` is immutable,
    and the entry keeps it alive, so its `id` is not reused meanwhile. At
    most `_CONVERTED_MAX` entries are kept.
    """
    cache = _state.converted
    hit = cache.get(id(x))
    if hit is not None and hit[0] is x:
        return hit[1]
    if _spread(x):
        return None
    view = np.asarray(x)
    if view.dtype.kind == "f" and _holds_subnormal(x, view):
        view = None
    if len(cache) >= _CONVERTED_MAX:
        cache.clear()
    cache[id(x)] = (x, view)
    return view


_CONVERTED_MAX = 16


def _spread(x: jax.Array) -> bool:
    """Whether `x` lives on several devices (sharded or replicated over a mesh),
    or on one other than the device host results are handed back on (a second
    CPU device): its placement is part of what JAX computes with it (JAX keeps
    a result on its operands' device; on an explicit mesh it is its type), and
    a NumPy copy would drop it, so it is left to JAX."""
    devices = x.sharding.device_set
    return len(devices) != 1 or next(iter(devices)) != _host_device()[0]


def _holds_subnormal(x: jax.Array, view: np.ndarray) -> bool:
    """`has_subnormal(view)` for the NumPy view of a concrete `jax.Array` `x`.

    A `jax.Array` never changes, and a loss meets the same constants (its
    data, masks, closed-over tables) call after call; so an array found free
    of subnormals is remembered, by a weak reference, for as long as it lives.
    (One made from NumPy memory without a copy, see `to_jax`, changes if that
    memory is written afterwards; JAX leaves the result undefined, as here.)
    """
    key = id(x)
    known = _FREE_OF_SUBNORMALS.get(key)
    if known is not None and known() is x:
        return False
    if has_subnormal(view):
        return True
    _FREE_OF_SUBNORMALS[key] = weakref.ref(x, functools.partial(_forget, key))
    return False


def _forget(key: int, ref: weakref.ref) -> None:
    if _FREE_OF_SUBNORMALS.get(key) is ref:  # (not a newer array's entry)
        _FREE_OF_SUBNORMALS.pop(key, None)


_FREE_OF_SUBNORMALS: dict[int, weakref.ref] = {}  # id -> the array, while it lives


def _literal_dtype(x: int | float, args: tuple[Any, ...]):
    """The dtype lax gives a weakly typed Python number: that of an operand of
    the same kind (bool, integer, floating); an int may also join floats."""
    kinds = "b" if isinstance(x, bool) else "iu" if isinstance(x, int) else "f"
    dtypes_ = [a.dtype for a in args if hasattr(a, "dtype")]
    for dtype in dtypes_:
        if dtype.kind in kinds:
            return dtype
    if kinds == "iu":
        return next((d for d in dtypes_ if d.kind == "f"), None)
    return None


_DEVICE = None  # the CPU device and its sharding, looked up on first use (not on import)


def _host_device() -> tuple[Any, Any]:
    """(device, its sharding) on which host results are handed back: JAX's
    default device, `jax.devices()[0]`."""
    global _DEVICE
    if _DEVICE is None:
        device = jax.devices()[0]
        _DEVICE = (device, jax.sharding.SingleDeviceSharding(device))
    return _DEVICE


_AVALS: dict[tuple, Any] = {}  # (shape, dtype) -> ShapedArray; bounded by the shapes used


def _device_put(x: np.ndarray) -> jax.Array:
    """`jax.device_put` of one CPU array by its fast path (JAX's public API is
    slow here; JAX 0.10, pinned)."""
    device, sharding = _host_device()
    key = (x.shape, x.dtype)
    aval = _AVALS.get(key)
    if aval is None:
        aval = _AVALS[key] = _jax_core.ShapedArray(x.shape, x.dtype)
    return _xc.batched_device_put(aval, sharding, [x], [device], False)


def for_user(values: list[Any], operands: Sequence[Any]) -> list[Any]:
    """Results of an operation the user's code (or JAX's) asked for on untraced
    values, as that code gets them: `HostArray`s when an operand was one (a
    computation on values computed here stays here), else `jax.Array`s, as
    `jax.grad` gives (`jnp.zeros(3).at[0].set(1.0)` works in a loss)."""
    if any(type(a) is HostArray for a in operands):
        return [immutable(v) for v in values]
    return [to_jax(v, copy=any(v is a for a in operands)) for v in values]


def to_jax(x: Any, *, copy: bool = False) -> Any:
    """A host value as a `jax.Array`; anything else unchanged.

    Without `copy` (values chainrule computed), arrays that own their memory
    are handed to JAX as they are, and views (of inputs, broadcasts, reshapes)
    are copied first, so a result never shares memory with anything the caller
    can modify. With `copy` (values the user's function returned, which the
    user may still hold) the array is always copied.

    XLA aliases a C-contiguous buffer aligned to 64 bytes and copies any
    other one; so a large C-contiguous array that must not be shared is
    handed over first, and copied here only if XLA aliased it (one copy, not
    two: a gradient is often a view of a result, at any alignment).
    """
    if isinstance(x, np.generic):
        x = np.asarray(x)
    elif not isinstance(x, np.ndarray):
        return x
    if x.dtype.kind not in "biuf" or x.dtype != dtypes.canonicalize_dtype(x.dtype):
        return jnp.asarray(x)  # (JAX's own conversion: int64 becomes int32 without x64)
    if not x.flags.c_contiguous:
        return _device_put(np.ascontiguousarray(x))  # (a new array: it may be aliased)
    if copy or not x.flags.owndata:
        if x.nbytes >= _COPY_CHECKED_SIZE:
            out = _device_put(x)
            if out.unsafe_buffer_pointer() != x.ctypes.data:  # XLA copied it
                return out
        x = np.array(x)
    return _device_put(x)


# From this many bytes `to_jax` lets XLA make the copy it must make (a small
# array costs less to copy than to check).
_COPY_CHECKED_SIZE = 1 << 16
