"""The pipeline's stages, each with an explicit "done" test on files in the run directory.

    data -> stage1 train (checkpoint) -> dump shards (manifest) -> evaluate masks
         -> stage2 train + test (stage2/metrics.json) -> report (report/metrics.json)

A stage whose outputs exist for the current config hash is skipped; the run directory's config hash
guard (``RunDir.prepare``) refuses a changed config unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from stage1_cam.config import config_hash
from stage1_cam.io.shards import shard_inputs
from stage1_cam.utils.cli import EXIT_BAD_INPUT, UserError
from stage1_cam.utils.files import atomic_write_text, file_sha256
from stage1_cam.utils.logging import utc_timestamp
from stage1_cam.utils.procs import child_preexec
from stage1_cam.utils.run_dir import RunDir

_logger = logging.getLogger(__name__)

# The repository holding configs/: the stage-2 configs below are relative to it (and recorded so in
# stage2/inputs.json, whose hash decides whether stage 2 is current), not to the current directory.
REPO_ROOT = Path(__file__).resolve().parents[1]

# stage-2 configs per (dataset, model), relative to REPO_ROOT; `make retrain MODEL=...` picks the model.
STAGE2_CONFIGS: Dict[str, Dict[str, str]] = {
    "synthetic": {"default": "configs/stage2/fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py"},
    "voc": {
        "default": "configs/stage2/deeplabv3plus_r101-d8_1xb8-20k_voc12aug-pseudo-512x512.py",
        "deeplabv3plus_r101": "configs/stage2/deeplabv3plus_r101-d8_1xb8-20k_voc12aug-pseudo-512x512.py",
        "segformer_mitb2": "configs/stage2/segformer_mit-b2_1xb8-40k_voc12aug-pseudo-512x512.py",
    },
    "coco": {
        "default": "configs/stage2/deeplabv3plus_r101-d8_1xb8-80k_coco14-pseudo-512x512.py",
        "deeplabv3plus_r101": "configs/stage2/deeplabv3plus_r101-d8_1xb8-80k_coco14-pseudo-512x512.py",
        "segformer_mitb2": "configs/stage2/segformer_mit-b2_1xb8-80k_coco14-pseudo-512x512.py",
    },
}


class StageError(UserError, RuntimeError):
    """A stage cannot run (missing input); the message says which file and what to run first."""


class StageReportedError(StageError):
    """A stage command exited 2 (bad input): it has printed its one-line error, which is not repeated."""

    already_reported = True


def needs_initial_cams(cfg: Any, run: RunDir) -> bool:
    """Whether the head requires the run's initial CAM shards (``Stage1Head.requires``) and they are not there."""
    from stage1_cam.heads import INITIAL_CAMS, head_class  # lazy for cost: the heads load torch

    required = head_class(cfg.head.type).requires(cfg)
    unknown = [r for r in required if r != INITIAL_CAMS]
    if unknown:
        raise StageError(f"head {cfg.head.type!r} requires {', '.join(unknown)}, which the pipeline cannot make")
    return INITIAL_CAMS in required and not (run.cams_dir / "manifest.json").is_file()


@dataclass
class Paths:
    run: RunDir

    @property
    def manifest(self) -> Path:
        return self.run.shard_dir / "manifest.json"

    @property
    def mask_metrics(self) -> Path:
        return self.run.shard_dir / "metrics.json"

    @property
    def stage2_metrics(self) -> Path:
        return self.run.stage2_dir / "metrics.json"

    @property
    def costs(self) -> Path:
        """Wall time and peak RSS of each stage command run by the local scheduler."""
        return self.run.path / "stage_costs.json"

    @property
    def report_metrics(self) -> Path:
        return self.run.report_dir / "metrics.json"

    @property
    def stage2_inputs(self) -> Path:
        """What stage 2 was trained from (:func:`stage2_inputs`), written before it starts."""
        return self.run.stage2_dir / "inputs.json"


