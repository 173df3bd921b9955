"""Dataset readers for PASCAL VOC 2012 (+SBD), COCO 2014 (VOC-style masks) and the synthetic set.

All three share the VOC folder layout::

    <root>/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png       ground truth, class ids (0 = background, 255 = ignore)
      SegmentationClassAug/<id>.png    VOC: SBD-augmented masks (12,031); the source of image-level labels
      ImageSets/Segmentation/<split>.txt

Image-level labels are the foreground ids present in an image's mask (SegmentationClassAug, falling back
to SegmentationClass). They are computed once and cached as JSON in ``<root>/.wsss_cache/cls_labels.json``
(or under ``~/.cache/wsss-clip/labels/`` when the dataset folder is read-only); each cache entry is
keyed by the mask file's size and modification time, so edited masks are re-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from ..constants import DEFAULT_DATA_ROOT, ENV_DATA_ROOT, IGNORE_INDEX
from ..utils.cli import BadInputError, UnknownNameError, UserError
from ..utils.files import atomic_write_text
from .class_names import CLASSES, get_classes
from .synthetic import IN_PROGRESS as SYNTHETIC_IN_PROGRESS
from .synthetic import MARKER as SYNTHETIC_MARKER

_logger = logging.getLogger(__name__)

# Folder name of each dataset under $WSSS_DATA_ROOT (or ./data).
DATASET_DIRS: Dict[str, str] = {"voc": "VOC2012", "coco": "coco2014", "synthetic": "synthetic"}
_CACHE_FORMAT = 1
_SPLIT_DIR = Path("ImageSets") / "Segmentation"
_IMAGE_EXT = ".jpg"
_MASK_EXT = ".png"


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset folder is missing or incomplete; the message lists what is missing and how to fix it."""


def _check_dataset_name(dataset: str) -> None:
    if dataset not in DATASET_DIRS:
        raise UnknownNameError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(DATASET_DIRS))}")


def resolve_root(dataset: str, root: Optional[Union[str, Path]] = None) -> Path:
    """The dataset folder: ``root`` if given, else ``$WSSS_DATA_ROOT/<dir>``, else ``data/<dir>``.

    ``<dir>`` is ``VOC2012``, ``coco2014`` or ``synthetic``; the last fallback is relative to the
    current working directory.

    Raises:
        KeyError: unknown dataset name (the message lists the valid ones).
    """
    _check_dataset_name(dataset)
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    parent = os.environ.get(ENV_DATA_ROOT) or DEFAULT_DATA_ROOT
    return Path(parent).expanduser() / DATASET_DIRS[dataset]


# ------------------------------------------------------------------------------------------------ layout
_HOWTO = {
    "voc": """How to prepare PASCAL VOC 2012 + SBD:
  1. Download VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk/pascal/VOC/voc2012) and extract
     VOCdevkit/VOC2012/ so that it becomes {root}.
  2. Download the SBD-augmented masks SegmentationClassAug (12,031 PNGs, the usual
     SegmentationClassAug.zip used by DeepLab/ToCo/WeCLIP) and extract them to {root}/SegmentationClassAug.
  Expected tree:
    {root}/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png
      SegmentationClassAug/<id>.png
      ImageSets/Segmentation/train.txt, val.txt   (train_aug.txt optional: derived as aug ids minus val)""",
    "coco": """How to prepare COCO 2014:
  1. Put the train2014 and val2014 images into {root}/JPEGImages/ (flat, or in train/ and val/ subfolders).
  2. Convert the instance annotations to VOC-style class-index PNGs (0 = background, 1..80 in the order of
     stage1_cam.data.class_names.COCO_CLASSES, 255 = ignore) named <id>.png in {root}/SegmentationClass/
     (flat, or in train/ and val/ subfolders).
  3. List the image ids (file names without extension) in {root}/ImageSets/Segmentation/train.txt and val.txt.
  Expected tree:
    {root}/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png
      ImageSets/Segmentation/train.txt, val.txt""",
    "synthetic": """How to prepare the synthetic dataset: run `make data DATASET=synthetic`
  (or `python -m stage1_cam.data --config CONFIG --root {root}` with your stage-1 config, whose data.synthetic
  sets the images); it is generated in seconds.""",
}
# The synthetic folder exists but the generator cannot write into it as it is: what to do instead.
_SYNTHETIC_FOREIGN = """How to prepare the synthetic dataset: {root} holds files that the generator did not
  write (no {marker}), and it never writes into such a folder. Point data.root to a new or empty folder and
  generate the set there (`python -m stage1_cam.data --config CONFIG --root NEW_FOLDER` with your stage-1
  config), or delete {root} and run `python -m stage1_cam.data --config CONFIG --root {root}`; it is generated
  in seconds."""
