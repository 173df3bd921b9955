"""Pseudo-mask dumping to HDF5 shards: ``python -m stage1_cam.dump CONFIG [--shard I|all] [--num-shards N] ...``.

Turns a trained stage-1 head into pseudo-masks for the split ``data.dump_split`` (reference_spec 2.2,
the decoder-only ``test_msc_flip_seg.py`` path), shard by shard, resumably:

1. Every image is resized so its long side is ``dump.long_side`` (bilinear, ``align_corners=False``, on
   the normalised tensor). Sizes are snapped to the nearest multiple of the patch size (16): the
   backbone's stride-16 patch embedding would otherwise drop the remainder rows/columns, so the logit
   grid would cover only the top-left part of the image and a horizontal flip would not be an exact
   mirror. For the usual 500x375 VOC image and a long side of 512 the snapped size is the reference's
   512x384 exactly; other aspect ratios move by at most 8 pixels. ``dump.parity_sizes=True`` uses the reference's
   sizes instead: ``(int(H r), int(W r))``, each scale by ``scale_factor``, the remainder dropped by the backbone.
2. For each scale in ``dump.scales`` the scale-1 input is resized by the scale (again snapped to the
   patch), ``[x, flip(x)]`` go through the network in one batch (``dump.flip``), the flipped logits are
   flipped back and averaged, and the result is resized to the scale-1 logit grid (the head's own: the patch
   grid for WeCLIP's and ExCEL's decoders, stride 4 for WeakCLIP's). The mean over scales is upsampled to the
   original (H, W) and soft-maxed.
3. Label-constrained decoding (``dump.label_constrained``): only background and the image-level classes
   may appear; the logits are restricted to those channels *before* the softmax, and the CRF runs on
   them only (fewer labels, faster).
4. The probabilities are rounded to float16 once, and everything downstream (dense CRF with
   ``dump.crf.*``, argmax, confidence = max probability, ``dump.ignore_threshold``) reads those rounded
   values. ``dump.save_probs`` stores exactly them, so ``--from-probs`` reproduces a dump bit for bit.
5. The dense CRF runs in worker processes (``dump.crf.workers``; 0 = cores - 1) with a bounded number
   of jobs in flight, so inference never waits on it; results are written in submission order, by one
   background thread (validation, lzf compression, HDF5), while the next batch runs. Without the CRF and
   stored probabilities, argmax and confidence are taken on the device from the float16-rounded values
   (bit-identical to the host's) and only they are copied back.

Images are batched: images whose resized size is identical (after snapping) are grouped, up to
``dump.batch_size`` images (``2 x batch_size`` network inputs with flip). The grouping is a
deterministic function of the shard's id list and image sizes (:func:`plan_batches`), so a resumed shard
runs exactly the same batches as an uninterrupted one and produces identical output.

Resume: finished images of a partial shard are skipped (a batch is recomputed in full when some of its
images are missing, but only those are written; finished images are still decoded, to learn their sizes for
the batch plan); a finished shard is never rewritten. Images are durable at the shard's progress points, every
``dump.flush_every`` images: a killed dump recomputes at most those written since the last one. After the shards,
``manifest.json`` is (re)built (it lists missing shards) and ``dump_summary.json`` sums the timings.

Other modes: ``--from-probs SRC`` re-runs CRF/threshold from the float16 probabilities of an earlier
dump (no model); ``--evaluate`` scores the shards against ground truth (``data.eval_split``) and writes
``metrics.json`` into the shard directory. Under ``torchrun``, ``--shard all`` gives rank r the shards
r, r + WORLD_SIZE, ...; a SLURM array runs one ``--shard I`` per task.

Training-free mode (``head.type="none"``, or ``--training-free``): no model; the refined initial CAMs -> background
+ PAR -> labels (CRF optional) are written into the same shards (:mod:`.training_free`).

Modules: :mod:`.tta` (sizes, test-time augmentation, the network pass: ``Predictor``, ``predict_probs``; the
``weclip`` and ``excel`` protocols), :mod:`.postprocess` (argmax / dense CRF in worker processes,
``OrderedPostprocessor``), :mod:`.shard_loop` (the resumable per-shard loops), :mod:`.training_free`,
:mod:`.writer_thread` (``BackgroundWriter``), :mod:`.runner` (``run_dump``), :mod:`.evaluate` (``evaluate_shards``),
:mod:`.cli` (``main``).
"""

from .cli import main, parse_args
from .evaluate import METRICS_NAME, evaluate_shards
from .postprocess import Job, OrderedPostprocessor, apply_ignore, decode_probs, make_crf_executor
from .runner import SUMMARY_NAME, run_dump, shard_bytes_needed
from .shard_loop import dump_shard, rerun_from_probs
from .training_free import TrainingFreeMaps, training_free_record, training_free_shard
from .tta import PendingBatch, Predictor, allowed_classes, batch_key, build_predictor, decode_on_device, excel_logits, \
    logits_to_probs, msc_flip_logits, network_size, plan_batches, predict_async, predict_probs, scaled_size, \
    snap_to_patch, square_size
from .writer_thread import BackgroundWriter

__all__ = ["METRICS_NAME", "SUMMARY_NAME", "BackgroundWriter", "Job", "OrderedPostprocessor", "PendingBatch",
           "Predictor", "TrainingFreeMaps", "allowed_classes", "apply_ignore", "batch_key", "build_predictor",
           "decode_on_device", "decode_probs", "dump_shard", "evaluate_shards", "excel_logits", "logits_to_probs",
           "main", "make_crf_executor", "msc_flip_logits", "network_size", "parse_args", "plan_batches",
           "predict_async", "predict_probs", "rerun_from_probs", "run_dump", "scaled_size", "shard_bytes_needed",
           "snap_to_patch", "square_size", "training_free_record", "training_free_shard"]
