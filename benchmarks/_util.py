"""Timing helpers shared by the sections: interleaved medians, torch detection."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

NOT_INSTALLED = "not installed"


def cores() -> int:
    """CPU cores this process may use (what XLA's CPU thread pool sizes itself to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def torch_threads() -> int:
    """PyTorch's intra-op threads: as many as JAX may use, unless BENCH_TORCH_THREADS says."""
    return int(os.environ.get("BENCH_TORCH_THREADS", cores()))


def torch_thread_settings() -> list[int]:
    """The thread counts PyTorch is timed with in sections 1 and 3: JAX's cores and 1.

    On a small shared machine PyTorch's OpenMP pool can be many times slower
    with all cores than with one (a descheduled worker stalls every barrier),
    so it is timed both ways and targets use its faster setting: chainrule is
    never credited for an unlucky PyTorch configuration.
    """
    if "BENCH_TORCH_THREADS" in os.environ:
        return [torch_threads()]
    return list(dict.fromkeys([cores(), 1]))


def torch_or_none():
    """Imports torch with `torch_threads()` threads, or returns None if not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(torch_threads())
    return torch


def block(x: Any) -> Any:
    """Waits for every JAX array in `x` (pytrees; other leaves pass through)."""
    return jax.block_until_ready(x)


def interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int, number: int = 1, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Times each contender `number` calls at a time, `repeats` times, interleaved.

    Contenders alternate within every repeat (and the order rotates), so load
    from other processes hits all of them alike. Returns per-call seconds:
    median, min, max, and the relative spread (q75 - q25) / median.
    """
    names = list(fns)
    for name in names:
        for _ in range(min(warmup, repeats)):
            block(fns[name]())
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(number):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - t0) / number)
    return {n: {**summarize(s), "samples": s} for n, s in samples.items()}


TORCH = "pytorch eager"


def measure_blocks(
    fns: dict[str, Callable[[], Any]],
    versus_torch: list[str],
    *,
    repeats: int,
    number: int,
    quick: bool = False,
) -> tuple[dict, dict | None]:
    """Times the JAX-side contenders interleaved together, then `versus_torch`
    interleaved with PyTorch in a second block (if `fns` has PyTorch).

    PyTorch's OpenMP threads keep spinning for a while after each call, which
    slows whatever runs next on a busy machine; keeping it out of the JAX block
    stops that from biasing chainrule vs jax.grad. Returns (times of every
    contender, times of the PyTorch block or None). `quick`: PyTorch with
    `torch_threads()` only.
    """
    times = interleaved(
        {k: f for k, f in fns.items() if k != TORCH}, repeats=repeats, number=number
    )
    if TORCH not in fns:
        return times, None
    import torch

    blocks = {}
    for n in [torch_threads()] if quick else torch_thread_settings():
        torch.set_num_threads(n)
        block = {k: fns[k] for k in versus_torch} | {TORCH: fns[TORCH]}
        blocks[n] = interleaved(block, repeats=repeats, number=number)
    torch.set_num_threads(torch_threads())
    best = min(blocks, key=lambda n: blocks[n][TORCH]["median"])
    torch_times = blocks[best]
    times[TORCH] = {**torch_times[TORCH], "threads": best}
    for n, b in blocks.items():
        if n != best:
            times[f"{TORCH} ({n} threads)"] = {**b[TORCH], "threads": n}
    return times, torch_times


def ratio_to(times: dict, torch_times: dict | None, a: str, b: str) -> dict[str, float] | None:
    """Ratio a / b, paired within the block where both ran; unpaired medians otherwise."""
    if not a.startswith(TORCH) and not b.startswith(TORCH):
        return paired_ratio(times, a, b)
    if torch_times is not None and a in torch_times and b in torch_times:
        return paired_ratio(torch_times, a, b)
    if a in times and b in times:
        return {"median": times[a]["median"] / times[b]["median"], "iqr_rel": None}
    return None


def paired_ratio(times: dict, a: str, b: str) -> dict[str, float] | None:
    """Median over repeats of t_a / t_b measured in the same repeat (None if one is missing).

    Pairing cancels load that drifts over the run: both contenders of a pair
    ran back to back. `iqr_rel` is the spread of those per-repeat ratios.
    """
    if a not in times or b not in times:
        return None
    ratios = [x / y for x, y in zip(times[a]["samples"], times[b]["samples"], strict=True)]
    return summarize(ratios)


def summarize(s: list[float]) -> dict[str, float]:
    s = sorted(s)
    med = statistics.median(s)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        spread = (q[2] - q[0]) / med
    else:
        spread = (s[-1] - s[0]) / med if med else 0.0
    return {"median": med, "min": s[0], "max": s[-1], "iqr_rel": spread, "n": len(s)}


def auto_number(fn: Callable[[], Any], target_s: float) -> int:
    """How many calls make one timed sample last about `target_s` seconds."""
    block(fn())
    t0 = time.perf_counter()
    block(fn())
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(target_s / dt))


def target(name: str, value: float | None, limit: float, *, op: str = "<=", note: str = "") -> dict:
    """One target row: the measured value, its limit, pass/fail (None if not measured)."""
    if value is None:
        ok = None
    elif op == "<=":
        ok = value <= limit
    else:
        ok = value >= limit
    return {"name": name, "value": value, "limit": limit, "op": op, "pass": ok, "note": note}


def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def agreement(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> dict:
    """Do two pytrees of arrays agree (float32 tolerances of DESIGN.md)? Max abs difference."""
    import numpy as np

    la = [np.asarray(x, dtype=np.float64) for x in jax.tree_util.tree_leaves(a)]
    lb = [np.asarray(x, dtype=np.float64) for x in jax.tree_util.tree_leaves(b)]
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb, strict=True)):
        return {"allclose": False, "max_abs_diff": None, "why": "structure or shapes differ"}
    diff = max(
        (float(np.max(np.abs(x - y))) if x.size else 0.0) for x, y in zip(la, lb, strict=True)
    )
    ok = all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(la, lb, strict=True))
    return {"allclose": bool(ok), "max_abs_diff": diff}