_SYNTHETIC_DAMAGED = """How to prepare the synthetic dataset: {root} was generated ({marker} is there) but has
  lost files since, and the generator does not repair a finished folder. Delete {root} and run
  `python -m stage1_cam.data --config CONFIG --root {root}` with your stage-1 config; it is generated in seconds."""

_REQUIRED = {
    "voc": ("JPEGImages/", "SegmentationClass/", "SegmentationClassAug/", "ImageSets/Segmentation/train.txt",
            "ImageSets/Segmentation/val.txt"),
    "coco": ("JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/train.txt",
             "ImageSets/Segmentation/val.txt"),
    "synthetic": ("JPEGImages/", "SegmentationClass/", "SegmentationClassAug/",
                  "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt",
                  "ImageSets/Segmentation/train_aug.txt", SYNTHETIC_MARKER),
}


def check_layout(dataset: str, root: Union[str, Path]) -> None:
    """Check that every folder and split file the reader needs exists.

    Raises:
        KeyError: unknown dataset name.
        DatasetLayoutError: with every missing path and instructions to prepare the dataset.
    """
    _check_dataset_name(dataset)
    root = Path(root)
    missing = []
    for rel in _REQUIRED[dataset]:
        path = root / rel.rstrip("/")
        ok = path.is_dir() if rel.endswith("/") else path.is_file()
        if not ok:
            missing.append(f"  - {path}{'/' if rel.endswith('/') else ''}")
    if not missing:
        return
    head = (f"{dataset} dataset folder {root} does not exist" if not root.exists()
            else f"{dataset} dataset at {root} is incomplete")
    howto = _HOWTO[dataset]
    if dataset == "synthetic" and root.is_dir() and any(root.iterdir()):
        if (root / SYNTHETIC_MARKER).exists():
            howto = _SYNTHETIC_DAMAGED
        elif (root / SYNTHETIC_IN_PROGRESS).exists():
            head += f" (an interrupted generation: no {SYNTHETIC_MARKER}; generating again redoes it)"
        else:
            head = f"{dataset} dataset folder {root} is not a synthetic dataset"
            howto = _SYNTHETIC_FOREIGN
    raise DatasetLayoutError(
        f"{head}; missing:\n" + "\n".join(missing) + "\n" + howto.format(root=root, marker=SYNTHETIC_MARKER)
        + f"\nThe dataset folder is <data.root> if set, else ${ENV_DATA_ROOT}/{DATASET_DIRS[dataset]}, "
        f"else {DEFAULT_DATA_ROOT}/{DATASET_DIRS[dataset]} (relative to the working directory)."
    )


# ------------------------------------------------------------------------------------------------ splits
def _read_split_file(path: Path) -> List[str]:
    """Image ids from a split file: one per line; ``JPEGImages/x.jpg SegmentationClassAug/x.png`` also works."""
    names = []
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if token:
            names.append(Path(token).stem if "/" in token else token)
    return names


