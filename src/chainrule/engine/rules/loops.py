"""Loops: `scan` (and what JAX builds on it) and `while`.

* `scan` (`lax.scan`, `lax.fori_loop` with static bounds, `lax.map`,
  `jnp.searchsorted`, `jnp.interp`, `jnp.polyval`, ...): one node. Its
  forward pass is the same scan, whose body also outputs the carry each step
  starts from, stacked: those carries are the residuals. Its VJP is a scan in
  the opposite direction whose step is chainrule's VJP of the body
  (`core.vjp_flat`) at the saved carry; it carries the carries' cotangents and
  the running sum of the loop constants' cotangents, and outputs the cotangent
  of each `xs` slice. The body's forward is recomputed inside each backward
  step (as `jax.checkpoint` would), so memory is one carry per step and the
  compiled program does not grow with the length. The backward pass is a scan
  of JAX values: a transform enclosing this one records it with this same
  rule (second order). Only the operands this transform differentiates (and
  the carries they reach) are differentiated in it: a while loop in the body
  that reads only the others is a constant there, as under `jax.grad`.
* `while` (`lax.while_loop`, `fori_loop` with traced bounds): evaluated as is
  when no differentiated value reaches its carry (a counter, a tolerance in
  the condition, a value reaching it only through `floor` or a comparison,
  whose derivative is zero). A carry that depends on a differentiated value
  is traced; differentiating it raises JAX's `ValueError` for reverse mode
  through a while loop, naming the user's line: reverse mode needs the number
  of steps known, as `lax.scan` and `fori_loop` with static bounds have it.

None of this calls JAX's differentiation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from jax import lax
from jax._src import core as jcore  # jaxpr evaluation and tracing (JAX 0.10, pinned)
from jax._src.util import weakref_lru_cache
from jax.extend.core import primitives as jax_primitives

from chainrule.engine import core
from chainrule.engine.core import Primitive, Tracer, raw, vjp_flat, zeros_like
from chainrule.engine.rules.calls import _cotangents, _depends
from chainrule.engine.rules.forward_only import (
    jvp_at,
    needs_forward,
    register_forward_only,
    transposed_jvp,
)
from chainrule.engine.rules.opening import holds_custom_vjp, opened_body
from chainrule.engine.rules.opening import inexact as _inexact
from chainrule.engine.rules.opening import trace_body as _trace_body
from chainrule.engine.rules.opening import typed_as as _as
from chainrule.engine.rules.registry import PRIMITIVES

scan_p = jax_primitives.scan_p
while_p = jax_primitives.while_p


# --- scan ------------------------------------------------------------------------------

# Parameters older JAX versions emit that do not change a scan's value: `linear`
# marks operands for JAX's own transpose, `_split_transpose` says how JAX splits
# its own transpose. chainrule's rule needs neither.
_SCAN_HINTS = ("linear", "_split_transpose")


@weakref_lru_cache
def _with_residuals(body: Any, num_consts: int, num_carry: int) -> tuple[Any, list[Any]]:
    """The body, also returning the carry it started from (one more `ys` per carry)."""

    def step(*args):
        carry = args[num_consts : num_consts + num_carry]
        return [*jcore.eval_jaxpr(body.jaxpr, body.consts, *args), *carry]

    return _trace_body(step, body.in_avals)


def _scan_impl(*args, reverse, length, jaxpr, num_consts, num_carry, unroll):
    """The scan's outputs, then the carry each step started from, stacked.

    A node computes them with its body's custom_vjp calls replaced by their
    `fwd` (`rules.opening`): a JAX transform below this one (`jax.jacfwd` of
    `cr.grad`) then differentiates `fwd`, as after JAX's own inner JVP."""
    if holds_custom_vjp(jaxpr.jaxpr):
        jaxpr, hoisted = opened_body(jaxpr)
        args, num_consts = (*hoisted, *args), num_consts + len(hoisted)
    step, consts = _with_residuals(jaxpr, num_consts, num_carry)
    return scan_p.bind(
        *consts,
        *args,
        reverse=reverse,
        length=length,
        jaxpr=step,
        num_consts=len(consts) + num_consts,
        num_carry=num_carry,
        unroll=unroll,
    )


