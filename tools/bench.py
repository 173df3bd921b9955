"""Benchmarks (not tests): ``python -m tools.bench [--only NAME ...] [--out bench/results]``.

Each benchmark prints its figures and saves them as JSON (``bench/results/<name>-<device>.json``), with the
device, the CPU's capabilities (ATen kernel level, native bf16), torch version, settings, and the float32 GEMM rate
measured just before and after it (a machine shared with other work shows there; compare figures only between
runs with similar rates). ViT-B/16 runs with random weights (same shapes and cost as OpenAI's).

- ``cam``: CLIP-ES GradCAM images/s at 320x320 with 2 present classes, batched vs the reference's
  per-(image, class) loop, in one run.
- ``train``: WeCLIP stage-1 training seconds/iteration (median of steps after warm-up) and peak memory,
  batch 4, 320x320, 2 classes per image; for each autocast mode (CUDA: bf16, fp16, float32; a CPU with native
  bf16: bf16, float32).
- ``train_excel``: the same figures for the ExCEL head on the same shapes (SVC maps, LVC and the RFM affinity on:
  the costlier half of its training).
- ``train_heads``: WeCLIP's and ExCEL's steps interleaved in one process (W, E, W, E, ...), per autocast mode, so a
  load swing on a shared machine hits both alike: the medians, ExCEL / WeCLIP, and on CUDA each head's own peak
  memory (``max_memory_allocated`` reset before each step).
- ``train_memory``: on a CPU, an estimate of each head's GPU training-step memory (WeCLIP and ExCEL, per autocast
  mode): one step after two warm-ups with the GPU's loop shapes (whole batch per pass), under ``torch.profiler``'s
  memory timeline; the peak of the live tensors, those from before the step that it uses (weights, optimizer
  state) included. Not a GPU figure (no allocator rounding, CPU kernels' workspaces); on CUDA ``train_heads``
  measures it. Also the ATen operators one such step dispatches (``aten_ops_per_step``, views included; AdamW
  multi-tensor as on CUDA): on a GPU each one that computes is at least one kernel launch, what bounds a step of
  this size there (a CPU's 3x3 maximum in the box masks takes 11 operators where a GPU's max pooling takes 3).
- ``train_weakclip``: the same figures for the WeakCLIP head (320x320, batch 4; includes its CPU CRF loss).
- ``dump``: pseudo-mask dump images/s for 500x375 images (long side 512, scales {1, 0.75} + flip),
  batched vs one image at a time; the backbone FLOPs per image against a measured float32 GEMM rate;
  the real shard dump (``dump_shard``) with the CRF off vs on in a worker process; and the dense CRF's
  seconds per image with 3 labels (label-constrained) vs 21.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stage1_cam.heads import TrainBatch
from stage1_cam.utils.cli import run_main
from stage1_cam.utils.precision import autocast, autocast_dtype, cpu_features, native_bf16_cpu, precision_name

_logger = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> List[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def save_results(res: Dict[str, Any], path: Path) -> None:
    """Write ``res`` as JSON to ``path`` (its folder created) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"saved {path}")


def _cfg(model: str, **overrides: Any):
    from stage1_cam.config import default_config

    return default_config({"clip.model_name": model, "clip.pretrained": None, "data.dataset": "voc", **overrides})


def bench_cam(model: str, size: int, batch: int, repeats: int) -> Dict[str, Any]:
    from stage1_cam.build import build_cam_stack

    device = _device()
    torch.manual_seed(0)
    _, backbone, cam = build_cam_stack(_cfg(model), device)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = [np.array([3, 12]) for _ in range(batch)]
    dtype = autocast_dtype("auto", device)  # what the CAM run uses here (train.amp="auto")

    def run() -> None:
        with autocast(device, dtype):
            cam(x, labels)

    res: Dict[str, Any] = {}
    for mode in ("batched", "looped"):
        cam.looped = mode == "looped"
        run()  # warm-up
        times = _timed(run, device, repeats)
        res[mode] = {"seconds_per_batch": statistics.median(times), "images_per_s": batch / statistics.median(times)}
    cam.looped = False
    res["speedup"] = res["batched"]["images_per_s"] / res["looped"]["images_per_s"]
    return {"settings": {"model": model, "size": size, "batch": batch, "present_classes": 2, "repeats": repeats,
                         "amp": precision_name(dtype)}, **res}


