"""Attention affinities, the RFM layer filter and affinity-based CAM refinement.

Provenance (``reference_spec.md`` sections 1.6 and 3.6, parity oracles 4 and 5):
    * :func:`attention_affinity` is the pre-RFM affinity of WeCLIP and the CLIP-ES affinity: the mean of the last
      8 head-averaged attention maps with the CLS row/column removed.
    * :func:`rfm_affinity` factors out the RFM block of WeCLIP ``clip/clip_tool.py::perform_single_voc_cam``
      (``require_seg_trans=True``): over the last 6 layers, ``S_l = sum_ij (A_f - A_l)``, keep the layers with
      ``S_l <= mean_l S_l``, average them and multiply elementwise by the decoder affinity ``A_f``.
    * :func:`refine_cams` is the per-class box-masked propagation of the same function:
      ``refined_k = (T * m_k[None, :]) @ vec(cam_k)``; the box mask gates the *source* pixels ``j``.

Deliberate deviations:
    * ``score="abs"`` (``S_l = sum_ij |A_f - A_l|``) is offered besides the reference's signed sum
      (``score="signed"``, the default). With the signed sum the kept set depends only on how much attention the
      patch queries pay to the CLS key in each layer (the ``A_f`` term cancels); see the spec, section 1.6(b).
    * The layer scores are accumulated in float64 so that the ``<=`` comparison is not decided by float32
      summation order; everything else is float32.
    * Batched inputs (leading dimensions) are accepted, and all classes of an image are propagated with a single
      matrix product; :func:`refine_cams` takes a padded batch ``(B, K, h, w)`` and computes its box masks on the
      device (:func:`~stage1_cam.refine.boxes.box_masks`, equal to the cv2 reference bit for bit).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from stage1_cam.refine.boxes import box_masks

_logger = logging.getLogger(__name__)

__all__ = ["strip_cls", "attention_affinity", "rfm_affinity", "refine_cams", "centered_cosine",
           "excel_decoder_affinity", "RFM_SCORES"]

RFM_SCORES = ("signed", "abs")


def strip_cls(attn: torch.Tensor) -> torch.Tensor:
    """Drop the CLS query row and CLS key column (token 0) of attention maps.

    Args:
        attn: Attention of shape ``(..., L, L)`` with the CLS token first.

    Returns:
        View of shape ``(..., L - 1, L - 1)`` holding patch-to-patch attention.
    """
    if attn.dim() < 2 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] < 2:
        raise ValueError(f"attention must have shape (..., L, L) with L >= 2, got {tuple(attn.shape)}")
    return attn[..., 1:, 1:]


def _check_layers(attn: torch.Tensor, last: int, name: str) -> None:
    if attn.dim() < 3 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must have shape (..., layers, n, n), got {tuple(attn.shape)}")
    if not 1 <= last <= attn.shape[-3]:
        raise ValueError(f"last={last} must be between 1 and the number of layers ({attn.shape[-3]}) in {name}")


@torch.no_grad()
def attention_affinity(attn: torch.Tensor, *, last: int = 8) -> torch.Tensor:
    """Mean of the last ``last`` attention maps (the pre-RFM WeCLIP / CLIP-ES affinity).

    Args:
        attn: Head-averaged attention with CLS removed, ``(layers, n, n)`` or ``(B, layers, n, n)``.
        last: Number of final layers to average (8 in the reference).

    Returns:
        float32 affinity of shape ``(n, n)`` or ``(B, n, n)``.
    """
    _check_layers(attn, last, "attn")
    return attn[..., -last:, :, :].float().mean(dim=-3)


@torch.no_grad()
def rfm_affinity(
    attn: torch.Tensor, decoder_aff: torch.Tensor, *, last: int = 6, score: str = "signed"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RFM affinity: filter the last CLIP attention layers against the decoder affinity, then gate by it.

    ``S_l = sum_ij (A_f - A_l)`` (``score="signed"``, the reference) or ``sum_ij |A_f - A_l|`` (``"abs"``);
    ``keep_l = S_l <= mean_l S_l``; ``M = sum_l keep_l A_l / (sum_l keep_l + 1e-5)``; result ``M * A_f``.

    Args:
        attn: Head-averaged attention with CLS removed, ``(layers, n, n)`` or ``(B, layers, n, n)``.
        decoder_aff: Decoder affinity ``A_f = sigmoid(F^T F)``, ``(n, n)`` or ``(B, n, n)``.
        last: Number of final layers considered (6 in the reference).
        score: ``"signed"`` or ``"abs"``.

    Returns:
        ``(M, keep)``: float32 affinity ``(n, n)`` / ``(B, n, n)`` and the boolean layer filter ``(last,)`` /
        ``(B, last)`` (index 0 is layer ``layers - last``).
    """
    if score not in RFM_SCORES:
        raise ValueError(f"unknown RFM score {score!r}; valid: {', '.join(RFM_SCORES)}")
    _check_layers(attn, last, "attn")
    if decoder_aff.shape != attn.shape[:-3] + attn.shape[-2:]:
        raise ValueError(
            f"decoder_aff shape {tuple(decoder_aff.shape)} does not match attention {tuple(attn.shape)}; "
            f"expected {tuple(attn.shape[:-3] + attn.shape[-2:])}"
        )
    layers = attn[..., -last:, :, :].float()  # (..., last, n, n)
    a_f = decoder_aff.float().unsqueeze(-3)  # (..., 1, n, n)
    diff = a_f - layers
    if score == "abs":
        diff = diff.abs()
    s = diff.sum(dim=(-2, -1), dtype=torch.float64)  # (..., last)
    keep = s <= s.mean(dim=-1, keepdim=True)
    weights = keep.to(layers.dtype)[..., None, None]  # (..., last, 1, 1)
    m = (weights * layers).sum(dim=-3) / (weights.sum(dim=-3) + 1e-5)
    return m * decoder_aff.float(), keep


