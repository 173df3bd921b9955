"""Run lifecycle (issue 17, cases 6-9): stage invalidation, run lock, unique temporary files, full disk, workers.

* case 6: a changed config (``--overwrite``) invalidates exactly the stages it affects; their old outputs are
  moved to ``superseded/``; a dump-only change keeps the trained head; a stage-2 change retrains stage 2 only.
* case 7: a full disk gives one clear error (exit 2) naming the folder and the space, before or during a shard,
  and the partial shard resumes.
* case 8: one process at a time in a run directory (``run.lock``); temporary file names are unique per writer.
* case 9: the dump's CRF workers (and the pipeline's stage commands) die with a process killed by ``kill -9``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from stage1_cam.config import config_hash, default_config, load_config
from stage1_cam.utils.run_dir import RunDir, RunDirError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py")


def _argv(opts: dict) -> list:
    return ["--cfg-options"] + [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in opts.items()]


def _opts(root: Path, runs: Path, **extra: object) -> dict:
    opts = {"data.root": str(root), "run.root": str(runs), "run.name": "life", "dump.long_side": 64,
            "dump.num_shards": 2, "dump.batch_size": 3, "dump.crf.workers": 1, "train.max_iters": 2,
            "train.batch_size": 2, "train.val_interval": 0, "train.ckpt_interval": 1, "data.crop_size": 64}
    opts.update(extra)
    return opts


def _children(pid: int) -> list:
    """Pids of the live direct children of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


# ------------------------------------------------------------------------------------- case 8: temp files
def test_atomic_write_uses_unique_temporary_names_and_cleans_up(tmp_path):
    from stage1_cam.utils.files import atomic_write, atomic_write_text

    target = tmp_path / "sub" / "latest.pth"
    seen = []
    for _ in range(2):
        with atomic_write(target) as tmp:
            seen.append(tmp)
            assert tmp.parent == target.parent and str(os.getpid()) in tmp.name and tmp.suffix == ".pth"
            tmp.write_bytes(b"x")
    assert seen[0] != seen[1] and target.read_bytes() == b"x"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"x" and sorted(p.name for p in target.parent.iterdir()) == ["latest.pth"]
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert (tmp_path / "a.json").read_text() == "{}\n"


# Renames that are not a hand-written "temporary file, then rename" (utils/files.atomic_write is the one of those),
# by (file, enclosing function, call).
RENAMES_ALLOWED = {
    # The HDF5 copy of a damaged partial shard's complete images replaces that partial file, under the shard's
    # lock; the fixed ".recover" name lets the next writer delete what a killed recovery left.
    ("stage1_cam/io/shards.py", "ShardWriter._recover", "os.replace(tmp, self.partial_path)"),
    # Finishing a shard renames the fsynced partial file itself to its final name (no temporary copy).
    ("stage1_cam/io/shards.py", "ShardWriter.finalize", "os.replace(self.partial_path, self.path)"),
    # A changed config moves the previous one aside as a backup (a move, not a write).
    ("stage1_cam/utils/run_dir.py", "RunDir.prepare", "self.config_file.rename(backup)"),
    # Superseded outputs move into superseded/<time>-<reason>/ (a move, not a write).
    ("stage1_cam/utils/run_dir.py", "RunDir.supersede", "shutil.move(str(src), str(dest / rel))"),
}


def _rename_calls(root: Path):
    """(file, enclosing function, call source) of every os.replace / os.rename / Path.rename / Path.replace(target)
    call in the packages, outside utils/files.py."""
    import ast

    found = []
    for pkg in ("stage1_cam", "stage2_seg", "pipelines", "tools"):
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "stage1_cam/utils/files.py":
                continue
            text = path.read_text()

            def visit(node, scope):
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        visit(child, scope + [child.name])
                        continue
                    if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                        f = child.func
                        on_os = isinstance(f.value, ast.Name) and f.value.id in ("os", "shutil")
                        if (on_os and f.attr in ("replace", "rename", "renames", "move")) or (not on_os and (
                                f.attr == "rename" or (f.attr == "replace" and len(child.args) == 1
                                                       and not child.keywords))):
                            found.append((rel, ".".join(scope), ast.get_source_segment(text, child)))
                    visit(child, scope)

            visit(ast.parse(text, rel), [])
    return found


