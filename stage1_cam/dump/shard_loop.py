"""The per-shard loops: images of a shard in order -> probabilities -> post-processing -> :class:`ShardWriter`,
resumably (images already in the writer are skipped). :func:`dump_shard` runs the network, :func:`rerun_from_probs`
re-decodes stored probabilities; :func:`postprocess_into` is the shared tail (also of the training-free writer):
the results are written by one background thread (:class:`~.writer_thread.BackgroundWriter`), in order."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import DumpCfg
from ..io import ShardReader, ShardWriter
from ..utils.cli import BadInputError
from ..utils.logging import EveryN
from .postprocess import Job, OrderedPostprocessor
from .tta import Decoded, PendingBatch, Predictor, allowed_classes, batch_key, plan_batches, predict_async
from .writer_thread import BackgroundWriter

# (name, image, probabilities (K, H, W) float16 or a device-decoded (label, confidence), keys, image labels)
Submission = Tuple[str, np.ndarray, Union[np.ndarray, Decoded], np.ndarray, np.ndarray]

_logger = logging.getLogger(__name__)


class Progress:
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


def iter_images(load: Callable[[str], np.ndarray], names: Sequence[str], *, window: int = 16,
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


def _write(writer: ShardWriter, job: Job, settings: DumpCfg) -> None:
    label, conf = job.result  # type: ignore[misc]
    writer.write(job.name, label=label, confidence=conf, image_labels=job.image_labels,
                 probs=job.probs if settings.save_probs else None,
                 prob_keys=job.keys if settings.save_probs else None)


def dump_shard(predictor: Predictor, dataset: Any, names: Sequence[str], writer: ShardWriter, *,
               settings: DumpCfg, postprocessor: OrderedPostprocessor, progress: bool = True
               ) -> Dict[str, float]:
    """Dump the images ``names`` of ``dataset`` into ``writer`` (skipping ``writer.done_ids``), then finalize.

    Each batch's network pass is launched before the previous batch's results are read (one batch of
    look-ahead: on CUDA the device computes while the host post-processes). Without the CRF and stored
    probabilities, the argmax is taken on the device and only the labels and confidences are copied back.

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
    bar = Progress(total=len(names), done=len(done & set(names)),
                   desc=f"shard {writer.shard_index}/{writer.num_shards}", enabled=progress)

    def sized() -> Iterator[Tuple[Tuple[int, int], Tuple[str, np.ndarray]]]:
        for name, image in iter_images(dataset.load_image, names):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {name!r} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            yield batch_key(*image.shape[:2], settings, p), (name, image)

    decode = settings.crf_params is None and not settings.save_probs  # the host needs only label + confidence

    def results(batch: List[Tuple[str, np.ndarray]], keys: List[np.ndarray], pending: PendingBatch
                ) -> Iterator[Submission]:
        for (name, image), out, k in zip(batch, pending.result(), keys):
            if name not in done:
                yield name, image, out, k, dataset.image_labels(name)

    def submissions() -> Iterator[Submission]:
        previous: Optional[Tuple[List[Tuple[str, np.ndarray]], List[np.ndarray], PendingBatch]] = None
        for batch in plan_batches(sized(), batch_size=settings.batch_size, max_pending=4 * settings.batch_size):
            if all(name in done for name, _ in batch):
                continue
            keys = [allowed_classes(dataset.image_labels(n), predictor.num_classes,
                                    label_constrained=settings.label_constrained) for n, _ in batch]
            launched = (batch, keys, predict_async(predictor, [im for _, im in batch], keys, settings=settings,
                                                   decode=decode))
            if previous is not None:  # read only now: the device already has the next batch queued
                yield from results(*previous)
            previous = launched
        if previous is not None:
            yield from results(*previous)

    return postprocess_into(submissions(), writer=writer, settings=settings, postprocessor=postprocessor,
                            bar=bar, what="")


def postprocess_into(submissions: Iterable[Submission], *, writer: ShardWriter, settings: DumpCfg,
                     postprocessor: OrderedPostprocessor, bar: "Progress", what: str) -> Dict[str, float]:
    """CRF/argmax each ``(name, image, probs or decoded, keys, image_labels)`` in order, write it, then finalize.

    The writes (validation, lzf compression, HDF5; the shard's progress points) run in one background thread,
    in order, behind a bounded queue; ``bar`` counts images when they are written.

    Args:
        submissions: per image its id, the RGB image, its (K, H, W) float16 probabilities or a device-decoded
            ``(label, confidence)``, the (K,) class ids and the image-level labels, in shard order.
        writer: the open shard writer.
        settings: dump settings (``save_probs``).
        postprocessor: CRF/argmax stage.
        bar: progress of the shard.
        what: suffix of the log line (the mode).

    Returns:
        ``images`` (newly written), ``seconds``, ``images_per_s``.

    Raises:
        BaseException: whatever the loop or the writer thread raised (the same exception object). The in-flight
            CRF jobs are then cancelled, the writer thread is stopped after its current image, and the shard
            stays partial (resumable).
    """
    def write(job: Job) -> None:
        _write(writer, job, settings)
        bar.update()

    out: BackgroundWriter[Job] = BackgroundWriter(write, max_queue=max(2, settings.batch_size))
    try:
        for name, image, result, keys, labels in submissions:
            probs, decoded = (None, result) if isinstance(result, tuple) else (result, None)
            for job in postprocessor.submit(name, image=image, probs=probs, keys=keys, image_labels=labels,
                                            decoded=decoded):
                out.put(job)
        for job in postprocessor.drain():
            out.put(job)
        out.close()
    except BaseException:
        postprocessor.cancel()
        out.abort()
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
    bar = Progress(total=len(names), done=len(done & set(names)),
                   desc=f"shard {writer.shard_index}/{writer.num_shards} (from probs)", enabled=progress)
    todo = [n for n in names if n not in done]

    def submissions() -> Iterator[Submission]:
        for name, image in iter_images(dataset.load_image, todo):
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

    return postprocess_into(submissions(), writer=writer, settings=settings, postprocessor=postprocessor,
                            bar=bar, what=" (from probs)")
