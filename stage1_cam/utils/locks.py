"""Lock files: one holder at a time, recorded as JSON (host, pid, SLURM job id), with stale-lock takeover.

:class:`FileLock` is created with ``O_CREAT | O_EXCL``. A lock left by a dead process on this host, or by an
earlier run of the same (requeued) SLURM job, is taken over with a warning; a lock held by a live process
(or by one on another host, whose liveness cannot be checked) is refused with an error naming the holder.
The shard writers (``<shard>.h5.lock``) and run directories (``run.lock``) use it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Optional, Type

from .cli import UserError
from .logging import utc_timestamp

_logger = logging.getLogger(__name__)

EMPTY_LOCK_GRACE_S = 60.0  # an unreadable (e.g. half-written) lock file younger than this is still respected


class LockedError(UserError, RuntimeError):
    """A lock file is held by another live process."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive lock file (``O_CREAT | O_EXCL``) holding host, pid and SLURM job id as JSON.

    Args:
        path: the lock file.
        owner: the object holding the lock; while it is alive, a lock file of this pid is not stale.
        error: exception raised when the lock is held by somebody else.
        holder_hint: what the holder is doing, for the message (e.g. "another writer is producing this shard").
    """

    # Locks held by live objects of this process: path -> weak reference to the holder.
    _held: Dict[str, weakref.ref] = {}
    kind = "lock"  # what the lock protects, for log lines ("shard lock", "run lock")
    log = _logger  # where takeovers are logged (subclasses: their module's logger)

    def __init__(self, path: Path, owner: object, *, error: Type[Exception] = LockedError,
                 holder_hint: str = "another process holds it") -> None:
        self.path = Path(path)
        self._owner = weakref.ref(owner)
        self._acquired = False
        self.error, self.holder_hint = error, holder_hint

    def _info(self) -> Dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                "time_utc": utc_timestamp()}

    def read(self) -> Optional[Dict[str, Any]]:
        """The holder's record; ``{}`` when there is no lock file, None when it is unreadable (or not a record)."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record else None  # [], "x", {}: damaged, not "no lock"

    _read = read  # the name the shard lock's callers used

    @staticmethod
    def _holder_pid(holder: Any) -> Optional[int]:
        """The pid of a well-formed holder record (an int, or a string of digits); None for anything else."""
        if not isinstance(holder, dict):
            return None
        pid = holder.get("pid")
        if isinstance(pid, bool):
            return None
        if isinstance(pid, int):
            return pid
        if isinstance(pid, str) and pid.strip().isdigit():
            return int(pid)
        return None

    def _stale_reason(self, holder: Optional[Dict[str, Any]]) -> Optional[str]:
        me = self._info()
        pid = self._holder_pid(holder)
        if pid is None:  # unreadable, or a record without a usable pid (damaged): no holder can be checked
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "lock vanished"
            what = "unreadable" if not isinstance(holder, dict) else "malformed"
            return f"{what} lock file {age:.0f}s old" if age > EMPTY_LOCK_GRACE_S else None
        assert isinstance(holder, dict)  # _holder_pid found a pid in it
        host = str(holder.get("host", ""))
        if host == me["host"]:
            if pid == me["pid"]:
                ref = self._held.get(str(self.path))
                return None if ref is not None and ref() is not None else "left by a writer of this process"
            if not pid_alive(pid):
                return f"process {pid} on {host} is no longer running"
        job = str(holder.get("slurm_job_id", ""))
        if job and job == me["slurm_job_id"] and (host, pid) != (me["host"], me["pid"]):
            return f"left by an earlier run of SLURM job {job} (requeued)"
        return None

    def _shared(self, holder: Dict[str, Any]) -> bool:
        """Whether a live holder's lock may be used as ours too (subclasses: inherited locks)."""
        return False

    def locked_message(self, holder: Optional[Dict[str, Any]]) -> str:
        """The error message for a lock held by ``holder``."""
        if self._holder_pid(holder) is None:  # unreadable or damaged, younger than the grace time
            what = ("is unreadable (being written?)" if holder is None else
                    f"is a malformed lock record ({json.dumps(holder, default=str)[:120]}: no valid pid)")
            return (f"{self.path} {what}, written less than {EMPTY_LOCK_GRACE_S:.0f}s ago: if no other command is "
                    f"using it, delete the lock file and re-run (an older one is taken over as stale)")
        h = holder or {}
        return (f"{self.path} is held by pid {h.get('pid', '?')} on host {h.get('host', '?')}"
                f"{' (SLURM job ' + str(h['slurm_job_id']) + ')' if h.get('slurm_job_id') else ''}: "
                f"{self.holder_hint}. Wait for it to finish; if no such process is running any more (e.g. it was "
                f"killed on another machine), delete the lock file and re-run.")

    def acquire(self) -> None:
        """Take the lock, taking over a stale one.

        Raises:
            ``self.error``: a live process holds the lock (the message names it).
        """
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read()
                if holder == {}:  # released between our open and read: try again
                    continue
                reason = self._stale_reason(holder)
                if reason is None:
                    if isinstance(holder, dict) and holder and self._shared(holder):
                        return
                    raise self.error(self.locked_message(holder))
                self.log.warning("taking over stale %s %s (%s; holder %s)", self.kind, self.path, reason, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
                f.flush()
                os.fsync(f.fileno())
            self._held[str(self.path)] = self._owner
            self._acquired = True
            return
        raise self.error(f"could not acquire {self.path}: the lock keeps changing hands; is more than one "
                         f"process running for it?")

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def acquired(self) -> bool:
        """Whether this object created the lock file (and will remove it on :meth:`release`)."""
        return self._acquired

    def release(self) -> None:
        """Remove the lock file if this object holds it (a no-op otherwise)."""
        if not self._acquired:
            return
        self._acquired = False
        self._held.pop(str(self.path), None)
        holder = self.read()
        if isinstance(holder, dict) and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        else:  # pragma: no cover - somebody broke our lock
            self.log.warning("%s %s was taken over by %s while we held it", self.kind, self.path, holder)
