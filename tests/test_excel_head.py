"""ExCEL head (stage1_cam/heads/excel.py): parameter count, LVC and SVC attention, batch independence, the
affinity-label switch, validation figures, exact resume and train -> dump -> evaluate on the tiny random CLIP."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stage1_cam.cams.excel import ExcelSVC, lvc_attention, svc_attention
from stage1_cam.config import ConfigError, load_config
from stage1_cam.heads import TrainBatch
from stage1_cam.heads.decoder import WeCLIPDecoder
from stage1_cam.heads.excel import ExcelHead
from stage1_cam.losses import affinity_label, affinity_loss
from stage1_cam.models.clip_backbone import FrozenClipBackbone, qkv_heads
from stage1_cam.models.text import build_dataset_text_embeddings, get_tokenizer
from stage1_cam.refine.affinity import centered_cosine, excel_decoder_affinity
from stage1_cam.train import load_checkpoint, main as train_main
from tests.numerics import assert_close_f32

CONFIG = "configs/stage1/excel_world-clip_synthetic-160x160_300i.py"
# The world config on the in-repo tiny random CLIP: no trained weights needed.
TINY = {"clip.model_name": "wsss-tiny-ViT-16", "clip.weights": None, "clip.pretrained": None}


def _cfg(synthetic_root, **extra):
    return load_config(CONFIG, {**TINY, "data.root": str(synthetic_root), **extra})


def _stack(synthetic_root, **extra):
    from stage1_cam.build import build_stage1

    torch.manual_seed(0)
    return build_stage1(_cfg(synthetic_root, **extra), torch.device("cpu"))


def _images(b, h=64, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ decoder and config
def test_parameter_count_vit_b16_voc():
    """ExCEL's decoder fuses all 12 block outputs (SegFormerHead(index=12)): ~6.31 M trainable parameters."""
    head = ExcelHead(backbone=SimpleNamespace(num_blocks=12, width=768), cam_source=None, num_classes=21)
    n = sum(p.numel() for p in head.parameters() if p.requires_grad)
    assert n == sum(p.numel() for p in head.decoder.parameters()) == 6_313_237
    assert abs(n - 6.31e6) / 6.31e6 < 0.01
    # WeCLIP's 11-input decoder plus one more fusion MLP (768*256+256 + 256*256+256) and its 256 fusion-conv columns.
    weclip = WeCLIPDecoder.expected_num_params(in_dim=768, num_inputs=11, embed_dim=256, num_classes=21,
                                               decoder_layers=3)
    assert n - weclip == 768 * 256 + 256 + 256 * 256 + 256 + 256 * 256
    assert n == WeCLIPDecoder.expected_num_params(in_dim=768, num_inputs=12, embed_dim=256, num_classes=21,
                                                  decoder_layers=3)


def test_configs_load_and_refuse_another_cam_source(synthetic_root, tmp_path):
    voc = load_config("configs/stage1/excel_vit-b16_voc12aug-320x320_30k.py")
    assert voc.head.type == "excel" and voc.cam.source == "excel_svc" and voc.cam.box_threshold == 0.79
    assert voc.clip.precision == "fp32" and voc.cam.num_attributes == 112 and voc.train.lr == 1e-3
    assert (voc.head.lvc_start_step, voc.head.aff_label_switch_step) == (14000, 24000)
    assert ExcelHead.attention_layers(voc) == 6
    coco = load_config("configs/stage1/excel_vit-b16_coco14-320x320_100k.py")
    assert (coco.cam.box_threshold, coco.cam.num_attributes, coco.train.warmup_iters) == (0.88, 224, 200)
    assert (coco.head.lvc_start_step, coco.head.aff_label_switch_step, coco.train.max_iters) == (30000, None, 100000)
    world = load_config(CONFIG)
    assert world.clip.weights == "world:default"
    assert world.head.lvc_start_step < world.head.aff_label_switch_step < world.train.max_iters
    with pytest.raises(ConfigError, match=r"cam.source='clip_es_gradcam' does not work with head.type='excel'"):
        load_config(CONFIG, {"cam.source": "clip_es_gradcam"})
    with pytest.raises(ConfigError, match=r"head.val_box_threshold=1.5 is out of range"):
        load_config(CONFIG, {"head.val_box_threshold": 1.5})
    with pytest.raises(ConfigError, match=r"head.rfm_score='nope'"):
        load_config(CONFIG, {"head.rfm_score": "nope"})
    # ... before anything is made: training exits with 2 and no run directory.
    runs = tmp_path / "runs"
    assert train_main([CONFIG, "--cfg-options", f"run.root={runs}", "cam.source=clip_es_gradcam"]) == 2
    assert not runs.exists()
    # from_config refuses it too (a config that bypassed validation)
    cfg = _cfg(synthetic_root)
    cfg.cam.source = "clip_es_gradcam"
    with pytest.raises(ConfigError, match="cam.source"):
        ExcelHead.from_config(cfg, backbone=SimpleNamespace(num_blocks=12, width=64), cam_source=None, num_classes=21)


