"""The WeakCLIP head (a ``Stage1Head``): frozen CLIP features, the decoder, the three losses."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.class_names import get_classes
from ...data.transforms import normalization
from ...io.shards import ShardReader
from ...models.clip_backbone import merge_heads, qkv_heads
from ...models.text import get_tokenizer
from ...utils.cli import BadInputError
from ..base import INITIAL_CAMS, Stage1Head, TrainBatch, register_head
from .config import WeakCLIPHeadCfg, resolve_options
from .data import MaskedTrainCrops
from .losses import (boundary_loss, check_mask_labels, crf_targets, dgcn_softmax, images_to_uint8, resize_labels,
                     score_map_loss, seed_loss)
from .modules import PromptTextEncoder, WeakCLIPDecoder

_logger = logging.getLogger(__name__)


@register_head("weakclip")
class WeakCLIPHead(Stage1Head):
    """WeakCLIP on a frozen CLIP: trains on pseudo-mask crops, predicts logits at stride 4.

    Only ``self.decoder`` holds state; the backbone is held by reference, so ``state_dict()`` is the
    decoder's. :meth:`wrap_train_dataset` adds the mask crops the loop hands to :meth:`forward_train`.

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
                 decoder_heads: int = 4, dropout: float = 0.1, options: Optional[WeakCLIPHeadCfg] = None,
                 class_names: Sequence[str] = (), dataset: str = "", masks_dir: Optional[str] = None) -> None:
        super().__init__()
        self.options = opts = options or resolve_options({})
        nb = backbone.num_blocks
        idx = tuple(int(i) for i in opts.out_indices)
        if len(idx) != 4 or sorted(set(idx)) != list(idx) or idx[0] < 0 or idx[-1] >= nb:
            raise ValueError(f"head.out_indices={list(idx)} must be 4 increasing block indices in [0, {nb})")
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

    config_class = WeakCLIPHeadCfg
    FIGURES = {"decoder": "stage-1 decoder, last validation"}

    @classmethod
    def from_config(cls, cfg: Any, *, backbone: nn.Module, cam_source: Any, num_classes: int,
                    run: Any = None) -> "WeakCLIPHead":
        """Map a validated stage-1 config to the head (``cam_source`` is not used).

        ``run`` (the run's :class:`~stage1_cam.utils.run_dir.RunDir`) gives the default masks: its initial CAM
        shards.
        """
        opts = resolve_options(cfg.head)
        class_names = tuple(get_classes(cfg.data.dataset))
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        token_ids = get_tokenizer(cfg.clip.model_name)(list(class_names))
        mean, std = normalization(cfg)
        if not opts.masks and run is None:
            raise BadInputError("the WeakCLIP head trains on pseudo-masks: set head.masks to a shard directory")
        masks = opts.masks if opts.masks else str(run.cams_dir)
        h = cfg.head
        return cls(backbone=backbone, token_ids=token_ids, num_classes=num_classes, mean=mean, std=std,
                   embed_dim=h.embed_dim, decoder_layers=h.decoder_layers, decoder_heads=h.decoder_heads,
                   dropout=h.dropout, options=opts, class_names=class_names, dataset=cfg.data.dataset,
                   masks_dir=masks)

    @classmethod
    def requires(cls, cfg: Any) -> Tuple[str, ...]:
        """The run's initial CAM shards, unless ``head.masks`` names other pseudo-masks."""
        return () if cfg.head.masks else (INITIAL_CAMS,)

    def trainable_module(self) -> nn.Module:
        return self.decoder

    # ------------------------------------------------------------------ data
    def open_masks(self) -> Any:
        """A :class:`~stage1_cam.io.shards.ShardReader` on the training masks (dataset and classes checked)."""
        if not self.masks_dir:
            raise ValueError("the weakclip head has no pseudo-mask source; set head.masks to a shard dir")
        try:
            return ShardReader(self.masks_dir, expected_classes=self.class_names or None,
                               expected_dataset=self.dataset or None)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. The weakclip head trains on pseudo-masks: run `python -m stage1_cam.cams "
                                    f"CONFIG` (make cams) for this run, or set head.masks to another run's "
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
        return self.call_trainable(pyramid, context, grid)

    # ------------------------------------------------------------------ training / inference
    def forward_train(self, batch: TrainBatch, step: int) -> Dict[str, torch.Tensor]:
        """One training forward with the three WeakCLIP losses.

        Args:
            batch: normalised crops with their pseudo-mask crops ``masks`` (B, S, S) (255 = no cue), from
                :meth:`wrap_train_dataset`; the image-level labels are not used (WeakCLIP learns from the masks).
            step: 0-based training step (unused: no step-dependent behaviour).

        Returns:
            ``loss`` (total), ``loss_seg`` (= seed), ``loss_aff`` (= boundary), ``loss_seed``,
            ``loss_boundary``, ``loss_score`` and ``pseudo_label`` (the mask crops, (B, S, S) int64).
        """
        images, masks = batch.images, batch.masks
        if masks is None:
            raise ValueError("the weakclip head trains on pseudo-mask crops: the batch has no masks (wrap the "
                             "training dataset with head.wrap_train_dataset and collate its 'mask')")
        masks = masks.to(images.device).long()
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        check_mask_labels(masks, self.num_classes)
        opts = self.options
        logits, score = self.decode(images)
        size = (max(1, images.shape[-2] // opts.loss_stride), max(1, images.shape[-1] // opts.loss_stride))
        probs = dgcn_softmax(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False))
        l_seed = seed_loss(probs, resize_labels(masks, size))
        if opts.boundary_weight > 0:
            q = crf_targets(images_to_uint8(images, size, self.mean, self.std), probs, opts.crf.params())
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
    def validation_figures(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, out_size: Tuple[int, int],
                           full_images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The decoder's argmax at ``out_size``: ``{"decoder": (B, H, W) int64}``."""
        logits = self.predict_logits(images)
        up = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return {"decoder": up.argmax(1)}
