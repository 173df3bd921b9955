"""Bad input around the pseudo-mask shards and the datasets (audit C: F7, F9, F10, F11, F15, F17).

Each case gets exit code 2 (or one user error) naming the file or value and the fix, before anything is written
where that is the point: a dump with another shard count, ``verify`` of a shard whose checksum record is garbage,
``verify --num-shards -1``, a synthetic set generated with other parameters, the dataset layout error's suggested
command, and ``dump --evaluate`` on a folder without shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from stage1_cam import dump as dump_mod
from stage1_cam.config import load_config
from stage1_cam.data import DatasetLayoutError, check_layout
from stage1_cam.data.__main__ import main as data_main
from stage1_cam.dump import runner
from stage1_cam.io import (ShardFormatError, ShardReader, ShardWriter, checksum_path, shard_filename, verify_shards,
                           write_manifest)
from stage1_cam.io.shards import check_split
from stage1_cam.io.verify import main as verify_main
from stage1_cam.utils.cli import BadInputError
from stage1_cam.utils.files import file_sha256
from tests.cli_errors import error_lines
from tests.test_integrity import _damage_label_chunks, _shard_set
from tests.test_shards import _meta

TINY = str(Path(__file__).resolve().parents[1] / "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py")


def _tree(root: Path) -> Dict[str, Any]:
    """Every file and folder under ``root`` with its content hash and mtime (to prove nothing changed)."""
    out: Dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("dir" if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns))
    return out


def _opts(synthetic_root: Path, runs: Path, **extra: Any) -> List[str]:
    opts = {"data.root": str(synthetic_root), "run.root": str(runs), **extra}
    return ["--cfg-options"] + [f"{k}={v}" for k, v in opts.items()]


# ------------------------------------------------------------------------ F9: a dump with another shard count


def test_dump_with_another_shard_count_is_refused_before_writing(tmp_path, synthetic_root, caplog, capfd):
    out = _shard_set(tmp_path, 2)  # a finished 2-way split with its manifest
    (out / runner.SUMMARY_NAME).write_text('{"seconds": 1.0, "images": 12}\n')  # what the report reads
    ckpt = tmp_path / "final.pth"
    ckpt.write_bytes(b"not reached")
    before = _tree(out)
    argv = [TINY, "--checkpoint", str(ckpt), "--num-shards", "4", "--shard", "all", "--out", str(out),
            "--no-progress"] + _opts(synthetic_root, tmp_path / "runs")
    assert dump_mod.main(argv) == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(out) in msg and "2-way" in msg and "4 shards" in msg
    assert "--num-shards 2" in msg and "--out" in msg and "remove the old shard files" in msg
    assert _tree(out) == before  # no new shard, no logs/, the summary and the manifest untouched
    assert verify_shards(out)["complete"]  # the run is not blocked


def test_run_dump_refuses_another_split_before_anything(tmp_path, synthetic_root):
    out = _shard_set(tmp_path, 3)
    (out / (shard_filename(0, 2) + ".partial")).write_bytes(b"")  # an unfinished shard of a 2-way split, too
    before = _tree(out)
    cfg = load_config(TINY, {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"),
                             "dump.num_shards": 4})
    with pytest.raises(ShardFormatError, match=r"2/3-way split.*4 shards were requested; nothing was written"):
        runner.run_dump(cfg, shards=[0], out_dir=out, checkpoint=tmp_path / "none.pth", device=torch.device("cpu"))
    assert _tree(out) == before
    check_split(tmp_path / "absent", 4)  # a new folder passes, and is not created
    assert not (tmp_path / "absent").exists()


def test_dump_summary_is_not_replaced_by_a_refused_dump(tmp_path, synthetic_root, monkeypatch):
    """The timing summary is aggregated only once the manifest accepted the shard set."""
    cfg = load_config(TINY, {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"),
                             "dump.num_shards": 2, "dump.crf.enabled": False, "dump.long_side": 64})
    out = tmp_path / "pm"
    out.mkdir()
    summary = out / runner.SUMMARY_NAME
    summary.write_text("previous summary\n")
    ckpt = tmp_path / "final.pth"
    ckpt.write_bytes(b"a checkpoint")

    def fake_dump_shard(predictor, dataset, names, writer, **kw) -> Dict[str, float]:
        for name in names:
            writer.write(name, label=np.zeros((4, 4), np.uint8), confidence=np.ones((4, 4), np.float32),
                         image_labels=dataset.image_labels(name))
        writer.finalize()
        return {"images": len(names), "seconds": 2.0, "images_per_s": len(names) / 2.0}

    def refused(out_dir, num_shards, **kw):
        raise ShardFormatError(f"{out_dir}: refused (simulated damage of another shard)")

    real_manifest = runner.write_manifest
    monkeypatch.setattr(runner, "build_predictor", lambda *a, **kw: object())
    monkeypatch.setattr(runner, "dump_shard", fake_dump_shard)
    monkeypatch.setattr(runner, "write_manifest", refused)
    with pytest.raises(ShardFormatError, match="refused"):
        runner.run_dump(cfg, shards=[0], out_dir=out, checkpoint=ckpt, device=torch.device("cpu"), progress=False)
    assert summary.read_text() == "previous summary\n"
    monkeypatch.setattr(runner, "write_manifest", real_manifest)
    runner.run_dump(cfg, shards=[1], out_dir=out, checkpoint=ckpt, device=torch.device("cpu"), progress=False)
    data = json.loads(summary.read_text())  # both shards' timings: the refused run's shard was kept
    assert set(data["shards"]) == {"0", "1"} and data["images"] == 16 and data["seconds"] == 4.0


# ------------------------------------------------------------------- F10: a garbage <shard>.h5.sha256 record


@pytest.mark.parametrize("record", [b"garbage\n", b"", b"\xff\xfe\x00\n", b"0123abcd  shard.h5\n"],
                         ids=["text", "empty", "binary", "short-digest"])
def test_verify_refuses_a_damaged_checksum_record(tmp_path, caplog, capfd, record):
    out = _shard_set(tmp_path, 2)
    path = out / shard_filename(0, 2)
    _damage_label_chunks(path, np.random.default_rng(3), images=1, flips=1)
    checksum_path(path).write_bytes(record)
    (out / "manifest.json").unlink()  # nothing else remembers the shard's hash
    before = _tree(out)
    assert verify_main([str(out)]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(checksum_path(path)) in msg and "damaged" in msg and f"delete {path}" in msg
    assert "make pseudo-labels" in msg
    assert _tree(out) == before  # the damaged file's hash is not recorded, no manifest is written
    with pytest.raises(ShardFormatError, match=re.escape(str(checksum_path(path)))):
        write_manifest(out, 2)


def test_damaged_checksum_record_is_refused_with_a_manifest_too(tmp_path):
    out = _shard_set(tmp_path, 2)
    path = out / shard_filename(1, 2)
    checksum_path(path).write_text("garbage\n")
    with pytest.raises(ShardFormatError, match=re.escape(str(checksum_path(path)))):
        verify_shards(out)
    with ShardReader(out) as reader, pytest.raises(ShardFormatError, match="damaged"):
        reader.verify()


def test_a_shard_without_any_checksum_file_is_still_an_older_versions(tmp_path, caplog):
    out = _shard_set(tmp_path, 2)
    path = out / shard_filename(0, 2)
    checksum_path(path).unlink()  # written before checksum files existed
    (out / "manifest.json").unlink()
    with caplog.at_level(logging.INFO, logger="stage1_cam.io.shards"):
        assert verify_shards(out)["complete"]
    assert "older version" in caplog.text
    assert checksum_path(path).read_text().split()[0] == file_sha256(path)


# ------------------------------------------------------------------------------------ F7: verify --num-shards


@pytest.mark.parametrize("value", ["-1", "0", "100000"])
def test_verify_num_shards_out_of_range_exits_2(tmp_path, caplog, capfd, value):
    out = _shard_set(tmp_path, 2)
    before = _tree(out)
    assert verify_main([str(out), "--num-shards", value]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert "--num-shards" in msg and value in msg and "[1, 99999]" in msg
    assert _tree(out) == before
    with pytest.raises(BadInputError):  # the library refuses it as bad input too (still a ValueError)
        verify_shards(out, int(value))


# ---------------------------------------------------------------- F15: the layout error's suggested command


def _suggested(msg: str) -> List[str]:
    return [c for c in re.findall(r"`([^`]*)`", msg) if c.startswith("python -m stage1_cam.data")]


def _run_suggested(cmd: str, config: Path, new_folder: Path) -> int:
    argv = cmd.replace("CONFIG", str(config)).replace("NEW_FOLDER", str(new_folder)).split()
    assert argv[:3] == ["python", "-m", "stage1_cam.data"]
    return data_main(argv[3:])


@pytest.fixture()
def small_config(tmp_path) -> Path:
    cfg = tmp_path / "small.py"
    cfg.write_text("data = dict(dataset='synthetic', synthetic=dict(num_train=2, num_val=1, image_size=(32, 32), "
                   "max_objects=1, seed=0))\n")
    return cfg


def test_layout_error_on_a_foreign_folder_suggests_a_command_that_works(tmp_path, small_config):
    root = tmp_path / "notds"
    root.mkdir()
    (root / "notes.txt").write_text("my files\n")
    with pytest.raises(DatasetLayoutError) as err:
        check_layout("synthetic", root)
    msg = str(err.value)
    assert str(root) in msg and "not a synthetic dataset" in msg
    cmds = _suggested(msg)
    elsewhere = [c for c in cmds if str(root) not in c]  # the folder itself is refused as it is
    assert elsewhere, msg
    assert _run_suggested(elsewhere[0], small_config, tmp_path / "new") == 0
    check_layout("synthetic", tmp_path / "new")
    assert (root / "notes.txt").read_text() == "my files\n"
    # the other way it names: delete the folder, then generate it there
    (here,) = [c for c in cmds if str(root) in c]
    shutil.rmtree(root)
    assert _run_suggested(here, small_config, tmp_path / "unused") == 0
    check_layout("synthetic", root)


def test_layout_error_on_a_damaged_or_missing_set_suggests_a_command_that_works(tmp_path, small_config):
    root = tmp_path / "syn"
    with pytest.raises(DatasetLayoutError, match="make data DATASET=synthetic") as err:
        check_layout("synthetic", root)  # missing: generate it there
    (cmd,) = _suggested(str(err.value))
    assert _run_suggested(cmd, small_config, tmp_path / "unused") == 0
    shutil.rmtree(root / "SegmentationClassAug")  # generated, then damaged: generating again would not repair it
    with pytest.raises(DatasetLayoutError) as err:
        check_layout("synthetic", root)
    msg = str(err.value)
    assert f"Delete {root}" in msg
    (cmd,) = _suggested(msg)
    shutil.rmtree(root)
    assert _run_suggested(cmd, small_config, tmp_path / "unused") == 0
    check_layout("synthetic", root)


# ------------------------------------------------------------- F17: dump --evaluate on a folder without shards


@pytest.mark.parametrize("content", ["empty", "partial-only", "missing"])
def test_evaluate_without_shards_is_refused_before_writing(tmp_path, synthetic_root, caplog, capfd, content):
    out = tmp_path / "shards"
    if content != "missing":
        out.mkdir()
    if content == "partial-only":
        (out / (shard_filename(0, 2) + ".partial")).write_bytes(b"")
    before = _tree(out) if out.exists() else None
    argv = [TINY, "--evaluate", "--out", str(out)] + _opts(synthetic_root, tmp_path / "runs", **{"dump.num_shards": 2})
    assert dump_mod.main(argv) == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(out) in msg and "nothing to evaluate" in msg and "dataset None" not in msg
    assert (_tree(out) if out.exists() else None) == before  # no manifest.json, no logs/
    assert content != "missing" or not out.exists()


def test_reader_of_a_manifest_without_finished_shards_says_so(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    write_manifest(out, 2)  # lists no shard at all
    with pytest.raises(FileNotFoundError, match="holds no finished pseudo-mask shards"):
        ShardReader(out, expected_dataset="synthetic", allow_incomplete=True)
    with ShardWriter(out, 0, 2, meta=_meta()) as w:
        w.finalize()  # an empty but finished shard is a shard: read as such
    write_manifest(out, 2)
    with ShardReader(out, expected_dataset="synthetic", allow_incomplete=True) as reader:
        assert reader.ids == []
