"""Atomic, pickle-free checkpoints: `ckpt-<step>.npz` files, the newest two kept.

A checkpoint is one `.npz` file holding every leaf of the parameters and of
the optimizer state as a plain array (`params/0`, `opt_state/0`, ...), plus a
JSON document (`__meta__`) with the step, the key paths of both pytrees
(`jax.tree_util.keystr`), and caller data such as the data-order seed and the
loss history. It is read with `allow_pickle=False`: a checkpoint cannot run
code. Restoring fills a *template* pytree (a freshly initialised model and
optimizer state) after checking that key paths, shapes and dtypes match.

Writes are atomic (`outdir.atomic_write`): the file is written to a unique
temporary name in the same folder, flushed and fsync-ed, then renamed over the
final name with `os.replace`, so a crash leaves either the old checkpoint or
the new one, never half a file.

Reads are bounded: before any array is read, every member's declared size must
agree with its `.npy` header, the declared sizes together may not exceed a few
times the file's size (a zip bomb is refused, not unpacked), and when the
caller says what to expect (`Expected`), every shape and dtype must match it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from chainrule.train.errors import CheckpointError
from chainrule.train.outdir import atomic_write


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose pytrees do not match the model being restored."""


__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointHeader",
    "CheckpointMismatchError",
    "Expected",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "no_readable_checkpoint",
    "read_checkpoint",
    "read_header",
    "save_checkpoint",
]

FORMAT = "chainrule-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
_MAX_META_BYTES = 16 << 20  # the JSON metadata: key paths and config, a few kB in practice
_MAX_NPY_HEADER = 10_000  # numpy's own limit for an .npy header
# Declared (uncompressed) bytes allowed per byte of file. `np.savez` stores members
# uncompressed (1:1); a zip bomb declares thousands.
_MAX_EXPANSION = 4


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

    final = atomic_write(checkpoint_path(directory, step), lambda f: np.savez(f, **arrays))
    for old in list_checkpoints(directory)[max(int(keep), 1) :]:
        old.unlink(missing_ok=True)
    return final


def _dtype(leaf: Any) -> np.dtype:
    """The dtype of an array, a `jax.ShapeDtypeStruct`, or a Python scalar."""
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _structure_mismatch(path: Path, prefix: str, stored: list, want: list) -> Exception:
    return CheckpointMismatchError(
        f"{path}: its {prefix} have a different structure from this run's: "
        f"{len(stored)} leaves {stored[:3]}... in the checkpoint, {len(want)} leaves "
        f"{want[:3]}... here. Resume with the same data, --hidden and --optimizer as the "
        "run that wrote it, or use another --out folder."
    )


