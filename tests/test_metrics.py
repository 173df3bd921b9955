"""Confusion-matrix metrics: hand-computed cases, out-of-range predictions, and agreement with mmseg's IoUMetric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stage1_cam.metrics import ConfusionMatrix, json_safe
from tests.numerics import F32_U

# 3 classes; the last ground-truth pixel is ignored, one prediction is 255.
GT = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [255, 2, 0]], dtype=np.uint8)


def test_hand_computed_case():
    cm = ConfusionMatrix(3).update(PRED, GT)
    # valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,255) (2,2)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    r = cm.compute(["bg", "a", "b"])
    # IoU: class 0: 1 / (2 + 1 - 1); class 1: 1 / (2 + 2 - 1); class 2: 1 / (1 + 1 - 1)
    assert r["iou"] == pytest.approx([1 / 2, 1 / 3, 1.0])
    assert r["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["recall"] == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert r["mean_acc"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx([1.0, 1 / 2, 1.0])
    assert r["ignore_coverage"] == pytest.approx(1 / 5)
    assert r["num_pixels"] == 5
    assert r["per_class"]["a"] == pytest.approx({"iou": 1 / 3, "precision": 1 / 2, "recall": 1 / 2})


def test_absent_classes_and_false_positives():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    r = ConfusionMatrix(4).update(pred, gt).compute()
    iou = r["iou"]
    # class 2: predicted once but absent from the GT -> IoU 0, counted; class 3: absent everywhere -> NaN, skipped
    assert iou[:3] == pytest.approx([1 / 2, 1.0, 0.0]) and math.isnan(iou[3])
    assert r["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert math.isnan(r["recall"][2]) and r["precision"][2] == 0.0
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1) / 2)
    assert r["ignore_coverage"] == 0.0
    assert math.isnan(r["per_class"]["3"]["iou"])
    js = ConfusionMatrix(4).update(pred, gt).to_json()
    assert js["iou"][3] is None and js["per_class"]["3"]["recall"] is None
    json.dumps(js, allow_nan=False)  # no NaN reaches JSON
    assert json_safe({"x": np.float32("nan"), "y": np.arange(2)}) == {"x": None, "y": [0, 1]}


def test_gt_class_miou_and_fwiou_follow_the_weclip_clip_es_scripts():
    # fcn-style `scores` as in WeCLIP's utils/evaluate.py: mean IoU over classes with ground-truth pixels only,
    # and CLIP-ES's frequency-weighted IoU; a class predicted but absent from the GT (class 2) is left out.
    gt = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 2, 1, 1, 1, 0, 3])
    r = ConfusionMatrix(4).update(pred, gt).compute()
    iou0, iou1 = 2 / 4, 3 / 5  # class 0: TP 2, GT 3, pred 3; class 1: TP 3, GT 5, pred 3
    assert r["miou"] == pytest.approx((iou0 + iou1 + 0 + 0) / 4)  # MMSegmentation: classes 2, 3 count as 0
    assert r["miou_gt"] == pytest.approx((iou0 + iou1) / 2)
    assert r["fwiou"] == pytest.approx(3 / 8 * iou0 + 5 / 8 * iou1)
    full = ConfusionMatrix(2).update(np.array([0, 1, 1]), np.array([0, 0, 1])).compute()
    assert full["miou_gt"] == full["miou"]  # every class has ground truth: the definitions agree
    empty = ConfusionMatrix(2).compute()
    assert math.isnan(empty["miou_gt"]) and math.isnan(empty["fwiou"])


def test_stage2_summary_records_gt_class_miou_and_fwiou():
    """stage2_seg.test's metrics.json entry carries both mIoU definitions and fwIoU (a predicted class without
    ground truth, class 2, makes them differ)."""
    pytest.importorskip("mmseg")
    from stage2_seg.test import summarize

    gt = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 2, 1, 1, 1, 0, 1])
    s = summarize(ConfusionMatrix(3).update(pred, gt), ["background", "cat", "dog"])
    iou0, iou1 = 2 / 4, 4 / 5  # background: TP 2, GT 3, pred 3; cat: TP 4, GT 5, pred 4; dog: TP 0, GT 0, pred 1
    assert s["per_class_iou"] == pytest.approx({"background": iou0, "cat": iou1, "dog": 0.0})
    assert s["mIoU"] == pytest.approx((iou0 + iou1 + 0) / 3)  # MMSegmentation: dog counts as 0
    assert s["mIoU_gt_classes"] == pytest.approx((iou0 + iou1) / 2)  # WeCLIP / CLIP-ES: dog left out
    assert s["fwIoU"] == pytest.approx(3 / 8 * iou0 + 5 / 8 * iou1)
    json.dumps(s, allow_nan=False)


def test_out_of_range_values_and_empty():
    cm = ConfusionMatrix(2)
    gt = np.array([0, 1, 7, 255, 1])  # 7 and 255 are skipped
    pred = np.array([255, 1, 0, 1, -3])  # 255 and -3 are misses
    r = cm.update(pred, gt).compute()
    assert r["num_pixels"] == 3 and r["ignore_coverage"] == pytest.approx(2 / 3)
    assert r["iou"] == pytest.approx([0.0, 1 / 2])  # class 0: 0 / (1 + 0 - 0)
    empty = ConfusionMatrix(2).compute()
    assert empty["num_pixels"] == 0 and math.isnan(empty["miou"]) and math.isnan(empty["pixel_acc"])
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="class names"):
        cm.compute(["only-one"])


def test_torch_inputs_and_merge():
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 2, 3, 255], size=(6, 7)) for _ in range(3)]
    preds = [rng.choice([0, 1, 2, 3, 255], size=(6, 7)) for _ in range(3)]
    whole = ConfusionMatrix(4).update(np.stack(preds), np.stack(gts))
    parts = [ConfusionMatrix(4).update(torch.as_tensor(p, dtype=torch.uint8), torch.as_tensor(g)) for p, g in
             zip(preds, gts)]
    merged = ConfusionMatrix(4)
    for p in parts:
        merged.merge(p)
    assert np.array_equal(merged.mat, whole.mat)
    assert merged.to_json() == whole.to_json()
    with pytest.raises(ValueError, match="merge"):
        merged.merge(ConfusionMatrix(5))
    with pytest.raises(ValueError, match="integer"):
        ConfusionMatrix(4).update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_agrees_with_mmseg_iou_metric():
    pytest.importorskip("mmseg.evaluation")
    from mmseg.evaluation import IoUMetric

    num_classes = 6
    rng = np.random.default_rng(1)
    cm = ConfusionMatrix(num_classes)
    totals = None
    samples = []
    for i in range(5):
        shape = (9 + i, 11)
        gt = rng.choice(np.r_[np.arange(num_classes - 1), 255], size=shape)  # class 5 never in the GT
        pred = rng.choice(np.r_[np.arange(num_classes), 255], size=shape)
        if i == 0:
            pred[gt == 1] = 1  # make one class easy
        cm.update(pred, gt)
        areas = IoUMetric.intersect_and_union(torch.as_tensor(pred), torch.as_tensor(gt), num_classes, 255)
        totals = areas if totals is None else tuple(a + b for a, b in zip(totals, areas))
        samples.append({"pred_sem_seg": {"data": torch.as_tensor(pred)[None]},
                        "gt_sem_seg": {"data": torch.as_tensor(gt)[None]}})
    ref = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU", "mFscore"])
    ours = cm.compute()

    def close(a, b):
        # mmseg divides float32 pixel counts (exact integers here) and averages over the classes in float32
        return np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                          rtol=2 * F32_U * (num_classes + 2), equal_nan=True)

    close(ours["iou"], ref["IoU"])
    close(ours["recall"], ref["Acc"])
    close(ours["precision"], ref["Precision"])
    close(ours["pixel_acc"], ref["aAcc"])
    close(ours["miou"], np.nanmean(ref["IoU"]))
    close(ours["mean_acc"], np.nanmean(ref["Acc"]))

    # The metric object itself (what mmseg's evaluator reports): percentages rounded to 2 decimals.
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(num_classes)]}
    metric.process([], samples)
    summary = metric.compute_metrics(metric.results)
    assert summary["mIoU"] == pytest.approx(round(ours["miou"] * 100, 2), abs=1e-9)
    assert summary["aAcc"] == pytest.approx(round(ours["pixel_acc"] * 100, 2), abs=1e-9)
    assert summary["mAcc"] == pytest.approx(round(ours["mean_acc"] * 100, 2), abs=1e-9)
