"""Sinkhorn-style transition matrix built from an attention affinity.

Provenance: re-implements ``compute_trans_mat`` of WeCLIP ``clip/clip_tool.py`` (the same code is inlined in
CLIP-ES ``generate_cams_voc12.py`` and in ExCEL ``utils/affutils.py``); see ``reference_spec.md`` section 1.6 and
parity oracle 2. The reference alternates a column normalisation (sum over dim 0) and a row normalisation (sum over
dim 1) three times, symmetrises the result and squares it once.

Deliberate deviations:
    * Column and row sums are clamped from below at ``eps`` before dividing, so an all-zero row or column stays zero
      instead of turning into NaN. For sums ``>= eps`` the division is unchanged, so non-degenerate inputs give the
      reference result bit for bit up to float rounding.
    * Inputs are cast to float32 (the reference casts the result to float afterwards) and may carry leading batch
      dimensions.
"""

from __future__ import annotations

import logging

import torch

_logger = logging.getLogger(__name__)

__all__ = ["sinkhorn_normalize", "transition_matrix"]


def _check_square(M: torch.Tensor) -> None:
    if not isinstance(M, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor affinity, got {type(M).__name__}")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"affinity must have shape (..., n, n), got {tuple(M.shape)}")


@torch.no_grad()
def sinkhorn_normalize(M: torch.Tensor, passes: int = 3, *, eps: float = 1e-12) -> torch.Tensor:
    """Alternate column and row normalisation of a non-negative matrix.

    One pass divides every column by its sum and then every row by its sum. After the last pass the rows sum to
    one exactly (up to rounding) and the columns approximately, converging to one as ``passes`` grows.

    Args:
        M: Non-negative affinity of shape ``(..., n, n)``.
        passes: Number of column-then-row passes (3 in the reference).
        eps: Lower bound for the sums used as divisors; all-zero rows/columns stay zero.

    Returns:
        float32 tensor of shape ``(..., n, n)`` on the device of ``M``.
    """
    _check_square(M)
    if passes < 0:
        raise ValueError(f"passes must be >= 0, got {passes}")
    T = M.float()
    for _ in range(passes):
        T = T / T.sum(dim=-2, keepdim=True).clamp_min(eps)
        T = T / T.sum(dim=-1, keepdim=True).clamp_min(eps)
    return T


@torch.no_grad()
def transition_matrix(M: torch.Tensor, *, passes: int = 3, eps: float = 1e-12) -> torch.Tensor:
    """Transition matrix used to propagate CAMs: Sinkhorn passes, symmetrisation, one matrix square.

    Args:
        M: Non-negative affinity of shape ``(..., n, n)`` (e.g. the mean of the last CLIP attention maps with the
            CLS token removed).
        passes: Number of column-then-row normalisation passes (3 in the reference).
        eps: Lower bound for the normalising sums (see :func:`sinkhorn_normalize`).

    Returns:
        float32 tensor ``T`` of shape ``(..., n, n)``: ``S = (N + N^T) / 2`` and ``T = S @ S`` where ``N`` is the
        Sinkhorn-normalised ``M``.
    """
    T = sinkhorn_normalize(M, passes, eps=eps)
    T = (T + T.transpose(-1, -2)) / 2
    return T @ T
