"""Tests for the CAM refinement functions (reference_spec.md section 8, parity oracles 1-6)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_cam.refine import (
    PAR,
    attention_affinity,
    background_sweep,
    box_mask,
    boxes_from_cam,
    cams_to_label,
    cams_to_label_batch,
    minmax_normalize,
    neighbour_offsets,
    refine_cams,
    rfm_affinity,
    sinkhorn_normalize,
    strip_cls,
    transition_matrix,
)
from tests.numerics import assert_close_f32

#: Roundings in one PAR affinity: the 48 neighbour differences' std and the 48-term softmax over them.
PAR_AFF_TERMS = 4 * 48

# --------------------------------------------------------------------------------------------------------------------
# Straightforward re-statements of the reference behaviour, used as oracles.


def _loop_transition(M: torch.Tensor) -> torch.Tensor:
    """compute_trans_mat as written in the reference: explicit sums, no epsilon."""
    T = M.double()
    for _ in range(3):
        T = T / T.sum(dim=0, keepdim=True)
        T = T / T.sum(dim=1, keepdim=True)
    T = (T + T.t()) / 2
    return T @ T


def _one_hot_kernel() -> torch.Tensor:
    weight = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        weight[i, 0, r, c] = 1
    return weight


def _conv_par(imgs, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=20, w1=0.3, w2=0.01):
    """PAR written as in the reference: dilated conv with one-hot kernels, replicate padding per dilation."""
    kernel = _one_hot_kernel().to(imgs.dtype)

    def neighbours(x):
        b, c, h, w = x.shape
        out = []
        for d in dilations:
            xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(xp, kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    ker = torch.ones(1, 1, 8, 1, 1, dtype=imgs.dtype)
    for i in (0, 2, 5, 7):
        ker[0, 0, i] = np.sqrt(2)
    pos = torch.cat([ker * d for d in dilations], dim=2)
    imgs = F.interpolate(imgs, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    b, c, h, w = imgs.shape
    nb = neighbours(imgs)
    rep = imgs.unsqueeze(2).repeat(1, 1, nb.shape[2], 1, 1)
    pos_rep = pos.repeat(b, 1, 1, h, w)
    aff = -(torch.abs(nb - rep) / (torch.std(nb, dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = aff.mean(dim=1, keepdim=True)
    pos_aff = -(pos_rep / (torch.std(pos_rep, dim=2, keepdim=True) + 1e-8) / w1) ** 2
    aff = F.softmax(aff, dim=2) + w2 * F.softmax(pos_aff, dim=2)
    for _ in range(num_iter):
        masks = (neighbours(masks) * aff).sum(2)
    return masks


def _blob_image(h=20, w=24):
    """Two-region image (left dark-red, right bright-blue) plus mild noise, CLIP-normalisation-sized values."""
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(1, 3, h, w)
    img[:, 0, :, : w // 2] = 0.8
    img[:, 2, :, w // 2:] = 0.9
    return img + 0.05 * torch.rand(img.shape, generator=g)


# --------------------------------------------------------------------------------------------------------------------
# Sinkhorn (oracle 2)


def test_sinkhorn_rows_sum_to_one_and_cols_converge():
    M = torch.rand(30, 30) + 0.05
    T = sinkhorn_normalize(M, 3)
    # Terms: the last pass divides by a 30-term row sum, the check sums 30 again; partial sums <= 1.
    assert_close_f32(T.sum(dim=1), torch.ones(30), terms=2 * 30 + 1, scale=1.0)
    assert (T.sum(dim=0) - 1).abs().max() < 0.05  # only approximately column-stochastic after 3 passes
    T = sinkhorn_normalize(M, 50)
    assert_close_f32(T.sum(dim=1), torch.ones(30), terms=2 * 30 + 1, scale=1.0)  # as above
    torch.testing.assert_close(T.sum(dim=0), torch.ones(30), atol=1e-5, rtol=0)  # convergence, not rounding


def test_transition_matrix_matches_reference_loop_and_is_symmetric():
    M = torch.rand(25, 25) ** 3  # skewed, attention-like
    T = transition_matrix(M)
    assert T.dtype == torch.float32
    # Terms: 3 Sinkhorn passes of two 25-term sums and a division each, the symmetrisation, then T @ T (25 terms,
    # doubling T's relative error); all entries positive, so nothing cancels: scale max |expected|.
    assert_close_f32(T, _loop_transition(M), terms=2 * (6 * 26 + 1) + 25)
    assert_close_f32(T, T.t(), terms=25)  # (S @ S)^T = S @ S for a symmetric S, up to the order of its 25 terms
    # squared symmetric doubly-(approximately-)stochastic matrix: rows sum to ~1
    assert (T.sum(dim=1) - 1).abs().max() < 0.05


def test_transition_matrix_batched_equals_single():
    M = torch.rand(3, 12, 12)
    T = transition_matrix(M)
    for b in range(3):  # Terms: as in the reference-loop test above, with 12 instead of 25
        assert_close_f32(T[b], transition_matrix(M[b]), terms=2 * (6 * 13 + 1) + 12)


def test_sinkhorn_zero_rows_and_columns_give_no_nan():
    M = torch.rand(10, 10) + 0.1
    M[3] = 0
    M[:, 5] = 0
    N = sinkhorn_normalize(M)
    T = transition_matrix(M)
    assert torch.isfinite(N).all() and torch.isfinite(T).all()
    assert (N[3] == 0).all() and (N[:, 5] == 0).all()
    rows = torch.tensor([i for i in range(10) if i != 3])
    assert_close_f32(N[rows].sum(dim=1), torch.ones(9), terms=2 * 10 + 1, scale=1.0)  # a 10-term row sum, twice
    assert torch.isfinite(transition_matrix(torch.zeros(4, 4))).all()


def test_sinkhorn_rejects_non_square():
    with pytest.raises(ValueError, match="n, n"):
        transition_matrix(torch.rand(3, 4))


# --------------------------------------------------------------------------------------------------------------------
# Box mask (oracle 3)


def test_box_mask_simple_blob_and_strict_threshold():
    cam = np.zeros((8, 10), np.float32)
    cam[2:5, 3:7] = 1.0
    cam[2, 7] = 0.4  # s8 = 102 == int(0.4 * 255): not strictly greater -> outside
    cam[4, 2] = 0.41  # s8 = 104 > 102 -> inside, extends the box to the left
    np.testing.assert_array_equal(boxes_from_cam(cam, 0.4), [[2, 2, 7, 5]])
    mask = box_mask(cam, 0.4)
    expected = np.zeros((8, 10), bool)
    expected[2:5, 2:7] = True
    np.testing.assert_array_equal(mask, expected)


def test_box_mask_border_off_by_one_parity():
    cam = np.zeros((8, 10), np.float32)
    cam[5:8, 7:10] = 0.9  # touches the bottom and right border
    np.testing.assert_array_equal(boxes_from_cam(cam, 0.4), [[7, 5, 9, 7]])  # clipped to W-1 / H-1
    np.testing.assert_array_equal(boxes_from_cam(cam, 0.4, parity=False), [[7, 5, 10, 8]])
    m_parity = box_mask(cam, 0.4)
    m_fixed = box_mask(cam, 0.4, parity=False)
    assert m_parity.sum() == 4 and m_parity[5:7, 7:9].all()  # last row and column lost
    assert m_fixed.sum() == 9 and m_fixed[5:8, 7:10].all()


def test_box_mask_nested_contours_and_multiple_blobs():
    cam = np.zeros((12, 14), np.float32)
    cam[1:9, 1:9] = 1.0  # ring ...
    cam[3:7, 3:7] = 0.0  # ... with a hole ...
    cam[4:6, 4:6] = 0.9  # ... holding an island
    cam[10, 11:13] = 0.8  # a separate small blob
    boxes = {tuple(b) for b in boxes_from_cam(cam, 0.4).tolist()}
    # RETR_TREE: outer ring, hole border (traced on the ring pixels 2..7), island, small blob
    assert boxes == {(1, 1, 9, 9), (2, 2, 8, 8), (4, 4, 6, 6), (11, 10, 13, 11)}
    mask = box_mask(cam, 0.4)
    expected = np.zeros_like(mask)
    expected[1:9, 1:9] = True
    expected[10:11, 11:13] = True
    np.testing.assert_array_equal(mask, expected)


def test_box_mask_constant_and_empty_cam():
    const = np.full((6, 7), 0.5, np.float32)  # everything foreground -> box (0, 0, W, H) clipped
    np.testing.assert_array_equal(boxes_from_cam(const, 0.4), [[0, 0, 6, 5]])
    assert box_mask(const, 0.4).sum() == 5 * 6
    assert box_mask(const, 0.4, parity=False).all()
    empty = np.zeros((6, 7), np.float32)
    assert boxes_from_cam(empty, 0.4).shape == (0, 4)
    assert not box_mask(empty, 0.4).any()


def test_box_mask_torch_input_and_bad_input():
    cam = torch.zeros(5, 6)
    cam[1:3, 1:4] = 0.7
    mask = box_mask(cam, 0.4)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.device == cam.device
    assert mask.sum().item() == 6
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        box_mask(torch.zeros(2, 5, 6), 0.4)
    with pytest.raises(ValueError, match="threshold"):
        box_mask(cam, 1.5)


# --------------------------------------------------------------------------------------------------------------------
# Affinities and RFM (oracle 4)


def _attention_stack(cls_mass, n, seed):
    """Full (layers, 1+n, 1+n) attention whose patch queries give exactly cls_mass[l] to the CLS key."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for c in cls_mass:
        a = torch.zeros(1 + n, 1 + n)
        a[0] = torch.softmax(torch.randn(1 + n, generator=g), 0)
        a[1:, 0] = c
        a[1:, 1:] = (1 - c) * torch.softmax(3 * torch.randn(n, n, generator=g), dim=1)
        layers.append(a)
    return torch.stack(layers)


