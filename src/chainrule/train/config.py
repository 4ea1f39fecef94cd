"""Options of `chainrule train`: defaults, checks, and what a checkpoint may claim.

* `TrainConfig`: the options; `None` means the data set's default (`DEFAULTS`).
* `check_options`: ranges and combinations, before anything is loaded.
* `resolve`: fills defaults, or a resumed checkpoint's options (which must
  agree with any given explicitly).
* `saved_config`: a checkpoint's stored options, checked for type and range
  (a crafted file must not make the run allocate a huge model).
* `model_sizes`, `cnn_image_size`, `init_params`, `abstract_state`: the
  model's sizes (refused when too large or not fitting the data), its initial
  parameters (an MLP, or with `model="cnn"` a small CNN), and the shapes of
  its parameters and optimizer state, computed with `jax.eval_shape`, so
  nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from chainrule import nn
from chainrule.train.checkpoint import CheckpointHeader
from chainrule.train.data import BUILTIN, Dataset
from chainrule.train.errors import CheckpointError, ConfigError
from chainrule.train.step import ENGINES, OPTIMIZERS, make_optimizer

__all__ = [
    "CNN_DEFAULTS",
    "DEFAULTS",
    "MAX_LAYERS",
    "MODELS",
    "MAX_PARAMETERS",
    "RUNS_FOLDER",
    "SEED_MAX",
    "TrainConfig",
    "abstract_state",
    "check_options",
    "cnn_image_size",
    "default_out",
    "init_params",
    "model_sizes",
    "resolve",
    "saved_config",
]

# Per data set: model (hidden sizes), optimizer, learning rate, batch size, epochs.
DEFAULTS = {
    # The tutorial: nn.Sequential(Linear(10, 5), ReLU(), Linear(5, 1)), MSELoss, SGD(lr=0.01), 32.
    "teacher": {"hidden": (5,), "optimizer": "sgd", "lr": 0.01, "batch_size": 32, "epochs": 20},
    "digits": {"hidden": (128,), "optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": 30},
    "file": {"hidden": (128,), "optimizer": "adam", "lr": 1e-3, "batch_size": 32, "epochs": 20},
}
# Options that fix the trajectory; a resumed run takes them from the checkpoint.
_RESUME_KEYS = ("data", "model", "hidden", "optimizer", "lr", "batch_size", "seed", "test_fraction")
RUNS_FOLDER = "runs"  # default output folders: runs/<data set>-<engine>
MAX_PARAMETERS = 100_000_000  # 400 MB of float32 weights (Adam keeps two more copies)
MAX_LAYERS = 100
MODELS = ("mlp", "cnn")
# The CNN's defaults, whatever the data set: its two conv layers' channels (its
# --hidden) and Adam's learning rate (3e-3: 1e-3 stays under 98% on digits in 30 epochs).
CNN_DEFAULTS = {"hidden": (16, 32), "lr": 3e-3}
SEED_MAX = 2**32 - 1  # jax.random.key keeps 32 bits of the seed


def default_out(data: str | None, engine: str, model: str | None = None) -> Path:
    """`runs/<data set>-<engine>`: `teacher`, `digits`, or the data file's name without
    suffix; `runs/<data set>-cnn-<engine>` for the CNN, so it never meets the MLP's run.

    Examples:
      >>> str(default_out("digits", "jax")), str(default_out("data/my.csv", "chainrule"))
      ('runs/digits-jax', 'runs/my-chainrule')
      >>> str(default_out("digits", "chainrule", "cnn"))
      'runs/digits-cnn-chainrule'
    """
    data = data or "teacher"
    name = data if data in BUILTIN else (Path(data).stem or "data")
    if model == "cnn":
        name += "-cnn"
    return Path(RUNS_FOLDER) / f"{name}-{engine}"


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run. `None` means: the data set's default (see `DEFAULTS`).

    With `resume=True`, `None` options are taken from the checkpoint, and any
    option given explicitly must equal the checkpoint's; a folder with no
    checkpoint yet starts a new run.
    """

    data: str | None = None  # "teacher" (default), "digits", or a .csv/.npz path
    engine: str = "chainrule"
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    steps: int | None = None  # total steps (a resumed run continues up to it)
    epochs: int | None = None  # or: total epochs
    hidden: tuple[int, ...] | None = None  # the MLP's hidden sizes; the CNN's two channel counts
    model: str | None = None  # "mlp" (default) or "cnn" (square single-channel images)
    seed: int | None = None  # model init and batch order, 0..SEED_MAX
    devices: int = 1
    out: str | None = None  # default: default_out(data, engine, model)
    resume: bool = False
    overwrite: bool = False  # delete an earlier run's checkpoints and results in `out` first
    checkpoint_every: int | None = None  # default: every 10% of the steps
    test_fraction: float | None = None  # default 0.2
    progress: bool | None = None  # None: a bar when stderr is a TTY and CI is not set
    quiet: bool = False
    check_finite: bool = False  # stop at the first non-finite gradient, with its provenance