def available_splits(dataset: str, root: Union[str, Path]) -> List[str]:
    """Split names readable under ``root``: the split files, plus ``train_aug`` for VOC when derivable."""
    split_dir = Path(root) / _SPLIT_DIR
    splits = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
    if (dataset == "voc" and "train_aug" not in splits and (Path(root) / "SegmentationClassAug").is_dir()
            and "val" in splits):
        splits = sorted(splits + ["train_aug"])
    return splits


def split_names(dataset: str, root: Union[str, Path], split: str) -> List[str]:
    """Image ids of a split, in file order (derived ``train_aug`` for VOC is sorted).

    Raises:
        FileNotFoundError: the split file is missing (the message lists the available splits).
    """
    root = Path(root)
    path = root / _SPLIT_DIR / f"{split}.txt"
    if path.is_file():
        return _read_split_file(path)
    if dataset == "voc" and split == "train_aug":
        aug_dir, val_file = root / "SegmentationClassAug", root / _SPLIT_DIR / "val.txt"
        if aug_dir.is_dir() and val_file.is_file():
            val = set(_read_split_file(val_file))
            return sorted(p.stem for p in aug_dir.glob(f"*{_MASK_EXT}") if p.stem not in val)
    raise FileNotFoundError(
        f"split file {path} not found; available splits under {root / _SPLIT_DIR}: "
        f"{', '.join(available_splits(dataset, root)) or '(none)'}"
    )


# ----------------------------------------------------------------------------------------- label cache
def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "wsss-clip" / "labels"


def _cache_file(root: Path, dataset: str) -> Path:
    """``<root>/.wsss_cache/cls_labels.json`` when writable, else a per-dataset file in the user cache."""
    local = root / ".wsss_cache"
    try:
        local.mkdir(exist_ok=True)
        probe = local / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return local / "cls_labels.json"
    except OSError:
        key = hashlib.sha256(f"{dataset}:{root.resolve()}".encode()).hexdigest()[:16]
        return _user_cache_dir() / f"{dataset}-{key}.json"


