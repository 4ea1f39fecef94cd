"""Data sets for `chainrule train` and a resumable batch order.

Three sources, each returned as a `Dataset` (float32 features, a train/test
split):

* `teacher`: the tutorial's regression problem: 10 features, one output made
  by a fixed 10 -> 5 -> 1 ReLU network (the "teacher"); the student has the
  same architecture.
* `digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes),
  pixels scaled to [0, 1]. Needs scikit-learn (`pip install scikit-learn`).
* your own file:

  - `.csv`: a header row, then one example per row, all values numeric.
    A column named `label` (integer classes 0..K-1) makes it classification
    (softmax cross-entropy); otherwise the columns named `target` or
    `target_*` are regression targets (mean squared error). Every other
    column is a feature.
  - `.npz` (`np.savez`): `x` of shape `(examples, features)` and either
    `label` of shape `(examples,)` with integer classes, or `target` of shape
    `(examples,)` or `(examples, outputs)`.

  Features are used as given (scale them yourself). NaN or infinite values,
  and values too large for float32 (beyond about 3.4e38), are rejected;
  labels are class indices below `MAX_CLASSES`.

The batch order is a pure function of `(seed, step)` (`BatchOrder`): each
epoch is a fresh permutation drawn from `numpy.random.default_rng([seed,
epoch])`, so a checkpoint only needs the seed and the step to resume the
exact same sequence of batches.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import os
import zipfile

import numpy as np

from chainrule.train.errors import DataError

__all__ = [
    "BUILTIN",
    "MAX_CLASSES",
    "BatchOrder",
    "Dataset",
    "digits_dataset",
    "load_dataset",
    "teacher_dataset",
]

BUILTIN = ("teacher", "digits")
TEACHER_SEED = 1234
SPLIT_SEED = 0  # the train/test split does not depend on --seed: test sets stay comparable
MAX_CLASSES = 100_000  # the output layer has one unit per class


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays of one data set, split into train and test parts.

    Attributes:
      name: where it came from (`teacher`, `digits`, or the file path).
      task: `"classification"` (integer labels, cross-entropy) or
        `"regression"` (float targets of shape `(n, outputs)`, MSE).
      x_train, y_train, x_test, y_test: numpy arrays; `x` is float32
        `(n, features)`; `y` is int32 `(n,)` or float32 `(n, outputs)`.
      num_classes: number of classes for classification, else `None`.
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.num_classes if self.task == "classification" else self.y_train.shape[1]


class BatchOrder:
    """Which training examples make the batch of each step; a pure function of `(seed, step)`.

    Every epoch uses `numpy.random.default_rng([seed, epoch]).permutation(n)`
    and drops the last incomplete batch, so `indices(step)` is the same
    whether the run was interrupted or not.

    Examples:
      >>> order = BatchOrder(n=10, batch_size=4, seed=0)
      >>> order.steps_per_epoch
      2
      >>> bool((order.indices(5) == BatchOrder(10, 4, 0).indices(5)).all())
      True
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size < 1 or batch_size > n:
            raise DataError(
                f"The batch size must be between 1 and the number of training examples ({n}), "
                f"got {batch_size}. Pass a smaller --batch-size."
            )
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.steps_per_epoch = self.n // self.batch_size
        self._epoch, self._perm = -1, None

    def state(self) -> dict:
        """What a checkpoint stores to rebuild this order (JSON-serialisable)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "n": self.n}

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(int(step), self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = position * self.batch_size
        return self._perm[start : start + self.batch_size]


def _split(name, task, x, y, test_fraction, num_classes=None) -> Dataset:
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(
            f"The test fraction must be in [0, 1), got {test_fraction}. Use e.g. "
            "--test-fraction 0.2 (or 0 to train on everything)."
        )
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    if n - n_test < 1:
        raise DataError(f"{name}: {n} example(s) leave nothing to train on; add more rows.")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(name, task, x[train], y[train], x[test], y[test], num_classes)


def teacher_dataset(n_examples: int = 1280, test_fraction: float = 0.2) -> Dataset:
    """The tutorial's problem: learn a fixed 10 -> 5 -> 1 ReLU "teacher" network.

    Inputs are standard normal; targets are the teacher's outputs (no noise),
    so the loss can go to zero. The teacher is fixed (seed 1234), whatever the
    training seed.

    Examples:
      >>> ds = teacher_dataset()
      >>> ds.x_train.shape, ds.y_train.shape, ds.task
      ((1024, 10), (1024, 1), 'regression')
    """
    rng = np.random.default_rng(TEACHER_SEED)
    bound = 1.0 / np.sqrt([10.0, 5.0])
    # Three times PyTorch's init scale, so the targets are O(1).
    w1 = 3 * rng.uniform(-bound[0], bound[0], (5, 10))
    b1 = 3 * rng.uniform(-bound[0], bound[0], (5,))
    w2 = 3 * rng.uniform(-bound[1], bound[1], (1, 5))
    b2 = 3 * rng.uniform(-bound[1], bound[1], (1,))
    x = rng.standard_normal((n_examples, 10))
    y = np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2
    return _split(
        "teacher", "regression", x.astype(np.float32), y.astype(np.float32), test_fraction
    )


def digits_dataset(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's handwritten digits: 64 features in [0, 1], 10 classes.

    Raises:
      DataError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "--data digits needs scikit-learn, which is not installed. Install it with "
            "`pip install scikit-learn`, or use --data teacher or your own .csv/.npz file."
        ) from None
    bunch = load_digits()
    x = (np.asarray(bunch.data, np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, np.int32)
    return _split("digits", "classification", x, y, test_fraction, num_classes=10)


_FORMAT_HELP = (
    "Expected a .csv with a header row and a `label` column (integer classes) or `target` "
    "column(s), or a .npz with `x` (examples, features) and `label` (examples,) or `target` "
    "(examples,) / (examples, outputs). See `chainrule train --help`."
)


def _check_finite(path: str, what: str, values: np.ndarray) -> None:
    """Rejects NaN and infinities; call it on the float32 values, so overflows count too."""
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(
            f"{path}: {what} contains {int(bad.sum())} NaN or infinite value(s), the first in "
            f"example {row} (0-based, not counting the header); values beyond about 3.4e38 "
            "do not fit in float32 and count as infinite. Remove, rescale or impute those "
            "values before training."
        )


def _float32(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # too large -> inf, reported by the caller
        return np.asarray(values).astype(np.float32)


def _number(value) -> str:
    value = float(value)
    return f"{value:.0f}" if abs(value) < 1e15 else f"{value:g}"


def _labels(path: str, labels: np.ndarray) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(
            f"{path}: `label` must have shape (examples,), got {labels.shape}. For several "
            f"regression outputs use `target` instead. {_FORMAT_HELP}"
        )
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind != "f":
            raise DataError(f"{path}: `label` must be numeric, got dtype {labels.dtype}.")
        _check_finite(path, "`label`", labels)
        if not np.all(labels == np.round(labels)):
            raise DataError(
                f"{path}: `label` must hold integer class indices (0, 1, 2, ...), but it has "
                "fractional values. For a real-valued target name the column `target`."
            )
    if labels.size and labels.min() < 0:
        raise DataError(
            f"{path}: `label` has negative value {_number(labels.min())}; classes must be 0..K-1."
        )
    if labels.size and labels.max() >= MAX_CLASSES:  # checked before any cast can overflow
        top = labels.max()
        raise DataError(
            f"{path}: `label` has value {_number(top)}, which would make {_number(top + 1.0)} "
            f"classes (one output unit each); at most {MAX_CLASSES:,} are supported. Labels "
            "are class indices 0..K-1: renumber the classes 0, 1, 2, ..., or name the column "
            "`target` for a numeric value to predict."
        )
    labels = labels.astype(np.int32)
    return labels, int(labels.max()) + 1


def _from_arrays(path, x, labels, target, test_fraction) -> Dataset:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise DataError(
            f"{path}: the features must form a 2-D array (examples, features) with at least "
            f"one feature, got shape {x.shape}. {_FORMAT_HELP}"
        )
    if x.dtype.kind not in "iufb":
        raise DataError(f"{path}: the features must be numeric, got dtype {x.dtype}.")
    if x.shape[0] < 2:
        raise DataError(f"{path}: found {x.shape[0]} example(s); at least 2 are needed.")
    x = _float32(x)
    _check_finite(path, "the features", x)
    y = labels if labels is not None else target
    if np.shape(y)[:1] != x.shape[:1]:
        raise DataError(
            f"{path}: {x.shape[0]} examples of features but {np.shape(y)[0] if np.ndim(y) else 0} "
            f"{'labels' if labels is not None else 'targets'}; they must have the same length."
        )
    if labels is not None:
        y, num_classes = _labels(path, labels)
        return _split(path, "classification", x, y, test_fraction, num_classes=num_classes)
    target = np.asarray(target)
    if target.dtype.kind not in "iufb":
        raise DataError(f"{path}: `target` must be numeric, got dtype {target.dtype}.")
    if target.ndim == 1:
        target = target[:, None]
    if target.ndim != 2:
        raise DataError(
            f"{path}: `target` must have shape (examples,) or (examples, outputs), got "
            f"{target.shape}."
        )
    target = _float32(target)
    _check_finite(path, "`target`", target)
    return _split(path, "regression", x, target, test_fraction)


def _csv_rows(path: str) -> list[list[str]]:
    """The non-blank rows of a UTF-8 CSV (a UTF-8 byte-order mark is allowed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise DataError(
                f"{path}: the file is UTF-16 text; chainrule train reads UTF-8. Save it as "
                '"CSV UTF-8" (or convert it: iconv -f UTF-16 -t UTF-8 in.csv > out.csv).'
            )
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (it has the byte 0x{e.object[e.start]:02x}): this looks "
            "like a binary file or another text encoding. Pass a UTF-8 .csv (or a .npz for "
            "binary arrays)."
        ) from None
    except csv.Error as e:
        raise DataError(
            f"{path}: not a readable CSV ({e}); this looks like a binary file. Pass a UTF-8 "
            ".csv with a header row (or a .npz for binary arrays)."
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}). Check its permissions.") from None


