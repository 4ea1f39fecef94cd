"""The training run behind `chainrule train`: data, model, steps, checkpoints, summary.

`run(TrainConfig(...))` trains an MLP (`chainrule.nn`) on a `Dataset` with the
jitted step of `make_train_step`, writes `ckpt-<step>.npz` checkpoints, a
`loss_curve.png` and a `summary.json` into the output folder, and returns the
summary. A run resumed from a checkpoint (`resume=True`) ends with the same
parameters as one that was never interrupted: the batch order is a pure
function of `(seed, step)` and the optimizer state is saved with the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from chainrule import nn
from chainrule.train import checkpoint as ckpt_lib
from chainrule.train.data import BatchOrder, Dataset, load_dataset
from chainrule.train.errors import ConfigError
from chainrule.train.step import (
    ENGINES,
    OPTIMIZERS,
    data_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)

__all__ = ["DEFAULTS", "TrainConfig", "TrainingInterrupted", "run"]

# Per data set: model (hidden sizes), optimizer, learning rate, batch size, epochs.
DEFAULTS = {
    # The tutorial: nn.Sequential(Linear(10, 5), ReLU(), Linear(5, 1)), MSELoss, SGD(lr=0.01), 32.
    "teacher": {"hidden": (5,), "optimizer": "sgd", "lr": 0.01, "batch_size": 32, "epochs": 20},
    "digits": {"hidden": (128,), "optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": 30},
    "file": {"hidden": (128,), "optimizer": "adam", "lr": 1e-3, "batch_size": 32, "epochs": 20},
}
# Options that fix the trajectory; a resumed run takes them from the checkpoint.
_RESUME_KEYS = ("data", "hidden", "optimizer", "lr", "batch_size", "seed", "test_fraction")


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run. `None` means: the data set's default (see `DEFAULTS`).

    With `resume=True`, `None` options are taken from the checkpoint, and any
    option given explicitly must equal the checkpoint's.
    """

    data: str | None = None  # "teacher" (default), "digits", or a .csv/.npz path
    engine: str = "chainrule"
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    steps: int | None = None  # total steps (a resumed run continues up to it)
    epochs: int | None = None  # or: total epochs
    hidden: tuple[int, ...] | None = None
    seed: int | None = None  # model init and batch order
    devices: int = 1
    out: str = "chainrule-run"
    resume: bool = False
    checkpoint_every: int | None = None  # default: every 10% of the steps
    test_fraction: float | None = None  # default 0.2
    progress: bool | None = None  # None: a bar when stderr is a TTY and CI is not set
    quiet: bool = False


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training; `checkpoint` holds the last completed step (or `None`)."""

    def __init__(self, step: int, checkpoint: Path | None, message: str):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def _check_options(cfg: TrainConfig) -> None:
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
    if cfg.hidden is not None and any(h < 1 for h in cfg.hidden):
        raise ConfigError(
            f"--hidden sizes must be positive integers, got {list(cfg.hidden)}. "
            "Example: --hidden 128,64."
        )


def _resolve(cfg: TrainConfig, saved: dict | None) -> dict:
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
                    f"{cfg.out} was written with {flag} {stored!r}. Drop {flag} (the checkpoint's "
                    "value is used) or start a new run in another --out folder."
                )
    resolved = dict(given)
    resolved["data"] = resolved["data"] or "teacher"
    defaults = DEFAULTS.get(resolved["data"], DEFAULTS["file"])
    for key in ("hidden", "optimizer", "lr", "batch_size"):
        if resolved[key] is None:
            resolved[key] = defaults[key]
    resolved["seed"] = 0 if resolved["seed"] is None else int(resolved["seed"])
    resolved["test_fraction"] = (
        0.2 if resolved["test_fraction"] is None else resolved["test_fraction"]
    )
    resolved["hidden"] = tuple(int(h) for h in resolved["hidden"])
    return resolved


def _loss_fn(task: str):
    if task == "classification":

        def loss(params, batch):
            x, labels = batch
            return nn.softmax_cross_entropy(nn.mlp_apply(params, x), labels)

    else:

        def loss(params, batch):
            x, targets = batch
            return nn.mse_loss(nn.mlp_apply(params, x), targets)

    return loss


@contextlib.contextmanager
def _sigint_requests():
    """While active, the first Ctrl-C only sets `flag["stop"]`; a second one interrupts."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Progress:
    """A tqdm bar (TTY) or a log line every 10% (not a TTY), or nothing (`quiet`)."""

    def __init__(self, total: int, initial: int, batch_size: int, mode: str, stream: TextIO):
        self.total, self.mode, self.stream, self.batch_size = total, mode, stream, batch_size
        self.bar = None
        self.last_refresh, self.start, self.start_step = 0.0, time.perf_counter(), initial
        self.every = max(1, total // 10)
        self.first = True
        if mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # no tqdm: fall back to log lines
                self.mode = "log"
            else:
                self.bar = tqdm(
                    total=total, initial=initial, unit="step", file=stream, dynamic_ncols=True
                )

    def update(self, step: int, loss: jax.Array) -> None:
        if self.first:  # measure throughput from the end of the first (compiling) step
            self.first, self.start, self.start_step = False, time.perf_counter(), step
        if self.mode == "bar":
            self.bar.update(1)
            now = time.perf_counter()
            if now - self.last_refresh > 0.25 or step == self.total:
                self.last_refresh = now
                rate = (step - self.start_step) / max(now - self.start, 1e-9)
                self.bar.set_postfix(
                    **{"loss": f"{float(loss):.4g}", "ex/s": f"{rate * self.batch_size:,.0f}"}
                )
        elif self.mode == "log" and (step % self.every == 0 or step == self.total):
            rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"step {step}/{self.total}  loss {float(loss):.4g}  {rate:,.0f} steps/s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_mode(cfg: TrainConfig, stream: TextIO) -> str:
    if cfg.quiet:
        return "off"
    if cfg.progress is not None:
        return "bar" if cfg.progress else "log"
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return "bar" if getattr(stream, "isatty", lambda: False)() and not in_ci else "log"


def _evaluate(params, ds: Dataset, task: str) -> dict[str, float]:
    loss = _loss_fn(task)

    @jax.jit
    def metrics(params, x, y):
        out = {"loss": loss(params, (x, y))}
        if task == "classification":
            out["accuracy"] = nn.accuracy(nn.mlp_apply(params, x), y)
        return out

    result = {}
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if len(x):
            for name, value in metrics(params, x, y).items():
                result[f"{split}_{name}"] = float(value)
    return result


def _plot_loss(history: np.ndarray, path: Path, title: str) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = np.arange(1, len(history) + 1)
    ax.plot(steps, history, lw=0.8, alpha=0.5, label="batch loss")
    window = max(1, len(history) // 50)
    if window > 1:
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if np.all(history > 0):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.91)  # cheaper than tight_layout
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: dict) -> None:
    finite = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite, indent=2) + "\n")  # strict JSON: NaN becomes null
    os.replace(tmp, path)


