"""Train an MMSegmentation model on stage-1 pseudo-masks (thin wrapper over mmengine's ``Runner``).

Usage::

    python -m stage2_seg.train CONFIG --shards RUN/pseudo_masks [--work-dir DIR] [--data-root ROOT]
        [--launcher none|pytorch|slurm] [--resume [CHECKPOINT]] [--amp] [--no-pretrained]
        [--cfg-options key=value ...]

The shard directory goes into the ``PseudoMaskSegDataset`` of ``train_dataloader``; the dataset root into
every dataset of the train/val/test loaders. The root is, in order: ``--data-root``, then
``$WSSS_DATA_ROOT/<last folder of the config's data_root>`` (e.g. ``$WSSS_DATA_ROOT/VOC2012``), then the
config's ``data_root``. The work dir is ``--work-dir`` or ``<RUN>/stage2/<config name>``.

Exit codes: 0 done; 2 bad input found before training (missing manifest, dataset or pretrained weights,
unknown config key, damaged shards) or a pseudo-mask shard found damaged while training, with a message
saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
from typing import Any, Iterator, List, Optional

from stage1_cam.constants import ENV_DATA_ROOT
from stage1_cam.utils.cli import BadInputError, UnknownNameError, add_cfg_options, run_main
from stage1_cam.utils.dist import import_before_process_group, shutdown_distributed
from stage1_cam.utils.logging import setup_logging

from .checkpoint import safe_checkpoint_loading
from .datasets import require_manifest
from .pretrained import check_pretrained_available, disable_pretrained

_logger = logging.getLogger(__name__)

PSEUDO_DATASET_TYPES = ("PseudoMaskSegDataset",)
_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def _iter_datasets(node: Any) -> Iterator[Any]:
    """Every dataset config under a dataloader's ``dataset`` (through ``ConcatDataset``/``RepeatDataset``)."""
    if node is None:
        return
    if isinstance(node, (list, tuple)):
        for n in node:
            yield from _iter_datasets(n)
        return
    yield node
    if isinstance(node, dict):
        yield from _iter_datasets(node.get("dataset"))
        yield from _iter_datasets(node.get("datasets"))


def resolve_data_root(cfg: Any, data_root: Optional[str]) -> Optional[str]:
    """The dataset root to use: ``data_root`` > ``$WSSS_DATA_ROOT/<basename(cfg.data_root)>`` > config.

    Args:
        cfg: an mmengine ``Config``.
        data_root: the ``--data-root`` value, if any.
    """
    if data_root:
        return data_root
    env = os.environ.get(ENV_DATA_ROOT)
    cfg_root = cfg.get("data_root")
    if env and cfg_root:
        return osp.join(env, osp.basename(osp.normpath(cfg_root)))
    return cfg_root


def apply_data_root(cfg: Any, data_root: Optional[str]) -> None:
    """Set ``data_root`` on every dataset of the train/val/test loaders (in place)."""
    if data_root is None:
        return
    cfg.data_root = data_root
    for loader in _LOADERS:
        for ds in _iter_datasets((cfg.get(loader) or {}).get("dataset")):
            if isinstance(ds, dict) and "data_root" in ds:
                ds["data_root"] = data_root


def apply_shard_dir(cfg: Any, shard_dir: str) -> None:
    """Point the training set's ``PseudoMaskSegDataset`` to ``shard_dir`` (in place).

    Raises:
        ValueError: ``train_dataloader`` has no pseudo-mask dataset.
    """
    found = [ds for ds in _iter_datasets((cfg.get("train_dataloader") or {}).get("dataset"))
             if isinstance(ds, dict) and ds.get("type") in PSEUDO_DATASET_TYPES]
    if not found:
        raise BadInputError(f"train_dataloader of this config has no {'/'.join(PSEUDO_DATASET_TYPES)}; inherit "
                            f"configs/stage2/_base_/datasets/*_pseudo.py to train on pseudo-mask shards")
    for ds in found:
        ds["shard_dir"] = shard_dir


