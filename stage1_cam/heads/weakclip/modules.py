"""WeakCLIP modules: learnable prompts, pyramid adapter, co-attention, compact FPN and the decoder."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


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
            gets the original input and only the last layer's output is used (so only it is computed, and the
            others are built but frozen: they would get no gradient, which AdamW skips and DDP refuses).
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
        if not chain:
            for layer in [*self.text_layers[:-1], *self.pixel_layers[:-1]]:
                layer.requires_grad_(False)

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
