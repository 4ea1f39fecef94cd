"""Errors of the training tools. Each message says what is wrong and how to fix it.

The command line prints these as one paragraph on stderr (no traceback) and
exits non-zero; library users can catch them as `ValueError`/`OSError` too.
"""

from __future__ import annotations

from chainrule.errors import ChainruleError


class TrainError(ChainruleError):
    """Base class of the errors raised by `chainrule.train`."""


class ConfigError(TrainError, ValueError):
    """An option is out of range or inconsistent (learning rate, batch size, devices...)."""


class DataError(TrainError, ValueError):
    """A data set is missing, unreadable, or has the wrong shape, columns or values."""


class CheckpointError(TrainError, OSError):
    """A checkpoint is missing, truncated, corrupted, or does not match the model."""


class OutputError(TrainError, OSError):
    """The output folder cannot be written (permissions, a full disk, a planted link)."""


class TrainingDiverged(TrainError, ArithmeticError):
    """The training loss became NaN or infinite."""
