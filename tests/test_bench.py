"""The benchmark and GPU-check helpers on the tiny CLIP (CPU): figures are produced and sane."""

import numpy as np
import pytest
import torch

from stage1_cam.build import build_stage1
from stage1_cam.config import default_config
from stage1_cam.utils.precision import native_bf16_cpu
from tests.numerics import f32_tolerance, vit_block_terms
from tools import bench, gpu_check


@pytest.mark.parametrize("head", sorted(bench.TRAIN_HEADS))
def test_bench_train_reports_steps_and_peak_rss(head):
    res = bench.bench_train("wsss-tiny-ViT-16", 64, 2, 2, head=head)
    assert res["settings"]["head"] == head
    modes = ("bf16", "none") if native_bf16_cpu() else ("none",)  # bf16 timed only where the CPU has it natively
    assert res["settings"]["amp"] == modes[0] and set(res.get("per_amp_mode", {"none": 0})) == set(modes)
    assert len(res["seconds_per_iter_all"]) == 2 and all(t > 0 for t in res["seconds_per_iter_all"])
    assert res["seconds_per_iter_median"] == float(np.median(res["seconds_per_iter_all"]))
    assert res["peak_memory_kind"] == "process peak RSS" and res["peak_memory_mib"] > 50


def test_timeline_peak_counts_live_tensors_in_order():
    from torch.profiler import ProfilerActivity, profile

    base = torch.zeros(2**18)  # 1 MiB from before the region, which uses it
    unused = torch.zeros(2**18)  # not seen by the profiler
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        base.add_(1.0)
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**21)  # 8 MiB: 13 MiB live with base
        del a
        c = torch.ones(2**19)  # 2 MiB: 11 MiB live
        del b, c
    res = bench._timeline_peak_mib(p)
    assert res["peak_mib"] == pytest.approx(13.0, abs=0.01) and res["before_step_mib"] == pytest.approx(1.0, abs=0.01)
    assert base.numel() == unused.numel() == 2**18


@pytest.mark.slow  # the profiler's memory timeline of 8 steps (about 15 s)
def test_bench_train_memory_estimates_each_heads_step():
    res = bench.bench_train_memory("wsss-tiny-ViT-16", 64, 2)
    modes = ("bf16", "none") if native_bf16_cpu() else ("none",)
    assert set(res["per_amp_mode"]) == set(modes) and res["settings"]["loop_shapes"] == "whole batch (a GPU's)"
    for per in res["per_amp_mode"].values():
        w, e = per["weclip"], per["excel"]
        assert w["peak_mib"] > w["before_step_mib"] > 0 and e["peak_mib"] > e["before_step_mib"] > 0
        assert per["ratio"] == e["peak_mib"] / w["peak_mib"]
        assert w["aten_ops_per_step"] > 1000 and e["aten_ops_per_step"] > 1000  # 12 blocks, PAR, boxes, backward


def test_bench_train_heads_interleaves_and_reports_the_ratio():
    res = bench.bench_train_heads("wsss-tiny-ViT-16", 64, 2, 3)
    modes = ("bf16", "none") if native_bf16_cpu() else ("none",)
    assert res["settings"]["order"] == "interleaved" and set(res["per_amp_mode"]) == set(modes)
    for per in res["per_amp_mode"].values():
        w, e = per["weclip"], per["excel"]
        assert len(w["seconds_per_iter_all"]) == len(e["seconds_per_iter_all"]) == 3
        assert per["ratio"] == e["seconds_per_iter_median"] / w["seconds_per_iter_median"] > 0
        assert "peak_memory_mib" not in w  # a CPU process's peak RSS cannot be split between the heads


