"""Tests for the dense-CRF post-processing (reference_spec.md section 8, parity oracle 14)."""

from __future__ import annotations

import numpy as np
import pytest

from stage1_cam.refine.crf import CRF_PRESETS, crf_labels, dense_crf
from tests.numerics import assert_close_f32

dcrf = pytest.importorskip("pydensecrf.densecrf")
dcrf_utils = pytest.importorskip("pydensecrf.utils")


def _two_region_case(h=24, w=32, noise=0.15, seed=0):
    """Image with a red left half and a blue right half; noisy 3-label probabilities favouring the truth."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 30, 30)
    image[:, w // 2:] = (30, 30, 200)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    probs = np.full((3, h, w), 0.1, np.float32)
    probs[0][truth == 0] = 0.55
    probs[1][truth == 1] = 0.55
    probs += rng.uniform(0, noise, size=probs.shape).astype(np.float32)
    # flip a few pixels to the wrong label
    flips = rng.random((h, w)) < 0.08
    probs[0][flips & (truth == 0)], probs[1][flips & (truth == 0)] = 0.2, 0.7
    probs /= probs.sum(axis=0, keepdims=True)
    return image, probs, truth, flips


def _reference_dense_crf(image, probs, iters, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w):
    """The reference DenseCRF.__call__ sequence, written out."""
    c, h, w = probs.shape
    unary = np.ascontiguousarray(dcrf_utils.unary_from_softmax(probs))
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(image), compat=bi_w)
    return np.array(d.inference(iters)).reshape((c, h, w))


def test_dense_crf_shape_normalisation_and_determinism():
    image, probs, _, _ = _two_region_case()
    q1 = dense_crf(image, probs)
    q2 = dense_crf(image, probs)
    assert q1.shape == probs.shape and q1.dtype == np.float32
    # Terms: pydensecrf divides by a 3-term sum (2 additions, a reciprocal and a product at most), the check adds 3
    # again; probabilities: scale 1.
    assert_close_f32(q1.sum(axis=0), np.ones(q1.shape[1:]), terms=2 * 3, scale=1.0)
    assert (q1 >= 0).all()
    np.testing.assert_array_equal(q1, q2)


def test_dense_crf_matches_reference_sequence():
    image, probs, _, _ = _two_region_case(seed=1)
    for preset in CRF_PRESETS.values():
        ours = dense_crf(image, probs, **preset)
        ref = _reference_dense_crf(
            image,
            probs,
            preset["iterations"],
            preset["pos_xy_std"],
            preset["pos_w"],
            preset["bi_xy_std"],
            preset["bi_rgb_std"],
            preset["bi_w"],
        )
        np.testing.assert_array_equal(ours, ref)  # the same pydensecrf calls on the same float32 inputs


def test_dense_crf_zero_iterations_is_the_normalised_unary():
    image, probs, _, _ = _two_region_case(seed=2)
    q = dense_crf(image, probs, iterations=0)
    # Q = softmax(log p), relatively off by: the unary's float32 log (absolute error ~|log p| each, twice with the max
    # subtracted), exp, the 3-term sum and the division, and probs' own normalisation (a 3-term sum): scale p.
    log_max = float(-np.log(probs.min()))
    assert_close_f32(q, probs, terms=2 * log_max + 1 + 3 + 2 + 3, scale=probs)


def test_dense_crf_removes_label_noise_inside_colour_regions():
    image, probs, truth, flips = _two_region_case(seed=3)
    assert (probs.argmax(axis=0) != truth).sum() >= 5  # noisy input
    q = dense_crf(image, probs)
    np.testing.assert_array_equal(q.argmax(axis=0), truth)


def test_crf_labels_use_only_allowed_label_ids():
    image, probs, truth, _ = _two_region_case(seed=4)
    keys = [0, 7, 15]
    label, conf = crf_labels(image, probs, keys)
    assert label.dtype == np.uint8 and label.shape == truth.shape
    assert set(np.unique(label).tolist()) <= set(keys)
    np.testing.assert_array_equal(label, np.asarray(keys)[truth])
    assert conf.dtype == np.float32 and ((conf > 0) & (conf <= 1 + 1e-6)).all()
    # a subset of channels: the CRF only sees the given labels
    label2, _ = crf_labels(image, probs[:2] / probs[:2].sum(0, keepdims=True), [0, 15])
    assert set(np.unique(label2).tolist()) <= {0, 15}


def test_crf_labels_confidence_threshold_marks_ignore():
    image, probs, _, _ = _two_region_case(seed=5)
    label, conf = crf_labels(image, probs, [0, 3, 4], conf_threshold=0.95)
    low = conf < 0.95
    assert low.any() and (label[low] == 255).all() and (label[~low] != 255).all()
    label_plain, _ = crf_labels(image, probs, [0, 3, 4])
    np.testing.assert_array_equal(label[~low], label_plain[~low])
    assert 255 not in label_plain


def test_crf_bad_input():
    image, probs, _, _ = _two_region_case()
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="spatial size"):
        dense_crf(image, probs[:, :-1])
    with pytest.raises(ValueError, match="one label id per"):
        crf_labels(image, probs, [0, 1])
    with pytest.raises(ValueError, match="duplicates"):
        crf_labels(image, probs, [0, 1, 1])
    with pytest.raises(ValueError, match="ignore_index"):
        crf_labels(image, probs, [0, 1, 255])
