"""Config -> objects for stage 1: the one place that maps config keys onto constructor arguments."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Tuple

import torch
from mmengine.config import ConfigDict as Config

from .cams import build_cam_source
from .cams.bank import attribute_bank_for
from .data.class_names import BACKGROUND_WORDS, PROMPT_NAMES, get_classes
from .data.transforms import normalization
from .heads import head_class
from .models import FrozenClipBackbone, load_clip
from .models.text import build_text_embeddings, get_tokenizer
from .utils.run_dir import RunDir

_logger = logging.getLogger(__name__)


@dataclass
class Stage1Stack:
    """Everything stage 1 runs: frozen backbone, text embeddings, CAM source and head."""

    clip_model: Any
    backbone: Any
    cam_source: Any
    head: Any
    class_names: Tuple[str, ...]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


def build_cam_stack(cfg: Config, device: torch.device) -> Tuple[Any, Any, Any]:
    """(clip_model, backbone, cam_source) from ``cfg.clip`` and ``cfg.cam``."""

    clip_model = load_clip(cfg.clip.model_name, pretrained=cfg.clip.pretrained, weights=cfg.clip.weights,
                           precision=cfg.clip.precision, device=device)
    backbone = FrozenClipBackbone(clip_model)
    fg, bg = build_text_embeddings(clip_model, get_tokenizer(cfg.clip.model_name),
                                   class_prompts=PROMPT_NAMES[cfg.data.dataset],
                                   background_words=BACKGROUND_WORDS[cfg.data.dataset],
                                   template=cfg.clip.template)
    kwargs: dict = dict(backbone=backbone, fg_text=fg, bg_text=bg)
    if cfg.cam.source == "clip_es_gradcam":
        # Only the last maps the head reads are kept (e.g. the CAM affinity, WeCLIP's RFM layer filter); earlier
        # blocks run fused.
        kwargs["attn_layers"] = min(backbone.num_blocks, head_class(cfg.head.type).attention_layers(cfg))
    if cfg.cam.source == "excel_svc":
        kwargs.update(parity=cfg.cam.parity, topk=cfg.cam.topk)
        if cfg.cam.descriptors:  # TSE: the attribute bank, cached in the run directory (cams/bank.py)
            kwargs["attribute_bank"] = attribute_bank_for(cfg, clip_model)
    cam_source = build_cam_source(cfg.cam.source, **kwargs)
    return clip_model, backbone, cam_source


def build_stage1(cfg: Config, device: torch.device) -> Stage1Stack:
    """Build the full stage-1 stack (head in train mode, on ``device``)."""

    class_names = get_classes(cfg.data.dataset)
    clip_model, backbone, cam_source = build_cam_stack(cfg, device)
    head = head_class(cfg.head.type).from_config(cfg, backbone=backbone, cam_source=cam_source,
                                                 num_classes=len(class_names), run=RunDir.from_config(cfg)).to(device)
    mean, std = normalization(cfg)
    n_train = sum(p.numel() for p in head.parameters() if p.requires_grad)
    _logger.info("built %s head on %s (%s): %s trainable parameters", cfg.head.type, cfg.clip.model_name,
                 cfg.cam.source, f"{n_train:,}")
    return Stage1Stack(clip_model=clip_model, backbone=backbone, cam_source=cam_source, head=head,
                       class_names=class_names, mean=mean, std=std)
