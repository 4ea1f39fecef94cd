"""The jaxpr replay front end: run any JAX function through chainrule's rules.

`jax.make_jaxpr` turns a function written with `jax.numpy`, `jax.nn` or `lax`
into a list of primitive equations. `eval_jaxpr` walks that list: equations
whose inputs are untraced run through JAX unchanged; equations that touch a
`Tracer` go through chainrule's primitive table (`rules.PRIMITIVES`) and are
recorded on the tape.

Call-like equations are interpreted here:

* `jit` / `pjit` / `closed_call` / `remat`: their body is replayed inline.
* `custom_jvp_call` (`jax.nn.relu`, `softplus`, ... and users' own): the
  function's custom JVP rule is honoured. Its JVP jaxpr is linear in the
  tangents, so reverse-differentiating it in the tangents with chainrule's own
  engine gives the VJP (the transpose of that linear map).
* `custom_vjp_call`: the user's `fwd` computes the output and residuals; the
  user's `bwd` is the rule.

None of this calls JAX's differentiation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax._src import ad_util, source_info_util
from jax.extend import core as jcore

from chainrule.engine import core, host, rules
from chainrule.engine.core import Primitive, Tracer, raw
from chainrule.errors import NoVJPRuleError, UnrecordableJaxCallError

_CALLS = ("jit", "pjit", "closed_call", "core_call")
_REMATS = ("remat", "checkpoint", "remat2")
# Call-like equations evaluated inline when untraced on host values: the body's parameter.
_INLINE_ON_HOST = {
    **dict.fromkeys(_CALLS, "jaxpr"),
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}


def _read_literal(v: Any) -> Any:
    aval = getattr(v, "aval", None)
    if aval is not None and hasattr(aval, "dtype"):
        return np.asarray(v.val, dtype=aval.dtype)
    return v.val


def eval_jaxpr(jaxpr: jcore.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluates `jaxpr`, recording every equation that touches a Tracer."""
    env: dict[Any, Any] = {}

    def read(v):
        return _read_literal(v) if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, Tracer) for x in invals):
            if core.is_recording():
                core.set_source(where(eqn))
            try:
                outvals = _apply_traced(eqn, invals)
            finally:
                if core.is_recording():
                    core.set_source(None)
        else:
            outvals = _eval_untraced(eqn.primitive, eqn.params, invals)
        for v, x in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eval_untraced(primitive: Any, params: dict[str, Any], invals: list[Any]) -> list[Any]:
    """An equation with no Tracer among its inputs: with NumPy when its inputs
    are host values (the NumPy column of chainrule's table, as in `core.evaluate`),
    else with JAX as the jaxpr says."""
    name = primitive.name
    if name in _INLINE_ON_HOST and host.host_operands(tuple(invals)) is not None:
        # inline, no XLA dispatch (custom rules matter only to differentiation)
        return eval_closed(params[_INLINE_ON_HOST[name]], *invals)
    prim = rules.PRIMITIVES.get(name)
    if prim is not None and prim.host_impl is not None:
        operands = host.host_operands(tuple(invals))
        if operands is not None:
            out = prim.host_impl(*operands, **{k: params[k] for k in prim.params if k in params})
            if out is not NotImplemented:
                return list(out) if prim.multiple_results else [out]
    out = primitive.bind(*invals, **primitive.get_bind_params(params))
    return out if primitive.multiple_results else [out]


def eval_closed(closed: jcore.ClosedJaxpr, *args: Any) -> list[Any]:
    return eval_jaxpr(closed.jaxpr, closed.consts, *args)


def where(eqn: jcore.JaxprEqn) -> str:
    """The user's source line that emitted `eqn`, as JAX records it.

    Equations emitted by chainrule's own helpers (e.g. `x.at[i].set(v)` on a
    Tracer) are attributed to the user's line that called the helper.
    """
    try:
        summary = source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - best effort only
        summary = "unknown location"
    if "chainrule/engine/" in summary.replace("\\", "/"):
        return core.user_frame() or summary
    if not summary.strip():  # inside a library's jit body (e.g. jnp.sort): its call site
        return core.enclosing_call_site() or "unknown location"
    return summary


