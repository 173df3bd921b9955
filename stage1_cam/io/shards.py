"""HDF5 pseudo-mask shards: the on-disk contract between stage 1 (dump) and stage 2 (retraining).

Format ``wsss-pseudo-masks`` version 1. A shard directory holds ``shard-00000-of-00016.h5`` ...
``shard-00015-of-00016.h5`` and a ``manifest.json``. Each shard file looks like::

    /                       attrs: format, format_version, dataset, split, class_names (JSON),
                                   palette (JSON), ignore_index, config_hash, git_sha, checkpoint_hash,
                                   extra (JSON), shard_index, num_shards; once finished: complete, num_images
    /images/<quoted id>/    attrs: name, height, width, complete
        label               (H, W) uint8, class ids, ``ignore_index`` = ignore; lzf-compressed
        confidence          (H, W) float16; lzf-compressed
        image_labels        (L,) int64, the image-level class ids
        probs               optional (K, H, W) float16, probabilities of the K classes in ``prob_keys``
        prob_keys           optional (K,) int64

Writing rules:

* One writer per shard, enforced by ``<shard>.h5.lock`` (created with ``O_CREAT | O_EXCL``, holding
  host, pid and SLURM job id). A lock left by a dead process on this host, or by an earlier run of the
  same (requeued) SLURM job, is taken over with a warning.
* A writer appends to ``<shard>.h5.partial``. Images are made durable at progress points, every
  ``flush_every`` images (1 by default: every image), and by ``finalize()`` / ``close()``: the file is
  flushed (the new groups are fully on disk), then those groups are marked complete, then it is flushed again.
  An image is durable only after its progress point; a writer killed in between loses the images written
  since the last one (they are recomputed). The next writer resumes from the partial file: complete images
  are kept and listed in ``done_ids``; groups not marked complete, or unreadable, are dropped.
* ``finalize()`` renames the partial file to ``<shard>.h5`` atomically. A finished shard is never
  rewritten, and a partial file made with other settings (dataset, classes, config or checkpoint hash)
  is never mixed with new output.

``write_manifest`` summarises the finished shards; ``ShardReader`` gives random access by image id and is
safe to use from forked ``DataLoader`` workers (files are opened lazily, per process).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import quote, unquote

import h5py
import numpy as np

from ..constants import IGNORE_INDEX
from ..utils.cli import BadInputError, UserError, describe_error
from ..utils.files import abandon_until_exit, atomic_write_text, check_free_space, disk_full_error, file_sha256, \
    fsync_dir, is_disk_full
from ..utils.locks import FileLock, LockedError

_logger = logging.getLogger(__name__)

FORMAT_NAME = "wsss-pseudo-masks"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5(\.partial)?$")
_PARTIAL_SUFFIX = ".partial"
_LOCK_SUFFIX = ".lock"
_CHECKSUM_SUFFIX = ".sha256"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_SHARDS = 99999  # five digits in the file names
_IMAGES = "images"
# Settings that must agree between a partial shard and the writer resuming it, and across the shards
# of one directory. ``git_sha`` and the rest of ``extra`` may differ (a warning is logged for ``git_sha``).
_MUST_MATCH = ("dataset", "split", "class_names", "palette", "ignore_index", "config_hash", "checkpoint_hash")
# ``extra.precision`` must agree too: the precision the network ran in. ``train.amp="auto"`` resolves per machine
# (bf16 on GPUs and CPUs with native bf16, float32 elsewhere), so the config hash alone does not fix it. The
# train.amp value of each recorded precision (utils.precision.precision_name's inverse; this module imports no torch):
_AMP_OF_PRECISION = {"bf16": "bf16", "fp16": "fp16", "float32": "none"}


class ShardFormatError(UserError, ValueError):
    """A shard or manifest has another format/version, other classes or dataset, or is unreadable."""


class ShardWriteError(UserError, OSError):
    """HDF5 could not write a shard (a full disk, a file size limit, an I/O error); the shard stays unfinished."""


class ShardLockedError(LockedError):
    """Another writer holds the shard's lock file."""


def shard_filename(index: int, num_shards: int) -> str:
    """File name of one shard, e.g. ``shard_filename(0, 16) == "shard-00000-of-00016.h5"``.

    Raises:
        BadInputError: ``num_shards`` outside ``[1, 99999]`` (a ``ValueError``; see :func:`check_num_shards`).
        ValueError: ``index`` outside ``[0, num_shards)``.
    """
    check_num_shards(num_shards)
    if not 0 <= int(index) < int(num_shards):
        raise ValueError(f"shard index {index} is outside [0, {num_shards})")
    return f"shard-{int(index):05d}-of-{int(num_shards):05d}.h5"


def check_num_shards(num_shards: int, what: str = "num_shards") -> None:
    """Refuse a shard count that no shard file name can hold (``what`` names the option in the message).

    Raises:
        BadInputError: ``num_shards`` is not an integer in ``[1, 99999]``.
    """
    try:
        n = int(num_shards)
        ok = 1 <= n <= _MAX_SHARDS and (not isinstance(num_shards, float) or n == num_shards)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BadInputError(f"{what} must be an integer in [1, {_MAX_SHARDS}] (the number of shards the dump is split "
                            f"into), got {num_shards!r}")


def check_split(out_dir: str | os.PathLike, num_shards: int) -> None:
    """Refuse a shard directory that already holds shard files (finished or unfinished) of another split.

    Called before a dump writes anything into ``out_dir`` (and before ``--evaluate`` reads it): a dump with
    another shard count would otherwise add a second split that :func:`write_manifest` refuses only at the end,
    leaving the directory blocked until the extra files are deleted by hand. A missing directory passes.

    Raises:
        BadInputError: ``num_shards`` is out of range.
        ShardFormatError: ``out_dir`` holds shards of another split; the message names both shard counts and the fix.
    """
    check_num_shards(num_shards)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    other = sorted(_shard_counts_in(out_dir) - {int(num_shards)})
    if other:
        ways = "/".join(str(n) for n in other)
        same = " or ".join(f"--num-shards {n}" for n in other)
        raise ShardFormatError(
            f"{out_dir} already holds shards of a {ways}-way split (shard-*-of-{other[0]:05d}.h5), but {num_shards} "
            f"shards were requested; nothing was written. Use the same shard count ({same}, i.e. dump.num_shards), "
            f"write to another directory (--out DIR), or remove the old shard files first (they are never mixed)")


def assign_shards(ids: Sequence[str], num_shards: int) -> list[list[str]]:
    """Split image ids over shards: deterministic, balanced, and independent of the input order.

    The ids are sorted and dealt round-robin, so shard sizes differ by at most one and every id lands in
    exactly one shard. Each shard's list is sorted.

    Args:
        ids: unique image ids.
        num_shards: number of shards (>= 1); shards may be empty when ``num_shards > len(ids)``.

    Returns:
        ``num_shards`` lists of ids.

    Raises:
        ValueError: duplicate ids or ``num_shards < 1``.
    """
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    ordered = sorted(str(i) for i in ids)
    dups = sorted({a for a, b in zip(ordered, ordered[1:]) if a == b})
    if dups:
        raise ValueError(f"image ids must be unique; duplicated: {dups[:5]}{' ...' if len(dups) > 5 else ''}")
    return [ordered[k::num_shards] for k in range(num_shards)]


