"""Section 1: a jitted optax SGD training step, chainrule vs jax.grad vs PyTorch eager.

Cases: a big MLP, the tutorial's 10-5-1 MLP, and the CNN of `chainrule train
--model cnn` (two 3x3 convolutions, 2x2 max pooling, a linear head, on 8x8
images; no PyTorch twin here).

Both JAX steps are `jax.jit(step)` where `step` calls `cr.value_and_grad` or
`jax.value_and_grad` on the same `jax.numpy` loss. chainrule runs only at
trace time, so the two compiled programs should do the same XLA work: we
print XLA's `cost_analysis()` flops and the HLO op counts of both.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import chainrule as cr
from benchmarks import models
from benchmarks._util import (
    NOT_INSTALLED,
    TORCH,
    agreement,
    auto_number,
    interleaved,
    measure_blocks,
    paired_ratio,
    ratio_to,
    target,
    torch_or_none,
)

ENGINES = {"chainrule": cr.value_and_grad, "jax.grad": jax.value_and_grad}
LR = 0.01


def make_step(value_and_grad, loss, opt):
    def step(params, opt_state, x, y):
        value, grads = value_and_grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def setup(case: str, quick: bool):
    """(params, x, y, loss, torch loss name, forward flops per example)."""
    if case == "cnn":
        batch = 8 if quick else 64
        params = models.init_cnn()
        x, y, labels = models.classification_data(batch, 64, 10)
        flops = models.cnn_forward_flops(batch)
        return (8, 8), batch, params, x, y, models.cnn_xent_jnp, labels, flops
    if case == "big":
        sizes = (10, 5, 5, 3) if quick else (784, 512, 512, 10)
        batch = 32 if quick else 128
        params = models.init_mlp(sizes)
        x, y, labels = models.classification_data(batch, sizes[0], sizes[-1])
        loss, torch_y = models.xent_jnp, labels
    else:
        sizes, batch = (10, 5, 1), 32
        params = models.init_mlp(sizes)
        x, y = models.regression_data(batch, 10, 1)
        loss, torch_y = models.mse_jnp, y
    fwd_flops = 2 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return sizes, batch, params, x, y, loss, torch_y, fwd_flops


def hlo_op_counts(compiled) -> dict[str, int]:
    """Opcode -> count in the optimized HLO module (fusions counted as one op each)."""
    counts: collections.Counter = collections.Counter()
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = [^ ]+(?:\{[^}]*\})? ([a-z][\w\-]*)\(", line)
        if m:
            counts[m.group(1)] += 1
    return dict(sorted(counts.items()))


def normalized_hlo(compiled) -> str:
    """The optimized HLO text without names, metadata and source-location tables."""
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    text = re.sub(r"%[\w.\-]+", "%v", text)
    text = re.sub(r"\b[a-z_]+\.\d+:", "p:", text)  # computation parameter names
    return "\n".join(ln for ln in text.splitlines() if not re.match(r"^\s*\d+ [\"{]", ln))


def cost_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return None if not ca else ca.get("flops")


def matmul_peak(quick: bool, repeats: int) -> dict:
    """GFLOP/s of jitted float32 matmuls of the MLP's sizes: the practical limit here."""
    shapes = [(128, 784, 512), (128, 512, 512)] if not quick else [(16, 64, 64)]
    if not quick:
        shapes.append((512, 512, 512))
    out = {}
    rng = np.random.default_rng(0)
    for m, k, n in shapes:
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        fn = lambda f=f, a=a, b=b: f(a, b)  # noqa: E731
        number = auto_number(fn, 0.002 if quick else 0.02)
        t = interleaved({"mm": fn}, repeats=repeats, number=number)["mm"]
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / t["median"] / 1e9
    return out


