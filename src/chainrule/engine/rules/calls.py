"""Call-like primitives: `jit` bodies, `cond`, and custom rules (`checkpoint`
is in `remat.py`).

These carry a function (a jaxpr, or a Python function for `custom_jvp` /
`custom_vjp`) rather than an array operation:

* `jit` / `closed_call`: the body is evaluated inline on the
  current chainrule trace with JAX's own jaxpr interpreter, so each of its
  equations reaches `Trace.process_primitive` like any other primitive.
* `cond` with a predicate known now (eager): the branch taken is evaluated
  inline. With a traced predicate (under `jit`/`vmap`) it is one node, whose
  VJP is a `lax.switch` over the branches' VJPs.
* `custom_jvp_call` (`jax.nn.relu`, `softplus`, ... and users' own): one
  node whose VJP honours the user's JVP rule. The rule maps tangents to
  output tangents linearly (for fixed primals), so chainrule's reverse pass
  over that map, at tangents = 0, gives its transpose: the VJP. For JAX's own
  rules (and rules JAX traced into a `jit` body) that transpose is read once
  into a jaxpr per types and evaluated on later eager gradients.
* `custom_vjp_call`: the user's `fwd` computes the outputs and residuals; the
  user's `bwd` is the rule.

None of this calls JAX's differentiation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial
from types import CodeType, FunctionType
from typing import Any

import jax
import numpy as np
from jax import lax
from jax._src import ad_util
from jax._src import core as jcore  # the Trace interface (JAX 0.10, pinned)
from jax._src import linear_util as lu
from jax._src.config import trace_context
from jax._src.custom_derivatives import lift_jvp
from jax._src.custom_derivatives import linear_call_p as jax_linear_call_p
from jax._src.interpreters import ad as jax_ad
from jax._src.util import weakref_lru_cache
from jax.extend.core import primitives as jax_primitives

from chainrule.engine import core, host, linearity
from chainrule.engine.core import Node, Primitive, Trace, Tracer, raw, vjp_flat, zeros_like
from chainrule.engine.rules.elementwise import masked_product, masks_as_xla_does
from chainrule.engine.rules.forward_only import jvp_at, needs_forward, transposed_jvp
from chainrule.engine.rules.opening import cond as opened_cond
from chainrule.engine.rules.opening import holds_custom_vjp, opened_cond_params
from chainrule.engine.rules.registry import PRIMITIVES
from chainrule.engine.rules.shape import retyped, weakly_typed
from chainrule.errors import ForwardModeError, NotDifferentiableError, NotLinearError


def eval_body(trace: Trace, closed: Any, args: Sequence[Any]) -> list[Any]:
    """Evaluates a jaxpr (closed or open) on `args` with `trace` current.

    As `jax.core.eval_jaxpr`, except that an equation of an ordinary primitive
    goes straight to `trace.process_primitive`, where JAX's `bind` would have
    sent it after finding that trace current (eager `jax.numpy` functions are
    `jit` bodies, so this is on the hot path). Equations JAX binds specially
    (calls with sub-functions, custom rules) and those traced under another
    context (`compute_on`, metadata) are left to JAX's `bind`. The jaxpr is
    read once into a `_Plan` (JAX caches a `jnp` function's jaxpr, so the plan
    is reused on every call).
    """
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    return _run_plan(trace, _plan_of(jaxpr), consts, args)


def _plan_of(jaxpr: Any) -> _Plan:
    """`jaxpr`'s plan, read once (`_PLANS`)."""
    plan = _PLANS.get(jaxpr)
    if plan is None:
        plan = _PLANS[jaxpr] = _Plan(jaxpr)
    return plan


def _program_of(plan: _Plan) -> _HostProgram | bool:
    """`plan`'s host program (False: it has none), found once."""
    program = plan.host
    if program is None:
        program = plan.host = _HostProgram.of(plan)
    return program


