"""Run directories (``runs/<dataset>/<run>/``): resolved config, env.json, hash checks, run lock, superseding.

Each stage's outputs depend on part of the config only (:data:`STAGE_SECTIONS`): the trained head on
``run``/``data``/``clip``/``cam``/``head``/``train``, the pseudo-mask shards on all of it (``dump`` too), the
initial CAMs on ``data``/``clip``/``cam``. When ``--overwrite`` accepts a changed config, :meth:`RunDir.prepare`
moves exactly the outputs whose inputs changed (and everything downstream of them) to
``superseded/<time>-<old hash>/``; the others are kept and reused, so a dump-only change keeps the trained
head and re-dumps. Old and new outputs are never mixed.

One process at a time prepares and uses a run (``run.lock``, :class:`RunLock`); stage commands started by
the holder (the pipeline's train and dump) inherit its lock through ``$WSSS_RUN_LOCK``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmengine.config import ConfigDict as Config

from ..config import check_run_name, config_hash, load_config, save_config
from .cli import UserError
from .files import atomic_write, atomic_write_text
from .locks import FileLock

_logger = logging.getLogger(__name__)


class RunDirError(UserError, RuntimeError):
    """A run directory holds outputs from a different configuration."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


_HASH_RE = re.compile(r"[0-9a-f]{12}")  # config_hash.txt: config_hash()'s 12 hex digits
RUN_LOCK_ENV = "WSSS_RUN_LOCK"  # tokens (os.pathsep-separated) of run locks held by this process or a parent
RUN_LOCK_NAME = "run.lock"
SUPERSEDED_DIR = "superseded"

# Top-level config sections (or single dotted keys) that each stage's own outputs depend on (the stages before it
# aside). The CAM run follows train.amp (bf16 autocast where it resolves to bf16).
STAGE_SECTIONS: Dict[str, Tuple[str, ...]] = {
    "cams": ("data", "clip", "cam", "train.amp"),
    "train": ("run", "data", "clip", "cam", "head", "train"),
    "dump": ("run", "data", "clip", "cam", "head", "train", "dump"),
}
# Keys inside those sections that do not change the stage's outputs.
_STAGE_IGNORED: Dict[str, Tuple[str, ...]] = {
    "cams": (),
    "train": ("data.dump_split", "data.eval_split"),
    "dump": (),
}
# Outputs of each stage, relative to the run directory (with the stages downstream of it: see _DOWNSTREAM).
_STAGE_OUTPUTS: Dict[str, Tuple[str, ...]] = {
    "cams": ("cams",),
    "train": ("stage1/checkpoints", "stage1/train_summary.json", "stage1/val_metrics.jsonl"),
    "dump": ("pseudo_masks",),
    "stage2": ("stage2",),
    "report": ("report",),
}
_DOWNSTREAM: Dict[str, Tuple[str, ...]] = {
    "cams": ("train", "dump", "stage2", "report"),  # WeakCLIP trains on the initial CAMs
    "train": ("dump", "stage2", "report"),
    "dump": ("stage2", "report"),
    "stage2": ("report",),
    "report": (),
}


def stage_hash(cfg: Config, stage: str) -> str:
    """Hash of the config keys that stage ``stage`` (``cams``, ``train`` or ``dump``) depends on.

    ``dump`` depends on every section, so its hash is :func:`~stage1_cam.config.config_hash` of the whole config
    (the hash recorded in the shards and the manifest).
    """
    if stage not in STAGE_SECTIONS:
        raise KeyError(f"unknown stage {stage!r}; valid: {', '.join(STAGE_SECTIONS)}")
    if stage == "dump":
        return config_hash(cfg)
    data = copy.deepcopy(cfg.to_dict())
    for key in _STAGE_IGNORED[stage]:
        section, name = key.split(".", 1)
        data.get(section, {}).pop(name, None)
    return config_hash(Config(data), sections=STAGE_SECTIONS[stage])


def changed_stages(old: Optional[Config], new: Config) -> List[str]:
    """Stages whose outputs made with config ``old`` are invalid under ``new`` (downstream stages included).

    Args:
        old: the config the run's outputs were made with (None: unknown, everything is invalid).
        new: the config about to be used.
    """
    if old is None:
        return list(_STAGE_OUTPUTS)
    out: List[str] = []
    for stage in ("cams", "train", "dump"):
        if stage_hash(old, stage) != stage_hash(new, stage):
            for s in (stage, *_DOWNSTREAM[stage]):
                if s not in out:
                    out.append(s)
    return out


