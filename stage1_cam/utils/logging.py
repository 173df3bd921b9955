"""Logging setup for entry points. Library modules only call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_logging(log_file: Optional[Path] = None, rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the ``stage1_cam``/``stage2_seg``/``pipelines`` loggers once, from an entry point.

    Rank 0 logs INFO to stderr (and ``log_file`` in append mode); other ranks log warnings only.
    Calling it twice does not duplicate handlers.
    """
    fmt = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    for name in ("stage1_cam", "stage2_seg", "pipelines"):
        lg = logging.getLogger(name)
        lg.setLevel(level if rank == 0 else logging.WARNING)
        lg.propagate = False  # open_clip logs to the root logger, which triggers basicConfig: avoid duplicates
        for h in list(lg.handlers):
            if getattr(h, "_wsss", False):
                lg.removeHandler(h)
                h.close()
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._wsss = True  # type: ignore[attr-defined]
        lg.addHandler(sh)
        if log_file is not None and rank == 0:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = _LogFileHandler(log_file, mode="a")
            fh.setFormatter(fmt)
            fh._wsss = True  # type: ignore[attr-defined]
            lg.addHandler(fh)


class _LogFileHandler(logging.FileHandler):
    """A log file that, once it cannot be written (a full disk), says so once on stderr and stops: the console
    keeps the log, instead of a '--- Logging error ---' traceback for every later record."""

    dead = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.dead:
            super().emit(record)

    def flush(self) -> None:
        if not self.dead:
            try:
                super().flush()
            except OSError as e:
                self._give_up(e)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            self._give_up(err)
        else:
            super().handleError(record)

    def _give_up(self, err: OSError) -> None:
        if not self.dead:
            self.dead = True
            sys.stderr.write(f"log file {self.baseFilename} cannot be written ({err.strerror or err}); "
                             f"logging to the console only\n")


class EveryN:
    """Rate limiter for progress lines: ``if every(step): log(...)`` or by wall-clock seconds."""

    def __init__(self, n_steps: int = 0, seconds: float = 0.0) -> None:
        self.n_steps, self.seconds = n_steps, seconds
        self._last = time.monotonic()

    def __call__(self, step: int) -> bool:
        if self.n_steps and (step + 1) % self.n_steps == 0:
            return True
        if self.seconds and time.monotonic() - self._last >= self.seconds:
            self._last = time.monotonic()
            return True
        return False


def rank_from_env() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def utc_timestamp(seconds: Optional[float] = None) -> str:
    """ISO 8601 UTC time (``2026-12-07T10:11:12Z``) of ``seconds`` since the epoch (default: now)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
