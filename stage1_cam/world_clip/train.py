"""The synthetic world's CLIP: a tiny open_clip model trained contrastively in-repo, on CPU, in minutes.

With random CLIP weights every CAM is noise. ``python -m stage1_cam.world_clip`` (``make world``) trains the
in-repo tiny CLIP (``stage1_cam/model_configs/wsss-world-ViT-16.json``) on captioned synthetic images so that
the whole method can be checked for real offline:

- **Images** come from the synthetic generator (:func:`~stage1_cam.data.synthetic.render_sample`) with a
  split code of their own (2; the dataset's train/val splits use 0/1), so the val set is never seen.
- **Captions** use the pipeline's own prompts: the template (``'a clean origami {}.'``) filled with the
  foreground prompt names (``PROMPT_NAMES['synthetic']``, synonyms included) of the classes in view and the
  background prompt words (``BACKGROUND_WORDS['synthetic']``) of the background style in view
  (``STUFF_WORDS``: sky -> "sky", "cloud", ...). An image has one caption per thing it shows.
- **Loss**: symmetric multi-positive InfoNCE between images and the fixed set of all 45 pipeline prompts;
  prompts of absent classes and words are the negatives. Each present concept gets the same target mass
  (split evenly over a background style's words); classes with only a sliver in view are ignored. The
  same loss is applied to 2x2-patch regions of each crop (pooled from the same forward pass, captioned
  with what they show), so that tokens describe their own place.
- **Crops**: each step takes patch-aligned crops of a few patch-grid sizes, and every crop gets the window
  of the full-image positional embedding it covers, so the model at inference on whole 160x224 images
  sees its trained position grid exactly, while training costs a fraction of whole images. Image
  features are pooled exactly as the pipeline pools them (ln_post, mean of patch tokens, ``@ proj``;
  ``pool_type='avg'``).
- **Attention** is what CLIP-ES refines CAMs with (the mean of the last 8 maps as an affinity), so it must
  group tokens that belong together. A CLIP trained for minutes spreads it almost uniformly instead
  (refined CAMs then lose 10-15 mIoU against the raw GradCAM), so the image tower trains with its key
  projections tied to its query projections (attention logits become a similarity between tokens) and
  with a small penalty on how far the last 8 blocks' attention reaches. The saved weights are a plain
  open_clip state dict of the unchanged architecture (key rows equal to query rows).

Training the default preset takes a few minutes on 2 CPU cores, once (then cached); measured times and the
CAM figures it gives: docs/results.md, "World CLIP".

The result is an open_clip state dict, cached under ``$WSSS_CACHE/world/<model>-<hash>/`` (default
``~/.cache/wsss-clip``), keyed by a hash of the training settings, the model config, the generator
version and the prompts; a second call returns the cached file. Stage-1 configs point at it with
``clip.weights = "world:<preset>"`` (:func:`resolve_world_weights`, called by ``load_clip``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constants import IGNORE_INDEX, NORMALIZATIONS
from ..data.class_names import PROMPT_NAMES
from ..data.synthetic import BACKGROUND_STYLES, GENERATOR_VERSION, render_sample
from ..models.clip_backbone import block_mlp, merge_heads, qkv_heads, softmax_attention
from ..models.model_configs import model_config
from ..models.pretrained import drop_open_clip_random_init_warning
from ..models.world_weights import (DATASET, ENV_CACHE, META_FILE, WEIGHTS_FILE, WORLD_PRESETS,  # noqa: F401
                                    WORLD_SCHEME, WORLD_VERSION, WorldCfg, get_preset, read_meta, world_cache_dir,
                                    world_hash, world_prompts)  # (re-exported: the world's public names)
from ..utils.cli import BadInputError
from ..utils.files import atomic_write, atomic_write_text

_logger = logging.getLogger(__name__)
# Split codes of the generator's per-image seeds: 0 = train, 1 = val (dataset), 2 = world training, 3 = world eval.
_CODE_TRAIN, _CODE_EVAL = 2, 3


@dataclass(kw_only=True)
class WorldResult:
    """What :func:`train_world_clip` returns.

    Attributes:
        weights: path of the open_clip state dict.
        meta: the entry's ``world.json`` (settings, hash, losses, evaluation, timing).
        trained: False when the cached entry was reused.
    """

    weights: Path
    meta: Dict[str, Any]
    trained: bool = False


# ------------------------------------------------------------------------------------------------ data
@dataclass
class _Pool:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N, H, W) uint8
    stuff: np.ndarray  # (N, H, W) uint8


def render_pool(n: int, image_size: Tuple[int, int], max_objects: int, seed: int, code: int) -> _Pool:
    """Render ``n`` synthetic images with the generator's per-image seeds ``(seed, code, i)``."""
    h, w = int(image_size[0]), int(image_size[1])
    images = np.empty((n, h, w, 3), np.uint8)
    labels = np.empty((n, h, w), np.uint8)
    stuff = np.empty((n, h, w), np.uint8)
    for i in range(n):
        s = render_sample(np.random.default_rng([seed, code, i]), h, w, max_objects)
        images[i], labels[i], stuff[i] = s.image, s.label, s.stuff
    return _Pool(images, labels, stuff)


