"""Atomic, pickle-free checkpoints: `ckpt-<step>.npz` files, the newest two kept.

A checkpoint is one `.npz` file holding every leaf of the parameters and of
the optimizer state as a plain array (`params/0`, `opt_state/0`, ...), plus a
JSON document (`__meta__`) with the step, the key paths of both pytrees
(`jax.tree_util.keystr`), and caller data such as the data-order seed and the
loss history. It is read with `allow_pickle=False`: a checkpoint cannot run
code. Restoring fills a *template* pytree (a freshly initialised model and
optimizer state) after checking that key paths, shapes and dtypes match.

Writes are atomic: the file is written to a temporary name in the same folder,
flushed and fsync-ed, then renamed over the final name with `os.replace`, so
a crash leaves either the old checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from chainrule.train.errors import CheckpointError


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose pytrees do not match the model being restored."""


__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointMismatchError",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "chainrule-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """`<directory>/ckpt-<step>.npz` (step zero-padded to 8 digits so names sort)."""
    return Path(directory) / f"ckpt-{int(step):08d}.npz"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The `ckpt-<step>.npz` files of `directory`, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _flatten(tree: Any) -> tuple[list[str], list[np.ndarray]]:
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_paths]
    leaves = [np.asarray(jax.device_get(leaf)) for _, leaf in leaves_with_paths]
    return paths, leaves


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    params: Any,
    opt_state: Any,
    extra: dict | None = None,
    *,
    keep: int = 2,
) -> Path:
    """Atomically writes `ckpt-<step>.npz` and deletes all but the newest `keep` checkpoints.

    Args:
      directory: the output folder (created if missing).
      step: the number of completed training steps.
      params, opt_state: pytrees of arrays (device arrays are fetched).
      extra: JSON-serialisable data stored with the checkpoint (config,
        data-order seed...). Entries whose values are numpy arrays are stored
        as arrays instead (e.g. a loss history).
      keep: how many checkpoints to keep (at least 1).

    Returns:
      The path written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    param_paths, param_leaves = _flatten(params)
    opt_paths, opt_leaves = _flatten(opt_state)
    extra = dict(extra or {})
    extra_arrays = {k: np.asarray(v) for k, v in extra.items() if isinstance(v, np.ndarray)}
    meta = {
        "format": FORMAT,
        "step": int(step),
        "params": param_paths,
        "opt_state": opt_paths,
        "extra": {k: v for k, v in extra.items() if k not in extra_arrays},
        "extra_arrays": sorted(extra_arrays),
    }
    arrays = {"__meta__": np.array(json.dumps(meta))}
    arrays.update({f"params/{i}": leaf for i, leaf in enumerate(param_leaves)})
    arrays.update({f"opt_state/{i}": leaf for i, leaf in enumerate(opt_leaves)})
    arrays.update({f"extra/{k}": v for k, v in extra_arrays.items()})
    for key, value in arrays.items():
        if value.dtype.kind == "O":
            raise CheckpointError(f"save_checkpoint: {key} is an object array; only plain arrays.")

    final = checkpoint_path(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[max(int(keep), 1) :]:
        old.unlink(missing_ok=True)
    return final


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and checked for damage, not yet matched to a model.

    Attributes:
      path: the file.
      step: the number of completed training steps.
      extra: the caller data given to `save_checkpoint` (arrays included).
    """

    path: Path
    step: int
    extra: dict
    _meta: dict = dataclasses.field(repr=False)
    _arrays: dict = dataclasses.field(repr=False)

    def restore(self, params_template: Any, opt_state_template: Any) -> tuple[Any, Any]:
        """Fills the structure of the templates with the saved leaves (numpy arrays).

        Raises:
          CheckpointMismatchError: key paths, shapes or dtypes differ.
        """
        return (
            self._restore_tree(params_template, "params"),
            self._restore_tree(opt_state_template, "opt_state"),
        )

    def _restore_tree(self, template: Any, prefix: str) -> Any:
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        want = [jax.tree_util.keystr(p) for p, _ in leaves_with_paths]
        stored = self._meta[prefix]
        if want != stored:
            raise CheckpointMismatchError(
                f"{self.path}: its {prefix} have a different structure from this run's: "
                f"{len(stored)} leaves {stored[:3]}... in the checkpoint, {len(want)} leaves "
                f"{want[:3]}... here. Resume with the same data, --hidden and --optimizer as the "
                "run that wrote it, or use another --out folder."
            )
        leaves = []
        for i, (key, (_, ref)) in enumerate(zip(want, leaves_with_paths, strict=True)):
            value = self._arrays[f"{prefix}/{i}"]
            ref_dtype = np.asarray(jax.device_get(ref)).dtype
            if value.shape != np.shape(ref) or value.dtype != ref_dtype:
                raise CheckpointMismatchError(
                    f"{self.path}: {prefix}{key} is {value.dtype}{list(value.shape)} in the "
                    f"checkpoint but {ref_dtype}{list(np.shape(ref))} in this run. Resume with "
                    "the same data and --hidden as the run that wrote it."
                )
            leaves.append(value)
        return jax.tree_util.tree_unflatten(treedef, leaves)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint file and checks it is whole (every member's CRC, the metadata).

    Raises:
      CheckpointError: the file is missing, truncated, corrupted or not a
        chainrule checkpoint. The message names the file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}  # reading every member checks its CRC
        meta = json.loads(str(arrays["__meta__"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        n_leaves = len(meta["params"]) + len(meta["opt_state"]) + len(meta["extra_arrays"])
        if len(arrays) != 1 + n_leaves:
            raise ValueError(f"{len(arrays) - 1} arrays stored, the metadata lists {n_leaves}")
        extra = dict(meta["extra"])
        extra.update({k: arrays[f"extra/{k}"] for k in meta["extra_arrays"]})
        step = int(meta["step"])
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint not found: {path}.") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupted and cannot be read ({type(e).__name__}: {e})."
        ) from None
    return Checkpoint(path, step, extra, meta, arrays)


def load_checkpoint(path: str | os.PathLike, params_template: Any, opt_state_template: Any):
    """Reads a checkpoint into the structure of the templates.

    Args:
      path: a `ckpt-<step>.npz` file written by `save_checkpoint`.
      params_template, opt_state_template: pytrees with the structure, shapes
        and dtypes of the saved ones (e.g. a fresh `mlp_init` and `optimizer.init`).

    Returns:
      `(step, params, opt_state, extra)` with numpy leaves.

    Raises:
      CheckpointError: unreadable file, or a mismatch with the templates.

    Examples:
      >>> import tempfile, numpy as np
      >>> folder = tempfile.mkdtemp()
      >>> params = {"w": np.ones(3, np.float32)}
      >>> path = save_checkpoint(folder, 7, params, (), {"seed": 0})
      >>> path.name
      'ckpt-00000007.npz'
      >>> step, restored, _, extra = load_checkpoint(path, params, ())
      >>> step, restored["w"].tolist(), extra
      (7, [1.0, 1.0, 1.0], {'seed': 0})
    """
    ckpt = read_checkpoint(path)
    params, opt_state = ckpt.restore(params_template, opt_state_template)
    return ckpt.step, params, opt_state, ckpt.extra


def latest_checkpoint(
    directory: str | os.PathLike,
) -> tuple[Checkpoint, list[tuple[Path, str]]]:
    """The newest readable checkpoint of `directory`, falling back to older ones.

    Returns:
      `(checkpoint, problems)`: `problems` has one `(path, message)` per newer
      checkpoint that could not be read (show them to the user).

    Raises:
      CheckpointError: there is no checkpoint, or none can be read.
    """
    candidates = list_checkpoints(directory)
    if not candidates:
        raise CheckpointError(
            f"--resume: no checkpoint (ckpt-<step>.npz) in {directory}. Check --out, or run "
            "without --resume to start training from scratch."
        )
    problems = []
    for path in candidates:
        try:
            return read_checkpoint(path), problems
        except CheckpointError as e:
            problems.append((path, str(e)))
    raise CheckpointError(
        f"No readable checkpoint in {directory}: "
        + " ".join(message for _, message in problems)
        + " Start afresh without "
        "--resume, or with another --out folder."
    )
