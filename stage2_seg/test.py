"""Evaluate a stage-2 checkpoint on the ground-truth val split and write ``metrics.json``.

Usage::

    python -m stage2_seg.test CONFIG CHECKPOINT [--work-dir DIR] [--data-root ROOT] [--aug-test] [--crf]
        [--device cpu|cuda] [--cfg-options key=value ...]

Single-scale results always; ``--aug-test`` adds multi-scale + flip (the config's ``tta_pipeline``: softmax
probabilities averaged over scales and flips, at the original resolution). ``--crf`` runs the dense CRF of
``stage1_cam.refine.crf`` on the final probabilities (multi-scale if ``--aug-test``) and adds a ``*_crf``
entry. ``metrics.json`` (in ``--work-dir``, default: the checkpoint's folder) holds, per mode, ``mIoU``,
``aAcc``, ``mAcc`` and per-class IoU and accuracy for every class by name, as fractions in [0, 1]
(``null`` where a class has neither ground truth nor prediction).

Exit codes: 0 done; 2 bad input (a missing or unparsable config, a config that is not a stage-2 one, a missing,
damaged or foreign checkpoint, an unusable ``--device``, a missing dataset), with a one-line message.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import os.path as osp
import pickle
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from stage1_cam.data.datasets import check_label_values
from stage1_cam.metrics import ConfusionMatrix, json_safe
from stage1_cam.utils.cli import BadInputError, add_cfg_options, run_main
from stage1_cam.utils.files import atomic_write_text, check_torch_file, file_sha256, unreadable_file_error
from stage1_cam.utils.logging import setup_logging, utc_timestamp

from .checkpoint import safe_checkpoint_loading
from .train import apply_data_root, check_override_keys, check_runner_values, load_stage2_config, resolve_data_root

_logger = logging.getLogger(__name__)

METRICS_FORMAT = "wsss-stage2-metrics"
METRICS_VERSION = 1
SINGLE_SCALE = "single_scale"
MSC_FLIP = "msc_flip"

_CHECKPOINT_FIX = "pass a checkpoint that stage2_seg.train wrote with this config (WORK_DIR/iter_N.pth)"

# (probs (C, H, W) float on the model's device, data sample with gt_sem_seg and img_path)
Prediction = Tuple[torch.Tensor, Any]


def predict_single_scale(model: Any, data: dict) -> List[Prediction]:
    """Softmax probabilities of one batch from the test pipeline.

    Args:
        model: an mmseg segmentor in eval mode.
        data: a collated batch (``inputs``: list of (3, h, w) tensors, ``data_samples``).

    Returns:
        Per image: ((C, H, W) probabilities at the original resolution, the data sample).
    """
    with torch.no_grad():
        samples = model.test_step(data)
    return [(s.seg_logits.data.float().softmax(dim=0), s) for s in samples]


def predict_msc_flip(model: Any, data: dict) -> List[Prediction]:
    """Probabilities averaged over the augmentations of a ``TestTimeAug`` batch (scales x flips).

    Args:
        model: an mmseg segmentor in eval mode (its ``postprocess_result`` undoes flips and resizes every
            augmentation's logits to the original image size).
        data: a collated ``tta_pipeline`` batch: every value is a list over augmentations of lists over images.

    Returns:
        Per image: ((C, H, W) mean softmax probabilities, the first augmentation's data sample).
    """
    num_augs = len(data["inputs"])
    per_aug = []
    with torch.no_grad():
        for i in range(num_augs):
            per_aug.append(model.test_step({k: v[i] for k, v in data.items()}))
    out = []
    for samples in zip(*per_aug):
        probs = torch.stack([s.seg_logits.data.float().softmax(dim=0) for s in samples]).mean(dim=0)
        out.append((probs, samples[0]))
    return out


def _crf_refine(probs: torch.Tensor, img_path: str) -> torch.Tensor:
    """Dense-CRF refined probabilities (C, H, W) of one image (``stage1_cam.refine.crf``, imported lazily)."""
    import mmcv

    from stage1_cam.refine.crf import dense_crf

    image = mmcv.imread(img_path, channel_order="rgb")  # (H, W, 3) uint8
    q = dense_crf(np.ascontiguousarray(image), probs.detach().cpu().numpy().astype(np.float32))
    return torch.as_tensor(np.asarray(q), device=probs.device)


def summarize(cm: ConfusionMatrix, class_names: Sequence[str]) -> Dict[str, Any]:
    """JSON-ready metrics of one evaluation mode (fractions; None where undefined)."""
    m = cm.compute(class_names)
    return json_safe({
        "mIoU": m["miou"],
        "mIoU_gt_classes": m["miou_gt"],  # WeCLIP / CLIP-ES scripts' definition (stage1_cam.metrics)
        "fwIoU": m["fwiou"],
        "aAcc": m["pixel_acc"],
        "mAcc": m["mean_acc"],
        "per_class_iou": {n: m["per_class"][n]["iou"] for n in class_names},
        "per_class_acc": {n: m["per_class"][n]["recall"] for n in class_names},
        "num_pixels": m["num_pixels"],
    })


def evaluate(model: Any, loader: Iterator[dict], predict: Callable[[Any, dict], List[Prediction]], *,
             num_classes: int, ignore_index: int, crf: bool, log_every: int = 50) -> Dict[str, ConfusionMatrix]:
    """Run ``predict`` over ``loader`` and accumulate confusion matrices.

    Returns:
        ``{"plain": cm}`` and, with ``crf``, ``{"crf": cm}`` as well.

    Raises:
        BadInputError: a ground-truth mask holds ids outside the label space (names the file and the ids).
    """
    cms = {"plain": ConfusionMatrix(num_classes, ignore_index=ignore_index)}
    if crf:
        cms["crf"] = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    n, t0 = 0, time.monotonic()
    for data in loader:
        for probs, sample in predict(model, data):
            gt = sample.gt_sem_seg.data.squeeze(0).to(probs.device)  # (H, W)
            if int(gt.max()) >= num_classes:  # ids outside the label space would be dropped silently
                check_label_values(gt.cpu().numpy(), num_classes, sample.metainfo.get("seg_map_path", sample.img_path))
            cms["plain"].update(probs.argmax(dim=0), gt)
            if crf:
                cms["crf"].update(_crf_refine(probs, sample.img_path).argmax(dim=0), gt)
            n += 1
            if log_every and n % log_every == 0:
                _logger.info("%d images, %.2f s/image", n, (time.monotonic() - t0) / n)
    return cms


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_seg.test", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="stage-2 config (configs/stage2/*.py)")
    p.add_argument("checkpoint", help="checkpoint written by stage2_seg.train (e.g. WORK_DIR/iter_20000.pth)")
    p.add_argument("--work-dir", help="where metrics.json goes (default: the checkpoint's folder)")
    p.add_argument("--data-root", help="dataset root (default: $WSSS_DATA_ROOT/<name> or the config's)")
    p.add_argument("--aug-test", action="store_true", help="also evaluate multi-scale + flip (tta_pipeline)")
    p.add_argument("--crf", action="store_true", help="dense CRF on the final probabilities (slow)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    add_cfg_options(p, help="override config keys")
    return p.parse_args(argv)


def _tta_loader_cfg(cfg: Any) -> dict:
    if cfg.get("tta_pipeline") is None:
        raise BadInputError(f"--aug-test needs tta_pipeline in the config; none in {cfg.filename}")
    loader = copy.deepcopy(cfg.test_dataloader)
    loader["dataset"]["pipeline"] = cfg.tta_pipeline
    return loader


def resolve_device(name: Optional[str]) -> torch.device:
    """The ``--device`` to evaluate on: ``cpu`` or ``cuda[:i]`` (default: cuda if available).

    Raises:
        BadInputError: not a device name, a device type other than cpu/cuda, or a GPU this machine does not have.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BadInputError(f"--device {name!r} is not a device ({e}); use cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise BadInputError(f"--device {name!r}: only cpu and cuda[:N] are supported; use one of them")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInputError(f"--device {name!r}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise BadInputError(f"--device {name!r}: this machine has {count} CUDA GPU(s) (cuda:0 to "
                                f"cuda:{count - 1}); pick one of them or use --device cpu")
    return device


def load_weights(model: torch.nn.Module, path: str, config: str) -> None:
    """Load a ``stage2_seg.train`` checkpoint strictly into ``model`` (weights_only, mmengine's globals allowed).

    Raises:
        BadInputError: the file is empty, not a PyTorch checkpoint, truncated or damaged, holds no state dict, or
            its weights do not fit the model of ``config`` (counts and examples of missing, unexpected and
            misshapen weights); the message names the file.
    """
    from mmengine.runner import load_state_dict

    check_torch_file(path, what="checkpoint", fix=_CHECKPOINT_FIX)
    try:
        with safe_checkpoint_loading():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # no access and the like: mapped (with the file) by the entry point
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # objects neither torch nor mmengine allow: not a stage-2 checkpoint
            raise BadInputError(f"{path} is not an mmengine checkpoint: it holds objects that one does not "
                                f"(another program's checkpoint?); {_CHECKPOINT_FIX}") from e
        raise unreadable_file_error(path, e, what="checkpoint", fix=_CHECKPOINT_FIX) from e
    except Exception as e:  # noqa: BLE001  (torch.load of a damaged file raises many kinds)
        raise unreadable_file_error(path, e, what="checkpoint", fix=_CHECKPOINT_FIX) from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = f" (its keys: {', '.join(map(str, list(ckpt)[:8]))})" if isinstance(ckpt, dict) else ""
        raise BadInputError(f"checkpoint {path} holds no state dict of model weights{keys}; {_CHECKPOINT_FIX}")
    metadata = getattr(state, "_metadata", None)
    state = type(state)((re.sub(r"^module\.", "", k), v) for k, v in state.items())  # as mmengine's load_checkpoint
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    want = model.state_dict()
    missing = [k for k in want if k not in state and "num_batches_tracked" not in k]  # mmengine skips those too
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(lst)} {what} (e.g. {', '.join(lst[:3])})" for lst, what in (
            (missing, f"of the model's {len(want)} weights missing"), (unexpected, "unexpected entries"),
            (shapes, "weights of another shape (checkpoint vs model)")) if lst]
        raise BadInputError(f"checkpoint {path} does not fit the model of {config}: {'; '.join(parts)}; "
                            f"{_CHECKPOINT_FIX}")
    load_state_dict(model, state, strict=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code (2 for bad input, with one message naming the file)."""
    return run_main(lambda: _main(parse_args(argv)), logger=_logger)


def _main(args: argparse.Namespace) -> int:
    setup_logging()
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmseg.registry import MODELS

    for path, what in ((args.config, "config"), (args.checkpoint, "checkpoint")):
        if not osp.isfile(path):
            raise FileNotFoundError(f"{what} {path} does not exist")
    device = resolve_device(args.device)
    cfg = load_stage2_config(args.config, sections=("model", "test_dataloader"))
    if args.cfg_options:
        check_override_keys(cfg, args.cfg_options)
        cfg.merge_from_dict(args.cfg_options)
    check_runner_values(cfg, args.config)
    apply_data_root(cfg, resolve_data_root(cfg, args.data_root))
    init_default_scope(cfg.get("default_scope", "mmseg"))
    loaders = {SINGLE_SCALE: Runner.build_dataloader(cfg.test_dataloader)}
    if args.aug_test:
        loaders[MSC_FLIP] = Runner.build_dataloader(_tta_loader_cfg(cfg))

    dataset = loaders[SINGLE_SCALE].dataset
    class_names = [str(c) for c in dataset.metainfo["classes"]]
    ignore_index = int(getattr(dataset, "ignore_index", 255))
    model = MODELS.build(cfg.model)  # weights come from the checkpoint: init_weights (pretrained) is not run
    load_weights(model, args.checkpoint, args.config)
    model = revert_sync_batchnorm(model).to(device).eval()

    results: Dict[str, Any] = {}
    modes = [(SINGLE_SCALE, predict_single_scale)] + ([(MSC_FLIP, predict_msc_flip)] if args.aug_test else [])
    for i, (mode, predict) in enumerate(modes):
        with_crf = args.crf and i == len(modes) - 1
        _logger.info("evaluating %s%s on %d images", mode, " + CRF" if with_crf else "", len(dataset))
        cms = evaluate(model, loaders[mode], predict, num_classes=len(class_names), ignore_index=ignore_index,
                       crf=with_crf)
        results[mode] = summarize(cms["plain"], class_names)
        _logger.info("%s: mIoU %.4f aAcc %.4f mAcc %.4f", mode, results[mode]["mIoU"] or float("nan"),
                     results[mode]["aAcc"] or float("nan"), results[mode]["mAcc"] or float("nan"))
        if with_crf:
            results[f"{mode}_crf"] = summarize(cms["crf"], class_names)
            _logger.info("%s_crf: mIoU %.4f", mode, results[f"{mode}_crf"]["mIoU"] or float("nan"))

    work_dir = args.work_dir or osp.dirname(osp.abspath(args.checkpoint))
    os.makedirs(work_dir, exist_ok=True)
    out = {
        "format": METRICS_FORMAT,
        "version": METRICS_VERSION,
        "config": osp.abspath(args.config),
        "checkpoint": osp.abspath(args.checkpoint),
        "checkpoint_sha256": file_sha256(args.checkpoint),  # inputs and time: the report flags stale figures
        "computed_at": utc_timestamp(),
        "data_root": getattr(dataset, "data_root", None),
        "split": getattr(dataset, "split", None),
        "num_images": len(dataset),
        "classes": class_names,
        "scale": "fraction",
        **results,
    }
    path = osp.join(work_dir, "metrics.json")
    atomic_write_text(path, json.dumps(out, indent=2))
    _logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage2_seg.test import main as package_main

    raise SystemExit(package_main())