def run(cfg: TrainConfig, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> dict:
    """Trains, checkpoints, evaluates, plots; returns the summary (also in `summary.json`).

    Raises:
      ConfigError, DataError, CheckpointError: bad options, data or checkpoints.
      TrainingInterrupted: Ctrl-C; a checkpoint of the last completed step was saved.
    """
    t_run = time.perf_counter()
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    _check_options(cfg)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"Cannot use --out {cfg.out!r} as the output folder ({e.strerror}). Pass a folder "
            "path that can be created and written to."
        ) from None
    if not cfg.resume and ckpt_lib.list_checkpoints(out):
        raise ConfigError(
            f"--out {cfg.out!r} already holds checkpoints of an earlier run. Add --resume to "
            "continue that run, or pick another --out folder (or delete the ckpt-*.npz files)."
        )

    saved_ckpt = None
    if cfg.resume:
        saved_ckpt, problems = ckpt_lib.latest_checkpoint(out)
        for bad, problem in problems:
            kept = bad.with_name(bad.name + ".corrupt")
            bad.rename(kept)  # out of the way of later saves and resumes, kept for inspection
            print(
                f"warning: {problem} Renamed it to {kept.name}; using the previous "
                "checkpoint instead.",
                file=stderr,
            )
        print(f"Resuming from {saved_ckpt.path} (step {saved_ckpt.step}).", file=stderr)
    resolved = _resolve(cfg, None if saved_ckpt is None else saved_ckpt.extra["config"])

    ds = load_dataset(resolved["data"], resolved["test_fraction"])
    order = BatchOrder(len(ds.x_train), resolved["batch_size"], resolved["seed"])
    if cfg.steps is not None:
        total = cfg.steps
    else:
        epochs = cfg.epochs or DEFAULTS.get(resolved["data"], DEFAULTS["file"])["epochs"]
        total = epochs * order.steps_per_epoch
    every = cfg.checkpoint_every or max(1, total // 10)

    mesh = data_mesh(cfg.devices) if cfg.devices > 1 else None
    if mesh is not None and resolved["batch_size"] % cfg.devices:
        raise ConfigError(
            f"--batch-size {resolved['batch_size']} does not split evenly over --devices "
            f"{cfg.devices}. Use a batch size that is a multiple of {cfg.devices}."
        )

    sizes = [ds.n_features, *resolved["hidden"], ds.n_outputs]
    params = nn.mlp_init(jax.random.key(resolved["seed"]), sizes, jnp.float32)
    optimizer = make_optimizer(resolved["optimizer"], resolved["lr"])
    opt_state = optimizer.init(params)
    start, history = 0, np.zeros(0, np.float32)
    if saved_ckpt is not None:
        params, opt_state = saved_ckpt.restore(params, opt_state)
        start = saved_ckpt.step
        history = np.asarray(saved_ckpt.extra.get("loss_history", history), np.float32)[:start]
    if start >= total:
        print(
            f"The checkpoint is already at step {start}, at or past the {total} steps asked for; "
            "nothing to train (raise --steps or --epochs to continue).",
            file=stderr,
        )
    place = (lambda t: replicate(t, mesh)) if mesh is not None else jax.device_put
    params, opt_state = place(params), place(opt_state)

    step_fn = make_train_step(
        _loss_fn(ds.task), optimizer, engine=cfg.engine, donate=True, mesh=mesh
    )
    losses: list[jax.Array] = []
    last_saved: Path | None = saved_ckpt.path if saved_ckpt is not None else None

    def all_losses() -> np.ndarray:
        new = np.asarray(jax.device_get(losses), np.float32).reshape(-1)
        return np.concatenate([history, new])

    def save(step: int) -> Path:
        nonlocal history
        history = all_losses()  # fetch the losses so far once, not again at every save
        losses.clear()
        extra = {
            "config": {k: list(v) if k == "hidden" else v for k, v in resolved.items()},
            "data_order": order.state(),
            "engine": cfg.engine,
            "loss_history": history,
        }
        return ckpt_lib.save_checkpoint(out, step, params, opt_state, extra)

    progress = Progress(total, start, resolved["batch_size"], _progress_mode(cfg, stderr), stderr)
    completed = start
    t_start = time.perf_counter()
    t_compiled = None
    try:
        with _sigint_requests() as sigint:
            for step in range(start, total):
                idx = order.indices(step)
                batch = (ds.x_train[idx], ds.y_train[idx])
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                params, opt_state, metrics = step_fn(params, opt_state, batch)
                completed = step + 1
                losses.append(metrics["loss"])
                if t_compiled is None:
                    metrics["loss"].block_until_ready()
                    t_compiled = time.perf_counter()
                progress.update(completed, metrics["loss"])
                if completed % every == 0 or completed == total:
                    last_saved = save(completed)
                if sigint["stop"]:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        progress.close()
        leaves = jax.tree_util.tree_leaves((params, opt_state))
        if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves):
            # Interrupted inside a step whose inputs were donated: the last good state is on disk.
            msg = f"Interrupted during step {completed + 1}; "
            msg += f"the last checkpoint is {last_saved}." if last_saved else "nothing was saved."
            raise TrainingInterrupted(completed, last_saved, msg) from None
        if last_saved is None or ckpt_lib.checkpoint_path(out, completed) != last_saved:
            last_saved = save(completed)
        raise TrainingInterrupted(
            completed,
            last_saved,
            f"Interrupted after step {completed}/{total}; saved {last_saved}. "
            f"Continue with the same command plus --resume (--out {cfg.out}).",
        ) from None
    progress.close()
    jax.block_until_ready(params)
    t_end = time.perf_counter()

    timed_steps = completed - start - 1
    speed = timed_steps / (t_end - t_compiled) if t_compiled and timed_steps > 0 else float("nan")
    history = all_losses()
    tail = history[-max(1, min(len(history), order.steps_per_epoch)) :]
    summary: dict[str, Any] = {
        "data": resolved["data"],
        "task": ds.task,
        "engine": cfg.engine,
        "optimizer": resolved["optimizer"],
        "lr": resolved["lr"],
        "batch_size": resolved["batch_size"],
        "hidden": list(resolved["hidden"]),
        "seed": resolved["seed"],
        "devices": cfg.devices,
        "steps": completed,
        "start_step": start,
        "epochs": completed / order.steps_per_epoch,
        "final_loss": float(np.mean(tail)) if len(tail) else float("nan"),
        **_evaluate(params, ds, ds.task),
        "steps_per_second": speed,
        "examples_per_second": speed * resolved["batch_size"],
        "compile_seconds": (t_compiled - t_start) if t_compiled else 0.0,
        "train_seconds": t_end - t_start,  # the loop, first step's compilation included
        "wall_seconds": time.perf_counter() - t_run,  # data, init, loop, evaluation
        "checkpoint": str(last_saved) if last_saved else None,
    }
    title = f"{resolved['data']}: {cfg.engine}, {resolved['optimizer']} lr={resolved['lr']}"
    curve = _plot_loss(history, out / "loss_curve.png", title) if len(history) else None
    summary["loss_curve"] = str(curve) if curve else None
    _write_json(out / "summary.json", summary)
    print(format_summary(summary), file=stdout)
    if curve is None and len(history):
        print("(loss curve skipped: matplotlib is not installed)", file=stdout)
    return summary


