"""Datasets, the synthetic generator, training transforms and the ``python -m stage1_cam.data`` entry point."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from stage1_cam.constants import ENV_DATA_ROOT, IMAGENET_MEAN, IMAGENET_STD
from stage1_cam.data import (DatasetLayoutError, SegDataset, TrainAugment, TrainCropDataset, build_dataset,
                             check_layout, generate_synthetic, multi_hot, normalize, resolve_root, sample_rng)
from stage1_cam.data import datasets as datasets_mod
from stage1_cam.data.__main__ import main
from stage1_cam.data.class_names import COCO_CLASSES, VOC_CLASSES
from tests.numerics import assert_close_f32

SMALL = dict(num_train=4, num_val=2, image_size=(48, 64), max_objects=3)


# ------------------------------------------------------------------------------------------------ helpers
def _tree_digest(root: Path) -> Dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".wsss_cache" not in p.parts}


def _write_image(path: Path, h: int, w: int, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    img[:, : w // 2, 0] = 250
    assert cv2.imwrite(str(path), img)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)


def _mask(h: int, w: int, ids: Iterable[int]) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for k, cls in enumerate(ids):
        m[k * 2: k * 2 + 2, :4] = cls
    m[-1, -1] = 255
    return m


def _fake_voc(root: Path, labels: Dict[str, List[int]], val: List[str], train: List[str],
              aug_only: Optional[List[str]] = None, h: int = 12, w: int = 16) -> Path:
    """A tiny VOC tree: every id has an image; ``labels`` masks go to both mask folders."""
    for name, ids in labels.items():
        _write_image(root / "JPEGImages" / f"{name}.jpg", h, w)
        if name not in (aug_only or []):
            _write_mask(root / "SegmentationClass" / f"{name}.png", _mask(h, w, ids))
        _write_mask(root / "SegmentationClassAug" / f"{name}.png", _mask(h, w, ids))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{n}\n" for n in train))
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in val))
    return root


# ------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_seed_dependent(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic(tmp_path / "c", seed=4, **SMALL)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db
    assert len(da) == 3 * 6 + 3 + 1  # jpg + 2 png per image, 3 split files, marker
    images = [k for k in da if k.startswith("JPEGImages/")]
    assert all(da[k] != dc[k] for k in images)


def test_synthetic_layout_and_splits(synthetic_root):
    sets = synthetic_root / "ImageSets" / "Segmentation"
    train = sets.joinpath("train.txt").read_text().split()
    val = sets.joinpath("val.txt").read_text().split()
    assert len(train) == 16 and len(val) == 8 and not set(train) & set(val)
    assert sets.joinpath("train_aug.txt").read_text().split() == train
    for name in train + val:
        img = cv2.imread(str(synthetic_root / "JPEGImages" / f"{name}.jpg"))
        assert img.shape == (96, 128, 3)
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            with Image.open(synthetic_root / folder / f"{name}.png") as im:
                assert im.mode == "P" and im.size == (128, 96)
                mask = np.array(im)
            assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}
    # The palette is VOC's: class 1 is (128, 0, 0).
    with Image.open(synthetic_root / "SegmentationClass" / f"{train[0]}.png") as im:
        assert im.getpalette()[3:6] == [128, 0, 0]


def test_synthetic_labels_match_masks_and_every_image_has_foreground(synthetic_root):
    seen = set()
    for split in ("train_aug", "val"):
        ds = SegDataset(root=synthetic_root, dataset="synthetic", split=split)
        assert ds.num_classes == 21 and ds.class_names == VOC_CLASSES and ds.has_gt
        for i in range(len(ds)):
            item = ds[i]
            present = sorted(set(np.unique(item["gt"]).tolist()) - {0, 255})
            assert item["labels"].dtype == np.int64 and item["labels"].tolist() == present
            assert len(present) >= 1
            assert item["image"].dtype == np.uint8 and item["image"].shape == (96, 128, 3)
            assert item["gt"].shape == (96, 128)
            seen.update(present)
    assert len(seen) >= 8  # objects of many classes appear


def test_synthetic_idempotent_and_refuses_other_params(tmp_path):
    root = generate_synthetic(tmp_path / "s", seed=0, **SMALL)
    marker = root / ".generated.json"
    before = _tree_digest(root)
    mtime = (root / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns
    assert generate_synthetic(root, seed=0, **SMALL) == root
    assert (root / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different parameters") as err:
        generate_synthetic(root, seed=1, **SMALL)
    assert str(root) in str(err.value) and "Delete" in str(err.value)
    assert _tree_digest(root) == before

    # An interrupted generation (in-progress marker, no .generated.json) is regenerated.
    marker.unlink()
    (root / ".generating").write_text("{}")
    (root / "JPEGImages" / "train_000000.jpg").write_bytes(b"partial")
    generate_synthetic(root, seed=0, **SMALL)
    assert _tree_digest(root) == before and not (root / ".generating").exists()

    # A foreign non-empty folder is never written into.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by the synthetic generator"):
        generate_synthetic(foreign, **SMALL)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_synthetic_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic(tmp_path / "x", num_train=2, num_val=1, image_size=(8, 8))
    with pytest.raises(ValueError, match="max_objects"):
        generate_synthetic(tmp_path / "x", num_train=2, num_val=1, max_objects=0)


# ------------------------------------------------------------------------------------------ VOC / COCO
def test_resolve_root(monkeypatch, tmp_path):
    assert resolve_root("voc", str(tmp_path)) == tmp_path
    monkeypatch.setenv(ENV_DATA_ROOT, str(tmp_path))
    assert resolve_root("voc") == tmp_path / "VOC2012"
    assert resolve_root("coco") == tmp_path / "coco2014"
    monkeypatch.delenv(ENV_DATA_ROOT)
    assert resolve_root("synthetic") == Path("data") / "synthetic"
    with pytest.raises(KeyError, match="coco, synthetic, voc"):
        resolve_root("cityscapes")
    with pytest.raises(KeyError, match="valid"):
        build_dataset("cityscapes", None, "train")


def test_check_layout_lists_every_missing_path(tmp_path):
    root = _fake_voc(tmp_path / "VOC2012", {"a": [1]}, val=["a"], train=["a"])
    check_layout("voc", root)  # complete
    shutil.rmtree(root / "SegmentationClassAug")
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        check_layout("voc", root)
    msg = str(err.value)
    assert f"{root / 'SegmentationClassAug'}/" in msg and str(root / "ImageSets/Segmentation/val.txt") in msg
    assert "JPEGImages/\n" not in msg.split("How to")[0]  # present folders are not listed
    assert "SBD" in msg and "Expected tree" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetLayoutError, match="make data DATASET=synthetic"):
        check_layout("synthetic", tmp_path / "nothing")
    with pytest.raises(DatasetLayoutError, match="SegmentationClass/"):
        build_dataset("coco", str(tmp_path / "nothing"), "train")


def test_voc_train_aug_is_aug_ids_minus_val(tmp_path):
    labels = {"a": [1], "b": [2, 15], "c": [3], "d": [20], "e": [7]}
    root = _fake_voc(tmp_path / "VOC2012", labels, val=["b", "d"], train=["a", "c"], aug_only=["e"])
    ds = build_dataset("voc", str(root), "train_aug")
    assert ds.names == ["a", "c", "e"]
    assert ds.image_labels("e").tolist() == [7]  # from SegmentationClassAug
    assert SegDataset(root=root, dataset="voc", split="val").image_labels("b").tolist() == [2, 15]
    # An explicit train_aug.txt wins over the derivation.
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("c\na\n")
    assert SegDataset(root=root, dataset="voc", split="train_aug").names == ["c", "a"]
    with pytest.raises(FileNotFoundError, match="available splits"):
        SegDataset(root=root, dataset="voc", split="test")


def test_label_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    labels = {"a": [1], "b": [2], "c": [3]}
    root = _fake_voc(tmp_path / "VOC2012", labels, val=["c"], train=["a", "b"])
    calls = []
    real = datasets_mod._read_mask
    monkeypatch.setattr(datasets_mod, "_read_mask", lambda p: calls.append(p) or real(p))
    SegDataset(root=root, dataset="voc", split="train")
    assert len(calls) == 2 and (root / ".wsss_cache" / "cls_labels.json").is_file()
    calls.clear()
    ds = SegDataset(root=root, dataset="voc", split="train")
    assert calls == [] and ds.image_labels("b").tolist() == [2]
    SegDataset(root=root, dataset="voc", split="val")
    assert len(calls) == 1  # only the new image
    # An edited mask is re-read (the cache key holds size and mtime).
    calls.clear()
    path = root / "SegmentationClassAug" / "b.png"
    _write_mask(path, np.full((12, 16), 9, np.uint8))
    os.utime(path, ns=(1, 1))
    ds = SegDataset(root=root, dataset="voc", split="train")
    assert [p.name for p in calls] == ["b.png"] and ds.image_labels("b").tolist() == [9]


def test_label_cache_falls_back_to_user_cache(tmp_path, monkeypatch):
    root = _fake_voc(tmp_path / "VOC2012", {"a": [4]}, val=["a"], train=["a"])
    (root / ".wsss_cache").write_text("not a folder")  # makes <root>/.wsss_cache unusable
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = SegDataset(root=root, dataset="voc", split="train")
    assert ds.image_labels("a").tolist() == [4]
    assert len(list((tmp_path / "xdg" / "wsss-clip" / "labels").glob("voc-*.json"))) == 1


def test_bad_files_name_the_file(tmp_path):
    root = _fake_voc(tmp_path / "VOC2012", {"a": [1], "b": [2], "c": [3]}, val=["c"], train=["a", "b"])
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    _write_mask(root / "SegmentationClass" / "b.png", np.zeros((5, 5), np.uint8))
    ds = SegDataset(root=root, dataset="voc", split="train")
    with pytest.raises(ValueError, match="a.jpg"):
        ds[0]
    with pytest.raises(ValueError, match=r"SegmentationClass/b\.png.*size"):
        ds[1]
    (root / "JPEGImages" / "c.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        SegDataset(root=root, dataset="voc", split="val")
    _write_mask(root / "SegmentationClassAug" / "a.png", np.full((12, 16), 40, np.uint8))
    with pytest.raises(ValueError, match=r"a\.png.*\[40\]"):
        SegDataset(root=root, dataset="voc", split="train")


def test_coco_reader_on_tiny_tree(tmp_path):
    root = tmp_path / "coco2014"
    # COCO often keeps per-split subfolders; both flat and train/ val/ layouts are read.
    _write_image(root / "JPEGImages" / "train" / "t1.jpg", 10, 14)
    _write_mask(root / "SegmentationClass" / "train" / "t1.png", _mask(10, 14, [1, 80]))
    _write_image(root / "JPEGImages" / "v1.jpg", 10, 14)
    _write_mask(root / "SegmentationClass" / "v1.png", _mask(10, 14, [45]))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    sets.joinpath("train.txt").write_text("t1\n")
    sets.joinpath("val.txt").write_text("v1\n")
    ds = build_dataset("coco", str(root), "train")
    assert ds.num_classes == 81 and ds.class_names == COCO_CLASSES
    item = ds[0]
    assert item["name"] == "t1" and item["labels"].tolist() == [1, 80] and item["gt"].shape == (10, 14)
    assert build_dataset("coco", str(root), "val").image_labels("v1").tolist() == [45]
    assert multi_hot(item["labels"], 81)[[0, 79]].tolist() == [1.0, 1.0]


def test_multi_hot():
    v = multi_hot(np.array([1, 5, 20]), 21)
    assert v.dtype == np.float32 and v.shape == (20,)
    assert np.flatnonzero(v).tolist() == [0, 4, 19]
    assert multi_hot([], 21).sum() == 0
    with pytest.raises(ValueError, match="1..20"):
        multi_hot([0], 21)
    with pytest.raises(ValueError):
        multi_hot([21], 21)


# ------------------------------------------------------------------------------------------- transforms
def test_normalize():
    img = np.full((2, 3, 3), 200, np.uint8)
    out = normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3)
    expected = (200 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    # Terms: mean and std rounded to float32, the subtraction (the mean's rounding relative to |200 - mean|) and the
    # division; element-wise scale |expected|.
    cond = np.abs(IMAGENET_MEAN) / np.abs(200 - np.array(IMAGENET_MEAN))
    assert_close_f32(out[0, 0], expected, terms=3 + float(cond.max()), scale=expected)
    with pytest.raises(ValueError):
        normalize(img, (1, 2), (1, 1, 1))


def test_train_augment_shapes_and_seeded_determinism():
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    aug = TrainAugment(crop_size=32, scale_range=(0.5, 2.0))
    a, box_a = aug(img, sample_rng(1, 7))
    b, box_b = aug(img, sample_rng(1, 7))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and box_a.dtype == np.int64 and box_a.shape == (4,)
    assert np.array_equal(a, b) and np.array_equal(box_a, box_b)
    outs = [aug(img, sample_rng(1, i))[0] for i in range(4)]
    assert not any(np.array_equal(outs[0], o) for o in outs[1:])
    assert not np.array_equal(aug(img, sample_rng(1, 7, epoch=1))[0], a)
    assert not np.array_equal(aug(img, sample_rng(2, 7))[0], a)


@pytest.mark.parametrize("crop", [24, 64, 160])
def test_train_augment_img_box_marks_the_image_region(crop):
    img = np.full((30, 50, 3), 200, np.uint8)  # constant, so resizing keeps the value
    aug = TrainAugment(crop_size=crop, scale_range=(0.5, 2.0))
    inside_val = (200 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    pad_val = -np.array(IMAGENET_MEAN, np.float32) / np.array(IMAGENET_STD, np.float32)
    for i in range(12):
        out, (y0, y1, x0, x1) = aug(img, sample_rng(0, i))
        assert 0 <= y0 < y1 <= crop and 0 <= x0 < x1 <= crop
        inside = np.zeros((crop, crop), bool)
        inside[y0:y1, x0:x1] = True
        hwc = out.transpose(1, 2, 0)
        # Exactly: uint8 resizing keeps a constant image constant, and normalize does the same float32 operations.
        np.testing.assert_array_equal(hwc[inside], np.broadcast_to(inside_val, hwc[inside].shape))
        np.testing.assert_array_equal(hwc[~inside], np.broadcast_to(pad_val, hwc[~inside].shape))


def test_train_augment_scale_and_flip_ranges():
    h, w = 20, 30
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = 255  # left half bright
    aug = TrainAugment(crop_size=80, scale_range=(0.5, 2.0))  # crop holds every rescaled image
    sizes, flips = [], []
    for i in range(80):
        out, (y0, y1, x0, x1) = aug(img, sample_rng(5, i))
        sizes.append((y1 - y0) / h)
        assert abs((x1 - x0) / w - (y1 - y0) / h) < 0.1  # aspect ratio kept
        row = out[0, (y0 + y1) // 2, x0:x1]
        flips.append(bool(row[0] < row[-1]))  # bright half moved to the right
    assert 0.5 - 1e-6 <= min(sizes) < 0.8 and 1.6 < max(sizes) <= 2.0
    assert 0.25 < np.mean(flips) < 0.75
    no_flip = TrainAugment(crop_size=80, scale_range=(1.0, 1.0), flip=False)
    for i in range(10):
        out, (y0, y1, x0, x1) = no_flip(img, sample_rng(5, i))
        assert (y1 - y0, x1 - x0) == (h, w)
        assert out[0, y0, x0] > out[0, y0, x1 - 1]
    with pytest.raises(ValueError, match="scale_range"):
        TrainAugment(scale_range=(2.0, 1.0))


def _triangle_resize(img: np.ndarray, size) -> np.ndarray:
    """Float64 bilinear (triangle) resampling with the kernel widened by the shrink factor: the filter reference_spec
    1.1's PIL BILINEAR applies, written out for the test."""
    out = img.astype(np.float64)
    for axis, n_out in ((1, size[1]), (0, size[0])):
        n_in = out.shape[axis]
        scale = n_in / n_out
        support = max(scale, 1.0)
        centres = (np.arange(n_out) + 0.5) * scale
        taps = np.maximum(0.0, 1 - np.abs((np.arange(n_in)[None] + 0.5 - centres[:, None]) / support))
        taps /= taps.sum(1, keepdims=True)
        out = np.moveaxis(np.tensordot(taps, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out


@pytest.mark.parametrize("ratio", [0.55, 0.8, 1.7])
def test_train_augment_rescales_with_pils_widened_bilinear_kernel(ratio):
    """reference_spec 1.1: the rescale is PIL BILINEAR, which averages over 1/r pixels when it shrinks (OpenCV's
    INTER_LINEAR, used before, reads 2 and differs by tens of grey levels on a textured image)."""
    import cv2

    img = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    aug = TrainAugment(crop_size=128, scale_range=(ratio, ratio), flip=False)  # the crop holds the whole image
    out, (y0, y1, x0, x1) = aug(img, sample_rng(0, 0))
    h, w = int(ratio * 40), int(ratio * 60)
    assert (y1 - y0, x1 - x0) == (h, w)
    ref = _triangle_resize(img, (h, w))
    std = np.array(IMAGENET_STD, np.float32)
    got = out.transpose(1, 2, 0)[y0:y1, x0:x1] * std + np.array(IMAGENET_MEAN, np.float32)
    # PIL rounds to uint8 after each of its two passes: at most 1 grey level from the exact filter (plus float32
    # rounding of the un-normalisation, far below it).
    assert np.abs(got - ref).max() <= 1.01
    if ratio < 1:
        linear = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        assert np.abs(linear - ref).max() > 10  # the check above tells the two filters apart


def test_train_crop_dataset(synthetic_root):
    base = SegDataset(root=synthetic_root, dataset="synthetic", split="train_aug")
    ds = TrainCropDataset(base, TrainAugment(crop_size=64, scale_range=(0.75, 1.5)), seed=3)
    assert len(ds) == len(base)
    item = ds[2]
    assert item["img"].shape == (3, 64, 64) and item["img"].dtype == torch.float32
    assert item["cls_label"].shape == (20,) and item["cls_label"].dtype == torch.float32
    assert item["img_box"].dtype == torch.int64 and item["index"] == 2 and item["name"] == base.names[2]
    present = torch.nonzero(item["cls_label"]).flatten() + 1
    assert torch.equal(present, torch.from_numpy(base.image_labels(item["name"])))
    assert torch.equal(ds[2]["img"], item["img"])
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["img"], item["img"])
    # The stream does not depend on the number of DataLoader workers.
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0]["img"], batches[1]["img"]) and batches[0]["name"] == batches[1]["name"]