def test_strip_cls_and_attention_affinity():
    attn = torch.rand(2, 12, 17, 17)
    patches = strip_cls(attn)
    assert patches.shape == (2, 12, 16, 16)
    torch.testing.assert_close(patches, attn[..., 1:, 1:])
    aff = attention_affinity(patches, last=8)
    torch.testing.assert_close(aff, patches[:, 4:].mean(dim=1))
    torch.testing.assert_close(attention_affinity(patches[0]), aff[0])
    with pytest.raises(ValueError, match="last"):
        attention_affinity(patches, last=13)


def test_rfm_affinity_matches_loop_implementation():
    n = 9
    attn = strip_cls(_attention_stack([0.1, 0.5, 0.2, 0.05, 0.3, 0.4, 0.15, 0.25], n, seed=0))
    a_f = torch.sigmoid(torch.randn(n, n))
    for score in ("signed", "abs"):
        M, keep = rfm_affinity(attn, a_f, last=6, score=score)
        last = attn[-6:]
        s = []
        for a in last:
            d = (a_f - a).double()
            s.append((d.abs() if score == "abs" else d).sum().item())
        theta = sum(s) / len(s)
        g = [float(v <= theta) for v in s]
        expected = sum(gi * a for gi, a in zip(g, last)) / (sum(g) + 1e-5) * a_f
        assert keep.tolist() == [bool(x) for x in g]
        assert_close_f32(M, expected, terms=6 + 2)  # the 6-layer sum, the division and the product; no cancelling