def format_summary(s: dict) -> str:
    """The final report printed by `chainrule train`."""
    name = Path(s["data"]).name if s["data"] not in DEFAULTS else s["data"]
    lines = [
        f"chainrule train: {name} ({s['task']}), engine={s['engine']}, "
        f"{s['optimizer']}(lr={s['lr']:g}), batch {s['batch_size']}, "
        f"MLP hidden {s['hidden']}, {s['devices']} device(s)",
        f"  steps        {s['steps']} ({s['epochs']:.1f} epochs; started at {s['start_step']})",
        f"  final loss   {s['final_loss']:.4g}  (mean batch loss over the last epoch)",
    ]
    for split in ("train", "test"):
        if f"{split}_loss" in s:
            line = f"  {split + ' loss':<12} {s[f'{split}_loss']:.4g}"
            if f"{split}_accuracy" in s:
                line += f"   {split} accuracy {100 * s[f'{split}_accuracy']:.2f}%"
            lines.append(line)
    if not math.isfinite(s["steps_per_second"]):
        lines.append(
            f"  speed        n/a (fewer than 2 steps run), {s['wall_seconds']:.1f} s in all"
        )
    else:
        lines.append(
            f"  speed        {s['steps_per_second']:,.0f} steps/s "
            f"({s['examples_per_second']:,.0f} examples/s) after {s['compile_seconds']:.1f} s "
            f"compiling; training {s['train_seconds']:.1f} s, {s['wall_seconds']:.1f} s in all"
        )
    lines.append(f"  checkpoint   {s['checkpoint']}")
    if s.get("loss_curve"):
        lines.append(f"  loss curve   {s['loss_curve']}")
    return "\n".join(lines)
