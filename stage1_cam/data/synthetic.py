"""A small, seeded, VOC-layout synthetic dataset ("the synthetic world") for tests and ``make demo``.

Every foreground class of the VOC label space has a fixed, distinctive appearance (shape family, colour
and texture with a per-class frequency, see :data:`CLASS_STYLES`), so that image-level labels are
learnable from pixels. Images show one textured background "stuff" style and 1..``max_objects`` objects at
random scales, aspect ratios, rotations and positions, possibly occluding each other. Masks carry the
class ids (0 = background) with a thin 255 border between regions, as in VOC.

The output is byte-identical for identical arguments (each image draws from its own
``np.random.Generator`` seeded by ``(seed, split, index)``; JPEGs are encoded by OpenCV at a fixed
quality), and generation is idempotent: ``<root>/.generated.json`` records the parameters and is written
last, after every image and mask.

:func:`render_sample` renders one image in memory (with its background-style map); :data:`STUFF_WORDS` maps
each background style to the background prompt words that describe it. ``stage1_cam.world_clip`` trains the
synthetic world's CLIP on captions built from both.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from ..constants import IGNORE_INDEX
from ..utils.cli import BadInputError
from ..utils.files import atomic_write_text
from .class_names import BACKGROUND_WORDS, CLASSES, voc_palette

_logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the rendering changes: old folders are then refused, never mixed
MARKER = ".generated.json"  # written last; its presence means the folder is complete
IN_PROGRESS = ".generating"  # written first; a folder with it but without MARKER was interrupted
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ClassStyle:
    """Fixed appearance of one synthetic foreground class.

    Attributes:
        shape: shape family (see :func:`_shape_mask`).
        texture: texture family (see :func:`_texture`).
        cycles: texture frequency, in periods across the object's width.
        angle: texture orientation in degrees (stripes only).
        colour: primary RGB colour; the texture's second colour is derived from it.
    """

    shape: str
    texture: str
    cycles: float
    angle: float
    colour: Tuple[int, int, int]


# One entry per VOC foreground class, index = class id - 1. Two classes never share both shape and
# texture; classes that share a shape differ in colour and texture. Colours are Kelly's contrast set.
CLASS_STYLES: Tuple[ClassStyle, ...] = (
    ClassStyle("triangle", "stripes", 3.0, 0.0, (242, 243, 244)),  # aeroplane
    ClassStyle("ring", "solid", 0.0, 0.0, (34, 34, 34)),  # bicycle
    ClassStyle("star", "dots", 4.0, 0.0, (243, 195, 0)),  # bird
    ClassStyle("trapezoid", "stripes", 5.0, 90.0, (135, 86, 146)),  # boat
    ClassStyle("rectangle", "grid", 3.0, 0.0, (243, 132, 0)),  # bottle
    ClassStyle("hexagon", "checker", 3.0, 0.0, (161, 202, 241)),  # bus
    ClassStyle("ellipse", "checker", 5.0, 0.0, (190, 0, 50)),  # car
    ClassStyle("diamond", "rings", 3.0, 0.0, (194, 178, 128)),  # cat
    ClassStyle("cross", "solid", 0.0, 0.0, (132, 132, 130)),  # chair
    ClassStyle("crescent", "dots", 3.0, 0.0, (0, 136, 86)),  # cow
    ClassStyle("triangle", "checker", 4.0, 0.0, (230, 143, 172)),  # diningtable
    ClassStyle("ring", "stripes", 6.0, 45.0, (0, 103, 165)),  # dog
    ClassStyle("star", "solid", 0.0, 0.0, (249, 147, 121)),  # horse
    ClassStyle("trapezoid", "dots", 5.0, 0.0, (96, 78, 151)),  # motorbike
    ClassStyle("rectangle", "stripes", 4.0, 135.0, (246, 166, 0)),  # person
    ClassStyle("hexagon", "rings", 4.0, 0.0, (179, 68, 108)),  # pottedplant
    ClassStyle("ellipse", "grid", 4.0, 0.0, (220, 211, 0)),  # sheep
    ClassStyle("diamond", "stripes", 4.0, 0.0, (136, 45, 23)),  # sofa
    ClassStyle("cross", "checker", 4.0, 0.0, (141, 182, 0)),  # train
    ClassStyle("crescent", "grid", 5.0, 0.0, (101, 69, 34)),  # tvmonitor
)
BACKGROUND_STYLES = ("grass", "sky", "wall", "water", "sand", "road")

# The background prompt words (``class_names.BACKGROUND_WORDS``) that describe each background style: the
# synthetic world's captions name them, so that CLIP-ES's background prompts mean something in it.
STUFF_WORDS: Dict[str, Tuple[str, ...]] = {
    "grass": ("grass",),
    "sky": ("sky", "cloud"),
    "wall": ("wall", "building"),
    "water": ("water", "lake", "river", "sea", "ocean"),
    "sand": ("ground", "land"),
    "road": ("road", "street"),
}

assert len(CLASS_STYLES) == len(CLASSES["synthetic"]) - 1
assert len({(s.shape, s.texture) for s in CLASS_STYLES}) == len(CLASS_STYLES)
assert tuple(STUFF_WORDS) == BACKGROUND_STYLES
assert all(w in BACKGROUND_WORDS["synthetic"] for words in STUFF_WORDS.values() for w in words)


@dataclass(frozen=True, kw_only=True)
class SyntheticSample:
    """One rendered synthetic image with its annotations.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        label: ``(H, W)`` uint8 class ids 0..20 and 255 on region borders (at least one foreground class).
        stuff: ``(H, W)`` uint8 index into :data:`BACKGROUND_STYLES` of the background style behind each
            pixel (defined under objects too).
    """

    image: np.ndarray
    label: np.ndarray
    stuff: np.ndarray


# --------------------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise, (h, w) float32 with roughly unit variance: a coarse grid, bicubically upsampled."""
    gh = max(2, cells * h // max(h, w))
    gw = max(2, cells * w // max(h, w))
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, int]:
    """A textured background of a random "stuff" style.

    Returns:
        (h, w, 3) float32 RGB on the 0-255 scale, and the style's index in :data:`BACKGROUND_STYLES`.
    """
    index = int(rng.integers(len(BACKGROUND_STYLES)))
    style = BACKGROUND_STYLES[index]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    low = _smooth_noise(rng, h, w, 6)[..., None]
    fine = rng.standard_normal((h, w, 1), dtype=np.float32)
    if style == "grass":
        img = np.array([70, 130, 50], np.float32) + 25 * low + 12 * fine
    elif style == "sky":
        t = (yy / max(h - 1, 1))[..., None]
        img = (1 - t) * np.array([90, 140, 225], np.float32) + t * np.array([190, 215, 245], np.float32)
        clouds = np.clip(_smooth_noise(rng, h, w, 5) - 0.3, 0, 1)[..., None]
        img = img * (1 - clouds) + 245 * clouds + 3 * fine
    elif style == "wall":
        rows = int(rng.integers(5, 10))
        bh = h / rows
        row = np.floor(yy / bh)
        bw = 2.2 * bh
        shift = (row % 2) * bw / 2 + float(rng.uniform(0, bw))
        mortar = ((yy % bh) < 2) | (((xx + shift) % bw) < 2)
        brick = np.array([150, 80, 60], np.float32) + 15 * low + 8 * fine
        img = np.where(mortar[..., None], np.array([200, 195, 185], np.float32) + 5 * fine, brick)
    elif style == "water":
        phase = float(rng.uniform(0, 2 * np.pi))
        period = float(rng.uniform(8, 16))
        waves = np.sin(2 * np.pi * yy / period + 2.0 * _smooth_noise(rng, h, w, 4) + phase)[..., None]
        img = np.array([30, 95, 140], np.float32) + 20 * waves + 12 * low + 5 * fine
    elif style == "sand":
        img = np.array([210, 190, 140], np.float32) + 15 * low + 14 * fine
    else:  # road
        img = np.array([105, 105, 110], np.float32) + 10 * low + 18 * fine
    # Per-image colour jitter so that no background colour is an exact constant.
    img = img * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.float32), index


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of object-frame coordinates (u, v), both in about [-1, 1], in a shape family."""
    r = np.sqrt(u * u + v * v)
    if shape == "ellipse":
        return r <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.7)
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":  # five points
        phi = np.arctan2(v, u) + np.pi / 2
        tri = np.abs(((5 * phi / (2 * np.pi)) % 1.0) - 0.5) * 2.0
        return r <= 0.45 + 0.55 * tri
    if shape == "hexagon":
        s3 = np.sqrt(3.0)
        return (np.abs(v) <= s3 / 2) & (s3 * np.abs(u) + np.abs(v) <= s3)
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "crescent":
        return (r <= 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 > 0.75**2)
    if shape == "trapezoid":  # wider at the bottom
        return (np.abs(v) <= 0.7) & (np.abs(u) <= 0.55 + 0.45 * (v + 0.7) / 1.4)
    raise ValueError(f"unknown shape family {shape!r}")


def _texture(style: ClassStyle, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture weight in [0, 1] of the second colour at object-frame coordinates (u, v)."""
    c = style.cycles
    if style.texture == "stripes":
        a = np.deg2rad(style.angle)
        t = (u * np.cos(a) + v * np.sin(a)) * c / 2.0
        return ((t % 1.0) < 0.5).astype(np.float32)
    if style.texture == "checker":
        return ((np.floor(u * c / 2.0) + np.floor(v * c / 2.0)) % 2).astype(np.float32)
    if style.texture == "dots":
        fu = (u * c / 2.0) % 1.0 - 0.5
        fv = (v * c / 2.0) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.3**2).astype(np.float32)
    if style.texture == "rings":
        return (((np.sqrt(u * u + v * v) * c) % 1.0) < 0.5).astype(np.float32)
    if style.texture == "grid":
        return ((((u * c / 2.0) % 1.0) < 0.25) | (((v * c / 2.0) % 1.0) < 0.25)).astype(np.float32)
    if style.texture == "solid":  # smooth two-tone gradient
        return np.clip((u + 1.0) / 4.0, 0.0, 0.5).astype(np.float32)
    raise ValueError(f"unknown texture family {style.texture!r}")


