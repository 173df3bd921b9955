"""MMSegmentation datasets: pseudo-mask training set (HDF5 shards) and the ground-truth val split.

``PseudoMaskSegDataset`` lists its samples from a shard directory's ``manifest.json`` and takes the images
from a VOC-layout dataset root; the masks themselves are read by the ``LoadPseudoMaskFromShards`` transform
(see :mod:`stage2_seg.transforms`), so the pipeline decides when the HDF5 files are touched.

``WSSSValDataset`` is a plain VOC-layout split (``ImageSets/Segmentation/<split>.txt``, ``JPEGImages``,
``SegmentationClassAug`` or ``SegmentationClass``) with the class list of ``stage1_cam.data.class_names``.

Both take their class list either from ``class_set`` (``voc``, ``coco`` or ``synthetic``) or from an
explicit ``metainfo=dict(classes=..., palette=...)``; the pseudo-mask set falls back to the manifest's
class list when neither is given, and refuses a manifest whose classes, palette, ignore index or dataset
differ from what the config asks for.
"""

from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from stage1_cam.constants import IGNORE_INDEX
from stage1_cam.utils.cli import BadInputError
from stage1_cam.data.class_names import get_classes, voc_palette
from stage1_cam.io.shards import MANIFEST_NAME, ShardReader

_logger = logging.getLogger(__name__)

_MAX_LISTED = 5


def class_set_metainfo(class_set: str) -> Dict[str, Any]:
    """``dict(classes=..., palette=...)`` of a known class set (``voc``, ``coco``, ``synthetic``).

    Raises:
        KeyError: unknown class set (the message lists the valid names).
    """
    classes = tuple(get_classes(class_set))
    return dict(classes=classes, palette=[list(rgb) for rgb in voc_palette(len(classes))])


def _resolve_metainfo(class_set: Optional[str], metainfo: Optional[dict]) -> Optional[dict]:
    if class_set is not None and metainfo is not None and metainfo.get("classes") is not None:
        raise BadInputError(f"give either class_set={class_set!r} or metainfo['classes'], not both")
    if class_set is not None:
        return {**(metainfo or {}), **class_set_metainfo(class_set)}
    return metainfo


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f" ... ({len(paths)} in total)" if len(paths) > _MAX_LISTED else "")


def manifest_path(shard_dir: str) -> str:
    """Path of the manifest a shard directory must hold."""
    return osp.join(shard_dir, MANIFEST_NAME)


def require_manifest(shard_dir: str) -> str:
    """The manifest path of ``shard_dir``, checked to exist.

    Raises:
        FileNotFoundError: no ``manifest.json`` (the message names it and says how to make it).
    """
    mpath = manifest_path(shard_dir)
    if not osp.isfile(mpath):
        raise FileNotFoundError(f"pseudo-mask manifest {mpath} does not exist; run `make pseudo-labels` first "
                                f"(stage 1 dumps the shards and writes manifest.json), or point --shards to the "
                                f"pseudo_masks/ folder of a finished run")
    return mpath


# Shard sets this process has checksummed: (directory, manifest and shard file stats) -> verified.
_VERIFIED: Set[Tuple[Any, ...]] = set()


def verify_shard_set(reader: ShardReader) -> None:
    """Check every shard's sha256 against the manifest and its writer's record, once per process and file state.

    The dataset is built more than once per training (preflight, the runner); the files are hashed only the
    first time, unless they changed in between.

    Raises:
        stage1_cam.io.shards.ShardFormatError: damaged or changed shards (named, with the fix).
    """
    files = [reader.shard_dir / MANIFEST_NAME] + [reader.shard_dir / s["file"] for s in reader.meta.get("shards", [])]
    stats = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            stats.append((str(f), None))
            continue
        stats.append((str(f), st.st_size, st.st_mtime_ns, st.st_ino))
    key = (osp.abspath(str(reader.shard_dir)), tuple(stats))
    if key in _VERIFIED:
        return
    reader.verify()
    _VERIFIED.add(key)


def open_shards(shard_dir: str) -> ShardReader:
    """Open a pseudo-mask shard directory (its manifest must exist; stage 1 writes it last).

    Raises:
        FileNotFoundError: no ``manifest.json`` in ``shard_dir``.
        stage1_cam.io.shards.ShardFormatError: the shards are of another format/version or incomplete.
    """
    require_manifest(shard_dir)
    return ShardReader(shard_dir)


