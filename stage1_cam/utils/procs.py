"""Child processes that die with their parent: CRF workers of the dump and the pipeline's stage commands.

A process killed with ``kill -9`` runs no cleanup, so its children must notice by themselves. On Linux the
kernel sends them a signal (``prctl(PR_SET_PDEATHSIG)``) when the parent dies; worker processes also watch
their parent's pid from a thread, as a fallback on other systems. This module imports nothing heavy: it runs
first in every spawned CRF worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

_PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=1)
def _prctl() -> Optional[Callable[..., int]]:
    """libc's ``prctl`` (Linux), loaded once: a forked child about to ``exec`` must not ``dlopen``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc / no prctl
        return None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    Returns:
        Whether the request was accepted (False on other systems or when ``prctl`` is unavailable).
    """
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:  # reparented: the parent is gone
            os._exit(1)


def die_with_parent(parent_pid: int, *, poll_s: float = 1.0, watchdog: bool = True) -> None:
    """Make this process exit when the process ``parent_pid`` dies.

    Sets the parent-death signal (Linux), exits at once if the parent already died (it may have died before
    the signal was set), and, with ``watchdog``, starts a daemon thread that exits when the parent pid changes.

    Args:
        parent_pid: pid of the parent this process must not outlive.
        poll_s: watchdog polling interval in seconds.
        watchdog: start the polling thread (not possible in a ``preexec_fn``: threads do not survive ``exec``).
    """
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)
    if watchdog:
        threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="parent-watchdog",
                         daemon=True).start()


def worker_initializer(parent_pid: int, *modules: str) -> None:
    """``ProcessPoolExecutor`` initializer: die with ``parent_pid``, then import ``modules`` (warm start)."""
    die_with_parent(parent_pid)
    for name in modules:
        importlib.import_module(name)


def child_preexec(parent_pid: Optional[int] = None) -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that makes the child die with this process (Linux).

    Args:
        parent_pid: the parent's pid (default: the calling process).
    """
    pid = os.getpid() if parent_pid is None else parent_pid
    _prctl()  # resolved here, before the fork

    def preexec() -> None:
        die_with_parent(pid, watchdog=False)

    return preexec
