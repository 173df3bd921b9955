"""Issue 17, cases 1, 4, 5, 11: damaged shards are never read back as valid, the manifest heals itself.

Shards are corrupted in place (bytes flipped inside stored label chunks, file size unchanged), as a failing
disk or a stray write would; every read path and every stage start must then refuse them, naming the file,
the image and the fix, while a deleted shard is dumped again on its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np
import pytest

from stage1_cam.io import (ShardFormatError, ShardReader, ShardWriter, assign_shards, checksum_path, shard_filename,
                           user_message, verify_shards, write_manifest)
from stage1_cam.io.verify import main as verify_main
from stage1_cam.utils.files import file_sha256
from tests.shard_data import LabelDataset
from tests.test_shards import IDS, _meta, _sample, _write_shards


def _label_chunks(path: Path, n: int | None = None) -> list[tuple[str, int, int]]:
    """(image id, file offset, stored size) of the label chunk of the first ``n`` images of a shard."""
    out = []
    with h5py.File(path, "r") as f:
        for key in list(f["images"])[:n]:
            info = f["images"][key]["label"].id.get_chunk_info(0)
            out.append((unquote(key), info.byte_offset, info.size))
    return out


def _flip(path: Path, positions: list[int]) -> None:
    """Flip the lowest bit of the bytes at ``positions``, in place (same size, same inode)."""
    with open(path, "r+b") as f:
        for pos in positions:
            f.seek(pos)
            b = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([b ^ 0x01]))


def _damage_label_chunks(path: Path, rng: np.random.Generator, *, images: int = 5, flips: int = 3) -> list[str]:
    """Flip ``flips`` bytes in the label chunk of ``images`` images (the issue's case 1); returns their ids."""
    chunks = _label_chunks(path, images)
    _flip(path, [off + int(p) for _, off, size in chunks for p in rng.choice(size, min(flips, size), replace=False)])
    return [name for name, _, _ in chunks]


def _shard_set(tmp_path: Path, num_shards: int = 3) -> Path:
    out = tmp_path / "pseudo_masks"
    _write_shards(out, IDS, num_shards)
    write_manifest(out, num_shards)
    return out


# ------------------------------------------------------------------------------------------- case 1


def test_flipped_label_bytes_are_never_read_back_as_valid(tmp_path):
    out = _shard_set(tmp_path)
    path = out / shard_filename(0, 3)
    size = path.stat().st_size
    damaged = _damage_label_chunks(path, np.random.default_rng(0))
    assert path.stat().st_size == size
    reader = ShardReader(out)  # index and sizes still agree: only the bytes changed
    wrong = []
    for name in reader.ids:
        try:
            label = reader.label(name)
        except ShardFormatError as e:
            msg = str(e)
            assert str(path) in msg and repr(name) in msg and "make pseudo-labels" in msg and "Delete" in msg
            continue
        if not np.array_equal(label, _sample(name)["label"]):
            wrong.append(name)
    assert wrong == [], f"damaged labels read back as valid: {wrong}"
    with pytest.raises(ShardFormatError, match=repr(damaged[0])):
        reader.label(damaged[0])
    reader.close()


def test_stage_start_checks_catch_in_place_damage(tmp_path):
    out = _shard_set(tmp_path)
    path = out / shard_filename(1, 3)
    stat = path.stat()
    _damage_label_chunks(path, np.random.default_rng(1), images=2, flips=1)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with size and mtime as before
    reader = ShardReader(out)
    with pytest.raises(ShardFormatError, match=f"{path}.*make pseudo-labels"):
        reader.verify()
    reader.verify(quick=True)  # the quick mode trusts size and mtime, by design
    with pytest.raises(ShardFormatError, match=str(path)):
        verify_shards(out)
    with pytest.raises(ShardFormatError, match=str(path)):  # a rebuilt manifest never blesses the damage
        write_manifest(out, 3, verify=True)
    (out / "manifest.json").unlink()
    # The dump's quick rebuild trusts a file whose mtime predates its checksum file (the forged mtime), but it
    # lists the sha256 recorded when the shard was written, never the damaged file's, so any check still fails.
    manifest = write_manifest(out, 3)
    assert manifest["shards"][1]["sha256"] == checksum_path(path).read_text().split()[0] != file_sha256(path)
    with pytest.raises(ShardFormatError, match=str(path)):
        verify_shards(out)
    with pytest.raises(ShardFormatError, match=str(path)):
        ShardReader(out).verify()


def test_random_flips_anywhere_are_caught_when_a_stage_starts(tmp_path):
    out = _shard_set(tmp_path, 2)
    path = out / shard_filename(1, 2)
    rng = np.random.default_rng(2)
    _flip(path, rng.choice(path.stat().st_size, 64, replace=False).tolist())
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ShardFormatError, match=f"1 pseudo-mask shard.*{path}"):
        verify_shards(out)
    with pytest.raises(ShardFormatError, match=str(path)):
        verify_shards(out, quick=True)  # mtime changed: the quick mode hashes it too
    with pytest.raises(ShardFormatError, match=str(path)):
        write_manifest(out, 2)  # what the dump runs at its end


