"""The per-shard loops: images of a shard in order -> probabilities -> post-processing -> :class:`ShardWriter`,
resumably (images already in the writer are skipped). :func:`dump_shard` runs the network, :func:`rerun_from_probs`
re-decodes stored probabilities; :func:`postprocess_into` is the shared tail (also of the training-free writer)."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, Sequence, Tuple

import numpy as np

from ..config import DumpCfg
from ..io import ShardReader, ShardWriter
from ..utils.cli import BadInputError
from ..utils.logging import EveryN
from .postprocess import Job, OrderedPostprocessor
from .tta import Predictor, allowed_classes, batch_key, plan_batches, predict_probs

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

    return postprocess_into(submissions(), writer=writer, settings=settings, postprocessor=postprocessor,
                            bar=bar, what="")


def postprocess_into(submissions: Iterable[Tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]], *,
                     writer: ShardWriter, settings: DumpCfg, postprocessor: OrderedPostprocessor,
                     bar: "Progress", what: str) -> Dict[str, float]:
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
    bar = Progress(total=len(names), done=len(done & set(names)),
                   desc=f"shard {writer.shard_index}/{writer.num_shards} (from probs)", enabled=progress)
    todo = [n for n in names if n not in done]

    def submissions() -> Iterator[Tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
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
