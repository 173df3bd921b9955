"""Training augmentation (reference_spec 1.1) driven by one seeded RNG per sample.

The reference draws the scale, flip and crop window from Python's ``random`` and the pad offset from
numpy's global RNG inside DataLoader workers, so its augmentation stream depends on the worker count
(reference_spec 7.1 item 17). Here every sample gets its own ``np.random.Generator`` from
:func:`sample_rng` (seed, index, epoch), so a run is reproducible whatever the number of workers.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..constants import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS
from .datasets import SegDataset, multi_hot

_logger = logging.getLogger(__name__)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel ``(x - mean) / std``.

    Args:
        image: (H, W, 3) uint8 or float, RGB on the 0-255 scale.
        mean: three channel means (0-255 scale).
        std: three channel standard deviations (0-255 scale).

    Returns:
        (H, W, 3) float32.
    """
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    if mean_arr.shape != (3,) or std_arr.shape != (3,) or np.any(std_arr <= 0):
        raise ValueError(f"mean and std must be 3 values each with std > 0, got mean={mean}, std={std}")
    return (np.asarray(image, dtype=np.float32) - mean_arr) / std_arr


def rescale(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """The training rescale of reference_spec 1.1: PIL's BILINEAR resize of the uint8 image.

    PIL widens the bilinear kernel by the shrink factor when it downscales (an antialiasing filter); OpenCV's
    INTER_LINEAR does not, and differs from it by up to about 60 grey levels on a photo shrunk by half.

    Args:
        image: (H, W, 3) uint8 RGB.
        size: (h, w) of the result.

    Returns:
        (h, w, 3) uint8.
    """
    h, w = size
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample=Image.BILINEAR))


