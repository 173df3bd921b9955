"""The WeakCLIP refinement head: learnable prompts, pyramid adapter, co-attention, text-guided decoder.

Re-implemented from the description in ``reference_spec`` section 5 (WeakCLIP, IJCV 2025). The head trains
on existing pseudo-masks (the stage-1 CAM shards of ``python -m stage1_cam.cams``, or any dump's
``pseudo_masks/``) and predicts better ones through the same dump path as the WeCLIP head.

Per training step:

1. The frozen CLIP image tower runs all blocks without gradients; the patch tokens of blocks
   ``out_indices`` (3/5/7/11 for ViT-B/16) feed the pyramid adapter (4x up, 2x up, identity, 2x down),
   and ``ln_post(tokens) @ proj`` of the last block gives the visual context ``[global; patches]``.
2. The class names (background included) run through the frozen text tower with ``n_ctx`` learnable
   context vectors inserted after the start token.
3. Co-attention: text-to-pixel and pixel-to-text cross-attention decoders update the text embeddings
   and the visual context residually, scaled by learnable per-channel vectors (init 0.1).
4. Score map = cosine similarity of pixels and classes; it is concatenated to every pyramid level, then a
   compact FPN neck and an FPN head predict logits at stride 4.
5. Losses against the input pseudo-mask crop (255 = no cue): balanced seed loss and CRF-constraint
   boundary loss at stride ``loss_stride``, plus ``score_weight`` x CE of ``score_map / tau``.

Reference bugs fixed by default, each behind an option (``parity=True`` selects all reference values):
co-attention layers are chained (``chain_coattention``), the class embedding is added once
(``class_embedding_twice``), the pyramid adapters are trained (``train_adapters``), no stochastic depth in
the frozen encoder (``backbone_drop_path``), context init std 0.02 (``ctx_init_std``), and the score-map CE
is averaged over labelled pixels (``ce_avg_non_ignore``). Not reproduced at all: the unused kNN matrix.

Other deliberate differences: plain BatchNorm (the reference's SyncBN; convert under DDP if wanted); the
2x-down level uses ``ceil_mode`` (equal for even grids, never empty for a 1-patch side); name prompts keep
every token of the longest class name (the reference truncated to 5 tokens; identical for VOC/COCO names);
the CRF image is downsampled with torch bilinear (corners aligned) instead of scipy zoom; crops come from
the shared WeCLIP augmentation (no cat_max_ratio, no photometric distortion).

The training loop hands the head the mask crop that matches each image crop: :meth:`WeakCLIPHead.
wrap_train_dataset` wraps the loop's ``TrainCropDataset`` in :class:`MaskedTrainCrops`, which applies the
sample's seeded geometry (rescale, flip, pad, crop) to the mask as well, and the loop passes the
collated ``mask`` to ``forward_train(..., masks=...)``. The head itself never reads files in ``forward``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..constants import IGNORE_INDEX
from ..data.class_names import get_classes
from ..data.transforms import normalization
from ..models.text import get_tokenizer
from ..refine.crf import dense_crf
from ..registry import HEADS
from ..utils.cli import BadInputError

_logger = logging.getLogger(__name__)

# Dense CRF of the boundary loss (reference_spec 5.3: Gaussian 3/3, bilateral 80/13/10, 10 iterations).
BOUNDARY_CRF: Dict[str, float] = dict(iterations=10, pos_xy_std=3.0, pos_w=3.0, bi_xy_std=80.0, bi_rgb_std=13.0,
                                      bi_w=10.0)
_PROB_FLOOR = 1e-4  # probabilities and CRF marginals are clamped to this in the boundary loss
_KL_CLIP = (0.05, 20.0)  # clip of Q / p inside the log of the boundary loss


# ----------------------------------------------------------------------------------------------- options
@dataclass
class WeakCLIPOptions:
    """Head-specific settings (``head.options`` in the stage-1 config). Comments give reference values."""

    masks: Optional[str] = None  # pseudo-mask shard dir to train on; None -> this run's CAM shards (<run>/cams)
    out_indices: Tuple[int, ...] = (3, 5, 7, 11)  # image blocks feeding the 4 pyramid levels
    n_ctx: int = 8  # learnable context vectors inserted after the start token
    ctx_init_std: float = 0.02  # reference: 1.0 (trunc-normal in [-2, 2])
    coattn_scale_init: float = 0.1  # initial per-channel residual scales of the co-attention updates
    chain_coattention: bool = True  # reference: False (each layer fed the original input, last one kept)
    class_embedding_twice: bool = False  # reference: True (CLS token and CLS position both hold it)
    train_adapters: bool = True  # reference: False (adapters under lr_mult 0, frozen at random init)
    backbone_drop_path: float = 0.0  # reference: 0.1 (stochastic depth active in the frozen encoder)
    ce_avg_non_ignore: bool = True  # reference (mmseg 0.19): False, score-map CE divided by all pixels
    tau: float = 0.07  # temperature of the score-map loss
    loss_stride: int = 8  # seed and boundary losses at (H / 8, W / 8): 64x64 for 512 crops (reference)
    seed_weight: float = 1.0
    boundary_weight: float = 1.0
    score_weight: float = 0.4
    crf: Dict[str, float] = field(default_factory=lambda: dict(BOUNDARY_CRF))  # boundary-loss CRF
    parity: bool = False  # start from every reference value above (explicit options still win)


# Reference values of the options that replicate reference quirks.
PARITY_OPTIONS: Dict[str, Any] = dict(ctx_init_std=1.0, chain_coattention=False, class_embedding_twice=True,
                                      train_adapters=False, backbone_drop_path=0.1, ce_avg_non_ignore=False)


def resolve_options(raw: Optional[Mapping[str, Any]]) -> WeakCLIPOptions:
    """Validate ``head.options`` and fill defaults.

    Args:
        raw: the ``head.options`` dict (may be empty or None).

    Returns:
        The options; with ``parity=True`` the :data:`PARITY_OPTIONS` values replace the defaults first.

    Raises:
        ValueError: an unknown key, a wrongly typed or out-of-range value (the message names it).
    """
    raw = dict(raw or {})
    names = [f.name for f in dataclasses.fields(WeakCLIPOptions)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown head.options key(s) {', '.join(unknown)} for head 'weakclip'; valid keys: "
                         f"{', '.join(names)}")
    values: Dict[str, Any] = {}
    if raw.get("parity", False):
        values.update(PARITY_OPTIONS)
    values.update(raw)
    defaults = WeakCLIPOptions()
    for key, value in list(values.items()):
        default = getattr(defaults, key)
        where = f"head.options.{key}"
        if key == "masks":
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where} must be a shard directory path or None, got {value!r}")
        elif key == "out_indices":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
                raise ValueError(f"{where} must be a list of block indices, got {value!r}")
            values[key] = tuple(int(v) for v in value)
        elif key == "crf":
            if not isinstance(value, Mapping) or set(value) - set(BOUNDARY_CRF):
                raise ValueError(f"{where} must be a dict with keys among {', '.join(BOUNDARY_CRF)}, got {value!r}")
            values[key] = {**BOUNDARY_CRF, **{k: float(v) for k, v in value.items()}}
            values[key]["iterations"] = int(values[key]["iterations"])
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} must be a number, got {value!r}")
            values[key] = float(value)
    opts = WeakCLIPOptions(**values)
    checks = [(opts.n_ctx >= 0, "n_ctx must be >= 0"), (opts.ctx_init_std > 0, "ctx_init_std must be > 0"),
              (opts.tau > 0, "tau must be > 0"), (opts.loss_stride >= 1, "loss_stride must be >= 1"),
              (0.0 <= opts.backbone_drop_path < 1.0, "backbone_drop_path must be in [0, 1)"),
              (len(opts.out_indices) == 4, "out_indices must list 4 blocks (one per pyramid level)"),
              (min(opts.seed_weight, opts.boundary_weight, opts.score_weight) >= 0, "loss weights must be >= 0")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"head.options for 'weakclip': {msg}; got {dataclasses.asdict(opts)}")
    return opts


# ------------------------------------------------------------------------------------ mask augmentation
def augment_mask(mask: np.ndarray, augment: Any, rng: np.random.Generator) -> np.ndarray:
    """Cut a label map with the geometry of :class:`~stage1_cam.data.transforms.TrainAugment`.

    ``augment.geometry`` draws the same random numbers as the image augmentation, so a generator seeded
    like the image's gives the matching crop. Resizing is nearest-neighbour and padding is ``IGNORE_INDEX``.

    Args:
        mask: (H, W) uint8 label map of the original image.
        augment: the ``TrainAugment`` of the image crops.
        rng: a generator in the same state as the one given to the image augmentation.

    Returns:
        (crop, crop) uint8 label crop.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {mask.shape}")
    crop = augment.crop_size
    g = augment.geometry(mask.shape, rng)
    h, w = g.size
    if (h, w) != mask.shape:
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if g.flip:
        mask = mask[:, ::-1]
    canvas = np.full(g.canvas, IGNORE_INDEX, np.uint8)
    canvas[g.offset[0]:g.offset[0] + h, g.offset[1]:g.offset[1] + w] = mask
    y0, x0 = g.window
    return np.ascontiguousarray(canvas[y0:y0 + crop, x0:x0 + crop])


