"""WeakCLIP head: options, prompt encoder, pyramid shapes, gradients, losses, mask crops, training and resume."""

import copy
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import stage1_cam.train as train_mod
from stage1_cam.build import build_stage1
from stage1_cam.config import ConfigError, load_config
from stage1_cam.constants import IMAGENET_MEAN, IMAGENET_STD
from stage1_cam.data import TrainAugment, TrainCropDataset, build_dataset, voc_palette
from stage1_cam.data.transforms import sample_rng
from stage1_cam.heads import HEADS, TrainBatch
from stage1_cam.heads.weakclip import (PARITY_OPTIONS, MaskedTrainCrops, PromptTextEncoder, WeakCLIPHead,
                                       augment_mask, boundary_loss, crf_targets, dgcn_softmax,
                                       resolve_options, score_map_loss, seed_loss)
from stage1_cam.io.shards import ShardMeta, ShardReader, ShardWriter, write_manifest
from tests.numerics import assert_close_f32, vit_block_terms

TINY = "configs/stage1/weakclip_tiny-clip_synthetic-160x160_300i.py"
SPLIT = "train_aug"


def _write_masks(root, out, *, drop=(), size_delta=0):
    """Pseudo-mask shards from the synthetic ground truth, top 8 rows without cues (255)."""
    ds = build_dataset("synthetic", root, SPLIT)
    meta = ShardMeta(dataset="synthetic", split=SPLIT, class_names=ds.class_names, palette=voc_palette(256))
    with ShardWriter(out, 0, 1, meta=meta) as w:
        for n in ds.names:
            if n in drop:
                continue
            lab = ds.load_gt(n).copy()
            lab[:8] = 255
            if size_delta:
                lab = lab[:-size_delta]
            w.write(n, label=lab, confidence=np.ones(lab.shape, np.float32), image_labels=ds.image_labels(n).tolist())
        w.finalize()
    write_manifest(out, 1)
    return out


@pytest.fixture(scope="module")
def masks_dir(synthetic_root, tmp_path_factory):
    return _write_masks(synthetic_root, tmp_path_factory.mktemp("wk") / "masks")


def _cfg(synthetic_root, masks_dir, tmp_path=None, **extra):
    opts = {"data.root": str(synthetic_root), "data.crop_size": 64, "head.masks": str(masks_dir)}
    if tmp_path is not None:
        opts["run.root"] = str(tmp_path / "runs")
    opts.update(extra)
    return load_config(TINY, opts)


@pytest.fixture(scope="module")
def stack(synthetic_root, masks_dir):
    torch.manual_seed(0)
    return build_stage1(_cfg(synthetic_root, masks_dir), torch.device("cpu"))


