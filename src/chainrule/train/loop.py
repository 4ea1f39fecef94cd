"""The training run behind `chainrule train`: data, model, steps, checkpoints, summary.

`run(TrainConfig(...))` trains an MLP or a small CNN (`chainrule.nn`) on a `Dataset` with the
jitted step of `make_train_step`, writes `ckpt-<step>.npz` checkpoints, a
`loss_curve.png`, a `grad_flow.png` (per-layer gradient norms and update/weight
ratios at the end of each epoch, also in the summary) and a `summary.json` into
the output folder (by default
`runs/<data set>-<engine>`), and returns the summary. A run resumed from a
checkpoint (`resume=True`) ends with the same parameters as one that was never
interrupted: the batch order is a pure function of `(seed, step)` and the
optimizer state is saved with the weights.

`run` is four steps, one function each:

1. `_claim_output`: lock the output folder for the run (a second run on it
   fails at once), remove temporary files a killed run left, and refuse (or,
   with `overwrite`, clear) an earlier run's checkpoints.
2. `_set_up`: the checkpoint to resume from (its metadata and array shapes
   checked against the configuration before anything is allocated), the
   options (`config.py`), the data, the model, the optimizer and the jitted step.
3. `_train`: one step per batch, a checkpoint every `every` steps.
4. `_finish`: the last checkpoint, evaluation, `loss_curve.png`,
   `summary.json` and the printed summary.

Ctrl-C anywhere in `run` only asks the run to stop (`sigint_requests`): it
stops at the next step boundary (or before the first step), saves what exists
(the checkpoint of the last completed step, the loss curve, the summary) and
raises `TrainingInterrupted` (the command line exits 130). A second Ctrl-C
stops at once; atomic writes mean no file is left half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from chainrule import nn
from chainrule.train import checkpoint as ckpt_lib
from chainrule.train import outdir
from chainrule.train.config import (
    DEFAULTS,
    TrainConfig,
    abstract_state,
    check_options,
    default_out,
    init_params,
    resolve,
    saved_config,
)
from chainrule.train.data import BatchOrder, Dataset, load_dataset
from chainrule.train.errors import CheckpointError, ConfigError, OutputError, TrainingDiverged
from chainrule.train.progress import Progress, progress_mode, sigint_requests
from chainrule.train.step import data_mesh, make_optimizer, make_train_step, replicate, shard_batch

__all__ = ["DEFAULTS", "TrainConfig", "TrainingInterrupted", "default_out", "format_summary", "run"]


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run; `checkpoint` holds the last completed step (or is `None`).

    `summary` is the summary written for the steps completed, if it was written.
    """

    def __init__(
        self, step: int, checkpoint: Path | None, message: str, summary: dict | None = None
    ):
        super().__init__(message)
        self.step, self.checkpoint, self.summary = step, checkpoint, summary


# --- the output folder ----------------------------------------------------------------------


def _label(out: Path) -> str:
    return f"--out {str(out)!r}"


def _make_output_folder(cfg: TrainConfig) -> Path:
    out = Path(cfg.out) if cfg.out else default_out(cfg.data, cfg.engine, cfg.model)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"Cannot use {_label(out)} as the output folder ({e.strerror}). Pass a folder "
            "path that can be created and written to."
        ) from None
    return out


def _write_failed(out: Path, name: str, error: OSError, last_saved: Path | None) -> OutputError:
    then = (
        f"then add --resume to continue from {last_saved}"
        if last_saved
        else "then run the command again"
    )
    return OutputError(
        f"Cannot write {name} in {_label(out)} ({error.strerror or error}). Free disk space or "
        f"fix the folder's permissions (or pick another --out), {then}."
    )


def _clear_earlier_run(out: Path) -> int:
    """`--overwrite`: deletes an earlier run's checkpoints and results (links, not targets)."""
    names = ("summary.json", "loss_curve.png", "grad_flow.png")
    old = [*ckpt_lib.list_checkpoints(out), *out.glob("ckpt-*.npz.corrupt")]
    old += [out / name for name in names if (out / name).is_symlink() or (out / name).exists()]
    for path in old:
        path.unlink(missing_ok=True)
    return len(old)


