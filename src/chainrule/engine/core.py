"""The tracer core: `Tracer`, `Trace`, `Node`, `Primitive`, `bind` and the backward pass.

One call of a transform (`cr.grad`, `cr.vjp`, ...) is one `Trace`: a
`jax.core.Trace` of chainrule's own, with a **level** that numbers it among
all the transforms ever started (levels only grow, so a transform started
inside another has the higher one; that keeps `cr.grad(cr.grad(f))` from
confusing perturbations). While the user's function runs, that trace is
JAX's current trace, so every way a value can be computed reaches it:

* chainrule's own ops (operators of `Tracer`, `chainrule.numpy`, the VJP
  rules) call `bind`, which records at the highest level among the operands;
* JAX code (`jax.numpy`, `jax.nn`, `lax`, `jit`-compiled helpers, custom
  rules) binds JAX primitives, and JAX hands each to the current trace's
  `process_primitive`, which looks the primitive up in `PRIMITIVES` (the rule
  table, filled by `chainrule.engine.rules`) and binds chainrule's own.

Recording makes a `Node` (the primitive, its inputs one level down, its
output, its parents) and boxes the output in a `Tracer` of the same trace.
`backward` then walks the nodes in reverse creation order, without
recursion, and hands each node's cotangent to its primitive's VJP rule.

A `Tracer` exposes its concrete value when the call is eager (as JAX's own
JVP tracer does), so Python control flow on values works outside `jax.jit`,
and under `jax.jit` raises JAX's own errors.

This module knows nothing of arrays beyond shapes and dtypes.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax import dtypes, lax
from jax._src import config as _jax_config
from jax._src import core as jcore  # the Trace/Tracer interface (JAX 0.10, pinned)
from jax._src.array import ArrayImpl as _ArrayImpl  # concrete jax.Arrays (JAX 0.10)
from jax._src.interpreters import partial_eval as pe  # `_Perturbed`'s base only
from jax.errors import ConcretizationTypeError

from chainrule.engine import host
from chainrule.errors import NoVJPRuleError

PRIMITIVES: dict[str, Primitive] = {}
"""Every primitive chainrule can trace, keyed by its `jax.lax` name; filled by
`chainrule.engine.rules` (see `rules.registry.primitive`)."""

FOREIGN: list[Callable[[Any, bool], Primitive | None]] = []
"""Where a primitive of another library (not JAX's, not in `PRIMITIVES`) gets
its rule: `rules.foreign` enters one function, `(jax primitive, linear) ->
Primitive or None`, which derives it from the rules that library registered
with JAX (`linear`: applied to a linear map's values)."""


# --- observers of the tape (cr.explain) ----------------------------------------------

_recorders: list[Callable[[Node, str | None], None]] = []


@contextlib.contextmanager
def recording(recorder: Callable[[Node, str | None], None]) -> Iterator[None]:
    """Context manager: calls `recorder(node, where)` for every node created inside.

    Used by tools that show the tape (`cr.explain`); `where` is the user's
    source line that created the node ("file:line (function)").
    """
    _recorders.append(recorder)
    try:
        yield
    finally:
        _recorders.remove(recorder)


def announce(node: Node) -> None:
    """Hands a new node to the recorders (`recording`), with the user's line."""
    where = user_frame()
    for recorder in _recorders:
        recorder(node, where)


def user_frame() -> str | None:
    """The innermost Python frame outside chainrule's engine and JAX, as "file:line (fn)"."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("chainrule.engine", "chainrule.numpy", "jax", "contextlib")):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return None


# --- nodes and primitives -------------------------------------------------------------

_node_seq = itertools.count()


class Node:
    """How one traced value was computed.

    Attributes:
      prim: the `Primitive` applied (None for an input of the transform).
      primals: the primitive's inputs, one level down (`Tracer`s of lower
        levels or JAX values).
      params: the primitive's static parameters.
      ans: the primitive's output, one level down.
      argnums: which of `primals` were traced at this node's level.
      parents: the nodes of those traced inputs, aligned with `argnums`.
    """

    __slots__ = ("prim", "primals", "params", "ans", "argnums", "parents", "seq", "__weakref__")

    def __init__(self, prim, primals, params, ans, argnums, parents):
        # Creation order is a topological order: a node is made after its parents.
        self.seq = next(_node_seq)
        self.prim = prim
        self.primals = primals
        self.params = params
        self.ans = ans
        self.argnums = argnums
        self.parents = parents

    def vjp(self, g: Any) -> Sequence[Any]:
        """Cotangents for `parents` given the cotangent `g` of this node's output."""
        return self.prim.vjp(g, self)

    def release(self) -> None:
        """Drops the references that keep intermediate values alive."""
        self.primals = self.params = self.ans = None
        self.parents = ()

    def __repr__(self) -> str:
        name = self.prim.name if self.prim is not None else "input"
        return f"Node({name}, parents={len(self.parents)})"


def input_node(value: Any) -> Node:
    """A node for an input of a transform: no primitive, no parents."""
    return Node(None, (), {}, value, (), ())


class Primitive:
    """An operation the tracer records, with its implementation and VJP rule.

    Args:
      name: the `jax.lax` primitive this mirrors (e.g. "mul").
      impl: computes the result on untraced JAX values.
      params: names of the static parameters taken from a JAX primitive's.
      differentiable: False for primitives whose output carries no gradient
        (comparisons, argmax, stop_gradient): their output is never traced.
      multiple_results: the implementation returns a sequence.
      host_impl: the same computation with NumPy, for concrete values on the
        CPU (see `chainrule.engine.host`); it may return `NotImplemented` for
        cases it does not cover, which then run through `impl`.
      implied_params: the JAX primitive's parameters that this primitive fixes
        by what it is (scatter's combiner `update_jaxpr` is "set"), so they
        are accepted without being passed on.
      exact_on_host: `host_impl` gives XLA's result to the bit (data movement,
        comparisons, exact conversions), so it also folds constants eagerly
        (`apply_untraced`); or a predicate `(operands, **params) -> bool`
        saying for which operands it does.
    """

    def __init__(
        self,
        name: str,
        impl: Callable[..., Any],
        params: Sequence[str] = (),
        *,
        differentiable: bool = True,
        multiple_results: bool = False,
        host_impl: Callable[..., Any] | None = None,
        implied_params: Sequence[str] = (),
        exact_on_host: bool | Callable[..., bool] = False,
    ):
        self.name = name
        self.implied_params = frozenset(implied_params)
        self.impl = impl
        self.params = tuple(params)
        self.differentiable = differentiable
        self.multiple_results = multiple_results
        self.host_impl = host_impl
        self.vjp_makers: tuple[Callable | None, ...] | None = None
        # True for a primitive whose implementation is code run on the trace
        # outside (custom_vjp's fwd), so that an enclosing transform records
        # that code instead of this primitive again.
        self.runs_outside = False
        # False for a primitive whose NumPy version runs the user's code (a
        # custom_jvp function's body, which runs once): its errors are the
        # user's, not NumPy refusing the operands, so JAX's version is not tried
        self.host_errors_fall_back = True
        self.formulas: tuple[str, ...] | None = None
        self.family = _defining_family()
        self.exact_on_host = exact_on_host
        # `traced_impl(trace, *args, **params)`: the implementation when `trace`
        # records this primitive, for one whose JAX JVP rule computes the value
        # otherwise than the primitive (eigh decomposes its operand symmetrized,
        # a custom_jvp function's value is its rule's primal): what `jax.grad`'s
        # function computes from then on. None: `impl` (a primitive with a
        # NumPy version takes that instead).
        self.traced_impl: Callable[..., Any] | None = None

    @property
    def on_host_first(self) -> bool:
        """Whether `bind` tries `_bind_on_host` first: a primitive with a NumPy
        version that only computes (one result; no user code in it, whose
        errors are the user's, nor code run on the trace outside)."""
        return (
            self.host_impl is not None
            and not self.multiple_results
            and self.host_errors_fall_back
            and not self.runs_outside
        )

    def bind(self, *args: Any, **params: Any) -> Any:
        """Applies this primitive to `args`, recording a node at the highest
        level present (`Trace.record`), or evaluating it when none is traced.

        (The hot path of eager differentiation: one call per operation,
        forward and backward; `core.bind` is this function. Its common case,
        NumPy values on the host, is `_bind_on_host`: one pass over `args`.)
        """
        if self.on_host_first:
            out = _bind_on_host(self, args, params)
            if out is not _GENERAL:
                return out
        top = None
        level = 0
        for a in args:
            if isinstance(a, Tracer) and a.level > level:
                level, top = a.level, a
        if top is None:
            hosted = self.evaluate_on_host(args, params)  # untraced: NumPy, else JAX
            if hosted is not None:
                return hosted[1]
            with host.FLUSHING:  # (XLA's eager kernels run on this thread too)
                return self.impl(*args, **params)
        trace = top._trace
        current = _current_trace.value
        if current is not trace:
            if _stages_inside(current, trace):
                # Only our values, but JAX is tracing a function inside this
                # trace (a `lax.cond` branch, a `jit` body, `jax.make_jaxpr`)
                # that closes over them: as in JAX, the operation belongs to
                # that function (a branch not taken must not run, nor its
                # rule), so JAX's dispatch stages it there, our values as
                # its constants.
                return self.impl(*args, **params)
            for a in args:
                if (
                    isinstance(a, jcore.Tracer)
                    and not isinstance(a, Tracer)
                    and not trace.encloses(a._trace)
                ):
                    # A value of another JAX transformation running inside this one
                    # (e.g. jax.vmap or jax.grad in the differentiated function):
                    # JAX's dispatch lets that trace act first, which hands our
                    # values back to `Trace.process_primitive`. (A value of a
                    # trace this one runs inside, `jit`'s under `jit(grad(f))`,
                    # is a constant here: recorded below.)
                    return self.impl(*args, **params)
        return trace.record(self, args, params)

    def value_below(self, primals: tuple[Any, ...], params: dict[str, Any]) -> Any:
        """This primitive's value on operands that a transform enclosing this
        one traces (`Trace.record`, nested): applied there, which records it
        too. (`custom_jvp_call` computes it otherwise: its rule's primal.)"""
        return bind(self, *primals, **params)

    def evaluate_on_host(
        self, args: Sequence[Any], params: dict[str, Any]
    ) -> tuple[tuple[Any, ...], Any] | None:
        """`(operands as NumPy values, result)` when this primitive runs with its
        NumPy version on `args` (see `chainrule.engine.host`), else None."""
        if self.host_impl is None:
            return None
        operands = host.host_operands(args)
        if operands is None:
            return None
        out = _host_result(self, operands, params)
        return None if out is NotImplemented else (operands, out)

    def apply(self, trace: Trace, args: Sequence[Any], params: dict[str, Any]) -> list[Any]:
        """Applies this primitive as the JAX primitive of the same name was
        applied (`Trace.process_primitive`): its parameters taken by name.
        Call-like primitives (jit, cond, custom rules) override this."""
        out = bind(self, *args, **self.taken(params))
        return list(out) if self.multiple_results else [out]

    def taken(self, params: dict[str, Any]) -> dict[str, Any]:
        """The JAX primitive's parameters this one takes. A parameter it does not
        know is refused, never silently ignored, unless it only places the
        result (sharding) or holds its default (None)."""
        for k, v in params.items():
            if k in self.params or k in self.implied_params or k in _PLACEMENT_PARAMS:
                continue
            if v is not None:
                raise NoVJPRuleError(
                    self.name,
                    user_frame(),
                    detail=f"its parameter {k}={v!r} is not supported, and ignoring it "
                    "would give a wrong result",
                )
        return {k: params[k] for k in self.params if k in params}

    def apply_untraced(self, trace: Trace, args: Sequence[Any], params: dict[str, Any]) -> Any:
        """As `apply`, on untraced host values: with NumPy, or `NotImplemented`
        where this primitive has no NumPy version (JAX evaluates it then).

        An exact primitive (`exact_on_host`) on concrete constants only
        (`jax.Array`s, typed literals such as the `0` of `jnp.maximum(x, 0)`)
        is folded eagerly: computed with NumPy (`host.for_user` then hands the
        user's code a `jax.Array`, the same array XLA's dispatch would give, in a
        tenth of the time). Under
        `jit` constants are left to JAX, so no large literal enters the program.
        """
        if self.host_impl is None:
            return NotImplemented
        args = tuple(args)
        operands = host.host_operands(args, check=True)
        if operands is not None:
            try:
                with host.FLUSHING:
                    out = self.host_impl(*operands, **self.taken(params))
            except (ValueError, TypeError, IndexError):
                return NotImplemented  # (NumPy refuses them: JAX raises JAX's error)
            if out is NotImplemented:
                return out
            return list(out) if self.multiple_results else [out]
        if not (self.exact_on_host and trace.eager):
            return NotImplemented
        # a conversion that names its result's weak type may take a weak literal
        literals = self.name == "convert_element_type" and params.get("weak_type") is False
        operands = host.constant_operands(args, literals=literals)
        if operands is None:
            return NotImplemented
        params = self.taken(params)
        if self.exact_on_host is not True and not self.exact_on_host(operands, **params):
            return NotImplemented
        with host.FLUSHING:
            out = self.host_impl(*operands, **params)
        if out is NotImplemented:
            return out
        return list(out) if self.multiple_results else [out]  # (`process` hands them on)

    def vjp(self, g: Any, node: Node) -> list[Any]:
        """Cotangents for the traced inputs of `node`. Override for joint rules."""
        makers = self.vjp_makers
        if makers is None:
            raise NoVJPRuleError(self.name)
        out = []
        for i in node.argnums:
            maker = makers[i] if i < len(makers) else None
            if maker is None:
                raise NoVJPRuleError(self.name, detail=f"it has no rule for argument {i}")
            out.append(maker(node.ans, *node.primals, **node.params)(g))
        return out

    def __repr__(self) -> str:
        return f"Primitive({self.name})"


def _host_result(prim: Primitive, operands: Sequence[Any], params: dict[str, Any]) -> Any:
    """`prim`'s NumPy version on `operands` in XLA's floating-point mode
    (`host.FLUSHING`, inline: this is the hot path); `NotImplemented` where it
    does not cover them or NumPy refuses them (JAX's implementation then
    raises JAX's error), unless its errors are the user's."""
    st = host._state
    flush = st.restore and not st.flush_depth
    if flush:
        st.flush_depth = 1
        host.set_mode(st.flushing_ref)
    try:
        return prim.host_impl(*operands, **params)
    except (ValueError, TypeError, IndexError):
        if not prim.host_errors_fall_back:
            raise
        return NotImplemented
    finally:
        if flush:
            st.flush_depth = 0
            host.set_mode(st.saved_ref)


_GENERAL = object()  # `_bind_on_host`: the general path decides


def _bind_on_host(prim: Primitive, args: tuple[Any, ...], params: dict[str, Any]) -> Any:
    """`prim.bind(*args, **params)` in its common eager case, in one pass over
    `args`, else `_GENERAL`: every operand a NumPy value of a host dtype (see
    `host.host_dtype`), a strongly typed CPU `jax.Array`, or a Tracer of one
    trace (JAX's current one, recording as usual: no watched untraced values)
    holding a NumPy value. That is exactly the case where `bind` would reach
    `Primitive.evaluate_on_host` with these operands unchanged by
    `host.host_operands` (or `_converted`), and record the result; anything
    else (a Python number, a weak type, a subnormal constant, a JAX tracer,
    nested levels, NumPy refusing the operands) takes the general path, which
    gives the same result for these."""
    st = host._state
    if not st.host:
        return _GENERAL
    trace = None
    argnums: list[int] = []
    parents: list[Node] = []
    operands = list(args)
    constants = False  # a NumPy operand not computed here (checked for subnormals if traced)
    seen_host = False
    plain, host_ok = host.PLAIN_TYPES, host.HOST_DTYPES
    for i, a in enumerate(args):
        kind = type(a)
        if kind in plain:
            if a.dtype not in host_ok:
                return _GENERAL
            seen_host = True
            constants = constants or kind is not host.HostArray
        elif kind is _ArrayImpl:
            if a.dtype not in host_ok or a.weak_type:
                return _GENERAL
            a = host._converted(a)
            if a is None:
                return _GENERAL
            operands[i] = a
        elif isinstance(a, Tracer):
            t = a._trace
            if trace is None:
                trace = t
            elif t is not trace:
                return _GENERAL
            v = a.value
            if type(v) not in plain or v.dtype not in host_ok:
                return _GENERAL
            operands[i] = v
            argnums.append(i)
            parents.append(a.node)
            seen_host = True
        else:
            return _GENERAL
    if not seen_host:
        return _GENERAL  # (only jax.Arrays: JAX computes it, as `host_operands` says)
    if trace is not None:
        if (
            trace._invalidated
            or trace.untraced_uses is not None
            or _current_trace.value is not trace
        ):
            return _GENERAL
        if constants:  # (as `record`: a subnormal constant of the user's is JAX's)
            for a in args:
                if type(a) in plain and host.is_unchecked_constant(a) and host.has_subnormal(a):
                    return _GENERAL
    ans = _host_result(prim, operands, params)
    if ans is NotImplemented:
        return _GENERAL
    if trace is None:
        return ans
    if not prim.differentiable or not is_differentiable(ans):
        return host.immutable(ans)
    node = Node(prim, tuple(operands), params, ans, tuple(argnums), tuple(parents))
    if _recorders:
        announce(node)
    return trace.tracer_type(ans, node, trace)


def _defining_family() -> str:
    """The rule module (`rules/<family>.py`) whose top level is creating a primitive
    (through whatever helpers of other rule modules it calls)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("chainrule.engine.rules.") and frame.f_code.co_name == "<module>":
            return module.rsplit(".", 1)[1]
        frame = frame.f_back
    return "other"


# Parameters that say where a result lives, not what it is; chainrule's values
# take JAX's default placement, and weak typing only steers later promotion.
_PLACEMENT_PARAMS = frozenset({"sharding", "out_sharding", "weak_type"})


class _Projection:
    """Selects output `index` of a multiple-results node; its VJP is one-hot."""

    __slots__ = ("index", "count")
    name = "projection"

    def __init__(self, index: int, count: int):
        self.index = index
        self.count = count

    def vjp(self, g: Any, node: Node) -> list[Any]:
        cts = [None] * self.count
        cts[self.index] = g
        return [tuple(cts)]


# --- tracers and traces ---------------------------------------------------------------

_levels = itertools.count(1)  # global: a transform in another thread gets its own level

# JAX's current trace (a C++ config value; `jcore.trace_ctx.trace` reads it
# through a Python property, which the hot path avoids)
_current_trace = jcore.trace_state_strong_ref


def _stages_inside(current: jcore.Trace, trace: Trace) -> bool:
    """JAX's current trace is one of JAX's own begun inside `trace` (reached
    from `current` through chainrule traces, before `trace` itself), not one
    `trace` runs inside (its `parent`, or further out)."""
    while isinstance(current, Trace):
        if current is trace:
            return False
        current = current.parent
    if current is None or isinstance(current, jcore.EvalTrace):
        return False  # (JAX evaluating, as `core.eval_context` does: nothing staged)
    return not trace.encloses(current)


_AVALS: dict[tuple, Any] = {}  # (shape, dtype, weak) -> ShapedArray; bounded by the shapes used


def _aval(value: Any) -> Any:
    if isinstance(value, jcore.Tracer) or type(value) is host._ArrayImpl:
        return value.aval  # (a jax.Array's carries its sharding on an explicit mesh)
    shape = getattr(value, "shape", None)
    if shape is None:  # JAX's typed literals of a jaxpr (TypedFloat, TypedInt), numbers
        return jcore.typeof(value)
    weak = getattr(value, "weak_type", False)  # (NumPy values have none: strong)
    key = (shape, value.dtype, weak)
    aval = _AVALS.get(key)
    if aval is None:
        aval = _AVALS[key] = jcore.ShapedArray(key[0], key[1], weak_type=weak)
    return aval


class _Perturbed(pe.DynamicJaxprTracer):
    """What a chainrule Tracer shows among its contents (`Tracer._contents`):
    JAX's `custom_derivatives._maybe_perturbed` reads a tracer other than its
    own JVP tracers by its contents, and counts a staged float value as one
    that may carry a tangent. `jax.closure_convert` (and so `odeint`, and the
    custom_vjp functions written with it) hoists exactly the closed-over
    values it counts, so that their gradients flow through the rule."""

    __slots__ = ()


_PERTURBED = object.__new__(_Perturbed)  # (never traced with: only its type and aval are read)
_PERTURBED.aval = jcore.ShapedArray((), np.float32)


class Tracer(jcore.Tracer):
    """A value boxed for one level of differentiation: a JAX tracer of a chainrule `Trace`.

    `value` is the primal, one level down: a NumPy array (eager, on the host),
    a `jax.Array`, a JAX tracer (under `jit`/`vmap`) or a `Tracer` of a lower
    level (nested transforms). JAX code sees an array of `value`'s shape and
    dtype (`isinstance(t, jax.Array)` holds); chainrule's operators are added
    by `chainrule.engine.arrays.ArrayTracer`.
    """

    __slots__ = ("value", "node", "level", "_aval")

    def __init__(self, value: Any, node: Node, trace: Trace):
        self._trace = trace
        self.value = value
        self.node = node
        self.level = trace.level
        self._aval = None

    @property
    def aval(self):  # computed when JAX asks (chainrule's own ops never need it), once
        aval = self._aval
        if aval is None:
            aval = self._aval = _aval(self.value)
        return aval

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.value))

    @property
    def dtype(self):
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return len(np.shape(self.value))

    @property
    def size(self) -> int:
        return int(np.prod(np.shape(self.value), dtype=np.int64))

    def to_concrete_value(self):
        # Eagerly the value is concrete, so `if`, `int()`, `bool()` work as in
        # `jax.grad`; under `jit` it is not, and JAX raises its own error.
        return jcore.to_concrete_value(self.value)

    def __getattr__(self, name: str) -> Any:
        if name == "aval":
            # (reached only when the `aval` property raised AttributeError: JAX's
            # __getattr__ would read `aval` again, recursing without end)
            raise TypeError(
                f"chainrule.Tracer: the JAX type of its value ({type(self.value).__name__}) "
                "could not be read (it has no shape or dtype)"
            )
        try:  # jax.Array's methods and properties, as JAX's own tracers have them
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(
                f"chainrule.Tracer (like jax.Array) has no attribute {name!r}"
            ) from None

    def __float__(self) -> float:
        # As in `jax.grad`: a float taken from a differentiated value would be a
        # constant to the gradient, silently cutting the path through it.
        raise ConcretizationTypeError(
            self,
            f"float() was called on a value chainrule is differentiating (at "
            f"{user_frame()}); the result would be a constant, so the gradient "
            "through it would silently be lost (jax.grad raises here too). For a "
            "branch or a loop compare the array itself (`while loss > tol:`); to "
            "log the value return it as an auxiliary output (has_aux=True) or use "
            "jax.debug.print; to use it as a constant on purpose, write "
            "float(jax.lax.stop_gradient(x)).\n",
        )

    def __repr__(self) -> str:
        return f"chainrule.Tracer(level={self.level}, {raw(self)!r})"

    def _contents(self):
        # a differentiated value, as JAX's closure conversion must see it (`_Perturbed`)
        return [("value", self.value), ("differentiated", _PERTURBED)]


def raw(x: Any) -> Any:
    """Strips every level of boxing: the JAX value underneath."""
    while isinstance(x, Tracer):
        x = x.value
    return x


_INEXACT: dict[Any, bool] = {}


def is_differentiable(x: Any) -> bool:
    """Only floating (and complex) values carry cotangents."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    inexact = _INEXACT.get(dtype)
    if inexact is None:
        inexact = _INEXACT[dtype] = bool(dtypes.issubdtype(dtype, np.inexact))
    return inexact


def untraced_key(x: Any) -> Any:
    """What identifies an untraced value for `Trace.untraced_uses`: a NumPy
    array's memory (JAX hands a jit-wrapped function a view of it, not it),
    anything else itself."""
    if isinstance(x, np.ndarray) and x.size:
        return ("memory", x.__array_interface__["data"][0], x.dtype.str, x.shape)
    return id(x)


def carry_untraced(source: Any, made: Any) -> None:
    """`made` (computed from `source` outside any primitive, by a NumPy
    conversion) is an untraced value of the current trace if `source` is one
    (see `Trace.untraced_uses`)."""
    trace = _current_trace.value
    uses = getattr(trace, "untraced_uses", None) if isinstance(trace, Trace) else None
    if uses:
        key = untraced_key(source)
        if key in uses:
            trace.note_untraced(uses[key][0], made)


class Trace(jcore.Trace):
    """One active differentiation: the tape's recording rule and JAX's interpreter hooks.

    Args:
      tracer_type: the `Tracer` subclass its values are boxed in.
      for_user: JAX code's results on untraced values are handed back as JAX
        hands them (`host.for_user`); False keeps them host values.

    The trace outside (JAX's eager evaluation, a `jit` or `vmap` trace, or an
    enclosing chainrule trace) is `parent`: untraced work and the backward
    pass run there.
    """

    __slots__ = (
        "level",
        "parent",
        "tracer_type",
        "taps",
        "eager",
        "for_user",
        "untraced_uses",
        "linear",
        "forward",
    )

    def __init__(self, tracer_type: type[Tracer] = Tracer, *, for_user: bool = True):
        # jcore.Trace.__init__'s three fields, set here (once per transform call)
        self._invalidated = False
        self._weakref = weakref.ref(self)
        self.requires_low = False
        self.level = next(_levels)
        self.tracer_type = tracer_type
        self.parent = parent = _current_trace.value  # the current trace, which this one nests in
        self.taps = None  # a debugging.TapSink when the transform collects taps
        # a dict (`untraced_key` -> (operation, value)) when a transform must
        # know the values computed from this trace's values that are not traced
        # (`cr.linear_transpose`'s linearity check)
        self.untraced_uses: dict[Any, tuple[str, Any]] | None = None
        # True for a trace recorded only to be transposed into a JVP (`jvp_flat`):
        # a `custom_jvp` function's value is then its rule's, as JAX's JVP has it
        self.forward = False
        # untraced results go to code as JAX hands them (`host.for_user`); False
        # for a trace that only evaluates chainrule's own calls on host values
        self.for_user = for_user
        # whether JAX evaluates eagerly underneath (no `jit`/`vmap` trace below)
        self.eager = isinstance(parent, jcore.EvalTrace) or getattr(parent, "eager", False)
        # the function traced is linear in this trace's values (a custom_jvp
        # rule's tangent map): a `custom_jvp` function applied to them is its
        # body, as JAX's linearization keeps no custom rule (`_custom_call`)
        self.linear = False

    def encloses(self, other: jcore.Trace) -> bool:
        """`other` is a trace this one runs inside (its parent, or further out)."""
        trace = self.parent
        while trace is not None:
            if trace is other:
                return True
            if isinstance(trace, Trace):
                trace = trace.parent
            else:  # JAX's `vmap` and `jvp` traces name theirs `parent_trace`
                trace = getattr(trace, "parent_trace", None)
        return False

    def new_input(self, value: Any) -> Tracer:
        """Boxes an input of the transform."""
        return self.tracer_type(value, Node(None, (), {}, value, (), ()), self)

    def active(self):
        """Context manager: this trace is JAX's current trace (the user's code runs)."""
        return jcore.set_current_trace(self)

    def run(self, fun: Callable, *args: Any) -> Any:
        """`fun(*args)` with this trace current (`active`, without its overhead:
        this runs once per transform call and once per `jit` equation); when it
        already is current (`rules.calls.eval_body`'s equations), just the call."""
        previous = _current_trace.value
        if previous is self:
            return fun(*args)
        ctx = jcore.trace_ctx
        ctx.set_trace(self)
        try:
            return fun(*args)
        finally:
            ctx.set_trace(previous)

    def record(self, prim: Primitive, args: tuple[Any, ...], params: dict[str, Any]) -> Any:
        """Applies `prim` to `args` (some boxed at this level) and records a node.

        Inputs at lower levels are passed down unchanged, so nested transforms
        record one node per level, innermost first.
        """
        if self._invalidated:
            raise escaped_tracer_error(prim, self)
        primals, argnums, parents, nested, subnormal = list(args), [], [], False, False
        for i, a in enumerate(args):
            if isinstance(a, Tracer):
                if a._trace is self:
                    argnums.append(i)
                    parents.append(a.node)
                    a = primals[i] = a.value
                nested = nested or isinstance(a, Tracer)  # a lower level records too
            elif host.is_unchecked_constant(a) and host.has_subnormal(a):
                subnormal = True  # a constant of the user's that XLA reads as zero: JAX's
        primals = tuple(primals)
        if nested and not prim.runs_outside:
            ans = prim.value_below(primals, params)
        else:
            ans = NotImplemented
            hosted = None if subnormal else prim.evaluate_on_host(primals, params)
            if hosted is not None:
                # the node keeps the operands as NumPy values: its rule then
                # reads constants (a loss's data) without converting them again
                # in the backward pass
                primals, ans = hosted
            if ans is NotImplemented:  # JAX computes it: on the trace outside, or on
                # this one for host values (a call's body then runs with NumPy)
                on_host = not subnormal and host.host_operands(primals) is not None
                with jcore.set_current_trace(self if on_host else self.parent), host.FLUSHING:
                    if prim.traced_impl is None:
                        ans = prim.impl(*primals, **params)
                    else:
                        ans = prim.traced_impl(self, *primals, **params)
        uses = self.untraced_uses
        if uses:  # (a watched trace: a constant operand computed from its values)
            self.carry_untraced_operands(args, primals, argnums)
        # an untraced result goes on as a host value, except where a transform
        # watches what is computed from this trace's values: then as a `jax.Array`,
        # so that what the code computes from it passes `process` too, not NumPy
        untraced = host.to_jax if uses is not None and argnums else host.immutable
        if not prim.differentiable:  # its output is never traced: no node
            if prim.multiple_results:
                out: Any = [untraced(raw(a)) for a in ans]
            else:
                out = untraced(raw(ans))
        else:
            node = Node(prim, primals, params, ans, tuple(argnums), tuple(parents))
            if _recorders:
                announce(node)
            box = self.tracer_type
            if not prim.multiple_results:
                diff = is_differentiable(raw(ans))
                out = box(ans, node, self) if diff else untraced(raw(ans))
            else:
                n = len(ans)
                out = [
                    box(a, Node(_Projection(i, n), (), {}, a, (0,), (node,)), self)
                    if is_differentiable(raw(a))
                    else untraced(raw(a))
                    for i, a in enumerate(ans)
                ]
        if uses is not None and argnums:
            self.note_untraced(prim.name, out)
        return out

    def carry_untraced_operands(self, args: tuple, primals: tuple, argnums: list[int]) -> None:
        """Notes the operands of a node as `untraced_uses` under the key they
        are recorded with (a `jax.Array` operand is recorded as a NumPy view)."""
        uses = self.untraced_uses
        for i, (a, p) in enumerate(zip(args, primals, strict=True)):
            if i not in argnums and a is not p:
                use = uses.get(untraced_key(a))
                if use is not None:
                    uses[untraced_key(p)] = use

    def note_untraced(self, name: str, out: Any) -> None:
        """Notes in `untraced_uses` each untraced value of `out` (a value or a
        list), computed by `name` from this trace's values: what the tape cannot
        see depends on the inputs (a comparison, `stop_gradient`, a cast to an
        integer, and what is computed from those)."""
        for o in out if isinstance(out, list) else (out,):
            if not isinstance(o, Tracer):
                self.untraced_uses[untraced_key(o)] = (name, o)  # (kept: its key stays its)

    # --- JAX's interpreter interface: JAX code running on this trace's values ---

    def _owns(self, values: Sequence[Any]) -> bool:
        for v in values:
            if isinstance(v, Tracer) and v._trace is self:
                return True
        return False

    def stage_value(self, val: Any) -> Any:
        if isinstance(val, Tracer) and val._trace is self:
            return val
        return self.parent.stage_value(val)

    def process_primitive(self, primitive, tracers, params, /):
        check_types(primitive, tracers, params)
        return self.process(primitive, tracers, params, for_user=self.for_user)

    def process(self, primitive, tracers, params, for_user: bool = False):
        """`process_primitive`; without `for_user` (a jaxpr's equations, see
        `rules.calls.eval_body`) untraced results stay host values."""
        uses = self.untraced_uses
        if uses:  # (a transform watching untraced values: they taint what they make)
            names = [uses[k][0] for k in map(untraced_key, tracers) if k in uses]
            if names and not self._owns(tracers):  # (as `jax.Array`s: see `record`)
                out = self._process(primitive, tracers, params, for_user=True)
                self.note_untraced(names[0], out)
                return out
        return self._process(primitive, tracers, params, for_user)

    def _process(self, primitive, tracers, params, for_user: bool = False):
        prim = PRIMITIVES.get(primitive.name)
        if self._owns(tracers):  # values of this trace: chainrule's rule records them
            if prim is None:
                prim = FOREIGN[0](primitive, self.linear) if FOREIGN else None
                if prim is None:
                    raise NoVJPRuleError(primitive.name, user_frame())
            # (JAX's bind made the eval trace current meanwhile: this one again)
            outs = self.run(prim.apply, self, tracers, params)
            return outs if primitive.multiple_results else outs[0]
        if prim is not None:  # concrete host values: evaluated with NumPy where it can
            outs = prim.apply_untraced(self, tracers, params)
            if outs is not NotImplemented:  # (handed to user code as JAX hands them)
                if for_user:
                    outs = host.for_user(outs, tracers)
                else:
                    outs = [host.immutable(o) for o in outs]
                return outs if primitive.multiple_results else outs[0]
        with jcore.set_current_trace(self.parent):  # nothing of ours: the trace outside
            return primitive.bind(*tracers, **params)

    def process_custom_jvp_call(self, primitive, fun, jvp, tracers, /, *, symbolic_zeros):
        params = dict(symbolic_zeros=symbolic_zeros)
        return self._custom_call(primitive, tracers, (fun, jvp), ("fun", "jvp"), params)

    def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, **params):
        return self._custom_call(primitive, tracers, (fun, fwd, bwd), ("fun", "fwd", "bwd"), params)

    def _custom_call(self, primitive, tracers, subfuns, names, params):
        """A function with a custom rule: one node of chainrule's rule for it
        (`rules/calls.py`) when it meets this trace's values; else its body, with
        NumPy on host values, or the trace outside's handling of it."""
        if self._owns(tracers):
            if self.linear and primitive.name == "custom_jvp_call":
                return self.run(subfuns[0].call_wrapped, *tracers)
            rule = PRIMITIVES[primitive.name]
            params = dict(zip(names, subfuns, strict=True), **params)
            return self.run(rule.apply, self, tracers, params)
        if host.host_operands(tuple(tracers), check=True):  # the body, on the host with NumPy
            outs = self.run(subfuns[0].call_wrapped, *(host.immutable(t) for t in tracers))
            return host.for_user(outs, tracers)
        return primitive.bind_with_trace(
            self.parent, for_trace(self.parent, tracers), None, dict(subfuns=subfuns, **params)
        )

    def process_shard_map(self, primitive, fun, tracers, /, **params):
        """`jax.shard_map`: one node of chainrule's rule for it when it meets this
        trace's values (`rules/collectives.py`), else the trace outside's."""
        if self._owns(tracers):
            rule = PRIMITIVES.get(primitive.name)
            if rule is None:
                raise NoVJPRuleError(primitive.name, user_frame())
            return rule.process_shard_map(self, primitive, fun, tracers, params)
        operands = for_trace(self.parent, tracers)
        return primitive.bind_with_trace(self.parent, operands, None, dict(params, subfuns=(fun,)))

    def process_call(self, call_primitive, f, tracers, params, /):
        with self.active():
            return f.call_wrapped(*tracers)

    def __repr__(self) -> str:
        return f"chainrule.Trace(level={self.level})"


