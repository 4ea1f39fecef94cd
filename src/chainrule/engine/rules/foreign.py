"""Primitives of other libraries, differentiated by the rules they register with JAX.

A library may define its own JAX primitives (equinox's `maybe_set`,
`select_if_vmap`, `nondifferentiable_backward` and `noinline`, which
diffrax's adjoints and equinox's while loops use; a user's
`jax.extend.core.Primitive`) and register their derivatives with JAX: a JVP
rule in `ad.primitive_jvps` and, for a primitive that is linear in some
operands, a transpose rule in `ad.primitive_transposes`. Those rules are that
library's code, as a `custom_jvp` rule is the user's, and chainrule
differentiates through them the way it differentiates through a `custom_jvp`
(`rules.calls`): the VJP of such a node is chainrule's own reverse pass over
the JVP rule's map from the traced operands' tangents to the output tangents
(linear in the tangents for fixed primals), taken at zero tangents. Inside
that map the rule applies primitives to tangents; where it applies the
library's primitive itself (the tangent of `select_if_vmap` is a
`select_if_vmap` of the tangents), that use is linear, and its VJP is the
library's transpose rule, called as JAX calls it (`ad.UndefinedPrimal` for
the linear operands).

Primitives of JAX itself never come here, whatever JAX registers for them: each
one chainrule supports has its own rule in this table, and the rest raise
`NoVJPRuleError` (chainrule never runs JAX's differentiation of JAX's
operations). Higher orders and forward mode work as for every rule: the
pass over the library's rules is recorded by chainrule's trace like any
other code.

Example (a primitive with a JVP rule, defined outside JAX):
    >>> import jax, jax.numpy as jnp
    >>> from jax.extend.core import Primitive
    >>> from jax.interpreters import ad
    >>> import chainrule as cr
    >>> cube_p = Primitive("cube")
    >>> _ = cube_p.def_impl(lambda x: x**3)
    >>> _ = cube_p.def_abstract_eval(lambda x: x)
    >>> ad.primitive_jvps[cube_p] = lambda p, t: (cube_p.bind(p[0]), 3 * p[0] ** 2 * t[0])
    >>> float(cr.grad(lambda x: cube_p.bind(x))(2.0))
    12.0
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from jax._src import ad_util
from jax._src import core as jcore  # typeof, Primitive (JAX 0.10, pinned)
from jax._src.interpreters import ad  # the rules libraries register (JAX 0.10, pinned)

from chainrule.engine import core, host, linearity
from chainrule.engine.core import Node, Primitive, raw, vjp_flat, zeros_like
from chainrule.engine.rules.calls import _instantiate
from chainrule.engine.rules.forward_only import register_forward_test, transposed_jvp
from chainrule.engine.rules.registry import PRIMITIVES
from chainrule.errors import NoVJPRuleError


def _for_library(values: Sequence[Any]) -> list[Any]:
    """Values handed to the library's code as JAX hands them: host values as
    `jax.Array`s (its code may use `.at[...]`, `.devices()`), the rest as they are."""
    return [host.to_jax(v) if isinstance(v, host.HOST_TYPES) else v for v in values]


def _bind(jax_primitive: Any, *args: Any, **params: Any) -> Any:
    return jax_primitive.bind(*_for_library(args), **params)


class _Foreign(Primitive):
    """A primitive of another library. Output: that library's implementation
    (JAX binds it below this trace). VJP: the transpose of its JVP rule, or,
    for a `linear` use with a transpose rule registered, that rule."""

    def __init__(self, jax_primitive: Any, linear: bool):
        super().__init__(
            jax_primitive.name,
            partial(_bind, jax_primitive),
            multiple_results=jax_primitive.multiple_results,
        )
        self.jax_primitive = jax_primitive
        self.linear = linear

    def taken(self, params: dict[str, Any]) -> dict[str, Any]:
        return params  # (all of them the library's primitive's own)

    def vjp(self, g: Any, node: Node) -> list[Any]:
        primals, argnums = _for_library(node.primals), list(node.argnums)
        outs = _for_library(node.ans if self.multiple_results else [node.ans])
        if core.backward_at_zero() and self.jax_primitive in ad.primitive_jvps:
            # forward mode: the library's JVP rule itself, as `jax.jvp` runs it
            jvp = partial(_forward, self.jax_primitive, node.params, len(primals))
            return transposed_jvp(_as_list(g), primals, argnums, jvp, residuals=outs)
        if self.linear and self.jax_primitive in ad.primitive_transposes:
            return _transposed(self.jax_primitive, g, primals, outs, argnums, node.params)
        return _transposed_jvp(self, g, primals, outs, argnums, node.params)


def _forward(jax_primitive, params, n, values, tangents) -> list[Any]:
    """The output tangents by the library's JVP rule (a `forward_only.Jvp`:
    `values` are the `n` primals, then the outputs)."""
    primals, outs = values[:n], values[n:]
    tangents = [
        ad_util.Zero(_tangent_type(p)) if t is None else t
        for p, t in zip(primals, _for_library(tangents[:n]), strict=True)
    ]
    with host.UNFLUSHED:
        # (tuples, as JAX's JVPTrace hands them: equinox's vprim rules build
        # `vmap` in_axes from them, and a list is not a tuple's prefix)
        rule = ad.primitive_jvps[jax_primitive]
        _, out_tangents = rule(tuple(primals), tuple(tangents), **params)
    out_tangents = list(out_tangents) if jax_primitive.multiple_results else [out_tangents]
    return [_instantiate(t, o) for t, o in zip(out_tangents, outs, strict=True)]


def _tangent_type(x: Any) -> Any:
    return jcore.typeof(raw(x)).to_tangent_aval()


def _transposed(jax_primitive, g, primals, outs, argnums, params) -> list[Any]:
    """The library's transpose rule, called as JAX's backward pass calls it:
    the linear operands as `ad.UndefinedPrimal`s, a symbolic zero for an
    output no cotangent reached."""
    args = list(primals)
    for i in argnums:
        args[i] = ad.UndefinedPrimal(jcore.typeof(raw(primals[i])))
    if jax_primitive.multiple_results:
        given = _for_library(_as_list(g))
        cts: Any = [
            ad_util.Zero(_tangent_type(o)) if ct is None else ct
            for ct, o in zip(given, outs, strict=True)
        ]
    else:
        cts = _for_library([g])[0]
    got = ad.primitive_transposes[jax_primitive](cts, *args, **params)
    if got is ad_util.Zero:  # (the class: every cotangent is a symbolic zero)
        return [None] * len(argnums)
    return [_structural(got[i]) for i in argnums]


# the primitives whose JVP rule is being transposed for a linear use, per thread:
# a rule that applies the primitive to its tangents again, with no transpose
# rule registered, would otherwise recurse without end
_transposing = threading.local()


def _transposed_jvp(prim: _Foreign, g, primals, outs, argnums, params) -> list[Any]:
    """Chainrule's reverse pass over the JVP rule's tangent map, at zero tangents."""
    jax_primitive = prim.jax_primitive
    jvp = ad.primitive_jvps.get(jax_primitive)
    active = getattr(_transposing, "active", None)
    if active is None:
        active = _transposing.active = set()
    if jvp is None or (prim.linear and jax_primitive in active):
        raise NoVJPRuleError(
            jax_primitive.name,
            detail="the library defining it registered "
            + (
                "no JVP rule with JAX (jax.interpreters.ad.primitive_jvps)"
                if jvp is None
                else "no transpose rule with JAX (jax.interpreters.ad.primitive_transposes) "
                "for its linear use in its own JVP rule"
            ),
        )
    cts = _for_library(_as_list(g))  # (None: JAX's symbolic zero, which seeds nothing)

    def tangent_map(*traced: Any) -> list[Any]:
        tangents = [ad_util.Zero(_tangent_type(p)) for p in primals]
        for i, t in zip(argnums, traced, strict=True):
            tangents[i] = t
        with host.UNFLUSHED:  # (the library's code, in the thread's own mode)
            _, out_tangents = jvp(tuple(primals), tuple(tangents), **params)  # (as JAX's)
        out_tangents = list(out_tangents) if jax_primitive.multiple_results else [out_tangents]
        return [_instantiate(t, o) for t, o in zip(out_tangents, outs, strict=True)]

    rule = f"the JVP rule of the primitive '{jax_primitive.name}'"
    checked = linearity.checked(tangent_map, rule)
    zeros = [zeros_like(primals[i]) for i in argnums]
    if not prim.linear:
        return vjp_flat(checked, zeros, cts, linear=True, structural=True)
    active.add(jax_primitive)  # (until its map is traced and pulled back)
    try:
        return vjp_flat(checked, zeros, cts, linear=True, structural=True)
    finally:
        active.discard(jax_primitive)


def _structural(ct: Any) -> Any:
    """A transpose rule's cotangent, None for JAX's symbolic zero (or its class)."""
    if ct is None or ct is ad_util.Zero or isinstance(ct, (ad_util.Zero, ad_util.SymbolicZero)):
        return None
    return ct


def _as_list(g: Any) -> list[Any]:
    return list(g) if isinstance(g, tuple) else [g]


# --- which primitives are another library's -------------------------------------------

_JAX_OWN: set[Any] = set()  # primitives found in JAX's modules
_SCANNED: set[str] = set()  # JAX modules already read (a module imported later is read then)
_RULES: dict[tuple[Any, bool], _Foreign | None] = {}


def jax_own(jax_primitive: Any) -> bool:
    """Whether JAX itself defines `jax_primitive` (a global of one of its modules)."""
    if jax_primitive in _JAX_OWN:
        return True
    for name, module in list(sys.modules.items()):
        if name in _SCANNED or not (name == "jax" or name.startswith(("jax.", "jaxlib."))):
            continue
        _SCANNED.add(name)
        for value in list(getattr(module, "__dict__", {}).values()):
            if isinstance(value, jcore.Primitive):
                _JAX_OWN.add(value)
    return jax_primitive in _JAX_OWN


def foreign_rule(jax_primitive: Any, linear: bool) -> Primitive | None:
    """The rule for a primitive of another library met on a trace's values
    (`linear`: a linear map's), or None where that library registered none
    with JAX (or the primitive is JAX's own)."""
    key = (jax_primitive, linear)
    if key in _RULES:
        return _RULES[key]
    rule = None
    if not jax_own(jax_primitive) and (
        jax_primitive in ad.primitive_jvps or (linear and jax_primitive in ad.primitive_transposes)
    ):
        rule = _Foreign(jax_primitive, linear)
    _RULES[key] = rule
    return rule


def _answers_forward(jax_primitive: Any) -> bool:
    """A body holding this primitive goes forward by its JVP (`forward_only`)."""
    return (
        jax_primitive.name not in PRIMITIVES
        and jax_primitive in ad.primitive_jvps
        and foreign_rule(jax_primitive, False) is not None
    )


core.FOREIGN.append(foreign_rule)
register_forward_test(_answers_forward)

__all__: Sequence[str] = ()