def _masks(b=2, s=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor([0, 3, 7])[torch.randint(0, 3, (b, s // 16, s // 16), generator=g)]
    m = m.repeat_interleave(16, 1).repeat_interleave(16, 2)
    m[:, :4] = 255
    return m


# ------------------------------------------------------------------------------------------------ options
def test_options_defaults_parity_and_errors():
    d = resolve_options({})
    assert (d.n_ctx, d.ctx_init_std, d.chain_coattention, d.class_embedding_twice) == (8, 0.02, True, False)
    assert (d.train_adapters, d.backbone_drop_path, d.ce_avg_non_ignore, d.score_weight) == (True, 0.0, True, 0.4)
    p = resolve_options({"parity": True})
    assert all(getattr(p, k) == v for k, v in PARITY_OPTIONS.items())
    assert resolve_options({"parity": True, "train_adapters": True}).train_adapters is True  # explicit wins
    crf = resolve_options({"out_indices": [1, 2, 3, 4], "crf": {"iterations": 2}}).crf  # unset keys: the head default
    assert (crf.iterations, crf.bi_xy_std) == (2, 80.0)
    with pytest.raises(ConfigError, match="unknown config key.*head.nope.*valid keys under head"):
        resolve_options({"nope": 1})
    with pytest.raises(ConfigError, match="head.chain_coattention: expected true/false"):
        resolve_options({"chain_coattention": 1})
    with pytest.raises(ConfigError, match="4 increasing block indices"):
        resolve_options({"out_indices": [3, 5, 7]})
    with pytest.raises(ConfigError, match="unknown config key.*head.crf.sxy"):
        resolve_options({"crf": {"sxy": 3}})
    with pytest.raises(ConfigError, match=r"head.tau=0.0 is out of range"):
        resolve_options({"tau": 0.0})


def test_registered_and_built_from_config(stack):
    assert "weakclip" in HEADS.list_names() and "weclip" in HEADS.list_names()
    head = stack.head
    assert isinstance(head, WeakCLIPHead) and head.out_indices == (3, 5, 7, 11)
    assert set(head.state_dict()) == {f"decoder.{k}" for k in head.decoder.state_dict()}
    assert not any(k.startswith("decoder.text_encoder") for k in head.state_dict())
    with pytest.raises(ValueError, match="out_indices"):
        WeakCLIPHead(backbone=stack.backbone, token_ids=torch.zeros(21, 5, dtype=torch.long), num_classes=21,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, options=resolve_options({"out_indices": [3, 5, 7, 12]}))


# --------------------------------------------------------------------------------------------- text side
def test_prompt_encoder_without_context_equals_clip_encode_text(tiny_clip):
    from stage1_cam.models.text import get_tokenizer

    ids = get_tokenizer("wsss-tiny-ViT-16")(["background", "dog", "potted plant"])
    enc = PromptTextEncoder(clip_model=tiny_clip, token_ids=ids, n_ctx=0)
    assert enc.token_ids.shape[1] == int(ids.argmax(-1).max()) + 1  # truncated to the longest name
    with torch.no_grad():
        ref = tiny_clip.encode_text(ids)
        seen = []
        hook = tiny_clip.ln_final.register_forward_hook(lambda mod, inp, out: seen.append(out))
        try:
            ours = enc(torch.zeros(0, enc.width))
        finally:
            hook.remove()
    # Terms: the text blocks on the truncated sequence (other blockings than on all 77 tokens), then ln_final and the
    # projection (scale: |ln_final| @ |projection| bounds its partial sums).
    pooled = seen[0][torch.arange(len(ids)), enc.eot]
    mag = (pooled.abs() @ tiny_clip.text_projection.abs()).max()
    blocks = len(tiny_clip.transformer.resblocks)
    terms = blocks * vit_block_terms(enc.width, tiny_clip.positional_embedding.shape[0]) + 3 * enc.width
    assert_close_f32(ours, ref, terms=terms, scale=mag)

    enc4 = PromptTextEncoder(clip_model=tiny_clip, token_ids=ids, n_ctx=4)
    ctx = torch.randn(4, enc4.width, requires_grad=True)
    out = enc4(ctx)
    assert out.shape == (3, tiny_clip.text_projection.shape[1])
    out.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())
    with pytest.raises(ValueError, match="context length"):
        PromptTextEncoder(clip_model=tiny_clip, token_ids=ids, n_ctx=80)


# ------------------------------------------------------------------------------------------- shapes
def test_shapes_at_each_pyramid_level(stack):
    head = stack.head.eval()
    x = torch.randn(2, 3, 64, 96)
    pyramid, context, grid = head.image_features(x)
    assert grid == (4, 6) and len(pyramid) == 4
    assert all(p.shape == (2, 64, 4, 6) for p in pyramid) and context.shape == (2, 1 + 24, 64)
    levels = head.decoder.adapter(pyramid)
    assert [tuple(f.shape) for f in levels] == [(2, 64, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    fpn = head.decoder.neck([torch.cat([f, f.new_zeros(f.shape[0], 21, *f.shape[-2:])], 1) for f in levels])
    assert [tuple(f.shape) for f in fpn] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    logits, score = head.decoder(pyramid, context, grid)
    assert logits.shape == (2, 21, 16, 24) and score.shape == (2, 21, 4, 6)
    assert score.abs().max() <= 1 + 1e-5
    assert head.predict_logits(torch.randn(1, 3, 16, 48)).shape == (1, 21, 4, 12)  # 1-patch-high input
    val = head.validation_figures(x, [np.array([3])], out_size=(70, 100), full_images=x)
    assert val["decoder"].shape == (2, 70, 100) and val["decoder"].dtype == torch.int64
    head.train()


# ---------------------------------------------------------------------------------------- gradients
def test_gradients_reach_prompts_adapters_coattention_decoder_not_clip(stack):
    head = stack.head.train()
    head.zero_grad(set_to_none=True)
    out = head.forward_train(TrainBatch(images=torch.randn(2, 3, 64, 64), labels=[np.array([3]), np.array([7])],
                                        masks=_masks()), 0)
    assert set(out) >= {"loss", "loss_seg", "loss_aff", "loss_seed", "loss_boundary", "loss_score", "pseudo_label"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    dec = head.decoder
    for name, p in dec.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    for part in (dec.contexts, dec.adapter.up4[1].weight, dec.coattention.text_layers[0].self_attn.in_proj_weight,
                 dec.coattention.pixel_layers[0].cross_attn.in_proj_weight, dec.coattention.gamma,
                 dec.coattention.beta, dec.neck.lateral[3].weight, dec.seg_head.classifier.weight):
        assert part.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in stack.clip_model.parameters())
    head.zero_grad(set_to_none=True)


def test_parity_switches_change_the_model(synthetic_root, masks_dir):
    torch.manual_seed(0)
    cfg = _cfg(synthetic_root, masks_dir, **{"head.parity": True, "head.backbone_drop_path": 0.5})
    st = build_stage1(cfg, torch.device("cpu"))
    head = st.head.train()
    dec = head.decoder
    assert not any(p.requires_grad for p in dec.adapter.parameters())  # reference: adapters never trained
    assert dec.contexts.std() > 0.5  # reference init std 1
    out = head.forward_train(TrainBatch(images=torch.randn(2, 3, 64, 64), labels=[], masks=_masks()), 0)
    out["loss"].backward()
    # Unchained co-attention: only the last layer of each direction is used; the others are frozen, so every
    # trainable parameter gets a gradient (what DDP without find_unused_parameters needs: the VOC config's 2 GPUs).
    assert dec.coattention.text_layers[0].self_attn.in_proj_weight.grad is None
    assert dec.coattention.text_layers[-1].self_attn.in_proj_weight.grad is not None
    assert not any(p.requires_grad for layer in (dec.coattention.text_layers[0], dec.coattention.pixel_layers[0])
                   for p in layer.parameters())
    assert all(p.grad is not None for name, p in dec.named_parameters() if p.requires_grad)
    # Class embedding twice: the embedded CLS token differs from the backbone's; patches are identical.
    x = torch.randn(1, 3, 32, 32)
    twice, _ = head._embed(x)
    once, _ = st.backbone.embed(x)
    assert not torch.allclose(twice[:, 0], once[:, 0]) and torch.allclose(twice[:, 1:], once[:, 1:])
    # Drop path: stochastic in train mode, off in eval mode.
    a, b = head.image_features(x)[1], head.image_features(x)[1]
    assert not torch.allclose(a, b)
    head.eval()
    assert torch.equal(head.image_features(x)[1], head.image_features(x)[1])


# ------------------------------------------------------------------------------------------- losses
def test_seed_loss_is_balanced_ignores_255_and_is_finite_without_cues():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    p = dgcn_softmax(logits)
    cues = torch.randint(0, 4, (2, 6, 6))
    cues[:, :2] = 255
    loss = seed_loss(p, cues)
    lp = torch.log(p)
    ref = 0.0
    for sel in (lambda c: c == 0, lambda c: (c > 0) & (c != 255)):
        per = []
        for b in range(2):
            m = sel(cues[b])
            per.append(-sum(lp[b, cues[b][m][i], *torch.nonzero(m)[i]] for i in range(int(m.sum()))) / m.sum())
        ref = ref + torch.stack(per).mean()
    # Terms: a 36-cell masked sum per image and group (the masked cells add exact zeros), its division, the batch mean
    # and the sum of the two groups; every -log p >= 0, so no partial sum exceeds the loss (the default scale).
    assert_close_f32(loss, ref, terms=36 + 4)
    loss.backward()
    assert logits.grad[:, :, :2].abs().max() == 0  # no gradient where there is no cue
    assert logits.grad[:, :, 2:].abs().sum() > 0
    none = torch.full((2, 6, 6), 255)
    assert seed_loss(p, none).item() == 0.0
    mixed = cues.clone()
    mixed[1] = 255
    assert torch.isfinite(seed_loss(p, mixed))
    with pytest.raises(ValueError, match="neither class ids"):
        seed_loss(p, torch.full((2, 6, 6), 9))


def test_boundary_loss_is_zero_at_the_crf_output():
    torch.manual_seed(0)
    img = np.zeros((2, 12, 12, 3), np.uint8)
    img[:, :, 6:] = 200
    probs = dgcn_softmax(torch.randn(2, 3, 12, 12))
    q = crf_targets(img, probs)
    assert q.shape == probs.shape
    # Terms: crf_targets divides by a 3-term sum (2 additions, 1 division), the check adds 3 again; scale 1.
    assert_close_f32(q.sum(1), torch.ones(2, 12, 12), terms=2 * 3, scale=1.0)
    assert q.min() >= 1e-4 - 1e-7
    # Prediction == CRF output: 0 but for the 1e-4 floor boundary_loss puts under p, which q (renormalised after its
    # own floor) dips just below; the same formula in float64 is the reference. Terms: per class the ratio q / floor
    # and its log (each off by ~u q; exactly 0 where q >= floor: q / q = 1), the 3-term class sum, the 288-pixel mean;
    # scale: the floored q (<= 1e-4).
    q64 = q.double()
    ref = (q64 * torch.log(q64 / q64.clamp(min=1e-4))).sum(1).mean()
    assert_close_f32(boundary_loss(q, q), ref, terms=3 * 3 + q[:, 0].numel(), scale=1e-4)
    logits = torch.log(q).clone().requires_grad_(True)
    at_fixed_point = boundary_loss(torch.softmax(logits, 1), q)
    # |KL(q || p)| <= max relative error of p = softmax(log q) against q: the logits' rounding (absolute, up to
    # |log q| <= log 1e4 each, and the max subtracted), then exp, the 3-term sum and the division; plus the loss's own
    # ratio and log. Scale 1 (relative errors).
    assert_close_f32(at_fixed_point, torch.zeros(()), terms=2 * float(-torch.log(q.min())) + 3 + 3 + 2, scale=1.0)
    other = torch.randn(2, 3, 12, 12, requires_grad=True)
    loss = boundary_loss(torch.softmax(other, 1), q)
    assert loss > 0.01
    loss.backward()
    assert other.grad.abs().sum() > 0


def test_score_map_loss_reductions():
    torch.manual_seed(0)
    s = torch.randn(1, 3, 4, 4)
    lab = torch.randint(0, 3, (1, 8, 8))
    lab[:, :4] = 255
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, lab, ignore_index=255)
    assert torch.allclose(score_map_loss(s, lab), ce)
    assert torch.allclose(score_map_loss(s, lab, avg_non_ignore=False), ce / 2)  # half the pixels ignored
    assert score_map_loss(s, torch.full((1, 8, 8), 255)).item() == 0.0


# --------------------------------------------------------------------------------------- mask crops
def test_augment_mask_follows_the_image_geometry():
    label = np.zeros((45, 70), np.uint8)
    label[5:30, 8:40], label[20:44, 45:66] = 3, 7
    colours = np.array([[10, 20, 30], [0, 0, 0], [0, 0, 0], [200, 40, 40], [0, 0, 0], [0, 0, 0], [0, 0, 0],
                        [40, 200, 120]], np.uint8)
    image = colours[label]
    aug = TrainAugment(crop_size=48, scale_range=(0.5, 2.0), flip=True)
    pad = -np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)
    for seed in range(12):
        img, box = aug(image, sample_rng(seed, 3, 1))
        m = augment_mask(label, aug, sample_rng(seed, 3, 1))
        assert m.shape == (48, 48) and m.dtype == np.uint8
        rgb = img.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
        inside = m != 255
        y0, y1, x0, x1 = box
        assert inside[y0:y1, x0:x1].all() and inside.sum() == (y1 - y0) * (x1 - x0)  # padding = 255 exactly
        assert np.allclose(img.transpose(1, 2, 0)[~inside], pad, atol=1e-4)
        k = np.ones((5, 5), np.uint8)
        interior = inside & (cv2.erode(m, k) == cv2.dilate(m, k))  # away from label edges (bilinear blur)
        interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False  # edges beyond
        assert interior.sum() > 100
        err = np.abs(rgb[interior] - colours[m[interior]].astype(np.float64)).max(axis=1)
        assert err.max() < 1, seed


def test_masked_crops_match_the_loop_dataset(synthetic_root, masks_dir, tmp_path):
    base = build_dataset("synthetic", synthetic_root, SPLIT)
    crops = TrainCropDataset(base, TrainAugment(crop_size=64, scale_range=(0.75, 1.5)), seed=5)
    crops.set_epoch(2)
    wrapped = MaskedTrainCrops(crops, ShardReader(masks_dir))
    assert len(wrapped) == len(crops)
    for i in (0, 3):
        a, b = crops[i], wrapped[i]
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["img_box"], b["img_box"]) and a["name"] == b["name"]
        assert torch.equal(a["cls_label"], b["cls_label"])
        gt = base.load_gt(a["name"]).copy()
        gt[:8] = 255
        assert np.array_equal(b["mask"].numpy(), augment_mask(gt, crops.augment, sample_rng(5, i, 2)))
    missing = _write_masks(synthetic_root, tmp_path / "partial", drop=(base.names[1],))
    with pytest.raises(ValueError, match="1 of .* no pseudo-mask"):
        MaskedTrainCrops(crops, ShardReader(missing))
    small = _write_masks(synthetic_root, tmp_path / "small", size_delta=2)
    with pytest.raises(ValueError, match="original image size"):
        MaskedTrainCrops(crops, ShardReader(small))[0]


def test_missing_mask_source_is_explained(synthetic_root, stack, tmp_path):
    head = stack.head
    saved = head.masks_dir
    try:
        head.masks_dir = str(tmp_path / "nothing")
        with pytest.raises(FileNotFoundError, match="stage1_cam.cams"):
            head.open_masks()
    finally:
        head.masks_dir = saved
    with pytest.raises(ValueError, match="the batch has no masks"):
        head.forward_train(TrainBatch(images=torch.randn(1, 3, 64, 64), labels=[]), 0)


# ------------------------------------------------------------------------------------ training loop
def _collate(batch):
    return {"img": torch.stack([b["img"] for b in batch]), "mask": torch.stack([b["mask"] for b in batch])}


def _run(head, opt, batches, steps):
    losses = []
    for _ in range(steps):
        batch = next(batches)
        out = head.forward_train(TrainBatch(images=batch["img"], labels=[], masks=batch["mask"]), 0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def test_twenty_steps_lower_the_loss_and_resume_exactly(synthetic_root, masks_dir):
    torch.manual_seed(0)
    cfg = _cfg(synthetic_root, masks_dir)
    head = build_stage1(cfg, torch.device("cpu")).head.train()
    base = build_dataset("synthetic", synthetic_root, SPLIT)
    ds = head.wrap_train_dataset(TrainCropDataset(base, TrainAugment(crop_size=64, scale_range=(0.75, 1.5)), seed=1))
    data = [b for b in DataLoader(ds, batch_size=2, shuffle=False, collate_fn=_collate)]
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=3e-5)  # high: 20 steps on a random tiny CLIP
    init = copy.deepcopy(head.decoder.state_dict())

    def cycle(start):
        i = start
        while True:
            yield data[i % len(data)]
            i += 1

    losses = _run(head, opt, cycle(0), 10)
    ckpt = {"head": copy.deepcopy(head.decoder.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "rng": torch.get_rng_state()}
    losses += _run(head, opt, cycle(10), 10)
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
    final = copy.deepcopy(head.decoder.state_dict())

    head.decoder.load_state_dict(init, strict=True)
    head.decoder.load_state_dict(ckpt["head"], strict=True)
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    _run(head, opt, cycle(10), 10)
    for k, v in final.items():
        assert torch.equal(v, head.decoder.state_dict()[k]), k
    # The checkpointed decoder is all the dump needs: a fresh build + strict load predicts the same.
    head.eval()
    x = torch.randn(1, 3, 64, 80)
    fresh = build_stage1(cfg, torch.device("cpu")).head
    fresh.decoder.load_state_dict(head.decoder.state_dict(), strict=True)
    assert torch.equal(fresh.eval().predict_logits(x), head.predict_logits(x))  # same weights, same kernels


def _opts(synthetic_root, masks_dir, tmp_path, **extra):
    opts = {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "data.crop_size": 64,
            "data.num_workers": 0, "train.batch_size": 2, "train.log_interval": 1, "train.val_interval": 0,
            "head.masks": str(masks_dir)}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def test_train_main_twenty_steps_checkpoint_and_resume(synthetic_root, masks_dir, tmp_path):
    # The CRF loss jumps up once predictions leave uniform (the CRF sharpens them), so a high lr shows the trend.
    common = _opts(synthetic_root, masks_dir, tmp_path, **{"train.max_iters": 20, "train.ckpt_interval": 10,
                                                           "train.warmup_iters": 1, "train.lr": 4e-3})
    assert train_mod.main([TINY, "--run", "full", "--cfg-options", *common]) == 0
    run = tmp_path / "runs" / "synthetic" / "full" / "stage1"
    losses = [v for _, v in json.loads((run / "train_summary.json").read_text())["loss_curve"]]
    assert len(losses) == 20 and all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
    full = train_mod.load_checkpoint(run / "checkpoints" / "final.pth")
    assert full["step"] == 20 and full["head_type"] == "weakclip"
    mid = run / "checkpoints" / "iter_000010.pth"
    assert train_mod.main([TINY, "--run", "resumed", "--resume", str(mid), "--cfg-options", *common]) == 0
    resumed = train_mod.load_checkpoint(tmp_path / "runs" / "synthetic" / "resumed" / "stage1" / "checkpoints"
                                        / "final.pth")
    for k, v in full["head"].items():
        assert torch.equal(v, resumed["head"][k]), k
