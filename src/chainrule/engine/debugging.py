"""Gradient debugging inside chainrule's own backward pass: taps, hooks, NaN provenance.

chainrule owns its backward pass and knows the user's line of every node, so
it can answer what JAX and PyTorch answer only partly:

* `tap(h, "hidden")`: an identity in the forward pass that marks an
  intermediate; `cr.value_and_grad(loss, taps=True)` also returns the
  cotangent that reached it (what a zero "perturbation" argument added to `h`
  would get from `jax.grad`). `tap(h, hook=fn)` applies `fn` to that cotangent
  in the backward pass (clip, scale, print), like PyTorch's `register_hook`.
  Where chainrule is not differentiating `h`, a tap is `h` itself: it adds
  nothing to a program.
* `FiniteCheck`: with `check_finite=True`, the backward pass is watched node
  by node; the first node whose cotangent becomes NaN or infinite (from a
  finite upstream cotangent) is reported with its primitive, the user's line,
  the forward value, the upstream cotangent, the local derivative, and a hint
  for the usual causes. Eagerly it raises at once; under `jax.jit` a callback
  raises the same report when the compiled program runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jcore  # the current trace (JAX 0.10, pinned)

from chainrule.engine import core, host
from chainrule.engine.core import Node, Primitive, Trace, Tracer, raw
from chainrule.errors import NonFiniteGradientError, TapError

# --- taps -------------------------------------------------------------------------


class _Tap(Primitive):
    """The rule of a tap node: the cotangent passes through (after the hook), and
    is kept under the tap's name when the transform collects taps."""

    def __init__(self):
        super().__init__("tap", impl=lambda x, **_: x)

    def vjp(self, g: Any, node: Node) -> list[Any]:
        name, index, hook, sink = (node.params[k] for k in ("name", "index", "hook", "sink"))
        if sink is not None:
            sink.arrived(name, index, g)
        if hook is not None:
            g = _hooked(hook, g, name)
        return [g]


_TAP = _Tap()


def _hooked(hook: Callable, g: Any, name: str | None) -> Any:
    new = hook(g)
    if new is None:  # a hook that only looks (prints, logs) keeps the cotangent
        return g
    if np.shape(raw(new)) != np.shape(raw(g)) or raw(new).dtype != raw(g).dtype:
        raise TapError(
            f"cr.tap(..., hook=...) for {name or 'an unnamed tap'}: the hook returned shape "
            f"{np.shape(raw(new))} {raw(new).dtype}, but the cotangent it was given has "
            f"shape {np.shape(raw(g))} {raw(g).dtype}. A hook returns a cotangent like the "
            "one it receives (or None to keep it)."
        )
    return new


class TapSink:
    """The taps of one transform call: name -> (tree, per-leaf likes, cotangents)."""

    def __init__(self):
        self.trees: dict[str, Any] = {}
        self.likes: dict[str, list[Any]] = {}
        self.cts: dict[str, list[Any]] = {}

    def register(self, name: str, tree: Any, leaves: list[Any]) -> None:
        if name in self.trees:
            raise TapError(
                f"cr.tap: the name {name!r} was tapped twice in one call. Tap names are "
                "unique within a call; in a loop include the index, e.g. f'h{i}'."
            )
        self.trees[name] = tree
        self.likes[name] = [raw(x) for x in leaves]
        self.cts[name] = [None] * len(leaves)

    def arrived(self, name: str, index: int, g: Any) -> None:
        old = self.cts[name][index]
        self.cts[name][index] = g if old is None else core.add_cotangents(old, g)

    def result(self, finish: Callable[[Any, Any], Any]) -> dict[str, Any]:
        """name -> the cotangents as the tapped pytree; zeros for a tapped value the
        output does not depend on (as the perturbation trick gives)."""
        return {
            name: jax.tree_util.tree_unflatten(
                tree,
                [
                    finish(ct, like)
                    for ct, like in zip(self.cts[name], self.likes[name], strict=True)
                ],
            )
            for name, tree in self.trees.items()
        }