def test_gpu_check_run_is_deterministic_and_complete_on_cpu():
    cfg = default_config({"clip.model_name": "wsss-tiny-ViT-16", "clip.pretrained": None, "data.dataset": "voc",
                          "data.crop_size": 64, "head.rfm.start_step": 0})
    torch.manual_seed(0)
    stack = build_stage1(cfg, torch.device("cpu"))
    x, keys = gpu_check._crops(64, 2, stack.mean, stack.std)
    assert x.shape == (2, 3, 64, 64) and all(len(k) >= 1 for k in keys)
    a, b = gpu_check._run(stack, x, keys, None), gpu_check._run(stack, x, keys, None)
    assert set(a) == {"cams", "logits", "loss", "grad", "grad_fixed_targets", "pseudo", "dump_logits"}
    # Against its own pseudo labels the fixed-target gradient is the training gradient (dropout off).
    # Up to float32 rounding: the second forward runs the backbone without attention maps (another kernel order).
    # Normwise (the gradient's per-pixel sums cancel, so no element-wise scale holds): terms are the head's input
    # blocks and the decoder's layers, forward and backward.
    tokens = (64 // stack.backbone.patch_size) ** 2 + 1
    terms = 2 * (stack.head.num_inputs * vit_block_terms(stack.backbone.width, tokens)
                 + cfg.head.decoder_layers * vit_block_terms(cfg.head.embed_dim, tokens))
    assert gpu_check._rel(a["grad_fixed_targets"], a["grad"]) <= f32_tolerance(terms, 1.0)
    assert a["cams"].numel() > 0 and a["grad"].abs().sum() > 0 and torch.isfinite(a["loss"])
    assert a["pseudo"].shape == (2, 64, 64) and a["dump_logits"].shape == (2, 21, 4, 4)
    for k in ("cams", "logits", "grad", "grad_fixed_targets", "dump_logits"):
        assert gpu_check._rel(b[k], a[k]) == 0.0, k
    assert not isinstance(stack.head.cam_source, gpu_check._Spy)  # the spy is removed again
    assert gpu_check._rel(a["logits"] + 1e-3 * a["logits"].norm() / a["logits"].numel() ** 0.5, a["logits"]) > 0


def test_gpu_check_compare_on_the_same_device_agrees_exactly():
    res = gpu_check.compare("wsss-tiny-ViT-16", 64, 2, torch.device("cpu"), modes=("fp32",))
    assert res["clip_weights_rel_err"] == 0.0 and res["text_embedding_rel_err"] == 0.0
    f = res["fp32"]
    assert f["loss"] == f["loss_cpu"] and f["pseudo_label_agreement"] == 1.0 and f["dump_argmax_agreement"] == 1.0
    for k in ("cam_rel_err", "grad_rel_err", "grad_fixed_targets_rel_err", "dump_logits_rel_err",
              "decoder_logits_rel_err"):
        assert f[k] == 0.0, k


def test_bench_weakclip_step_reports_time_and_memory():
    res = bench.bench_train_weakclip(model="wsss-tiny-ViT-16", size=64, batch=2, steps=1, device=torch.device("cpu"))
    assert res["seconds_per_iter_median"] > 0 and res["peak_memory_mib"] > 0
    assert res["settings"]["trainable_parameters"] > 0


def test_bench_files_record_the_cpu_and_the_precision(tmp_path):
    """Every saved figure carries the CPU's capabilities next to the GEMM probes, and the CAM benchmark runs in the
    precision the CAM run would pick (train.amp="auto")."""
    import json

    from stage1_cam.utils.precision import autocast_dtype, precision_name

    assert bench.main(["--only", "cam", "--model", "wsss-tiny-ViT-16", "--size", "64", "--batch", "2",
                       "--repeats", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cam-cpu.json").read_text())
    assert set(res["cpu"]) >= {"aten_capability", "avx512_bf16", "amx_bf16", "native_bf16", "threads"}
    assert res["cpu"]["native_bf16"] == native_bf16_cpu() and len(res["fp32_gemm_gflops_before_after"]) == 2
    assert res["settings"]["amp"] == precision_name(autocast_dtype("auto", torch.device("cpu")))
    assert res["batched"]["images_per_s"] > 0 and res["looped"]["images_per_s"] > 0
