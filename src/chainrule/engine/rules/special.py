"""Special functions: log-gamma and its derivatives, the incomplete gamma and beta
functions, scaled Bessel functions, erfc, Hurwitz zeta, and gamma sampling.

(`erf` and `erf_inv` live with the elementwise primitives.)

Each rule is written with traced ops, so it differentiates again: lgamma's
derivative is digamma, digamma's is polygamma(1, x), polygamma(m, x)'s is
polygamma(m + 1, x). Where JAX differentiates a primitive in some arguments
only, chainrule does the same and raises where JAX raises, never a zero:

* polygamma's order `m` and betainc's `a` and `b`: `jax.grad` raises
  ValueError; chainrule raises `NotDifferentiableError` (a ValueError);
* `igamma_grad_a` and `zeta` have no rule in JAX (NotImplementedError);
  chainrule raises `NoVJPRuleError` (a NotImplementedError). So igamma and
  igammac differentiate once in `a`, as in JAX, and `jax.scipy.special.zeta`
  differentiates through its own custom_jvp rule.

`random_gamma` (`jax.random.gamma`, `loggamma`) differentiates in its shape
parameter `a` by implicit reparameterisation: d sample / d a is
`lax.random_gamma_grad(a, sample)`, which in JAX 0.10 is a function (a
`while` loop), not a primitive.

No NumPy host versions: NumPy has none of these functions, and an
approximation that differs from XLA's in the last bits would break the rule
that a host version gives exactly `impl`'s result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend.core import primitives as jax_primitives

from chainrule.engine.core import Primitive
from chainrule.engine.rules.elementwise import (
    abs_,
    add,
    div,
    eq,
    exp,
    gt,
    log,
    log1p_p,
    mul,
    neg,
    select_n,
    sign,
    square,
    sub,
)
from chainrule.engine.rules.registry import (
    FORMULA_FUNCTIONS,
    const,
    defvjp,
    dtype_of,
    full_like,
    primitive,
    shape_of,
)
from chainrule.engine.rules.shape import unbroadcast
from chainrule.errors import NotDifferentiableError

log1p = log1p_p.bind


class _PartlyDifferentiable(Primitive):
    """A primitive JAX differentiates in some arguments only (`arguments` names
    them all): differentiating one without a rule raises NotDifferentiableError,
    a ValueError as `jax.grad` raises, never a zero."""

    def __init__(self, *args: Any, arguments: tuple[str, ...], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.arguments = arguments

    def vjp(self, g: Any, node: Any) -> list[Any]:
        for i in node.argnums:
            if self.vjp_makers[i] is None:
                raise NotDifferentiableError(self.name, self.arguments[i])
        return super().vjp(g, node)


def _on_host(fun: Callable) -> Callable:
    """`fun` (a lax special function) from NumPy arrays to a NumPy array, for formulas."""

    def on_host(*args: Any) -> np.ndarray:
        dtype = np.result_type(*args)
        dtype = dtype if jax.numpy.issubdtype(dtype, jax.numpy.floating) else np.dtype(np.float64)
        return np.asarray(fun(*(np.asarray(a, dtype) for a in args)))

    return on_host


FORMULA_FUNCTIONS.update(
    lgamma=_on_host(lax.lgamma),
    digamma=_on_host(lax.digamma),
    polygamma=_on_host(lax.polygamma),
    igamma_grad_a=_on_host(lax.igamma_grad_a),
    bessel_i0e=_on_host(lax.bessel_i0e),
    bessel_i1e=_on_host(lax.bessel_i1e),
    eps=lambda x: np.finfo(np.asarray(x).dtype).eps,  # the machine epsilon of x's dtype
)

# --- log-gamma and its derivatives ---------------------------------------------------

lgamma_p = primitive("lgamma", lax.lgamma)
digamma_p = primitive("digamma", lax.digamma)
polygamma_p = primitive("polygamma", lax.polygamma, cls=_PartlyDifferentiable, arguments=("m", "x"))
lgamma, digamma, polygamma = lgamma_p.bind, digamma_p.bind, polygamma_p.bind

defvjp(lgamma_p, lambda ans, x: lambda g: mul(g, digamma(x)), formulas=("digamma(x)",))
defvjp(
    digamma_p,
    lambda ans, x: lambda g: mul(g, polygamma(const(x, 1), x)),
    formulas=("polygamma(1, x)",),
)
defvjp(
    polygamma_p,
    None,
    lambda ans, m, x: lambda g: unbroadcast(mul(g, polygamma(add(m, const(m, 1)), x)), shape_of(x)),
    formulas=(None, "polygamma(x + 1, y)"),
)

# --- incomplete gamma functions ------------------------------------------------------

igamma_p = primitive("igamma", lax.igamma)
igammac_p = primitive("igammac", lax.igammac)
# d igamma / d a. JAX has no rule for it, so igamma differentiates once in `a`.
igamma_grad_a_p = primitive("igamma_grad_a", lax.igamma_grad_a)
igamma_grad_a = igamma_grad_a_p.bind


def _igamma_dx(a: Any, x: Any) -> Any:
    """d igamma(a, x) / dx = x^(a-1) e^(-x) / Γ(a), in logarithms."""
    return exp(sub(add(neg(x), mul(sub(a, const(a, 1)), log(x))), lgamma(a)))


def _igamma_vjps(sign_: float) -> tuple[Callable, Callable]:
    """The VJP makers of igamma (sign +1) and igammac = 1 - igamma (sign -1)."""
    return (
        lambda ans, a, x: (
            lambda g: unbroadcast(mul(g, mul(const(a, sign_), igamma_grad_a(a, x))), shape_of(a))
        ),
        lambda ans, a, x: (
            lambda g: unbroadcast(mul(g, mul(const(x, sign_), _igamma_dx(a, x))), shape_of(x))
        ),
    )


_IGAMMA_DX = "exp(-y + (x - 1) * log(y) - lgamma(x))"
defvjp(igamma_p, *_igamma_vjps(1.0), formulas=("igamma_grad_a(x, y)", _IGAMMA_DX))
defvjp(igammac_p, *_igamma_vjps(-1.0), formulas=("-igamma_grad_a(x, y)", f"-{_IGAMMA_DX}"))

# --- the regularized incomplete beta function ----------------------------------------

regularized_incomplete_beta_p = primitive(
    "regularized_incomplete_beta",
    lax.betainc,
    cls=_PartlyDifferentiable,
    arguments=("a", "b", "x"),
)


def _betainc_dx(ans, a, b, x):
    """d I_x(a, b) / dx = x^(a-1) (1-x)^(b-1) / B(a, b), in logarithms."""
    log_beta = sub(add(lgamma(a), lgamma(b)), lgamma(add(a, b)))
    log_density = add(mul(sub(b, const(b, 1)), log1p(neg(x))), mul(sub(a, const(a, 1)), log(x)))
    dx = exp(sub(log_density, log_beta))
    return lambda g: unbroadcast(mul(g, dx), shape_of(x))


defvjp(
    regularized_incomplete_beta_p,
    None,
    None,
    _betainc_dx,
    formulas=(
        None,
        None,
        "exp((y - 1) * log1p(-z) + (x - 1) * log(z) - (lgamma(x) + lgamma(y) - lgamma(x + y)))",
    ),
)

# --- exponentially scaled Bessel functions, erfc, zeta -------------------------------

bessel_i0e_p = primitive("bessel_i0e", lax.bessel_i0e)
bessel_i1e_p = primitive("bessel_i1e", lax.bessel_i1e)
bessel_i0e, bessel_i1e = bessel_i0e_p.bind, bessel_i1e_p.bind

# i0e(x) = e^-|x| I0(x), I0' = I1
defvjp(
    bessel_i0e_p,
    lambda ans, x: lambda g: mul(g, sub(bessel_i1e(x), mul(sign(x), ans))),
    formulas=("bessel_i1e(x) - sign(x) * out",),
)


def _bessel_i1e_vjp(ans, x):
    """i1e(x) = e^-|x| I1(x), I1' = I0 - I1/x; 1/2 at |x| <= eps, where I1(x)/x -> 1/2."""
    eps = float(np.finfo(dtype_of(x)).eps)
    not_tiny = gt(abs_(x), const(x, eps))
    safe_x = select_n(not_tiny, full_like(x, eps), x)
    dx = sub(bessel_i0e(safe_x), mul(ans, add(sign(safe_x), div(const(x, 1), safe_x))))
    dx = select_n(not_tiny, full_like(x, 0.5), dx)
    return lambda g: mul(g, dx)