# (primitive, operand types, parameters) already checked by JAX's rule; bounded
_CHECKED: dict[tuple, None] = {}
_CHECKED_LIMIT = 4096


def check_types(primitive: Any, values: Sequence[Any], params: dict[str, Any]) -> None:
    """Raises JAX's error where the shape and dtype rule of a JAX primitive the
    user's code binds (`lax.dynamic_slice` past the end, `lax.add` of float32
    and float64, a `dot_general` of mismatched dimensions) refuses its operands,
    as JAX does on every path; NumPy would broadcast, promote or clamp instead.
    Checked once per primitive, operand types and parameters."""
    if primitive in _UNCHECKED:
        return
    try:
        key = (primitive, *map(_type_key, values), *params.items())
        if key in _CHECKED:
            return
    except TypeError:  # (an unhashable parameter: arrays)
        _UNCHECKED.add(primitive)
        return
    if not all(map(_plain, params.values())):
        # parameters holding jaxprs, functions or arrays (jit, cond, scatter's
        # combiner): such a primitive's body is checked as it runs, and no key
        # of it is kept (it would keep a jit body's constants alive)
        _UNCHECKED.add(primitive)
        return
    rule = getattr(primitive, "abstract_eval", None)
    if rule is not None:
        try:
            rule(*map(_type_of, values), **params)
        except NotImplementedError:  # (no rule: JAX checks nothing either)
            pass
    if len(_CHECKED) >= _CHECKED_LIMIT:
        evict_oldest(_CHECKED)
    _CHECKED[key] = None


