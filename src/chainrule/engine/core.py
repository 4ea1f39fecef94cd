"""The tracer core: `Tracer`, `Node`, trace levels, `bind` and the backward pass.

This module knows nothing about arrays beyond "a value has a dtype". Everything
array-shaped (the primitives, their VJP rules, operator overloading, jaxpr
replay) is built on the four things defined here:

* a **level** numbers one active differentiation (one call of `cr.grad`,
  `cr.vjp`, ...). Levels only grow, so a transform started inside another one
  always has a higher level, and two transforms never share one. That is what
  keeps `cr.grad(cr.grad(f))` from confusing the perturbations of the two.
* a `Tracer` boxes a value for one level. Its value may itself be a `Tracer`
  of a lower level (nesting) or a JAX value (a concrete array, or a JAX tracer
  under `jax.jit`/`jax.vmap`/`jax.grad`).
* a `Node` records how a `Tracer` was made: the primitive, the primal inputs
  and output (one level down), its parents.
* `backward` walks the nodes in reverse topological order, without recursion,
  and hands each node's cotangent to its primitive's VJP rule.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from jax import dtypes

from chainrule.engine import host


class _TraceState(threading.local):
    """The one piece of mutable global state: the trace stack, per thread."""

    def __init__(self) -> None:
        self.levels = itertools.count(1)
        # Levels of transforms that are capturing a jaxpr with jax.make_jaxpr;
        # a lower-level Tracer met during a capture must be replayed instead.
        self.capturing: list[int] = []
        # Observers of the tape (e.g. `cr.explain`): called with each new node.
        self.recorders: list[Callable[[Node, str | None], None]] = []
        # Where the equation being replayed came from (set only while recording).
        self.source: str | None = None
        # Source locations of the call equations (jit bodies) being replayed.
        self.call_sites: list[str] = []


_state = _TraceState()


def new_level() -> int:
    """Returns a fresh level, higher than every level handed out before."""
    return next(_state.levels)


class ReplayNeeded(Exception):
    """A Tracer of an enclosing transform met a jaxpr being captured.

    The transform that owns `level` catches this and re-runs the user's
    function through jaxpr replay. If it reaches user code, a Tracer escaped
    the transform that made it.
    """

    def __init__(self, level: int):
        self.level = level
        super().__init__(
            f"A chainrule Tracer (level {level}) was used inside a JAX transformation "
            "outside the chainrule transform that created it. This happens when a traced "
            "value escapes the differentiated function, e.g. it is stored in a global or a "
            "closure that outlives the call. Return values from the function instead."
        )


def names_tracer(exc: BaseException) -> bool:
    """True if `exc` is JAX refusing a chainrule Tracer as an argument.

    JAX functions (`jnp.sin`, `jax.jit(f)`, ...) do not accept foreign objects;
    they raise a TypeError or ValueError naming the object's type. The dynamic
    front end then replays the function as a jaxpr instead.
    """
    return isinstance(exc, (TypeError, ValueError)) and "chainrule.Tracer" in str(exc).replace(
        "chainrule.engine.core.Tracer", "chainrule.Tracer"
    )


@contextlib.contextmanager
def _pushed(stack: list, item: Any) -> Iterator[None]:
    stack.append(item)
    try:
        yield
    finally:
        stack.pop()


def recording(recorder: Callable[[Node, str | None], None]):
    """Context manager: calls `recorder(node, where)` for every node created inside.

    Used by tools that show the tape (`cr.explain`); `where` is the user's
    source line that created the node ("file:line (function)").
    """
    return _pushed(_state.recorders, recorder)


def is_recording() -> bool:
    return bool(_state.recorders)


def set_source(where: str | None) -> None:
    """Replay sets the source line of the equation it is evaluating."""
    _state.source = where


def _source_line() -> str | None:
    """The user's source line of the operation being recorded, best effort."""
    if _state.source is not None:
        return _state.source
    return user_frame()