@contextlib.contextmanager
def _claim_output(cfg: TrainConfig, out: Path, stderr: TextIO) -> Iterator[None]:
    """Holds the output folder's lock for the run, after tidying it for this run.

    Raises:
      ConfigError: another run holds the folder, or it holds an earlier run's
        checkpoints and neither `resume` nor `overwrite` was given.
      OutputError: the folder cannot be written.
    """
    with outdir.locked(out, _label(out)):
        try:
            stale = outdir.remove_stale_temporaries(out)
            cleared = _clear_earlier_run(out) if cfg.overwrite else 0
        except OSError as e:
            raise OutputError(
                f"Cannot tidy {_label(out)} ({e.strerror or e}). Fix the folder's permissions, "
                "or pick another --out folder."
            ) from None
        if stale:
            print(
                f"Removed {len(stale)} temporary file(s) left in {out} by a killed run.",
                file=stderr,
            )
        if cleared:
            print(
                f"--overwrite: deleted the earlier run's {cleared} file(s) in {out}.", file=stderr
            )
        if not cfg.resume and ckpt_lib.list_checkpoints(out):
            raise ConfigError(
                f"{_label(out)} already holds checkpoints of an earlier run. Add --resume to "
                "continue that run, --overwrite to delete it and start over, or pick another "
                "--out folder."
            )
        yield


# --- one run: set-up, training, results -----------------------------------------------------


def _apply_fn(model: str):
    return nn.cnn_apply if model == "cnn" else nn.mlp_apply


def _loss_fn(task: str, model: str = "mlp"):
    apply = _apply_fn(model)
    if task == "classification":

        def loss(params, batch):
            x, labels = batch
            return nn.softmax_cross_entropy(apply(params, x), labels)

    else:

        def loss(params, batch):
            x, targets = batch
            return nn.mse_loss(apply(params, x), targets)

    return loss


@dataclasses.dataclass
class _Run:
    """Everything a run needs, built by `_set_up`, and what its steps have done so far."""

    cfg: TrainConfig
    out: Path
    resolved: dict  # the options that fix the trajectory (`_RESUME_KEYS`)
    ds: Dataset
    order: BatchOrder
    total: int  # steps to reach
    every: int  # checkpoint interval
    mesh: Any
    step_fn: Callable
    params: Any
    opt_state: Any
    start: int  # the step this run started from (the checkpoint's, or 0)
    history: np.ndarray  # batch losses of steps 1..n, fetched from the device
    last_saved: Path | None
    completed: int = 0
    losses: list = dataclasses.field(default_factory=list)  # device losses not yet fetched
    flow: list = dataclasses.field(default_factory=list)  # per-epoch gradient flow (host)
    t_start: float | None = None
    t_compiled: float | None = None  # end of the first (compiling) step
    t_end: float | None = None

    def __post_init__(self):
        self.completed = self.start

    def all_losses(self) -> np.ndarray:
        new = np.asarray(jax.device_get(self.losses), np.float32).reshape(-1)
        return np.concatenate([self.history, new])

    def save(self, step: int) -> Path:
        """Writes `ckpt-<step>.npz`, after checking that every loss so far is finite."""
        self.history = self.all_losses()  # fetch the losses so far once, not at every save
        self.losses.clear()
        self._check_finite()
        extra = {
            "config": {k: list(v) if k == "hidden" else v for k, v in self.resolved.items()},
            "data_order": self.order.state(),
            "engine": self.cfg.engine,
            "loss_history": self.history,
        }
        try:
            path = ckpt_lib.save_checkpoint(self.out, step, self.params, self.opt_state, extra)
        except CheckpointError:
            raise
        except OSError as e:
            name = ckpt_lib.checkpoint_path(self.out, step).name
            raise _write_failed(self.out, name, e, self.last_saved) from None
        self.last_saved = path
        return path

    def _check_finite(self) -> None:
        bad = ~np.isfinite(self.history)
        if not bad.any():
            return
        i = int(np.argmax(bad))
        kept = f"the last checkpoint is {self.last_saved}" if self.last_saved else "nothing saved"
        raise TrainingDiverged(
            f"The training loss became {self.history[i]} at step {i + 1} (of {self.total}); "
            f"training stopped ({kept}). Lower the learning rate (this run: --lr "
            f"{self.resolved['lr']:g}) or check the data for extreme values, then start again "
            "with --overwrite (or another --out folder)."
        )

    def state_lost(self) -> bool:
        """True when a step was interrupted after its (donated) inputs were deleted."""
        leaves = jax.tree_util.tree_leaves((self.params, self.opt_state))
        return any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves)

    def write(self, name: str, write: Callable) -> Path:
        """Writes a result file atomically (see `outdir.atomic_write`)."""
        try:
            return outdir.atomic_write(self.out / name, write)
        except OSError as e:
            raise _write_failed(self.out, name, e, self.last_saved) from None