def check_options(cfg: TrainConfig) -> None:
    if cfg.check_finite and cfg.engine != "chainrule":
        raise ConfigError(
            "--check-finite watches chainrule's own backward pass: use it with "
            "--engine chainrule (JAX's closest tool is JAX_DEBUG_NANS=1)."
        )
    if cfg.engine not in ENGINES:
        raise ConfigError(
            f"Unknown engine {cfg.engine!r}. Use --engine chainrule (chainrule's own VJP rules) "
            "or --engine jax (jax.value_and_grad); both give the same numbers."
        )
    if cfg.optimizer is not None and cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"Unknown optimizer {cfg.optimizer!r}. Use --optimizer sgd or --optimizer adam."
        )
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(
            f"The learning rate must be a finite number > 0, got --lr {cfg.lr}. "
            "Try --lr 0.01 for SGD or --lr 0.001 for Adam."
        )
    for name in ("batch_size", "steps", "epochs", "checkpoint_every", "devices"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be a positive integer, got {value}.")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ConfigError("Give either --steps or --epochs, not both.")
    if cfg.model is not None and cfg.model not in MODELS:
        raise ConfigError(
            f"Unknown model {cfg.model!r}. Use --model mlp or --model cnn (two conv layers, "
            "max pooling and a linear head, for square images such as --data digits)."
        )
    if cfg.model == "cnn" and cfg.hidden is not None and len(cfg.hidden) != 2:
        raise ConfigError(
            f"--model cnn has two conv layers: --hidden gives their channels, two numbers, got "
            f"{list(cfg.hidden)}. Example: --hidden 16,32."
        )
    if cfg.hidden is not None and any(h < 1 for h in cfg.hidden):
        raise ConfigError(
            f"--hidden sizes must be positive integers, got {list(cfg.hidden)}. "
            "Example: --hidden 128,64."
        )
    if cfg.seed is not None and not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"--seed must be an integer from 0 to {SEED_MAX}, got {cfg.seed}.")
    if cfg.resume and cfg.overwrite:
        raise ConfigError(
            "Give --resume (continue the run in the output folder) or --overwrite (delete it "
            "and start over), not both."
        )


def resolve(cfg: TrainConfig, saved: dict | None, out: Path) -> dict:
    """Fills `None` options from the checkpoint (when resuming), then from `DEFAULTS`."""
    given = {k: getattr(cfg, k) for k in _RESUME_KEYS}
    if given["hidden"] is not None:
        given["hidden"] = tuple(given["hidden"])
    if saved is not None:
        for key in _RESUME_KEYS:
            stored = tuple(saved[key]) if key == "hidden" else saved[key]
            if given[key] is None:
                given[key] = stored
            elif given[key] != stored:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"--resume: this run has {flag} {given[key]!r} but the checkpoint in "
                    f"{out} was written with {flag} {stored!r}. Drop {flag} (the checkpoint's "
                    "value is used) or start a new run in another --out folder."
                )
    resolved = dict(given)
    resolved["data"] = resolved["data"] or "teacher"
    resolved["model"] = resolved["model"] or "mlp"
    defaults = DEFAULTS.get(resolved["data"], DEFAULTS["file"])
    if resolved["model"] == "cnn":
        defaults = {**defaults, **CNN_DEFAULTS}
    for key in ("hidden", "optimizer", "lr", "batch_size"):
        if resolved[key] is None:
            resolved[key] = defaults[key]
    resolved["seed"] = 0 if resolved["seed"] is None else int(resolved["seed"])
    resolved["test_fraction"] = (
        0.2 if resolved["test_fraction"] is None else resolved["test_fraction"]
    )
    resolved["hidden"] = tuple(int(h) for h in resolved["hidden"])
    return resolved


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a checkpoint's saved configuration may hold; checked before it is used for anything.
_SAVED_CONFIG_CHECKS: dict[str, Callable[[Any], bool]] = {
    "data": lambda v: isinstance(v, str) and v != "",
    "model": lambda v: v in MODELS,
    "hidden": lambda v: (
        isinstance(v, list)
        and 1 <= len(v) <= MAX_LAYERS
        and all(_is_int(h) and 1 <= h <= MAX_PARAMETERS for h in v)
    ),
    "optimizer": lambda v: isinstance(v, str) and v in OPTIMIZERS,
    "lr": lambda v: _is_number(v) and math.isfinite(v) and v > 0,
    "batch_size": lambda v: _is_int(v) and v >= 1,
    "seed": lambda v: _is_int(v) and 0 <= v <= SEED_MAX,
    "test_fraction": lambda v: _is_number(v) and 0 <= v < 1,
}


