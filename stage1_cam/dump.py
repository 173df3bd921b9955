"""Pseudo-mask dumping to HDF5 shards: ``python -m stage1_cam.dump CONFIG [--shard I|all] [--num-shards N] ...``.

Turns a trained stage-1 head into pseudo-masks for the split ``data.dump_split`` (reference_spec 2.2,
the decoder-only ``test_msc_flip_seg.py`` path), shard by shard, resumably:

1. Every image is resized so its long side is ``dump.long_side`` (bilinear, ``align_corners=False``, on
   the normalised tensor). Sizes are snapped to the nearest multiple of the patch size (16): the
   backbone's stride-16 patch embedding would otherwise drop the remainder rows/columns, so the logit
   grid would cover only the top-left part of the image and a horizontal flip would not be an exact
   mirror. For the usual 500x375 VOC image and a long side of 512 the snapped size is the reference's
   512x384 exactly; other aspect ratios move by at most 8 pixels.
2. For each scale in ``dump.scales`` the scale-1 input is resized by the scale (again snapped to the
   patch), ``[x, flip(x)]`` go through the network in one batch (``dump.flip``), the flipped logits are
   flipped back and averaged, and the result is resized to the scale-1 logit grid. The mean over scales
   is upsampled to the original (H, W) and soft-maxed.
3. Label-constrained decoding (``dump.label_constrained``): only background and the image-level classes
   may appear; the logits are restricted to those channels *before* the softmax, and the CRF runs on
   them only (fewer labels, faster).
4. The probabilities are rounded to float16 once, and everything downstream (dense CRF with
   ``dump.crf.*``, argmax, confidence = max probability, ``dump.ignore_threshold``) reads those rounded
   values. ``dump.save_probs`` stores exactly them, so ``--from-probs`` reproduces a dump bit for bit.
5. The dense CRF runs in worker processes (``dump.crf.workers``; 0 = cores - 1) with a bounded number
   of jobs in flight, so inference never waits on it; results are written in submission order.

Images are batched: images whose resized size is identical (after snapping) are grouped, up to
``dump.batch_size`` images (``2 x batch_size`` network inputs with flip). The grouping is a
deterministic function of the shard's id list and image sizes (:func:`plan_batches`), so a resumed shard
runs exactly the same batches as an uninterrupted one and produces identical output.

Resume: finished images of a partial shard are skipped (a batch is recomputed in full when some of its
images are missing, but only those are written; finished images are still decoded, to learn their sizes for
the batch plan); a finished shard is never rewritten. After the shards,
``manifest.json`` is (re)built (it lists missing shards) and ``dump_summary.json`` sums the timings.

Other modes: ``--from-probs SRC`` re-runs CRF/threshold from the float16 probabilities of an earlier
dump (no model); ``--evaluate`` scores the shards against ground truth (``data.eval_split``) and writes
``metrics.json`` into the shard directory. Under ``torchrun``, ``--shard all`` gives rank r the shards
r, r + WORLD_SIZE, ...; a SLURM array runs one ``--shard I`` per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple, \
    TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .config import DumpCfg, config_hash, load_config
from .constants import IGNORE_INDEX
from .data.class_names import voc_palette
from .io import ShardFormatError, ShardMeta, ShardReader, ShardWriter, assign_shards, \
    shard_filename, write_manifest
from .io.shards import shard_inputs
from .metrics import ConfusionMatrix, json_safe
from .utils.cli import BadInputError, add_config_args, config_overrides, exit_on_user_error
from .utils.files import DiskFullError, atomic_write_text, check_free_space, disk_full_error, is_disk_full
from .utils.logging import EveryN, setup_logging, utc_timestamp
from .utils.precision import autocast_dtype, precision_name
from .utils.procs import worker_initializer
from .utils.run_dir import RunDir, git_sha

_logger = logging.getLogger(__name__)

T = TypeVar("T")
METRICS_NAME = "metrics.json"
SUMMARY_NAME = "dump_summary.json"  # timings of the dump (images/s, device, peak memory)
# Keys of ``dump.crf`` that are dense-CRF parameters (passed to ``refine.crf.crf_labels``).


# ------------------------------------------------------------------------------------------------ sizes
def snap_to_patch(x: float, patch: int) -> int:
    """``x`` rounded to the nearest multiple of ``patch`` (halves round up), at least one patch."""
    return max(patch, int(math.floor(x / patch + 0.5)) * patch)


def network_size(height: int, width: int, *, long_side: int, patch: int) -> Tuple[int, int]:
    """Scale-1 network input size of an (height, width) image: long side -> ``long_side``, snapped to ``patch``."""
    r = long_side / max(height, width)
    return snap_to_patch(height * r, patch), snap_to_patch(width * r, patch)


def scaled_size(size: Tuple[int, int], scale: float, patch: int) -> Tuple[int, int]:
    """Input size at a test-time ``scale`` of the scale-1 ``size`` (snapped to ``patch``)."""
    if scale == 1.0:
        return size
    return snap_to_patch(size[0] * scale, patch), snap_to_patch(size[1] * scale, patch)


def plan_batches(items: Iterable[Tuple[Hashable, T]], *, batch_size: int, max_pending: int) -> Iterator[List[T]]:
    """Group a stream of (size key, payload) into batches of equal key, deterministically.

    Items are held in per-key buckets; a bucket is emitted when it holds ``batch_size`` items, and when more
    than ``max_pending`` items are held the bucket containing the oldest item is emitted (so memory stays
    bounded). At the end the remaining buckets are emitted oldest first. The batches depend only on the
    ordered keys, never on timing.

    Args:
        items: (key, payload) pairs in a fixed order.
        batch_size: maximum items per batch (>= 1).
        max_pending: maximum items held before the oldest bucket is flushed (>= batch_size).

    Yields:
        Lists of payloads sharing one key.
    """
    if batch_size < 1 or max_pending < batch_size:
        raise ValueError(f"need batch_size >= 1 and max_pending >= batch_size, got {batch_size}, {max_pending}")
    buckets: Dict[Hashable, List[Tuple[int, T]]] = {}
    pending = 0
    for pos, (key, payload) in enumerate(items):
        bucket = buckets.setdefault(key, [])
        bucket.append((pos, payload))
        pending += 1
        if len(bucket) == batch_size:
            del buckets[key]
            pending -= batch_size
            yield [p for _, p in bucket]
        elif pending > max_pending:
            oldest = min(buckets, key=lambda k: buckets[k][0][0])
            out = buckets.pop(oldest)
            pending -= len(out)
            yield [p for _, p in out]
    for key in sorted(buckets, key=lambda k: buckets[k][0][0]):
        yield [p for _, p in buckets[key]]


# -------------------------------------------------------------------------------------------- inference
@dataclass
class Predictor:
    """The network side of the dump: decoder logits for normalised batches, plus what the dump needs.

    Attributes:
        predict: ``(B, 3, H, W)`` normalised images -> ``(B, C, H // patch, W // patch)`` logits.
        patch_size: backbone patch size.
        num_classes: C, background included.
        mean, std: per-channel normalisation (0-255 scale, RGB).
        device: device of the network.
        amp_dtype: autocast dtype (None = float32; see ``utils/precision.py``).
    """

    predict: Callable[[torch.Tensor], torch.Tensor]
    patch_size: int
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: Optional[torch.dtype] = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> float32 logits (B, C, H // patch, W // patch)."""
        with torch.autocast(device_type=images.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.predict(images).float()

    def prepare(self, image: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> normalised (3, size[0], size[1]) float32 on ``device`` (bilinear resize)."""
        t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1).float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        t = (t - mean) / std
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
        return t


@torch.no_grad()
def msc_flip_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                    scales: Sequence[float], flip: bool, patch_size: int) -> torch.Tensor:
    """Multi-scale + flip fused logits at the scale-1 logit grid (reference_spec 2.2 steps 3-6), batched.

    Args:
        predict: ``(N, 3, h, w)`` -> ``(N, C, h // patch, w // patch)`` logits.
        images: (B, 3, H, W) normalised scale-1 inputs, H and W multiples of ``patch_size``.
        scales: test-time scales (each input size snapped to the patch).
        flip: average each scale with its horizontally flipped input (one batch of 2B).
        patch_size: backbone patch size.

    Returns:
        (B, C, H // patch, W // patch) float32: mean over scales of the flip-averaged logits.
    """
    b, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"input size {(h, w)} is not a multiple of the patch size {patch_size}")
    grid = (h // patch_size, w // patch_size)
    total: Optional[torch.Tensor] = None
    for s in scales:
        size = scaled_size((h, w), float(s), patch_size)
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        out = predict(x).float()  # (B or 2B, C, size // patch)
        if flip:
            out = (out[:b] + out[b:].flip(-1)) / 2
        if tuple(out.shape[-2:]) != grid:
            out = F.interpolate(out, size=grid, mode="bilinear", align_corners=False)
        total = out if total is None else total + out
    assert total is not None
    return total / len(scales)


def logits_to_probs(logits: torch.Tensor, out_size: Tuple[int, int], keys: torch.Tensor) -> torch.Tensor:
    """Restrict to the allowed channels, upsample bilinearly to the image size and softmax.

    Args:
        logits: (C, h, w) fused logits of one image.
        out_size: (H, W) of the original image.
        keys: (K,) int64 class ids allowed (background first), on ``logits.device``.

    Returns:
        (K, H, W) float32 probabilities over the K allowed classes.
    """
    sel = logits.index_select(0, keys)[None]
    up = F.interpolate(sel, size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return up.softmax(dim=0)


def allowed_classes(image_labels: Sequence[int], num_classes: int, *, label_constrained: bool) -> np.ndarray:
    """(K,) int64 class ids that may appear: ``[0] + image_labels`` when constrained, else all classes."""
    if not label_constrained:
        return np.arange(num_classes, dtype=np.int64)
    labels = np.asarray(image_labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
        raise ValueError(f"image-level labels {labels.tolist()} are outside 1..{num_classes - 1}")
    return np.concatenate([[0], np.unique(labels)]).astype(np.int64)


@torch.no_grad()
def predict_probs(predictor: Predictor, images: Sequence[np.ndarray], keys: Sequence[np.ndarray], *,
                  settings: DumpCfg) -> List[np.ndarray]:
    """Probabilities of a batch of images that share one network size.

    Args:
        predictor: the network.
        images: B images (H_b, W_b, 3) uint8 RGB whose :func:`network_size` is identical.
        keys: per image (K_b,) allowed class ids.
        settings: long side, scales and flip.

    Returns:
        Per image (K_b, H_b, W_b) float16 probabilities (NumPy).
    """
    p = predictor.patch_size
    sizes = {network_size(*im.shape[:2], long_side=settings.long_side, patch=p) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"a batch must share one network size, got {sorted(sizes)}")
    size = sizes.pop()
    x = torch.stack([predictor.prepare(im, size) for im in images])
    logits = msc_flip_logits(predictor, x, scales=settings.scales, flip=settings.flip, patch_size=p)
    out = []
    for b, im in enumerate(images):
        k = torch.as_tensor(keys[b], dtype=torch.long, device=logits.device)
        out.append(logits_to_probs(logits[b], im.shape[:2], k).to(torch.float16).cpu().numpy())
    return out


# ------------------------------------------------------------------------------------------ decoding
def decode_probs(probs: np.ndarray, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Argmax decoding: (K, H, W) probabilities of classes ``keys`` -> (label uint8, confidence float32)."""
    p = probs.astype(np.float32, copy=False)
    idx = p.argmax(axis=0)
    return np.asarray(keys, dtype=np.int64)[idx].astype(np.uint8), p.max(axis=0)


def apply_ignore(label: np.ndarray, confidence: np.ndarray, threshold: float, ignore_index: int) -> np.ndarray:
    """``label`` with pixels of ``confidence < threshold`` set to ``ignore_index`` (a copy; no-op at 0)."""
    if threshold <= 0:
        return label
    out = label.copy()
    out[confidence < threshold] = ignore_index
    return out


@dataclass
class _Job:
    name: str
    image_labels: np.ndarray
    probs: np.ndarray  # (K, H, W) float16
    keys: np.ndarray  # (K,) int64
    result: "Future[Tuple[np.ndarray, np.ndarray]] | Tuple[np.ndarray, np.ndarray]"


class OrderedPostprocessor:
    """Turns probabilities into (label, confidence), with the CRF in worker processes, results in order.

    At most ``max_in_flight`` jobs are pending; :meth:`submit` blocks on the oldest job beyond that.

    Args:
        settings: CRF parameters, ignore threshold and index.
        executor: process pool for the CRF (None: run inline; required when the CRF is on).
        max_in_flight: bound on pending jobs (memory).
    """

    def __init__(self, *, settings: DumpCfg, executor: Optional[Executor], max_in_flight: int) -> None:
        if settings.crf_params is not None and executor is None:
            raise ValueError("the CRF needs an executor (process pool)")
        self.settings, self.executor = settings, executor
        self.max_in_flight = max(1, max_in_flight)
        self._queue: Deque[_Job] = deque()

    def submit(self, name: str, *, image: np.ndarray, probs: np.ndarray, keys: np.ndarray,
               image_labels: np.ndarray) -> List[_Job]:
        """Queue one image; returns the jobs now finished at the head of the queue (in submission order)."""
        s = self.settings
        if s.crf_params is not None and len(keys) > 1:
            from .refine.crf import crf_labels

            assert self.executor is not None
            # float16 probabilities travel to the worker; crf_labels computes in float32.
            result: Any = self.executor.submit(crf_labels, image, probs, keys, **s.crf_params)
        elif len(keys) == 1:  # background only: nothing to decide
            result = (np.full(probs.shape[1:], keys[0], np.uint8), np.ones(probs.shape[1:], np.float32))
        else:
            result = decode_probs(probs, keys)
        self._queue.append(_Job(name, image_labels, probs, keys, result))
        return self._pop(block_over=self.max_in_flight)

    def drain(self) -> List[_Job]:
        """Wait for and return all remaining jobs, in order."""
        return self._pop(block_over=0)

    def cancel(self) -> None:
        """Drop pending jobs (after an error)."""
        for job in self._queue:
            if isinstance(job.result, Future):
                job.result.cancel()
        self._queue.clear()

    def _pop(self, *, block_over: int) -> List[_Job]:
        out = []
        while self._queue:
            head = self._queue[0]
            if isinstance(head.result, Future):
                if not head.result.done() and len(self._queue) <= block_over:
                    break
                head.result = head.result.result()
            self._queue.popleft()
            label, conf = head.result  # type: ignore[misc]
            label = np.asarray(label, dtype=np.uint8)
            conf = np.asarray(conf, dtype=np.float32)
            head.result = (apply_ignore(label, conf, self.settings.ignore_threshold, self.settings.ignore_index),
                           conf)
            out.append(head)
        return out


class _Progress:
    """tqdm on an interactive rank-0 terminal, else a log line every 30 s; reports images/s."""

    def __init__(self, *, total: int, done: int, desc: str, enabled: bool) -> None:
        self.desc, self.enabled, self.total, self.count = desc, enabled, total, done
        self.new = 0
        self.t0 = time.perf_counter()
        self.every = EveryN(seconds=30.0)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="img", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        self.new += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.every(self.count):
            _logger.info("%s: %d/%d images, %.2f images/s", self.desc, self.count, self.total, self.rate)

    @property
    def rate(self) -> float:
        return self.new / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> Dict[str, float]:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.t0
        return {"images": self.new, "seconds": seconds, "images_per_s": self.new / seconds if seconds > 0 else 0.0}


def _iter_images(load: Callable[[str], np.ndarray], names: Sequence[str], *, window: int = 16,
                 threads: int = 2) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, image) in ``names`` order, decoded ``window`` images ahead in a thread pool."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dump-load")
    try:
        pending: Deque[Tuple[str, Future]] = deque()
        it = iter(names)
        for name in it:
            pending.append((name, pool.submit(load, name)))
            if len(pending) >= window:
                break
        while pending:
            name, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield name, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write(writer: ShardWriter, job: _Job, settings: DumpCfg) -> None:
    label, conf = job.result  # type: ignore[misc]
    writer.write(job.name, label=label, confidence=conf, image_labels=job.image_labels,
                 probs=job.probs if settings.save_probs else None,
                 prob_keys=job.keys if settings.save_probs else None)


def dump_shard(predictor: Predictor, dataset: Any, names: Sequence[str], writer: ShardWriter, *,
               settings: DumpCfg, postprocessor: OrderedPostprocessor, progress: bool = True
               ) -> Dict[str, float]:
    """Dump the images ``names`` of ``dataset`` into ``writer`` (skipping ``writer.done_ids``), then finalize.

    Args:
        predictor: the network.
        dataset: a :class:`~stage1_cam.data.SegDataset` (``load_image``, ``image_labels``).
        names: the shard's image ids, in shard order.
        writer: an open shard writer (may hold finished images of an earlier, interrupted run).
        settings: dump settings.
        postprocessor: CRF/argmax stage.
        progress: show progress (rank 0).

    Returns:
        ``images`` (newly written), ``seconds``, ``images_per_s``.
    """
    p = predictor.patch_size
    done = set(writer.done_ids)
    bar = _Progress(total=len(names), done=len(done & set(names)),
                    desc=f"shard {writer.shard_index}/{writer.num_shards}", enabled=progress)

    def sized() -> Iterator[Tuple[Tuple[int, int], Tuple[str, np.ndarray]]]:
        for name, image in _iter_images(dataset.load_image, names):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {name!r} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            yield network_size(*image.shape[:2], long_side=settings.long_side, patch=p), (name, image)

    def submissions() -> Iterator[Tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for batch in plan_batches(sized(), batch_size=settings.batch_size, max_pending=4 * settings.batch_size):
            if all(name in done for name, _ in batch):
                continue
            keys = [allowed_classes(dataset.image_labels(n), predictor.num_classes,
                                    label_constrained=settings.label_constrained) for n, _ in batch]
            probs = predict_probs(predictor, [im for _, im in batch], keys, settings=settings)
            for (name, image), pr, k in zip(batch, probs, keys):
                if name not in done:
                    yield name, image, pr, k, dataset.image_labels(name)

    return _postprocess_into(submissions(), writer=writer, settings=settings, postprocessor=postprocessor,
                             bar=bar, what="")


def _postprocess_into(submissions: Iterable[Tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]], *,
                      writer: ShardWriter, settings: DumpCfg, postprocessor: OrderedPostprocessor,
                      bar: "_Progress", what: str) -> Dict[str, float]:
    """CRF/argmax each ``(name, image, probs, keys, image_labels)`` in order, write it, then finalize the shard.

    On any error (or interruption) the in-flight CRF jobs are cancelled and the shard stays partial (resumable).
    """
    try:
        for name, image, probs, keys, labels in submissions:
            for job in postprocessor.submit(name, image=image, probs=probs, keys=keys, image_labels=labels):
                _write(writer, job, settings)
                bar.update()
        for job in postprocessor.drain():
            _write(writer, job, settings)
            bar.update()
    except BaseException:
        postprocessor.cancel()
        bar.close()
        raise
    writer.finalize()
    stats = bar.close()
    _logger.info("shard %d/%d%s: %d images written in %.1f s (%.2f images/s)", writer.shard_index,
                 writer.num_shards, what, stats["images"], stats["seconds"], stats["images_per_s"])
    return stats


def rerun_from_probs(reader: ShardReader, dataset: Any, names: Sequence[str], writer: ShardWriter, *,
                     settings: DumpCfg, postprocessor: OrderedPostprocessor, progress: bool = True
                     ) -> Dict[str, float]:
    """Re-decode stored float16 probabilities (CRF, threshold) of ``names`` into ``writer``, then finalize.

    With ``settings.label_constrained`` and unconstrained stored probabilities, the allowed channels are
    renormalised (equal to a softmax over those channels). Constrained stored probabilities cannot be
    widened; they are used as they are.

    Raises:
        ValueError: an image has no stored probabilities, or is missing from the source shards.
    """
    done = set(writer.done_ids)
    bar = _Progress(total=len(names), done=len(done & set(names)),
                    desc=f"shard {writer.shard_index}/{writer.num_shards} (from probs)", enabled=progress)
    todo = [n for n in names if n not in done]

    def submissions() -> Iterator[Tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for name, image in _iter_images(dataset.load_image, todo):
            if name not in reader:
                raise BadInputError(f"image {name!r} is not in the source shards at {reader.shard_dir}; finish that "
                                    f"dump first (same split and dump.num_shards)")
            stored = reader.probs(name)
            if stored is None:
                raise BadInputError(f"{reader.shard_dir} holds no probabilities for {name!r}: --from-probs needs a "
                                    f"dump made with dump.save_probs=True")
            probs, keys = stored
            labels = reader.image_labels(name)
            if settings.label_constrained:
                allowed = allowed_classes(labels, len(reader.class_names), label_constrained=True)
                sel = np.isin(keys, allowed)
                if not sel.all():
                    p = probs[sel].astype(np.float32)
                    probs = (p / np.maximum(p.sum(axis=0, keepdims=True), 1e-12)).astype(np.float16)
                    keys = keys[sel]
            if probs.shape[1:] != image.shape[:2]:
                raise BadInputError(f"stored probabilities of {name!r} are {probs.shape[1:]} but the image is "
                                    f"{image.shape[:2]}; the source shards belong to another copy of the dataset")
            yield name, image, probs, keys, labels

    return _postprocess_into(submissions(), writer=writer, settings=settings, postprocessor=postprocessor,
                             bar=bar, what=" (from probs)")


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_shards(shard_dir: Path, dataset: Any) -> Dict[str, Any]:
    """Confusion-matrix metrics of the dumped masks against ground truth, where it exists.

    Images of ``dataset`` that are in the shards and have a ground-truth mask are scored (pixels whose ground
    truth is 255 are skipped).

    Args:
        shard_dir: directory with the shards (and manifest).
        dataset: a :class:`~stage1_cam.data.SegDataset` (``names``, ``load_gt``, ``class_names``).

    Returns:
        JSON-safe dict with ``dataset``, ``split``, ``images`` (scored), ``complete`` (all shards present),
        the hashes, ``computed_at`` (UTC), ``inputs`` (``{"shards": {file: sha256}}``), ``miou`` (of the masks
        as written) and :meth:`ConfusionMatrix.compute` results:

        * ``final``: the masks as written; ignored (255) pixels count as misses;
        * ``final_confident``: the masks as written, scored on their non-ignored pixels only;
        * ``no_crf``: argmax of the stored probabilities (only when they were stored), i.e. the masks
          without CRF or threshold.

    Raises:
        FileNotFoundError: no shards in ``shard_dir``.
        ShardFormatError: the shards hold another dataset or class list, or are damaged (checksums).
        ValueError: a mask's size differs from its ground truth.
    """
    reader = ShardReader(shard_dir, expected_classes=dataset.class_names, expected_dataset=dataset.dataset,
                         allow_incomplete=True)
    reader.verify()  # every shard's sha256, once: figures are never computed from damaged or changed shards
    k, ignore = len(dataset.class_names), reader.ignore_index
    cms = {key: ConfusionMatrix(k, ignore_index=IGNORE_INDEX) for key in ("final", "final_confident", "no_crf")}
    n = n_probs = 0
    for name in dataset.names:
        if name not in reader:
            continue
        gt = dataset.load_gt(name)
        if gt is None:
            continue
        pred = reader.label(name)
        if pred.shape != gt.shape:
            raise BadInputError(f"pseudo-mask of {name!r} in {shard_dir} is {pred.shape} but its ground truth is "
                                f"{gt.shape}; the shards belong to another copy of the dataset")
        cms["final"].update(pred, gt)
        gt_conf = gt.copy()
        gt_conf[pred == ignore] = IGNORE_INDEX
        cms["final_confident"].update(pred, gt_conf)
        stored = reader.probs(name)
        if stored is not None:
            cms["no_crf"].update(decode_probs(*stored)[0], gt)
            n_probs += 1
        n += 1
    reader.close()
    if n == 0:
        _logger.warning("no image of %s split %r with ground truth is in %s; nothing evaluated", dataset.dataset,
                        dataset.split, shard_dir)
    names = list(dataset.class_names)
    meta = reader.meta
    out: Dict[str, Any] = {
        "dataset": dataset.dataset, "split": dataset.split, "shard_dir": str(shard_dir), "images": n,
        "complete": bool(meta.get("complete", False)), "config_hash": meta.get("config_hash"),
        "checkpoint_hash": meta.get("checkpoint_hash"), "git_sha": meta.get("git_sha"),
        "dump_settings": meta.get("extra"),
        # What these figures were computed from, and when: the report flags them once the shards change.
        "computed_at": utc_timestamp(),
        "inputs": {"shards": shard_inputs(meta)},
    }
    results = {key: cm.compute(names) for key, cm in cms.items()}
    out["miou"] = results["final"]["miou"]
    out["final"], out["final_confident"] = results["final"], results["final_confident"]
    out["per_class"] = results["final"]["per_class"]
    out["class_names"] = names
    out["confusion"] = cms["final"].matrix.tolist()  # (C, C): rows ground truth, columns pseudo-mask label
    if n_probs == n and n > 0:
        out["no_crf"] = results["no_crf"]
    return json_safe(out)


# ------------------------------------------------------------------------------------------ entry point
def _build_predictor(cfg: Any, checkpoint: Path, device: torch.device) -> Predictor:
    """Build the stack, load the head strictly from ``checkpoint``, eval mode."""
    from .build import build_stage1
    from .train import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("head_type", cfg.head.type) != cfg.head.type:
        raise BadInputError(f"{checkpoint} holds a {ckpt.get('head_type')!r} head but the config says head.type="
                            f"{cfg.head.type!r}; use the config the checkpoint was trained with")
    trained = json.loads(ckpt["config"]) if isinstance(ckpt.get("config"), str) else {}
    for section, key in (("clip", "model_name"), ("clip", "pretrained"), ("clip", "weights"),
                         ("data", "normalization"), ("data", "dataset")):
        want, have = trained.get(section, {}).get(key, cfg[section][key]), cfg[section][key]
        if want != have:
            raise BadInputError(f"{checkpoint} was trained with {section}.{key}={want!r} but the config says {have!r}; "
                                f"dump with the training config (or pass --cfg-options {section}.{key}=...)")
    # Seed as training does before building: a CLIP without pretrained weights (tests, demo) is randomly
    # initialised, and only the same seed gives the backbone the head was trained on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        stack = build_stage1(cfg, device)
    head = stack.head
    head.load_trainable_state(ckpt["head"])
    head.eval()
    amp = autocast_dtype(cfg.train.amp, device)
    _logger.info("dump network pass in %s on %s", precision_name(amp), device)
    return Predictor(predict=head.predict_logits, patch_size=stack.backbone.patch_size,
                     num_classes=len(stack.class_names), mean=tuple(stack.mean), std=tuple(stack.std),
                     device=device, amp_dtype=amp)


def _shard_list(arg: Optional[str], num_shards: int) -> List[int]:
    if arg is None or arg == "all":
        return list(range(num_shards))
    try:
        i = int(arg)
    except ValueError:
        raise BadInputError(f"--shard must be an index or 'all', got {arg!r}") from None
    if not 0 <= i < num_shards:
        raise BadInputError(f"--shard {i} is outside [0, {num_shards}) for --num-shards {num_shards}")
    return [i]


def _process_slot() -> Tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), else (0, 1, 0)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0"))


def make_crf_executor(settings: DumpCfg) -> Optional[ProcessPoolExecutor]:
    """The dense-CRF worker pool of ``settings`` (``spawn`` processes), or None when the CRF runs in-process."""
    n = settings.num_crf_workers()
    if n == 0:
        return None
    # spawn: safe next to CUDA and torch's thread pools. The workers are started (and import the CRF module)
    # right away, so their start-up overlaps with building the model. They die with this process, also when it
    # is killed (kill -9) and cannot shut them down (utils/procs.py); multiprocessing's resource tracker then
    # exits too (it ends when the last process sharing its pipe is gone).
    executor = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_initializer, initargs=(os.getpid(), "stage1_cam.refine.crf"))
    for _ in range(n):
        executor.submit(os.getpid)
    return executor


_IMAGE_OVERHEAD_BYTES = 4096  # HDF5 group, attributes and chunk index of one image (order of magnitude)


def _image_sizes(dataset: Any, names: Sequence[str]) -> List[int]:
    """Pixels of each image, from the file headers where the dataset gives paths, else from the first image."""
    if not names:
        return []
    path_of = getattr(dataset, "_image_path", None)
    if path_of is not None:
        try:
            from PIL import Image

            out = []
            for n in names:
                with Image.open(path_of(n)) as im:
                    out.append(im.size[0] * im.size[1])
            return out
        except Exception:  # unreadable headers: the dump itself reports bad images
            pass
    h, w = dataset.load_image(names[0]).shape[:2]
    return [h * w] * len(names)


def shard_bytes_needed(dataset: Any, names: Sequence[str], settings: DumpCfg, num_classes: int) -> int:
    """Upper bound of the bytes that writing ``names`` adds to a shard (uncompressed arrays + overhead).

    Per pixel: the uint8 label and float16 confidence, plus float16 probabilities of the allowed classes with
    ``save_probs``. The lzf compression of the shards usually makes the files smaller.
    """
    total = 0
    for n, pixels in zip(names, _image_sizes(dataset, names)):
        per_pixel = 3
        if settings.save_probs:
            k = 1 + len(dataset.image_labels(n)) if settings.label_constrained else num_classes
            per_pixel += 2 * k
        total += per_pixel * pixels + _IMAGE_OVERHEAD_BYTES
    return total


def _check_shard_space(out_dir: Path, writer: ShardWriter, names: Sequence[str], dataset: Any,
                       settings: DumpCfg) -> None:
    """Refuse to start (or resume) a shard whose images do not fit on the disk (:class:`DiskFullError`)."""
    todo = [n for n in names if n not in writer.done_ids]
    needed = shard_bytes_needed(dataset, todo, settings, len(dataset.class_names))
    check_free_space(out_dir, needed, what=f"shard {writer.shard_index}/{writer.num_shards} ({len(todo)} images "
                                           f"to write; uncompressed upper bound)",
                     fix="write the shards to another disk (--out DIR)")


def run_dump(cfg: Any, *, shards: Sequence[int], out_dir: Path, checkpoint: Optional[Path] = None,
             from_probs: Optional[Path] = None, device: Optional[torch.device] = None,
             progress: bool = True) -> Dict[int, Dict[str, float]]:
    """Dump the given shards (model mode, or ``from_probs`` mode), then rebuild ``manifest.json``.

    With the CRF on, worker processes are started with the ``spawn`` method: a script that calls this
    function must guard its entry point with ``if __name__ == "__main__":``.

    Args:
        cfg: validated stage-1 config.
        shards: shard indices to produce (of ``cfg.dump.num_shards``).
        out_dir: shard directory.
        checkpoint: stage-1 head checkpoint (model mode).
        from_probs: source shard directory with stored probabilities (no model).
        device: inference device (default: CUDA if available).
        progress: show progress.

    Returns:
        Per produced shard: ``images``, ``seconds``, ``images_per_s`` (skipped finished shards are absent).

    Raises:
        FileNotFoundError: checkpoint, dataset or source shards missing.
        ValueError / ShardFormatError: inconsistent inputs (messages name the fix).
        DiskFullError: a shard does not fit on the disk (checked before each shard), or the disk filled up
            while writing (the shard stays partial and resumes on the next run).
    """
    from .utils.files import file_sha256

    num_shards = cfg["dump"]["num_shards"]
    settings = DumpCfg.from_config(cfg)
    chash = config_hash(cfg)
    reader: Optional[ShardReader] = None
    if from_probs is not None:
        if Path(from_probs).resolve() == Path(out_dir).resolve():
            raise BadInputError(f"--from-probs {from_probs} is also the output directory; pass another --out")
        reader = ShardReader(from_probs, allow_incomplete=True)
        src = reader.meta
        if src.get("dataset") != cfg.data.dataset:
            raise ShardFormatError(f"{from_probs} holds dataset {src.get('dataset')!r} but the config says "
                                   f"{cfg.data.dataset!r}")
        split, ckpt_hash = src["split"], src.get("checkpoint_hash", "")
        extra_src = {"from_probs": str(from_probs), "source_config_hash": src.get("config_hash")}
    else:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found; train the head first "
                                    f"(python -m stage1_cam.train CONFIG) or pass --checkpoint")
        split, ckpt_hash, extra_src = cfg.data.dump_split, file_sha256(Path(checkpoint)), {}
    from .data import build_dataset

    dataset = build_dataset(cfg.data.dataset, cfg.data.root, split)
    if reader is not None and tuple(reader.class_names) != tuple(dataset.class_names):
        raise ShardFormatError(f"{from_probs} has classes {reader.class_names}, the dataset {dataset.class_names}")
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if reader is None:  # "auto" resolves per machine: shards written in another precision are not mixed in
        extra_src["precision"] = precision_name(autocast_dtype(cfg.train.amp, device))
    meta = ShardMeta(dataset=cfg.data.dataset, split=split, class_names=dataset.class_names, palette=voc_palette(256),
                     ignore_index=settings.ignore_index, config_hash=chash, git_sha=git_sha(),
                     checkpoint_hash=ckpt_hash, extra={**settings.record(), **extra_src})
    assignment = assign_shards(dataset.names, num_shards)
    predictor: Optional[Predictor] = None
    executor: Optional[ProcessPoolExecutor] = None
    stats: Dict[int, Dict[str, float]] = {}
    try:
        for i in shards:
            with ShardWriter(out_dir, i, num_shards, meta=meta) as writer:
                if writer.is_complete:
                    _logger.info("shard %d/%d is finished (%s); not rewritten", i, num_shards, writer.path)
                    writer.finalize()
                    continue
                _check_shard_space(Path(out_dir), writer, assignment[i], dataset, settings)
                if executor is None and settings.crf_params is not None:
                    executor = make_crf_executor(settings)
                workers = settings.num_crf_workers()
                post = OrderedPostprocessor(settings=settings, executor=executor,
                                            max_in_flight=2 * workers + 2 * settings.batch_size)
                if reader is not None:
                    stats[i] = rerun_from_probs(reader, dataset, assignment[i], writer, settings=settings,
                                                postprocessor=post, progress=progress)
                else:
                    if predictor is None:
                        assert checkpoint is not None
                        predictor = _build_predictor(cfg, Path(checkpoint), device)
                        _logger.info("dumping %s/%s with %s on %s: long side %d, scales %s, flip %s, batch %d, "
                                     "label-constrained %s, CRF %s (%d workers)", cfg.data.dataset, split,
                                     checkpoint, device, settings.long_side, list(settings.scales), settings.flip,
                                     settings.batch_size, settings.label_constrained,
                                     "on" if settings.crf_params else "off", workers)
                    stats[i] = dump_shard(predictor, dataset, assignment[i], writer, settings=settings,
                                          postprocessor=post, progress=progress)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            # One clear error; the shard stays .partial and the next run resumes it.
            raise disk_full_error(out_dir, what="the pseudo-mask shards",
                                  fix="write the shards to another disk (--out DIR)") from e
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    if stats:
        _write_summary(out_dir, num_shards, stats, device=device, settings=settings, from_probs=from_probs)
    # Every process rebuilds the manifest from the finished files: the last one to finish lists them all.
    write_manifest(out_dir, num_shards)
    return stats


def _write_summary(out_dir: Path, num_shards: int, stats: Dict[int, Dict[str, float]], *, device: torch.device,
                   settings: DumpCfg, from_probs: Optional[Path]) -> None:
    """Per-shard timing files (``logs/<shard>.summary.json``) and their sum in ``dump_summary.json``.

    Each process writes only its own shards' files and then re-aggregates all of them (atomic replace), so
    concurrent array tasks never lose each other's entries.
    """
    from .utils.dist import peak_memory_mb

    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for i, st in stats.items():
        entry = {**st, "shard": i, "device": str(device), "peak_memory_mib": peak_memory_mb(device),
                 "batch_size": settings.batch_size, "crf": settings.crf_params is not None,
                 "crf_workers": settings.num_crf_workers(), "from_probs": str(from_probs) if from_probs else None}
        (logs / f"{shard_filename(i, num_shards)}.summary.json").write_text(json.dumps(entry, indent=1) + "\n")
    entries = []
    for path in sorted(logs.glob(f"shard-*-of-{num_shards:05d}.h5.summary.json")):
        try:
            entries.append(json.loads(path.read_text()))
        except ValueError:
            _logger.warning("ignoring unreadable %s", path)
    seconds = sum(e["seconds"] for e in entries)
    images = sum(e["images"] for e in entries)
    summary = {"seconds": seconds, "images": images, "images_per_s": images / seconds if seconds > 0 else None,
               "device": entries[-1]["device"] if entries else str(device),
               "peak_memory_mib": max((e["peak_memory_mib"] for e in entries), default=None),
               "shards": {str(e["shard"]): e for e in entries}}
    atomic_write_text(Path(out_dir) / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage1_cam.dump", description=__doc__.splitlines()[0])
    add_config_args(p, overwrite=False)
    p.add_argument("--checkpoint", help="stage-1 head checkpoint (default: the run's stage1/checkpoints/final.pth)")
    p.add_argument("--shard", help="shard index, or 'all' (default: all; with --evaluate alone: none)")
    p.add_argument("--num-shards", type=int, help="number of shards (default: dump.num_shards)")
    p.add_argument("--out", help="shard directory (default: the run's pseudo_masks/)")
    p.add_argument("--from-probs", help="re-run CRF/threshold from the stored probabilities in this shard dir")
    p.add_argument("--evaluate", action="store_true",
                   help="score the shards against ground truth (data.eval_split) and write metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out_dir: Optional[Path] = None
    try:
        shards_opt = {} if args.num_shards is None else {"dump.num_shards": args.num_shards}
        cfg = load_config(args.config, config_overrides(args, shards_opt))
        run_dir = RunDir.from_config(cfg)
        out_dir = Path(args.out) if args.out else run_dir.shard_dir
        num_shards = cfg["dump"]["num_shards"]
        if num_shards < 1:
            raise BadInputError(f"dump.num_shards must be >= 1, got {num_shards}")
        do_dump = args.shard is not None or not args.evaluate
        rank, world, local_rank = _process_slot()
        tag = "evaluate" if not do_dump else ("all" if args.shard in (None, "all") else str(args.shard))
        log_file = out_dir / "logs" / f"dump-{tag}{f'-rank{rank}' if world > 1 else ''}.log"
        setup_logging(rank=rank)  # stderr only until the inputs are checked (no folders for a failed start)
        if do_dump:
            shards = _shard_list(args.shard, num_shards)
            if world > 1:  # torchrun with --shard all: rank r takes shards r, r + world, ...
                if len(shards) == 1 and args.shard not in (None, "all"):
                    raise BadInputError(f"--shard {args.shard} under torchrun (WORLD_SIZE={world}): use --shard all to "
                                        f"spread the shards over the processes")
                shards = shards[rank::world]
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
            if args.from_probs is None:
                ckpt = Path(args.checkpoint) if args.checkpoint else run_dir.final_ckpt
                if not ckpt.is_file():
                    raise FileNotFoundError(f"checkpoint {ckpt} not found; train the head first (python -m "
                                            f"stage1_cam.train {args.config}) or pass --checkpoint")
            else:
                ckpt = None
            setup_logging(log_file, rank=rank)
            workers = DumpCfg.from_config(cfg).num_crf_workers()
            if not torch.cuda.is_available() and workers:
                # Leave the CRF workers their cores: inference threads + workers = cores.
                torch.set_num_threads(max(1, (os.cpu_count() or 2) - workers))
            run_dump(cfg, shards=shards, out_dir=out_dir, checkpoint=ckpt, device=device,
                     from_probs=Path(args.from_probs) if args.from_probs else None,
                     progress=rank == 0 and not args.no_progress)
        if args.evaluate and rank == 0:
            from .data import build_dataset

            manifest = write_manifest(out_dir, num_shards)
            setup_logging(log_file, rank=rank)
            if not manifest["complete"]:
                _logger.warning("evaluating an incomplete shard set (missing %s)", manifest["missing_shards"])
            dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.eval_split)
            metrics = evaluate_shards(out_dir, dataset)
            path = out_dir / METRICS_NAME
            path.write_text(json.dumps(metrics, indent=2) + "\n")
            m, mc = metrics["final"], metrics["final_confident"]
            no_crf = f", without CRF {_pct(metrics['no_crf']['miou'])}" if "no_crf" in metrics else ""
            _logger.info("pseudo-mask mIoU on %s/%s (%d images): %s (confident pixels only: %s, ignored %s%s); "
                         "written to %s", dataset.dataset, dataset.split, metrics["images"], _pct(m["miou"]),
                         _pct(mc["miou"]), _pct(m["ignore_coverage"]), no_crf, path)
        return 0
    except Exception as e:  # bad input -> exit 2 with one line (stage1_cam.utils.cli); bugs keep their traceback
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and is_disk_full(e):
            e = disk_full_error(out_dir or Path.cwd(), what="the dump's outputs")  # names the space needed
        return exit_on_user_error(e, _logger)


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.dump import main as package_main

    raise SystemExit(package_main())
