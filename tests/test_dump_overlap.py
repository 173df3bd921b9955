"""The dump keeps the device busy (issue 20): results written by a background thread, progress points every
``dump.flush_every`` images instead of a flush per image, argmax on the device when the host needs only labels.

The new path must give the shards of the old one (writes on the main thread, a flush per image, argmax on the
host) bit for bit, resume exactly after a ``kill -9`` between progress points, and report a writer-thread error
as before.
"""

from __future__ import annotations

import errno
import math
import threading
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch

from stage1_cam import dump as dump_mod
from stage1_cam.config import ConfigError, config_hash, load_config
from stage1_cam.dump import runner, shard_loop, tta
from stage1_cam.dump.writer_thread import BackgroundWriter
from stage1_cam.io import ShardMeta, ShardWriter, shard_filename
from stage1_cam.utils.files import DiskFullError
from tests.shard_data import count_flushes, file_contents, kill_then_resume
from tests.test_dump import CONFIG, _argv, _assert_same, _contents, _one_thread, trained  # noqa: F401  (fixtures)


class _InlineWriter:
    """The old tail: every write on the caller's thread (stands in for :class:`BackgroundWriter`)."""

    def __init__(self, write: Callable[[Any], None], **_: Any) -> None:
        self.write = write

    def put(self, item: Any) -> None:
        self.write(item)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _dump(trained: dict, out: Path, monkeypatch: Any, *, old: bool, **opts: Any) -> dict:  # noqa: F811
    """Dump both shards into ``out``: the old path (``old``) or the new one; returns the calls of the device
    decoding and the writer threads seen."""
    seen = {"device_decode": 0, "threads": set()}
    real_decode, real_write = tta.decode_on_device, ShardWriter.write

    def decode(*a: Any, **k: Any) -> Any:
        seen["device_decode"] += 1
        return real_decode(*a, **k)

    def write(self: ShardWriter, name: str, **kw: Any) -> None:
        seen["threads"].add(threading.current_thread().name)
        return real_write(self, name, **kw)

    with monkeypatch.context() as m:
        m.setattr(tta, "decode_on_device", decode)
        m.setattr(ShardWriter, "write", write)
        if old:
            real_async = shard_loop.predict_async
            m.setattr(shard_loop, "predict_async", lambda *a, decode=False, **k: real_async(*a, decode=False, **k))
            m.setattr(shard_loop, "BackgroundWriter", _InlineWriter)
        cfg = load_config(CONFIG, {**trained["opts"], "dump.flush_every": 1 if old else 3, **opts})
        runner.run_dump(cfg, shards=[0, 1], out_dir=out, checkpoint=trained["ckpt"], progress=False)
    return seen


CASES = {
    "weclip": {"dump.crf.enabled": False, "dump.save_probs": False},
    "weclip-threshold": {"dump.crf.enabled": False, "dump.save_probs": False, "dump.ignore_threshold": 0.6},
    "excel": {"dump.protocol": "excel", "dump.square_size": 64, "dump.crf.enabled": False, "dump.save_probs": False},
    "excel-threshold": {"dump.protocol": "excel", "dump.square_size": 64, "dump.crf.enabled": False,
                        "dump.save_probs": False, "dump.ignore_threshold": 0.6},
    "weclip-probs-threshold": {"dump.crf.enabled": False, "dump.save_probs": True, "dump.ignore_threshold": 0.6},
    "weclip-crf-threshold": {"dump.save_probs": True, "dump.ignore_threshold": 0.6},
    "excel-crf": {"dump.protocol": "excel", "dump.square_size": 64, "dump.save_probs": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_new_path_writes_the_old_shards_bit_for_bit(trained, tmp_path, monkeypatch, case):  # noqa: F811
    opts = CASES[case]
    old = _dump(trained, tmp_path / "old", monkeypatch, old=True, **opts)
    new = _dump(trained, tmp_path / "new", monkeypatch, old=False, **opts)
    assert old["device_decode"] == 0 and old["threads"] == {"MainThread"}
    assert new["threads"] == {"dump-write"}
    on_device = not opts.get("dump.save_probs") and opts.get("dump.crf.enabled", True) is False
    assert (new["device_decode"] > 0) == on_device
    a, b = _contents(tmp_path / "old"), _contents(tmp_path / "new")
    _assert_same(a, b)
    assert len(a) == 16 and all((a[n]["probs"] is None) != bool(opts.get("dump.save_probs")) for n in a)
    # And every stored thing, in the same order: attributes, groups, dtypes, chunks, values. Not the file bytes: HDF5's
    # layout of the same writes can differ by a few bytes from run to run (346266 or 346270 bytes for one shard here,
    # seen between two runs of the old path as well), so the bytes are no property of a shard.
    for k in range(2):
        name = shard_filename(k, 2)
        assert file_contents(tmp_path / "old" / name) == file_contents(tmp_path / "new" / name), name


def test_device_decoding_equals_host_decoding_with_ties():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 5):
        p = rng.choice(np.array([0.0, 0.25, 1 / 3, 0.5], np.float32), size=(k, 37, 41)).astype(np.float16)
        keys = np.sort(rng.choice(21, k, replace=False)).astype(np.int64)
        label, conf = dump_mod.decode_probs(p, keys)
        dl, dc = tta.decode_on_device(torch.from_numpy(p), torch.from_numpy(keys))
        assert dl.dtype == torch.uint8 and dc.dtype == torch.float16
        np.testing.assert_array_equal(dl.numpy(), label)  # the first maximal channel, as NumPy
        assert dc.numpy().astype(np.float32).tobytes() == conf.tobytes()


def _meta() -> ShardMeta:
    return ShardMeta(dataset="synthetic", split="train", class_names=("background", "a", "b"),
                     palette=[(i, i, i) for i in range(256)])


@pytest.mark.parametrize("flush_every", [1, 8])
def test_progress_points_instead_of_a_flush_per_image(tmp_path, monkeypatch, flush_every):
    calls = count_flushes(monkeypatch)
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, 0, 1, meta=_meta(), flush_every=flush_every) as w:
        for i in range(20):
            w.write(f"im{i:02d}", label=rng.integers(0, 3, (6, 7)).astype(np.uint8),
                    confidence=rng.random((6, 7), dtype=np.float32), image_labels=[1])
            assert w.num_pending == (i + 1) % flush_every
        w.finalize()
    points = math.ceil(20 / flush_every)
    assert len(calls) <= 2 * points + 2  # two per progress point, the file's creation, the finish
    if flush_every == 8:
        assert len(calls) <= 8
    else:
        assert len(calls) >= 20


