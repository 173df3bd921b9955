"""ExCEL patch-text alignment maps from static visual calibration (reference_spec 4.2-4.6; oracles 17-19).

Gradient-free and batched over images and classes:

1. blocks ``0 .. N-1-svc_blocks`` run normally; from there on two paths run side by side over the last
   ``svc_blocks`` blocks (ExCEL's ``layers=6`` modifies 5 blocks, blocks 7..11 of ViT-B/16):

   - original path: the standard block, ``x_ori <- block(x_ori)``;
   - calibrated path (no MLP): ``x_new <- x_new + out_proj(A_svc v)`` with ``q, k, v`` from
     ``ln_1(x_ori)`` and the intra-correlation attention
     ``A_svc = [softmax(q q^T s) + softmax(k k^T s) + softmax(v v^T s)] / 3`` (``s = 1 / sqrt(head dim)``),
     combined over heads and shared by every head;

2. the CLS token of ``x_new`` is replaced by ``x_ori``'s, then ``ln_post`` and ``@ proj`` give patch
   features ``I (B, L, E)``;
3. CLIP-Surgery similarity with the text set ``T = [fg; bg]``: ``w = softmax(2 I_cls T^T) / mean``,
   ``s[n, t] = w_t (I_n . T_t) - mean_t' w_t' (I_n . T_t')`` (the element-wise "redundant feature"
   subtraction summed over channels, computed in closed form), then min-max over tokens per text;
4. the patch rows and the fg columns of the present classes are the CAMs.

``parity=True`` reproduces three reference quirks: the SVC attention is *summed* over heads (the block
output is scaled by the number of heads and the returned attention rows of those blocks sum to H), the
image features are normalised per channel across tokens (``norm(dim=1)`` of ``(B, N, E)``), and TSE uses
the class text rows as given. ``parity=False`` (documented behaviour) averages over heads, L2-normalises
each token, and L2-normalises the class rows before TSE (equal up to rounding for unit-norm rows).

Learnable visual calibration (LVC, 4.7): called with ``ex_feats`` (the detached fused decoder features ``F_u``,
``(B, C, h, w)``), the SVC blocks add :func:`lvc_attention` of them to the patch block of their calibrated
attention, in every head before the heads are combined (:func:`svc_attention`), and the maps come from that
calibrated pass. Only the calibrated path changes,
so a call with ``reuse=`` (the plain pass's :class:`CamOutput` of the same images) recomputes just that path and
returns the plain pass's attention and features (ExCEL refines with the first pass's attention).

Optional text semantic enrichment (TSE, 4.4): :func:`enrich_text` with an attribute bank, loaded from
ExCEL's released ``*_embedding_bank.pth`` or clustered from class descriptions and cached
(:mod:`stage1_cam.cams.attributes`, cached by :mod:`stage1_cam.cams.bank`; needs scikit-learn).

Other deliberate differences: the positional embedding is interpolated per input size (the reference
assumed square inputs), and the CAMs are not re-min-maxed over patches (the reference's per-text min-max
includes the CLS token, so a CAM's maximum can be below 1).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..models.clip_backbone import ClipFeatures, FrozenClipBackbone, attention_with_maps, block_mlp, merge_heads, \
    qkv_heads, softmax_attention
from ..refine.affinity import centered_cosine
from ..registry import CAM_SOURCES
from ..utils.precision import images_per_pass
from .base import CamOutput, attention_without_cls, check_attn_layers, normalize_labels

_logger = logging.getLogger(__name__)

QKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per-head (B, H, L, hd) queries, keys, values of a block


# ----------------------------------------------------------------------------------------------------
# Pure functions (oracles 18, 19)
# ----------------------------------------------------------------------------------------------------


def enrich_text(fg_text: torch.Tensor, bank: torch.Tensor, topk: float = 0.9, *, parity: bool = False) -> torch.Tensor:
    """TSE aggregation (ExCEL ``attr_aggregate``): add a softmax-weighted mix of attribute embeddings.

    ``logits = t @ bank``; the lowest ``int((1 - topk) * n_attr)`` logits per class are dropped; ``w =
    softmax(logits)`` (no temperature); ``t_enr = w @ bank^T + t``; rows L2-normalised.

    Args:
        fg_text: ``(C, E)`` foreground prompt embeddings, L2-normalised here first (documented behaviour: rows that
            are not exactly unit norm, e.g. from a float16 bank or another text encoder, are scaled to it).
        bank: ``(E, n_attr)`` attribute embeddings (cluster centres, one per column).
        topk: fraction of attributes kept, in ``(0, 1]``.
        parity: use the rows of ``fg_text`` as given, as the reference's ``attr_aggregate`` does (its caller
            normalised them already).

    Returns:
        ``(C, E)`` float32 enriched, L2-normalised embeddings.
    """
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    if bank.ndim != 2 or bank.shape[0] != fg_text.shape[1]:
        raise ValueError(f"attribute bank must be (E={fg_text.shape[1]}, n_attr), got {tuple(bank.shape)}")
    t = fg_text.float() if parity else F.normalize(fg_text.float(), dim=-1)
    bank = bank.float().to(t.device)
    n_attr = bank.shape[1]
    logits = t @ bank  # (C, n_attr)
    n_drop = int((1.0 - topk) * n_attr)
    if n_drop > 0:
        order = logits.argsort(dim=1, descending=True)
        logits = logits.scatter(1, order[:, n_attr - n_drop:], float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return F.normalize(weights @ bank.t() + t, dim=-1)


def feature_surgery(image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP-Surgery patch-text similarity with redundant-feature subtraction (ExCEL ``clip_feature_surgery``).

    Equals ``sum_e (I[n,e] T[t,e] w[t] - mean_t' I[n,e] T[t',e] w[t'])`` with ``w = softmax(2 I_cls T^T) /
    mean(...)``, computed without the ``(B, N, T, E)`` intermediate.

    Args:
        image_features: ``(B, N, E)``, token 0 is CLS.
        text: ``(T, E)``.

    Returns:
        ``(B, N, T)`` similarities (not min-maxed).
    """
    sim = image_features @ text.t()  # (B, N, T)
    prob = torch.softmax(2.0 * sim[:, :1], dim=-1)  # (B, 1, T)
    weighted = sim * (prob / prob.mean(dim=-1, keepdim=True))
    return weighted - weighted.mean(dim=-1, keepdim=True)