def test_rfm_signed_vs_abs_hand_made():
    A1 = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    A2 = torch.full((2, 2), 0.25)
    attn = torch.stack([torch.rand(2, 2), A1, A2])  # the first layer is outside last=2
    a_f = A1.clone()
    M, keep = rfm_affinity(attn, a_f, last=2, score="signed")
    assert keep.tolist() == [True, True]  # both signed sums are 0
    torch.testing.assert_close(M, (A1 + A2) / (2 + 1e-5) * a_f)
    M, keep = rfm_affinity(attn, a_f, last=2, score="abs")
    assert keep.tolist() == [True, False]  # |A_f - A2| sums to 1 > mean 0.5
    torch.testing.assert_close(M, A1 / (1 + 1e-5) * a_f)
    with pytest.raises(ValueError, match="unknown RFM score"):
        rfm_affinity(attn, a_f, last=2, score="l2")


def test_rfm_signed_keep_depends_only_on_cls_mass():
    n = 16
    cls_mass = [0.3, 0.3, 0.6, 0.1, 0.45, 0.2, 0.5, 0.05, 0.35, 0.4]
    expected_keep = [c <= sum(cls_mass[-6:]) / 6 for c in cls_mass[-6:]]
    keeps_signed, keeps_abs = set(), set()
    for seed in range(4):  # different patch-to-patch attention and decoder affinity each time
        attn = strip_cls(_attention_stack(cls_mass, n, seed=seed))
        a_f = torch.sigmoid(torch.randn(n, n, generator=torch.Generator().manual_seed(100 + seed)) * 4)
        _, keep = rfm_affinity(attn, a_f, last=6, score="signed")
        assert keep.tolist() == expected_keep
        keeps_signed.add(tuple(keep.tolist()))
        # decoder affinity close to one layer makes the abs score favour it regardless of its CLS mass
        a_f_close = attn[-1 - seed] + 0.001
        keeps_abs.add(tuple(rfm_affinity(attn, a_f_close, last=6, score="abs")[1].tolist()))
        assert rfm_affinity(attn, a_f_close, last=6, score="signed")[1].tolist() == expected_keep
    assert len(keeps_signed) == 1
    assert len(keeps_abs) > 1  # the abs filter does look at the decoder affinity


