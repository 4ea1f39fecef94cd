"""The registry of primitives: the table, how a primitive enters it, and the
untraced helpers every rule family uses (shapes, dtypes, constants).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from chainrule.engine.core import Primitive, raw

PRIMITIVES: dict[str, Primitive] = {}
"""Every primitive chainrule can trace, keyed by its `jax.lax` name."""


def primitive(
    name: str,
    impl: Callable,
    params: Sequence[str] = (),
    *,
    host: Callable | None = None,
    cls: type = Primitive,
    **kwargs,
) -> Primitive:
    """Creates a primitive and enters it in `PRIMITIVES`.

    `host` is the NumPy implementation used for concrete CPU values (see
    `chainrule.engine.host`); it must give `impl`'s result, dtype included.
    `cls` is a `Primitive` subclass for the few primitives whose rule treats all
    operands at once (variadic operands, multiple results, integer indices).
    """
    prim = cls(name, impl, params, host_impl=host, **kwargs)
    PRIMITIVES[name] = prim
    return prim


def defvjp(prim: Primitive, *makers: Callable | None) -> None:
    """Registers one VJP maker per argument of `prim` (None: not differentiable)."""
    prim.vjp_makers = makers


# --- helpers (untraced shape logic and constants) ----------------------------


def shape_of(x: Any) -> tuple[int, ...]:
    x = raw(x)
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x)) if shape is None else tuple(shape)


def dtype_of(x: Any):
    return raw(x).dtype if hasattr(raw(x), "dtype") else np.result_type(x)


def full_like(x: Any, value: float):
    """A constant with the shape and dtype of `x` (never traced).

    Outside JAX transformations it is a NumPy array: creating it costs no XLA
    dispatch. Under `jit`/`vmap` it is a `lax.full`, so no large literal is
    baked into the compiled program.
    """
    if isinstance(raw(x), jax.core.Tracer):
        return lax.full(shape_of(x), value, dtype_of(x))
    return np.full(shape_of(x), value, dtype_of(x))


def zeros_like(x: Any):
    return full_like(x, 0)


def const(x: Any, value: float):
    """`value` as a scalar of `x`'s dtype, for use in rules."""
    return np.asarray(value, dtype=dtype_of(x))


def argsort(seq: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(range(len(seq)), key=seq.__getitem__))
