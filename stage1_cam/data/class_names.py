"""Class names, prompt words and palettes: the only place dataset identity lives.

``CLASSES[name]`` lists the label names with background at index 0 (what masks store). ``PROMPT_NAMES``
lists the foreground names used inside text prompts (WeCLIP/CLIP-ES synonyms, reference_spec 1.3);
``BACKGROUND_WORDS`` the background prompt set.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from ..utils.cli import UnknownNameError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Foreground prompt names for VOC: the standard names with the reference's four substitutions.
VOC_PROMPT_NAMES = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor screen",
)

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# COCO prompt names: the reference's synonym list (reference_spec 1.3), one entry per foreground class.
COCO_PROMPT_NAMES = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol",
    "handbag,purse", "necktie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "dessertspoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "tables", "toilet", "tvmonitor screen",
    "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier", "toothbrush",
)

VOC_BACKGROUND_WORDS = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)
COCO_BACKGROUND_WORDS = tuple(w for w in VOC_BACKGROUND_WORDS if w not in ("keyboard", "sign"))


def voc_palette(n: int = 256) -> List[Tuple[int, int, int]]:
    """The standard PASCAL VOC colour map (bit-interleaved), ``n`` entries."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append((r, g, b))
    return pal


CLASSES: Dict[str, Tuple[str, ...]] = {
    "voc": VOC_CLASSES,
    "coco": COCO_CLASSES,
    # The synthetic world uses VOC's label space so that prompts, palettes and configs carry over.
    "synthetic": VOC_CLASSES,
}
PROMPT_NAMES: Dict[str, Tuple[str, ...]] = {"voc": VOC_PROMPT_NAMES, "coco": COCO_PROMPT_NAMES,
                                            "synthetic": VOC_PROMPT_NAMES}
BACKGROUND_WORDS: Dict[str, Tuple[str, ...]] = {"voc": VOC_BACKGROUND_WORDS, "coco": COCO_BACKGROUND_WORDS,
                                                "synthetic": VOC_BACKGROUND_WORDS}


def get_classes(dataset: str) -> Tuple[str, ...]:
    """Label names (background first) of a dataset; unknown names list the valid ones."""
    try:
        return CLASSES[dataset]
    except KeyError:
        raise UnknownNameError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(CLASSES))}") from None


assert len(VOC_PROMPT_NAMES) == len(VOC_CLASSES) - 1
assert len(COCO_PROMPT_NAMES) == len(COCO_CLASSES) - 1 == 80
