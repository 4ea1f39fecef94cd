"""Where the big MLP's eager gradient spends its time, and what it is compared with.

`python -m benchmarks.big_mlp_parts` takes section 3's MLP 784-512-512-10
(batch 128, the operator spelling) and prints:

* the mean time of chainrule's gradient, of the same forward and backward
  pass written by hand in NumPy (no subnormal checks, no conversion to
  `jax.Array`: what host evaluation costs at the least) and of PyTorch at one
  thread, measured together in several rounds;
* chainrule's time by parts, each part timed with `time.perf_counter` around
  the function that does it (matrix products, subnormal checks, handing
  gradients back, ...). The parts overlap where one calls another (the
  checks of the inputs are inside `to_host`), and wrapping adds a little.

`--quick` uses the small MLP of `--quick` benchmark runs (a smoke run).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from benchmarks import eager
from benchmarks._util import torch_or_none
from chainrule.engine import core, host, transforms
from chainrule.engine.rules import linalg

# (label, module, function name): the parts timed.
PARTS = (
    ("forward pass (the traced function)", transforms, "trace_call"),
    ("backward pass", core, "backward"),
    ("  matrix products (NumPy)", linalg, "_host_matmul"),
    ("  subnormal checks (smallest magnitudes, all)", host, "smallest_magnitude"),
    ("    within: testing products BLAS's threads compute", linalg, "_may_underflow"),
    ("inputs becoming host values (checks included)", host, "to_host"),
    ("gradients handed back as jax.Arrays", transforms, "gradients"),
)


def numpy_by_hand(params: dict, x: np.ndarray, y: np.ndarray) -> tuple:
    """The cross-entropy MLP's gradient, forward and backward, in plain NumPy."""
    n_layers = len(params) // 2
    hs, pre = [x], []
    for i in range(n_layers):
        a = hs[-1] @ params[f"W{i}"].T + params[f"b{i}"]
        pre.append(a)
        hs.append(np.maximum(a, 0) if i < n_layers - 1 else a)
    z = hs[-1]
    s = z - z.max(-1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(-1, keepdims=True))
    g = -y / x.shape[0]
    g = g - np.exp(logp) * g.sum(-1, keepdims=True)
    grads = {}
    for i in reversed(range(n_layers)):
        grads[f"W{i}"], grads[f"b{i}"] = g.T @ hs[i], g.sum(0)
        if i:
            g = np.where(pre[i - 1] > 0, g @ params[f"W{i}"], 0)
    return grads


def _mean_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def _timed_parts(fn: Callable[[], object], calls: int) -> tuple[float, dict[str, float]]:
    """fn's mean time and its parts', with each part's function wrapped meanwhile."""
    spent: dict[str, float] = defaultdict(float)
    originals = [(module, name, getattr(module, name)) for _, module, name in PARTS]

    def timer(label: str, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start

        return timed

    for (label, module, name), (_, _, original) in zip(PARTS, originals, strict=True):
        setattr(module, name, timer(label, original))
    try:
        fn()
        spent.clear()
        total = _mean_ms(fn, calls)
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    return total, {label: spent[label] / calls * 1e3 for label, _, _ in PARTS}


def run(quick: bool = False, rounds: int = 4, calls: int = 20) -> dict:
    case = eager.cases(quick)[3]
    params, x, y = case["args"]
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(1)
    fns = eager.contenders(case, torch)
    chainrule = fns["chainrule dynamic"]
    host_args = ({k: np.asarray(v) for k, v in params.items()}, np.asarray(x), np.asarray(y))
    contenders = {"chainrule": chainrule, "NumPy by hand": lambda: numpy_by_hand(*host_args)}
    if torch is not None:
        contenders["PyTorch (1 thread)"] = fns["pytorch eager"]
    # What is timed must be right: the hand-written gradient against jax.grad's.
    want = fns["jax.grad"]()
    got = numpy_by_hand(*host_args)
    for k in want:
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-3, atol=1e-5, err_msg=k)
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(_mean_ms(fn, calls))
    total, parts = _timed_parts(chainrule, calls)
    return {"case": case["case"], "times_ms": times, "parts_total_ms": total, "parts_ms": parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small MLP, one round")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else 4
    out = run(quick=args.quick, rounds=rounds, calls=2 if args.quick else 20)
    print(f"{out['case']}: mean ms per gradient, {rounds} rounds")
    for name, ts in out["times_ms"].items():
        print(f"  {name:<22} " + "  ".join(f"{t:.2f}" for t in ts))
    print(f"chainrule by parts (wrapped: {out['parts_total_ms']:.2f} ms per gradient)")
    for label, ms in out["parts_ms"].items():
        print(f"  {label:<54} {ms:.3f} ms")


if __name__ == "__main__":
    main()
