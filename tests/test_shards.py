"""HDF5 pseudo-mask shards: round trip, sharding, resume after a crash, locking, manifest, errors, export."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from stage1_cam.io import (FORMAT_NAME, FORMAT_VERSION, ShardFormatError, ShardLockedError, ShardMeta, ShardReader,
                           ShardWriter, assign_shards, checksum_path, shard_filename, write_manifest)
from stage1_cam.io.export import export_png, main as export_main
from tests.shard_data import LabelDataset, file_contents

CLASSES = ("background", "cat", "dog", "person")
REPO = Path(__file__).resolve().parents[1]


def _meta(**kw) -> ShardMeta:
    base = dict(dataset="synthetic", split="train", class_names=CLASSES,
                palette=[(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)] + [(i, i, i) for i in range(4, 256)],
                config_hash="cfg123", git_sha="abc", checkpoint_hash="ck1", extra={"scales": [1.0, 0.5]})
    base.update(kw)
    return ShardMeta(**base)


def _sample(name: str) -> dict:
    """Deterministic per-id content with varied sizes; every third image has probabilities."""
    seed = zlib.crc32(name.encode())
    rng = np.random.default_rng(seed)
    h, w = 5 + seed % 7, 6 + seed % 5
    label = rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=(h, w))
    out = dict(label=label, confidence=rng.random((h, w), dtype=np.float32),
               image_labels=sorted({int(v) for v in np.unique(label) if 0 < v < 255}))
    if seed % 3 == 0:
        keys = [0] + out["image_labels"]
        out["probs"] = rng.random((len(keys), h, w)).astype(np.float32)
        out["prob_keys"] = keys
    return out


IDS = [f"img_{i:03d}" for i in range(11)] + ["sub/dir id"]


def _write_shards(out: Path, ids, num_shards: int, meta: ShardMeta | None = None) -> None:
    for k, part in enumerate(assign_shards(ids, num_shards)):
        with ShardWriter(out, k, num_shards, meta=meta or _meta()) as w:
            for name in part:
                w.write(name, **_sample(name))
            w.finalize()


def test_shard_filename_and_assignment():
    assert shard_filename(0, 16) == "shard-00000-of-00016.h5"
    assert shard_filename(15, 16) == "shard-00015-of-00016.h5"
    for bad in [(16, 16), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError):
            shard_filename(*bad)
    ids = [f"id{i}" for i in range(23)]
    shuffled = list(reversed(ids))
    for n in (1, 3, 7, 23, 40):
        parts = assign_shards(ids, n)
        assert len(parts) == n
        flat = [i for p in parts for i in p]
        assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert assign_shards(shuffled, n) == parts
    with pytest.raises(ValueError, match="unique"):
        assign_shards(["a", "b", "a"], 2)
    with pytest.raises(ValueError):
        assign_shards(ids, 0)


def test_round_trip_and_manifest(tmp_path):
    _write_shards(tmp_path, IDS, 3)
    manifest = write_manifest(tmp_path, 3)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == FORMAT_VERSION
    assert manifest["complete"] and manifest["missing_shards"] == [] and manifest["incomplete_shards"] == []
    assert manifest["num_images"] == len(IDS)
    assert [s["num_images"] for s in manifest["shards"]] == [len(p) for p in assign_shards(IDS, 3)]
    for s in manifest["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest()
    for key, want in [("dataset", "synthetic"), ("split", "train"), ("class_names", list(CLASSES)),
                      ("ignore_index", 255), ("config_hash", "cfg123"), ("git_sha", "abc"),
                      ("checkpoint_hash", "ck1")]:
        assert manifest[key] == want
    assert manifest["palette"][1] == [128, 0, 0] and len(manifest["palette"]) == 256
    with h5py.File(tmp_path / shard_filename(0, 3), "r") as f:
        assert f.attrs["format"] == FORMAT_NAME and int(f.attrs["format_version"]) == FORMAT_VERSION
        assert json.loads(f.attrs["class_names"]) == list(CLASSES)
        assert f.attrs["config_hash"] == "cfg123" and f.attrs["checkpoint_hash"] == "ck1"
        assert f["images"][next(iter(f["images"]))]["label"].compression == "lzf"

    reader = ShardReader(tmp_path, expected_classes=CLASSES, expected_dataset="synthetic")
    assert len(reader) == len(IDS) and sorted(reader.ids) == sorted(IDS)
    assert "img_003" in reader and "nope" not in reader
    assert reader.meta["config_hash"] == "cfg123"
    with_probs = 0
    for name in IDS:
        s = _sample(name)
        lab = reader.label(name)
        assert lab.dtype == np.uint8 and np.array_equal(lab, s["label"])
        conf = reader.confidence(name)
        assert conf.dtype == np.float32
        np.testing.assert_array_equal(conf, s["confidence"].astype(np.float16).astype(np.float32))
        il = reader.image_labels(name)
        assert il.dtype == np.int64 and il.tolist() == s["image_labels"]
        pr = reader.probs(name)
        if "probs" in s:
            with_probs += 1
            assert pr[0].dtype == np.float16 and pr[0].shape == s["probs"].shape
            np.testing.assert_array_equal(pr[0], s["probs"].astype(np.float16))
            assert pr[1].tolist() == s["prob_keys"]
        else:
            assert pr is None
    assert with_probs > 0
    with pytest.raises(KeyError, match="nope"):
        reader.label("nope")
    reader2 = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(reader2.label("sub/dir id"), _sample("sub/dir id")["label"])
    reader.close()
    reader2.close()

    # Without a manifest the directory is scanned and gives the same index.
    (tmp_path / "manifest.json").unlink()
    scanned = ShardReader(tmp_path)
    assert scanned.ids == reader.ids
    assert np.array_equal(scanned.label("img_000"), _sample("img_000")["label"])
    scanned.close()


def test_write_rejects_bad_input(tmp_path):
    s = _sample("a")
    with ShardWriter(tmp_path, 0, 1, meta=_meta()) as w:
        with pytest.raises(ValueError, match="neither class ids"):
            w.write("a", **{**s, "label": np.full((4, 4), 7, np.uint8), "confidence": np.zeros((4, 4), np.float32)})
        with pytest.raises(ValueError, match="confidence shape"):
            w.write("a", **{**s, "confidence": np.zeros((2, 2), np.float32)})
        with pytest.raises(ValueError, match="together"):
            w.write("a", label=s["label"], confidence=s["confidence"], image_labels=[1],
                    probs=np.zeros((1,) + s["label"].shape, np.float32))
        with pytest.raises(ValueError, match="image_labels"):
            w.write("a", label=s["label"], confidence=s["confidence"], image_labels=[9])
        w.write("a", **s)
        with pytest.raises(ValueError, match="already"):
            w.write("a", **s)
    with pytest.raises(ValueError, match="ignore_index"):
        _meta(ignore_index=2)


_CRASH_CHILD = textwrap.dedent("""
    import os, signal, sys
    import h5py
    from tests.test_shards import IDS, _meta, _sample
    from stage1_cam.io import ShardWriter

    out, crash_at = sys.argv[1], sys.argv[2]
    real = h5py.Group.create_dataset

    def create_dataset(self, name, *args, **kw):  # die in the middle of writing image `crash_at`
        if name == "confidence" and self.name.endswith("/" + crash_at):
            self.file.flush()  # as if HDF5's metadata cache had already written the half-done group
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, name, *args, **kw)

    h5py.Group.create_dataset = create_dataset
    w = ShardWriter(out, 0, 1, meta=_meta())
    for name in IDS:
        w.write(name, **_sample(name))
    w.finalize()
