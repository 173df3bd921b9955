"""Fully connected CRF post-processing (pydensecrf) and label-constrained decoding.

Provenance: re-implements WeCLIP ``utils/dcrf.py::DenseCRF.__call__`` (identical in ToCo), used by
``test_msc_flip_seg.py::crf_proc`` with (iterations 10, pos_xy_std 3, pos_w 3, bi_xy_std 64, bi_rgb_std 5, bi_w 4),
and CLIP-ES ``eval_cam_with_crf.py`` with (pos_xy_std 1, pos_w 3, bi_xy_std 67, bi_rgb_std 3, bi_w 4) plus a 0.95
confidence threshold; see ``reference_spec.md`` sections 2.2 and 3.9 and parity oracle 14. The unary is
``-log(clip(prob, 1e-5, 1))`` (``pydensecrf.utils.unary_from_softmax``), one Gaussian pairwise term and one
bilateral term on the RGB image; mean-field inference returns ``Q`` of shape ``(C, H, W)``.

Deliberate deviations:
    * The bilateral term always sees the plain RGB uint8 image. CLIP-ES feeds a mean-subtracted BGR image that wraps
      around in its uint8 cast (spec 3.9); that bug is not reproduced.
    * :func:`crf_labels` decodes over the given channels only (background + present classes), which is faster than a
      21/81-label CRF and cannot emit an absent class.

pydensecrf (PyPI ``pydensecrf2``) is imported lazily so that the rest of the package works without it.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Dict, Sequence, Tuple

import numpy as np

from stage1_cam.constants import IGNORE_INDEX

_logger = logging.getLogger(__name__)

__all__ = ["CRF_PRESETS", "dense_crf", "crf_labels"]

# Named parameter sets of the reference post-processing steps.
CRF_PRESETS: Dict[str, Dict[str, float]] = {
    "weclip": dict(iterations=10, pos_xy_std=3, pos_w=3, bi_xy_std=64, bi_rgb_std=5, bi_w=4),
    "clip_es": dict(iterations=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4),
}


def _import_densecrf() -> Tuple[ModuleType, ModuleType]:
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dcrf_utils
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dense CRF post-processing needs pydensecrf; install it with `pip install pydensecrf2==1.1` "
            "(imports as `pydensecrf`)"
        ) from err
    return dcrf, dcrf_utils


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an RGB uint8 array of shape (H, W, 3), got {got}")
    if not isinstance(probs, np.ndarray) or probs.ndim != 3:
        got = probs.shape if isinstance(probs, np.ndarray) else type(probs).__name__
        raise ValueError(f"probs must be a numpy array of shape (C, H, W), got {got}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs spatial size {probs.shape[1:]} does not match image size {image.shape[:2]}")
    if probs.shape[0] < 1:
        raise ValueError("probs must have at least one channel")
    if not np.isfinite(probs).all():
        raise ValueError("probs contains NaN or inf values")


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int = 10,
    pos_xy_std: float = 3,
    pos_w: float = 3,
    bi_xy_std: float = 64,
    bi_rgb_std: float = 5,
    bi_w: float = 4,
) -> np.ndarray:
    """Mean-field inference of a fully connected CRF.

    Args:
        image: RGB image ``(H, W, 3)`` uint8.
        probs: Per-label probabilities ``(C, H, W)`` (clipped to ``[1e-5, 1]`` for the unary; need not sum to 1).
        iterations: Mean-field iterations.
        pos_xy_std: Spatial std of the Gaussian (smoothness) kernel.
        pos_w: Weight (Potts compatibility) of the Gaussian kernel.
        bi_xy_std: Spatial std of the bilateral (appearance) kernel.
        bi_rgb_std: Colour std of the bilateral kernel.
        bi_w: Weight of the bilateral kernel.

    Returns:
        float32 marginals ``Q`` of shape ``(C, H, W)``; each pixel's column sums to one.
    """
    _check_inputs(image, probs)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    dcrf, dcrf_utils = _import_densecrf()
    c, h, w = probs.shape
    unary = np.ascontiguousarray(dcrf_utils.unary_from_softmax(probs.astype(np.float32, copy=False)))
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(image), compat=bi_w)
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def crf_labels(
    image: np.ndarray,
    probs: np.ndarray,
    keys: Sequence[int],
    *,
    conf_threshold: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    **crf_params: float,
) -> Tuple[np.ndarray, np.ndarray]:
    """Label-constrained CRF decoding: CRF over the given channels, argmax mapped to their label ids.

    Args:
        image: RGB image ``(H, W, 3)`` uint8.
        probs: Probabilities ``(C, H, W)`` of the allowed labels only (e.g. background + present classes).
        keys: Label id of each channel ``(C,)``, e.g. ``[0, 5, 12]``; values in ``[0, 255)`` and unique.
        conf_threshold: When > 0, pixels whose CRF marginal maximum is below it become ``ignore_index``
            (CLIP-ES uses 0.95).
        ignore_index: Label value of ignored pixels.
        crf_params: ``iterations``, ``pos_xy_std``, ``pos_w``, ``bi_xy_std``, ``bi_rgb_std``, ``bi_w``: see
            :func:`dense_crf` (defaults: the WeCLIP set; ``CRF_PRESETS`` holds the named sets).

    Returns:
        ``(label, confidence)``: uint8 ``(H, W)`` label ids taken from ``keys`` (plus ``ignore_index``), and float32
        ``(H, W)`` maximum CRF marginal.
    """
    keys_np = np.asarray(keys)
    if keys_np.ndim != 1 or keys_np.shape[0] != np.shape(probs)[0]:
        raise ValueError(f"keys must list one label id per probability channel; got {keys_np.tolist()} for "
                         f"probs of shape {np.shape(probs)}")
    if keys_np.dtype.kind not in "iu":
        raise ValueError(f"keys must be integer label ids, got dtype {keys_np.dtype}")
    if (keys_np < 0).any() or (keys_np > 255).any() or (keys_np == ignore_index).any():
        raise ValueError(f"keys must be uint8 label ids different from ignore_index={ignore_index}, got "
                         f"{keys_np.tolist()}")
    if len(np.unique(keys_np)) != len(keys_np):
        raise ValueError(f"keys contain duplicates: {keys_np.tolist()}")
    if not 0.0 <= conf_threshold <= 1.0:
        raise ValueError(f"conf_threshold must be in [0, 1], got {conf_threshold}")
    q = dense_crf(image, probs, **crf_params)
    label = keys_np.astype(np.uint8)[q.argmax(axis=0)]
    confidence = q.max(axis=0)
    if conf_threshold > 0:
        label[confidence < conf_threshold] = ignore_index
    return label, confidence
