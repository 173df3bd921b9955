"""Run directories: resolved config + env.json saved; a different config is refused unless overwrite."""

import json

import pytest

from stage1_cam.config import config_hash, default_config
from stage1_cam.utils.run_dir import RunDir, RunDirError


def test_prepare_saves_config_and_env(tmp_path):
    cfg = default_config()
    cfg.run.root = str(tmp_path)
    run = RunDir.from_config(cfg).prepare(cfg, seed=3)
    assert run.path == tmp_path / "synthetic" / "default"
    env = json.loads((run.path / "env.json").read_text())
    assert env["seed"] == 3 and "torch" in env["packages"] and env["device"] in ("cpu", "cuda")
    assert run.config_file.is_file() and run.hash_file.read_text().strip()


def test_a_run_without_outputs_takes_a_changed_config(tmp_path):
    """A start that failed before any stage wrote an output (bad weights, bad data) leaves only the config: the
    corrected config replaces it, without OVERWRITE=1 (before: refused, and the run was stuck until OVERWRITE=1)."""
    cfg = default_config()
    cfg.run.root = str(tmp_path)
    run = RunDir.from_config(cfg).prepare(cfg)
    (run.path / "stage1" / "checkpoints").mkdir(parents=True)  # an empty output folder is no output
    cfg.train.lr = 1e-4
    run.prepare(cfg)
    assert run.hash_file.read_text().strip() == config_hash(cfg)


def test_changed_config_refused_unless_overwrite(tmp_path):
    cfg = default_config()
    cfg.run.root = str(tmp_path)
    run = RunDir.from_config(cfg).prepare(cfg)
    (run.path / "stage1" / "checkpoints").mkdir(parents=True)
    (run.path / "stage1" / "checkpoints" / "latest.pth").write_bytes(b"made with the first config")
    cfg.train.lr = 1e-4
    with pytest.raises(RunDirError, match="OVERWRITE=1"):
        run.prepare(cfg)
    run.prepare(cfg, overwrite=True)
    backups = list(run.path.glob("config.*.py"))
    assert len(backups) == 1, "the previous config is kept, not overwritten"