class _Layout:
    """Which operands and outputs of a scan body carry cotangents.

    Positions index the body's inputs (consts, carry, xs) and outputs (carry, ys).
    """

    def __init__(
        self,
        body: Any,
        num_consts: int,
        num_carry: int,
        wanted: tuple | None = None,
        used_ys: tuple | None = None,
    ):
        ins, outs = body.in_avals, body.out_avals
        nc, nk = num_consts, num_carry
        self.num_consts, self.num_carry, self.num_xs = nc, nk, len(ins) - nc - nk
        # `wanted`: the operands differentiated (a node's argnums; None: every
        # float), and the carries that depend on them after any number of steps.
        # The others are constants here: a while loop reading only them is not
        # differentiated, as JAX leaves what has no tangent.
        flags = [_inexact(a) and (wanted is None or i in wanted) for i, a in enumerate(ins)]
        carried = (
            _traced_carries(body, nc, flags, nk) if wanted is not None else flags[nc : nc + nk]
        )
        self.consts = [i for i in range(nc) if flags[i]]
        self.carry = [i for i in range(nc, nc + nk) if _inexact(ins[i]) and carried[i - nc]]
        self.xs = [i for i in range(nc + nk, len(ins)) if flags[i]]
        # `used_ys`: the ys a cotangent reaches (None: every float one); the
        # others are not differentiated (a while loop computing only them either)
        self.ys = [
            j
            for j in range(nk, len(outs))
            if _inexact(outs[j]) and (used_ys is None or j in used_ys)
        ]


@weakref_lru_cache
def _backward_body(
    body: Any,
    num_consts: int,
    num_carry: int,
    residual_cts: bool,
    wanted: tuple | None = None,
    used_ys: tuple | None = None,
) -> tuple[Any, list[Any]]:
    """One step of the backward scan.

    Operands: the body's consts (constants of the backward scan); carried, the
    cotangents of the differentiable carries and the sums of the consts'
    cotangents; per step, the body's xs, the carry the forward step started
    from, the cotangents of the differentiable ys and, with `residual_cts`,
    those of the saved carries (the residuals are outputs too: a transform
    enclosing this one differentiates the backward pass through them).
    Outputs: the carried values one step back, and the cotangents of the
    differentiable xs.
    """
    at = _Layout(body, num_consts, num_carry, wanted, used_ys)
    nc, nk, nx = at.num_consts, at.num_carry, at.num_xs
    diff = [*at.consts, *at.carry, *at.xs]
    ins, outs = body.in_avals, body.out_avals

    def step(*args):
        consts, args = args[:nc], args[nc:]
        ct_carry, args = args[: len(at.carry)], args[len(at.carry) :]
        sums, args = args[: len(at.consts)], args[len(at.consts) :]
        xs, carry, args = args[:nx], args[nx : nx + nk], args[nx + nk :]
        ct_ys, ct_saved = args[: len(at.ys)], args[len(at.ys) :]
        primals = [*consts, *carry, *xs]

        def forward(*diff_primals):
            full = list(primals)
            for i, x in zip(diff, diff_primals, strict=True):
                full[i] = x
            results = jcore.eval_jaxpr(body.jaxpr, body.consts, *full)
            return [results[i - nc] for i in at.carry] + [results[j] for j in at.ys]

        cts = vjp_flat(forward, [primals[i] for i in diff], [*ct_carry, *ct_ys])
        ct_consts = cts[: len(at.consts)]
        ct_carry = cts[len(at.consts) : len(at.consts) + len(at.carry)]
        ct_xs = cts[len(at.consts) + len(at.carry) :]
        if residual_cts:
            ct_carry = [lax.add(a, b) for a, b in zip(ct_carry, ct_saved, strict=True)]
        return [
            *(_as(ct, ins[i]) for ct, i in zip(ct_carry, at.carry, strict=True)),
            *(
                _as(lax.add(total, ct), ins[i])
                for total, ct, i in zip(sums, ct_consts, at.consts, strict=True)
            ),
            *(_as(ct, ins[i]) for ct, i in zip(ct_xs, at.xs, strict=True)),
        ]

    step_avals = [
        *ins[:nc],
        *(ins[i] for i in at.carry),
        *(ins[i] for i in at.consts),
        *ins[nc + nk :],
        *ins[nc : nc + nk],
        *(outs[j] for j in at.ys),
        *((ins[i] for i in at.carry) if residual_cts else ()),
    ]
    return _trace_body(step, step_avals)


