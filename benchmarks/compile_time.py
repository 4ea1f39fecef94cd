"""Section 2: trace + compile time of `jax.jit(cr.grad(loss))` vs `jax.jit(jax.grad(loss))`.

Each measurement builds a fresh loss function object (a new closure), so no
JAX cache is hit; it times the first call (trace, lower, XLA compile, run)
and, separately, the trace / lower / compile phases via the AOT API.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import chainrule as cr
from benchmarks import models
from benchmarks._util import agreement, block, summarize, target

GRADS = {"chainrule": cr.grad, "jax.grad": jax.grad}
WIDTH, BATCH = 64, 32


def fresh_loss():
    """A new function object each call: jit caches are keyed on it."""

    def loss(params, x, y):
        h = x
        n = models.n_layers(params)
        for i in range(n):
            h = h @ params[f"W{i}"].T + params[f"b{i}"]
            if i < n - 1:
                h = jax.nn.relu(h)
        return jnp.mean((h - y) ** 2)

    return loss


def first_call(grad, params, x, y) -> tuple[float, dict]:
    f = jax.jit(grad(fresh_loss()))
    t0 = time.perf_counter()
    out = block(f(params, x, y))
    return time.perf_counter() - t0, out


def phases(grad, params, x, y) -> dict[str, float]:
    f = jax.jit(grad(fresh_loss()))
    t0 = time.perf_counter()
    traced = f.trace(params, x, y)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2}


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """(intercept, slope, max relative residual) of a least-squares line."""
    slope, intercept = np.polyfit(xs, ys, 1)
    pred = intercept + slope * np.asarray(xs)
    return float(intercept), float(slope), float(np.max(np.abs(pred - ys) / ys))


def _marginal_ratio(depths, values) -> float | None:
    """Cost per added layer from the middle to the deepest model, over the same from the
    shallowest to the middle one: 1.0 is exactly linear, > 1 grows faster than linear."""
    s1 = (values[1] - values[0]) / (depths[1] - depths[0])
    s2 = (values[2] - values[1]) / (depths[2] - depths[1])
    return s2 / s1 if s1 > 0 else None


def run(quick: bool = False, repeats: int | None = None) -> dict:
    depths = (1, 2, 3) if quick else (10, 50, 200)
    repeats = repeats or (2 if quick else 3)
    rows, targets, info = [], [], {}
    medians: dict[str, list[float]] = {n: [] for n in GRADS}
    trace_medians: dict[str, list[float]] = {n: [] for n in GRADS}
    for depth in depths:
        params = jax.tree_util.tree_map(
            jnp.asarray, models.init_mlp((WIDTH,) * (depth + 1), seed=depth)
        )
        x, y = (jnp.asarray(a) for a in models.regression_data(BATCH, WIDTH, WIDTH))
        if depth == depths[0]:  # every layer has the same shapes: warm JAX's caches once
            first_call(jax.grad, params, x, y)
            first_call(cr.grad, params, x, y)
        samples: dict[str, list[float]] = {n: [] for n in GRADS}
        outs = {}
        for r in range(repeats):
            order = list(GRADS) if r % 2 == 0 else list(GRADS)[::-1]
            for name in order:
                t, outs[name] = first_call(GRADS[name], params, x, y)
                samples[name].append(t)
        info[f"agreement {depth} layers"] = agreement(outs["chainrule"], outs["jax.grad"])
        # Fresh functions per engine, timed phase by phase (AOT API): the median
        # of `repeats` samples per phase, interleaved like the first calls.
        phase_samples: dict[str, list[dict]] = {n: [] for n in GRADS}
        for r in range(repeats):
            for name in list(GRADS) if r % 2 == 0 else list(GRADS)[::-1]:
                phase_samples[name].append(phases(GRADS[name], params, x, y))
        phase = {
            name: {k: float(np.median([p[k] for p in ps])) for k in ps[0]}
            for name, ps in phase_samples.items()
        }
        stats = {n: summarize(s) for n, s in samples.items()}
        ratios = summarize(
            [a / b for a, b in zip(samples["chainrule"], samples["jax.grad"], strict=True)]
        )
        for name in GRADS:
            medians[name].append(stats[name]["median"])
            trace_medians[name].append(phase[name]["trace"])
            rows.append(
                {
                    "case": f"{depth} layers x {WIDTH}",
                    "contender": name,
                    "time": stats[name]["median"],
                    "spread": stats[name]["iqr_rel"],
                    "ratio_vs_jax": ratios["median"] if name == "chainrule" else 1.0,
                    "ratio_spread": ratios["iqr_rel"] if name == "chainrule" else None,
                    "per_layer": stats[name]["median"] / depth,
                    **{f"{k}_s": v for k, v in phase[name].items()},
                }
            )
        targets.append(
            target(f"(2) compile {depth} layers: chainrule / jax.grad", ratios["median"], 1.3)
        )
    for name in GRADS:
        a, b, resid = linear_fit(depths, medians[name])
        info[f"fit {name}"] = {"intercept_s": a, "slope_s_per_layer": b, "max_rel_residual": resid}
        info[f"marginal ratio {name}"] = {
            "total": _marginal_ratio(depths, medians[name]),
            "trace": _marginal_ratio(depths, trace_medians[name]),
        }
    jm = {k: "n/a" if v is None else f"{v:.2f}" for k, v in info["marginal ratio jax.grad"].items()}
    targets.append(
        target(
            "(2) chainrule first call linear in depth: s/layer (deep half) / s/layer (shallow)",
            info["marginal ratio chainrule"]["total"],
            1.5,
            note=f"jax.grad: {jm['total']}; fit residual "
            f"{info['fit chainrule']['max_rel_residual']:.0%}",
        )
    )
    targets.append(
        target(
            "(2) chainrule trace phase linear in depth: s/layer (deep half) / s/layer (shallow)",
            info["marginal ratio chainrule"]["trace"],
            1.5,
            note=f"jax.grad: {jm['trace']}; median of {repeats} samples per depth",
        )
    )
    return {"name": "2. trace + compile time", "rows": rows, "targets": targets, "info": info}
