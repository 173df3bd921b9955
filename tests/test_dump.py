"""Pseudo-mask dumping (stage1_cam.dump): msc+flip fusion, label-constrained CRF, resume, manifest, --from-probs.

One tiny head is trained for 2 iterations (``stage1_cam.train.main``) and dumped once with CRF and stored
probabilities (module fixture); the other tests compare against that dump.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_cam import dump as dump_mod
from stage1_cam.config import CrfCfg, DumpCfg, load_config
from stage1_cam.data import build_dataset, normalize
from stage1_cam.dump import runner
from stage1_cam.io import ShardReader, shard_filename
from tests.numerics import dump_logit_terms, f16_probs_tolerance, f16_sum_to_one_atol, f32_tolerance, one_torch_thread
from tests.shard_data import interrupt_then_resume

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py")


# One intra-op thread: the tiny model is latency-bound, and the CRF worker needs the other core.
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _opts(root: Path, runs: Path, **extra: object) -> dict:
    opts = {"data.root": str(root), "run.root": str(runs), "dump.long_side": 64, "dump.num_shards": 2,
            "dump.batch_size": 3, "dump.save_probs": True, "dump.crf.workers": 1}
    opts.update(extra)
    return opts


def _argv(opts: dict) -> list:
    return ["--cfg-options"] + [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in opts.items()]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A 2-iteration head checkpoint in its run directory, and the run's options."""
    from stage1_cam.train import main as train_main

    runs = tmp_path_factory.mktemp("runs")
    opts = _opts(synthetic_root, runs)
    argv = [CONFIG] + _argv({**opts, "train.max_iters": 2, "train.batch_size": 2, "train.val_interval": 0,
                             "data.crop_size": 64})
    assert train_main(argv) == 0
    cfg = load_config(CONFIG, opts)
    ckpt = runs / "synthetic" / cfg.run.name / "stage1" / "checkpoints" / "final.pth"
    assert ckpt.is_file()
    return {"opts": opts, "ckpt": ckpt, "cfg": cfg, "shard_dir": runs / "synthetic" / cfg.run.name / "pseudo_masks"}


@pytest.fixture(scope="module")
def dumped(trained):
    """All shards of the synthetic train_aug split, CRF on, probabilities stored (default output dir)."""
    assert dump_mod.main([CONFIG, "--shard", "all", "--no-progress"] + _argv(trained["opts"])) == 0
    return trained["shard_dir"]


def _contents(shard_dir: Path) -> dict:
    with ShardReader(shard_dir, allow_incomplete=True) as r:
        return {n: r.read(n) for n in r.ids}


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        np.testing.assert_array_equal(a[n]["label"], b[n]["label"], err_msg=n)
        np.testing.assert_array_equal(a[n]["confidence"], b[n]["confidence"], err_msg=n)
        np.testing.assert_array_equal(a[n]["image_labels"], b[n]["image_labels"], err_msg=n)
        if a[n]["probs"] is not None or b[n]["probs"] is not None:
            np.testing.assert_array_equal(a[n]["probs"][0], b[n]["probs"][0], err_msg=n)
            np.testing.assert_array_equal(a[n]["probs"][1], b[n]["probs"][1], err_msg=n)


# ----------------------------------------------------------------------------------------------- unit level
def test_network_size_snaps_to_patch():
    assert dump_mod.network_size(375, 500, long_side=512, patch=16) == (384, 512)  # the reference's VOC size
    assert dump_mod.network_size(500, 333, long_side=512, patch=16) == (512, 336)  # 340.99 -> 336
    assert dump_mod.scaled_size((384, 512), 0.75, 16) == (288, 384)
    assert dump_mod.scaled_size((48, 64), 0.75, 16) == (32, 48)
    assert dump_mod.network_size(10, 10, long_side=8, patch=16) == (16, 16)  # never below one patch


