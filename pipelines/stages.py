"""The pipeline's stages, each with an explicit "done" test on files in the run directory.

    data -> stage1 train (checkpoint) -> dump shards (manifest) -> evaluate masks
         -> stage2 train + test (stage2/metrics.json) -> report (report/metrics.json)

A stage whose outputs exist for the current config hash is skipped; the run directory's config hash
guard (``RunDir.prepare``) refuses a changed config unless ``--overwrite``.
"""

from __future__ import annotations

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
from stage1_cam.utils.run_dir import RunDir

_logger = logging.getLogger(__name__)

# stage-2 configs per (dataset, model); `make retrain MODEL=...` picks the model.
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


class StageError(RuntimeError):
    """A stage cannot run (missing input); the message says which file and what to run first."""


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
    def stage2_inputs(self) -> Path:
        """The shards (sha256 per file) stage-2 training started from, written by ``retrain``."""
        return self.run.stage2_dir / "inputs.json"

    @property
    def costs(self) -> Path:
        """Wall time and peak RSS of each stage command run by the local scheduler."""
        return self.run.path / "stage_costs.json"

    @property
    def report_metrics(self) -> Path:
        return self.run.report_dir / "metrics.json"


def stage2_config(dataset: str, model: Optional[str]) -> str:
    table = STAGE2_CONFIGS.get(dataset)
    if table is None:
        raise StageError(f"no stage-2 configs for dataset {dataset!r}; valid: {', '.join(STAGE2_CONFIGS)}")
    key = model or "default"
    if key not in table and Path(key).is_file():
        return key
    if key not in table:
        raise StageError(f"unknown MODEL={key!r} for {dataset}; valid: {', '.join(sorted(table))} or a config path")
    return table[key]


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


def shard_inputs(manifest: Optional[Dict[str, Any]]) -> Dict[str, Optional[str]]:
    """``{shard file: sha256}`` of a manifest: the input record that metrics files keep."""
    return {s["file"]: s.get("sha256") for s in (manifest or {}).get("shards", []) if isinstance(s, dict)}


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


def record_stage2_inputs(paths: Paths, *, resume: bool) -> None:
    """Write ``stage2/inputs.json``: the shards (checked manifest) stage-2 training starts from, for the report.

    A resumed training keeps its record; if the shards changed since, a warning says so (the report flags it).
    """
    shards = shard_inputs(read_manifest(paths))
    try:
        old = json.loads(paths.stage2_inputs.read_text())
    except (OSError, ValueError):
        old = None
    if resume and isinstance(old, dict):
        if old.get("shards") != shards:
            _logger.warning("stage-2 training in %s started from other pseudo-masks than %s holds now (re-dumped "
                            "shards); resuming anyway (the report flags its figures). Move %s aside to retrain from "
                            "scratch", paths.run.stage2_dir, paths.run.shard_dir, paths.run.stage2_dir)
        return
    paths.stage2_inputs.parent.mkdir(parents=True, exist_ok=True)
    record = {"shards": shards, "shard_dir": str(paths.run.shard_dir), "recorded_at": utc_now()}
    tmp = paths.stage2_inputs.with_name(f".{paths.stage2_inputs.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, paths.stage2_inputs)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC timestamp (``2026-12-07T10:11:12Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cost = {"seconds": time.time() - t0, "peak_rss_mib": usage.ru_maxrss / 1024.0}
    if proc.returncode != 0:
        raise StageError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    if record is not None and name:
        data = json.loads(record.read_text()) if record.is_file() else {}
        data[name] = {**cost, "command": " ".join(cmd)}
        record.write_text(json.dumps(data, indent=2) + "\n")
    return cost
