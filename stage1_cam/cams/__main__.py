"""``python -m stage1_cam.cams CONFIG``: initial CAMs for a split, stored in HDF5 shards, and their evaluation.

For every image of ``data.eval_split`` with image-level labels: CAM source (``cam.source``) on the
image resized to a multiple of the patch size, affinity refinement (mean of the last ``cam.attn_layers``
attention maps, Sinkhorn, box masks; CLIP-ES), per-class min-max and bilinear resize to the original
size. The refined CAMs are stored as float16 present-class maps with their class ids in a shard set
(``runs/<dataset>/<run>/cams/``); the label map stored next to them uses background (1 - max)^bg_exponent.
Re-running skips finished images. Images without any foreground label are skipped with one counted warning.

Evaluation against ground truth: mIoU for background exponents 1 and 2 and for a sweep of constant
background scores, printed as a table and saved to ``cams/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import config_hash, load_config
from ..data import build_dataset
from ..data.class_names import voc_palette
from ..io.shards import ShardMeta, ShardReader, ShardWriter, write_manifest
from ..metrics import ConfusionMatrix
from ..utils.cli import add_config_args, config_overrides, exit_on_user_error
from ..utils.dist import DistInfo, device_for, init_distributed, shutdown_distributed
from ..utils.precision import autocast_dtype, precision_name
from ..utils.logging import EveryN, setup_logging
from ..utils.run_dir import RunDir, git_sha
# network_size, refined_cams: re-exported (callers of this module used them from here)
from .initial import InitialCams, labels_from_cams, network_size, refined_cams, with_background  # noqa: F401

_logger = logging.getLogger(__name__)

BG_CONSTANTS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def evaluate_cams(shard_dir: Path, dataset) -> Dict[str, object]:
    """mIoU of stored CAMs for bg exponents 1, 2 and constant bg scores; returns the table."""
    reader = ShardReader(shard_dir)
    settings = [("exp", 1.0), ("exp", 2.0)] + [("const", c) for c in BG_CONSTANTS]
    cms = {s: ConfusionMatrix(dataset.num_classes) for s in settings}
    for name in reader.ids:
        gt = dataset.load_gt(name)
        probs = reader.probs(name)
        if gt is None or probs is None:
            continue
        cams, keys = probs
        for s in settings:
            cms[s].update(labels_from_cams(cams, keys, bg=s[0], value=s[1]), gt)
    reader.close()
    results = {(f"bg=(1-max)^{v:g}" if k == "exp" else f"bg={v:g}"): cms[(k, v)].compute() for k, v in settings}
    table = {k: r["miou"] for k, r in results.items()}
    best = max(table, key=lambda k: -1 if table[k] is None else table[k])
    # table: MMSegmentation's mIoU; table_gt / table_fwiou: CLIP-ES's eval_cam.py definitions (stage1_cam.metrics)
    return {"split": dataset.split, "table": table, "best": best,
            "table_gt": {k: r["miou_gt"] for k, r in results.items()},
            "table_fwiou": {k: r["fwiou"] for k, r in results.items()},
            "per_class_best": cms[settings[list(table).index(best)]].compute(list(dataset.class_names))["per_class"]}


def run_cams(cfg, run_dir: RunDir, device: torch.device) -> Path:
    """Compute (or resume) the CAM shard for ``cfg.data.eval_split``; returns the shard directory."""
    ds = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.eval_split)
    out = run_dir.cams_dir
    meta = ShardMeta(dataset=cfg.data.dataset, split=ds.split, class_names=ds.class_names,
                     palette=voc_palette(256), config_hash=config_hash(cfg, ("data", "clip", "cam")),
                     git_sha=git_sha(), extra={"kind": "initial-cam", "cam_source": cfg.cam.source,
                                               "precision": precision_name(autocast_dtype(cfg.train.amp, device))})
    initial = InitialCams.from_config(cfg, device)
    # A progress point every dump.flush_every images (not a flush per image): a kill recomputes at most those.
    with ShardWriter(out, 0, 1, meta=meta, flush_every=cfg.dump.flush_every) as writer:
        todo = [n for n in ds.names if n not in writer.done_ids]
        skipped, t0, every = 0, time.time(), EveryN(seconds=30)
        _logger.info("CAMs (%s) for %d images of %s/%s (%d already done)", cfg.cam.source, len(todo),
                     cfg.data.dataset, ds.split, len(ds.names) - len(todo))
        for i, name in enumerate(todo):
            labels = ds.image_labels(name)
            if len(labels) == 0:
                skipped += 1
                continue
            maps, keys = initial(ds.load_image(name), labels)
            label = labels_from_cams(maps, keys, bg="exp", value=cfg.cam.bg_exponent)
            full = with_background(maps, cfg.cam.bg_exponent)
            conf = full.max(0) / np.maximum(full.sum(0), 1e-7)
            writer.write(name, label=label, confidence=conf, image_labels=keys.tolist(),
                         probs=maps.astype(np.float16), prob_keys=keys.tolist())
            if every(i):
                _logger.info("%d/%d images, %.2f images/s", i + 1, len(todo), (i + 1) / (time.time() - t0))
        if skipped:
            _logger.warning("%d image(s) without any foreground label were skipped", skipped)
        writer.finalize()
    write_manifest(out, 1)
    return out


def format_table(result: Dict[str, object]) -> str:
    rows = [f"{'background':<20} {'mIoU':>6}"] + [
        f"{k:<20} {('%.1f' % (100 * v)) if v is not None else 'n/a':>6}" for k, v in result["table"].items()]
    return "\n".join(rows + [f"best: {result['best']}"])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stage1_cam.cams", description=__doc__.splitlines()[0])
    add_config_args(p)
    args = p.parse_args(argv)
    setup_logging()
    dist = DistInfo()  # replaced by init_distributed's once the config is valid
    ok = False  # a good run: every rank meets at the barrier before the process group goes (as in train.main)
    try:
        cfg = load_config(args.config, config_overrides(args))
        run_dir = RunDir.from_config(cfg).prepare(cfg, overwrite=args.overwrite, seed=cfg.run.seed)
        dist = init_distributed()
        device = device_for(dist)
        torch.manual_seed(cfg.run.seed)
        out = run_cams(cfg, run_dir, device)
        ds = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.eval_split)
        if not ds.has_gt:
            _logger.warning("split %s has no ground truth: CAMs written to %s, no evaluation", ds.split, out)
            ok = True
            return 0
        result = evaluate_cams(out, ds)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print(format_table(result))
        _logger.info("CAMs in %s, metrics in %s", out, out / "metrics.json")
        ok = True
        return 0
    except Exception as e:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        return exit_on_user_error(e, _logger)
    finally:
        if dist.enabled:  # launched with several processes: tear the group down so that every rank exits 0
            shutdown_distributed(ok)


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.cams.__main__ import main as package_main

    raise SystemExit(package_main())