def test_plan_batches_groups_equal_sizes_deterministically():
    rng = np.random.default_rng(0)
    keys = [tuple(int(v) for v in rng.integers(0, 3, size=2)) for _ in range(60)]
    items = [(k, i) for i, k in enumerate(keys)]
    batches = list(dump_mod.plan_batches(items, batch_size=4, max_pending=8))
    assert sorted(i for b in batches for i in b) == list(range(60))
    assert all(1 <= len(b) <= 4 and len({keys[i] for i in b}) == 1 for b in batches)
    assert batches == list(dump_mod.plan_batches(iter(items), batch_size=4, max_pending=8))
    with pytest.raises(ValueError):
        list(dump_mod.plan_batches(items, batch_size=4, max_pending=2))


def trained_stack(trained):
    """The stage-1 stack with the trained head, built as training built it (seeded with run.seed), in eval mode."""
    import random

    from stage1_cam.build import build_stage1

    cfg = trained["cfg"]
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # as stage1_cam.train seeds before building
    stack = build_stage1(cfg, torch.device("cpu"))
    stack.head.load_trainable_state(torch.load(trained["ckpt"], weights_only=True)["head"])
    stack.head.eval()
    return stack


def _assert_probs_match_fused_logits(out: np.ndarray, fused: torch.Tensor, keys: np.ndarray, size: tuple, stack,
                                     cfg) -> None:
    """The dump's float16 probabilities ``out`` against a per-image reference: the fused ``(C, 3, 4)`` logits, the
    allowed ``keys``, upsampled to the image ``size`` and soft-maxed. Bound: the network's roundings in another order
    (13 tokens at the largest scale), the fusion (flip 2, grid upsampling 4, scale mean 3, final upsampling 4) and
    the softmax (K + 2), at the logits' scale; then the float16 storage."""
    logits = fused[torch.as_tensor(keys)]
    ref = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0].softmax(0)
    assert out.dtype == np.float16 and out.shape == (len(keys),) + tuple(size)
    terms = dump_logit_terms(backbone_blocks=stack.head.num_inputs, width=stack.backbone.width, tokens=13,
                             decoder_layers=cfg.head.decoder_layers, embed_dim=cfg.head.embed_dim,
                             fusion=2 + 4 + 3 + 4) + len(keys) + 2
    tol = f16_probs_tolerance(ref, f32_tolerance(terms, logits.abs().max()))
    err = (torch.from_numpy(out.astype(np.float64)) - ref.double()).abs()
    assert bool((err <= tol).all()), f"{float((err - tol).max()):.3g} over the bound"


def test_msc_flip_matches_per_image_reference(trained):
    """Batched multi-scale + flip inference equals a plain per-image loop (reference_spec 2.2) on the network
    training used (the tiny CLIP is random: the dump must rebuild it from the run's seed)."""
    cfg = trained["cfg"]
    stack = trained_stack(trained)
    torch.manual_seed(123)  # the dump's build must not depend on the global RNG state
    predictor = dump_mod.build_predictor(cfg, trained["ckpt"], torch.device("cpu"))
    assert (predictor.patch_size, predictor.num_classes) == (16, 21)
    settings = DumpCfg(long_side=64, scales=(1.0, 0.75, 0.5), flip=True, crf=CrfCfg(enabled=False))
    ds = build_dataset("synthetic", cfg.data.root, "train_aug")
    full = ds.load_image(ds.names[0])
    images = [full, full[:-3, :-5].copy(), ds.load_image(ds.names[1])]  # different originals, one network size
    keys = [dump_mod.allowed_classes(ds.image_labels(n), 21, label_constrained=True) for n in ds.names[:2]]
    keys = [keys[0], np.arange(21), keys[1]]  # constrained and unconstrained in one batch
    got = dump_mod.predict_probs(predictor, images, keys, settings=settings)

    for im, k, out in zip(images, keys, got):
        x = torch.from_numpy(normalize(im, stack.mean, stack.std)).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(48, 64), mode="bilinear", align_corners=False)
        fused = []
        for size in [(48, 64), (32, 48), (32, 32)]:  # scales 1, 0.75, 0.5 snapped to the 16-pixel patch
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            a = stack.head.predict_logits(xs)
            b = stack.head.predict_logits(xs.flip(-1)).flip(-1)
            fused.append(F.interpolate((a + b) / 2, size=(3, 4), mode="bilinear", align_corners=False))
        _assert_probs_match_fused_logits(out, torch.stack(fused).mean(0)[0], k, im.shape[:2], stack, cfg)
        # The stored probabilities sum to 1 up to the float32 softmax's roundings (K + 2) and their float16 storage.
        atol = f16_sum_to_one_atol(len(k), len(k) + 2)
        np.testing.assert_allclose(out.astype(np.float64).sum(0), 1.0, rtol=0, atol=atol)