def _run_plan(trace: Trace, plan: _Plan, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """The outputs of `plan`'s jaxpr on `consts` and `args`, `trace` current."""
    if trace is _HOST_TRACE:  # chainrule's own evaluation of a rule or body on the host
        program = _program_of(plan)
        if program:
            outs = program.run(plan, consts, args)
            if outs is not None:
                return outs
    env = plan.template.copy()
    env[: plan.n_consts] = consts
    env[plan.n_consts : plan.n_inputs] = args
    if bool in map(type, args):  # (`jit` takes a Python bool as a `bool[]` array)
        env[plan.n_consts : plan.n_inputs] = [
            host.immutable(np.asarray(a)) if type(a) is bool else a for a in args
        ]
    trace.run(_eval_equations, trace, plan, env)
    return [env[i] for i in plan.outs]


def _eval_equations(trace: Trace, plan: _Plan, env: list[Any]) -> None:
    """`eval_body`'s loop over the equations, `trace` current, filling `env`."""
    here = current_context()  # interned: an equation traced in this context is it
    process, owns = trace.process, trace._owns
    for k, (prim, params, ins, outs, plain, eqn, rule, mask) in enumerate(plan.eqns):
        invals = [env[i] for i in ins]
        if plain and eqn.ctx is here:
            if mask is not None:  # a product by a converted mask, as XLA computes it
                out = masked_product(env[mask[0]], env[mask[1]])
            elif rule is None or not owns(invals):
                out = process(prim, invals, params)
            elif type(rule).apply is not _DEFAULT_APPLY:  # what `process` would do
                out = rule.apply(trace, invals, params)
                if not prim.multiple_results:
                    out = out[0]
            else:  # `Primitive.apply`, its parameters taken once per equation
                taken = plan.taken[k]
                if taken is None:
                    taken = plan.taken[k] = rule.taken(params)
                out = rule.bind(*invals, **taken)
        else:
            with jcore.source_info_util.user_context(eqn.source_info.traceback):
                with eqn.ctx.manager:
                    out = prim.bind(*invals, **prim.get_bind_params(params))
            # (a call or custom rule evaluated here may hand back a Python number
            # its body returned, where `jit`'s compiled body gives an array)
            if prim.multiple_results:
                out = [_python_typed(o, v.aval) for o, v in zip(out, eqn.outvars, strict=True)]
            else:
                out = _python_typed(out, eqn.outvars[0].aval)
        if type(outs) is int:
            env[outs] = out
        else:
            for i, o in zip(outs, out, strict=True):
                env[i] = o


def current_context() -> Any:
    """`jcore.JaxprEqnContext()`, JAX's context of an equation traced now.

    JAX interns it (the same object for the same settings), which costs 1.5
    us a call, once per `jit` equation of an eager `jax.numpy` call; the five
    settings it reads are all part of `config.trace_context()` (0.1 us), so it
    is remembered by that."""
    key = trace_context()
    here = _CONTEXTS.get(key)
    if here is None:
        if len(_CONTEXTS) >= 64:
            _CONTEXTS.clear()
        here = _CONTEXTS[key] = jcore.JaxprEqnContext()
    return here


_CONTEXTS: dict[Any, Any] = {}  # config.trace_context() -> JaxprEqnContext


class _Plan:
    """A jaxpr read for `eval_body`: every variable numbered (constants, inputs,
    then literals and equation outputs), literals' values filled in.

    `xla_masks`: products by converted masks are evaluated as XLA compiles
    them in one program (`_mask`); False for a jaxpr JAX would run one
    operation at a time (an eager custom rule's operations)."""

    __slots__ = (
        "template",
        "n_consts",
        "n_inputs",
        "eqns",
        "taken",
        "outs",
        "host",
        "weak_outputs",
        "__weakref__",
    )

    def __init__(self, jaxpr: Any, *, xla_masks: bool = True):
        # its `_HostProgram` (None: not looked at yet; False: it has none)
        self.host: _HostProgram | bool | None = None
        self.weak_outputs = any(v.aval.weak_type for v in jaxpr.outvars)
        slots: dict[Any, int] = {}
        template: list[Any] = []

        def slot(v: Any) -> int:
            if type(v) is jcore.Literal:
                template.append(_python_typed(v.val, v.aval))
                return len(template) - 1
            if v not in slots:
                slots[v] = len(template)
                template.append(None)
            return slots[v]

        for v in (*jaxpr.constvars, *jaxpr.invars):
            slots[v] = len(template)  # (a variable listed twice gets one slot)
            template.append(None)
        self.n_consts = len(jaxpr.constvars)
        self.n_inputs = self.n_consts + len(jaxpr.invars)
        eqns = []
        masks: dict[Any, Any] = {}  # a boolean converted to a float -> the boolean
        for eqn in jaxpr.eqns:
            prim = eqn.primitive
            ins = tuple(slot(v) for v in eqn.invars)
            outs = tuple(slot(v) for v in eqn.outvars)
            plain = type(prim).bind_with_trace is _PLAIN_BIND
            out = outs if prim.multiple_results else outs[0]
            rule = PRIMITIVES.get(prim.name)
            mask = _mask(eqn, masks, slot) if xla_masks else None
            eqns.append((prim, eqn.params, ins, out, plain, eqn, rule, mask))
            if prim.name == "convert_element_type" and masks_as_xla_does(
                eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype
            ):
                masks[eqn.outvars[0]] = eqn.invars[0]
        self.eqns = tuple(eqns)
        # an equation's parameters as its chainrule primitive takes them
        # (`Primitive.taken`), found when it first meets this trace's values
        self.taken: list[dict[str, Any] | None] = [None] * len(eqns)
        outs = []
        for v in jaxpr.outvars:
            if type(v) is jcore.Literal:  # a constant output: the array `jit` returns
                template.append(literal_output(v))
                outs.append(len(template) - 1)
            else:
                outs.append(slot(v))
        self.outs = tuple(outs)
        self.template = template


class _HostProgram:
    """A plan's equations as calls of their primitives' NumPy versions, for
    `_HOST_TRACE` (a `custom_jvp` rule's transpose read once, a body of JAX's
    own): each equation's path through `Trace.process` decided once, not per
    equation and call (5-9 us an equation there, against 1-4 us of NumPy).

    The results are those of that path, bit for bit, because a plan has a
    program only where the path is this one for every equation: an ordinary
    primitive with a NumPy version and chainrule's untraced evaluation (or a
    `jit` call of a body that has a program), in the context it was traced
    in, without effects or products by converted masks; an equation whose
    operands are all weakly typed (literals; JAX's path where it is not
    exact) only if exact on the host; literals and outputs of strong host
    types. An exact equation of literals alone (a zero broadcast to a shape)
    is computed once, here, and one whose results no output needs not at
    all (the general path computes and drops them). What depends on the
    values is checked per call (`run`): host evaluation on, the same
    context, operands NumPy values (or concrete `jax.Array`s, read as NumPy
    views) of host dtypes without subnormals; NumPy refusing an operation
    falls back to the general path, from the start."""

    __slots__ = ("steps", "context", "template")

    def __init__(self, steps: tuple, context: Any, template: list[Any]):
        self.steps = steps
        self.context = context
        self.template = template

    @staticmethod
    def of(plan: _Plan) -> _HostProgram | bool:
        """The plan's program, or False where it has none (see the class)."""
        context = current_context()
        if plan.weak_outputs:
            return False
        template = list(plan.template)
        known = set()  # slots holding a value now: literals, then folded results
        for i, v in enumerate(template):
            if v is None or i < plan.n_inputs:
                continue
            if not isinstance(v, host.HOST_TYPES) or not host.host_dtype(v.dtype):
                return False  # (a Python number, a `jax.Array` output)
            if v.dtype.kind == "f" and host.has_subnormal(v):
                return False
            known.add(i)
        steps = []
        for prim, params, ins, outs, plain, eqn, rule, mask in plan.eqns:
            # a `custom_jvp` function inside (softplus's logaddexp, in its rule
            # too): off a trace, its body (`Trace._custom_call` on host operands)
            nested = prim.name == "custom_jvp_call"
            if not (plain or nested) or eqn.ctx is not context or eqn.effects or mask is not None:
                return False
            avals = [v.aval for v in (*eqn.invars, *eqn.outvars)]
            if not all(isinstance(a.dtype, np.dtype) and host.host_dtype(a.dtype) for a in avals):
                return False
            all_weak = all(v.aval.weak_type for v in eqn.invars)
            if nested and all_weak:
                return False
            if nested or (prim.name == "jit" and type(rule) is _Inline and not all_weak):
                body = params["call_jaxpr" if nested else "jaxpr"]
                inner = _plan_of(body.jaxpr)
                if not _program_of(inner):
                    return False
                steps.append((None, (inner, body.consts), ins, outs))
                continue
            if rule is None or rule.host_impl is None:
                return False
            if type(rule).apply_untraced is not _DEFAULT_APPLY_UNTRACED:
                return False
            if all_weak and rule.exact_on_host is not True:
                return False
            try:
                taken = rule.taken(params)
            except NotImplementedError:  # (a parameter it refuses: the general path says so)
                return False
            if rule.exact_on_host is True and ins and all(i in known for i in ins):
                folded = _fold(rule, taken, [template[i] for i in ins])
                if folded is not None:
                    for i, o in zip(outs if type(outs) is tuple else (outs,), folded, strict=True):
                        template[i] = host.immutable(o)
                        known.add(i)
                    continue
            steps.append((rule.host_impl, taken, ins, outs))
        # only the steps the outputs need (a rule's tangent map transposed
        # keeps the forward select whose result nothing reads)
        live = set(plan.outs)
        needed = []
        for step in reversed(steps):
            outs = step[3]
            if any(i in live for i in (outs if type(outs) is tuple else (outs,))):
                needed.append(step)
                live.update(step[2])
        return _HostProgram(tuple(reversed(needed)), context, template)

    def run(self, plan: _Plan, consts: Sequence[Any], args: Sequence[Any]) -> list[Any] | None:
        """The plan's outputs, or None where the general path must run."""
        if not host._state.host or current_context() is not self.context:
            return None
        values = [*consts, *args]
        for k, a in enumerate(values):
            if type(a) is host._ArrayImpl and not a.weak_type and host.host_dtype(a.dtype):
                a = values[k] = host._converted(a)  # (its NumPy view, as `host_operands` reads it)
                if a is None:
                    return None
                continue
            if not isinstance(a, host.HOST_TYPES) or not host.host_dtype(a.dtype):
                return None
            if type(a) is host.TypedNdArray and a.weak_type:
                return None
            if a.dtype.kind == "f" and type(a) is not host.HostArray and host.has_subnormal(a):
                return None
        env = self.template.copy()
        env[: plan.n_inputs] = values
        immutable = host.immutable
        try:
            with host.FLUSHING:
                for impl, taken, ins, outs in self.steps:
                    if impl is None:  # a `jit` call: its body's program
                        inner, inner_consts = taken
                        out = inner.host.run(inner, inner_consts, [env[i] for i in ins])
                        if out is None:
                            return None
                    else:
                        out = impl(*[env[i] for i in ins], **taken)
                        if out is NotImplemented:
                            return None
                    if type(outs) is int:
                        env[outs] = immutable(out)
                    else:
                        for i, o in zip(outs, out, strict=True):
                            env[i] = immutable(o)
        except (ValueError, TypeError, IndexError):
            return None  # (NumPy refuses them: the general path gives JAX's answer or error)
        return [env[i] for i in plan.outs]


def _fold(rule: Primitive, taken: dict[str, Any], operands: list[Any]) -> list[Any] | None:
    """An exact equation of constants computed once (`_HostProgram.of`), as a
    list of its outputs; None where NumPy refuses it (left to each call)."""
    try:
        with host.FLUSHING:
            out = rule.host_impl(*operands, **taken)
    except (ValueError, TypeError, IndexError):
        return None
    if out is NotImplemented:
        return None
    return list(out) if rule.multiple_results else [out]


def _python_typed(x: Any, aval: Any) -> Any:
    """`x`, or a Python number `x` as the NumPy value of `aval`'s type where
    that type is strong (a weak one is what a Python number is in JAX): as
    `jit`'s compiled body holds it, so an operation that hands it on unchanged
    (`stop_gradient`, a call) hands on an array of the jaxpr's type (a
    library's rule may compare it with the type it traced: equinox's closure
    conversion). For a literal, only a `bool[]` one is a Python number (JAX's
    typed literals carry their dtype and weak type)."""
    if type(x) in (bool, int, float, complex) and (type(x) is bool or not aval.weak_type):
        return host.immutable(np.asarray(x, aval.dtype))
    return x


def _typed_as(x: Any, aval: Any) -> Any:
    """`x` with the weak type of `aval`, as JAX gives an output of that type: a
    chainrule Tracer by a recorded conversion (differentiable), a JAX tracer
    by JAX's, a concrete value (a `jax.Array`, or a host value) as an array."""
    if not isinstance(aval.dtype, np.dtype):
        return x
    if isinstance(x, jcore.Tracer):  # (chainrule's too)
        return weakly_typed(x, aval.weak_type)
    if getattr(x, "weak_type", False) == aval.weak_type:  # (host values are strong)
        return x
    return _concrete_array(x, aval)


def literal_output(v: Any) -> Any:
    """A literal output of a jaxpr as the `jax.Array` JAX's `jit` hands back for
    it: its dtype and weak type, not the Python number the literal holds (a
    `jit`-ted constant function, a `cond` branch returning `1.0`)."""
    if not isinstance(v.aval.dtype, np.dtype):
        return v.val
    return _concrete_array(np.asarray(v.val, v.aval.dtype), v.aval)


def _concrete_array(x: Any, aval: Any) -> jax.Array:
    """Concrete `x` as a `jax.Array` of `aval`'s dtype and weak type, computed
    now whatever traces are running (so no tracer is kept in a plan)."""
    with jax.ensure_compile_time_eval():
        return retyped(x, aval.dtype, weak_type=aval.weak_type)


def _mask(eqn: Any, masks: dict[Any, Any], slot: Callable[[Any], int]) -> tuple | None:
    """For `mul(convert(mask), x)` (either order) in a jaxpr, the slots of the
    boolean mask and of x: XLA compiles that product as `select(mask, x, 0)`
    (its algebraic simplifier), which `eval_body` then evaluates too. Only
    where the converted mask has the product's shape, as the rewrite needs."""
    if eqn.primitive.name != "mul" or eqn.params.get("out_dtype") is not None:
        return None
    shape = eqn.outvars[0].aval.shape
    for a, b in (eqn.invars, eqn.invars[::-1]):
        if type(a) is not jcore.Literal and a in masks and a.aval.shape == b.aval.shape == shape:
            return slot(masks[a]), slot(b)
    return None


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # jaxpr -> _Plan


_PLAIN_BIND = jcore.Primitive.bind_with_trace
_DEFAULT_APPLY = Primitive.apply
_DEFAULT_APPLY_UNTRACED = Primitive.apply_untraced


class _Inline(Primitive):
    """A call whose body is evaluated inline: `param` names the body."""

    def __init__(self, name: str, param: str):
        super().__init__(name, impl=None)
        self.param = param

    def apply(self, trace, args, params):
        return eval_body(trace, params[self.param], args)

    def apply_untraced(self, trace, args, params):
        # on constants alone the call is JAX's: one compiled call, as in jax.grad
        if host.host_operands(tuple(args), check=True) is None:
            return NotImplemented
        return eval_body(trace, params[self.param], args)


# (a `custom_vmap` function is differentiated through its body, as in JAX;
# jax.checkpoint's "remat2" has its own rule in `remat`)
for _name, _param in (
    ("jit", "jaxpr"),
    ("closed_call", "call_jaxpr"),
    ("custom_vmap_call", "call"),
):
    PRIMITIVES[_name] = _Inline(_name, _param)


class _ComputeOn(_Inline):
    """`compute_on` (`jax.experimental.compute_on.compute_on2(f,
    compute_type=..., out_memory_spaces=...)`): its body is differentiated
    inline, the same numbers as `jax.grad`'s; on constants alone JAX
    evaluates the call, placed as asked. Inline, the body's operations (and
    their rules) run where the rest of the function runs, not on the
    `compute_type` asked for (JAX keeps its forward and backward there), and
    its results are in device memory: results asked for in another memory
    space are refused, as `jax.grad` refuses them (its VJP then expects
    cotangents in that memory)."""

    def apply(self, trace, args, params):
        spaces = params.get("out_memory_spaces", ())
        other = [s for s in spaces if s is not jcore.MemorySpace.Device]
        if other:
            raise ValueError(
                f"compute_on with out_memory_spaces={tuple(spaces)} (used at "
                f"{core.user_frame()}): chainrule differentiates the body of compute_on "
                "inline, where its results are in device memory, and jax.grad refuses "
                "results in another memory space too (its VJP expects cotangents there). "
                "Return them in device memory (out_memory_spaces=MemorySpace.Device) and "
                "move them afterwards if needed."
            )
        return super().apply(trace, args, params)

    def apply_untraced(self, trace, args, params):
        return NotImplemented  # JAX evaluates the call, placed as asked


PRIMITIVES["compute_on"] = _ComputeOn("compute_on", "jaxpr")


def _cotangents(g: Any, outs: Sequence[Any]) -> list[Any]:
    """The cotangents of a multiple-results node, zeros where none arrived."""
    cts = list(g) if isinstance(g, tuple) else [g]
    return [zeros_like(o) if ct is None else ct for ct, o in zip(cts, outs, strict=True)]


def _instantiate(ct: Any, like: Any) -> Any:
    """A cotangent a user's rule returned, zeros for its symbolic zeros."""
    if ct is None or isinstance(ct, (ad_util.Zero, ad_util.SymbolicZero)):
        return zeros_like(like)
    return ct


# --- which outputs of a jaxpr carry a derivative --------------------------------------


def _zero_derivative(name: str) -> bool:
    """Whether the primitive `name` has outputs that never carry a derivative
    (an ordinary primitive chainrule records no node for), so nothing computed
    from them depends on a differentiated value. Callbacks, which refuse a
    traced operand, and debugging effects are not among them."""
    rule = PRIMITIVES.get(name)
    return rule is not None and not rule.differentiable and type(rule).apply is Primitive.apply


def _inexact_var(v: Any) -> bool:
    return bool(jax.dtypes.issubdtype(v.aval.dtype, np.inexact))


# calls whose body is their derivative (no custom rule): (primitive, its body's parameter)
_PLAIN_CALLS = {"jit": "jaxpr", "closed_call": "call_jaxpr", "checkpoint": "jaxpr"}


def _branches_depend(branches: Sequence[Any], flags: tuple[bool, ...]) -> list[bool]:
    """`_depends` for a cond: an output any branch computes from the flagged operands."""
    outs = [False] * len(branches[0].out_avals)
    for branch in branches:
        outs = [a or b for a, b in zip(outs, _depends(branch.jaxpr, flags), strict=True)]
    return outs


@weakref_lru_cache
def _depends(jaxpr: Any, flags: tuple[bool, ...]) -> tuple[bool, ...]:
    """Which outputs of `jaxpr` a differentiable value flows to from the flagged
    inputs, as JAX's symbolic zeros say: not through `stop_gradient`, a
    comparison or `floor`, nor out of a `cond` branch or a plain call whose body
    does not pass it (conservatively: every inexact output of any other
    equation that reads one, a custom rule's or a loop's)."""
    reached = {v for v, f in zip(jaxpr.invars, flags, strict=True) if f}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if _zero_derivative(name):
            continue  # floor, round, sign, a comparison: JAX's symbolic zero tangent
        ins = tuple(not isinstance(v, jcore.Literal) and v in reached for v in eqn.invars)
        if not any(ins):
            continue
        if name == "cond":  # (the index carries no derivative)
            outs = _branches_depend(eqn.params["branches"], ins[1:])
        elif name in _PLAIN_CALLS:
            body = eqn.params[_PLAIN_CALLS[name]]
            outs = _depends(getattr(body, "jaxpr", body), ins)
        else:
            outs = [True] * len(eqn.outvars)
        reached.update(v for v, o in zip(eqn.outvars, outs, strict=True) if o and _inexact_var(v))
    return tuple(not isinstance(v, jcore.Literal) and v in reached for v in jaxpr.outvars)


# --- cond ----------------------------------------------------------------------------


def _cond_impl(index: Any, *operands: Any, **params: Any) -> list[Any]:
    """The cond, its branches' custom_vjp calls replaced by their `fwd`
    (`rules.opening`): a transform below this one differentiates `fwd`."""
    return opened_cond(index, operands, params)


class _Cond(Primitive):
    """`lax.cond`/`lax.switch`. VJP: a `lax.switch` over the branches' VJPs, each
    taken by chainrule itself, re-running the branch's forward pass inside the
    backward branch (rematerialisation), so no residuals cross the cond."""

    def value_below(self, primals, params):
        """The cond's value for the transform enclosing this one, which records
        it too: its branches' custom_vjp calls are `fwd` there (`rules.opening`)."""
        return core.bind(self, *primals, **opened_cond_params(params))

    def apply(self, trace, args, params):
        index, *operands = args
        if not isinstance(raw(index), jcore.Tracer):  # known now: evaluate that branch
            uses = getattr(trace, "untraced_uses", None)
            made_by = uses.get(core.untraced_key(raw(index))) if uses else None
            if made_by is not None:
                # (`cr.linear_transpose`: the branch depends on the inputs, so the
                # function is not linear in them; JAX refuses it too)
                raise NotLinearError(
                    f"cr.linear_transpose: the function is not linear in its inputs: a "
                    f"lax.cond/switch at {core.user_frame()} chooses its branch by "
                    f"'{made_by[0]}' of values computed from them. For a nonlinear "
                    "function use cr.vjp at a point."
                )
            branches = params["branches"]
            branch = branches[int(np.clip(int(raw(index)), 0, len(branches) - 1))]
            outs = eval_body(trace, branch, operands)
            # a cond's outputs have the first branch's types (JAX's abstract
            # evaluation): `lax.cond(p, lambda x: 1.0, lambda x: x, x)` is strong
            return [_typed_as(o, a) for o, a in zip(outs, branches[0].out_avals, strict=True)]
        outs = list(core.bind(self, *args, **params))
        # an output no branch computes differentiably from our values (a
        # `stop_gradient` of them, a constant) is not traced: JAX's symbolic
        # zero, so a rule refusing any tangent (equinox's `nondifferentiable`)
        # is not called for it
        flags = tuple(isinstance(a, Tracer) and a._trace is trace for a in operands)
        live = _branches_depend(params["branches"], flags)
        return [
            o if keep or not (isinstance(o, Tracer) and o._trace is trace) else o.value
            for o, keep in zip(outs, live, strict=True)
        ]

    def apply_untraced(self, trace, args, params):
        if isinstance(raw(args[0]), jcore.Tracer):
            # a predicate traced by the trace outside (a scan step's, in the
            # backward pass of forward mode), nothing of ours: that trace's cond
            return NotImplemented
        return self.apply(trace, args, params)  # a predicate known now picks the branch

    def vjp(self, g, node):
        index, *operands = node.primals
        branches = node.params["branches"]
        if core.backward_at_zero() and any(
            needs_forward(b) or holds_custom_vjp(b.jaxpr) for b in branches
        ):
            # forward mode through a branch holding a while loop: the cond's JVP
            # (a custom_vjp function in a branch refuses forward mode there, as
            # in JAX; the level outside a transform that differentiated it gets
            # the branches opened, `value_below`)
            jvp = lambda primals, tangents: _cond_jvp(primals, tangents, branches)  # noqa: E731
            cts = list(g) if isinstance(g, tuple) else [g]
            return transposed_jvp(cts, node.primals, node.argnums, jvp)
        cts = _cotangents(g, node.ans)
        diff = sorted(
            i - 1 for i in node.argnums if i >= 1 and core.is_differentiable(raw(operands[i - 1]))
        )

        def branch_vjp(branch):
            def run(*args):
                ops, out_cts = list(args[: len(operands)]), args[len(operands) :]

                def forward(*diff_ops):
                    full = list(ops)
                    for i, x in zip(diff, diff_ops, strict=True):
                        full[i] = x
                    return jcore.eval_jaxpr(branch.jaxpr, branch.consts, *full)

                return vjp_flat(forward, [ops[i] for i in diff], list(out_cts))

            return run

        op_cts = lax.switch(index, [branch_vjp(b) for b in branches], *operands, *cts)
        by_operand = dict(zip(diff, op_cts, strict=True))
        return [by_operand[i - 1] for i in node.argnums]


def _cond_jvp(primals: Sequence[Any], tangents: Sequence[Any], branches: Sequence[Any]) -> list:
    """The tangents of a cond's outputs (None for a non-float one): a
    `lax.switch` over the branches' JVPs (`core.jvp_flat`, chainrule's own
    rules). `tangents` has one entry per operand (the index first), None
    where it is zero."""
    index, *operands = primals
    diff = [i for i in range(len(operands)) if tangents[i + 1] is not None]
    ts = [tangents[i + 1] for i in diff]
    out_avals = branches[0].out_avals
    floats = [j for j, a in enumerate(out_avals) if jax.dtypes.issubdtype(a.dtype, np.inexact)]

    def branch_jvp(branch):
        def run(*args):
            ops, op_ts = args[: len(operands)], args[len(operands) :]
            body = partial(jcore.eval_jaxpr, branch.jaxpr, branch.consts)
            _, out_ts = jvp_at(body, ops, diff, op_ts)
            return [_typed_as(out_ts[j], out_avals[j]) for j in floats]

        return run

    out_ts = iter(lax.switch(index, [branch_jvp(b) for b in branches], *operands, *ts))
    return [next(out_ts) if j in floats else None for j in range(len(out_avals))]


PRIMITIVES["cond"] = _Cond("cond", _cond_impl, multiple_results=True)


# --- custom_jvp ------------------------------------------------------------------------


def _current_trace() -> Any:
    with jcore.take_current_trace() as trace:
        return trace


def _custom_jvp_impl(*args: Any, fun: Any, jvp: Any, symbolic_zeros: bool) -> list[Any]:
    """The function's value, from the trace outside (which may record it too);
    where that trace differentiates (JAX's `jvp`/`linearize` around this
    transform), the rule's primal, as JAX's own nested transforms compute it
    (`_rule_primal`)."""
    prim = jax_primitives.custom_jvp_call_p
    trace = _current_trace()
    if isinstance(trace, _JAX_AD_TRACES):
        ruled = _rule_primal(args, jvp, symbolic_zeros)
        if ruled is not None:
            return ruled
    with host.UNFLUSHED:  # (the user's function: in the thread's own mode, as in JAX)
        return prim.bind_with_trace(
            trace,
            core.for_trace(trace, args),
            None,
            dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros),
        )


