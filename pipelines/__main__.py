"""``python -m pipelines {pseudo-labels,retrain,report,status,cancel}``: the Makefile's stages.

Each command resolves the stage-1 config once (with RUN/SHARDS/HEAD overrides) into the run
directory (``runs/<dataset>/<run>/config.py``); every later stage reads that resolved file, so all
stages of a run see the same configuration and the config hash guards against silent changes.

``--head X`` (``HEAD=X``) sets ``head.type=X`` on the config; for a training-free head (``none``: the refined
initial CAMs are the pseudo-masks, no training) it replaces the whole ``head`` section with ``dict(type=X)``,
since the config's head keys belong to another head's schema. A training-free run skips training and the
initial-CAM step, and its dump writes the training-free masks (``python -m stage1_cam.dump`` on the run's config).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, List, Optional

from stage1_cam.config import config_hash, load_config, with_head
from stage1_cam.heads import HEADS, is_training_free
from stage1_cam.utils.cli import add_cfg_options, add_config_args, config_overrides, exit_on_user_error, whole_number
from stage1_cam.utils.logging import setup_logging
from stage1_cam.utils.run_dir import RunDir

from .stages import (Paths, StageError, checked_manifest, manifest_complete, mask_metrics_current, needs_initial_cams,
                     python_cmd, read_manifest, record_stage2_inputs, run_cmd, stage2_config, stage2_config_file,
                     stage2_decision, stage2_inputs)

_logger = logging.getLogger(__name__)


def _resolve(args: argparse.Namespace, *, prepare: bool) -> tuple:
    extra = {}
    if getattr(args, "shards", None):
        extra["dump.num_shards"] = args.shards
    head = getattr(args, "head", None)
    replace_head = bool(head) and head in HEADS.list_names() and is_training_free(head)  # no head keys of its own
    if head and not replace_head:
        extra["head.type"] = head
    cfg = load_config(args.config, config_overrides(args, extra))
    if replace_head and cfg.head.type != head:
        cfg = with_head(cfg, {"type": head}, source=f"{args.config} with --head {head}")
    run = RunDir.from_config(cfg)
    if prepare:
        run.prepare(cfg, overwrite=args.overwrite, seed=cfg.run.seed)
    else:
        if not run.config_file.is_file():
            raise StageError(f"{run.path} has no resolved config; run `make pseudo-labels` for this DATASET/RUN first")
        asked = cfg
        cfg = load_config(run.config_file)  # later stages use the run's resolved config, not the template
        _refuse_ignored_options(args, asked, cfg, run)
        # run.root and the run name located the run (a run copied or moved keeps its old ones in config.py);
        # they are not hashed (config._HASH_EXCLUDE) and only say where the run is
        for key in _LOCATION_KEYS:
            cfg.run[key] = asked.run[key]
    return cfg, run


# Stage-1 keys that say where a run directory is, not what it holds: the run found with them is the run.
_LOCATION_KEYS = ("root", "name")


def _lookup(tree: Any, key: str) -> Any:
    """The value at a dotted key of a nested dict (``None`` when absent)."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _refuse_ignored_options(args: argparse.Namespace, asked: Any, cfg: Any, run: RunDir) -> None:
    """Stage-1 ``--cfg-options`` (``OPTIONS=``) of a later stage must agree with the run's resolved config.

    Retrain, report, status and cancel read the run's ``config.py``, not the template: an option that differs
    from it would be silently ignored, so it is refused (options equal to the run's values are fine, e.g. the
    same ``OPTIONS`` passed to every target of ``make demo``). ``run.root`` and ``run.name`` are not compared:
    they located the run (one copied to another root keeps its old root in config.py). ``asked`` is the template
    with the options applied.

    Raises:
        StageError: naming the options, the run's values and where they take effect.
    """
    opts = {k: v for k, v in (getattr(args, "cfg_options", None) or {}).items()
            if k not in {f"run.{key}" for key in _LOCATION_KEYS}}  # they located the run: they agree with it
    if not opts:
        return
    wanted, have = asked.to_dict(), cfg.to_dict()  # both validated: the same types
    differ = [k for k in opts if _lookup(wanted, k) != _lookup(have, k)]
    if differ:
        shown = ", ".join(f"{k}={_lookup(wanted, k)!r} (the run has {_lookup(have, k)!r})" for k in differ)
        raise StageError(
            f"`{args.command}` uses the run's resolved config {run.config_file}, so stage-1 OPTIONS/--cfg-options "
            f"{shown} would be ignored: change a run's stage-1 settings with `make pseudo-labels OPTIONS=... "
            f"OVERWRITE=1` (then retrain), pass stage-2 settings as S2_OPTIONS=..., or drop these options")


