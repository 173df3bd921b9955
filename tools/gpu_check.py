"""Same results on a GPU (or in CPU bf16): ``python -m tools.gpu_check [--device cpu] [--out bench/results]``.

One WeCLIP training forward/backward and one dump-path prediction of the same ViT-B/16 head (random weights,
VOC classes, RFM on, batch 4, 320x320 synthetic-world crops with their own labels) on the CPU in float32
(the reference) and on the GPU in float32, bf16 and fp16 autocast. Prints and saves
(``<name>-cuda.json``) per mode: relative error of the CAMs, the decoder logits, the loss and the head's
gradient (dropout off; also against the CPU's pseudo labels as fixed targets), the share of pixels whose
online pseudo label agrees with the CPU's, and the dump logits' relative error and argmax agreement.
``--weights world:default`` runs the same on the trained synthetic-world CLIP (peaked CAMs, like real CLIP's,
where random weights give near-ties that any rounding flips). ``--device cpu`` compares the CPU's bf16 autocast
(``train.amp="auto"`` on a CPU with native bf16) against its float32 the same way.
``--sync-check`` instead counts the host<->device synchronisations of WeCLIP training steps on the GPU with
``torch.cuda.set_sync_debug_mode("warn")`` (forward, backward, AdamW step and the loop's loss bookkeeping, after
one warm-up step; RFM on) and saves ``<name>-syncs-cuda.json``; the expected count is 0 (issue 20).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from stage1_cam.heads import TrainBatch
from stage1_cam.utils.cli import run_main
from stage1_cam.utils.precision import autocast, cpu_features

from .bench import save_results

_logger = logging.getLogger(__name__)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _crops(size: int, batch: int, mean: Any, std: Any) -> tuple:
    """Image-like normalised crops and their labels from a small synthetic world."""
    from stage1_cam.data import build_dataset
    from stage1_cam.data.synthetic import generate_synthetic
    from stage1_cam.data.transforms import normalize

    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(Path(tmp) / "s", num_train=batch, num_val=1, image_size=(size, size), seed=3)
        ds = build_dataset("synthetic", str(Path(tmp) / "s"), "train")
        names = list(ds.names[:batch])
        imgs = np.stack([normalize(ds.load_image(n), mean, std) for n in names])
        keys = [np.asarray(ds.image_labels(n)) for n in names]
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().float(), keys


def _grad(head: Any) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in head.parameters() if p.grad is not None]).cpu()


def _run(stack: Any, x: torch.Tensor, keys: List[np.ndarray], amp: Optional[torch.dtype],
         targets: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """One training forward/backward and one dump prediction, and the head's gradient of the loss against fixed
    pseudo labels ``targets`` (default: this run's own), which isolates the precision of the backward."""
    from stage1_cam.losses import weclip_loss

    head = stack.head
    device = next(head.parameters()).device
    x = x.to(device)
    head.train()
    for m in head.modules():  # dropout off: its masks come from different generators on the two devices
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    captured: Dict[str, Any] = {}
    with autocast(device, amp):
        head.cam_source = _Spy(head.cam_source, captured)
        try:
            out = head.forward_train(TrainBatch(images=x, labels=keys), step=0)
        finally:
            head.cam_source = head.cam_source.inner
    head.zero_grad(set_to_none=True)
    out["loss"].float().backward()
    res = {"cams": torch.cat([c.flatten() for c in captured["cams"]]), "loss": out["loss"].detach().float().cpu(),
           "grad": _grad(head), "pseudo": out["pseudo_label"].cpu()}
    with autocast(device, amp):
        feats = head.backbone(x, num_blocks=head.num_inputs, with_attn=False)
        logits, _, aff = head.decode(feats)
    res["logits"] = logits.detach().float().cpu()
    targets = out["pseudo_label"] if targets is None else targets.to(device)
    fixed = weclip_loss(logits.float(), aff.float(), targets, grid=feats.grid, radius=head.aff_radius,
                        aff_weight=head.aff_weight)["loss"]
    head.zero_grad(set_to_none=True)
    fixed.backward()
    res["grad_fixed_targets"] = _grad(head)
    head.eval()
    with autocast(device, amp):
        res["dump_logits"] = head.predict_logits(x).float().cpu()
    return res


class _Spy:
    """Wraps the CAM source to keep its CAMs (the head calls it once per training forward)."""

    def __init__(self, inner: Any, captured: Dict[str, Any]) -> None:
        self.inner, self.captured = inner, captured

    def __call__(self, *a: Any, **k: Any) -> Any:
        out = self.inner(*a, **k)
        self.captured["cams"] = [c.detach().float().cpu() for c in out.cams]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


MODES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def compare(model: str, size: int, batch: int, device: torch.device, modes: Sequence[str] = tuple(MODES),
            weights: Optional[str] = None) -> Dict[str, Any]:
    """Figures of ``device`` in each autocast mode against the CPU in float32 (see the module doc)."""
    from stage1_cam.build import build_stage1
    from stage1_cam.config import default_config

    cfg = default_config({"clip.model_name": model, "clip.pretrained": None, "clip.weights": weights,
                          "data.dataset": "voc", "data.crop_size": size, "head.rfm.start_step": 0})
    torch.manual_seed(0)
    cpu_stack = build_stage1(cfg, torch.device("cpu"))
    x, keys = _crops(size, batch, cpu_stack.mean, cpu_stack.std)
    state = {k: v.clone() for k, v in cpu_stack.head.state_dict().items()}
    ref = _run(cpu_stack, x, keys, None)
    cpu_backbone = cpu_stack.backbone.state_dict()
    cpu_text = cpu_stack.head.cam_source.fg_text
    del cpu_stack
    stack = build_stage1(cfg, device)
    stack.head.load_state_dict(state)
    # The frozen CLIP is built from a fixed seed on either device, and the CAM text embeddings from it on the
    # device: both must match the CPU's before any comparison means something.
    weights_err = max(_rel(b, a) for a, b in zip(cpu_backbone.values(), stack.backbone.state_dict().values())
                      if a.is_floating_point())
    text_err = _rel(stack.head.cam_source.fg_text, cpu_text)
    res: Dict[str, Any] = {"settings": {"model": model, "weights": weights, "size": size, "batch": batch,
                                        "labels": [k.tolist() for k in keys], "rfm": True,
                                        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                                        "tf32_cudnn": torch.backends.cudnn.allow_tf32},
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__,
                           "clip_weights_rel_err": weights_err, "text_embedding_rel_err": text_err}
    for name in modes:
        out = _run(stack, x, keys, MODES[name], targets=ref["pseudo"])
        res[name] = {"cam_rel_err": _rel(out["cams"], ref["cams"]),
                     "decoder_logits_rel_err": _rel(out["logits"], ref["logits"]),
                     "loss": float(out["loss"]), "loss_cpu": float(ref["loss"]),
                     "grad_rel_err": _rel(out["grad"], ref["grad"]),
                     "grad_fixed_targets_rel_err": _rel(out["grad_fixed_targets"], ref["grad_fixed_targets"]),
                     "pseudo_label_agreement": float((out["pseudo"] == ref["pseudo"]).float().mean()),
                     "dump_logits_rel_err": _rel(out["dump_logits"], ref["dump_logits"]),
                     "dump_argmax_agreement": float((out["dump_logits"].argmax(1)
                                                     == ref["dump_logits"].argmax(1)).float().mean())}
    return res


def sync_check(model: str, size: int, batch: int, steps: int = 3, amp: Optional[str] = "bf16") -> Dict[str, Any]:
    """Synchronisations per WeCLIP training step on CUDA (``torch.cuda.set_sync_debug_mode``), see the module doc."""
    import warnings

    from stage1_cam.build import build_stage1
    from stage1_cam.config import default_config
    from stage1_cam.train import LossHistory

    device = torch.device("cuda")
    cfg = default_config({"clip.model_name": model, "clip.pretrained": None, "data.dataset": "voc",
                          "data.crop_size": size, "head.rfm.start_step": 0})
    torch.manual_seed(0)
    stack = build_stage1(cfg, device)
    head = stack.head
    head.train()
    x, keys = _crops(size, batch, stack.mean, stack.std)
    x = x.pin_memory()
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-4)
    history = LossHistory()
    dtype = MODES[amp] if amp else None

    def step(i: int) -> None:
        tb = TrainBatch(images=x.to(device, non_blocking=True), labels=keys)
        with autocast("cuda", dtype):
            out = head.forward_train(tb, i)
        history.record(i, out["loss"], ["crop"])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    step(0)  # warm-up: lazy initialisation (cuBLAS handles, caches) may synchronise once
    torch.cuda.synchronize()
    per_step = []
    for i in range(1, steps + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(i)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        per_step.append({"step": i, "syncs": len(syncs), "messages": syncs[:20]})
    history.flush()
    return {"settings": {"model": model, "size": size, "batch": batch, "amp": amp, "rfm": True,
                         "labels": [k.tolist() for k in keys]},
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "syncs_per_step": [s["syncs"] for s in per_step], "steps": per_step, "losses": history.values}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; bad input (an unwritable --out, a missing weights file) exits with code 2 and one message."""
    return run_main(_main, argv, logger=_logger)


def _main(argv: Optional[List[str]]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--weights", help="CLIP weights (clip.weights: a file or world:NAME); default: random")
    p.add_argument("--name", default="gpu-consistency", help="JSON file name: <name>-<device>.json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the CPU's bf16 autocast against its own float32")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None,
                   help="autocast modes to compare (default: all on cuda, bf16 on cpu)")
    p.add_argument("--sync-check", action="store_true",
                   help="count host<->device synchronisations per WeCLIP training step instead (CUDA only)")
    args = p.parse_args(argv)
    if args.sync_check:
        if not torch.cuda.is_available():
            p.error("--sync-check needs a CUDA device (on the CPU: tests/test_step_syncs.py)")
        res = sync_check(args.model, args.size, args.batch)
        _logger.info("syncs per step: %s", res["syncs_per_step"])
        save_results(res, Path(args.out) / f"{args.name}-syncs-cuda.json")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: this check compares GPU results against the CPU (--device cpu checks CPU bf16)")
    modes = args.modes or (tuple(MODES) if args.device == "cuda" else ("bf16",))
    res = compare(args.model, args.size, args.batch, torch.device(args.device), modes=modes, weights=args.weights)
    res["cpu"] = cpu_features()
    save_results(res, Path(args.out) / f"{args.name}-{args.device}.json")
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from tools.gpu_check import main as package_main

    raise SystemExit(package_main())