def saved_config(header: CheckpointHeader) -> dict:
    """The training options stored in a checkpoint, each checked for type and range.

    Raises:
      CheckpointError: a missing or impossible value (the file is damaged or crafted).
    """
    config = header.extra.get("config")
    if isinstance(config, dict) and "model" not in config:  # written before --model existed
        config = {**config, "model": "mlp"}
    if not isinstance(config, dict) or any(key not in config for key in _RESUME_KEYS):
        raise CheckpointError(
            f"{header.path}: its metadata lacks the training options ({', '.join(_RESUME_KEYS)}); "
            "it was not written by chainrule train. Delete it, or use another --out folder."
        )
    for key, valid in _SAVED_CONFIG_CHECKS.items():
        if not valid(config[key]):
            shown = repr(config[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CheckpointError(
                f"{header.path}: its metadata has an impossible {key} {shown}; the file is "
                "damaged or was not written by chainrule train. Delete it, or use another "
                "--out folder."
            )
    return {key: config[key] for key in _RESUME_KEYS}


def model_sizes(ds: Dataset, resolved: dict, checkpoint: Path | None = None) -> list[int]:
    """Layer sizes of the MLP, refused when it would be too large to allocate.

    Raises:
      CheckpointError: the sizes came from `checkpoint`'s metadata.
      ConfigError: the sizes came from the options and the data.
    """
    sizes = [ds.n_features, *resolved["hidden"], ds.n_outputs]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    if n_params <= MAX_PARAMETERS and len(resolved["hidden"]) <= MAX_LAYERS:
        return sizes
    model = (
        f"{ds.n_features} features -> hidden {list(resolved['hidden'])} -> {ds.n_outputs} "
        f"outputs is an MLP of {n_params:,} parameters in {len(sizes) - 1} layers"
    )
    limit = f"more than the {MAX_PARAMETERS:,} parameters and {MAX_LAYERS} layers supported"
    if checkpoint is not None and resolved["hidden"]:
        raise CheckpointError(
            f"{checkpoint}: its metadata asks for {model}, {limit}; the file is damaged or was "
            "not written by chainrule train. Delete it, or use another --out folder."
        )
    raise ConfigError(
        f"{model}, {limit}. Pass smaller --hidden sizes (e.g. --hidden 128), or fewer features "
        "or classes."
    )


def cnn_image_size(ds: Dataset, resolved: dict, checkpoint: Path | None = None) -> int:
    """The side of the CNN's square single-channel images, after checking the model's size.

    Raises:
      CheckpointError: the channels came from `checkpoint`'s metadata.
      ConfigError: the data's examples are not square images, or the options ask too much.
    """
    side = math.isqrt(ds.n_features)
    if side * side != ds.n_features or side < 2:
        raise ConfigError(
            f"--model cnn reads each example as a square single-channel image, but this data "
            f"has {ds.n_features} features, not a square number (8x8 digits have 64). Use "
            "--model mlp, or give the pixels of square images as the features."
        )
    c0, c1 = resolved["hidden"]
    n_params = 10 * c0 + 9 * c0 * c1 + c1 + c1 * (side // 2) ** 2 * ds.n_outputs + ds.n_outputs
    if n_params <= MAX_PARAMETERS:
        return side
    model = f"a CNN of {n_params:,} parameters (channels {[c0, c1]}, {side}x{side} images)"
    limit = f"more than the {MAX_PARAMETERS:,} parameters supported"
    if checkpoint is not None:
        raise CheckpointError(
            f"{checkpoint}: its metadata asks for {model}, {limit}; the file is damaged or was "
            "not written by chainrule train. Delete it, or use another --out folder."
        )
    raise ConfigError(f"{model}, {limit}. Pass fewer channels (e.g. --hidden 16,32).")


def init_params(ds: Dataset, resolved: dict, key: jax.Array, checkpoint: Path | None = None):
    """The model's initial float32 parameters (`nn.mlp_init` or `nn.cnn_init`), sizes checked."""
    if resolved["model"] == "cnn":
        side = cnn_image_size(ds, resolved, checkpoint)
        return nn.cnn_init(key, side, resolved["hidden"], ds.n_outputs, jnp.float32)
    return nn.mlp_init(key, model_sizes(ds, resolved, checkpoint), jnp.float32)


def abstract_state(ds: Dataset, resolved: dict, checkpoint: Path | None = None):
    """Shapes and dtypes of the parameters and optimizer state, nothing allocated."""
    optimizer = make_optimizer(resolved["optimizer"], resolved["lr"])
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: init_params(ds, resolved, key, checkpoint))
    return params, jax.eval_shape(optimizer.init, params)
