"""The least time any tracer outside JAX can take for a `jax.numpy` loss: JAX's own Python.

When a loss written with `jax.numpy`/`jax.nn` runs on a tracer that is not
JAX's (chainrule's, or any other), every call goes through JAX's Python
before the tracer's code is reached: the `jnp` function's argument handling,
`jit`'s Python entry (a `jit`-wrapped `jnp` function cannot take its C++ fast
path on a foreign tracer), `jax.custom_jvp.__call__` for `jax.nn.relu` and
friends (`inspect.signature`, debug info, flattening), and `core.bind`'s
search for the current trace.

`floor(fun, args)` times exactly that: `fun` runs on `FloorTracer`s of a
`FloorTrace` whose hooks do no work at all; each returns the output the same
call returned the first time (`FloorTrace` records them in call order, then
replays them), and arithmetic operators on the tracers return their recorded
result without entering JAX. So the time measured is JAX's Python for the
forward pass alone: no arithmetic, no tape, no backward pass, no result
conversion. A reverse-mode transform that lives outside JAX must at least run
the forward pass, so no such transform can be faster than this floor; where
the floor already exceeds a target, the target cannot be met from outside JAX.

`python -m benchmarks.jax_floor` prints the floor of the jnp spelling of
section 3's small cases beside the time of the same gradient with chainrule,
`jax.grad` and PyTorch, measured side by side.
"""

from __future__ import annotations

import argparse
import operator
import timeit
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax._src import core as jcore  # the Trace interface (JAX 0.10, pinned)

from benchmarks import eager


def _struct(x: Any) -> Any:
    if isinstance(x, FloorTracer):
        return jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype, weak_type=x.aval.weak_type)
    return x


def _replayed(op, flip: bool = False):
    """An operator of `FloorTracer`: returns its recorded result (whose abstract
    value `jax.eval_shape` finds on the first run only)."""

    def method(self, *others):
        def compute():
            args = [_struct(self), *map(_struct, others)]
            out = jax.eval_shape(op, *(args[::-1] if flip else args))
            aval = jcore.ShapedArray(out.shape, out.dtype, weak_type=out.weak_type)
            return [FloorTracer(self._trace, aval)]

        return self._trace.next_output(compute)[0]

    return method


class FloorTracer(jcore.Tracer):
    """A value of a `FloorTrace`: only its abstract value. Its arithmetic
    operators cost a transform nothing beyond its own bookkeeping (no JAX)."""

    __slots__ = ("aval",)

    def __init__(self, trace: FloorTrace, aval: Any):
        self._trace = trace
        self.aval = aval

    __add__, __radd__ = _replayed(operator.add), _replayed(operator.add, flip=True)
    __sub__, __rsub__ = _replayed(operator.sub), _replayed(operator.sub, flip=True)
    __mul__, __rmul__ = _replayed(operator.mul), _replayed(operator.mul, flip=True)
    __truediv__ = _replayed(operator.truediv)
    __rtruediv__ = _replayed(operator.truediv, flip=True)
    __pow__, __rpow__ = _replayed(operator.pow), _replayed(operator.pow, flip=True)
    __matmul__ = _replayed(operator.matmul)
    __rmatmul__ = _replayed(operator.matmul, flip=True)
    __neg__ = _replayed(operator.neg)
    T = property(_replayed(lambda x: x.T))


class FloorTrace(jcore.Trace):
    """A trace whose hooks return recorded outputs: records on the first run,
    replays on the next ones (`reset` before each run)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[list[FloorTracer]] = []
        self.position = 0

    def reset(self) -> None:
        self.position = 0

    def next_output(self, compute) -> Any:
        i = self.position
        self.position += 1
        if i == len(self.outputs):  # the first run: find the output's abstract value
            self.outputs.append(compute())
        return self.outputs[i]

    def _avals(self, avals: list[Any]) -> list[FloorTracer]:
        return [FloorTracer(self, a) for a in avals]

    def process_primitive(self, primitive, tracers, params, /):
        def compute():
            avals = [jcore.typeof(t) for t in tracers]
            out, _ = primitive.abstract_eval(*avals, **params)
            return self._avals(list(out) if primitive.multiple_results else [out])

        outs = self.next_output(compute)
        return outs if primitive.multiple_results else outs[0]

    def process_custom_jvp_call(self, primitive, fun, jvp, tracers, /, *, symbolic_zeros):
        def compute():
            avals = [jcore.typeof(t) for t in tracers]
            closed = jax.make_jaxpr(lambda *a: fun.call_wrapped(*a))(*avals)
            return (self._avals(closed.out_avals), fun.stores[0].val)

        outs, out_type = self.next_output(compute)
        store = fun.stores[0]
        if not store:  # empty: filled as running `fun` fills it (the caller reads it)
            store.store(out_type)
        return outs

    def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, **params):
        raise NotImplementedError("the floor covers the benchmarked losses (no custom_vjp)")


def floor(fun, args: tuple[Any, ...], argnums: int | tuple[int, ...]) -> Callable[[], Any]:
    """A function of no arguments that runs `fun` on `args`, those at `argnums`
    (the differentiated ones) as floor tracers."""
    trace = FloorTrace()
    nums = (argnums,) if isinstance(argnums, int) else argnums

    def box(x):
        return FloorTracer(trace, jcore.typeof(x))

    boxed = [jax.tree_util.tree_map(box, a) if i in nums else a for i, a in enumerate(args)]

    def run():
        trace.reset()
        with jcore.set_current_trace(trace):
            out = fun(*boxed)
        assert trace.position == len(trace.outputs), "fun made other calls than recorded"
        return out

    run()  # records the outputs
    return run


def best(fn, number: int, repeat: int) -> float:
    """Best seconds per call over `repeat` loops of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch = eager.torch_or_none()
    names = ("JAX floor", "chainrule jnp", "chainrule dynamic", "jax.grad", "pytorch eager")
    print(
        "| case | "
        + " | ".join(f"{n} (us)" for n in names)
        + " | floor / PyTorch | floor / jax.grad | jnp / jax.grad | jnp / PyTorch |"
    )
    print("|---|" + "---|" * (len(names) + 4))
    for c in eager.cases(quick=True)[:3]:
        fns = eager.contenders(c, torch)
        timed = {"JAX floor": floor(c["jnp"], c["args"], c["argnums"])}
        for name in names[1:]:
            if name in fns:
                fn = fns[name]
                timed[name] = fn if "torch" in name else (lambda fn=fn: jax.block_until_ready(fn()))
        us = dict.fromkeys(names, np.nan)
        for _ in range(2):  # alternated, so all see the same machine state
            for name, fn in timed.items():
                fn()
                us[name] = np.fmin(us[name], best(fn, args.number, args.repeat) * 1e6)
        ratios = (
            us["JAX floor"] / us["pytorch eager"],
            us["JAX floor"] / us["jax.grad"],
            us["chainrule jnp"] / us["jax.grad"],
            us["chainrule jnp"] / us["pytorch eager"],
        )
        cells = " | ".join(f"{us[n]:.0f}" for n in names)
        print(f"| {c['case']} | {cells} | " + " | ".join(f"{r:.3g}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
