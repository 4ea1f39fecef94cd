"""Ctrl-C handling and progress output of `chainrule train`.

* `sigint_requests`: while active, a first Ctrl-C only asks the run to stop
  (it stops at a step boundary and saves); a second one interrupts at once.
* `Progress`: a tqdm bar on a terminal, a log line every 10% otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import TextIO

import jax

from chainrule.train.config import TrainConfig

__all__ = ["Progress", "progress_mode", "sigint_requests"]


@contextlib.contextmanager
def sigint_requests():
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


def progress_mode(cfg: TrainConfig, stream: TextIO) -> str:
    if cfg.quiet:
        return "off"
    if cfg.progress is not None:
        return "bar" if cfg.progress else "log"
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return "bar" if getattr(stream, "isatty", lambda: False)() and not in_ci else "log"