def test_every_dataset_has_chunk_checksums_and_a_written_checksum_file(tmp_path):
    out = _shard_set(tmp_path, 2)
    for i in range(2):
        path = out / shard_filename(i, 2)
        digest = checksum_path(path).read_text().split()
        manifest = json.loads((out / "manifest.json").read_text())
        assert digest == [manifest["shards"][i]["sha256"], path.name]  # sha256sum -c format
        with h5py.File(path, "r") as f:
            for g in f["images"].values():
                for name, d in g.items():
                    assert d.fletcher32 or d.size == 0, (path, name)


def test_impossible_label_values_in_an_old_shard_name_the_file_and_image(tmp_path):
    out = _shard_set(tmp_path, 1)
    path = out / shard_filename(0, 1)
    name = IDS[3]
    with h5py.File(path, "r+") as f:  # a shard without chunk checksums whose label bytes were damaged
        g = f["images"][name]
        lab = g["label"][()]
        lab[0, 0] = 161
        del g["label"]
        g.create_dataset("label", data=lab)
    reader = ShardReader(out)
    with pytest.raises(ShardFormatError, match=rf"{path}.*{name}.*\[161\].*make pseudo-labels"):
        reader.label(name)
    reader.close()


def test_a_damaged_chunk_read_by_a_dataloader_worker_gives_one_message(tmp_path):
    torch = pytest.importorskip("torch")
    out = _shard_set(tmp_path, 1)
    path = out / shard_filename(0, 1)
    damaged = _damage_label_chunks(path, np.random.default_rng(3), images=len(IDS))
    loader = torch.utils.data.DataLoader(LabelDataset(ShardReader(out)), batch_size=None, num_workers=1,
                                         collate_fn=lambda x: x)
    with pytest.raises(ShardFormatError) as err:
        for _ in loader:
            pass
    assert "Traceback" in str(err.value)  # what torch re-raises in the parent ...
    msg = user_message(err.value)  # ... and the one message the entry points log
    assert "Traceback" not in msg and "\n" not in msg
    assert str(path) in msg and any(repr(n) in msg for n in damaged) and "make pseudo-labels" in msg