def _set_aside(problems: list[tuple[Path, str]], stderr: TextIO) -> None:
    """Renames unreadable checkpoints to `*.corrupt`, out of the way, kept for inspection."""
    for bad, problem in problems:
        kept = bad.with_name(bad.name + ".corrupt")
        try:
            bad.rename(kept)
        except OSError as e:
            raise _write_failed(bad.parent, kept.name, e, None) from None
        print(
            f"warning: {problem} Renamed it to {kept.name}; using the previous checkpoint instead.",
            file=stderr,
        )


def _resume_point(
    cfg: TrainConfig, out: Path, stderr: TextIO
) -> tuple[ckpt_lib.Checkpoint, dict, Dataset] | None:
    """The newest readable checkpoint of `out`, with the options and data it was written with.

    Each candidate's metadata, the model it implies and its array shapes are
    checked before its arrays are read or the model is allocated. An
    unreadable or impossible checkpoint is set aside for the previous one.

    Returns:
      `(checkpoint, resolved options, data set)`, or `None` when `out` has no
      checkpoint yet (the run then starts from step 0).
    """
    candidates = ckpt_lib.list_checkpoints(out)
    if not candidates:
        print(f"--resume: no checkpoint in {out} yet; starting a new run.", file=stderr)
        return None
    problems: list[tuple[Path, str]] = []
    datasets: dict[tuple, Dataset] = {}
    for path in candidates:
        try:
            header = ckpt_lib.read_header(path)
            resolved = resolve(cfg, saved_config(header), out)
            key = (resolved["data"], resolved["test_fraction"])
            if key not in datasets:
                datasets[key] = load_dataset(*key)
            params, opt_state = abstract_state(datasets[key], resolved, path)
            history = jax.ShapeDtypeStruct((header.step,), np.float32)
            expected = ckpt_lib.Expected(params, opt_state, {"loss_history": history})
            ckpt = ckpt_lib.read_checkpoint(path, expected)
        except ckpt_lib.CheckpointMismatchError:
            raise
        except CheckpointError as e:
            problems.append((path, str(e)))
            continue
        _set_aside(problems, stderr)
        print(f"Resuming from {ckpt.path} (step {ckpt.step}).", file=stderr)
        return ckpt, resolved, datasets[key]
    raise ckpt_lib.no_readable_checkpoint(out, problems)


