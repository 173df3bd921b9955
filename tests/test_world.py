"""The synthetic world's CLIP (stage1_cam.world_clip): captions, loss, windowed encoding, cached training, loading."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_cam.world_clip import train as world
from stage1_cam.data.class_names import BACKGROUND_WORDS, PROMPT_NAMES
from stage1_cam.data.synthetic import BACKGROUND_STYLES, STUFF_WORDS, render_sample
from stage1_cam.models.clip_backbone import FrozenClipBackbone
from stage1_cam.models.pretrained import load_clip, resolve_clip_weights
from tests.world_gate import gate_cam_table, world_gate_run
from tests.numerics import assert_close_f32, vit_block_terms

WORLD_CONFIG = "configs/stage1/weclip_world-clip_synthetic-160x160_300i.py"
# Tiny settings of the real world architecture: a few 2x2 / 2x3 patch crops per step, a dozen steps.
TINY = dataclasses.replace(world.WorldCfg(), num_images=8, eval_images=8, crop_grids=((2, 2), (2, 3)),
                           tokens_per_step=96, steps=12, lr=2e-3, warmup_steps=2)


def test_prompts_are_the_pipelines_and_stuff_words_are_background_words():
    texts, stuff = world.world_prompts("a clean origami {}.")
    fg, bg = PROMPT_NAMES["synthetic"], BACKGROUND_WORDS["synthetic"]
    assert texts[:len(fg)] == [f"a clean origami {n}." for n in fg]
    assert texts[len(fg):] == [f"a clean origami {w}." for w in bg]
    assert set(stuff) == set(BACKGROUND_STYLES)
    for style, idx in stuff.items():
        assert [texts[i] for i in idx] == [f"a clean origami {w}." for w in STUFF_WORDS[style]]


def test_render_sample_reports_the_background_style():
    s = render_sample(np.random.default_rng([0, 0, 0]), 64, 96, 2)
    assert s.image.shape == (64, 96, 3) and s.label.shape == s.stuff.shape == (64, 96)
    assert len(np.unique(s.stuff)) == 1 and int(s.stuff[0, 0]) < len(BACKGROUND_STYLES)


def test_caption_targets_caption_visible_things_and_ignore_slivers():
    stuff_texts = [[2, 3], [4]]  # style 0 -> words 2, 3; style 1 -> word 4
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0, :5] = 1  # class 1 covers half of crop 0
    labels[0, 9, 9] = 2  # class 2: a 1-pixel sliver -> ignored
    labels[0, 5, :] = 255  # ignore border is not counted
    labels[1] = 1  # crop 1 is all class 1: its background is not in view
    labels[1, 0, 0] = 0  # ... except a sliver of it
    stuff = np.zeros((2, 10, 10), np.uint8)
    target, valid = world.caption_targets(labels, stuff, num_fg=2, num_texts=5, stuff_texts=stuff_texts,
                                          min_visible=0.05)
    np.testing.assert_allclose(target[0], [1, 0, 0.5, 0.5, 0])
    np.testing.assert_array_equal(valid[0], [True, False, True, True, True])
    np.testing.assert_allclose(target[1], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(valid[1], [True, True, False, False, True])


def test_contrastive_loss_reduces_to_clip_with_one_positive_each():
    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    eye = torch.eye(5)
    got = world.multi_positive_contrastive_loss(logits, eye, torch.ones(5, 5, dtype=torch.bool))
    labels = torch.arange(5)
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    # Terms: a log-softmax value (max shift, 5 exps summed, log, two subtractions), the 5-term target sum, the mean
    # over 5 rows, the mean of the two directions. Scale: |log-softmax| <= 2 max |logit| + log 5 bounds every
    # operand and partial sum (the per-row losses are such values, their mean too).
    assert_close_f32(got, ref, terms=(1 + 5 + 2 + 2) + 5 + 5 + 2, scale=2 * logits.abs().max() + np.log(5))


def test_contrastive_loss_multi_positive_and_ignored_pairs():
    target = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    good = torch.tensor([[5.0, 5.0, -5.0], [-5.0, 99.0, 5.0]])  # the ignored pair's logit must not matter
    bad = torch.tensor([[-5.0, -5.0, 5.0], [5.0, 99.0, -5.0]])
    lg = world.multi_positive_contrastive_loss(good, target, valid)
    assert float(lg) < 0.72  # ~ log 2 from the two equal positives, small elsewhere
    assert float(world.multi_positive_contrastive_loss(bad, target, valid)) > float(lg) + 5
    changed = good.clone()
    changed[1, 1] = -99.0
    torch.testing.assert_close(world.multi_positive_contrastive_loss(changed, target, valid), lg)


def _pooled_terms_and_scale(v, tokens):
    """Float32 roundings and operand scale of ``ln_post`` -> mean over the patch tokens -> ``@ proj`` after the blocks.

    Terms: every block on the residual stream, ln_post (``2 width``), the token mean, the ``width``-long projection.
    Scale: ``mean |ln_post(tokens)| @ |proj|`` bounds the projection's partial sums (they cancel).
    """
    post = v.ln_post(tokens[:, 1:])
    width, n = post.shape[-1], tokens.shape[1]
    terms = len(v.transformer.resblocks) * vit_block_terms(width, n) + 3 * width + n
    return terms, post.abs().mean(dim=1) @ v.proj.abs()


def test_windowed_encoding_matches_open_clip_and_the_pipeline_pooling():
    model = world._build_model(TINY).eval()
    gh, gw = model.visual.grid_size
    x = torch.randn(2, 3, 16 * gh, 16 * gw)
    with torch.no_grad():
        full, _, _ = world.encode_image_windows(model, x, torch.zeros(2, 2, dtype=torch.long))
        bb = FrozenClipBackbone(model)
        tokens = bb(x).tokens[-1]
        terms, mag = _pooled_terms_and_scale(model.visual, tokens)  # open_clip's blocks: another order
        assert_close_f32(full, model.encode_image(x), terms=terms, scale=mag)
        assert_close_f32(full, bb.pool_project(tokens), terms=terms, scale=mag)
        # A crop carries the positional embedding of where it was cut: put it back in an image of
        # zeros that has the same pixels there, and its tokens see the same positions.
        crop = x[:1, :, 32:64, 48:96]
        a, regions, travel = world.encode_image_windows(model, crop, torch.tensor([[2, 3]]), region=(1, 3),
                                                        prior_layers=4)
        b, _, _ = world.encode_image_windows(model, crop, torch.tensor([[0, 0]]))
        assert not torch.allclose(a, b)
        v = model.visual
        tok = v.conv1(crop).flatten(2).transpose(1, 2)
        pos = v.positional_embedding[1:].reshape(gh, gw, -1)[2:4, 3:6].reshape(6, -1)
        cls = (v.class_embedding + v.positional_embedding[0]).reshape(1, 1, -1)
        blocks_out = v.transformer(v.ln_pre(torch.cat([cls, tok + pos], 1)))
        ref = v.ln_post(blocks_out)[:, 1:].mean(1) @ v.proj
        terms, mag = _pooled_terms_and_scale(v, blocks_out)
        assert_close_f32(a, ref, terms=terms, scale=mag)
        # Regions pool their own tokens of the same pass; the attention distance is a mean in [0, 1].
        out = v.ln_post(blocks_out)[:, 1:]
        assert regions.shape == (1, 2, 1, a.shape[1])
        _, mag = _pooled_terms_and_scale(v, blocks_out[:, [0, 4, 5, 6]])  # the region's 3 patch tokens
        assert_close_f32(regions[0, 1, 0], out[0, 3:].mean(0) @ v.proj, terms=terms, scale=mag[0])
        assert 0.0 < float(travel) < 1.0


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsss-cache")
    torch.set_num_threads(1)
    return root, world.train_world_clip(TINY, root=root, log_interval=4)


def test_world_training_lowers_the_loss_and_saves_a_strict_open_clip_state_dict(tiny_world):
    root, res = tiny_world
    assert res.trained and res.weights.is_file()
    assert res.weights.parent == world.world_cache_dir(TINY, root)
    meta = json.loads((res.weights.parent / world.META_FILE).read_text())
    assert meta["hash"] == world.world_hash(TINY) and meta["config"]["steps"] == 12
    assert meta["eval_after"]["loss"] < meta["eval_before"]["loss"] - 0.1
    assert meta["train_loss"][-1][1] < meta["train_loss"][0][1]
    state = torch.load(res.weights, map_location="cpu", weights_only=True)
    model = load_clip(TINY.model_name, pretrained=None, weights=str(res.weights))  # strict loading
    loaded = model.state_dict()
    assert set(state) == set(loaded)
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    fresh = load_clip(TINY.model_name, pretrained=None)
    assert not torch.equal(fresh.visual.conv1.weight, model.visual.conv1.weight)


def test_world_cache_is_reused(tiny_world, monkeypatch):
    root, res = tiny_world
    mtime = os.stat(res.weights).st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(world, "render_pool", boom)
    again = world.train_world_clip(TINY, root=root)
    assert not again.trained and again.weights == res.weights and again.meta == res.meta
    assert os.stat(res.weights).st_mtime_ns == mtime
    # Another setting is another entry.
    assert world.world_cache_dir(dataclasses.replace(TINY, steps=13), root) != res.weights.parent


def test_world_training_is_deterministic(tiny_world, tmp_path):
    _, res = tiny_world
    other = world.train_world_clip(TINY, root=tmp_path)
    a = torch.load(res.weights, weights_only=True)
    b = torch.load(other.weights, weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert other.meta["eval_after"] == res.meta["eval_after"]


def test_world_scheme_resolves_through_load_clip(tiny_world, monkeypatch, tmp_path):
    root, res = tiny_world
    monkeypatch.setitem(world.WORLD_PRESETS, "tinytest", TINY)
    monkeypatch.setenv(world.ENV_CACHE, str(root))
    assert resolve_clip_weights(TINY.model_name, None, "world:tinytest") == str(res.weights)
    model = load_clip(TINY.model_name, pretrained=None, weights="world:tinytest")
    torch.testing.assert_close(model.logit_scale, torch.load(res.weights, weights_only=True)["logit_scale"])
    with pytest.raises(ValueError, match="clip.model_name='wsss-world-ViT-16'"):
        load_clip("wsss-tiny-ViT-16", pretrained=None, weights="world:tinytest")
    with pytest.raises(KeyError, match="unknown world preset 'nope'"):
        load_clip(TINY.model_name, pretrained=None, weights="world:nope")
    monkeypatch.setenv(world.ENV_CACHE, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="make world"):
        load_clip(TINY.model_name, pretrained=None, weights="world:tinytest")


def test_main_reports_the_cached_weights(tiny_world, monkeypatch, capsys):
    root, res = tiny_world
    monkeypatch.setitem(world.WORLD_PRESETS, "tinytest", TINY)
    monkeypatch.setattr(world, "render_pool", lambda *a, **k: pytest.fail("retrained although cached"))
    assert world.main(["--preset", "tinytest", "--cache", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(res.weights)
    assert world.main(["--preset", "tinytest", "--cache", str(root), "--cfg-options", "no_such_key=1"]) == 2
    assert world.main(["--preset", "nope", "--cache", str(root)]) == 2


def test_stage1_world_config_points_at_the_default_preset():
    from stage1_cam.config import load_config

    cfg = load_config(WORLD_CONFIG)
    assert cfg.clip.weights == "world:default" and cfg.clip.pretrained is None
    name, _ = world._preset_from_stage1_config(WORLD_CONFIG)
    assert name == "default" and world.WORLD_PRESETS[name].model_name == cfg.clip.model_name


def test_config_hash_follows_the_world_weights_without_training_them(monkeypatch, tmp_path):
    from stage1_cam.config import config_hash, load_config

    monkeypatch.setenv(world.ENV_CACHE, str(tmp_path / "empty"))  # no trained world anywhere
    monkeypatch.setattr(world, "train_world_clip", lambda *a, **k: pytest.fail("trained the world to hash"))
    cfg = load_config(WORLD_CONFIG)
    tiny = load_config("configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py")
    before = (config_hash(cfg), config_hash(cfg, ("data", "clip", "cam")), config_hash(cfg, ("train",)),
              config_hash(tiny))
    assert config_hash(cfg) == before[0]  # stable
    # Other world weights (another preset setting -> another cache entry): the same config text, another hash.
    preset = world.WORLD_PRESETS["default"]
    monkeypatch.setitem(world.WORLD_PRESETS, "default", dataclasses.replace(preset, steps=preset.steps + 1))
    after = (config_hash(cfg), config_hash(cfg, ("data", "clip", "cam")), config_hash(cfg, ("train",)),
             config_hash(tiny))
    assert after[0] != before[0] and after[1] != before[1]
    assert after[2] == before[2] and after[3] == before[3]  # sections without clip; configs without world weights
    cfg.clip.weights = "world:nope"  # an unknown preset still hashes; loading the weights is what fails
    assert len(config_hash(cfg)) == 12


def test_bad_world_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_visible"):
        world.train_world_clip(dataclasses.replace(TINY, min_visible=0.0), root=tmp_path)
    with pytest.raises(ValueError, match="exceeds the 10x14 patch grid"):
        world.train_world_clip(dataclasses.replace(TINY, crop_grids=((11, 2),)), root=tmp_path)
    with pytest.raises(ValueError, match="pool_type='avg'"):
        world.train_world_clip(dataclasses.replace(TINY, model_name="wsss-tiny-ViT-16"), root=tmp_path)


def test_split_regions_and_token_distances():
    a = np.arange(2 * 4 * 6).reshape(2, 4, 6)
    r = world.split_regions(a, (2, 3))
    assert r.shape == (8, 2, 3)
    np.testing.assert_array_equal(r[1], a[0, :2, 3:])
    np.testing.assert_array_equal(r[6], a[1, 2:, :3])
    d = world._token_distances(2, 3, torch.device("cpu"))
    assert d.shape == (7, 7) and float(d[0].min()) == 1.0 and float(d[1, 1]) == 0.0
    torch.testing.assert_close(d[1, 6], torch.tensor(1.0))  # opposite corners: one grid diagonal


# ------------------------------------------------------------------------------------- quality gates
# The default world CLIP (trained once, or reused from the `make world` cache) on the synthetic val set,
# through the real entry points. Measured on the 2-core CPU machine (default preset, 1 torch thread):
# refined initial CAM 51.9 mIoU (bg=(1-max)^1; random tiny CLIP 12.9), head's online pseudo-labels 61.9 with RFM
# and 60.7 without it on the same decoder (60 val images, step 300), dumped masks with CRF above both (the
# measured figures: docs/results.md). Thresholds leave ~10 points.
# The stage-2 smoke model (FCN-R18, 800 iterations, no pretrained weights) trained on the dumped train_aug masks
# reached 46.7 val mIoU single scale in this test and 54.4 in the demo (2 threads); it is the noisiest figure.
GATE_CAM = 0.40
GATE_ONLINE = 0.50
GATE_DUMP = 0.55
GATE_RETRAIN = 0.38
GATE_S2_CONFIG = "configs/stage2/fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py"


@pytest.fixture(scope="module")
def world_stage1(tmp_path_factory):
    return world_gate_run(WORLD_CONFIG, tmp_path_factory.mktemp("world-gate"))


@pytest.mark.slow
def test_world_clip_initial_cams_quality_gate(world_stage1):
    table = gate_cam_table(WORLD_CONFIG, *world_stage1)
    assert table["bg=(1-max)^1"] >= GATE_CAM, table


@pytest.mark.slow
def test_world_clip_pseudo_labels_quality_gate(world_stage1):
    from stage1_cam.cams.__main__ import main as cams_main
    from stage1_cam.dump import main as dump_main
    from stage1_cam.train import main as train_main

    run, opts = world_stage1
    assert cams_main([WORLD_CONFIG, "--run", "gate", "--cfg-options", *opts]) == 0  # resumes: already done
    cam = json.loads((run / "cams" / "metrics.json").read_text())["table"]["bg=(1-max)^1"]
    assert train_main([WORLD_CONFIG, "--run", "gate", "--cfg-options", *opts]) == 0
    val = [json.loads(line) for line in (run / "stage1" / "val_metrics.jsonl").read_text().splitlines()]
    assert val[-1]["pseudo_miou"] >= GATE_ONLINE, val
    assert dump_main([WORLD_CONFIG, "--run", "gate", "--no-progress", "--cfg-options", *opts]) == 0
    assert dump_main([WORLD_CONFIG, "--run", "gate", "--evaluate", "--cfg-options", *opts]) == 0
    dumped = json.loads((run / "pseudo_masks" / "metrics.json").read_text())["miou"]
    assert dumped >= GATE_DUMP, dumped
    # The ordering the method claims: initial CAM < refined online labels <= dumped masks (msc+flip+CRF).
    assert cam < val[-1]["pseudo_miou"] <= dumped, (cam, val[-1]["pseudo_miou"], dumped)
    # ... and RFM on > off: the same CAMs and decoder without RFM (plain attention mean) give worse online labels.
    assert val[-1]["pseudo_miou"] > val[-1]["pseudo_no_rfm_miou"], val[-1]


@pytest.mark.slow
def test_world_clip_retrained_model_quality_gate(world_stage1, tmp_path):
    """Stage 2 trained on the dumped train_aug pseudo-masks beats a fixed val mIoU (the demo's stage-2 model)."""
    from stage1_cam.dump import main as dump_main
    from stage1_cam.train import main as train_main
    from stage2_seg.test import main as s2_test
    from stage2_seg.train import main as s2_train

    run, opts = world_stage1
    assert train_main([WORLD_CONFIG, "--run", "gate", "--cfg-options", *opts]) == 0  # resumes: already trained
    masks = tmp_path / "train_aug_masks"
    train_opts = [o for o in opts if not o.startswith("data.dump_split=")] + ["data.dump_split=train_aug"]
    assert dump_main([WORLD_CONFIG, "--run", "gate", "--out", str(masks), "--no-progress",
                      "--cfg-options", *train_opts]) == 0
    data_root = next(o.split("=", 1)[1] for o in opts if o.startswith("data.root="))
    work = tmp_path / "stage2"
    assert s2_train([GATE_S2_CONFIG, "--shards", str(masks), "--work-dir", str(work), "--data-root", data_root]) == 0
    ckpt = (work / "last_checkpoint").read_text().strip()
    assert s2_test([GATE_S2_CONFIG, ckpt, "--work-dir", str(work), "--data-root", data_root]) == 0
    miou = json.loads((work / "metrics.json").read_text())["single_scale"]["mIoU"]
    assert miou >= GATE_RETRAIN, miou


GATE_BF16_ONLINE_AGREEMENT = 0.999  # share of online pseudo-label pixels bf16 keeps
GATE_BF16_DUMP_MIOU_DELTA = 0.002  # dumped-mask mIoU, bf16 against float32 (0.2 points)


@pytest.mark.slow
def test_world_clip_cpu_bf16_matches_float32(world_stage1, tmp_path):
    """``train.amp="auto"`` picks bf16 on CPUs with native bf16: on the world CLIP, the online pseudo labels keep
    >= 99.9% of their float32 pixels and the dumped masks' mIoU moves by <= 0.2 points (same head)."""
    from tools.gpu_check import compare
    from stage1_cam.config import load_config
    from stage1_cam.data import build_dataset
    from stage1_cam.dump import evaluate_shards, run_dump
    from stage1_cam.train import main as train_main
    from stage1_cam.utils.precision import native_bf16_cpu

    if not native_bf16_cpu():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX): amp='auto' runs float32 here")
    model = load_config(WORLD_CONFIG).clip.model_name
    res = compare(model, 160, 4, torch.device("cpu"), modes=("bf16",), weights="world:default")["bf16"]
    assert res["pseudo_label_agreement"] >= GATE_BF16_ONLINE_AGREEMENT, res
    run, opts = world_stage1
    assert train_main([WORLD_CONFIG, "--run", "gate", "--cfg-options", *opts]) == 0  # resumes: already trained
    miou = {}
    for amp in ("none", "bf16"):
        overrides = {"run.name": "gate", "train.amp": amp, "dump.crf.enabled": False}
        cfg = load_config(WORLD_CONFIG, dict(o.split("=", 1) for o in opts) | overrides)
        out = tmp_path / amp
        run_dump(cfg, shards=range(cfg.dump.num_shards), out_dir=out, checkpoint=run / "stage1/checkpoints/final.pth",
                 device=torch.device("cpu"), progress=False)
        miou[amp] = evaluate_shards(out, build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.dump_split))["miou"]
    assert abs(miou["bf16"] - miou["none"]) <= GATE_BF16_DUMP_MIOU_DELTA, miou
