"""CLIP-ES / WeCLIP GradCAM on the last CLIP block (reference_spec 1.5, 3.5; oracle 7).

For an image with present classes ``K`` (sorted ids) and the text set ``[fg rows of K; all bg rows]``:

1. blocks ``0 .. N-2`` run without gradients; the last block runs with autograd on their output;
2. the last block's output is pooled (ln_post, mean over patch tokens, ``@ proj``) and L2-normalised;
3. ``p = softmax(exp(logit_scale) * img . text^T)`` over the image's text set; the target for class
   ``k`` is ``p[k]``;
4. with ``A`` = the last block's ``ln_1`` output (the normalised input to its attention; CLS dropped),
   ``w_c = mean_{h,w} dp_k / dA_c`` and ``cam = ReLU(sum_c w_c A_c)`` on the patch grid;
5. ``cam = (cam - min) / (max(cam - min) + 1e-7)`` per (image, class), twice: ``pytorch_grad_cam`` scales once per
   target layer and again after averaging the (single) layer; the second pass matters when the raw CAM is small
   (a raw maximum of 4e-6 leaves 0.974 after one pass, 1 - 1e-7 after two).

The reference loops over (image, class) pairs with batch size 1, one last-block forward and one backward
each. Here the last block runs once on the whole batch, and one backward per class slot ``j`` (the
``j``-th present class of every image) gives all images' gradients for that slot, since images do not
interact in the block; each gradient equals the looped one. The backward stops at the block's q, k, v:
``w_c`` is a token mean of a linear function of their gradients, so it is taken from their means.
``looped=True`` keeps the reference's loop (benchmark baseline and test oracle).

Deliberate differences from the reference: no forward hooks (``A`` is taken inside our own block code);
the last block's attention of images without labels is still computed (the reference crashed on them).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..models.clip_backbone import (ClipFeatures, FrozenClipBackbone, attention_for_grads, attention_qkv_grad_means,
                                    block_mlp, merge_heads, qkv_heads, qkv_mean_grads_to_input)
from ..registry import CAM_SOURCES
from .base import CamOutput, attention_without_cls, check_attn_layers, minmax_scale, normalize_labels

_logger = logging.getLogger(__name__)


def _check_text(name: str, text: torch.Tensor, embed_dim: int, *, allow_empty: bool) -> torch.Tensor:
    if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[1] != embed_dim:
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(f"{name} must be a (n, {embed_dim}) tensor (embed_dim of the backbone), got {shape}")
    if text.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    return F.normalize(text.detach().float(), dim=-1)


def gradcam_from_grads(activations: torch.Tensor, grads: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """GradCAM maps from target-layer activations and gradients (CLS token first, dropped here).

    Args:
        activations: ``(M, L, D)`` target-layer output.
        grads: ``(M, L, D)`` gradient of each copy's target w.r.t. ``activations``.
        grid: patch grid ``(h, w)`` with ``h * w = L - 1``.

    Returns:
        ``(M, h, w)`` float32 CAMs min-max scaled per map.
    """
    return gradcam_from_weights(activations, grads[:, 1:].float().mean(dim=1), grid)


def gradcam_from_weights(activations: torch.Tensor, weights: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """GradCAM maps ``ReLU(sum_c w_c A_c)`` from channel weights (the spatial mean of the gradients).

    Args:
        activations: ``(M, L, D)`` target-layer output (CLS token first, dropped here).
        weights: ``(M, D)`` mean over the patch tokens of each copy's gradient.
        grid: patch grid ``(h, w)`` with ``h * w = L - 1``.

    Returns:
        ``(M, h, w)`` float32 CAMs min-max scaled per map (:func:`gradcam_scale`).
    """
    cam = torch.relu(torch.einsum("mnd,md->mn", activations[:, 1:].float(), weights.float()))
    return gradcam_scale(cam.reshape(cam.shape[0], *grid))


def gradcam_scale(cam: torch.Tensor) -> torch.Tensor:
    """``pytorch_grad_cam``'s scaling of a one-layer CAM: min-max per target layer, then ReLU, the mean over the
    (single) layer and min-max again. Not idempotent: each pass divides by ``max + 1e-7``.

    Args:
        cam: ``(..., h, w)`` non-negative raw CAMs.
    """
    return minmax_scale(torch.relu(minmax_scale(cam)))


@CAM_SOURCES.register("clip_es_gradcam")
class ClipESGradCAM:
    """GradCAM CAM source on a frozen CLIP backbone, batched over images and present classes.

    Args:
        backbone: the frozen CLIP image tower.
        fg_text: ``(C_fg, E)`` foreground prompt embeddings (row ``k - 1`` for class id ``k``).
        bg_text: ``(N_bg, E)`` background prompt embeddings (may be empty).
        looped: run the reference's per-(image, class) loop instead of the batched pass.
        logit_scale: softmax temperature multiplier; default ``exp(logit_scale)`` of the CLIP model
            (100 for OpenAI ViT-B/16).
        attn_layers: return the attention maps of the last ``attn_layers`` blocks only (``None``: all);
            the blocks before them run the fused attention kernel, which is faster.
    """

    def __init__(self, *, backbone: FrozenClipBackbone, fg_text: torch.Tensor, bg_text: torch.Tensor,
                 looped: bool = False, logit_scale: Optional[float] = None,
                 attn_layers: Optional[int] = None) -> None:
        if backbone.num_blocks < 2:
            raise ValueError("GradCAM needs a backbone with at least 2 blocks")
        self.backbone = backbone
        self.fg_text = _check_text("fg_text", fg_text, backbone.embed_dim, allow_empty=False)
        self.bg_text = _check_text("bg_text", bg_text, backbone.embed_dim, allow_empty=True)
        self.looped = bool(looped)
        self.logit_scale = float(backbone.logit_scale if logit_scale is None else logit_scale)
        n = backbone.num_blocks
        self.attn_layers = n if attn_layers is None else check_attn_layers(attn_layers, n)

    @property
    def num_classes(self) -> int:
        return int(self.fg_text.shape[0])

    def __call__(self, images: torch.Tensor, labels: Sequence[Sequence[int]], *,
                 attn_layers: Optional[int] = None) -> CamOutput:
        """Compute GradCAMs for the present classes of each image.

        Args:
            images: ``(B, 3, H, W)`` normalised images.
            labels: per image, present foreground class ids (1-based).
            attn_layers: attention maps to return for this call (the last ones); default: the source's
                ``attn_layers``. Fewer maps run more blocks with the fused attention kernel.

        Returns:
            :class:`~stage1_cam.cams.CamOutput`; ``features`` holds all N blocks (the last one from the
            GradCAM forward, detached) and ``attn`` is ``(B, attn_layers, h*w, h*w)`` (the last blocks' maps).
        """
        n_maps = self.attn_layers if attn_layers is None else check_attn_layers(attn_layers, self.backbone.num_blocks)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("ClipESGradCAM needs autograd for the last block; call it outside "
                               "torch.inference_mode() (torch.no_grad() is fine)")
        bb = self.backbone
        keys = normalize_labels(labels, batch_size=images.shape[0], num_classes=self.num_classes)
        feats = bb(images, num_blocks=bb.num_blocks - 1, attn_from=bb.num_blocks - n_maps)
        x = feats.tokens[-1]
        if self.fg_text.device != x.device:  # follow the inputs' device once, not on every call
            self.fg_text, self.bg_text = self.fg_text.to(x.device), self.bg_text.to(x.device)
        fg, bg = self.fg_text, self.bg_text
        # The GradCAM block runs in the weights' precision even under autocast: in fp16 its class-score
        # gradients lose most of their bits (random ViT-B/16 on an H100: CAMs 11.9% off the CPU's float32 ones,
        # 0.14% with this block in float32) and bf16 more than doubles the error (2.4% vs 1.0%). One block of
        # twelve, so it costs little.
        # Its outputs go back to the autocast dtype of the blocks before, as the decoder expects.
        autocast_on = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xw = x.to(bb.blocks[bb.num_blocks - 1].ln_1.weight.dtype) if autocast_on else x
            if self.looped:
                cams, last_tokens, last_attn = self._looped(xw, keys, fg, bg, feats.grid)
            else:
                cams, last_tokens, last_attn = self._batched(xw, keys, fg, bg, feats.grid)
        if autocast_on:
            last_tokens = last_tokens.to(x.dtype)
            last_attn = last_attn.to(feats.attn[-1].dtype if feats.attn else last_attn.dtype)
        features = ClipFeatures(tokens=feats.tokens + [last_tokens], attn=feats.attn + [last_attn], grid=feats.grid)
        return CamOutput(cams=cams, keys=keys, attn=attention_without_cls(features.attn), features=features,
                         grid=feats.grid)

    # -- implementations -----------------------------------------------------------------------------

    def _last_block_no_grad(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = self.backbone.run_block(self.backbone.num_blocks - 1, x, with_attn=True)
        return out.tokens, out.attn

    def _batched(self, x: torch.Tensor, keys: List[np.ndarray], fg: torch.Tensor, bg: torch.Tensor,
                 grid: Tuple[int, int]) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One last-block forward per image and one backward per class slot.

        Images do not interact in the last block, so a backward whose output gradient selects class
        ``keys[b][j]`` in every image ``b`` (slot ``j``) gives each image's gradient for its ``j``-th class
        at once. ``max_b K_b`` backward passes over the batch replace the reference's ``sum_b K_b``
        forward+backward passes over single images. The backward passes stop at the attention output; the
        GradCAM weights follow from there in closed form (:func:`attention_qkv_grad_means`).

        Args:
            x: ``(B, L, D)`` output of block N-2.

        Returns:
            per-image CAMs ``(K_b, h, w)``, last-block tokens ``(B, L, D)`` and attention ``(B, L, L)``.
        """
        bb = self.backbone
        b_size = x.shape[0]
        counts = [len(k) for k in keys]
        slots = max(counts, default=0)
        if slots == 0:
            tokens, attn = self._last_block_no_grad(x)
            return [torch.empty((0, *grid), dtype=torch.float32, device=x.device) for _ in keys], tokens, attn
        # The class masks are laid out on the host (the keys are host arrays) and cross in one non-blocking copy:
        # present[b, c] (class c + 1 is in image b) and select[j, b, c] (slot j of image b is class c + 1).
        host = np.zeros((slots + 1, b_size, fg.shape[0] + bg.shape[0]), dtype=np.float32)
        for b, ids in enumerate(keys):
            host[0, b, ids - 1] = 1.0
            host[1 + np.arange(len(ids)), b, ids - 1] = 1.0
        masks = torch.from_numpy(host).to(x.device, non_blocking=True)  # pageable source: staged before returning
        present, selects = masks[0, :, :fg.shape[0]] > 0, masks[1:]
        blk = bb.blocks[bb.num_blocks - 1]
        with torch.no_grad():
            normed = blk.ln_1(x)
            q, k, v = qkv_heads(blk, normed)
            att = attention_for_grads(q, k, v)  # probabilities kept for the gradient means below
        with torch.enable_grad():
            # Autograd starts at the attention output: the GradCAM weights are the token mean of the gradient at
            # ln_1's output, a linear function of the q, k, v gradients' token means, and those follow from the
            # output gradient in closed form (attention_qkv_grad_means), without the attention's L x L backward.
            o = att.out.detach().to(v.dtype).requires_grad_(True)  # a new leaf; att.out stays out of the graph
            tokens = block_mlp(blk, x.detach() + blk.ls_1(merge_heads(blk, o)))
            img = F.normalize(bb.pool_project(tokens).float(), dim=-1)  # (B, E)
            # Softmax over [present fg rows; all bg rows] of each image; absent fg rows are masked to
            # -inf, which leaves exactly the reference's text set in the denominator.
            logits_fg = (self.logit_scale * img @ fg.t()).masked_fill(~present, float("-inf"))
            prob = torch.softmax(torch.cat([logits_fg, self.logit_scale * img @ bg.t()], dim=1), dim=-1)
            grads = []
            for j in range(slots):
                grads.append(torch.autograd.grad(prob, o, grad_outputs=selects[j].to(prob.dtype),
                                                 retain_graph=j < slots - 1)[0])
        with torch.no_grad():
            means = attention_qkv_grad_means(att, q, k, v, torch.stack(grads))  # 3 x (slots, B, H, hd)
            per_slot = [gradcam_from_weights(normed, qkv_mean_grads_to_input(blk, [m[j] for m in means]), grid)
                        for j in range(slots)]  # (B, h, w) each
        cams = [torch.stack([per_slot[j][b] for j in range(counts[b])]) if counts[b]
                else torch.empty((0, *grid), dtype=torch.float32, device=x.device) for b in range(b_size)]
        return cams, tokens.detach(), att.probs.mean(dim=1)

    def _looped(self, x: torch.Tensor, keys: List[np.ndarray], fg: torch.Tensor, bg: torch.Tensor,
                grid: Tuple[int, int]) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The reference's loop: one last-block forward and one backward per (image, class)."""
        bb = self.backbone
        cams: List[torch.Tensor] = []
        last_tokens, last_attn = [], []
        for b, k in enumerate(keys):
            xb = x[b:b + 1]
            if len(k) == 0:
                t, a = self._last_block_no_grad(xb)
                cams.append(torch.empty((0, *grid), dtype=torch.float32, device=x.device))
                last_tokens.append(t)
                last_attn.append(a)
                continue
            text = torch.cat([fg[torch.from_numpy(k - 1).to(x.device)], bg], dim=0)
            per_class = []
            for j in range(len(k)):
                with torch.enable_grad():
                    xg = xb.detach().requires_grad_(True)
                    out = bb.run_block(bb.num_blocks - 1, xg, with_attn=True)
                    img = F.normalize(bb.pool_project(out.tokens).float(), dim=-1)
                    prob = torch.softmax(self.logit_scale * img @ text.t(), dim=-1)
                    (grads,) = torch.autograd.grad(prob[0, j], out.normed)
                per_class.append(gradcam_from_grads(out.normed.detach(), grads, grid))
                if j == 0:  # the reference keeps the first class's attention
                    last_tokens.append(out.tokens.detach())
                    last_attn.append(out.attn.detach())
            cams.append(torch.cat(per_class, dim=0))
        return cams, torch.cat(last_tokens, dim=0), torch.cat(last_attn, dim=0)