def test_every_write_then_rename_goes_through_atomic_write():
    """No module writes a temporary file and renames it by hand: `utils.files.atomic_write` does it (unique name,
    clean-up on failure, optional fsync); the renames left are listed, with their reason, in RENAMES_ALLOWED."""
    root = Path(__file__).resolve().parents[1]
    found = set(_rename_calls(root))
    unexpected = sorted(found - RENAMES_ALLOWED)
    assert not unexpected, ("write through stage1_cam.utils.files.atomic_write / atomic_write_text, or add the site "
                            "with its reason to RENAMES_ALLOWED:\n" + "\n".join(map(str, unexpected)))
    assert not RENAMES_ALLOWED - found, f"stale RENAMES_ALLOWED entries: {sorted(RENAMES_ALLOWED - found)}"


def test_the_rename_scan_sees_hand_written_renames(tmp_path):
    pkg = tmp_path / "stage1_cam"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "utils" / "files.py").write_text("import os\nos.replace('a', 'b')\n")  # the helper itself: skipped
    (pkg / "m.py").write_text("import os\nfrom pathlib import Path\n\nclass W:\n    def save(self, p):\n"
                              "        os.replace(p + '.tmp', p)\n        Path(p).with_suffix('.x').replace(p)\n"
                              "        Path(p).rename('q')\n        return 'a'.replace('a', 'b')\n")
    assert _rename_calls(tmp_path) == [
        ("stage1_cam/m.py", "W.save", "os.replace(p + '.tmp', p)"),
        ("stage1_cam/m.py", "W.save", "Path(p).with_suffix('.x').replace(p)"),
        ("stage1_cam/m.py", "W.save", "Path(p).rename('q')")]


def test_checkpoint_temporary_name_is_unique_per_writer(tmp_path, monkeypatch):
    from stage1_cam import train as train_mod

    names = []
    real_save = torch.save
    monkeypatch.setattr(train_mod.torch, "save", lambda obj, f: (names.append(Path(f).name), real_save(obj, f)))
    train_mod.save_checkpoint(tmp_path / "latest.pth", {"format": "x"})
    train_mod.save_checkpoint(tmp_path / "latest.pth", {"format": "y"})
    assert "latest.pth.tmp" not in names and len(set(names)) == 2
    assert all(str(os.getpid()) in n for n in names)
    assert torch.load(tmp_path / "latest.pth")["format"] == "y"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


# ------------------------------------------------------------------------------------- case 8: run lock
_HOLDER = """
import sys, time
from stage1_cam.config import load_config
from stage1_cam.utils.run_dir import RunDir
cfg = load_config(sys.argv[2], {"run.root": sys.argv[1], "run.name": "default"})
run = RunDir.from_config(cfg).prepare(cfg)
print("ready", flush=True)
time.sleep(120)
"""


def _start_holder(root: Path, config: str = CONFIG) -> subprocess.Popen:
    """A process that prepares (and so locks) the run ``default`` of ``config`` under ``root``, then sleeps."""
    env = {k: v for k, v in os.environ.items() if k != "WSSS_RUN_LOCK"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), config], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_run_lock_refuses_a_second_process_and_takes_over_a_dead_ones(tmp_path, monkeypatch):
    from stage1_cam.utils.run_dir import RunLockedError

    monkeypatch.delenv("WSSS_RUN_LOCK", raising=False)
    holder = _start_holder(tmp_path)
    try:
        cfg = load_config(CONFIG, {"run.root": str(tmp_path), "run.name": "default"})
        run = RunDir.from_config(cfg)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host") as err:
            run.prepare(cfg)
        assert str(run.lock_file) in str(err.value)
        # A stage command started by the holder (it inherits the holder's token) shares the lock.
        token = json.loads(run.lock_file.read_text())["token"]
        monkeypatch.setenv("WSSS_RUN_LOCK", token)
        RunDir.from_config(cfg).prepare(cfg)
        monkeypatch.delenv("WSSS_RUN_LOCK")
    finally:
        holder.kill()
        holder.wait()
    # kill -9 left the lock file behind: the next process takes it over (its holder is dead).
    assert json.loads(run.lock_file.read_text())["pid"] == holder.pid
    run = RunDir.from_config(cfg).prepare(cfg)
    assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
    run.unlock()
    assert not run.lock_file.exists()


