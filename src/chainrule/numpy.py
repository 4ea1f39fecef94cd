"""`chainrule.numpy`: jax.numpy-compatible functions that record on chainrule's tape.

Use these (or array methods and operators) for functions that should run
eagerly, PyTorch-style, with Python control flow on concrete values. Every
function accepts Tracers and plain arrays alike. Names not defined here fall
back to `jax.numpy`, lifted so that they record through jaxpr replay.

Examples:
  >>> import chainrule as cr, chainrule.numpy as cnp
  >>> def loss(w):
  ...     y = cnp.tanh(w * 2.0)
  ...     return cnp.sum(y) if y.sum() > 0 else -cnp.sum(y)   # control flow on a value
  >>> round(float(cr.grad(loss)(1.0)), 6)
  0.141302
"""

import jax.numpy as _jnp

from chainrule.engine.arrays import (  # noqa: F401
    abs,
    absolute,
    add,
    amax,
    amin,
    arccos,
    arccosh,
    arcsin,
    arcsinh,
    arctan,
    arctan2,
    arctanh,
    argmax,
    argmin,
    asarray,
    broadcast_to,
    cbrt,
    clip,
    concatenate,
    cos,
    cosh,
    divide,
    dot,
    equal,
    exp,
    exp2,
    expand_dims,
    expm1,
    greater,
    greater_equal,
    less,
    less_equal,
    log,
    log1p,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    multiply,
    negative,
    not_equal,
    ones_like,
    power,
    ravel,
    reshape,
    sign,
    sin,
    sinh,
    sqrt,
    square,
    squeeze,
    stack,
    subtract,
    sum,
    tan,
    tanh,
    transpose,
    true_divide,
    where,
    zeros_like,
)

float32, float64, float16, bfloat16 = _jnp.float32, _jnp.float64, _jnp.float16, _jnp.bfloat16
int32, int64, bool_ = _jnp.int32, _jnp.int64, _jnp.bool_
pi, e, inf, nan = _jnp.pi, _jnp.e, _jnp.inf, _jnp.nan
array, zeros, ones, arange, linspace, eye, full = (
    _jnp.array,
    _jnp.zeros,
    _jnp.ones,
    _jnp.arange,
    _jnp.linspace,
    _jnp.eye,
    _jnp.full,
)


def __getattr__(name: str):
    fn = getattr(_jnp, name, None)
    if callable(fn):  # jax.numpy's own: its primitives reach chainrule's trace
        return fn
    raise AttributeError(f"chainrule.numpy has no attribute {name!r} (nor has jax.numpy)")
