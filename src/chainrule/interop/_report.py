"""Element-wise comparison of two arrays and the report that collects the results.

Pure NumPy: nothing here needs torch or JAX's tracing, so the comparison suite
in `compare/` uses the same metrics (max abs/rel error, ULPs, worst element)
with or without torch installed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# The tolerances we hold ourselves to (DESIGN.md, "Numbers we hold ourselves to").
TOLERANCES: dict[str, tuple[float, float]] = {  # dtype -> (rtol, atol)
    "float64": (1e-12, 1e-12),
    "float32": (1e-5, 1e-6),
}


def tolerance_for(dtype: Any) -> tuple[float, float]:
    """Returns `(rtol, atol)` for comparing arrays of `dtype` (float32 or float64).

    Examples:
      >>> tolerance_for("float32")
      (1e-05, 1e-06)
      >>> tolerance_for("float64")
      (1e-12, 1e-12)
    """
    name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(
            f"no comparison tolerance for dtype {name}; compare in float32 or float64 "
            f"(e.g. model.float() / model.double() and dtype=jnp.float32 / jnp.float64)."
        )
    return TOLERANCES[name]


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: Any) -> np.ndarray:
    """Number of representable `dtype` values between `a` and `b`, element-wise.

    Both are rounded to `dtype` first; 0 means bit-identical (and +0 == -0).

    Examples:
      >>> one = np.float32(1.0)
      >>> int(ulp_distance(one, np.nextafter(one, np.float32(2)), "float32"))
      1
    """
    dtype = np.dtype(dtype)
    ints = {4: np.int32, 8: np.int64}[dtype.itemsize]
    mask = np.iinfo(ints).max  # all bits but the sign

    def ordered(x):
        i = np.asarray(x, dtype).view(ints).astype(np.int64)
        return np.where(i < 0, -(i & mask), i)  # monotone in the float value

    oa, ob = ordered(a), ordered(b)
    same_sign = (oa >= 0) == (ob >= 0)  # exact int64 difference; cannot overflow
    exact = np.abs(np.where(same_sign, oa - ob, 0)).astype(np.float64)
    across_zero = np.abs(oa.astype(np.float64)) + np.abs(ob.astype(np.float64))
    return np.where(same_sign, exact, across_zero)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far one array (`actual`) is from its reference (`expected`).

    Passes when every element satisfies `|actual - expected| <= atol + rtol * |expected|`
    (NumPy's `allclose` rule, with NaN equal only to NaN) and the shapes agree.
    """

    quantity: str  # e.g. "loss", "grad", "param after step"
    name: str  # torch name, e.g. "0.weight" ("" for the loss)
    shape: tuple[int, ...]  # the reference's shape
    dtype: str  # the compared dtype
    max_abs: float
    max_rel: float
    ulps: float  # max ULP distance in `dtype`
    worst_index: tuple[int, ...] | None  # element farthest outside (or nearest to) tolerance
    rtol: float
    atol: float
    ok: bool
    note: str = ""  # e.g. a shape mismatch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = None if self.worst_index is None else list(self.worst_index)
        return d


def compare_arrays(
    quantity: str,
    name: str,
    actual: Any,
    expected: Any,
    *,
    dtype: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> Comparison:
    """Compares `actual` with the reference `expected` in `dtype` (default: expected's dtype).

    Tolerances default to `tolerance_for(dtype)`.

    Examples:
      >>> c = compare_arrays("grad", "w", np.float32([1.0, 2.0]), np.float32([1.0, 2.5]))
      >>> c.ok, c.worst_index, c.max_abs
      (False, (1,), 0.5)
    """
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    dtype = np.dtype(dtype if dtype is not None else expected.dtype)
    default_rtol, default_atol = tolerance_for(dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    shape = tuple(expected.shape)
    if actual.shape != expected.shape:
        return Comparison(
            quantity, name, shape, dtype.name, float("inf"), float("inf"), float("inf"), None,
            rtol, atol, False, f"shape {tuple(actual.shape)} != reference {shape}",
        )  # fmt: skip
    a = actual.astype(dtype).astype(np.float64)
    e = expected.astype(dtype).astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    with np.errstate(invalid="ignore", divide="ignore"):
        abs_err = np.where(both_nan, 0.0, np.abs(a - e))
        abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)  # NaN on one side only
        rel_err = np.where(abs_err == 0, 0.0, abs_err / np.abs(e))
        # How far each element is from its bound; > 1 means outside the tolerance.
        violation = np.where(abs_err == 0, 0.0, abs_err / (atol + rtol * np.abs(e)))
    ulps = np.where(both_nan, 0.0, ulp_distance(a, e, dtype))
    if a.size == 0:
        return Comparison(quantity, name, shape, dtype.name, 0.0, 0.0, 0.0, None, rtol, atol, True)
    worst = np.unravel_index(int(np.argmax(violation)), shape) if shape else ()
    return Comparison(
        quantity=quantity,
        name=name,
        shape=shape,
        dtype=dtype.name,
        max_abs=float(abs_err.max()),
        max_rel=float(rel_err.max()),
        ulps=float(ulps.max()),
        worst_index=tuple(int(i) for i in worst),
        rtol=rtol,
        atol=atol,
        ok=bool(np.all(violation <= 1.0)),
    )


@dataclasses.dataclass
class StepReport:
    """Per-quantity comparison of one training step: the loss, every gradient, and
    every parameter after the optimizer step, keyed by torch parameter name.

    `ok` is True when every row passes; `str(report)` is a text table;
    `to_dict()` is JSON-ready; `failures` lists the rows that failed.
    """

    rows: list[Comparison]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> list[Comparison]:
        return [row for row in self.rows if not row.ok]

    @property
    def failed_names(self) -> list[str]:
        """Torch names (and "loss") of the failing rows, each once, in row order."""
        names = [row.name or row.quantity for row in self.failures]
        return list(dict.fromkeys(names))

    def __getitem__(self, key: tuple[str, str]) -> Comparison:
        """`report["grad", "0.weight"]` is the row of that quantity and name."""
        quantity, name = key
        for row in self.rows:
            if row.quantity == quantity and row.name == name:
                return row
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "settings": dict(self.settings),
            "rows": [row.to_dict() for row in self.rows],
        }

    def __str__(self) -> str:
        header = ["quantity", "name", "shape", "max abs err", "max rel err", "ULPs", "worst at"]
        header += ["rtol / atol", "result"]
        lines = []
        for r in self.rows:
            lines.append(
                [
                    r.quantity,
                    r.name or "-",
                    "x".join(map(str, r.shape)) or "scalar",
                    f"{r.max_abs:.3g}",
                    f"{r.max_rel:.3g}",
                    f"{r.ulps:.0f}",
                    "-" if not r.worst_index else str(list(r.worst_index)),
                    f"{r.rtol:.0e} / {r.atol:.0e}",
                    ("PASS" if r.ok else "FAIL") + (f" ({r.note})" if r.note else ""),
                ]
            )
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        verdict = "OK" if self.ok else f"FAILED: {', '.join(self.failed_names)}"
        out = [f"chainrule vs PyTorch step comparison ({settings})", fmt(header)]
        out += ["  ".join("-" * w for w in widths)]
        out += [fmt(row) for row in lines]
        out += [verdict]
        return "\n".join(line.rstrip() for line in out)