def _schedule(cfg: TrainConfig, resolved: dict, order: BatchOrder) -> tuple[int, int]:
    """`(total steps, checkpoint interval)`."""
    if cfg.steps is not None:
        total = cfg.steps
    else:
        epochs = cfg.epochs or DEFAULTS.get(resolved["data"], DEFAULTS["file"])["epochs"]
        total = epochs * order.steps_per_epoch
    return total, cfg.checkpoint_every or max(1, total // 10)


def _mesh(cfg: TrainConfig, batch_size: int):
    if cfg.devices == 1:
        return None
    mesh = data_mesh(cfg.devices)
    if batch_size % cfg.devices:
        raise ConfigError(
            f"--batch-size {batch_size} does not split evenly over --devices "
            f"{cfg.devices}. Use a batch size that is a multiple of {cfg.devices}."
        )
    return mesh


def _initial_state(ds: Dataset, resolved: dict, saved: ckpt_lib.Checkpoint | None):
    """`(params, opt_state, start step, loss history)`: fresh, or restored from `saved`."""
    optimizer = make_optimizer(resolved["optimizer"], resolved["lr"])
    if saved is None:
        params = init_params(ds, resolved, jax.random.key(resolved["seed"]))
        return params, optimizer.init(params), 0, np.zeros(0, np.float32)
    params, opt_state = saved.restore(*abstract_state(ds, resolved, saved.path))
    history = np.asarray(saved.extra.get("loss_history", np.zeros(0)), np.float32)
    return params, opt_state, saved.step, history[: saved.step]


def _set_up(cfg: TrainConfig, out: Path, stderr: TextIO) -> _Run:
    """Resume point, options, data, model, optimizer state and the jitted step."""
    resumed = _resume_point(cfg, out, stderr) if cfg.resume else None
    if resumed is None:
        saved, resolved = None, resolve(cfg, None, out)
        ds = load_dataset(resolved["data"], resolved["test_fraction"])
    else:
        saved, resolved, ds = resumed
    order = BatchOrder(len(ds.x_train), resolved["batch_size"], resolved["seed"])
    total, every = _schedule(cfg, resolved, order)
    mesh = _mesh(cfg, resolved["batch_size"])
    params, opt_state, start, history = _initial_state(ds, resolved, saved)
    if start >= total:
        print(
            f"The checkpoint is already at step {start}, at or past the {total} steps asked for; "
            "nothing to train (raise --steps or --epochs to continue).",
            file=stderr,
        )
    place = (lambda t: replicate(t, mesh)) if mesh is not None else jax.device_put
    optimizer = make_optimizer(resolved["optimizer"], resolved["lr"])
    step_fn = make_train_step(
        _loss_fn(ds.task, resolved["model"]),
        optimizer,
        engine=cfg.engine,
        donate=True,
        mesh=mesh,
        check_finite=cfg.check_finite,
    )
    return _Run(
        cfg=cfg,
        out=out,
        resolved=resolved,
        ds=ds,
        order=order,
        total=total,
        every=every,
        mesh=mesh,
        step_fn=step_fn,
        params=place(params),
        opt_state=place(opt_state),
        start=start,
        history=history,
        last_saved=None if saved is None else saved.path,
    )


def _train(r: _Run, sigint: dict, stderr: TextIO) -> bool:
    """Steps `r.completed + 1 .. r.total`; returns early once Ctrl-C asked to stop.

    Returns:
      Whether a second Ctrl-C cut the loop short (the state is intact).

    Raises:
      TrainingInterrupted: a second Ctrl-C inside a step lost its (donated) state.
    """
    progress = Progress(
        r.total, r.start, r.resolved["batch_size"], progress_mode(r.cfg, stderr), stderr
    )
    r.t_start = time.perf_counter()
    try:
        for step in range(r.start, r.total):
            idx = r.order.indices(step)
            batch = (r.ds.x_train[idx], r.ds.y_train[idx])
            if r.mesh is not None:
                batch = shard_batch(batch, r.mesh)
            r.params, r.opt_state, metrics = r.step_fn(r.params, r.opt_state, batch)
            if r.cfg.check_finite:  # the step's own check raises now, before any later use
                jax.block_until_ready(metrics)
            r.completed = step + 1
            r.losses.append(metrics["loss"])
            if r.t_compiled is None:
                metrics["loss"].block_until_ready()
                r.t_compiled = time.perf_counter()
            progress.update(r.completed, metrics["loss"])
            epoch_end = r.completed % r.order.steps_per_epoch == 0
            if epoch_end or r.completed == r.total:
                r.flow.append(_flow_record(r, metrics["flow"]))
            if r.completed % r.every == 0 or r.completed == r.total:
                r.save(r.completed)
            if sigint["stop"]:
                break
    except jax.errors.JaxRuntimeError as e:  # --check-finite's report, raised by the step
        if "non-finite cotangent" not in str(e):
            raise
        raise _nonfinite_gradient(r, str(e)) from None
    except KeyboardInterrupt:
        sigint["stop"] = True
        if r.state_lost():  # the last good state is on disk (or nowhere)
            msg = f"Interrupted during step {r.completed + 1}; "
            msg += (
                f"the last checkpoint is {r.last_saved}." if r.last_saved else "nothing was saved."
            )
            raise TrainingInterrupted(r.completed, r.last_saved, msg) from None
        cut_short = True
    else:
        cut_short = False
    finally:
        progress.close()
    jax.block_until_ready(r.params)
    r.t_end = time.perf_counter()
    return cut_short


def _flow_record(r: _Run, flow: dict) -> dict[str, Any]:
    """The gradient flow of one step as plain numbers: per parameter leaf (named
    like `[0]['weight']`), the gradient norm and the update/weight ratio."""
    flow = jax.device_get(flow)
    layers = {}
    for (path, g), u in zip(
        jax.tree_util.tree_flatten_with_path(flow["grad_norm"])[0],
        jax.tree_util.tree_leaves(flow["update_ratio"]),
        strict=True,
    ):
        layers[jax.tree_util.keystr(path)] = {"grad_norm": float(g), "update_ratio": float(u)}
    return {"epoch": r.completed / r.order.steps_per_epoch, "step": r.completed, "layers": layers}


def _nonfinite_gradient(r: _Run, message: str) -> TrainingDiverged:
    report = message[message.index("the backward pass produced") :]
    report = report.split("\n\n")[0].strip()
    kept = f"the last good checkpoint is {r.last_saved}" if r.last_saved else "nothing saved"
    return TrainingDiverged(
        f"--check-finite: a gradient became NaN or infinite at step {r.completed + 1}; "
        f"training stopped ({kept}).\n{report}"
    )


def _summary(r: _Run, history: np.ndarray, t_run: float, interrupted: bool) -> dict[str, Any]:
    timed_steps = r.completed - r.start - 1
    t_end = r.t_end if r.t_end is not None else time.perf_counter()
    t_start = r.t_start if r.t_start is not None else t_end
    speed = (
        timed_steps / (t_end - r.t_compiled) if r.t_compiled and timed_steps > 0 else float("nan")
    )
    tail = history[-max(1, min(len(history), r.order.steps_per_epoch)) :]
    return {
        "data": r.resolved["data"],
        "task": r.ds.task,
        "engine": r.cfg.engine,
        "optimizer": r.resolved["optimizer"],
        "lr": r.resolved["lr"],
        "batch_size": r.resolved["batch_size"],
        "model": r.resolved["model"],
        "hidden": list(r.resolved["hidden"]),
        "seed": r.resolved["seed"],
        "devices": r.cfg.devices,
        "steps": r.completed,
        "start_step": r.start,
        "epochs": r.completed / r.order.steps_per_epoch,
        "interrupted": interrupted,
        "final_loss": float(np.mean(tail)) if len(tail) else float("nan"),
        **_evaluate(r.params, r.ds, r.ds.task, r.resolved["model"]),
        "steps_per_second": speed,
        "examples_per_second": speed * r.resolved["batch_size"],
        "compile_seconds": (r.t_compiled - t_start) if r.t_compiled else 0.0,
        "train_seconds": t_end - t_start,  # the loop, first step's compilation included
        "wall_seconds": time.perf_counter() - t_run,  # data, init, loop, evaluation
        "checkpoint": str(r.last_saved) if r.last_saved else None,
    }


def _finish(r: _Run, t_run: float, stdout: TextIO, interrupted: bool) -> dict:
    """The checkpoint of the last step, evaluation, loss curve, summary.json, the report."""
    _save_last_step(r)
    history = r.all_losses()
    summary = _summary(r, history, t_run, interrupted)
    title = f"{r.resolved['data']}: {r.cfg.engine}, {r.resolved['optimizer']} lr={r.resolved['lr']}"
    curve = _plot_loss(r, history, title) if len(history) else None
    summary["loss_curve"] = str(curve) if curve else None
    summary["gradient_flow"] = r.flow
    flow_plot = _plot_flow(r, title) if r.flow else None
    summary["gradient_flow_plot"] = str(flow_plot) if flow_plot else None
    _write_json(r, "summary.json", summary)
    print(format_summary(summary), file=stdout)
    if curve is None and len(history):
        print("(loss curve skipped: matplotlib is not installed)", file=stdout)
    return summary


def _save_last_step(r: _Run) -> None:
    if r.last_saved != ckpt_lib.checkpoint_path(r.out, r.completed):
        r.save(r.completed)


def run(cfg: TrainConfig, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> dict:
    """Trains, checkpoints, evaluates, plots; returns the summary (also in `summary.json`).

    Raises:
      ConfigError, DataError, CheckpointError, OutputError: bad options, data,
        checkpoints, or an output folder that cannot be written (or is in use).
      TrainingDiverged: the loss became NaN or infinite.
      TrainingInterrupted: Ctrl-C; what the run had done was saved.
    """
    t_run = time.perf_counter()
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    check_options(cfg)
    out = _make_output_folder(cfg)
    with sigint_requests() as sigint, _claim_output(cfg, out, stderr):
        r = _set_up_or_stop(cfg, out, sigint, stderr)
        cut_short = _train(r, sigint, stderr)
        return _finish_or_stop(r, sigint, cut_short, t_run, stdout)


def _set_up_or_stop(cfg: TrainConfig, out: Path, sigint: dict, stderr: TextIO) -> _Run:
    try:
        r = _set_up(cfg, out, stderr)
    except KeyboardInterrupt:
        sigint["stop"] = True
    if sigint["stop"]:
        raise TrainingInterrupted(
            0, None, f"Interrupted before training started; nothing was changed in {out}."
        )
    return r


def _finish_or_stop(r: _Run, sigint: dict, cut_short: bool, t_run: float, stdout: TextIO) -> dict:
    """`_finish`, then `TrainingInterrupted` if Ctrl-C was pressed at any point of the run.

    After one Ctrl-C every result is written; after a second one only the
    checkpoint, and a third stops that too.
    """
    resume = f"Continue with the same command plus --resume (--out {r.out})."
    if sigint["stop"] and r.completed == r.start < r.total:  # no step ran: nothing new to save
        kept = f"the checkpoint {r.last_saved} is unchanged" if r.last_saved else "nothing saved"
        raise TrainingInterrupted(
            r.completed, r.last_saved, f"Interrupted before the first step; {kept}."
        )
    try:
        if cut_short:
            _save_last_step(r)
            raise TrainingInterrupted(
                r.completed,
                r.last_saved,
                f"Interrupted after step {r.completed}/{r.total}; saved {r.last_saved}. {resume}",
            )
        summary = _finish(r, t_run, stdout, interrupted=sigint["stop"])
    except KeyboardInterrupt:  # another Ctrl-C: stop writing
        kept = f"the last checkpoint is {r.last_saved}" if r.last_saved else "nothing was saved"
        raise TrainingInterrupted(
            r.completed,
            r.last_saved,
            f"Interrupted while saving the results of step {r.completed}/{r.total}; {kept}. "
            + resume,
        ) from None
    if not sigint["stop"]:
        return summary
    saved = f"saved {r.last_saved}, summary.json"
    saved += " and the loss curve" if summary["loss_curve"] else ""
    if r.completed < r.total:
        msg = f"Interrupted after step {r.completed}/{r.total}; {saved}. {resume}"
    else:
        msg = f"Interrupted after the last step ({r.completed}/{r.total}); the run is complete"
        msg += f": {saved}."
    raise TrainingInterrupted(r.completed, r.last_saved, msg, summary)


# --- results --------------------------------------------------------------------------------


def _evaluate(params, ds: Dataset, task: str, model: str = "mlp") -> dict[str, float]:
    loss, apply = _loss_fn(task, model), _apply_fn(model)

    @jax.jit
    def metrics(params, x, y):
        out = {"loss": loss(params, (x, y))}
        if task == "classification":
            out["accuracy"] = nn.accuracy(apply(params, x), y)
        return out

    result = {}
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if len(x):
            for name, value in metrics(params, x, y).items():
                result[f"{split}_{name}"] = float(value)
    return result


def _plot_loss(r: _Run, history: np.ndarray, title: str) -> Path | None:
    """Writes `loss_curve.png` (batch loss and its running mean); `None` without matplotlib."""
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
    return r.write("loss_curve.png", lambda f: fig.savefig(f, format="png"))


def _plot_flow(r: _Run, title: str) -> Path | None:
    """Writes `grad_flow.png`: per layer, the gradient norm and the update/weight
    ratio at the end of each epoch (log scales); `None` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    epochs = [f["epoch"] for f in r.flow]
    for name in r.flow[0]["layers"]:
        for ax, key in zip(axes, ("grad_norm", "update_ratio"), strict=True):
            values = [max(f["layers"][name][key], 1e-30) for f in r.flow]
            ax.plot(epochs, values, marker="o", ms=3, lw=1, label=name)
    for ax, label in zip(axes, ("‖gradient‖", "‖update‖ / ‖weight‖"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"gradient flow per layer: {title}", fontsize=9)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.14, top=0.88, wspace=0.32)
    return r.write("grad_flow.png", lambda f: fig.savefig(f, format="png"))


def _write_json(r: _Run, name: str, data: dict) -> Path:
    finite = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()
    }
    text = json.dumps(finite, indent=2) + "\n"  # strict JSON: NaN becomes null
    return r.write(name, lambda f: f.write(text.encode("utf-8")))


def _model_label(s: dict) -> str:
    if s.get("model") == "cnn":
        return f"CNN channels {s['hidden']}"
    return f"MLP hidden {s['hidden']}"


def format_summary(s: dict) -> str:
    """The final report printed by `chainrule train`."""
    name = Path(s["data"]).name if s["data"] not in DEFAULTS else s["data"]
    lines = [
        f"chainrule train: {name} ({s['task']}), engine={s['engine']}, "
        f"{s['optimizer']}(lr={s['lr']:g}), batch {s['batch_size']}, "
        f"{_model_label(s)}, {s['devices']} device(s)",
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
    if s.get("gradient_flow_plot"):
        lines.append(f"  grad flow    {s['gradient_flow_plot']}")
    return "\n".join(lines)