def test_verify_command(tmp_path, capfd):
    out = _shard_set(tmp_path, 2)
    assert verify_main([str(out)]) == 0
    path = out / shard_filename(0, 2)
    _damage_label_chunks(path, np.random.default_rng(4), images=1, flips=1)
    assert verify_main([str(out)]) == 2
    err = capfd.readouterr().err
    assert str(path) in err and "make pseudo-labels" in err and "Traceback" not in err
    assert verify_main([str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------------------------------- case 4


def test_deleting_a_damaged_shard_redumps_exactly_that_shard(tmp_path, caplog):
    out = _shard_set(tmp_path)
    path = out / shard_filename(1, 3)
    _damage_label_chunks(path, np.random.default_rng(5), images=1, flips=1)
    with pytest.raises(ShardFormatError, match="Delete that file.*make pseudo-labels"):
        verify_shards(out)
    others = {i: (out / shard_filename(i, 3)).stat() for i in (0, 2)}
    path.unlink()  # as the message says
    with caplog.at_level(logging.WARNING, logger="stage1_cam.io.shards"):
        manifest = verify_shards(out)
    assert "is listed but gone" in caplog.text
    assert not manifest["complete"] and manifest["missing_shards"] == [1]
    assert json.loads((out / "manifest.json").read_text()) == manifest  # rebuilt on disk: the dump is not skipped
    with pytest.raises(ShardFormatError, match=r"missing shards \[1\]"):
        ShardReader(out)
    rewritten = []
    for i, part in enumerate(assign_shards(IDS, 3)):  # what the dump does for `--shard all`
        with ShardWriter(out, i, 3, meta=_meta()) as w:
            if w.is_complete:
                w.finalize()
                continue
            rewritten.append(i)
            for name in part:
                w.write(name, **_sample(name))
            w.finalize()
    assert rewritten == [1]
    manifest = write_manifest(out, 3)
    assert manifest["complete"]
    for i, st in others.items():
        now = (out / shard_filename(i, 3)).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    with ShardReader(out) as reader:
        reader.verify()
        assert all(np.array_equal(reader.label(n), _sample(n)["label"]) for n in reader.ids)


def test_manifest_lags_behind_the_files(tmp_path):
    out = _shard_set(tmp_path)
    stale = json.loads((out / "manifest.json").read_text())
    (out / shard_filename(2, 3)).unlink()
    with pytest.raises(FileNotFoundError, match="make pseudo-labels|re-run the dump"):
        ShardReader(out)
    manifest = verify_shards(out)
    assert manifest["missing_shards"] == [2]
    # A shard finished after the manifest was written (e.g. by another SLURM task) is listed again.
    (out / "manifest.json").write_text(json.dumps({**stale, "shards": stale["shards"][:1], "complete": False}))
    with ShardWriter(out, 2, 3, meta=_meta()) as w:  # shard 2 dumped again
        for name in assign_shards(IDS, 3)[2]:
            w.write(name, **_sample(name))
        w.finalize()
    manifest = verify_shards(out)
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1, 2]


# ------------------------------------------------------------------------------------------- case 5


@pytest.mark.parametrize("content", ["truncated", "empty", "binary", "list"])
def test_unreadable_manifest_is_rebuilt_from_the_shards(tmp_path, caplog, content):
    out = _shard_set(tmp_path)
    mpath = out / "manifest.json"
    good = json.loads(mpath.read_text())
    text = mpath.read_text()
    mpath.write_bytes({"truncated": text[: len(text) // 2].encode(), "empty": b"", "binary": b"\xff\xfe\x00",
                       "list": b"[1, 2]"}[content])
    with caplog.at_level(logging.WARNING):
        reader = ShardReader(out)  # read-only: the shards themselves are the truth
    assert sorted(reader.ids) == sorted(IDS) and str(mpath) in caplog.text
    reader.close()
    manifest = verify_shards(out)
    assert manifest == good and json.loads(mpath.read_text()) == good


# ------------------------------------------------------------------------------------------- pipelines


@pytest.fixture()
def run_paths(tmp_path, synthetic_root):
    from pipelines.stages import Paths
    from stage1_cam.config import config_hash, default_config
    from stage1_cam.data import build_dataset
    from stage1_cam.data.class_names import voc_palette
    from stage1_cam.io import ShardMeta
    from stage1_cam.utils.run_dir import RunDir

    cfg = default_config({"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "run.name": "r",
                          "clip.model_name": "wsss-tiny-ViT-16", "clip.pretrained": None, "dump.num_shards": 2})
    run = RunDir.from_config(cfg).prepare(cfg)
    ds = build_dataset("synthetic", str(synthetic_root), cfg.data.dump_split)
    meta = ShardMeta(dataset="synthetic", split=ds.split, class_names=ds.class_names, palette=voc_palette(256),
                     config_hash=config_hash(cfg))
    for k, part in enumerate(assign_shards(ds.names, 2)):
        with ShardWriter(run.shard_dir, k, 2, meta=meta) as w:
            for name in part:
                gt = ds.load_gt(name)
                w.write(name, label=gt, confidence=np.ones(gt.shape, np.float32), image_labels=ds.image_labels(name))
            w.finalize()
    write_manifest(run.shard_dir, 2)
    return cfg, Paths(run), ds


def test_pipeline_stage_start_refuses_damage_and_heals_the_manifest(run_paths):
    from pipelines.stages import StageError, manifest_complete

    cfg, paths, _ = run_paths
    assert manifest_complete(paths, cfg)
    path = paths.run.shard_dir / shard_filename(0, 2)
    _damage_label_chunks(path, np.random.default_rng(6), images=2, flips=3)
    with pytest.raises(StageError, match=f"{path}.*make pseudo-labels"):
        manifest_complete(paths, cfg)  # before: "manifest.json is complete: dump skipped"
    path.unlink()
    assert not manifest_complete(paths, cfg)  # the dump runs again, for that shard
    paths.manifest.write_text(paths.manifest.read_text()[:100])  # case 5: truncated
    assert not manifest_complete(paths, cfg)
    assert json.loads(paths.manifest.read_text())["missing_shards"] == [0]


def test_retrain_and_report_refuse_a_damaged_shard(run_paths, capfd):
    from pipelines.__main__ import main

    cfg, paths, _ = run_paths
    path = paths.run.shard_dir / shard_filename(1, 2)
    _damage_label_chunks(path, np.random.default_rng(7), images=1, flips=2)
    common = ["--config", "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py", "--run", "r",
              "--cfg-options", f"run.root={paths.run.path.parents[1]}"]
    for command in ("retrain", "report"):
        assert main([command, *common]) == 2
        err = capfd.readouterr().err
        assert str(path) in err and "make pseudo-labels" in err and "Traceback" not in err, err
    assert not (paths.run.report_dir / "index.html").exists()


def test_evaluation_records_its_inputs_and_refuses_damage(run_paths):
    from pipelines.stages import mask_metrics_current, shard_inputs
    from stage1_cam.dump import evaluate_shards

    cfg, paths, ds = run_paths
    metrics = evaluate_shards(paths.run.shard_dir, ds)
    manifest = json.loads(paths.manifest.read_text())
    assert metrics["inputs"]["shards"] == shard_inputs(manifest) and len(metrics["inputs"]["shards"]) == 2
    assert metrics["computed_at"].endswith("Z")
    assert not mask_metrics_current(paths)
    paths.mask_metrics.write_text(json.dumps(metrics))
    assert mask_metrics_current(paths)
    path = paths.run.shard_dir / shard_filename(1, 2)
    _damage_label_chunks(path, np.random.default_rng(8), images=1, flips=1)
    with pytest.raises(ShardFormatError, match=str(path)):
        evaluate_shards(paths.run.shard_dir, ds)


def test_stage2_refuses_damaged_shards_before_training(tmp_path, synthetic_root, capfd):
    pytest.importorskip("mmseg")
    from mmengine.registry import init_default_scope

    import stage2_seg  # noqa: F401  (registers the mmseg plug-ins)
    from stage1_cam.data import build_dataset
    from stage1_cam.data.class_names import voc_palette
    from stage1_cam.io import ShardMeta
    from stage2_seg.datasets import PseudoMaskSegDataset
    from stage2_seg.train import main as train_main

    ds = build_dataset("synthetic", str(synthetic_root), "train")
    out = tmp_path / "pseudo_masks"
    meta = ShardMeta(dataset="synthetic", split="train", class_names=ds.class_names, palette=voc_palette(256))
    for k, part in enumerate(assign_shards(ds.names, 2)):
        with ShardWriter(out, k, 2, meta=meta) as w:
            for name in part:
                gt = ds.load_gt(name)
                w.write(name, label=gt, confidence=np.ones(gt.shape, np.float32), image_labels=ds.image_labels(name))
            w.finalize()
    write_manifest(out, 2)
    init_default_scope("mmseg")
    kwargs = dict(shard_dir=str(out), data_root=str(synthetic_root), class_set="synthetic",
                  pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadPseudoMaskFromShards")])
    assert len(PseudoMaskSegDataset(**kwargs)) == len(ds.names)
    path = out / shard_filename(1, 2)
    _damage_label_chunks(path, np.random.default_rng(9), images=1, flips=1)
    with pytest.raises(ShardFormatError, match=f"{path}.*make pseudo-labels"):
        PseudoMaskSegDataset(**kwargs)
    config = "configs/stage2/fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py"
    rc = train_main([config, "--shards", str(out), "--data-root", str(synthetic_root), "--work-dir",
                     str(tmp_path / "work"), "--no-pretrained"])
    err = capfd.readouterr().err
    assert rc == 2 and str(path) in err and "Traceback" not in err


def test_retrain_records_the_shards_it_starts_from(run_paths, tmp_path):
    from pipelines.stages import StageError, record_stage2_inputs, shard_inputs, stage2_decision, stage2_inputs

    _, paths, _ = run_paths
    s2_config = tmp_path / "s2.py"
    s2_config.write_text("x = 1\n")
    current = stage2_inputs(paths, str(s2_config), {})
    paths.run.stage2_dir.mkdir(parents=True, exist_ok=True)
    record_stage2_inputs(paths, current)
    first = json.loads(paths.stage2_inputs.read_text())
    assert first["shards"] == shard_inputs(json.loads(paths.manifest.read_text())) and len(first["shards"]) == 2
    assert first["hash"] == current["hash"] and first["recorded_at"].endswith("Z")  # the report shows when
    assert stage2_decision(paths, current, overwrite=False) == "resume"  # no metrics yet: a killed training resumes
    # Shards re-dumped since stage 2 started: never resumed on other masks silently.
    stale = {**first, "shards": {**first["shards"], shard_filename(0, 2): "0" * 64}, "hash": "0" * 12}
    paths.stage2_inputs.write_text(json.dumps(stale))
    with pytest.raises(StageError, match="OVERWRITE=1"):
        stage2_decision(paths, current, overwrite=False)
    assert stage2_decision(paths, current, overwrite=True) == "supersede"