def _data_root(cfg) -> str:
    from stage1_cam.data import resolve_root

    return str(resolve_root(cfg.data.dataset, cfg.data.root))


def cmd_pseudo_labels(args: argparse.Namespace) -> None:
    cfg, run = _resolve(args, prepare=True)
    paths = Paths(run)
    conf = str(run.config_file)
    if args.scheduler == "slurm":
        from .slurm import submit_pseudo_labels

        run.unlock()  # the jobs lock the run themselves when they start, which may be before this process exits
        submit_pseudo_labels(cfg, run, gpus=args.gpus)
        return
    run_cmd(python_cmd("stage1_cam.data", "--config", conf))
    if is_training_free(cfg.head.type):  # no training: the dump writes the refined initial CAMs
        if manifest_complete(paths, cfg):
            _logger.info("%s is complete: training-free pseudo-masks skipped", paths.manifest)
        else:
            run_cmd(python_cmd("stage1_cam.dump", conf, "--shard", "all", "--num-shards", str(cfg.dump.num_shards)),
                    record=paths.costs, name="training-free pseudo-masks")
        _evaluate_masks(paths, conf)
        return
    if needs_initial_cams(cfg, run):  # heads that train on existing masks, by default the run's initial CAMs
        run_cmd(python_cmd("stage1_cam.cams", conf), record=paths.costs, name="initial CAMs")
    from stage1_cam.train import trained_for

    if trained_for(run.final_ckpt, cfg):  # the training inputs, not the whole config: a dump-only change keeps it
        _logger.info("stage-1 checkpoint %s exists for this config: training skipped", run.final_ckpt)
    else:
        run_cmd(python_cmd("stage1_cam.train", conf, gpus=args.gpus), record=paths.costs, name="stage1 training")
    if manifest_complete(paths, cfg):
        _logger.info("%s is complete: dump skipped", paths.manifest)
    else:
        run_cmd(python_cmd("stage1_cam.dump", conf, "--checkpoint", str(run.final_ckpt), "--shard", "all",
                           "--num-shards", str(cfg.dump.num_shards)), record=paths.costs, name="pseudo-mask dump")
    _evaluate_masks(paths, conf)


def _evaluate_masks(paths: Paths, conf: str) -> None:
    if not mask_metrics_current(paths):  # none yet, or computed from shards that were re-dumped since
        run_cmd(python_cmd("stage1_cam.dump", conf, "--evaluate"))
    _logger.info("pseudo-masks: %s (metrics %s)", paths.run.shard_dir, paths.mask_metrics)


def cmd_retrain(args: argparse.Namespace) -> None:
    cfg, run = _resolve(args, prepare=False)
    s2 = stage2_config(cfg.data.dataset, args.model)  # as recorded in stage2/inputs.json (repo-relative)
    s2_file = str(stage2_config_file(s2))  # the file itself, wherever the command runs
    if args.scheduler == "slurm":
        from .slurm import submit_retrain

        # Depends on a queued pseudo-labels job if there is one; otherwise needs a complete manifest. Not under
        # the run lock: a job of this run that already started holds it (submitters share a submit lock).
        submit_retrain(cfg, run, s2, gpus=args.gpus, overwrite=args.overwrite, s2_options=args.s2_options)
        return
    run.lock()  # one command at a time in a run (its stage commands inherit the lock)
    paths = Paths(run)
    if not manifest_complete(paths, cfg):
        raise StageError(f"{paths.manifest} is missing or incomplete: run `make pseudo-labels "
                         f"DATASET={cfg.data.dataset} RUN={cfg.run.name}` first")
    inputs = stage2_inputs(paths, s2, args.s2_options)
    decision = stage2_decision(paths, inputs, overwrite=args.overwrite)
    if decision == "skip":
        _logger.info("%s exists for these inputs: retraining skipped", paths.stage2_metrics)
        return
    if decision == "supersede":
        run.supersede(["stage2", "report"], reason=f"stage2-inputs-{inputs['hash']}")
    record_stage2_inputs(paths, inputs)
    work = run.stage2_dir
    last = work / "last_checkpoint"  # mmengine writes the path of its latest checkpoint here
    s2_opts = [f"{k}={v}" for k, v in (args.s2_options or {}).items()]
    run_cmd(python_cmd("stage2_seg.train", s2_file, "--shards", str(run.shard_dir), "--work-dir", str(work),
                       "--data-root", _data_root(cfg), *(["--resume"] if last.is_file() else []),
                       *(["--launcher", "pytorch"] if args.gpus > 1 else []),
                       *(["--cfg-options", *s2_opts] if s2_opts else []), gpus=args.gpus),
            record=paths.costs, name="stage2 training")
    if not last.is_file():
        raise StageError(f"stage-2 training finished without a checkpoint in {work}")
    ckpt = last.read_text().strip()
    run_cmd(python_cmd("stage2_seg.test", s2_file, ckpt, "--work-dir", str(work), "--data-root", _data_root(cfg),
                       "--aug-test", *(["--cfg-options", *s2_opts] if s2_opts else [])),
            record=paths.costs, name="stage2 evaluation")
    _logger.info("stage-2 metrics: %s", paths.stage2_metrics)


