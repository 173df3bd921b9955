"""Issue 20: a training step without host<->device synchronisation, with the same results as before.

* the device box masks (refine.boxes.box_masks) equal the cv2 reference bit for bit on thousands of maps;
* the batched refinement and the padded online pseudo labels equal the per-image ones;
* the sync detector (utils.syncs) catches a deliberate ``.item()``, and a WeCLIP training step makes none;
* the loop's deferred non-finite check still names the first bad step and never checkpoints it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1_cam.heads import TrainBatch
from stage1_cam.refine.boxes import box_mask, box_masks, default_rounds
from stage1_cam.utils.syncs import HostSyncError, SyncCounter
from tests.numerics import F32_U, assert_close_f32, f32_tolerance

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"
THRESHOLDS = (0.0, 0.4, 0.7, 0.79, 1.0)
GRIDS = ((20, 20), (10, 10), (32, 32), (7, 13))


def _smooth(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Sums of random Gaussian blobs (CAM-like), some scaled so the quantised maximum is small."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    out = torch.zeros(n, h, w)
    for _ in range(4):
        cy, cx = torch.rand(n, 1, 1, generator=g) * h, torch.rand(n, 1, 1, generator=g) * w
        s = 0.5 + torch.rand(n, 1, 1, generator=g) * max(h, w) / 3
        out += torch.rand(n, 1, 1, generator=g) * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * s * s))
    out = out / out.amax(dim=(1, 2), keepdim=True)
    return out * torch.where(torch.rand(n, 1, 1, generator=g) < 0.2, 0.05, 1.0)  # small maxima too


def _rings(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Nested rings (islands inside holes inside components), random centres, some touching the borders."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    cy, cx = torch.rand(n, 1, 1, generator=g) * h, torch.rand(n, 1, 1, generator=g) * w
    r = torch.maximum((ys - cy).abs(), (xs - cx).abs())  # square rings: 8-connected corners
    level = torch.randint(1, 3, (n, 1, 1), generator=g).float()
    return ((r / level).floor() % 2 == 0).float() * (0.5 + 0.5 * torch.rand(n, h, w, generator=g))


def _serpentine(h: int, w: int, *, transpose: bool = False) -> torch.Tensor:
    """One component whose path bends at every row: the slowest shape for label propagation."""
    g = torch.zeros(h, w)
    for r in range(0, h, 2):
        g[r] = 1.0
        if r + 1 < h:
            g[r + 1, w - 1 if (r // 2) % 2 == 0 else 0] = 1.0
    return g.t().contiguous() if transpose else g


def _maps(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 40
    noise = torch.rand(n, h, w, generator=g)
    sparse = (torch.rand(n, h, w, generator=g) < 0.15).float() * torch.rand(n, h, w, generator=g)
    single = torch.zeros(8, h, w)
    single.view(8, -1)[torch.arange(8), torch.randint(0, h * w, (8,), generator=g)] = 1.0
    single[1, 0, 0] = single[2, h - 1, w - 1] = single[3, 0, w - 1] = single[4, h - 1, 0] = 1.0  # corners
    border = torch.zeros(6, h, w)
    border[0, :, 0] = border[1, :, w - 1] = border[2, 0, :] = border[3, h - 1, :] = 1.0
    border[4] = 1.0  # everything
    border[5, 1:-1, 1:-1] = 1.0  # all but the border ring
    special = torch.stack([torch.zeros(h, w), torch.full((h, w), 0.004), torch.full((h, w), 1.004),
                           _serpentine(h, w), _serpentine(w, h, transpose=True) if h == w else _serpentine(h, w)])
    return torch.cat([_smooth(g, n, h, w), noise, sparse, _rings(n, h, w, g), single, border, special])


@pytest.mark.parametrize("grid", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_box_masks_equal_the_cv2_reference_bit_for_bit(grid):
    h, w = grid
    maps = _maps(h, w, seed=h * 100 + w)  # 179 maps per grid, x 5 thresholds x 2 parities x 4 grids
    for threshold in THRESHOLDS:
        for parity in (True, False):
            ref = torch.stack([box_mask(c, threshold, parity=parity) for c in maps])
            got = box_masks(maps, threshold, parity=parity)
            bad = (got != ref).flatten(1).any(1).nonzero().flatten().tolist()
            assert got.dtype == torch.bool and torch.equal(got, ref), (threshold, parity, bad)
            # The synchronisation-free budget suffices for every map here, serpentines included.
            assert torch.equal(box_masks(maps, threshold, parity=parity, exact=False), ref)


def test_cpu_neighbourhood_maximum_equals_max_pooling():
    """The CPU's shifted-view 3x3 maximum (boxes._max3x3) is the GPU's max pooling, exactly, borders included."""
    from stage1_cam.refine.boxes import _max3x3

    g = torch.Generator().manual_seed(9)
    for h, w in GRIDS + ((1, 1), (1, 5)):
        x = torch.randint(0, h * w + 1, (6, h, w), generator=g).float()
        assert torch.equal(_max3x3(x), torch.nn.functional.max_pool2d(x[:, None], 3, stride=1, padding=1)[:, 0])


def test_box_mask_threshold_uses_the_reference_double_rounding():
    # max(s8) = 10 and threshold 0.7: int(0.7 * 10) = 7 in double, 6 in float32 (6.99999988): pixel 7 must fail.
    cam = torch.zeros(1, 5, 5)
    cam[0, 0, 0] = 10.5 / 255
    cam[0, 4, 4] = 7.5 / 255
    assert torch.equal(box_masks(cam, 0.7, parity=False)[0], box_mask(cam[0], 0.7, parity=False))
    assert not box_masks(cam, 0.7, parity=False)[0, 4, 4]


def test_serpentine_converges_well_within_the_default_rounds():
    from stage1_cam.refine.boxes import _propagate

    for n in (10, 20, 32):
        fg = _serpentine(n, n, transpose=True)[None] > 0
        index = torch.arange(1, n * n + 1, dtype=torch.float32).view(1, n, n)
        labels = torch.where(fg, index, 0.0)
        rounds = next(r for r in range(1, n * n)
                      if torch.equal(_propagate(labels, fg, r), _propagate(labels, fg, r + 1)))
        assert rounds <= 1.2 * n + 1 < default_rounds(n, n) / 3


def _refine_inputs(seed: int, b: int = 3, h: int = 10, w: int = 12):
    from stage1_cam.refine.sinkhorn import transition_matrix

    g = torch.Generator().manual_seed(seed)
    counts = [2, 0, 3][:b]
    cams = [_smooth(g, k, h, w) if k else torch.empty(0, h, w) for k in counts]
    keys = [np.sort(np.random.RandomState(seed + i).choice(np.arange(1, 21), k, replace=False)) for i, k in
            enumerate(counts)]
    trans = transition_matrix(torch.rand(b, h * w, h * w, generator=g) ** 4)
    return cams, keys, trans


def test_batched_refine_equals_per_image_refine():
    from stage1_cam.heads.weclip import pad_cams
    from stage1_cam.refine.affinity import refine_cams

    cams, keys, trans = _refine_inputs(0)
    padded, pkeys = pad_cams(cams, keys, device=torch.device("cpu"))
    batched = refine_cams(padded, trans, box_threshold=0.4, parity=False, valid=pkeys >= 0, exact_boxes=False)
    n = trans.shape[-1]
    for i, c in enumerate(cams):
        one = refine_cams(c, trans[i], box_threshold=0.4, parity=False)
        # refined[k, i] = sum_j T[i, j] m[j] cam[j]: n non-negative products; any summation order errs by at most
        # (n + 1) u times the sum itself (no cancellation), twice for two evaluations.
        torch.testing.assert_close(batched[i, :len(c)], one, rtol=2 * (n + 1) * F32_U, atol=0.0)
        assert not batched[i, len(c):].any()  # padding stays zero
    assert torch.equal(pkeys[1], torch.full((3,), -1)) and pkeys[2].tolist() == keys[2].tolist()


def _confidence_tolerance(refined: torch.Tensor, par) -> torch.Tensor:
    """Float32 bound on |confidence(batched) - confidence(per image)| of one image (online_pseudo_labels).

    The two paths run the same element-wise operations and per-image reductions; only the two matrix products differ
    in shape (``T = S @ S`` on a batch of 3 vs 1, ``src @ T^T`` with the padded channel count vs the image's own), so a
    BLAS may order their n-term sums differently. Both sum non-negative terms: each refined value ``r`` is relatively
    ``2 (n + 1) u`` uncertain. Min-max scaling turns that into an absolute error ``4 max / (max - min)`` times it
    (numerator and denominator: ``(r - min)`` and ``(max - min)`` each move by ``2 max`` times it); bilinear
    upsampling, the channel maximum and ``1 - max`` do not amplify; PAR's propagation (weights summing to
    ``1 + w2``) at most by ``(1 + w2)^iters``; the confidence ``max / sum`` over ``k + 1`` channels by
    ``k + 2`` (the sum is >= 1 with the background exponent 1 used here). The roundings after the products (min-max
    3, upsampling 8, background 1, PAR 2 K per iteration, the confidence k + 3) are counted at the same (larger)
    scale.

    Args:
        refined: the image's refined maps ``(k, h, w)`` (``k`` may be 0: the confidence is exactly 1 on both paths).
        par: the PAR module of both paths.
    """
    k, n = refined.shape[0], refined[0].numel() if len(refined) else 0
    if k == 0:
        return torch.tensor(0.0)
    r = refined.flatten(1).double()
    cond = (r.amax(1) / (r.amax(1) - r.amin(1))).max()  # max / (max - min) of the worst channel
    terms = 2 * (n + 1) + 3 + 8 + 1 + 2 * par.num_neighbours * par.num_iter + k + 3
    return f32_tolerance(terms, 4 * (k + 2) * (1 + par.w2) ** par.num_iter * cond)


def test_online_pseudo_labels_equal_the_per_image_path():
    """The padded one-pass labels equal each image's own (the former per-image loop)."""
    from stage1_cam.heads.weclip import PseudoLabelCfg, online_pseudo_labels, pad_cams
    from stage1_cam.refine.affinity import attention_affinity, refine_cams, rfm_affinity
    from stage1_cam.refine.par import PAR
    from stage1_cam.refine.sinkhorn import transition_matrix

    cams, keys, _ = _refine_inputs(1, b=3, h=8, w=8)
    g = torch.Generator().manual_seed(2)
    attn = torch.softmax(torch.randn(3, 8, 64, 64, generator=g) * 3, dim=-1)
    dec = torch.sigmoid(torch.randn(3, 64, 64, generator=g))
    images = torch.randn(3, 3, 32, 32, generator=g)
    cfg = PseudoLabelCfg(rfm_layers=6)
    par = PAR(num_iter=5)
    for d in (None, dec):
        lab, conf = online_pseudo_labels(cams, keys, attn, d, cfg=cfg, par=par, images=images, out_size=(32, 32))
        # The refined maps of the batched path, for the conditioning of the confidences' bound.
        m = attention_affinity(attn, last=cfg.attn_layers) if d is None else \
            rfm_affinity(attn, d, last=cfg.rfm_layers, score=cfg.rfm_score)[0]
        padded, pkeys = pad_cams(cams, keys, device=torch.device("cpu"))
        refined = refine_cams(padded, transition_matrix(m), box_threshold=cfg.box_threshold, parity=cfg.parity,
                              valid=pkeys >= 0)
        for i in range(3):
            one, one_conf = online_pseudo_labels(cams[i:i + 1], keys[i:i + 1], attn[i:i + 1],
                                                 None if d is None else d[i:i + 1], cfg=cfg, par=par,
                                                 images=images[i:i + 1], out_size=(32, 32), exact_boxes=True)
            # Same box masks bit for bit, the refined maps equal up to the products' order: the argmax labels are
            # identical (a flipped tie would need two channels within float32 rounding, absent on these maps).
            assert torch.equal(lab[i], one[0])
            assert_close_f32(conf[i], one_conf[0], tol=_confidence_tolerance(refined[i, :len(cams[i])], par))
            assert set(lab[i].unique().tolist()) <= {0, *keys[i].tolist()}