@DATASETS.register_module()
class PseudoMaskSegDataset(BaseSegDataset):
    """Training images with pseudo-masks stored in HDF5 shards.

    Sample ids come from the shard manifest; image paths are ``<data_root>/<img_dir>/<id><img_suffix>``.
    Each data info carries ``sample_id`` and ``shard_dir`` for ``LoadPseudoMaskFromShards``; there is no
    ``seg_map_path``.

    Args:
        shard_dir: pseudo-mask directory holding ``manifest.json`` and the ``shard-*.h5`` files.
        data_root: dataset root with the images (e.g. ``$WSSS_DATA_ROOT/VOC2012``).
        img_dir: image folder relative to ``data_root``.
        img_suffix: image file suffix.
        class_set: name of the class list to expect (``voc``, ``coco``, ``synthetic``); also checked
            against the manifest's ``dataset``. ``None``: use ``metainfo`` or, failing that, the manifest.
        metainfo: explicit ``dict(classes=..., palette=...)`` (mmseg convention).
        ignore_index: label value meaning "ignore"; must equal the manifest's.
        **kwargs: passed to :class:`mmseg.datasets.BaseSegDataset` (``pipeline``, ``test_mode``,
            ``indices``, ``serialize_data``, ``lazy_init``, ...).

    Raises:
        FileNotFoundError: no manifest, or an image listed in it is missing from ``data_root``.
        ValueError: classes, palette, ignore index or dataset differ between the config and the manifest;
            (``ShardFormatError``) a shard's sha256 differs from the one recorded when it was written.
    """

    METAINFO: dict = dict()

    def __init__(self, *, shard_dir: str, data_root: str, img_dir: str = "JPEGImages", img_suffix: str = ".jpg",
                 class_set: Optional[str] = None, metainfo: Optional[dict] = None,
                 ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        if not shard_dir:
            raise BadInputError("PseudoMaskSegDataset needs shard_dir (the run's pseudo_masks/ folder); the train "
                                "entry point sets it from --shards")
        for forbidden in ("ann_file", "data_prefix", "seg_map_suffix", "reduce_zero_label"):
            if forbidden in kwargs:
                raise BadInputError(f"PseudoMaskSegDataset does not take {forbidden!r}: samples come from the shard "
                                    f"manifest and masks from the shards")
        self.shard_dir = str(shard_dir)
        self.class_set = class_set
        reader = open_shards(self.shard_dir)
        try:
            verify_shard_set(reader)  # the stage starts: no training on damaged or changed shards
            self.shard_meta: Dict[str, Any] = dict(reader.meta)
            self._sample_ids: List[str] = list(reader.ids)
        finally:
            reader.close()
        resolved = _resolve_metainfo(class_set, metainfo)
        if resolved is None or resolved.get("classes") is None:
            names = tuple(str(c) for c in self.shard_meta["class_names"])
            palette = [list(c) for c in (self.shard_meta.get("palette") or [])][: len(names)]
            resolved = {**(resolved or {}), "classes": names, "palette": palette}
        self._check_against_manifest(resolved, ignore_index)
        super().__init__(img_suffix=img_suffix, metainfo=resolved, data_root=data_root,
                         data_prefix=dict(img_path=img_dir), ignore_index=ignore_index, **kwargs)

    def _check_against_manifest(self, metainfo: dict, ignore_index: int) -> None:
        mpath = manifest_path(self.shard_dir)
        want = [str(c) for c in metainfo["classes"]]
        have = [str(c) for c in self.shard_meta.get("class_names", [])]
        if want != have:
            raise BadInputError(f"class list mismatch between the config ({len(want)} classes: {want}) and the "
                                f"pseudo-mask manifest {mpath} ({len(have)} classes: {have}); use shards dumped for "
                                f"this dataset or a config with the manifest's classes")
        pal_have = [list(c) for c in self.shard_meta.get("palette") or []][: len(want)]
        pal_want = [list(c) for c in metainfo.get("palette") or []][: len(want)]
        if pal_have and pal_want and pal_have != pal_want:
            raise BadInputError(f"palette mismatch between the config ({pal_want}) and the pseudo-mask manifest "
                                f"{mpath} ({pal_have}); drop metainfo['palette'] to use the manifest's colours")
        m_ignore = int(self.shard_meta.get("ignore_index", IGNORE_INDEX))
        if int(ignore_index) != m_ignore:
            raise BadInputError(f"ignore_index {ignore_index} of the dataset config differs from {m_ignore} in {mpath}")
        if self.class_set is not None and self.shard_meta.get("dataset") != self.class_set:
            raise BadInputError(f"the pseudo-masks in {mpath} were made for dataset "
                                f"{self.shard_meta.get('dataset')!r}, "
                                f"but the config expects class_set={self.class_set!r}; point --shards to a run of "
                                f"that dataset")

    def load_data_list(self) -> List[dict]:
        """One data info per shard id, in manifest order.

        Raises:
            FileNotFoundError: images listed in the manifest are missing under ``data_root``.
        """
        img_dir = self.data_prefix.get("img_path", "")
        data_list, missing = [], []
        for sample_id in self._sample_ids:
            img_path = osp.join(img_dir, sample_id + self.img_suffix)
            if not osp.isfile(img_path):
                missing.append(img_path)
                continue
            data_list.append(dict(img_path=img_path, sample_id=sample_id, shard_dir=self.shard_dir,
                                  label_map=self.label_map, reduce_zero_label=False, seg_fields=[]))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self._sample_ids)} images listed in {manifest_path(self.shard_dir)} are "
                f"missing: {_listing(missing)}; check --data-root (now {self.data_root!r}) and img_dir/img_suffix")
        _logger.info("pseudo-mask dataset: %d images from %s (dataset %r, split %r)", len(data_list),
                     self.shard_dir, self.shard_meta.get("dataset"), self.shard_meta.get("split"))
        return data_list


