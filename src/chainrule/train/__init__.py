"""Training with chainrule or JAX gradients: a jitted optax step, data, checkpoints, a runner.

* `make_train_step(loss_fn, optimizer, engine="chainrule" | "jax")`: a pure,
  jit-compiled `(params, opt_state, batch) -> (params, opt_state, metrics)`
  with buffer donation, optionally data parallel over a `jax.sharding.Mesh`
  (`data_mesh`, `shard_batch`, `replicate`).
* `load_dataset`, `BatchOrder`: built-in and user data sets, a resumable batch order.
* `save_checkpoint`, `load_checkpoint`, `latest_checkpoint`, `read_checkpoint`:
  atomic, pickle-free `.npz` checkpoints, read with bounded memory.
* `run(TrainConfig(...))`: the loop behind the `chainrule train` command.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from chainrule import nn, train
  >>> params = nn.mlp_init(jax.random.key(0), [3, 4, 1], jnp.float32)
  >>> loss = lambda p, batch: nn.mse_loss(nn.mlp_apply(p, batch[0]), batch[1])
  >>> opt = optax.adam(1e-2)
  >>> step = train.make_train_step(loss, opt, engine="chainrule")
  >>> batch = (jnp.ones((8, 3), jnp.float32), jnp.zeros((8, 1), jnp.float32))
  >>> params, state, metrics = step(params, opt.init(params), batch)
  >>> sorted(metrics)
  ['flow', 'grad_norm', 'loss']
"""

from chainrule.train.checkpoint import (
    Checkpoint,
    CheckpointHeader,
    CheckpointMismatchError,
    Expected,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    read_header,
    save_checkpoint,
)
from chainrule.train.config import DEFAULTS, TrainConfig, default_out
from chainrule.train.data import BatchOrder, Dataset, digits_dataset, load_dataset, teacher_dataset
from chainrule.train.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    TrainError,
    TrainingDiverged,
)
from chainrule.train.loop import TrainingInterrupted, run
from chainrule.train.step import (
    data_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)

__all__ = [
    "DEFAULTS",
    "BatchOrder",
    "Checkpoint",
    "CheckpointError",
    "CheckpointHeader",
    "CheckpointMismatchError",
    "ConfigError",
    "DataError",
    "Dataset",
    "Expected",
    "OutputError",
    "TrainConfig",
    "TrainError",
    "TrainingDiverged",
    "TrainingInterrupted",
    "data_mesh",
    "default_out",
    "digits_dataset",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_dataset",
    "make_optimizer",
    "make_train_step",
    "read_checkpoint",
    "read_header",
    "replicate",
    "run",
    "save_checkpoint",
    "shard_batch",
    "teacher_dataset",
]