# ------------------------------------------------------------------------------------------ LVC and SVC attention
def test_lvc_attention_rows_mask_and_diagonal():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 3, 4, generator=g)
    feats[1, :, 0, 0] = 0.0  # a zero feature vector: cosine 0 with everything, below the (positive) mean
    a = lvc_attention(feats)
    assert a.shape == (2, 12, 12) and torch.isfinite(a).all()
    # Every row sums to 1. Terms: the softmax's 12-term denominator and division, the 12-term row sum; scale 1.
    assert_close_f32(a.sum(-1), torch.ones(2, 12), terms=2 * 12 + 1, scale=1.0)
    s = centered_cosine(feats)
    off = ~torch.eye(12, dtype=torch.bool)
    assert bool((a[(s < 0) & off] == 0).all()) and bool((a[s >= 0] > 0).all())  # below-mean pairs masked
    # The zero vector's row: all its similarities are below the mean, only the diagonal is kept.
    assert float(s[1, 0].max()) < 0
    assert torch.equal(a[1, 0], torch.nn.functional.one_hot(torch.tensor(0), 12).float())
    # Otherwise the diagonal is kept anyway: a cosine of 1 is never below the mean.
    assert bool((s[0].diagonal() >= 0).all())


def test_centered_cosine_per_image_and_batch_global():
    g = torch.Generator().manual_seed(1)
    x0, xa, xb = (torch.randn(1, 8, 3, 3, generator=g) for _ in range(3))
    xb = xb.abs() + 1.0  # all-positive features: mean cosine near 1, far from a random partner's
    per_a, per_b = centered_cosine(torch.cat([x0, xa])), centered_cosine(torch.cat([x0, xb]))
    assert torch.equal(per_a[0], per_b[0])  # per image: image 0 does not see its partner
    glob_a = centered_cosine(torch.cat([x0, xa]), batch_global=True)
    glob_b = centered_cosine(torch.cat([x0, xb]), batch_global=True)
    assert (glob_a[0] - glob_b[0]).abs().min() > 0.1  # one batch mean: image 0 shifts with its partner
    for got, feats in ((per_a, torch.cat([x0, xa])), (glob_a, torch.cat([x0, xa]))):
        f = torch.nn.functional.normalize(feats.flatten(2), dim=1)
        cos = f.transpose(1, 2) @ f
        mean = cos.mean() if got is glob_a else cos.mean(dim=(1, 2), keepdim=True)
        assert torch.equal(got, cos - mean)  # the same operations as centered_cosine: exact
    aff = excel_decoder_affinity(torch.cat([x0, xa]))
    assert torch.equal(aff, torch.sigmoid(3 * per_a))  # the same operations: exact


@pytest.fixture(scope="module")
def svc_setup(tiny_clip):
    bb = FrozenClipBackbone(tiny_clip)
    fg, bg = build_dataset_text_embeddings(tiny_clip, get_tokenizer("wsss-tiny-ViT-16"), "voc")
    return bb, fg, bg


