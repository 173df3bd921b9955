"""A map-style dataset over a ShardReader's label maps, for the DataLoader tests (workers share the reader)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Tuple

from stage1_cam.io import ShardReader


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