def _stepper(cfg: Any, device: torch.device, x: torch.Tensor, labels: List[np.ndarray],
             amp: str, foreach: Optional[bool] = None) -> Callable[[int], None]:
    """A fresh head of ``cfg`` with AdamW: ``step(i)`` runs training step ``i`` (forward in autocast mode ``amp``,
    backward, update; fp16 with the gradient scaler, as stage1_cam.train). ``foreach``: AdamW's multi-tensor
    update (None: torch's default for the device, as stage1_cam.train; True on CUDA)."""
    from stage1_cam.build import build_stage1

    torch.manual_seed(0)
    head = build_stage1(cfg, device).head.train()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01,
                            foreach=foreach)
    dtype = autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step(i: int) -> None:
        with autocast(device, dtype):
            out = head.forward_train(TrainBatch(images=x, labels=labels), step=i)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _train_steps(cfg: Any, device: torch.device, x: torch.Tensor, labels: List[np.ndarray], steps: int,
                 amp: str) -> Dict[str, Any]:
    """Time ``steps`` training steps (after one warm-up) of a fresh head and optimizer in autocast mode ``amp``."""
    from stage1_cam.utils.dist import peak_memory_mb

    step = _stepper(cfg, device, x, labels, amp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step(0)  # warm-up
    times = [_timed(lambda: step(i), device, 1)[0] for i in range(1, steps + 1)]
    res = {"seconds_per_iter_median": statistics.median(times), "seconds_per_iter_all": times,
           "peak_memory_mib": peak_memory_mb(device)}
    if device.type == "cuda":
        res["peak_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return res


def bench_train_heads(model: str, size: int, batch: int, steps: int,
                      heads: Tuple[str, ...] = ("weclip", "excel")) -> Dict[str, Any]:
    """Interleaved training steps of ``heads`` (:data:`TRAIN_HEADS`) in one process, per autocast mode.

    Returns:
        settings, ``per_amp_mode[mode][head]`` (``seconds_per_iter_median``, ``seconds_per_iter_all`` and on CUDA
        ``peak_memory_mib``), and ``per_amp_mode[mode]["ratio"]``: the second head's median over the first's.
    """
    from stage1_cam.utils.cpu_malloc import retain_freed_memory

    device = _device()
    malloc_tuned = device.type == "cpu" and retain_freed_memory()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = [np.array([3, 12]) for _ in range(batch)]
    per_mode: Dict[str, Any] = {}
    for amp in _modes(device):
        built = {name: _stepper(_cfg(model, **{"data.crop_size": size, "train.batch_size": batch, **TRAIN_HEADS[name]}),
                                device, x, labels, amp) for name in heads}

        def step(name: str, i: int) -> Tuple[float, Optional[float]]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _timed(lambda: built[name](i), device, 1)[0]
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            return seconds, peak

        for name in heads:
            step(name, 0)  # warm-up
        times: Dict[str, List[float]] = {n: [] for n in heads}
        peaks: Dict[str, List[float]] = {n: [] for n in heads}
        for i in range(1, steps + 1):
            for name in heads:
                sec, peak = step(name, i)
                times[name].append(sec)
                if peak is not None:
                    peaks[name].append(peak)
        res: Dict[str, Any] = {}
        for name in heads:
            res[name] = {"seconds_per_iter_median": statistics.median(times[name]),
                         "seconds_per_iter_all": times[name]}
            if peaks[name]:
                res[name]["peak_memory_mib"] = max(peaks[name])
        res["ratio"] = res[heads[1]]["seconds_per_iter_median"] / res[heads[0]]["seconds_per_iter_median"]
        per_mode[amp] = res
        built.clear()  # free this mode's heads before the next mode builds its own
    return {"settings": {"model": model, "heads": list(heads), "size": size, "batch": batch, "present_classes": 2,
                         "steps": steps, "order": "interleaved", "malloc_tuned": malloc_tuned,
                         "overrides": {n: TRAIN_HEADS[n] for n in heads}},
            "per_amp_mode": per_mode,
            "peak_memory_kind": "cuda max_memory_allocated per step" if device.type == "cuda" else
            "not separable on a CPU (one process): see train / train_excel"}


def _timeline_peak_mib(prof: Any) -> Dict[str, float]:
    """Peak live tensor memory of a profiled region from ``torch.profiler``'s memory timeline (``profile_memory``,
    ``record_shapes``, ``with_stack``): tensors from before the region that it uses count from its start, then each
    allocation and free in order."""
    try:
        from torch.profiler._memory_profiler import Action
        timeline = prof._memory_profile().timeline
    except (ImportError, AttributeError) as e:  # a private API: say so rather than guess
        raise RuntimeError(f"this torch {torch.__version__} has no profiler memory timeline ({e})") from e
    live: Dict[Any, int] = {}
    cur = peak = before = 0
    for _, action, key, size in timeline:
        key = key[0] if isinstance(key, tuple) else key
        if action in (Action.PREEXISTING, Action.CREATE):
            if key not in live:
                live[key] = size
                cur += size
                before += size if action == Action.PREEXISTING else 0
        elif action == Action.DESTROY:
            cur -= live.pop(key, 0)
        peak = max(peak, cur)
    return {"peak_mib": peak / 2**20, "before_step_mib": before / 2**20}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (views and in-place ones included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def bench_train_memory(model: str, size: int, batch: int,
                       heads: Tuple[str, ...] = ("weclip", "excel")) -> Dict[str, Any]:
    """The ``train_memory`` estimate (module docstring): per autocast mode and head, the peak live tensor memory of
    one training step run with the GPU's loop shapes on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    from stage1_cam.utils.precision import whole_batch_passes

    device = _device()
    if device.type != "cpu":
        return {"skipped": "a CPU estimate; on CUDA train_heads measures each head's max_memory_allocated"}
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = [np.array([3, 12]) for _ in range(batch)]
    per_mode: Dict[str, Any] = {}
    for amp in _modes(device):
        res: Dict[str, Any] = {}
        for name in heads:
            step = _stepper(_cfg(model, **{"data.crop_size": size, "train.batch_size": batch, **TRAIN_HEADS[name]}),
                            device, x, labels, amp, foreach=True)  # a GPU's AdamW (multi-tensor)
            with whole_batch_passes():
                step(0)
                step(1)  # the optimizer's state exists from here on, as in a long run
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                             with_stack=True) as prof:
                    step(2)
            res[name] = _timeline_peak_mib(prof)
            with whole_batch_passes(), _OpCounter() as ops:
                step(3)
            res[name]["aten_ops_per_step"] = ops.count
            del step, prof
        res["ratio"] = res[heads[1]]["peak_mib"] / res[heads[0]]["peak_mib"]
        per_mode[amp] = res
    return {"settings": {"model": model, "heads": list(heads), "size": size, "batch": batch, "present_classes": 2,
                         "overrides": {n: TRAIN_HEADS[n] for n in heads}, "loop_shapes": "whole batch (a GPU's)"},
            "per_amp_mode": per_mode,
            "peak_memory_kind": "live tensors in one step (torch.profiler memory timeline) on a CPU: a GPU estimate"}


def _modes(device: torch.device) -> Tuple[str, ...]:
    """Autocast modes to time, the configs' default ("auto") first: on CUDA bf16, fp16 and float32; on a CPU with
    native bf16 bf16 and float32; elsewhere float32 only."""
    if device.type == "cuda":
        return ("bf16", "fp16", "none")
    return ("bf16", "none") if native_bf16_cpu() else ("none",)


# Config overrides per benchmarked head: the costlier regime of each (RFM, and ExCEL's LVC, from step 0).
TRAIN_HEADS: Dict[str, Dict[str, Any]] = {
    "weclip": {"head.rfm.start_step": 0},
    "excel": {"head.type": "excel", "cam.source": "excel_svc", "cam.box_threshold": 0.79, "cam.attn_layers": 6,
              "head.lvc_start_step": 0},
}


def bench_train(model: str, size: int, batch: int, steps: int, head: str = "weclip") -> Dict[str, Any]:
    """Seconds per training step and peak memory of ``head`` (:data:`TRAIN_HEADS`), once per autocast mode of
    :func:`_modes` (fp16 with its gradient scaler, none = float32), each from a fresh head and optimizer."""
    from stage1_cam.utils.cpu_malloc import retain_freed_memory

    device = _device()
    malloc_tuned = device.type == "cpu" and retain_freed_memory()  # as stage1_cam.train does on a CPU
    cfg = _cfg(model, **{"data.crop_size": size, "train.batch_size": batch, **TRAIN_HEADS[head]})
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = [np.array([3, 12]) for _ in range(batch)]
    modes = _modes(device)
    per_mode = {amp: _train_steps(cfg, device, x, labels, steps, amp) for amp in modes}
    res = {"settings": {"model": model, "head": head, "size": size, "batch": batch, "present_classes": 2,
                        "steps": steps, "rfm": True, "amp": modes[0], "malloc_tuned": malloc_tuned},
           **per_mode[modes[0]],
           "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}
    if len(modes) > 1:
        res["per_amp_mode"] = per_mode
    return res


def _backbone_gflop(grid: Tuple[int, int], blocks: int, width: int) -> float:
    """Multiply-add FLOPs (x2) of ``blocks`` ViT blocks on one input with patch grid ``grid``."""
    n = 1 + grid[0] * grid[1]
    return blocks * 2 * (12 * n * width ** 2 + 2 * n * n * width) / 1e9


def _gemm_gflops(device: torch.device) -> float:
    """Measured float32 GEMM rate of one ViT-B MLP layer (1538 tokens x 768 -> 3072), the compute ceiling."""
    x, w = torch.randn(1538, 768, device=device), torch.randn(3072, 768, device=device)
    t = min(_timed(lambda: torch.nn.functional.linear(x, w), device, 5))
    return 2 * 1538 * 768 * 3072 / t / 1e9


def bench_dump(model: str, images: int, batch: int) -> Dict[str, Any]:
    import tempfile

    from stage1_cam.build import build_stage1
    from stage1_cam.data import build_dataset
    from stage1_cam.data.synthetic import generate_synthetic
    from stage1_cam.config import CrfCfg, DumpCfg
    from stage1_cam.dump import (OrderedPostprocessor, Predictor, dump_shard, make_crf_executor,
                                 network_size, predict_probs, scaled_size)
    from stage1_cam.io.shards import ShardMeta, ShardWriter
    from stage1_cam.refine.crf import crf_labels

    device = _device()
    torch.manual_seed(0)
    cfg = _cfg(model)
    stack = build_stage1(cfg, device)
    head = stack.head.eval()
    predictor = Predictor(predict=head.predict_logits, patch_size=stack.backbone.patch_size,
                          num_classes=len(stack.class_names), mean=stack.mean, std=stack.std, device=device,
                          amp_dtype=autocast_dtype("auto", device))
    res: Dict[str, Any] = {"precision": precision_name(predictor.amp_dtype)}
    # Image-like inputs (the CRF's bilateral lattice grows with colour noise, so random pixels would
    # misstate its cost): synthetic-world images at VOC's typical 500x375.
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(Path(tmp) / "s", num_train=images, num_val=1, image_size=(375, 500), seed=0)
        ds = build_dataset("synthetic", str(Path(tmp) / "s"), "train")
        names = list(ds.names[:images])
        imgs = [ds.load_image(n) for n in names]
        keys = [np.array([0, 3, 12]) for _ in range(images)]
        for mode, bs in (("batched", batch), ("one_by_one", 1)):
            settings = DumpCfg(long_side=512, scales=(1.0, 0.75), flip=True, batch_size=bs, crf=CrfCfg(enabled=False))
            predict_probs(predictor, imgs[:bs], keys[:bs], settings=settings)  # warm-up

            def run() -> None:
                for i in range(0, images, bs):
                    predict_probs(predictor, imgs[i:i + bs], keys[i:i + bs], settings=settings)

            t = _timed(run, device, 1)[0]
            res[mode] = {"batch_size": bs, "images_per_s": images / t, "seconds_per_image": t / images}
        res["batched_speedup"] = res["batched"]["images_per_s"] / res["one_by_one"]["images_per_s"]
        if predictor.amp_dtype is not None and device.type == "cpu":  # the same batched pass in float32
            fp32 = dataclasses.replace(predictor, amp_dtype=None)
            settings = DumpCfg(long_side=512, scales=(1.0, 0.75), flip=True, batch_size=batch,
                               crf=CrfCfg(enabled=False))
            t = _timed(lambda: [predict_probs(fp32, imgs[i:i + batch], keys[i:i + batch], settings=settings)
                                for i in range(0, images, batch)], device, 1)[0]
            res["batched_float32"] = {"images_per_s": images / t, "seconds_per_image": t / images}
        # How close the network pass is to the compute ceiling: backbone FLOPs per image vs a measured GEMM.
        bb = stack.backbone
        size = network_size(375, 500, long_side=512, patch=bb.patch_size)
        grids = [tuple(x // bb.patch_size for x in scaled_size(size, sc, bb.patch_size)) for sc in (1.0, 0.75)]
        gflop = 2 * sum(_backbone_gflop(g, head.num_inputs, bb.width) for g in grids)  # x2: flip
        res["compute"] = {"backbone_gflop_per_image": gflop,
                          "achieved_gflops": gflop / res["batched"]["seconds_per_image"],
                          "fp32_gemm_gflops": _gemm_gflops(device)}
        # The real dump path (dump_shard into an HDF5 shard, the images' own 1-3 labels): CRF off vs on in
        # worker processes.
        meta = ShardMeta(dataset="synthetic", split="train", class_names=tuple(stack.class_names),
                         palette=[(0, 0, 0)] * len(stack.class_names))

        e2e: Dict[str, Any] = {}
        for mode, crf_on in (("crf_off", False), ("crf_on", True)):
            # One CRF worker on a CPU (the other core runs the network); on a GPU machine, cores - 1.
            crf = dataclasses.replace(DumpCfg.from_config(cfg).crf, enabled=crf_on,
                                      workers=1 if device.type == "cpu" and crf_on else 0)
            settings = DumpCfg(long_side=512, scales=(1.0, 0.75), flip=True, batch_size=batch, crf=crf)
            executor = make_crf_executor(settings)
            try:
                post = OrderedPostprocessor(settings=settings, executor=executor,
                                            max_in_flight=2 * settings.num_crf_workers() + 2 * batch)
                # Warm-up on a few images (workers started, model and caches warm): a real shard is thousands of
                # images, so start-up would otherwise weigh far more here than there.
                with ShardWriter(Path(tmp) / f"{mode}-warm-up", 0, 1, meta=meta) as writer:
                    dump_shard(predictor, ds, names[:2 * batch], writer, settings=settings, postprocessor=post,
                               progress=False)
                with ShardWriter(Path(tmp) / mode, 0, 1, meta=meta) as writer:
                    stats = dump_shard(predictor, ds, names, writer, settings=settings, postprocessor=post,
                                       progress=False)
            finally:
                if executor is not None:
                    executor.shutdown(wait=True)
            e2e[mode] = {"images_per_s": stats["images_per_s"], "crf_workers": settings.num_crf_workers()}
        e2e["crf_on_over_off"] = e2e["crf_on"]["images_per_s"] / e2e["crf_off"]["images_per_s"]
        res["dump_shard"] = e2e
    probs21 = predict_probs(predictor, imgs[:1], [np.arange(21)], settings=settings)[0].astype(np.float32)
    crf_t = {}
    for k in (3, 21):
        p = probs21[:k] / probs21[:k].sum(0, keepdims=True)
        t = time.perf_counter()
        crf_labels(imgs[0], p, np.arange(k))
        crf_t[f"{k}_labels_seconds"] = time.perf_counter() - t
    res["crf_seconds_per_image"] = crf_t
    res["reference_seconds_per_image_no_crf"] = 3.2  # the reference code on the 2-core CPU (bench/README.md)
    return {"settings": {"model": model, "image": "500x375", "long_side": 512, "scales": [1.0, 0.75], "flip": True,
                         "images": images, "present_classes": 2}, **res}


BENCHES = {"cam": lambda a: bench_cam(a.model, a.size, a.batch, a.repeats),
           "train": lambda a: bench_train(a.model, a.size, 4, a.steps),
           "train_excel": lambda a: bench_train(a.model, a.size, 4, a.steps, head="excel"),
           "train_heads": lambda a: bench_train_heads(a.model, a.size, 4, max(a.steps, 5)),
           "train_memory": lambda a: bench_train_memory(a.model, a.size, 4),
           "dump": lambda a: bench_dump(a.model, a.images, a.batch),
           "train_weakclip": lambda a: _bench_weakclip(a)}


def bench_train_weakclip(*, model: str = "ViT-B-16", size: int = 320, batch: int = 4, steps: int = 3,
                         device: Optional[torch.device] = None) -> Dict[str, Any]:
    """WeakCLIP training seconds/iteration and peak memory (random CLIP weights, VOC classes).

    One warm-up step, then ``steps`` timed steps (forward with the CPU CRF, backward, AdamW) on random
    images and blocky random masks; autocast as ``train.amp="auto"`` picks it (bf16 on CUDA and on CPUs with native
    bf16).

    Returns:
        settings, ``seconds_per_iter_median``, ``seconds_per_iter_all``, ``peak_memory_mib`` and its kind.
    """
    from stage1_cam.build import build_stage1
    from stage1_cam.config import default_config
    from stage1_cam.constants import IGNORE_INDEX
    from stage1_cam.utils.dist import peak_memory_mb

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    cfg = default_config({"clip.model_name": model, "clip.pretrained": None, "data.dataset": "voc",
                          "head.type": "weakclip", "head.decoder_heads": 4, "data.crop_size": size,
                          "train.batch_size": batch})
    torch.manual_seed(0)
    stack = build_stage1(cfg, device)
    head = stack.head.train()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-4, weight_decay=3e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    blocks = torch.tensor([0, 3, 12, IGNORE_INDEX])[torch.randint(0, 4, (batch, size // 32, size // 32), generator=g)]
    masks = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2)
    masks = F.pad(masks, (0, size - masks.shape[-1], 0, size - masks.shape[-2]), value=IGNORE_INDEX).to(device)
    dtype = autocast_dtype("auto", device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> float:
        sync()
        t = time.perf_counter()
        with autocast(device, dtype):
            out = head.forward_train(TrainBatch(images=x, labels=[], masks=masks), i)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sync()
        return time.perf_counter() - t

    step(0)  # warm-up
    times = [step(i + 1) for i in range(steps)]
    n_train = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return {"settings": {"model": model, "size": size, "batch": batch, "steps": steps, "amp": precision_name(dtype),
                         "trainable_parameters": n_train},
            "seconds_per_iter_median": statistics.median(times), "seconds_per_iter_all": times,
            "peak_memory_mib": peak_memory_mb(device),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


def _bench_weakclip(a: argparse.Namespace) -> Dict[str, Any]:
    return bench_train_weakclip(model=a.model, size=a.size, batch=4, steps=a.steps, device=_device())


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; bad input (an unwritable --out, a missing weights file) exits with code 2 and one message."""
    return run_main(_main, argv, logger=_logger)


def _main(argv: Optional[List[str]]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=4, help="images per CAM batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="images in the dump benchmark")
    args = p.parse_args(argv)
    if len(args.only) > 1:
        # One process per benchmark: peak memory (process peak RSS on a CPU) must not carry over from the
        # benchmark before, and allocator/thread-pool state stays comparable.
        rest = [f"--{k}={v}" for k, v in vars(args).items() if k != "only"]
        for name in args.only:
            subprocess.run([sys.executable, "-m", "tools.bench", "--only", name, *rest], check=True)
        return 0
    device = _device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    for name in args.only:
        t = time.time()
        gemm_before = _gemm_gflops(device)
        res = BENCHES[name](args)
        # A shared or throttled machine shows here: the same GEMM measured around the benchmark.
        res.update({"benchmark": name, "device": _device_name(device), "torch": torch.__version__,
                    "cpu": cpu_features(),
                    "wall_seconds": time.time() - t,
                    "fp32_gemm_gflops_before_after": [gemm_before, _gemm_gflops(device)]})
        save_results(res, out / f"{name}-{tag}.json")
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from tools.bench import main as package_main

    raise SystemExit(package_main())
