"""chainrule: reverse-mode automatic differentiation you can read, inspect and trust.

`cr.grad`, `cr.value_and_grad`, `cr.vjp` (and `cr.jvp`, `cr.linearize`,
`cr.linear_transpose`, `cr.jacrev` (alias `cr.jacobian`), `cr.jacfwd`,
`cr.hessian`, `cr.fwd_and_bwd`) have JAX's signatures and differentiate the same functions
(written with `jax.numpy`, `jax.nn`, `lax`, or `chainrule.numpy`) with
chainrule's own hand-written VJP rules. They compose with `jax.jit`, `jax.vmap` and with each other.

Examples:
  >>> import chainrule as cr
  >>> float(cr.grad(lambda w, x, y: (w * x - y) ** 2)(1.0, 1.0, 2.0))
  -2.0
"""

from chainrule import errors
from chainrule.engine.core import Tracer
from chainrule.engine.debugging import tap
from chainrule.engine.forward import (
    hessian,
    jacfwd,
    jacobian,
    jacrev,
    jvp,
    linear_transpose,
    linearize,
)
from chainrule.engine.rules import PRIMITIVES
from chainrule.engine.transforms import fwd_and_bwd, grad, value_and_grad, vjp
from chainrule.explanation import explain

__version__ = "0.1.0"

__all__ = [
    "PRIMITIVES",
    "Tracer",
    "errors",
    "explain",
    "fwd_and_bwd",
    "grad",
    "hessian",
    "jacfwd",
    "jacobian",
    "jacrev",
    "jvp",
    "linear_transpose",
    "linearize",
    "numpy",
    "tap",
    "value_and_grad",
    "vjp",
]


def __getattr__(name: str):
    if name in ("numpy", "nn", "train", "interop"):  # loaded on first use
        import importlib

        return importlib.import_module(f"chainrule.{name}")
    raise AttributeError(f"module 'chainrule' has no attribute {name!r}")
