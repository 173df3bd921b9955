"""Small file helpers shared by the checkpoint and shard code."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