_UNCHECKED: set[Any] = set()  # primitives whose parameters are not plain values


def _plain(value: Any) -> bool:
    """A parameter that is data: numbers, strings, dtypes, enums, tuples of them."""
    if value is None or isinstance(value, (bool, int, float, str, np.dtype, enum.Enum)):
        return True
    return isinstance(value, tuple) and all(map(_plain, value))


def evict_oldest(table: dict) -> None:
    """Drops the oldest entry of a bounded cache; another thread may be
    inserting or evicting at the same time (then it did the work)."""
    try:
        table.pop(next(iter(table)), None)
    except (RuntimeError, StopIteration):  # (changed size during iteration; emptied)
        pass


def _type_key(value: Any) -> Any:
    """What `_type_of(value)` depends on, without building JAX's type: a
    NumPy value's (boxed or not) shape, dtype and weak type, an array's or JAX
    tracer's own type, a number's `_type_of` (an `int` too large for JAX's
    integers raises there, as JAX does). `check_types`' cache key, read on
    every `lax` call the user makes on traced values."""
    inner = value.value if isinstance(value, Tracer) else value
    if isinstance(inner, (np.ndarray, np.generic)):
        return (inner.shape, inner.dtype, getattr(inner, "weak_type", False))
    if isinstance(value, jcore.Tracer) or type(value) is host._ArrayImpl:
        return value.aval
    return _type_of(value)


