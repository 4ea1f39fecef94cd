"""The JAX-trace front end: `jax.numpy` code run eagerly through chainrule's rules.

Jaxpr replay (`replay.py`) captures the whole function with `jax.make_jaxpr`
on every call and then evaluates the jaxpr; capturing alone costs more than
the arithmetic of a small model, and a `custom_jvp` function (`jax.nn.relu`)
costs a second capture of its JVP rule in the backward pass. This front end
skips both: it runs the function once, eagerly, with its differentiated
inputs wrapped in `Box`es, tracers of chainrule's own `jax.core.Trace`. JAX
hands every primitive it applies to the current trace to `process_primitive`,
which applies chainrule's rule for it (recording a node on the tape) exactly
as replay does for a jaxpr equation, through the same code
(`replay.apply_primitive`). JAX's differentiation is never involved: this is
JAX's interpreter interface, the one `jax.jvp` and `jax.vmap` are built on,
used to evaluate, not to differentiate.

* `jit`-compiled functions (`jnp.matmul`, `jax.nn.relu`'s body, users' own)
  arrive as one `jit` primitive carrying the jaxpr JAX already has for them;
  its body is evaluated inline.
* A `custom_jvp` function (`jax.nn.relu`, ...) is one node: its output is its
  body's, its VJP is the transpose of its JVP rule, obtained by running the
  rule (on this trace again) with tangents that chainrule differentiates.

It is a fast path of replay, taken only for eager calls on host values (see
`eligible`). Whatever it does not cover raises (a `custom_vjp` function,
Python control flow on a differentiated value, a primitive without a rule),
and the transform then replays the function instead, which handles or
reports it with the source line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax._src import ad_util
from jax._src import core as jcore  # the Trace/Tracer interface (JAX 0.10, pinned)

from chainrule.engine import core, replay, rules
from chainrule.engine.core import Primitive, Tracer, raw


class Unsupported(Exception):
    """Raised for what this front end leaves to jaxpr replay."""


_AVALS: dict[tuple, Any] = {}  # (shape, dtype, weak) -> ShapedArray; bounded by the shapes used


def _aval(value: Any) -> Any:
    x = raw(value)
    weak = bool(getattr(x, "weak_type", False))
    key = (np.shape(x), x.dtype, weak)
    aval = _AVALS.get(key)
    if aval is None:
        aval = _AVALS[key] = jcore.ShapedArray(key[0], key[1], weak_type=weak)
    return aval


class Box(jcore.Tracer):
    """A value (a chainrule `Tracer` or a plain array) as JAX code sees it."""

    __slots__ = ("val",)

    def __init__(self, trace: ChainruleTrace, val: Any):
        super().__init__(trace, _aval(val))
        self.val = val

    def to_concrete_value(self):
        # Not concrete, as for jax.jit: Python control flow on a value raises
        # JAX's error, and replay then explains what to do instead.
        return None


class ChainruleTrace(jcore.Trace):
    """Applies chainrule's rules to the primitives JAX code applies to `Box`es."""

    __slots__ = ("parent",)

    def __init__(self, parent: Any):
        super().__init__()
        self.parent = parent  # the trace outside (JAX's eager evaluation)
        self.requires_low = False

    def unbox(self, x: Any) -> Any:
        if isinstance(x, Box):
            if x._trace is not self:
                raise Unsupported("a value of another chainrule trace")
            return x.val
        if isinstance(x, jcore.Tracer):
            raise Unsupported("a value of another JAX trace")
        return x

    def stage_value(self, val: Any) -> Box:
        return val if isinstance(val, Box) and val._trace is self else Box(self, self.unbox(val))

    def process_primitive(self, primitive, tracers, params, /):
        vals = [self.unbox(t) for t in tracers]
        with jcore.set_current_trace(self.parent):
            outs = replay.apply_primitive(primitive, params, vals, _where)
        boxed = [Box(self, o) for o in outs]
        return boxed if primitive.multiple_results else boxed[0]

    def process_custom_jvp_call(self, primitive, fun, jvp, tracers, /, *, symbolic_zeros):
        if symbolic_zeros:
            raise Unsupported("custom_jvp with symbolic zeros")
        vals = [self.unbox(t) for t in tracers]
        if not all(core.is_differentiable(raw(v)) for v in vals):
            raise Unsupported("custom_jvp with non-float arguments")
        with jcore.set_current_trace(self.parent):
            outs = custom_jvp_p.bind(*vals, fun=fun, jvp=jvp)
        return [Box(self, o) for o in outs]

    def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, **params):
        raise Unsupported("custom_vjp")  # replay honours the user's fwd/bwd

    # Other interpreter hooks (call primitives, pmap, ...) are the base class's,
    # which raise: the function is then replayed.


def _where() -> str:
    return core.user_frame() or "unknown location"


def run(fun: Callable, args: Sequence[Any]) -> list[Any]:
    """Runs `fun` (flat arrays in, flat list out) on chainrule values through a
    new `ChainruleTrace`; returns chainrule values (Tracers or plain arrays)."""
    with jcore.take_current_trace() as parent:
        pass
    trace = ChainruleTrace(parent)
    boxed = [Box(trace, a) for a in args]
    try:
        with jcore.set_current_trace(trace):
            outs = fun(*boxed)
        return [trace.unbox(o) for o in outs]
    finally:
        trace.invalidate()


def eligible(tracers: Sequence[Tracer], level: int) -> bool:
    """Eager on the host, nothing else tracing: the fast path applies."""
    if core.is_recording() or core.is_capturing():
        return False
    with jcore.take_current_trace() as parent:
        if not isinstance(parent, jcore.EvalTrace):
            return False
    return all(t.level == level and type(t.value) is np.ndarray for t in tracers)


# --- custom_jvp functions ---------------------------------------------------------


def _custom_jvp_impl(*args: Any, fun: Any, jvp: Any) -> list[Any]:
    """The function's body, on plain values (evaluated with NumPy on the host)."""
    return run(fun.call_wrapped, args)


class _CustomJVP(Primitive):
    """Output: the body's. VJP: the transpose of the JVP rule at the primals,
    by chainrule's own reverse pass over the rule's tangent computation."""

    def vjp(self, g: Any, node: core.Node) -> list[Any]:
        primals, jvp = node.primals, node.params["jvp"]
        outs = node.ans
        cts = list(g) if isinstance(g, tuple) else [g]
        cts = [rules.zeros_like(o) if ct is None else ct for ct, o in zip(cts, outs, strict=True)]
        n_out = len(outs)

        def tangent_map(*tangents: Any) -> list[Any]:
            for store in jvp.stores:  # the rule may run more than once (vjp_fn twice)
                if store is not None:
                    store.reset()
            results = run(jvp.call_wrapped, [*primals, *tangents])
            tangent_outs = results[n_out:]
            return [
                rules.zeros_like(o) if isinstance(t, ad_util.SymbolicZero) else t
                for t, o in zip(tangent_outs, outs, strict=True)
            ]

        from chainrule.engine.transforms import vjp_flat

        tangent_cts = vjp_flat(tangent_map, [rules.zeros_like(p) for p in primals], cts)
        return [tangent_cts[i] for i in node.argnums]


custom_jvp_p = _CustomJVP("custom_jvp_call", _custom_jvp_impl, multiple_results=True)