def test_msc_flip_fuses_a_finer_head_on_its_own_grid():
    """A head that predicts at stride 4 (WeakCLIP's FPN head, reference_spec 5.2) keeps its grid through the fusion:
    each scale's flip-fused logits are resized to the scale-1 output's grid (here 4 x the patch grid), not to the
    patch grid; at scale 1 without flip the fusion is the head's own output."""
    proj = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))

    def predict(x: torch.Tensor) -> torch.Tensor:  # (N, 3, h, w) -> (N, 5, h / 4, w / 4)
        return torch.einsum("kc,nchw->nkhw", proj, F.avg_pool2d(x, 4))

    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dump_mod.msc_flip_logits(predict, x, scales=(1.0,), flip=False, patch_size=16), predict(x))
    got = dump_mod.msc_flip_logits(predict, x, scales=(1.0, 0.5), flip=True, patch_size=16)
    assert got.shape == (2, 5, 16, 24)
    ref = []
    for xs in (x, F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False)):
        pair = (predict(xs) + predict(xs.flip(-1)).flip(-1)) / 2
        ref.append(F.interpolate(pair, size=(16, 24), mode="bilinear", align_corners=False))
    ref = torch.stack(ref).mean(0)
    # the same operations batched and per image: the pooling (16) and projection (3) roundings, flip mean (2),
    # resizing (4) and scale mean (2), at the logits' scale
    assert bool(((got - ref).abs() <= f32_tolerance(16 + 3 + 2 + 4 + 2, ref.abs().max())).all())


def test_parity_sizes_follow_the_reference(trained):
    """``dump.parity_sizes``: the reference's input sizes (``int(H r)``, ``scale_factor`` resizes, the remainder rows
    and columns dropped by the patch embedding), per image as reference_spec 2.2 writes it: resize the logits of each
    scale to the scale-1 grid, then average the flip pair."""
    assert dump_mod.network_size(96, 119, long_side=64, patch=16, exact=True) == (51, 64)
    assert dump_mod.network_size(96, 119, long_side=64, patch=16) == (48, 64)  # the default snaps
    assert dump_mod.scaled_size((51, 64), 0.75, 16, exact=True) == (38, 48)
    assert dump_mod.scaled_size((51, 64), 0.5, 16, exact=True) == (25, 32)
    cfg = trained["cfg"]
    stack = trained_stack(trained)
    predictor = dump_mod.build_predictor(cfg, trained["ckpt"], torch.device("cpu"))
    settings = DumpCfg(long_side=64, scales=(1.0, 0.75, 0.5), flip=True, parity_sizes=True, crf=CrfCfg(enabled=False))
    assert settings.record()["parity_sizes"] is True and "parity_sizes" not in DumpCfg().record()
    ds = build_dataset("synthetic", cfg.data.root, "train_aug")
    im = ds.load_image(ds.names[0])[:, :-9].copy()  # 96 x 119: 51.6 x 64 at the long side 64
    keys = dump_mod.allowed_classes(ds.image_labels(ds.names[0]), 21, label_constrained=True)
    out = dump_mod.predict_probs(predictor, [im], [keys], settings=settings)[0]

    x = torch.from_numpy(normalize(im, stack.mean, stack.std)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(51, 64), mode="bilinear", align_corners=False)
    fused = []
    for s in (1.0, 0.75, 0.5):
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        pair = [stack.head.predict_logits(xs), stack.head.predict_logits(xs.flip(-1))]
        pair = [F.interpolate(a, size=(3, 4), mode="bilinear", align_corners=False) for a in pair]
        fused.append((pair[0] + pair[1].flip(-1)) / 2)
    _assert_probs_match_fused_logits(out, torch.stack(fused).mean(0)[0], keys, im.shape[:2], stack, cfg)
    snapped = dump_mod.predict_probs(predictor, [im], [keys], settings=DumpCfg(
        long_side=64, scales=(1.0, 0.75, 0.5), flip=True, crf=CrfCfg(enabled=False)))[0]
    assert np.abs(snapped.astype(np.float32) - out.astype(np.float32)).max() > 1e-3  # the switch changes the sizes


