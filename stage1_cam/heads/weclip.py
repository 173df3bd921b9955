"""The WeCLIP refinement head: decoder + online pseudo labels from CAM, affinity (RFM) and PAR.

Per training step (reference_spec 9): the CAM source runs CLIP (blocks 0..N-2 without grad, the last
block with grad for GradCAM) and returns per-image CAMs, keys and head-averaged attention maps; the
decoder fuses blocks 0..N-2; the online pseudo label is built per image from the CAMs refined by a
Sinkhorn transition of an attention affinity (mean of the last ``attn_layers`` maps before
``rfm_start_step``, the RFM-filtered mean times the decoder affinity after), box masks, background
(1 - max)^alpha, PAR and argmax. No file I/O, no hidden counters: the step is passed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from ..losses import weclip_loss
from ..refine.affinity import RFM_SCORES, attention_affinity, refine_cams, rfm_affinity
from ..refine.labels import cams_to_label_batch, validate_key_table
from ..refine.par import PAR
from ..refine.sinkhorn import transition_matrix
from ..utils.schema import COUNT, COUNT0, NONNEG, ConfigError, Range
from .base import BlockDecoderHead, DecoderHeadConfig, TrainBatch, register_head
from .decoder import WeCLIPDecoder

_logger = logging.getLogger(__name__)


@dataclass
class RfmCfg:
    enabled: bool = True  # refinement module (decoder affinity) after start_step
    start_step: int = 15000  # first training step using RFM (9144 = reference's effective switch)
    layers: int = 6  # last N attention maps scored by the layer filter
    score: str = "signed"  # signed (reference code) | abs (paper)


@dataclass
class WeCLIPHeadCfg(DecoderHeadConfig):
    """``head=dict(type="weclip", ...)``: the decoder (fusion width ``embed_dim``, ``decoder_layers`` transformer
    blocks, Dropout2d ``dropout`` after fusion), its affinity loss and the refinement module (RFM)."""

    type: str = "weclip"
    aff_loss_weight: float = 0.1  # weight of the affinity loss
    aff_radius: int = 8  # affinity label window radius (patches)
    rfm: RfmCfg = field(default_factory=RfmCfg)

    RANGES: ClassVar[Dict[str, Range]] = {**DecoderHeadConfig.RANGES, "aff_loss_weight": NONNEG, "aff_radius": COUNT,
                                          "rfm.start_step": COUNT0, "rfm.layers": COUNT}

    def check(self) -> None:
        if self.embed_dim % self.decoder_heads:
            raise ConfigError(f"head.embed_dim={self.embed_dim} is not divisible by head.decoder_heads="
                              f"{self.decoder_heads}; the decoder splits its width over the heads")
        if self.rfm.score not in RFM_SCORES:
            raise ConfigError(f"head.rfm.score={self.rfm.score!r} is not valid; valid: {', '.join(RFM_SCORES)}")


@dataclass
class PseudoLabelCfg:
    attn_layers: int = 8  # affinity = mean of the last N attention maps (before RFM)
    box_threshold: float = 0.4
    bg_exponent: float = 1.0
    use_par: bool = True
    parity: bool = False
    rfm_enabled: bool = True
    rfm_start_step: int = 15000
    rfm_layers: int = 6
    rfm_score: str = "signed"


def pad_cams(cams: Sequence[torch.Tensor], keys: Sequence[np.ndarray], *,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image CAMs -> one padded ``(B, Kmax, h, w)`` float32 tensor and ``(B, Kmax)`` keys (``-1`` = padding).

    The keys are checked and laid out on the host (they come from the CPU batch); the keys and the destination
    rows travel to the device in one non-blocking copy, and the CAMs are placed with one ``index_copy_``: no host
    synchronisation.

    Args:
        cams: per image ``(K_b, h, w)`` maps on ``device``.
        keys: per image the ``K_b`` foreground class ids (host arrays).
        device: the CAMs' device.

    Returns:
        ``(padded, padded_keys)``.
    """
    if len(cams) != len(keys) or not cams:
        raise ValueError(f"need one CAM tensor per key array and at least one image, got {len(cams)} and {len(keys)}")
    b = len(cams)
    h, w = cams[0].shape[-2:]
    host_keys = [np.asarray(k, dtype=np.int64).reshape(-1) for k in keys]
    for i, (c, k) in enumerate(zip(cams, host_keys)):
        if c.shape[0] != k.size:
            raise ValueError(f"image {i}: {c.shape[0]} CAMs for {k.size} keys")
        if k.size and k.min() < 0:  # a negative id would pass for padding below
            raise ValueError(f"image {i}: keys must be foreground label ids, got {k.tolist()}")
    kmax = max(k.size for k in host_keys)
    table = np.full((b, kmax), -1, dtype=np.int64)
    rows = []
    for i, k in enumerate(host_keys):  # host-side layout only (numpy)
        table[i, :k.size] = k
        rows.extend(range(i * kmax, i * kmax + k.size))
    validate_key_table(table, IGNORE_INDEX)  # background, the ignore id, duplicates
    both = torch.from_numpy(np.concatenate([table.ravel(), np.asarray(rows, dtype=np.int64)]))
    both = both.to(device, non_blocking=True)  # one copy; pageable source memory: staged before returning
    padded_keys, rows_t = both[:b * kmax].view(b, kmax), both[b * kmax:]
    padded = torch.zeros((b * kmax, h, w), dtype=torch.float32, device=device)
    if rows:
        padded.index_copy_(0, rows_t, torch.cat([c.float() for c in cams]))
    return padded.view(b, kmax, h, w), padded_keys


