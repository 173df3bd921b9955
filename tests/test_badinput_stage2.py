"""Bad input to the stage-2 entry points gets one clear error (audit C: F2, F4, F6, F12): exit code 2, no traceback,
and a message naming the file or value and the fix.

``stage2_seg.train`` / ``stage2_seg.test`` are called in-process through ``main(argv)``, with the synthetic dataset
and two small shard files.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from stage1_cam.data.class_names import CLASSES, voc_palette  # noqa: E402
from stage1_cam.io.shards import ShardMeta, ShardWriter, assign_shards, write_manifest  # noqa: E402

import stage2_seg  # noqa: E402,F401  (registers the mmseg plug-ins)
from stage2_seg.checkpoint import safe_checkpoint_loading  # noqa: E402
from stage2_seg.test import main as eval_main  # noqa: E402
from stage2_seg.train import build_config, check_runner_values, parse_args  # noqa: E402
from stage2_seg.train import main as train_main  # noqa: E402
from tests.cli_errors import one_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S2_CONFIG = REPO / "configs" / "stage2" / "fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py"
S2_CONFIGS = sorted((REPO / "configs" / "stage2").glob("*.py"))
S1_CONFIG = REPO / "configs" / "stage1" / "weclip_tiny-clip_synthetic-160x160_300i.py"
FAST = ["train_dataloader.num_workers=0", "val_dataloader.num_workers=0", "test_dataloader.num_workers=0"]

# (file name, content, what the message says besides the file)
BAD_CONFIGS = [
    ("syntax.py", "this is not python(\n", "SyntaxError"),
    ("raises.py", "train_cfg = dict(max_iters=1 / 0)\n", "ZeroDivisionError"),
    ("config.txt", "x = 1\n", "configs/stage2/"),
    ("bad.yaml", "train_cfg:\n  max_iters: [1\n", "ParserError"),
    ("bad.json", '{"train_cfg": train_cfg}\n', "JSONDecodeError"),
]


@pytest.fixture(scope="module")
def shard_dir(synthetic_root, tmp_path_factory) -> Path:
    """Two finished shards + manifest whose pseudo-masks are the synthetic train split's ground truth."""
    out = tmp_path_factory.mktemp("run") / "pseudo_masks"
    meta = ShardMeta(dataset="synthetic", split="train", class_names=CLASSES["synthetic"], palette=voc_palette(256))
    ids = (synthetic_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for k, part in enumerate(assign_shards(ids, 2)):
        with ShardWriter(out, k, 2, meta=meta) as w:
            for sample_id in part:
                mask = np.array(Image.open(synthetic_root / "SegmentationClassAug" / f"{sample_id}.png"), np.uint8)
                fg = [int(c) for c in np.unique(mask) if 0 < c < 255]
                w.write(sample_id, label=mask, confidence=np.ones(mask.shape, np.float32), image_labels=fg)
            w.finalize()
    write_manifest(out, 2)
    return out


@pytest.fixture(scope="module")
def model_state() -> dict:
    """The state dict of the smoke config's (randomly initialised) model."""
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    return MODELS.build(Config.fromfile(str(S2_CONFIG)).model).state_dict()


def _train_argv(shard_dir, synthetic_root, work_dir, *options) -> list:
    return [str(S2_CONFIG), "--shards", str(shard_dir), "--work-dir", str(work_dir), "--data-root",
            str(synthetic_root), "--cfg-options", *FAST, *options]


def _test_argv(checkpoint, synthetic_root, tmp_path, *extra, config=S2_CONFIG) -> list:
    return [str(config), str(checkpoint), "--data-root", str(synthetic_root), "--work-dir", str(tmp_path / "eval"),
            "--device", "cpu", "--cfg-options", *FAST, *extra]


# ------------------------------------------------------------------------------------------ F2: unparsable configs
@pytest.mark.parametrize("name,content,cause", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_test_refuses_a_config_that_cannot_be_parsed(name, content, cause, tmp_path, caplog, capfd):
    config = tmp_path / name
    config.write_text(content)
    ckpt = tmp_path / "any.pth"
    ckpt.write_bytes(b"unused")
    assert eval_main([str(config), str(ckpt), "--device", "cpu"]) == 2
    msg = one_error(caplog, capfd)
    assert str(config) in msg and cause in msg, msg


@pytest.mark.parametrize("name,content,cause", BAD_CONFIGS[:2], ids=[c[0] for c in BAD_CONFIGS[:2]])
def test_train_refuses_a_config_that_cannot_be_parsed(name, content, cause, shard_dir, tmp_path, caplog, capfd):
    config = tmp_path / name
    config.write_text(content)
    assert train_main([str(config), "--shards", str(shard_dir), "--work-dir", str(tmp_path / "w")]) == 2
    msg = one_error(caplog, capfd)
    assert str(config) in msg and cause in msg and "fix the file" in msg, msg
    assert not (tmp_path / "w").exists()


def test_missing_base_file_names_it_and_the_config(tmp_path, caplog, capfd):
    config = tmp_path / "child.py"
    config.write_text("_base_ = ['./nowhere/base.py']\n")
    ckpt = tmp_path / "any.pth"
    ckpt.write_bytes(b"unused")
    assert eval_main([str(config), str(ckpt), "--device", "cpu"]) == 2
    msg = one_error(caplog, capfd)
    assert str(tmp_path / "nowhere" / "base.py") in msg and str(config) in msg and "_base_" in msg, msg


# ------------------------------------------------------------------------------------- F4: stage2_seg.test inputs
def test_test_refuses_a_stage1_config(synthetic_root, tmp_path, model_state, caplog, capfd):
    ckpt = tmp_path / "iter_1.pth"
    torch.save({"state_dict": model_state, "meta": {"iter": 1}}, ckpt)
    assert eval_main([str(S1_CONFIG), str(ckpt), "--data-root", str(synthetic_root), "--device", "cpu"]) == 2
    msg = one_error(caplog, capfd)
    assert str(S1_CONFIG) in msg and "not a stage-2" in msg and "configs/stage2/" in msg, msg


def _truncated(path: Path, state: dict) -> None:
    torch.save({"state_dict": state, "meta": {"iter": 1}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CHECKPOINTS = {
    "truncated": (_truncated, "truncated or damaged"),
    # an object torch's weights_only loader refuses (not in mmengine's allowlist either)
    "foreign_object": (lambda path, state: torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, path),
                       "is not an mmengine checkpoint: it holds objects"),
    "empty": (lambda path, state: path.write_bytes(b""), "is empty"),
    "text": (lambda path, state: path.write_text("not a checkpoint\n"), "is not a PyTorch checkpoint"),
    "stage1_head": (lambda path, state: torch.save({"format": "wsss-stage1-checkpoint", "head": {
        "proj.weight": torch.zeros(2, 2)}, "step": 3}, path), "holds no state dict"),
    "other_model": (lambda path, state: torch.save({"state_dict": {
        "head.proj.weight": torch.zeros(2, 2), **{k: v for k, v in list(state.items())[:-4]}}}, path),
        "does not fit the model"),
    "other_shape": (lambda path, state: torch.save({"state_dict": {
        k: (torch.zeros(3, *v.shape[1:]) if k == "decode_head.conv_seg.bias" else v) for k, v in state.items()}},
        path), "decode_head.conv_seg.bias (3,) vs (21,)"),
}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_test_refuses_an_unusable_checkpoint(kind, synthetic_root, tmp_path, model_state, caplog, capfd):
    write, expected = CHECKPOINTS[kind]
    ckpt = tmp_path / "iter_1.pth"
    write(ckpt, model_state)
    assert eval_main(_test_argv(ckpt, synthetic_root, tmp_path)) == 2
    msg = one_error(caplog, capfd)
    assert str(ckpt) in msg and expected in msg and "stage2_seg.train" in msg, msg
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_test_still_evaluates_a_good_checkpoint(synthetic_root, tmp_path, model_state):
    ckpt = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model_state.items()}, "meta": {"iter": 1}}, ckpt)
    assert eval_main(_test_argv(ckpt, synthetic_root, tmp_path)) == 0  # DDP's "module." prefix is stripped
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.parametrize("device,expected", [("gpu0", "use cpu, cuda or cuda:N"), ("cuda", "no CUDA GPU"),
                                             ("cuda:1", "no CUDA GPU"), ("mps", "only cpu and cuda")])
