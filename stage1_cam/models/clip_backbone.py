"""Frozen open_clip image encoder run block by block (reference_spec 1.2, 7.1 item 11).

The model comes from :func:`stage1_cam.models.pretrained.load_clip` (weight lookup and strict loading).
:class:`FrozenClipBackbone` wraps the model's image tower. It re-implements the residual attention block
on top of the block's own weights, so that every block's tokens *and* head-averaged softmax attention
come out of one pass. Differences from the reference encoder (``WeCLIP/clip/model.py``), all deliberate:

- the number of blocks to run is an explicit argument (the reference chose 11 or 12 blocks with the
  ``x.shape[0] == 77`` test, which misfires for images with exactly 76 patches);
- tokens are batch-first ``(B, L, D)`` with the CLS token first;
- the positional embedding is interpolated bilinearly (align_corners=False) from the pretrained grid to
  ``(H // p, W // p)`` once per input size and cached, instead of on every forward;
- the attention softmax runs in float32, and so do its logits without autocast (the reference ran its attention
  in fp32 and returned fp32 maps); under a ``train.amp`` autocast their matmul runs in the autocast dtype
  (reference_spec 7.1 item 12; ``train.amp=none`` gives float32 throughout).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.precision import images_per_pass

_POS_CACHE_SIZE = 16


@dataclass
class ClipFeatures:
    """Per-block outputs of the image tower.

    Attributes:
        tokens: one ``(B, L, D)`` tensor per block run (L = 1 + h*w, CLS first).
        attn: one ``(B, L, L)`` float32 head-averaged softmax attention per block (rows sum to 1).
        grid: the patch grid ``(h, w)``.
    """

    tokens: List[torch.Tensor]
    attn: List[torch.Tensor]
    grid: Tuple[int, int]


class BlockOutput(NamedTuple):
    """Output of one residual attention block.

    Attributes:
        tokens: ``(B, L, D)`` block output.
        attn: ``(B, L, L)`` float32 head-averaged attention, or ``None`` when not requested.
        normed: ``(B, L, D)`` output of the block's ``ln_1`` (the normalised input to its attention;
            GradCAM's target layer).
        qkv: per-head queries, keys and values ``(B, H, L, D / H)`` projected from ``normed``.
    """

    tokens: torch.Tensor
    attn: Optional[torch.Tensor]
    normed: torch.Tensor
    qkv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


def qkv_heads(block: nn.Module, x_normed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project a block's normalised input to per-head queries, keys and values with its own in_proj.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside).
        x_normed: ``(B, L, D)`` output of ``block.ln_1``.

    Returns:
        q, k, v: each ``(B, H, L, D / H)``, in the weights' dtype.
    """
    mha = block.attn
    b, n, d = x_normed.shape
    heads = mha.num_heads
    qkv = F.linear(x_normed, mha.in_proj_weight, mha.in_proj_bias)
    qkv = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def qkv_mean_grads_to_input(block: nn.Module, means: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token mean of the gradient w.r.t. a block's ``ln_1`` output, from the token means of the q, k, v gradients.

    ``q_i = W_q x_i + b_q`` (likewise k, v), so ``dx_i = W_q^T dq_i + W_k^T dk_i + W_v^T dv_i`` and the mean over
    tokens is ``W_q^T mean_i dq_i + ...``: three ``(B, D) x (D, D)`` products instead of the ``(B, L, 3D) x (3D, D)``
    input-gradient product. Same value up to float rounding.

    Args:
        means: token means of the gradients of ``q, k, v``, each ``(B, H, D / H)`` (heads as in :func:`qkv_heads`).

    Returns:
        ``(B, D)`` float32.
    """
    total = None
    for m, w in zip(means, block.attn.in_proj_weight.chunk(3)):
        b, h, hd = m.shape
        part = m.float().reshape(b, h * hd) @ w.float()  # heads concatenated as in qkv_heads
        total = part if total is None else total + part
    return total


class AttentionForGrads(NamedTuple):
    """A softmax attention evaluated without autograd, with what :func:`attention_qkv_grad_means` needs.

    Attributes:
        probs: ``(B, H, L, L)`` float32 probabilities.
        out: ``(B, H, L, hd)`` float32 output ``probs @ v``.
        out_skip: ``(B, H, L, hd)`` float32 ``probs[..., skip:] @ v[:, :, skip:]`` (the output without the
            leading ``skip`` key tokens; ``out`` is it plus their rank-``skip`` term).
        skip: number of leading tokens (1: CLS).
    """

    probs: torch.Tensor
    out: torch.Tensor
    out_skip: torch.Tensor
    skip: int


@torch.no_grad()
def attention_for_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, skip: int = 1) -> AttentionForGrads:
    """Softmax attention (float32, no autograd) keeping probabilities and the output without the CLS keys.

    On a CPU it runs one image at a time (the ``(H, L, L)`` probabilities stay in cache, as in
    :func:`attention_with_maps`).

    Args:
        q, k, v: ``(B, H, L, hd)``.
        skip: leading tokens whose keys are split off in ``out_skip`` (1: CLS).
    """
    step = images_per_pass(q.device, q.shape[0])
    b, h, n, hd = q.shape
    probs = q.new_empty((b, h, n, n), dtype=torch.float32)
    out = q.new_empty((b, h, n, hd), dtype=torch.float32)
    out_skip = torch.empty_like(out)
    for i in range(0, b, step):
        sl = slice(i, i + step)
        p = softmax_attention(q[sl], k[sl])
        vf = v[sl].float()
        part = p[..., skip:] @ vf[:, :, skip:]
        out_skip[sl] = part
        out[sl] = part + p[..., :skip] @ vf[:, :, :skip]
        probs[sl] = p
    return AttentionForGrads(probs, out, out_skip, skip)


def attention_qkv_grad_means(att: AttentionForGrads, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token means (tokens ``>= skip``) of the gradients of q, k, v, from the gradient of the attention output.

    With ``P`` the probabilities, ``dO`` the output gradient, ``s = hd^-0.5``, ``I = J = {skip..L-1}`` and
    ``n = L - skip``, the softmax backward gives ``dS_ij = P_ij (dO_i . v_j - d_i)`` with ``d_i = dO_i . O_i``, and

    - ``mean_J dv = 1/n sum_i c_i dO_i`` with ``c_i = sum_J P_ij``;
    - ``mean_J dk = s/n sum_i (dO_i . O^J_i - d_i c_i) q_i`` with ``O^J_i = sum_J P_ij v_j`` (``att.out_skip``);
    - ``mean_I dq = s/n sum_j (v_j . G_j - e_j) k_j`` with ``G = P_I^T dO_I`` and ``e = P_I^T d_I``.

    Only ``G`` and ``e`` touch the ``L x L`` probabilities: one ``(L, n) x (n, hd + 1)`` product per head, for all
    gradients at once, where autograd's attention backward takes four ``L x L x hd`` products per gradient. Same
    values up to float rounding.

    Args:
        att: the forward from :func:`attention_for_grads`.
        q, k, v: ``(B, H, L, hd)`` of that forward.
        grad_out: ``(S, B, H, L, hd)`` gradients of the output, ``S`` of them (e.g. one per GradCAM class slot).

    Returns:
        ``(mean dq, mean dk, mean dv)``, each ``(S, B, H, hd)`` float32.
    """
    probs, out, out_skip, skip = att
    n_sets, b, h, length, hd = grad_out.shape
    count = length - skip
    scale = hd ** -0.5
    qf, kf, vf = q.float(), k.float(), v.float()
    d_o = grad_out.float()
    delta = (d_o * out).sum(dim=-1)  # (S, B, H, L)
    c = probs[..., skip:].sum(dim=-1)  # (B, H, L)
    mean_v = torch.einsum("bhl,sbhld->sbhd", c, d_o) / count
    row = (d_o * out_skip).sum(dim=-1) - delta * c  # (S, B, H, L): sum_J dS_ij
    mean_k = torch.einsum("sbhl,bhld->sbhd", row, qf) * (scale / count)
    # G and e for every gradient set in one product: P_I^T [dO_I | d_I] over the sets' columns.
    rhs = torch.cat([d_o[..., skip:, :], delta[..., skip:, None]], dim=-1)  # (S, B, H, L - skip, hd + 1)
    rhs = rhs.permute(1, 2, 3, 0, 4).reshape(b, h, count, n_sets * (hd + 1))
    ge = (probs[:, :, skip:].transpose(-2, -1) @ rhs).reshape(b, h, length, n_sets, hd + 1).permute(3, 0, 1, 2, 4)
    col = (vf * ge[..., :hd]).sum(dim=-1) - ge[..., hd]  # (S, B, H, L): sum_I dS_ij
    mean_q = torch.einsum("sbhl,bhld->sbhd", col, kf) * (scale / count)
    return mean_q, mean_k, mean_v


def merge_heads(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Concatenate per-head attention outputs and apply the block's out_proj.

    Args:
        out: ``(B, H, L, D / H)`` (or ``(B, 1, L, D / H)`` broadcast already applied by the caller).

    Returns:
        ``(B, L, D)``.
    """
    b, h, n, hd = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * hd)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)


def softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention probabilities, float32 (the logits' matmul in the autocast dtype if one is on).

    Args:
        q, k: ``(B, H, L, hd)``.

    Returns:
        ``(B, H, L, L)`` float32, rows sum to 1.
    """
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)


def attention_with_maps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the head-averaged attention map.

    Same values as ``softmax_attention`` followed by ``probs @ v`` and a mean over heads. On a CPU it runs
    one image at a time, so the ``(H, L, L)`` probabilities stay in cache (about twice as fast there as one
    ``(B, H, L, L)`` pass, measured at ViT-B/16, 320x320); on a GPU the whole batch goes at once.

    Args:
        q, k, v: ``(B, H, L, hd)``.

    Returns:
        ``(B, H, L, hd)`` attention output in ``v``'s dtype and ``(B, L, L)`` float32 head-averaged probabilities.
    """
    step = images_per_pass(q.device, q.shape[0])
    outs, maps = [], []
    for b in range(0, q.shape[0], step):
        probs = softmax_attention(q[b:b + step], k[b:b + step])  # (step, H, L, L) float32
        outs.append(probs.to(v.dtype) @ v[b:b + step])
        maps.append(probs.mean(dim=1))
    if len(outs) <= 1:  # one pass (a GPU, a single image, or an empty batch)
        if not outs:
            probs = softmax_attention(q, k)
            return probs.to(v.dtype) @ v, probs.mean(dim=1)
        return outs[0], maps[0]
    return torch.cat(outs), torch.cat(maps)


def block_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of a residual block: ``x + ls_2(mlp(ln_2(x)))``; ``x`` is ``(B, L, D)``."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class FrozenClipBackbone(nn.Module):
    """The image tower of an open_clip CLIP model, frozen, run block by block.

    It has no trainable parameters and stays in eval mode (``train()`` is a no-op). The wrapped model is
    a registered submodule, so ``.to(device)`` moves it.

    Args:
        clip_model: an open_clip ``CLIP`` whose image tower is a ``VisionTransformer`` with standard
            ``ResidualAttentionBlock`` s (every OpenAI / LAION ViT CLIP).
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(clip_model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"FrozenClipBackbone needs an open_clip ViT image tower, got {type(visual).__name__}")
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise ValueError("CLIP image towers with attentional pooling or without a projection are not supported")
        for i, blk in enumerate(visual.transformer.resblocks):
            if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention) \
                    or not blk.attn._qkv_same_embed_dim or blk.attn.in_proj_weight is None:
                raise ValueError(f"block {i} of the CLIP image tower is not a standard ResidualAttentionBlock with a "
                                 f"packed nn.MultiheadAttention (custom blocks such as qk-norm are not supported)")
        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {visual.patch_size} are not supported")
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        self.training = False
        self._pos_cache: Dict[Tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- properties -------------------------------------------------------------------------------

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks

    @property
    def width(self) -> int:
        """Token width D of the image tower."""
        return int(self.visual.conv1.out_channels)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    @property
    def embed_dim(self) -> int:
        """Dimension E of the joint image-text space (``visual.proj`` columns)."""
        return int(self.visual.proj.shape[1])

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the CLIP model (100 for OpenAI ViT-B/16)."""
        return float(self.clip.logit_scale.detach().float().exp())

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    # -- mode / device bookkeeping ------------------------------------------------------------------

    def train(self, mode: bool = True) -> "FrozenClipBackbone":
        """Always stays in eval mode (the encoder is frozen; dropout/patch-dropout stay off)."""
        return super().train(False)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "FrozenClipBackbone":
        self._pos_cache.clear()  # cached positional embeddings follow the weights' device/dtype
        return super()._apply(fn, *args, **kwargs)

    # -- pieces -------------------------------------------------------------------------------------

    def positional_embedding(self, h: int, w: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The positional embedding for an ``h x w`` patch grid.

        The pretrained grid is resized bilinearly (align_corners=False); the CLS position is kept.

        Returns:
            ``(1 + h*w, D)`` in ``dtype`` (cached per ``(h, w, device, dtype)``).
        """
        key = (h, w, torch.device(device), dtype)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.visual.positional_embedding.detach()
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            out = pos
        else:
            grid = pos[1:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            out = torch.cat([pos[:1].float(), grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
        out = out.to(device=device, dtype=dtype)
        if len(self._pos_cache) >= _POS_CACHE_SIZE:
            self._pos_cache.pop(next(iter(self._pos_cache)))
        self._pos_cache[key] = out
        return out

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch embedding + CLS + positional embedding + ln_pre.

        Args:
            images: ``(B, 3, H, W)`` normalised images; remainder pixels beyond a multiple of the patch
                size are dropped by the stride-p convolution (as in the reference).

        Returns:
            tokens ``(B, 1 + h*w, D)`` and the grid ``(h, w)``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[2] < p or images.shape[3] < p:
            raise ValueError(f"images of size {tuple(images.shape[2:])} are smaller than one {p}x{p} patch")
        v = self.visual
        x = v.conv1(images.to(dtype=self.dtype))  # (B, D, h, w)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, d).expand(b, 1, d)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(h, w, device=x.device, dtype=x.dtype)
        return v.ln_pre(x), (h, w)

    def run_block(self, index: int, tokens: torch.Tensor, *, with_attn: bool = True) -> BlockOutput:
        """Run block ``index`` on ``tokens`` with the block's own weights.

        Autograd follows the caller's grad mode (the weights are frozen, so a graph exists only when
        ``tokens`` require grad).

        Args:
            index: block index in ``[0, num_blocks)``; negative indices count from the end.
            tokens: ``(B, L, D)``.
            with_attn: also return the head-averaged attention (otherwise a fused kernel is used).

        Returns:
            :class:`BlockOutput` with ``tokens (B, L, D)``, ``attn (B, L, L)`` or ``None``, ``normed (B, L, D)``
            and the per-head ``qkv``.
        """
        blk = self.blocks[index]
        xn = blk.ln_1(tokens)
        q, k, v = qkv_heads(blk, xn)
        if with_attn:
            out, attn = attention_with_maps(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
            attn = None
        x = tokens + blk.ls_1(merge_heads(blk, out))
        return BlockOutput(block_mlp(blk, x), attn, xn, (q, k, v))

    # -- public forward passes -----------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *, num_blocks: Optional[int] = None, with_attn: bool = True,
                attn_from: int = 0) -> ClipFeatures:
        """Run blocks ``0 .. num_blocks - 1`` without gradients.

        Args:
            images: ``(B, 3, H, W)`` normalised images (any size >= one patch; non-square is fine).
            num_blocks: how many blocks to run (default: all).
            with_attn: return the attention maps; False uses the fused attention kernel and returns an
                empty ``attn`` list (the decoder-only dump path needs tokens only).
            attn_from: with ``with_attn``, only blocks ``attn_from ..`` return maps; earlier blocks use the
                fused kernel (callers that read only the last few maps).

        Returns:
            :class:`ClipFeatures` with ``num_blocks`` token maps ``(B, 1 + h*w, D)`` and the attention maps
            ``(B, 1 + h*w, 1 + h*w)`` of blocks ``attn_from .. num_blocks - 1``.
        """
        n = self.num_blocks if num_blocks is None else int(num_blocks)
        if not 1 <= n <= self.num_blocks:
            raise ValueError(f"num_blocks must be in [1, {self.num_blocks}], got {num_blocks}")
        x, grid = self.embed(images)
        tokens, attns = [], []
        for i in range(n):
            maps = with_attn and i >= attn_from
            x, a = self.run_block(i, x, with_attn=maps)[:2]
            tokens.append(x)
            if maps:
                attns.append(a)
        return ClipFeatures(tokens=tokens, attn=attns, grid=grid)

    def last_block(self, tokens: torch.Tensor, *, with_attn: bool = True
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the final block, with autograd enabled when ``tokens`` require grad (GradCAM).

        Args:
            tokens: ``(B, L, D)`` output of block ``num_blocks - 2``.

        Returns:
            tokens ``(B, L, D)`` and the head-averaged attention ``(B, L, L)`` (``None`` if not requested).
        """
        ctx = torch.enable_grad() if tokens.requires_grad else nullcontext()
        with ctx:
            out = self.run_block(self.num_blocks - 1, tokens, with_attn=with_attn)
        return out.tokens, out.attn

    def pool_project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post, mean over the patch tokens (not CLS), then ``@ proj`` (reference 1.2).

        Args:
            tokens: ``(B, L, D)`` output of the last block.

        Returns:
            ``(B, embed_dim)`` (not normalised).
        """
        v = self.visual
        return v.ln_post(tokens[:, 1:]).mean(dim=1) @ v.proj

    @torch.no_grad()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text tower: ``(T, context_length)`` token ids -> ``(T, embed_dim)`` (not normalised)."""
        device = self.visual.conv1.weight.device
        return self.clip.encode_text(token_ids.to(device))