def test_svc_and_lvc_attention_rows_sum_as_documented(svc_setup):
    bb = svc_setup[0]
    x = _images(2, 48, 64)
    with torch.no_grad():
        tokens = bb(x, num_blocks=8).tokens[-1]
        q, k, v = qkv_heads(bb.blocks[8], bb.blocks[8].ln_1(tokens))
    heads, n = q.shape[1], q.shape[2]
    ex = lvc_attention(torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(3)))
    mean, summed = svc_attention(q, k, v, head_sum=False), svc_attention(q, k, v, head_sum=True)
    assert mean.shape == summed.shape == (2, 1, n, n)
    # Row sums (the logits' roundings cancel in a softmax row's sum). Terms: each softmax's n-term denominator and
    # division, the sum of the three and / 3, the H-term head sum (and / H), the n-term row sum; the LVC rows add
    # the (n - 1)-term denominator and division of ex's softmax, its weight and the addition. Scale: the row's sum
    # (non-negative terms: every partial sum is below it).
    rows = (n + 1) + 3 + (heads + 1) + n
    lvc_rows = rows + n + 2
    assert_close_f32(mean.sum(-1), torch.ones(2, 1, n), terms=rows, scale=1.0)  # head-averaged: rows sum to 1
    # reference: rows sum to H
    assert_close_f32(summed.sum(-1), torch.full((2, 1, n), float(heads)), terms=rows, scale=heads)
    # The same maps summed over heads vs averaged (sum / H) times H: the division and multiplication (and the H-term
    # sum, in case the two reductions order it differently); element-wise scale: the summed value.
    assert_close_f32(summed, heads * mean, terms=heads + 2, scale=summed)
    lvc_mean = svc_attention(q, k, v, head_sum=False, ex_attn=ex)
    lvc_sum = svc_attention(q, k, v, head_sum=True, ex_attn=ex)
    rows_mean, rows_sum = lvc_mean.sum(-1)[:, 0], lvc_sum.sum(-1)[:, 0]
    assert_close_f32(rows_mean[:, 0], torch.ones(2), terms=rows, scale=1.0)  # the CLS row is unchanged
    # ex is added to every head's patch block before the heads are combined (reference_spec 4.7): patch rows + 1 in
    # the head mean, + H in the reference's head sum.
    assert_close_f32(rows_mean[:, 1:], torch.full((2, n - 1), 2.0), terms=lvc_rows, scale=2.0)
    assert_close_f32(rows_sum[:, 0], torch.full((2,), float(heads)), terms=rows, scale=heads)
    assert_close_f32(rows_sum[:, 1:], torch.full((2, n - 1), 2.0 * heads), terms=lvc_rows, scale=2 * heads)
    # Averaged = the reference's / H, with LVC too: as above, plus the product H ex and the two additions.
    assert_close_f32(lvc_sum, heads * lvc_mean, terms=heads + 2 + 3, scale=lvc_sum)
    # Added to the patch block: (summed + H ex) - summed, two roundings at the scale of the sum (it cancels), and
    # the product H ex at its own scale.
    assert_close_f32(lvc_sum[:, :, 1:, 1:] - summed[:, :, 1:, 1:], heads * ex[:, None], terms=3,
                     scale=lvc_sum[:, :, 1:, 1:])
    assert_close_f32(lvc_mean[:, :, 1:, 1:] - mean[:, :, 1:, 1:], ex[:, None], terms=3, scale=lvc_mean[:, :, 1:, 1:])
    with pytest.raises(ValueError, match="patch tokens"):
        svc_attention(q, k, v, head_sum=False, ex_attn=ex[:, 1:, 1:])