class MaskedTrainCrops(Dataset):
    """A ``TrainCropDataset`` whose items also carry the matching pseudo-mask crop.

    Items are those of the wrapped dataset (same image crop, labels, name, index, box) plus ``mask``:
    (crop, crop) uint8 class ids with 255 = no cue, cut with the sample's own seeded geometry.

    Args:
        crops: the training loop's ``TrainCropDataset``.
        masks: a :class:`~stage1_cam.io.shards.ShardReader` holding a mask for every training image.

    Raises:
        ValueError: some training images have no mask in the shards (the message names them and the fix).
    """

    def __init__(self, crops: Any, masks: Any) -> None:
        self.crops = crops
        self.masks = masks
        names = [crops.base.names[i] for i in crops.indices]
        missing = [n for n in names if n not in masks]
        if missing:
            raise ValueError(f"{len(missing)} of {len(names)} training images of split {crops.base.split!r} have no "
                           f"pseudo-mask in {masks.shard_dir} (e.g. {', '.join(missing[:3])}); point "
                           f"head.options.masks to shards made for that split (the CAM shards of "
                           f"`python -m stage1_cam.cams` cover data.eval_split, a dump covers data.dump_split)")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (forwarded to the wrapped dataset)."""
        self.crops.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from ..data.datasets import multi_hot
        from ..data.transforms import sample_rng

        c = self.crops
        if not 0 <= index < len(c):
            raise IndexError(f"index {index} out of range for {len(c)} samples")
        name = c.base.names[c.indices[index]]
        image = c.base.load_image(name)
        mask = np.asarray(self.masks.label(name), dtype=np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"pseudo-mask of {name!r} in {self.masks.shard_dir} is {mask.shape[1]}x{mask.shape[0]} "
                             f"(WxH) but the image is {image.shape[1]}x{image.shape[0]}; use masks dumped at the "
                             f"original image size")
        img, img_box = c.augment(image, sample_rng(c.seed, index, c.epoch))
        mask_crop = augment_mask(mask, c.augment, sample_rng(c.seed, index, c.epoch))
        labels = multi_hot(c.base.image_labels(name), c.base.num_classes)
        return {"img": torch.from_numpy(img), "cls_label": torch.from_numpy(labels), "name": name, "index": index,
                "img_box": torch.from_numpy(img_box), "mask": torch.from_numpy(mask_crop)}


# ------------------------------------------------------------------------------------------ text side
class PromptTextEncoder(nn.Module):
    """The frozen CLIP text tower run on ``[SOT] ctx_1 .. ctx_n <name tokens> [EOT]``.

    The context vectors are an input (they live in the trainable decoder), so gradients reach them
    through the frozen tower while its own weights get none. The positional embedding is truncated to
    the sequence length and the causal mask is built for it; the EOT index is shifted by ``n_ctx``.
    The CLIP model is held by reference (not a submodule): it is never part of a state dict.

    Args:
        clip_model: an open_clip ``CLIP`` (token_embedding / positional_embedding / transformer /
            ln_final / text_projection, argmax pooling).
        token_ids: (K, T) int64 tokenised class names (start token first, EOT = the largest id).
        n_ctx: number of context vectors.
    """

    def __init__(self, *, clip_model: nn.Module, token_ids: torch.Tensor, n_ctx: int) -> None:
        super().__init__()
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(clip_model, attr):
                raise ValueError(f"the CLIP model has no text tower attribute {attr!r}; learnable prompts need an "
                                 f"open_clip CLIP with a built-in text transformer")
        if getattr(clip_model, "text_pool_type", "argmax") != "argmax":
            raise ValueError(f"text pooling {clip_model.text_pool_type!r} is not supported (argmax/EOT only)")
        object.__setattr__(self, "clip", clip_model)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 2 or ids.shape[0] < 1:
            raise ValueError(f"token_ids must be (K, T) with K >= 1, got shape {tuple(ids.shape)}")
        eot = ids.argmax(dim=-1)
        length = int(eot.max()) + 1
        max_len = int(clip_model.positional_embedding.shape[0])
        if length + n_ctx > max_len:
            raise ValueError(f"class names of up to {length} tokens plus {n_ctx} context vectors exceed the text "
                             f"context length {max_len}; use shorter names or fewer context vectors")
        self.n_ctx = int(n_ctx)
        self.width = int(clip_model.token_embedding.embedding_dim)
        self.register_buffer("token_ids", ids[:, :length].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        """
        Args:
            contexts: (n_ctx, W) context vectors (W = text width).

        Returns:
            (K, E) class embeddings (not normalised), float32.
        """
        clip = self.clip
        dtype = clip.transformer.get_cast_dtype()
        ids = self.token_ids.to(clip.token_embedding.weight.device)
        k = ids.shape[0]
        with torch.no_grad():
            tok = clip.token_embedding(ids).to(dtype)  # (K, T, W)
        ctx = contexts.to(dtype)[None].expand(k, -1, -1)  # (K, n_ctx, W)
        x = torch.cat([tok[:, :1], ctx, tok[:, 1:]], dim=1)  # (K, n, W)
        n = x.shape[1]
        x = x + clip.positional_embedding[:n].to(dtype)
        mask = torch.full((n, n), float("-inf"), device=x.device).triu_(1).to(dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=mask))
        x = x[torch.arange(k, device=x.device), self.eot.to(x.device) + self.n_ctx]  # (K, W)
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()


# -------------------------------------------------------------------------------------- image side
class PyramidAdapter(nn.Module):
    """Four resolutions from four ViT token maps (BEiT-style): 4x up, 2x up, identity, 2x down.

    Per level: GroupNorm(1) then 2 x (ConvTranspose 2x) with BN + GELU between / ConvTranspose 2x / nothing /
    MaxPool 2x.

    Args:
        width: token width D.
    """

    def __init__(self, *, width: int) -> None:
        super().__init__()
        d = width
        self.up4 = nn.Sequential(nn.GroupNorm(1, d), nn.ConvTranspose2d(d, d, 2, stride=2), nn.BatchNorm2d(d),
                                 nn.GELU(), nn.ConvTranspose2d(d, d, 2, stride=2))
        self.up2 = nn.Sequential(nn.GroupNorm(1, d), nn.ConvTranspose2d(d, d, 2, stride=2))
        self.same = nn.GroupNorm(1, d)
        # ceil_mode: odd grids keep their last row/column (the reference floors; equal for even grids).
        self.down2 = nn.Sequential(nn.GroupNorm(1, d), nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """(B, D, h, w) x 4 -> [(B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, ceil(h/2), ceil(w/2))]."""
        if len(maps) != 4:
            raise ValueError(f"the pyramid adapter takes 4 token maps, got {len(maps)}")
        return [self.up4(maps[0]), self.up2(maps[1]), self.same(maps[2]), self.down2(maps[3])]


class CoAttentionLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to a memory, 4x GELU MLP.

    Args:
        width: token width.
        heads: attention heads.
        dropout: dropout after each residual branch (and inside the MLP).
    """

    def __init__(self, *, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, N, width) queries, memory: (B, M, width) -> (B, N, width)."""
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        x = x + self.drop(self.cross_attn(self.norm2(x), memory, memory, need_weights=False)[0])
        return x + self.drop(self.mlp(self.norm3(x)))


class CoAttention(nn.Module):
    """Co-attention matching: text attends to pixels and pixels attend to text; residual, scaled updates.

    ``text += gamma * text_diff`` and ``visual += beta * visual_diff`` with per-channel ``gamma``/``beta``.

    Args:
        dim: joint embedding width E (CLIP ``proj`` output).
        width: internal width (256).
        heads: attention heads (4).
        layers: decoder layers per direction (3).
        dropout: dropout (0.1).
        scale_init: initial value of ``gamma`` and ``beta`` (0.1).
        chain: feed each layer the previous layer's output (fix); False = the reference, where every layer
            gets the original input and only the last layer's output is used (so only it is computed).
    """

    def __init__(self, *, dim: int, width: int, heads: int, layers: int, dropout: float, scale_init: float,
                 chain: bool = True) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"co-attention needs at least one layer, got {layers}")
        self.chain = chain
        self.text_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.pixel_memory = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_layers = nn.ModuleList(CoAttentionLayer(width=width, heads=heads, dropout=dropout)
                                         for _ in range(layers))
        self.text_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.pixel_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.text_memory = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.pixel_layers = nn.ModuleList(CoAttentionLayer(width=width, heads=heads, dropout=dropout)
                                          for _ in range(layers))
        self.pixel_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(scale_init)))
        self.beta = nn.Parameter(torch.full((dim,), float(scale_init)))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _run(self, layers: nn.ModuleList, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if not self.chain:
            return layers[-1](x, memory)
        for layer in layers:
            x = layer(x, memory)
        return x

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            text: (B, K, E) class embeddings.
            visual: (B, 1 + h*w, E) visual context (global token first).

        Returns:
            updated text (B, K, E) and visual context (B, 1 + h*w, E).
        """
        text_diff = self.text_out(self._run(self.text_layers, self.text_in(text), self.pixel_memory(visual)))
        pixel_diff = self.pixel_out(self._run(self.pixel_layers, self.pixel_in(visual), self.text_memory(text)))
        return text + self.gamma * text_diff, visual + self.beta * pixel_diff