def caption_targets(labels: np.ndarray, stuff: np.ndarray, *, num_fg: int, num_texts: int,
                    stuff_texts: Sequence[Sequence[int]], min_visible: float) -> Tuple[np.ndarray, np.ndarray]:
    """Caption targets of image crops over the text vocabulary of :func:`world_prompts`.

    Args:
        labels: ``(B, h, w)`` uint8 class ids (0 background, 255 ignored).
        stuff: ``(B, h, w)`` uint8 background-style index of every pixel.
        num_fg: foreground classes (text ``k - 1`` is class ``k``).
        num_texts: size of the text vocabulary.
        stuff_texts: per background style, its word indices in the vocabulary.
        min_visible: fraction of the crop a concept must cover to be captioned.

    Returns:
        target ``(B, T)`` float32 (each captioned concept weighs 1, split evenly over a background
        style's words) and valid ``(B, T)`` bool (False for concepts too small to caption or to deny).
    """
    b, h, w = labels.shape
    need = min_visible * h * w
    target = np.zeros((b, num_texts), np.float32)
    valid = np.ones((b, num_texts), bool)
    n_styles = len(stuff_texts)
    for i in range(b):
        lab = labels[i].ravel()
        counts = np.bincount(lab[lab != IGNORE_INDEX], minlength=num_fg + 1)[: num_fg + 1]
        for k in np.flatnonzero(counts[1:]) + 1:
            if counts[k] >= need:
                target[i, k - 1] = 1.0
            else:
                valid[i, k - 1] = False
        bg_styles = np.bincount(stuff[i].ravel()[lab == 0], minlength=n_styles)
        for s in np.flatnonzero(bg_styles):
            words = list(stuff_texts[s])
            if bg_styles[s] >= need:
                target[i, words] = 1.0 / len(words)
            else:
                valid[i, words] = False
    return target, valid