def tap(x: Any, name: str | None = None, *, hook: Callable[[Any], Any] | None = None) -> Any:
    """Marks an intermediate value: identity forward, its cotangent observable backward.

    Args:
      x: an array or pytree of arrays computed inside a differentiated function.
      name: the key under which `cr.value_and_grad(..., taps=True)` (or
        `cr.grad(..., taps=True)`) returns the cotangent of `x`: the gradient of
        the output with respect to `x` as used after this point.
      hook: a function applied to the cotangent of each leaf of `x` in the
        backward pass, e.g. `lambda g: jnp.clip(g, -1, 1)`; what it returns
        flows on to the values `x` was computed from (None keeps the cotangent).
        It runs whenever chainrule differentiates `x`, also without `taps=True`,
        and traces like any JAX code under `jax.jit`.

    Returns:
      `x`, unchanged in value.

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> def loss(w):
      ...     h = cr.tap(jnp.tanh(w), "h")
      ...     return jnp.sum(3.0 * h)
      >>> value, grads, taps = cr.value_and_grad(loss, taps=True)(jnp.zeros(2))
      >>> taps["h"].tolist()
      [3.0, 3.0]
    """
    if name is None and hook is None:
        raise TapError("cr.tap needs a name (to collect the cotangent) or a hook (or both).")
    if name is not None and not isinstance(name, str):
        raise TapError(f"cr.tap: the name must be a string, got {type(name).__name__}.")
    leaves, tree = jax.tree_util.tree_flatten(x)
    traces = {leaf._trace for leaf in leaves if isinstance(leaf, Tracer)}
    trace = _collecting_trace(traces)
    if trace is None:
        return x  # chainrule is not differentiating x: a tap is x itself
    sink = trace.taps if name is not None else None
    if sink is None and hook is None:
        return x
    if sink is not None:
        sink.register(name, tree, leaves)
    out = [
        _tap_leaf(leaf, trace, name, i, hook, sink)
        if isinstance(leaf, Tracer) and leaf._trace is trace
        else leaf
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(tree, out)


def _collecting_trace(traces: set[Trace]) -> Trace | None:
    """The chainrule trace a tap belongs to: the one of the tapped values, or the
    current one (a tapped constant: its cotangent is zero)."""
    if len(traces) > 1:
        raise TapError(
            "cr.tap: the tapped pytree mixes values of different nested chainrule "
            "transforms; tap each level's values inside its own transform."
        )
    if traces:
        return traces.pop()
    current = jcore.trace_ctx.trace
    return current if isinstance(current, Trace) else None


def _tap_leaf(leaf: Tracer, trace: Trace, name, index, hook, sink) -> Tracer:
    params = {"name": name, "index": index, "hook": hook, "sink": sink}
    node = Node(_TAP, (leaf.value,), params, leaf.value, (0,), (leaf.node,))
    core.announce(node)
    return trace.tracer_type(leaf.value, node, trace)


# --- NaN / Inf provenance ---------------------------------------------------------------


class FiniteCheck:
    """Watches a backward pass for the first non-finite cotangent (`check_finite=True`).

    Use: record the forward pass with `core.recording(check.record)` (the user's
    line of each node), pass `check.observe` to `core.backward`, then call
    `check.finish()` (under `jit`: emits the callback that raises when the
    program runs).
    """

    def __init__(self):
        self.where: dict[Node, str | None] = {}
        self.traced: list[tuple[dict, Any]] = []  # (static facts, traced summary)

    def record(self, node: Node, where: str | None) -> None:
        self.where[node] = where

    def observe(self, node: Node, g: Any, cts: Any) -> None:
        if cts is None or node.prim is None or node.prim.name == "projection":
            return
        values = [raw(c) for c in _flat(cts)]
        if not values:
            return
        upstream = [raw(x) for x in _flat(g)]
        if any(isinstance(v, jcore.Tracer) for v in values + upstream):
            self._observe_traced(node, upstream, values)
        else:
            report = nonfinite_report(node, self.where.get(node), g, cts)
            if report is not None:
                raise NonFiniteGradientError(report)

    def _observe_traced(self, node: Node, upstream: list[Any], values: list[Any]) -> None:
        ok_up = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in upstream]))
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))
        ans = [raw(a) for a in _flat(node.ans)]
        local = _local(node, lambda shape, dtype: jnp.ones(shape, dtype))
        stats = jnp.stack(
            [
                jnp.logical_and(ok_up, jnp.logical_not(ok)).astype(_STAT_DTYPE()),
                *_traced_stats(ans),
                *_traced_stats(upstream),
                *_traced_stats(values),
                *_traced_stats(local if local is not None else [jnp.full((), jnp.nan)]),
                sum(
                    (jnp.sum(jnp.isnan(x)) for x in _inexact_inputs(node, jnp)),
                    jnp.zeros((), jnp.int32),
                ).astype(_STAT_DTYPE()),
            ]
        )
        self.traced.append((_facts(node, self.where.get(node)), stats))

    def finish(self) -> None:
        """Under `jax.jit`/`vmap`: one callback that raises the first node's report."""
        if not self.traced:
            return
        facts = [f for f, _ in self.traced]
        stats = jnp.stack([s for _, s in self.traced])
        jax.debug.callback(functools.partial(_raise_first, facts), stats)