class CompactFPN(nn.Module):
    """FPN neck: 1x1 laterals, top-down nearest upsampling and addition, 3x3 output convs (no norm).

    Args:
        in_channels: channels of each input level, finest first.
        channels: output channels of every level.
    """

    def __init__(self, *, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Levels (B, C_i, h_i, w_i), finest first -> same sizes with ``channels`` channels."""
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class FPNSegHead(nn.Module):
    """FPN segmentation head: per-level conv-BN-ReLU(-2x up) stacks summed at the finest level, classifier.

    Level ``i`` (stride ``4 * 2**i``) gets ``max(1, i)`` conv blocks, each followed by a 2x bilinear
    upsampling for ``i > 0``, so every level reaches stride 4.

    Args:
        in_channels: channels of every input level.
        channels: head channels.
        num_classes: output classes.
        num_levels: pyramid levels (4).
        dropout: Dropout2d before the classifier.
    """

    def __init__(self, *, in_channels: int, channels: int, num_classes: int, num_levels: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for i in range(num_levels):
            layers: List[nn.Module] = []
            for k in range(max(1, i)):
                layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                           nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
                if i > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Levels finest first -> logits (B, num_classes, h_0, w_0)."""
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            out = out + F.interpolate(head(f), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class WeakCLIPDecoder(nn.Module):
    """Everything trainable of WeakCLIP (the module saved in checkpoints).

    Holds the context vectors, the pyramid adapter, the co-attention, the FPN neck and the FPN head, and
    (by reference, no parameters) the frozen text tower, so one ``forward`` call covers the whole
    trainable graph (DDP-friendly).

    Args:
        text_encoder: the :class:`PromptTextEncoder` (its K classes define the output channels).
        width: image token width D.
        dim: joint embedding width E.
        embed_dim: co-attention width and FPN channels (256).
        coattn_layers: co-attention layers per direction (3).
        coattn_heads: co-attention heads (4).
        dropout: co-attention and classifier dropout (0.1).
        n_ctx: context vectors.
        ctx_init_std: std of the context init (trunc-normal, cut at +-2).
        coattn_scale_init: initial ``gamma``/``beta``.
        chain_coattention: chain the co-attention layers (see :class:`CoAttention`).
        train_adapters: whether the pyramid adapter is trainable.
    """

    def __init__(self, *, text_encoder: PromptTextEncoder, width: int, dim: int, embed_dim: int = 256,
                 coattn_layers: int = 3, coattn_heads: int = 4, dropout: float = 0.1, n_ctx: int = 8,
                 ctx_init_std: float = 0.02, coattn_scale_init: float = 0.1, chain_coattention: bool = True,
                 train_adapters: bool = True) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.num_classes = int(text_encoder.token_ids.shape[0])
        self.contexts = nn.Parameter(torch.empty(n_ctx, text_encoder.width))
        nn.init.trunc_normal_(self.contexts, std=ctx_init_std)
        self.adapter = PyramidAdapter(width=width)
        self.adapter.requires_grad_(train_adapters)
        self.coattention = CoAttention(dim=dim, width=embed_dim, heads=coattn_heads, layers=coattn_layers,
                                       dropout=dropout, scale_init=coattn_scale_init, chain=chain_coattention)
        k = self.num_classes
        self.neck = CompactFPN(in_channels=[width + k] * 4, channels=embed_dim)
        self.seg_head = FPNSegHead(in_channels=embed_dim, channels=embed_dim, num_classes=k, dropout=dropout)

    def forward(self, pyramid: Sequence[torch.Tensor], visual_context: torch.Tensor, grid: Tuple[int, int]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            pyramid: 4 token maps (B, D, h, w) of the ``out_indices`` blocks.
            visual_context: (B, 1 + h*w, E) ``ln_post(tokens) @ proj`` of the last block (global first).
            grid: (h, w).

        Returns:
            logits (B, K, 4h, 4w) and the score map (B, K, h, w) (cosine similarities in [-1, 1]).
        """
        b = visual_context.shape[0]
        h, w = grid
        text = self.text_encoder(self.contexts)[None].expand(b, -1, -1)  # (B, K, E)
        text, vis = self.coattention(text, visual_context.float())
        visual = vis[:, 1:].transpose(1, 2).reshape(b, -1, h, w)  # (B, E, h, w)
        score = torch.einsum("bchw,bkc->bkhw", F.normalize(visual, dim=1), F.normalize(text, dim=-1))
        levels = self.adapter([p.float() for p in pyramid])
        levels = [torch.cat([f, F.interpolate(score, size=f.shape[-2:], mode="bilinear", align_corners=True)], 1)
                  for f in levels]
        return self.seg_head(self.neck(levels)), score


# ---------------------------------------------------------------------------------------------- losses
def dgcn_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, plus 1e-7, renormalised (the reference's ``dgcn_softmax``): (B, K, h, w)."""
    p = torch.softmax(logits, dim=1) + 1e-7
    return p / p.sum(dim=1, keepdim=True)


def resize_labels(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) integer labels to (B, *size) int64."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ValueError(f"pseudo-mask values {sorted(set(bad.unique().tolist()))} are neither class ids in "
                         f"[0, {num_classes}) nor {IGNORE_INDEX}; the masks were made for another class list")


def seed_loss(probs: torch.Tensor, cues: torch.Tensor) -> torch.Tensor:
    """Balanced seed loss (partial CE), background and foreground cues normalised separately per image.

    ``L = -mean_b[sum_{bg cues} log p_0 / max(n_bg, 1e-4)] - mean_b[sum_{fg cues} log p_c / max(n_fg, 1e-4)]``.

    Args:
        probs: (B, K, h, w) probabilities.
        cues: (B, h, w) int64 class ids, ``IGNORE_INDEX`` = no cue.

    Returns:
        scalar; 0 for images without cues (never NaN).
    """
    _check_labels(cues, probs.shape[1])
    valid = cues != IGNORE_INDEX
    idx = torch.where(valid, cues, torch.zeros_like(cues))
    logp = torch.log(probs).gather(1, idx[:, None])[:, 0]  # (B, h, w)
    bg = (valid & (cues == 0)).to(logp.dtype)
    fg = (valid & (cues > 0)).to(logp.dtype)
    l_bg = -(logp * bg).sum(dim=(1, 2)) / bg.sum(dim=(1, 2)).clamp(min=1e-4)
    l_fg = -(logp * fg).sum(dim=(1, 2)) / fg.sum(dim=(1, 2)).clamp(min=1e-4)
    return l_bg.mean() + l_fg.mean()


def crf_targets(images: np.ndarray, probs: torch.Tensor, crf: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """Dense-CRF marginals of the (detached) predictions, floored at 1e-4 and renormalised.

    Args:
        images: (B, h, w, 3) uint8 RGB images at the probability size.
        probs: (B, K, h, w) probabilities (any device; detached here).
        crf: :func:`~stage1_cam.refine.crf.dense_crf` parameters (default :data:`BOUNDARY_CRF`).

    Returns:
        (B, K, h, w) float32 on ``probs.device``.
    """
    params = dict(BOUNDARY_CRF if crf is None else crf)
    params["iterations"] = int(params["iterations"])
    p = probs.detach().float().clamp(min=_PROB_FLOOR).cpu().numpy()
    q = np.stack([dense_crf(np.ascontiguousarray(img), pi, **params) for img, pi in zip(images, p)])
    q = np.maximum(q, _PROB_FLOOR)
    q /= q.sum(axis=1, keepdims=True)
    return torch.from_numpy(q).to(probs.device)


def boundary_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CRF-constraint loss: mean over pixels of ``sum_c Q_c log(clip(Q_c / p_c, 0.05, 20))``.

    A clipped KL(Q || p); the gradient flows through ``p`` only (zero where the ratio is clipped).

    Args:
        probs: (B, K, h, w) predicted probabilities (floored at 1e-4 here).
        targets: (B, K, h, w) CRF marginals Q (treated as constants).

    Returns:
        scalar, 0 when ``probs`` equals ``targets``.
    """
    q = targets.detach().to(probs.dtype)
    ratio = (q / probs.clamp(min=_PROB_FLOOR)).clamp(*_KL_CLIP)
    return (q * torch.log(ratio)).sum(dim=1).mean()


def score_map_loss(score_logits: torch.Tensor, labels: torch.Tensor, *, avg_non_ignore: bool = True) -> torch.Tensor:
    """CE of the score-map logits (bilinearly resized to the label size) against the pseudo-mask.

    Args:
        score_logits: (B, K, h, w) ``score_map / tau``.
        labels: (B, H, W) int64 class ids, ``IGNORE_INDEX`` ignored.
        avg_non_ignore: average over labelled pixels (True) or over all pixels (mmseg 0.19, reference).

    Returns:
        scalar; 0 when no pixel is labelled.
    """
    up = F.interpolate(score_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    denom = (labels != IGNORE_INDEX).sum() if avg_non_ignore else labels.new_tensor(labels.numel())
    return per_pixel.sum() / denom.clamp(min=1).to(per_pixel.dtype)


def images_to_uint8(images: torch.Tensor, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float]
                    ) -> np.ndarray:
    """Normalised (B, 3, H, W) images -> (B, *size, 3) uint8 RGB (bilinear, corners aligned, de-normalised)."""
    x = F.interpolate(images.detach().float(), size=size, mode="bilinear", align_corners=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * s + m).clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy())


# ------------------------------------------------------------------------------------------------ head
class WeakCLIPHead(nn.Module):
    """WeakCLIP on a frozen CLIP: trains on pseudo-mask crops, predicts logits at stride 4.

    Only ``self.decoder`` holds state; the backbone is held by reference, so ``state_dict()`` is the
    decoder's. Interface shared with the WeCLIP head: ``forward_train``, ``predict_logits``,
    ``decoder``, ``wrap_decoder``; plus :meth:`wrap_train_dataset` (mask crops for the loop) and
    :meth:`validation_labels`.

    Args:
        backbone: a :class:`~stage1_cam.models.clip_backbone.FrozenClipBackbone`.
        token_ids: (K, T) tokenised class names, background first (K = ``num_classes``).
        num_classes: classes including background.
        mean, std: input normalisation (0-255 scale, RGB), to recover images for the CRF.
        embed_dim: co-attention width and FPN channels.
        decoder_layers: co-attention layers per direction.
        decoder_heads: co-attention heads.
        dropout: co-attention and classifier dropout.
        options: head-specific settings.
        class_names: label names (checked against the mask shards).
        dataset: dataset name (checked against the mask shards).
        masks_dir: pseudo-mask shard directory the head trains on (opened by :meth:`wrap_train_dataset`).
    """

    def __init__(self, *, backbone: nn.Module, token_ids: torch.Tensor, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], embed_dim: int = 256, decoder_layers: int = 3,
                 decoder_heads: int = 4, dropout: float = 0.1, options: Optional[WeakCLIPOptions] = None,
                 class_names: Sequence[str] = (), dataset: str = "", masks_dir: Optional[str] = None) -> None:
        super().__init__()
        self.options = opts = options or WeakCLIPOptions()
        nb = backbone.num_blocks
        idx = tuple(int(i) for i in opts.out_indices)
        if len(idx) != 4 or sorted(set(idx)) != list(idx) or idx[0] < 0 or idx[-1] >= nb:
            raise ValueError(f"head.options.out_indices={list(idx)} must be 4 increasing block indices in [0, {nb})")
        if token_ids.shape[0] != num_classes:
            raise ValueError(f"{token_ids.shape[0]} class prompts for {num_classes} classes")
        object.__setattr__(self, "backbone", backbone)
        self.out_indices = idx
        self.num_classes = num_classes
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.class_names, self.dataset, self.masks_dir = tuple(class_names), dataset, masks_dir
        text = PromptTextEncoder(clip_model=backbone.clip, token_ids=token_ids, n_ctx=opts.n_ctx)
        self.decoder = WeakCLIPDecoder(text_encoder=text, width=backbone.width, dim=backbone.embed_dim,
                                       embed_dim=embed_dim, coattn_layers=decoder_layers,
                                       coattn_heads=decoder_heads, dropout=dropout, n_ctx=opts.n_ctx,
                                       ctx_init_std=opts.ctx_init_std, coattn_scale_init=opts.coattn_scale_init,
                                       chain_coattention=opts.chain_coattention,
                                       train_adapters=opts.train_adapters)
        self._drop_path = torch.linspace(0, opts.backbone_drop_path, nb).tolist()
        object.__setattr__(self, "_decoder_call", self.decoder)

    def wrap_decoder(self, wrapper: nn.Module) -> None:
        """Route decoder calls through ``wrapper`` (e.g. DDP) without adding it to the state dict."""
        object.__setattr__(self, "_decoder_call", wrapper)

    # ------------------------------------------------------------------ data
    def open_masks(self) -> Any:
        """A :class:`~stage1_cam.io.shards.ShardReader` on the training masks (dataset and classes checked)."""
        from ..io.shards import ShardReader

        if not self.masks_dir:
            raise ValueError("the weakclip head has no pseudo-mask source; set head.options.masks to a shard dir")
        try:
            return ShardReader(self.masks_dir, expected_classes=self.class_names or None,
                               expected_dataset=self.dataset or None)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. The weakclip head trains on pseudo-masks: run `python -m stage1_cam.cams "
                                    f"CONFIG` (make cams) for this run, or set head.options.masks to another run's "
                                    f"pseudo_masks/") from e

    def wrap_train_dataset(self, crops: Any) -> MaskedTrainCrops:
        """Wrap the loop's ``TrainCropDataset`` so that items carry the matching ``mask`` crop."""
        reader = self.open_masks()
        _logger.info("weakclip trains on the pseudo-masks in %s (%d images, split %r)", reader.shard_dir,
                     len(reader), reader.meta.get("split"))
        return MaskedTrainCrops(crops, reader)

    # ------------------------------------------------------------------ frozen image features
    def _embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch + CLS + positions + ln_pre; the reference's double class embedding when configured."""
        bb = self.backbone
        if not self.options.class_embedding_twice:
            return bb.embed(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        v = bb.visual
        x = v.conv1(images.to(dtype=bb.dtype))  # (B, D, h, w)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype)
        pos = bb.positional_embedding(h, w, device=x.device, dtype=x.dtype).clone()
        pos[0] = pos[0] + cls
        x = torch.cat([cls.reshape(1, 1, d).expand(b, 1, d), x], dim=1) + pos
        return v.ln_pre(x), (h, w)

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One frozen block; stochastic depth on both residual branches when configured and training."""
        from ..models.clip_backbone import merge_heads, qkv_heads

        rate = self._drop_path[index] if self.training else 0.0
        if rate <= 0.0:
            return self.backbone.run_block(index, x, with_attn=False).tokens
        blk = self.backbone.blocks[index]
        keep = 1.0 - rate

        def drop(t: torch.Tensor) -> torch.Tensor:
            mask = torch.rand(t.shape[0], 1, 1, device=t.device) < keep
            return t * mask.to(t.dtype) / keep

        q, k, v = qkv_heads(blk, blk.ln_1(x))
        x = x + drop(blk.ls_1(merge_heads(blk, F.scaled_dot_product_attention(q, k, v))))
        return x + drop(blk.ls_2(blk.mlp(blk.ln_2(x))))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor, Tuple[int, int]]:
        """Frozen CLIP image features.

        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            4 pyramid token maps (B, D, h, w) (blocks ``out_indices``), the visual context
            (B, 1 + h*w, E) = ``ln_post(tokens) @ proj`` of the last block, and the grid (h, w).
        """
        x, (h, w) = self._embed(images)
        taken: List[torch.Tensor] = []
        for i in range(self.backbone.num_blocks):
            x = self._block(i, x)
            if i in self.out_indices:
                taken.append(x)
        v = self.backbone.visual
        context = v.ln_post(x) @ v.proj  # (B, 1 + hw, E)
        b, _, d = x.shape
        pyramid = [t[:, 1:].transpose(1, 2).reshape(b, d, h, w).float() for t in taken]
        return pyramid, context.float(), (h, w)

    def decode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features + decoder: logits (B, K, H/4, W/4) (H, W snapped to the patch) and score map (B, K, h, w)."""
        pyramid, context, grid = self.image_features(images)
        return self._decoder_call(pyramid, context, grid)

    # ------------------------------------------------------------------ training / inference
    def forward_train(self, images: torch.Tensor, labels: Optional[List[np.ndarray]], step: int, *,
                      masks: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One training forward with the three WeakCLIP losses.

        Args:
            images: (B, 3, S, S) normalised crops.
            labels: per image foreground class ids (unused: WeakCLIP learns from the masks only).
            step: 0-based training step (unused: no step-dependent behaviour).
            masks: (B, S, S) integer pseudo-mask crops (255 = no cue), from :meth:`wrap_train_dataset`.

        Returns:
            ``loss`` (total), ``loss_seg`` (= seed), ``loss_aff`` (= boundary), ``loss_seed``,
            ``loss_boundary``, ``loss_score`` and ``pseudo_label`` (the mask crops, (B, S, S) int64).
        """
        if masks is None:
            raise ValueError("the weakclip head trains on pseudo-mask crops: pass masks= (wrap the training dataset "
                             "with head.wrap_train_dataset and hand the collated 'mask' to forward_train)")
        masks = masks.to(images.device).long()
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        _check_labels(masks, self.num_classes)
        opts = self.options
        logits, score = self.decode(images)
        size = (max(1, images.shape[-2] // opts.loss_stride), max(1, images.shape[-1] // opts.loss_stride))
        probs = dgcn_softmax(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False))
        l_seed = seed_loss(probs, resize_labels(masks, size))
        if opts.boundary_weight > 0:
            q = crf_targets(images_to_uint8(images, size, self.mean, self.std), probs, opts.crf)
            l_bnd = boundary_loss(probs, q)
        else:
            l_bnd = probs.new_zeros(())
        l_score = score_map_loss(score.float() / opts.tau, masks, avg_non_ignore=opts.ce_avg_non_ignore)
        loss = opts.seed_weight * l_seed + opts.boundary_weight * l_bnd + opts.score_weight * l_score
        return {"loss": loss, "loss_seg": l_seed, "loss_aff": l_bnd, "loss_seed": l_seed, "loss_boundary": l_bnd,
                "loss_score": l_score, "pseudo_label": masks}

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The dump path: (B, 3, H, W) normalised -> float32 logits (B, K, 4 * H // p, 4 * W // p) (stride 4)."""
        return self.decode(images)[0].float()

    @torch.no_grad()
    def validation_labels(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, out_size: Tuple[int, int],
                          par_images: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Label maps to score during validation: ``{"decoder": (B, H, W) int64}`` at ``out_size``."""
        logits = self.predict_logits(images)
        up = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return {"decoder": up.argmax(1)}


def build_weakclip_head(*, cfg: Any, backbone: nn.Module, cam_source: Any, num_classes: int,
                        run: Any = None) -> WeakCLIPHead:
    """Map a validated stage-1 config to :class:`WeakCLIPHead` (``cam_source`` is not used).

    ``run`` (the run's :class:`~stage1_cam.utils.run_dir.RunDir`) gives the default masks: its initial CAM shards.
    """
    opts = resolve_options(cfg.head.options)
    class_names = tuple(get_classes(cfg.data.dataset))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    token_ids = get_tokenizer(cfg.clip.model_name)(list(class_names))
    mean, std = normalization(cfg)
    if not opts.masks and run is None:
        raise BadInputError("the WeakCLIP head trains on pseudo-masks: set head.options.masks to a shard directory")
    masks = opts.masks if opts.masks else str(run.cams_dir)
    h = cfg.head
    return WeakCLIPHead(backbone=backbone, token_ids=token_ids, num_classes=num_classes, mean=mean, std=std,
                        embed_dim=h.embed_dim, decoder_layers=h.decoder_layers, decoder_heads=h.decoder_heads,
                        dropout=h.dropout, options=opts, class_names=class_names, dataset=cfg.data.dataset,
                        masks_dir=masks)


HEADS.register("weakclip")(build_weakclip_head)


__all__ = ["BOUNDARY_CRF", "PARITY_OPTIONS", "CoAttention", "CompactFPN", "FPNSegHead", "MaskedTrainCrops",
           "PromptTextEncoder", "PyramidAdapter", "WeakCLIPDecoder", "WeakCLIPHead", "WeakCLIPOptions",
           "augment_mask", "boundary_loss", "build_weakclip_head", "crf_targets", "dgcn_softmax",
           "resolve_options", "score_map_loss", "seed_loss"]