def stage2_config(dataset: str, model: Optional[str]) -> str:
    """The stage-2 config of ``MODEL`` (a name of :data:`STAGE2_CONFIGS` or a config path) as it is recorded:
    a table entry relative to the repository, a path as given; :func:`stage2_config_file` finds the file.

    Raises:
        StageError: no configs for the dataset, or an unknown name that is not a config file either.
    """
    table = STAGE2_CONFIGS.get(dataset)
    if table is None:
        raise StageError(f"no stage-2 configs for dataset {dataset!r}; valid: {', '.join(STAGE2_CONFIGS)}")
    key = model or "default"
    if key not in table and stage2_config_file(key).is_file():
        return key
    if key not in table:
        raise StageError(f"unknown MODEL={key!r} for {dataset}; valid: {', '.join(sorted(table))} or a config path")
    return table[key]


def stage2_config_file(config: str) -> Path:
    """The file of a stage-2 config from :func:`stage2_config`: the shipped configs (and any other path relative
    to the repository that is not a file here) resolve against :data:`REPO_ROOT`, so that the pipeline runs
    from any directory; other paths as given (relative to the current directory)."""
    path = Path(config)
    shipped = {c for table in STAGE2_CONFIGS.values() for c in table.values()}
    if not path.is_absolute() and (config in shipped or not path.is_file()) and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    return path


def checked_manifest(paths: Paths, cfg: Any) -> Optional[Dict[str, Any]]:
    """The run's shard manifest, checked against the shard files when a stage starts; None before any dump.

    The manifest is rebuilt from the finished shards when it is missing, unreadable or out of date (e.g. a
    damaged shard was deleted, so that shard is dumped again), and every shard is hashed and compared with
    the sha256 its writer recorded (once per stage start; a few seconds per GB).

    Raises:
        StageError: damaged shards (named, with the fix) or shards that do not form one set.
    """
    from stage1_cam.io.shards import ShardFormatError, verify_shards

    shard_dir = paths.run.shard_dir
    if not shard_dir.is_dir() or not (paths.manifest.is_file() or any(shard_dir.glob("shard-*-of-*.h5"))):
        return None
    try:
        return verify_shards(shard_dir, cfg.dump.num_shards)
    except ShardFormatError as e:
        raise StageError(str(e)) from e


def manifest_complete(paths: Paths, cfg: Any) -> bool:
    """True when the (checked) manifest lists every shard, none missing or damaged, for this config hash.

    Raises:
        StageError: damaged shards (see :func:`checked_manifest`).
    """
    m = checked_manifest(paths, cfg)
    return m is not None and bool(m.get("complete")) and m.get("config_hash") == config_hash(cfg) \
        and m.get("num_shards") == cfg.dump.num_shards


def read_manifest(paths: Paths) -> Optional[Dict[str, Any]]:
    """The run's manifest.json as it is on disk, or None if missing or unreadable (no checks: see checked_manifest)."""
    try:
        m = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def mask_metrics_current(paths: Paths) -> bool:
    """Whether the pseudo-mask metrics exist and were computed from exactly the shards now in the manifest."""
    try:
        metrics = json.loads(paths.mask_metrics.read_text())
    except (OSError, ValueError):
        return False
    recorded = (metrics.get("inputs") or {}).get("shards") if isinstance(metrics, dict) else None
    if recorded != shard_inputs(read_manifest(paths)):
        if paths.mask_metrics.is_file():
            _logger.info("%s was computed from other shards: evaluating again", paths.mask_metrics)
        return False
    return True