def _load_csv(path: str, test_fraction: float) -> Dataset:
    rows = _csv_rows(path)
    if not rows:
        raise DataError(f"{path}: the file is empty. {_FORMAT_HELP}")
    header = [h.strip() for h in rows[0]]
    label_cols = [i for i, h in enumerate(header) if h == "label"]
    target_cols = [i for i, h in enumerate(header) if h == "target" or h.startswith("target_")]
    if not label_cols and not target_cols:
        raise DataError(
            f"{path}: no `label` or `target` column in the header {header}. Name the column to "
            "predict `label` (integer classes) or `target` (a number). " + _FORMAT_HELP
        )
    if label_cols and target_cols:
        raise DataError(
            f"{path}: the header has both `label` and `target` columns; keep one of them "
            "(`label` for classification, `target` for regression)."
        )
    y_cols = label_cols or target_cols
    feature_cols = [i for i in range(len(header)) if i not in y_cols]
    values = np.empty((len(rows) - 1, len(header)), np.float64)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {r + 2} has {len(row)} value(s) but the header has "
                f"{len(header)} column(s). Every row needs one value per column."
            )
        for c, cell in enumerate(row):
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}: line {r + 2}, column `{header[c]}`: {cell!r} is not a number. "
                    "All values must be numeric (encode categories as numbers)."
                ) from None
    x = values[:, feature_cols].reshape(len(rows) - 1, len(feature_cols))
    if label_cols:
        return _from_arrays(path, x, values[:, label_cols[0]], None, test_fraction)
    return _from_arrays(path, x, None, values[:, target_cols], test_fraction)