def multi_positive_contrastive_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                                    ) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per image and per text.

    Image -> text: cross-entropy of each image's softmax over the valid texts against its target
    distribution (``target`` normalised per row). Text -> image: for every text captioning at least one
    image, cross-entropy of its softmax over the valid images against the uniform distribution on the
    images it captions. The loss is the mean of both directions.

    Args:
        logits: ``(B, T)`` scaled image-text similarities.
        target: ``(B, T)`` non-negative caption weights (0 = negative).
        valid: ``(B, T)`` bool; False pairs are left out of both softmaxes.

    Returns:
        Scalar loss.
    """
    neg_inf = torch.finfo(logits.dtype).min
    masked = logits.masked_fill(~valid, neg_inf)
    pos = (target > 0) & valid
    rows = pos.any(dim=1)
    cols = pos.any(dim=0)
    assert bool(rows.any()), "a batch without any caption"
    t_rows = target[rows] / target[rows].sum(dim=1, keepdim=True)
    i2t = -(t_rows * F.log_softmax(masked[rows], dim=1)).sum(dim=1).mean()
    t_cols = pos[:, cols].float()
    t_cols = t_cols / t_cols.sum(dim=0, keepdim=True)
    t2i = -(t_cols * F.log_softmax(masked[:, cols], dim=0)).sum(dim=0).mean()
    return 0.5 * (i2t + t2i)


# ----------------------------------------------------------------------------------------------- model
def _token_distances(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """``(1 + rows*cols, 1 + rows*cols)`` distances between tokens in patches, divided by the grid diagonal;
    the CLS token is at distance 1 from everything (including itself)."""
    yy, xx = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    pts = torch.stack([yy.flatten(), xx.flatten()], dim=1).float()
    d = torch.cdist(pts, pts) / max(1.0, math.hypot(rows - 1, cols - 1))
    out = torch.ones((1 + rows * cols, 1 + rows * cols), device=device)
    out[1:, 1:] = d
    return out


def _run_blocks(model: nn.Module, x: torch.Tensor, grid: Tuple[int, int], prior_layers: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The image tower's blocks on ``(B, L, D)`` tokens, with autograd.

    The last ``prior_layers`` blocks compute their attention explicitly (with the same functions as the
    pipeline's :class:`~stage1_cam.models.clip_backbone.FrozenClipBackbone`) to return the mean distance
    their head-averaged patch-query attention travels (see :func:`_token_distances`).

    Returns:
        tokens ``(B, L, D)`` and the mean attention distance (scalar in [0, 1]; 0 when ``prior_layers`` is 0).
    """

    blocks = model.visual.transformer.resblocks
    first = len(blocks) - prior_layers
    dist = _token_distances(grid[0], grid[1], x.device)[1:] if prior_layers else None
    travel = x.new_zeros(())
    for i, blk in enumerate(blocks):
        if i < first:
            x = blk(x)
            continue
        q, k, v = qkv_heads(blk, blk.ln_1(x))
        probs = softmax_attention(q, k)  # (B, H, L, L)
        x = block_mlp(blk, x + blk.ls_1(merge_heads(blk, probs.to(v.dtype) @ v)))
        travel = travel + (probs.mean(dim=1)[:, 1:] * dist).sum(dim=-1).mean()
    return x, travel / max(1, prior_layers)