def nonfinite_report(node: Node, where: str | None, g: Any, cts: Any) -> str | None:
    """The provenance report if `node` (concrete values) turned a finite upstream
    cotangent `g` into non-finite cotangents `cts`, else None."""
    values = [np.asarray(raw(c)) for c in _flat(cts)]
    upstream = [np.asarray(raw(x)) for x in _flat(g)]
    if not values or not _all_finite(upstream) or _all_finite(values):
        return None
    report = _facts(node, where)
    report.update(_summaries(node, upstream, values))
    report["local"] = _local_summary(node)
    report["inputs_nan"] = int(sum(np.isnan(x).sum() for x in _inexact_inputs(node, np)))
    return _render(report)


def _inexact_inputs(node: Node, xp: Any) -> list[Any]:
    """The node's floating-point inputs (to tell a NaN it made from one it was given)."""
    values = [raw(p) for p in node.primals]
    return [v for v in values if hasattr(v, "dtype") and xp.issubdtype(v.dtype, xp.inexact)]


def _flat(x: Any) -> list[Any]:
    items = x if isinstance(x, (tuple, list)) else [x]
    return [i for i in items if i is not None and not isinstance(i, (tuple, list))] + [
        j for i in items if isinstance(i, (tuple, list)) for j in _flat(i)
    ]


def _all_finite(values: list[Any]) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(v))))
        for v in values
        if jnp.issubdtype(np.asarray(v).dtype, jnp.inexact)  # (bfloat16 too)
    )


def _facts(node: Node, where: str | None) -> dict:
    return {"prim": node.prim.name, "where": where}


_STATS = ("min", "max", "nan", "inf", "zero", "size")


def _STAT_DTYPE():  # float64 where JAX has it enabled (min/max of float64 values)
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _traced_stats(values: list[Any]) -> list[Any]:
    """min, max (of the finite elements), counts of NaN, inf and zero, and size."""
    dtype = _STAT_DTYPE()
    vals = [jnp.ravel(jnp.abs(v) if jnp.iscomplexobj(v) else v).astype(dtype) for v in values]
    v = jnp.concatenate(vals)
    finite = jnp.isfinite(v)
    return [
        jnp.min(jnp.where(finite, v, jnp.inf), initial=jnp.inf),
        jnp.max(jnp.where(finite, v, -jnp.inf), initial=-jnp.inf),
        jnp.sum(jnp.isnan(v)).astype(dtype),
        jnp.sum(jnp.isinf(v)).astype(dtype),
        jnp.sum(v == 0).astype(dtype),
        jnp.asarray(v.size, dtype),
    ]


def _host_stats(values: list[Any]) -> dict:
    arrays = [np.ravel(np.abs(v) if np.iscomplexobj(v) else np.asarray(v)) for v in values]
    v = np.concatenate(arrays).astype(np.float64) if arrays else np.zeros(0)
    finite = v[np.isfinite(v)]
    return {
        "min": finite.min() if finite.size else np.inf,
        "max": finite.max() if finite.size else -np.inf,
        "nan": int(np.isnan(v).sum()),
        "inf": int(np.isinf(v).sum()),
        "zero": int((v == 0).sum()),
        "size": int(v.size),
    }


def _summaries(node: Node, upstream: list[Any], values: list[Any]) -> dict:
    ans = [np.asarray(raw(a)) for a in _flat(node.ans)]
    return {
        "forward": _host_stats(ans),
        "upstream": _host_stats([np.asarray(u) for u in upstream]),
        "sent": _host_stats([np.asarray(v) for v in values]),
    }


def _local(node: Node, ones: Callable) -> list[Any] | None:
    """The local derivatives ∂out/∂input of an elementwise node (its rule at a
    cotangent of ones); None where the node is not elementwise."""
    if getattr(node.prim, "formulas", None) is None:
        return None
    with host.evaluating():
        one = ones(np.shape(raw(node.ans)), raw(node.ans).dtype)
        return [raw(c) for c in node.prim.vjp(one, node)]


def _local_summary(node: Node) -> dict | None:
    local = _local(node, np.ones)
    return None if local is None else _host_stats([np.asarray(v) for v in local])