@DATASETS.register_module()
class WSSSValDataset(BaseSegDataset):
    """A ground-truth split of a VOC-layout dataset (VOC 2012, COCO 2014 converted, or synthetic).

    Reads ``<data_root>/ImageSets/Segmentation/<split>.txt``, images from ``img_dir`` and masks from the
    first existing folder of ``seg_map_dirs`` (``SegmentationClassAug`` before ``SegmentationClass``).

    Args:
        data_root: dataset root (e.g. ``$WSSS_DATA_ROOT/VOC2012``).
        class_set: class list name (``voc``, ``coco``, ``synthetic``); or give ``metainfo``.
        split: split file stem under ``ImageSets/Segmentation``.
        img_dir: image folder relative to ``data_root``.
        seg_map_dirs: candidate mask folders relative to ``data_root``, in order of preference.
        metainfo: explicit ``dict(classes=..., palette=...)``.
        **kwargs: passed to :class:`mmseg.datasets.BaseSegDataset` (``pipeline``, ``test_mode``, ...).

    Raises:
        FileNotFoundError: the split file, mask folder, or listed images/masks are missing.
    """

    METAINFO: dict = dict()

    def __init__(self, *, data_root: str, class_set: Optional[str] = None, split: str = "val",
                 img_dir: str = "JPEGImages",
                 seg_map_dirs: Tuple[str, ...] = ("SegmentationClassAug", "SegmentationClass"),
                 metainfo: Optional[dict] = None, **kwargs: Any) -> None:
        for forbidden in ("ann_file", "data_prefix"):
            if forbidden in kwargs:
                raise BadInputError(f"WSSSValDataset sets {forbidden!r} from split/img_dir/seg_map_dirs")
        resolved = _resolve_metainfo(class_set, metainfo)
        if resolved is None or resolved.get("classes") is None:
            raise BadInputError("WSSSValDataset needs class_set ('voc', 'coco', 'synthetic') or metainfo['classes']")
        if not osp.isdir(data_root):
            raise FileNotFoundError(f"dataset root {data_root} does not exist; set --data-root or $WSSS_DATA_ROOT "
                                    f"(see README: preparing VOC 2012 / COCO 2014)")
        ann_file = osp.join("ImageSets", "Segmentation", f"{split}.txt")
        if not osp.isfile(osp.join(data_root, ann_file)):
            raise FileNotFoundError(f"split file {osp.join(data_root, ann_file)} does not exist; the dataset at "
                                    f"{data_root} is incomplete (expected VOC layout with ImageSets/Segmentation)")
        seg_dir = next((d for d in seg_map_dirs if osp.isdir(osp.join(data_root, d))), None)
        if seg_dir is None:
            raise FileNotFoundError(f"none of the mask folders {list(seg_map_dirs)} exists under {data_root}; the "
                                    f"ground-truth masks are needed for evaluation")
        self.split = split
        super().__init__(ann_file=ann_file, metainfo=resolved, data_root=data_root,
                         data_prefix=dict(img_path=img_dir, seg_map_path=seg_dir), **kwargs)

    def load_data_list(self) -> List[dict]:
        """The base listing, then a check that every image and mask exists.

        Raises:
            FileNotFoundError: listed images or masks are missing.
        """
        data_list = super().load_data_list()
        missing = [p for info in data_list for p in (info["img_path"], info["seg_map_path"]) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files of split {self.split!r} ({self.ann_file}) are missing: "
                                    f"{_listing(missing)}")
        return data_list