def user_frame() -> str | None:
    """The innermost Python frame outside chainrule's engine and JAX, as "file:line (fn)"."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("chainrule.engine", "chainrule.numpy", "jax", "contextlib")):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return None


def call_site(where: str):
    """Context manager: replay is inside the body of a call made at `where`."""
    return _pushed(_state.call_sites, where)


def enclosing_call_site() -> str | None:
    return _state.call_sites[-1] if _state.call_sites else None


def is_capturing() -> bool:
    return bool(_state.capturing)


def capturing(level: int):
    """Context manager marking `level` as capturing a jaxpr (jaxpr replay)."""
    return _pushed(_state.capturing, level)


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


class Tracer:
    """A value boxed for one level of differentiation.

    Operators and array methods (`+`, `@`, `.sum()`, indexing, ...) are attached
    by `chainrule.engine.dynamic`; the core only defines the box.
    """

    __slots__ = ("value", "node", "level")
    __array_priority__ = 1000  # NumPy defers binary operators to us.

    def __init__(self, value: Any, node: Node, level: int):
        self.value = value
        self.node = node
        self.level = level

    @property
    def aval(self):
        return raw(self).aval if hasattr(raw(self), "aval") else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.value.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return f"chainrule.Tracer(level={self.level}, {raw(self)!r})"


def raw(x: Any) -> Any:
    """Strips every level of boxing: the JAX value underneath."""
    while isinstance(x, Tracer):
        x = x.value
    return x


def top_level(args: Iterable[Any]) -> int:
    """The highest level among the Tracers in `args`, 0 if none."""
    level = 0
    for a in args:
        if isinstance(a, Tracer) and a.level > level:
            level = a.level
    return level


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


class Primitive:
    """An operation the tracer records, with its implementation and VJP rule.

    Args:
      name: the `jax.lax` primitive this mirrors (e.g. "mul").
      impl: computes the result on untraced JAX values.
      params: names of the static parameters taken from a jaxpr equation.
      differentiable: False for primitives whose output carries no gradient
        (comparisons, argmax, stop_gradient): their output is never traced.
      multiple_results: the implementation returns a sequence.
      host_impl: the same computation with NumPy, for concrete values on the
        CPU (see `chainrule.engine.host`); it may return `NotImplemented` for
        cases it does not cover, which then run through `impl`.
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
    ):
        self.name = name
        self.impl = impl
        self.params = tuple(params)
        self.differentiable = differentiable
        self.multiple_results = multiple_results
        self.host_impl = host_impl
        self.vjp_makers: tuple[Callable | None, ...] | None = None

    def bind(self, *args: Any, **params: Any) -> Any:
        return bind(self, *args, **params)

    def vjp(self, g: Any, node: Node) -> list[Any]:
        """Cotangents for the traced inputs of `node`. Override for joint rules."""
        makers = self.vjp_makers
        if makers is None:
            from chainrule.errors import NoVJPRuleError

            raise NoVJPRuleError(self.name)
        out = []
        for i in node.argnums:
            maker = makers[i] if i < len(makers) else None
            if maker is None:
                from chainrule.errors import NoVJPRuleError

                raise NoVJPRuleError(self.name, detail=f"it has no rule for argument {i}")
            out.append(maker(node.ans, *node.primals, **node.params)(g))
        return out

    def __repr__(self) -> str:
        return f"Primitive({self.name})"


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


