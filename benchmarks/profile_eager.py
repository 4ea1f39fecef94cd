"""Where an eager `cr.grad` of a `jax.numpy` loss spends its time, by owner.

`python -m benchmarks.profile_eager` profiles the three small cases of section
3 (the jnp spelling) with `cProfile` and sums each function's own time
(`tottime`) by who owns the code: chainrule, JAX's `custom_jvp` entry
(`custom_jvp.__call__`, its `debug_info`/`inspect.signature`, its flattening
wrappers: run for `jax.nn.relu` in the forward pass and again, inside the
JVP rule, in the backward pass), `jit`'s Python entry (`pjit`), the Python of
`jax.numpy`/`lax` functions, the rest of JAX (`core.bind`, tracing
contexts, trees), and NumPy/builtins (the arithmetic itself, and
C-implemented helpers).

A callable implemented in C (a `jax.jit` function's C++ entry) is not a
separate profile entry: its time counts to the Python function that called
it. Profiling slows Python code more than C code, so shares, not absolute
times, are what to read.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections import defaultdict

import jax

from benchmarks import eager

OWNERS = (
    # (owner, substrings of the code's file path or name, first match wins)
    ("chainrule", ("/chainrule/",)),
    (
        "JAX custom_jvp entry",
        ("jax/_src/custom_derivatives.py", "jax/_src/api_util.py", "/inspect.py", "linear_util"),
    ),
    ("JAX jit entry (pjit)", ("jax/_src/pjit.py", "jax/_src/stages.py")),
    ("JAX jnp/lax Python", ("jax/_src/numpy/", "jax/_src/lax/", "jax/_src/nn/")),
    ("JAX other", ("/jax/", "/jaxlib/")),
    ("NumPy and builtins", ("~", "numpy/")),
)


def owner(path: str) -> str:
    for name, marks in OWNERS:
        if any(m in path for m in marks):
            return name
    return "other"


def profile(fn, calls: int) -> tuple[float, dict[str, float]]:
    """Seconds per call under the profiler, and the share of each owner."""
    for _ in range(10):
        jax.block_until_ready(fn())
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        jax.block_until_ready(fn())
    prof.disable()
    stats = pstats.Stats(prof).stats
    by_owner: dict[str, float] = defaultdict(float)
    for (path, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        by_owner[owner(path)] += tottime
    total = sum(by_owner.values())
    return total / calls, {k: v / total for k, v in by_owner.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    names = [name for name, _ in OWNERS] + ["other"]
    print("| case | us per call (profiled) | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for c in eager.cases(quick=True)[:3]:
        fns = eager.contenders(c, torch=None)
        per_call, shares = profile(fns["chainrule jnp"], args.calls)
        cells = " | ".join(f"{100 * shares.get(n, 0.0):.0f}%" for n in names)
        print(f"| {c['case']} | {per_call * 1e6:.0f} | {cells} |")


if __name__ == "__main__":
    main()