def _load_npz(path: str, test_fraction: float) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"{path}: cannot read it as a .npz file ({e}). Save it with "
            "np.savez(path, x=..., label=...) (object arrays are not accepted)."
        ) from None
    if "x" not in arrays or ("label" in arrays) == ("target" in arrays):
        raise DataError(
            f"{path}: found keys {sorted(arrays)}; need `x` and exactly one of `label`, `target`. "
            + _FORMAT_HELP
        )
    return _from_arrays(path, arrays["x"], arrays.get("label"), arrays.get("target"), test_fraction)


def load_dataset(spec: str, test_fraction: float = 0.2) -> Dataset:
    """`teacher`, `digits`, or a path to a `.csv`/`.npz` file (format in the module docstring).

    Raises:
      DataError: the file is missing, unreadable, or has wrong shapes, columns
        or values (NaN, non-numeric, fractional labels...).
    """
    if spec == "teacher":
        return teacher_dataset(test_fraction=test_fraction)
    if spec == "digits":
        return digits_dataset(test_fraction=test_fraction)
    ext = os.path.splitext(spec)[1].lower()
    if ext not in (".csv", ".npz"):
        raise DataError(
            f"--data {spec!r} is neither a built-in data set ({', '.join(BUILTIN)}) nor a .csv "
            "or .npz file. Pass --data teacher, --data digits, or a path ending in .csv or .npz."
        )
    if not os.path.isfile(spec):
        raise DataError(
            f"Data file not found: {spec!r} (looked in {os.path.abspath(spec)}). Check the path, "
            "or use a built-in data set: --data teacher or --data digits."
        )
    return _load_csv(spec, test_fraction) if ext == ".csv" else _load_npz(spec, test_fraction)
