"""Float32 tolerances stated from first principles, for tests that compare two evaluation orders of one quantity.

A float32 operation returns its exact result times ``(1 + d)`` with ``|d| <= u = 2**-24`` (the unit roundoff, half
of ``torch.finfo(torch.float32).eps``). Summing ``n`` terms in any order (any blocking, any SIMD width, any number
of threads) therefore errs by at most ``(n - 1) u`` times the largest partial sum, which is at most ``sum_i |x_i|``
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.4 and lemma 3.1); a dot product adds one
more rounding per product. A chain of operations adds the bounds of its stages, each stage's scaled by how much the
later stages amplify it (its condition number: e.g. ``exp`` turns an absolute error ``e`` of its argument into a
relative error ``e``, so logits of size ``|s|`` make a softmax's probabilities relatively ``|s| u`` uncertain).

So one bound covers every test here::

    |actual - expected| <= ulps * u * min(terms, LAMBDA * sqrt(terms)) * scale

- ``terms``: the number of roundings that accumulate into one compared value (the length of the longest sum, plus
  its products and later operations, each weighted by its condition number). Every use says in a comment what its
  terms are.
- ``scale``: the magnitude of what is summed: the largest partial sum or operand, **not** the result when the sum
  cancels (default: the largest ``|expected|``, right when nothing cancels). A tensor gives an element-wise bound,
  e.g. ``|A| @ |B|`` for a product ``A @ B``.
- ``ulps``: a small safety factor (default 2: two float32 evaluations that each err by the bound differ by twice it;
  a float64 reference errs negligibly, but keep 2 for the rounding of the inputs).

``terms`` alone is the worst case (every rounding error of the same sign and full size). It holds always, but for
long chains (a 12-block transformer: ~10^4 roundings) it is ~10^3 times what any CPU produces, loose enough to pass
real bugs. Rounding errors of round-to-nearest behave as independent, mean-zero variables, and then the error of
``n`` accumulated roundings stays below ``LAMBDA * sqrt(n) * u`` times the same scale with probability at least
``1 - 2 n exp(-LAMBDA**2 (1 - u)**2 / 2)`` (Higham and Mary, *A New Approach to Probabilistic Rounding Error
Analysis*, SIAM J. Sci. Comput. 41(5), 2019). ``LAMBDA = 10`` puts that failure probability below ``1e-15`` per
compared value for any ``n`` here (``n < 10^6``), so the smaller of the two bounds is used; the probabilistic one is
the smaller above ``LAMBDA**2 = 100`` terms.

That holds on every CPU (AVX-512, AVX2, no SIMD) and thread count (they only pick other orders of the same
roundings), yet stays orders of magnitude below what a real bug moves (a wrong index, a missing term or a wrong
scale changes values by a fraction of ``scale``).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Union

import numpy as np
import torch

#: Unit roundoff of float32 (round-to-nearest): the largest relative error of one operation.
F32_U = 2.0 ** -24
#: Probabilistic bound's multiplier of ``sqrt(terms)`` (module docstring): fails with probability < 1e-15.
LAMBDA = 10.0

Number = Union[float, int]
ArrayLike = Union[torch.Tensor, np.ndarray, Number]


def f32_tolerance(terms: Number, scale: ArrayLike, *, ulps: Number = 2) -> Union[float, torch.Tensor]:
    """The module docstring's bound ``ulps * u * min(terms, LAMBDA sqrt(terms)) * scale`` (a tensor if ``scale`` is).

    Args:
        terms: roundings accumulated into one compared value (see the module docstring), ``>= 1``.
        scale: magnitude of the summed terms: a number, or a tensor broadcastable to the compared values.
        ulps: safety factor, a few units (default 2).
    """
    if terms < 1 or ulps <= 0:
        raise ValueError(f"f32_tolerance needs terms >= 1 and ulps > 0, got terms={terms}, ulps={ulps}")
    if isinstance(scale, np.ndarray):
        scale = torch.from_numpy(scale)
    rounds = min(float(terms), LAMBDA * math.sqrt(terms))
    if isinstance(scale, torch.Tensor):
        return ulps * F32_U * rounds * scale.detach().double().abs()
    return ulps * F32_U * rounds * abs(float(scale))


def assert_close_f32(actual: ArrayLike, expected: ArrayLike, *, terms: Optional[Number] = None,
                     scale: Optional[ArrayLike] = None, ulps: Number = 2, tol: Optional[ArrayLike] = None,
                     msg: str = "") -> None:
    """Assert ``|actual - expected| <= f32_tolerance(terms, scale, ulps=ulps)`` element-wise (NaNs must match).

    Args:
        actual, expected: tensors or arrays of one shape (any float dtype; compared in float64).
        terms: roundings accumulated into one compared value; say in a comment what they are.
        scale: magnitude of the summed operands (see the module docstring); default the largest ``|expected|``,
            which is only right when the computation does not cancel.
        ulps: safety factor (default 2).
        tol: instead of ``terms``/``scale``/``ulps``, a bound already made of :func:`f32_tolerance` s (a sum of
            them, for a computation whose stages have different scales).
        msg: prefix of the failure message.
    """
    a = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual).detach()
    e = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected).detach()
    a, e = a.cpu().double(), e.cpu().double()
    assert a.shape == e.shape, f"{msg} shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan), f"{msg} NaNs at different places"
    if tol is None:
        if terms is None:
            raise TypeError("assert_close_f32 needs terms (and optionally scale) or tol")
        if scale is None:
            scale = e[~nan].abs().max().item() if e[~nan].numel() else 0.0
        tol = f32_tolerance(terms, scale, ulps=ulps)
    elif terms is not None or scale is not None:
        raise TypeError("assert_close_f32 takes either tol or terms/scale")
    if isinstance(tol, np.ndarray):
        tol = torch.from_numpy(tol)
    err = (a - e).abs().masked_fill(nan, 0.0)
    bad = err > tol
    if bool(bad.any()):
        tol_t = torch.as_tensor(tol, dtype=torch.float64).expand_as(err)
        i = int((err - tol_t).flatten().argmax())
        raise AssertionError(
            f"{msg} {int(bad.sum())} of {err.numel()} values differ by more than their float32 bound: "
            f"worst |{a.flatten()[i].item():.9g} - {e.flatten()[i].item():.9g}| = {err.flatten()[i].item():.3g} "
            f"> {tol_t.flatten()[i].item():.3g} (largest error {err.max().item():.3g})")


def vit_block_terms(width: int, tokens: int) -> int:
    """Roundings one pre-LN transformer block (MLP ratio 4) accumulates into each output value.

    ``ln_1`` (mean and variance: ``2 width``), q/k/v (``width``), logits (``<= width``), the softmax sum and
    ``P @ v`` (``2 tokens``), ``out_proj`` (``width``), ``ln_2`` (``2 width``), the MLP (``width + 4 width``):
    ``12 width + 2 tokens``. ``n`` blocks in a row accumulate ``n`` times that on the residual stream.
    """
    return 12 * width + 2 * tokens


#: Unit roundoff of float16 (its normal range): the largest relative error of rounding to it.
F16_U = 2.0 ** -11
#: Half the spacing of float16's subnormals: the largest absolute rounding error below its normal range.
F16_SUB = 2.0 ** -25


def dump_logit_terms(*, backbone_blocks: int, width: int, tokens: int, decoder_layers: int, embed_dim: int,
                     fusion: int) -> int:
    """Roundings in one dumped logit: the frozen blocks the decoder reads, its 1x1 fusion over their concatenated
    channels, its transformer layers and classifier, then ``fusion`` more from the test-time fusion (flip average,
    bilinear taps, the mean over scales)."""
    return (backbone_blocks * vit_block_terms(width, tokens) + backbone_blocks * width
            + decoder_layers * vit_block_terms(embed_dim, tokens) + embed_dim + fusion)


def f16_probs_tolerance(probs: ArrayLike, logit_tol: float) -> torch.Tensor:
    """Bound on ``|float16(softmax(z')) - softmax(z)|`` element-wise, given ``|z' - z| <= logit_tol`` everywhere.

    ``p'_i / p_i = exp(dz_i) / sum_j p_j exp(dz_j)`` lies in ``[exp(-2 d), exp(2 d)]`` with ``d = logit_tol``, so
    ``|p' - p| <= p (exp(2 d) - 1)``; storing ``p'`` in float16 errs by at most ``F16_U p'`` (normal range) or
    ``F16_SUB`` (subnormals).

    Args:
        probs: the float32 (or float64) reference probabilities ``softmax(z)``.
        logit_tol: bound on the logits' difference, e.g. an :func:`f32_tolerance` (include the softmax's own
            roundings there: about ``classes + 2`` terms at the logits' scale).
    """
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).double().abs()
    grow = math.exp(2.0 * float(logit_tol))
    return p * ((grow - 1.0) + F16_U * grow) + F16_SUB


def f16_sum_to_one_atol(count: int, terms: int) -> float:
    """How far ``count`` float32 probabilities that sum to 1 up to ``terms`` float32 roundings (the normalising sum
    and division, or a softmax's) may sum to after each is stored in float16: ``F16_U`` relative on the total, plus
    ``F16_SUB`` per subnormal, plus the float32 part."""
    f32 = f32_tolerance(terms, 1.0)
    return F16_U * (1.0 + f32) + count * F16_SUB + f32


def one_torch_thread() -> Iterator[None]:
    """Generator for a fixture: torch runs one intra-op thread inside it (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