def bind(prim: Primitive, *args: Any, **params: Any) -> Any:
    """Applies `prim` to `args`, recording a node at the highest level present.

    Inputs at lower levels are passed down unchanged, so the recursion records
    one node per level, innermost first. (This is the hot path of eager
    differentiation: one call per operation, kept free of helper calls.)
    """
    level = 0
    for a in args:
        if isinstance(a, Tracer) and a.level > level:
            level = a.level
    if level == 0:
        return evaluate(prim, args, params)
    if not prim.differentiable:
        return evaluate(prim, tuple(raw(a) for a in args), params)
    state = _state
    if state.capturing and level <= state.capturing[-1]:
        # A value of an enclosing transform met a jaxpr being captured for an
        # inner one: the enclosing transform must replay instead.
        raise ReplayNeeded(level)
    primals, argnums, parents, nested = list(args), [], [], False
    for i, a in enumerate(args):
        if isinstance(a, Tracer):
            if a.level == level:
                argnums.append(i)
                parents.append(a.node)
                a = primals[i] = a.value
            nested = nested or isinstance(a, Tracer)  # a lower level records too
    primals = tuple(primals)
    ans = bind(prim, *primals, **params) if nested else evaluate(prim, primals, params)
    node = Node(prim, primals, params, ans, tuple(argnums), tuple(parents))
    if state.recorders:
        where = _source_line()
        for recorder in state.recorders:
            recorder(node, where)
    if not prim.multiple_results:
        return Tracer(ans, node, level) if is_differentiable(raw(ans)) else raw(ans)
    n = len(ans)
    return [
        Tracer(a, Node(_Projection(i, n), (), {}, a, (0,), (node,)), level)
        if is_differentiable(raw(a))
        else raw(a)
        for i, a in enumerate(ans)
    ]


def evaluate(prim: Primitive, args: tuple[Any, ...], params: dict[str, Any]) -> Any:
    """Computes `prim` on untraced values: with NumPy when they live on the host
    (see `chainrule.engine.host`), else with its JAX implementation."""
    if prim.host_impl is not None:
        operands = host.host_operands(args)
        if operands is not None:
            out = prim.host_impl(*operands, **params)
            if out is not NotImplemented:
                return out
    return prim.impl(*args, **params)


def toposort(roots: Iterable[Node]) -> Iterator[Node]:
    """Nodes reachable from `roots`, each after every node that uses it.

    Iterative (Kahn's algorithm), so a chain of 10^5 operations is fine.
    """
    roots = list(dict.fromkeys(roots))
    child_counts: dict[Node, int] = {}
    seen: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent in node.parents:
            child_counts[parent] = child_counts.get(parent, 0) + 1
            stack.append(parent)
    ready = [r for r in roots if child_counts.get(r, 0) == 0]
    while ready:
        node = ready.pop()
        parents = node.parents  # read before yielding: the consumer may release the node
        yield node
        for parent in parents:
            child_counts[parent] -= 1
            if child_counts[parent] == 0:
                ready.append(parent)


def _by_seq(node: Node) -> int:
    return node.seq


def backward(
    seeds: Iterable[tuple[Node, Any]],
    add: Callable[[Any, Any], Any],
    *,
    release: bool,
) -> dict[Node, Any]:
    """The backward pass: propagates cotangents from `seeds` to the input nodes.

    Args:
      seeds: (node, cotangent of its output) pairs, e.g. the loss and 1.0.
      add: adds two cotangents (accumulation where a value is used twice).
      release: drop each node's saved values once it has been processed, so
        the graph's memory is freed during the pass (as in PyTorch's
        `backward()` without `retain_graph`).

    Returns:
      The cotangent of every reached node without parents (the inputs).
    """
    cotangents: dict[Node, Any] = {}
    for node, g in seeds:
        cotangents[node] = add(cotangents[node], g) if node in cotangents else g
    inputs: dict[Node, Any] = {}
    # Reverse creation order visits every node after all the nodes that use it
    # (see `Node.seq`); one iterative pass finds the reachable ones.
    reached: set[Node] = set()
    stack = list(cotangents)
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(node.parents)
    for node in sorted(reached, key=_by_seq, reverse=True):
        g = cotangents.pop(node, None)
        if g is None:  # every use of this node contributed a structural zero
            continue
        if not node.parents:
            inputs[node] = g
            continue
        for parent, ct in zip(node.parents, node.vjp(g), strict=True):
            if ct is not None:
                cotangents[parent] = add(cotangents[parent], ct) if parent in cotangents else ct
        if release:
            node.release()
    return inputs