def stage2_inputs(paths: Paths, s2_config: str, s2_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Everything stage 2's outputs depend on: the shards (manifest hashes), its config file and options.

    Args:
        paths: the run's paths (the manifest must exist).
        s2_config: stage-2 config as :func:`stage2_config` gives it (recorded as it is; the file's sha256 too).
        s2_options: ``--s2-options`` overrides.

    Returns:
        JSON-safe dict, with ``hash`` (12 hex digits) over the rest.
    """
    m = read_manifest(paths) or {}
    inputs: Dict[str, Any] = {
        "shards_config_hash": m.get("config_hash"), "checkpoint_hash": m.get("checkpoint_hash"),
        "shards": shard_inputs(m),
        "stage2_config": str(s2_config), "stage2_config_sha256": file_sha256(stage2_config_file(s2_config)),
        "s2_options": {str(k): v for k, v in sorted((s2_options or {}).items())},
    }
    inputs["hash"] = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return inputs


def stage2_decision(paths: Paths, current: Dict[str, Any], *, overwrite: bool) -> str:
    """What ``make retrain`` does with the run's stage-2 folder: ``train``, ``resume``, ``skip`` or ``supersede``.

    * no stage-2 folder: ``train``;
    * recorded inputs equal ``current``: ``skip`` when the metrics exist, else ``resume`` (a killed run);
    * other inputs (or none recorded, from an older version): ``supersede`` with ``overwrite`` (the old outputs
      are moved aside, then stage 2 trains from scratch); without it a :class:`StageError` says so.
    """
    work = paths.run.stage2_dir
    if not work.is_dir() or not any(work.iterdir()):
        return "train"
    recorded = None
    if paths.stage2_inputs.is_file():
        try:
            recorded = json.loads(paths.stage2_inputs.read_text())
        except ValueError:
            recorded = None
    if recorded is not None and recorded.get("hash") == current["hash"]:
        return "skip" if paths.stage2_metrics.is_file() else "resume"
    if overwrite:
        return "supersede"
    what = (f"other inputs (recorded hash {recorded.get('hash')}, now {current['hash']}: the shards, MODEL or "
            f"--s2-options changed)") if recorded is not None else "inputs that were not recorded"
    raise StageError(f"{work} holds stage-2 outputs made from {what}. Pass OVERWRITE=1 (--overwrite) to retrain "
                     f"(the old outputs are moved to {paths.run.superseded_dir}/), or use another RUN")


def record_stage2_inputs(paths: Paths, current: Dict[str, Any]) -> None:
    """Write :func:`stage2_inputs` into the stage-2 folder before training starts (with the time, for the report)."""
    record = {**current, "shard_dir": str(paths.run.shard_dir), "recorded_at": utc_timestamp()}
    atomic_write_text(paths.stage2_inputs, json.dumps(record, indent=1, sort_keys=True) + "\n")


def python_cmd(module: str, *args: str, gpus: int = 1) -> List[str]:
    """`python -m module args` or, with several GPUs, the same under torchrun."""
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "--standalone",
                "-m", module, *args]
    return [sys.executable, "-m", module, *args]


def run_cmd(cmd: List[str], *, env: Optional[Dict[str, str]] = None, record: Optional[Path] = None,
            name: Optional[str] = None) -> Dict[str, float]:
    """Run a stage command, streaming its output; a non-zero exit becomes a StageError.

    Returns the command's wall time and peak RSS (of the process tree it waited for, from ``wait4``); with
    ``record``, they are also stored under ``name`` in that JSON file (read by the report).
    """
    _logger.info("$ %s", " ".join(cmd))
    t0 = time.time()
    # The stage dies with this process, also when it is killed (kill -9): no orphan training or dump.
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, preexec_fn=child_preexec())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cost = {"seconds": time.time() - t0, "peak_rss_mib": usage.ru_maxrss / 1024.0}
    if proc.returncode == EXIT_BAD_INPUT:
        raise StageReportedError(f"command exited {EXIT_BAD_INPUT} (its error is above): {' '.join(cmd)}")
    if proc.returncode != 0:
        raise StageError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    if record is not None and name:
        data = json.loads(record.read_text()) if record.is_file() else {}
        data[name] = {**cost, "command": " ".join(cmd)}
        atomic_write_text(record, json.dumps(data, indent=2) + "\n")
    return cost