def test_label_constrained_crf_only_emits_allowed_labels():
    """Probabilities that favour absent classes still decode to background + present classes only."""
    rng = np.random.default_rng(0)
    h, w = 40, 48
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    logits = torch.from_numpy(rng.normal(size=(21, 5, 6)).astype(np.float32))
    logits[[4, 9, 17]] += 5.0  # absent classes dominate
    keys = dump_mod.allowed_classes([3, 12], 21, label_constrained=True)
    assert keys.tolist() == [0, 3, 12]
    probs = dump_mod.logits_to_probs(logits, (h, w), torch.as_tensor(keys)).to(torch.float16).numpy()
    settings = DumpCfg(crf=CrfCfg(iterations=5, pos_xy_std=3, pos_w=3, bi_xy_std=64, bi_rgb_std=5, bi_w=4),
                       ignore_threshold=0.6)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        post = dump_mod.OrderedPostprocessor(settings=settings, executor=pool, max_in_flight=2)
        jobs = [j for i in range(3) for j in post.submit(f"im{i}", image=image, probs=probs, keys=keys,
                                                         image_labels=np.array([3, 12]))]
        jobs += post.drain()
    assert [j.name for j in jobs] == ["im0", "im1", "im2"]  # submission order
    label, conf = jobs[0].result
    assert set(np.unique(label).tolist()) <= {0, 3, 12, 255}
    assert len(set(np.unique(label).tolist()) - {255}) >= 2  # the CRF did not collapse everything
    assert np.all((label == 255) == (conf < 0.6))
    # The unconstrained argmax would have used the absent classes.
    full = dump_mod.logits_to_probs(logits, (h, w), torch.arange(21)).numpy()
    assert set(np.unique(full.argmax(0)).tolist()) & {4, 9, 17}