def _leaf_mismatch(path: Path, name: str, stored: tuple, want: tuple) -> Exception:
    (shape, dtype), (want_shape, want_dtype) = stored, want
    return CheckpointMismatchError(
        f"{path}: {name} is {dtype}{list(shape)} in the checkpoint but "
        f"{want_dtype}{list(want_shape)} in this run. Resume with the same data and --hidden "
        "as the run that wrote it."
    )


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a checkpoint must hold, checked before any of its arrays is read.

    Attributes:
      params, opt_state: pytrees with the structure, shapes and dtypes of the
        saved ones: arrays, or `jax.ShapeDtypeStruct`s (`jax.eval_shape` of the
        initialisers gives them without allocating anything).
      extra: the shape and dtype (e.g. a `jax.ShapeDtypeStruct`) of each
        extra array the checkpoint may hold; any other extra array is refused.
    """

    params: Any
    opt_state: Any
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointHeader:
    """A checkpoint's metadata and the shape and dtype of every array, none of them read.

    Attributes:
      path: the file.
      step: the number of completed training steps.
      extra: the JSON caller data given to `save_checkpoint` (not its arrays).
      specs: `(shape, dtype)` of each stored array (`params/0`, `extra/loss_history`...).
    """

    path: Path
    step: int
    extra: dict
    specs: dict
    _meta: dict = dataclasses.field(repr=False)

    def check(self, expected: Expected) -> None:
        """Raises `CheckpointMismatchError` unless the arrays are exactly what `expected` says."""
        for prefix, template in (("params", expected.params), ("opt_state", expected.opt_state)):
            leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(template)
            want = [jax.tree_util.keystr(p) for p, _ in leaves_with_paths]
            if want != self._meta[prefix]:
                raise _structure_mismatch(self.path, prefix, self._meta[prefix], want)
            for i, (key, (_, ref)) in enumerate(zip(want, leaves_with_paths, strict=True)):
                stored, wanted = self.specs[f"{prefix}/{i}"], (np.shape(ref), _dtype(ref))
                if stored != wanted:
                    raise _leaf_mismatch(self.path, prefix + key, stored, wanted)
        for name in self._meta["extra_arrays"]:
            if name not in expected.extra:
                raise CheckpointMismatchError(
                    f"{self.path}: holds an array {name!r} that this run does not use; it was "
                    "not written by this version of chainrule train. Use another --out folder."
                )
            spec = expected.extra[name]
            stored, wanted = self.specs[f"extra/{name}"], (tuple(spec.shape), np.dtype(spec.dtype))
            if stored != wanted:
                raise _leaf_mismatch(self.path, name, stored, wanted)


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

        The templates may be arrays or `jax.ShapeDtypeStruct`s.

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
        if want != self._meta[prefix]:
            raise _structure_mismatch(self.path, prefix, self._meta[prefix], want)
        leaves = []
        for i, (key, (_, ref)) in enumerate(zip(want, leaves_with_paths, strict=True)):
            value = self._arrays[f"{prefix}/{i}"]
            wanted = (np.shape(ref), _dtype(ref))
            if (value.shape, value.dtype) != wanted:
                raise _leaf_mismatch(self.path, prefix + key, (value.shape, value.dtype), wanted)
            leaves.append(value)
        return jax.tree_util.tree_unflatten(treedef, leaves)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turns every way a file can fail to read into one `CheckpointError` naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint not found: {path}.") from None
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        EOFError,
        RecursionError,
        zipfile.BadZipFile,
    ) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupted and cannot be read ({type(e).__name__}: {e})."
        ) from None


def _npy_spec(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a member's `.npy` header; its declared size must match them."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_NPY_HEADER)
        else:
            raise ValueError(f"{info.filename}: unsupported .npy format version {version}")
        offset = f.tell()
    shape, _, dtype = header
    if dtype.hasobject:
        raise ValueError(f"{info.filename} holds Python objects (pickle), which are refused")
    size = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != size:
        raise ValueError(
            f"{info.filename} declares {info.file_size:,} bytes but its header describes {size:,}"
        )
    return tuple(shape), dtype


def _header(path: Path, zf: zipfile.ZipFile) -> CheckpointHeader:
    infos = zf.infolist()
    declared, on_disk = sum(i.file_size for i in infos), path.stat().st_size
    if declared > _MAX_EXPANSION * on_disk + (1 << 20):
        raise ValueError(
            f"its members unpack to {declared:,} bytes from a {on_disk:,}-byte file; chainrule "
            "writes checkpoints uncompressed, so this is not one of its checkpoints"
        )
    members = {i.filename: i for i in infos}
    if len(members) != len(infos) or not all(name.endswith(".npy") for name in members):
        raise ValueError(f"unexpected members {sorted(members)[:5]}")
    specs = {name[: -len(".npy")]: _npy_spec(zf, info) for name, info in members.items()}
    meta_spec = specs.pop("__meta__")
    if meta_spec[0] != () or meta_spec[1].kind != "U":
        raise ValueError(f"__meta__ is {meta_spec[1]}{list(meta_spec[0])}, not a JSON string")
    if members["__meta__.npy"].file_size > _MAX_META_BYTES:
        raise ValueError(f"its metadata is over {_MAX_META_BYTES:,} bytes")
    with zf.open(members["__meta__.npy"]) as f:
        meta = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"format is {found!r}, expected {FORMAT!r}")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"the step {step!r} is not a count of steps")
    lists = [meta[k] for k in ("params", "opt_state", "extra_arrays")]
    if not all(isinstance(x, list) and all(isinstance(y, str) for y in x) for x in lists):
        raise ValueError("the metadata's key lists are not lists of strings")
    if not isinstance(meta["extra"], dict):
        raise ValueError("the metadata's `extra` is not a JSON object")
    listed = {f"params/{i}" for i in range(len(meta["params"]))}
    listed |= {f"opt_state/{i}" for i in range(len(meta["opt_state"]))}
    listed |= {f"extra/{k}" for k in meta["extra_arrays"]}
    if set(specs) != listed:
        raise ValueError(f"{len(specs)} arrays stored, the metadata lists {len(listed)}")
    return CheckpointHeader(path, step, dict(meta["extra"]), specs, meta)


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """Reads a checkpoint's metadata and array shapes, without reading any array.

    Raises:
      CheckpointError: the file is missing, truncated, corrupted, too large
        for its size (a zip bomb), or not a chainrule checkpoint.
    """
    path = Path(path)
    with _reading(path), zipfile.ZipFile(path) as zf:
        return _header(path, zf)


def read_checkpoint(path: str | os.PathLike, expected: Expected | None = None) -> Checkpoint:
    """Reads a checkpoint file and checks it is whole (every member's CRC, the metadata).

    Args:
      path: a `ckpt-<step>.npz` file.
      expected: if given, the arrays it must hold, checked before any is read.

    Raises:
      CheckpointMismatchError: the arrays are not the `expected` ones.
      CheckpointError: the file is missing, truncated, corrupted, too large
        for its size (a zip bomb) or not a chainrule checkpoint. The message
        names the file.
    """
    path = Path(path)
    with _reading(path), zipfile.ZipFile(path) as zf:
        header = _header(path, zf)
        if expected is not None:
            header.check(expected)
        arrays = {}
        for name in header.specs:  # sizes checked: each read is bounded by its header
            with zf.open(f"{name}.npy") as f:  # the CRC is checked when the last byte is read
                arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    extra = dict(header.extra)
    extra.update({k: arrays[f"extra/{k}"] for k in header._meta["extra_arrays"]})
    return Checkpoint(path, header.step, extra, header._meta, arrays)


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
    raise no_readable_checkpoint(directory, problems)


def no_readable_checkpoint(
    directory: str | os.PathLike, problems: list[tuple[Path, str]]
) -> CheckpointError:
    """The error for a folder whose checkpoints all failed to read (`problems`: why, each)."""
    return CheckpointError(
        f"No readable checkpoint in {directory}: "
        + " ".join(message for _, message in problems)
        + " Start afresh without --resume, or with another --out folder."
    )
