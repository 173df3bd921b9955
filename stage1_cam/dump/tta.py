"""The dump's network side: input sizes, test-time augmentation (scales, flips) and the fused probabilities.

Two protocols (``dump.protocol``):

* ``weclip`` (default; reference_spec 2.2, described in the package docstring :mod:`stage1_cam.dump`): long side
  resized to ``dump.long_side``, the other scales resized from that input, logits fused on the scale-1 logit grid,
  then upsampled to the image size (:func:`msc_flip_logits`);
* ``excel`` (ExCEL's ``tools/infer_seg_voc.py``, reference_spec 4.9): for every scale ``s`` the whole image is
  resized to a square ``dump.square_size * s`` (snapped to the patch; exact for 320 x {0.7, 1.0, 1.2, 1.5} at patch
  16), the flip is fused at every scale, each scale's logits are upsampled to the original (H, W) and the scales
  averaged (:func:`excel_logits`). ``dump.parity_no_flip_at_1`` reproduces the reference quirk of using only the
  un-flipped logits at s = 1.0 (the flipped pass is then skipped: the output is the same).

Both then restrict to the allowed classes, softmax and round to float16 on the device (:func:`predict_probs`). When
the host needs only the argmax (CRF off, no stored probabilities), the label and confidence are decoded on the
device from those rounded values and only they are copied back (:func:`predict_async` with ``decode=True``). On
CUDA, images go to the device from pinned memory and results come back through pinned buffers, asynchronously.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DumpCfg
from ..utils.cli import BadInputError
from ..utils.precision import autocast, autocast_dtype, precision_name

_logger = logging.getLogger(__name__)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ sizes
def snap_to_patch(x: float, patch: int) -> int:
    """``x`` rounded to the nearest multiple of ``patch`` (halves round up), at least one patch."""
    return max(patch, int(math.floor(x / patch + 0.5)) * patch)


def network_size(height: int, width: int, *, long_side: int, patch: int, exact: bool = False) -> Tuple[int, int]:
    """Scale-1 network input size of an (height, width) image: long side -> ``long_side``, snapped to ``patch``;
    ``exact``: the reference's ``(int(H r), int(W r))`` (at least one patch), not snapped."""
    r = long_side / max(height, width)
    if exact:
        return max(patch, int(height * r)), max(patch, int(width * r))
    return snap_to_patch(height * r, patch), snap_to_patch(width * r, patch)


def scaled_size(size: Tuple[int, int], scale: float, patch: int, exact: bool = False) -> Tuple[int, int]:
    """Input size at a test-time ``scale`` of the scale-1 ``size`` (snapped to ``patch``); ``exact``: what the
    reference's ``F.interpolate(scale_factor=scale)`` gives, ``floor(size * scale)`` (at least one patch)."""
    if scale == 1.0:
        return size
    if exact:
        return max(patch, math.floor(size[0] * scale)), max(patch, math.floor(size[1] * scale))
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


def square_size(scale: float, side: int, patch: int) -> Tuple[int, int]:
    """ExCEL protocol input size at ``scale``: the square ``side * scale``, snapped to ``patch``."""
    n = snap_to_patch(side * scale, patch)
    return n, n


def batch_key(height: int, width: int, settings: DumpCfg, patch: int) -> Tuple[int, int]:
    """The size that decides which images share a batch: the scale-1 network size (``weclip``), or the square
    of the ExCEL protocol (every image: they are all resized to the same squares)."""
    if settings.protocol == "excel":
        return square_size(1.0, settings.square_size, patch)
    return network_size(height, width, long_side=settings.long_side, patch=patch, exact=settings.parity_sizes)