def _read_mask(path: Path) -> np.ndarray:
    """A single-channel label PNG as (H, W) uint8 (palette indices for mode P).

    Raises:
        BadInputError: the file cannot be decoded or is not a single-channel label map.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise BadInputError(
                    f"mask {path} has PIL mode {im.mode}; expected a single-channel class-index PNG (mode P or L). "
                    f"Convert colour-coded masks to class ids first."
                )
            return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise BadInputError(f"cannot read mask {path}: {err}; re-extract or replace the file") from None


def check_label_values(mask: np.ndarray, num_classes: int, path: Union[str, Path]) -> None:
    """Refuse a label mask holding ids outside the label space: not in ``[0, num_classes)`` and not 255.

    Used for the masks that give image-level labels and for the ground truth read for evaluation (a value
    outside the label space would otherwise be dropped silently by the confusion matrix).

    Raises:
        BadInputError: naming the file, the offending values and the valid ones.
    """
    if mask.size == 0 or int(mask.max()) < num_classes:
        return  # fast path: every value is a class id
    bad = [int(v) for v in np.unique(mask) if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise BadInputError(f"mask {path} holds label ids {bad} outside 0..{num_classes - 1} (and {IGNORE_INDEX} = "
                            f"ignore); is it a mask of another dataset? Fix or replace the file")


def _labels_from_mask(mask: np.ndarray, num_classes: int, path: Path) -> List[int]:
    check_label_values(mask, num_classes, path)
    return [int(v) for v in np.unique(mask) if v != 0 and v != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------- reader
class SegDataset:
    """VOC-layout reader (used for ``voc``, ``coco`` and ``synthetic``).

    Items are dicts: ``name`` (str), ``image`` ((H, W, 3) uint8 RGB), ``labels`` (int64 array of sorted
    foreground class ids in 1..C-1) and ``gt`` ((H, W) uint8 class ids with 255 = ignore, or None).

    Args:
        root: dataset folder (see :func:`resolve_root`).
        dataset: ``voc``, ``coco`` or ``synthetic`` (selects the class names).
        split: a split file name under ``ImageSets/Segmentation`` (VOC ``train_aug`` is derived when
            its file is missing).

    Raises:
        FileNotFoundError: the split file, an image, or the mask giving an image's labels is missing.
        BadInputError: a mask cannot be decoded or holds ids outside the class range.
    """

    def __init__(self, *, root: Union[str, Path], dataset: str, split: str) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.split = split
        self.class_names: Tuple[str, ...] = tuple(get_classes(dataset))
        self.num_classes = len(self.class_names)
        self.names: List[str] = split_names(dataset, self.root, split)
        self._image_dir = self.root / "JPEGImages"
        self._gt_dir = self.root / "SegmentationClass"
        self._aug_dir = self.root / "SegmentationClassAug"
        self._check_images()
        self._labels: Dict[str, List[int]] = self._load_labels()
        self._has_gt: Optional[bool] = None

    def __repr__(self) -> str:
        return f"SegDataset(dataset={self.dataset!r}, split={self.split!r}, root='{self.root}', n={len(self)})"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        name = self.names[index]
        image = self.load_image(name)
        gt = self.load_gt(name)
        if gt is not None and gt.shape != image.shape[:2]:
            raise BadInputError(
                f"ground-truth mask {self._gt_path(name)} is {gt.shape[1]}x{gt.shape[0]} (WxH) but image "
                f"{self._image_path(name)} is {image.shape[1]}x{image.shape[0]}; the mask must have the image's size"
            )
        return {"name": name, "image": image, "labels": self.image_labels(name), "gt": gt}

    # -------------------------------------------------------------------------------------------- files
    def _find(self, folder: Path, name: str, ext: str) -> Optional[Path]:
        """``folder/<name><ext>``, else ``folder/<split>/<name><ext>`` (COCO's per-split subfolders)."""
        for path in (folder / f"{name}{ext}", folder / self._subfolder() / f"{name}{ext}"):
            if path.is_file():
                return path
        return None

    def _subfolder(self) -> str:
        return "train" if self.split.startswith("train") else self.split

    def _image_path(self, name: str) -> Path:
        path = self._find(self._image_dir, name, _IMAGE_EXT)
        if path is None:
            raise FileNotFoundError(f"image {self._image_dir / (name + _IMAGE_EXT)} of split {self.split!r} "
                                    f"not found")
        return path

    def _check_images(self) -> None:
        missing = [n for n in self.names if self._find(self._image_dir, n, _IMAGE_EXT) is None]
        if missing:
            shown = ", ".join(str(self._image_dir / (n + _IMAGE_EXT)) for n in missing[:5])
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.names)} images of split {self.split!r} are missing from "
                f"{self._image_dir} (e.g. {shown}); the dataset is incomplete: re-extract the images"
            )

    def _label_mask_path(self, name: str) -> Optional[Path]:
        """Mask that gives the image-level labels: SegmentationClassAug, else SegmentationClass."""
        return self._find(self._aug_dir, name, _MASK_EXT) or self._find(self._gt_dir, name, _MASK_EXT)

    def _gt_path(self, name: str) -> Optional[Path]:
        """Ground-truth mask: SegmentationClass, else SegmentationClassAug."""
        return self._find(self._gt_dir, name, _MASK_EXT) or self._find(self._aug_dir, name, _MASK_EXT)

    def load_image(self, name: str) -> np.ndarray:
        """The image ``name`` as (H, W, 3) uint8 RGB.

        Raises:
            FileNotFoundError: no such image.
            BadInputError: the file cannot be decoded (the message names it).
        """
        path = self._image_path(name)
        data = np.fromfile(str(path), dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if image is None:
            raise BadInputError(f"cannot decode image {path} (corrupt or not an image); re-download or remove it "
                                f"from the split file")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def load_gt(self, name: str) -> Optional[np.ndarray]:
        """Ground truth of ``name`` as (H, W) uint8 (SegmentationClass, else SegmentationClassAug), or None.

        Raises:
            BadInputError: the mask cannot be read or holds ids outside the label space (names file and values).
        """
        path = self._gt_path(name)
        if path is None:
            return None
        gt = _read_mask(path)
        check_label_values(gt, self.num_classes, path)
        return gt

    @property
    def has_gt(self) -> bool:
        """Whether every image of the split has a ground-truth mask."""
        if self._has_gt is None:
            self._has_gt = bool(self.names) and all(self._gt_path(n) is not None for n in self.names)
        return self._has_gt

    def image_labels(self, name: str) -> np.ndarray:
        """Sorted foreground class ids (int64, in 1..C-1) present in the image's mask; may be empty."""
        try:
            return np.asarray(self._labels[name], dtype=np.int64)
        except KeyError:
            raise KeyError(f"image {name!r} is not in split {self.split!r} of {self.root}") from None

    # ------------------------------------------------------------------------------------------- labels
    def _load_labels(self) -> Dict[str, List[int]]:
        cache_path = _cache_file(self.root, self.dataset)
        cache: Dict[str, Any] = {}
        if cache_path.is_file():
            try:
                raw = json.loads(cache_path.read_text())
                if raw.get("format") == _CACHE_FORMAT and raw.get("num_classes") == self.num_classes:
                    cache = raw.get("labels", {})
            except (OSError, ValueError, AttributeError):
                _logger.warning("ignoring unreadable label cache %s", cache_path)
        labels: Dict[str, List[int]] = {}
        missing: List[str] = []
        read = 0
        for name in self.names:
            path = self._label_mask_path(name)
            if path is None:
                missing.append(name)
                continue
            st = path.stat()
            key = f"{path.relative_to(self.root).as_posix()}:{st.st_size}:{st.st_mtime_ns}"
            entry = cache.get(name)
            if entry is not None and entry[0] == key:
                labels[name] = list(entry[1])
                continue
            labels[name] = _labels_from_mask(_read_mask(path), self.num_classes, path)
            cache[name] = [key, labels[name]]
            read += 1
            if read % 2000 == 0:
                _logger.info("image-level labels: %d masks read", read)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images of split {self.split!r} have no mask in {self._aug_dir} or {self._gt_dir} "
                f"(e.g. {missing[0]}); image-level labels are derived from the masks, so the split cannot be used"
            )
        if read:
            self._write_cache(cache_path, cache)
            _logger.info("image-level labels of %d images derived from masks (cache: %s)", read, cache_path)
        return labels

    def _write_cache(self, path: Path, labels: Dict[str, Any]) -> None:
        blob = {"format": _CACHE_FORMAT, "dataset": self.dataset, "num_classes": self.num_classes,
                "labels": labels}
        try:
            atomic_write_text(path, json.dumps(blob, separators=(",", ":"), sort_keys=True))
        except OSError as err:  # a cache is an optimisation: never fail because of it
            _logger.warning("could not write the label cache %s: %s", path, err)


def build_dataset(dataset: str, root: Optional[Union[str, Path]], split: str) -> SegDataset:
    """Resolve the folder, check its layout and open a split.

    Raises:
        KeyError: unknown dataset name (lists the valid ones).
        DatasetLayoutError: the folder is missing or incomplete (lists what and how to prepare it).
    """
    path = resolve_root(dataset, root)
    check_layout(dataset, path)
    return SegDataset(root=path, dataset=dataset, split=split)


def multi_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Foreground multi-hot vector: (num_classes - 1,) float32 with index ``class id - 1`` set.

    Raises:
        ValueError: a label outside 1..num_classes-1.
    """
    out = np.zeros(num_classes - 1, dtype=np.float32)
    ids = np.asarray(labels, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 1 or ids.max() > num_classes - 1):
        raise ValueError(f"foreground labels must lie in 1..{num_classes - 1}, got {ids.tolist()}")
    out[ids - 1] = 1.0
    return out


assert set(DATASET_DIRS) == set(CLASSES)
