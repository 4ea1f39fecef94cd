"""The output folder of a training run: one run at a time, atomic writes, no links followed.

* `locked(folder)`: an exclusive `fcntl.flock` on `folder/.chainrule-train.lock`,
  held for the whole run, so a second run on the same folder fails at once
  instead of deleting the first run's checkpoints.
* `atomic_write(path, write)`: the file is written under a fresh, unique
  temporary name in the same folder (`tempfile.mkstemp`: created with
  `O_EXCL`, so a link planted there is never followed), flushed, fsync-ed and
  renamed over `path` with `os.replace` (which replaces a link at `path`
  instead of writing through it). A crash leaves the old file or the new one.
* `remove_stale_temporaries(folder)`: the temporary files a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from chainrule.train.errors import ConfigError, OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

__all__ = ["LOCK_NAME", "atomic_write", "fsync_dir", "locked", "remove_stale_temporaries"]

LOCK_NAME = ".chainrule-train.lock"
# `atomic_write`'s temporary files: `.<final name>.<random>.tmp`.
_TEMPORARY = re.compile(r"^\.(ckpt-\d+\.npz|summary\.json|loss_curve\.png)\.[^/]+\.tmp$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what `open(path, "w")` would give


def fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable (where directories can be opened)."""
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


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Writes `path` through a unique temporary file in its folder, then renames it into place.

    Args:
      path: the final file. A symlink there is replaced, never written through.
      write: called with the open binary temporary file.

    Returns:
      `path`.

    Raises:
      OSError: the folder cannot be written (permissions, full disk...); no
        temporary file is left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Deletes the `atomic_write` temporary files of `folder` (left by a killed run).

    Call it only while holding the folder's lock: another run's temporary
    files are in use. Links are removed, never followed.
    """
    removed = []
    for entry in Path(folder).iterdir():
        if _TEMPORARY.match(entry.name) and not entry.is_dir():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def _owner(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode("ascii").strip())
        return f" (process {pid})"
    return ""


@contextlib.contextmanager
def locked(folder: Path, label: str) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (a lock file in it) for the `with` block.

    Args:
      folder: an existing folder.
      label: how the user named it (e.g. `--out 'runs/a'`), for messages.

    Raises:
      ConfigError: another process holds the lock.
      OutputError: the lock file cannot be created (the folder is not
        writable, or a link was planted in its place).
    """
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(
                f"{path} is a symbolic link; chainrule train never follows links in its output "
                f"folder. Delete it, or pick another {label}."
            ) from None
        raise OutputError(
            f"Cannot write in {label} ({e.strerror}). Pass a folder you can write to "
            "(it is created if missing)."
        ) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{label} is in use by another chainrule train run{_owner(fd)}. Wait for it "
                    "to finish, or pick another --out folder."
                ) from None
        with contextlib.suppress(OSError):  # the pid is only for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