def _apply_traced(eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
    return _apply(eqn.primitive.name, eqn.params, invals, lambda: where(eqn))


def apply_primitive(
    primitive: Any, params: dict[str, Any], invals: list[Any], where_fn: Callable[[], str]
) -> list[Any]:
    """Applies a JAX primitive with `params` to `invals` (some may be Tracers),
    as the equation of a jaxpr would be: recorded through chainrule's rules if
    a Tracer is among the inputs, else evaluated. `where_fn()` names the
    user's source line for error messages."""
    if any(isinstance(x, Tracer) for x in invals):
        return _apply(primitive.name, params, invals, where_fn)
    return _eval_untraced(primitive, params, invals)


def _apply(name: str, params: dict[str, Any], invals: list[Any], where_fn) -> list[Any]:
    if name in _CALLS:
        with core.call_site(where_fn()):
            return eval_closed(params["jaxpr"], *invals)
    if name in _REMATS:
        body = params["jaxpr"]
        if isinstance(body, jcore.ClosedJaxpr):
            return eval_closed(body, *invals)
        return eval_jaxpr(body, (), *invals)
    if name == "custom_jvp_call":
        return custom_jvp_call_p.bind(*invals, **params)
    if name == "cond":
        index, *operands = invals
        if not isinstance(raw(index), jax.core.Tracer):  # known now: replay that branch
            branch = params["branches"][
                int(np.clip(int(raw(index)), 0, len(params["branches"]) - 1))
            ]
            return eval_closed(branch, *operands)
        return cond_p.bind(*invals, **params)
    if name == "custom_vjp_call":  # outputs, then residuals (kept for the rule)
        return custom_vjp_call_p.bind(*invals, **params)[: len(params["call_jaxpr"].out_avals)]
    prim = rules.PRIMITIVES.get(name)
    if prim is None:
        raise NoVJPRuleError(name, where_fn())
    out = prim.bind(*invals, **{k: params[k] for k in prim.params if k in params})
    return list(out) if prim.multiple_results else [out]


# --- custom_jvp_call ----------------------------------------------------------


def _jvp_rule_vjp(g: Any, node: core.Node) -> list[Any]:
    """VJP of a custom_jvp function, from its JVP rule.

    The rule maps tangents to output tangents linearly (for fixed primals), so
    the VJP of that map, taken by chainrule at tangents = 0, is its transpose.
    """
    params = node.params
    n_consts = params["num_consts"]
    primals = node.primals[n_consts:]
    if any(i < n_consts for i in node.argnums):
        raise UnrecordableJaxCallError(
            "a jax.custom_jvp function closes over a value that chainrule is differentiating; "
            "pass that value to the function as an argument instead."
        )
    jvp_jaxpr, jvp_consts, out_zeros = params["jvp_jaxpr_fun"].call_wrapped(
        *([False] * len(primals))
    )
    outs = node.ans
    cts = list(g) if isinstance(g, tuple) else [g]
    n_out = len(outs) if isinstance(outs, (list, tuple)) else 1

    def tangent_map(*tangents):
        results = eval_jaxpr(jvp_jaxpr, jvp_consts, *primals, *tangents)
        return results[n_out:]

    tangents = [rules.zeros_like(p) for p in primals]
    from chainrule.engine.transforms import vjp_flat

    nonzero_cts = [ct for ct, z in zip(cts, out_zeros, strict=True) if not z]
    nonzero_cts = [
        rules.zeros_like(o) if ct is None else ct
        for ct, o in zip(nonzero_cts, _nonzero_outs(outs, out_zeros), strict=True)
    ]
    tangent_cts = vjp_flat(tangent_map, tangents, nonzero_cts)
    return [tangent_cts[i - n_consts] for i in node.argnums]


def _nonzero_outs(outs: Any, out_zeros: Sequence[bool]) -> list[Any]:
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    return [o for o, z in zip(outs, out_zeros, strict=True) if not z]


class _CustomJVPCall(Primitive):
    def vjp(self, g, node):
        return _jvp_rule_vjp(g, node)


def _custom_jvp_call_impl(*args: Any, **params: Any) -> list[Any]:
    """Untraced, as an untraced equation: its body inline on host values, else
    JAX runs the function (and applies its rule if JAX differentiates)."""
    return _eval_untraced(jcore.primitives.custom_jvp_call_p, params, list(args))


custom_jvp_call_p = _CustomJVPCall("custom_jvp_call", _custom_jvp_call_impl, multiple_results=True)


# --- custom_vjp_call ------------------------------------------------------------


def _custom_vjp_forward(*args: Any, **params: Any) -> list[Any]:
    """Runs the user's fwd; returns the outputs followed by the residuals."""
    n_consts = params["num_consts"]
    primals = args[n_consts:]
    fwd_jaxpr, fwd_consts = params["fwd_jaxpr_thunk"].call_wrapped(*([True] * len(primals)))
    results = eval_jaxpr(fwd_jaxpr, fwd_consts, *primals)
    out_tree, res_tree, input_fwds = params["out_trees"]()
    n_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
    res_out, outs = results[:n_res_out], results[n_res_out:]
    res_out = iter(res_out)
    residuals = [args[f] if f is not None else next(res_out) for f in input_fwds]
    return [*outs, *residuals]


class _CustomVJPCall(Primitive):
    """Output = the user's fwd; VJP = the user's bwd on the saved residuals."""

    def vjp(self, g, node):
        params = node.params
        n_consts = params["num_consts"]
        if any(i < n_consts for i in node.argnums):
            raise UnrecordableJaxCallError(
                "a jax.custom_vjp function closes over a value that chainrule is "
                "differentiating; pass that value to the function as an argument instead."
            )
        n_out = len(params["call_jaxpr"].out_avals)
        full = node.ans  # outputs, then residuals
        outs, residuals = full[:n_out], full[n_out:]
        cts = list(g[:n_out]) if isinstance(g, tuple) else [g]
        cts = [rules.zeros_like(o) if ct is None else ct for ct, o in zip(cts, outs, strict=True)]
        bwd = params["bwd"]
        cts_in = call_jax_function(lambda *a: bwd.call_wrapped(*a), *residuals, *cts)
        cts_in = [
            rules.zeros_like(p) if isinstance(ct, ad_util.Zero) or ct is None else ct
            for ct, p in zip(cts_in, node.primals[n_consts:], strict=True)
        ]
        return [cts_in[i - n_consts] for i in node.argnums]


custom_vjp_call_p = _CustomVJPCall("custom_vjp_call", _custom_vjp_forward, multiple_results=True)


# --- cond with a predicate known only at run time (under jit or vmap) ---------


def _cond_impl(index: Any, *operands: Any, **params: Any) -> list[Any]:
    prim = jcore.primitives.cond_p
    return prim.bind(index, *operands, **prim.get_bind_params(params))


class _Cond(Primitive):
    """VJP of `lax.cond`: a `lax.switch` over the branches' VJPs.

    Each branch's VJP is taken by chainrule itself, re-running the branch's
    forward pass inside the backward branch (rematerialisation), so no
    residuals cross the cond.
    """

    def vjp(self, g, node):
        index, *operands = node.primals
        branches = node.params["branches"]
        cts = list(g) if isinstance(g, tuple) else [g]
        outs = node.ans
        cts = [rules.zeros_like(o) if ct is None else ct for ct, o in zip(cts, outs, strict=True)]
        diff = [i for i, o in enumerate(operands) if core.is_differentiable(raw(o))]
        from chainrule.engine.transforms import vjp_flat

        def branch_vjp(branch):
            def run(*args):
                ops, out_cts = list(args[: len(operands)]), args[len(operands) :]

                def forward(*diff_ops):
                    full = list(ops)
                    for i, x in zip(diff, diff_ops, strict=True):
                        full[i] = x
                    return eval_closed(branch, *full)

                return vjp_flat(forward, [ops[i] for i in diff], list(out_cts))

            return run

        def switch(idx, *args):
            return jax.lax.switch(idx, [branch_vjp(b) for b in branches], *args)

        op_cts = call_jax_function(switch, index, *operands, *cts)
        by_operand = dict(zip(diff, op_cts, strict=True))
        return [by_operand[i - 1] for i in node.argnums]


cond_p = _Cond("cond", _cond_impl, multiple_results=True)


# --- replaying arbitrary JAX functions ------------------------------------------


def call_jax_function(fun: Callable, *args: Any) -> list[Any]:
    """Calls a JAX function on values that may be Tracers, recording it by replay.

    `fun` takes and returns flat lists of arrays. Without Tracers it simply runs.
    """
    if not any(isinstance(a, Tracer) for a in args):
        return list(fun(*args))
    closed = jax.make_jaxpr(fun)(*(raw(a) for a in args))
    return eval_closed(closed, *args)


def replay(fun: Callable, args: Sequence[Any], level: int) -> tuple[list[Any], Any]:
    """Captures `fun(*args)` as a jaxpr and replays it on `args` (some Tracers).

    Returns the flat outputs and their pytree structure.
    """
    out_tree: list[Any] = []

    def flat_fun(*flat_args):
        out = fun(*flat_args)
        leaves, tree = jax.tree_util.tree_flatten(out)
        out_tree.append(tree)
        return leaves

    with core.capturing(level):
        closed = jax.make_jaxpr(flat_fun)(*(raw(a) for a in args))
    return eval_closed(closed, *args), out_tree[0]