class _Scan(Primitive):
    """`lax.scan`: one node; its VJP is a reverse scan over VJPs of the body."""

    def value_below(self, primals, params):
        """The scan's value for the transform enclosing this one, which records
        it too: its body's custom_vjp calls are `fwd` there (`rules.opening`)."""
        body = params["jaxpr"]
        if not holds_custom_vjp(body.jaxpr):
            return core.bind(self, *primals, **params)
        opened, hoisted = opened_body(body)
        params = dict(params, jaxpr=opened, num_consts=params["num_consts"] + len(hoisted))
        return core.bind(self, *hoisted, *primals, **params)

    def apply(self, trace, args, params):
        params = self.taken(params)
        body, nc, nk = params["jaxpr"], params["num_consts"], params["num_carry"]
        n_out = len(body.out_avals)
        outs = list(core.bind(self, *args, **params))[:n_out]  # residuals stay in the node
        # the carries and ys no differentiated value reaches (JAX's symbolic
        # zeros: through `stop_gradient`, a comparison) are not traced, so no
        # rule is asked for a tangent of them (see `calls._depends`)
        flags = [isinstance(a, Tracer) and a._trace is trace for a in args]
        carried = _traced_carries(body, nc, flags, nk)
        ys = _depends(body.jaxpr, tuple(flags[:nc] + carried + flags[nc + nk :]))[nk:]
        live = [*carried, *ys]
        return [
            o if keep or not (isinstance(o, Tracer) and o._trace is trace) else o.value
            for o, keep in zip(outs, live, strict=True)
        ]

    def vjp(self, g, node):
        p = node.params
        body, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
        g = g if isinstance(g, tuple) else (g,)
        if core.backward_at_zero() and (needs_forward(body) or holds_custom_vjp(body.jaxpr)):
            # forward mode through a body holding a while loop: the scan's JVP
            # (a custom_vjp function in it refuses forward mode there, as in JAX;
            # one that a transform inside this one differentiated is its `fwd`
            # here, `value_below`)
            jvp = lambda primals, tangents: _scan_jvp(primals, tangents, p)  # noqa: E731
            return transposed_jvp(list(g), node.primals, node.argnums, jvp)
        wanted = tuple(sorted(node.argnums))
        n_out = len(body.out_avals)
        used_ys = tuple(j for j in range(nk, n_out) if g[j] is not None)
        at = _Layout(body, nc, nk, wanted, used_ys)
        cts = _cotangents(g[:n_out], node.ans[:n_out])
        residual_carries = node.ans[n_out:]
        # At second order the saved carries are outputs with cotangents of their own.
        ct_saved = [g[n_out + i - nc] for i in at.carry]
        residual_cts = any(ct is not None for ct in ct_saved)
        if residual_cts:
            ct_saved = _cotangents(tuple(ct_saved), [residual_carries[i - nc] for i in at.carry])
        else:
            ct_saved = []
        consts, xs = node.primals[:nc], node.primals[nc + nk :]
        step, step_consts = _backward_body(body, nc, nk, residual_cts, wanted, used_ys)
        results = scan_p.bind(
            *step_consts,
            *consts,
            *(cts[i - nc] for i in at.carry),
            *(zeros_like(node.primals[i]) for i in at.consts),
            *xs,
            *residual_carries,
            *(cts[j] for j in at.ys),
            *ct_saved,
            reverse=not p["reverse"],
            length=p["length"],
            jaxpr=step,
            num_consts=len(step_consts) + nc,
            num_carry=len(at.carry) + len(at.consts),
            unroll=p["unroll"],
        )
        by_operand = dict(zip([*at.carry, *at.consts, *at.xs], results, strict=True))
        return [by_operand[i] for i in node.argnums]