def _type_of(value: Any) -> Any:
    """The type JAX gives `value` as an operand: a NumPy value's (a host value,
    boxed or not) canonicalized, as JAX's dispatch reads it (float64 is
    float32 without x64)."""
    inner = value.value if isinstance(value, Tracer) else value
    if isinstance(inner, (np.ndarray, np.generic)):
        dtype = dtypes.canonicalize_dtype(inner.dtype)
        weak = getattr(inner, "weak_type", False)
        if dtype == inner.dtype:
            return _aval(inner) if isinstance(inner, np.ndarray) else jcore.typeof(inner)
        return jcore.ShapedArray(np.shape(inner), dtype, weak_type=weak)
    if isinstance(value, jcore.Tracer) or type(value) is host._ArrayImpl:
        return _aval(value)
    return jcore.typeof(value)


def for_trace(trace: jcore.Trace, values: Sequence[Any]) -> Sequence[Any]:
    """`values` to bind on `trace` directly (`bind_with_trace`, skipping `bind`'s
    conversions): host (NumPy) values as `jax.Array`s for a trace of JAX's,
    which takes only canonical constants (JAX's own typed literals, weakly
    typed ones too, are); unchanged for chainrule's own."""
    if isinstance(trace, Trace):
        return values
    return [host.to_jax(v) if host.is_plain_host_value(v) else v for v in values]


