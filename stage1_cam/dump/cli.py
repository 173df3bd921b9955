"""``python -m stage1_cam.dump``: the command line (arguments, shards of this process, exit codes)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..config import DumpCfg, load_config, with_head
from ..data import build_dataset
from ..heads import is_training_free
from ..io import ShardWriter, write_manifest
from ..io.shards import check_split
from ..utils.cli import BadInputError, add_config_args, config_overrides, exit_on_user_error
from ..utils.files import DiskFullError, disk_full_error, is_disk_full
from ..utils.logging import setup_logging
from ..utils.run_dir import RunDir
from .evaluate import METRICS_NAME, evaluate_shards
from .runner import run_dump

_logger = logging.getLogger(__name__)

TRAINING_FREE_DIR = "training_free"  # --training-free on a config with a trained head: the masks' default folder
DESCRIPTION = ("Pseudo-mask dumping to HDF5 shards: python -m stage1_cam.dump CONFIG [--shard I|all] "
               "[--num-shards N] ...")


def _shard_list(arg: Optional[str], num_shards: int) -> List[int]:
    if arg is None or arg == "all":
        return list(range(num_shards))
    try:
        i = int(arg)
    except ValueError:
        raise BadInputError(f"--shard must be an index or 'all', got {arg!r}") from None
    if not 0 <= i < num_shards:
        raise BadInputError(f"--shard {i} is outside [0, {num_shards}) for --num-shards {num_shards}")
    return [i]


def _process_slot() -> Tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), else (0, 1, 0)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0"))


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _check_evaluable(out_dir: Path, num_shards: int) -> None:
    """Refuse ``--evaluate`` (without a dump) on a folder with no finished shard of this split, before anything
    (manifest, logs) is written into it."""
    if not out_dir.is_dir():
        raise FileNotFoundError(f"shard directory {out_dir} does not exist: nothing to evaluate; dump the "
                                f"pseudo-masks first (drop --evaluate, or add --shard all), or point --out to the "
                                f"shard directory of a run")
    check_split(out_dir, num_shards)
    if not any(ShardWriter.shard_complete(out_dir, i, num_shards) for i in range(num_shards)):
        raise FileNotFoundError(f"{out_dir} holds no finished pseudo-mask shards (shard-*-of-{num_shards:05d}.h5): "
                                f"nothing to evaluate; dump the pseudo-masks first (drop --evaluate, or add --shard "
                                f"all), or point --out to the shard directory of a run")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage1_cam.dump", description=DESCRIPTION)
    add_config_args(p, overwrite=False)
    p.add_argument("--checkpoint", help="stage-1 head checkpoint (default: the run's stage1/checkpoints/final.pth)")
    p.add_argument("--shard", help="shard index, or 'all' (default: all; with --evaluate alone: none)")
    p.add_argument("--num-shards", type=int, help="number of shards (default: dump.num_shards)")
    p.add_argument("--out", help="shard directory (default: the run's pseudo_masks/; with --training-free on a "
                                 "config with a trained head: the run's training_free/)")
    p.add_argument("--training-free", action="store_true",
                   help="no model: write the refined initial CAMs -> background + PAR -> labels (CRF: dump.crf), as "
                        "head.type=none does (the config's head section is replaced by dict(type='none'))")
    p.add_argument("--from-probs", help="re-run CRF/threshold from the stored probabilities in this shard dir")
    p.add_argument("--evaluate", action="store_true",
                   help="score the shards against ground truth (data.eval_split) and write metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out_dir: Optional[Path] = None
    try:
        shards_opt = {} if args.num_shards is None else {"dump.num_shards": args.num_shards}
        cfg = load_config(args.config, config_overrides(args, shards_opt))
        run_dir = RunDir.from_config(cfg)
        out_dir = Path(args.out) if args.out else run_dir.shard_dir
        if args.training_free and not is_training_free(cfg.head.type):
            cfg = with_head(cfg, {"type": "none"}, source=args.config)
            out_dir = Path(args.out) if args.out else run_dir.path / TRAINING_FREE_DIR
        training_free = is_training_free(cfg.head.type)
        num_shards = cfg["dump"]["num_shards"]
        if num_shards < 1:
            raise BadInputError(f"dump.num_shards must be >= 1, got {num_shards}")
        do_dump = args.shard is not None or not args.evaluate
        rank, world, local_rank = _process_slot()
        tag = "evaluate" if not do_dump else ("all" if args.shard in (None, "all") else str(args.shard))
        log_file = out_dir / "logs" / f"dump-{tag}{f'-rank{rank}' if world > 1 else ''}.log"
        setup_logging(rank=rank)  # stderr only until the inputs are checked (no folders for a failed start)
        if do_dump:
            shards = _shard_list(args.shard, num_shards)
            check_split(out_dir, num_shards)  # before the log file: another split is refused with nothing written
            if world > 1:  # torchrun with --shard all: rank r takes shards r, r + world, ...
                if len(shards) == 1 and args.shard not in (None, "all"):
                    raise BadInputError(f"--shard {args.shard} under torchrun (WORLD_SIZE={world}): use --shard all to "
                                        f"spread the shards over the processes")
                shards = shards[rank::world]
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
            if training_free and args.checkpoint and args.from_probs is None:
                raise BadInputError("--checkpoint does not apply to training-free masks (head.type='none' or "
                                    "--training-free); drop one of them")
            if args.from_probs is None and not training_free:
                ckpt = Path(args.checkpoint) if args.checkpoint else run_dir.final_ckpt
                if not ckpt.is_file():
                    raise FileNotFoundError(f"checkpoint {ckpt} not found; train the head first (python -m "
                                            f"stage1_cam.train {args.config}) or pass --checkpoint")
            else:
                ckpt = None
            setup_logging(log_file, rank=rank)
            workers = DumpCfg.from_config(cfg).num_crf_workers()
            if not torch.cuda.is_available() and workers:
                # Leave the CRF workers their cores: inference threads + workers = cores.
                torch.set_num_threads(max(1, (os.cpu_count() or 2) - workers))
            run_dump(cfg, shards=shards, out_dir=out_dir, checkpoint=ckpt, device=device,
                     from_probs=Path(args.from_probs) if args.from_probs else None,
                     progress=rank == 0 and not args.no_progress)
        if args.evaluate and rank == 0:
            if not do_dump:
                _check_evaluable(out_dir, num_shards)
            manifest = write_manifest(out_dir, num_shards)
            setup_logging(log_file, rank=rank)
            if not manifest["complete"]:
                _logger.warning("evaluating an incomplete shard set (missing %s)", manifest["missing_shards"])
            dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.eval_split)
            metrics = evaluate_shards(out_dir, dataset)
            path = out_dir / METRICS_NAME
            path.write_text(json.dumps(metrics, indent=2) + "\n")
            m, mc = metrics["final"], metrics["final_confident"]
            no_crf = f", without CRF {_pct(metrics['no_crf']['miou'])}" if "no_crf" in metrics else ""
            _logger.info("pseudo-mask mIoU on %s/%s (%d images): %s (confident pixels only: %s, ignored %s%s); "
                         "written to %s", dataset.dataset, dataset.split, metrics["images"], _pct(m["miou"]),
                         _pct(mc["miou"]), _pct(m["ignore_coverage"]), no_crf, path)
        return 0
    except Exception as e:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and is_disk_full(e):
            e = disk_full_error(out_dir or Path.cwd(), what="the dump's outputs")  # names the space needed
        return exit_on_user_error(e, _logger)
