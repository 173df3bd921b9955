"""WeakCLIP losses: balanced seed loss, CRF-constraint boundary loss, score-map cross-entropy."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...constants import IGNORE_INDEX
from ...refine.crf import dense_crf
from .config import BOUNDARY_CRF

_PROB_FLOOR = 1e-4  # probabilities and CRF marginals are clamped to this in the boundary loss
_KL_CLIP = (0.05, 20.0)  # clip of Q / p inside the log of the boundary loss


def dgcn_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, plus 1e-7, renormalised (the reference's ``dgcn_softmax``): (B, K, h, w)."""
    p = torch.softmax(logits, dim=1) + 1e-7
    return p / p.sum(dim=1, keepdim=True)


def resize_labels(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) integer labels to (B, *size) int64."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def check_mask_labels(labels: torch.Tensor, num_classes: int) -> None:
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ValueError(f"pseudo-mask values {sorted(set(bad.unique().tolist()))} are neither class ids in "
                         f"[0, {num_classes}) nor {IGNORE_INDEX}; the masks were made for another class list")


def seed_loss(probs: torch.Tensor, cues: torch.Tensor) -> torch.Tensor:
    """Balanced seed loss (partial CE), background and foreground cues normalised separately per image.

    ``L = -mean_b[sum_{bg cues} log p_0 / max(n_bg, 1e-4)] - mean_b[sum_{fg cues} log p_c / max(n_fg, 1e-4)]``.

    Args:
        probs: (B, K, h, w) probabilities.
        cues: (B, h, w) int64 class ids, ``IGNORE_INDEX`` = no cue.

    Returns:
        scalar; 0 for images without cues (never NaN).
    """
    check_mask_labels(cues, probs.shape[1])
    valid = cues != IGNORE_INDEX
    idx = torch.where(valid, cues, torch.zeros_like(cues))
    logp = torch.log(probs).gather(1, idx[:, None])[:, 0]  # (B, h, w)
    bg = (valid & (cues == 0)).to(logp.dtype)
    fg = (valid & (cues > 0)).to(logp.dtype)
    l_bg = -(logp * bg).sum(dim=(1, 2)) / bg.sum(dim=(1, 2)).clamp(min=1e-4)
    l_fg = -(logp * fg).sum(dim=(1, 2)) / fg.sum(dim=(1, 2)).clamp(min=1e-4)
    return l_bg.mean() + l_fg.mean()


def crf_targets(images: np.ndarray, probs: torch.Tensor, crf: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """Dense-CRF marginals of the (detached) predictions, floored at 1e-4 and renormalised.

    Args:
        images: (B, h, w, 3) uint8 RGB images at the probability size.
        probs: (B, K, h, w) probabilities (any device; detached here).
        crf: :func:`~stage1_cam.refine.crf.dense_crf` parameters (default :data:`BOUNDARY_CRF`).

    Returns:
        (B, K, h, w) float32 on ``probs.device``.
    """
    params = dict(BOUNDARY_CRF if crf is None else crf)
    params["iterations"] = int(params["iterations"])
    p = probs.detach().float().clamp(min=_PROB_FLOOR).cpu().numpy()
    q = np.stack([dense_crf(np.ascontiguousarray(img), pi, **params) for img, pi in zip(images, p)])
    q = np.maximum(q, _PROB_FLOOR)
    q /= q.sum(axis=1, keepdims=True)
    return torch.from_numpy(q).to(probs.device)


def boundary_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CRF-constraint loss: mean over pixels of ``sum_c Q_c log(clip(Q_c / p_c, 0.05, 20))``.

    A clipped KL(Q || p); the gradient flows through ``p`` only (zero where the ratio is clipped).

    Args:
        probs: (B, K, h, w) predicted probabilities (floored at 1e-4 here).
        targets: (B, K, h, w) CRF marginals Q (treated as constants).

    Returns:
        scalar, 0 when ``probs`` equals ``targets``.
    """
    q = targets.detach().to(probs.dtype)
    ratio = (q / probs.clamp(min=_PROB_FLOOR)).clamp(*_KL_CLIP)
    return (q * torch.log(ratio)).sum(dim=1).mean()


def score_map_loss(score_logits: torch.Tensor, labels: torch.Tensor, *, avg_non_ignore: bool = True) -> torch.Tensor:
    """CE of the score-map logits (bilinearly resized to the label size) against the pseudo-mask.

    Args:
        score_logits: (B, K, h, w) ``score_map / tau``.
        labels: (B, H, W) int64 class ids, ``IGNORE_INDEX`` ignored.
        avg_non_ignore: average over labelled pixels (True) or over all pixels (mmseg 0.19, reference).

    Returns:
        scalar; 0 when no pixel is labelled.
    """
    up = F.interpolate(score_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    denom = (labels != IGNORE_INDEX).sum() if avg_non_ignore else labels.new_tensor(labels.numel())
    return per_pixel.sum() / denom.clamp(min=1).to(per_pixel.dtype)


def images_to_uint8(images: torch.Tensor, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float]
                    ) -> np.ndarray:
    """Normalised (B, 3, H, W) images -> (B, *size, 3) uint8 RGB (bilinear, corners aligned, de-normalised)."""
    x = F.interpolate(images.detach().float(), size=size, mode="bilinear", align_corners=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * s + m).clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy())