def minmax_over_tokens(sim: torch.Tensor) -> torch.Tensor:
    """Min-max normalise ``(B, N, T)`` over the token axis N for each (b, t); flat maps become 0."""
    mn = sim.min(dim=1, keepdim=True).values
    rng = (sim.max(dim=1, keepdim=True).values - mn).clamp_min(torch.finfo(sim.dtype).tiny)
    return (sim - mn) / rng


@torch.no_grad()
def lvc_attention(ex_feats: torch.Tensor, *, batch_global: bool = False, scale: float = 3.0) -> torch.Tensor:
    """LVC's extra attention from decoder features (ExCEL ``cure_attr_map``, spec 4.7).

    ``s = scale (cos - mean)`` with ``cos`` the cosine self-similarity of the channel-normalised features and the
    mean per image (default) or over the whole batch (``batch_global``: the reference, which couples the images);
    ``s < 0`` is masked to ``-inf`` and each row soft-maxed, so every row sums to 1. The diagonal is never masked:
    a token's cosine with itself is 1 >= the mean, so this only matters for a token whose features are all zero
    (cosine 0 everywhere), whose row would otherwise be all ``-inf`` (NaN after the softmax); it attends to itself.

    Args:
        ex_feats: ``(B, C, h, w)`` or ``(B, C, hw)`` features (detached by the caller or here: no autograd).

    Returns:
        float32 ``(B, hw, hw)``, rows summing to 1.
    """
    s = scale * centered_cosine(ex_feats, batch_global=batch_global)
    keep = (s >= 0) | torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)