def test_second_pseudo_labels_on_one_run_is_refused(tmp_path, monkeypatch, capsys):
    from pipelines.__main__ import main as pipeline_main

    voc = str(REPO / "configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py")
    monkeypatch.delenv("WSSS_RUN_LOCK", raising=False)
    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "nodata"))  # a command that got past the lock fails fast
    holder = _start_holder(tmp_path, voc)  # holds <tmp>/voc/default, same config
    try:
        for command in ("pseudo-labels", "retrain"):
            argv = [command, "--config", voc, "--run", "default", "--cfg-options", f"run.root={tmp_path}"]
            code = pipeline_main(argv)
            err = capsys.readouterr().err
            assert code == 2 and f"pid {holder.pid}" in err and "run.lock" in err and "Traceback" not in err, err
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------- case 6: stage hashes
def test_stage_hashes_follow_the_sections_each_stage_reads():
    from stage1_cam.utils.run_dir import changed_stages, stage_hash

    base = default_config()
    dump_only = default_config({"dump.crf.enabled": False})
    eval_only = default_config({"data.eval_split": "val"})
    lr = default_config({"train.lr": 1e-4})
    cam = default_config({"cam.box_threshold": 0.5})
    assert stage_hash(base, "train") == stage_hash(dump_only, "train") == stage_hash(eval_only, "train")
    assert stage_hash(base, "dump") == config_hash(base) != stage_hash(dump_only, "dump")
    assert stage_hash(base, "train") != stage_hash(lr, "train")
    assert changed_stages(base, base) == []
    assert changed_stages(base, dump_only) == ["dump", "stage2", "report"]
    assert changed_stages(base, lr) == ["train", "dump", "stage2", "report"]
    assert changed_stages(base, cam)[0] == "cams" and "train" in changed_stages(base, cam)
    assert set(changed_stages(None, base)) >= {"cams", "train", "dump", "stage2", "report"}
    # The CAM run follows train.amp (and no other train key).
    assert changed_stages(base, default_config({"train.amp": "bf16"}))[0] == "cams"
    assert stage_hash(base, "cams") == stage_hash(lr, "cams")


def _fake_outputs(run: RunDir) -> dict:
    files = {"stage1/checkpoints/final.pth": b"head", "stage1/train_summary.json": b"{}",
             "pseudo_masks/manifest.json": b"{}", "pseudo_masks/metrics.json": b"{}",
             "stage2/metrics.json": b"{}", "report/metrics.json": b"{}", "stage1/train.log": b"log"}
    for rel, data in files.items():
        (run.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.path / rel).write_bytes(data)
    return files


