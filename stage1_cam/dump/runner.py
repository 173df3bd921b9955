"""``run_dump``: the shards of a split, each from a model (:func:`~.shard_loop.dump_shard`), from stored
probabilities (``--from-probs``) or training-free (:mod:`.training_free`), then the manifest and timing summary."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..config import DumpCfg, config_hash
from ..data import build_dataset
from ..data.class_names import voc_palette
from ..heads import is_training_free
from ..io import ShardFormatError, ShardMeta, ShardReader, ShardWriter, assign_shards, shard_filename, write_manifest
from ..io.shards import DISK_FULL_FIX, check_split
from ..utils.cli import BadInputError
from ..utils.dist import peak_memory_mb
from ..utils.files import DiskFullError, atomic_write_text, check_free_space, disk_full_error, file_sha256, \
    is_disk_full
from ..utils.precision import autocast_dtype, precision_name
from ..utils.run_dir import git_sha
from .postprocess import OrderedPostprocessor, make_crf_executor
from .shard_loop import dump_shard, rerun_from_probs
from .training_free import TrainingFreeMaps, training_free_record, training_free_shard
from .tta import Predictor, build_predictor

_logger = logging.getLogger(__name__)

SUMMARY_NAME = "dump_summary.json"  # timings of the dump (images/s, device, peak memory)


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
                     fix=DISK_FULL_FIX)


def run_dump(cfg: Any, *, shards: Sequence[int], out_dir: Path, checkpoint: Optional[Path] = None,
             from_probs: Optional[Path] = None, device: Optional[torch.device] = None,
             progress: bool = True) -> Dict[int, Dict[str, float]]:
    """Dump the given shards (model mode, ``from_probs`` mode, or training-free), then rebuild ``manifest.json``.

    The mode: ``from_probs`` when given; else training-free when the config's head is (``head.type="none"``,
    :mod:`.training_free`: no checkpoint); else the model of ``checkpoint``.

    With the CRF on, worker processes are started with the ``spawn`` method: a script that calls this
    function must guard its entry point with ``if __name__ == "__main__":``.

    Args:
        cfg: validated stage-1 config.
        shards: shard indices to produce (of ``cfg.dump.num_shards``).
        out_dir: shard directory.
        checkpoint: stage-1 head checkpoint (model mode; ignored when training-free).
        from_probs: source shard directory with stored probabilities (no model).
        device: inference device (default: CUDA if available).
        progress: show progress.

    Returns:
        Per produced shard: ``images``, ``seconds``, ``images_per_s`` (skipped finished shards are absent).

    Raises:
        FileNotFoundError: checkpoint, dataset or source shards missing.
        ValueError / ShardFormatError: inconsistent inputs (messages name the fix); ``out_dir`` holding shards of
            another split (``num_shards``) is refused before anything is written.
        DiskFullError: a shard does not fit on the disk (checked before each shard), or the disk filled up
            while writing (the shard stays partial and resumes on the next run).
    """
    num_shards = cfg["dump"]["num_shards"]
    check_split(out_dir, num_shards)  # before anything is written: another split is never mixed in
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
    elif is_training_free(cfg.head.type):
        split, ckpt_hash, extra_src = cfg.data.dump_split, "", {}
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
    training_free = reader is None and is_training_free(cfg.head.type)
    record = training_free_record(cfg, settings) if training_free else settings.record()
    meta = ShardMeta(dataset=cfg.data.dataset, split=split, class_names=dataset.class_names, palette=voc_palette(256),
                     ignore_index=settings.ignore_index, config_hash=chash, git_sha=git_sha(),
                     checkpoint_hash=ckpt_hash, extra={**record, **extra_src})
    assignment = assign_shards(dataset.names, num_shards)
    predictor: Optional[Predictor] = None
    maps: Optional[TrainingFreeMaps] = None
    executor: Optional[ProcessPoolExecutor] = None
    stats: Dict[int, Dict[str, float]] = {}
    try:
        for i in shards:
            with ShardWriter(out_dir, i, num_shards, meta=meta, flush_every=settings.flush_every) as writer:
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
                elif training_free:
                    if maps is None:
                        maps = TrainingFreeMaps.from_config(cfg, device)
                        _logger.info("training-free pseudo-masks of %s/%s on %s: %s, CRF %s (%d workers)",
                                     cfg.data.dataset, split, device, maps.describe(),
                                     "on" if settings.crf_params else "off", workers)
                    stats[i] = training_free_shard(maps, dataset, assignment[i], writer, postprocessor=post,
                                                   progress=progress)
                else:
                    if predictor is None:
                        assert checkpoint is not None
                        predictor = build_predictor(cfg, Path(checkpoint), device)
                        size = (f"square {settings.square_size}" if settings.protocol == "excel" else
                                f"long side {settings.long_side}")
                        _logger.info("dumping %s/%s with %s on %s: %s protocol, %s, scales %s, flip %s, batch %d, "
                                     "label-constrained %s, CRF %s (%d workers)", cfg.data.dataset, split,
                                     checkpoint, device, settings.protocol, size, list(settings.scales),
                                     settings.flip, settings.batch_size, settings.label_constrained,
                                     "on" if settings.crf_params else "off", workers)
                    stats[i] = dump_shard(predictor, dataset, assignment[i], writer, settings=settings,
                                          postprocessor=post, progress=progress)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            # One clear error; the shard stays .partial and the next run resumes it.
            raise disk_full_error(out_dir, what="the pseudo-mask shards",
                                  fix=DISK_FULL_FIX) from e
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    if stats:  # the timings of the shards just finished (those files are complete whatever follows)
        _write_shard_timings(out_dir, num_shards, stats, device=device, settings=settings, from_probs=from_probs)
    # Every process rebuilds the manifest from the finished files: the last one to finish lists them all.
    write_manifest(out_dir, num_shards)
    if stats:  # only once the manifest accepted the shard set: a refused dump never replaces the summary
        _write_summary(out_dir, num_shards, device=device)
    return stats


def _write_shard_timings(out_dir: Path, num_shards: int, stats: Dict[int, Dict[str, float]], *,
                         device: torch.device, settings: DumpCfg, from_probs: Optional[Path]) -> None:
    """Per-shard timing files (``logs/<shard>.summary.json``) of the shards this process produced."""
    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for i, st in stats.items():
        entry = {**st, "shard": i, "device": str(device), "peak_memory_mib": peak_memory_mb(device),
                 "batch_size": settings.batch_size, "crf": settings.crf_params is not None,
                 "crf_workers": settings.num_crf_workers(), "from_probs": str(from_probs) if from_probs else None}
        (logs / f"{shard_filename(i, num_shards)}.summary.json").write_text(json.dumps(entry, indent=1) + "\n")


def _write_summary(out_dir: Path, num_shards: int, *, device: torch.device) -> None:
    """The sum of the per-shard timing files (:func:`_write_shard_timings`) in ``dump_summary.json``.

    Each process writes only its own shards' files and then re-aggregates all of them (atomic replace), so
    concurrent array tasks never lose each other's entries. Called after :func:`write_manifest` accepted the
    shard set, so a dump that is refused at the end leaves the previous summary as it was.
    """
    logs = Path(out_dir) / "logs"
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