def escaped_tracer_error(prim: Any, trace: Trace) -> Exception:
    return jcore.UnexpectedTracerError(
        f"A chainrule Tracer of a transform that has already returned (level "
        f"{trace.level}) was used by '{getattr(prim, 'name', prim)}'. A traced value "
        "escaped the differentiated function, e.g. it was stored in a global, a list or "
        "a closure that outlives the call. Return values from the function instead (use "
        "has_aux=True for extra outputs)."
    )


# --- applying a primitive ------------------------------------------------------------


bind = Primitive.bind
"""`bind(prim, *args, **params)`: applies `prim` (see `Primitive.bind`)."""


# --- the backward pass ---------------------------------------------------------------


def zeros_like(x: Any, dtype: Any = None) -> Any:
    """A zero cotangent for `x` (of `dtype` if given: a cotangent may be wider
    than its primal): NumPy outside JAX traces, `lax.full` inside them (so no
    large literal is baked into a compiled program)."""
    value = raw(x)
    shape = tuple(np.shape(value))
    if dtype is None:
        dtype = getattr(value, "dtype", None)
    if dtype is None:  # a Python number (an output a function gives eagerly, as JAX does)
        dtype = dtypes.canonicalize_dtype(np.result_type(value))
    if not isinstance(dtype, np.dtype):  # a typed PRNG key's: JAX's float0, as for integers
        return np.zeros(shape, dtypes.float0)
    if isinstance(value, jcore.Tracer):
        return lax.full(shape, 0, dtype)
    return np.zeros(shape, dtype)