def test_excel_svc_lvc_pass(svc_setup):
    bb, fg, bg = svc_setup
    src = ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg)
    x = _images(2, 48, 64, seed=5)
    labels = [[3, 9], [15]]
    ex = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(6))
    plain = src(x, labels, attn_layers=6)
    full = src(x, labels, attn_layers=6, ex_feats=ex)
    reused = src(x, labels, ex_feats=ex, reuse=plain)
    # Reusing the plain pass's original path computes the same calibrated maps (the same operations).
    for a, b in zip(full.cams, reused.cams):
        assert torch.equal(a, b)
    assert reused.attn is plain.attn and reused.features is plain.features  # the first pass's attention
    assert torch.equal(full.attn, plain.attn)  # LVC changes only the calibrated path (the same operations)
    assert max((a - b).abs().max().item() for a, b in zip(full.cams, plain.cams)) > 1e-3  # ... and so the maps
    # Without ex_feats, reuse gives the plain maps.
    for a, b in zip(src(x, labels, reuse=plain).cams, plain.cams):
        assert torch.equal(a, b)
    # The LVC step's first pass: the original path only (no plain maps), its SVC q, k, v kept for the LVC pass,
    # which then gives the same maps (q, k, v are the same products of the same inputs).
    orig = src(x, labels, attn_layers=6, maps=False)
    assert orig.cams == [] and len(orig.cache["svc_qkv"]) == src.svc_blocks and "svc_qkv" not in plain.cache
    assert torch.equal(orig.attn, plain.attn)
    assert all(torch.equal(a, b) for a, b in zip(orig.features.tokens, plain.features.tokens))
    for a, b in zip(src(x, labels, ex_feats=ex, reuse=orig).cams, full.cams):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="maps=False"):
        src(x, labels, reuse=orig, maps=False)
    with pytest.raises(ValueError, match="ex_feats"):
        src(x, labels, ex_feats=ex[:1])
    with pytest.raises(ValueError, match="patch tokens"):
        src(x, labels, ex_feats=ex[:, :, :2])


