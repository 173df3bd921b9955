"""Which weights ``clip.weights = "world:<preset>"`` names: the synthetic world's CLIP presets, their hash, their cache.

Training the world CLIP lives in :mod:`stage1_cam.world_clip`; this module only finds its output, so that loading CLIP
weights (:mod:`stage1_cam.models.pretrained`) and hashing a config (:mod:`stage1_cam.config`) need no training code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..constants import NORMALIZATIONS
from ..data.class_names import BACKGROUND_WORDS, PROMPT_NAMES
from ..data.synthetic import BACKGROUND_STYLES, GENERATOR_VERSION, STUFF_WORDS
from ..utils.cli import BadInputError, UnknownNameError
from .model_configs import model_config

_logger = logging.getLogger(__name__)

WORLD_VERSION = 1  # bump when the training procedure changes: cached weights are then retrained
WORLD_SCHEME = "world:"  # clip.weights = "world:<preset>" resolves to the trained weights of a preset
ENV_CACHE = "WSSS_CACHE"  # cache root (default ~/.cache/wsss-clip); weights go under <root>/world/
WEIGHTS_FILE = "open_clip_state_dict.pt"
META_FILE = "world.json"  # written last: its presence means the entry is complete
DATASET = "synthetic"  # the world is the synthetic set's


@dataclass(frozen=True, kw_only=True)
class WorldCfg:
    """Settings of one world-CLIP training run; every field goes into the cache hash.

    Attributes:
        model_name: open_clip config (in-repo ``stage1_cam/model_configs`` names included); ViT with
            ``pool_type='avg'`` so that training pools like the pipeline.
        template: prompt template (must be the stage-1 config's ``clip.template``).
        normalization: input normalisation (must be the stage-1 config's ``data.normalization``).
        image_size: ``(H, W)`` of the rendered images (the synthetic dataset's size).
        max_objects: objects per image (1..max_objects).
        num_images: rendered training images (crops are drawn from them).
        data_seed: seed of the rendered images.
        seed: seed of the initialisation and of the crop sampling.
        crop_grids: crop sizes in patches ``(rows, cols)``; step ``i`` uses ``crop_grids[i % len]``.
        tokens_per_step: patch tokens per step; the batch size is ``tokens_per_step // (rows * cols)``.
        steps: optimiser steps.
        lr: peak AdamW learning rate (linear warmup, then cosine to zero).
        weight_decay: AdamW weight decay of matrices (not of norms, biases, embeddings, logit scale).
        warmup_steps: linear warmup steps.
        grad_clip: gradient norm clip (0 = off).
        min_visible: a class (or the background) is in a crop's captions when it covers at least this
            fraction of the crop; less than that but more than nothing is ignored (neither caption nor
            negative).
        eval_images: held-out whole images for the before/after evaluation.
        tie_qk: train every image-tower attention with its key projection tied to its query projection
            (symmetric attention logits, a similarity between tokens); the saved weights are a plain
            open_clip state dict whose key rows equal the query rows. See :func:`tie_query_key`.
        region: region size in patches: besides the crop, the tokens of every ``region`` window of it are
            pooled (same forward pass) and contrasted with that window's own captions, so that tokens keep
            describing their own place instead of the whole crop (``(0, 0)`` = off).
        region_weight: weight of the region loss.
        local_layers: last blocks whose attention is kept local (the pipeline's affinity uses the last 8).
        local_weight: weight of their mean attention distance (in grid diagonals) in the loss (0 = off).
            Without it, a CLIP trained for minutes spreads its attention almost uniformly (global mixing),
            and the CLIP-ES refinement, which propagates CAMs along the attention, smears them.
    """

    model_name: str = "wsss-world-ViT-16"
    template: str = "a clean origami {}."
    normalization: str = "imagenet"
    image_size: Tuple[int, int] = (160, 224)
    max_objects: int = 3
    num_images: int = 2000
    data_seed: int = 0
    seed: int = 0
    crop_grids: Tuple[Tuple[int, int], ...] = ((6, 6), (5, 7), (7, 5), (10, 14))
    tokens_per_step: int = 2304
    steps: int = 600
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    grad_clip: float = 1.0
    min_visible: float = 0.03
    eval_images: int = 64
    tie_qk: bool = True
    region: Tuple[int, int] = (2, 2)
    region_weight: float = 0.3
    local_layers: int = 8
    local_weight: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.normalization not in NORMALIZATIONS:
            raise BadInputError(f"world normalization={self.normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        if self.template.count("{}") != 1:
            raise BadInputError(f"world template {self.template!r} must contain exactly one '{{}}'")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise BadInputError(f"world image_size must be (H, W) with both >= 32, got {self.image_size}")
        for name in ("max_objects", "num_images", "steps", "tokens_per_step", "eval_images"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"world {name} must be >= 1, got {getattr(self, name)}")
        if not self.crop_grids or any(len(g) != 2 or min(g) < 1 for g in self.crop_grids):
            raise BadInputError(f"world crop_grids must be non-empty (rows, cols) pairs >= 1, got {self.crop_grids}")
        if self.local_weight < 0 or self.local_layers < 0:
            raise BadInputError(f"world local_weight and local_layers must be >= 0, got {self.local_weight}, "
                                f"{self.local_layers}")
        if len(self.region) != 2 or min(self.region) < 0 or self.region_weight < 0:
            raise BadInputError(f"world region must be (rows, cols) >= 0 and region_weight >= 0, got {self.region}, "
                                f"{self.region_weight}")
        if not 0.0 < self.min_visible < 1.0:
            raise BadInputError(f"world min_visible must be in (0, 1), got {self.min_visible}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise BadInputError("world lr must be > 0 and weight_decay, warmup_steps, grad_clip >= 0")


# Named settings that stage-1 configs refer to as clip.weights = "world:<name>".
WORLD_PRESETS: Dict[str, WorldCfg] = {"default": WorldCfg()}


def world_prompts(template: str) -> Tuple[List[str], Dict[str, List[int]]]:
    """The caption vocabulary: every foreground prompt then every background word, in the template.

    Returns:
        texts (``C_fg + N_bg`` strings; class id ``k`` is text ``k - 1``) and, per background style,
        the indices of its words in ``texts``.
    """
    fg, bg = PROMPT_NAMES[DATASET], BACKGROUND_WORDS[DATASET]
    texts = [template.format(n) for n in fg] + [template.format(w) for w in bg]
    stuff = {s: [len(fg) + bg.index(w) for w in STUFF_WORDS[s]] for s in BACKGROUND_STYLES}
    return texts, stuff


def world_hash(cfg: WorldCfg) -> str:
    """Hex sha256 of everything that determines the trained weights."""
    payload = {"world": dataclasses.asdict(cfg), "world_version": WORLD_VERSION,
               "model_config": model_config(cfg.model_name), "generator_version": GENERATOR_VERSION,
               "prompts": world_prompts(cfg.template)[0], "stuff_words": STUFF_WORDS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def cache_root(root: Union[str, Path, None] = None) -> Path:
    """``<root>/world``, with ``root`` defaulting to ``$WSSS_CACHE`` or ``~/.cache/wsss-clip``."""
    base = root if root is not None else (os.environ.get(ENV_CACHE) or "~/.cache/wsss-clip")
    return Path(base).expanduser() / "world"


def world_cache_dir(cfg: WorldCfg, root: Union[str, Path, None] = None) -> Path:
    """The cache entry of a configuration: ``<cache>/world/<model_name>-<hash[:16]>``."""
    return cache_root(root) / f"{cfg.model_name}-{world_hash(cfg)[:16]}"


def read_meta(entry: Path, digest: str) -> Optional[Dict[str, Any]]:
    meta_path, weights = entry / META_FILE, entry / WEIGHTS_FILE
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        _logger.warning("ignoring unreadable %s (%s); retraining", meta_path, err)
        return None
    if meta.get("hash") != digest:
        _logger.warning("ignoring %s: it records another configuration hash; retraining", meta_path)
        return None
    return meta


def get_preset(name: str) -> WorldCfg:
    try:
        return WORLD_PRESETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown world preset {name!r}; valid: {', '.join(sorted(WORLD_PRESETS))}") from None


def resolve_world_weights(spec: str, model_name: str, *, root: Union[str, Path, None] = None) -> str:
    """Resolve ``clip.weights = "world:<preset>"`` to the trained state dict of that preset.

    Args:
        spec: ``"world:<preset>"`` (``"world:"`` alone means ``"world:default"``).
        model_name: the CLIP architecture the caller builds (must be the preset's).
        root: cache root (default ``$WSSS_CACHE`` or ``~/.cache/wsss-clip``).

    Returns:
        Path of the weights file.

    Raises:
        ValueError: ``spec`` is not a world spec, or the preset trains another architecture.
        KeyError: unknown preset.
        FileNotFoundError: the preset has not been trained yet (the message says to run ``make world``).
    """
    if not spec.startswith(WORLD_SCHEME):
        raise BadInputError(f"{spec!r} is not a world weights spec ({WORLD_SCHEME}<preset>)")
    name = spec[len(WORLD_SCHEME):] or "default"
    cfg = get_preset(name)
    if cfg.model_name != model_name:
        raise BadInputError(f"clip.weights={spec!r} holds weights of {cfg.model_name!r}, but clip.model_name is "
                            f"{model_name!r}; set clip.model_name={cfg.model_name!r}")
    entry = world_cache_dir(cfg, root)
    if read_meta(entry, world_hash(cfg)) is None:
        raise FileNotFoundError(
            f"the world CLIP {spec!r} ({cfg.model_name}) has not been trained yet: no {entry / WEIGHTS_FILE}. "
            f"Run `make world` (python -m stage1_cam.world_clip --preset {name}; a few minutes on 2 CPU cores), "
            f"or set ${ENV_CACHE} to the cache that holds it.")
    return str(entry / WEIGHTS_FILE)