# -------------------------------------------------------------------------------------------- inference
@dataclass
class Predictor:
    """The network side of the dump: decoder logits for normalised batches, plus what the dump needs.

    Attributes:
        predict: ``(B, 3, H, W)`` normalised images -> ``(B, C, f * (H // patch), f * (W // patch))`` logits (``f``
            logits per patch side: 1 for the WeCLIP and ExCEL decoders, 4 for WeakCLIP).
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
        """(B, 3, H, W) -> float32 logits (B, C, f * (H // patch), f * (W // patch))."""
        with autocast(images.device, self.amp_dtype):
            return self.predict(images).float()

    def prepare(self, image: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> normalised (3, size[0], size[1]) float32 on ``device`` (bilinear resize).

        On CUDA the uint8 image is copied from pinned memory without blocking the host (the caching host allocator
        keeps the pinned buffer until the copy has run).
        """
        src = torch.from_numpy(np.ascontiguousarray(image))
        if self.device.type == "cuda":
            src = src.pin_memory()
        t = src.to(self.device, non_blocking=True).permute(2, 0, 1).float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        t = (t - mean) / std
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
        return t


@torch.no_grad()
def msc_flip_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                    scales: Sequence[float], flip: bool, patch_size: int, exact_sizes: bool = False) -> torch.Tensor:
    """Multi-scale + flip fused logits at the scale-1 logit grid (reference_spec 2.2 steps 3-6), batched.

    The scale-1 logit grid is the head's own output grid: ``f`` logits per patch side, ``f`` read from the first
    pass (1 for the decoders on the patch tokens, 4 for WeakCLIP's stride-4 FPN head, reference_spec 5.2), so a
    finer head keeps its resolution.

    Args:
        predict: ``(N, 3, h, w)`` -> ``(N, C, f * (h // patch), f * (w // patch))`` logits, ``f`` >= 1.
        images: (B, 3, H, W) normalised scale-1 inputs, H and W multiples of ``patch_size`` (any size with
            ``exact_sizes``).
        scales: test-time scales (each input size snapped to the patch).
        flip: average each scale with its horizontally flipped input (one batch of 2B).
        patch_size: backbone patch size.
        exact_sizes: the reference's sizes (``dump.parity_sizes``): each scale resized by ``scale_factor`` as it
            does, sizes not snapped; the patch embedding drops the remainder rows/columns.

    Returns:
        (B, C, f * (H // patch), f * (W // patch)) float32: mean over scales of the flip-averaged logits.
    """
    b, _, h, w = images.shape
    if (h % patch_size or w % patch_size) and not exact_sizes:
        raise ValueError(f"input size {(h, w)} is not a multiple of the patch size {patch_size}")
    grid: Optional[Tuple[int, int]] = None
    total: Optional[torch.Tensor] = None
    for s in scales:
        size = scaled_size((h, w), float(s), patch_size, exact=exact_sizes)
        if size == (h, w):
            x = images
        elif exact_sizes:  # scale_factor maps coordinates by s itself, not by the floored size's ratio
            x = F.interpolate(images, scale_factor=float(s), mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        out = predict(x).float()  # (B or 2B, C, size // patch)
        if flip:
            out = (out[:b] + out[b:].flip(-1)) / 2
        if grid is None:
            f = out.shape[-2] // max(1, x.shape[-2] // patch_size)
            grid = (f * (h // patch_size), f * (w // patch_size))
        if tuple(out.shape[-2:]) != grid:
            out = F.interpolate(out, size=grid, mode="bilinear", align_corners=False)
        total = out if total is None else total + out
    assert total is not None
    return total / len(scales)


@torch.no_grad()
def excel_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor], *,
                 scales: Sequence[float], flip: bool, side: int, patch_size: int, no_flip_at_1: bool = False,
                 keys: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """ExCEL's multi-scale + flip inference (reference_spec 4.9), batched over images of any size.

    Args:
        predict: ``(N, 3, h, w)`` -> ``(N, C, f * (h // patch), f * (w // patch))`` logits (any ``f``: each scale is
            upsampled to the original size).
        images: B normalised images (3, H_b, W_b) at their original size.
        scales: test-time scales; the input at scale ``s`` is the whole image resized (bilinear,
            ``align_corners=False``) to the square :func:`square_size` ``(s, side)``.
        flip: fuse each scale with its horizontally flipped input (one batch of 2B).
        side: the scale-1 square side (``dump.square_size``, 320 in ExCEL).
        patch_size: backbone patch size.
        no_flip_at_1: the reference quirk: at s = 1.0 only the un-flipped logits are used.
        keys: per image the channels to keep (selected before the upsampling, which acts per channel, so the
            result equals selecting afterwards, up to float rounding, while using less memory); None keeps all C.

    Returns:
        Per image (K_b or C, H_b, W_b) float32: the mean over scales of the flip-fused logits, each scale upsampled
        (bilinear, ``align_corners=False``) to the original size first.
    """
    b = len(images)
    totals: List[Optional[torch.Tensor]] = [None] * b
    for s in scales:
        size = square_size(float(s), side, patch_size)
        x = torch.stack([F.interpolate(im[None], size=size, mode="bilinear", align_corners=False)[0]
                         for im in images])
        fuse = flip and not (no_flip_at_1 and float(s) == 1.0)
        if fuse:
            x = torch.cat([x, x.flip(-1)])
        out = predict(x).float()  # (B or 2B, C, size // patch)
        out = (out[:b] + out[b:].flip(-1)) / 2 if fuse else out
        for i, im in enumerate(images):
            o = out[i] if keys is None else out[i].index_select(0, keys[i])
            up = F.interpolate(o[None], size=tuple(im.shape[-2:]), mode="bilinear", align_corners=False)[0]
            totals[i] = up if totals[i] is None else totals[i] + up
    return [t / len(scales) for t in totals]  # type: ignore[operator]


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


Decoded = Tuple[np.ndarray, np.ndarray]  # (H, W) uint8 label, (H, W) float32 confidence


def decode_on_device(probs16: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Argmax decoding of float16-rounded probabilities where they are: bit-identical to
    :func:`~stage1_cam.dump.postprocess.decode_probs` on the host copy.

    Args:
        probs16: (K, H, W) float16 probabilities.
        keys: (K,) int64 class ids of the channels, on ``probs16.device``.

    Returns:
        (H, W) uint8 label (first maximal channel on ties, as NumPy's argmax) and (H, W) float16 confidence
        (the maximum; exact, as it is one of the float16 values).
    """
    conf, idx = probs16.float().max(dim=0)  # first maximal index on ties (torch.max documents it)
    return keys.index_select(0, idx.reshape(-1)).reshape(idx.shape).to(torch.uint8), conf.to(torch.float16)


class PendingBatch:
    """Per-image device results on their way to the host.

    On CUDA each tensor is copied into a pinned host buffer with ``non_blocking=True`` and an event is recorded
    after the copies; :meth:`result` waits for that event before NumPy reads the buffers. Elsewhere the copies
    are plain (synchronous) ones.

    Args:
        outputs: per image a tuple of device tensors (probabilities, or label and confidence).
        decoded: whether the tuples are (label, float16 confidence) rather than (probabilities,).
    """

    def __init__(self, outputs: Sequence[Tuple[torch.Tensor, ...]], *, decoded: bool) -> None:
        self.decoded = decoded
        self._event: Optional[Any] = None
        device = outputs[0][0].device if outputs else torch.device("cpu")
        if device.type == "cuda":
            self._host = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                                for t in out) for out in outputs]
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
        else:
            self._host = [tuple(t.cpu() for t in out) for out in outputs]

    def result(self) -> List[Any]:
        """Per image: (K, H, W) float16 probabilities, or a :data:`Decoded` (label uint8, confidence float32)."""
        if self._event is not None:
            self._event.synchronize()  # the non_blocking copies must have landed before NumPy reads the buffers
        if self.decoded:
            return [(lab.numpy(), conf.numpy().astype(np.float32)) for lab, conf in self._host]
        return [out[0].numpy() for out in self._host]


@torch.no_grad()
def predict_async(predictor: Predictor, images: Sequence[np.ndarray], keys: Sequence[np.ndarray], *,
                  settings: DumpCfg, decode: bool = False) -> PendingBatch:
    """Launch the network pass of a batch of images that share one network size; read it with ``.result()``.

    On CUDA this returns once the work is queued, so the host can prepare (or post-process) other images
    meanwhile.

    Args:
        predictor: the network.
        images: B images (H_b, W_b, 3) uint8 RGB whose :func:`batch_key` is identical.
        keys: per image (K_b,) allowed class ids.
        settings: protocol, sizes, scales and flip.
        decode: decode on the device (:func:`decode_on_device`) and copy back only the label and confidence.

    Returns:
        The pending per-image (K_b, H_b, W_b) float16 probabilities, or (label, confidence) with ``decode``.
    """
    p = predictor.patch_size
    sizes = {batch_key(*im.shape[:2], settings, p) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"a batch must share one network size, got {sorted(sizes)}")
    ks = [torch.as_tensor(k, dtype=torch.long, device=predictor.device) for k in keys]
    if settings.protocol == "excel":
        fused = excel_logits(predictor, [predictor.prepare(im, im.shape[:2]) for im in images], scales=settings.scales,
                             flip=settings.flip, side=settings.square_size, patch_size=p,
                             no_flip_at_1=settings.parity_no_flip_at_1, keys=ks)
        probs = [f.softmax(dim=0).to(torch.float16) for f in fused]
    else:
        size = sizes.pop()
        x = torch.stack([predictor.prepare(im, size) for im in images])
        logits = msc_flip_logits(predictor, x, scales=settings.scales, flip=settings.flip, patch_size=p,
                                 exact_sizes=settings.parity_sizes)
        probs = [logits_to_probs(logits[b], im.shape[:2], ks[b]).to(torch.float16) for b, im in enumerate(images)]
    if decode:
        return PendingBatch([decode_on_device(pr, k) for pr, k in zip(probs, ks)], decoded=True)
    return PendingBatch([(pr,) for pr in probs], decoded=False)


def predict_probs(predictor: Predictor, images: Sequence[np.ndarray], keys: Sequence[np.ndarray], *,
                  settings: DumpCfg) -> List[np.ndarray]:
    """Probabilities of a batch of images that share one network size (:func:`predict_async`, waited for).

    Args:
        predictor: the network.
        images: B images (H_b, W_b, 3) uint8 RGB whose :func:`batch_key` is identical.
        keys: per image (K_b,) allowed class ids.
        settings: protocol, sizes, scales and flip.

    Returns:
        Per image (K_b, H_b, W_b) float16 probabilities (NumPy).
    """
    return predict_async(predictor, images, keys, settings=settings).result()


def build_predictor(cfg: Any, checkpoint: Path, device: torch.device) -> Predictor:
    """Build the stack, load the head strictly from ``checkpoint``, eval mode."""
    from ..build import build_stage1  # lazy for cost: the model stack (open_clip) only when a model is dumped
    from ..train import load_checkpoint

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