def svc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, head_sum: bool,
                  ex_attn: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SVC's intra-correlation attention, combined over heads, optionally with LVC's attention added.

    ``A_h = [softmax(q q^T s) + softmax(k k^T s) + softmax(v v^T s)] / 3`` per head ``h``; ``ex_attn`` (rows summing
    to 1) is added to every head's patch block ``A_h[1:, 1:]`` (reference_spec 4.7: "for each head", then the head
    sum of 4.3); then the heads are summed (``head_sum``: the reference) or averaged. So LVC weighs H in the summed
    attention and 1 in the averaged one, which stays the summed one divided by H: the CLS row sums to H (sum) / 1
    (mean), the patch rows to 2H / 2.

    Args:
        q, k, v: ``(B, H, L, hd)``.
        ex_attn: ``(B, L - 1, L - 1)`` from :func:`lvc_attention`, or None.

    Returns:
        float32 ``(B, 1, L, L)``, shared by every head.
    """
    b, _, n, _ = q.shape
    a = torch.empty((b, 1, n, n), dtype=torch.float32, device=q.device)
    # On a CPU one image at a time, so its (H, L, L) maps stay in cache (as attention_with_maps); in place.
    step = images_per_pass(q.device, b)
    for i in range(0, b, step):
        sl = slice(i, i + step)
        acc = softmax_attention(q[sl], q[sl])
        acc += softmax_attention(k[sl], k[sl])
        acc += softmax_attention(v[sl], v[sl])
        acc /= 3.0
        a[sl] = acc.sum(dim=1, keepdim=True) if head_sum else acc.mean(dim=1, keepdim=True)
    if ex_attn is not None:
        if ex_attn.shape != (b, n - 1, n - 1):
            raise ValueError(f"ex_attn must be (B={b}, {n - 1}, {n - 1}) (the patch tokens), got "
                             f"{tuple(ex_attn.shape)}: LVC features on another grid or batch than the images")
        # sum_h (A_h + ex) = sum_h A_h + H ex, and the mean over heads adds ex itself.
        weight = float(q.shape[1]) if head_sum else 1.0
        a[:, :, 1:, 1:] += weight * ex_attn.to(a.dtype)[:, None]
    return a


# ----------------------------------------------------------------------------------------------------
# Attribute bank
# ----------------------------------------------------------------------------------------------------


# Files and clustering in .attributes, the run-directory cache and its command in .bank (python -m
# stage1_cam.cams.bank); re-exported here.


# ----------------------------------------------------------------------------------------------------
# CAM source
# ----------------------------------------------------------------------------------------------------


@CAM_SOURCES.register("excel_svc")
class ExcelSVC:
    """ExCEL's gradient-free CAM source (SVC attention + surgery alignment maps).

    Args:
        backbone: the frozen CLIP image tower.
        fg_text: ``(C_fg, E)`` foreground prompt embeddings (row ``k - 1`` for class id ``k``).
        bg_text: ``(N_bg, E)`` background prompt embeddings.
        parity: reproduce the reference's head-sum SVC attention and across-token feature normalisation.
        svc_blocks: number of final blocks with the calibrated path (reference: 5).
        attribute_bank: optional ``(E, n_attr)`` bank; when given, ``fg_text`` is enriched (TSE).
        topk: fraction of attributes kept by the enrichment.
    """

    def __init__(self, *, backbone: FrozenClipBackbone, fg_text: torch.Tensor, bg_text: torch.Tensor,
                 parity: bool = False, svc_blocks: int = 5, attribute_bank: Optional[torch.Tensor] = None,
                 topk: float = 0.9) -> None:
        e = backbone.embed_dim
        for name, t in (("fg_text", fg_text), ("bg_text", bg_text)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != e:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a (n, {e}) tensor (embed_dim of the backbone), got {shape}")
        if fg_text.shape[0] == 0:
            raise ValueError("fg_text is empty")
        if not 1 <= svc_blocks <= backbone.num_blocks - 1:
            raise ValueError(f"svc_blocks must be in [1, {backbone.num_blocks - 1}], got {svc_blocks}")
        self.backbone = backbone
        self.parity = bool(parity)
        self.svc_blocks = int(svc_blocks)
        fg = fg_text.detach().float()
        if attribute_bank is not None:
            fg = enrich_text(fg, attribute_bank.to(fg.device), topk, parity=self.parity)
        self.num_classes = int(fg.shape[0])
        self.text = F.normalize(torch.cat([fg, bg_text.detach().float().to(fg.device)], dim=0), dim=-1)  # (T, E)

    def image_features(self, images: torch.Tensor, *, ex_attn: Optional[torch.Tensor] = None,
                       features: Optional[ClipFeatures] = None, calibrated: bool = True,
                       qkv_cache: Optional[List[QKV]] = None, attn_layers: Optional[int] = None
                       ) -> Tuple[Optional[torch.Tensor], ClipFeatures, Optional[torch.Tensor]]:
        """Dual-path forward.

        Args:
            images: ``(B, 3, H, W)`` normalised images.
            ex_attn: LVC attention ``(B, h*w, h*w)`` (:func:`lvc_attention`) added in the SVC blocks, or None.
            features: the original path of these images from an earlier call (all N blocks' tokens): only the
                calibrated path is computed (it is the only part ``ex_attn`` changes), and no attention is returned.
            calibrated: compute the calibrated path (False: the original path only, e.g. when an LVC pass with
                ``features=`` follows and the plain maps are not needed; the returned features are None).
            qkv_cache: with ``features``: the SVC blocks' ``(q, k, v)`` of the earlier call (they depend on the
                original path only), so they are not projected again; without ``features``: a list this call
                appends them to.
            attn_layers: keep only the last ``attn_layers`` attention maps (default: all N): no dropped map
                outlives the call (the values are those of the full pass).

        Returns:
            features ``I (B, 1 + h*w, E)`` float32 (normalised as described in the module docstring; None when not
            ``calibrated``), :class:`ClipFeatures` of the original path (all N blocks' tokens, the kept blocks'
            head-averaged attention), and the attention ``(B, attn_layers, h*w, h*w)`` to return (head-summed in SVC
            blocks when ``parity``; None when ``features`` was given).
        """
        bb = self.backbone
        n_blocks = bb.num_blocks
        start = n_blocks - self.svc_blocks
        reuse = features is not None
        if reuse and len(features.tokens) != n_blocks:
            raise ValueError(f"features must hold all {n_blocks} blocks' tokens, got {len(features.tokens)}")
        if reuse and not calibrated:
            raise ValueError("features= recomputes only the calibrated path; calibrated=False leaves nothing to do")
        cached = reuse and qkv_cache is not None and len(qkv_cache) == self.svc_blocks
        keep = n_blocks if attn_layers is None else check_attn_layers(attn_layers, n_blocks)
        with torch.no_grad():
            if reuse:
                tokens, grid = features.tokens, features.grid
                x_ori = x_new = tokens[start - 1]
            else:
                feats = bb(images, num_blocks=start)
                tokens, attn_mean, grid = list(feats.tokens), list(feats.attn), feats.grid
                attn_out = list(feats.attn)
                x_ori = x_new = feats.tokens[-1]
            for i in range(start, n_blocks):
                blk = bb.blocks[i]
                if reuse:
                    x_ori = tokens[i - 1]  # the input of block i on the original path
                if cached:
                    q, k, v = qkv_cache[i - start]  # type: ignore[index]
                else:
                    q, k, v = qkv_heads(blk, blk.ln_1(x_ori))
                    if not reuse and qkv_cache is not None:
                        qkv_cache.append((q, k, v))
                if calibrated:
                    a_svc = svc_attention(q, k, v, head_sum=self.parity, ex_attn=ex_attn)[:, 0]  # (B, L, L)
                    # One map for every head: a single (L, L) x (L, H * hd) product per image, already merged.
                    merged = a_svc.to(v.dtype) @ v.transpose(1, 2).flatten(2)  # (B, L, D)
                    out = F.linear(merged, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
                    x_new = x_new + blk.ls_1(out)  # calibrated path, no MLP
                if not reuse:
                    if self.parity:  # the reference's head sum of the maps
                        a_ori = softmax_attention(q, k)  # (B, H, L, L)
                        o_ori, mean_ori, out_ori = a_ori.to(v.dtype) @ v, a_ori.mean(dim=1), a_ori.sum(dim=1)
                    else:
                        o_ori, mean_ori = attention_with_maps(q, k, v)
                        out_ori = mean_ori
                    x_ori = block_mlp(blk, x_ori + blk.ls_1(merge_heads(blk, o_ori)))
                    tokens.append(x_ori)
                    attn_mean.append(mean_ori)
                    attn_out.append(out_ori)
            feat = None
            if calibrated:
                cls = tokens[-1][:, :1]
                x_new = torch.cat([cls, x_new[:, 1:]], dim=1)
                feat = (bb.visual.ln_post(x_new) @ bb.visual.proj).float()  # (B, L, E)
                if self.parity:
                    feat = feat / feat.norm(dim=1, keepdim=True)  # reference: per channel, across tokens
                else:
                    feat = F.normalize(feat, dim=-1)
        if reuse:
            return feat, features, None
        # Only the kept maps: a slice of all N stacked would hold every map alive (on a GPU, the step's peak).
        features = ClipFeatures(tokens=tokens, attn=attn_mean[len(attn_mean) - keep:], grid=grid)
        return feat, features, attention_without_cls(attn_out[len(attn_out) - keep:])

    def alignment_maps(self, images: torch.Tensor, *, ex_attn: Optional[torch.Tensor] = None,
                       features: Optional[ClipFeatures] = None, calibrated: bool = True,
                       qkv_cache: Optional[List[QKV]] = None, attn_layers: Optional[int] = None
                       ) -> Tuple[Optional[torch.Tensor], ClipFeatures, Optional[torch.Tensor]]:
        """Patch-text maps for every foreground class (the arguments as :meth:`image_features`).

        Returns:
            maps ``(B, h*w, C_fg)`` in ``[0, 1]`` (None when not ``calibrated``), the original-path
            :class:`ClipFeatures`, and the attention ``(B, attn_layers or N, h*w, h*w)`` (None when ``features`` was
            given).
        """
        feat, features, attn = self.image_features(images, ex_attn=ex_attn, features=features, calibrated=calibrated,
                                                   qkv_cache=qkv_cache, attn_layers=attn_layers)
        if feat is None:
            return None, features, attn
        with torch.no_grad():
            if self.text.device != feat.device:
                self.text = self.text.to(feat.device)
            sim = minmax_over_tokens(feature_surgery(feat, self.text))
        return sim[:, 1:, : self.num_classes], features, attn

    def __call__(self, images: torch.Tensor, labels: Sequence[Sequence[int]], *,
                 attn_layers: Optional[int] = None, ex_feats: Optional[torch.Tensor] = None,
                 ex_batch_global: bool = False, reuse: Optional[CamOutput] = None, maps: bool = True,
                 keep_qkv: bool = False) -> CamOutput:
        """CAMs of the present classes of each image.

        Args:
            images: ``(B, 3, H, W)`` normalised images.
            labels: per image, present foreground class ids (1-based).
            attn_layers: return (and keep) only the last ``attn_layers`` attention maps (default: all blocks; the
                SVC pass computes every map either way).
            ex_feats: LVC: decoder features ``(B, C, h, w)`` on the patch grid (detached here); the maps come
                from the calibrated pass with :func:`lvc_attention` of them added in the SVC blocks.
            ex_batch_global: LVC's similarity mean over the whole batch (reference) instead of per image.
            reuse: this source's output for the same ``images`` (a plain pass): its original path is reused
                (only the calibrated path is recomputed, with the SVC blocks' q, k, v the plain pass kept) and its
                attention and features are returned.
            maps: compute the plain maps; False runs the original path only (its features and attention, and the
                SVC blocks' q, k, v for a ``reuse=`` call): ``cams`` is then empty. For an LVC step, where only
                the calibrated maps are used.
            keep_qkv: keep the SVC blocks' q, k, v in ``cache`` for a ``reuse=`` call (always with ``maps=False``).

        Returns:
            :class:`~stage1_cam.cams.CamOutput` (no autograd graph anywhere).
        """
        keys = normalize_labels(labels, batch_size=images.shape[0], num_classes=self.num_classes)
        ex_attn = None
        if ex_feats is not None:
            if ex_feats.dim() != 4 or ex_feats.shape[0] != images.shape[0]:
                raise ValueError(f"ex_feats must be (B={images.shape[0]}, C, h, w), got {tuple(ex_feats.shape)}")
            ex_attn = lvc_attention(ex_feats.detach(), batch_global=ex_batch_global)
        cache: dict = {}
        if reuse is not None:
            if not maps:
                raise ValueError("reuse= recomputes the maps; maps=False leaves nothing to do")
            if reuse.features.tokens[0].shape[0] != images.shape[0]:
                raise ValueError("reuse holds another batch than images")
            sims, features, _ = self.alignment_maps(images, ex_attn=ex_attn, features=reuse.features,
                                                    qkv_cache=reuse.cache.get("svc_qkv"))
            attn = reuse.attn
        else:
            qkv: Optional[List[QKV]] = [] if keep_qkv or not maps else None
            sims, features, attn = self.alignment_maps(images, ex_attn=ex_attn, calibrated=maps, qkv_cache=qkv,
                                                       attn_layers=attn_layers)
            if qkv is not None:
                cache["svc_qkv"] = qkv
        h, w = features.grid
        cams: List[torch.Tensor] = []
        if sims is not None:
            # (image, class column) of every present class, laid out on the host: one non-blocking copy, one gather.
            sizes = [len(k) for k in keys]
            where = np.stack([np.repeat(np.arange(len(keys)), sizes), np.concatenate([k - 1 for k in keys])])
            idx = torch.from_numpy(where.astype(np.int64)).to(sims.device, non_blocking=True)
            picked = sims[idx[0], :, idx[1]].reshape(-1, h, w)  # (sum K_b, h, w)
            cams = [c.contiguous() for c in picked.split(sizes)]
        if attn_layers is not None:
            attn = attn[:, attn.shape[1] - check_attn_layers(attn_layers, attn.shape[1]):]
        return CamOutput(cams=cams, keys=keys, attn=attn, features=features, grid=(h, w), cache=cache)
