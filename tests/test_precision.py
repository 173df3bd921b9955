"""``train.amp``: which autocast dtype each device gets, native-bf16 detection, and the CPU paths that use it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stage1_cam.utils import precision
from stage1_cam.utils.precision import (autocast_dtype, cpu_features, images_per_pass, native_bf16_cpu, precision_name,
                                        whole_batch_passes)

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize("native", [True, False])
def test_autocast_dtype_table(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: native)
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert autocast_dtype("bf16", CPU) == torch.bfloat16  # asked for: emulated where not native
    assert autocast_dtype("fp16", CPU) is None and autocast_dtype("none", CPU) is None
    assert autocast_dtype("auto", CUDA) == autocast_dtype("bf16", CUDA) == torch.bfloat16
    assert autocast_dtype("fp16", CUDA) == torch.float16 and autocast_dtype("none", CUDA) is None
    with pytest.raises(ValueError, match="amp='fp8' is not one of auto, bf16, fp16, none"):
        autocast_dtype("fp8", CPU)
    assert [precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "float32"]


def test_native_bf16_needs_the_flag_and_the_avx512_kernels(monkeypatch):
    monkeypatch.setattr(precision, "_torch_probe", lambda name: None)  # only /proc/cpuinfo speaks
    for flags, capability, expected in [({"avx2", "avx512f", "avx512_bf16"}, "AVX512", True),
                                        ({"avx2", "amx_bf16", "avx512f"}, "AVX512", True),
                                        ({"avx2", "avx512f"}, "AVX512", False),  # AVX-512 without bf16: emulated
                                        ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", False),  # ATEN_CPU_CAPABILITY
                                        ({"avx2"}, "AVX2", False)]:
        monkeypatch.setattr(precision, "_cpuinfo_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert native_bf16_cpu() is expected, (flags, capability)
        feats = cpu_features()
        assert feats["native_bf16"] is expected and feats["aten_capability"] == capability
        assert feats["avx512_bf16"] is ("avx512_bf16" in flags)
    # Either source of a feature is enough, in the record as in the decision: a probe that says no does not hide the
    # flag, nor the reverse.
    for flag_on, probe_on in [(True, False), (False, True)]:
        flags = frozenset({"avx512f", "avx512_bf16"} if flag_on else {"avx512f"})
        monkeypatch.setattr(precision, "_cpuinfo_flags", lambda flags=flags: flags)
        monkeypatch.setattr(precision, "_torch_probe", lambda name, on=probe_on: on)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert cpu_features()["avx512_bf16"] is True and native_bf16_cpu() is True
    json.dumps(cpu_features())  # recorded in bench JSON as is


def test_images_per_pass_one_on_a_cpu_the_batch_elsewhere():
    assert [images_per_pass(torch.device("cpu"), b) for b in (0, 1, 4)] == [1, 1, 1]
    assert [images_per_pass(torch.device("cuda", 0), b) for b in (0, 1, 4)] == [1, 1, 4]
    assert images_per_pass("meta", 3) == 3
    with whole_batch_passes():  # a GPU's loop shapes on the CPU
        assert [images_per_pass(torch.device("cpu"), b) for b in (0, 1, 4)] == [1, 1, 4]
    assert images_per_pass(torch.device("cpu"), 4) == 1


def test_cpu_bf16_training_and_dump_run_in_bf16_and_agree_with_float32(synthetic_root, tmp_path):
    """A CPU training step and the dump's network pass under bf16 autocast: reported as bf16, finite, and the
    dump's class decisions agree with float32 on most pixels (the GradCAM block itself stays float32)."""
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config
    from stage1_cam.dump import Predictor
    from stage1_cam.train import main as train_main

    opts = {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "data.crop_size": 64,
            "data.num_workers": 0, "train.batch_size": 2, "train.max_iters": 2, "train.val_interval": 0,
            "train.amp": "bf16"}
    assert train_main([TINY, "--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]) == 0
    summary = json.loads((tmp_path / "runs/synthetic" / load_config(TINY, opts).run.name /
                          "stage1/train_summary.json").read_text())
    assert summary["precision"] == "bf16" and np.isfinite(summary["final_loss"])

    torch.manual_seed(0)
    stack = build_stage1(load_config(TINY, {"data.root": str(synthetic_root)}), CPU)
    head = stack.head.eval()
    seen = []
    head.decoder.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype if isinstance(o, tuple) else o.dtype))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    kw = dict(predict=head.predict_logits, patch_size=stack.backbone.patch_size, num_classes=len(stack.class_names),
              mean=stack.mean, std=stack.std)
    fp32 = Predictor(**kw, amp_dtype=None)(x)
    bf16 = Predictor(**kw, amp_dtype=torch.bfloat16)(x)
    assert seen == [torch.float32, torch.bfloat16]  # the decoder really ran in bf16 under the CPU autocast
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    # bf16 keeps 8 significant bits: logits move by ~1% of their scale, and only near-ties change class.
    assert (bf16 - fp32).norm() / fp32.norm() < 0.05
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("native", [False, True])
def test_auto_follows_the_cpu_in_training_and_the_cam_run(synthetic_root, tmp_path, monkeypatch, native):
    """``train.amp="auto"`` (the configs' default) trains and computes CAMs in bf16 exactly where the CPU has native
    bf16, and the CAM shards record what it resolved to (a resume elsewhere must not mix precisions)."""
    from stage1_cam.cams.__main__ import main as cams_main
    from stage1_cam.config import load_config
    from stage1_cam.io import ShardReader
    from stage1_cam.train import main as train_main

    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: native)
    opts = {"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "data.crop_size": 64,
            "data.num_workers": 0, "train.batch_size": 2, "train.max_iters": 1, "train.val_interval": 0,
            "train.amp": "auto", "data.eval_split": "val"}
    argv = [TINY, "--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]
    expected = "bf16" if native else "float32"
    assert train_main(argv) == 0
    run = tmp_path / "runs/synthetic" / load_config(TINY, opts).run.name
    assert json.loads((run / "stage1/train_summary.json").read_text())["precision"] == expected
    assert cams_main(argv) == 0
    with ShardReader(run / "cams", allow_incomplete=True) as r:
        assert r.meta["extra"]["precision"] == expected