def add_cotangents(a: Any, b: Any) -> Any:
    """Accumulates two cotangents; tuples (multiple-results nodes) add elementwise."""
    if isinstance(a, tuple):
        return tuple(
            y if x is None else x if y is None else add_cotangents(x, y)
            for x, y in zip(a, b, strict=True)
        )
    return bind(PRIMITIVES["add_any"], a, b)


def _by_seq(node: Node) -> int:
    return node.seq


# --- a tape as arrays and structure (JAX's vjp_fn is a pytree: it can leave `jit`) ---


def tape_of(roots: Iterable[Node]) -> list[Node]:
    """Every node a backward pass from `roots` may reach, in creation order."""
    reached: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(node.parents)
    return sorted(reached, key=_by_seq)


def _is_residual(x: Any) -> bool:
    """An array a node holds, which a tape's pytree exposes as a leaf; a Python
    number, a NumPy scalar and the parameters stay in its structure."""
    return isinstance(x, (np.ndarray, jax.Array, jcore.Tracer))


def tape_residuals(tape: Sequence[Node]) -> list[Any]:
    """The arrays the nodes of `tape` hold (operands and outputs), in order."""
    leaves = []
    for node in tape:
        leaves.extend(x for x in node.primals if _is_residual(x))
        ans = node.ans
        if isinstance(ans, (list, tuple)):
            leaves.extend(x for x in ans if _is_residual(x))
        elif _is_residual(ans):
            leaves.append(ans)
    return leaves


