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

Device version (:func:`box_masks`): the same masks for a batch of maps, on the maps' device, without the host.
Nested contours (holes, and their borders) lie inside their parent's bounding rectangle, and the parity clip is
monotone, so the union over every contour equals the union over the outer borders, i.e. over the bounding boxes of
the 8-connected foreground components. Those are found by max-label propagation (3x3 max pooling) with pointer
jumping, then boxed by ``scatter_reduce`` and painted with one small product; quantisation and threshold follow
steps 1-2 exactly (the threshold through a 256-entry table of ``int(float(threshold) * m)`` computed in Python, so
its double-precision rounding is the reference's). :func:`boxes_from_cam` / :func:`box_mask` stay the reference
implementation (cv2 on the host) that the tests compare :func:`box_masks` against, bit for bit. Differences: a NaN
counts as 0 (the host version raises; checking would synchronise), and with ``exact=False`` a component that needs
more than ``rounds`` propagation rounds to converge would be split (see :func:`box_masks`).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

__all__ = ["boxes_from_cam", "box_mask", "box_masks", "default_rounds"]

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


_LUTS: Dict[Tuple[float, str], torch.Tensor] = {}


def _threshold_lut(threshold: float, device: torch.device) -> torch.Tensor:
    """``int(float(threshold) * m)`` for every map maximum ``m`` in 0..255 (int16, cached per device).

    Python's double-precision product, not float32's: ``0.7 * 10`` is 7.0 in double but 6.99999988 in float32.
    """
    key = (float(threshold), str(device))
    lut = _LUTS.get(key)
    if lut is None:
        table = torch.tensor([int(float(threshold) * m) for m in range(256)], dtype=torch.int16)
        lut = _LUTS[key] = table.to(device, non_blocking=True)  # once per threshold and device, then cached
    return lut


def default_rounds(h: int, w: int) -> int:
    """Propagation rounds run before any convergence check: ``2 (h + w)``.

    With pointer jumping a component converges in about one round per bend of its longest path (a serpentine
    over an n x n grid needs ~1.15 n rounds, a spiral fewer; tests/test_step_syncs.py), far below its pixel count.
    """
    return 2 * (int(h) + int(w))


def _max3x3(labels: torch.Tensor) -> torch.Tensor:
    """The 3x3 neighbourhood maximum of ``(N, h, w)`` non-negative labels (zero padding: labels are >= 0).

    On a GPU one max-pooling kernel; on a CPU, where max pooling also computes indices and runs about ten times
    slower, the same maxima from shifted views (a maximum is exact either way).
    """
    if labels.device.type != "cpu":
        return F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0]
    p = F.pad(labels, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])  # (N, h + 2, w)
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _propagate(labels: torch.Tensor, fg: torch.Tensor, rounds: int) -> torch.Tensor:
    """``rounds`` rounds of 8-connected max-label propagation plus two pointer jumps, on ``(N, h, w)`` float labels.

    A label is ``1 +`` the flat index of a pixel of the same component (0 on background); every step takes a
    maximum over labels of the same component, so the fixed point is the component's largest index everywhere.
    """
    n, h, w = labels.shape
    f = fg.to(labels.dtype).view(n, h * w)
    # Slot 0 of each row stays 0 and slot 1 + i holds pixel i's label, so a label is its own gather index: the
    # background (label 0) gathers 0 and a component's pixels gather from that component; no mask after a jump.
    buf = labels.new_zeros((n, 1 + h * w))
    flat = buf[:, 1:]
    grid = flat.view(n, h, w)  # the same labels as an image (a view: rows of stride 1 + h * w)
    flat.copy_(labels.view(n, h * w))
    for _ in range(rounds):
        torch.mul(_max3x3(grid).view(n, h * w), f, out=flat)
        for _ in range(2):  # pointer jumping: a pixel's label pixel has a label at least as large
            torch.maximum(flat, torch.gather(buf, 1, flat.long()), out=flat)
    return grid