def test_test_refuses_an_unusable_device(device, expected, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    ckpt = tmp_path / "iter_1.pth"
    ckpt.write_bytes(b"unused")
    assert eval_main([str(S2_CONFIG), str(ckpt), "--device", device]) == 2
    msg = one_error(caplog, capfd)
    assert f"--device {device!r}" in msg and expected in msg, msg


# ------------------------------------------------------------------------ F6: stage2_seg.train --cfg-options
@pytest.mark.parametrize("option,expected", [
    ("train_cfg.max_itres=2", "'max_itres' is not a key of train_cfg (IterBasedTrainLoop); did you mean "
                              "train_cfg.max_iters?"),
    ("train_dataloader.num_wrokers=0", "did you mean train_dataloader.num_workers?"),
    ("model.decode_head.num_clases=3", "did you mean model.decode_head.num_classes?"),
    ("trian_cfg.max_iters=2", "'trian_cfg' is not in the config; did you mean train_cfg?"),
    ("train_cfg.max_iters=abc", "train_cfg.max_iters: expected an integer, got 'abc'"),
    ("train_cfg.max_iters=-3", "train_cfg.max_iters=-3 is out of range: it must be in [1, inf)"),
    ("train_dataloader.batch_size=0", "train_dataloader.batch_size=0 is out of range"),
    ("train_cfg.val_interval=0", "train_cfg.val_interval=0 is out of range"),
    ("default_hooks.checkpoint.interval=0", "default_hooks.checkpoint.interval=0 is out of range"),
    ("val_dataloader.num_workers=-1", "val_dataloader.num_workers=-1 is out of range: it must be in [0, inf)"),
])
def test_train_refuses_bad_cfg_options_before_the_runner(option, expected, shard_dir, synthetic_root, tmp_path,
                                                         caplog, capfd):
    work = tmp_path / "w"
    assert train_main(_train_argv(shard_dir, synthetic_root, work, option)) == 2
    msg = one_error(caplog, capfd)
    assert expected in msg and str(S2_CONFIG) in msg, msg
    assert not work.exists()  # refused before the runner made the work dir


def test_train_accepts_new_keys_the_built_objects_take(shard_dir):
    """Keys absent from the config but taken by the class built there (or read as optional) stay allowed."""
    cfg = build_config(parse_args([str(S2_CONFIG), "--shards", str(shard_dir), "--cfg-options",
                                   "model.pretrained=None", "train_dataloader.pin_memory=False",
                                   "model.test_cfg.crop_size=(64,64)", "train_cfg.max_iters=3"]))
    assert cfg.model.pretrained is None and cfg.train_dataloader.pin_memory is False
    assert cfg.model.test_cfg.crop_size == (64, 64) and cfg.train_cfg.max_iters == 3


@pytest.mark.parametrize("path", S2_CONFIGS, ids=[p.stem for p in S2_CONFIGS])
def test_shipped_config_values_are_in_range(path):
    check_runner_values(Config.fromfile(str(path)), str(path))


# --------------------------------------------------------------------------------- F12: a full disk in stage 2
def test_full_disk_while_saving_names_the_work_dir_and_leaves_no_truncated_checkpoint(
        shard_dir, synthetic_root, tmp_path, monkeypatch, caplog, capfd):
    from mmengine.fileio.backends import LocalBackend

    real_put = LocalBackend.put
    saved = []

    def put(self, obj, filepath):
        if str(filepath).endswith(".pth"):
            saved.append(filepath)
            if len(saved) == 2:  # the second checkpoint: half of it fits, then the disk is full
                with open(filepath, "wb") as f:
                    f.write(obj[: len(obj) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")  # as f.write raises it: no file name
        real_put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, "put", put)
    work = tmp_path / "w"
    argv = _train_argv(shard_dir, synthetic_root, work, "train_cfg.max_iters=2", "train_cfg.val_interval=2",
                       "default_hooks.checkpoint.interval=1", "train_dataloader.batch_size=2", "--no-pretrained")
    assert train_main(argv) == 2
    msg = one_error(caplog, capfd)
    assert str(work) in msg and "iter_2.pth" in msg and "--work-dir" in msg and "--resume" in msg, msg
    assert "run.root" not in msg and "--out" not in msg  # options this command does not have
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_1.pth"]  # iter_2 not left truncated
    assert not list(work.glob(".*tmp*"))  # nor its temporary file
    with safe_checkpoint_loading():
        assert torch.load(work / "iter_1.pth", map_location="cpu")["meta"]["iter"] == 1  # the complete one is intact
    assert (work / "last_checkpoint").read_text().strip() == str(work / "iter_1.pth")