def tape_with(tape: Sequence[Node], residuals: Iterable[Any]) -> dict[Node, Node]:
    """Copies of the nodes of `tape` holding `residuals` (`tape_residuals`'
    order) in place of their arrays, linked to each other: old node -> copy.

    The arrays may have changed kind meanwhile (NumPy values returned from
    `jit` as `jax.Array`s, or `jit`'s tracers when the tape is an argument of
    a jitted function); the rules read them as any operand."""
    it = iter(residuals)

    def swap(x: Any) -> Any:
        return next(it) if _is_residual(x) else x

    copies: dict[Node, Node] = {}
    for node in tape:  # (creation order: a node's parents are copied before it)
        primals = tuple(map(swap, node.primals))
        ans = node.ans
        if isinstance(ans, (list, tuple)):
            ans = type(ans)(map(swap, ans))
        else:
            ans = swap(ans)
        parents = tuple(copies[p] for p in node.parents)
        copies[node] = Node(node.prim, primals, node.params, ans, node.argnums, parents)
    return copies


_STANDARD = contextlib.nullcontext()  # (the promotion already standard: nothing to set)
_pass = threading.local()  # the backward pass now running: `at_zero` (see `backward`)


def backward_at_zero() -> bool:
    """Whether the backward pass now running is forward mode's pass at a zero
    cotangent (`backward(at_zero=True)`): recorded only to be transposed, its
    values never read. A rule without a reverse-mode derivative (a while loop)
    may then return a linear node whose transpose it knows instead of raising."""
    return getattr(_pass, "at_zero", False)


