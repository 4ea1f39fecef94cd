"""Section 4: gradients through deep chains of scalar ops, `w = sin(w) * 1.0001`, eager.

Each contender runs in its own subprocess (`python -m benchmarks.deep_chain
--worker ENGINE REPEATS BUDGET N...`), so memory peaks do not mix: the worker
warms up, and for each N (smallest first) reads its resident set (VmRSS),
resets the high-water mark, runs the gradient, and reports the growth of
VmHWM over that baseline, then the median time of the repeats. chainrule uses
the `chainrule.numpy` spelling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks._util import NOT_INSTALLED, target, torch_threads

ENGINES = ("chainrule dynamic", "jax.grad", "pytorch eager")
# jax.grad's eager run may take at most this long at one N: when its measured
# time at the smaller N extrapolates (linearly) past it, it is not run at the
# larger N, and the row says so. chainrule and PyTorch always run.
BUDGET_S = 30.0
BUDGETED = ("jax.grad",)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make(engine: str):
    """Returns grad_fn(n) computing d(chain of n)/dw at w = 0.5 for `engine`."""
    if engine == "chainrule dynamic":
        import jax.numpy as jnp

        import chainrule as cr
        import chainrule.numpy as cnp

        def chain(w, n):
            for _ in range(n):
                w = cnp.sin(w) * 1.0001
            return w

        w0 = jnp.asarray(0.5, jnp.float32)
        return lambda n: float(cr.grad(chain)(w0, n))
    if engine == "jax.grad":
        import jax
        import jax.numpy as jnp

        def chain(w, n):
            for _ in range(n):
                w = jnp.sin(w) * 1.0001
            return w

        w0 = jnp.asarray(0.5, jnp.float32)
        return lambda n: float(jax.grad(chain)(w0, n))
    if engine == "pytorch eager":
        import torch

        torch.set_num_threads(torch_threads())

        def grad_fn(n):
            w0 = torch.tensor(0.5, dtype=torch.float32, requires_grad=True)
            w = w0
            for _ in range(n):
                w = torch.sin(w) * 1.0001
            (g,) = torch.autograd.grad(w, w0)
            return float(g)

        return grad_fn
    raise ValueError(engine)


def measure(grad_fn, n: int, repeats: int) -> dict:
    rss0 = _proc_status_kib("VmRSS")
    reset = _reset_hwm()
    hwm_before = _proc_status_kib("VmHWM")
    times = []
    t0 = time.perf_counter()
    value = grad_fn(n)
    times.append(time.perf_counter() - t0)
    hwm = _proc_status_kib("VmHWM")
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        grad_fn(n)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "n": n,
        "grad": value,
        "time": times[len(times) // 2],
        "times": times,
        "rss_before_kib": rss0,
        "hwm_kib": hwm,
        "hwm_reset": reset,
        # Growth of the peak over the resident set just before the run.
        "mem_growth_kib": hwm - (rss0 if reset else max(rss0, hwm_before)),
    }


def worker(engine: str, ns: list[int], repeats: int, budget_s: float) -> dict:
    """Runs in its own process: every N for one contender, smallest first.

    The high-water mark is reset (clear_refs) before each N, so each N's peak
    is its own. Larger N are skipped when the last measured time, scaled
    linearly, exceeds `budget_s`.
    """
    grad_fn = _make(engine)
    grad_fn(50)  # warm up: imports, kernel caches
    grad_fn(50)
    out = {}
    last = None
    for i, n in enumerate(ns):
        if last is not None and engine in BUDGETED:
            estimate = last["time"] * n / last["n"]
            if estimate > budget_s:
                out[str(n)] = {
                    "skipped": f"skipped: {last['time']:.1f} s at N={last['n']} extrapolates "
                    f"to ~{estimate:.0f} s at N={n} > budget {budget_s:.0f} s"
                }
                continue
        last = measure(grad_fn, n, repeats if i == 0 else max(1, repeats - 2))
        out[str(n)] = last
    return out


def _worker_cmd(engine: str, ns, repeats: int) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.deep_chain", "--worker", engine, str(repeats)]
    return cmd + [str(BUDGET_S), *map(str, ns)]


def spawn_all(engines, ns, repeats: int, concurrent: bool) -> dict[str, dict]:
    """Runs one worker process per engine: one after another, or all at once
    (`concurrent`, for smoke runs whose timings do not matter)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(engine):
        return subprocess.Popen(
            _worker_cmd(engine, ns, repeats),
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(engine, proc):
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"deep_chain worker {engine} failed:\n{stderr[-3000:]}")
        return json.loads(stdout.strip().splitlines()[-1])

    if concurrent:
        procs = {e: start(e) for e in engines}
        return {e: finish(e, p) for e, p in procs.items()}
    return {e: finish(e, start(e)) for e in engines}


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(quick: bool = False, repeats: int | None = None) -> dict:
    ns = (50, 200) if quick else (10_000, 100_000)
    repeats = repeats or 2
    engines = [e for e in ENGINES if e != "pytorch eager" or has_torch()]
    results: dict[tuple[str, int], dict] = {}
    for engine, per_n in spawn_all(engines, ns, repeats, concurrent=quick).items():
        for n, r in per_n.items():
            results[(engine, int(n))] = r
    rows = []
    for n in ns:
        for engine in ENGINES:
            r = results.get((engine, n))
            if r is None:
                rows.append({"case": f"N={n}", "contender": engine, "note": NOT_INSTALLED})
                continue
            if "skipped" in r:
                rows.append({"case": f"N={n}", "contender": engine, "note": r["skipped"]})
                continue
            small = results.get((engine, ns[0]), {})
            rows.append(
                {
                    "case": f"N={n}",
                    "contender": engine,
                    "time": r["time"],
                    "us_per_op": r["time"] / n * 1e6,
                    "mem_growth_mib": r["mem_growth_kib"] / 1024,
                    "kib_per_op": r["mem_growth_kib"] / n,
                    "grad": r["grad"],
                    "time_vs_smaller_n": r["time"] / small["time"] if n != ns[0] else None,
                    "note": "",
                }
            )
    targets = []
    big = ns[-1]
    crs, crb = results[("chainrule dynamic", ns[0])], results[("chainrule dynamic", big)]
    targets.append(
        target(
            f"(4) chainrule linear in N: time(N={big}) / time(N={ns[0]}) / {big // ns[0]}",
            crb["time"] / crs["time"] / (big / ns[0]),
            1.25,
        )
    )
    tb = results.get(("pytorch eager", big))
    ok_torch = tb is not None and "time" in tb
    targets.append(
        target(
            f"(4) N={big}: chainrule time / PyTorch time",
            crb["time"] / tb["time"] if ok_torch else None,
            2.0,
            note="" if ok_torch else NOT_INSTALLED,
        )
    )
    targets.append(
        target(
            f"(4) N={big}: chainrule peak-memory growth / PyTorch's",
            crb["mem_growth_kib"] / max(tb["mem_growth_kib"], 1) if ok_torch else None,
            2.0,
            note="" if ok_torch else NOT_INSTALLED,
        )
    )
    info = {"budget_s": BUDGET_S, "raw": {f"{e} N={n}": r for (e, n), r in results.items()}}
    return {"name": "4. deep chains (eager)", "rows": rows, "targets": targets, "info": info}


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--worker":
        ns = [int(a) for a in sys.argv[5:]]
        print(json.dumps(worker(sys.argv[2], ns, int(sys.argv[3]), float(sys.argv[4]))))
    else:
        print("usage: python -m benchmarks --sections deep_chain", file=sys.stderr)
        sys.exit(2)
