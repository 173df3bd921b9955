"""Refined CAMs -> hard pseudo-label maps (with an optional confidence threshold).

Provenance: re-implements WeCLIP ``clip/clip_tool.py::generate_cam_label`` + the background/PAR/argmax part of
``WeCLIP_model/model_attn_aff_voc.py::forward`` and ``::_refine_cams`` (``reference_spec.md`` section 1.7, parity
oracle 6), and the background rules of CLIP-ES ``eval_cam.py`` (section 3.8) in :func:`background_sweep`:

    1. per class, ``scale_cam_image``: subtract the minimum, divide by ``max + 1e-7``;
    2. resize to the output size (``cv2.resize`` INTER_LINEAR == bilinear with half-pixel centres, i.e.
       ``align_corners=False`` and no antialiasing);
    3. background ``bg = (1 - max_k cam_k) ** bg_exponent``; probabilities ``[bg; cams]``;
    4. optional PAR on ``(image, [bg; cams])``;
    5. argmax over channels -> class ids (channel 0 = background id 0, channel ``i`` = ``keys[i - 1]``).

Deliberate deviations / additions:
    * ``keys`` are label ids in the output space (background is 0), e.g. VOC ids 1..20; the reference carries
      0-based foreground ids and adds 1.
    * A confidence map (maximum of the channels after normalising them to sum to one) is returned, and pixels below
      ``conf_threshold`` become ``ignore_index`` when ``conf_threshold > 0``. The reference produces no ignore
      pixels online (``conf_threshold = 0``).
    * The resize runs in torch (float32) instead of cv2, so results may differ from the reference by float rounding,
      which only matters at exact argmax ties.
    * A batched variant pads images with fewer classes; padded channels can never win the argmax.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from stage1_cam.constants import IGNORE_INDEX
from stage1_cam.refine.par import PAR

_logger = logging.getLogger(__name__)

__all__ = ["minmax_normalize", "cams_to_label", "cams_to_label_batch", "background_sweep"]

KeysLike = Union[torch.Tensor, Sequence[int]]


def minmax_normalize(cams: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map min-max scaling as the reference's ``scale_cam_image``: ``(x - min) / (max(x - min) + eps)``.

    Args:
        cams: Maps ``(..., h, w)``.
        eps: Added to the maximum (1e-7 in the reference).

    Returns:
        float32 maps of the same shape with values in ``[0, 1)``.
    """
    x = cams.float()
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / (x.amax(dim=(-2, -1), keepdim=True) + eps)


def _check_size(out_size: Sequence[int]) -> Tuple[int, int]:
    size = tuple(int(s) for s in out_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"out_size must be (H, W) with positive entries, got {out_size}")
    return size  # type: ignore[return-value]


def _as_keys(keys: KeysLike, device: torch.device) -> torch.Tensor:
    keys_t = torch.as_tensor(keys, device=device)
    if keys_t.numel() == 0:
        return keys_t.long()
    if keys_t.dtype.is_floating_point or keys_t.dtype == torch.bool or keys_t.is_complex():
        raise ValueError(f"keys must be integer class ids, got dtype {keys_t.dtype}")
    return keys_t.long()


def validate_key_table(table: np.ndarray, ignore_index: int) -> None:
    """Validates a padded int64 key table ``(B, K)`` on the host (negative entries are padding): foreground label
    ids only (not 0 = background, not ``ignore_index``), no duplicates within a row.

    Raises:
        ValueError: naming the offending keys.
    """
    valid = table >= 0
    if (table[valid] == 0).any() or (table[valid] == ignore_index).any():
        raise ValueError(
            f"keys must be foreground label ids (not 0 = background, not ignore_index={ignore_index}), got "
            f"{table.tolist()}"
        )
    for row, ok in zip(table, valid):
        ids = row[ok]
        if np.unique(ids).size != ids.size:
            raise ValueError(f"keys contain duplicates: {ids.tolist()}")