@dataclass
class ShardMeta:
    """Settings recorded in every shard file and in ``manifest.json``.

    Attributes:
        dataset: dataset name (e.g. ``voc``, ``coco``, ``synthetic``).
        split: split the masks were made for (e.g. ``train_aug``).
        class_names: label names, index = class id (background first).
        palette: RGB colour per class id (at least one per class; 256 entries for VOC).
        ignore_index: label value meaning "ignore" (must not be a class id).
        config_hash: hash of the stage-1 config that produced the masks.
        git_sha: commit of the code that produced the masks.
        checkpoint_hash: hash of the stage-1 checkpoint used for the dump.
        extra: any further JSON-serialisable information (e.g. dump settings).
    """

    dataset: str
    split: str
    class_names: tuple[str, ...]
    palette: list[tuple[int, int, int]]
    ignore_index: int = IGNORE_INDEX
    config_hash: str = ""
    git_sha: str = ""
    checkpoint_hash: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = tuple(str(c) for c in self.class_names)
        self.palette = [tuple(int(v) for v in rgb) for rgb in self.palette]  # type: ignore[misc]
        self.ignore_index = int(self.ignore_index)
        if not self.dataset:
            raise ValueError("ShardMeta.dataset must be a non-empty name")
        if not self.class_names:
            raise ValueError("ShardMeta.class_names must not be empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"ShardMeta.class_names has duplicates: {self.class_names}")
        if len(self.class_names) > 255:
            raise ValueError(f"uint8 label maps hold at most 255 classes, got {len(self.class_names)}")
        if not len(self.class_names) <= self.ignore_index <= 255:
            raise ValueError(
                f"ShardMeta.ignore_index={self.ignore_index} must be in [{len(self.class_names)}, 255] "
                f"(a uint8 value that is not a class id)")
        if len(self.palette) < len(self.class_names):
            raise ValueError(f"ShardMeta.palette has {len(self.palette)} colours for {len(self.class_names)} classes")
        for rgb in self.palette:
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError(f"ShardMeta.palette entries must be (r, g, b) in [0, 255], got {rgb}")
        try:
            json.dumps(self.extra)
        except TypeError as e:
            raise ValueError(f"ShardMeta.extra must be JSON-serialisable: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists instead of tuples)."""
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["palette"] = [list(rgb) for rgb in self.palette]
        return d


# ----------------------------------------------------------------------------------------------------------
# helpers


def _key(name: str) -> str:
    """HDF5 group name of an image id (ids may contain ``/``; ``.`` and ``..`` are refused)."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise ValueError(f"image id must be a non-empty string other than '.' and '..', got {name!r}")
    return quote(name, safe="")


def _file_attrs(meta: ShardMeta, shard_index: int, num_shards: int) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset": meta.dataset,
        "split": meta.split,
        "class_names": json.dumps(list(meta.class_names)),
        "palette": json.dumps([list(rgb) for rgb in meta.palette]),
        "ignore_index": meta.ignore_index,
        "config_hash": meta.config_hash,
        "git_sha": meta.git_sha,
        "checkpoint_hash": meta.checkpoint_hash,
        "extra": json.dumps(meta.extra, sort_keys=True),
        "shard_index": int(shard_index),
        "num_shards": int(num_shards),
    }


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _meta_from_attrs(attrs: h5py.AttributeManager, path: Path) -> dict[str, Any]:
    """Format-checked metadata dict (manifest-style) from a shard file's attributes."""
    try:
        return _read_meta(attrs, path)
    except (OSError, RuntimeError) as e:  # HDF5 cannot read them: damaged bytes, or cut off by a crash or full disk
        raise ShardFormatError(f"{path} is truncated or unreadable as HDF5 ({_h5_reason(e)}); delete it and re-run "
                               f"the dump to regenerate this shard") from e


def _read_meta(attrs: h5py.AttributeManager, path: Path) -> dict[str, Any]:
    if "format" not in attrs or "format_version" not in attrs:
        raise ShardFormatError(f"{path} is not a pseudo-mask shard (no 'format' attributes); "
                               f"expected format {FORMAT_NAME!r} written by stage1_cam.io.ShardWriter")
    meta = {"format": _attr_str(attrs["format"]), "format_version": int(attrs["format_version"])}
    _check_format(meta, str(path))
    try:
        meta.update({
            "dataset": _attr_str(attrs["dataset"]),
            "split": _attr_str(attrs["split"]),
            "class_names": json.loads(_attr_str(attrs["class_names"])),
            "palette": json.loads(_attr_str(attrs["palette"])),
            "ignore_index": int(attrs["ignore_index"]),
            "config_hash": _attr_str(attrs["config_hash"]),
            "git_sha": _attr_str(attrs["git_sha"]),
            "checkpoint_hash": _attr_str(attrs["checkpoint_hash"]),
            "extra": json.loads(_attr_str(attrs["extra"])),
            "shard_index": int(attrs["shard_index"]),
            "num_shards": int(attrs["num_shards"]),
        })
    except (KeyError, ValueError) as e:
        raise ShardFormatError(f"{path} has missing or malformed attributes ({e}); delete it and re-run the dump "
                               f"to regenerate this shard") from e
    return meta


def _check_format(meta: dict[str, Any], source: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{source} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}; "
                               f"it was not written by stage1_cam.io.ShardWriter")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        hint = ("it was written by a newer version of this package; upgrade stage1_cam to read it"
                if isinstance(version, int) and version > FORMAT_VERSION else
                "re-run the pseudo-mask dump with this version of stage1_cam to regenerate it")
        raise ShardFormatError(f"{source} has format version {version}, but this reader understands only "
                               f"version {FORMAT_VERSION}: {hint}")


def _meta_mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for k in _MUST_MATCH:
        va, vb = a.get(k), b.get(k)
        if k in ("class_names", "palette"):
            va = [list(x) if isinstance(x, (list, tuple)) else x for x in (va or [])]
            vb = [list(x) if isinstance(x, (list, tuple)) else x for x in (vb or [])]
        if va != vb:
            out.append(f"{k}: {_short(va)} vs {_short(vb)}")
    pa, pb = ((m.get("extra") or {}).get("precision") for m in (a, b))
    if pa != pb:
        hint = (f" (train.amp='auto' picks the precision per machine; train.amp={_AMP_OF_PRECISION[pa]!r} runs in the "
                f"first one)" if pa in _AMP_OF_PRECISION else "")
        out.append(f"extra.precision: {_short(pa)} vs {_short(pb)}{hint}")
    return out


def _short(v: Any, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _open_h5(path: Path, mode: str, *, partial: bool) -> h5py.File:
    try:
        # Our own lock file guarantees one writer; HDF5's advisory locking fails on some network filesystems.
        return h5py.File(path, mode, locking=False)
    except OSError as e:
        if partial:
            fix = ("it holds an unfinished shard (probably cut off by a crash or a full disk); delete it and "
                   "re-run the dump to regenerate that shard")
        else:
            fix = "delete it and re-run the dump for that shard, then rebuild the manifest (write_manifest)"
        raise ShardFormatError(f"{path} is truncated or unreadable as HDF5 ({e}); {fix}") from e


def _checked_dataset(g: h5py.Group, name: str, data: np.ndarray) -> None:
    """A small 1-D dataset, chunked with a fletcher32 checksum unless it is empty."""
    if data.size:
        g.create_dataset(name, data=data, chunks=data.shape, fletcher32=True)
    else:
        g.create_dataset(name, data=data)


def checksum_path(shard: Path) -> Path:
    """``<shard>.sha256``: the shard's sha256 as its writer wrote it (``sha256sum -c`` format)."""
    return shard.with_name(shard.name + _CHECKSUM_SUFFIX)


def _write_checksum(shard: Path, digest: str) -> None:
    atomic_write_text(checksum_path(shard), f"{digest}  {shard.name}\n", fsync=True)


def _read_checksum(shard: Path) -> str | None:
    """The sha256 of ``shard`` as its writer recorded it, or None if there is no checksum file at all (a shard
    written by a version before those files existed).

    A checksum file that exists but holds no sha256 is damaged, not absent: it is never taken for an old shard's
    missing record (which would record the hash of whatever the shard holds now).

    Raises:
        ShardFormatError: the checksum file is damaged (names it and the fix).
        OSError: the checksum file cannot be read (permissions, I/O); the error names it.
    """
    path = checksum_path(shard)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    words = raw.split()
    try:
        digest = words[0].decode("ascii") if words else ""
    except UnicodeDecodeError:
        digest = ""
    if _SHA256_RE.fullmatch(digest):
        return digest
    raise ShardFormatError(
        f"{path} is damaged (it holds {_short(raw, 60)}, not the sha256 its writer recorded), so {shard.name} cannot "
        f"be checked; delete {shard} and {path.name}, then re-run `make pseudo-labels` (or the dump for that shard) "
        f"to regenerate it")


def _to_numpy(x: Any) -> np.ndarray:
    """NumPy view of an array-like; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class _ShardLock(FileLock):
    """The lock file of one shard (``<shard>.h5.lock``): see :class:`~stage1_cam.utils.locks.FileLock`."""

    kind, log = "shard lock", _logger

    def __init__(self, path: Path, owner: object) -> None:
        super().__init__(path, owner, error=ShardLockedError, holder_hint="another writer is producing this shard")


# ----------------------------------------------------------------------------------------------------------
# writer


# h5py reports most failed HDF5 writes only when the object that buffered them is released ("Exception ignored in
# h5py._objects.ObjectID.__dealloc__"), not to the caller. Those reports are collected here (not printed) and the
# writer turns them into one error. A process-wide hook, installed by the first writer; others go to the old hook.
_H5_FAILURES: list[BaseException] = []
_HOOK: dict[str, Any] = {}
# Free space a write needs beyond the image's own bytes: HDF5 metadata (group and dataset headers, chunk indexes)
# and the next progress point's flush.
_WRITE_HEADROOM = 256 << 10
DISK_FULL_FIX = "write the shards to another disk (--out DIR)"  # the alternative to freeing space, in every message


def _h5_unraisable(u: Any) -> None:
    if "h5py" in str(u.object) and _write_failure(u.exc_value):
        _H5_FAILURES.append(u.exc_value)
    else:
        _HOOK["unraisable"](u)


def _h5_excepthook(kind: Any, value: Any, tb: Any) -> None:
    # Cython prints the traceback of such a release error through sys.excepthook before reporting it as
    # unraisable: that print is dropped too (the report above is kept).
    codes, t = [], tb
    while t is not None:
        codes.append(t.tb_frame.f_code)
        t = t.tb_next
    if _write_failure(value) and any(c.co_name.endswith("_dealloc") and "h5py" in c.co_filename for c in codes):
        return
    _HOOK["excepthook"](kind, value, tb)


def _install_h5_failure_hook() -> None:
    if not _HOOK:
        _HOOK["unraisable"], _HOOK["excepthook"] = sys.unraisablehook, sys.excepthook
        sys.unraisablehook, sys.excepthook = _h5_unraisable, _h5_excepthook


def _h5_reason(err: BaseException) -> str:
    """The C error of a failed HDF5 write (``errno 28: No space left on device``), else the message's first line."""
    m = re.search(r"errno = (\d+), error message = '([^']*)'", str(err))
    first = str(err).splitlines()[0] if str(err) else repr(err)
    return f"errno {m.group(1)}: {m.group(2)}" if m else _short(first, 160)


def _write_failure(err: Any) -> bool:
    """Whether an exception from h5py is a failed write of the file (errno in the text, or an OSError errno)."""
    if not isinstance(err, (OSError, RuntimeError)) or isinstance(err, UserError):
        return False
    if isinstance(err, OSError) and err.errno is not None:
        return True
    text = str(err)
    return "write failed" in text or "errno = " in text


def _dst_write_failure(err: Any) -> bool:
    """In the recover copy, which also reads the partial file: only errors that say so are failed writes of the copy
    (a read error drops that image group instead)."""
    return _write_failure(err) and "write failed" in str(err)


class _H5WriteFailed(Exception):
    """Internal: an HDF5 write of the file in hand failed (``err``); that file must never be closed."""

    def __init__(self, err: BaseException) -> None:
        super().__init__(str(err))
        self.err = err


@contextmanager
def _h5_write_failures(is_failure: Callable[[BaseException], bool] = _write_failure) -> Iterator[None]:
    """Raise :class:`_H5WriteFailed` when an HDF5 write in the block fails: an error ``is_failure`` accepts, or one
    reported only when h5py released an object (collected by the hook above), also behind another error."""
    seen = len(_H5_FAILURES)
    try:
        yield
    except (OSError, RuntimeError) as e:
        if is_failure(e):
            raise _H5WriteFailed(e) from e
        if len(_H5_FAILURES) > seen:
            raise _H5WriteFailed(_H5_FAILURES[seen]) from e
        raise
    if len(_H5_FAILURES) > seen:
        raise _H5WriteFailed(_H5_FAILURES[seen])


def _write_error(path: Path, what: str, err: BaseException, then: str) -> OSError:
    """The one error of a failed HDF5 write of ``path``: :class:`DiskFullError` for a full disk, else
    :class:`ShardWriteError`; ``then`` says what the re-run does."""
    if is_disk_full(err):
        return disk_full_error(path.parent, what=f"{what} of {path.name}", fix=DISK_FULL_FIX, then=then)
    return ShardWriteError(f"{path}: {what} failed ({_h5_reason(err)}). Check the disk (space, quota, the file size "
                           f"limit `ulimit -f`, I/O errors) and re-run; {then}")


class ShardWriter:
    """Writes one shard, resumably; use as a context manager and call :meth:`finalize` when all images are in.

    Example::

        with ShardWriter(out_dir, i, n, meta=meta) as w:
            for name in assign_shards(ids, n)[i]:
                if name in w.done_ids:
                    continue
                w.write(name, label=label, confidence=conf, image_labels=cls_ids)
            w.finalize()

    Leaving the ``with`` block without ``finalize()`` (or crashing) keeps ``<shard>.h5.partial``; the next
    writer for the same shard resumes from it.

    Args:
        out_dir: shard directory (created if missing).
        shard_index: this shard's index in ``[0, num_shards)``.
        num_shards: total number of shards.
        meta: dataset, classes, hashes recorded in the file.
        flush_every: images between progress points (1: each image is durable when :meth:`write` returns).

    A write that does not fit on the disk is refused before HDF5 touches the file (:class:`DiskFullError`). If
    HDF5 fails anyway (the disk filled up meanwhile, a file size limit), the writer raises one error
    (:class:`DiskFullError` or :class:`ShardWriteError`) and never touches that file again: HDF5 crashes closing
    it, so it is left as it is until the process ends (:func:`~stage1_cam.utils.files.abandon_until_exit`) and
    rebuilt from its complete images by the next writer.

    Raises:
        ShardLockedError: another live writer holds this shard.
        ShardFormatError: an existing partial or finished shard was made with other settings, another format
            version, or is unreadable.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_index: int, num_shards: int, *, meta: ShardMeta,
                 flush_every: int = 1) -> None:
        if not isinstance(meta, ShardMeta):
            raise TypeError(f"meta must be a ShardMeta, got {type(meta).__name__}")
        if int(flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.flush_every = int(flush_every)
        self._pending: list[str] = []  # HDF5 keys written since the last progress point (not yet marked complete)
        fname = shard_filename(shard_index, num_shards)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_index, self.num_shards, self.meta = int(shard_index), int(num_shards), meta
        self.path = self.out_dir / fname
        self.partial_path = self.out_dir / (fname + _PARTIAL_SUFFIX)
        self.lock_path = self.out_dir / (fname + _LOCK_SUFFIX)
        self.done_ids: set[str] = set()
        self._file: h5py.File | None = None
        self._complete = False
        self._failed: OSError | None = None  # the write failure that ended this writer (the file is abandoned)
        _install_h5_failure_hook()
        self._lock = _ShardLock(self.lock_path, self)
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening / resuming --------------------------------------------------------------------------------

    def _expected_meta(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.meta.to_dict()}

    def _check_meta(self, found: dict[str, Any], path: Path, partial: bool) -> None:
        bad = _meta_mismatches(found, self._expected_meta())
        if found.get("shard_index") != self.shard_index or found.get("num_shards") != self.num_shards:
            bad.append(f"shard: {found.get('shard_index')}/{found.get('num_shards')} vs "
                       f"{self.shard_index}/{self.num_shards}")
        if bad:
            what = "an unfinished shard" if partial else "a finished shard"
            raise ShardFormatError(
                f"{path} is {what} made with other settings ({'; '.join(bad)}; file vs this writer). Shards "
                f"from different settings are never mixed: write to another directory, or delete "
                f"{path.name} to regenerate it with the current settings.")
        if found.get("git_sha") != self.meta.git_sha:
            _logger.warning("%s was started by code %s; continuing with %s", path, found.get("git_sha"),
                            self.meta.git_sha)

    def _open(self) -> None:
        if self.path.is_file():
            with _open_h5(self.path, "r", partial=False) as f:
                self._check_meta(_meta_from_attrs(f.attrs, self.path), self.path, partial=False)
                self.done_ids = {unquote(k) for k in f[_IMAGES]}
            self._complete = True
            if self.partial_path.exists():
                _logger.warning("%s is finished; ignoring the leftover %s", self.path, self.partial_path.name)
            _logger.info("%s is already complete (%d images); nothing to write", self.path, len(self.done_ids))
            return
        if self.partial_path.is_file():
            self._recover()
            self._file = _open_h5(self.partial_path, "a", partial=True)
            return
        self._file = h5py.File(self.partial_path, "w-", locking=False)
        with self._h5_writes("creating the file"):
            self._file.attrs.update(_file_attrs(self.meta, self.shard_index, self.num_shards))
            self._file.create_group(_IMAGES, track_order=True)
            self._file.flush()

    @contextmanager
    def _h5_writes(self, what: str) -> Iterator[None]:
        """Run HDF5 writes of this file; a failed one ends the writer with one error (see the class docstring)."""
        try:
            with _h5_write_failures():
                yield
        except _H5WriteFailed as e:
            raise self._fail(what, e.err) from e.err

    def _fail(self, what: str, err: BaseException) -> OSError:
        """Abandon the file after a failed HDF5 write and return the error to raise (kept for later calls)."""
        f, self._file = self._file, None
        if f is not None:
            abandon_until_exit(f)  # never closed or flushed again: HDF5 would crash
        durable = len(self.done_ids) - len(self._pending)
        self.done_ids.difference_update(unquote(k) for k in self._pending)
        self._pending.clear()
        self._failed = _write_error(
            self.partial_path, what, err,
            then=f"the shard stays unfinished and the next run resumes it from its last progress point ({durable} "
                 f"images; if the file turns out unreadable, it says so: then delete {self.partial_path.name})")
        return self._failed

    def _recover(self) -> None:
        """Rebuild the partial file from its complete images (resume after a crash or an interruption).

        HDF5 files are not crash-consistent: a writer killed between flushes can leave half-written groups
        (or links to objects that never reached the disk). Rather than editing such a file in place, the
        complete, readable image groups are copied into a fresh file, which then replaces the partial one.
        """
        tmp = self.partial_path.with_name(self.partial_path.name + ".recover")
        tmp.unlink(missing_ok=True)
        # The copy must fit: a failed HDF5 write cannot be undone.
        check_free_space(self.out_dir, self.partial_path.stat().st_size + _WRITE_HEADROOM,
                         what=f"resuming {self.partial_path.name}", fix=DISK_FULL_FIX)
        dropped: list[str] = []
        src = _open_h5(self.partial_path, "r", partial=True)
        try:
            self._check_meta(_meta_from_attrs(src.attrs, self.partial_path), self.partial_path, partial=True)
            try:
                keys = list(src[_IMAGES])
            except (KeyError, OSError, RuntimeError) as e:
                raise ShardFormatError(f"{self.partial_path} has an unreadable image index ({e}); delete it and "
                                       "re-run the dump to regenerate that shard") from e
            dst = h5py.File(tmp, "w", locking=False)
            try:
                with _h5_write_failures(_dst_write_failure):
                    self._copy_complete(src, dst, keys, dropped)
            except _H5WriteFailed as e:
                abandon_until_exit(dst)  # HDF5 crashes closing a file whose write failed
                self.done_ids.clear()
                raise _write_error(tmp, "rebuilding the unfinished shard", e.err,
                                   then=f"the next run tries again from {self.partial_path.name}") from e.err
            except BaseException:
                dst.close()
                raise
            dst.close()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            src.close()
        os.replace(tmp, self.partial_path)
        _logger.info("resuming %s: %d images complete%s", self.partial_path, len(self.done_ids),
                     f", dropped unfinished {dropped}" if dropped else "")

    def _copy_complete(self, src: h5py.File, dst: h5py.File, keys: list[str], dropped: list[str]) -> None:
        """Copy the complete, readable image groups ``keys`` of ``src`` into ``dst`` (recording them in ``done_ids``;
        the others in ``dropped``), then flush ``dst``."""
        dst.attrs.update({k: v for k, v in src.attrs.items() if k not in ("complete", "num_images")})
        images = dst.create_group(_IMAGES, track_order=True)
        for key in keys:
            try:
                g = src[_IMAGES][key]
                if not bool(g.attrs.get("complete", False)):
                    raise KeyError("not marked complete")
                src.copy(g, images, name=key)
            except (KeyError, OSError, RuntimeError, ValueError) as e:
                if _dst_write_failure(e):
                    raise  # a failed write of dst, not a damaged group of src
                dropped.append(unquote(key))
                if key in images:
                    del images[key]
                continue
            self.done_ids.add(unquote(key))
        dst.flush()

    # -- public API ----------------------------------------------------------------------------------------

    @property
    def is_complete(self) -> bool:
        """Whether this shard is finished (renamed to its final name)."""
        return self._complete

    @classmethod
    def shard_complete(cls, out_dir: str | os.PathLike, shard_index: int, num_shards: int) -> bool:
        """Whether ``out_dir`` holds the finished shard ``shard_index`` of ``num_shards`` (no lock taken)."""
        return (Path(out_dir) / shard_filename(shard_index, num_shards)).is_file()

    @property
    def num_pending(self) -> int:
        """Images written since the last progress point (in ``done_ids``, but lost if the process dies now)."""
        return len(self._pending)

    def progress_point(self) -> None:
        """Make every image written so far durable: flush, mark the new groups complete, flush again.

        Two flushes, so that a group is marked complete only once its datasets are on disk: whatever HDF5's
        metadata cache writes out between progress points, or a kill in the middle of a flush, a group that
        reads as complete had all its data written first. (A single progress attribute would need the same
        ordering and a count tied to the group order; the per-group mark keeps ``_recover`` unchanged.)

        Raises:
            OSError: the flush failed (e.g. a full disk); the unmarked images are dropped on resume.
        """
        if self._failed is not None:
            raise self._failed
        if self._file is None or not self._pending:
            return
        with self._h5_writes(f"making {len(self._pending)} images durable"):
            images = self._file[_IMAGES]
            self._file.flush()
            for key in self._pending:
                images[key].attrs["complete"] = True
            self._file.flush()
        self._pending.clear()

    def write(self, name: str, *, label: np.ndarray, confidence: np.ndarray, image_labels: Sequence[int],
              probs: np.ndarray | None = None, prob_keys: Sequence[int] | None = None) -> None:
        """Add one image; it is durable (flushed, marked complete) at the next progress point: when this returns
        if ``flush_every`` images are pending (always with ``flush_every=1``), else at a later write,
        :meth:`finalize` or :meth:`close`.

        Args:
            name: image id (unique in the shard).
            label: (H, W) integer class ids in ``[0, num_classes)`` or ``ignore_index``; stored as uint8.
            confidence: (H, W) float confidence of ``label``; stored as float16.
            image_labels: image-level class ids.
            probs: optional (K, H, W) float probabilities of the classes ``prob_keys``; stored as float16.
            prob_keys: (K,) class ids of the ``probs`` channels (required with ``probs``).

        Raises:
            ValueError: the id is already written, the shard is finished, or an array has a bad shape,
                dtype or value.
            DiskFullError: the image does not fit on the disk (checked before writing), or HDF5 ran out of space.
            ShardWriteError: HDF5 failed to write for another reason.
        """
        if self._failed is not None:
            raise self._failed
        if self._complete:
            raise ValueError(f"{self.path} is finished and is never rewritten (cannot add {name!r}); "
                             f"skip the ids in writer.done_ids, or delete the shard to regenerate it")
        if self._file is None:
            raise ValueError(f"the writer for {self.partial_path} is closed; create a new ShardWriter to resume")
        if name in self.done_ids:
            raise ValueError(f"{name!r} is already in {self.partial_path}; skip the ids in writer.done_ids")
        key = _key(name)
        num_classes, ignore = len(self.meta.class_names), self.meta.ignore_index

        lab = _to_numpy(label)
        if lab.ndim != 2 or lab.shape[0] < 1 or lab.shape[1] < 1:
            raise ValueError(f"{name}: label must be a non-empty (H, W) array, got shape {lab.shape}")
        if lab.dtype.kind not in "iu":
            raise ValueError(f"{name}: label must hold integer class ids, got dtype {lab.dtype}")
        if lab.dtype != np.uint8:
            if lab.size and (lab.min() < 0 or lab.max() > 255):
                raise ValueError(f"{name}: label values must be in [0, 255], got [{lab.min()}, {lab.max()}]")
            lab = lab.astype(np.uint8)
        counts = np.bincount(lab.ravel(), minlength=256)
        counts[ignore] = 0
        bad = np.flatnonzero(counts[num_classes:]) + num_classes
        if bad.size:
            raise ValueError(f"{name}: label has values {bad.tolist()} that are neither class ids "
                             f"(< {num_classes}) nor the ignore index {ignore}")

        conf = _to_numpy(confidence)
        if conf.shape != lab.shape:
            raise ValueError(f"{name}: confidence shape {conf.shape} differs from label shape {lab.shape}")
        if conf.dtype.kind != "f":
            raise ValueError(f"{name}: confidence must be floating point, got dtype {conf.dtype}")
        conf16 = conf.astype(np.float16)
        if not np.isfinite(conf16).all():
            raise ValueError(f"{name}: confidence has NaN/inf values or values beyond the float16 range")

        cls_ids = np.asarray(_to_numpy(image_labels) if not isinstance(image_labels, (list, tuple))
                             else list(image_labels))
        if cls_ids.size == 0:
            cls_ids = np.zeros((0,), np.int64)
        if cls_ids.ndim != 1 or cls_ids.dtype.kind not in "iu":
            raise ValueError(f"{name}: image_labels must be a 1-D sequence of class ids, got {image_labels!r}")
        cls_ids = cls_ids.astype(np.int64)
        if cls_ids.size and (cls_ids.min() < 0 or cls_ids.max() >= num_classes or
                             len(np.unique(cls_ids)) != cls_ids.size):
            raise ValueError(f"{name}: image_labels must be unique class ids in [0, {num_classes}), "
                             f"got {cls_ids.tolist()}")

        p16 = keys = None
        if (probs is None) != (prob_keys is None):
            raise ValueError(f"{name}: pass probs and prob_keys together (got only one of them)")
        if probs is not None:
            p = _to_numpy(probs)
            keys = np.asarray(list(prob_keys), dtype=np.int64).reshape(-1)  # type: ignore[arg-type]
            if p.ndim != 3 or p.shape[1:] != lab.shape or p.shape[0] != keys.size:
                raise ValueError(f"{name}: probs must have shape (K={keys.size}, {lab.shape[0]}, {lab.shape[1]}) "
                                 f"to match prob_keys and label, got {p.shape}")
            if p.dtype.kind != "f":
                raise ValueError(f"{name}: probs must be floating point, got dtype {p.dtype}")
            if keys.size and (keys.min() < 0 or keys.max() >= num_classes or len(np.unique(keys)) != keys.size):
                raise ValueError(f"{name}: prob_keys must be unique class ids in [0, {num_classes}), "
                                 f"got {keys.tolist()}")
            p16 = p.astype(np.float16)
            if not np.isfinite(p16).all():
                raise ValueError(f"{name}: probs has NaN/inf values or values beyond the float16 range")

        # Refused before HDF5 touches the file: a write HDF5 cannot finish leaves a file it cannot close.
        check_free_space(self.out_dir, lab.nbytes + conf16.nbytes + (p16.nbytes if p16 is not None else 0)
                         + _WRITE_HEADROOM, what=f"image {name!r} of {self.partial_path.name}", fix=DISK_FULL_FIX)
        with self._h5_writes(f"writing image {name!r}"):
            self._write_group(key, name, lab, conf16, cls_ids, p16, keys)
        self.done_ids.add(name)
        self._pending.append(key)  # marked complete at the progress point: a group without it is dropped on resume
        if len(self._pending) >= self.flush_every:
            self.progress_point()

    def _write_group(self, key: str, name: str, lab: np.ndarray, conf16: np.ndarray, cls_ids: np.ndarray,
                     p16: np.ndarray | None, keys: np.ndarray | None) -> None:
        assert self._file is not None
        images = self._file[_IMAGES]
        if key in images:  # left over by an earlier failed write() of this writer
            del images[key]
        g = images.create_group(key)
        try:
            h, w = lab.shape
            # fletcher32: a checksum per chunk, verified by HDF5 on every read, so a flipped byte gives a read
            # error instead of a plausible wrong label (it needs chunked layout; empty arrays cannot be chunked).
            g.create_dataset("label", data=lab, chunks=(h, w), compression="lzf", fletcher32=True)
            g.create_dataset("confidence", data=conf16, chunks=(h, w), compression="lzf", fletcher32=True)
            _checked_dataset(g, "image_labels", cls_ids)
            if p16 is not None:
                if p16.shape[0]:
                    g.create_dataset("probs", data=p16, chunks=(1, h, w), compression="lzf", fletcher32=True)
                else:
                    g.create_dataset("probs", data=p16)
                _checked_dataset(g, "prob_keys", keys)
            g.attrs["name"] = name
            g.attrs["height"], g.attrs["width"] = h, w
        except BaseException as e:
            if not _write_failure(e):  # a failed write leaves the file alone (see _h5_writes)
                try:  # best effort; a group left incomplete is dropped when the shard is resumed
                    del images[key]
                except Exception:
                    pass
            raise

    def finalize(self) -> Path:
        """Close the partial file and rename it atomically to the final name; a no-op for a finished shard.

        Returns:
            Path of the finished shard.
        """
        if self._complete:
            self._lock.release()
            return self.path
        if self._failed is not None:
            raise self._failed
        if self._file is None:
            raise ValueError(f"the writer for {self.partial_path} is closed; create a new ShardWriter to resume")
        self.progress_point()
        with self._h5_writes("finishing the shard"):
            self._file.attrs["num_images"] = len(self.done_ids)
            self._file.attrs["complete"] = True
            self._file.flush()
            self._file.close()
        self._file = None
        with open(self.partial_path, "rb+") as f:
            os.fsync(f.fileno())
        # The checksum of the bytes as written, kept beside the shard: the manifest is rebuilt from it, so a
        # shard damaged later is never re-listed as valid (written before the rename: no finished shard lacks it).
        _write_checksum(self.path, file_sha256(self.partial_path))
        os.replace(self.partial_path, self.path)
        fsync_dir(self.out_dir)
        self._complete = True
        self._lock.release()
        _logger.info("finished %s (%d images)", self.path, len(self.done_ids))
        return self.path

    def close(self) -> None:
        """Make the written images durable (best effort), close the file and release the lock without finalizing
        (the partial file stays resumable)."""
        if getattr(self, "_file", None) is not None:
            pending = len(self._pending)
            try:
                self.progress_point()
            except Exception as e:  # e.g. the disk is still full: those images are recomputed on resume
                _logger.warning("%s: the last %d images were not made durable (%s)", self.partial_path, pending,
                                describe_error(e))
            if self._file is not None:  # None when the flush failed: the file is abandoned (see _fail)
                try:
                    with self._h5_writes("closing the file"):
                        self._file.close()
                except OSError as e:
                    _logger.warning("%s", describe_error(e))
                finally:
                    self._file = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# ----------------------------------------------------------------------------------------------------------
# manifest


def _scan_finished(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(format-checked metadata, ids in write order) of a finished shard file."""
    with _open_h5(path, "r", partial=False) as f:
        meta = _meta_from_attrs(f.attrs, path)
        if not bool(f.attrs.get("complete", False)) or _IMAGES not in f:
            raise ShardFormatError(f"{path} is not marked complete; it was renamed by hand or damaged. Delete it "
                                   f"and re-run the dump for that shard")
        ids = [unquote(k) for k in f[_IMAGES]]
        if int(f.attrs.get("num_images", -1)) != len(ids):
            raise ShardFormatError(f"{path} holds {len(ids)} images but records {f.attrs.get('num_images')}; "
                                   f"delete it and re-run the dump for that shard")
    name_match = _SHARD_RE.match(path.name)
    assert name_match is not None
    if (meta["shard_index"], meta["num_shards"]) != (int(name_match.group(1)), int(name_match.group(2))):
        raise ShardFormatError(f"{path} records shard {meta['shard_index']} of {meta['num_shards']}, which does not "
                               f"match its file name; it was renamed by hand. Restore the original name")
    return meta, ids


def _shard_counts_in(out_dir: Path) -> set[int]:
    counts = set()
    for p in out_dir.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            counts.add(int(m.group(2)))
    return counts


def _shard_digest(path: Path, st: os.stat_result, old: dict[str, Any] | None, *,
                  verify: bool) -> tuple[str, str | None]:
    """(sha256 of a finished shard, a description of the damage or None).

    The reference is the checksum file its writer left (else, for shards written before those existed, i.e. with
    no checksum file at all, the previous manifest's entry; else none, and the checksum file is written now). A
    checksum file that exists but holds no sha256 is damaged and refused (:func:`_read_checksum`), never taken for
    an old shard's missing one. Without ``verify``, a file
    not modified since its checksum file was written, or of the size and mtime the previous manifest lists
    with that checksum, is not hashed again (a write after the checksum would have moved its mtime).
    """
    written = _read_checksum(path)
    recorded = written or (old or {}).get("sha256")
    if not verify and recorded is not None:
        if written is not None and st.st_mtime_ns <= checksum_path(path).stat().st_mtime_ns:
            return written, None
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns \
                and recorded == old.get("sha256"):
            return recorded, None
    digest = file_sha256(path)
    if recorded is None:
        _logger.info("%s has no recorded checksum (written by an older version); recording its sha256 now", path)
        _write_checksum(path, digest)
    elif digest != recorded:
        return digest, (f"{path} (sha256 {digest[:16]}..., but {recorded[:16]}... when it was written; "
                        f"images {_short(_ids_of(old), 80) if old else 'unknown'})")
    return digest, None


def _ids_of(entry: dict[str, Any] | None) -> list[str]:
    return list((entry or {}).get("ids") or [])


def _damage_message(problems: list[str]) -> str:
    return (f"{len(problems)} pseudo-mask shard file(s) changed after they were written (damaged or modified in "
            f"place): {'; '.join(problems)}. Delete {'that file' if len(problems) == 1 else 'those files'} and "
            f"re-run `make pseudo-labels` (or the dump for those shards): only the deleted shards are dumped again")


def _collect(out_dir: Path, num_shards: int, *, checksum: bool, previous: dict[str, Any] | None,
             verify: bool = False) -> dict[str, Any]:
    """Manifest dict of ``out_dir`` (see :func:`write_manifest`); ``verify`` hashes every shard.

    Raises:
        ShardFormatError: (with ``checksum``) shards whose bytes differ from the checksum recorded when they
            were written, all of them named in one message.
    """
    other = sorted(_shard_counts_in(out_dir) - {int(num_shards)})
    if other:
        raise ShardFormatError(
            f"{out_dir} also holds shards of a {'/'.join(str(n) for n in other)}-way split, besides the requested "
            f"{num_shards}-way one; remove the other shard files (or use that num_shards) so they are not mixed")
    prev = {s["file"]: s for s in (previous or {}).get("shards", []) if isinstance(s, dict) and "file" in s}
    shards: list[dict[str, Any]] = []
    missing: list[int] = []
    incomplete: list[int] = []
    meta: dict[str, Any] | None = None
    meta_src: Path | None = None
    seen: dict[str, str] = {}
    damaged: list[str] = []
    for i in range(num_shards):
        fname = shard_filename(i, num_shards)
        path = out_dir / fname
        if not path.is_file():
            (incomplete if (out_dir / (fname + _PARTIAL_SUFFIX)).is_file() else missing).append(i)
            continue
        st = path.stat()
        digest = None
        if checksum:  # first: a damaged file is not opened (its HDF5 metadata may be damaged too)
            digest, problem = _shard_digest(path, st, prev.get(fname), verify=verify)
            if problem:
                damaged.append(problem)
                continue
        m, ids = _scan_finished(path)
        if meta is None:
            meta, meta_src = m, path
        else:
            bad = _meta_mismatches(m, meta)
            if bad:
                raise ShardFormatError(f"{path} and {meta_src} were made with different settings "
                                       f"({'; '.join(bad)}); keep only shards from one dump in {out_dir}")
        for name in ids:
            if name in seen:
                raise ShardFormatError(f"image {name!r} is in both {seen[name]} and {fname}; the shards come from "
                                       f"different id assignments. Regenerate the shard directory")
            seen[name] = fname
        entry: dict[str, Any] = {"index": i, "file": fname, "num_images": len(ids), "size": st.st_size,
                                 "mtime_ns": st.st_mtime_ns}
        if checksum:
            entry["sha256"] = digest
        entry["ids"] = ids
        shards.append(entry)
    if damaged:
        raise ShardFormatError(_damage_message(damaged))
    common = {k: (meta or {}).get(k) for k in ("dataset", "split", "class_names", "palette", "ignore_index",
                                               "config_hash", "git_sha", "checkpoint_hash", "extra")}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **common,
        "num_shards": int(num_shards),
        "num_images": sum(s["num_images"] for s in shards),
        "complete": not missing and not incomplete,
        "missing_shards": missing,
        "incomplete_shards": incomplete,
        "shards": shards,
    }


def _load_manifest(mpath: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest dict, None), or (None, why it cannot be used) for a missing, unreadable or non-manifest file."""
    if not mpath.is_file():
        return None, f"{mpath} does not exist"
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"{mpath} is unreadable ({e})"
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("shards"), list):
        return None, f"{mpath} is not a {FORMAT_NAME} manifest"
    return data, None


def _foreign_manifest(mpath: Path) -> dict[str, Any] | None:
    """A readable JSON object of another format in ``mpath`` (to be refused by name), else None."""
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "format" in data and data["format"] != FORMAT_NAME else None


def shard_inputs(manifest: dict[str, Any] | None) -> dict[str, str | None]:
    """``{shard file: sha256}`` of a manifest: the input record that metrics files keep."""
    return {s["file"]: s.get("sha256") for s in (manifest or {}).get("shards", []) if isinstance(s, dict)}


def _save_manifest(mpath: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(mpath, json.dumps(manifest, indent=1) + "\n")


def write_manifest(out_dir: str | os.PathLike, num_shards: int, *, verify: bool = False) -> dict[str, Any]:
    """(Re)build ``manifest.json`` in ``out_dir`` from the finished shards.

    The manifest holds the format name and version, dataset, split, class names, palette, ignore index,
    config hash, git SHA and checkpoint hash; per finished shard its file, image count, size, sha256 and ids;
    the total image count; and which shards are missing or still partial (``complete`` is true only when
    none are). It is derived data: a missing or unreadable previous manifest is simply rebuilt.

    Every shard's sha256 is checked against the one its writer recorded (``<shard>.sha256``), so a shard
    damaged after it was written is never listed as valid. Checksums of shards unchanged since the previous
    manifest (same size and mtime) are reused unless ``verify``.

    Args:
        out_dir: shard directory.
        num_shards: number of shards the dump was split into.
        verify: hash every shard, even those whose size and mtime did not change.

    Returns:
        The manifest dict (as written).

    Raises:
        FileNotFoundError: ``out_dir`` does not exist.
        ShardFormatError: a finished shard is unreadable, damaged (checksum), or from another format, or
            shards disagree on dataset/classes/hashes. The previous manifest is then left as it was.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"shard directory {out_dir} does not exist; run the pseudo-mask dump first")
    check_num_shards(num_shards)
    mpath = out_dir / MANIFEST_NAME
    previous, why = _load_manifest(mpath)
    if previous is None and mpath.is_file():
        _logger.warning("%s; rebuilding it from the shard files", why)
    manifest = _collect(out_dir, int(num_shards), checksum=True, previous=previous, verify=verify)
    _save_manifest(mpath, manifest)
    if not manifest["complete"]:
        _logger.warning("%s: %d/%d shards finished; missing %s, unfinished %s", mpath, len(manifest["shards"]),
                        num_shards, manifest["missing_shards"], manifest["incomplete_shards"])
    else:
        _logger.info("wrote %s: %d images in %d shards", mpath, manifest["num_images"], num_shards)
    return manifest


