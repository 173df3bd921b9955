"""Stage-1 training: ``python -m stage1_cam.train CONFIG [--run NAME] [--resume [CKPT]] [--cfg-options k=v]``.

Iteration-based training of the refinement head on the frozen CLIP, from image-level labels only.
AdamW on the head only, linear warmup then poly decay; autocast per ``train.amp`` (utils/precision.py: bf16 on GPU
and on CPUs with native bf16 by default);
DDP under torchrun (one process per GPU). Checkpoints hold the head, optimizer, scheduler, data
position and every RNG state, so ``--resume`` (or re-running the same command) continues exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Sampler

from .build import build_stage1
from .config import config_hash, load_config
from .data import TrainAugment, TrainCropDataset, build_dataset
from .heads import TrainBatch
from .metrics import ConfusionMatrix
from .utils.cli import BadInputError, add_config_args, config_overrides, exit_on_user_error
from .utils.cpu_malloc import retain_freed_memory
from .utils.dist import DistInfo, device_for, init_distributed, peak_memory_mb, shutdown_distributed
from .utils.logging import setup_logging
from .utils.files import (DiskFullError, atomic_write, check_free_space, check_torch_file, disk_full_error,
                          is_disk_full, unreadable_file_error)
from .utils.precision import autocast, autocast_dtype, precision_name
from .utils.run_dir import RunDir, RunDirError, git_sha, stage_hash

_logger = logging.getLogger(__name__)
CKPT_FORMAT = "wsss-stage1-head"


class EpochSampler(Sampler[int]):
    """Seeded permutation per epoch, split across ranks, resumable from a position within the epoch."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world  # equal share per rank (drop the remainder, like drop_last)
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(self.n // self.world - self.start, 0)


def lr_multiplier(step: int, *, warmup_iters: int, warmup_ratio: float, max_iters: int, power: float) -> float:
    """Linear warmup from ``warmup_ratio`` to 1 over ``warmup_iters`` steps, then (1 - step/max)^power.

    Steps at or past ``max_iters`` keep the value of step ``max_iters - 1``, as the reference's
    ``PolyWarmupAdamW`` does (it stops updating the learning rate there; it never reaches 0).
    """
    step = min(int(step), int(max_iters) - 1)
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return (1.0 - step / max_iters) ** power


def _collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = {
        "img": torch.stack([b["img"] for b in batch]),
        "cls_label": torch.stack([b["cls_label"] for b in batch]),
        "name": [b["name"] for b in batch],
    }
    if "mask" in batch[0]:  # pseudo-mask crops (heads that train on masks, e.g. weakclip)
        out["mask"] = torch.stack([b["mask"] for b in batch])
    return out


def labels_from_multi_hot(cls_label: torch.Tensor) -> List[np.ndarray]:
    """(B, C-1) multi-hot -> per image sorted class ids in 1..C-1."""
    return [np.flatnonzero(row.cpu().numpy() > 0.5).astype(np.int64) + 1 for row in cls_label]


class LossHistory:
    """Step losses kept on the device and read on the host only at :meth:`flush` (no synchronisation per step).

    The training loop flushes at every log line, before validation, before every checkpoint and at the end, so a
    non-finite loss still stops training with a :class:`FloatingPointError` naming its (first) step and images,
    and no checkpoint is written after it.

    Attributes:
        values: the flushed losses as floats, in step order.
    """

    def __init__(self) -> None:
        self.values: List[float] = []
        self._pending: List[torch.Tensor] = []
        self._where: List[tuple] = []

    def record(self, step: int, loss: torch.Tensor, names: Any) -> None:
        """Keep ``loss`` (a 0-d tensor of step ``step`` on the images ``names``) without reading it."""
        self._pending.append(loss.detach().float().reshape(()))
        self._where.append((step, names))

    def flush(self) -> None:
        """Read the pending losses (one device-to-host copy); raise on the first non-finite one."""
        if not self._pending:
            return
        vals = torch.stack(self._pending).cpu()  # the one synchronisation per flush
        pending = self._where
        self._pending, self._where = [], []
        bad = (~torch.isfinite(vals)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            step, names = pending[i]
            raise FloatingPointError(f"non-finite loss {vals[i].item()} at step {step} (images {names})")
        self.values.extend(vals.tolist())

    def __len__(self) -> int:
        return len(self.values)


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_CKPT_DISK_FIX = "point run.root at another disk"
_CKPT_DISK_THEN = "training resumes from stage1/checkpoints/latest.pth when there is one"
# torch's zip writer reports a failed write (a full disk) as a RuntimeError without the errno
_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint payload: a lower bound of its size on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _ran_out_of_space(err: BaseException, directory: Path, payload: Dict[str, Any]) -> Optional[int]:
    """The checkpoint's size when ``err`` (from ``torch.save``) is a full disk, else None.

    An ``OSError`` says so itself (``is_disk_full``); torch's zip writer raises a ``RuntimeError`` ("unexpected
    pos ...") that does not, so then the disk counts as full when it has less free space than the checkpoint
    needs (serialized in memory to measure it; the failed temporary file is already removed).
    """
    full = is_disk_full(err)
    if not full and not (isinstance(err, RuntimeError) and any(m in str(err) for m in _WRITE_FAILED)):
        return None
    buf = io.BytesIO()
    torch.save(payload, buf)
    size = buf.getbuffer().nbytes
    if full:
        return size
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    return size if free < size + max(1 << 20, size // 100) else None  # file system overhead: a margin


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Atomic save (a temporary file unique to this writer, then a rename): never a truncated checkpoint.

    The disk is checked for the payload's tensors before writing; a write that still finds the disk full
    (``ENOSPC``, or torch's ``RuntimeError`` for it) leaves no file behind. Either way one ``DiskFullError``
    names the checkpoint folder.

    Raises:
        DiskFullError: not enough free space in ``path``'s folder (the message names it, the space and the fix).
    """
    what = f"checkpoint {path.name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # the payload's tensors are a lower bound: a disk with less free space cannot take the checkpoint
    check_free_space(path.parent, _tensor_bytes(payload), what=what, fix=_CKPT_DISK_FIX, then=_CKPT_DISK_THEN)
    try:
        with atomic_write(path, fsync=True) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:
        if isinstance(e, DiskFullError):
            raise
        size = _ran_out_of_space(e, path.parent, payload)
        if size is None:
            raise
        raise disk_full_error(path.parent, needed=size, what=what, fix=_CKPT_DISK_FIX, then=_CKPT_DISK_THEN) from e


def checkpoint_matches(ckpt: Dict[str, Any], cfg: Any) -> bool:
    """Whether a loaded checkpoint was trained with ``cfg``'s training inputs (``stage_hash(cfg, "train")``).

    Only the sections training depends on count: a dump-only change keeps the head. Checkpoints written before
    the training hash was recorded carry the whole config's hash, which must then match.
    """
    if "train_hash" in ckpt:
        return ckpt["train_hash"] == stage_hash(cfg, "train")
    return ckpt.get("config_hash") == config_hash(cfg)


def trained_for(path: Path, cfg: Any) -> bool:
    """Whether ``path`` is a stage-1 checkpoint trained with ``cfg``'s training inputs."""
    return Path(path).is_file() and checkpoint_matches(load_checkpoint(Path(path)), cfg)


_CKPT_DAMAGED_FIX = ("delete it and re-run the training (a run's stage1/checkpoints/ are saved again), or pass "
                     "another stage-1 checkpoint")
_CKPT_FOREIGN_FIX = ("pass a stage-1 checkpoint (a run's stage1/checkpoints/final.pth); if this file sits in a run's "
                     "stage1/checkpoints/, delete it and re-run the training")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a stage-1 checkpoint with ``weights_only=True``; refuses files of another format.

    Raises:
        FileNotFoundError: no such file.
        BadInputError: the file is empty, truncated or damaged, or not a stage-1 head checkpoint (a stage-2 or
            other checkpoint, a text file); the message names it and the fix.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    check_torch_file(path, what="checkpoint", fix=_CKPT_DAMAGED_FIX, fix_foreign=_CKPT_FOREIGN_FIX)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses the objects of other checkpoints (mmengine's)
        if "weights only" not in str(e).lower():  # a damaged pickle
            raise unreadable_file_error(path, e, what="checkpoint", fix=_CKPT_DAMAGED_FIX) from e
        raise BadInputError(f"{path} is not a stage-1 head checkpoint: it holds objects that one does not (a "
                            f"stage-2 or other checkpoint?); {_CKPT_FOREIGN_FIX}") from e
    except (PermissionError, IsADirectoryError, FileNotFoundError):
        raise  # the file system's own errors are named by the error mapping (utils/cli.py)
    except Exception as e:  # torch.load of a truncated or damaged archive: RuntimeError, EOFError, BadZipFile, ...
        raise unreadable_file_error(path, e, what="checkpoint", fix=_CKPT_DAMAGED_FIX) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise BadInputError(f"{path} is not a stage-1 head checkpoint (format {CKPT_FORMAT!r} expected); "
                            f"{_CKPT_FOREIGN_FIX}")
    return ckpt


# the layers WeCLIP's validation leaves in training mode (train.val_parity)
_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)


@torch.no_grad()
def validate(stack: Any, cfg: Any, device: torch.device, *, max_images: int = 0) -> Dict[str, float]:
    """mIoU of the head's validation figures (``head.validation_figures``, e.g. WeCLIP's online pseudo labels with
    and without RFM and its decoder) on ``cfg.data.val_split``.

    Runs with the head in eval mode (dropout off), batch 1, full-resolution images resized to a multiple of the
    patch size on the network side and labels resized to the original size. With ``train.val_parity`` as WeCLIP's
    logged validation: the dropout layers stay on (drawing from a forked RNG, so the training stream and resume are
    unchanged) and the network input is the image cropped to a patch multiple (its patch embedding drops the rest).

    Returns:
        ``<figure>_miou`` and ``<figure>_miou_gt`` per figure, ``images``, and ``figures`` (name -> description,
        the report's row labels).
    """
    ds = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split)
    if not ds.has_gt:
        _logger.warning("validation split %s has no ground truth; skipped", cfg.data.val_split)
        return {}
    head = stack.head
    was_training = head.training
    parity = bool(cfg.train.val_parity)
    head.eval()
    if parity:
        for m in head.modules():
            if isinstance(m, _DROPOUTS):
                m.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            scores, n = _validation_scores(stack, cfg, device, ds, parity=parity, max_images=max_images)
    finally:
        head.train(was_training)
    # _miou: MMSegmentation's definition; _miou_gt: WeCLIP's (classes with ground truth only; stage1_cam.metrics)
    return {**{f"{key}_miou": r["miou"] for key, r in scores.items()},
            **{f"{key}_miou_gt": r["miou_gt"] for key, r in scores.items()}, "images": n,
            # in the head's order (the report's row order), then any figure the head did not describe
            "figures": {**{k: v for k, v in head.FIGURES.items() if k in scores},
                        **{k: k for k in scores if k not in head.FIGURES}}}


def _validation_scores(stack: Any, cfg: Any, device: torch.device, ds: Any, *, parity: bool, max_images: int
                       ) -> Tuple[Dict[str, Dict[str, Any]], int]:
    """Confusion-matrix scores per validation figure over the first ``max_images`` (0: all) images of ``ds``."""
    from .data.transforms import normalize

    head = stack.head
    n_cls = len(stack.class_names)
    cms: Dict[str, ConfusionMatrix] = {}
    n = len(ds) if not max_images else min(max_images, len(ds))
    p = stack.backbone.patch_size
    for i in range(n):
        item = ds[i]
        if len(item["labels"]) == 0:
            continue
        img = torch.from_numpy(normalize(item["image"], stack.mean, stack.std)).permute(2, 0, 1)[None].to(device)
        h, w = img.shape[-2:]
        ph, pw = max(p, h // p * p), max(p, w // p * p)
        if parity and h >= p and w >= p:
            net_in = img[..., :ph, :pw]
        else:
            net_in = torch.nn.functional.interpolate(img, size=(ph, pw), mode="bilinear", align_corners=False)
        preds = head.validation_figures(net_in, [item["labels"]], out_size=(h, w), full_images=img)
        for key, pred in preds.items():
            cms.setdefault(key, ConfusionMatrix(n_cls)).update(pred[0].cpu().numpy(), item["gt"])
    return {key: cm.compute() for key, cm in cms.items()}, n


def train(cfg: Any, run_dir: RunDir, *, resume: Optional[Path] = None, dist: Optional[DistInfo] = None) -> Path:
    """Train the head; returns the final checkpoint path. Resumes from ``resume`` or the run's latest checkpoint."""
    dist = dist or DistInfo()
    device = device_for(dist)
    if device.type == "cpu":
        retain_freed_memory()  # same-shaped steps: no page faults for freed blocks (utils/cpu_malloc.py)
    seed = cfg.run.seed + dist.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # As the references seed (reference_spec 1.11, 4.8): deterministic cuDNN algorithms, no autotuning (a GPU's
    # resume then repeats the convolutions exactly; no effect on a CPU).
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    tc = cfg.train
    chash, thash = config_hash(cfg), stage_hash(cfg, "train")

    stack = build_stage1(cfg, device)
    head = stack.head
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup_iters=tc.warmup_iters, warmup_ratio=tc.warmup_ratio,
                                           max_iters=tc.max_iters, power=tc.power))
    if dist.enabled:
        head.wrap_trainable(torch.nn.parallel.DistributedDataParallel(
            head.trainable_module(), device_ids=[dist.local_rank] if device.type == "cuda" else None))

    base = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split)
    augment = TrainAugment(crop_size=cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                           flip=cfg.data.flip, mean=stack.mean, std=stack.std)
    train_ds = TrainCropDataset(base, augment, seed=cfg.run.seed)
    train_ds = head.wrap_train_dataset(train_ds)  # e.g. pseudo-mask crops beside the images (weakclip)
    if len(train_ds) < tc.batch_size * dist.world_size:
        raise BadInputError(f"split {cfg.data.train_split} has {len(train_ds)} usable images, fewer than one batch")
    sampler = EpochSampler(len(train_ds), seed=cfg.run.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = len(sampler) // tc.batch_size

    step, epoch, pos = 0, 0, 0
    ckpt_dir = run_dir.ckpt_dir
    latest = ckpt_dir / "latest.pth"
    resume_path = resume if resume is not None else (latest if latest.is_file() else None)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if not checkpoint_matches(ckpt, cfg):
            raise RunDirError(f"{resume_path} was trained with other training settings (training hash "
                              f"{ckpt.get('train_hash', ckpt.get('config_hash'))}, current {thash}); resume with "
                              f"the same config, start another run, or pass --overwrite to set it aside")
        head.load_trainable_state(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, pos = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        _set_rng_state(ckpt["rng"][min(dist.rank, len(ckpt["rng"]) - 1)] if isinstance(ckpt["rng"], list)
                       else ckpt["rng"])
        _logger.info("resumed from %s at step %d", resume_path, step)

    amp_dtype = autocast_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp_dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader_gen = torch.Generator()

    def make_loader() -> Iterator[Dict[str, Any]]:
        sampler.set_position(epoch, pos * tc.batch_size)
        train_ds.set_epoch(epoch)
        loader_gen.manual_seed(cfg.run.seed * 7919 + epoch)
        return iter(DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                               num_workers=cfg.data.num_workers, collate_fn=_collate, generator=loader_gen,
                               pin_memory=device.type == "cuda", persistent_workers=False))

    def checkpoint(path: Path, metrics: Optional[Dict[str, Any]] = None) -> None:
        losses.flush()  # a non-finite loss raises here: never saved in a checkpoint
        rng = [_rng_state()]
        if dist.enabled:
            gathered: List[Any] = [None] * dist.world_size
            torch_dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if not dist.is_main:
            return
        payload = {"format": CKPT_FORMAT, "head_type": cfg.head.type, "head": head.trainable_state(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                   "epoch": epoch, "batch_in_epoch": pos, "rng": rng, "config": json.dumps(cfg.to_dict()),
                   "config_hash": chash, "train_hash": thash, "git_sha": git_sha(),
                   "metrics": json.dumps(metrics or {})}
        save_checkpoint(path, payload)
        if path != latest:
            save_checkpoint(latest, payload)
        _logger.info("saved checkpoint %s", path)

    it = make_loader()
    t0, t_last, losses, curve = time.time(), time.time(), LossHistory(), []
    history = losses.values  # flushed step losses (floats)
    val_log = run_dir.path / "stage1" / "val_metrics.jsonl"
    _logger.info("training %s for %d iterations (batch %d x %d process(es), %d steps/epoch) on %s in %s",
                 cfg.head.type, tc.max_iters, tc.batch_size, dist.world_size, steps_per_epoch, device,
                 precision_name(amp_dtype))
    while step < tc.max_iters:
        try:
            batch = next(it)
        except StopIteration:
            epoch, pos = epoch + 1, 0
            it = make_loader()
            continue
        tb = TrainBatch(images=batch["img"].to(device, non_blocking=True),
                        labels=labels_from_multi_hot(batch["cls_label"]),
                        masks=batch["mask"].to(device, non_blocking=True) if "mask" in batch else None,
                        names=batch["name"])
        with autocast(device, amp_dtype):
            out = head.forward_train(tb, step)
        loss = out["loss"]
        losses.record(step, loss, batch["name"])  # checked at the next flush (log line, validation, checkpoint)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step, pos = step + 1, pos + 1
        if step % tc.log_interval == 0 or step == tc.max_iters:
            losses.flush()
            dt = (time.time() - t_last) / max(1, min(tc.log_interval, len(history)))
            t_last = time.time()
            curve.append([step, float(np.mean(history[-tc.log_interval:]))])
            terms = " ".join(f"{k[5:]} {float(v.detach()):.4f}" for k, v in out.items()
                             if k.startswith("loss_") and torch.is_tensor(v) and v.numel() == 1)
            _logger.info("step %d/%d loss %.4f (%s) lr %.3e %.3f s/iter eta %s peak %.0f MiB",
                         step, tc.max_iters, np.mean(history[-tc.log_interval:]), terms,
                         optimizer.param_groups[0]["lr"], dt,
                         time.strftime("%H:%M:%S", time.gmtime(dt * (tc.max_iters - step))),
                         peak_memory_mb(device))
        if tc.val_interval and step % tc.val_interval == 0 and dist.is_main:
            losses.flush()
            metrics = validate(stack, cfg, device, max_images=tc.val_max_images)
            _logger.info("validation at step %d: %s", step, metrics)
            val_log.parent.mkdir(parents=True, exist_ok=True)
            with open(val_log, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % tc.ckpt_interval == 0 and step < tc.max_iters:
            checkpoint(ckpt_dir / f"iter_{step:06d}.pth")

    losses.flush()
    final = run_dir.final_ckpt
    summary = {"steps": step, "seconds": time.time() - t0, "peak_memory_mib": peak_memory_mb(device),
               "device": str(device), "precision": precision_name(amp_dtype),
               "final_loss": float(np.mean(history[-tc.log_interval:])) if history else None, "loss_curve": curve}
    checkpoint(final, summary)
    if dist.is_main:
        (run_dir.path / "stage1" / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return final


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage1_cam.train", description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", help="resume from CKPT (default: the run's latest)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    dist = init_distributed()
    ok = False  # a good run: every rank meets at the barrier before the process group goes
    try:
        cfg = load_config(args.config, config_overrides(args))
        run_dir = RunDir.from_config(cfg)
        setup_logging(run_dir.path / "stage1" / "train.log", rank=dist.rank)
        if dist.is_main:
            run_dir.prepare(cfg, overwrite=args.overwrite, seed=cfg.run.seed)
        if dist.enabled:
            torch_dist.barrier()
        if run_dir.final_ckpt.is_file() and args.resume is None:
            if trained_for(run_dir.final_ckpt, cfg):
                _logger.info("%s exists for this config: nothing to do", run_dir.final_ckpt)
                ok = True
                return 0
        resume = None if args.resume in (None, "latest") else Path(args.resume)
        final = train(cfg, run_dir, resume=resume, dist=dist)
        _logger.info("final checkpoint: %s", final)
        ok = True
        return 0
    except Exception as e:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        return exit_on_user_error(e, _logger)
    finally:
        if dist.enabled:
            shutdown_distributed(ok)


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.train import main as package_main

    raise SystemExit(package_main())