def _scan_jvp(primals: Sequence[Any], tangents: Sequence[Any], params: dict) -> list[Any]:
    """The tangents of a scan's outputs (its carries, its ys, then the stacked
    carries each step started from; None for a non-float one): a scan in the
    same direction carrying each float carry's tangent beside it, a step's
    tangents the JVP of the body (`core.jvp_flat`, chainrule's own rules).
    `tangents` has one entry per operand, None where it is zero."""
    body, nc, nk = params["jaxpr"], params["num_consts"], params["num_carry"]
    at = _Layout(body, nc, nk, tuple(i for i, t in enumerate(tangents) if t is not None))
    ins, outs = body.in_avals, body.out_avals
    consts, init, xs = primals[:nc], primals[nc : nc + nk], primals[nc + nk :]

    def tangent(i: int) -> Any:
        return tangents[i] if tangents[i] is not None else zeros_like(primals[i])

    diff = [*at.consts, *at.carry, *at.xs]
    const_ts = [tangent(i) for i in at.consts]

    def step(state, slices):
        carry, carry_ts = state
        x, x_ts = slices
        full = [*consts, *carry, *x]
        evaluate = partial(jcore.eval_jaxpr, body.jaxpr, body.consts)
        out, out_ts = jvp_at(evaluate, full, diff, [*const_ts, *carry_ts, *x_ts])
        new = [_as(o, ins[nc + k]) for k, o in enumerate(out[:nk])]
        new_ts = [_as(out_ts[i - nc], ins[i]) for i in at.carry]
        ys_ts = [_as(out_ts[j], outs[j]) for j in at.ys]
        return (new, new_ts), (ys_ts, list(carry_ts))

    init = [_as(c, ins[nc + k]) for k, c in enumerate(init)]
    init_ts = [_as(tangent(i), ins[i]) for i in at.carry]
    xs_ts = [tangent(i) for i in at.xs]
    (_, final_ts), (ys_ts, started_ts) = lax.scan(
        step,
        (init, init_ts),
        (list(xs), xs_ts),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    by_carry = dict(zip(at.carry, final_ts, strict=True))
    by_ys = dict(zip(at.ys, ys_ts, strict=True))
    by_start = dict(zip(at.carry, started_ts, strict=True))
    return [
        *(by_carry.get(nc + k) for k in range(nk)),
        *(by_ys.get(j) for j in range(nk, len(outs))),
        *(by_start.get(nc + k) for k in range(nk)),
    ]


PRIMITIVES["scan"] = _Scan(
    "scan",
    _scan_impl,
    ("reverse", "length", "jaxpr", "num_consts", "num_carry", "unroll"),
    multiple_results=True,
    implied_params=_SCAN_HINTS,
)


# --- while -----------------------------------------------------------------------------


def _traced_carries(
    body: Any, body_nconsts: int, flags: Sequence[bool], num_carry: int | None = None
) -> list[bool]:
    """The carries that depend on the flagged body inputs (consts, initial
    carries and, for a scan, xs; `num_carry` carries, by default all inputs
    after the consts) after any number of steps: a fixed point of one step's
    dependence."""
    nk = len(flags) - body_nconsts if num_carry is None else num_carry
    consts, rest = list(flags[:body_nconsts]), list(flags[body_nconsts + nk :])
    carry = list(flags[body_nconsts : body_nconsts + nk])
    while True:
        step = _depends(body.jaxpr, tuple(consts + carry + rest))[:nk]
        grown = [a or b for a, b in zip(carry, step, strict=True)]
        if grown == carry:
            return carry
        carry = grown


def _while_impl(*args, where, **params):
    return while_p.bind(*args, **params)


class _While(Primitive):
    """`lax.while_loop`. A carry that depends on a differentiated value makes
    one node. Reverse mode cannot go through it (JAX's error); forward mode
    can: in its backward pass at zero the node's VJP is
    `forward_only.transposed_jvp`, whose transpose runs the loop forward with
    its tangents (`_while_jvp`)."""

    def apply(self, trace, args, params):
        params = self.taken(params)
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        owned = [
            isinstance(a, Tracer) and a._trace is trace and core.is_differentiable(raw(a))
            for a in args
        ]
        traced = _traced_carries(params["body_jaxpr"], n_body, owned[n_cond:])
        if not any(traced):  # the loop's results do not depend on what we differentiate
            values = [a.value if isinstance(a, Tracer) and a._trace is trace else a for a in args]
            with jcore.set_current_trace(trace.parent):
                return list(while_p.bind(*values, **params))
        outs = core.bind(self, *args, where=core.user_frame(), **params)
        return [
            o if keep or not (isinstance(o, Tracer) and o._trace is trace) else o.value
            for o, keep in zip(outs, traced, strict=True)
        ]

    def vjp(self, g, node):
        if not core.backward_at_zero():
            raise ValueError(
                "Reverse-mode differentiation does not work for lax.while_loop or "
                "lax.fori_loop with dynamic start/stop values: the loop at "
                f"{node.params['where'] or '(unknown line)'} carries a value that depends "
                "on a differentiated input. Use lax.scan, or lax.fori_loop with static "
                "(Python int) start/stop values, which chainrule differentiates; forward "
                "mode (cr.jvp, cr.linearize, cr.jacfwd) goes through while loops, as "
                "jax.jvp does."
            )
        cts = list(g) if isinstance(g, tuple) else [g]
        params = node.params
        jvp = lambda primals, tangents: _while_jvp(primals, tangents, params)  # noqa: E731
        return transposed_jvp(cts, node.primals, node.argnums, jvp)


def _while_jvp(primals: Sequence[Any], tangents: Sequence[Any], params: dict) -> list[Any]:
    """The tangents of a while loop's outputs (None for a non-float carry): the
    loop run again, carrying each float carry's tangent beside it, one step's
    tangent the JVP of the body (`core.jvp_flat`, chainrule's own rules).
    `tangents` has one entry per operand, None where it is zero."""
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond, body = params["cond_jaxpr"], params["body_jaxpr"]
    cond_consts = primals[:n_cond]
    consts, init = primals[n_cond : n_cond + n_body], primals[n_cond + n_body :]
    const_floats = [_inexact(v.aval) for v in body.jaxpr.invars[:n_body]]
    carry_avals = [v.aval for v in body.jaxpr.invars[n_body:]]
    carry_floats = [_inexact(a) for a in carry_avals]
    const_ts = [
        t if t is not None else zeros_like(c)
        for c, t, f in zip(consts, tangents[n_cond : n_cond + n_body], const_floats, strict=True)
        if f
    ]
    init_tangents = tangents[n_cond + n_body :]
    init_ts = [
        _as(t if t is not None else zeros_like(c), a)
        for c, t, a, f in zip(init, init_tangents, carry_avals, carry_floats, strict=True)
        if f
    ]

    # A loop `vmap` batched may have one predicate per lane: it runs while any
    # lane's holds, and a step updates only the lanes whose predicate holds at
    # its start (XLA's lowering of such a loop), tangents as values.
    per_lane = bool(cond.jaxpr.outvars[0].aval.ndim)

    def predicate(carry):
        return jcore.eval_jaxpr(cond.jaxpr, cond.consts, *cond_consts, *carry)[0]

    def cond_fn(state):
        pred = predicate(state[0])
        return jax.numpy.any(pred) if per_lane else pred

    def body_fn(state):
        carry, carry_ts = state
        if per_lane:
            new, new_ts = step_fn(carry, carry_ts)
            pred = predicate(carry)
            old_ts = iter(carry_ts)
            return (
                [_lanes(pred, n, o) for n, o in zip(new, carry, strict=True)],
                [_lanes(pred, n, next(old_ts)) for n in new_ts],
            )
        return step_fn(carry, carry_ts)

    def step_fn(carry, carry_ts):

        def step(*floats):
            it = iter(floats)
            b = [next(it) if f else c for c, f in zip(consts, const_floats, strict=True)]
            k = [next(it) if f else c for c, f in zip(carry, carry_floats, strict=True)]
            return jcore.eval_jaxpr(body.jaxpr, body.consts, *b, *k)

        floats = [c for c, f in zip(consts, const_floats, strict=True) if f]
        floats += [c for c, f in zip(carry, carry_floats, strict=True) if f]
        outs, out_ts = core.jvp_flat(step, floats, [*const_ts, *carry_ts])
        new_ts = [_as(t, a) for t, a, f in zip(out_ts, carry_avals, carry_floats, strict=True) if f]
        return [_as(o, a) for o, a in zip(outs, carry_avals, strict=True)], new_ts

    init = [_as(c, a) for c, a in zip(init, carry_avals, strict=True)]
    _, out_ts = lax.while_loop(cond_fn, body_fn, (init, init_ts))
    it = iter(out_ts)
    return [next(it) if f else None for f in carry_floats]


def _lanes(pred: Any, new: Any, old: Any) -> Any:
    """`new` where the per-lane predicate holds (its axes leading), else `old`."""
    shape = np.shape(new)
    return lax.select(lax.broadcast_in_dim(pred, shape, tuple(range(np.ndim(pred)))), new, old)


PRIMITIVES["while"] = _While(
    "while",
    _while_impl,
    ("cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts"),
    multiple_results=True,
)
register_forward_only("while")