defvjp(
    bessel_i1e_p,
    _bessel_i1e_vjp,
    formulas=("where(abs(x) > eps(x), bessel_i0e(x) - out * (sign(x) + 1/x), 0.5)",),
)

erfc_p = primitive("erfc", lax.erfc)
defvjp(
    erfc_p,
    # (JAX's rule transposed, term for term: square(x) overflows where JAX's does)
    lambda ans, x: lambda g: mul(mul(const(x, -2 / math.sqrt(math.pi)), g), exp(neg(square(x)))),
    formulas=("-2 * exp(-x**2) / sqrt(pi)",),
)

# The Hurwitz zeta function ζ(s, q). JAX has no rule for the primitive;
# jax.scipy.special.zeta carries its own custom_jvp rule, which chainrule honours.
zeta_p = primitive("zeta", lax.zeta)

# --- gamma sampling ------------------------------------------------------------------


def _random_gamma_vjp(ans, key, a, *, log_space):
    """d sample / d a by implicit reparameterisation: -(dF/da) / (dF/dx) at the
    sample, for F the gamma CDF (lax.random_gamma_grad). A log-space sample is
    exponentiated first, 0 replaced by the smallest normal number, as JAX does."""
    if log_space:
        sample = exp(ans)
        sample = select_n(eq(sample, const(sample, 0)), sample, full_like(sample, _tiny(sample)))
        da = div(_random_gamma_grad(a, sample), sample)
    else:
        da = _random_gamma_grad(a, ans)
    return lambda g: mul(g, da)


# Compiled once per shape: eagerly, its while loops would be traced and compiled
# again on every call. (On chainrule's values, its body is evaluated inline.)
_random_gamma_grad = jax.jit(lax.random_gamma_grad)


def _tiny(x: Any) -> float:
    return float(np.finfo(dtype_of(x)).tiny)


random_gamma_p = primitive(
    "random_gamma",
    lambda key, a, log_space: jax_primitives.random_gamma_p.bind(key, a, log_space=log_space),
    ("log_space",),
)
defvjp(random_gamma_p, None, _random_gamma_vjp)
