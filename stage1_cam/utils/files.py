"""Small file helpers shared by the checkpoint, run-directory and shard code.

* :func:`atomic_write`: the one write-then-rename of the project. The temporary file sits next to the
  target under a name unique to the writer (``.<stem>.<pid>.<random>.tmp<suffix>``), so two processes
  writing the same file never trip over each other's temporary file; the target is replaced atomically,
  or left as it was when the writer fails or is killed.
* :func:`check_free_space` and :func:`is_disk_full`: a full disk becomes one :class:`DiskFullError` that
  names the directory, the space needed and free, and the fix.
* :func:`check_torch_file` and :func:`unreadable_file_error`: the one wording for an empty, foreign, truncated
  or damaged checkpoint or weights file (the stage-1 and stage-2 checkpoints, the CLIP weights).
* :func:`abandon_until_exit`: a native file handle that must never be closed (HDF5 crashes closing a file one
  of whose writes failed) is kept alive, and the process then ends without running native exit handlers.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

from .cli import BadInputError, UserError

PathLike = Union[str, os.PathLike]


class DiskFullError(UserError, OSError):
    """Not enough free space for an output (checked up front, or ``ENOSPC`` while writing)."""


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def temp_name(path: PathLike) -> Path:
    """A temporary file name next to ``path``, unique to this writer: ``.<stem>.<pid>.<random>.tmp<suffix>``.

    The target's suffix is kept last, for writers that pick the format from it (mmengine's ``Config.dump``).
    """
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


def fsync_dir(path: PathLike) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Write ``path`` through a temporary file that replaces it atomically when the block succeeds.

    Example::

        with atomic_write(ckpt) as tmp:
            torch.save(payload, tmp)

    Args:
        path: the final file (its folder is created).
        fsync: flush the file and the folder to disk before/after the rename (checkpoints, manifests).

    Yields:
        The temporary path to write (unique per writer, in the same folder, so the rename is atomic).
        On an error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk (``ENOSPC``, ``EDQUOT``).

    h5py reports HDF5 write failures as ``OSError`` or ``RuntimeError`` whose message carries the C errno
    (``errno = 28, error message = 'No space left on device'``) with ``errno`` unset; all these forms count.
    """
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, (OSError, RuntimeError)):  # h5py raises either, with the C errno in the text
            text = str(e)
            if any(m in text for m in ("No space left on device", "errno = 28,", "Disk quota exceeded",
                                       "errno = 122,")):
                return True
        e = e.__cause__ or e.__context__
    return False


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def disk_full_error(directory: PathLike, *, needed: Optional[int] = None, what: str = "the output",
                    fix: str = "", then: str = "") -> DiskFullError:
    """The :class:`DiskFullError` for ``directory``: free space, the space needed (if known), the fix and, with
    ``then``, what the re-run does."""
    directory = Path(directory)
    try:
        free: Optional[int] = shutil.disk_usage(directory).free
    except OSError:
        free = None
    need = f"{what} needs about {_mib(needed)}" if needed is not None else f"writing {what} failed"
    have = f"{_mib(free)} free" if free is not None else "free space unknown"
    err = DiskFullError(f"no space left on the disk of {directory}: {need}, {have}. Free some space there"
                        f"{' or ' + fix if fix else ''}, then re-run{'; ' + then if then else ''}")
    err.errno = errno.ENOSPC
    return err


def check_free_space(directory: PathLike, needed: int, *, what: str = "the output", fix: str = "",
                     then: str = "") -> None:
    """Raise :class:`DiskFullError` when the disk holding ``directory`` has less than ``needed`` bytes free.

    Args:
        directory: an existing folder on the disk that will be written.
        needed: bytes the next output needs (an estimate).
        what: what is about to be written (for the message).
        fix: an alternative to freeing space (e.g. "write the shards elsewhere with --out DIR").
        then: what the re-run does (see :func:`disk_full_error`).
    """
    free = shutil.disk_usage(Path(directory)).free
    if free < needed:
        raise disk_full_error(directory, needed=needed, what=what, fix=fix, then=then)


def check_torch_file(path: PathLike, *, what: str, fix: str, fix_foreign: str = "", magic: bool = True) -> None:
    """Refuse a file ``torch.load`` cannot hold weights in, before it reads it.

    Args:
        path: the file (it exists).
        what: what it should be, for the message ("checkpoint", "CLIP weights file").
        fix: the fix for an empty file (and a foreign one without ``fix_foreign``).
        fix_foreign: the fix for a file that is neither a zip archive nor a pickle.
        magic: check the first bytes (off for formats with loaders of their own, e.g. safetensors).

    Raises:
        BadInputError: the file is empty, or (``magic``) starts as neither a ``torch.save`` zip archive nor a
            (legacy) pickle; the message names the file and the fix.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise BadInputError(f"{what} {path} is empty (0 bytes; an interrupted save, download or copy?); {fix}")
    if magic:
        with open(path, "rb") as f:
            head = f.read(2)
        if head != b"PK" and head[:1] != b"\x80":
            raise BadInputError(f"{what} {path} ({size} bytes) is not a PyTorch checkpoint (neither a torch.save zip "
                                f"archive nor a pickle); {fix_foreign or fix}")


def unreadable_file_error(path: PathLike, err: BaseException, *, what: str, fix: str) -> BadInputError:
    """The error for a file ``torch.load`` (or another reader) failed on: truncated or damaged.

    The detail is the first sentence of the reader's message on one line (torch's hints about ``weights_only``
    that follow it are dropped), or the exception's type when it says nothing.
    """
    try:
        size = f"{os.path.getsize(path)} bytes; "
    except OSError:
        size = ""
    detail = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__
    return BadInputError(f"could not read {what} {path} ({size}a truncated or damaged file?): {detail}; {fix}")


_ABANDONED: List[Any] = []
_EXIT_CODE = 2  # the exit status of bad input: an output that could not be written


def abandon_until_exit(handle: Any) -> None:
    """Keep ``handle`` alive until the process ends, and end it with ``os._exit`` before native exit handlers run.

    HDF5 crashes (a segmentation fault) when it closes a file one of whose writes failed (a full disk, a file
    size limit): in ``File.close``, and in its own ``atexit`` handler, which closes every open file. Such a file
    is handed here instead of being closed. Python's exit handlers run first (last registered, first run), so
    the process flushes its logs and standard streams and exits with status 2 (an output could not be
    written: the caller has logged the one-line error) before HDF5's handler can crash it. The unfinished file
    stays on disk as it is; readers must treat it as damaged (the shard writer rebuilds it on resume).
    """
    _ABANDONED.append(handle)
    if len(_ABANDONED) == 1:
        atexit.register(_exit_without_native_handlers)


def _exit_without_native_handlers() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_EXIT_CODE)
