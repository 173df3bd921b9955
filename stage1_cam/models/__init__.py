"""Frozen CLIP backbone and text prompts.

``pretrained`` loads an open_clip model (weights resolved offline-first, loaded strictly); ``clip_backbone`` runs
its image tower block by block so that every block's tokens and head-averaged attention come out; ``text`` builds
the L2-normalised foreground / background prompt embeddings.
"""

from .clip_backbone import ClipFeatures, FrozenClipBackbone
from .model_configs import register_model_configs
from .pretrained import load_clip
from .text import build_dataset_text_embeddings, build_text_embeddings, get_tokenizer

__all__ = [
    "ClipFeatures",
    "FrozenClipBackbone",
    "build_dataset_text_embeddings",
    "build_text_embeddings",
    "get_tokenizer",
    "load_clip",
    "register_model_configs",
]