def test_rfm_affinity_batched_and_shape_errors():
    attn = torch.rand(2, 12, 6, 6)
    a_f = torch.rand(2, 6, 6)
    M, keep = rfm_affinity(attn, a_f)
    assert M.shape == (2, 6, 6) and keep.shape == (2, 6)
    for b in range(2):
        Mb, kb = rfm_affinity(attn[b], a_f[b])
        torch.testing.assert_close(M[b], Mb)
        assert torch.equal(keep[b], kb)
    with pytest.raises(ValueError, match="decoder_aff"):
        rfm_affinity(attn, torch.rand(6, 6))


# --------------------------------------------------------------------------------------------------------------------
# refine_cams (oracle 5)


def test_refine_cams_equals_per_class_loop():
    h, w = 6, 7
    cams = torch.zeros(3, h, w)
    cams[0, 1:4, 1:3] = torch.rand(3, 2) * 0.5 + 0.5
    cams[1, 3:6, 4:7] = 1.0  # touches the border: parity matters
    cams[2] = torch.rand(h, w) ** 4
    T = transition_matrix(torch.rand(h * w, h * w) ** 2)
    for parity in (True, False):
        out = refine_cams(cams, T, box_threshold=0.4, parity=parity)
        for k in range(3):
            m = torch.as_tensor(box_mask(cams[k].numpy(), 0.4, parity=parity), dtype=torch.float32).reshape(1, -1)
            expected = ((T * m) @ cams[k].reshape(-1, 1)).reshape(h, w)
            assert_close_f32(out[k], expected, terms=h * w + 1)  # one 42-term product per pixel, all >= 0
    assert refine_cams(cams[:0], T, box_threshold=0.4).shape == (0, h, w)


def test_refine_cams_gates_sources_not_targets():
    h, w = 4, 4
    cam = torch.zeros(1, h, w)
    cam[0, 0, 0] = 1.0  # the only box: pixel (0, 0)
    cam[0, 3, 3] = 0.3  # below 0.4 * max: not a box, so it must not propagate
    T = torch.full((h * w, h * w), 1.0 / (h * w))
    out = refine_cams(cam, T, box_threshold=0.4, parity=False)
    # every target receives mass from the source inside the box only
    torch.testing.assert_close(out, torch.full((1, h, w), 1.0 / (h * w)))
    with pytest.raises(ValueError, match="transition matrix"):
        refine_cams(cam, torch.eye(5), box_threshold=0.4)


# --------------------------------------------------------------------------------------------------------------------
# PAR (oracle 1)


