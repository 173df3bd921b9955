"""Bounding-box masks from a class activation map.

Provenance: re-implements ``scoremap2bbox`` (CLIP-ES ``clip/utils.py``, copied into WeCLIP ``clip/utils.py``) with
``multi_contour_eval=True`` and the mask filling in WeCLIP ``clip_tool.py::perform_single_voc_cam``; see
``reference_spec.md`` section 1.6 and parity oracle 3:

    1. quantise ``s8 = uint8(cam * 255)`` (truncation, float32 arithmetic);
    2. binarise with ``cv2.THRESH_BINARY`` at ``int(threshold * max(s8))`` (strictly greater passes);
    3. ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``: every contour, nested ones included;
    4. per contour ``boundingRect`` -> ``(x0, y0, x0 + w, y0 + h)``, then ``x1 <- min(x1, W - 1)`` and
       ``y1 <- min(y1, H - 1)``;
    5. the mask is the union of ``mask[y0:y1, x0:x1] = 1``. Because the clipped end is used as an *exclusive* slice
       end, a box touching the right/bottom border loses its last column/row (``parity=True``).

Deliberate deviations:
    * ``parity=False`` skips the clip in step 4, so border boxes include their last row/column.
    * With no contour the reference returns the dummy box ``[[0, 0, 0, 0]]``; :func:`boxes_from_cam` returns an empty
      ``(0, 4)`` array instead. Both give an empty mask.
    * Values are clipped to ``[0, 1]`` before quantisation, so a value such as ``1.004`` cannot wrap around to 0
      in the uint8 cast.
"""

from __future__ import annotations

import logging
from typing import Union

import cv2
import numpy as np
import torch

_logger = logging.getLogger(__name__)

__all__ = ["boxes_from_cam", "box_mask"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy_cam(cam: ArrayLike) -> np.ndarray:
    if isinstance(cam, torch.Tensor):
        cam = cam.detach().to("cpu", torch.float32).numpy()
    elif not isinstance(cam, np.ndarray):
        raise ValueError(f"cam must be a numpy array or torch.Tensor, got {type(cam).__name__}")
    if cam.ndim != 2:
        raise ValueError(f"cam must have shape (h, w), got {cam.shape}")
    if cam.size == 0:
        raise ValueError(f"cam must be non-empty, got shape {cam.shape}")
    cam = np.asarray(cam, dtype=np.float32)
    if not np.isfinite(cam).all():
        raise ValueError("cam contains NaN or inf values; expected a map in [0, 1]")
    return np.clip(cam, 0.0, 1.0)


def boxes_from_cam(cam: ArrayLike, threshold: float, *, parity: bool = True) -> np.ndarray:
    """Integer bounding boxes of every contour of the thresholded CAM.

    Args:
        cam: Map of shape ``(h, w)`` with values in ``[0, 1]`` (numpy array or tensor on any device).
        threshold: Relative threshold in ``[0, 1]``; pixels with ``s8 > int(threshold * max(s8))`` are foreground.
        parity: Clip ``x1`` to ``w - 1`` and ``y1`` to ``h - 1`` as the reference does.

    Returns:
        int64 array of shape ``(N, 4)`` with rows ``(x0, y0, x1, y1)``; ``x1``/``y1`` are exclusive slice ends.
        ``N = 0`` when there is no contour. Boxes come in ``cv2.findContours`` order.
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    cam_np = _to_numpy_cam(cam)
    height, width = cam_np.shape
    s8 = (cam_np * 255).astype(np.uint8)
    thresh = int(float(threshold) * int(s8.max()))
    _, binary = cv2.threshold(s8, thresh, 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    boxes = np.zeros((len(contours), 4), dtype=np.int64)
    for i, contour in enumerate(contours):
        x, y, w, h = cv2.boundingRect(contour)
        x1, y1 = x + w, y + h
        if parity:
            x1, y1 = min(x1, width - 1), min(y1, height - 1)
        boxes[i] = (x, y, x1, y1)
    return boxes


def box_mask(cam: ArrayLike, threshold: float, *, parity: bool = True) -> ArrayLike:
    """Union of the contour bounding boxes of a thresholded CAM, as a boolean mask.

    Args:
        cam: Map of shape ``(h, w)`` with values in ``[0, 1]``.
        threshold: Relative threshold (0.4 for VOC, 0.7 for COCO in the reference).
        parity: Reproduce the reference's border off-by-one (see the module docstring).

    Returns:
        Boolean mask of shape ``(h, w)``: a ``torch.bool`` tensor on ``cam``'s device when ``cam`` is a tensor,
        otherwise a numpy ``bool`` array.
    """
    boxes = boxes_from_cam(cam, threshold, parity=parity)
    mask = np.zeros(tuple(cam.shape), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    if isinstance(cam, torch.Tensor):
        return torch.from_numpy(mask).to(cam.device)
    return mask
