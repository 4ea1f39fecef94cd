"""Errors raised by chainrule. Each says what went wrong, where, and how to fix it.

Every error is a `ChainruleError`, and also the built-in exception type that
JAX raises for the same mistake (`TypeError` for wrong dtypes and non-scalar
outputs, `ValueError` for mismatched cotangents, both for bad `argnums`: JAX's
`grad` raises a `TypeError` there and its `jacrev` a `ValueError`), so code that
catches JAX's errors keeps working when `jax.grad` is swapped for `cr.grad`.
"""

from __future__ import annotations


class ChainruleError(Exception):
    """Base class of all chainrule errors."""


class InputTypeError(ChainruleError, TypeError):
    """A differentiated input is not a floating-point array."""


class NonScalarOutputError(ChainruleError, TypeError):
    """`grad` was given a function whose output is not a real scalar."""


class ArgnumsError(ChainruleError, TypeError, ValueError):
    """`argnums` does not name positional arguments of the call (a `TypeError`
    as from `jax.grad`, and a `ValueError` as from `jax.jacrev`)."""


class CotangentError(ChainruleError, ValueError):
    """A cotangent passed to a `vjp` function does not match the output."""


class AuxError(ChainruleError, TypeError):
    """`has_aux=True` but the function did not return an `(output, aux)` pair."""


class NoVJPRuleError(ChainruleError, NotImplementedError):
    """The function uses a primitive for which chainrule has no VJP rule."""

    def __init__(self, primitive: str, where: str | None = None, detail: str | None = None):
        self.primitive = primitive
        self.where = where
        at = f" (used at {where})" if where else ""
        extra = f"; {detail}" if detail else ""
        super().__init__(
            f"chainrule has no VJP rule for the primitive '{primitive}'{at}{extra}. "
            "chainrule never falls back to JAX's own differentiation, so it cannot "
            "differentiate this operation. Fixes: express the computation with supported "
            "operations (the table is chainrule.engine.rules.PRIMITIVES), or wrap it in "
            "jax.custom_vjp with a bwd function written with supported operations; "
            "chainrule uses your bwd rule."
        )


class NonFiniteGradientError(ChainruleError, FloatingPointError):
    """`check_finite=True` found a NaN or infinite cotangent; the message is the
    provenance report (primitive, line, values, likely cause)."""


class TapError(ChainruleError, ValueError):
    """`cr.tap` was used wrongly (no name or hook, a name used twice, a bad hook)."""


class NotDifferentiableError(NoVJPRuleError, ValueError):
    """An argument that JAX does not differentiate either (`jax.grad` raises ValueError there).
    E.g. polygamma's order `m`, or the shape parameters `a` and `b` of the
    regularized incomplete beta function.
    """

    def __init__(self, primitive: str, argument: str, where: str | None = None):
        ChainruleError.__init__(
            self,
            f"'{primitive}' is not differentiable with respect to its argument {argument}"
            f"{f' (used at {where})' if where else ''}: JAX defines no derivative there either "
            "(jax.grad raises ValueError). Hold that argument fixed: pass it as a constant, "
            "or wrap it in jax.lax.stop_gradient if a zero gradient is what you mean.",
        )
        self.primitive = primitive
        self.where = where


class NotLinearError(ChainruleError, NotImplementedError):
    """`linear_transpose` was given a function that is not linear in its inputs."""


class ForwardModeError(ChainruleError, TypeError):
    """Forward mode met a rule with no forward form: a `custom_vjp` function's
    `bwd` (as `jax.jvp` refuses it)."""


class CallbackDifferentiationError(ChainruleError, ValueError):
    """A `pure_callback` / `io_callback` was given values that need a gradient."""

    def __init__(self, what: str, primitive: str, where: str | None = None):
        self.primitive = primitive
        self.where = where
        at = f" (at {where})" if where else ""
        super().__init__(
            f"{what} do not support JVP: '{primitive}'{at} was given values that need "
            "a gradient, and chainrule, like jax.grad, cannot differentiate Python code "
            "run by a callback. Fixes: wrap the callback in jax.custom_vjp (or "
            "jax.custom_jvp) with a rule written in jax.numpy; chainrule uses your rule. "
            "Or, if no gradient should flow through it, pass "
            "jax.lax.stop_gradient(x) to the callback."
        )