def cmd_report(args: argparse.Namespace) -> None:
    cfg, run = _resolve(args, prepare=False)
    if args.scheduler == "slurm":
        from .slurm import submit_report

        submit_report(cfg, run)
        return
    from .report import build_report

    checked_manifest(Paths(run), cfg)  # damaged shards: an error, not a report
    out = build_report(cfg, run)
    print(f"report: {out}")


def cmd_status(args: argparse.Namespace) -> None:
    cfg, run = _resolve(args, prepare=False)
    paths = Paths(run)
    lines = [f"run {run.path} (config {config_hash(cfg)})",
             f"  stage-1 checkpoint: {'yes' if run.final_ckpt.is_file() else 'no'}"]
    m = read_manifest(paths)
    if m is not None:
        lines.append(f"  shards: {len(m.get('shards', []))}/{m.get('num_shards')} complete, "
                     f"missing {m.get('missing_shards') or 'none'}, partial {m.get('incomplete_shards') or 'none'}, "
                     f"{m.get('num_images', 0)} images")
    elif paths.manifest.exists():  # derived data: the next stage start rebuilds it from the shards
        lines.append(f"  shards: {paths.manifest} is unreadable; `make pseudo-labels` or `make verify` rebuilds it")
    else:
        lines.append("  shards: no manifest")
    lines.append(f"  stage-2 metrics: {'yes' if paths.stage2_metrics.is_file() else 'no'}")
    lines.append(f"  report: {'yes' if paths.report_metrics.is_file() else 'no'}")
    jobs = run.path / "slurm" / "jobs.json"
    if jobs.is_file():
        from .slurm import job_states

        for name, (jid, state) in job_states(jobs).items():
            lines.append(f"  slurm {name}: job {jid} {state}")
    print("\n".join(lines))


def cmd_cancel(args: argparse.Namespace) -> None:
    cfg, run = _resolve(args, prepare=False)
    from .slurm import cancel_jobs

    cancel_jobs(run.path / "slurm" / "jobs.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("pseudo-labels", "retrain", "report", "status", "cancel"):
        s = sub.add_parser(name)
        add_config_args(s, positional=False, run_default="default", run_help="run name: runs/<dataset>/<run>/",
                        cfg_options_help="stage-1 config overrides a.b=v (resolved once into the run directory)")
        s.add_argument("--scheduler", choices=("local", "slurm"), default="local")
        s.add_argument("--gpus", type=whole_number(0), default=1,
                       help="GPUs (processes) of the training stages; 0: SLURM jobs request none, locally one process")
        if name == "pseudo-labels":
            s.add_argument("--shards", type=int, default=None, help="number of shards (default: config)")
            s.add_argument("--head", default=None,
                           help="refinement head (weclip | weakclip | none: training-free, the refined initial CAMs)")
        if name == "retrain":
            s.add_argument("--model", default=None, help="stage-2 model name or config path")
            add_cfg_options(s, flag="--s2-options",
                            help="stage-2 (mmseg) config overrides a.b=v, e.g. train_cfg.max_iters=100")
    return p


COMMANDS = {"pseudo-labels": cmd_pseudo_labels, "retrain": cmd_retrain, "report": cmd_report,
            "status": cmd_status, "cancel": cmd_cancel}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        COMMANDS[args.command](args)
        return 0
    except Exception as e:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        return exit_on_user_error(e, _logger, extra=(StageError,))


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from pipelines.__main__ import main as package_main

    raise SystemExit(package_main())