def test_overwrite_moves_aside_exactly_the_invalidated_outputs(tmp_path):
    cfg = default_config({"run.root": str(tmp_path)})
    run = RunDir.from_config(cfg).prepare(cfg)
    files = _fake_outputs(run)
    old_hash = config_hash(cfg)

    new = default_config({"run.root": str(tmp_path), "dump.crf.enabled": False})
    with pytest.raises(RunDirError, match="OVERWRITE=1"):
        run.prepare(new)
    assert all((run.path / rel).is_file() for rel in files), "a refused config moves nothing"
    run.prepare(new, overwrite=True)
    kept = {"stage1/checkpoints/final.pth", "stage1/train_summary.json", "stage1/train.log"}
    for rel in kept:
        assert (run.path / rel).read_bytes() == files[rel], f"{rel} does not depend on dump settings"
    moved = sorted(run.superseded_dir.iterdir())
    assert len(moved) == 1 and moved[0].name.endswith(f"config-{old_hash}")
    for rel in set(files) - kept:
        assert not (run.path / rel).exists(), f"{rel} was made with the old dump settings"
        assert (moved[0] / rel).read_bytes() == files[rel]

    # A training change supersedes the head too (and everything after it).
    files = _fake_outputs(run)
    lr = default_config({"run.root": str(tmp_path), "dump.crf.enabled": False, "train.lr": 1e-4})
    run.prepare(lr, overwrite=True)
    assert not (run.path / "stage1/checkpoints").exists() and (run.path / "stage1/train.log").is_file()
    assert len(list(run.superseded_dir.iterdir())) == 2
    assert load_config(run.config_file).train.lr == 1e-4


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A 2-iteration tiny head in its run directory (checkpoints at steps 1 and 2)."""
    from stage1_cam.train import main as train_main

    runs = tmp_path_factory.mktemp("runs")
    opts = _opts(synthetic_root, runs)
    assert train_main([CONFIG] + _argv(opts)) == 0
    run = RunDir.from_config(load_config(CONFIG, opts))
    assert run.final_ckpt.is_file() and (run.ckpt_dir / "latest.pth").is_file()
    return {"opts": opts, "run": run}


def test_dump_only_change_keeps_the_trained_head(trained):
    from stage1_cam.train import load_checkpoint, main as train_main

    run, opts = trained["run"], trained["opts"]
    before = run.final_ckpt.read_bytes()
    new_opts = {**opts, "dump.crf.enabled": False}
    # Before the fix: training refused latest.pth (old whole-config hash) with exit 2 and the run was stuck.
    assert train_main([CONFIG, "--overwrite"] + _argv(new_opts)) == 0
    assert run.final_ckpt.read_bytes() == before, "a dump-only change must not retrain the head"

    from stage1_cam.train import trained_for
    from stage1_cam.utils.run_dir import stage_hash

    cfg = load_config(CONFIG, new_opts)
    assert trained_for(run.final_ckpt, cfg), "the head was trained with the same training settings"
    assert load_checkpoint(run.final_ckpt)["train_hash"] == stage_hash(cfg, "train")
    # A training change is another head: trained_for says so (the pipeline retrains it).
    assert not trained_for(run.final_ckpt, load_config(CONFIG, {**new_opts, "train.lr": 1e-4}))


def test_resume_after_a_dump_only_change_continues_the_same_head(trained, tmp_path):
    """A training killed after step 1, resumed under OVERWRITE=1 with a dump-only change: the same final head."""
    import shutil

    from stage1_cam.train import load_checkpoint, main as train_main

    src = trained["run"]
    opts = {**trained["opts"], "run.root": str(tmp_path)}
    run = RunDir.from_config(load_config(CONFIG, opts))
    run.ckpt_dir.mkdir(parents=True)
    shutil.copy(src.ckpt_dir / "iter_000001.pth", run.ckpt_dir / "latest.pth")  # as if killed after step 1
    assert train_main([CONFIG] + _argv({**opts, "train.lr": 1e-4})) == 2  # other training settings: refused
    assert train_main([CONFIG, "--overwrite"] + _argv({**opts, "dump.crf.enabled": False})) == 0  # before: exit 2
    ours, ref = load_checkpoint(run.final_ckpt), load_checkpoint(src.final_ckpt)
    assert ours["step"] == ref["step"] == 2
    for k, v in ref["head"].items():
        assert torch.equal(ours["head"][k], v), k


# --------------------------------------------------------------------------- case 6: stage 2 inputs
def test_stage2_change_retrains_stage2_only(trained, tmp_path, monkeypatch):
    """A new --s2-options: refused without OVERWRITE, else stage 2 (and the report) moved aside and retrained."""
    import pipelines.__main__ as pm

    run_src = trained["run"]
    opts = {**trained["opts"], "run.root": str(tmp_path)}
    cfg = load_config(CONFIG, opts)
    run = RunDir.from_config(cfg).prepare(cfg)
    shard_dir = run.shard_dir
    shard_dir.mkdir(parents=True)
    (shard_dir / "manifest.json").write_text(json.dumps(
        {"complete": True, "config_hash": config_hash(cfg), "num_shards": cfg.dump.num_shards,
         "checkpoint_hash": "c", "shards": [{"file": "shard-00000-of-00002.h5", "sha256": "s"}]}))
    calls = []

    def fake_run_cmd(cmd, **kw):
        calls.append(cmd[2])
        work = run.stage2_dir
        work.mkdir(parents=True, exist_ok=True)
        if cmd[2] == "stage2_seg.train":
            (work / "iter_4.pth").write_text("ckpt")
            (work / "last_checkpoint").write_text(str(work / "iter_4.pth"))
        else:
            (work / "metrics.json").write_text(json.dumps({"mIoU": len(calls)}))
        return {}

    monkeypatch.setattr(pm, "run_cmd", fake_run_cmd)
    monkeypatch.setattr(pm, "_data_root", lambda cfg: "unused")
    monkeypatch.setattr(pm, "manifest_complete", lambda paths, cfg: True)  # the shards themselves are not needed
    argv = ["retrain", "--config", CONFIG, "--run", cfg.run.name] + _argv({"run.root": str(tmp_path)})
    assert pm.main(argv + ["--s2-options", "train_cfg.max_iters=4"]) == 0
    assert calls == ["stage2_seg.train", "stage2_seg.test"]
    first = json.loads((run.stage2_dir / "metrics.json").read_text())
    (run.report_dir).mkdir()
    (run.report_dir / "metrics.json").write_text("{}")

    calls.clear()  # same inputs: nothing to do, with or without --overwrite
    assert pm.main(argv + ["--s2-options", "train_cfg.max_iters=4"]) == 0
    assert pm.main(argv + ["--s2-options", "train_cfg.max_iters=4", "--overwrite"]) == 0
    assert calls == []

    # Other stage-2 options: refused without OVERWRITE (before: "metrics exist: skipped", silently) ...
    assert pm.main(argv + ["--s2-options", "train_cfg.max_iters=8"]) == 2
    assert calls == []
    # ... and with it, the old stage-2 outputs and report go to superseded/, then stage 2 trains from scratch.
    assert pm.main(argv + ["--s2-options", "train_cfg.max_iters=8", "--overwrite"]) == 0
    assert calls == ["stage2_seg.train", "stage2_seg.test"]
    moved = list(run.superseded_dir.glob("*/stage2/metrics.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text()) == first
    assert list(run.superseded_dir.glob("*/report/metrics.json")) and not run.report_dir.exists()
    assert run.shard_dir.is_dir() and (run.shard_dir / "manifest.json").is_file(), "the shards are kept"
    assert run_src.final_ckpt.is_file()


# ------------------------------------------------------------------------------------- case 7: full disk
def test_is_disk_full_sees_errno_and_h5py_messages():
    from stage1_cam.utils.files import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError("[Errno 28] Can't write data (file write failed: ..., errno = 28, error message = "
                          "'No space left on device')")
        except OSError as inner:
            raise OSError("shard: writing image 'x' failed") from inner
    except OSError as e:
        assert is_disk_full(e)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_dump_refuses_a_shard_that_does_not_fit(trained, tmp_path, monkeypatch, capsys):
    from stage1_cam import dump as dump_mod

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    out = tmp_path / "masks"
    code = dump_mod.main([CONFIG, "--out", str(out), "--no-progress"] + _argv(trained["opts"]))
    assert code == 2
    msg = capsys.readouterr().err
    assert "Traceback" not in msg and str(out) in msg and "needs about" in msg and "MiB free" in msg and "--out" in msg
    assert not list(out.glob("*.h5")), "nothing finished"


def test_enospc_while_writing_is_one_error_and_the_shard_resumes(trained, tmp_path, monkeypatch, capsys):
    from stage1_cam import dump as dump_mod
    from stage1_cam.io import ShardReader, ShardWriter, shard_filename

    out, ref = tmp_path / "masks", tmp_path / "ref"
    argv = [CONFIG, "--shard", "0", "--no-progress"] + _argv(trained["opts"])
    assert dump_mod.main(argv + ["--out", str(ref)]) == 0
    real_write, calls = ShardWriter.write, []

    def full_disk_write(self, name, **kw):
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(threading.current_thread().name)
        return real_write(self, name, **kw)

    monkeypatch.setattr(ShardWriter, "write", full_disk_write)
    capsys.readouterr()
    assert dump_mod.main(argv + ["--out", str(out)]) == 2  # before: an OSError traceback
    msg = capsys.readouterr().err
    assert "no space left" in msg and str(out) in msg and "free" in msg
    assert set(calls) == {"dump-write"}  # raised in the writer thread, reported as before
    assert (out / (shard_filename(0, 2) + ".partial")).is_file() and not (out / shard_filename(0, 2)).exists()
    monkeypatch.setattr(ShardWriter, "write", real_write)
    assert dump_mod.main(argv + ["--out", str(out)]) == 0
    with ShardReader(out, allow_incomplete=True) as a, ShardReader(ref, allow_incomplete=True) as b:
        assert sorted(a.ids) == sorted(b.ids)
        for n in a.ids:
            assert (a.label(n) == b.label(n)).all() and (a.confidence(n) == b.confidence(n)).all()


def _meta():
    from stage1_cam.io.shards import ShardMeta

    return ShardMeta(dataset="synthetic", split="train", class_names=tuple(f"c{i}" for i in range(21)),
                     palette=[(0, 0, 0)] * 21)


def _image(i: int):
    rng = np.random.default_rng(i)  # random values: lzf cannot shrink them, so the file grows by each image
    return {"label": rng.integers(0, 21, (64, 64)), "confidence": rng.random((64, 64)), "image_labels": [1]}


def test_an_image_that_does_not_fit_is_refused_before_hdf5_writes(tmp_path, monkeypatch):
    """Each image is checked against the free space before HDF5 touches the file (a failed HDF5 write leaves a
    file HDF5 cannot close); the refused shard closes cleanly and resumes."""
    from stage1_cam.io import ShardWriter
    from stage1_cam.utils.files import DiskFullError

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    with ShardWriter(tmp_path, 0, 1, meta=_meta()) as w:
        for i in range(2):
            w.write(f"img{i}", **_image(i))
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 4096, 4096))
        with pytest.raises(DiskFullError, match=r"image 'img2' of shard-00000-of-00001\.h5\.partial needs about") as e:
            w.write("img2", **_image(2))
        assert str(tmp_path) in str(e.value) and "0.0 MiB free" in str(e.value)
    monkeypatch.setattr(shutil, "disk_usage", real)
    with ShardWriter(tmp_path, 0, 1, meta=_meta()) as w:
        assert w.done_ids == {"img0", "img1"}
        w.write("img2", **_image(2))
        w.finalize()


_FSIZE_CHILD = """
import resource, sys
import numpy as np
from stage1_cam.io import ShardWriter
from stage1_cam.utils.cli import run_main
from stage1_cam.utils.logging import setup_logging
from tests.test_lifecycle import _image, _meta