def backward(
    seeds: Iterable[tuple[Node, Any]],
    *,
    release: bool,
    observe: Callable[[Node, Any, Sequence[Any] | None], None] | None = None,
    at_zero: bool = False,
) -> dict[Node, Any]:
    """The backward pass: propagates cotangents from `seeds` to the input nodes.

    Args:
      seeds: (node, cotangent of its output) pairs, e.g. the loss and 1.0.
      release: drop each node's saved values once it has been processed, so
        the graph's memory is freed during the pass (as in PyTorch's
        `backward()` without `retain_graph`).
      observe: called as `observe(node, g, cts)` for every node reached, in
        the order visited (`cts` None for inputs and unreached uses), e.g. by
        `cr.explain` to show each step.
      at_zero: the seeds are zeros and the pass is recorded by an enclosing
        trace only to be transposed (forward mode, `jvp_flat` and
        `forward._linearize`); `backward_at_zero()` says so to the rules of
        this pass, not to a pass a rule starts itself.

    Returns:
      The cotangent of every reached node without parents (the inputs).
    """
    previous = backward_at_zero()
    _pass.at_zero = at_zero
    try:
        # (a backward pass is chainrule's own work: XLA's treatment of subnormals
        # for all of it at once, not per primitive; see `host.FLUSHING`. Its rules
        # mix dtypes as JAX's own lax-written rules do, e.g. eigh's real eigenvalue
        # gaps times complex eigenvectors: the user's strict promotion is for their
        # code, as under jax.grad)
        promotion = _jax_config.numpy_dtype_promotion
        standard = _STANDARD if promotion.value == "standard" else promotion("standard")
        with host.FLUSHING, standard:
            if at_zero and (_jax_config.debug_nans.value or _jax_config.debug_infs.value):
                # the pass's values are never read (0 * inf is NaN there): JAX's
                # per-primitive NaN/inf checks are for the tangents, not for it
                with _jax_config.debug_nans(False), _jax_config.debug_infs(False):
                    return _backward(seeds, release, observe)
            return _backward(seeds, release, observe)
    finally:
        _pass.at_zero = previous


def _backward(seeds, release, observe) -> dict[Node, Any]:
    cotangents: dict[Node, Any] = {}
    for node, g in seeds:
        cotangents[node] = add_cotangents(cotangents[node], g) if node in cotangents else g
    inputs: dict[Node, Any] = {}
    # Reverse creation order visits every node after all the nodes that use it
    # (see `Node.seq`)
    for node in reversed(tape_of(cotangents)):
        g = cotangents.pop(node, None)
        if g is None or not node.parents:  # an input, or every use was a structural zero
            if g is not None:
                inputs[node] = g
            if observe is not None:
                observe(node, g, None)
            continue
        cts = node.prim.vjp(g, node)  # (`node.vjp`, without its call)
        if observe is not None:
            observe(node, g, cts)
        for parent, ct in zip(node.parents, cts, strict=True):
            if ct is not None:
                cotangents[parent] = (
                    add_cotangents(cotangents[parent], ct) if parent in cotangents else ct
                )
        if release:
            node.release()
    return inputs


def vjp_flat(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    cotangents: Sequence[Any],
    tracer_type: type[Tracer] = Tracer,
    linear: bool = False,
    structural: bool = False,
) -> list[Any]:
    """VJP of a function of flat arrays returning a flat list of arrays.

    `fun` runs once on a new trace (JAX code in it reaches chainrule's rules);
    the cotangents of inputs the outputs do not depend on are zeros, or, with
    `structural`, None (JAX's symbolic zeros: the backward pass then sends
    nothing on). A cotangent given as None seeds nothing. Used by the rules of
    call-like primitives (custom rules, cond branches). `linear`: `fun` is
    linear (a custom_jvp rule's tangent map; see `Trace.linear`).
    """
    trace = Trace(tracer_type)
    trace.linear = linear
    tracers = [trace.new_input(p) for p in primals]
    try:
        with trace.active():
            outs = fun(*tracers)
    finally:
        trace.invalidate()
    seeds = [
        (o.node, ct)
        for o, ct in zip(outs, cotangents, strict=True)
        if isinstance(o, Tracer) and o._trace is trace and ct is not None
    ]
    input_cts = backward(seeds, release=True)
    if structural:
        return [input_cts.get(t.node) for t in tracers]
    return [input_cts.get(t.node) if t.node in input_cts else zeros_like(t) for t in tracers]


def jvp_flat(
    fun: Callable[..., Sequence[Any]], primals: Sequence[Any], tangents: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    """`(fun(*primals), J @ tangents)` for a function of flat arrays returning a
    flat list, by transposing its VJP (see `chainrule.engine.forward`): the
    backward pass at zero cotangents is recorded, and its VJP with cotangent
    `tangents` is the JVP. Every primal is differentiated (pass only floats).
    Used by rules that need a derivative going forward (a while loop's)."""
    trace = Trace()
    trace.forward = True
    tracers = [trace.new_input(p) for p in primals]
    try:
        with trace.active():
            outs = list(fun(*tracers))
    finally:
        trace.invalidate()
    traced = [isinstance(o, Tracer) and o._trace is trace for o in outs]

    def pullback(*us: Any) -> list[Any]:  # linear in us: J^T u
        seeds = [(o.node, u) for o, u, t in zip(outs, us, traced, strict=True) if t]
        cts = backward(seeds, release=False, at_zero=True)
        return [cts.get(t.node) if t.node in cts else zeros_like(t) for t in tracers]

    values = [o.value if t else o for o, t in zip(outs, traced, strict=True)]
    zeros = [zeros_like(v) for v in values]
    return values, vjp_flat(pullback, zeros, tangents)
