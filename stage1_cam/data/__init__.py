"""Datasets (VOC, COCO, synthetic), class names and training transforms. No side effects on import."""

from .class_names import BACKGROUND_WORDS, CLASSES, PROMPT_NAMES, get_classes, voc_palette
from .datasets import (DATASET_DIRS, DatasetLayoutError, SegDataset, available_splits, build_dataset, check_layout,
                       multi_hot, resolve_root, split_names)
from .synthetic import generate_synthetic
from .transforms import TrainAugment, TrainCropDataset, normalize, sample_rng

__all__ = [
    "BACKGROUND_WORDS", "CLASSES", "PROMPT_NAMES", "get_classes", "voc_palette",
    "DATASET_DIRS", "DatasetLayoutError", "SegDataset", "available_splits", "build_dataset", "check_layout",
    "multi_hot", "resolve_root", "split_names",
    "generate_synthetic",
    "TrainAugment", "TrainCropDataset", "normalize", "sample_rng",
]