def body(out):
    with ShardWriter(out, 0, 1, meta=_meta()) as w:
        # A file size limit makes HDF5's writes fail (EFBIG) the way a full disk does (ENOSPC), without root.
        resource.setrlimit(resource.RLIMIT_FSIZE, (w.partial_path.stat().st_size + 40000, resource.RLIM_INFINITY))
        for i in range(40):
            w.write(f"img{i}", **_image(i))
        w.finalize()
    return 0

setup_logging()
sys.exit(run_main(body, sys.argv[1], logger="stage1_cam.test"))
"""


def test_a_failed_hdf5_write_is_one_error_and_the_shard_resumes(tmp_path):
    """HDF5 reports a failed write only when h5py releases the object (not to the caller), and closing such a file
    crashes (exit 139 before the fix). The writer turns it into one error, exit 2, and the shard resumes."""
    from stage1_cam.io import ShardReader, ShardWriter

    proc = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for noise in ("Traceback", "Exception ignored", "Segmentation", "Fatal Python error"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "shard-00000-of-00001.h5.partial" in lines[0], lines
    assert "failed (errno 27: File too large)" in lines[0] and "re-run" in lines[0], lines
    failed_at = int(lines[0].split("writing image 'img")[1].split("'")[0])
    with ShardWriter(tmp_path, 0, 1, meta=_meta()) as w:
        assert w.done_ids == {f"img{i}" for i in range(failed_at)}  # the images written before, durable
        for i in range(failed_at, 40):
            w.write(f"img{i}", **_image(i))
        w.finalize()
    with ShardReader(tmp_path) as r:
        for i in range(40):
            ref = _image(i)
            assert (r.label(f"img{i}") == ref["label"]).all()
            assert (r.confidence(f"img{i}") == ref["confidence"].astype(np.float16)).all()


@pytest.mark.slow  # four dump processes (about 25 s); test_enospc_while_writing covers the error path fast
def test_a_disk_that_fills_during_the_dump_is_one_error(trained, tmp_path):
    """A real full disk (a small tmpfs, filled by another writer once the shard is open): exit 2 with one line, no
    crash; with space again the dump resumes to the same shard as an uninterrupted run. Needs mount rights."""
    from stage1_cam.io import ShardReader, shard_filename

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount rights")
    try:
        out, ref = mnt / "masks", tmp_path / "ref"
        argv = [CONFIG, "--shard", "0", "--no-progress"] + _argv({**trained["opts"], "dump.flush_every": 1})
        assert subprocess.run([sys.executable, "-c", _DUMP_CHILD, *argv, "--out", str(ref)], cwd=REPO,
                              capture_output=True).returncode == 0
        partial, fill = out / (shard_filename(0, 2) + ".partial"), mnt / "fill"

        def fill_the_disk() -> None:
            deadline = time.monotonic() + 120
            while not partial.exists() and time.monotonic() < deadline:
                time.sleep(0.002)
            with open(fill, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass

        filler = threading.Thread(target=fill_the_disk, daemon=True)
        filler.start()
        proc = subprocess.run([sys.executable, "-c", _DUMP_CHILD, *argv, "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        filler.join(timeout=60)
        assert proc.returncode == 2, proc.stderr[-3000:]  # before: a segmentation fault (139)
        for noise in ("Traceback", "Exception ignored", "Segmentation", "Logging error"):
            assert noise not in proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if " E " in ln]
        assert len(errors) == 1 and "no space left on the disk of" in errors[0] and str(out) in errors[0], errors
        fill.unlink()
        rerun = subprocess.run([sys.executable, "-c", _DUMP_CHILD, *argv, "--out", str(out)], cwd=REPO,
                               capture_output=True, text=True)
        if rerun.returncode == 2:
            # HDF5 may have written part of its metadata before the write failed (it is not crash-consistent):
            # then the unfinished shard is unreadable, and the one error says to delete it.
            assert "Traceback" not in rerun.stderr and f"{partial} is truncated or unreadable" in rerun.stderr
            assert "delete it and re-run" in rerun.stderr, rerun.stderr[-2000:]
            partial.unlink()
            rerun = subprocess.run([sys.executable, "-c", _DUMP_CHILD, *argv, "--out", str(out)], cwd=REPO,
                                   capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        with ShardReader(out, allow_incomplete=True) as a, ShardReader(ref, allow_incomplete=True) as b:
            assert sorted(a.ids) == sorted(b.ids)
            for n in a.ids:
                assert (a.label(n) == b.label(n)).all() and (a.confidence(n) == b.confidence(n)).all()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_check_free_space_message(tmp_path, monkeypatch):
    from stage1_cam.utils.files import DiskFullError, check_free_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 90, 10 * 2 ** 20))
    check_free_space(tmp_path, 2 ** 20)
    with pytest.raises(DiskFullError, match=r"needs about 20\.0 MiB, 10\.0 MiB free") as err:
        check_free_space(tmp_path, 20 * 2 ** 20, what="shard 0")
    assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)


# ------------------------------------------------------------------------------ case 9: orphan workers
_DUMP_CHILD = """
import sys
from stage1_cam.dump import main
sys.exit(main(sys.argv[1:]))
"""


def test_crf_workers_die_with_a_killed_dump(trained, tmp_path):
    """kill -9 a dump mid-shard: its CRF worker and multiprocessing's resource tracker exit within seconds."""
    from stage1_cam.io import shard_filename

    out = tmp_path / "masks"
    argv = [CONFIG, "--out", str(out), "--no-progress"] + _argv({**trained["opts"], "dump.crf.workers": 2})
    proc = subprocess.Popen([sys.executable, "-c", _DUMP_CHILD, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        children: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            children = _children(proc.pid)
            # two CRF workers + the resource tracker, and the first shard is open
            if len(children) >= 3 and (out / (shard_filename(0, 2) + ".partial")).exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the dump ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert len(children) >= 3, children
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait_gone(children, timeout=10.0) == [], "CRF workers / resource tracker outlived the killed dump"


_RUN_CMD_PARENT = """
import sys
from pipelines.stages import run_cmd
run_cmd([sys.executable, "-c", "import time; time.sleep(120)"])
"""


def test_stage_commands_die_with_a_killed_pipeline():
    proc = subprocess.Popen([sys.executable, "-c", _RUN_CMD_PARENT], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        children: list = []
        while time.monotonic() < deadline and not children:
            children = _children(proc.pid)
            time.sleep(0.05)
        assert children
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait_gone(children, timeout=10.0) == []
