"""What one eager `cr.grad` call costs before any operation: the parts of a
gradient of the identity, `cr.grad(lambda w, x, y: w)(w, x, y)`, scalars.

`python -m benchmarks.fixed_cost [--calls N]` runs the steps of
`transforms.value_and_grad`'s function one by one in a loop and times each
with `time.perf_counter_ns` (the garbage collector off, the first tenth of
the calls left out), then the whole call, and prints microseconds per call:

* `enter`: the outermost `host.evaluating()` (NumPy's error state, the
  floating-point mode read, whether JAX is tracing);
* `trace_call`: a new trace, the input boxed (a `jax.Array` read as a NumPy
  view and checked for subnormals), the function run;
* `backward`: the backward pass from the output's node;
* `gradients`: the gradient as a `jax.Array` (XLA's `device_put`), which
  includes freeing the previous call's gradient, as a training loop does;
* `exit`: leaving `evaluating()`;
* `jax.Array alone`: `device_put` of a fresh NumPy scalar and freeing it, in
  the same loop shape, for comparison with `gradients`.

These are the costs every eager gradient pays once, whatever the loss; the
benchmark's tutorial case adds three operations to them.
"""

from __future__ import annotations

import argparse
import gc
import time

import jax.numpy as jnp
import numpy as np

import chainrule as cr
from chainrule.engine import core, host, transforms


def parts(calls: int) -> dict[str, float]:
    """Microseconds per call of each part (see the module docstring)."""
    w, x, y = jnp.float32(2.0), jnp.float32(3.0), jnp.float32(4.0)
    f = lambda w, x, y: w  # noqa: E731
    clock = time.perf_counter_ns
    names = ["enter", "trace_call", "backward", "gradients", "exit"]
    totals = dict.fromkeys(names, 0)
    skip = calls // 10
    kept = None
    gc.disable()
    try:
        for i in range(calls):
            t0 = clock()
            with host.evaluating():
                t1 = clock()
                _, out, tracers, trees = transforms.trace_call(f, (w, x, y), (0,), "f")
                t2 = clock()
                one = np.array(1, out.value.dtype)
                cts = core.backward([(out.node, one)], release=True)
                t3 = clock()
                kept = transforms.gradients(tracers, trees, cts)  # (frees the last one)
                t4 = clock()
            t5 = clock()
            if i >= skip:
                steps = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
                for name, dt in zip(names, steps, strict=True):
                    totals[name] += dt
        n = calls - skip
        out_parts = {name: totals[name] / n / 1e3 for name in names}
        device_put = 0
        for i in range(calls):
            value = np.array(1, np.float32)
            t0 = clock()
            kept = host.to_jax(value)  # (frees the last one)
            t1 = clock()
            if i >= skip:
                device_put += t1 - t0
        out_parts["jax.Array alone"] = device_put / n / 1e3
        grad = cr.grad(f)
        for _ in range(skip):
            kept = grad(w, x, y)
        t0 = clock()
        for _ in range(n):
            kept = grad(w, x, y)
        out_parts["whole cr.grad call"] = (clock() - t0) / n / 1e3
    finally:
        gc.enable()
    del kept
    return out_parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    print("| part | us per call |")
    print("|---|---|")
    for name, us in parts(args.calls).items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