def sample_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The augmentation RNG of one sample: a function of (seed, epoch, index) only, not of workers."""
    if seed < 0 or index < 0 or epoch < 0:
        raise ValueError(f"seed, index and epoch must be >= 0, got {seed}, {index}, {epoch}")
    return np.random.default_rng([seed, epoch, index])


class CropGeometry(NamedTuple):
    """One training sample's geometry (from :meth:`TrainAugment.geometry`).

    Attributes:
        size: (h, w) after rescaling.
        flip: whether to flip horizontally.
        canvas: (H, W) of the padded canvas (at least the crop size).
        offset: (y, x) of the rescaled image on the canvas.
        window: (y0, x0) of the crop window on the canvas.
    """

    size: Tuple[int, int]
    flip: bool
    canvas: Tuple[int, int]
    offset: Tuple[int, int]
    window: Tuple[int, int]


class TrainAugment:
    """Random rescale, horizontal flip, zero-pad, random crop and normalisation (WeCLIP's train pipeline).

    Order (as the reference): rescale by ``r ~ U(scale_range)`` (PIL bilinear, which widens its kernel when it
    shrinks, so a downscale averages rather than aliases), flip with p = 0.5, pad with
    zeros to at least ``crop_size`` at a random offset, take a random ``crop_size`` window, normalise. The
    padding happens before normalisation, so padded pixels become ``-mean / std``.

    Args:
        crop_size: side of the square output crop (pixels).
        scale_range: (low, high) of the uniform rescale ratio.
        flip: enable the random horizontal flip.
        mean: normalisation mean, RGB, 0-255 scale (default ImageNet, the reference's choice).
        std: normalisation std, RGB, 0-255 scale.
    """

    def __init__(self, *, crop_size: int = 320, scale_range: Tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
        self.crop_size = int(crop_size)
        self.scale_range = (lo, hi)
        self.flip = bool(flip)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        normalize(np.zeros((1, 1, 3), np.float32), self.mean, self.std)  # validates mean/std early

    def __repr__(self) -> str:
        return (f"TrainAugment(crop_size={self.crop_size}, scale_range={self.scale_range}, flip={self.flip}, "
                f"mean={self.mean}, std={self.std})")

    def geometry(self, shape: Tuple[int, int], rng: np.random.Generator) -> "CropGeometry":
        """Draw one sample's geometry for an image of ``shape`` (H, W).

        Every random number is drawn up front in a fixed order (scale, flip, pad and window offsets), so
        the stream never depends on the image, and anything cut with the same generator state (e.g. a
        pseudo-mask) gets the same crop.
        """
        crop = self.crop_size
        ratio = rng.uniform(*self.scale_range)
        do_flip = rng.random() < 0.5
        pad_u, pad_v, win_u, win_v = rng.random(4)
        h0, w0 = shape
        h, w = max(1, int(ratio * h0)), max(1, int(ratio * w0))
        big_h, big_w = max(crop, h), max(crop, w)
        return CropGeometry(size=(h, w), flip=self.flip and do_flip, canvas=(big_h, big_w),
                            offset=(int(pad_u * (big_h - h + 1)), int(pad_v * (big_w - w + 1))),
                            window=(int(win_u * (big_h - crop + 1)), int(win_v * (big_w - crop + 1))))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Augment one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            rng: the sample's generator (see :func:`sample_rng`); draws happen in a fixed order.

        Returns:
            img: (3, crop, crop) float32, normalised.
            img_box: (4,) int64 ``[y0, y1, x0, x1]``, the region of the crop covered by the image (the rest
                is padding); ``y1``/``x1`` are exclusive.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} {image.dtype}")
        crop = self.crop_size
        g = self.geometry(image.shape[:2], rng)
        h, w = g.size
        if (h, w) != image.shape[:2]:
            image = rescale(image, (h, w))
        if g.flip:
            image = image[:, ::-1]
        canvas = np.zeros((*g.canvas, 3), np.float32)
        canvas[g.offset[0]:g.offset[0] + h, g.offset[1]:g.offset[1] + w] = image
        y0, x0 = g.window
        out = normalize(canvas[y0:y0 + crop, x0:x0 + crop], self.mean, self.std)
        off_y, off_x = g.offset
        img_box = np.array([max(off_y - y0, 0), min(off_y + h - y0, crop),
                            max(off_x - x0, 0), min(off_x + w - x0, crop)], dtype=np.int64)
        return np.ascontiguousarray(out.transpose(2, 0, 1)), img_box


class TrainCropDataset(Dataset):
    """Augmented training crops with multi-hot image-level labels, for the refinement head.

    Images without any foreground label are excluded at construction (one warning gives the count).
    The augmentation of item ``i`` in epoch ``e`` uses ``sample_rng(seed, i, e)``; call
    :meth:`set_epoch` before creating each epoch's DataLoader iterator (with ``persistent_workers`` off,
    workers see the new epoch).

    Args:
        base: the split to read.
        augment: the augmentation.
        seed: base seed of the per-sample RNGs.

    Raises:
        ValueError: no image of the split has a foreground label.
    """

    def __init__(self, base: SegDataset, augment: TrainAugment, *, seed: int) -> None:
        self.base = base
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        keep = [i for i, name in enumerate(base.names) if base.image_labels(name).size > 0]
        dropped = len(base) - len(keep)
        if dropped:
            _logger.warning("%d of %d images of %s/%s have no foreground label and are excluded from training",
                            dropped, len(base), base.dataset, base.split)
        if not keep:
            raise ValueError(f"no image of split {base.split!r} in {base.root} has a foreground label; "
                             f"check the masks in SegmentationClassAug / SegmentationClass")
        self.indices = keep  # positions in ``base``

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """One sample.

        Returns:
            dict with ``img`` (3, crop, crop) float32, ``cls_label`` (C-1,) float32 multi-hot, ``name``
            (str), ``index`` (int, the position passed in) and ``img_box`` (4,) int64 ``[y0, y1, x0, x1]``.
        """
        if not 0 <= index < len(self.indices):
            raise IndexError(f"index {index} out of range for {len(self.indices)} samples")
        name = self.base.names[self.indices[index]]
        image = self.base.load_image(name)
        img, img_box = self.augment(image, sample_rng(self.seed, index, self.epoch))
        labels = multi_hot(self.base.image_labels(name), self.base.num_classes)
        return {"img": torch.from_numpy(img), "cls_label": torch.from_numpy(labels), "name": name,
                "index": index, "img_box": torch.from_numpy(img_box)}


def normalization(cfg: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel (mean, std) of ``cfg.data.normalization`` (0-255 scale, RGB)."""
    try:
        return NORMALIZATIONS[cfg.data.normalization]
    except KeyError:
        raise ValueError(f"data.normalization={cfg.data.normalization!r}; valid: {', '.join(NORMALIZATIONS)}") from None