def torch_step_fn(torch, params, x, torch_y, case):
    model = models.torch_mlp(torch, params)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xt = torch.from_numpy(np.array(x))
    if case == "big":
        yt = torch.from_numpy(np.asarray(torch_y)).long()
        loss_fn = torch.nn.functional.cross_entropy
    else:
        yt = torch.from_numpy(np.array(torch_y))
        loss_fn = torch.nn.functional.mse_loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        return loss

    return step


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (3 if quick else 15)
    torch = torch_or_none()
    rows, targets, info = [], [], {}
    peak = matmul_peak(quick, repeats)
    peak_gflops = max(peak.values())
    info["matmul_gflops"] = peak
    for case in ("big", "tutorial", "cnn"):
        sizes, batch, params_np, x, y, loss, torch_y, fwd_flops = setup(case, quick)
        label = f"MLP {'-'.join(map(str, sizes))}, batch {batch}"
        if case == "cnn":
            label = f"CNN 8x8 conv16-conv32-maxpool-linear, batch {batch}"
        params = jax.tree_util.tree_map(jnp.asarray, params_np)
        x, y = jnp.asarray(x), jnp.asarray(y)
        opt = optax.sgd(LR)
        state = opt.init(params)
        steps = {name: make_step(vg, loss, opt) for name, vg in ENGINES.items()}
        xla = {}
        for name, step in steps.items():
            compiled = step.lower(params, state, x, y).compile()
            ops = hlo_op_counts(compiled)
            xla[name] = {
                "flops": cost_flops(compiled),
                "hlo_ops": ops,
                "n_ops": sum(ops.values()),
                "hlo": normalized_hlo(compiled),
            }
        # What is timed must be right: one step of each engine from the same state.
        outs = {n: s(params, state, x, y) for n, s in steps.items()}
        agree = {"chainrule vs jax.grad": agreement(outs["chainrule"], outs["jax.grad"])}
        fns = {n: functools.partial(s, params, state, x, y) for n, s in steps.items()}
        if torch is not None and case != "cnn":
            fns["pytorch eager"] = torch_step_fn(torch, params_np, x, torch_y, case)
            torch_loss = fns["pytorch eager"]().item()  # first step: same initial weights
            agree["loss pytorch vs jax.grad"] = agreement(torch_loss, outs["jax.grad"][2])
        number = auto_number(fns["jax.grad"], 0.002 if quick else 0.05)
        times, torch_times = measure_blocks(
            fns, ["chainrule"], repeats=repeats, number=number, quick=quick
        )
        # XLA's count of the step's flops (the same for both engines; the input's
        # cotangent is never computed); 3x the forward matmuls if it has none.
        train_flops = xla["jax.grad"]["flops"] or 3 * fwd_flops
        extra = [k for k in times if k.startswith(TORCH + " (")]
        contenders = ["chainrule", "jax.grad"] + ([] if case == "cnn" else ["pytorch eager"])
        for name in contenders + extra:
            t = times.get(name)
            rows.append(
                {
                    "case": label,
                    "contender": name,
                    "time": t and t["median"],
                    "spread": t and t["iqr_rel"],
                    "ratio_vs_jax": t and ratio_to(times, torch_times, name, "jax.grad")["median"],
                    "ratio_spread": t and ratio_to(times, torch_times, name, "jax.grad")["iqr_rel"],
                    "gflops": t and train_flops / t["median"] / 1e9,
                    "pct_of_matmul_peak": t and 100 * train_flops / t["median"] / 1e9 / peak_gflops,
                    "xla_flops": xla.get(name, {}).get("flops"),
                    "hlo_ops": xla.get(name, {}).get("n_ops"),
                    "note": NOT_INSTALLED
                    if t is None
                    else (f"{t['threads']} threads" if "threads" in t else ""),
                }
            )
        ratio = paired_ratio(times, "chainrule", "jax.grad")["median"]
        limit = 1.05 if case == "cnn" else 1.02
        targets.append(target(f"(1) jit step {label}: chainrule / jax.grad", ratio, limit))
        same = xla["chainrule"]["hlo_ops"] == xla["jax.grad"]["hlo_ops"]
        identical = xla["chainrule"].pop("hlo") == xla["jax.grad"].pop("hlo")
        xla["identical_hlo_modulo_names"] = identical
        flops_ratio = (
            xla["chainrule"]["flops"] / xla["jax.grad"]["flops"]
            if xla["chainrule"]["flops"] and xla["jax.grad"]["flops"]
            else None
        )
        targets.append(
            target(
                f"(1) jit step {label}: XLA flops chainrule / jax.grad",
                flops_ratio,
                1.0,
                note=("same HLO op counts" if same else "HLO op counts differ")
                + ("; identical optimized HLO modulo names" if identical else "; HLO text differs"),
            )
        )
        info[f"xla {label}"] = xla
        info[f"agreement {label}"] = agree
        if case == "big":
            if torch is None:
                targets.append(target("(1) big MLP: chainrule / PyTorch eager", None, 1.0))
            else:
                r = ratio_to(times, torch_times, "chainrule", "pytorch eager")["median"]
                targets.append(
                    target(
                        "(1) big MLP jit step: chainrule / PyTorch eager",
                        r,
                        1.0,
                        note=f"PyTorch at {times[TORCH]['threads']} thread(s), its faster setting",
                    )
                )
    return {"name": "1. jitted training step", "rows": rows, "targets": targets, "info": info}
