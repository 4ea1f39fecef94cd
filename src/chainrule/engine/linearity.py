"""Which primitives are linear in which operands, and tapes checked against it.

A linear map's transpose is its VJP at any point, so chainrule transposes
what it knows to be linear by running its reverse pass: `cr.linear_transpose`
(any function) and the tangent map of a `custom_jvp` rule (or of a library's
JVP rule, `rules/foreign.py`). This module says whether a recorded tape is
linear in its inputs:

* `nonlinear_node` (for `cr.linear_transpose`): the first node not *known* to
  be linear, from the table below; anything it does not list is refused.
* `known_nonlinear_node` (for the rules): the first node known *not* to be
  linear: a primitive neither in the table nor transposable by JAX (`sin`,
  `integer_pow`, `max`, `clamp`), or a bilinear one with both operands traced
  (`t * t`). A primitive JAX can transpose but the table does not list (a
  collective), a call-like one (a loop, a branch) and a library's own
  primitive pass: a rule linear in its tangents must never be refused.
* `untraced_use`: a value with no derivative computed from the inputs (`t > 0`,
  `sign(t)`) that the outputs depend on: a nonlinear use either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax.numpy as jnp
from jax._src import core as jcore
from jax._src.interpreters import ad

from chainrule.engine import core
from chainrule.engine.core import Tracer
from chainrule.errors import NotLinearError

# Primitives linear in all their traced operands together (add, reshape, ...),
# and those linear in one traced operand at a time (bilinear: mul, dot_general)
# or in one of them (div: its numerator). Anything else on the path from the
# inputs to the outputs makes the function nonlinear (or unknown to be linear).
_LINEAR = frozenset(
    """add add_any sub neg reduce_sum reshape squeeze expand_dims broadcast_in_dim
    transpose convert_element_type copy copy_p slice dynamic_slice dynamic_update_slice
    concatenate stack split tile pad gather scatter-add scatter select_n rev cumsum
    real imag conj complex reduce_precision projection fft reduce_window_sum
    xla_metadata_value""".split()
)
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
_LINEAR_IN = {"div": (0,), "triangular_solve": (1,)}


def linear_in(name: str, params: dict, lin: Sequence[bool]) -> list[bool] | None:
    """Which outputs of the primitive `name` depend (linearly) on its operands
    flagged in `lin`; None when it is not linear in them together. A loop, a
    checkpoint, a cond or a custom_jvp function (as JAX: its own definition, not
    its rule) is as linear as the jaxpr(s) it carries."""
    dep = {i for i, flag in enumerate(lin) if flag}
    if not dep:
        return []  # (no output depends on the linear inputs)
    if (
        name in _LINEAR
        or (name in _BILINEAR and len(dep) == 1)
        or dep <= set(_LINEAR_IN.get(name, ()))
    ):
        return [True]
    if name == "scan":
        body, n_c, n_k = params["jaxpr"].jaxpr, params["num_consts"], params["num_carry"]
        consts, carry, xs = list(lin[:n_c]), list(lin[n_c : n_c + n_k]), list(lin[n_c + n_k :])
        while True:  # a carry is linear if its initial value or its update is
            outs = jaxpr_linear(body, consts + carry + xs)
            if outs is None:
                return None
            new = [c or o for c, o in zip(carry, outs[:n_k], strict=True)]
            if new == carry:
                return carry + outs[n_k:]
            carry = new
    if name in ("remat2", "checkpoint"):
        return jaxpr_linear(params["jaxpr"], list(lin))
    if name in ("pjit", "jit", "closed_call", "core_call"):
        jaxpr = params.get("jaxpr", params.get("call_jaxpr"))
        return jaxpr_linear(getattr(jaxpr, "jaxpr", jaxpr), list(lin))
    if name == "custom_jvp_call":  # (as JAX does: its function, not its rule)
        return jaxpr_linear(params["call_jaxpr"].jaxpr, list(lin))
    if name == "cond":
        if lin[0]:  # the branch taken depends on the inputs
            return None
        outs = [jaxpr_linear(b.jaxpr, list(lin[1:])) for b in params["branches"]]
        if any(o is None for o in outs):
            return None
        return [any(flags) for flags in zip(*outs, strict=True)]
    if name == "custom_linear_solve":  # linear in b, the operands after the solvers' consts
        if min(dep) < sum(params["const_lengths"]):
            return None
        return [True]
    return None


def jaxpr_linear(jaxpr: Any, lin: Sequence[bool]) -> list[bool] | None:
    """Which outputs of `jaxpr` depend on its inputs flagged in `lin`, all
    linearly; None if one depends on them nonlinearly (or not known-linearly)."""
    flags: dict[Any, bool] = dict(zip(jaxpr.invars, lin, strict=True))

    def read(v: Any) -> bool:
        return not isinstance(v, jcore.Literal) and flags.get(v, False)

    for eqn in jaxpr.eqns:
        lin_in = [read(v) for v in eqn.invars]
        outs = linear_in(eqn.primitive.name, eqn.params, lin_in)
        if outs is None:
            return None
        if len(outs) == 1 and len(eqn.outvars) > 1:
            outs = outs * len(eqn.outvars)
        for v, flag in zip(eqn.outvars, outs or [False] * len(eqn.outvars), strict=True):
            if flag and not jnp.issubdtype(v.aval.dtype, jnp.inexact):
                return None  # (a cast to an integer: refused, as on the tape)
            flags[v] = flag
    return [read(v) for v in jaxpr.outvars]


def untraced_use(
    outputs: Sequence[Any], trace: core.Trace, ignore: frozenset[str] = frozenset()
) -> str | None:
    """The operation that made an untraced value from the inputs (`x > 0`,
    `stop_gradient(x)`) which reaches the outputs: as an output itself, or as
    a constant operand of a recorded node they depend on; None if none does
    (a check whose result is dropped, or read only for its shape). Operations
    named in `ignore` are not counted."""
    uses = trace.untraced_uses or {}

    def use(x: Any) -> str | None:
        found = uses.get(core.untraced_key(x))
        return None if found is None or found[0] in ignore else found[0]

    for o in outputs:
        if not (isinstance(o, Tracer) and o._trace is trace) and use(o):
            return use(o)
    for node in tape(outputs, trace):
        for i, p in enumerate(node.primals):
            if i not in node.argnums and use(p):
                return use(p)
    return None


def tape(outputs: Sequence[Any], trace: core.Trace) -> Iterator[core.Node]:
    """The recorded nodes the outputs depend on, walking back from them."""
    stack = [o.node for o in outputs if isinstance(o, Tracer) and o._trace is trace]
    seen: set[core.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen or node.prim is None:
            continue
        seen.add(node)
        yield node
        stack.extend(node.parents)


def _known_linear(node: core.Node) -> bool | None:
    """Whether the table says `node` is linear in its traced operands; None when
    its parameters are laid out otherwise (not known either way)."""
    n = max(len(node.primals), max(node.argnums, default=-1) + 1)
    lin = [i in node.argnums for i in range(n)]
    try:
        return linear_in(node.prim.name, node.params, lin) is not None
    except (KeyError, AttributeError, TypeError):
        return None


def nonlinear_node(outputs: Sequence[Any], trace: core.Trace) -> core.Node | None:
    """The first recorded node (walking back from `outputs`) that is not known
    to be linear in the traced inputs, or None: a look at the tape, no second run."""
    for node in tape(outputs, trace):
        if not _known_linear(node) and not _library_transposable(node.prim):
            return node
    return None


def _library_transposable(prim: Any) -> bool:
    """Another library's primitive (`rules/foreign.py`) with a transpose rule
    registered with JAX: linear, as `jax.linear_transpose` reads it, and
    transposed by that rule (in a trace marked `linear`)."""
    jax_primitive = getattr(prim, "jax_primitive", None)
    return jax_primitive is not None and jax_primitive in ad.primitive_transposes


@functools.cache
def _transposable() -> frozenset[str]:
    """The names of the primitives JAX has a transpose rule for, read once: JAX's
    own register theirs when JAX is imported (a library's primitive, which may
    register later, is told apart by `_library_transposable`, not by this)."""
    return frozenset(p.name for p in ad.primitive_transposes)


def _carries_jaxprs(params: dict) -> bool:
    """A call-like primitive (a loop, a branch, a `jit` body): as linear as what
    it carries, which `linear_in` reads for the ones it knows."""
    jaxprs = (jcore.Jaxpr, jcore.ClosedJaxpr)
    for v in params.values():
        if isinstance(v, (tuple, list)) and v:
            v = v[0]  # (`cond`'s branches)
        if isinstance(v, jaxprs) or callable(v):
            return True
    return False


def known_nonlinear_node(outputs: Sequence[Any], trace: core.Trace) -> core.Node | None:
    """The first recorded node (walking back from `outputs`) known not to be
    linear in the traced inputs (see the module's docstring), or None."""
    for node in tape(outputs, trace):
        if _known_linear(node) is not False:
            continue  # (linear, or not known either way)
        name = node.prim.name
        if name in _BILINEAR or name in _LINEAR_IN:
            return node  # (both factors traced, or a traced divisor)
        if (
            core.PRIMITIVES.get(name) is not node.prim  # (a library's: unknown here)
            or name in _transposable()
            or _carries_jaxprs(node.params)
        ):
            continue
        return node
    return None


def checked(tangent_map: Callable[..., list[Any]], rule: str) -> Callable[..., list[Any]]:
    """`tangent_map` (a rule's map from the traced tangents to the output
    tangents, run once by `core.vjp_flat`), refused with `NotLinearError` where
    it is known not to be linear in them (`require_linear`). `rule` names the
    rule in the error."""

    def run(*traced: Any) -> list[Any]:
        trace = next((t._trace for t in traced if isinstance(t, Tracer)), None)
        if trace is not None and trace.untraced_uses is None:
            trace.untraced_uses = {}  # (watched from here: what it computes untraced)
        outs = tangent_map(*traced)
        if trace is not None:
            require_linear(outs, trace, rule)
        return outs

    return run


def require_linear(outputs: Sequence[Any], trace: core.Trace, rule: str) -> None:
    """Raises `NotLinearError` if the tangent map that computed `outputs` from
    the inputs of `trace` (watched, see `checked`) is known not to be linear.

    A rule's tangent map is transposed by chainrule's reverse pass at zero
    tangents, which is its transpose only when the map is linear; a rule that
    squares or clips its tangents would give its slope at zero (often 0)
    silently, where `jax.grad` raises (no transpose rule for the nonlinear
    primitive)."""
    outputs = [o for o in outputs if o is not None]
    use = untraced_use(outputs, trace, ignore=_transposable())  # (a cast to an integer)
    node = None if use is not None else known_nonlinear_node(outputs, trace)
    if use is None and node is None:
        return
    what = (
        f"'{use}', whose result has no derivative (a comparison, a rounding, stop_gradient)"
        if use is not None
        else f"'{node.prim.name}' (to operand(s) {list(node.argnums)})"
    )
    raise NotLinearError(
        f"{rule} is not linear in its tangents: it applies {what} to values computed "
        "from them. Reverse mode (cr.grad, cr.vjp, cr.jacrev, cr.hessian) differentiates "
        "such a rule by transposing its tangent map, and only a linear map has a "
        "transpose; jax.grad refuses it too (cr.jvp, like jax.jvp, applies the rule "
        "itself). A JVP rule must be linear in the tangents (e.g. `t * cos(x)`); "
        "to clip or rescale gradients use jax.custom_vjp, whose bwd may do anything."
    )
