"""Export pseudo-mask shards to a folder of PNGs (MMSegmentation's usual annotation layout).

One ``<image id>.png`` per image: single-channel uint8 class ids (``ignore_index`` kept as is), or, with
``color=True``, palette-mode PNGs whose indices are the same class ids and whose palette is the manifest's.
Existing files are never overwritten: an identical file is left alone, a different one is an error.

Command line::

    python -m stage1_cam.io.export SHARD_DIR OUT_DIR [--color]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import Image

from ..utils.cli import parse_and_run
from ..utils.files import atomic_write
from .shards import ShardReader

_logger = logging.getLogger(__name__)


def _png_path(out_dir: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or any(part in ("", ".", "..") for part in rel.parts):
        raise ValueError(f"image id {name!r} cannot be used as a file name under {out_dir}")
    return out_dir.joinpath(*rel.parts[:-1], rel.parts[-1] + ".png")


def _palette_bytes(palette: Sequence[Sequence[int]]) -> list[int]:
    flat = [int(v) for rgb in list(palette)[:256] for v in rgb]
    return flat + [0] * (768 - len(flat))


def _same_png(path: Path, label: np.ndarray, palette: list[int] | None) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
            if (im.mode == "P") != (palette is not None) or im.mode not in ("P", "L"):
                return False
            if palette is not None:
                old = im.getpalette() or []
                if old + [0] * (768 - len(old)) != palette:
                    return False
            arr = np.asarray(im)
    except OSError:
        return False
    return arr.shape == label.shape and bool(np.array_equal(arr, label))


def export_png(shard_dir: str | os.PathLike, out_dir: str | os.PathLike, *, color: bool = False) -> int:
    """Write one PNG per image of a shard directory.

    Args:
        shard_dir: directory with finished shards and ``manifest.json``.
        out_dir: destination folder (created if missing); ``<id>.png`` per image.
        color: write palette-mode PNGs with the manifest's palette instead of plain uint8 label PNGs
            (pixel values are class ids either way).

    Returns:
        Number of images exported (files already present with identical content are counted too).

    Raises:
        FileExistsError: a destination file exists with different content (nothing is overwritten).
        ShardFormatError: the shards are unreadable or incomplete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = kept = 0
    with ShardReader(shard_dir) as reader:
        palette = _palette_bytes(reader.meta["palette"]) if color else None
        for name in reader.ids:
            label = reader.label(name)  # (H, W) uint8
            path = _png_path(out, name)
            if path.exists():
                if not _same_png(path, label, palette):
                    raise FileExistsError(f"{path} exists with different content; export to an empty folder or "
                                          f"delete the old PNGs first (nothing was overwritten)")
                kept += 1
                count += 1
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if palette is not None:  # indices = class ids, colours from the manifest
                im = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes())
                im.putpalette(palette)
            else:
                im = Image.fromarray(np.ascontiguousarray(label))  # (H, W) uint8 -> mode "L"
            with atomic_write(path) as tmp:
                im.save(tmp, format="PNG")
            count += 1
    _logger.info("exported %d label PNGs to %s (%d already present)", count, out, kept)
    return count


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m stage1_cam.io.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("shard_dir", type=Path, help="directory with the pseudo-mask shards and manifest.json")
    parser.add_argument("out_dir", type=Path, help="folder to write <image id>.png files into")
    parser.add_argument("--color", action="store_true", help="palette-mode PNGs with the dataset palette")
    return parse_and_run(parser, _export, argv, logger=_logger)


def _export(args: argparse.Namespace) -> int:
    n = export_png(args.shard_dir, args.out_dir, color=args.color)
    _logger.info("done: %d images", n)
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.io.export import main as package_main

    raise SystemExit(package_main())