def encode_image_windows(model: nn.Module, images: torch.Tensor, offsets: torch.Tensor, *,
                         region: Optional[Tuple[int, int]] = None, prior_layers: int = 0
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Image embeddings of crops, each with the positional-embedding window of where it was cut.

    The crop embedding equals ``model.encode_image`` when the crop is the whole image (offset 0): ln_post,
    mean of the patch tokens, ``@ proj``. Region embeddings pool the same tokens over non-overlapping
    ``region`` windows of the patch grid (remainder rows/columns dropped), from the same forward pass.

    Args:
        model: open_clip CLIP with a ViT image tower using ``pool_type='avg'``.
        images: ``(B, 3, rows * p, cols * p)`` normalised crops.
        offsets: ``(B, 2)`` int64 top-left corners ``(row, col)`` of the crops in patches.
        region: ``(r, c)`` patches per region, or None.
        prior_layers: last blocks whose attention distance is measured (see :func:`_run_blocks`).

    Returns:
        crop embeddings ``(B, E)``, region embeddings ``(B, rows // r, cols // c, E)`` (or None), both not
        normalised, and the mean attention distance of the last ``prior_layers`` blocks.
    """
    v = model.visual
    assert v.pool_type == "avg" and not v.final_ln_after_pool and v.attn_pool is None
    x = v.conv1(images)  # (B, D, rows, cols)
    b, d, rows, cols = x.shape
    gh, gw = v.grid_size
    assert rows <= gh and cols <= gw, "crop larger than the positional grid"
    r = offsets[:, :1, None] + torch.arange(rows, device=x.device)[None, :, None]  # (B, rows, 1)
    c = offsets[:, 1:, None] + torch.arange(cols, device=x.device)[None, None, :]  # (B, 1, cols)
    idx = (r * gw + c).reshape(b, rows * cols)
    pos = v.positional_embedding.to(x.dtype)
    x = x.flatten(2).transpose(1, 2) + pos[1:][idx]  # (B, rows*cols, D)
    cls = (v.class_embedding.to(x.dtype) + pos[0]).reshape(1, 1, d).expand(b, 1, d)
    x = v.ln_pre(torch.cat([cls, x], dim=1))
    x, travel = _run_blocks(model, x, (rows, cols), prior_layers)
    tokens = v.ln_post(x)[:, 1:]  # (B, rows*cols, D)
    pooled = tokens.mean(dim=1) @ v.proj
    if region is None:
        return pooled, None, travel
    grid = tokens.transpose(1, 2).reshape(b, d, rows, cols)
    regions = F.avg_pool2d(grid, kernel_size=region, stride=region)  # (B, D, rows // r, cols // c)
    return pooled, regions.permute(0, 2, 3, 1) @ v.proj, travel


def split_regions(a: np.ndarray, region_px: Tuple[int, int]) -> np.ndarray:
    """``(B, H, W, ...)`` -> ``(B * (H // rh) * (W // rw), rh, rw, ...)`` non-overlapping windows, row-major."""
    rh, rw = region_px
    b, h, w = a.shape[:3]
    nh, nw = h // rh, w // rw
    a = a[:, :nh * rh, :nw * rw].reshape(b, nh, rh, nw, rw, *a.shape[3:])
    return np.swapaxes(a, 2, 3).reshape(b * nh * nw, rh, rw, *a.shape[5:])


class _TiedQueryKey(nn.Module):
    """Parametrisation of a packed ``(3D, ...)`` in-projection whose key part repeats the query part."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = w[: self.dim]
        return torch.cat([q, q, w[2 * self.dim:]], dim=0)


def tie_query_key(model: nn.Module) -> None:
    """Tie the key projection of every image-tower attention to its query projection (for training).

    Attention logits then are ``(W x_i + b) . (W x_j + b)``: a similarity between tokens, so that the
    attention maps the pipeline refines CAMs with (CLIP-ES affinity, RFM) group tokens that look alike
    instead of acting as pooling weights. The architecture is unchanged; :func:`untie_query_key` bakes
    the tied values into the ordinary ``in_proj_weight`` / ``in_proj_bias`` parameters.
    """
    from torch.nn.utils import parametrize

    for blk in model.visual.transformer.resblocks:
        mha = blk.attn
        d = mha.embed_dim
        for name in ("in_proj_weight", "in_proj_bias"):
            if getattr(mha, name, None) is not None:
                parametrize.register_parametrization(mha, name, _TiedQueryKey(d))


def untie_query_key(model: nn.Module) -> None:
    """Undo :func:`tie_query_key`, keeping the tied values as plain parameters."""
    from torch.nn.utils import parametrize

    for blk in model.visual.transformer.resblocks:
        mha = blk.attn
        for name in ("in_proj_weight", "in_proj_bias"):
            if parametrize.is_parametrized(mha, name):
                parametrize.remove_parametrizations(mha, name, leave_parametrized=True)


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    no_decay_names = ("positional_embedding", "class_embedding", "token_embedding", "logit_scale")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(n in name for n in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: WorldCfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x - mean) / std


def _average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mean over classes with positives of the average precision (ranking by score)."""
    aps = []
    for k in range(scores.shape[1]):
        y = positives[:, k]
        if not y.any():
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        hits = np.cumsum(y[order])
        precision = hits / np.arange(1, len(y) + 1)
        aps.append(float((precision * y[order]).sum() / y.sum()))
    return float(np.mean(aps)) if aps else float("nan")


@torch.no_grad()
def evaluate_world(model: nn.Module, tokens: torch.Tensor, pool: _Pool, *, stuff_texts: Sequence[Sequence[int]],
                   num_fg: int, mean: torch.Tensor, std: torch.Tensor, min_visible: float,
                   batch_size: int = 16) -> Dict[str, float]:
    """Contrastive loss and zero-shot recognition of whole held-out images.

    Returns:
        ``loss`` (:func:`multi_positive_contrastive_loss` over the whole set), ``fg_map`` (mean AP of the
        foreground prompts over the images), ``stuff_acc`` (fraction of images whose best background word
        belongs to their background style).
    """
    was_training = model.training
    model.eval()
    text = F.normalize(model.encode_text(tokens), dim=-1)
    feats = []
    for s in range(0, len(pool.images), batch_size):
        x = _to_tensor(pool.images[s:s + batch_size], mean, std)
        feats.append(F.normalize(model.encode_image(x), dim=-1))
    img = torch.cat(feats)
    logits = model.logit_scale.exp() * img @ text.t()
    target, valid = caption_targets(pool.labels, pool.stuff, num_fg=num_fg, num_texts=text.shape[0],
                                    stuff_texts=stuff_texts, min_visible=min_visible)
    loss = multi_positive_contrastive_loss(logits, torch.from_numpy(target), torch.from_numpy(valid))
    sims = logits.numpy()
    present = target[:, :num_fg] > 0
    bg_best = num_fg + sims[:, num_fg:].argmax(axis=1)
    style = [int(np.bincount(pool.stuff[i][pool.labels[i] == 0].ravel()).argmax()) for i in range(len(sims))]
    stuff_acc = float(np.mean([bg_best[i] in stuff_texts[style[i]] for i in range(len(sims))]))
    model.train(was_training)
    return {"loss": float(loss), "fg_map": _average_precision(sims[:, :num_fg], present), "stuff_acc": stuff_acc}


def _build_model(cfg: WorldCfg) -> nn.Module:
    import open_clip

    mc = model_config(cfg.model_name)
    if mc.get("vision_cfg", {}).get("pool_type") != "avg":
        raise ValueError(f"the world CLIP {cfg.model_name!r} needs vision_cfg.pool_type='avg' (the pipeline pools "
                         f"the mean of the patch tokens)")
    with drop_open_clip_random_init_warning(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(cfg.model_name, pretrained=None)
    return model


def _save_atomic_torch(obj: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _crop_batch(pool: _Pool, rng: np.random.Generator, idx: np.ndarray, rows: int, cols: int, patch: int,
                grid: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Random patch-aligned ``rows x cols``-patch crops of the pool images ``idx``, flipped half the time.

    Returns:
        crops ``(B, h, w, 3)`` uint8, their labels and background styles ``(B, h, w)`` uint8, and the
        crops' top-left corners in patches ``(B, 2)`` int64.
    """
    bsz = len(idx)
    oy = rng.integers(0, grid[0] - rows + 1, size=bsz)
    ox = rng.integers(0, grid[1] - cols + 1, size=bsz)
    flip = rng.random(bsz) < 0.5
    ch, cw = rows * patch, cols * patch
    crops = np.empty((bsz, ch, cw, 3), np.uint8)
    lab = np.empty((bsz, ch, cw), np.uint8)
    stf = np.empty((bsz, ch, cw), np.uint8)
    for j, i in enumerate(idx):
        y0, x0 = int(oy[j]) * patch, int(ox[j]) * patch
        sl = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        crops[j], lab[j], stf[j] = pool.images[i][sl], pool.labels[i][sl], pool.stuff[i][sl]
        if flip[j]:
            crops[j], lab[j], stf[j] = crops[j][:, ::-1], lab[j][:, ::-1], stf[j][:, ::-1]
    return crops, lab, stf, torch.from_numpy(np.stack([oy, ox], axis=1).astype(np.int64))


def _train_loop(model: nn.Module, cfg: WorldCfg, pool: _Pool, tokens: torch.Tensor, *,
                stuff_texts: Sequence[Sequence[int]], num_fg: int, mean: torch.Tensor, std: torch.Tensor,
                log_interval: int) -> Tuple[List[List[float]], float]:
    """The optimisation of :func:`train_world_clip` (seeded by ``cfg.seed``; global RNGs untouched).

    Returns:
        the logged ``[step, mean loss, mean attention distance]`` rows and the training time in seconds.
    """
    patch = int(model.visual.patch_size[0])
    grid = tuple(model.visual.grid_size)
    caption_kw = dict(num_fg=num_fg, num_texts=int(tokens.shape[0]), stuff_texts=stuff_texts,
                      min_visible=cfg.min_visible)
    rng = np.random.default_rng([cfg.seed, 7])
    history: List[List[float]] = []
    window: List[Tuple[float, float]] = []
    max_scale = math.log(100.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        model.train()
        order, cursor = rng.permutation(cfg.num_images), 0
        t_train = time.monotonic()
        for step in range(cfg.steps):
            rows, cols = cfg.crop_grids[step % len(cfg.crop_grids)]
            bsz = max(2, min(cfg.num_images, cfg.tokens_per_step // (rows * cols)))
            if cursor + bsz > len(order):
                order, cursor = rng.permutation(cfg.num_images), 0
            idx = order[cursor:cursor + bsz]
            cursor += bsz
            crops, lab, stf, offsets = _crop_batch(pool, rng, idx, rows, cols, patch, grid)
            target, valid = caption_targets(lab, stf, **caption_kw)
            lr = _lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            use_region = min(cfg.region) > 0 and cfg.region_weight > 0 and rows >= cfg.region[0] \
                and cols >= cfg.region[1]
            img, reg, travel = encode_image_windows(model, _to_tensor(crops, mean, std), offsets,
                                                    region=tuple(cfg.region) if use_region else None,
                                                    prior_layers=cfg.local_layers if cfg.local_weight else 0)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            scale = model.logit_scale.exp()
            logits = scale * F.normalize(img, dim=-1) @ txt.t()
            loss = multi_positive_contrastive_loss(logits, torch.from_numpy(target), torch.from_numpy(valid))
            if reg is not None:
                px = (cfg.region[0] * patch, cfg.region[1] * patch)
                r_target, r_valid = caption_targets(split_regions(lab, px), split_regions(stf, px), **caption_kw)
                r_logits = scale * F.normalize(reg.reshape(-1, reg.shape[-1]), dim=-1) @ txt.t()
                keep = torch.from_numpy((r_target > 0).any(axis=1))
                if bool(keep.any()):
                    loss = loss + cfg.region_weight * multi_positive_contrastive_loss(
                        r_logits[keep], torch.from_numpy(r_target)[keep], torch.from_numpy(r_valid)[keep])
            loss = loss + cfg.local_weight * travel
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, max_scale)
            window.append((loss.item(), travel.item()))
            if (step + 1) % log_interval == 0 or step + 1 == cfg.steps:
                elapsed = time.monotonic() - t_train
                avg, avg_travel = (float(v) for v in np.mean(window, axis=0))
                history.append([step + 1, avg, avg_travel])
                window = []
                eta = elapsed / (step + 1) * (cfg.steps - step - 1)
                _logger.info("world step %d/%d: loss %.4f, attention distance %.3f, lr %.2e, scale %.1f, "
                             "%.0f s elapsed, eta %.0f s", step + 1, cfg.steps, avg, avg_travel, lr,
                             model.logit_scale.exp().item(), elapsed, eta)
        return history, time.monotonic() - t_train


def train_world_clip(cfg: WorldCfg, *, root: Union[str, Path, None] = None, force: bool = False,
                     log_interval: int = 25) -> WorldResult:
    """Train (or reuse from the cache) the world CLIP of a configuration.

    Args:
        cfg: training settings.
        root: cache root (default ``$WSSS_CACHE`` or ``~/.cache/wsss-clip``).
        force: retrain even when a cached entry exists.
        log_interval: steps between progress lines.

    Returns:
        :class:`WorldResult` with the state-dict path and the entry's metadata.
    """
    import open_clip

    cfg.check()
    digest = world_hash(cfg)
    entry = world_cache_dir(cfg, root)
    meta = None if force else read_meta(entry, digest)
    if meta is not None:
        _logger.info("world CLIP %s is cached: %s (trained in %.0f s, loss %.3f -> %.3f)", cfg.model_name, entry,
                     meta["train_seconds"], meta["eval_before"]["loss"], meta["eval_after"]["loss"])
        return WorldResult(weights=entry / WEIGHTS_FILE, meta=meta, trained=False)
    t_start = time.monotonic()

    texts, stuff_words = world_prompts(cfg.template)
    stuff_texts = [stuff_words[s] for s in BACKGROUND_STYLES]
    num_fg = len(PROMPT_NAMES[DATASET])
    model = _build_model(cfg)
    if cfg.tie_qk:
        tie_query_key(model)
    tokens = open_clip.get_tokenizer(cfg.model_name)(texts)
    patch = int(model.visual.patch_size[0])
    gh, gw = model.visual.grid_size
    h, w = int(cfg.image_size[0]), int(cfg.image_size[1])
    if (h // patch, w // patch) != (gh, gw):
        raise BadInputError(f"world image_size {cfg.image_size} gives a {h // patch}x{w // patch} patch grid, but "
                            f"{cfg.model_name} has a {gh}x{gw} positional grid; make them match")
    n_blocks = len(model.visual.transformer.resblocks)
    if cfg.local_layers > n_blocks:
        raise BadInputError(f"world local_layers={cfg.local_layers} exceeds the {n_blocks} blocks of {cfg.model_name}")
    for rows, cols in cfg.crop_grids:
        if rows > gh or cols > gw:
            raise BadInputError(f"world crop grid {(rows, cols)} exceeds the {gh}x{gw} patch grid")
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in NORMALIZATIONS[cfg.normalization])
    entry.mkdir(parents=True, exist_ok=True)
    (entry / META_FILE).unlink(missing_ok=True)

    _logger.info("world CLIP %s: rendering %d training and %d eval images of %dx%d", cfg.model_name,
                 cfg.num_images, cfg.eval_images, h, w)
    pool = render_pool(cfg.num_images, cfg.image_size, cfg.max_objects, cfg.data_seed, _CODE_TRAIN)
    eval_pool = render_pool(cfg.eval_images, cfg.image_size, cfg.max_objects, cfg.data_seed, _CODE_EVAL)
    t_render = time.monotonic() - t_start
    eval_kw = dict(stuff_texts=stuff_texts, num_fg=num_fg, mean=mean_t, std=std_t, min_visible=cfg.min_visible)
    before = evaluate_world(model, tokens, eval_pool, **eval_kw)
    _logger.info("before training: eval loss %.4f, fg mAP %.3f, stuff acc %.3f (rendering took %.0f s)",
                 before["loss"], before["fg_map"], before["stuff_acc"], t_render)

    history, train_seconds = _train_loop(model, cfg, pool, tokens, stuff_texts=stuff_texts, num_fg=num_fg,
                                         mean=mean_t, std=std_t, log_interval=log_interval)
    if cfg.tie_qk:
        untie_query_key(model)
    model.eval()
    after = evaluate_world(model, tokens, eval_pool, **eval_kw)
    _logger.info("after training: eval loss %.4f, fg mAP %.3f, stuff acc %.3f (%.0f s of training)", after["loss"],
                 after["fg_map"], after["stuff_acc"], train_seconds)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _save_atomic_torch(state, entry / WEIGHTS_FILE)
    meta = {"hash": digest, "model_name": cfg.model_name, "config": dataclasses.asdict(cfg),
            "world_version": WORLD_VERSION, "generator_version": GENERATOR_VERSION,
            "eval_before": before, "eval_after": after, "train_loss": history,
            "train_seconds": round(train_seconds, 1), "render_seconds": round(t_render, 1),
            "total_seconds": round(time.monotonic() - t_start, 1), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "weights": WEIGHTS_FILE}
    meta = json.loads(json.dumps(meta))  # the same plain-JSON values a cache hit returns
    atomic_write_text(entry / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _logger.info("world CLIP saved to %s", entry / WEIGHTS_FILE)
    return WorldResult(weights=entry / WEIGHTS_FILE, meta=meta, trained=True)


# ------------------------------------------------------------------------------------------ entry point
def _cfg_from_options(base: WorldCfg, options: Dict[str, Any]) -> WorldCfg:
    names = {f.name: f for f in dataclasses.fields(WorldCfg)}
    changes = {}
    for key, value in options.items():
        if key not in names:
            raise BadInputError(f"unknown world option {key!r}; valid: {', '.join(names)}")
        default = getattr(base, key)
        if isinstance(default, tuple):
            value = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        changes[key] = value
    return dataclasses.replace(base, **changes)


def _preset_from_stage1_config(path: str) -> Tuple[str, Any]:
    from ..config import load_config

    cfg = load_config(path)
    spec = cfg.clip.weights
    if not str(spec or "").startswith(WORLD_SCHEME):
        raise BadInputError(f"{path}: clip.weights={spec!r} does not name a world CLIP; set clip.weights="
                            f"'{WORLD_SCHEME}default' (or pass --preset)")
    name = str(spec)[len(WORLD_SCHEME):] or "default"
    preset = get_preset(name)
    mismatches = [(k, getattr(preset, k2), v) for k, k2, v in (
        ("clip.model_name", "model_name", cfg.clip.model_name), ("clip.template", "template", cfg.clip.template),
        ("data.normalization", "normalization", cfg.data.normalization),
        ("data.synthetic.image_size", "image_size", tuple(cfg.data.synthetic.image_size)))
        if getattr(preset, k2) != v]
    if mismatches:
        raise BadInputError(f"{path}: the world preset {name!r} was trained with " + ", ".join(
            f"{k}={a!r}" for k, a, _ in mismatches) + " but the config has " + ", ".join(
            f"{k}={b!r}" for k, _, b in mismatches) + "; make them match")
    return name, cfg


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m stage1_cam.world_clip``: train (or find cached) the synthetic world's CLIP; prints its path."""
    from ..utils.cli import add_cfg_options, exit_on_user_error, positive_int
    from ..utils.logging import setup_logging

    p = argparse.ArgumentParser(prog="python -m stage1_cam.world_clip", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="stage-1 config whose clip.weights is 'world:<preset>' (checked against it)")
    src.add_argument("--preset", default=None, help=f"preset name (default: default; valid: "
                     f"{', '.join(sorted(WORLD_PRESETS))})")
    add_cfg_options(p, help="override preset fields, e.g. steps=100 (the result is cached under its own hash and is "
                    "then used through clip.weights=<printed path>, not through the preset)")
    p.add_argument("--cache", default=None, help=f"cache root (default ${ENV_CACHE} or ~/.cache/wsss-clip)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads, >= 1 (default: torch's)")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    args = p.parse_args(argv)
    setup_logging()
    try:
        if args.config:
            name, _ = _preset_from_stage1_config(args.config)
        else:
            name = args.preset or "default"
        cfg = _cfg_from_options(get_preset(name), dict(args.cfg_options))
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = train_world_clip(cfg, root=args.cache, force=args.force)
    except Exception as err:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        return exit_on_user_error(err, _logger)
    after = result.meta["eval_after"]
    _logger.info("world CLIP (%s): eval loss %.3f -> %.3f, fg mAP %.3f, stuff acc %.3f, %.0f s of training",
                 "trained" if result.trained else "cached", result.meta["eval_before"]["loss"], after["loss"],
                 after["fg_map"], after["stuff_acc"], result.meta["train_seconds"])
    sys.stdout.write(f"{result.weights}\n")
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.world_clip.train import main as package_main

    raise SystemExit(package_main())
