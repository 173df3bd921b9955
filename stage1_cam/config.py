"""Stage-1 configuration: mmengine ``Config`` Python files validated against typed dataclasses.

Config files are mmengine Python files with ``_base_`` inheritance (``configs/stage1/...``). After the
files are merged, every key is checked against the dataclass schema below: an unknown key is an error
that names the file and lists the valid keys, and missing keys take the documented defaults. The result
is an mmengine ``ConfigDict`` (attribute access: ``cfg.train.lr``; a plain ``Config`` would shadow the
``dump`` section with its ``dump()`` method), saved with :func:`save_config`, plus a stable hash of
everything that affects outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, Union

from mmengine.config import Config, ConfigDict, DictAction  # noqa: F401  (DictAction re-exported for entry points)

from .constants import IGNORE_INDEX
from .registry import HEADS
from .utils.files import file_sha256
from .utils.schema import (COUNT, COUNT0, NONNEG, POSITIVE, UNIT, ConfigError, DenseCrfParams, Range, SectionSchema,
                           flatten, validate_section)

_logger = logging.getLogger(__name__)


_SEED = Range(0, 2 ** 32 - 1)  # numpy's seed range

# Every section checks itself on construction (utils/schema.SectionSchema): ``RANGES`` gives the valid range of
# every numeric field (sequences: of every element; a new numeric field without one fails test_badinput) and
# ``check`` the rules between fields. validate_config builds them, so a bad value fails before a run dir is made.


RUN_NAME_RULE = ("a run name is one folder name under run.root/<dataset>/: not empty, without '/', '\\' or "
                 "'..' (e.g. base, lr2e-3_seed2); put the runs elsewhere with run.root")


def check_run_name(name: Any) -> None:
    """Refuse a run name that is not one plain folder name (empty, absolute, a path, ``..``): a run directory
    ``<run.root>/<dataset>/<name>`` must lie inside run.root.

    Raises:
        ConfigError: naming the value and the rule (:data:`RUN_NAME_RULE`).
    """
    if (not isinstance(name, str) or not name.strip() or name == "." or ".." in name or "/" in name
            or "\\" in name or "\0" in name or (os.altsep and os.altsep in name)):
        raise ConfigError(f"run.name={name!r} (--run / RUN) is not a valid run name: {RUN_NAME_RULE}")


@dataclass
class RunCfg(SectionSchema):
    name: str = "default"  # run name: runs/<dataset>/<name>/ (one folder name: check_run_name)
    root: str = "runs"  # parent of all run directories
    seed: int = 1  # global seed (per-rank offset added under DDP)

    PREFIX: ClassVar[str] = "run"
    RANGES: ClassVar[Dict[str, Range]] = {"seed": _SEED}

    def check(self) -> None:
        check_run_name(self.name)


@dataclass
class SyntheticCfg:
    num_train: int = 240  # images in the synthetic train split
    num_val: int = 60  # images in the synthetic val split
    image_size: Tuple[int, int] = (160, 224)  # (H, W) of generated images
    max_objects: int = 3  # objects per image (1..max_objects)
    seed: int = 0  # generator seed; the same seed gives byte-identical files


@dataclass
class DataCfg(SectionSchema):
    dataset: str = "synthetic"  # voc | coco | synthetic
    root: Optional[str] = None  # dataset folder; None -> $WSSS_DATA_ROOT/<VOC2012|coco2014|synthetic>
    train_split: str = "train_aug"  # split the head trains on (image-level labels only)
    val_split: str = "val"  # split with ground truth used for validation during training
    dump_split: str = "train_aug"  # split whose pseudo-masks are dumped for stage 2
    eval_split: str = "train"  # split with ground truth on which pseudo-mask quality is reported
    crop_size: int = 320  # training crop (pixels, square)
    scale_range: Tuple[float, float] = (0.5, 2.0)  # random rescale range
    flip: bool = True  # random horizontal flip
    normalization: str = "imagenet"  # imagenet (reference parity) | clip
    num_workers: int = 2  # DataLoader workers
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)

    PREFIX: ClassVar[str] = "data"
    RANGES: ClassVar[Dict[str, Range]] = {
        "synthetic.num_train": COUNT, "synthetic.num_val": COUNT, "synthetic.image_size": Range(32),
        "synthetic.max_objects": COUNT, "synthetic.seed": _SEED,
        "crop_size": COUNT, "scale_range": POSITIVE, "num_workers": COUNT0}

    def check(self) -> None:
        lo, hi = self.scale_range
        if lo > hi:
            raise ConfigError(f"data.scale_range={self.scale_range!r} must be (low, high) with low <= high")


@dataclass
class ClipCfg(SectionSchema):
    model_name: str = "ViT-B-16"  # open_clip architecture, or an in-repo config (stage1_cam/model_configs)
    pretrained: Optional[str] = "openai"  # open_clip pretrained tag; None -> random init (tests, demo)
    weights: Optional[str] = None  # explicit weights file; else $WSSS_CLIP_WEIGHTS, then the open_clip cache
    precision: str = "fp32"  # fp32 | fp16 | bf16 for the frozen encoder
    template: str = "a clean origami {}."  # prompt template (reference)

    PREFIX: ClassVar[str] = "clip"

    def check(self) -> None:
        if self.template.count("{}") != 1:
            raise ConfigError(f"clip.template={self.template!r} must contain '{{}}' exactly once (where the class "
                              f"name goes), e.g. 'a photo of a {{}}.'")


@dataclass
class CamCfg(SectionSchema):
    source: str = "clip_es_gradcam"  # clip_es_gradcam | excel_svc
    box_threshold: float = 0.4  # box mask threshold x max (VOC 0.4, COCO 0.7, ExCEL 0.79)
    attn_layers: int = 8  # last N attention maps averaged into the affinity (before RFM)
    bg_exponent: float = 1.0  # background = (1 - max)^alpha
    par: bool = True  # pixel-adaptive refinement of the label
    parity: bool = False  # replicate reference quirks (box border off-by-one, ExCEL head-sum, ...)
    descriptors: Optional[str] = None  # excel_svc: optional class-descriptor file for text enrichment
    num_attributes: int = 112  # excel_svc: k-means attribute clusters
    topk: float = 0.9  # excel_svc: fraction of attributes kept in aggregation
    batch_size: int = 4  # images per batch in `python -m stage1_cam.cams`

    PREFIX: ClassVar[str] = "cam"
    RANGES: ClassVar[Dict[str, Range]] = {
        "box_threshold": UNIT, "attn_layers": COUNT, "bg_exponent": POSITIVE, "num_attributes": COUNT,
        "topk": Range(0.0, 1.0, low_open=True), "batch_size": COUNT}


@dataclass
class TrainCfg(SectionSchema):
    max_iters: int = 30000  # iterations (batch steps)
    batch_size: int = 4  # per process
    lr: float = 2e-3  # effective AdamW lr of the head (reference: 2e-4 x hidden 10)
    weight_decay: float = 0.01
    warmup_iters: int = 50  # linear warmup steps
    warmup_ratio: float = 1e-6  # lr multiplier at step 0
    power: float = 1.0  # poly decay power
    amp: str = "auto"  # auto | bf16 | fp16 | none: autocast of every stage-1 network pass (utils/precision.py)
    log_interval: int = 50  # steps between log lines
    ckpt_interval: int = 2000  # steps between checkpoints
    val_interval: int = 2000  # steps between validations (0 = off)
    val_max_images: int = 0  # cap on validation images (0 = all)
    # WeCLIP's logged validation (reference_spec 1.11, 7.1 item 3): dropout stays on (its validate() never calls
    # model.eval()) and the pixels beyond a patch multiple are dropped (1.2), not resized away
    val_parity: bool = False

    PREFIX: ClassVar[str] = "train"
    RANGES: ClassVar[Dict[str, Range]] = {
        "max_iters": COUNT, "batch_size": COUNT, "lr": POSITIVE, "weight_decay": NONNEG, "warmup_iters": COUNT0,
        "warmup_ratio": UNIT, "power": NONNEG, "log_interval": COUNT, "ckpt_interval": COUNT,
        "val_interval": COUNT0, "val_max_images": COUNT0}


# CLIP-ES's pseudo-mask CRF (eval_cam_with_crf.py, reference_spec 3.9), which ExCEL's inference reuses (4.9):
# DenseCRF(10, 1, 3, 67, 3, 4) = 10 iterations, Gaussian pos_xy_std 1 / pos_w 3, bilateral bi_xy_std 67 /
# bi_rgb_std 3 / bi_w 4 (CrfCfg's defaults are WeCLIP's: 3, 3, 64, 5, 4). As a config: dump=dict(crf=CLIP_ES_CRF).
CLIP_ES_CRF: Dict[str, Any] = dict(iterations=10, pos_xy_std=1.0, pos_w=3.0, bi_xy_std=67.0, bi_rgb_std=3.0, bi_w=4.0)


@dataclass
class CrfCfg(DenseCrfParams):
    enabled: bool = True  # dense CRF on dumped masks
    workers: int = 0  # CRF worker processes (0 = cores - 1, at least 1)


@dataclass
class DumpCfg(SectionSchema):
    """Everything that decides the dumped masks, plus throughput knobs (``batch_size``, ``num_shards``,
    ``flush_every``, ``crf.workers``); the dump (``stage1_cam.dump``) runs on this schema."""

    long_side: int = 512  # images resized so the long side is this (reference 512 for VOC), snapped to the patch
    # weclip: the reference's sizes instead of snapping to the patch: int(H r) x int(W r), scales as floor(size s); the
    # stride-16 patch embedding then drops the remainder rows/columns (a flip is then not an exact mirror)
    parity_sizes: bool = False
    scales: Tuple[float, ...] = (1.0, 0.75)  # test-time scales relative to the long-side-resized input
    flip: bool = True  # fuse horizontal flips
    batch_size: int = 8  # images per forward batch (twice as many network inputs with flip)
    label_constrained: bool = True  # only background + image-level classes may appear
    ignore_threshold: float = 0.0  # pixels with confidence below this -> 255 (0 = off)
    save_probs: bool = False  # store float16 present-class probabilities (for --from-probs)
    num_shards: int = 4  # shards the split is divided into
    flush_every: int = 16  # images between the shard's progress points (flushes); a kill loses at most these
    # Test-time protocol (dump/tta.py): "weclip" (long side, scales relative to it, fused on the logit grid) or
    # "excel" (ExCEL's infer_seg_voc: whole image resized to squares square_size * s, flip fused, each scale
    # upsampled to the image size, averaged; ExCEL uses scales (0.7, 1.0, 1.2, 1.5) and, with its optional CRF,
    # CLIP-ES's parameters: CLIP_ES_CRF below).
    protocol: str = "weclip"
    square_size: int = 320  # excel: side of the scale-1 square input (snapped to the patch)
    parity_no_flip_at_1: bool = False  # excel: reference quirk, only the un-flipped logits at scale 1.0
    crf: CrfCfg = field(default_factory=CrfCfg)

    PREFIX: ClassVar[str] = "dump"
    RANGES: ClassVar[Dict[str, Range]] = {
        "long_side": COUNT, "scales": POSITIVE, "batch_size": COUNT, "ignore_threshold": UNIT,
        "num_shards": Range(1, 99999), "square_size": COUNT, "flush_every": COUNT, "crf.workers": COUNT0,
        **{f"crf.{k}": r for k, r in DenseCrfParams.RANGES.items()}}
    PROTOCOLS: ClassVar[Tuple[str, ...]] = ("weclip", "excel")

    def check(self) -> None:
        if not self.scales:
            raise ConfigError("dump.scales is empty; give at least one test-time scale, e.g. (1.0,)")
        self.scales = tuple(float(s) for s in self.scales)
        if self.protocol not in self.PROTOCOLS:
            raise ConfigError(f"dump.protocol={self.protocol!r} is not valid; valid: {', '.join(self.PROTOCOLS)}")

    @classmethod
    def from_config(cls, cfg: Any) -> "DumpCfg":
        """The ``dump`` section of a validated stage-1 config."""
        return cls.from_values(cfg["dump"], source="<config>")  # cfg["dump"]: mmengine Config.dump is a method

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX  # label value of ignored pixels in dumped masks

    @property
    def crf_params(self) -> Optional[Dict[str, float]]:
        """Dense-CRF parameters (:class:`~stage1_cam.utils.schema.DenseCrfParams`), or None when the CRF is off."""
        return self.crf.params() if self.crf.enabled else None

    def num_crf_workers(self) -> int:
        """Worker processes for the CRF (0 when the CRF is off)."""
        if not self.crf.enabled:
            return 0
        return self.crf.workers or max(1, (os.cpu_count() or 2) - 1)

    def record(self) -> Dict[str, Any]:
        """The output-relevant settings, for the shard metadata (``ShardMeta.extra``)."""
        out = {"long_side": self.long_side, "scales": list(self.scales), "flip": self.flip,
               "label_constrained": self.label_constrained, "ignore_threshold": self.ignore_threshold,
               "save_probs": self.save_probs, "crf": self.crf_params, "ignore_index": self.ignore_index,
               "probs_dtype": "float16"}
        if self.protocol != "weclip":  # recorded only when not the default: earlier WeCLIP shards keep matching
            out.update(protocol=self.protocol, square_size=self.square_size,
                       parity_no_flip_at_1=self.parity_no_flip_at_1)
        elif self.parity_sizes:
            out.update(parity_sizes=True)
        return out


@dataclass
class Stage1Cfg:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)
    cam: CamCfg = field(default_factory=CamCfg)
    # The head's own schema (head.type selects it: HEADS.get(type).config_class, e.g. heads/weclip.WeCLIPHeadCfg).
    head: Dict[str, Any] = field(default_factory=lambda: {"type": "weclip"})
    train: TrainCfg = field(default_factory=TrainCfg)
    dump: DumpCfg = field(default_factory=DumpCfg)


SECTIONS: Dict[str, type] = {f: type(getattr(Stage1Cfg(), f)) for f in ("run", "data", "clip", "cam", "train", "dump")}

# Keys added after runs existed, hashed only when they differ from these values (their behaviour before they
# existed), so that earlier runs, checkpoints and shards keep their hashes. Never change these values.
_HASH_IF_NOT = {"dump.protocol": "weclip", "dump.square_size": 320, "dump.parity_no_flip_at_1": False,
                "dump.parity_sizes": False, "train.val_parity": False}

# Settings read only by the dump's excel protocol (as DumpCfg.record() has them): not hashed under the weclip one.
_EXCEL_PROTOCOL_ONLY = ("dump.square_size", "dump.parity_no_flip_at_1")

# Keys that do not change any produced artifact; excluded from the config hash.
_HASH_EXCLUDE = {"run.name", "run.root", "data.num_workers", "train.log_interval", "dump.crf.workers",
                 "dump.batch_size", "cam.batch_size",
                 "dump.num_shards", "dump.flush_every"}


def all_ranges(head_type: Optional[str] = None) -> Dict[str, Range]:
    """Dotted key -> valid range of every numeric field (the head's too when ``head_type`` is given)."""
    out = {f"{name}.{k}": r for name, schema in SECTIONS.items() for k, r in schema.RANGES.items()}
    if head_type is not None:
        out.update({f"head.{k}": r for k, r in head_config_class(head_type).RANGES.items()})
    return out


def head_config_class(head_type: str) -> type:
    """The config schema of a registered head (``HEADS.get(type).config_class``).

    Raises:
        UnknownNameError: no head of that name is registered (the message lists them).
    """
    from . import heads  # noqa: F401  (registers the built-in heads; lazy for cost: they load torch)

    return HEADS.get(head_type).config_class


def _cam_sources() -> Sequence[str]:
    from .cams import CAM_SOURCES  # lazy for cost: the CAM sources load torch

    return CAM_SOURCES.list_names()


def _choices() -> Dict[str, Sequence[str]]:
    """Valid values of the string fields that select something (registries are read when needed)."""
    from .constants import NORMALIZATIONS
    from .data.class_names import CLASSES
    from .utils.precision import AMP_MODES

    return {"data.dataset": sorted(CLASSES), "data.normalization": list(NORMALIZATIONS),
            "clip.precision": ("fp32", "fp16", "bf16"), "train.amp": AMP_MODES, "cam.source": _cam_sources()}


def _check_values(cfg: Dict[str, Any], source: str) -> None:
    """Build every section's schema (ranges and rules) and validate names; raises ConfigError naming the key, the
    value and the valid set."""
    for name, schema in SECTIONS.items():
        schema.from_values(cfg[name], source=source)
    flat = flatten({k: v for k, v in cfg.items() if k != "head"})  # the head checked itself (_validate_head)
    for key, valid in _choices().items():
        if flat[key] not in valid:
            raise ConfigError(f"{source}: {key}={flat[key]!r} is not valid; valid: {', '.join(valid)}")


def _migrate_head(head: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Read the layout of configs written before per-head schemas: ``head.options`` held the head's own keys,
    and every head carried the WeCLIP keys of the shared base. Their keys move up; keys the head does not
    have are dropped (they were ignored then too)."""
    head = dict(head)
    options = head.pop("options")
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: head.options must be a dict, got {options!r}")
    names = {f for f in head_config_class(str(head.get("type", "weclip"))).__dataclass_fields__}
    dropped = sorted(k for k in head if k not in names)
    head = {k: v for k, v in head.items() if k in names}
    head.update(options)
    if options or dropped:
        _logger.warning("%s: head.options is the old config layout; read as head=dict(type=%r, %s)%s", source,
                        head.get("type"), ", ".join(f"{k}=..." for k in options) or "...",
                        f" (ignored keys of another head: {', '.join(dropped)})" if dropped else "")
    return head


def _validate_head(raw: Any, source: str) -> Dict[str, Any]:
    """The ``head`` section against the schema its ``type`` selects (unknown keys, types, ranges, rules)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: head must be a dict such as dict(type='weclip', ...), got {raw!r}")
    head_type = raw.get("type", "weclip")
    if not isinstance(head_type, str):
        raise ConfigError(f"{source}: head.type must be a string, got {head_type!r}")
    try:
        schema = head_config_class(head_type)
    except KeyError:
        raise ConfigError(f"{source}: head.type={head_type!r} is not valid; valid: "
                          f"{', '.join(HEADS.list_names())}") from None
    if "options" in raw and "options" not in schema.__dataclass_fields__:
        raw = _migrate_head(raw, source)
    values = validate_section(dict(raw), schema, "head", source)
    values["type"] = head_type
    schema.from_values(values, source=source)  # ranges and the head's own rules
    return values


def validate_config(cfg: Config, source: str = "<config>") -> ConfigDict:
    """Validate a merged mmengine Config against :class:`Stage1Cfg`; returns a ConfigDict with defaults.

    The ``head`` section is validated against the schema of the head it names (``head.type``); switching a
    config to another head means replacing the section (``head=dict(_delete_=True, type=..., ...)`` in a file
    with ``_base_``), since the heads' keys differ.

    Raises:
        ConfigError: an unknown key, a wrong type, a value out of its range (the sections' and the head schema's
            ``RANGES``, :func:`all_ranges`) or an unknown name (dataset, head type, CAM source, ...); the message
            names the key, the value and what is valid.
    """
    raw = cfg.to_dict()
    raw.pop("_base_", None)
    out = validate_section(raw, Stage1Cfg, "", source)
    out["head"] = _validate_head(raw.get("head", {"type": "weclip"}), source)
    _check_values(out, source)
    cfg_out = ConfigDict(out)
    try:
        HEADS.get(out["head"]["type"]).check_config(cfg_out)  # rules between the head and the other sections
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg_out


def with_head(cfg: ConfigDict, head: Dict[str, Any], source: str = "<config>") -> ConfigDict:
    """``cfg`` with its whole ``head`` section replaced by ``head`` (validated against that head's schema).

    ``head.type=X`` as an override keeps the other head's keys, which head ``X``'s schema may not have: this is how
    ``--head none`` (``pipelines``) and ``python -m stage1_cam.dump --training-free`` switch a config to a head.
    """
    raw = cfg.to_dict()
    raw["head"] = dict(head)
    return validate_config(Config(raw), source)


def default_config(options: Optional[Dict[str, Any]] = None) -> ConfigDict:
    """The schema defaults, with optional dotted-key overrides (validated)."""
    cfg = Config({})
    if options:
        cfg.merge_from_dict(options)
    return validate_config(cfg, "<defaults>")


def save_config(cfg: ConfigDict, path: Union[str, Path]) -> None:
    """Write a resolved config as an mmengine Python config file (loadable by :func:`load_config`)."""
    Config(cfg.to_dict()).dump(str(path))


_CONFIG_SUFFIXES = (".py", ".json", ".yml", ".yaml")


def read_config_file(path: Union[str, Path], *, examples: str = "configs/stage1/") -> Config:
    """``Config.fromfile`` of a config file the user named, whose parse errors are bad input (both stages).

    mmengine raises whatever reading the file raised (a ``SyntaxError``, a YAML or JSON error, the exception of
    a config that fails when it is executed, an ``OSError`` for another extension); each becomes one line naming
    the file and the error. An ``OSError`` with an errno (no access, ...) is left to the entry point's mapping.

    Args:
        path: an existing config file.
        examples: the folder of working configs the messages point to.

    Raises:
        ConfigError: the file cannot be read as an mmengine config, or a file it inherits (``_base_``) is missing.
    """
    path = Path(path)
    if path.suffix.lower() not in _CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: a config file must be an mmengine .py (or .json, .yml, .yaml) file, not "
                          f"{path.suffix or 'a file without extension'!r}; pass the config file itself ({examples})")
    try:
        return Config.fromfile(str(path))
    except FileNotFoundError as e:  # the file exists (checked by the callers): a _base_ file it names does not
        raise ConfigError(f"{path}: a file it inherits (_base_) does not exist: "
                          f"{os.path.normpath(e.filename) if e.filename else e}; fix the _base_ path (relative to the "
                          f"config file's folder)") from e
    except Exception as e:  # anything reading the user's file raised: the file is bad, not the code
        if isinstance(e, OSError) and e.errno is not None:
            raise
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        detail = " ".join(str(e.msg if isinstance(e, SyntaxError) and e.msg else e).split()) or "no message"
        fix = ("it is a run's resolved config (damaged?): `make pseudo-labels` with the run's CONFIG, RUN and "
               "OPTIONS writes it again" if (path.parent / "config_hash.txt").is_file()
               else f"fix the file ({examples}*.py are working examples)")
        raise ConfigError(f"{path}: cannot read this config file{where}: {type(e).__name__}: {detail}; "
                          f"{fix}") from e


def load_config(path: Union[str, Path], cfg_options: Optional[Dict[str, Any]] = None) -> ConfigDict:
    """Load a stage-1 config file, apply ``--cfg-options`` style overrides, validate, fill defaults.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ConfigError: the file cannot be parsed (:func:`read_config_file`), unknown keys, wrongly typed or
            out-of-range values, unknown names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; stage-1 configs live in configs/stage1/")
    cfg = read_config_file(path)
    if cfg_options:
        # Overrides may only touch keys that exist in the schema; validation below enforces it.
        try:
            cfg.merge_from_dict(cfg_options)
        except (TypeError, KeyError, ValueError, AttributeError) as e:  # e.g. train.lr.x=1: a value given sub-keys
            raise ConfigError(f"{path}: cannot apply the overrides (--cfg-options) "
                              f"{' '.join(f'{k}={v!r}' for k, v in cfg_options.items())}: "
                              f"{' '.join(str(e).split())}") from e
    return validate_config(cfg, source=str(path))


def config_hash(cfg: ConfigDict, sections: Optional[Sequence[str]] = None) -> str:
    """Stable 12-hex-digit hash of everything in ``cfg`` that affects outputs.

    ``clip.weights = "world:<preset>"`` names weights that ``make world`` trains; the config alone does not
    say which, so the preset's training hash (:func:`stage1_cam.models.world_weights.world_hash`, the key of its cache
    entry) is hashed with it as ``clip.weights_identity``. It is computed from the preset's settings, so
    the world does not have to be trained (or present) for the hash to be known. Likewise ``cam.descriptors`` (TSE)
    names a file whose content decides the CAMs: its sha256 is hashed as ``cam.descriptors_sha256`` (so a file
    edited in place makes the CAMs and everything after them stale, not silently current).

    Args:
        sections: restrict to these top-level sections (e.g. ``("data", "clip", "cam")`` for CAM files) and dotted
            keys (``"train.amp"``: one key of a section).
    """
    flat = flatten(cfg.to_dict())
    flat = {k: v for k, v in flat.items() if k not in _HASH_EXCLUDE and k != "_base_"
            and not (k in _HASH_IF_NOT and v == _HASH_IF_NOT[k])}
    if flat.get("dump.protocol", "weclip") == "weclip":  # the excel protocol's own settings decide nothing here
        for key in _EXCEL_PROTOCOL_ONLY:
            flat.pop(key, None)
    # The hash layout of configs before per-head schemas, which always held an (empty, for WeCLIP) head.options:
    # kept, so that runs and checkpoints made before keep their hashes.
    flat.setdefault("head.options", {})
    weights = flat.get("clip.weights")
    if isinstance(weights, str) and weights.startswith("world:"):
        from .models import world_weights  # lazy (cost, not a cycle): models/ loads torch, only world configs need it

        try:
            flat["clip.weights_identity"] = world_weights.world_hash(
                world_weights.get_preset(weights[len("world:"):] or "default"))
        except KeyError:  # unknown preset: loading the weights names the valid ones
            flat["clip.weights_identity"] = None
    descriptors = flat.get("cam.descriptors")
    if isinstance(descriptors, str):
        path = Path(descriptors)
        flat["cam.descriptors_sha256"] = file_sha256(path) if path.is_file() else None  # missing: loading says so
    if sections is not None:
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in sections or k in sections}
    blob = json.dumps(flat, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