@torch.no_grad()
def online_pseudo_labels(cams: Sequence[torch.Tensor], keys: Sequence[np.ndarray], attn: torch.Tensor,
                         dec_aff: Optional[torch.Tensor], *, cfg: PseudoLabelCfg, par: Optional[PAR],
                         images: torch.Tensor, out_size: Tuple[int, int],
                         box_threshold: Optional[float] = None,
                         exact_boxes: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """CAMs -> online pseudo labels (reference_spec 1.6-1.7): attention affinity (the mean of the last
    ``cfg.attn_layers`` maps, or with ``dec_aff`` the RFM-filtered mean of the last ``cfg.rfm_layers`` times it),
    Sinkhorn transition, box-masked propagation, background ``(1 - max)^alpha``, PAR, argmax.

    Args:
        cams: per image (K_b, h, w) CAMs in [0, 1].
        keys: per image sorted foreground class ids (K_b,).
        attn: (B, n_blocks, hw, hw) attention, CLS removed.
        dec_aff: (B, hw, hw) decoder affinity, or None for the plain attention mean.
        cfg: the settings (box threshold, background exponent, layers, RFM score, parity).
        par: PAR module, or None to skip it.
        images: (B, 3, H', W') normalised images for PAR.
        out_size: (H, W) of the labels.
        box_threshold: overrides ``cfg.box_threshold`` (e.g. a validation threshold).
        exact_boxes: verify that the device box masks converged (one host synchronisation per call: validation,
            the dump); False, as the training step passes, runs a fixed number of rounds and never synchronises
            (:func:`~stage1_cam.refine.boxes.box_masks`).

    Returns:
        labels (B, H, W) int64 and confidence (B, H, W) float32.
    """
    box = cfg.box_threshold if box_threshold is None else box_threshold
    if dec_aff is not None:
        m, _ = rfm_affinity(attn.float(), dec_aff.float(), last=cfg.rfm_layers, score=cfg.rfm_score)
    else:
        m = attention_affinity(attn.float(), last=cfg.attn_layers)
    trans = transition_matrix(m)  # (B, hw, hw)
    padded, padded_keys = pad_cams(cams, keys, device=attn.device)
    kmax = padded.shape[1]
    padded = refine_cams(padded, trans, box_threshold=box, parity=cfg.parity, valid=padded_keys >= 0,
                         exact_boxes=exact_boxes)
    use_par = par is not None and kmax > 0
    labels, confs = cams_to_label_batch(padded, padded_keys, out_size=out_size, bg_exponent=cfg.bg_exponent,
                                        images=images if use_par else None, par=par if use_par else None,
                                        check_keys=False)  # pad_cams checked them on the host
    return labels.long(), confs.float()


@register_head("weclip")
class WeCLIPHead(BlockDecoderHead):
    """Trainable decoder plus the (non-trainable) online pseudo-label generator.

    Only ``self.decoder`` holds parameters; the backbone and CAM source are held by reference (not
    registered as submodules), so ``state_dict()`` is the head only.

    Args:
        backbone: a :class:`~stage1_cam.models.clip_backbone.FrozenClipBackbone`.
        cam_source: a CAM source (``stage1_cam.cams``) over the same backbone.
        num_classes: classes including background.
        embed_dim, decoder_layers, decoder_heads, dropout: decoder sizes.
        aff_weight, aff_radius: affinity-loss weight and window radius.
        pseudo: pseudo-label settings.
    """

    def __init__(self, *, backbone: nn.Module, cam_source: Any, num_classes: int, embed_dim: int = 256,
                 decoder_layers: int = 3, decoder_heads: int = 8, dropout: float = 0.1, aff_weight: float = 0.1,
                 aff_radius: int = 8, pseudo: Optional[PseudoLabelCfg] = None) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "cam_source", cam_source)
        self.num_classes = num_classes
        self.num_inputs = backbone.num_blocks - 1  # blocks 0..N-2 feed the decoder (reference: 11 of 12)
        self.decoder = WeCLIPDecoder(in_dim=backbone.width, num_inputs=self.num_inputs, embed_dim=embed_dim,
                                     num_classes=num_classes, decoder_layers=decoder_layers,
                                     decoder_heads=decoder_heads, dropout=dropout)
        self.aff_weight, self.aff_radius = aff_weight, aff_radius
        self.pseudo = pseudo or PseudoLabelCfg()
        self.par = PAR() if self.pseudo.use_par else None

    config_class = WeCLIPHeadCfg
    FIGURES = {"pseudo": "online pseudo label (CAM+RFM+PAR), last validation",
               "pseudo_no_rfm": "online pseudo label without RFM (same decoder; ablation)",
               "decoder": "stage-1 decoder, last validation"}

    @classmethod
    def from_config(cls, cfg: Any, *, backbone: nn.Module, cam_source: Any, num_classes: int,
                    run: Any = None) -> "WeCLIPHead":
        """Map a validated stage-1 config to the head (``run`` is not used: WeCLIP trains from image-level labels
        only)."""
        h, c = cfg.head, cfg.cam
        pseudo = PseudoLabelCfg(attn_layers=c.attn_layers, box_threshold=c.box_threshold, bg_exponent=c.bg_exponent,
                                use_par=c.par, parity=c.parity, rfm_enabled=h.rfm.enabled,
                                rfm_start_step=h.rfm.start_step, rfm_layers=h.rfm.layers, rfm_score=h.rfm.score)
        return cls(backbone=backbone, cam_source=cam_source, num_classes=num_classes, embed_dim=h.embed_dim,
                   decoder_layers=h.decoder_layers, decoder_heads=h.decoder_heads, dropout=h.dropout,
                   aff_weight=h.aff_loss_weight, aff_radius=h.aff_radius, pseudo=pseudo)

    @classmethod
    def attention_layers(cls, cfg: Any) -> int:
        """The plain affinity's last ``cam.attn_layers`` maps and the RFM filter's last ``head.rfm.layers``."""
        return max(int(cfg.cam.attn_layers), int(cfg.head.rfm.layers))

    # ------------------------------------------------------------------ pseudo labels
    def use_rfm(self, step: Optional[int]) -> bool:
        """RFM is on from ``rfm_start_step``; ``step=None`` (evaluation) means on, as the reference's val mode."""
        return self.pseudo.rfm_enabled and (step is None or step >= self.pseudo.rfm_start_step)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, cams: Sequence[torch.Tensor], keys: Sequence[np.ndarray],
                      attn: torch.Tensor, dec_aff: Optional[torch.Tensor], *, out_size: Tuple[int, int],
                      par_images: Optional[torch.Tensor] = None, exact_boxes: bool = True
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Online pseudo labels (:func:`online_pseudo_labels` with this head's settings).

        Args:
            images: (B, 3, H, W) normalised network input (for PAR unless ``par_images`` is given).
            cams: per image (K_b, h, w) CAMs in [0, 1].
            keys: per image sorted foreground class ids (K_b,).
            attn: (B, n_blocks, hw, hw) head-averaged attention, CLS removed.
            dec_aff: (B, hw, hw) decoder affinity, or None to disable RFM.
            out_size: (H, W) of the labels.
            exact_boxes: see :func:`online_pseudo_labels` (the training step passes False: no synchronisation).

        Returns:
            labels (B, H, W) int64 and confidence (B, H, W) float32.
        """
        return online_pseudo_labels(cams, keys, attn, dec_aff, cfg=self.pseudo, par=self.par,
                                    images=images if par_images is None else par_images, out_size=out_size,
                                    exact_boxes=exact_boxes)

    # ------------------------------------------------------------------ training / inference
    def decode(self, features: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder on a :class:`ClipFeatures`: (logits (B,C,h,w), F_u (B,E,h,w), A_f (B,hw,hw))."""
        return self.call_trainable(features.tokens[: self.num_inputs], features.grid)

    def forward_train(self, batch: TrainBatch, step: int) -> Dict[str, torch.Tensor]:
        """One training forward: CAM -> decoder -> online pseudo label -> losses.

        Args:
            batch: normalised crops and their image-level labels.
            step: 0-based training step (decides RFM).

        Returns:
            ``loss``, ``loss_seg``, ``loss_aff`` and the online ``pseudo_label`` (B, S, S).
        """
        images, labels = batch.images, batch.labels
        rfm = self.use_rfm(step)
        # Only the maps this step reads: the RFM filter's last `rfm_layers` or the plain mean's `attn_layers`.
        maps = self.pseudo.rfm_layers if rfm else self.pseudo.attn_layers
        cam_out = self.cam_source(images, labels, attn_layers=maps)
        logits, _, aff = self.decode(cam_out.features)
        dec_aff = aff.detach() if rfm else None
        pseudo, _ = self.pseudo_labels(images, cam_out.cams, cam_out.keys, cam_out.attn, dec_aff,
                                       out_size=tuple(images.shape[-2:]), exact_boxes=False)
        losses = weclip_loss(logits.float(), aff.float(), pseudo, grid=cam_out.grid, radius=self.aff_radius,
                             aff_weight=self.aff_weight)
        losses["pseudo_label"] = pseudo
        return losses

    @torch.no_grad()
    def validation_figures(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, out_size: Tuple[int, int],
                           full_images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Online pseudo labels (CAM -> RFM -> PAR at full resolution), the decoder's argmax, and with RFM on the
        same online labels without it (the plain mean of the last attention maps: the module's ablation)."""
        cam_out = self.cam_source(images, list(labels))
        logits, _, aff = self.decode(cam_out.features)
        dec_aff = aff if self.use_rfm(None) else None
        pseudo, _ = self.pseudo_labels(images, cam_out.cams, cam_out.keys, cam_out.attn, dec_aff,
                                       out_size=out_size, par_images=full_images)
        up = F.interpolate(logits.float(), size=tuple(out_size), mode="bilinear", align_corners=False)
        out = {"pseudo": pseudo, "decoder": up.argmax(1)}
        if dec_aff is not None:  # the RFM ablation: same CAMs, attention and decoder, plain attention affinity
            out["pseudo_no_rfm"] = self.pseudo_labels(images, cam_out.cams, cam_out.keys, cam_out.attn, None,
                                                      out_size=out_size, par_images=full_images)[0]
        return out
