"""``LoadPseudoMaskFromShards``: the mmseg pipeline step that reads a pseudo-mask from the HDF5 shards.

It plays the part of mmseg's ``LoadAnnotations`` for :class:`stage2_seg.datasets.PseudoMaskSegDataset`:
place it right after ``LoadImageFromFile`` (masks are stored at the original image resolution).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS

from stage1_cam.io.shards import ShardReader

from .datasets import open_shards

_logger = logging.getLogger(__name__)

# One reader per (shard directory, process): DataLoader workers never share the parent's HDF5 handles.
_READERS: Dict[Tuple[str, int], ShardReader] = {}


def shard_reader(shard_dir: str) -> ShardReader:
    """The calling process's lazily opened reader of ``shard_dir`` (cached by ``(abs path, pid)``).

    Raises:
        FileNotFoundError: the directory has no ``manifest.json``.
    """
    pid = os.getpid()
    key = (os.path.abspath(shard_dir), pid)
    reader = _READERS.get(key)
    if reader is None:
        # Entries inherited through fork belong to the parent; forget them (the parent closes its own files).
        for stale in [k for k in _READERS if k[1] != pid]:
            del _READERS[stale]
        reader = open_shards(shard_dir)
        _READERS[key] = reader
    return reader


@TRANSFORMS.register_module()
class LoadPseudoMaskFromShards(BaseTransform):
    """Fill ``gt_seg_map`` with the stored pseudo-mask of ``results['sample_id']``.

    Required keys: ``sample_id``, ``img`` (loaded, not yet resized), and ``shard_dir`` unless given here.
    Added keys: ``gt_seg_map`` (H, W) uint8 with ``ignore_index`` (255) = ignore; ``seg_fields`` gains
    ``'gt_seg_map'``.

    Args:
        shard_dir: shard directory; by default the one the dataset put into each sample.

    Raises (when called):
        KeyError: the sample has no ``sample_id``/``img``, or the id is not in the shards.
        ValueError: the stored mask's size differs from the image's.
    """

    def __init__(self, *, shard_dir: Optional[str] = None) -> None:
        super().__init__()
        self.shard_dir = shard_dir

    def transform(self, results: dict) -> dict:
        """Add the pseudo-mask of one sample; see the class docstring."""
        shard_dir = self.shard_dir or results.get("shard_dir")
        if not shard_dir:
            raise KeyError("LoadPseudoMaskFromShards needs a shard directory: use PseudoMaskSegDataset (it adds "
                           "'shard_dir' to every sample) or pass shard_dir=... to the transform")
        if "sample_id" not in results:
            raise KeyError(f"LoadPseudoMaskFromShards needs 'sample_id' in the sample (got keys {sorted(results)}); "
                           f"use PseudoMaskSegDataset")
        if "img" not in results:
            raise KeyError("LoadPseudoMaskFromShards must come after LoadImageFromFile in the pipeline")
        sample_id = results["sample_id"]
        label = shard_reader(shard_dir).label(sample_id)  # (H, W) uint8
        img_hw = tuple(results["img"].shape[:2])
        if label.shape != img_hw:
            raise ValueError(f"pseudo-mask of {sample_id!r} in {shard_dir} is {label.shape[0]}x{label.shape[1]} but "
                             f"the image {results.get('img_path')} is {img_hw[0]}x{img_hw[1]}; place "
                             f"LoadPseudoMaskFromShards before any resize, or re-dump the pseudo-masks for these "
                             f"images")
        label_map = results.get("label_map")
        if label_map:
            mapped = label.copy()
            for old_id, new_id in label_map.items():
                mapped[label == old_id] = new_id
            label = mapped
        results["gt_seg_map"] = np.ascontiguousarray(label, dtype=np.uint8)
        results.setdefault("seg_fields", []).append("gt_seg_map")
        return results

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(shard_dir={self.shard_dir!r})"
