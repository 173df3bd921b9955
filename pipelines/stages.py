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
from stage1_cam.utils.cli import UserError
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


class StageError(UserError, RuntimeError):
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


def manifest_complete(paths: Paths, cfg: Any) -> bool:
    """True when manifest.json lists every shard, none missing, for this config hash."""
    if not paths.manifest.is_file():
        return False
    m = json.loads(paths.manifest.read_text())
    return bool(m.get("complete")) and m.get("config_hash") == config_hash(cfg) \
        and m.get("num_shards") == cfg.dump.num_shards


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