def test_par_neighbour_order_and_position_weights():
    assert neighbour_offsets((1, 2))[:8] == [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    assert neighbour_offsets((1, 2))[8:] == [(2 * a, 2 * b) for a, b in neighbour_offsets((1,))]
    par = PAR()
    assert par.num_neighbours == 48
    pw = par.pos_weight.view(6, 8)
    table = {0: (0.0765, 0.0683), 1: (0.0544, 0.0346), 2: (0.0140, 0.0023)}  # reference_spec 1.9
    for row, (axial, diagonal) in table.items():
        assert abs(pw[row, 1].item() - axial) < 1e-4
        assert abs(pw[row, 0].item() - diagonal) < 1e-4
    assert pw[3:].max() < 1e-4
    torch.testing.assert_close(par.pos_weight.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("img_size", [(18, 22), (31, 40)])
def test_par_matches_one_hot_conv_reference(img_size):
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn((2, 3) + img_size, generator=g)
    masks = torch.rand(2, 3, 18, 22, generator=g)
    out = PAR()(imgs, masks)
    assert out.shape == masks.shape and out.dtype == torch.float32
    # Terms: the affinities, then 20 iterations of a 48-term weighted sum (weights >= 0: scale max |expected|).
    assert_close_f32(out, _conv_par(imgs, masks), terms=PAR_AFF_TERMS + 20 * 48)
    par = PAR(dilations=(1, 3), num_iter=4, w1=0.5, w2=0.1)
    expected = _conv_par(imgs, masks, dilations=(1, 3), num_iter=4, w1=0.5, w2=0.1)
    assert_close_f32(par(imgs, masks), expected, terms=4 * 16 + 4 * 16)  # 16 neighbours: affinities, 4 iterations


def test_par_whole_batch_pass_equals_one_image_at_a_time():
    """The GPU's whole-batch pass (forced here on the CPU) gives the per-image result: per-pixel arithmetic only."""
    g = torch.Generator().manual_seed(5)
    imgs, masks = torch.randn(3, 3, 40, 52, generator=g), torch.rand(3, 4, 20, 26, generator=g)
    par = PAR(num_iter=6)
    per_image = par(imgs, masks)
    for n in (3, 2):
        par.images_per_pass = n
        assert torch.equal(par(imgs, masks), per_image)


def test_par_invariant_to_per_channel_affine_image_transform():
    imgs = _blob_image()
    masks = torch.rand(1, 2, 20, 24)
    scale = torch.tensor([58.4, -57.1, 0.02]).view(1, 3, 1, 1)
    shift = torch.tensor([123.7, -4.0, 0.5]).view(1, 3, 1, 1)
    par = PAR(num_iter=5)
    moved = imgs * scale + shift
    # Terms: the affinities (their neighbour differences cancel the shift: conditioned by max |x| / std per channel),
    # then 5 iterations of a 48-term weighted sum.
    cond = float((moved.abs().amax(dim=(0, 2, 3)) / moved.std(dim=(0, 2, 3))).max())
    assert_close_f32(par(moved, masks), par(imgs, masks), terms=cond * PAR_AFF_TERMS + 5 * 48)


def test_par_affinity_mass_and_constant_masks():
    par = PAR(num_iter=3)
    imgs = _blob_image()
    aff = par.affinity(imgs)
    assert aff.shape == (1, 48, 20, 24)
    assert_close_f32(aff.sum(dim=1), torch.full((1, 20, 24), 1.01), terms=PAR_AFF_TERMS + 48)  # + the 48-term sum
    const = torch.full((1, 2, 20, 24), 0.5)
    assert_close_f32(par(imgs, const), const * 1.01**3, terms=PAR_AFF_TERMS + 3 * 48)  # 3 iterations of 48 terms


def test_par_replicate_border():
    par = PAR(dilations=(1, 2, 5), num_iter=1)
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(1, 3, 6, 7, generator=g)
    masks = torch.rand(1, 2, 6, 7, generator=g)
    aff = par.affinity(imgs)
    out = par(imgs, masks)
    for y, x in [(0, 0), (5, 6), (0, 3), (2, 6)]:
        expected = torch.zeros(2)
        for k, (dy, dx) in enumerate(par.offsets):
            yy, xx = min(max(y + dy, 0), 5), min(max(x + dx, 0), 6)  # clamp == replicate padding
            expected += aff[0, k, y, x] * masks[0, :, yy, xx]
        assert_close_f32(out[0, :, y, x], expected, terms=2 * len(par.offsets))  # one weighted sum, another order


def test_par_propagate_matches_plain_padded_loop():
    """The ping-pong buffers with in-place replicate borders give F.pad's result, iteration after iteration."""
    g = torch.Generator().manual_seed(7)
    for dilations, size in (((1, 2, 5), (6, 7)), ((1, 2, 4, 8, 12, 24), (20, 24))):
        par = PAR(dilations=dilations, num_iter=4)
        imgs = torch.randn(2, 3, *size, generator=g)
        masks = torch.rand(2, 3, *size, generator=g)
        aff = par.affinity(imgs)
        expected = masks
        h, w = size
        for _ in range(par.num_iter):
            padded = F.pad(expected, [par.pad] * 4, mode="replicate")
            expected = sum(padded[..., par.pad + dy: par.pad + dy + h, par.pad + dx: par.pad + dx + w]
                           * aff[:, k: k + 1] for k, (dy, dx) in enumerate(par.offsets))
        out = par.propagate(masks, aff)
        assert out.is_contiguous() and out.shape == masks.shape
        assert_close_f32(out, expected, terms=par.num_iter * 2 * len(par.offsets))  # 4 weighted sums, other order
    assert torch.equal(PAR(num_iter=0).propagate(masks, aff), masks)


def test_par_smooths_towards_image_regions():
    imgs = _blob_image()
    masks = torch.zeros(1, 2, 20, 24)
    masks[0, 0] = 0.5
    masks[0, 1] = 0.45
    masks[0, 1, :, 12:] = 0.55  # channel 1 wins on the right half ...
    masks[0, 1, 5, 3] = 0.9  # ... plus one noisy pixel inside the left region
    out = PAR()(imgs, masks)
    win = out.argmax(dim=1)[0]
    assert (win[:, 13:] == 1).all()
    assert win[5, 3] == 0  # the outlier is smoothed away by its same-colour neighbours


def test_par_input_errors():
    with pytest.raises(ValueError, match="batch"):
        PAR()(torch.rand(2, 3, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="dilations"):
        PAR(dilations=())


# --------------------------------------------------------------------------------------------------------------------
# CAMs -> label (oracle 6)


def _numpy_reference_label(cams, keys, size, alpha):
    """generate_cam_label as in the reference: scale_cam_image (min-max + cv2.resize), bg power, argmax."""
    maps = []
    for cam in cams.numpy():
        cam = cam - cam.min()
        cam = cam / (1e-7 + cam.max())
        maps.append(cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
    maps = np.stack(maps)
    bg = np.power(1 - maps.max(axis=0, keepdims=True), alpha)
    valid = np.array([0] + list(keys))
    return valid[np.argmax(np.concatenate([bg, maps]), axis=0)]


def test_cams_to_label_matches_cv2_reference():
    g = torch.Generator().manual_seed(5)
    cams = torch.rand(3, 5, 6, generator=g) ** 2 * 3.0
    keys = [2, 7, 15]
    for size, alpha in [((40, 48), 1.0), ((23, 17), 2.0), ((5, 6), 1.0)]:
        label, conf = cams_to_label(cams, keys, out_size=size, bg_exponent=alpha)
        assert label.shape == size and label.dtype == torch.int64
        np.testing.assert_array_equal(label.numpy(), _numpy_reference_label(cams, keys, size, alpha))
        assert ((conf > 0) & (conf <= 1)).all()


def test_minmax_resize_matches_cv2_inter_linear():
    cam = torch.rand(7, 9)
    ours = F.interpolate(minmax_normalize(cam)[None, None], size=(30, 20), mode="bilinear", align_corners=False)
    ref = minmax_normalize(cam).numpy()
    ref = cv2.resize(ref, (20, 30), interpolation=cv2.INTER_LINEAR)
    # Terms: 4 bilinear taps, their weights from source coordinates up to 30 (rounded relative to 30); in [0, 1].
    assert_close_f32(ours[0, 0], ref, terms=4 + 2 * 30, scale=1.0)


def test_cams_to_label_emits_only_background_keys_and_ignore_with_threshold():
    g = torch.Generator().manual_seed(6)
    cams = torch.rand(2, 4, 4, generator=g)
    keys = torch.tensor([4, 9])
    label, conf = cams_to_label(cams, keys, out_size=(16, 16))
    assert set(label.unique().tolist()) <= {0, 4, 9}
    assert 255 not in label
    label_t, _ = cams_to_label(cams, keys, out_size=(16, 16), conf_threshold=0.6)
    assert 255 in label_t
    assert set(label_t.unique().tolist()) <= {0, 4, 9, 255}
    keep = conf >= 0.6
    assert torch.equal(label_t[keep], label[keep]) and (label_t[~keep] == 255).all()


def test_cams_to_label_confidence_is_normalised_max():
    cams = torch.zeros(1, 2, 2)
    cams[0, 0, 0] = 1.0
    label, conf = cams_to_label(cams, [3], out_size=(2, 2))
    # pixel (0,0): fg = 1/(1+1e-7) ~ 1, bg ~ 0 -> conf ~ 1; others: fg = 0, bg = 1 -> conf 1
    assert label.tolist() == [[3, 0], [0, 0]]
    torch.testing.assert_close(conf, torch.ones(2, 2), atol=1e-6, rtol=0)
    cams = torch.tensor([[[0.0, 1.0]], [[0.0, 0.5]]])  # (2, 1, 2)
    _, conf = cams_to_label(cams, [1, 2], out_size=(1, 2))
    # pixel 1: fg maps normalised to (1, 1) -> [bg ~0, 1, 1] -> conf 0.5
    torch.testing.assert_close(conf[0, 1], torch.tensor(0.5), atol=1e-6, rtol=0)


def test_cams_to_label_with_par_and_batched_variant():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 24, 20, generator=g)
    cams_a = torch.rand(2, 6, 5, generator=g)
    cams_b = torch.rand(1, 6, 5, generator=g)
    par = PAR(num_iter=5)
    la, ca = cams_to_label(cams_a, [3, 8], out_size=(12, 10), image=images[0], par=par)
    lb, cb = cams_to_label(cams_b, [11], out_size=(12, 10), image=images[1], par=par)
    assert set(la.unique().tolist()) <= {0, 3, 8} and set(lb.unique().tolist()) <= {0, 11}
    # manual: [bg; cams] -> PAR -> argmax
    x = F.interpolate(minmax_normalize(cams_a)[None], size=(12, 10), mode="bilinear", align_corners=False)
    probs = par(images[:1], torch.cat([1 - x.amax(dim=1, keepdim=True), x], dim=1))
    np.testing.assert_array_equal(la.numpy(), np.array([0, 3, 8])[probs[0].argmax(0).numpy()])
    # batched, with the second image padded by a garbage channel
    cams = torch.stack([cams_a, torch.cat([cams_b, torch.rand(1, 6, 5) * 9])])
    keys = torch.tensor([[3, 8], [11, -1]])
    lab, conf = cams_to_label_batch(cams, keys, out_size=(12, 10), images=images, par=par)
    assert torch.equal(lab[0], la) and torch.equal(lab[1], lb)
    torch.testing.assert_close(conf[0], ca)
    torch.testing.assert_close(conf[1], cb)


def test_cams_to_label_bad_input():
    cams = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="keys"):
        cams_to_label(cams, [0, 3], out_size=(8, 8))
    with pytest.raises(ValueError, match="duplicates"):
        cams_to_label(cams, [3, 3], out_size=(8, 8))
    with pytest.raises(ValueError, match="integer"):
        cams_to_label(cams, [1.5, 3.0], out_size=(8, 8))
    with pytest.raises(ValueError, match="both"):
        cams_to_label(cams, [1, 3], out_size=(8, 8), image=torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="keys shape"):
        cams_to_label(cams, [1, 2, 3], out_size=(8, 8))


def test_cams_to_label_without_classes_is_all_background():
    label, conf = cams_to_label(torch.zeros(0, 3, 3), [], out_size=(4, 5))
    assert label.shape == (4, 5) and (label == 0).all() and (conf == 1).all()


def test_background_sweep_rules():
    cams = torch.tensor([[[0.9, 0.45, 0.3]]])  # (1, 1, 3)
    out = background_sweep(cams, [5], exponents=(1.0, 2.0), constants=(0.4,))
    assert set(out) == {"pow1", "pow2", "const0.4"}
    # pow1: bg = 0.1, 0.55, 0.7 ; pow2: bg = 0.01, 0.3025, 0.49 ; const: 0.4
    assert out["pow1"].tolist() == [[5, 0, 0]]
    assert out["pow2"].tolist() == [[5, 5, 0]]
    assert out["const0.4"].tolist() == [[5, 5, 0]]
    assert all(v.dtype == torch.int64 for v in out.values())


def test_label_ties_go_to_the_first_channel_like_numpy_argmax():
    """Equal scores pick the lowest channel (background before classes, then key order), as np.argmax."""
    from stage1_cam.refine.labels import cams_to_label

    cams = torch.zeros(2, 4, 4)
    cams[0, :, :2] = 0.5  # bg = 1 - 0.5 = 0.5 ties with class 7 on the left half
    cams[1, :, :2] = 0.5  # ... and class 9 too
    cams[0, :, 2:] = cams[1, :, 2:] = 0.8  # right half: the two classes tie above bg
    label, _ = cams_to_label(cams, [7, 9], out_size=(4, 4))
    scores = np.stack([1 - cams.amax(0).numpy(), cams[0].numpy(), cams[1].numpy()])
    expected = np.array([0, 7, 9])[scores.argmax(0)]
    np.testing.assert_array_equal(label.numpy(), expected)
    assert (label[:, :2] == 0).all() and (label[:, 2:] == 7).all()