def test_sync_counter_catches_a_deliberate_item_and_host_copies():
    x = torch.randn(4)
    with SyncCounter() as c:
        y = (x * 2).sum()
    assert c.total == 0
    with SyncCounter() as c:
        y.item()
        if x.sum() > 0:  # a tensor in an `if`
            pass
        x[x > 0]  # boolean-mask indexing: a data-dependent shape
        x.tolist()
        x.to("cpu")
        x.to("cpu", non_blocking=True)  # not counted: no wait
    assert c.counts["_local_scalar_dense"] == 2 and c.counts["index[bool mask]"] == 1
    assert c.counts["Tensor.tolist"] == 1 and c.counts["Tensor.to"] == 1 and c.total == 5
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        with SyncCounter(raise_on_sync=True):
            float(y)
    assert torch.Tensor.item is not None and x.tolist()  # patches undone


def test_weclip_training_step_makes_no_host_sync(synthetic_root):
    """forward_train + backward + the loop's per-step loss bookkeeping: zero synchronising operations
    (48 for this batch before issue 20: 7 per class map for the cv2 box masks, the key checks, GradCAM's class
    masks, the affinity labels' mask indexing, the loop's isfinite/float)."""
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config
    from stage1_cam.train import LossHistory

    cfg = load_config(TINY, {"data.root": str(synthetic_root), "head.rfm.start_step": 0})
    stack = build_stage1(cfg, torch.device("cpu"))
    x = torch.randn(4, 3, 64, 64)
    keys = [np.array([3]), np.array([5, 7]), np.array([1, 2, 9]), np.array([4])]
    stack.head.forward_train(TrainBatch(images=x, labels=keys), step=1)["loss"].backward()  # warm-up
    history = LossHistory()
    for step in (1, 2):
        with SyncCounter() as c:
            out = stack.head.forward_train(TrainBatch(images=x, labels=keys), step=step)
            out["loss"].backward()
            history.record(step, out["loss"], ["a"])
        assert c.total == 0, c.where
    history.flush()
    assert len(history) == 2 and all(np.isfinite(history.values))


