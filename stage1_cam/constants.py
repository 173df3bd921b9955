"""Numeric constants shared by both stages."""

IGNORE_INDEX = 255

# ImageNet statistics in RGB order on the 0-255 scale. WeCLIP normalises CLIP inputs with these
# (reference_spec 1.1); kept as the default for parity, switchable to CLIP's own statistics.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# OpenAI CLIP statistics, 0-255 scale.
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}

# Environment variables the project reads.
ENV_DATA_ROOT = "WSSS_DATA_ROOT"  # parent folder of VOC2012/, coco2014/ and synthetic/
ENV_CLIP_WEIGHTS = "WSSS_CLIP_WEIGHTS"  # explicit CLIP weights file
ENV_MALLOC_TUNING = "WSSS_MALLOC_TUNING"  # 0: leave glibc malloc at its defaults (utils/cpu_malloc.py)
DEFAULT_DATA_ROOT = "data"
