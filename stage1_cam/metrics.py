"""Confusion-matrix segmentation metrics (mIoU and friends), shared by CAM evaluation and the report.

Definitions match MMSegmentation 1.2.2's ``IoUMetric`` (``intersect_and_union`` + ``total_area_to_metrics``):

* pixels whose ground truth is ``ignore_index`` are skipped; so are ground-truth values ``>= num_classes``
  (MMSegmentation would still count the prediction there; such values are bad input anyway);
* a prediction outside ``[0, num_classes)`` (e.g. 255 "ignore" in a pseudo-mask) counts as a miss for the
  ground-truth class and is not counted as a prediction of any class; such pixels are kept in an extra
  column so that the ignore coverage can be reported;
* ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)``, NaN when class ``c`` has neither ground truth nor prediction;
  ``mIoU`` is the NaN-mean over classes (so a class predicted but absent from the ground truth counts as 0);
* ``aAcc = sum TP / sum GT``; ``Acc_c = recall_c = TP_c / GT_c``; ``mAcc`` = NaN-mean of ``Acc``;
  ``precision_c = TP_c / Pred_c``.

Two more definitions, those of the WeCLIP / CLIP-ES evaluation scripts (``utils/evaluate.scores``,
``eval_cam.py``), whose papers' CAM and pseudo-mask figures were computed with them:

* ``miou_gt``: the mean IoU over the classes that have ground-truth pixels only (a class predicted but absent
  from the ground truth is left out instead of counting 0). On a full VOC split, where every class occurs, it
  equals ``miou``; on subsets (a 60-image validation, one class missing) it is higher;
* ``fwiou``: CLIP-ES's frequency-weighted IoU, ``sum_c (GT_c / sum GT) IoU_c``.

Unlike MMSegmentation's summary, nothing is rounded and values are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from .constants import IGNORE_INDEX

_logger = logging.getLogger(__name__)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _nanmean(x: np.ndarray) -> float:
    v = x[~np.isnan(x)]
    return float(v.mean()) if v.size else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with NaN/inf floats replaced by None and NumPy scalars/arrays made plain Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class ConfusionMatrix:
    """Accumulates a ``(num_classes, num_classes + 1)`` confusion matrix: rows = ground truth, columns =
    prediction, last column = predictions outside ``[0, num_classes)`` (e.g. 255).

    Args:
        num_classes: number of classes (background included).
        ignore_index: ground-truth value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat[:] = 0

    @property
    def matrix(self) -> np.ndarray:
        """(num_classes, num_classes) counts of in-range predictions; ``[g, p]`` = pixels of class g predicted p."""
        return self.mat[:, : self.num_classes]

    def update(self, pred: Any, gt: Any) -> "ConfusionMatrix":
        """Add one prediction/ground-truth pair (any equal shapes, e.g. (H, W) or (B, H, W)).

        Args:
            pred: integer class ids (NumPy array or torch tensor on any device); out-of-range values, such
                as 255, count as misses.
            gt: integer ground-truth class ids of the same shape; ``ignore_index`` and values
                ``>= num_classes`` are skipped.

        Returns:
            self.

        Raises:
            ValueError: shapes differ or an input is not integer-typed.
        """
        k = self.num_classes
        if _is_torch(pred) or _is_torch(gt):
            import torch

            p_t = pred if _is_torch(pred) else torch.as_tensor(np.asarray(pred))
            g_t = gt if _is_torch(gt) else torch.as_tensor(np.asarray(gt), device=p_t.device)
            ints = all(not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
                       for t in (p_t, g_t))
            self._check(tuple(p_t.shape), tuple(g_t.shape), ints, (p_t.dtype, g_t.dtype))
            g_t = g_t.to(p_t.device).reshape(-1).long()
            p_t = p_t.reshape(-1).long()
            valid = (g_t >= 0) & (g_t < k) & (g_t != self.ignore_index)
            g_t, p_t = g_t[valid], p_t[valid]
            p_t = torch.where((p_t >= 0) & (p_t < k), p_t, torch.full_like(p_t, k))
            counts = torch.bincount(g_t * (k + 1) + p_t, minlength=k * (k + 1))
            self.mat += counts.cpu().numpy().reshape(k, k + 1)
            return self
        p, g = np.asarray(pred), np.asarray(gt)
        self._check(p.shape, g.shape, p.dtype.kind in "iu" and g.dtype.kind in "iu", (p.dtype, g.dtype))
        g = g.reshape(-1).astype(np.int64)
        p = p.reshape(-1).astype(np.int64)
        valid = (g >= 0) & (g < k) & (g != self.ignore_index)
        g, p = g[valid], p[valid]
        p = np.where((p >= 0) & (p < k), p, k)
        self.mat += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)
        return self

    @staticmethod
    def _check(ps: tuple, gs: tuple, integer: bool, dtypes: tuple) -> None:
        if ps != gs:
            raise ValueError(f"prediction shape {ps} differs from ground-truth shape {gs}; resize the prediction "
                             f"to the ground-truth size first")
        if not integer:
            raise ValueError(f"prediction and ground truth must be integer class ids, got dtypes {dtypes}; "
                             f"take the argmax of scores first")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (e.g. from another process); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"cannot merge a confusion matrix of {other.num_classes} classes / ignore "
                             f"{other.ignore_index} into one of {self.num_classes} / {self.ignore_index}")
        self.mat += other.mat
        return self

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics from the accumulated counts (fractions; NaN where undefined).

        Args:
            class_names: names for ``per_class``; defaults to ``"0"``, ``"1"``, ...

        Returns:
            dict with ``miou``, ``miou_gt`` and ``fwiou`` (module docstring), ``iou`` (list per class),
            ``per_class`` (name -> {iou, precision, recall}),
            ``pixel_acc``, ``mean_acc``, ``precision`` and ``recall`` (lists per class), ``ignore_coverage``
            (fraction of valid ground-truth pixels predicted out of range, e.g. 255), ``num_pixels`` (valid
            ground-truth pixels).
        """
        k = self.num_classes
        if class_names is None:
            names = [str(i) for i in range(k)]
        else:
            names = [str(c) for c in class_names]
            if len(names) != k:
                raise ValueError(f"got {len(names)} class names for a {k}-class confusion matrix")
        tp = np.diag(self.mat[:, :k]).astype(np.float64)
        gt = self.mat.sum(axis=1).astype(np.float64)  # includes out-of-range predictions
        pred = self.mat[:, :k].sum(axis=0).astype(np.float64)
        iou = _ratio(tp, gt + pred - tp)
        precision = _ratio(tp, pred)
        recall = _ratio(tp, gt)
        total = float(gt.sum())
        pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
        ignore_cov = float(self.mat[:, k].sum() / total) if total > 0 else float("nan")
        has_gt = gt > 0
        return {
            "miou": _nanmean(iou),
            "miou_gt": float(iou[has_gt].mean()) if has_gt.any() else float("nan"),
            "fwiou": float((gt[has_gt] / total * iou[has_gt]).sum()) if has_gt.any() else float("nan"),
            "iou": iou.tolist(),
            "per_class": {n: {"iou": float(iou[i]), "precision": float(precision[i]), "recall": float(recall[i])}
                          for i, n in enumerate(names)},
            "pixel_acc": pixel_acc,
            "mean_acc": _nanmean(recall),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "ignore_coverage": ignore_cov,
            "num_pixels": int(total),
        }

    def to_json(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`compute` with NaN replaced by None (for ``json.dumps``)."""
        return json_safe(self.compute(class_names))