def test_excel_svc_lvc_per_image_is_batch_independent_and_parity_is_not(svc_setup):
    bb, fg, bg = svc_setup
    src = ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg)
    g = torch.Generator().manual_seed(7)
    x0, xa, xb = _images(1, seed=8), _images(1, seed=9), _images(1, seed=10)
    e0, ea = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    eb = torch.randn(1, 16, 4, 4, generator=g).abs() + 1  # another mean cosine than e0 and ea
    labels = [[4, 7], [12]]
    out = {}
    for glob in (False, True):
        for name, (xp, ep) in {"a": (xa, ea), "b": (xb, eb)}.items():
            out[glob, name] = src(torch.cat([x0, xp]), labels, ex_feats=torch.cat([e0, ep]),
                                  ex_batch_global=glob).cams[0]
    # Per image: image 0's maps are the same whatever else is in the batch (same shapes: the same operations).
    assert torch.equal(out[False, "a"], out[False, "b"])
    # Batch-global mean (the reference): they change with the partner.
    assert (out[True, "a"] - out[True, "b"]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ the head
def test_gradients_reach_only_the_decoder_and_lvc_runs_from_its_step(synthetic_root):
    stack = _stack(synthetic_root, **{"head.lvc_start_step": 3})
    head = stack.head
    assert head.num_inputs == stack.backbone.num_blocks == 12  # all block outputs feed the decoder
    assert set(head.state_dict()) == {f"decoder.{k}" for k in head.decoder.state_dict()}
    calls = []
    real = stack.cam_source

    def spy(images, labels, **kw):
        calls.append({k: (v is not None if k in ("ex_feats", "reuse") else v) for k, v in kw.items()})
        return real(images, labels, **kw)

    object.__setattr__(head, "cam_source", spy)
    x, keys = _images(2), [np.array([3]), np.array([5, 7])]
    for step in (2, 3):
        calls.clear()
        out = head.forward_train(TrainBatch(images=x, labels=keys), step=step)
        out["loss"].backward()
        assert all(p.grad is None for p in stack.clip_model.parameters())
        assert all(p.grad is not None for p in head.parameters())
        label = out["pseudo_label"]
        assert label.shape == (2, 64, 64) and label.dtype == torch.int64
        assert set(label[0].unique().tolist()) <= {0, 3} and set(label[1].unique().tolist()) <= {0, 5, 7}
        plain = {"attn_layers": 6, "maps": True, "keep_qkv": False}
        original_path = {"attn_layers": 6, "maps": False, "keep_qkv": True}  # plain maps unused with LVC
        lvc = {"ex_feats": True, "ex_batch_global": False, "reuse": True}
        assert calls == ([plain] if step < 3 else [original_path, lvc]), (step, calls)
        head.zero_grad()


def test_head_lvc_per_image_is_batch_independent_and_parity_is_not(synthetic_root):
    x0, xa, xb = _images(1, seed=11), _images(1, seed=12), _images(1, seed=13) * 3 + 1
    labels = [np.array([2, 6]), np.array([9])]
    res = {}
    for glob in (False, True):
        head = _stack(synthetic_root, **{"head.batch_global_mean": glob}).head.eval()  # eval: no dropout
        for name, xp in (("a", xa), ("b", xb)):
            with torch.no_grad():
                r = head.online_labels(torch.cat([x0, xp]), labels, lvc=True)
            res[glob, name] = (r["cams"][0], r["aff"][0], r["pseudo"][0])
    for i in range(3):  # calibrated maps, decoder affinity, labels of image 0
        assert torch.equal(res[False, "a"][i], res[False, "b"][i]), i
    for i in range(2):
        assert (res[True, "a"][i] - res[True, "b"][i]).abs().max() > 1e-4, i


def test_affinity_labels_switch_to_the_decoder_at_the_configured_step(synthetic_root):
    head = _stack(synthetic_root, **{"head.lvc_start_step": 1, "head.aff_label_switch_step": 4}).head.eval()
    x, keys = _images(2, seed=14), [np.array([1, 4]), np.array([8])]
    with torch.no_grad():
        res = head.online_labels(x, keys, lvc=True)
        up = torch.nn.functional.interpolate(res["logits"].float(), size=(64, 64), mode="bilinear",
                                             align_corners=False)
    grid = res["cam"].grid
    from_pseudo = affinity_loss(res["aff"], affinity_label(res["pseudo"], grid, head.aff_radius, ignore_diagonal=True))
    from_decoder = affinity_loss(res["aff"], affinity_label(up.argmax(1), grid, head.aff_radius,
                                                            ignore_diagonal=True))
    assert abs(float(from_pseudo) - float(from_decoder)) > 1e-4  # the two sources give other targets here
    for step, want, source in ((2, from_pseudo, 0), (3, from_pseudo, 0), (4, from_decoder, 1), (9, from_decoder, 1)):
        with torch.no_grad():
            out = head.forward_train(TrainBatch(images=x, labels=keys), step=step)
        assert int(out["aff_label_source"]) == source, step
        assert_close_f32(out["loss_aff"], want, terms=2 * res["aff"].numel(), scale=1.0)  # two sums of terms <= 1
    head.aff_label_switch_step = None  # COCO: never
    assert int(head.forward_train(TrainBatch(images=x, labels=keys), step=10 ** 6)["aff_label_source"]) == 0


def test_affinity_label_diagonal_switch():
    label = torch.zeros(1, 32, 32, dtype=torch.long)
    label[:, :, 16:] = 3
    doc = affinity_label(label, (2, 2), radius=1, ignore_diagonal=True)
    ref = affinity_label(label, (2, 2), radius=1)  # WeCLIP's and ExCEL's code in effect: self pairs kept
    assert torch.equal(doc[0].diagonal(), torch.full((4,), 255, dtype=torch.uint8))
    assert torch.equal(ref[0].diagonal(), torch.ones(4, dtype=torch.uint8))
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(doc[0][off], ref[0][off])


def test_validation_figures_with_and_without_lvc_on_the_same_decoder(synthetic_root):
    from stage1_cam.train import validate

    stack = _stack(synthetic_root, **{"head.val_box_threshold": 0.75})
    cfg = _cfg(synthetic_root)
    both = validate(stack, cfg, torch.device("cpu"), max_images=3)
    assert set(both["figures"]) == {"pseudo", "pseudo_no_lvc", "decoder"}
    assert stack.head.training
    stack.head.lvc_start_step = None  # LVC never: the online labels are the plain ones
    plain = validate(stack, cfg, torch.device("cpu"), max_images=3)
    assert set(plain["figures"]) == {"pseudo", "decoder"}
    assert plain["pseudo_miou"] == both["pseudo_no_lvc_miou"] and plain["decoder_miou"] == both["decoder_miou"]


# ------------------------------------------------------------------------------------------ entry points
def _opts(synthetic_root, tmp_path, **extra):
    opts = {**TINY, "data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "data.crop_size": 64,
            "data.num_workers": 0, "train.batch_size": 2, "train.log_interval": 1, "train.val_interval": 0,
            "head.lvc_start_step": 1, "head.aff_label_switch_step": 3}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def test_resume_continues_exactly(synthetic_root, tmp_path, monkeypatch):
    """4 steps in one go vs 2 + resume 2, with LVC (step 1) and the decoder's affinity labels (step 3) in both."""
    common = _opts(synthetic_root, tmp_path, **{"train.max_iters": 4, "train.ckpt_interval": 2})
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert train_main([CONFIG, "--run", "full", "--cfg-options", *common]) == 0
    # the references' seeding: deterministic cuDNN without autotuning (what a GPU's exact resume needs)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    ckpts = tmp_path / "runs" / "synthetic" / "full" / "stage1" / "checkpoints"
    full = load_checkpoint(ckpts / "final.pth")
    assert full["head_type"] == "excel"
    assert train_main([CONFIG, "--run", "resumed", "--resume", str(ckpts / "iter_000002.pth"),
                       "--cfg-options", *common]) == 0
    resumed = load_checkpoint(tmp_path / "runs" / "synthetic" / "resumed" / "stage1" / "checkpoints" / "final.pth")
    assert resumed["step"] == 4
    assert set(full["head"]) == set(resumed["head"])
    for k, v in full["head"].items():
        assert torch.equal(v, resumed["head"][k]), k


def test_train_dump_evaluate_through_the_entry_points(synthetic_root, tmp_path):
    from stage1_cam import dump
    from stage1_cam.io import ShardReader

    opts = _opts(synthetic_root, tmp_path, **{"train.max_iters": 4, "train.ckpt_interval": 4, "train.val_interval": 4,
                                              "train.val_max_images": 3, "dump.long_side": 64, "dump.scales": "(1.0,)",
                                              "dump.batch_size": 2, "dump.num_shards": 1, "dump.crf.enabled": False})
    assert train_main([CONFIG, "--run", "e2e", "--cfg-options", *opts]) == 0
    run = tmp_path / "runs" / "synthetic" / "e2e"
    val = [json.loads(line) for line in (run / "stage1" / "val_metrics.jsonl").read_text().splitlines()]
    assert set(val[-1]["figures"]) == {"pseudo", "pseudo_no_lvc", "decoder"}
    assert all(0 <= val[-1][f"{k}_miou"] <= 1 for k in val[-1]["figures"])
    assert "(seg " in (run / "stage1" / "train.log").read_text()
    assert dump.main([CONFIG, "--run", "e2e", "--shard", "all", "--cfg-options", *opts]) == 0
    reader = ShardReader(run / "pseudo_masks")
    names = list(reader)
    assert len(names) == len(reader) > 0
    for name in names:
        assert set(np.unique(reader.label(name)).tolist()) <= {0, *reader.image_labels(name).tolist(), 255}
    assert dump.main([CONFIG, "--run", "e2e", "--evaluate", "--cfg-options", *opts]) == 0
    metrics = json.loads((run / "pseudo_masks" / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["miou"] <= 1.0
