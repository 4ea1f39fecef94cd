"""Section 3: eager gradients (no jit): chainrule's two spellings vs jax.grad vs PyTorch.

chainrule (dynamic) differentiates the `chainrule.numpy`/operator spelling of
each loss; chainrule (jnp) and jax.grad the `jax.numpy`/`jax.nn` spelling
(through JAX's dispatch into chainrule's trace; the same trace runs both); PyTorch
its own port with `torch.autograd.grad`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import chainrule as cr
from benchmarks import models
from benchmarks._util import (
    NOT_INSTALLED,
    TORCH,
    agreement,
    auto_number,
    measure_blocks,
    paired_ratio,
    ratio_to,
    target,
    torch_or_none,
)

F32 = jnp.float32

# Issue 17's targets (medians of paired ratios): on the three small cases the
# jax.numpy spelling at <= 0.1x jax.grad eager and <= 1.5x PyTorch eager, the
# dynamic spelling at <= 1.0x PyTorch eager; the big MLP at <= 1.2x PyTorch
# eager in both spellings.
TORCH_LIMITS = {"dynamic": 1.0, "jnp": 1.5}
BIG_MLP_TORCH_LIMIT = 1.2


def cases(quick: bool) -> list[dict]:
    """Each case: args, argnums, both spellings, and a PyTorch function of the same args."""
    out = [
        {
            "case": "tutorial (w*x-y)**2",
            "args": tuple(jnp.asarray(v, F32) for v in (1.0, 1.0, 2.0)),
            "argnums": 0,
            "cnp": models.linear_sq_cnp,
            "jnp": models.linear_sq_jnp,
            "torch": lambda t, w, x, y: (w * x - y) ** 2,
            "target": True,
        },
        {
            "case": "tutorial x->w1->ReLU->w2",
            "args": tuple(jnp.asarray(v, F32) for v in (0.5, 1.5, 2.0, 3.0)),
            "argnums": (0, 1, 2),
            "cnp": models.relu_net_cnp,
            "jnp": models.relu_net_jnp,
            "torch": lambda t, w1, w2, x, tg: (w2 * t.relu(w1 * x) - tg) ** 2,
            "target": True,
        },
    ]
    p = models.init_mlp((10, 5, 1))
    x, y = models.regression_data(32, 10, 1)
    out.append(
        {
            "case": "MLP 10-5-1, batch 32",
            "args": (jax.tree_util.tree_map(jnp.asarray, p), jnp.asarray(x), jnp.asarray(y)),
            "argnums": 0,
            "cnp": models.mse_cnp,
            "jnp": models.mse_jnp,
            "torch": _torch_mlp_loss("mse"),
            "target": True,
        }
    )
    sizes, batch = ((10, 5, 5, 3), 32) if quick else ((784, 512, 512, 10), 128)
    p = models.init_mlp(sizes)
    x, y1h, _ = models.classification_data(batch, sizes[0], sizes[-1])
    out.append(
        {
            "case": f"MLP {'-'.join(map(str, sizes))}, batch {batch}",
            "args": (jax.tree_util.tree_map(jnp.asarray, p), jnp.asarray(x), jnp.asarray(y1h)),
            "argnums": 0,
            "cnp": models.xent_cnp,
            "jnp": models.xent_jnp,
            "torch": _torch_mlp_loss("xent"),
            "target": False,
        }
    )
    return out


def _torch_mlp_loss(kind: str):
    def loss(t, params, x, y):
        h = x
        n = len(params) // 2
        for i in range(n):
            h = t.nn.functional.linear(h, params[f"W{i}"], params[f"b{i}"])
            if i < n - 1:
                h = t.relu(h)
        if kind == "mse":
            return t.mean((h - y) ** 2)
        return -t.mean(t.sum(y * t.log_softmax(h, dim=-1), dim=-1))

    return loss


def _to_torch(torch, tree, requires_grad: bool):
    def conv(a):
        return torch.tensor(np.array(a), requires_grad=requires_grad)

    return jax.tree_util.tree_map(conv, tree)


def contenders(c: dict, torch) -> dict:
    args, argnums = c["args"], c["argnums"]
    fns = {
        "chainrule dynamic": (lambda: cr.grad(c["cnp"], argnums)(*args)),
        "chainrule jnp": (lambda: cr.grad(c["jnp"], argnums)(*args)),
        "jax.grad": (lambda: jax.grad(c["jnp"], argnums)(*args)),
    }
    if torch is not None:
        nums = (argnums,) if isinstance(argnums, int) else argnums
        targs = [_to_torch(torch, a, i in nums) for i, a in enumerate(args)]
        leaves = [leaf for i in nums for leaf in jax.tree_util.tree_leaves(targs[i])]
        fns["pytorch eager"] = lambda: torch.autograd.grad(c["torch"](torch, *targs), leaves)
    return fns


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (3 if quick else 15)
    torch = torch_or_none()
    rows, targets, info = [], [], {}
    for c in cases(quick):
        fns = contenders(c, torch)
        # What is timed must be right: every contender's gradients against jax.grad's.
        ref = fns["jax.grad"]()
        info[f"agreement {c['case']}"] = {
            name: agreement(
                [np.asarray(v.detach()) for v in fn()] if "torch" in name else fn(), ref
            )
            for name, fn in fns.items()
            if name != "jax.grad"
        }
        number = auto_number(fns["chainrule dynamic"], 0.002 if quick else 0.03)
        times, torch_times = measure_blocks(
            fns,
            ["chainrule dynamic", "chainrule jnp"],
            repeats=repeats,
            number=number,
            quick=quick,
        )
        extra = [k for k in times if k.startswith(TORCH + " (")]
        for name in ["chainrule dynamic", "chainrule jnp", "jax.grad", "pytorch eager"] + extra:
            t = times.get(name)
            rows.append(
                {
                    "case": c["case"],
                    "contender": name,
                    "time": t and t["median"],
                    "spread": t and t["iqr_rel"],
                    "ratio_vs_jax": t and ratio_to(times, torch_times, name, "jax.grad")["median"],
                    "ratio_spread": t and ratio_to(times, torch_times, name, "jax.grad")["iqr_rel"],
                    "ratio_vs_torch": t
                    and torch_times is not None
                    and ratio_to(times, torch_times, name, "pytorch eager")["median"],
                    "note": NOT_INSTALLED
                    if t is None
                    else (f"{t['threads']} threads" if "threads" in t else ""),
                }
            )
        for front in ("dynamic", "jnp"):
            name = f"chainrule {front}"
            if c["target"]:
                r = paired_ratio(times, name, "jax.grad")["median"]
                targets.append(target(f"(3) eager {c['case']}: {name} / jax.grad", r, 0.1))
            torch_ratio = (
                ratio_to(times, torch_times, name, "pytorch eager")["median"]
                if torch is not None
                else None
            )
            targets.append(
                target(
                    f"(3) eager {c['case']}: chainrule {front} / PyTorch",
                    torch_ratio,
                    TORCH_LIMITS[front] if c["target"] else BIG_MLP_TORCH_LIMIT,
                    note=f"PyTorch at {times[TORCH]['threads']} thread(s), its faster setting"
                    if torch is not None
                    else NOT_INSTALLED,
                )
            )
    return {"name": "3. eager gradients", "rows": rows, "targets": targets, "info": info}