@torch.no_grad()
def box_masks(cams: torch.Tensor, threshold: float, *, parity: bool = True, rounds: Optional[int] = None,
              exact: bool = True) -> torch.Tensor:
    """:func:`box_mask` of many maps at once, on their device (no cv2, no host round trip).

    Args:
        cams: Maps ``(N, h, w)`` (any float dtype; clipped to ``[0, 1]``, NaN counts as 0).
        threshold: Relative threshold in ``[0, 1]`` (a Python number: its table is built on the host once).
        parity: Reproduce the reference's border off-by-one.
        rounds: Propagation rounds before the convergence check (default :func:`default_rounds`).
        exact: Check convergence after ``rounds`` and continue until every component has converged (one host
            synchronisation per call, more only for maps that need more rounds). ``False`` runs exactly ``rounds``
            rounds and never synchronises; a component that needs more would then be boxed in pieces (a smaller
            mask). The training step uses ``False``.

    Returns:
        Boolean masks ``(N, h, w)`` on ``cams``' device, equal to ``box_mask`` of each map.
    """
    if cams.dim() != 3:
        raise ValueError(f"cams must have shape (N, h, w), got {tuple(cams.shape)}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    n, h, w = cams.shape
    device = cams.device
    if n == 0 or h == 0 or w == 0:
        return torch.zeros((n, h, w), dtype=torch.bool, device=device)
    rounds = default_rounds(h, w) if rounds is None else int(rounds)
    # Steps 1-2 of the module docstring: float32 quantisation (truncating cast) and the integer threshold.
    s8 = (torch.nan_to_num(cams.float(), nan=0.0).clamp(0.0, 1.0) * 255).to(torch.uint8)
    thresh = _threshold_lut(threshold, device)[s8.view(n, h * w).amax(dim=1).long()]  # (N,) int16
    fg = s8.to(torch.int16) > thresh[:, None, None]
    # Labels up to h * w + 1 are exact in float32 for any grid below 2**24 pixels (max pooling needs a float).
    index = torch.arange(1, h * w + 1, dtype=torch.float32, device=device).view(1, h, w)
    labels = _propagate(torch.where(fg, index, 0.0), fg, rounds)
    if exact:
        while True:  # one check per call when `rounds` suffices (the usual case)
            nxt = _propagate(labels, fg, 1)
            if torch.equal(nxt, labels):
                break
            labels = _propagate(nxt, fg, rounds)
    # Bounding box of each label (slot = label, 0 = background): rows y0..y1 and columns x0..x1 exclusive ends.
    slot = labels.view(n, h * w).long()
    ys = torch.arange(h, device=device).repeat_interleave(w).expand(n, h * w)
    xs = torch.arange(w, device=device).repeat(h).expand(n, h * w)
    big = max(h, w) + 1
    y0 = torch.full((n, h * w + 1), big, dtype=torch.long, device=device).scatter_reduce(1, slot, ys, "amin")
    x0 = torch.full((n, h * w + 1), big, dtype=torch.long, device=device).scatter_reduce(1, slot, xs, "amin")
    y1 = torch.full((n, h * w + 1), -1, dtype=torch.long, device=device).scatter_reduce(1, slot, ys, "amax") + 1
    x1 = torch.full((n, h * w + 1), -1, dtype=torch.long, device=device).scatter_reduce(1, slot, xs, "amax") + 1
    if parity:
        x1, y1 = x1.clamp_max(w - 1), y1.clamp_max(h - 1)
    y0[:, 0] = big  # slot 0 collects the background: no box
    # Union of the boxes: pixel (y, x) is covered when some slot's row range holds y and its column range x.
    rows = (torch.arange(h, device=device)[None, None] >= y0[..., None]) & \
        (torch.arange(h, device=device)[None, None] < y1[..., None])  # (N, S, h)
    cols = (torch.arange(w, device=device)[None, None] >= x0[..., None]) & \
        (torch.arange(w, device=device)[None, None] < x1[..., None])  # (N, S, w)
    # Counts of 0/1 products are exact in float32 (and TF32); autocast off so bf16 never rounds them.
    with torch.autocast(device_type=device.type, enabled=False):
        cover = rows.transpose(1, 2).float() @ cols.float()  # (N, h, w)
    return cover > 0
