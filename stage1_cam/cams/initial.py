"""The initial-CAM pipeline of one image: CLIP-ES input size, CAM source, affinity refinement, labels.

Shared by ``python -m stage1_cam.cams`` (initial CAM shards and their evaluation) and the dump's training-free
mode (:mod:`stage1_cam.dump.training_free`, ``head.type="none"``), so both compute the same refined maps:

1. the image is normalised and resized (bicubic, ``align_corners=False``) to each side rounded up to a multiple of
   the patch (CLIP-ES, reference_spec 3.2), or to a given square (ExCEL's ``infer_lam``: 320 x 320);
2. the CAM source (``cam.source``) gives per-class maps on the patch grid and the last blocks' attention;
3. refinement (CLIP-ES 3.6 / ExCEL 4.6): mean of the last ``cam.attn_layers`` attention maps, Sinkhorn, box masks
   at ``cam.box_threshold``, min-max, bilinear resize to the original size;
4. background ``(1 - max)^cam.bg_exponent`` (:func:`with_background`), then argmax (:func:`labels_from_cams`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..build import build_cam_stack
from ..data.transforms import normalization, normalize
from ..refine.affinity import attention_affinity, refine_cams
from ..refine.sinkhorn import transition_matrix
from ..utils.precision import autocast, autocast_dtype
from .base import minmax_scale

_logger = logging.getLogger(__name__)


def network_size(h: int, w: int, patch: int) -> tuple:
    """CLIP-ES input size: each side rounded up to a multiple of the patch size."""
    return (int(np.ceil(h / patch)) * patch, int(np.ceil(w / patch)) * patch)


@torch.no_grad()
def refined_cams(cams: torch.Tensor, attn: torch.Tensor, *, out_size: tuple, attn_layers: int,
                 box_threshold: float, parity: bool) -> torch.Tensor:
    """(K, h, w) CAMs + (n_blocks, hw, hw) attention -> (K, H, W) refined, min-max scaled, resized maps."""
    if cams.shape[0] == 0:
        return cams.new_zeros((0, *out_size))
    t = transition_matrix(attention_affinity(attn.float(), last=attn_layers))
    r = minmax_scale(refine_cams(cams.float(), t, box_threshold=box_threshold, parity=parity))
    return F.interpolate(r[None], size=out_size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)


def with_background(maps: np.ndarray, bg_exponent: float) -> np.ndarray:
    """(K, H, W) maps in [0, 1] -> (1 + K, H, W) float32 scores ``[(1 - max_k maps)^bg_exponent; maps]``."""
    maps = maps.astype(np.float32, copy=False)
    if maps.shape[0] == 0:
        return np.ones((1, *maps.shape[1:]), np.float32)
    return np.concatenate([(1 - maps.max(0, keepdims=True)) ** bg_exponent, maps], 0)


def labels_from_cams(cams: np.ndarray, keys: np.ndarray, *, bg: str, value: float) -> np.ndarray:
    """(K, H, W) maps -> label ids with background ``(1 - max)^value`` (bg='exp') or constant ``value``."""
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    cams = cams.astype(np.float32)
    if bg == "exp":
        b = (1.0 - cams.max(0, keepdims=True)) ** value
    else:
        b = np.full((1, *cams.shape[1:]), value, np.float32)
    full = np.concatenate([b, cams], 0)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    return lut[full.argmax(0)]


@dataclass
class InitialCams:
    """Refined initial CAMs of one image at a time (steps 1-3 of the module docstring).

    Attributes:
        cam_source: ``source(images, labels) -> CamOutput`` (:mod:`stage1_cam.cams`).
        patch: backbone patch size.
        mean, std: normalisation (0-255 scale, RGB).
        device: device of the CAM source.
        amp: autocast dtype of the network pass (None: float32).
        attn_layers, box_threshold, parity: refinement settings (``cam.*``).
        square: resize every image to this square instead of the CLIP-ES size (None: CLIP-ES).
    """

    cam_source: Callable[..., Any]
    patch: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    device: torch.device
    amp: Optional[torch.dtype]
    attn_layers: int
    box_threshold: float
    parity: bool
    square: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, *, square: Optional[int] = None) -> "InitialCams":
        """Build the CAM stack of ``cfg.clip`` / ``cfg.cam`` on ``device``."""
        mean, std = normalization(cfg)
        _, backbone, cam_source = build_cam_stack(cfg, device)
        return cls(cam_source=cam_source, patch=backbone.patch_size, mean=mean, std=std, device=device,
                   amp=autocast_dtype(cfg.train.amp, device), attn_layers=cfg.cam.attn_layers,
                   box_threshold=cfg.cam.box_threshold, parity=cfg.cam.parity, square=square)

    def normalized(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, H, W) normalised float32 on ``device`` (original size)."""
        return torch.from_numpy(normalize(image, self.mean, self.std)).permute(2, 0, 1)[None].to(self.device)

    def input_size(self, h: int, w: int) -> Tuple[int, int]:
        """Network input size of an (h, w) image."""
        return (self.square, self.square) if self.square else network_size(h, w, self.patch)

    def __call__(self, image: np.ndarray, labels: np.ndarray, *,
                 normalized: Optional[torch.Tensor] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Refined maps of one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            labels: foreground class ids present (at least one).
            normalized: :meth:`normalized` of ``image`` when the caller has it already.

        Returns:
            ``(maps, keys)``: (K, H, W) float32 maps in [0, 1] and the (K,) int64 class ids, sorted.
        """
        h, w = image.shape[:2]
        x = self.normalized(image) if normalized is None else normalized
        x = F.interpolate(x, size=self.input_size(h, w), mode="bicubic", align_corners=False)
        with autocast(self.device, self.amp):
            out = self.cam_source(x, [labels])
        maps = refined_cams(out.cams[0], out.attn[0], out_size=(h, w), attn_layers=self.attn_layers,
                            box_threshold=self.box_threshold, parity=self.parity).cpu().numpy()
        return maps, out.keys[0]


__all__ = ["InitialCams", "labels_from_cams", "network_size", "refined_cams", "with_background"]
