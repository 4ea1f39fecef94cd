"""The registry of primitives: the table, how a primitive enters it, and the
untraced helpers every rule family uses (shapes, dtypes, constants).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from chainrule.engine.core import PRIMITIVES, Primitive, raw, zeros_like  # noqa: F401 (re-exported)
from chainrule.engine.host import HOST_TYPES

FORMULA_FUNCTIONS: dict[str, Callable] = {}
"""Functions beyond NumPy's that formulas may name (`digamma`, `bessel_i1e`, ...),
each from NumPy arrays to a NumPy array; filled by the rule modules whose
formulas use them (see `defvjp`)."""


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
    if name in PRIMITIVES:
        raise ValueError(f"the primitive {name!r} already has a rule ({PRIMITIVES[name]})")
    prim = cls(name, impl, params, host_impl=host, **kwargs)
    PRIMITIVES[name] = prim
    return prim


def defvjp(
    prim: Primitive,
    *makers: Callable | None,
    formulas: Sequence[str | None] | None = None,
) -> None:
    """Registers one VJP maker per argument of `prim` (None: not differentiable).

    `formulas` (elementwise primitives) gives, beside the rule, each argument's
    local derivative ∂out/∂argument, the factor the rule multiplies the
    cotangent by: one string per maker (None where the maker is None). It is
    what `cr.explain` prints, and tests/test_formulas.py evaluates it against
    the rule on random inputs and at the corners (abs at 0, max/min ties, ...).

    A formula is one Python expression, evaluated with NumPy on float64 arrays:
      - `x`, `y`, `z`: the operands, by position (clamp(lo, x, hi) is x, y, z);
      - `out`: the primitive's output;
      - the primitive's parameters, by name (integer_pow's exponent `y`);
      - numbers, `+ - * / **`, comparisons, `&` and `|` on comparisons;
      - NumPy's functions and constants by their NumPy names (`where`, `abs`,
        `sign`, `floor`, `sqrt`, `exp`, `log`, `sin`, `cos`, `pi`, ...);
      - the functions in `FORMULA_FUNCTIONS` (special functions: `digamma`, ...).
    Write what the rule computes, not the textbook: abs is
    `where(x >= 0, 1, -1)` (+1 at 0), max's first operand
    `where(x > y, 1, where(x == y, 0.5, 0))` (ties split ½-½).
    """
    if formulas is not None:
        formulas = tuple(formulas)
        if len(formulas) != len(makers):
            raise ValueError(
                f"defvjp({prim.name}): {len(formulas)} formulas for {len(makers)} VJP makers"
            )
        for formula, maker in zip(formulas, makers, strict=True):
            if (formula is None) != (maker is None):
                raise ValueError(f"defvjp({prim.name}): a formula per VJP maker, None for None")
            if formula is not None:
                compile(formula, f"<{prim.name} formula>", "eval")  # a SyntaxError here
    prim.vjp_makers = makers
    prim.formulas = formulas


# --- helpers (untraced shape logic and constants) ----------------------------


def shape_of(x: Any) -> tuple[int, ...]:
    if isinstance(x, HOST_TYPES):  # (the host values of eager rules: at once)
        return x.shape
    x = raw(x)
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x)) if shape is None else tuple(shape)


def dtype_of(x: Any):
    if isinstance(x, HOST_TYPES):
        return x.dtype
    x = raw(x)
    return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def full_like(x: Any, value: float):
    """A constant with the shape and dtype of `x` (never traced).

    Outside JAX transformations it is a NumPy array: creating it costs no XLA
    dispatch. Under `jit`/`vmap` it is a `lax.full`, so no large literal is
    baked into the compiled program.
    """
    if isinstance(raw(x), jax.core.Tracer):
        return lax.full(shape_of(x), value, dtype_of(x))
    return np.full(shape_of(x), value, dtype_of(x))


def const(x: Any, value: float):
    """`value` as a scalar of `x`'s dtype, for use in rules."""
    return np.asarray(value, dtype=dtype_of(x))


def argsort(seq: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(range(len(seq)), key=seq.__getitem__))
