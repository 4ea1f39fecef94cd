"""Eager gradients of section 3's small cases, timed at several commits in alternation.

`python -m benchmarks.alternate 5d9b8bc HEAD` checks each commit out into a
temporary `git worktree`, then times, in a fresh process per commit and
round, `cr.grad(f, argnums)(*args)` built per call (as section 3 does) for the
operator spelling of the tutorial, the ReLU tutorial and the MLP 10-5-1
(with its data as `jax.Array`s and as NumPy arrays), and for the `jax.numpy`
spelling of the same three. The commits take turns,
round after round, so that the machine's drift reaches them alike; each
process reports the best of `--repeats` loops of `--calls` calls in CPU time
(`time.process_time`), and the table gives, per commit, the smallest and the
median of those over the rounds. On a shared machine the same code reads 10%
apart from one process to the next; only differences beyond that spread mean
anything.

The cases are those of this checkout's `benchmarks/eager.py` and
`benchmarks/models.py`, so old commits are timed on the same functions.

`.` names this checkout's own `src` (uncommitted changes included), so
`python -m benchmarks.alternate HEAD .` times a change against its commit.

A commit written as `REV:plain` (or `.:plain`) is timed with XLA's subnormal semantics
switched off in the timing process: `host.has_subnormal` answers False and
`host.evaluating()` only counts its depth (neither the flush-to-zero mode nor
NumPy's error state). Results may then differ from XLA's at subnormals; it is
an experiment that measures what that handling costs, not an option of the
library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = (
    "tutorial",
    "relu",
    "mlp_jax_data",
    "mlp_numpy_data",
    "tutorial_jnp",
    "relu_jnp",
    "mlp_jnp",
)


def cases() -> dict[str, Callable[[], object]]:
    """The timed calls, by name: section 3's three small cases in the operator
    spelling (`eager.cases`), the MLP also with its data as NumPy arrays, and
    the three in the `jax.numpy` spelling (chainrule imported from wherever
    `sys.path` finds it)."""
    import numpy as np

    import chainrule as cr
    from benchmarks import eager

    def call(case: dict, args: tuple, spelling: str = "cnp") -> Callable[[], object]:
        return lambda: cr.grad(case[spelling], case["argnums"])(*args)

    tutorial, relu, mlp = eager.cases(quick=True)[:3]
    params, x, y = mlp["args"]
    return {
        "tutorial": call(tutorial, tutorial["args"]),
        "relu": call(relu, relu["args"]),
        "mlp_jax_data": call(mlp, mlp["args"]),
        "mlp_numpy_data": call(mlp, (params, np.asarray(x), np.asarray(y))),
        "tutorial_jnp": call(tutorial, tutorial["args"], "jnp"),
        "relu_jnp": call(relu, relu["args"], "jnp"),
        "mlp_jnp": call(mlp, mlp["args"], "jnp"),
    }


def without_subnormal_handling() -> None:
    """Switches XLA's subnormal semantics off in this process (see the module
    docstring); a commit without that handling is left as it is."""
    from chainrule.engine import host

    if not hasattr(host, "has_subnormal"):
        return

    class Counting:
        __slots__ = ()

        def __enter__(self):
            host._state.depth += 1
            return self

        def __exit__(self, *exc):
            state = host._state
            state.depth -= 1
            if not state.depth:
                for cache in ("converted", "smallest"):
                    getattr(state, cache, {}).clear()

    host.has_subnormal = lambda x: False
    host.evaluating = Counting


def time_cases(calls: int, repeats: int) -> dict[str, float]:
    """Microseconds per call of each case: the best of `repeats` loops of `calls`."""
    timed = {}
    for name, fn in cases().items():
        for _ in range(min(calls, 50)):  # warm up
            fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                fn()
            best = min(best, (time.process_time() - start) / calls)
        timed[name] = best * 1e6
    return timed


def _child(args: argparse.Namespace) -> None:
    import chainrule

    where = Path(chainrule.__file__).resolve()
    if args.expect_src and not where.is_relative_to(Path(args.expect_src).resolve()):
        raise SystemExit(f"chainrule was imported from {where}, not from {args.expect_src}")
    if args.plain:
        without_subnormal_handling()
    print(json.dumps(time_cases(args.calls, args.repeats)))


def _worktree(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(into), rev],
        check=True,
        capture_output=True,
    )
    return into / "src"


def run(
    revs: list[str], rounds: int, calls: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Times every commit `rounds` times in alternation; returns rev -> case -> times (us)."""
    times: dict[str, dict[str, list[float]]] = {rev: {c: [] for c in CASES} for rev in revs}
    with tempfile.TemporaryDirectory(prefix="chainrule-alternate-") as tmp:
        trees = []
        try:
            for i, rev in enumerate(revs):
                commit, _, mode = rev.partition(":")
                if mode not in ("", "plain"):
                    raise SystemExit(f"{rev}: write a commit, or COMMIT:plain")
                if commit == ".":
                    trees.append(REPO / "src")
                else:
                    trees.append(_worktree(commit, Path(tmp) / f"tree{i}"))
            for _ in range(rounds):
                for rev, src in zip(revs, trees, strict=True):
                    cmd = [sys.executable, "-m", "benchmarks.alternate", "--child"]
                    cmd += ["--calls", str(calls), "--repeats", str(repeats)]
                    cmd += ["--expect-src", str(src)]
                    if rev.endswith(":plain"):
                        cmd.append("--plain")
                    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(REPO)]))
                    out = subprocess.run(
                        cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False
                    )
                    if out.returncode:
                        raise SystemExit(f"{rev}: the timing process failed:\n{out.stderr[-3000:]}")
                    for case, t in json.loads(out.stdout.strip().splitlines()[-1]).items():
                        times[rev][case].append(t)
        finally:
            for src in trees:
                if src != REPO / "src":
                    subprocess.run(
                        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(src.parent)],
                        capture_output=True,
                        check=False,
                    )
    return times


def table(times: dict[str, dict[str, list[float]]]) -> str:
    revs = list(times)
    lines = [
        "| case (us per call, min-median over the rounds) | " + " | ".join(revs) + " |",
        "|---" * (len(revs) + 1) + "|",
    ]
    for case in CASES:
        cells = []
        for rev in revs:
            ts = times[rev][case]
            cells.append(f"{min(ts):.0f}-{statistics.median(ts):.0f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="*", help="commits to compare: COMMIT, ., COMMIT:plain")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expect-src", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if not args.revs:
        parser.error("name at least one commit, e.g. 5d9b8bc HEAD HEAD:plain")
    print(table(run(args.revs, args.rounds, args.calls, args.repeats)))


if __name__ == "__main__":
    main()
