"""Runs every tutorial case through PyTorch, `jax.grad`, chainrule eager and chainrule under
`jax.jit`, and prints them side by side.

PyTorch's numbers come from a live run when torch is installed (and the
recording in `reference.json` is checked against it), otherwise from the
recording. Either way the JAX engines start from PyTorch's own initial weights
and batch, converted once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import chainrule as cr
from chainrule.interop import compare_arrays, state_dict_to_pytree
from compare import ports, torch_programs

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.json")
DTYPES = ("float32", "float64")
CASES = ("linear", "relu", "mlp")

# The tutorials' stated values (the only hard-coded expectations here).
TUTORIAL = {
    "linear": {"loss": 1.0, "dw": -2.0},
    "relu": {"loss": 2.25, "dw2": -3.0, "dw1": -9.0, "dx": -2.25},
}
TUTORIAL_INPUTS = {
    "linear": {"w": 1.0, "x": 1.0, "y": 2.0},
    "relu": {"w1": 0.5, "w2": 1.5, "x": 2.0, "target": 3.0},
}

# engine name -> (loss_fn, argnums) -> value_and_grad function
ENGINES: dict[str, Callable] = {
    "jax.grad": lambda f, argnums=0: jax.value_and_grad(f, argnums),
    "cr eager": lambda f, argnums=0: cr.value_and_grad(f, argnums),
    "cr jit": lambda f, argnums=0: jax.jit(cr.value_and_grad(f, argnums)),
}


# --------------------------------------------------------------------------- reference


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return np.asarray(value).tolist()  # float32 values are exact as Python floats


def _decode(value: Any, dtype: str) -> Any:
    if isinstance(value, dict):
        return {k: _decode(v, dtype) for k, v in value.items()}
    return np.asarray(value, dtype)


def run_torch(dtype: str) -> dict[str, dict]:
    """Runs the three PyTorch programs live (needs torch)."""
    return {
        "linear": torch_programs.linear(dtype),
        "relu": torch_programs.relu(dtype),
        "mlp": torch_programs.mlp(dtype),
    }


def regenerate(path: str = REFERENCE) -> None:
    """Reruns PyTorch and writes the recording (`python -m compare --regenerate`)."""
    torch = torch_programs.import_torch()
    data = {
        "about": "PyTorch's results for the tutorial cases; regenerate: python -m compare "
        "--regenerate. mlp.initial/x/y are the shared starting weights and batch.",
        "torch": torch.__version__,
        "lr": torch_programs.LR,
        "steps": torch_programs.STEPS,
        "seed": torch_programs.SEED,
    }
    for dtype in DTYPES:
        data[dtype] = _encode(run_torch(dtype))
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def load_reference(path: str = REFERENCE) -> dict[str, Any]:
    """The recording, decoded: `{"torch": version, dtype: {case: {quantity: array}}}`."""
    with open(path) as f:
        data = json.load(f)
    out = {k: v for k, v in data.items() if k not in DTYPES}
    for dtype in DTYPES:
        out[dtype] = _decode(data[dtype], dtype)
    return out


# --------------------------------------------------------------------------- JAX side


def run_jax(
    case: str, dtype: str, torch_result: dict, engine: str, port: Callable | None = None
) -> dict[str, np.ndarray]:
    """One case with one engine, from the same inputs PyTorch used."""
    value_and_grad = ENGINES[engine]
    if case == "linear":
        i = TUTORIAL_INPUTS["linear"]
        args = [jnp.asarray(i[k], dtype) for k in ("w", "x", "y")]
        loss, dw = value_and_grad(port or ports.linear_loss)(*args)
        return {"loss": np.asarray(loss), "dw": np.asarray(dw)}
    if case == "relu":
        i = TUTORIAL_INPUTS["relu"]
        args = [jnp.asarray(i[k], dtype) for k in ("w1", "w2", "x", "target")]
        loss, (dw1, dw2, dx) = value_and_grad(port or ports.relu_loss, (0, 1, 2))(*args)
        return {"loss": loss, "dw2": dw2, "dw1": dw1, "dx": dx}
    assert case == "mlp", case
    loss_fn = port or ports.mlp_loss
    params = state_dict_to_pytree(torch_result["initial"], dtype=dtype)  # converted once
    x, y = jnp.asarray(torch_result["x"], dtype), jnp.asarray(torch_result["y"], dtype)
    tx = optax.sgd(torch_programs.LR)
    value_and_grad = ENGINES["cr eager" if engine == "cr jit" else engine]

    @jax.jit  # the optimizer is not under test: compiled once for every engine
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(params, opt_state):
        loss, grads = value_and_grad(loss_fn)(params, x, y)  # eager unless "cr jit"
        return loss, grads, *update(grads, opt_state, params)

    if engine == "cr jit":  # gradient and update in one compiled step
        step = jax.jit(step)
    opt_state = tx.init(params)
    trajectory = []
    for i in range(torch_programs.STEPS):
        loss, grads, params, opt_state = step(params, opt_state)
        trajectory.append(loss)
        if i == 0:
            first = {"loss": loss, "grads": grads, "after_step": params}
    return {**first, "trajectory": jnp.stack(trajectory), "after_trajectory": params}


# --------------------------------------------------------------------------- rows


def _flat(result: dict) -> dict[str, np.ndarray]:
    """`{"grads": {"0.weight": a}}` -> `{"grad 0.weight": a}`, in display order."""
    labels = {"grads": "grad", "after_step": "after step", "after_trajectory": "after 10 steps"}
    out = {}
    for key, value in result.items():
        if key in ("initial", "x", "y"):
            continue
        if isinstance(value, dict):
            out.update({f"{labels[key]} {n}": np.asarray(v) for n, v in value.items()})
        elif key == "trajectory":
            out["trajectory (loss per step)"] = np.asarray(value)
        else:
            out[key] = np.asarray(value)
    return out


def _representable(value: float, dtype: str) -> bool:
    return float(np.asarray(value, dtype)) == value


def _where(c) -> str:
    worst = f", worst at {list(c.worst_index)}" if c.worst_index else ""
    return f"max abs err {c.max_abs:.3g}{worst}"


def make_row(case, dtype, quantity, tutorial, torch_value, engines, recorded=None) -> dict:
    """One table row with every check it must pass (see compare/README.md)."""
    checks = []  # (description, Comparison)
    if tutorial is not None:
        exact = _representable(tutorial, dtype)
        tol = {"rtol": 0.0, "atol": 0.0} if exact else {}
        for who, value in [("PyTorch", torch_value), *engines.items()]:
            c = compare_arrays(quantity, "", value, np.asarray(tutorial, dtype), dtype=dtype, **tol)
            checks.append((f"{who} == tutorial" if exact else f"{who} ~ tutorial", c))
    for who, value in engines.items():
        checks.append((f"{who} vs PyTorch", compare_arrays(quantity, "", value, torch_value)))
    for who in ("cr eager", "cr jit"):
        if who in engines and "jax.grad" in engines:
            c = compare_arrays(quantity, "", engines[who], engines["jax.grad"], dtype=dtype)
            checks.append((f"{who} vs jax.grad", c))
    if recorded is not None:
        checks.append(
            ("recording vs live PyTorch", compare_arrays(quantity, "", recorded, torch_value))
        )
    return {
        "case": case,
        "dtype": dtype,
        "quantity": quantity,
        "tutorial": tutorial,
        "pytorch": np.asarray(torch_value),
        "engines": {k: np.asarray(v) for k, v in engines.items()},
        "max_abs": max(c.max_abs for _, c in checks),
        "max_rel": max(c.max_rel for _, c in checks),
        "ok": all(c.ok for _, c in checks),
        "failed": [f"{what}: {c.note or _where(c)}" for what, c in checks if not c.ok],
    }


def run_cases(
    source: str = "auto",
    cases=CASES,
    dtypes=DTYPES,
    engines=tuple(ENGINES),
    ports_override: dict[str, Callable] | None = None,
    reference_path: str = REFERENCE,
) -> tuple[list[dict], dict]:
    """Computes every row. `source`: "live" (needs torch), "recorded", or "auto" (live if
    torch is installed). `ports_override` replaces a case's JAX port (to test the checks)."""
    if source == "auto":
        try:
            import torch  # noqa: F401

            source = "live"
        except ImportError:
            source = "recorded"
    reference = load_reference(reference_path)
    info = {"source": source, "recorded_torch": reference["torch"]}
    rows = []
    for dtype in dtypes:
        live = run_torch(dtype) if source == "live" else None
        if live is not None:
            info["live_torch"] = torch_programs.import_torch().__version__
        for case in cases:
            recorded = reference[dtype][case]
            torch_result = live[case] if live is not None else recorded
            results = {
                e: _flat(run_jax(case, dtype, torch_result, e, (ports_override or {}).get(case)))
                for e in engines
            }
            torch_flat, recorded_flat = _flat(torch_result), _flat(recorded)
            if live is not None and case == "mlp":  # the shared inputs themselves
                for key in ("x", "y"):
                    torch_flat[f"input {key}"] = live[case][key]
                    recorded_flat[f"input {key}"] = recorded[key]
                for name in live[case]["initial"]:
                    torch_flat[f"initial {name}"] = live[case]["initial"][name]
                    recorded_flat[f"initial {name}"] = recorded["initial"][name]
            for quantity, torch_value in torch_flat.items():
                rows.append(
                    make_row(
                        case,
                        dtype,
                        quantity,
                        TUTORIAL.get(case, {}).get(quantity),
                        torch_value,
                        {e: r[quantity] for e, r in results.items() if quantity in r},
                        recorded_flat[quantity] if live is not None else None,
                    )
                )
    return rows, info