def _manifest_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a stored manifest and the one rebuilt from the files (empty: up to date)."""
    before = {s.get("file"): s for s in old.get("shards", []) if isinstance(s, dict)}
    after = {s["file"]: s for s in new["shards"]}
    out = [f"{f} is listed but gone" for f in sorted(set(before) - set(after))]
    out += [f"{f} is finished but not listed" for f in sorted(set(after) - set(before))]
    out += [f"{f} changed" for f in sorted(set(before) & set(after)) if before[f] != after[f]]
    if not out and json.loads(json.dumps(new)) != old:
        out.append("its summary differs from the shard files")
    return out


def verify_shards(out_dir: str | os.PathLike, num_shards: int | None = None, *,
                  quick: bool = False) -> dict[str, Any]:
    """Check ``manifest.json`` against the shard files, rebuild it when it is stale, and check checksums.

    Run when a stage starts (and by ``python -m stage1_cam.io.verify``). The manifest is rebuilt from the
    finished shards when it is missing, unreadable, or lists files that are gone, changed, or not all of the
    finished ones (e.g. after a damaged shard was deleted). Every shard is hashed and compared with the
    sha256 recorded when it was written; ``quick`` hashes only the shards whose size or mtime changed since
    the manifest (it misses a change that kept both, which the default does not).

    Args:
        out_dir: shard directory.
        num_shards: the dump's number of shards (default: the manifest's, else the shard files').

    Returns:
        The up-to-date manifest (``complete`` says whether every shard is finished).

    Raises:
        FileNotFoundError: ``out_dir`` does not exist, or holds neither a manifest nor shards.
        ShardFormatError: damaged shards (each named, with the fix), or shards that cannot be one set.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"shard directory {out_dir} does not exist; run the pseudo-mask dump first "
                                f"(make pseudo-labels)")
    mpath = out_dir / MANIFEST_NAME
    previous, why = _load_manifest(mpath)
    if num_shards is None:
        counts = _shard_counts_in(out_dir)
        if previous is not None and isinstance(previous.get("num_shards"), int):
            counts = {previous["num_shards"]}
        if len(counts) != 1:
            raise (FileNotFoundError if not counts else ShardFormatError)(
                f"{out_dir} holds {'no pseudo-mask shards' if not counts else f'shards of {sorted(counts)}-way splits'}"
                f"; {'run the pseudo-mask dump first' if not counts else 'keep one split'}")
        num_shards = counts.pop()
    check_num_shards(num_shards)
    manifest = _collect(out_dir, int(num_shards), checksum=True, previous=previous, verify=not quick)
    changes = [why] if previous is None else _manifest_changes(previous, manifest)
    if changes:
        _logger.warning("rebuilding %s from the shard files: %s", mpath, "; ".join(str(c) for c in changes))
        _save_manifest(mpath, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# reader


def _damaged_read(path: Path, name: str, what: str, err: object) -> str:
    return (f"{path}: cannot read {what} of image {name!r} ({err}); the shard file is damaged. Delete {path} and "
            f"re-run `make pseudo-labels` (or the dump for that shard) to regenerate it")


def user_message(err: BaseException) -> str:
    """The message of a shard error, also when a DataLoader worker re-raised it with its traceback inside."""
    return describe_error(err)


class ShardReader:
    """Random access to pseudo-masks by image id; fork-safe (each process opens the files it needs lazily).

    The index comes from ``manifest.json``; without one, the directory's finished shard files are scanned.

    Args:
        shard_dir: directory with the shards (and ``manifest.json``).
        expected_classes: if given, the class names the caller expects; a different list is refused.
        expected_dataset: if given, the dataset name the caller expects; another dataset is refused.
        allow_incomplete: read even if some shards are missing or unfinished (by default refused, so that
            a training run never silently uses a subset of the pseudo-masks).

    Raises:
        FileNotFoundError: ``shard_dir`` or a listed shard file does not exist.
        ShardFormatError: another format version, dataset or class list, an incomplete shard set, or files
            that changed since the manifest was written.
    """

    def __init__(self, shard_dir: str | os.PathLike, *, expected_classes: Sequence[str] | None = None,
                 expected_dataset: str | None = None, allow_incomplete: bool = False) -> None:
        self.shard_dir = Path(shard_dir)
        if not self.shard_dir.is_dir():
            raise FileNotFoundError(f"shard directory {self.shard_dir} does not exist; run the pseudo-mask dump "
                                    f"first (make pseudo-labels)")
        mpath = self.shard_dir / MANIFEST_NAME
        meta, why = _load_manifest(mpath)
        if meta is None and mpath.is_file():
            meta = _foreign_manifest(mpath)  # refused below, with the reason
        if meta is not None:
            source = str(mpath)
            self._from_manifest = True
        else:
            if mpath.is_file():  # the manifest is derived data: read the shards themselves
                _logger.warning("%s; reading the shard files instead (rebuild it with python -m "
                                "stage1_cam.io.verify %s)", why, self.shard_dir)
            counts = _shard_counts_in(self.shard_dir)
            if not counts:
                raise FileNotFoundError(f"{self.shard_dir} holds no pseudo-mask shards (shard-*-of-*.h5); run the "
                                        f"pseudo-mask dump first")
            if len(counts) > 1:
                raise ShardFormatError(f"{self.shard_dir} mixes shards of {sorted(counts)}-way splits; keep one")
            if not mpath.is_file():
                _logger.warning("%s has no %s; scanning the shard files", self.shard_dir, MANIFEST_NAME)
            meta = _collect(self.shard_dir, counts.pop(), checksum=False, previous=None)
            source = str(self.shard_dir)
            self._from_manifest = False
        if not isinstance(meta, dict):
            raise ShardFormatError(f"{source} is not a pseudo-mask manifest")
        _check_format(meta, source)
        self.meta: dict[str, Any] = meta
        if not meta.get("complete", False):
            msg = (f"{source}: the shard set is incomplete (missing shards {meta.get('missing_shards')}, "
                   f"unfinished {meta.get('incomplete_shards')} of {meta.get('num_shards')})")
            if not allow_incomplete:
                raise ShardFormatError(msg + "; resume the dump to finish them and rebuild the manifest, or pass "
                                             "allow_incomplete=True to read the finished ones only")
            if not meta.get("shards"):  # nothing to read: not "dataset None" further down
                raise FileNotFoundError(f"{self.shard_dir} holds no finished pseudo-mask shards (0 of "
                                        f"{meta.get('num_shards')}); run the pseudo-mask dump first, or point to the "
                                        f"shard directory of a run that has them")
            _logger.warning(msg + "; reading the finished shards only")
        if expected_dataset is not None and meta.get("dataset") != expected_dataset:
            raise ShardFormatError(f"{source} holds pseudo-masks of dataset {meta.get('dataset')!r}, not "
                                   f"{expected_dataset!r}; point to the shard directory of the right run")
        if expected_classes is not None:
            want, have = [str(c) for c in expected_classes], list(meta.get("class_names") or [])
            if want != have:
                diff = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
                raise ShardFormatError(
                    f"{source} has {len(have)} classes {_short(have, 80)}, but {len(want)} are expected; they first "
                    f"differ at index {diff} ({_short(have[diff:diff + 1])} vs {_short(want[diff:diff + 1])}). "
                    f"Use shards dumped for this class list, or fix the class names in the config")
        self._shards: list[dict[str, Any]] = list(meta.get("shards", []))
        self._index: dict[str, tuple[int, str]] = {}
        ids: list[str] = []
        for pos, s in enumerate(self._shards):
            path = self.shard_dir / s["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {source} but does not exist; restore it, or re-run the "
                                        f"dump for that shard and rebuild the manifest (write_manifest)")
            if self._from_manifest and "size" in s and path.stat().st_size != s["size"]:
                raise ShardFormatError(f"{path} has {path.stat().st_size} bytes but the manifest recorded "
                                       f"{s['size']}: the file was truncated or replaced. Re-run the dump for that "
                                       f"shard (delete it first) and rebuild the manifest (write_manifest)")
            for name in s.get("ids", []):
                if name in self._index:
                    raise ShardFormatError(f"{source} lists image {name!r} in two shards; rebuild the manifest")
                self._index[name] = (pos, _key(name))
                ids.append(name)
        self.ids: list[str] = ids
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    # -- files -------------------------------------------------------------------------------------------

    def _file(self, pos: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked (DataLoader worker): never use the parent's HDF5 handles
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(pos)
        if f is None:
            path = self.shard_dir / self._shards[pos]["file"]
            f = _open_h5(path, "r", partial=False)
            try:
                found = _meta_from_attrs(f.attrs, path)
                bad = _meta_mismatches(found, self.meta)
                if bad:
                    raise ShardFormatError(f"{path} does not match {self.shard_dir / MANIFEST_NAME} "
                                           f"({'; '.join(bad)}); it changed after the manifest was written. "
                                           f"Rebuild the manifest (write_manifest)")
            except BaseException:
                f.close()
                raise
            self._files[pos] = f
        return f

    def _group(self, name: str) -> tuple[h5py.Group, Path]:
        try:
            pos, key = self._index[name]
        except KeyError:
            raise KeyError(f"image id {name!r} is not in the pseudo-mask shards at {self.shard_dir} "
                           f"({len(self.ids)} images of dataset {self.meta.get('dataset')!r}, split "
                           f"{self.meta.get('split')!r})") from None
        f = self._file(pos)
        path = self.shard_dir / self._shards[pos]["file"]
        try:
            return f[_IMAGES][key], path
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            raise ShardFormatError(_damaged_read(path, name, "the image's group", e)) from None

    def _read(self, name: str, dset: str) -> np.ndarray | None:
        g, path = self._group(name)
        try:
            if dset not in g:
                return None
            return g[dset][()]
        except (KeyError, OSError, RuntimeError, ValueError) as e:  # fletcher32 mismatch, bad object header, ...
            raise ShardFormatError(_damaged_read(path, name, repr(dset), e)) from None

    # -- public API ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta.get("class_names") or ())

    @property
    def ignore_index(self) -> int:
        return int(self.meta.get("ignore_index", IGNORE_INDEX))

    def label(self, name: str) -> np.ndarray:
        """(H, W) uint8 label map of image ``name`` (``ignore_index`` = ignore)."""
        out = self._read(name, "label")
        assert out is not None
        out = out.astype(np.uint8, copy=False)
        # Shards written before per-chunk checksums can decode damaged bytes into labels: refuse impossible ones.
        counts = np.bincount(out.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        bad = np.flatnonzero(counts[len(self.class_names):]) + len(self.class_names)
        if bad.size and self.class_names:
            pos = self._index[name][0]
            raise ShardFormatError(_damaged_read(self.shard_dir / self._shards[pos]["file"], name, "'label'",
                                                 f"values {bad.tolist()[:5]} are not class ids"))
        return out

    def confidence(self, name: str) -> np.ndarray:
        """(H, W) float32 confidence map of image ``name``."""
        out = self._read(name, "confidence")
        assert out is not None
        return out.astype(np.float32)

    def image_labels(self, name: str) -> np.ndarray:
        """(L,) int64 image-level class ids of image ``name``."""
        out = self._read(name, "image_labels")
        assert out is not None
        return out.astype(np.int64, copy=False)

    def probs(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """((K, H, W) float16 probabilities, (K,) int64 class ids), or None if none were stored."""
        p = self._read(name, "probs")
        if p is None:
            return None
        keys = self._read(name, "prob_keys")
        assert keys is not None
        return p, keys.astype(np.int64, copy=False)

    def read(self, name: str) -> dict[str, Any]:
        """All stored fields of one image: ``label``, ``confidence``, ``image_labels``, ``probs`` (or None)."""
        return {"name": name, "label": self.label(name), "confidence": self.confidence(name),
                "image_labels": self.image_labels(name), "probs": self.probs(name)}

    def verify(self, *, quick: bool = False) -> None:
        """Check every listed shard file: present, of the recorded size, and with the sha256 recorded in the
        manifest and by its writer (``<shard>.sha256``). Reads all bytes, once per call.

        Args:
            quick: skip hashing the files whose size and mtime equal the manifest's.

        Raises:
            ShardFormatError: the files that differ, all named in one message with the fix.
        """
        problems, stale = [], []
        for s in self._shards:
            path = self.shard_dir / s["file"]
            if not path.is_file():
                stale.append(f"{path} is listed but does not exist")
                continue
            st = path.stat()
            if "size" in s and st.st_size != s["size"]:
                problems.append(f"{path} ({st.st_size} bytes, {s['size']} when listed)")
                continue
            if quick and s.get("mtime_ns") == st.st_mtime_ns:
                continue
            digest, written, listed = file_sha256(path), _read_checksum(path), s.get("sha256")
            if (written or listed) is None:
                problems.append(f"{path} (no sha256 recorded for it)")
            elif digest != (written or listed):
                problems.append(f"{path} (sha256 {digest[:16]}..., but {(written or listed)[:16]}... when written)")
            elif listed is not None and listed != digest:
                stale.append(f"{path} was re-dumped after the manifest was written")
        if problems:
            raise ShardFormatError(_damage_message(problems))
        if stale:
            raise ShardFormatError(f"{self.shard_dir / MANIFEST_NAME} is out of date ({'; '.join(stale)}); rebuild "
                                   f"it with `python -m stage1_cam.io.verify {self.shard_dir}` (or re-run "
                                   f"`make pseudo-labels`, which also dumps missing shards)")

    def close(self) -> None:
        """Close the files this process opened."""
        if os.getpid() == getattr(self, "_pid", None):
            for f in self._files.values():
                try:
                    f.close()
                except Exception:  # pragma: no cover
                    pass
        self._files = {}

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"ShardReader({str(self.shard_dir)!r}, dataset={self.meta.get('dataset')!r}, "
                f"split={self.meta.get('split')!r}, images={len(self.ids)}, shards={len(self._shards)})")
