"""Prompt embeddings for the foreground classes and the background words (reference_spec 1.3, 3.4).

Each name is put into the template(s) (default: the reference's single ``'a clean origami {}.'``), encoded by
the CLIP text tower and L2-normalised; the embeddings are averaged over templates and normalised again.
Results are cached in memory per (model, device, names, templates), so building the same prompts for
every batch costs nothing.
"""

from __future__ import annotations

import logging
import weakref
from functools import lru_cache
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.class_names import BACKGROUND_WORDS, PROMPT_NAMES
from .model_configs import register_model_configs

_logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a clean origami {}."

_CacheKey = Tuple[str, Tuple[str, ...], Tuple[str, ...]]
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[_CacheKey, torch.Tensor]]" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=8)
def get_tokenizer(model_name: str) -> Callable[..., torch.Tensor]:
    """The open_clip tokenizer of a model (in-repo configs included); cached per name.

    Returns:
        A callable mapping a list of strings to ``(T, context_length)`` int64 token ids.
    """
    import open_clip

    register_model_configs()
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown CLIP model {model_name!r}; valid: {', '.join(open_clip.list_models())}")
    return open_clip.get_tokenizer(model_name)


def _templates(template: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    out = (template,) if isinstance(template, str) else tuple(template)
    if not out:
        raise ValueError("at least one prompt template is needed")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' placeholder for the name")
    return out


@torch.no_grad()
def _encode_names(clip_model: nn.Module, tokenizer: Callable[..., torch.Tensor], names: Tuple[str, ...],
                  templates: Tuple[str, ...]) -> torch.Tensor:
    """``(len(names), E)`` float32 embeddings: mean over templates of normalised encodings, renormalised."""
    device = next(clip_model.parameters()).device
    per_template = []
    for t in templates:
        ids = tokenizer([t.format(n) for n in names]).to(device)
        per_template.append(F.normalize(clip_model.encode_text(ids).float(), dim=-1))
    return F.normalize(torch.stack(per_template, dim=0).mean(dim=0), dim=-1)


def _cached(clip_model: nn.Module, tokenizer: Callable[..., torch.Tensor], names: Sequence[str],
            templates: Tuple[str, ...]) -> torch.Tensor:
    names = tuple(str(n) for n in names)
    if not names:
        raise ValueError("empty list of prompt names")
    device = str(next(clip_model.parameters()).device)
    per_model = _CACHE.setdefault(clip_model, {})
    key = (device, names, templates)
    if key not in per_model:
        per_model[key] = _encode_names(clip_model, tokenizer, names, templates)
    return per_model[key]


def build_text_embeddings(clip_model: nn.Module, tokenizer: Callable[..., torch.Tensor], *,
                          class_prompts: Sequence[str], background_words: Sequence[str],
                          template: Union[str, Sequence[str]] = DEFAULT_TEMPLATE
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background prompt embeddings.

    Args:
        clip_model: an open_clip CLIP model (only its text tower is used, without gradients).
        tokenizer: its tokenizer (:func:`get_tokenizer`).
        class_prompts: one prompt name per foreground class, in label-id order (id 1 first).
        background_words: the background prompt set.
        template: one template or several (embeddings are averaged over templates).

    Returns:
        fg ``(C_fg, E)`` and bg ``(N_bg, E)``, float32, L2-normalised rows, on the model's device.
        Treat them as read-only (they are shared through the cache).
    """
    templates = _templates(template)
    fg = _cached(clip_model, tokenizer, class_prompts, templates)
    bg = _cached(clip_model, tokenizer, background_words, templates) if len(background_words) else \
        fg.new_zeros((0, fg.shape[1]))
    return fg, bg


def build_dataset_text_embeddings(clip_model: nn.Module, tokenizer: Callable[..., torch.Tensor], dataset: str, *,
                                  template: Union[str, Sequence[str]] = DEFAULT_TEMPLATE
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_text_embeddings` with a dataset's prompt names and background words.

    Args:
        dataset: ``voc`` | ``coco`` | ``synthetic``.

    Returns:
        fg ``(C_fg, E)``, bg ``(N_bg, E)`` as in :func:`build_text_embeddings`.
    """
    if dataset not in PROMPT_NAMES:
        raise KeyError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(PROMPT_NAMES))}")
    return build_text_embeddings(clip_model, tokenizer, class_prompts=PROMPT_NAMES[dataset],
                                 background_words=BACKGROUND_WORDS[dataset], template=template)


def clear_text_cache() -> None:
    """Forget all cached prompt embeddings (e.g. after loading other weights into a model)."""
    _CACHE.clear()


__all__ = ["DEFAULT_TEMPLATE", "build_dataset_text_embeddings", "build_text_embeddings", "clear_text_cache",
           "get_tokenizer"]
