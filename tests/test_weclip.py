"""WeCLIP head: decoder shapes and parameter count, losses, gradients, training, checkpoint/resume."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stage1_cam.heads import TrainBatch
from stage1_cam.heads.decoder import WeCLIPDecoder
from stage1_cam.losses import affinity_label, affinity_loss, balanced_seg_loss, radius_mask
from stage1_cam.train import load_checkpoint, lr_multiplier, main as train_main
from tests.numerics import assert_close_f32, f32_tolerance

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"


def test_parameter_count_vit_b16_voc():
    dec = WeCLIPDecoder(in_dim=768, num_inputs=11, embed_dim=256, num_classes=21, decoder_layers=3, decoder_heads=8)
    n = sum(p.numel() for p in dec.parameters())
    assert n == 5_985_045
    assert n == WeCLIPDecoder.expected_num_params(in_dim=768, num_inputs=11, embed_dim=256, num_classes=21,
                                                  decoder_layers=3)
    coco = WeCLIPDecoder(in_dim=768, num_inputs=11, num_classes=81)
    assert sum(p.numel() for p in coco.parameters()) == 6_000_465


def test_decoder_shapes():
    dec = WeCLIPDecoder(in_dim=32, num_inputs=3, embed_dim=16, num_classes=5, decoder_layers=1, decoder_heads=2)
    toks = [torch.randn(2, 1 + 4 * 6, 32) for _ in range(3)]
    logits, fu, aff = dec(toks, (4, 6))
    assert logits.shape == (2, 5, 4, 6) and fu.shape == (2, 16, 4, 6) and aff.shape == (2, 24, 24)
    assert torch.all((aff >= 0) & (aff <= 1))
    with pytest.raises(ValueError, match="expects 3 block outputs"):
        dec(toks[:2], (4, 6))


def test_decoder_affinity_is_on_the_unnormalised_post_dropout_features():
    """reference_spec 1.8: A_f = sigmoid(F_u^T F_u) on the fused features after Dropout2d, not L2-normalised; in
    training mode the dropped channels are missing from it (and from the returned F_u)."""
    torch.manual_seed(0)
    dec = WeCLIPDecoder(in_dim=32, num_inputs=3, embed_dim=16, num_classes=5, decoder_layers=1, decoder_heads=2,
                        dropout=0.5).train()
    toks = [torch.randn(2, 1 + 4 * 6, 32) for _ in range(3)]
    _, fu, aff = dec(toks, (4, 6))
    f = fu.flatten(2)
    assert (f.abs().sum(-1) == 0).any()  # some channels dropped (p = 0.5 over 16 channels)
    # a sum of 16 products (the sigmoid's slope is at most 1/4) and the sigmoid's own rounding
    ref = torch.sigmoid(f.transpose(1, 2) @ f)
    tol = f32_tolerance(16, f.abs().transpose(1, 2) @ f.abs()) / 4 + f32_tolerance(1, 1.0)
    assert bool(((aff - ref).abs() <= tol).all())
    norms = f.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # not normalised


def test_balanced_loss_equals_reference_and_is_finite_without_foreground():
    logits = torch.randn(2, 4, 8, 8)
    label = torch.randint(0, 4, (2, 8, 8))
    label[0, 0, :3] = 255
    bg = label.clone()
    bg[label != 0] = 255
    fg = label.clone()
    fg[label == 0] = 255
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, bg, ignore_index=255)
                 + torch.nn.functional.cross_entropy(logits, fg, ignore_index=255))
    # Terms: each pixel's cross-entropy (a 4-term log-sum-exp minus the label's logit: it cancels, so scale max |logit|
    # + log 4), then the mean over <= 128 pixels (all >= 0: scale the loss). Plus the loss's eps, exactly: its group
    # means divide by count + 1e-6 instead of count.
    counts = torch.stack([((label == 0).sum()), ((label != 0) & (label != 255)).sum()])
    tol = (f32_tolerance(4 + 2, logits.abs().max() + np.log(4)) + f32_tolerance(label.numel(), ref)
           + 1e-6 / counts.min().item() * ref.abs().item())
    assert_close_f32(balanced_seg_loss(logits, label), ref, tol=tol)
    only_bg = torch.zeros(2, 8, 8, dtype=torch.long)
    assert torch.isfinite(balanced_seg_loss(logits, only_bg))
    only_fg = torch.full((2, 8, 8), 2)
    assert torch.isfinite(balanced_seg_loss(logits, only_fg))


def test_balanced_loss_same_for_channels_last_logits():
    torch.manual_seed(0)
    base = torch.randn(2, 5, 6, 7)
    label = torch.randint(0, 5, (2, 6, 7))
    label[1, 2] = 255
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = base.clone().contiguous(memory_format=fmt).requires_grad_(True)
        loss = balanced_seg_loss(x, label)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    # Exactly equal: the cross-entropy sees the same class-last (N, C) values either way (a view or one copy).
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_affinity_label_and_loss():
    m = radius_mask(3, 3, 1)
    assert m.shape == (9, 9) and m[0, 8].item() is False and m[0, 4].item() is True and torch.equal(m, m.T)
    label = torch.zeros(1, 48, 48, dtype=torch.long)
    label[:, :, 24:] = 5  # right half class 5; nearest downsample to 3x3 picks pixels 16*i
    al = affinity_label(label, (3, 3), radius=1)
    assert al.shape == (1, 9, 9)
    assert al[0, 0, 1] == 1  # (0,0) and (0,1): both background
    assert al[0, 0, 2] == 255  # outside radius 1
    assert al[0, 1, 2] == 0  # (0,1) bg vs (0,2) class 5
    perfect = (al == 1).float()
    assert affinity_loss(perfect, al) < affinity_loss(1 - perfect, al)


def test_lr_schedule_matches_reference():
    kw = dict(warmup_iters=50, warmup_ratio=1e-6, max_iters=30000, power=1.0)
    assert lr_multiplier(0, **kw) == pytest.approx(1e-6)
    assert lr_multiplier(25, **kw) == pytest.approx(1 - 0.5 * (1 - 1e-6))
    assert lr_multiplier(50, **kw) == pytest.approx(1 - 50 / 30000)
    assert lr_multiplier(29999, **kw) == pytest.approx(1 / 30000)


def test_lr_schedule_keeps_last_value_past_max_iters():
    # PolyWarmupAdamW stops updating at max_iter: the lr stays at step max_iter - 1's value, never 0.
    kw = dict(warmup_iters=50, warmup_ratio=1e-6, max_iters=30000, power=0.9)
    last = lr_multiplier(29999, **kw)
    assert last == pytest.approx((1 / 30000) ** 0.9) and last > 0
    for step in (30000, 30001, 45000):
        assert lr_multiplier(step, **kw) == last
    short = dict(warmup_iters=50, warmup_ratio=1e-6, max_iters=20, power=1.0)  # max_iters inside the warmup
    assert lr_multiplier(25, **short) == lr_multiplier(19, **short) == pytest.approx(1 - (1 - 19 / 50) * (1 - 1e-6))


def _opts(synthetic_root, tmp_path, **extra):
    opts = {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "data.crop_size": 64,
            "data.num_workers": 0, "train.batch_size": 2, "train.log_interval": 1, "train.val_interval": 0,
            "head.rfm.start_step": 2}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def test_gradients_reach_only_the_head(synthetic_root):
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config

    cfg = load_config(TINY, {"data.root": str(synthetic_root), "head.rfm.start_step": 0})
    stack = build_stage1(cfg, torch.device("cpu"))
    batch = TrainBatch(images=torch.randn(2, 3, 64, 64), labels=[np.array([3]), np.array([5, 7])])
    out = stack.head.forward_train(batch, step=1)
    out["loss"].backward()
    assert all(p.grad is None for p in stack.clip_model.parameters())
    assert not any(p.requires_grad for p in stack.clip_model.parameters())
    head_params = [p for p in stack.head.parameters()]
    assert head_params and all(p.grad is not None for p in head_params)
    assert set(stack.head.state_dict()) == {f"decoder.{k}" for k in stack.head.decoder.state_dict()}
    label = out["pseudo_label"]
    assert label.shape == (2, 64, 64)
    assert set(label[0].unique().tolist()) <= {0, 3} and set(label[1].unique().tolist()) <= {0, 5, 7}
    # Only the maps the pseudo labels read are computed (max of cam.attn_layers and head.rfm.layers) ...
    assert stack.cam_source.attn_layers == max(cfg.cam.attn_layers, cfg.head.rfm.layers) == 8
    # ... and the labels equal those from all maps.
    torch.manual_seed(0)
    x, keys = torch.randn(2, 3, 64, 64), [np.array([3]), np.array([5, 7])]
    cam_out = stack.cam_source(x, keys)
    stack.cam_source.attn_layers = stack.backbone.num_blocks
    cam_all = stack.cam_source(x, keys)
    _, _, aff = stack.head.decode(cam_out.features)
    labels = [stack.head.pseudo_labels(x, c.cams, c.keys, c.attn, aff.detach(), out_size=(64, 64))[0]
              for c in (cam_out, cam_all)]
    torch.testing.assert_close(labels[0], labels[1])
    # Per step the head asks for the maps that step reads: attn_layers before RFM starts, rfm.layers after.
    asked = []
    real = stack.cam_source

    def spy(images, labels, *, attn_layers=None):
        out = real(images, labels, attn_layers=attn_layers)
        asked.append((attn_layers, out.attn.shape[1]))
        return out

    object.__setattr__(stack.head, "cam_source", spy)
    stack.head.pseudo.rfm_start_step = 5
    for step in (4, 5):
        stack.head.forward_train(TrainBatch(images=x, labels=keys), step=step)
    assert asked == [(cfg.cam.attn_layers, cfg.cam.attn_layers), (cfg.head.rfm.layers, cfg.head.rfm.layers)] \
        and cfg.cam.attn_layers != cfg.head.rfm.layers


def test_validation_scores_the_rfm_ablation_on_the_same_decoder(synthetic_root):
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config
    from stage1_cam.train import validate

    torch.manual_seed(0)
    cfg = load_config(TINY, {"data.root": str(synthetic_root)})
    stack = build_stage1(cfg, torch.device("cpu"))
    both = validate(stack, cfg, torch.device("cpu"), max_images=3)
    assert set(both) == {"pseudo_miou", "pseudo_no_rfm_miou", "decoder_miou", "images", "pseudo_miou_gt",
                         "pseudo_no_rfm_miou_gt", "decoder_miou_gt", "figures"}
    assert list(both["figures"]) == ["pseudo", "pseudo_no_rfm", "decoder"]  # the head's labels, in its order
    assert stack.head.training  # validation puts the head back in training mode
    # The ablation figure is what the same head scores with RFM switched off.
    stack.head.pseudo = dataclasses.replace(stack.head.pseudo, rfm_enabled=False)
    plain = validate(stack, cfg, torch.device("cpu"), max_images=3)
    assert set(plain) == {"pseudo_miou", "decoder_miou", "images", "pseudo_miou_gt", "decoder_miou_gt", "figures"}
    assert plain["pseudo_miou"] == both["pseudo_no_rfm_miou"] and plain["decoder_miou"] == both["decoder_miou"]


def test_validation_parity_keeps_dropout_on_and_crops_the_input_without_touching_the_training_rng(tmp_path):
    """train.val_parity (reference_spec 1.11, 7.1 item 3, 1.2): the decoder's dropout stays on and the network sees
    the image cropped to a patch multiple; by default dropout is off and the image is resized. Either way the
    training RNG stream is what it was, and the head is back in training mode."""
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config
    from stage1_cam.data.synthetic import generate_synthetic
    from stage1_cam.train import validate

    root = tmp_path / "synthetic"
    generate_synthetic(root, num_train=2, num_val=2, image_size=(90, 122), max_objects=2, seed=1)
    seen, cpu = [], torch.device("cpu")
    for parity in (False, True):
        cfg = load_config(TINY, {"data.root": str(root), "train.val_parity": parity})
        torch.manual_seed(0)
        stack = build_stage1(cfg, cpu)
        head, real = stack.head, stack.head.validation_figures

        def spy(images, labels, *, out_size, full_images, parity=parity, head=head, real=real):
            seen.append((parity, images.clone(), full_images.clone(), head.decoder.dropout.training, head.training))
            return real(images, labels, out_size=out_size, full_images=full_images)

        head.validation_figures = spy
        rng = torch.get_rng_state()
        first = validate(stack, cfg, cpu)
        assert torch.equal(torch.get_rng_state(), rng)
        assert validate(stack, cfg, cpu) == first  # the dropout draws repeat: the logged figures are reproducible
        assert head.training and head.decoder.dropout.training
    assert len(seen) == 8 and {s[0] for s in seen} == {False, True}
    for parity, net_in, full, dropout_on, head_training in seen:
        assert full.shape[-2:] == (90, 122) and net_in.shape[-2:] == (80, 112) and not head_training
        assert dropout_on == parity
        assert torch.equal(net_in, full[..., :80, :112]) == parity


def test_twenty_steps_lower_the_loss_and_write_a_checkpoint(synthetic_root, tmp_path):
    assert train_main([TINY, "--run", "t20", "--cfg-options",
                       *_opts(synthetic_root, tmp_path, **{"train.max_iters": 20, "train.ckpt_interval": 10})]) == 0
    run = tmp_path / "runs" / "synthetic" / "t20"
    summary = json.loads((run / "stage1" / "train_summary.json").read_text())
    losses = [v for _, v in summary["loss_curve"]]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    ckpt = load_checkpoint(run / "stage1" / "checkpoints" / "final.pth")
    assert ckpt["step"] == 20 and ckpt["head_type"] == "weclip" and ckpt["config_hash"]
    assert (run / "stage1" / "checkpoints" / "iter_000010.pth").is_file()
    # Re-running the same command is a no-op (the final checkpoint exists for this config).
    mtime = (run / "stage1" / "checkpoints" / "final.pth").stat().st_mtime
    assert train_main([TINY, "--run", "t20", "--cfg-options",
                       *_opts(synthetic_root, tmp_path, **{"train.max_iters": 20, "train.ckpt_interval": 10})]) == 0
    assert (run / "stage1" / "checkpoints" / "final.pth").stat().st_mtime == mtime


def test_resume_continues_exactly(synthetic_root, tmp_path):
    common = _opts(synthetic_root, tmp_path, **{"train.max_iters": 4, "train.ckpt_interval": 2})
    assert train_main([TINY, "--run", "full", "--cfg-options", *common]) == 0
    full = load_checkpoint(tmp_path / "runs" / "synthetic" / "full" / "stage1" / "checkpoints" / "final.pth")
    mid = tmp_path / "runs" / "synthetic" / "full" / "stage1" / "checkpoints" / "iter_000002.pth"
    assert train_main([TINY, "--run", "resumed", "--resume", str(mid), "--cfg-options", *common]) == 0
    resumed = load_checkpoint(tmp_path / "runs" / "synthetic" / "resumed" / "stage1" / "checkpoints" / "final.pth")
    assert resumed["step"] == 4
    for k, v in full["head"].items():
        assert torch.equal(v, resumed["head"][k]), k


def test_resume_refuses_other_config(synthetic_root, tmp_path):
    common = _opts(synthetic_root, tmp_path, **{"train.max_iters": 2, "train.ckpt_interval": 1})
    assert train_main([TINY, "--run", "a", "--cfg-options", *common]) == 0
    ck = tmp_path / "runs" / "synthetic" / "a" / "stage1" / "checkpoints" / "iter_000001.pth"
    other = _opts(synthetic_root, tmp_path, **{"train.max_iters": 3, "train.ckpt_interval": 1, "train.lr": 1e-3})
    assert train_main([TINY, "--run", "b", "--resume", str(ck), "--cfg-options", *other]) == 2


@pytest.mark.slow
def test_ddp_two_processes_log_once_seed_per_rank_and_resume_exactly(synthetic_root, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 alone logs and writes, per-rank RNG states, exact resume."""
    common = _opts(synthetic_root, tmp_path, **{"train.max_iters": 4, "train.ckpt_interval": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args):
        # Options go through --cfg-options: torchrun's own parser takes "--run" for its "--run-path".
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "stage1_cam.train", TINY, *args]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]  # torchrun: every rank exited 0
        assert "terminate called" not in out.stderr, out.stderr[-3000:]  # no rank aborted at exit (issue 16)

    torchrun("--cfg-options", "run.name=ddp", *common)
    run = tmp_path / "runs" / "synthetic" / "ddp"
    log = (run / "stage1" / "train.log").read_text()
    assert "batch 2 x 2 process(es)" in log
    assert log.count("step 3/4 loss") == 1  # one line per step: only rank 0 logs
    full = load_checkpoint(run / "stage1" / "checkpoints" / "final.pth")
    assert full["step"] == 4 and isinstance(full["rng"], list) and len(full["rng"]) == 2
    assert not torch.equal(full["rng"][0]["torch"], full["rng"][1]["torch"])  # seeded per rank
    mid = run / "stage1" / "checkpoints" / "iter_000002.pth"
    torchrun("--resume", str(mid), "--cfg-options", "run.name=ddp_resumed", *common)
    resumed = load_checkpoint(tmp_path / "runs" / "synthetic" / "ddp_resumed" / "stage1" / "checkpoints" / "final.pth")
    assert resumed["step"] == 4
    for k, v in full["head"].items():
        assert torch.equal(v, resumed["head"][k]), k
