"""A body's `custom_vjp` calls as a transform enclosing the one that
differentiates the body sees them.

Under JAX, a transform's JVP of a `scan` body or a `cond` branch replaces each
`custom_vjp` call by the user's `fwd` and a linear call to `bwd`; a transform
enclosing it (the outer level of a Hessian, `jax.jacfwd` of `cr.grad`) then
differentiates `fwd`, and `bwd` in the backward pass, never the user's rule a
second time. chainrule's `scan` and `cond` rules compute their node's value at
the level below with the body evaluated by `open_eval` (and `checkpoint`'s
forward pass by `open_equation`): each custom_vjp call gives `fwd`'s outputs
(residuals dropped), also inside the `jit`, `scan`, `cond` and `checkpoint`
calls of the body. The node's own VJP still reads the body as written, so the
level that records it applies the user's `bwd`.

A custom_vjp call in a while loop's body or in a custom_jvp function stays a
call: reverse mode cannot go through the one, and the other's rule decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from jax._src import core as jcore  # jaxpr evaluation (JAX 0.10, pinned)
from jax._src import source_info_util
from jax._src.interpreters import ad as jax_ad
from jax._src.interpreters import partial_eval as pe
from jax._src.lax.lax import _convert_element_type
from jax._src.util import weakref_lru_cache
from jax.extend.core import primitives as jax_primitives

# Calls whose bodies `open_eval` opens.
_OPENED_CALLS = frozenset({"jit", "scan", "cond", "remat2"})


@weakref_lru_cache
def holds_custom_vjp(jaxpr: Any) -> bool:
    """Whether `jaxpr` (open) calls a `custom_vjp` function that `open_eval`
    would replace by its `fwd`: in the jaxpr itself or in the bodies of the
    `jit`, `scan`, `cond` and `checkpoint` calls it holds."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "custom_vjp_call":
            return True
        if name in _OPENED_CALLS and any(
            holds_custom_vjp(sub) for sub in jcore.jaxprs_in_params(eqn.params)
        ):
            return True
    return False


def open_eval(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """`jcore.eval_jaxpr`, except that a `custom_vjp` call gives its `fwd`'s
    outputs (without its residuals), also in the bodies of the calls it holds."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
            outs = open_equation(eqn, ins)
        env.update((v, o) for v, o in zip(eqn.outvars, outs, strict=True) if type(v) is jcore.Var)
    return [read(v) for v in jaxpr.outvars]


def open_equation(eqn: Any, ins: Sequence[Any]) -> list[Any]:
    """`eqn` applied to `ins` on the current trace, opened as `open_eval` opens."""
    outs = _open_equation(eqn, ins)
    return [typed_as(o, v.aval) for o, v in zip(outs, eqn.outvars, strict=True)]


def _open_equation(eqn: Any, ins: Sequence[Any]) -> list[Any]:
    name, p = eqn.primitive.name, eqn.params
    if name == "custom_vjp_call":
        return _fwd_outputs(p, ins)
    if name not in _OPENED_CALLS or not any(
        holds_custom_vjp(sub) for sub in jcore.jaxprs_in_params(p)
    ):
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(p))
        return list(outs) if eqn.primitive.multiple_results else [outs]
    if name == "jit":
        return open_eval(p["jaxpr"].jaxpr, p["jaxpr"].consts, *ins)
    if name == "remat2":  # (its body an open jaxpr: the constants become operands)
        closed, hoisted = opened_body(jcore.ClosedJaxpr(p["jaxpr"], ()))
        return eqn.primitive.bind(*hoisted, *ins, **dict(p, jaxpr=closed.jaxpr))
    if name == "cond":
        return cond(ins[0], ins[1:], p)
    body, hoisted = opened_body(p["jaxpr"])  # a scan
    params = dict(p, jaxpr=body, num_consts=p["num_consts"] + len(hoisted))
    return jax_primitives.scan_p.bind(*hoisted, *ins, **params)


def _fwd_outputs(params: dict[str, Any], args: Sequence[Any]) -> list[Any]:
    """The outputs a `custom_vjp` call's `fwd` computes (JAX's `lift_fwd`, every
    float argument perturbed), without its residuals.

    JAX refuses to trace `fwd` again when a `jax.vmap` or `jit` around the
    call closed it over that trace's values (`CustomVJPException`); the
    outputs are then the function's own body's, which `fwd` computes too."""
    nc = params["num_consts"]
    call = params["call_jaxpr"]
    perturbed = [inexact(a) for a in call.in_avals[nc:]]
    try:
        fwd_jaxpr, fwd_consts = params["fwd_jaxpr_thunk"].call_wrapped(*perturbed)
    except jax_ad.CustomVJPException:
        return open_eval(call.jaxpr, call.consts, *args)
    results = open_eval(fwd_jaxpr, fwd_consts, *args[nc:])
    _, res_tree, input_fwds = params["out_trees"]()
    return results[res_tree.num_leaves - sum(f is not None for f in input_fwds) :]


@weakref_lru_cache
def opened_body(body: Any) -> tuple[Any, list[Any]]:
    """A scan body (closed jaxpr) opened by `open_eval`, as `trace_body` gives it."""
    return trace_body(partial(open_eval, body.jaxpr, body.consts), body.in_avals)


def trace_body(fun: Callable, in_avals: Sequence[Any]) -> tuple[Any, list[Any]]:
    """`fun` traced on `in_avals` as a scan body: a closed jaxpr without consts,
    and the constants it needs, to be passed as the scan's leading operands."""
    closed = jax.make_jaxpr(fun)(*_structs(in_avals))
    return jcore.ClosedJaxpr(pe.convert_constvars_jaxpr(closed.jaxpr), ()), list(closed.consts)


@weakref_lru_cache
def opened_branch(branch: Any) -> Any:
    """A cond branch (closed jaxpr) opened by `open_eval`, its constants closed over."""
    fun = partial(open_eval, branch.jaxpr, branch.consts)
    return jax.make_jaxpr(fun)(*_structs(branch.in_avals))


def cond(index: Any, operands: Sequence[Any], params: dict[str, Any]) -> list[Any]:
    """`cond_p` with `params`, its branches opened where one holds a custom_vjp call."""
    return jax_primitives.cond_p.bind(index, *operands, **opened_cond_params(params))


def opened_cond_params(params: dict[str, Any]) -> dict[str, Any]:
    """A cond's parameters, its branches opened if one holds a custom_vjp call."""
    branches = params["branches"]
    if not any(holds_custom_vjp(b.jaxpr) for b in branches):
        return params
    return dict(params, branches=tuple(opened_branch(b) for b in branches))


def _structs(avals: Sequence[Any]) -> list[Any]:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]


def inexact(aval: Any) -> bool:
    return bool(jax.dtypes.issubdtype(aval.dtype, np.inexact))


def typed_as(x: Any, aval: Any) -> Any:
    """`x` with exactly `aval`'s dtype and weak type (a call's output, a scan's
    carry, must keep its type)."""
    got = jcore.typeof(x)
    if got.dtype == aval.dtype and got.weak_type == aval.weak_type:
        return x
    return _convert_element_type(x, aval.dtype, aval.weak_type)
