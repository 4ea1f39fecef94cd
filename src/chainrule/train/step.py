"""A jit-compiled, pure training step, on one device or data parallel over several.

`make_train_step(loss_fn, optimizer, engine=...)` builds
`(params, opt_state, batch) -> (params, opt_state, metrics)`: gradients by
chainrule (`cr.value_and_grad`) or by JAX (`jax.value_and_grad`), the update
by any optax `GradientTransformation`. With a `mesh`, the batch is sharded
along its first axis over the mesh's one axis and the parameters and optimizer
state are replicated; XLA inserts the gradient all-reduce (this is JAX's own
`jax.sharding`, nothing more).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import chainrule as cr
from chainrule.train.errors import ConfigError

__all__ = [
    "DATA_AXIS",
    "ENGINES",
    "OPTIMIZERS",
    "data_mesh",
    "gradient_flow",
    "make_optimizer",
    "make_train_step",
    "replicate",
    "shard_batch",
]

ENGINES = ("chainrule", "jax")
OPTIMIZERS = ("sgd", "adam")
DATA_AXIS = "data"


def _value_and_grad(engine: str, check_finite: bool = False) -> Callable:
    if engine == "chainrule":
        return lambda f, **kw: cr.value_and_grad(f, check_finite=check_finite, **kw)
    if engine == "jax":
        if check_finite:
            raise ConfigError(
                "check_finite (--check-finite) watches chainrule's own backward pass; "
                "use engine='chainrule' (--engine chainrule), or JAX's jax_debug_nans."
            )
        return jax.value_and_grad
    raise ConfigError(
        f"Unknown engine {engine!r}. Use engine='chainrule' (chainrule's own VJP rules) or "
        "engine='jax' (jax.value_and_grad)."
    )


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """`optax.sgd` or `optax.adam` by name, after checking the learning rate.

    Args:
      name: `"sgd"` (plain SGD, like `torch.optim.SGD` without momentum) or
        `"adam"` (like `torch.optim.Adam` with its default betas and eps).
      learning_rate: a finite number > 0.

    Returns:
      The optax `GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = make_optimizer("sgd", 0.5)
      >>> updates, _ = tx.update(jnp.array([2.0]), tx.init(jnp.array([0.0])))
      >>> updates.tolist()  # -lr * grad
      [-1.0]
    """
    lr = float(learning_rate)
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(
            f"The learning rate must be a finite number > 0, got {learning_rate!r}. "
            "Pass e.g. --lr 0.01 for SGD or --lr 0.001 for Adam."
        )
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ConfigError(
        f"Unknown optimizer {name!r}. Choose one of: {', '.join(OPTIMIZERS)} "
        "(e.g. --optimizer adam)."
    )


def data_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh named `"data"` over the first `n_devices` of `jax.devices()`.

    On a CPU-only machine, simulate devices by starting Python with
    `XLA_FLAGS=--xla_force_host_platform_device_count=4` (it must be set before
    JAX initialises).

    Examples:
      >>> data_mesh(1).shape
      OrderedDict([('data', 1)])
    """
    devices = jax.devices()
    n = len(devices) if n_devices is None else int(n_devices)
    if n < 1 or n > len(devices):
        raise ConfigError(
            f"Asked for {n} device(s) but JAX sees {len(devices)} "
            f"({devices[0].platform}). Use --devices between 1 and {len(devices)}; on a CPU, "
            "simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
            "Python starts."
        )
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a full copy of every leaf of `tree` on every device of `mesh`.

    The result never aliases `tree`, so a donating step cannot delete the caller's arrays.
    """
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()), may_alias=False)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Splits every leaf of `batch` along its first axis over the devices of `mesh`."""
    n = mesh.size
    for leaf in jax.tree_util.tree_leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ConfigError(
                f"A batch of shape {np.shape(leaf)} cannot be split evenly over {n} devices. "
                f"Use a batch size that is a multiple of {n}."
            )
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def gradient_flow(grads: Any, updates: Any, params: Any) -> dict[str, Any]:
    """Per parameter leaf: the gradient's L2 norm and the update's norm relative to
    the (updated) weight's, the two numbers that show a vanishing or exploding
    layer (a few reductions per leaf, inside the jitted step)."""
    tiny = 1e-30
    return {
        "grad_norm": jax.tree.map(lambda g: jnp.linalg.norm(g.ravel()), grads),
        "update_ratio": jax.tree.map(
            lambda u, p: jnp.linalg.norm(u.ravel()) / (jnp.linalg.norm(p.ravel()) + tiny),
            updates,
            params,
        ),
    }


def make_train_step(
    loss_fn: Callable[[Any, Any], Any],
    optimizer: optax.GradientTransformation,
    engine: str = "chainrule",
    donate: bool = True,
    *,
    has_aux: bool = False,
    mesh: Mesh | None = None,
    check_finite: bool = False,
) -> Callable[[Any, Any, Any], tuple[Any, Any, dict[str, jax.Array]]]:
    """Builds a jitted step `(params, opt_state, batch) -> (params, opt_state, metrics)`.

    The step is pure: it computes `loss_fn(params, batch)` and its gradient
    with the chosen engine, applies `optimizer`, and returns the new
    parameters and optimizer state. It is compiled once per input shape.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar loss` (or `(loss, aux_dict)`
        with `has_aux=True`; the aux entries are added to `metrics`).
      optimizer: any optax `GradientTransformation` (`optax.sgd`, `optax.adam`, ...).
      engine: `"chainrule"` differentiates with `cr.value_and_grad` (chainrule's
        own VJP rules); `"jax"` with `jax.value_and_grad`. Same numbers to
        float32 tolerance.
      donate: donate the `params` and `opt_state` buffers to the step so XLA
        updates them in place. The arrays passed in are then deleted: always
        use the returned ones.
      has_aux: whether `loss_fn` returns `(loss, aux)`.
      mesh: a 1-D `jax.sharding.Mesh` (see `data_mesh`) for data parallelism:
        the batch is sharded along its first axis, parameters and optimizer
        state are replicated. Pass batches through `shard_batch` and initial
        state through `replicate`. `None`: the default device.
      check_finite: (chainrule engine) the step raises, when it runs, the
        provenance report of the first node of the backward pass whose
        cotangent became NaN or infinite (see `cr.value_and_grad`).

    Returns:
      The jitted step. `metrics` holds `loss` (the batch loss before the
      update), `grad_norm` (global L2 norm of the gradient) and `flow`: per
      parameter leaf, the gradient's norm and the update/weight norm ratio
      (the gradient-flow report of `chainrule train`), plus any aux.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> loss = lambda w, batch: jnp.mean((w * batch[0] - batch[1]) ** 2)
      >>> step = make_train_step(loss, optax.sgd(0.1), engine="chainrule", donate=False)
      >>> opt = optax.sgd(0.1)
      >>> w = jnp.float32(1.0)
      >>> w, state, metrics = step(w, opt.init(w), (jnp.ones(4), 2 * jnp.ones(4)))
      >>> float(metrics["loss"]), float(w)  # dloss/dw = -2, so w = 1 + 0.1 * 2
      (1.0, 1.2000000476837158)
    """
    value_and_grad = _value_and_grad(engine, check_finite)(loss_fn, has_aux=has_aux)

    def train_step(params, opt_state, batch):
        if has_aux:
            (loss, aux), grads = value_and_grad(params, batch)
        else:
            loss, grads = value_and_grad(params, batch)
            aux = {}
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "flow": gradient_flow(grads, updates, params),
            **aux,
        }
        return params, opt_state, metrics

    train_step.__name__ = f"train_step_{engine}"
    donate_argnums = (0, 1) if donate else ()
    if mesh is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    if len(mesh.axis_names) != 1:
        raise ConfigError(
            f"make_train_step: mesh must be 1-D (data parallel), got axes {mesh.axis_names}. "
            "Build one with chainrule.train.data_mesh(n_devices)."
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return jax.jit(
        train_step,
        donate_argnums=donate_argnums,
        in_shardings=(replicated, replicated, sharded),
        out_shardings=(replicated, replicated, replicated),
    )