def _raise_first(facts: list[dict], stats: np.ndarray) -> None:
    stats = np.asarray(stats)
    stats = stats.reshape(-1, *stats.shape[-2:])  # vmap: per-example rows
    for example in stats:
        bad = np.nonzero(example[:, 0] > 0)[0]
        if bad.size:
            i = int(bad[0])
            row = example[i, 1:]
            n = len(_STATS)
            report = dict(facts[i])
            for part, key in enumerate(("forward", "upstream", "sent", "local")):
                report[key] = dict(zip(_STATS, row[part * n : (part + 1) * n], strict=True))
            if report["local"]["nan"] == report["local"]["size"] == 1:
                report["local"] = None  # (the placeholder of a node that is not elementwise)
            report["inputs_nan"] = int(row[4 * n])
            raise NonFiniteGradientError(_render(report))


class _QuietReport(logging.Filter):
    """JAX logs every exception a debug callback raises, with its traceback, before
    re-raising it; the report raised under `jit` is the error itself, so that
    log line is dropped (other callbacks' failures are still logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, NonFiniteGradientError)


logging.getLogger("jax._src.debugging").addFilter(_QuietReport())


# --- the report ------------------------------------------------------------------------


def _describe(s: dict | None) -> str:
    if s is None:
        return "(not elementwise: see the cotangents)"
    size = int(s["size"])
    parts = []
    if s["nan"]:
        parts.append(f"{int(s['nan'])} NaN")
    if s["inf"]:
        parts.append(f"{int(s['inf'])} inf")
    bad = ", ".join(parts) + f" of {size} elements" if parts else f"all {size} finite"
    lo, hi = s["min"], s["max"]
    rng = f"finite values in [{lo:.4g}, {hi:.4g}]" if np.isfinite(lo) else "no finite values"
    zeros = f", {int(s['zero'])} exactly 0" if s["zero"] else ""
    return f"{bad}; {rng}{zeros}"


_OVERFLOW = {"exp", "exp2", "expm1", "cosh", "sinh"}


def _hint(report: dict) -> str:
    prim, up = report["prim"], report["upstream"]
    if report["forward"]["nan"] and report.get("inputs_nan"):
        return (
            "the forward value is already NaN here: the problem is earlier, in the forward "
            "pass (inputs or weights that are NaN or overflowed, e.g. after a too large "
            "learning rate); run the forward pass alone to find where it starts."
        )
    where_trap = (
        " If this value is computed inside jnp.where(cond, f(x), other), the branch "
        "not taken still sends a zero cotangent, and 0 × inf = NaN: make the input "
        "safe on that branch too (the double-where fix): x_safe = jnp.where(cond, x, 1.0); "
        "jnp.where(cond, f(x_safe), other)."
    )
    if report["forward"]["inf"] and prim not in ("log", "log1p", "div"):
        return (
            f"the forward value of {prim} is already infinite here (an overflow): scale "
            "the inputs down, lower the learning rate, or compute in a stabler form "
            "(jax.nn.logsumexp, jax.nn.log_softmax)."
        )
    if prim in ("sqrt", "rsqrt", "cbrt", "pow", "integer_pow"):
        return (
            f"{prim}'s derivative is infinite at 0 (e.g. jnp.linalg.norm or jnp.sqrt of "
            "a sum of squares at the zero vector: use jnp.sqrt(s + eps) or the double "
            "where)." + (where_trap if up["zero"] else "")
        )
    if prim in ("log", "log1p"):
        return (
            f"{prim}'s derivative is infinite where its argument is 0 (log of a "
            "probability that underflowed, e.g. jnp.log(jax.nn.softmax(x)): use "
            "jax.nn.log_softmax(x), or jnp.log(p + eps))." + (where_trap if up["zero"] else "")
        )
    if prim == "div":
        return (
            "a division by 0 (or by a value that underflowed): x / x at 0 has no "
            "derivative; guard the denominator, e.g. jnp.where(d == 0, 1.0, d)."
            + (where_trap if up["zero"] else "")
        )
    if prim in _OVERFLOW:
        return (
            f"{prim} overflowed to inf: subtract the maximum first (jax.nn.logsumexp, "
            "jax.nn.log_softmax), or clip its input."
        )
    return "a derivative overflowed or was evaluated outside its domain here."


def _render(report: dict) -> str:
    where = report["where"] or "an unknown line"
    return "\n".join(
        [
            f"the backward pass produced a non-finite cotangent at '{report['prim']}', "
            f"created at {where}.",
            f"  forward value:        {_describe(report['forward'])}",
            f"  upstream cotangent:   {_describe(report['upstream'])}",
            f"  local derivative:     {_describe(report['local'])}",
            f"  cotangent it sent on: {_describe(report['sent'])}",
            f"Likely cause: {_hint(report)}",
        ]
    )