""")


@pytest.mark.parametrize("crash", ["killed_subprocess", "dropped_writer"])
def test_resume_after_crash_equals_uninterrupted(tmp_path, crash, caplog):
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    _write_shards(ref_dir, IDS, 1)
    if crash == "killed_subprocess":
        proc = subprocess.run([sys.executable, "-c", _CRASH_CHILD, str(out), IDS[4]], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == -9, proc.stderr
        assert (out / (shard_filename(0, 1) + ".lock")).exists()  # left behind by the dead writer
        with h5py.File(out / (shard_filename(0, 1) + ".partial"), "r") as f:
            assert IDS[4] in f["images"] and "complete" not in f["images"][IDS[4]].attrs
        expect_done = set(IDS[:4])
    else:
        w = ShardWriter(out, 0, 1, meta=_meta())
        for name in IDS[:6]:
            w.write(name, **_sample(name))
        del w  # no finalize: the writer is simply dropped
        expect_done = set(IDS[:6])
    assert not ShardWriter.shard_complete(out, 0, 1)

    with caplog.at_level(logging.WARNING, logger="stage1_cam.io.shards"):
        w = ShardWriter(out, 0, 1, meta=_meta())
    if crash == "killed_subprocess":
        assert "stale shard lock" in caplog.text
    assert w.done_ids == expect_done and not w.is_complete
    for name in IDS:
        if name not in w.done_ids:
            w.write(name, **_sample(name))
    final = w.finalize()
    w.close()
    assert final == out / shard_filename(0, 1) and ShardWriter.shard_complete(out, 0, 1)
    assert not (out / (shard_filename(0, 1) + ".partial")).exists()
    assert not (out / (shard_filename(0, 1) + ".lock")).exists()
    assert file_contents(final) == file_contents(ref_dir / shard_filename(0, 1))


def test_finished_shard_is_never_rewritten(tmp_path):
    _write_shards(tmp_path, IDS[:4], 1)
    path = tmp_path / shard_filename(0, 1)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with ShardWriter(tmp_path, 0, 1, meta=_meta()) as w:
        assert w.is_complete and w.done_ids == set(IDS[:4])
        with pytest.raises(ValueError, match="never rewritten"):
            w.write(IDS[0], **_sample(IDS[0]))
        with pytest.raises(ValueError, match="never rewritten"):
            w.write("new", **_sample("new"))
        assert w.finalize() == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    with pytest.raises(ShardFormatError, match="config_hash"):
        ShardWriter(tmp_path, 0, 1, meta=_meta(config_hash="other"))


@pytest.mark.parametrize("change", [dict(config_hash="other"), dict(class_names=("background", "cat", "cow", "x")),
                                    dict(dataset="voc")])
def test_resume_with_other_settings_is_refused(tmp_path, change):
    with ShardWriter(tmp_path, 0, 2, meta=_meta()) as w:
        w.write("a", **_sample("a"))
    with pytest.raises(ShardFormatError, match=next(iter(change))) as err:
        ShardWriter(tmp_path, 0, 2, meta=_meta(**change))
    assert shard_filename(0, 2) + ".partial" in str(err.value)
    with ShardWriter(tmp_path, 0, 2, meta=_meta()) as w:  # the refused attempt did not hold on to the lock
        assert w.done_ids == {"a"}


def test_another_precision_is_never_mixed_in(tmp_path):
    """``extra.precision`` (what train.amp="auto" resolved to on the writing machine) must match on resume and across
    the shards of a directory, whatever the rest of ``extra`` says."""
    bf16 = _meta(extra={"scales": [1.0], "precision": "bf16"})
    with ShardWriter(tmp_path / "a", 0, 2, meta=bf16) as w:
        w.write("a", **_sample("a"))
    with pytest.raises(ShardFormatError, match=r"extra\.precision: 'bf16' vs 'float32'.*train\.amp='bf16'"):
        ShardWriter(tmp_path / "a", 0, 2, meta=_meta(extra={"scales": [1.0], "precision": "float32"}))
    with ShardWriter(tmp_path / "a", 0, 2, meta=_meta(extra={"scales": [0.5], "precision": "bf16"})) as w:
        assert w.done_ids == {"a"}  # the other extra keys are not compared
    parts = assign_shards(IDS, 2)
    for k, precision in enumerate(("bf16", "float32")):
        with ShardWriter(tmp_path / "b", k, 2, meta=_meta(extra={"precision": precision})) as w:
            for name in parts[k]:
                w.write(name, **_sample(name))
            w.finalize()
    with pytest.raises(ShardFormatError, match=r"extra\.precision"):
        write_manifest(tmp_path / "b", 2)


def test_truncated_files(tmp_path):
    # A truncated partial file: the error names it and says to delete and re-run.
    with ShardWriter(tmp_path, 0, 2, meta=_meta()) as w:
        for name in IDS[:3]:
            w.write(name, **_sample(name))
    partial = tmp_path / (shard_filename(0, 2) + ".partial")
    partial.write_bytes(partial.read_bytes()[:300])
    with pytest.raises(ShardFormatError, match="delete it and re-run") as err:
        ShardWriter(tmp_path, 0, 2, meta=_meta())
    assert str(partial) in str(err.value)

    # A finished shard truncated after the manifest was written.
    done = tmp_path / "done"
    _write_shards(done, IDS, 2)
    write_manifest(done, 2)
    path = done / shard_filename(1, 2)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ShardFormatError, match="truncated") as err:
        ShardReader(done)
    assert str(path) in str(err.value)
    with pytest.raises(ShardFormatError) as err:
        write_manifest(done, 2)
    assert str(path) in str(err.value)


def test_version_and_format_mismatch(tmp_path):
    _write_shards(tmp_path, IDS[:5], 1)
    manifest = write_manifest(tmp_path, 1)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ShardFormatError, match=f"version {FORMAT_VERSION + 1}.*upgrade"):
        ShardReader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(ShardFormatError, match="something-else"):
        ShardReader(tmp_path)
    with h5py.File(tmp_path / shard_filename(0, 1), "r+") as f:
        f.attrs["format_version"] = 0
    # A shard written so (by an old version, which left no checksum file), not one modified after writing.
    checksum_path(tmp_path / shard_filename(0, 1)).unlink()
    with pytest.raises(ShardFormatError, match="version 0.*re-run"):
        write_manifest(tmp_path, 1)
    with pytest.raises(ShardFormatError, match="version 0"):
        ShardWriter(tmp_path, 0, 1, meta=_meta())


def test_reader_refuses_other_classes_or_dataset(tmp_path):
    _write_shards(tmp_path, IDS[:3], 1)
    write_manifest(tmp_path, 1)
    with pytest.raises(ShardFormatError, match="index 2.*dog"):
        ShardReader(tmp_path, expected_classes=("background", "cat", "cow", "person"))
    with pytest.raises(ShardFormatError, match="4 classes"):
        ShardReader(tmp_path, expected_classes=CLASSES[:3])
    with pytest.raises(ShardFormatError, match="'synthetic', not 'voc'"):
        ShardReader(tmp_path, expected_dataset="voc")
    with pytest.raises(FileNotFoundError):
        ShardReader(tmp_path / "missing")


def test_two_writers_on_one_shard(tmp_path):
    lock = tmp_path / (shard_filename(1, 4) + ".lock")
    w1 = ShardWriter(tmp_path, 1, 4, meta=_meta())
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(ShardLockedError, match=f"pid {os.getpid()}") as err:
        ShardWriter(tmp_path, 1, 4, meta=_meta())
    assert str(lock) in str(err.value)
    with ShardWriter(tmp_path, 2, 4, meta=_meta()):  # other shards are independent
        pass
    w1.write("a", **_sample("a"))
    w1.close()
    assert not lock.exists()
    with ShardWriter(tmp_path, 1, 4, meta=_meta()) as w2:
        assert w2.done_ids == {"a"}

    # A lock held by another live process on this host is respected ...
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(ShardLockedError, match=f"pid {os.getppid()}"):
        ShardWriter(tmp_path, 1, 4, meta=_meta())
    # ... one whose process has exited is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with ShardWriter(tmp_path, 1, 4, meta=_meta()) as w3:
        assert w3.done_ids == {"a"}


def test_manifest_lists_missing_and_unfinished_shards(tmp_path):
    parts = assign_shards(IDS, 3)
    with ShardWriter(tmp_path, 0, 3, meta=_meta()) as w:
        for name in parts[0]:
            w.write(name, **_sample(name))
        w.finalize()
    with ShardWriter(tmp_path, 1, 3, meta=_meta()) as w:
        w.write(parts[1][0], **_sample(parts[1][0]))
    manifest = write_manifest(tmp_path, 3)
    assert not manifest["complete"]
    assert manifest["missing_shards"] == [2] and manifest["incomplete_shards"] == [1]
    assert manifest["num_images"] == len(parts[0]) and len(manifest["shards"]) == 1
    with pytest.raises(ShardFormatError, match=r"missing shards \[2\].*allow_incomplete"):
        ShardReader(tmp_path)
    partial_reader = ShardReader(tmp_path, allow_incomplete=True)
    assert partial_reader.ids == parts[0]
    partial_reader.close()
    with pytest.raises(ShardFormatError, match="3-way"):
        write_manifest(tmp_path, 2)


def test_dataloader_with_two_workers(tmp_path):
    torch = pytest.importorskip("torch")
    _write_shards(tmp_path, IDS, 2)
    write_manifest(tmp_path, 2)
    reader = ShardReader(tmp_path)
    reader.label(IDS[0])  # the parent has files open before the workers fork
    loader = torch.utils.data.DataLoader(LabelDataset(reader), batch_size=None, num_workers=2,
                                         collate_fn=lambda x: x)
    seen, pids = {}, set()
    for name, pid, label in loader:
        seen[name] = label
        pids.add(pid)
    assert sorted(seen) == sorted(IDS)
    assert os.getpid() not in pids and len(pids) == 2
    for name, label in seen.items():
        assert np.array_equal(np.asarray(label), _sample(name)["label"])
    reader.close()


def test_export_png(tmp_path):
    from PIL import Image

    shards, out, out_c = tmp_path / "shards", tmp_path / "png", tmp_path / "png_color"
    _write_shards(shards, IDS, 2)
    write_manifest(shards, 2)
    assert export_png(shards, out) == len(IDS)
    for name in IDS:
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "L"
            assert np.array_equal(np.asarray(im), _sample(name)["label"])
    assert export_png(shards, out) == len(IDS)  # identical files are left alone
    other = np.zeros_like(_sample("img_002")["label"])
    Image.fromarray(other).save(out / "img_002.png")
    with pytest.raises(FileExistsError, match="img_002.png"):
        export_png(shards, out)
    assert np.array_equal(np.asarray(Image.open(out / "img_002.png")), other)  # not overwritten
    assert export_main([str(shards), str(out)]) == 2  # bad input: exit code 2

    assert export_main([str(shards), str(out_c), "--color"]) == 0
    with Image.open(out_c / "img_001.png") as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), _sample("img_001")["label"])
        assert im.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert len(list(out_c.rglob("*.png"))) == len(IDS)


def test_more_shards_than_images(tmp_path):
    parts = assign_shards(IDS[:2], 3)
    assert [len(p) for p in parts] == [1, 1, 0]
    _write_shards(tmp_path, IDS[:2], 3)
    manifest = write_manifest(tmp_path, 3)
    assert manifest["complete"] and [s["num_images"] for s in manifest["shards"]] == [1, 1, 0]
    with ShardReader(tmp_path) as reader:
        assert sorted(reader.ids) == sorted(IDS[:2])