def centered_cosine(feats: torch.Tensor, *, batch_global: bool = False) -> torch.Tensor:
    """Cosine self-similarity of feature maps minus its mean (ExCEL's LVC and decoder affinity, spec 4.7).

    ``F`` is L2-normalised over channels, ``C = F^T F`` and the result is ``C - mean(C)``: the mean over each
    image's ``(hw, hw)`` matrix (default), or over the whole batch when ``batch_global`` (the reference, which
    couples the images of a batch). Differentiable (the decoder affinity's loss trains through it); float32 even
    under autocast.

    Args:
        feats: ``(B, C, h, w)`` or ``(B, C, hw)`` features.
        batch_global: one mean over the batch instead of one per image.

    Returns:
        float32 ``(B, hw, hw)``.
    """
    if feats.dim() not in (3, 4):
        raise ValueError(f"feats must have shape (B, C, h, w) or (B, C, hw), got {tuple(feats.shape)}")
    # float32 even under autocast: LVC thresholds the result at 0, and the product is small ((B, hw, hw)).
    with torch.autocast(device_type=feats.device.type, enabled=False):
        f = torch.nn.functional.normalize(feats.float().flatten(2), dim=1)  # (B, C, hw); a zero vector stays zero
        cos = f.transpose(1, 2) @ f
        mean = cos.mean() if batch_global else cos.mean(dim=(1, 2), keepdim=True)
        return cos - mean


def excel_decoder_affinity(feats: torch.Tensor, *, batch_global: bool = False, scale: float = 3.0) -> torch.Tensor:
    """ExCEL's decoder affinity ``sigmoid(scale (F^T F - mean))`` on channel-normalised ``F`` (spec 4.7; WeCLIP's
    is ``sigmoid(F^T F)`` on raw ``F``). See :func:`centered_cosine` for the mean.

    Returns:
        float32 ``(B, hw, hw)`` in ``(0, 1)``, differentiable.
    """
    return torch.sigmoid(scale * centered_cosine(feats, batch_global=batch_global))


@torch.no_grad()
def refine_cams(
    cams: torch.Tensor,
    T: torch.Tensor,
    *,
    box_threshold: float,
    parity: bool = True,
    valid: Optional[torch.Tensor] = None,
    exact_boxes: bool = True,
) -> torch.Tensor:
    """Propagate each class map with the transition matrix, restricted to sources inside its CAM boxes.

    ``refined_k[i] = sum_j T[i, j] * m_k[j] * cam_k[j]`` where ``m_k`` is the box mask of ``cam_k``
    (:func:`~stage1_cam.refine.boxes.box_masks`, equal to :func:`~stage1_cam.refine.boxes.box_mask`; flattened
    row-major). Everything stays on ``cams``' device; a batch is one batched matrix product.

    Args:
        cams: Class maps ``(K, h, w)``, or a padded batch ``(B, K, h, w)``, in ``[0, 1]`` at the patch grid.
        T: Transition matrix ``(h * w, h * w)`` (``(B, h * w, h * w)`` for a batch) from
            :func:`~stage1_cam.refine.sinkhorn.transition_matrix`.
        box_threshold: Relative box threshold (0.4 VOC, 0.7 COCO).
        parity: Reproduce the reference's border off-by-one in the box mask.
        valid: Optional boolean ``(B, K)`` (or ``(K,)``): False marks padding channels, whose output is 0.
        exact_boxes: :func:`~stage1_cam.refine.boxes.box_masks`' ``exact`` (False: no host synchronisation).

    Returns:
        float32 refined maps of ``cams``' shape on its device (not re-normalised).
    """
    if cams.dim() not in (3, 4):
        raise ValueError(f"cams must have shape (K, h, w) or (B, K, h, w), got {tuple(cams.shape)}")
    h, w = cams.shape[-2:]
    lead = tuple(cams.shape[:-3])
    if T.shape != lead + (h * w, h * w):
        raise ValueError(f"transition matrix shape {tuple(T.shape)} does not match cams grid {h}x{w} "
                         f"(expected {lead + (h * w, h * w)})")
    if valid is not None and tuple(valid.shape) != tuple(cams.shape[:-2]):
        raise ValueError(f"valid shape {tuple(valid.shape)} does not match cams {tuple(cams.shape[:-2])}")
    k = cams.shape[-3]
    if k == 0 or cams.numel() == 0:
        return cams.new_zeros(cams.shape, dtype=torch.float32)
    masks = box_masks(cams.reshape(-1, h, w), box_threshold, parity=parity, exact=exact_boxes).view(cams.shape)
    if valid is not None:
        masks = masks & valid[..., None, None]
    src = cams.float().reshape(*lead, k, h * w) * masks.reshape(*lead, k, h * w)  # gated source values
    refined = src @ T.float().transpose(-1, -2)  # refined[.., k, i] = sum_j T[.., i, j] src[.., k, j]
    return refined.reshape(cams.shape)
