"""Prepare a dataset: generate the synthetic one, or check VOC/COCO; then log a summary.

Usage::

    python -m stage1_cam.data --config configs/stage1/synthetic.py
    python -m stage1_cam.data --dataset voc [--root path/to/VOC2012]

Opening every split also derives and caches the image-level labels, so training starts without
re-reading masks. Exit code 2 (and no traceback) when the dataset is missing or invalid.
"""

from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from ..config import default_config, load_config
from ..utils.cli import exit_on_user_error
from ..utils.logging import setup_logging
from .datasets import DATASET_DIRS, SegDataset, available_splits, check_layout, resolve_root
from .synthetic import generate_synthetic

_logger = logging.getLogger(__name__)


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stage1_cam.data", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="stage-1 config file (uses data.dataset, data.root, data.synthetic)")
    parser.add_argument("--dataset", choices=sorted(DATASET_DIRS), help="dataset name (overrides the config)")
    parser.add_argument("--root", help="dataset folder (overrides data.root; default $WSSS_DATA_ROOT/<name>)")
    args = parser.parse_args(argv)
    if args.config is None and args.dataset is None:
        parser.error("give --config FILE or --dataset NAME")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns 0 on success, 2 when the dataset is missing, incomplete or invalid."""
    args = _parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config) if args.config else default_config()
        dataset = args.dataset or cfg.data.dataset
        root = resolve_root(dataset, args.root if args.root is not None else cfg.data.root)
        if dataset == "synthetic":
            syn = cfg.data.synthetic
            generate_synthetic(root, num_train=syn.num_train, num_val=syn.num_val,
                               image_size=tuple(syn.image_size), max_objects=syn.max_objects, seed=syn.seed)
        check_layout(dataset, root)
        splits = {s: SegDataset(root=root, dataset=dataset, split=s) for s in available_splits(dataset, root)}
    except Exception as err:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        where = args.root if args.root is not None else "data.root"
        return exit_on_user_error(err, _logger, output=("--root", str(where)))
    first = next(iter(splits.values()), None)
    classes = first.class_names if first is not None else ()
    _logger.info("%s at %s: %d classes (%s)", dataset, root, len(classes), ", ".join(classes))
    for name, ds in splits.items():
        no_fg = sum(1 for n in ds.names if ds.image_labels(n).size == 0)
        _logger.info("  split %-10s %6d images, %d without foreground label, ground truth: %s",
                     name, len(ds), no_fg, "yes" if ds.has_gt else "no")
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.data.__main__ import main as package_main

    raise SystemExit(package_main())