def test_dump_flushes_at_progress_points(trained, tmp_path, monkeypatch):  # noqa: F811
    counts = {}
    for every in (1, 8):
        calls = count_flushes(monkeypatch)
        cfg = load_config(CONFIG, {**trained["opts"], "dump.num_shards": 1, "dump.flush_every": every,
                                   "dump.crf.enabled": False, "dump.save_probs": False})
        runner.run_dump(cfg, shards=[0], out_dir=tmp_path / str(every), checkpoint=trained["ckpt"], progress=False)
        counts[every] = len(calls)
    assert counts[1] >= 16 and counts[8] <= 2 * 2 + 2, counts


def test_images_since_the_last_progress_point_are_not_durable(tmp_path):
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path, 0, 1, meta=_meta(), flush_every=4)
    for i in range(6):
        w.write(f"im{i}", label=np.zeros((4, 5), np.uint8), confidence=rng.random((4, 5), dtype=np.float32),
                image_labels=[])
    with h5py.File(w.partial_path, "r", locking=False) as f:  # what a kill now would leave: 4 marked, 2 not
        marked = [k for k in f["images"] if f["images"][k].attrs.get("complete", False)]
    assert marked == ["im0", "im1", "im2", "im3"]
    w.close()  # a clean close makes the rest durable too
    w = ShardWriter(tmp_path, 0, 1, meta=_meta(), flush_every=4)
    assert w.done_ids == {f"im{i}" for i in range(6)}
    w.close()


