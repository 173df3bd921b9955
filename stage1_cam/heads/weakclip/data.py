"""WeakCLIP training data: pseudo-mask crops cut with the image crop's own seeded geometry."""

from __future__ import annotations

from typing import Any, Dict

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ...constants import IGNORE_INDEX
from ...data.datasets import multi_hot
from ...data.transforms import sample_rng


def augment_mask(mask: np.ndarray, augment: Any, rng: np.random.Generator) -> np.ndarray:
    """Cut a label map with the geometry of :class:`~stage1_cam.data.transforms.TrainAugment`.

    ``augment.geometry`` draws the same random numbers as the image augmentation, so a generator seeded
    like the image's gives the matching crop. Resizing is nearest-neighbour and padding is ``IGNORE_INDEX``.

    Args:
        mask: (H, W) uint8 label map of the original image.
        augment: the ``TrainAugment`` of the image crops.
        rng: a generator in the same state as the one given to the image augmentation.

    Returns:
        (crop, crop) uint8 label crop.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {mask.shape}")
    crop = augment.crop_size
    g = augment.geometry(mask.shape, rng)
    h, w = g.size
    if (h, w) != mask.shape:
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if g.flip:
        mask = mask[:, ::-1]
    canvas = np.full(g.canvas, IGNORE_INDEX, np.uint8)
    canvas[g.offset[0]:g.offset[0] + h, g.offset[1]:g.offset[1] + w] = mask
    y0, x0 = g.window
    return np.ascontiguousarray(canvas[y0:y0 + crop, x0:x0 + crop])


class MaskedTrainCrops(Dataset):
    """A ``TrainCropDataset`` whose items also carry the matching pseudo-mask crop.

    Items are those of the wrapped dataset (same image crop, labels, name, index, box) plus ``mask``:
    (crop, crop) uint8 class ids with 255 = no cue, cut with the sample's own seeded geometry.

    Args:
        crops: the training loop's ``TrainCropDataset``.
        masks: a :class:`~stage1_cam.io.shards.ShardReader` holding a mask for every training image.

    Raises:
        ValueError: some training images have no mask in the shards (the message names them and the fix).
    """

    def __init__(self, crops: Any, masks: Any) -> None:
        self.crops = crops
        self.masks = masks
        names = [crops.base.names[i] for i in crops.indices]
        missing = [n for n in names if n not in masks]
        if missing:
            raise ValueError(f"{len(missing)} of {len(names)} training images of split {crops.base.split!r} have no "
                             f"pseudo-mask in {masks.shard_dir} (e.g. {', '.join(missing[:3])}); point "
                             f"head.masks to shards made for that split (the CAM shards of "
                             f"`python -m stage1_cam.cams` cover data.eval_split, a dump covers data.dump_split)")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (forwarded to the wrapped dataset)."""
        self.crops.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        c = self.crops
        if not 0 <= index < len(c):
            raise IndexError(f"index {index} out of range for {len(c)} samples")
        name = c.base.names[c.indices[index]]
        image = c.base.load_image(name)
        mask = np.asarray(self.masks.label(name), dtype=np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"pseudo-mask of {name!r} in {self.masks.shard_dir} is {mask.shape[1]}x{mask.shape[0]} "
                             f"(WxH) but the image is {image.shape[1]}x{image.shape[0]}; use masks dumped at the "
                             f"original image size")
        img, img_box = c.augment(image, sample_rng(c.seed, index, c.epoch))
        mask_crop = augment_mask(mask, c.augment, sample_rng(c.seed, index, c.epoch))
        labels = multi_hot(c.base.image_labels(name), c.base.num_classes)
        return {"img": torch.from_numpy(img), "cls_label": torch.from_numpy(labels), "name": name, "index": index,
                "img_box": torch.from_numpy(img_box), "mask": torch.from_numpy(mask_crop)}