_JAX_AD_TRACES = (jax_ad.JVPTrace, jax_ad.LinearizeTrace)


def _custom_jvp_traced(trace, *args: Any, fun: Any, jvp: Any, symbolic_zeros: bool) -> list[Any]:
    """The value of a node `trace` records (`Primitive.traced_impl`): in a trace
    recorded for a JVP (`core.jvp_flat`: a scan step's, a cond branch's, a loop
    body's in forward mode), the rule's primal, which JAX's JVP of the body
    computes with the rule's code. A transform enclosing that JVP differentiates
    the code, as in JAX, not the function again by its rule (applied to its
    tangent, a rule need not be linear)."""
    if trace.forward:
        ruled = _rule_primal(args, jvp, symbolic_zeros)
        if ruled is not None:
            return ruled
    return _custom_jvp_impl(*args, fun=fun, jvp=jvp, symbolic_zeros=symbolic_zeros)


def _rule_primal(primals: Sequence[Any], jvp: Any, symbolic_zeros: bool) -> list[Any] | None:
    """The primal outputs of a `custom_jvp` rule at zero tangents, for a value
    an enclosing transform differentiates further; None where that is the
    function's own value (a `defjvps` rule recomputes it with a call of the
    function) or where the rule cannot be asked with zero tangents (symbolic
    zeros: JAX then calls the function, not the rule).

    Under nested differentiation JAX's inner level hands the rule's primal
    outputs to the outer one, which differentiates the rule's code that
    computed them, not the function through its rule again. Where the rule
    computes its primal by code other than the function (TFP's samplers
    recompute the sample with the undifferentiated sampler), the second
    derivative depends on it."""
    if symbolic_zeros or getattr(jvp.f, "__code__", None) is _DEFJVPS_CODE:
        return None
    tangents = [  # (as JAX gives them: arrays a rule may call `.at` on)
        host.to_jax(zeros_like(p))
        if core.is_differentiable(raw(p))
        else np.zeros(np.shape(raw(p)), jax.dtypes.float0)
        for p in primals
    ]
    results = _call_rule(jvp, primals, tangents)
    return list(results[: len(results) // 2])


def _call_rule(jvp: Any, primals: Sequence[Any], tangents: Sequence[Any]) -> Any:
    """A `custom_jvp` rule's outputs (primals, then tangents). It may run more
    than once (forward at a nested level, then in each backward pass): its
    output-structure store is reset first. In the thread's own floating-point
    mode, as JAX calls the user's rule."""
    for store in jvp.stores:
        if store is not None:
            store.reset()
    with host.UNFLUSHED:
        return jvp.call_wrapped(*primals, *tangents)


def _probe_defjvps_code() -> Any:
    """The code object of the JVP rule `custom_jvp.defjvps` builds (JAX 0.10, pinned)."""
    probe = jax.custom_jvp(lambda x: x)
    probe.defjvps(None)
    return probe.jvp.__code__


_DEFJVPS_CODE = _probe_defjvps_code()


def _per_argument_rules(node: Node) -> tuple[Any, Any, Any] | None:
    """For a function whose rule was given with `defjvps` (`jax.nn.relu`, ...): its
    per-argument tangent functions and the input and output trees, else None.

    `defjvps`' rule recomputes the output with a full call of the function (JAX's
    whole `custom_jvp.__call__` entry) before it applies the per-argument
    functions; the output is on the node already, so the VJP calls those
    functions directly. Only JAX's own wrapping (flattening, no `vmap` or
    other transform around the rule) is recognised; anything else takes the
    general path.
    """
    jvp, fun = node.params["jvp"], node.params["fun"]
    f = jvp.f
    if getattr(f, "__code__", None) is not _DEFJVPS_CODE or len(jvp.transforms) != 1:
        return None
    if jvp.transforms[0][0].__name__ != "_flatten_jvp" or len(fun.stores) != 1:
        return None
    try:
        out_tree = fun.stores[0].val[0]  # filled when the function ran, forward
    except lu.StoreException:
        return None
    cells = dict(zip(f.__code__.co_freevars, f.__closure__, strict=True))
    in_tree = jvp.transforms[0][1][2]
    return cells["jvps"].cell_contents, in_tree, out_tree


# No value belongs to it: every operation on it is evaluated, and its results
# stay host values (no round trip through a jax.Array).
_HOST_TRACE = Trace(for_user=False)


def _custom_jvp_host(*args: Any, fun: Any, jvp: Any, symbolic_zeros: bool) -> list[Any]:
    """The function's value on host values: its body, each operation with NumPy
    (the body's results, handed back as its code returned them, read as NumPy).

    A body that is a jaxpr (a `custom_jvp` inside a `jit` body) is evaluated as
    one; a body of JAX's own (`jax.nn.relu`'s) is read into a jaxpr once per
    types (its code says all it computes), skipping `jit`'s Python entry and
    `jax.numpy`'s Python on later calls. A user's body runs each time."""
    args = tuple(map(host.immutable, args))
    f = fun.f
    if type(f) is partial and f.func is jcore.jaxpr_as_fun and not fun.transforms:
        outs = eval_body(_HOST_TRACE, f.args[0], args)
    else:
        read = _read_body(fun, args)
        if read is None:  # the user's body: in the thread's own mode, as in JAX
            with host.UNFLUSHED:
                outs = _HOST_TRACE.run(fun.call_wrapped, *args)
        else:
            closed, out_tree = read
            outs = eval_body(_HOST_TRACE, closed, args)
            # what the flattening wrapper stores when the body runs: JAX's
            # `custom_jvp.__call__` reads the output's structure from it
            fun.stores[0].store((out_tree, [jcore.typeof(o) for o in outs], ()))
    if any(isinstance(o, Tracer) for o in outs):  # (JAX's error for the same function)
        raise jax.errors.UnexpectedTracerError(
            "A jax.custom_jvp function closes over a value being differentiated (its "
            f"output is a traced value though its arguments are not; at {core.user_frame()}). "
            "A custom_jvp function may close over constants only: pass the value as an "
            "argument of the function (its rule then gets its tangent), or make it a "
            "nondiff_argnums argument."
        )
    return [np.asarray(o) if isinstance(o, jax.Array) else o for o in outs]


# (body, its input structure, JAX's tracing context, the types of its
# arguments) -> (its jaxpr, its output structure); bounded as `_TRANSPOSED`
_BODIES: dict[tuple, tuple[Any, Any]] = {}


def _read_body(fun: Any, args: Sequence[Any]) -> tuple[Any, Any] | None:
    """The jaxpr and output structure of a `custom_jvp` body of JAX's own on
    arguments of these types, read once; None for any other body."""
    f = fun.f
    body = getattr(f, "__wrapped__", None) if type(f) is _PJIT_FUNCTION else f
    if not _closed_jax_function(body) or len(fun.transforms) != 1:
        return None
    transform, params = fun.transforms[0]
    if transform.__name__ != "_flatten_fun_nokwargs" or len(fun.stores) != 1:
        return None
    (in_tree,) = params
    types = tuple(map(_concrete_type, args))
    if None in types:
        return None
    key = (f, in_tree, trace_context(), types)
    read = _BODIES.get(key)
    if read is None:

        def flat(*flat_args: Any) -> Any:
            return f(*jax.tree_util.tree_unflatten(in_tree, flat_args))

        closed, shapes = jax.make_jaxpr(flat, return_shape=True)(*args)
        if len(_BODIES) >= _TRANSPOSED_LIMIT:
            core.evict_oldest(_BODIES)
        read = _BODIES[key] = (closed, jax.tree_util.tree_structure(shapes))
    return read


_PJIT_FUNCTION = type(jax.jit(lambda: None))


class _CustomJVP(Primitive):
    """Output: the function's (the rule's primal where a transform enclosing
    this one differentiates it further). VJP: the transpose of the user's JVP rule."""

    def apply(self, trace, args, params):
        return list(core.bind(self, *args, **params))

    def value_below(self, primals, params):
        ruled = _rule_primal(primals, params["jvp"], params["symbolic_zeros"])
        return super().value_below(primals, params) if ruled is None else ruled

    def vjp(self, g: Any, node: Node) -> list[Any]:
        # the rule's operations on these stay on the host (`host.for_user`)
        primals = [host.immutable(p) for p in node.primals]
        outs = [host.immutable(o) for o in node.ans]
        # (None: no cotangent reached that output, JAX's symbolic zero; a rule
        # may refuse any other, as equinox's `nondifferentiable_backward` does)
        cts = list(g) if isinstance(g, tuple) else [g]
        per_argument = _per_argument_rules(node)
        if core.backward_at_zero():
            # forward mode: the rule applied to the tangents, as `jax.jvp` applies
            # it, not its transpose transposed again (a rule JAX can only run
            # forward, e.g. a `lax.while_loop` on the tangents, runs here too)
            jvp = partial(_rule_jvp, node.params, per_argument, len(primals))
            return transposed_jvp(cts, primals, node.argnums, jvp, residuals=outs)
        diff = [i for i, p in enumerate(primals) if core.is_differentiable(raw(p))]
        reached = [ct for ct in cts if ct is not None]
        key = _transposed_rule_key(node, per_argument, (*primals, *outs, *reached))
        if key is None:
            tangent_cts = _transposed_rule(node, per_argument, diff, primals, outs, cts)
        else:  # (its transpose depends on which outputs a cotangent reached)
            key = (*key, tuple(ct is not None for ct in cts))
            tangent_cts = _cached_transposed_rule(key, node, per_argument, diff, primals, outs, cts)
        by_primal = dict(zip(diff, tangent_cts, strict=True))
        return [by_primal[i] for i in node.argnums]


def _transposed_rule(node, per_argument, diff, primals, outs, cts) -> list[Any]:
    """The cotangents of the differentiable primals (`diff`): chainrule's reverse
    pass over the rule's map from their tangents to the output tangents (linear,
    for fixed primals), taken at tangents = 0. None for one that no output with
    a cotangent depends on (an output without one has None in `cts`)."""
    all_diff = diff
    if node.params.get("symbolic_zeros", False) and per_argument is None:
        # a rule asking for symbolic zeros gets JAX's SymbolicZero for each
        # argument this transform does not differentiate (its tangent is zero)
        diff = [i for i in all_diff if i in node.argnums]

        def zero_tangent(p: Any) -> Any:
            return ad_util.SymbolicZero(jcore.typeof(raw(p)).to_tangent_aval())
    else:

        def zero_tangent(p: Any) -> Any:
            return np.zeros(np.shape(raw(p)), jax.dtypes.float0)

    def tangent_map(*diff_tangents: Any) -> list[Any]:
        tangents = [zero_tangent(p) for p in primals]
        for i, t in zip(diff, diff_tangents, strict=True):
            tangents[i] = t
        return _rule_tangents(node.params, per_argument, primals, tangents, outs)

    zeros = [zeros_like(primals[i]) for i in diff]
    checked = linearity.checked(tangent_map, _rule_name(node))
    cts_in = vjp_flat(checked, zeros, cts, linear=True, structural=True)
    got = dict(zip(diff, cts_in, strict=True))
    return [got.get(i) for i in all_diff]


def _rule_tangents(params, per_argument, primals, tangents, outs) -> list[Any]:
    """The output tangents the rule (of the node with `params`) gives for
    `tangents` (one per primal)."""
    if per_argument is not None:
        return _summed_tangents(per_argument, primals, tangents, outs)
    results = _call_rule(params["jvp"], primals, tangents)
    out_ts = [_instantiate(t, o) for t, o in zip(results[len(outs) :], outs, strict=True)]
    for t, o in zip(out_ts, outs, strict=True):
        if np.shape(t) != np.shape(o):  # (JAX's check of a rule's outputs, and its error)
            raise TypeError(
                "Custom JVP rule must produce primal and tangent outputs with "
                f"corresponding shapes and dtypes: the function's output has shape "
                f"{np.shape(o)} but the rule's tangent has shape {np.shape(t)} (under "
                "jax.vmap, an output that does not depend on the batched input is not "
                "batched: compute it from the input, e.g. x * 0)."
            )
    return out_ts


def _rule_jvp(params, per_argument, n, values, tangents) -> list[Any]:
    """The rule's output tangents for the tangents of the traced primals (None
    for the others), as `jax.jvp` calls it: the others' tangents are zeros
    (JAX's `SymbolicZero` for a rule that asks for symbolic zeros, float0 for a
    primal without a derivative). A `forward_only.Jvp`: `values` are the `n`
    primals, then the outputs."""
    primals, outs = values[:n], values[n:]
    symbolic = params.get("symbolic_zeros", False) and per_argument is None
    full = []
    for p, t in zip(primals, tangents[:n], strict=True):
        if t is None:
            if not core.is_differentiable(raw(p)):
                t = np.zeros(np.shape(raw(p)), jax.dtypes.float0)
            elif symbolic:
                t = ad_util.SymbolicZero(jcore.typeof(raw(p)).to_tangent_aval())
            else:  # (as JAX gives them: arrays a rule may call `.at` on)
                t = host.to_jax(zeros_like(p))
        full.append(t)
    return _rule_tangents(params, per_argument, primals, full, outs)


def _rule_name(node: Node) -> str:
    """'the custom_jvp rule of f', naming the function as JAX's debug info does."""
    info = getattr(node.params["fun"], "debug_info", None)
    name = getattr(info, "func_name", None) or "a function"
    return f"the custom_jvp rule of {name}"


# --- the transposed rules of JAX's functions, read once -------------------------------

# (rule, JAX's tracing context, types of its values) -> (plan, consts). An eager
# gradient through `jax.nn.relu` or `jnp.logaddexp` transposes the same rule on
# values of the same types every step; tracing and transposing it each time
# (JAX's `lax` Python, chainrule's trace and reverse pass) costs several times
# evaluating the result. Bounded: the oldest entry goes first.
_TRANSPOSED: dict[tuple, tuple[_Plan, Any]] = {}
_TRANSPOSED_LIMIT = 256
# the code of the rule JAX gives a `custom_jvp` inside a jaxpr (JAX 0.10, pinned)
_LIFT_JVP_CODE = next(
    c for c in lift_jvp.__code__.co_consts if isinstance(c, CodeType) and c.co_name == "jvp"
)


def _transposed_rule_key(node: Node, per_argument: Any, values: Sequence[Any]) -> tuple | None:
    """A key naming what the rule's transpose computes on `values`, where it can
    be read once and reused; None where the rule must run each time.

    Reused: a rule JAX traced into a jaxpr already (a `custom_jvp` function
    inside a `jit` body, `jnp.logaddexp`: JAX itself reuses that trace), and
    `defjvps` rules that are JAX's own functions without closures (`jax.nn.relu`:
    what they compute depends only on their code and arguments' types). A
    user's rule runs each time, as under `jax.grad` (it may read state that
    changes). Only eagerly, on concrete values: under a transform the values
    are traced and the rule is read once anyway.
    """
    if per_argument is not None:
        rules, in_tree, out_tree = per_argument
        codes = []
        for r in rules:
            if r is None:
                codes.append(None)
                continue
            if not _closed_jax_function(r):
                return None
            codes.append(r.__code__)
        rule: Any = ("defjvps", tuple(codes), in_tree, out_tree)
    else:
        jvp = node.params["jvp"]
        f = jvp.f
        if getattr(f, "__code__", None) is not _LIFT_JVP_CODE or jvp.transforms:
            return None
        cells = dict(zip(f.__code__.co_freevars, f.__closure__, strict=True))
        rule = ("jaxpr", cells["jvp_jaxpr_fun"].cell_contents, cells["num_consts"].cell_contents)
    types = []
    for v in values:
        t = _concrete_type(v)
        if t is None:
            return None
        types.append(t)
    # (with symbolic zeros the rule's trace depends on what is differentiated)
    return (rule, trace_context(), tuple(types), tuple(node.argnums))


def _closed_jax_function(f: Any) -> bool:
    """A function of JAX's own modules that closes over nothing and has no
    defaults: its code says all it computes."""
    return (
        type(f) is FunctionType
        and f.__closure__ is None
        and f.__defaults__ is None
        and f.__kwdefaults__ is None
        and (f.__module__ or "").startswith("jax.")
    )


def _concrete_type(v: Any) -> tuple | None:
    """(shape, dtype, weak type) of a concrete array value; None for a traced one."""
    if isinstance(v, (np.ndarray, np.generic)):  # (host values are strongly typed)
        return (v.shape, v.dtype, False)
    if isinstance(v, jax.Array) and not isinstance(v, jcore.Tracer):
        return (v.shape, v.dtype, v.weak_type)
    return None


def _cached_transposed_rule(key, node, per_argument, diff, primals, outs, cts) -> list[Any]:
    """`_transposed_rule`, from a jaxpr of it traced once per `key`, evaluated
    on the host as chainrule evaluates the rule's operations eagerly. (A None
    among `cts`, and among the results, is structure: not a value of the jaxpr.)"""
    given = [ct for ct in cts if ct is not None]
    entry = _TRANSPOSED.get(key)
    if entry is None:
        n_p, n_o = len(primals), len(outs)
        found: list[bool] = []  # which results are not None, read while tracing

        def transposed(*values: Any) -> list[Any]:
            ps, os_, cs = values[:n_p], values[n_p : n_p + n_o], iter(values[n_p + n_o :])
            cs = [None if ct is None else next(cs) for ct in cts]
            results = _transposed_rule(node, per_argument, diff, list(ps), list(os_), cs)
            found[:] = [r is not None for r in results]
            return [r for r in results if r is not None]

        closed = jax.make_jaxpr(transposed)(*primals, *outs, *given)
        # a `defjvps` rule runs eagerly one operation at a time under JAX too;
        # a rule from a jaxpr is compiled with it
        plan = _Plan(closed.jaxpr, xla_masks=per_argument is None)
        if len(_TRANSPOSED) >= _TRANSPOSED_LIMIT:
            core.evict_oldest(_TRANSPOSED)
        entry = _TRANSPOSED[key] = (plan, closed.consts, tuple(found))
    plan, consts, found = entry
    results = iter(_run_plan(_HOST_TRACE, plan, consts, [*primals, *outs, *given]))
    return [next(results) if f else None for f in found]


def _summed_tangents(per_argument, primals, tangents, outs) -> list[Any]:
    """The output tangents as `defjvps` defines them: for each argument with a
    rule and a differentiable leaf, `rule(its tangent, output, *primals)`, summed."""
    rules, in_tree, out_tree = per_argument
    py_primals = jax.tree_util.tree_unflatten(in_tree, primals)
    py_tangents = jax.tree_util.tree_unflatten(in_tree, tangents)
    py_out = jax.tree_util.tree_unflatten(out_tree, outs)
    total: list[Any] | None = None
    for rule, arg, t in zip(rules, py_primals, py_tangents, strict=True):
        if rule is None or not any(map(core.is_differentiable, jax.tree_util.tree_leaves(arg))):
            continue  # its tangent is zero: it adds nothing
        leaves, tree = jax.tree_util.tree_flatten(rule(t, py_out, *py_primals))
        if tree != out_tree:
            raise TypeError(
                f"a defjvps rule returned a tangent of structure {tree}, where the "
                f"function's output has structure {out_tree}"
            )
        leaves = [_instantiate(t, o) for t, o in zip(leaves, outs, strict=True)]
        total = leaves if total is None else list(map(core.add_cotangents, total, leaves))
    return [zeros_like(o) for o in outs] if total is None else total


PRIMITIVES["custom_jvp_call"] = _CustomJVP(
    "custom_jvp_call",
    _custom_jvp_impl,
    ("fun", "jvp", "symbolic_zeros"),
    multiple_results=True,
    host_impl=_custom_jvp_host,
)
# (its body runs once: an error in it is the user's, JAX's version is not tried)
PRIMITIVES["custom_jvp_call"].host_errors_fall_back = False
PRIMITIVES["custom_jvp_call"].traced_impl = _custom_jvp_traced


# --- custom_vjp ------------------------------------------------------------------------


def _custom_vjp_impl(
    *args: Any, fun, fwd, bwd, out_trees, symbolic_zeros, perturbed=None
) -> list[Any]:
    """Runs the user's fwd on the trace outside; returns the outputs, then the residuals.

    `perturbed` says which arguments a transform traces (`_CustomVJP.apply`): as
    JAX's nonzero tangents, they tell fwd which inputs are differentiated (its
    `symbolic_zeros` view), and a constant the call closes over (the data a
    `jit` body hoisted, `odeint`'s) is not, as JAX requires of closed-over
    values."""
    if perturbed is None:
        perturbed = [core.is_differentiable(raw(a)) for a in args]
    args = tuple(map(host.immutable, args))  # (host values as the user's code gets them)
    fwd_in = [x for a, p in zip(args, perturbed, strict=True) for x in (a, p)]
    with host.UNFLUSHED:  # (the user's fwd: in the thread's own mode, as in JAX)
        results = fwd.call_wrapped(*fwd_in)
    _, res_tree, input_fwds = out_trees()
    n_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
    res_out, outs = results[:n_res_out], results[n_res_out:]
    # an output fwd computed from Python numbers alone is still the call's
    # output, differentiated by bwd (as JAX's are): an array, so it is traced
    outs = [jax.numpy.asarray(o) if type(o) in (int, float, complex) else o for o in outs]
    res_out = iter(res_out)
    residuals = [args[f] if f is not None else next(res_out) for f in input_fwds]
    return [*outs, *residuals]


class _CustomVJP(Primitive):
    """Output = the user's fwd; VJP = the user's bwd on the saved residuals."""

    def apply(self, trace, args, params):
        perturbed = tuple(  # (what this trace differentiates: JAX's nonzero tangents)
            isinstance(a, Tracer) and a._trace is trace and core.is_differentiable(raw(a))
            for a in args
        )
        # (runs fwd, which fills out_trees)
        outs = list(core.bind(self, *args, perturbed=perturbed, **params))
        return outs[: params["out_trees"]()[0].num_leaves]

    def vjp(self, g, node):
        if core.backward_at_zero():  # forward mode: the user gave a bwd, not a JVP
            raise ForwardModeError(
                "can't apply forward-mode autodiff (jvp) to a custom_vjp function (as "
                "jax.jvp refuses it too): its bwd rule need not be the transpose of any "
                "linear map. Use cr.vjp/cr.grad/cr.jacrev, or give the function a "
                "jax.custom_jvp rule instead."
            )
        params = node.params
        n_out = params["out_trees"]()[0].num_leaves
        outs, residuals = node.ans[:n_out], node.ans[n_out:]
        gs = g[:n_out] if isinstance(g, tuple) else g
        cts = _cotangents(gs, outs)
        if params["symbolic_zeros"]:  # the outputs no cotangent reached: JAX's SymbolicZero
            reached = gs if isinstance(gs, tuple) else (gs,)
            cts = [
                ct if r is not None else ad_util.SymbolicZero(jcore.typeof(o).to_tangent_aval())
                for ct, r, o in zip(cts, reached, outs, strict=True)
            ]
        # the user's bwd gets what JAX gives it: jax.Arrays, not the host's
        # NumPy values (it may index them with a tracer, in a scan of its own)
        args = list(map(host.to_jax, [*residuals, *cts]))
        with host.UNFLUSHED:  # (the user's bwd: in the thread's own mode, as in JAX)
            cts_in = params["bwd"].call_wrapped(*args)
        return [_instantiate(cts_in[i], node.primals[i]) for i in node.argnums]


PRIMITIVES["custom_vjp_call"] = _CustomVJP(
    "custom_vjp_call",
    _custom_vjp_impl,
    ("fun", "fwd", "bwd", "out_trees", "symbolic_zeros", "perturbed"),
    multiple_results=True,
)
# As in JAX, an enclosing transform differentiates through fwd (its residuals
# are then ordinary functions of the inputs) and through bwd (second order).
PRIMITIVES["custom_vjp_call"].runs_outside = True


# --- linear_call ------------------------------------------------------------------------


class _LinearCall(Primitive):
    """`jax.custom_derivatives.linear_call(fun, fun_transpose, residuals, linear)`:
    linear in its last operands; the VJP is the user's transpose, bound as a
    linear_call whose own transpose is `fun` again (so it differentiates again).
    Residuals take no gradient, as in JAX."""

    def vjp(self, g, node):
        p = node.params
        n_fixed = p["num_callee_consts"] + p["num_res"]
        fixed = [i for i in node.argnums if i < n_fixed]
        if fixed:
            raise NotDifferentiableError(
                "linear_call", f"{fixed[0]} (a constant or residual)", core.user_frame()
            )
        f_consts = node.primals[: p["num_callee_consts"]]
        residuals = node.primals[p["num_callee_consts"] : n_fixed]
        transpose, t_consts = p["transpose_thunk"]()
        callee = p["callee"]
        cts = _cotangents(g, node.ans)
        cts_in = jax_linear_call_p.bind(
            *t_consts,
            *residuals,
            *cts,
            callee=transpose,
            transpose_thunk=lambda: (callee, list(f_consts)),
            num_callee_consts=len(t_consts),
            num_res=len(residuals),
        )
        return [cts_in[i - n_fixed] for i in node.argnums]


PRIMITIVES["linear_call"] = _LinearCall(
    "linear_call",
    lambda *args, **params: jax_linear_call_p.bind(*args, **params),
    ("callee", "transpose_thunk", "num_callee_consts", "num_res"),
    multiple_results=True,
)


# --- lax.composite -------------------------------------------------------------------------


class _RefusedAsInJAX(Primitive):
    """A primitive JAX evaluates but does not differentiate (`lax.composite`):
    evaluated by JAX where nothing of chainrule's is involved, and refused with
    JAX's error type where it would have to be differentiated."""

    def apply(self, trace, args, params):
        raise ValueError(
            f"'{self.name}' is not differentiable, in JAX either (jax.grad raises "
            f"'JVP rule for {self.name} not implemented') (used at {core.user_frame()}). "
            "Differentiate its decomposition instead (call the function you passed to "
            "lax.composite directly), or give it a rule with jax.custom_jvp/custom_vjp."
        )

    def apply_untraced(self, trace, args, params):
        return NotImplemented  # JAX evaluates it on the trace outside


PRIMITIVES["composite"] = _RefusedAsInJAX("composite", impl=None)