def _second_colour(colour: Tuple[int, int, int]) -> np.ndarray:
    """The texture's contrast colour: a darker shade of light colours, a lighter tint of dark ones."""
    c = np.array(colour, np.float32)
    luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.35 if luma > 110 else c * 0.4 + 150.0


def render_sample(rng: np.random.Generator, h: int, w: int, max_objects: int) -> SyntheticSample:
    """Render one image with its label map and background-style map (what every split is made of).

    Args:
        rng: the image's own generator (the dataset seeds it with ``(seed, split code, index)``).
        h, w: image size.
        max_objects: the image holds 1..max_objects objects.

    Returns:
        A :class:`SyntheticSample`.
    """
    min_pixels = max(24, int(0.002 * h * w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    while True:  # retried only when every object ended up invisible (rare); stays deterministic
        bg, stuff_index = _background(rng, h, w)
        img = bg.copy()
        owner = np.full((h, w), -1, np.int32)
        n = int(rng.integers(1, max_objects + 1))
        classes = rng.integers(1, len(CLASS_STYLES) + 1, size=n)
        areas = np.zeros(n, np.int64)
        for k in range(n):
            style = CLASS_STYLES[int(classes[k]) - 1]
            radius = rng.uniform(0.15, 0.33) * min(h, w)
            aspect = rng.uniform(0.75, 1.33)
            rx, ry = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
            theta = np.deg2rad(rng.uniform(-25.0, 25.0))
            cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            brightness = rng.uniform(0.85, 1.15)
            ext = 1.05 * max(rx, ry)
            y0, y1 = max(0, int(cy - ext)), min(h, int(np.ceil(cy + ext)) + 1)
            x0, x1 = max(0, int(cx - ext)), min(w, int(np.ceil(cx + ext)) + 1)
            dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
            inside = _shape_mask(style.shape, u, v)
            weight = _texture(style, u, v)[..., None]
            colour = (1.0 - weight) * np.array(style.colour, np.float32) + weight * _second_colour(style.colour)
            colour = colour * brightness * (1.0 - 0.12 * v[..., None])  # soft light from above
            region = img[y0:y1, x0:x1]
            region[inside] = colour[inside]
            owner[y0:y1, x0:x1][inside] = k
            areas[k] = int(inside.sum())
        # Drop slivers: an object must keep a visible part of reasonable size, else it is painted over.
        for k in range(n):
            visible = owner == k
            if visible.sum() < max(min_pixels, 0.25 * areas[k]):
                img[visible] = bg[visible]
                owner[visible] = -1
        if (owner >= 0).any():
            break
    label = np.where(owner >= 0, classes[np.maximum(owner, 0)], 0).astype(np.uint8)
    # VOC-like ignore border: pixels whose 3x3 neighbourhood holds more than one label.
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    label[border] = IGNORE_INDEX
    img = img + 3.0 * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return SyntheticSample(image=image, label=label, stuff=np.full((h, w), stuff_index, np.uint8))


# ---------------------------------------------------------------------------------------------- writing
def _params(num_train: int, num_val: int, image_size: Tuple[int, int], max_objects: int,
            seed: int) -> Dict[str, object]:
    return {"generator": "stage1_cam.data.synthetic", "version": GENERATOR_VERSION, "num_train": num_train,
            "num_val": num_val, "image_size": [int(image_size[0]), int(image_size[1])],
            "max_objects": max_objects, "seed": seed}


def _check_args(num_train: int, num_val: int, image_size: Tuple[int, int], max_objects: int, seed: int) -> None:
    if num_train < 1 or num_val < 1:
        raise BadInputError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise BadInputError(f"image_size must be (H, W) with both >= 32, got {tuple(image_size)}")
    if max_objects < 1:
        raise BadInputError(f"max_objects must be >= 1, got {max_objects}")
    if seed < 0:
        raise BadInputError(f"seed must be >= 0, got {seed}")


def _png_bytes(label: np.ndarray, palette: List[int]) -> bytes:
    """Encode a (H, W) uint8 label map as a palette-mode PNG."""
    im = Image.fromarray(label)
    im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def generate_synthetic(root: Union[str, Path], *, num_train: int = 240, num_val: int = 60,
                       image_size: Tuple[int, int] = (160, 224), max_objects: int = 3, seed: int = 0) -> Path:
    """Write the synthetic dataset in VOC layout under ``root`` (idempotent).

    Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` and ``SegmentationClassAug/<id>.png``
    (identical palette PNGs, ids 0..20 and 255), ``ImageSets/Segmentation/{train,val,train_aug}.txt``
    (``train_aug`` = ``train``) and ``.generated.json`` with the parameters.

    Args:
        root: output folder; created if needed.
        num_train: images in the train (= train_aug) split.
        num_val: images in the val split.
        image_size: (H, W) of every image.
        max_objects: each image holds 1..max_objects objects.
        seed: the same seed (and arguments) gives byte-identical files.

    Returns:
        ``root`` as a Path.

    Raises:
        BadInputError: invalid arguments; ``root`` holds a synthetic dataset generated with other
            parameters; or ``root`` is a non-empty folder that this generator did not write.
    """
    _check_args(num_train, num_val, image_size, max_objects, seed)
    root = Path(root)
    params = _params(num_train, num_val, image_size, max_objects, seed)
    marker = root / MARKER
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BadInputError(f"{marker} is unreadable ({err}); delete the folder {root} and run "
                                f"`make data DATASET=synthetic` again") from None
        if old == params:
            _logger.info("synthetic dataset already present at %s", root)
            return root
        raise BadInputError(
            f"{root} holds a synthetic dataset generated with different parameters "
            f"({json.dumps(old, sort_keys=True)}; requested {json.dumps(params, sort_keys=True)}). "
            f"Delete the folder {root} or pick another root; it is never overwritten silently."
        )
    if root.is_dir() and any(root.iterdir()):
        if not (root / IN_PROGRESS).exists():
            raise BadInputError(
                f"{root} is a non-empty folder that was not written by the synthetic generator (no {MARKER}); "
                f"pick an empty or new folder for the synthetic dataset, or delete {root}."
            )
        _logger.warning("%s holds an interrupted synthetic generation; regenerating it", root)
    root.mkdir(parents=True, exist_ok=True)
    (root / IN_PROGRESS).write_text(json.dumps(params, sort_keys=True) + "\n")
    shutil.rmtree(root / ".wsss_cache", ignore_errors=True)  # labels cached from a partial folder
    dirs = {d: root / d for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)

    h, w = int(image_size[0]), int(image_size[1])
    palette = [c for rgb in voc_palette(256) for c in rgb]
    splits = {"train": (0, num_train), "val": (1, num_val)}
    names: Dict[str, List[str]] = {}
    for split, (code, count) in splits.items():
        names[split] = []
        for i in range(count):
            name = f"{split}_{i:06d}"
            rng = np.random.default_rng([seed, code, i])
            sample = render_sample(rng, h, w, max_objects)
            image, label = sample.image, sample.label
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            assert ok, "OpenCV failed to encode a JPEG"
            (dirs["JPEGImages"] / f"{name}.jpg").write_bytes(jpg.tobytes())
            png = _png_bytes(label, palette)
            (dirs["SegmentationClass"] / f"{name}.png").write_bytes(png)
            (dirs["SegmentationClassAug"] / f"{name}.png").write_bytes(png)
            names[split].append(name)
        _logger.info("synthetic %s: %d images of %dx%d", split, count, h, w)
    for split, ids in (("train", names["train"]), ("val", names["val"]), ("train_aug", names["train"])):
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in ids))

    atomic_write_text(marker, json.dumps(params, indent=2, sort_keys=True) + "\n")
    (root / IN_PROGRESS).unlink()
    _logger.info("synthetic dataset written to %s", root)
    return root
