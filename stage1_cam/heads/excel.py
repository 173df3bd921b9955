"""The ExCEL refinement head (reference_spec 4): WeCLIP's online pseudo labels on ExCEL's attribute maps, a decoder
over all block outputs, ExCEL's decoder affinity and learnable visual calibration (LVC).

Per training step, with the CAM source ``excel_svc`` (:class:`~stage1_cam.cams.excel.ExcelSVC`: SVC + TSE maps):

1. the SVC pass gives the attribute maps of the present classes, the last ``cam.attn_layers`` (6) attention maps
   and the original path's block outputs; the decoder fuses all N of them (ExCEL's ``SegFormerHead(index=12)``:
   WeCLIP's decoder with N inputs instead of N - 1) into ``F_u`` and predicts logits;
2. ExCEL's decoder affinity ``sigmoid(3 (F^T F - mean))`` on channel-normalised ``F_u``
   (:func:`~stage1_cam.refine.affinity.excel_decoder_affinity`) is trained with WeCLIP's affinity loss;
3. from ``lvc_start_step`` on, LVC: the detached ``F_u`` go back into the SVC blocks for a second, calibrated pass
   (only the calibrated path is recomputed) whose maps replace the plain ones, and the refinement uses the RFM
   affinity with the decoder affinity; the attention stays the first pass's. The first pass then runs the original
   path only (the plain maps would go unused) and keeps the SVC blocks' q, k, v for the second;
4. the maps -> Sinkhorn transition -> box masks (``cam.box_threshold``, 0.79) -> background ``(1 - max)^alpha`` ->
   PAR -> argmax, as WeCLIP (:func:`~stage1_cam.heads.weclip.online_pseudo_labels`);
5. loss: WeCLIP's balanced segmentation CE on the online labels plus ``aff_loss_weight`` (0.1) times the affinity
   loss, whose pair labels come from the online labels and, from ``aff_label_switch_step`` on, from the decoder's
   own argmax.

Documented behaviour by default; the reference's quirks behind switches (reference_spec 7.3):

- ``batch_global_mean``: the similarity mean of LVC and of the decoder affinity over the whole batch (the
  reference: images of a batch are coupled) instead of per image;
- ``aff_ignore_diagonal=False``: the affinity labels keep each pixel's pair with itself (the reference's
  ``cams_to_affinity_label`` in effect; its shadowed definition ignored it);
- ``val_box_threshold=0.75``: the reference validated with another box threshold than it trained with;
- ``cam.parity``: the CAM source's head-sum attention and token-axis normalisation, the box border off-by-one.

Deliberate differences: LVC's attention keeps the diagonal of an all-negative row (a zero feature vector) instead of
a NaN row; with head-averaged SVC attention (``cam.parity=False``) the calibrated attention, LVC's included, is the
reference's divided by H (:func:`~stage1_cam.cams.excel.svc_attention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import weclip_loss
from ..refine.affinity import RFM_SCORES, excel_decoder_affinity
from ..refine.par import PAR
from ..utils.schema import COUNT, COUNT0, NONNEG, UNIT, ConfigError, Range
from .base import BlockDecoderHead, DecoderHeadConfig, TrainBatch, register_head
from .decoder import WeCLIPDecoder
from .weclip import PseudoLabelCfg, online_pseudo_labels

_logger = logging.getLogger(__name__)

CAM_SOURCE = "excel_svc"  # the only CAM source the head runs on (it calls the source's LVC pass)


@dataclass
class ExcelHeadCfg(DecoderHeadConfig):
    """``head=dict(type="excel", ...)``: ExCEL's decoder (fusion width ``embed_dim``, ``decoder_layers`` transformer
    blocks, Dropout2d ``dropout`` after fusion), its affinity, LVC and the affinity-label switch."""

    type: str = "excel"
    aff_loss_weight: float = 0.1  # weight of the affinity ("diversity") loss
    aff_radius: int = 8  # affinity label window radius (patches)
    lvc_start_step: Optional[int] = 14000  # first step of LVC and the RFM affinity (VOC 14000, COCO 30000; None: never)
    aff_label_switch_step: Optional[int] = 24000  # affinity labels from the decoder's argmax from here (None: never)
    rfm_score: str = "signed"  # RFM layer score: signed (reference code) | abs (paper)
    val_box_threshold: Optional[float] = None  # box threshold of the validation labels (None: cam.box_threshold)
    batch_global_mean: bool = False  # parity: LVC / decoder-affinity similarity mean over the batch
    aff_ignore_diagonal: bool = True  # ignore each pixel's pair with itself in the affinity labels (parity: False)

    RANGES: ClassVar[Dict[str, Range]] = {**DecoderHeadConfig.RANGES, "aff_loss_weight": NONNEG, "aff_radius": COUNT,
                                          "lvc_start_step": COUNT0, "aff_label_switch_step": COUNT0,
                                          "val_box_threshold": UNIT}

    def check(self) -> None:
        if self.embed_dim % self.decoder_heads:
            raise ConfigError(f"head.embed_dim={self.embed_dim} is not divisible by head.decoder_heads="
                              f"{self.decoder_heads}; the decoder splits its width over the heads")
        if self.rfm_score not in RFM_SCORES:
            raise ConfigError(f"head.rfm_score={self.rfm_score!r} is not valid; valid: {', '.join(RFM_SCORES)}")


@register_head("excel")
class ExcelHead(BlockDecoderHead):
    """Trainable decoder plus the (non-trainable) ExCEL online pseudo-label generator.

    Only ``self.decoder`` holds parameters; the backbone and CAM source are held by reference.

    Args:
        backbone: a :class:`~stage1_cam.models.clip_backbone.FrozenClipBackbone`.
        cam_source: an :class:`~stage1_cam.cams.excel.ExcelSVC` over the same backbone.
        num_classes: classes including background.
        pseudo: pseudo-label settings (``attn_layers`` = ``rfm_layers``: the last maps refining the CAMs).
        Others: the :class:`ExcelHeadCfg` fields.
    """

    config_class = ExcelHeadCfg
    FIGURES = {"pseudo": "online pseudo label with LVC (calibrated maps, RFM, PAR), last validation",
               "pseudo_no_lvc": "online pseudo label without LVC (plain SVC maps and attention; same decoder)",
               "decoder": "stage-1 decoder, last validation"}

    def __init__(self, *, backbone: nn.Module, cam_source: Any, num_classes: int, embed_dim: int = 256,
                 decoder_layers: int = 3, decoder_heads: int = 8, dropout: float = 0.1, aff_weight: float = 0.1,
                 aff_radius: int = 8, lvc_start_step: Optional[int] = 14000,
                 aff_label_switch_step: Optional[int] = 24000, batch_global_mean: bool = False,
                 aff_ignore_diagonal: bool = True, val_box_threshold: Optional[float] = None,
                 pseudo: Optional[PseudoLabelCfg] = None) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "cam_source", cam_source)
        self.num_classes = num_classes
        self.num_inputs = backbone.num_blocks  # all N original-path block outputs (reference: index=12)
        self.decoder = WeCLIPDecoder(in_dim=backbone.width, num_inputs=self.num_inputs, embed_dim=embed_dim,
                                     num_classes=num_classes, decoder_layers=decoder_layers,
                                     decoder_heads=decoder_heads, dropout=dropout)
        self.aff_weight, self.aff_radius = aff_weight, aff_radius
        self.lvc_start_step, self.aff_label_switch_step = lvc_start_step, aff_label_switch_step
        self.batch_global_mean, self.aff_ignore_diagonal = batch_global_mean, aff_ignore_diagonal
        self.val_box_threshold = val_box_threshold
        self.pseudo = pseudo or PseudoLabelCfg(attn_layers=6, box_threshold=0.79, rfm_layers=6)
        self.par = PAR() if self.pseudo.use_par else None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuses CAM sources other than ``excel_svc`` (checked when the config is validated)."""
        if cfg.cam.source != CAM_SOURCE:
            raise ConfigError(f"cam.source={cfg.cam.source!r} does not work with head.type='excel': it needs "
                              f"cam.source={CAM_SOURCE!r} (LVC recalibrates the SVC attention); set "
                              f"cam.source={CAM_SOURCE!r} or start from configs/stage1/_base_/excel_vit-b16.py")

    @classmethod
    def from_config(cls, cfg: Any, *, backbone: nn.Module, cam_source: Any, num_classes: int,
                    run: Any = None) -> "ExcelHead":
        """Map a validated stage-1 config to the head; refuses CAM sources other than ``excel_svc``."""
        h, c = cfg.head, cfg.cam
        cls.check_config(cfg)
        pseudo = PseudoLabelCfg(attn_layers=c.attn_layers, box_threshold=c.box_threshold, bg_exponent=c.bg_exponent,
                                use_par=c.par, parity=c.parity, rfm_enabled=h.lvc_start_step is not None,
                                rfm_start_step=h.lvc_start_step if h.lvc_start_step is not None else 0,
                                rfm_layers=c.attn_layers, rfm_score=h.rfm_score)
        return cls(backbone=backbone, cam_source=cam_source, num_classes=num_classes, embed_dim=h.embed_dim,
                   decoder_layers=h.decoder_layers, decoder_heads=h.decoder_heads, dropout=h.dropout,
                   aff_weight=h.aff_loss_weight, aff_radius=h.aff_radius, lvc_start_step=h.lvc_start_step,
                   aff_label_switch_step=h.aff_label_switch_step, batch_global_mean=h.batch_global_mean,
                   aff_ignore_diagonal=h.aff_ignore_diagonal, val_box_threshold=h.val_box_threshold, pseudo=pseudo)

    # ------------------------------------------------------------------ switches
    def use_lvc(self, step: Optional[int]) -> bool:
        """LVC (and the RFM affinity) from ``lvc_start_step``; ``step=None`` (validation) means on unless never."""
        return self.lvc_start_step is not None and (step is None or step >= self.lvc_start_step)

    def decoder_affinity_labels(self, step: int) -> bool:
        """Whether the affinity labels come from the decoder's argmax (from ``aff_label_switch_step``) at ``step``."""
        return self.aff_label_switch_step is not None and step >= self.aff_label_switch_step

    # ------------------------------------------------------------------ passes
    def decode(self, features: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder on a :class:`ClipFeatures`: (logits (B,C,h,w), F_u (B,E,h,w), ExCEL affinity (B,hw,hw))."""
        logits, fu, _ = self.call_trainable(features.tokens[: self.num_inputs], features.grid)
        return logits, fu, excel_decoder_affinity(fu, batch_global=self.batch_global_mean)

    def online_labels(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, lvc: bool,
                      out_size: Optional[Tuple[int, int]] = None, par_images: Optional[torch.Tensor] = None,
                      box_threshold: Optional[float] = None, plain_too: bool = False,
                      exact_boxes: bool = True) -> Dict[str, Any]:
        """The SVC pass, the decoder and the online pseudo labels (with LVC when ``lvc``; ``exact_boxes`` as
        :func:`~stage1_cam.heads.weclip.online_pseudo_labels`: the training step passes False).

        Returns:
            ``logits``, ``fu`` and ``aff`` of the decoder, ``cam`` (the plain :class:`CamOutput`; with ``lvc`` and not
            ``plain_too`` its ``cams`` are empty: the plain maps are not computed), ``cams`` (the maps
            the labels were made from: calibrated with LVC), ``pseudo`` (B, H, W) int64, and with ``plain_too`` (and
            ``lvc``) ``pseudo_no_lvc``: the labels of the plain maps and attention mean.
        """
        out_size = tuple(images.shape[-2:]) if out_size is None else tuple(out_size)
        par_src = images if par_images is None else par_images
        # With LVC the plain maps are needed only for the ablation (plain_too): skip their calibrated path then.
        cam_out = self.cam_source(images, labels, attn_layers=self.pseudo.attn_layers, maps=not lvc or plain_too,
                                  keep_qkv=lvc)
        logits, fu, aff = self.decode(cam_out.features)
        cams, dec_aff = cam_out.cams, None
        if lvc:
            cams = self.cam_source(images, labels, ex_feats=fu.detach(), ex_batch_global=self.batch_global_mean,
                                   reuse=cam_out).cams
            cam_out.cache.clear()  # the SVC q, k, v: free them before the labels
            dec_aff = aff.detach()
        res: Dict[str, Any] = {"logits": logits, "fu": fu, "aff": aff, "cam": cam_out, "cams": cams}
        res["pseudo"] = online_pseudo_labels(cams, cam_out.keys, cam_out.attn, dec_aff, cfg=self.pseudo,
                                             par=self.par, images=par_src, out_size=out_size,
                                             box_threshold=box_threshold, exact_boxes=exact_boxes)[0]
        if plain_too and lvc:
            res["pseudo_no_lvc"] = online_pseudo_labels(cam_out.cams, cam_out.keys, cam_out.attn, None,
                                                        cfg=self.pseudo, par=self.par, images=par_src,
                                                        out_size=out_size, box_threshold=box_threshold)[0]
        return res

    # ------------------------------------------------------------------ training / inference
    def forward_train(self, batch: TrainBatch, step: int) -> Dict[str, torch.Tensor]:
        """One training forward: SVC maps -> decoder -> (LVC) -> online pseudo label -> losses.

        Returns:
            ``loss``, ``loss_seg``, ``loss_aff``, the online ``pseudo_label`` (B, S, S) and ``aff_label_source``
            (0: the online labels, 1: the decoder's argmax).
        """
        res = self.online_labels(batch.images, batch.labels, lvc=self.use_lvc(step), exact_boxes=False)
        from_decoder = self.decoder_affinity_labels(step)
        losses = weclip_loss(res["logits"].float(), res["aff"].float(), res["pseudo"], grid=res["cam"].grid,
                             radius=self.aff_radius, aff_weight=self.aff_weight, aff_from_prediction=from_decoder,
                             ignore_diagonal=self.aff_ignore_diagonal)
        return {**losses, "pseudo_label": res["pseudo"], "aff_label_source": torch.tensor(int(from_decoder))}

    @torch.no_grad()
    def validation_figures(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, out_size: Tuple[int, int],
                           full_images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Online labels with LVC (``pseudo``; at full resolution, box ``val_box_threshold``), the same without LVC on
        the same decoder (``pseudo_no_lvc``: plain maps and attention mean, the labels before ``lvc_start_step``),
        and the decoder's argmax. Without LVC configured (``lvc_start_step=None``) ``pseudo`` is the plain one."""
        res = self.online_labels(images, list(labels), lvc=self.use_lvc(None), out_size=out_size,
                                 par_images=full_images, box_threshold=self.val_box_threshold, plain_too=True)
        up = F.interpolate(res["logits"].float(), size=tuple(out_size), mode="bilinear", align_corners=False)
        out = {"pseudo": res["pseudo"], "decoder": up.argmax(1)}
        if "pseudo_no_lvc" in res:
            out["pseudo_no_lvc"] = res["pseudo_no_lvc"]
        return out
