"""Command-line bad input (audit C): one line naming the file or value and the fix, exit code 2, no traceback.

Each test calls an entry point's ``main(argv)`` in-process (or its parser, for argparse's own exit 2) and checks
the one error line; the cases are the audit's F1, F2, F3, F5 and items 7, 8, 12, 13, 14, 16.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from stage1_cam.config import load_config
from stage1_cam.utils.run_dir import RunDir
from tests.cli_errors import one_error

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py")
S2CFG = str(REPO / "configs/stage2/fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py")
FULL = Path("/dev/full")  # every write to it fails with ENOSPC: a full disk without filling one


def _argparse_error(capfd, info) -> str:
    """argparse's exit: code 2, one ``error:`` line (after the usage), no traceback."""
    assert info.value.code == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    return line


def _opts(synthetic_root: Path, runs: Path, **extra) -> list:
    opts = {"data.root": synthetic_root, "run.root": runs, "train.max_iters": 2, "train.batch_size": 2,
            "train.val_interval": 0, "train.ckpt_interval": 1, "data.crop_size": 64, "data.num_workers": 0,
            "dump.num_shards": 1, "dump.long_side": 64, "dump.batch_size": 2, "dump.crf.workers": 1, **extra}
    return ["--cfg-options"] + [f"{k}={v}" for k, v in opts.items()]


def _prepared_run(root: Path, name: str = "r") -> RunDir:
    """A run directory of the tiny config under ``root`` (config.py, config_hash.txt; lock released)."""
    cfg = load_config(TINY, {"run.root": str(root), "run.name": name})
    run = RunDir.from_config(cfg).prepare(cfg)
    run.unlock()
    return run


# ------------------------------------------------------------------------------ F1: --cfg-options / --s2-options
BAD_ITEMS = [("train.max_iters", "key=value"), ("train.lr=[1,2", "Imbalanced brackets"), ("=5", "key=value")]


@pytest.mark.parametrize("item,why", BAD_ITEMS, ids=["no-equals", "brackets", "no-key"])
def test_cfg_options_syntax_error_is_one_argparse_line_naming_the_item(item, why, tmp_path, capfd):
    from stage1_cam.train import main as train_main

    with pytest.raises(SystemExit) as info:
        train_main([TINY, "--run", "x", "--cfg-options", f"run.root={tmp_path}", item])
    line = _argparse_error(capfd, info)
    assert "--cfg-options" in line and repr(item) in line and why in line and "key=value" in line
    assert not (tmp_path / "synthetic").exists()


@pytest.mark.parametrize("flag", ["--cfg-options", "--s2-options"])
def test_pipelines_options_syntax_error_is_one_argparse_line(flag, tmp_path, capfd):
    from pipelines.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["retrain", "--config", TINY, "--run", "x", flag, "train.max_iters"])
    line = _argparse_error(capfd, info)
    assert flag in line and "'train.max_iters'" in line and "key=value" in line


