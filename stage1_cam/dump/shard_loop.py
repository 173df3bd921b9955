"""The shard loop: images of a shard in order -> network -> post-processing -> :class:`ShardWriter`, resumably;
``run_dump`` runs it over the shards of a split and rebuilds the manifest."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import DumpCfg, config_hash
from ..data import build_dataset
from ..data.class_names import voc_palette
from ..io import ShardFormatError, ShardMeta, ShardReader, ShardWriter, assign_shards, shard_filename, write_manifest
from ..utils.cli import BadInputError
from ..utils.dist import peak_memory_mb
from ..utils.files import DiskFullError, atomic_write_text, check_free_space, disk_full_error, file_sha256, \
    is_disk_full
from ..utils.logging import EveryN
from ..utils.precision import autocast_dtype, precision_name
from ..utils.run_dir import git_sha
from .postprocess import Job, OrderedPostprocessor, make_crf_executor
from .tta import Predictor, allowed_classes, build_predictor, network_size, plan_batches, predict_probs

_logger = logging.getLogger(__name__)

SUMMARY_NAME = "dump_summary.json"  # timings of the dump (images/s, device, peak memory)


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
                        predictor = build_predictor(cfg, Path(checkpoint), device)
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