# ------------------------------------------------------------------------------------------------ end to end
def test_dump_writes_constrained_masks_and_manifest(dumped, trained):
    manifest = json.loads((dumped / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 16 and manifest["num_shards"] == 2
    assert manifest["extra"]["crf"]["iterations"] == 10 and manifest["extra"]["label_constrained"]
    ds = build_dataset("synthetic", trained["cfg"].data.root, "train_aug")
    for name, item in _contents(dumped).items():
        allowed = {0} | set(ds.image_labels(name).tolist())
        assert set(np.unique(item["label"]).tolist()) <= allowed, name
        assert item["label"].shape == ds.load_image(name).shape[:2]
        probs, keys = item["probs"]
        assert keys.tolist() == sorted(allowed) and probs.dtype == np.float16
        assert 0.0 < item["confidence"].min() and item["confidence"].max() <= 1.0


def test_interrupted_shard_resumes_to_identical_content(trained, dumped, tmp_path, monkeypatch):
    out = tmp_path / "masks"
    argv = [CONFIG, "--shard", "0", "--out", str(out), "--no-progress"] + _argv(trained["opts"])
    # Killed at the 5th image, mid-way through the second batch of 3; the rerun resumes the partial shard.
    interrupt_then_resume(dump_mod.main, argv, out, monkeypatch, after=4, shard=shard_filename(0, 2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["missing_shards"] == [1] and not manifest["complete"]
    reference = {k: v for k, v in _contents(dumped).items() if k in manifest["shards"][0]["ids"]}
    _assert_same(_contents(out), reference)


def test_finished_shard_is_not_rewritten(trained, dumped, monkeypatch):
    path = dumped / shard_filename(0, 2)
    before = (path.stat().st_mtime_ns, path.stat().st_ino)
    monkeypatch.setattr(runner, "build_predictor", lambda *a, **k: pytest.fail("model built for a done shard"))
    assert dump_mod.main([CONFIG, "--shard", "0", "--no-progress"] + _argv(trained["opts"])) == 0
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    # Other settings never overwrite or mix with it: a clear error (exit 2).
    opts = {**trained["opts"], "dump.ignore_threshold": 0.5}
    assert dump_mod.main([CONFIG, "--shard", "0", "--no-progress"] + _argv(opts)) == 2
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_from_probs_reproduces_crf_output(trained, dumped, tmp_path):
    out = tmp_path / "redo"
    argv = [CONFIG, "--from-probs", str(dumped), "--out", str(out), "--no-progress"]
    assert dump_mod.main(argv + _argv(trained["opts"])) == 0
    _assert_same(_contents(out), _contents(dumped))
    # Same probabilities, CRF off, a threshold: argmax decoding of the stored values.
    out2 = tmp_path / "nocrf"
    opts = {**trained["opts"], "dump.crf.enabled": False, "dump.ignore_threshold": 0.7, "dump.save_probs": False}
    assert dump_mod.main([CONFIG, "--from-probs", str(dumped), "--out", str(out2), "--no-progress"]
                         + _argv(opts)) == 0
    src, new = _contents(dumped), _contents(out2)
    for name, item in new.items():
        probs, keys = src[name]["probs"]
        probs = probs.astype(np.float32)
        expect = keys[probs.argmax(0)]
        expect[probs.max(0) < 0.7] = 255
        np.testing.assert_array_equal(item["label"], expect)
        assert item["probs"] is None


def test_evaluate_writes_metrics(trained, dumped):
    assert dump_mod.main([CONFIG, "--evaluate"] + _argv(trained["opts"])) == 0
    metrics = json.loads((dumped / "metrics.json").read_text())
    assert metrics["images"] == 16 and metrics["complete"]
    assert metrics["miou"] == metrics["final"]["miou"] and 0.0 <= metrics["miou"] <= 1.0
    assert metrics["final"]["ignore_coverage"] == 0.0 and metrics["final"]["num_pixels"] > 0
    assert 0.0 <= metrics["no_crf"]["miou"] <= 1.0  # probabilities were stored: the no-CRF masks are scored too
    summary = json.loads((dumped / "dump_summary.json").read_text())
    assert summary["images"] == 16 and set(summary["shards"]) == {"0", "1"} and summary["images_per_s"] > 0


def test_missing_inputs_exit_2(trained, tmp_path):
    assert dump_mod.main([CONFIG, "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")]
                         + _argv(trained["opts"])) == 2
    opts = {**trained["opts"], "data.root": str(tmp_path / "no_data")}
    assert dump_mod.main([CONFIG, "--checkpoint", str(trained["ckpt"]), "--out", str(tmp_path / "o")]
                         + _argv(opts)) == 2
    assert dump_mod.main([CONFIG, "--shard", "7", "--checkpoint", str(trained["ckpt"]), "--out",
                          str(tmp_path / "o")] + _argv(trained["opts"])) == 2