def _check_keys(keys: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """:func:`validate_key_table` of padded int64 keys ``(B, K)`` (read on the host once); returns the boolean
    validity mask."""
    validate_key_table(keys.cpu().numpy(), ignore_index)
    return keys >= 0


def _decode(
    probs: torch.Tensor,
    lut: torch.Tensor,
    valid: torch.Tensor,
    *,
    conf_threshold: float,
    ignore_index: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Argmax of ``probs (B, C, H, W)`` over valid channels, mapped through ``lut (B, C)``; plus confidence."""
    gate = valid[:, :, None, None]
    scores = probs.masked_fill(~gate, float("-inf"))
    # max().indices: the first maximum on ties (as numpy argmax), and ~8x faster than argmax(dim=1) over a
    # strided channel dim on CPU.
    idx = scores.max(dim=1).indices  # (B, H, W)
    label = torch.gather(lut, 1, idx.flatten(1)).view_as(idx)
    pos = probs.clamp_min(0).masked_fill(~gate, 0.0)
    total = pos.sum(dim=1)
    confidence = pos.amax(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    if conf_threshold > 0:
        label = label.masked_fill(confidence < conf_threshold, ignore_index)
    return label, confidence


@torch.no_grad()
def cams_to_label_batch(
    cams: torch.Tensor,
    keys: torch.Tensor,
    *,
    out_size: Sequence[int],
    bg_exponent: float = 1.0,
    images: Optional[torch.Tensor] = None,
    par: Optional[PAR] = None,
    conf_threshold: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    check_keys: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`cams_to_label`; images with fewer classes are padded.

    Args:
        cams: Refined class maps ``(B, K, h, w)``; channels whose key is negative are padding and ignored.
        keys: Label ids ``(B, K)`` int64 for each channel, ``-1`` for padding.
        out_size: Output ``(H, W)``.
        bg_exponent: Exponent ``alpha`` of the background ``(1 - max_k cam_k) ** alpha``.
        images: Normalised images ``(B, 3, H', W')`` for PAR (resized by PAR to ``(H, W)``), or None.
        par: PAR module, required together with ``images``.
        conf_threshold: Pixels whose confidence is below it become ``ignore_index`` (only when > 0).
        ignore_index: Label value of ignored pixels.
        check_keys: Validate the keys (no background/ignore ids, no duplicates). That reads them on the host (a
            synchronisation for device keys); pass False when the caller checked them there already.

    Returns:
        ``(label, confidence)``: int64 ``(B, H, W)`` label ids and float32 ``(B, H, W)`` confidences in (0, 1].
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must have shape (B, K, h, w), got {tuple(cams.shape)}")
    keys = _as_keys(keys, cams.device)
    if keys.shape != cams.shape[:2]:
        raise ValueError(f"keys shape {tuple(keys.shape)} does not match cams {tuple(cams.shape[:2])}")
    if (images is None) != (par is None):
        raise ValueError("PAR refinement needs both `images` and `par`; pass both or neither")
    if bg_exponent <= 0:
        raise ValueError(f"bg_exponent must be > 0, got {bg_exponent}")
    if not 0.0 <= conf_threshold <= 1.0:
        raise ValueError(f"conf_threshold must be in [0, 1], got {conf_threshold}")
    size = _check_size(out_size)
    valid = _check_keys(keys, ignore_index) if check_keys else keys >= 0
    b, k = cams.shape[:2]

    x = minmax_normalize(cams) * valid[:, :, None, None]  # (B, K, h, w); padding channels are 0
    if k == 0:
        x = x.new_zeros((b, 0) + size)
    elif tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    fg_max = x.amax(dim=1, keepdim=True) if k > 0 else x.new_zeros((b, 1) + size)
    bg = (1.0 - fg_max).clamp_min(0.0).pow(bg_exponent)
    probs = torch.cat([bg, x], dim=1)  # (B, 1 + K, H, W)
    if par is not None:
        if images.dim() != 4 or images.shape[0] != b:
            raise ValueError(f"images must have shape (B={b}, 3, H', W'), got {tuple(images.shape)}")
        probs = par(images, probs)
    lut = torch.cat([keys.new_zeros((b, 1)), keys], dim=1).long()
    valid_all = torch.cat([valid.new_ones((b, 1)), valid], dim=1)
    return _decode(probs, lut, valid_all, conf_threshold=conf_threshold, ignore_index=ignore_index)


@torch.no_grad()
def cams_to_label(
    cams: torch.Tensor,
    keys: KeysLike,
    *,
    out_size: Sequence[int],
    bg_exponent: float = 1.0,
    image: Optional[torch.Tensor] = None,
    par: Optional[PAR] = None,
    conf_threshold: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn refined CAMs of one image into a hard label map.

    Args:
        cams: Refined class maps ``(K, h, w)`` (any size; the patch grid in the reference).
        keys: Sorted foreground label ids ``(K,)`` (background is 0), one per CAM channel.
        out_size: Output ``(H, W)``.
        bg_exponent: Exponent ``alpha`` of the background ``(1 - max_k cam_k) ** alpha`` (1 in WeCLIP).
        image: Normalised image ``(3, H', W')`` for PAR, or None to skip PAR.
        par: PAR module, required together with ``image``.
        conf_threshold: Pixels whose confidence is below it become ``ignore_index`` (only when > 0).
        ignore_index: Label value of ignored pixels.

    Returns:
        ``(label, confidence)``: int64 ``(H, W)`` with values in ``{0} | keys`` (plus ``ignore_index`` when
        thresholding), and float32 ``(H, W)`` confidence.
    """
    if cams.dim() != 3:
        raise ValueError(f"cams must have shape (K, h, w), got {tuple(cams.shape)}")
    keys_t = _as_keys(keys, cams.device).reshape(1, -1)
    if image is not None and image.dim() != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    label, confidence = cams_to_label_batch(
        cams[None],
        keys_t,
        out_size=out_size,
        bg_exponent=bg_exponent,
        images=None if image is None else image[None],
        par=par,
        conf_threshold=conf_threshold,
        ignore_index=ignore_index,
    )
    return label[0], confidence[0]


@torch.no_grad()
def background_sweep(
    cams: torch.Tensor,
    keys: KeysLike,
    *,
    exponents: Sequence[float] = (1.0, 2.0),
    constants: Sequence[float] = (),
) -> Dict[str, torch.Tensor]:
    """Label maps for several background rules, for CAM evaluation (CLIP-ES ``eval_cam.py``).

    Args:
        cams: Class maps ``(K, H, W)`` in ``[0, 1]``, already at the evaluation size (no normalisation applied).
        keys: Foreground label ids ``(K,)``.
        exponents: Background ``(1 - max_k cam_k) ** t`` for each ``t``; keys ``"pow{t:g}"``.
        constants: Constant background score ``c`` for each ``c``; keys ``"const{c:g}"``.

    Returns:
        Mapping from setting name to int64 label map ``(H, W)``.
    """
    if cams.dim() != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {tuple(cams.shape)}")
    keys_t = _as_keys(keys, cams.device).reshape(1, -1)
    if keys_t.shape[1] != cams.shape[0]:
        raise ValueError(f"{keys_t.shape[1]} keys given for {cams.shape[0]} CAM channels")
    valid = _check_keys(keys_t, IGNORE_INDEX)
    x = cams.float()[None]
    lut = torch.cat([keys_t.new_zeros((1, 1)), keys_t], dim=1)
    valid_all = torch.cat([valid.new_ones((1, 1)), valid], dim=1)
    fg_max = x.amax(dim=1, keepdim=True) if x.shape[1] > 0 else x.new_zeros((1, 1) + tuple(x.shape[-2:]))
    out: Dict[str, torch.Tensor] = {}
    for t in exponents:
        if t <= 0:
            raise ValueError(f"background exponents must be > 0, got {t}")
        bg = (1.0 - fg_max).clamp_min(0.0).pow(t)
        out[f"pow{t:g}"] = _decode(torch.cat([bg, x], 1), lut, valid_all, conf_threshold=0.0, ignore_index=0)[0][0]
    for c in constants:
        bg = torch.full_like(fg_max, float(c))
        out[f"const{c:g}"] = _decode(torch.cat([bg, x], 1), lut, valid_all, conf_threshold=0.0, ignore_index=0)[0][0]
    return out
