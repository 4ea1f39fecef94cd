"""`jax.checkpoint` (`remat2`): trade compute for memory by recomputing the body
in the backward pass.

A checkpointed call is one node. Its forward pass evaluates the body and keeps
only its inputs and the few intermediates the policy saves; its VJP runs the
body again, on a fresh chainrule trace (`core.vjp_flat`), and takes the VJP of
that recomputation. So under `jax.jit` the compiled gradient holds the
residuals of one block at a time, as `jax.grad`'s does.

* `policy` (`jax.checkpoint_policies.*`, or any `policy(prim, *avals, **params)`):
  asked once per equation of the body, as JAX asks it. The outputs of
  equations it saves (`True`, `Saveable`, and `Offloadable`, which is kept in
  place rather than offloaded) are kept from the forward pass; in the
  recomputation their value is reused and only their VJP runs (a `_Reused`
  node), for equations with an ordinary rule; calls (`jit`, `cond`, ...)
  whose outputs the policy saves are recomputed. The default (`None`) saves
  nothing.
* Effects in the body: `jax.debug.print` / `jax.debug.callback` run again in
  the recomputation, as under `jax.grad` (it prints twice); other effects
  (`io_callback`, which `jax.grad` refuses inside a checkpoint) run once, in
  the forward pass, and the recomputation reuses their outputs.
* `prevent_cse`: the recomputation starts from values passed through
  `lax.optimization_barrier` together with the output cotangents (what JAX's
  lowering of a differentiated `remat2` does), so XLA can neither merge it
  with the forward pass nor schedule it before the backward pass reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax._src import ad_checkpoint
from jax._src import core as jcore  # Jaxpr equations and Literals (JAX 0.10, pinned)
from jax._src.interpreters import partial_eval as pe  # the policy's answer types only

from chainrule.engine import core
from chainrule.engine.core import Node, Primitive, raw, vjp_flat
from chainrule.engine.rules.calls import _cotangents, eval_body, literal_output
from chainrule.engine.rules.effects import optimization_barrier
from chainrule.engine.rules.forward_only import jvp_at, needs_forward, transposed_jvp
from chainrule.engine.rules.opening import holds_custom_vjp, open_equation
from chainrule.engine.rules.registry import PRIMITIVES, defvjp, primitive

# Debug effects run again in the recomputation, as in JAX (a `jax.debug.print` in a
# checkpointed function prints in the forward pass and again in the backward pass).
_RERUN_EFFECTS = frozenset({"debug_print", "debug_callback"})


def _saves(policy: Any, eqn: Any) -> bool:
    """Whether the forward pass keeps `eqn`'s outputs: always for effects other
    than debugging (they run once), else as `policy` says (None saves nothing)."""
    if eqn.effects and eqn.primitive.name not in _RERUN_EFFECTS:
        return True
    if policy is None:
        return False
    answer = policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)
    if isinstance(answer, bool):
        return answer
    if isinstance(answer, (pe.SaveableType, pe.Offloadable)):
        return True
    if isinstance(answer, pe.RecomputeType):
        return False
    raise TypeError(
        "jax.checkpoint policy must return a bool or jax.ad_checkpoint's Recompute, "
        f"Saveable or Offloadable(...); {policy!r} returned {answer!r} for "
        f"'{eqn.primitive.name}'."
    )


def _evaluate(
    jaxpr: Any,
    args: Sequence[Any],
    policy: Any,
    reuse: Sequence[Any] | None,
    opened: bool = False,
) -> list:
    """Evaluates `jaxpr` on `args` on the current trace, equation by equation.

    Returns the outputs, then the outputs of the equations `_saves` keeps:
    computed in the forward pass (`reuse` None), in the recomputation (`reuse`
    those kept values) reused (see `_reuse`), which carry a cotangent that
    reached the kept values (a second derivative reads them) to the operands.
    With `opened` (a node's forward pass, on the level below it) a custom_vjp
    call gives its `fwd`'s outputs, which that level differentiates
    (`rules.opening`).
    """
    env: dict[Any, Any] = dict(zip(jaxpr.invars, args, strict=True))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    saved: list[Any] = []
    kept = iter(reuse) if reuse is not None else None
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        keep = _saves(policy, eqn)
        if keep and kept is not None:
            outs = _reuse(eqn, ins, [next(kept) for _ in eqn.outvars], opened)
        elif opened:
            outs = open_equation(eqn, ins)
        else:
            outs = _bind(eqn, ins)
        if keep:
            saved.extend(outs)
        env.update(zip(eqn.outvars, outs, strict=True))
    outs = [literal_output(v) if isinstance(v, jcore.Literal) else env[v] for v in jaxpr.outvars]
    return outs + saved


def _bind(eqn: Any, ins: Sequence[Any]) -> list[Any]:
    """Applies `eqn`'s primitive to `ins` on the current trace (as `jax.core.eval_jaxpr`)."""
    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _reuse(eqn: Any, ins: Sequence[Any], values: Sequence[Any], opened: bool) -> list[Any]:
    """The outputs of a kept equation in the recomputation: its kept `values`,
    recorded as a node of its own rule at the recomputed `ins` (so the
    cotangent still flows to them), or as constants for effects and calls,
    whose outputs are recomputed instead where a gradient needs them (opened
    as `_evaluate` opens them)."""
    rule = PRIMITIVES.get(eqn.primitive.name)
    if eqn.effects or not values:
        return list(values)
    if rule is None or type(rule).apply is not Primitive.apply:  # a call: recompute it
        return open_equation(eqn, ins) if opened else _bind(eqn, ins)
    reused = _Reused(rule, len(values))
    outs = core.bind(reused, *values, *ins, **rule.taken(eqn.params))
    return list(outs) if rule.multiple_results else [outs]


class _Reused(Primitive):
    """`rule` applied to `ins` whose result is already known (`values`, passed
    first): the result is `values`, the VJP is `rule`'s at (ins, values). The
    cotangent flows to `ins` only, never to `values` (they equal `rule(ins)`)."""

    def __init__(self, rule: Primitive, n_values: int):
        super().__init__(
            f"{rule.name} (saved by the checkpoint policy)",
            self._known,
            rule.params,
            differentiable=rule.differentiable,
            multiple_results=rule.multiple_results,
        )
        self.rule = rule
        self.n_values = n_values

    def _known(self, *args: Any, **params: Any) -> Any:
        values = args[: self.n_values]
        return list(values) if self.multiple_results else values[0]

    def vjp(self, g: Any, node: Node) -> list[Any]:
        n = self.n_values
        ins = node.primals[n:]
        argnums = tuple(i - n for i in node.argnums if i >= n)
        at = Node(self.rule, ins, node.params, node.ans, argnums, ())
        cts = iter(self.rule.vjp(g, at))
        return [next(cts) if i >= n else None for i in node.argnums]


class _Remat(Primitive):
    """`jax.checkpoint`: one node; forward = the body (keeping what the policy
    saves), VJP = the VJP of the body run again (see the module docstring).

    Its parameter `opened` (chainrule's, not JAX's) marks the node a transform
    enclosing another one records (`value_below`): there the body's
    custom_vjp calls are their `fwd`, as after JAX's inner JVP, in the
    forward pass and in the recomputation alike, so that transform
    differentiates `fwd` (and forward mode may run through it)."""

    def value_below(self, primals, params):
        if not holds_custom_vjp(params["jaxpr"]):
            return core.bind(self, *primals, **params)
        return core.bind(self, *primals, **dict(params, opened=True))

    def apply(self, trace, args, params):
        outs = core.bind(self, *args, **self.taken(params))
        return list(outs)[: len(params["jaxpr"].outvars)]

    def apply_untraced(self, trace, args, params):
        return eval_body(trace, params["jaxpr"], args)

    def vjp(self, g: Any, node: Node) -> list[Any]:
        jaxpr, policy = node.params["jaxpr"], node.params["policy"]
        opened = node.params.get("opened", False)
        if core.backward_at_zero() and (
            needs_forward(jaxpr) or (holds_custom_vjp(jaxpr) and not opened)
        ):
            # forward mode through a body holding a while loop: the body's JVP
            # (a custom_vjp function in it refuses forward mode there, as in
            # JAX; one a transform inside this one differentiated is its `fwd`
            # here: `opened`)
            jvp = lambda primals, tangents: _remat_jvp(  # noqa: E731
                primals, tangents, jaxpr, policy, opened
            )
            cts = list(g) if isinstance(g, tuple) else [g]
            return transposed_jvp(cts, node.primals, node.argnums, jvp)
        n_out = len(jaxpr.outvars)
        kept = node.ans[n_out:]
        cts = _cotangents(g[:n_out] if isinstance(g, tuple) else g, node.ans[:n_out])
        # the kept values get a cotangent where a backward pass read them and is
        # differentiated (second order): it flows through the recomputation too
        reached = [
            j for j, ct in enumerate(g[n_out:] if isinstance(g, tuple) else ()) if ct is not None
        ]
        cts += [g[n_out + j] for j in reached]
        primals = list(node.primals)
        # only the operands differentiated here (a while loop reading only the
        # others is evaluated as is, as JAX leaves what has no tangent)
        diff = sorted(i for i in node.argnums if core.is_differentiable(raw(primals[i])))
        prevent_cse = node.params["prevent_cse"]
        if isinstance(prevent_cse, bool):
            prevent_cse = (prevent_cse,) * len(primals)
        if any(prevent_cse):
            fenced = [i for i, p in enumerate(prevent_cse) if p]
            values = optimization_barrier([primals[i] for i in fenced] + cts)
            for i, v in zip(fenced, values, strict=False):
                primals[i] = v
            cts = values[len(fenced) :]

        def recompute(*diff_primals: Any) -> list[Any]:
            full = list(primals)
            for i, x in zip(diff, diff_primals, strict=True):
                full[i] = x
            outs = _evaluate(jaxpr, full, policy, kept, opened)
            return outs[:n_out] + [outs[n_out + j] for j in reached]

        op_cts = vjp_flat(recompute, [primals[i] for i in diff], cts)
        by_operand = dict(zip(diff, op_cts, strict=True))
        return [by_operand[i] for i in node.argnums]


def _remat_impl(
    *args: Any,
    jaxpr: Any,
    prevent_cse: Any,
    differentiated: bool,
    policy: Any,
    opened: bool = False,
):
    """The forward pass on the current trace: outputs, then the kept values
    (its custom_vjp calls their `fwd`, `opened` or not: the level below
    differentiates `fwd`, and the values are the same)."""
    del prevent_cse, differentiated, opened  # they only matter to the recomputation
    return _evaluate(jaxpr, args, policy, None, opened=holds_custom_vjp(jaxpr))


# `checkpoint_name(x, name)`: an identity that policies (`save_only_these_names`) ask about.
name_p = primitive(
    "name",
    lambda x, name: ad_checkpoint.name_p.bind(x, name=name),
    ("name",),
    host=lambda x, name: x,
)
defvjp(name_p, lambda ans, x, name: lambda g: g)


def _remat_jvp(
    primals: Sequence[Any], tangents: Sequence[Any], jaxpr: Any, policy: Any, opened: bool
) -> list:
    """The tangents of a checkpoint's outputs and of the values its policy
    keeps (None for a non-float one): the body run again with its tangents
    (`core.jvp_flat`, chainrule's own rules), opened as `_evaluate` opens it.
    `tangents` has one entry per operand, None where it is zero."""
    diff = [i for i, t in enumerate(tangents) if t is not None]
    body = lambda *args: _evaluate(jaxpr, args, policy, None, opened)  # noqa: E731
    values, out_ts = jvp_at(body, primals, diff, [tangents[i] for i in diff])
    return [
        t if core.is_differentiable(raw(v)) else None for v, t in zip(values, out_ts, strict=True)
    ]


# (jax.checkpoint's primitive is named "remat2")
PRIMITIVES["remat2"] = _Remat(
    "remat2",
    _remat_impl,
    ("jaxpr", "prevent_cse", "differentiated", "policy", "opened"),
    multiple_results=True,
)
