"""A map-style dataset over a ShardReader's label maps, for the DataLoader tests (workers share the reader)."""

from __future__ import annotations

import os
from typing import Any, Tuple

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
