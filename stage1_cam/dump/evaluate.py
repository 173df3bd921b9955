"""Scores of dumped shards against ground truth (``--evaluate``; ``metrics.json`` in the shard directory)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from ..constants import IGNORE_INDEX
from ..io import ShardReader
from ..io.shards import shard_inputs
from ..metrics import ConfusionMatrix, json_safe
from ..utils.cli import BadInputError
from ..utils.logging import utc_timestamp
from .postprocess import decode_probs

_logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"


def evaluate_shards(shard_dir: Path, dataset: Any) -> Dict[str, Any]:
    """Confusion-matrix metrics of the dumped masks against ground truth, where it exists.

    Images of ``dataset`` that are in the shards and have a ground-truth mask are scored (pixels whose ground
    truth is 255 are skipped).

    Args:
        shard_dir: directory with the shards (and manifest).
        dataset: a :class:`~stage1_cam.data.SegDataset` (``names``, ``load_gt``, ``class_names``).

    Returns:
        JSON-safe dict with ``dataset``, ``split``, ``images`` (scored), ``complete`` (all shards present),
        the hashes, ``computed_at`` (UTC), ``inputs`` (``{"shards": {file: sha256}}``), ``miou`` (of the masks
        as written) and :meth:`ConfusionMatrix.compute` results:

        * ``final``: the masks as written; ignored (255) pixels count as misses;
        * ``final_confident``: the masks as written, scored on their non-ignored pixels only;
        * ``no_crf``: argmax of the stored probabilities (only when they were stored), i.e. the masks
          without CRF or threshold.

    Raises:
        FileNotFoundError: no shards in ``shard_dir``.
        ShardFormatError: the shards hold another dataset or class list, or are damaged (checksums).
        ValueError: a mask's size differs from its ground truth.
    """
    reader = ShardReader(shard_dir, expected_classes=dataset.class_names, expected_dataset=dataset.dataset,
                         allow_incomplete=True)
    reader.verify()  # every shard's sha256, once: figures are never computed from damaged or changed shards
    k, ignore = len(dataset.class_names), reader.ignore_index
    cms = {key: ConfusionMatrix(k, ignore_index=IGNORE_INDEX) for key in ("final", "final_confident", "no_crf")}
    n = n_probs = 0
    for name in dataset.names:
        if name not in reader:
            continue
        gt = dataset.load_gt(name)
        if gt is None:
            continue
        pred = reader.label(name)
        if pred.shape != gt.shape:
            raise BadInputError(f"pseudo-mask of {name!r} in {shard_dir} is {pred.shape} but its ground truth is "
                                f"{gt.shape}; the shards belong to another copy of the dataset")
        cms["final"].update(pred, gt)
        gt_conf = gt.copy()
        gt_conf[pred == ignore] = IGNORE_INDEX
        cms["final_confident"].update(pred, gt_conf)
        stored = reader.probs(name)
        if stored is not None:
            cms["no_crf"].update(decode_probs(*stored)[0], gt)
            n_probs += 1
        n += 1
    reader.close()
    if n == 0:
        _logger.warning("no image of %s split %r with ground truth is in %s; nothing evaluated", dataset.dataset,
                        dataset.split, shard_dir)
    names = list(dataset.class_names)
    meta = reader.meta
    out: Dict[str, Any] = {
        "dataset": dataset.dataset, "split": dataset.split, "shard_dir": str(shard_dir), "images": n,
        "complete": bool(meta.get("complete", False)), "config_hash": meta.get("config_hash"),
        "checkpoint_hash": meta.get("checkpoint_hash"), "git_sha": meta.get("git_sha"),
        "dump_settings": meta.get("extra"),
        # What these figures were computed from, and when: the report flags them once the shards change.
        "computed_at": utc_timestamp(),
        "inputs": {"shards": shard_inputs(meta)},
    }
    results = {key: cm.compute(names) for key, cm in cms.items()}
    out["miou"] = results["final"]["miou"]
    out["final"], out["final_confident"] = results["final"], results["final_confident"]
    out["per_class"] = results["final"]["per_class"]
    out["class_names"] = names
    out["confusion"] = cms["final"].matrix.tolist()  # (C, C): rows ground truth, columns pseudo-mask label
    if n_probs == n and n > 0:
        out["no_crf"] = results["no_crf"]
    return json_safe(out)