def enable_amp(cfg: Any) -> None:
    """Switch ``optim_wrapper`` to ``AmpOptimWrapper`` with a dynamic loss scale (in place).

    Raises:
        ValueError: the config uses an optimizer wrapper other than ``OptimWrapper``.
    """
    kind = cfg.optim_wrapper.get("type", "OptimWrapper")
    if kind == "AmpOptimWrapper":
        _logger.warning("AMP is already enabled in the config")
        return
    if kind != "OptimWrapper":
        raise BadInputError(f"--amp needs optim_wrapper.type == 'OptimWrapper', got {kind!r}")
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.loss_scale = "dynamic"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_seg.train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="stage-2 config (configs/stage2/*.py)")
    p.add_argument("--shards", required=True, help="pseudo-mask directory with manifest.json (RUN/pseudo_masks)")
    p.add_argument("--work-dir", help="output folder (default: <RUN>/stage2/<config name>)")
    p.add_argument("--data-root", help=f"dataset root with JPEGImages/ (default: ${ENV_DATA_ROOT}/<name> or config)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                   help="distributed launcher (torchrun: pytorch; srun: slurm)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or (no value) from the latest checkpoint in the work dir")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random initialisation: drop model.pretrained and init_cfg Pretrained entries")
    add_cfg_options(p, help="override config keys, e.g. train_cfg.max_iters=1000 (existing keys only)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    """Load the config and apply the command line to it.

    Raises:
        FileNotFoundError: config, manifest or pretrained weights missing.
        ValueError/KeyError: unknown override keys, no pseudo-mask dataset in the config, bad AMP setting.
    """
    from mmengine.config import Config

    if not osp.isfile(args.config):
        raise FileNotFoundError(f"config {args.config} does not exist; see configs/stage2/")
    require_manifest(args.shards)
    if args.resume not in (None, "auto") and not osp.isfile(args.resume):
        raise FileNotFoundError(f"--resume checkpoint {args.resume} does not exist")
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        check_override_keys(cfg, args.cfg_options)
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or osp.join(osp.dirname(osp.abspath(osp.normpath(args.shards))), "stage2",
                                             osp.splitext(osp.basename(args.config))[0])
    apply_shard_dir(cfg, osp.abspath(args.shards))
    apply_data_root(cfg, resolve_data_root(cfg, args.data_root))
    if args.no_pretrained:
        disable_pretrained(cfg.model)
    else:
        check_pretrained_available(cfg.model)
    if args.amp:
        enable_amp(cfg)
    if args.resume is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == "auto" else args.resume
    return cfg


def check_override_keys(cfg: Any, options: dict) -> None:
    """Refuse ``--cfg-options`` keys whose parent does not exist (typos), naming the key.

    New leaf keys under an existing dict are allowed (mmseg configs rely on optional keys such as
    ``model.pretrained``), but a missing intermediate section is an error.

    Raises:
        KeyError: the parent of a dotted key is not in the config.
    """
    tree = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    for key in options:
        parts = key.split(".")
        node: Any = tree
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise UnknownNameError(f"--cfg-options {key}: {'.'.join(parts[:i + 1])!r} is not in the config")


def preflight(cfg: Any) -> None:
    """Build the train and val datasets once, so that bad input fails before the runner starts.

    This lists the pseudo-mask manifest against the images on disk and the val split against its masks
    (no image is decoded); the runner builds its own copies afterwards.

    Raises:
        FileNotFoundError: missing images, masks, split files or dataset root.
        ValueError: class list, palette, ignore index or dataset of the shards differ from the config.
    """
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope(cfg.get("default_scope", "mmseg"))
    for loader in ("train_dataloader", "val_dataloader"):
        ds_cfg = (cfg.get(loader) or {}).get("dataset")
        if ds_cfg is not None:
            ds = DATASETS.build(ds_cfg)
            _logger.info("%s: %d samples", loader, len(ds))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code (2 for bad input, with one message naming the file)."""
    return run_main(lambda: _main(parse_args(argv)), logger=_logger)


def _main(args: argparse.Namespace) -> int:
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    from mmengine.runner import Runner

    cfg = build_config(args)
    preflight(cfg)
    _logger.info("training %s on %s -> %s", args.config, args.shards, cfg.work_dir)
    if args.launcher != "none":
        import_before_process_group()  # mmengine's Runner creates the group; see stage1_cam/utils/dist.py
    ok = False
    try:
        with safe_checkpoint_loading():
            runner = Runner.from_cfg(cfg)
            runner.train()  # a shard damaged while training raises ShardFormatError: one line through run_main
        del runner  # its DDP-wrapped model holds the process group
        ok = True
    finally:
        shutdown_distributed(ok)  # no process group (--launcher none): nothing to do
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage2_seg.train import main as package_main

    raise SystemExit(package_main())