@pytest.mark.parametrize("mode,after", [("write", 4), ("write", 7), ("progress", 1)])
def test_kill_9_between_progress_points_then_resume(trained, tmp_path, mode, after):  # noqa: F811
    opts = {**trained["opts"], "dump.flush_every": 3, "dump.crf.enabled": False, "dump.save_probs": False}
    ref, out = tmp_path / "ref", tmp_path / "out"
    argv = [CONFIG, "--shard", "0", "--no-progress"] + _argv(opts)
    assert dump_mod.main(argv + ["--out", str(ref)]) == 0
    kept = kill_then_resume("stage1_cam.dump", argv + ["--out", str(out)], out, after=after, mode=mode,
                            shard=shard_filename(0, 2), resume=dump_mod.main)
    # Only the images of finished progress points survive the kill (3 per point); the rest are recomputed.
    assert len(kept) == (3 * (after // 3) if mode == "write" else 3 * after)
    _assert_same(_contents(out), _contents(ref))


def test_writer_thread_error_is_the_dumps_error_and_the_shard_resumes(trained, tmp_path, monkeypatch):  # noqa: F811
    opts = {**trained["opts"], "dump.flush_every": 2, "dump.crf.enabled": False, "dump.save_probs": False}
    cfg = load_config(CONFIG, opts)
    ref, out = tmp_path / "ref", tmp_path / "out"
    runner.run_dump(cfg, shards=[0], out_dir=ref, checkpoint=trained["ckpt"], progress=False)
    real_write, calls = ShardWriter.write, []

    def full_disk(self: ShardWriter, name: str, **kw: Any) -> None:
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(threading.current_thread().name)
        return real_write(self, name, **kw)

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    with pytest.raises(DiskFullError, match="no space left") as err:
        runner.run_dump(cfg, shards=[0], out_dir=out, checkpoint=trained["ckpt"], progress=False)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert set(calls) == {"dump-write"} and not any(t.name == "dump-write" for t in threading.enumerate())
    assert (out / (shard_filename(0, 2) + ".partial")).is_file() and not (out / shard_filename(0, 2)).exists()
    monkeypatch.setattr(ShardWriter, "write", real_write)
    with ShardWriter(out, 0, 2, meta=ShardMeta(**_partial_meta(out))) as w:
        assert len(w.done_ids) == 4  # the close after the error made the 4 written images durable
    runner.run_dump(cfg, shards=[0], out_dir=out, checkpoint=trained["ckpt"], progress=False)
    _assert_same(_contents(out), _contents(ref))


def _partial_meta(out: Path) -> dict:
    import json

    with h5py.File(out / (shard_filename(0, 2) + ".partial"), "r", locking=False) as f:
        a = f.attrs
        return dict(dataset=a["dataset"], split=a["split"], class_names=json.loads(a["class_names"]),
                    palette=json.loads(a["palette"]), ignore_index=int(a["ignore_index"]),
                    config_hash=a["config_hash"], git_sha=a["git_sha"], checkpoint_hash=a["checkpoint_hash"],
                    extra=json.loads(a["extra"]))


def test_an_interrupted_main_loop_stops_the_writer_thread(trained, tmp_path, monkeypatch):  # noqa: F811
    opts = {**trained["opts"], "dump.flush_every": 4, "dump.crf.enabled": False, "dump.save_probs": False}
    cfg = load_config(CONFIG, opts)
    ref, out = tmp_path / "ref", tmp_path / "out"
    runner.run_dump(cfg, shards=[0], out_dir=ref, checkpoint=trained["ckpt"], progress=False)
    real_submit, n = dump_mod.OrderedPostprocessor.submit, []

    def submit(self: Any, name: str, **kw: Any) -> Any:
        if len(n) == 5:
            raise KeyboardInterrupt
        n.append(name)
        return real_submit(self, name, **kw)

    monkeypatch.setattr(dump_mod.OrderedPostprocessor, "submit", submit)
    with pytest.raises(KeyboardInterrupt):
        runner.run_dump(cfg, shards=[0], out_dir=out, checkpoint=trained["ckpt"], progress=False)
    assert not any(t.name == "dump-write" for t in threading.enumerate())
    assert (out / (shard_filename(0, 2) + ".partial")).is_file()
    monkeypatch.setattr(dump_mod.OrderedPostprocessor, "submit", real_submit)
    runner.run_dump(cfg, shards=[0], out_dir=out, checkpoint=trained["ckpt"], progress=False)
    _assert_same(_contents(out), _contents(ref))


def test_background_writer_order_errors_and_abort():
    got: list = []
    w: BackgroundWriter[int] = BackgroundWriter(got.append, max_queue=2)
    for i in range(50):
        w.put(i)
    w.close()
    assert got == list(range(50))

    boom = OSError(errno.ENOSPC, "No space left on device")

    def failing(i: int) -> None:
        if i == 3:
            raise boom
    w = BackgroundWriter(failing, max_queue=1)
    with pytest.raises(OSError) as err:
        for i in range(100):
            w.put(i)
        w.close()
    assert err.value is boom  # the same exception object
    w.abort()

    release = threading.Event()
    done: list = []
    w = BackgroundWriter(lambda i: (release.wait(5), done.append(i)), max_queue=8)
    for i in range(5):
        w.put(i)
    threading.Timer(0.2, release.set).start()
    w.abort()  # the item being written finishes; the waiting ones are dropped
    assert done in ([], [0])


def test_flush_every_is_a_checked_throughput_knob():
    base = load_config(CONFIG)
    assert base.dump.flush_every == 16
    assert config_hash(load_config(CONFIG, {"dump.flush_every": 1})) == config_hash(base)
    with pytest.raises(ConfigError, match="flush_every"):
        load_config(CONFIG, {"dump.flush_every": 0})
    from stage1_cam.config import DumpCfg

    assert "flush_every" not in DumpCfg(flush_every=3).record()
    assert DumpCfg(flush_every=3).record() == DumpCfg().record()