# --------------------------------------------------------------------------- table


def _show(value: Any) -> str:
    if value is None:
        return "-"
    a = np.asarray(value)
    if a.ndim == 0 or a.size == 1:
        return f"{float(a.ravel()[0]):.9g}"
    return f"{float(a.ravel()[0]):.6g}.. [{'x'.join(map(str, a.shape))}]"


def table(rows: list[dict], engines=tuple(ENGINES)) -> str:
    header = ["case", "dtype", "quantity", "tutorial", "PyTorch", *engines]
    header += ["max abs err", "max rel err", "result"]
    lines = [
        [
            r["case"],
            r["dtype"],
            r["quantity"],
            _show(r["tutorial"]),
            _show(r["pytorch"]),
            *[_show(r["engines"].get(e)) for e in engines],
            f"{r['max_abs']:.3g}",
            f"{r['max_rel']:.3g}",
            "PASS" if r["ok"] else "FAIL: " + "; ".join(r["failed"]),
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header) - 1)]
    fmt = lambda x: "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=False)) + "  " + x[-1]
    return "\n".join([fmt(header), fmt(["-" * w for w in widths] + ["-" * 6]), *map(fmt, lines)])


def to_json(rows: list[dict], info: dict) -> dict:
    clean = lambda a: None if a is None else np.asarray(a).tolist()
    return {
        "ok": all(r["ok"] for r in rows),
        **info,
        "rows": [
            {
                **{k: r[k] for k in ("case", "dtype", "quantity", "tutorial", "ok", "failed")},
                "max_abs": r["max_abs"],
                "max_rel": r["max_rel"],
                "pytorch": clean(r["pytorch"]),
                "engines": {e: clean(v) for e, v in r["engines"].items()},
            }
            for r in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="also write the table's data as JSON")
    parser.add_argument(
        "--source",
        choices=("auto", "live", "recorded"),
        default="auto",
        help="PyTorch numbers: live run (needs torch), the recording, or live if installed",
    )
    parser.add_argument("--reference", default=REFERENCE, help="the recording (reference.json)")
    parser.add_argument(
        "--regenerate", action="store_true", help="rerun PyTorch and rewrite the recording"
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES, help="a subset")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=DTYPES, help="a subset")
    args = parser.parse_args(argv)
    if args.regenerate:
        regenerate(args.reference)
        print(f"wrote {args.reference}")
    rows, info = run_cases(
        source=args.source, cases=args.cases, dtypes=args.dtypes, reference_path=args.reference
    )
    ok = all(r["ok"] for r in rows)
    source = (
        f"live torch {info['live_torch']}, recording ({info['recorded_torch']}) checked against it"
        if info["source"] == "live"
        else f"recorded by torch {info['recorded_torch']} ({args.reference})"
    )
    print(f"PyTorch: {source}; JAX {jax.__version__}, chainrule {cr.__version__}, CPU")
    print(table(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} rows pass" + ("" if ok else f"; {failed} FAIL"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows, info), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
