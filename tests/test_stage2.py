"""Stage 2: pseudo-mask dataset/transform, configs, safe checkpoint loading, train/resume/test entry points."""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import pickle
import shutil
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
from stage2_seg import pretrained as pretrained_mod  # noqa: E402
from stage2_seg.checkpoint import safe_checkpoint_loading  # noqa: E402
from stage2_seg.datasets import PseudoMaskSegDataset, WSSSValDataset  # noqa: E402
from stage2_seg.transforms import LoadPseudoMaskFromShards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "stage2"
LEAF_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py"))
SMOKE_CONFIG = CONFIG_DIR / "fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py"
NUM_SHARDS = 2
IGNORE_COLS = 5  # the stored pseudo-masks differ from the GT PNGs: their left columns are "ignore"


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> Config:
    return Config.fromfile(str(path))


def _config(path: Path) -> Config:
    """A fresh copy of a parsed config (parsing ``mmseg::`` bases is slow, so each file is parsed once)."""
    return copy.deepcopy(_parsed(path))


def _train_ids(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _pseudo_mask(root: Path, sample_id: str) -> np.ndarray:
    """The mask stored for ``sample_id``: its GT with the left columns set to 255 (so it is not the PNG)."""
    mask = np.array(Image.open(root / "SegmentationClassAug" / f"{sample_id}.png"), dtype=np.uint8)
    mask[:, :IGNORE_COLS] = 255
    return mask


@pytest.fixture(scope="module")
def shard_dir(synthetic_root, tmp_path_factory) -> Path:
    """Two finished shards + manifest holding pseudo-masks for the synthetic train split."""
    out = tmp_path_factory.mktemp("run") / "pseudo_masks"
    meta = ShardMeta(dataset="synthetic", split="train", class_names=CLASSES["synthetic"], palette=voc_palette(256))
    for k, ids in enumerate(assign_shards(_train_ids(synthetic_root), NUM_SHARDS)):
        with ShardWriter(out, k, NUM_SHARDS, meta=meta) as w:
            for sample_id in ids:
                mask = _pseudo_mask(synthetic_root, sample_id)
                fg = [int(c) for c in np.unique(mask) if 0 < c < 255]
                w.write(sample_id, label=mask, confidence=np.ones(mask.shape, np.float32), image_labels=fg)
            w.finalize()
    write_manifest(out, NUM_SHARDS)
    return out


def _dataset(shard_dir, synthetic_root, **kwargs) -> PseudoMaskSegDataset:
    init_default_scope("mmseg")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadPseudoMaskFromShards")]
    return PseudoMaskSegDataset(shard_dir=str(shard_dir), data_root=str(synthetic_root),
                                pipeline=kwargs.pop("pipeline", pipeline), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# dataset and transform


def test_transform_returns_the_stored_mask(shard_dir, synthetic_root):
    ds = _dataset(shard_dir, synthetic_root, class_set="synthetic")
    assert len(ds) == len(_train_ids(synthetic_root))
    assert list(ds.metainfo["classes"]) == list(CLASSES["synthetic"])
    for idx in (0, 5, len(ds) - 1):
        out = ds[idx]
        sample_id = out["sample_id"]
        want = _pseudo_mask(synthetic_root, sample_id)
        png = np.array(Image.open(synthetic_root / "SegmentationClassAug" / f"{sample_id}.png"))
        assert out["gt_seg_map"].dtype == np.uint8
        np.testing.assert_array_equal(out["gt_seg_map"], want)
        assert not np.array_equal(out["gt_seg_map"], png)  # read from the shards, not from the PNG
        assert out["seg_fields"] == ["gt_seg_map"]
        assert out["img"].shape[:2] == want.shape
        assert Path(out["img_path"]).name == f"{sample_id}.jpg"


def test_dataset_takes_classes_from_manifest_when_not_configured(shard_dir, synthetic_root):
    ds = _dataset(shard_dir, synthetic_root, lazy_init=True)
    assert list(ds.metainfo["classes"]) == list(CLASSES["synthetic"])
    assert [list(c) for c in ds.metainfo["palette"]] == [list(c) for c in voc_palette(21)]


def test_train_pipeline_packs_pseudo_masks(shard_dir, synthetic_root):
    cfg = _config(SMOKE_CONFIG)
    ds = _dataset(shard_dir, synthetic_root, class_set="synthetic", pipeline=cfg.train_pipeline)
    packed = ds[0]
    assert packed["inputs"].shape[0] == 3
    seg = packed["data_samples"].gt_sem_seg.data
    assert seg.shape[-2:] == packed["inputs"].shape[-2:]
    assert set(torch.unique(seg).tolist()) <= set(range(21)) | {255}


def test_transform_rejects_a_mask_of_another_size(shard_dir, synthetic_root):
    ds = _dataset(shard_dir, synthetic_root, class_set="synthetic", pipeline=[], lazy_init=False)
    info = ds.get_data_info(0)
    info["img"] = np.zeros((7, 9, 3), np.uint8)
    with pytest.raises(ValueError, match=info["sample_id"]):
        LoadPseudoMaskFromShards()(info)


def test_class_list_mismatch_is_refused(shard_dir, synthetic_root):
    with pytest.raises(ValueError, match="class list mismatch") as err:
        _dataset(shard_dir, synthetic_root, class_set="coco")
    assert "airplane" in str(err.value) and "aeroplane" in str(err.value)  # names both lists
    bad = list(CLASSES["synthetic"])
    bad[3] = "not-a-bird"
    with pytest.raises(ValueError, match="not-a-bird"):
        _dataset(shard_dir, synthetic_root, metainfo=dict(classes=tuple(bad)))


def test_shards_of_another_dataset_are_refused(shard_dir, synthetic_root):
    with pytest.raises(ValueError, match="'synthetic'.*class_set='voc'"):
        _dataset(shard_dir, synthetic_root, class_set="voc")


def test_missing_manifest_and_missing_image(shard_dir, synthetic_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="make pseudo-labels"):
        _dataset(tmp_path, synthetic_root, class_set="synthetic")
    root = tmp_path / "partial"
    shutil.copytree(synthetic_root / "JPEGImages", root / "JPEGImages")
    gone = _train_ids(synthetic_root)[3]
    (root / "JPEGImages" / f"{gone}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"{gone}.jpg"):
        _dataset(shard_dir, root, class_set="synthetic")


def test_val_dataset_reads_the_gt_split(synthetic_root, tmp_path):
    init_default_scope("mmseg")
    ds = WSSSValDataset(data_root=str(synthetic_root), class_set="synthetic",
                        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")])
    val_ids = (synthetic_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(ds) == len(val_ids)
    out = ds[0]
    png = np.array(Image.open(synthetic_root / "SegmentationClassAug" / f"{val_ids[0]}.png"))
    np.testing.assert_array_equal(out["gt_seg_map"], png)
    with pytest.raises(FileNotFoundError, match="val.txt"):
        WSSSValDataset(data_root=str(tmp_path), class_set="synthetic")


# ---------------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("path", LEAF_CONFIGS, ids=[p.stem for p in LEAF_CONFIGS])
def test_config_builds_offline_and_runs_forward(path):
    from mmseg.registry import MODELS

    cfg = _config(path)
    assert "stage2_seg" in cfg.custom_imports["imports"]
    assert cfg.train_dataloader.dataset.type == "PseudoMaskSegDataset"
    assert cfg.val_dataloader.dataset.type == "WSSSValDataset"
    assert "work_dir" not in cfg
    num_classes = len(CLASSES[cfg.class_set])
    assert cfg.model.decode_head.num_classes == num_classes
    assert "SyncBN" not in json.dumps(cfg.model.to_dict())  # single-GPU variants use plain BN
    pretrained_mod.disable_pretrained(cfg.model)
    assert pretrained_mod.find_pretrained(cfg.model) == []
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32), mode="tensor")
    assert logits.shape[:2] == (1, num_classes) and torch.isfinite(logits).all()


def test_pretrained_resolution_and_offline_error(tmp_path, monkeypatch):
    cfg = _config(CONFIG_DIR / "deeplabv3plus_r101-d8_1xb8-20k_voc12aug-pseudo-512x512.py")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained_mod, "_reachable", lambda url, timeout: False)  # offline, no network touched
    (src,) = pretrained_mod.find_pretrained(cfg.model)
    assert src.key == "model.pretrained" and src.url.endswith("resnet101_v1c-e67eebb6.pth")
    assert src.local_path == str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet101_v1c-e67eebb6.pth")
    with pytest.raises(FileNotFoundError, match="--no-pretrained") as err:
        pretrained_mod.check_pretrained_available(cfg.model)
    assert src.local_path in str(err.value) and src.url in str(err.value)
    Path(src.local_path).parent.mkdir(parents=True)
    Path(src.local_path).write_bytes(b"cached")
    assert pretrained_mod.check_pretrained_available(cfg.model) == [src]

    seg = _config(CONFIG_DIR / "segformer_mit-b2_1xb8-40k_voc12aug-pseudo-512x512.py")
    (mit,) = pretrained_mod.find_pretrained(seg.model)
    assert mit.key == "model.backbone.init_cfg" and mit.local_path.endswith("mit_b2_20220624-66e8bf70.pth")
    assert pretrained_mod.disable_pretrained(seg.model) == ["model.backbone.init_cfg"]
    assert seg.model.backbone.init_cfg is None


# ---------------------------------------------------------------------------------------------------------
# checkpoints under torch.load(weights_only=True)


class _GetattrPayload:
    """Pickles as ``getattr(numpy.ndarray, 'tofile')``: the kind of lookup the allowlist must refuse."""

    def __reduce__(self):
        return getattr, (np.ndarray, "tofile")


def test_mmengine_checkpoint_loads_with_weights_only(tmp_path):
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("test_stage2_ckpt")
    hub.update_scalar("train/loss", 0.5)
    hub.update_scalar("train/loss", np.float64(1.5))
    hub.update_info("eta", np.float64(3.0))
    ckpt = {"state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict(),
            "meta": {"iter": 3, "seed": np.int64(7)}}
    path = tmp_path / "iter_3.pth"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # mmengine issue 1655: fails under the default weights_only=True
    with safe_checkpoint_loading():
        loaded = torch.load(path)
    assert loaded["message_hub"]["log_scalars"]["train/loss"].mean() == pytest.approx(1.0)
    assert loaded["meta"]["seed"] == 7
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # the allowlist does not outlive the block

    bad = tmp_path / "bad.pth"
    torch.save({"x": _GetattrPayload()}, bad)
    with safe_checkpoint_loading(), pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        torch.load(bad)


# ---------------------------------------------------------------------------------------------------------
# entry points


def test_train_without_manifest_exits_2(tmp_path, capsys):
    from stage2_seg.train import main

    code = main([str(SMOKE_CONFIG), "--shards", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nowhere" / "manifest.json") in err and "make pseudo-labels" in err


def test_train_command_line_is_applied_to_the_config(shard_dir, tmp_path, monkeypatch):
    from stage2_seg.train import build_config, parse_args

    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "datasets"))
    monkeypatch.setattr(Config, "fromfile", staticmethod(lambda path, **kw: _config(Path(path))))  # parse once
    base = [str(SMOKE_CONFIG), "--shards", str(shard_dir)]
    cfg = build_config(parse_args(base + ["--amp", "--cfg-options", "train_cfg.max_iters=3"]))
    assert cfg.train_dataloader.dataset.shard_dir == str(shard_dir)
    want_root = str(tmp_path / "datasets" / "synthetic")  # $WSSS_DATA_ROOT/<basename of the config's data_root>
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert cfg[loader].dataset.data_root == want_root
    assert cfg.work_dir == str(shard_dir.parent / "stage2" / SMOKE_CONFIG.stem)
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.train_cfg.max_iters == 3
    assert not cfg.get("resume", False)

    cfg = build_config(parse_args(base + ["--data-root", str(tmp_path), "--resume", "--work-dir", str(tmp_path)]))
    assert cfg.train_dataloader.dataset.data_root == str(tmp_path) and cfg.resume and cfg.load_from is None
    with pytest.raises(KeyError, match="trian_cfg"):
        build_config(parse_args(base + ["--cfg-options", "trian_cfg.max_iters=3"]))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_config(parse_args(base + ["--resume", str(tmp_path / "missing.pth")]))


def _train_args(shard_dir, synthetic_root, work_dir, max_iters):
    return [str(SMOKE_CONFIG), "--shards", str(shard_dir), "--work-dir", str(work_dir),
            "--data-root", str(synthetic_root), "--cfg-options", f"train_cfg.max_iters={max_iters}",
            "train_cfg.val_interval=10", "default_hooks.checkpoint.interval=5", "default_hooks.logger.interval=5"]


def test_evaluation_json_lists_every_class(synthetic_root, tmp_path):
    from mmseg.registry import MODELS

    from stage2_seg.test import main as test_main

    init_default_scope("mmseg")
    cfg = _config(SMOKE_CONFIG)
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "random.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"iter": 0}}, ckpt)
    assert test_main([str(SMOKE_CONFIG), str(ckpt), "--data-root", str(synthetic_root), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # default work dir: the checkpoint's folder
    assert metrics["classes"] == list(CLASSES["synthetic"])
    res = metrics["single_scale"]
    assert list(res["per_class_iou"]) == list(CLASSES["synthetic"])
    assert list(res["per_class_acc"]) == list(CLASSES["synthetic"])
    assert 0.0 <= res["aAcc"] <= 1.0 and "msc_flip" not in metrics


@pytest.mark.slow
def test_smoke_training_resumes_and_evaluates(shard_dir, synthetic_root, tmp_path):
    from stage2_seg.test import main as test_main
    from stage2_seg.train import main as train_main

    work = tmp_path / "stage2"
    assert train_main(_train_args(shard_dir, synthetic_root, work, 10)) == 0
    assert (work / "iter_10.pth").is_file() and (work / "iter_5.pth").is_file()

    assert train_main(_train_args(shard_dir, synthetic_root, work, 12) + ["--resume"]) == 0
    logs = sorted(glob.glob(str(work / "*" / "*.log")), key=os.path.getmtime)
    assert "resumed epoch: 0, iter: 10" in Path(logs[-1]).read_text()
    with safe_checkpoint_loading():
        ckpt = torch.load(work / "iter_12.pth", map_location="cpu")
    assert ckpt["meta"]["iter"] == 12

    assert test_main([str(SMOKE_CONFIG), str(work / "iter_12.pth"), "--work-dir", str(tmp_path / "eval"),
                      "--data-root", str(synthetic_root), "--aug-test", "--crf", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["classes"] == list(CLASSES["synthetic"])
    assert metrics["num_images"] == len((synthetic_root / "ImageSets/Segmentation/val.txt").read_text().split())
    assert "single_scale_crf" not in metrics  # the CRF refines the final (multi-scale) probabilities only
    for mode in ("single_scale", "msc_flip", "msc_flip_crf"):
        res = metrics[mode]
        assert set(res["per_class_iou"]) == set(CLASSES["synthetic"])
        assert 0.0 <= res["mIoU"] <= 1.0 and 0.0 <= res["aAcc"] <= 1.0 and 0.0 <= res["mAcc"] <= 1.0
        assert res["per_class_iou"]["background"] is not None
