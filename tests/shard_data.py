"""A map-style dataset over a ShardReader's label maps, for the DataLoader tests (workers share the reader)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Set, Tuple

import h5py
import torch

from stage1_cam.io import ShardReader


def file_contents(path: Path) -> dict:
    """Everything stored in one shard file, in group order: the file's attributes, and per image group its
    attributes and each dataset's dtype, compression, chunk shape and values (for equality checks)."""
    def val(v: Any) -> Any:
        return v.tolist() if hasattr(v, "tolist") else v

    with h5py.File(path, "r") as f:
        out = {"attrs": {k: val(v) for k, v in f.attrs.items()}, "images": []}
        for key, g in f["images"].items():
            out["images"].append((key, {k: val(v) for k, v in g.attrs.items()},
                                  {k: (d.dtype.str, d.compression, d.chunks, d[()].tolist()) for k, d in g.items()}))
    return out


def count_flushes(monkeypatch: Any) -> list:
    """Record every ``h5py.File.flush`` call from here on (one item each) in the returned list."""
    calls: list = []
    real = h5py.File.flush
    monkeypatch.setattr(h5py.File, "flush", lambda self: (calls.append(1), real(self))[1])
    return calls


class LabelDataset:
    """Item ``i``: (image name, pid of the process that read it, its label map)."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> Tuple[str, int, Any]:
        name = self.reader.ids[i]
        return name, os.getpid(), self.reader.label(name)


def interrupt_then_resume(main: Callable[[List[str]], int], argv: List[str], out: Path, monkeypatch: Any, *,
                          after: int = 4, shard: str = "") -> None:
    """Run ``main(argv)`` with ``ShardWriter.write`` failing at image ``after + 1`` (a simulated kill: the shard
    stays ``.partial``), then run it again to the end (which must resume and succeed)."""
    import pytest

    from stage1_cam.io import ShardWriter

    real_write, calls = ShardWriter.write, []

    def failing_write(self: Any, name: str, **kw: Any) -> Any:
        if len(calls) == after:
            raise RuntimeError("simulated kill")
        calls.append(name)
        return real_write(self, name, **kw)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(argv)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    if shard:
        assert (out / (shard + ".partial")).is_file() and not (out / shard).exists()
    assert main(argv) == 0


# A dump run in a child process that SIGKILLs itself: at the write of image ``after + 1`` (mode "write"), or in the
# middle of progress point ``after + 1``, between its two flushes (mode "progress").
_KILLED_CHILD = """
import os, signal, sys
from stage1_cam.io import ShardWriter

mode, after, module, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
if mode == "write":
    real, calls = ShardWriter.write, []

    def write(self, name, **kw):
        if len(calls) == after:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(name)
        return real(self, name, **kw)

    ShardWriter.write = write
else:
    real_flush, points = ShardWriter.progress_point, []

    def progress_point(self):
        if self._pending and len(points) == after:
            self._file.flush()  # the first of the two flushes; the groups are not marked complete yet
            os.kill(os.getpid(), signal.SIGKILL)
        if self._pending:
            points.append(len(self._pending))
        return real_flush(self)

    ShardWriter.progress_point = progress_point
import importlib
sys.exit(importlib.import_module(module).main(argv))
"""


def kill_then_resume(module: str, argv: List[str], out: Path, *, after: int, mode: str = "write",
                     shard: str = "", resume: Optional[Callable[[List[str]], int]] = None) -> Set[str]:
    """Run ``python -m module argv`` in a child process killed with SIGKILL (see ``_KILLED_CHILD``), then resume it
    in-process with ``resume(argv)`` (which must succeed). Returns the image ids the partial shard ``shard`` held
    as complete after the kill (empty without ``shard``)."""
    import subprocess
    import sys

    import h5py

    repo = Path(__file__).resolve().parents[1]
    # The child computes with this process's thread count: another count splits the float sums differently, and the
    # images it kept would differ in their last bits from those an uninterrupted run here computes.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", _KILLED_CHILD, mode, str(after), module, *argv], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    kept: Set[str] = set()
    if shard:
        partial = out / (shard + ".partial")
        assert partial.is_file() and not (out / shard).exists()
        with h5py.File(partial, "r", locking=False) as f:
            for key in f["images"]:
                try:
                    g = f["images"][key]
                    if g.attrs.get("complete", False):
                        kept.add(str(g.attrs["name"]))
                except (KeyError, OSError, RuntimeError):  # a group the kill left unreadable: dropped on resume
                    pass
    if resume is not None:
        assert resume(argv) == 0
    return kept
