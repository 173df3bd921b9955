"""Frozen CLIP backbone and text prompts.

``clip_backbone`` loads an open_clip model (weights resolved offline-first) and runs its image tower block
by block so that every block's tokens and head-averaged attention come out; ``text`` builds the
L2-normalised foreground / background prompt embeddings.
"""

from .clip_backbone import ClipFeatures, FrozenClipBackbone, load_clip, register_model_configs
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
