"""Run directories (``runs/<dataset>/<run>/``): resolved config, env.json, hash checks."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

from mmengine.config import ConfigDict as Config

from ..config import config_hash, save_config
from .cli import UserError

_logger = logging.getLogger(__name__)


class RunDirError(UserError, RuntimeError):
    """A run directory holds outputs from a different configuration."""


def git_sha(cwd: Optional[Path] = None) -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_env(seed: Optional[int] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Versions, git SHA, device and seed, for ``env.json`` and reports."""
    from importlib import metadata

    versions = {}
    for pkg in ("torch", "torchvision", "open_clip_torch", "mmengine", "mmcv", "mmsegmentation", "numpy",
                "h5py", "pydensecrf2", "opencv-python-headless"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": git_sha(),
        "seed": seed,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["device"] = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        env["device"] = device
    return env


@dataclass
class RunDir:
    """Paths of one run: ``<root>/<dataset>/<name>/``."""

    path: Path

    @classmethod
    def from_config(cls, cfg: Config) -> "RunDir":
        return cls(Path(cfg.run.root) / cfg.data.dataset / cfg.run.name)

    @property
    def config_file(self) -> Path:
        return self.path / "config.py"

    @property
    def hash_file(self) -> Path:
        return self.path / "config_hash.txt"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "stage1" / "checkpoints"

    @property
    def final_ckpt(self) -> Path:
        return self.ckpt_dir / "final.pth"

    @property
    def shard_dir(self) -> Path:
        return self.path / "pseudo_masks"

    @property
    def cams_dir(self) -> Path:
        return self.path / "cams"

    @property
    def stage2_dir(self) -> Path:
        return self.path / "stage2"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def prepare(self, cfg: Config, overwrite: bool = False, seed: Optional[int] = None) -> "RunDir":
        """Create the folder, save the resolved config and env.json; refuse a different config.

        Raises:
            RunDirError: the folder holds a run made with another config hash and ``overwrite`` is off.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        h = config_hash(cfg)
        if self.hash_file.exists():
            old = self.hash_file.read_text().strip()
            if old != h and not overwrite:
                raise RunDirError(
                    f"{self.path} was produced with config hash {old}, but the current config hashes to {h}. "
                    f"Use another RUN name, or pass OVERWRITE=1 (--overwrite) to replace the run's config "
                    f"(existing outputs are kept; stages re-run where their inputs changed)."
                )
        if self.config_file.exists() and self.hash_file.exists() and self.hash_file.read_text().strip() != h:
            backup = self.config_file.with_suffix(f".{self.hash_file.read_text().strip()}.py")
            self.config_file.rename(backup)
            _logger.warning("previous config kept as %s", backup)
        save_config(cfg, self.config_file)
        self.hash_file.write_text(h + "\n")
        (self.path / "env.json").write_text(json.dumps(collect_env(seed=seed), indent=2) + "\n")
        return self
