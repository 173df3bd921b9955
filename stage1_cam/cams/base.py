"""What every CAM source shares: the output type, label checks, attention stacking and the reference's scaling.

See the package docstring (``stage1_cam.cams``) for the CAM-source contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..models.clip_backbone import ClipFeatures
from ..registry import CAM_SOURCES
from ..utils.cli import BadInputError


@dataclass
class CamOutput:
    """What a CAM source returns for a batch.

    Attributes:
        cams: per image, ``(K_b, h, w)`` float32 maps in ``[0, 1]`` on the patch grid, one per present
            class in ``keys[b]`` order (``(0, h, w)`` for an image without labels).
        keys: per image, int64 array ``(K_b,)`` of the class ids (1-based label ids, sorted).
        attn: ``(B, n_maps, h*w, h*w)`` float32 attention of the last ``n_maps`` blocks (every block unless
            the source was built or called with fewer ``attn_layers``) with the CLS row and column removed
            (head-averaged; see the source for exceptions in parity modes).
        features: the backbone features of the same pass (tokens of every block), so heads need not
            re-run CLIP.
        grid: the patch grid ``(h, w)``.
        cache: source-specific tensors of the pass that a later call of the same source on the same images may
            reuse (ExCEL: the SVC blocks' q, k, v for the LVC pass); empty for most sources.
    """

    cams: List[torch.Tensor]
    keys: List[np.ndarray]
    attn: torch.Tensor
    features: ClipFeatures
    grid: Tuple[int, int]
    cache: Dict[str, Any] = field(default_factory=dict)


def build_cam_source(name: str, **kwargs: Any) -> Any:
    """Build a registered CAM source by name; unknown names raise ``KeyError`` listing the valid ones."""
    return CAM_SOURCES.build(name, **kwargs)


def normalize_labels(labels: Sequence[Sequence[int]], *, batch_size: int, num_classes: int) -> List[np.ndarray]:
    """Validate per-image class-id lists and return sorted unique int64 arrays.

    Args:
        labels: per image, foreground class ids (1-based; 0 is background and not allowed).
        batch_size: expected number of images.
        num_classes: number of foreground classes C_fg (valid ids are ``1..C_fg``).

    Returns:
        ``batch_size`` arrays ``(K_b,)`` int64, sorted and unique.

    Raises:
        ValueError: wrong number of entries or ids outside ``1..num_classes``.
    """
    if len(labels) != batch_size:
        raise ValueError(f"got {len(labels)} label lists for a batch of {batch_size} images")
    out = []
    for b, ids in enumerate(labels):
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.unique(np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel())
        if arr.size and (arr[0] < 1 or arr[-1] > num_classes):
            raise ValueError(f"image {b}: class ids {arr.tolist()} outside 1..{num_classes} (foreground ids are "
                             f"1-based; background 0 is implicit)")
        out.append(arr)
    return out


def check_attn_layers(attn_layers: int, num_blocks: int) -> int:
    """``attn_layers`` (the number of last attention maps a source returns) as an int in ``[1, num_blocks]``."""
    if not 1 <= attn_layers <= num_blocks:
        raise BadInputError(f"attn_layers must be in [1, {num_blocks}] (blocks of the backbone), got {attn_layers}")
    return int(attn_layers)


def attention_without_cls(attn: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-block ``(B, L, L)`` attention into ``(B, n_blocks, L-1, L-1)`` float32 with CLS removed."""
    return torch.stack([a[:, 1:, 1:].float() for a in attn], dim=1)


def minmax_scale(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The reference's per-map scaling: ``c = cam - min; c / (max(c) + eps)`` over the last two dims.

    Args:
        cam: ``(..., h, w)``.

    Returns:
        Same shape, in ``[0, 1)``; the maximum is ``max / (max + eps)`` (1 up to eps) unless the map is flat.
    """
    flat = cam.flatten(-2)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    flat = flat / (flat.max(dim=-1, keepdim=True).values + eps)
    return flat.reshape(cam.shape)