class RunLock(FileLock):
    """``<run>/run.lock``: one process at a time prepares and runs stages in a run directory.

    Re-entrant within a process, and shared with child processes: the holder exports a random token in
    ``$WSSS_RUN_LOCK``, and a process that finds the lock held by a live process with a token it inherited uses
    it without taking it (the pipeline holds the lock while its stage commands run).
    """

    kind, log = "run lock", _logger

    def __init__(self, path: Path, owner: object) -> None:
        super().__init__(path, owner, error=RunLockedError,
                         holder_hint="another command (make pseudo-labels / retrain, or a training) is using this "
                                     "run directory")
        self.token = secrets.token_hex(8)

    def _info(self) -> Dict[str, Any]:
        return {**super()._info(), "token": self.token}

    def _shared(self, holder: Dict[str, Any]) -> bool:
        inherited = [t for t in os.environ.get(RUN_LOCK_ENV, "").split(os.pathsep) if t]
        return holder.get("token") in inherited

    def acquire(self) -> None:
        super().acquire()
        if self.acquired:
            tokens = [t for t in os.environ.get(RUN_LOCK_ENV, "").split(os.pathsep) if t]
            os.environ[RUN_LOCK_ENV] = os.pathsep.join(tokens + [self.token])

    def release(self) -> None:
        if self.acquired:
            tokens = [t for t in os.environ.get(RUN_LOCK_ENV, "").split(os.pathsep) if t and t != self.token]
            if tokens:
                os.environ[RUN_LOCK_ENV] = os.pathsep.join(tokens)
            else:
                os.environ.pop(RUN_LOCK_ENV, None)
        super().release()


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
    _lock: Optional[RunLock] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: Config) -> "RunDir":
        """``<run.root>/<dataset>/<run.name>``; a run name that is not one folder name is refused.

        Raises:
            ConfigError: ``run.name`` is empty, absolute, a path or holds ``..`` (``config.check_run_name``).
        """
        check_run_name(cfg.run.name)  # validated configs passed it already; this guards hand-made ones
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

    @property
    def lock_file(self) -> Path:
        return self.path / RUN_LOCK_NAME

    @property
    def superseded_dir(self) -> Path:
        return self.path / SUPERSEDED_DIR

    def lock(self) -> "RunDir":
        """Take the run lock (kept until :meth:`unlock`, until this object is gone, or until the process exits).

        Raises:
            RunLockedError: another live process holds it (the message names its pid and host).
        """
        if self._lock is None:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.lock_file, self)
            lock.acquire()
            self._lock = lock
            weakref.finalize(self, lock.release)
        return self

    def unlock(self) -> None:
        """Release the run lock taken by :meth:`lock` (a no-op without one)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def has_outputs(self) -> bool:
        """Whether any stage has written an output here (a file under one of the stages' output paths)."""
        for rels in _STAGE_OUTPUTS.values():
            for rel in rels:
                path = self.path / rel
                if path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*"))):
                    return True
        return False

    def supersede(self, stages: Sequence[str], reason: str) -> Optional[Path]:
        """Move the outputs of ``stages`` to ``superseded/<time>-<reason>/`` (same relative paths).

        Returns:
            The folder they were moved to, or None when none of them existed.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.superseded_dir / f"{stamp}-{reason}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.superseded_dir / f"{stamp}-{reason}-{n}"
        moved = []
        for stage in stages:
            for rel in _STAGE_OUTPUTS[stage]:
                src = self.path / rel
                if src.exists():
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(src), str(dest / rel))
                    moved.append(rel)
        if not moved:
            return None
        _logger.warning("outputs made with other inputs moved to %s: %s", dest, ", ".join(moved))
        return dest

    def _saved_config(self) -> Optional[Config]:
        if not self.config_file.is_file():
            return None
        try:
            return load_config(self.config_file)
        except Exception as e:  # an older schema or a damaged file: its outputs cannot be trusted
            _logger.warning("cannot read the run's previous config %s (%s); all its outputs are superseded",
                            self.config_file, e)
            return None

    def prepare(self, cfg: Config, overwrite: bool = False, seed: Optional[int] = None,
                lock: bool = True) -> "RunDir":
        """Take the run lock, create the folder, save the resolved config and env.json; refuse a different config.

        With ``overwrite`` and a changed config, the outputs of the stages whose inputs changed (and of the stages
        downstream of them) are moved aside with :meth:`supersede`; the others are kept.

        Raises:
            RunLockedError: another live process holds the run (with ``lock``).
            RunDirError: the folder holds outputs made with another config hash and ``overwrite`` is off (a folder
                without outputs takes the new config).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if lock:
            self.lock()
        h = config_hash(cfg)
        old = self.hash_file.read_text().strip() if self.hash_file.exists() else None
        damaged = old is not None and not _HASH_RE.fullmatch(old)  # empty or garbled: the record is unknown
        if old is not None and old != h:
            tag = "damaged" if damaged else old  # names the superseded folder and the backup config
            if not self.has_outputs():
                # e.g. a first start that failed on bad input: nothing was made with the old config, nothing to keep
                _logger.info("%s holds no outputs of its earlier config (hash %s): the config is replaced",
                             self.path, old if not damaged else f"unknown: {self.hash_file} is damaged")
            elif not overwrite and damaged:
                raise RunDirError(
                    f"{self.hash_file} is damaged (holds {old[:40]!r}, not a 12-digit config hash), so the config "
                    f"the outputs in {self.path} were made with is unknown. If {self.config_file} is that config, "
                    f"delete {self.hash_file.name} to record it again (the outputs are kept as they are); otherwise "
                    f"pass OVERWRITE=1 (--overwrite): outputs whose inputs differ from the saved config.py are moved "
                    f"to {self.superseded_dir}/.")
            elif not overwrite:
                raise RunDirError(
                    f"{self.path} was produced with config hash {old}, but the current config hashes to {h}. "
                    f"Use another RUN name, or pass OVERWRITE=1 (--overwrite) to replace the run's config "
                    f"(outputs whose inputs changed are moved to {self.superseded_dir}/; the others are kept)."
                )
            else:
                stages = changed_stages(self._saved_config(), cfg)
                self.supersede(stages, reason=f"config-{tag}")
                if self.config_file.exists():
                    backup, n = self.config_file.with_suffix(f".{tag}.py"), 1
                    while backup.exists():  # an earlier backup is never replaced
                        n += 1
                        backup = self.config_file.with_suffix(f".{tag}-{n}.py")
                    self.config_file.rename(backup)
                    _logger.warning("previous config kept as %s", backup)
        with atomic_write(self.config_file) as tmp:
            save_config(cfg, tmp)
        atomic_write_text(self.hash_file, h + "\n")
        atomic_write_text(self.path / "env.json", json.dumps(collect_env(seed=seed), indent=2) + "\n")
        return self