def test_non_finite_loss_names_its_step_and_is_never_checkpointed(synthetic_root, tmp_path, monkeypatch):
    """The loss is read only at flushes (log line, validation, checkpoint, end): a NaN at step 4 is reported as
    step 4 at step 6's checkpoint, which is not written (log_interval 10: no log line in between)."""
    from stage1_cam.config import load_config
    from stage1_cam.heads.weclip import WeCLIPHead
    from stage1_cam.train import load_checkpoint, train
    from stage1_cam.utils.run_dir import RunDir

    real = WeCLIPHead.forward_train

    def poisoned(self, batch, step):
        out = real(self, batch, step)
        if step == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(WeCLIPHead, "forward_train", poisoned)
    opts = {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "data.crop_size": 64,
            "data.num_workers": 0, "train.batch_size": 2, "train.max_iters": 20, "train.ckpt_interval": 3,
            "train.log_interval": 10, "train.val_interval": 0, "head.rfm.start_step": 2}
    cfg = load_config(TINY, opts)
    run_dir = RunDir.from_config(cfg)
    run_dir.prepare(cfg, overwrite=False, seed=cfg.run.seed)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 4 \(images \["):
        train(cfg, run_dir)
    ckpts = sorted(p.name for p in run_dir.ckpt_dir.glob("*.pth"))
    assert ckpts == ["iter_000003.pth", "latest.pth"]  # step 6's checkpoint was refused
    for name in ckpts:
        head = load_checkpoint(run_dir.ckpt_dir / name)["head"]
        assert all(torch.isfinite(v).all() for v in head.values() if v.is_floating_point())


def test_excel_training_step_host_syncs(synthetic_root):
    """The ExCEL step (SVC maps, decoder, LVC pass, online labels) before and after its LVC step: zero synchronising
    operations (2 before: the CAM source copied each image's class ids to the device with a blocking copy)."""
    from tests.test_excel_head import _images, _stack

    head = _stack(synthetic_root, **{"head.lvc_start_step": 2}).head
    x, keys = _images(2), [np.array([3]), np.array([5, 7])]
    head.forward_train(TrainBatch(images=x, labels=keys), step=0)["loss"].backward()  # warm-up
    for step in (1, 2):
        with SyncCounter() as c:
            head.forward_train(TrainBatch(images=x, labels=keys), step=step)["loss"].backward()
        assert c.total == 0, (step, c.where)