def test_stage2_cfg_options_syntax_error_is_one_argparse_line(tmp_path, capfd):
    pytest.importorskip("mmseg")
    from stage2_seg.train import main as s2_main

    with pytest.raises(SystemExit) as info:
        s2_main([S2CFG, "--shards", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--cfg-options", "foo"])
    line = _argparse_error(capfd, info)
    assert "--cfg-options" in line and "'foo'" in line and "key=value" in line


# ----------------------------------------------------------------------------------- F2: unreadable config files
BAD_CONFIGS = [("bad.py", "this is not python(\n", "SyntaxError"), ("raises.py", "x = 1 / 0\n", "ZeroDivisionError"),
               ("bad.yaml", "a: [1\n", "ParserError"), ("bad.json", '{"a": \n', "JSONDecodeError"),
               ("cfg.txt", "x = 1\n", "'.txt'")]


@pytest.mark.parametrize("name,text,what", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_unreadable_config_file_is_one_line_naming_it(name, text, what, tmp_path, caplog, capfd):
    from stage1_cam.train import main as train_main

    path = tmp_path / name
    path.write_text(text)
    assert train_main([str(path), "--run", "x", "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 2
    msg = one_error(caplog, capfd)
    assert str(path) in msg and what in msg
    assert not (tmp_path / "runs").exists()


def test_damaged_run_config_is_named_by_status(tmp_path, caplog, capfd):
    from pipelines.__main__ import main

    run = _prepared_run(tmp_path)
    run.config_file.write_text(run.config_file.read_text()[:300])  # cut off mid-file
    assert main(["status", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={tmp_path}"]) == 2
    msg = one_error(caplog, capfd)
    assert str(run.config_file) in msg and "cannot read this config file" in msg and "pseudo-labels" in msg


# ------------------------------------------------------------------------------------- F3: unusable checkpoints
def _bad_checkpoint(kind: str, tmp_path: Path) -> Path:
    from stage1_cam.train import CKPT_FORMAT, save_checkpoint

    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":  # an interrupted copy of a real stage-1 checkpoint
        save_checkpoint(path, {"format": CKPT_FORMAT, "head": {"w": torch.randn(4096)}})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("101\n102\n")
    else:  # a checkpoint of another kind: objects that weights_only refuses (mmengine's, in a stage-2 one)
        torch.save({"meta": {"iter": 6}, "message_hub": _Foreign()}, path)
    return path


class _Foreign:
    pass


CKPT_KINDS = [("truncated", "truncated or damaged"), ("empty", "is empty"), ("text", "is not a PyTorch checkpoint"),
              ("foreign", "is not a stage-1 head checkpoint")]


@pytest.mark.parametrize("kind,what", CKPT_KINDS, ids=[k for k, _ in CKPT_KINDS])
def test_dump_checkpoint_unusable_is_one_line(kind, what, synthetic_root, tmp_path, caplog, capfd):
    from stage1_cam.dump import main as dump_main

    ckpt = _bad_checkpoint(kind, tmp_path)
    rc = dump_main([TINY, "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress",
                    *_opts(synthetic_root, tmp_path / "runs")])
    assert rc == 2
    msg = one_error(caplog, capfd)
    assert str(ckpt) in msg and what in msg and "stage-1 checkpoint" in msg


def test_train_resume_from_a_stage2_checkpoint_is_one_line(synthetic_root, tmp_path, caplog, capfd):
    from stage1_cam.train import main as train_main

    ckpt = _bad_checkpoint("foreign", tmp_path)
    assert train_main([TINY, "--run", "t", "--resume", str(ckpt), *_opts(synthetic_root, tmp_path / "runs")]) == 2
    msg = one_error(caplog, capfd)
    assert str(ckpt) in msg and "is not a stage-1 head checkpoint" in msg


def test_pseudo_labels_names_a_truncated_final_checkpoint(tmp_path, monkeypatch, caplog, capfd):
    import pipelines.__main__ as pm

    run = _prepared_run(tmp_path)
    truncated = _bad_checkpoint("truncated", tmp_path)
    run.ckpt_dir.mkdir(parents=True)
    shutil.copy(truncated, run.final_ckpt)
    monkeypatch.setattr(pm, "run_cmd", lambda cmd, **kw: {})  # the data step: the dataset is not needed here
    assert pm.main(["pseudo-labels", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={tmp_path}"]) == 2
    msg = one_error(caplog, capfd)
    assert str(run.final_ckpt) in msg and "truncated or damaged" in msg and "delete it" in msg
    assert run.final_ckpt.read_bytes() == truncated.read_bytes()  # left for the user to look at


# -------------------------------------------------------------------------------- F5: a full disk at a checkpoint
def _usage_without_space(real, marker: str, free: int = 0):
    """``shutil.disk_usage`` that reports ``free`` bytes for paths containing ``marker`` (a full disk there)."""
    def disk_usage(path):
        if marker in str(path):
            total = real(path).total
            return shutil._ntuple_diskusage(total, total - free, free)
        return real(path)

    return disk_usage


def test_train_on_a_full_disk_is_one_line_naming_the_checkpoint_folder(synthetic_root, tmp_path, monkeypatch, caplog,
                                                                       capfd):
    from stage1_cam.train import main as train_main

    monkeypatch.setattr(shutil, "disk_usage", _usage_without_space(shutil.disk_usage, "checkpoints"))
    assert train_main([TINY, "--run", "full", *_opts(synthetic_root, tmp_path / "runs")]) == 2
    msg = one_error(caplog, capfd)
    ckpt_dir = tmp_path / "runs" / "synthetic" / "full" / "stage1" / "checkpoints"
    assert f"no space left on the disk of {ckpt_dir}" in msg and "checkpoint iter_000001.pth" in msg
    assert "run.root" in msg
    assert not any(ckpt_dir.iterdir())  # no checkpoint, no temporary file


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_torch_write_error_on_a_full_disk_becomes_disk_full_error(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as a RuntimeError ("unexpected pos"); the disk filled during the write."""
    from stage1_cam import train as train_mod
    from stage1_cam.utils import files as files_mod
    from stage1_cam.utils.files import DiskFullError

    def full_temp(path):
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        os.symlink(FULL, tmp)  # torch's zip writer writes into /dev/full
        return tmp

    monkeypatch.setattr(files_mod, "temp_name", full_temp)
    payload = {"format": train_mod.CKPT_FORMAT, "head": {"w": torch.randn(4096)}}  # 16 KiB of tensors
    path = tmp_path / "ckpt" / "latest.pth"
    with pytest.raises(RuntimeError):  # plenty of space: a failed write is not a full disk, it keeps its traceback
        train_mod.save_checkpoint(path, payload)
    # room for the tensors when checked (so the write starts), but not for the whole file with its overhead
    monkeypatch.setattr(shutil, "disk_usage", _usage_without_space(shutil.disk_usage, "ckpt", free=20000))
    with pytest.raises(DiskFullError, match=rf"no space left on the disk of {path.parent}: checkpoint latest.pth "
                                            rf"needs about .* MiB, 0.0 MiB free.*run.root.*latest.pth") as info:
        train_mod.save_checkpoint(path, payload)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's write error, mapped
    assert list(path.parent.iterdir()) == []  # nothing under the final name, no temporary file


# ---------------------------------------------------------------------------------------- 7: world --threads
@pytest.mark.parametrize("value", ["-3", "0", "two"])
def test_world_threads_must_be_positive(value, capfd):
    from stage1_cam.world_clip.train import main as world_main

    with pytest.raises(SystemExit) as info:
        world_main(["--threads", value])
    line = _argparse_error(capfd, info)
    assert "--threads" in line and ">= 1" in line and value in line


# ------------------------------------------------------------------------------------------ 8: a corrupt run.lock
@pytest.mark.parametrize("record", [{"pid": None}, {"pid": "abc"}, {"pid": [1]}, [1, 2], {}],
                         ids=["null", "text", "list", "not-a-dict", "empty"])
def test_malformed_run_lock_is_refused_while_fresh_and_taken_over_when_old(record, tmp_path, caplog, capfd):
    import pipelines.__main__ as pm

    run = _prepared_run(tmp_path)
    if isinstance(record, dict) and record:
        record = {"host": socket.gethostname(), **record}
    run.lock_file.write_text(json.dumps(record))
    argv = ["retrain", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={tmp_path}"]
    assert pm.main(argv) == 2  # written just now: it may be a lock being written
    msg = one_error(caplog, capfd)
    assert str(run.lock_file) in msg and ("malformed" in msg or "unreadable" in msg) and "delete the lock" in msg
    old = time.time() - 3600
    os.utime(run.lock_file, (old, old))
    caplog.clear()
    assert pm.main(argv) == 2  # taken over as stale; then the real next error: no pseudo-masks yet
    err = capfd.readouterr().err
    assert "Traceback" not in err and re.search(r" W \S+: taking over stale run lock .* lock file", err), err
    (msg,) = re.findall(r"^\d\d:\d\d:\d\d E \S+: (.*)$", err, re.M)
    assert "manifest" in msg and "pseudo-labels" in msg


# -------------------------------------------------------------------------------------- 12: run names and --gpus
@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE", "", "a/b", "..", "."])
def test_run_name_must_be_one_folder_name(name, synthetic_root, tmp_path, caplog, capfd):
    from stage1_cam.train import main as train_main

    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name  # (an absolute path the test may write to)
    runs = tmp_path / "a" / "runs"
    assert train_main([TINY, "--run", name, *_opts(synthetic_root, runs)]) == 2
    msg = one_error(caplog, capfd)
    assert f"run.name={name!r}" in msg and "not a valid run name" in msg and "'/'" in msg and "'..'" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside run.root or out of it


def test_pipelines_run_name_empty_is_refused(tmp_path, caplog, capfd):
    from pipelines.__main__ import main

    assert main(["status", "--config", TINY, "--run", "", "--cfg-options", f"run.root={tmp_path}"]) == 2
    assert "run.name=''" in one_error(caplog, capfd)


def _no_stage_runs(monkeypatch) -> None:
    import pipelines.__main__ as pm

    monkeypatch.setattr(pm, "run_cmd", lambda cmd, **kw: pytest.fail(f"a stage ran: {cmd}"))


@pytest.mark.parametrize("value", ["-4", "x"])
def test_pipelines_gpus_negative_is_an_argparse_error(value, tmp_path, monkeypatch, capfd):
    from pipelines.__main__ import main

    _no_stage_runs(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(["pseudo-labels", "--config", TINY, "--run", "g", "--gpus", value,
              "--cfg-options", f"run.root={tmp_path}"])
    line = _argparse_error(capfd, info)
    assert "--gpus" in line and ">= 0" in line and value in line


def test_pipelines_gpus_zero_means_a_job_without_gpus():
    """``--gpus 0``: SLURM jobs without --gres (the finalise job that only evaluates runs ``--scheduler local --gpus
    0``); the local scheduler runs one process."""
    from pipelines.__main__ import build_parser

    for scheduler in ("local", "slurm"):
        args = build_parser().parse_args(["pseudo-labels", "--config", TINY, "--scheduler", scheduler, "--gpus", "0"])
        assert args.gpus == 0


# ---------------------------------------------------------------------------------- 13: full disk: export, data
@contextmanager
def _write_into_full_disk(path, **kw):
    """``atomic_write`` whose temporary file is /dev/full: the write fails with ENOSPC, as on a full disk."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    os.symlink(FULL, tmp)
    try:
        yield tmp
    finally:
        tmp.unlink()


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_export_on_a_full_disk_names_the_file_and_out_dir(tmp_path, monkeypatch, caplog, capfd):
    from stage1_cam.io import export as export_mod
    from stage1_cam.io.shards import ShardMeta, ShardWriter, write_manifest

    shards = tmp_path / "shards"
    meta = ShardMeta(dataset="synthetic", split="train", class_names=["background", "a"],
                     palette=[(i, i, i) for i in range(256)])
    with ShardWriter(shards, 0, 1, meta=meta) as w:
        w.write("img0", label=np.zeros((8, 8), np.uint8), confidence=np.ones((8, 8), np.float32), image_labels=[])
        w.finalize()
    write_manifest(shards, 1)
    out = tmp_path / "png"
    monkeypatch.setattr(export_mod, "atomic_write", _write_into_full_disk)
    assert export_mod.main([str(shards), str(out)]) == 2
    msg = one_error(caplog, capfd)
    assert msg.startswith(f"{out}/") and "No space left on device" in msg and "OUT_DIR" in msg
    assert "run.root" not in msg and "--out" not in msg


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_data_on_a_full_disk_names_the_file(tmp_path, monkeypatch, caplog, capfd):
    from stage1_cam.data.__main__ import main as data_main

    root = tmp_path / "synth"
    real_write = Path.write_bytes

    def write_bytes(self, data):
        if str(self).startswith(str(root)) and self.suffix == ".jpg":
            os.symlink(FULL, self)  # the disk is full from the first image on
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert data_main(["--dataset", "synthetic", "--root", str(root)]) == 2
    msg = one_error(caplog, capfd)
    assert msg.startswith(f"{root}/JPEGImages/") and "No space left on device" in msg
    assert "run.root" not in msg and "--out" not in msg and "another disk" in msg


# ------------------------------------------------------------------------------ 14: a damaged config_hash.txt
@pytest.mark.parametrize("content", ["", "garbage\n", "5cbffffe87c4 extra"], ids=["empty", "garbled", "trailing"])
def test_damaged_hash_record_is_its_own_error(content, synthetic_root, tmp_path, caplog, capfd):
    from stage1_cam.train import main as train_main

    run = _prepared_run(tmp_path, name="h")
    (run.ckpt_dir).mkdir(parents=True)
    (run.ckpt_dir / "latest.pth").write_bytes(b"an output of the run")
    run.hash_file.write_text(content)
    assert train_main([TINY, "--run", "h", "--cfg-options", f"run.root={tmp_path}"]) == 2
    msg = one_error(caplog, capfd)
    assert str(run.hash_file) in msg and "damaged" in msg and "OVERWRITE=1" in msg and "delete" in msg
    assert "config hash ," not in msg
    assert run.hash_file.read_text() == content and (run.ckpt_dir / "latest.pth").is_file()  # nothing touched


def test_damaged_hash_record_with_overwrite_supersedes_by_the_saved_config(tmp_path):
    from stage1_cam.config import config_hash

    run = _prepared_run(tmp_path, name="h")
    (run.ckpt_dir).mkdir(parents=True)
    (run.ckpt_dir / "latest.pth").write_bytes(b"head")
    run.hash_file.write_text("")
    cfg = load_config(TINY, {"run.root": str(tmp_path), "run.name": "h", "dump.long_side": 96})
    run.prepare(cfg, overwrite=True)
    run.unlock()
    assert run.hash_file.read_text().strip() == config_hash(cfg)
    assert (run.ckpt_dir / "latest.pth").is_file()  # only the dump changed: the head is kept
    assert (run.path / "config.damaged.py").is_file()


# ---------------------------------------------------------------------- 16: retrain from elsewhere; a moved run
def test_retrain_from_another_directory_finds_the_stage2_config(tmp_path, monkeypatch):
    import pipelines.__main__ as pm
    from pipelines.stages import stage2_config

    run = _prepared_run(tmp_path / "runs")
    run.shard_dir.mkdir(parents=True)
    (run.shard_dir / "manifest.json").write_text(json.dumps({"complete": True, "shards": []}))
    calls = []

    def fake_run_cmd(cmd, **kw):
        calls.append(cmd)
        if cmd[2] == "stage2_seg.train":
            (run.stage2_dir / "last_checkpoint").write_text(str(run.stage2_dir / "iter_1.pth"))
        return {}

    monkeypatch.setattr(pm, "run_cmd", fake_run_cmd)
    monkeypatch.setattr(pm, "_data_root", lambda cfg: "unused")
    monkeypatch.setattr(pm, "manifest_complete", lambda paths, cfg: True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert pm.main(["retrain", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 0
    assert [c[2] for c in calls] == ["stage2_seg.train", "stage2_seg.test"]
    assert all(Path(c[3]).is_absolute() and Path(c[3]).is_file() for c in calls)
    recorded = json.loads((run.stage2_dir / "inputs.json").read_text())
    assert recorded["stage2_config"] == stage2_config("synthetic", None)  # recorded as before: same inputs hash
    assert not Path(recorded["stage2_config"]).is_absolute()


def test_a_run_moved_to_another_root_is_found_through_run_root(tmp_path, capsys, caplog):
    from pipelines.__main__ import main

    run = _prepared_run(tmp_path / "old")
    new_root = tmp_path / "new"
    (new_root / "synthetic").mkdir(parents=True)
    shutil.move(str(run.path), str(new_root / "synthetic" / "r"))
    assert main(["status", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={new_root}"]) == 0
    assert f"run {new_root / 'synthetic' / 'r'} " in capsys.readouterr().out
    # other stage-1 options are still refused (they would be ignored)
    assert main(["status", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={new_root}",
                 "train.lr=0.5"]) == 2
    assert not any("run.root" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
