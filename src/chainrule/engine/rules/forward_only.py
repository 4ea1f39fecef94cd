"""Forward mode through primitives that have no VJP, as `jax.jvp` goes through them.

A `lax.while_loop` (its number of steps unknown to reverse mode), a generic
`lax.reduce_window` and pooling with window dilation have no reverse-mode
derivative, in JAX either, but they do have a JVP. chainrule's forward mode
is the transpose of its reverse mode (`chainrule.engine.forward`): the
backward pass is recorded at a zero cotangent and transposed. In that pass
(`core.backward_at_zero()`), such a primitive's VJP rule returns
`transposed_jvp(...)`: one `forward_only` node, linear in the cotangents of
the primitive's outputs, whose value is zeros (the pass's values are never
read: the cotangents are zero) and whose own VJP, the transpose of a
transpose, is the primitive's JVP. Outside that pass the rule raises, as
JAX's reverse mode does.

A body that holds such a primitive (a `scan` step, a `cond` branch, a
`jax.checkpoint` body) is differentiated in reverse by a VJP of the body
traced into a jaxpr, where a `forward_only` node could only be a constant.
So in the pass at zero those call-like rules ask `needs_forward(body)` and, when it
is true, answer with `transposed_jvp` too: their JVP runs the body forward
with its tangents (`core.jvp_flat`), where the inner primitive takes this
same path. A `custom_jvp` call in the body counts too: forward mode applies
its rule to the tangents (`rules.calls`), which need not be linear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jax._src import core as jcore  # jaxpr equations (JAX 0.10, pinned)
from jax._src.util import weakref_lru_cache

from chainrule.engine import core
from chainrule.engine.core import Primitive, zeros_like

Jvp = Callable[[Sequence[Any], Sequence[Any]], Sequence[Any]]
"""`jvp(values, tangents) -> output tangents`: `values` are the primals, then
the residuals of `transposed_jvp`; one tangent per value, None where it is zero
(always, for a residual); one tangent per output (None for a non-float output)."""


def transposed_jvp(
    cts: Sequence[Any],
    primals: Sequence[Any],
    argnums: Sequence[int],
    jvp: Jvp,
    residuals: Sequence[Any] = (),
):
    """A VJP rule's answer in forward mode's backward pass at zero: the
    cotangents of the traced operands `argnums`, as one `forward_only` node.

    `cts` has one entry per output of the primitive (None where none arrived).
    `jvp` gets `primals` followed by `residuals` (arrays it needs beside them,
    e.g. the primitive's outputs) as its first argument, and must close over
    no array: the node holds them as operands, so that a tape handed out of
    `jit` (`cr.linearize`'s linear map) carries them as its leaves."""
    reached = tuple(j for j, ct in enumerate(cts) if ct is not None)
    return core.bind(
        FORWARD_ONLY,
        *[cts[j] for j in reached],
        *primals,
        *residuals,
        argnums=tuple(argnums),
        jvp=jvp,
        reached=reached,
    )


def jvp_at(
    fun: Callable[..., Sequence[Any]],
    values: Sequence[Any],
    positions: Sequence[int],
    tangents: Sequence[Any],
) -> tuple[list[Any], list[Any]]:
    """`(fun(*values), its tangents)` for `tangents` of the operands at
    `positions` (the others held fixed), by `core.jvp_flat`: the JVP of a body
    that scan, cond and checkpoint answer with in forward mode's pass at zero."""

    def at(*moved: Any) -> Sequence[Any]:
        full = list(values)
        for i, v in zip(positions, moved, strict=True):
            full[i] = v
        return fun(*full)

    return core.jvp_flat(at, [values[i] for i in positions], tangents)


_ONLY_FORWARD: dict[str, Callable[[dict[str, Any]], bool]] = {}


def register_forward_only(
    name: str, when: Callable[[dict[str, Any]], bool] = lambda params: True
) -> None:
    """Declares that the primitive `name`, with parameters for which `when`
    holds, has a JVP but no VJP (its rule answers with `transposed_jvp`)."""
    _ONLY_FORWARD[name] = when


_FORWARD_TESTS: list[Callable[[Any], bool]] = []


def register_forward_test(test: Callable[[Any], bool]) -> None:
    """Declares that JAX primitives for which `test(primitive)` holds answer in
    the pass at zero with `transposed_jvp` (`rules.foreign`: another library's)."""
    _FORWARD_TESTS.append(test)


def needs_forward(jaxpr: Any) -> bool:
    """Whether `jaxpr` (closed or open), or a jaxpr inside it, holds an
    equation that `register_forward_only` names: forward mode then goes
    through the enclosing call by its JVP (see the module docstring)."""
    return _needed(getattr(jaxpr, "jaxpr", jaxpr))


# Calls whose rules never differentiate their body's jaxpr: a custom rule's VJP
# is the user's `bwd` (or the transposed JVP rule), so a while loop in the
# function's own body (in a `custom_vjp`'s `fwd`) is never differentiated. (A
# `custom_jvp` call itself needs forward mode's JVP, for its rule: `_needed`.)
_RULE_NOT_BODY = frozenset({"custom_jvp_call", "custom_vjp_call"})


@weakref_lru_cache
def _needed(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        when = _ONLY_FORWARD.get(name)
        if when is not None and when(eqn.params):
            return True
        if any(test(eqn.primitive) for test in _FORWARD_TESTS):
            return True
        if name == "custom_jvp_call":  # its rule, applied to the tangents, need not be linear
            return True
        if name not in _RULE_NOT_BODY and any(
            _needed(sub) for sub in jcore.jaxprs_in_params(eqn.params)
        ):
            return True
    return False


def _zeros(*operands: Any, argnums, jvp, reached) -> list[Any]:
    primals = operands[len(reached) :]
    return [zeros_like(primals[i]) for i in argnums]


class _ForwardOnly(Primitive):
    """Operands: the cotangents of the outputs `reached`, then the primals and
    residuals the JVP reads. Linear in the cotangents (its value is zeros in
    the pass at zero, whatever the primals: it depends on them through
    nothing a backward pass follows); its VJP is the JVP."""

    def vjp(self, g: Any, node: core.Node) -> list[Any]:
        params = node.params
        n = len(params["reached"])
        primals = node.primals[n:]
        ts = list(g) if isinstance(g, tuple) else [g]
        tangents: list[Any] = [None] * len(primals)
        for i, t in zip(params["argnums"], ts, strict=True):
            tangents[i] = t
        out_tangents = params["jvp"](primals, tangents)
        return [out_tangents[params["reached"][k]] if k < n else None for k in node.argnums]


FORWARD_ONLY = _ForwardOnly(
    "forward_only", _zeros, ("argnums", "jvp", "reached"), multiple_results=True
)
