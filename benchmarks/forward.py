"""Section 5: forward mode from the reverse rules: a Hessian-vector product and jacfwd.

chainrule's JVP is the VJP of its recorded backward pass (see
`chainrule.engine.forward`). Under `jax.jit` that construction should cost
nothing: the values of the recorded backward pass (at cotangent 0) are dead
code, removed before XLA sees the program. Each case is timed side by side
with JAX's own, under `jax.jit` (with XLA's flop count, HLO op counts and
whether the optimized HLO is the same) and eagerly.

* HVP: `jvp(grad(loss), (params,), (v,))` of the MLP's cross-entropy loss,
  with respect to all its parameters.
* jacfwd: the Jacobian of the MLP's logits with respect to one input example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import chainrule as cr
from benchmarks import models
from benchmarks._util import agreement, auto_number, interleaved, paired_ratio, target
from benchmarks.jit_step import cost_flops, hlo_op_counts, normalized_hlo

ENGINES = {"chainrule": cr, "jax": jax}


def cases(quick: bool) -> dict:
    """name -> (engine module -> function of the args, args)."""
    sizes, batch = ((10, 5, 5, 3), 8) if quick else ((10, 32, 32, 3), 32)
    params = jax.tree_util.tree_map(jnp.asarray, models.init_mlp(sizes))
    x, y1h, _ = models.classification_data(batch, sizes[0], sizes[-1])
    x, y1h = jnp.asarray(x), jnp.asarray(y1h)
    v = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.5), params)
    label = f"MLP {'-'.join(map(str, sizes))}"

    def hvp(m):
        return lambda p, v: m.jvp(lambda q: m.grad(models.xent_jnp)(q, x, y1h), (p,), (v,))[1]

    def jacfwd(m):
        return m.jacfwd(lambda xi, p: models.mlp_logits_jnp(p, xi))

    return {
        f"HVP (jvp of grad), {label}, batch {batch}": (hvp, (params, v)),
        f"jacfwd of {label} logits, one input": (jacfwd, (x[0], params)),
    }


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (3 if quick else 15)
    rows, targets, info = [], [], {}
    for case, (make, args) in cases(quick).items():
        eager = {name: make(m) for name, m in ENGINES.items()}
        jitted = {name: jax.jit(f) for name, f in eager.items()}
        xla = {}
        for name, f in jitted.items():
            compiled = f.lower(*args).compile()
            ops = hlo_op_counts(compiled)
            xla[name] = {"flops": cost_flops(compiled), "hlo_ops": ops, "n_ops": sum(ops.values())}
            xla[name]["hlo"] = normalized_hlo(compiled)
        identical = xla["chainrule"].pop("hlo") == xla["jax"].pop("hlo")
        xla["identical_hlo_modulo_names"] = identical
        same_ops = xla["chainrule"]["hlo_ops"] == xla["jax"]["hlo_ops"]
        hlo_note = (
            "identical optimized HLO"
            if identical
            else "same HLO op counts, order differs"
            if same_ops
            else "HLO op counts differ"
        )
        info[f"xla {case}"] = xla
        # What is timed must be right: chainrule's result against JAX's.
        ref = jitted["jax"](*args)
        info[f"agreement {case}"] = {
            "jit": agreement(jitted["chainrule"](*args), ref),
            "eager": agreement(eager["chainrule"](*args), eager["jax"](*args)),
        }
        for mode, fns in (("jit", jitted), ("eager", eager)):
            calls = {name: (lambda f=f, a=args: f(*a)) for name, f in fns.items()}
            number = auto_number(calls["jax"], 0.002 if quick else 0.03)
            times = interleaved(calls, repeats=repeats, number=number)
            ratio = paired_ratio(times, "chainrule", "jax")
            for name in fns:
                t = times[name]
                rows.append(
                    {
                        "case": f"{case} [{mode}]",
                        "contender": "chainrule" if name == "chainrule" else f"jax.{mode}",
                        "time": t["median"],
                        "spread": t["iqr_rel"],
                        "ratio_vs_jax": ratio["median"] if name == "chainrule" else 1.0,
                        "ratio_spread": ratio["iqr_rel"] if name == "chainrule" else None,
                        "xla_flops": xla[name]["flops"] if mode == "jit" else None,
                        "hlo_ops": xla[name]["n_ops"] if mode == "jit" else None,
                        "note": hlo_note if mode == "jit" and name == "chainrule" else "",
                    }
                )
            limit = 1.1 if mode == "jit" else 1.0
            targets.append(
                target(
                    f"(5) {case} [{mode}]: chainrule / jax",
                    ratio["median"],
                    limit,
                    note=hlo_note if mode == "jit" else "",
                )
            )
    return {"name": "5. forward mode and Jacobians", "rows": rows, "targets": targets, "info": info}
