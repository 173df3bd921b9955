"""WeCLIP decoder: per-block MLP fusion + a light transformer decoder (reference_spec 1.8).

Re-implemented from the reference's description. Deliberate differences: everything runs in the
caller's dtype (the reference ran the decoder attention's output projection in fp16), and the
decoder's inputs are explicit (a list of block token maps), not a stacked fp16 tensor.

Trainable parameters for ViT-B/16 (11 blocks of width 768), embed 256, 21 classes: 5,985,045.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PreLNBlock(nn.Module):
    """CLIP-style residual attention block: x + MHA(LN(x)); x + MLP(LN(x)); no positional encoding."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width * mlp_ratio), QuickGELU(), nn.Linear(width * mlp_ratio, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, width) -> (B, N, width)."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class WeCLIPDecoder(nn.Module):
    """Fuses CLIP block tokens and predicts segmentation logits and a feature affinity.

    Args:
        in_dim: CLIP width (768 for ViT-B/16).
        num_inputs: number of CLIP blocks fed in (11: blocks 0..10).
        embed_dim: fusion / decoder width (256).
        num_classes: output classes including background (21 VOC, 81 COCO).
        decoder_layers: transformer blocks (3).
        decoder_heads: attention heads (8).
        dropout: Dropout2d probability after fusion (0.1).
    """

    def __init__(self, *, in_dim: int, num_inputs: int, embed_dim: int = 256, num_classes: int = 21,
                 decoder_layers: int = 3, decoder_heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, embed_dim))
            for _ in range(num_inputs)
        )
        self.fuse = nn.Conv2d(num_inputs * embed_dim, embed_dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)
        self.blocks = nn.ModuleList(PreLNBlock(width=embed_dim, heads=decoder_heads) for _ in range(decoder_layers))
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    @staticmethod
    def expected_num_params(*, in_dim: int, num_inputs: int, embed_dim: int, num_classes: int,
                            decoder_layers: int) -> int:
        """Closed-form trainable parameter count (the test checks the module against it)."""
        mlp = in_dim * embed_dim + embed_dim + embed_dim * embed_dim + embed_dim
        fusion = num_inputs * mlp + num_inputs * embed_dim * embed_dim + embed_dim
        e = embed_dim
        block = 2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
        return fusion + decoder_layers * block + e * num_classes + num_classes

    def forward(self, tokens: Sequence[torch.Tensor], grid: Tuple[int, int]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: ``num_inputs`` tensors (B, 1 + h*w, in_dim), CLS first (dropped here).
            grid: (h, w) patch grid.

        Returns:
            logits (B, num_classes, h, w), fused features F_u (B, embed_dim, h, w) (post-dropout), and the
            feature affinity A_f = sigmoid(F^T F) (B, h*w, h*w) on un-normalised F_u (reference).
        """
        if len(tokens) != self.num_inputs:
            raise ValueError(f"decoder expects {self.num_inputs} block outputs, got {len(tokens)}")
        h, w = grid
        feats: List[torch.Tensor] = []
        for mlp, t in zip(self.mlps, tokens):
            x = mlp(t[:, 1:].float())  # (B, hw, E)
            feats.append(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        fu = self.dropout(self.fuse(torch.cat(feats, dim=1)))  # (B, E, h, w)
        f = fu.flatten(2)  # (B, E, hw)
        aff = torch.sigmoid(f.transpose(1, 2) @ f)  # (B, hw, hw)
        x = f.transpose(1, 2)  # (B, hw, E)
        for blk in self.blocks:
            x = blk(x)
        x = x.transpose(1, 2).reshape_as(fu)
        return self.classifier(x), fu, aff