def test_train_crop_dataset_excludes_images_without_foreground(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("stage1_cam"), "propagate", True)  # caplog listens on the root
    labels = {"a": [1], "b": [], "c": [2], "d": []}
    root = _fake_voc(tmp_path / "VOC2012", labels, val=["a"], train=["a", "b", "c", "d"])
    base = SegDataset(root=root, dataset="voc", split="train")
    assert base.image_labels("b").size == 0
    with caplog.at_level(logging.WARNING, logger="stage1_cam"):
        ds = TrainCropDataset(base, TrainAugment(crop_size=16), seed=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4" in warnings[0].getMessage()
    assert [ds[i]["name"] for i in range(len(ds))] == ["a", "c"]
    empty = SegDataset(root=root, dataset="voc", split="train")
    empty.names = ["b", "d"]
    with pytest.raises(ValueError, match="no image"):
        TrainCropDataset(empty, TrainAugment(crop_size=16), seed=0)


# ------------------------------------------------------------------------------------------ entry point
def test_main_exit_code_on_missing_dataset(tmp_path, capsys):
    assert main(["--dataset", "voc", "--root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "absent" / "JPEGImages") in err


def test_main_generates_synthetic_from_config(tmp_path, capsys):
    root = tmp_path / "syn"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"data = dict(dataset='synthetic', root={str(root)!r}, synthetic=dict(num_train=3, num_val=2, "
                   f"image_size=(40, 48), max_objects=2, seed=5))\n")
    assert main(["--config", str(cfg)]) == 0
    assert (root / ".generated.json").is_file()
    assert len(SegDataset(root=root, dataset="synthetic", split="train_aug")) == 3
    err = capsys.readouterr().err
    assert "train_aug" in err and "21 classes" in err
    cfg.write_text(cfg.read_text().replace("seed=5", "seed=6"))
    assert main(["--config", str(cfg)]) == 2
    assert "different parameters" in capsys.readouterr().err


def test_prompt_words_are_the_references():
    """reference_spec 1.3 written out: the VOC names with its four substitutions, the 25 background words in order,
    COCO's 80 synonym names and its 23 background words (VOC's without keyboard and sign)."""
    from stage1_cam.data.class_names import BACKGROUND_WORDS, COCO_BACKGROUND_WORDS, COCO_PROMPT_NAMES, VOC_PROMPT_NAMES

    subs = {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
            "tvmonitor": "tvmonitor screen"}
    assert VOC_PROMPT_NAMES == tuple(subs.get(n, n) for n in VOC_CLASSES[1:])
    bg = ("ground land grass tree building wall sky lake water river sea railway railroad keyboard helmet cloud "
          "house mountain ocean road rock street valley bridge sign").split()
    assert BACKGROUND_WORDS["voc"] == tuple(bg) and len(bg) == 25
    assert COCO_BACKGROUND_WORDS == BACKGROUND_WORDS["coco"] == tuple(w for w in bg if w not in ("keyboard", "sign"))
    assert len(COCO_BACKGROUND_WORDS) == 23
    assert len(COCO_PROMPT_NAMES) == len(COCO_CLASSES) - 1 == 80
    assert {"backpack,bag", "umbrella,parasol"} <= set(COCO_PROMPT_NAMES)
