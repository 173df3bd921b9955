"""Stage-1 configuration: mmengine ``Config`` Python files validated against typed dataclasses.

Config files are mmengine Python files with ``_base_`` inheritance (``configs/stage1/...``). After the
files are merged, every key is checked against the dataclass schema below: an unknown key is an error
that names the file and lists the valid keys, and missing keys take the documented defaults. The result
is an mmengine ``ConfigDict`` (attribute access: ``cfg.train.lr``; a plain ``Config`` would shadow the
``dump`` section with its ``dump()`` method), saved with :func:`save_config`, plus a stable hash of
everything that affects outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

from mmengine.config import Config, ConfigDict, DictAction  # noqa: F401  (DictAction re-exported for entry points)

from .utils.cli import BadInputError


class ConfigError(BadInputError):
    """A configuration file or override is invalid (a ``ValueError``; entry points exit with code 2)."""


@dataclass
class RunCfg:
    name: str = "default"  # run name: runs/<dataset>/<name>/
    root: str = "runs"  # parent of all run directories
    seed: int = 1  # global seed (per-rank offset added under DDP)


@dataclass
class SyntheticCfg:
    num_train: int = 240  # images in the synthetic train split
    num_val: int = 60  # images in the synthetic val split
    image_size: Tuple[int, int] = (160, 224)  # (H, W) of generated images
    max_objects: int = 3  # objects per image (1..max_objects)
    seed: int = 0  # generator seed; the same seed gives byte-identical files


@dataclass
class DataCfg:
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


@dataclass
class ClipCfg:
    model_name: str = "ViT-B-16"  # open_clip architecture, or an in-repo config (stage1_cam/model_configs)
    pretrained: Optional[str] = "openai"  # open_clip pretrained tag; None -> random init (tests, demo)
    weights: Optional[str] = None  # explicit weights file; else $WSSS_CLIP_WEIGHTS, then the open_clip cache
    precision: str = "fp32"  # fp32 | fp16 | bf16 for the frozen encoder
    template: str = "a clean origami {}."  # prompt template (reference)


@dataclass
class CamCfg:
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


@dataclass
class RfmCfg:
    enabled: bool = True  # refinement module (decoder affinity) after start_step
    start_step: int = 15000  # first training step using RFM (9144 = reference's effective switch)
    layers: int = 6  # last N attention maps scored by the layer filter
    score: str = "signed"  # signed (reference code) | abs (paper)


@dataclass
class HeadCfg:
    type: str = "weclip"  # weclip | weakclip
    embed_dim: int = 256  # fusion / decoder width
    decoder_layers: int = 3  # transformer blocks in the decoder
    decoder_heads: int = 8  # attention heads in the decoder
    dropout: float = 0.1  # Dropout2d after fusion
    aff_loss_weight: float = 0.1  # weight of the affinity loss
    aff_radius: int = 8  # affinity label window radius (patches)
    rfm: RfmCfg = field(default_factory=RfmCfg)
    options: Dict[str, Any] = field(default_factory=dict)  # head-specific extra arguments


@dataclass
class TrainCfg:
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


@dataclass
class CrfCfg:
    enabled: bool = True  # dense CRF on dumped masks
    iterations: int = 10
    pos_xy_std: float = 3.0
    pos_w: float = 3.0
    bi_xy_std: float = 64.0
    bi_rgb_std: float = 5.0
    bi_w: float = 4.0
    workers: int = 0  # CRF worker processes (0 = cores - 1, at least 1)


@dataclass
class DumpCfg:
    long_side: int = 512  # images resized so the long side is this (reference 512 for VOC)
    scales: Tuple[float, ...] = (1.0, 0.75)  # test-time scales
    flip: bool = True  # fuse horizontal flips
    batch_size: int = 8  # images per forward batch
    label_constrained: bool = True  # only background + image-level classes may appear
    ignore_threshold: float = 0.0  # pixels with confidence below this -> 255 (0 = off)
    save_probs: bool = False  # store float16 present-class probabilities (for --from-probs)
    num_shards: int = 4  # shards the split is divided into
    crf: CrfCfg = field(default_factory=CrfCfg)


@dataclass
class Stage1Cfg:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)
    cam: CamCfg = field(default_factory=CamCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    dump: DumpCfg = field(default_factory=DumpCfg)


# Keys that do not change any produced artifact; excluded from the config hash.
_HASH_EXCLUDE = {"run.name", "run.root", "data.num_workers", "train.log_interval", "dump.crf.workers",
                 "dump.batch_size", "cam.batch_size",
                 "dump.num_shards"}


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], where)
    if origin in (tuple, Tuple, list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a sequence, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        out = [_check_type(v, inner, where) for v in value]
        if origin in (tuple, Tuple) and len(args) >= 2 and args[1] is not Ellipsis and len(out) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(out) if origin in (tuple, Tuple) else out
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a dict, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _validate(data: Dict[str, Any], schema: type, prefix: str, source: str) -> Dict[str, Any]:
    hints = get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    out: Dict[str, Any] = {}
    defaults = schema()
    for name in names:
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            sub = data.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: {key} must be a dict, got {sub!r}")
            out[name] = _validate(dict(sub), type(default), key, source)
        elif name in data:
            out[name] = _check_type(data[name], tp, f"{source}: {key}")
        else:
            out[name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
    return out


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of valid values; ``None`` bounds are unbounded."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # (low, ...] instead of [low, ...]
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        lo = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{lo}, {hi}"


_COUNT, _COUNT0 = Range(1), Range(0)  # >= 1, >= 0
_POSITIVE, _NONNEG, _UNIT = Range(0, low_open=True), Range(0.0), Range(0.0, 1.0)
_SEED = Range(0, 2 ** 32 - 1)  # numpy's seed range
# Valid range of every numeric field (sequences: of every element). Checked by validate_config, so a bad value
# fails before a run directory is made. A new numeric field without an entry fails test_config_ranges.
RANGES: Dict[str, Range] = {
    "run.seed": _SEED,
    "data.synthetic.num_train": _COUNT, "data.synthetic.num_val": _COUNT,
    "data.synthetic.image_size": Range(32), "data.synthetic.max_objects": _COUNT, "data.synthetic.seed": _SEED,
    "data.crop_size": _COUNT, "data.scale_range": _POSITIVE, "data.num_workers": _COUNT0,
    "cam.box_threshold": _UNIT, "cam.attn_layers": _COUNT, "cam.bg_exponent": _POSITIVE,
    "cam.num_attributes": _COUNT, "cam.topk": Range(0.0, 1.0, low_open=True), "cam.batch_size": _COUNT,
    "head.embed_dim": _COUNT, "head.decoder_layers": _COUNT0, "head.decoder_heads": _COUNT,
    "head.dropout": Range(0.0, 1.0, high_open=True), "head.aff_loss_weight": _NONNEG, "head.aff_radius": _COUNT,
    "head.rfm.start_step": _COUNT0, "head.rfm.layers": _COUNT,
    "train.max_iters": _COUNT, "train.batch_size": _COUNT, "train.lr": _POSITIVE, "train.weight_decay": _NONNEG,
    "train.warmup_iters": _COUNT0, "train.warmup_ratio": _UNIT, "train.power": _NONNEG,
    "train.log_interval": _COUNT, "train.ckpt_interval": _COUNT, "train.val_interval": _COUNT0,
    "train.val_max_images": _COUNT0,
    "dump.long_side": _COUNT, "dump.scales": _POSITIVE, "dump.batch_size": _COUNT, "dump.ignore_threshold": _UNIT,
    "dump.num_shards": Range(1, 99999),
    "dump.crf.iterations": _COUNT, "dump.crf.pos_xy_std": _POSITIVE, "dump.crf.pos_w": _NONNEG,
    "dump.crf.bi_xy_std": _POSITIVE, "dump.crf.bi_rgb_std": _POSITIVE, "dump.crf.bi_w": _NONNEG,
    "dump.crf.workers": _COUNT0,
}


def _registry_names(kind: str) -> Sequence[str]:
    """Names registered for ``head.type`` / ``cam.source`` (imported lazily: they pull in torch)."""
    if kind == "head":
        from .heads import HEADS

        return HEADS.list_names()
    from .cams import CAM_SOURCES

    return CAM_SOURCES.list_names()


def _choices() -> Dict[str, Sequence[str]]:
    """Valid values of the string fields that select something (registries are read when needed)."""
    from .constants import NORMALIZATIONS
    from .data.class_names import CLASSES
    from .refine.affinity import RFM_SCORES
    from .utils.precision import AMP_MODES

    return {"data.dataset": sorted(CLASSES), "data.normalization": list(NORMALIZATIONS),
            "clip.precision": ("fp32", "fp16", "bf16"), "train.amp": AMP_MODES,
            "head.rfm.score": RFM_SCORES}


def _check_values(cfg: Dict[str, Any], source: str) -> None:
    """Range-check numeric fields and validate names; raises ConfigError naming the key, value and valid set."""
    flat = _flatten(cfg)
    for key, rng in RANGES.items():
        value = flat[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v not in rng for v in values):
            what = "every value" if isinstance(value, (list, tuple)) else "it"
            raise ConfigError(f"{source}: {key}={value!r} is out of range: {what} must be in {rng}")
    if not flat["dump.scales"]:
        raise ConfigError(f"{source}: dump.scales is empty; give at least one test-time scale, e.g. (1.0,)")
    lo, hi = flat["data.scale_range"]
    if lo > hi:
        raise ConfigError(f"{source}: data.scale_range={flat['data.scale_range']!r} must be (low, high) with "
                          f"low <= high")
    if flat["clip.template"].count("{}") != 1:
        raise ConfigError(f"{source}: clip.template={flat['clip.template']!r} must contain '{{}}' exactly once (where "
                          f"the class name goes), e.g. 'a photo of a {{}}.'")
    if flat["head.type"] == "weclip" and flat["head.embed_dim"] % flat["head.decoder_heads"]:
        raise ConfigError(f"{source}: head.embed_dim={flat['head.embed_dim']} is not divisible by head.decoder_heads="
                          f"{flat['head.decoder_heads']}; the decoder splits its width over the heads")
    choices = dict(_choices())
    for key in ("head.type", "cam.source"):
        choices[key] = _registry_names(key.split(".")[0])
    for key, valid in choices.items():
        if flat[key] not in valid:
            raise ConfigError(f"{source}: {key}={flat[key]!r} is not valid; valid: {', '.join(valid)}")


def validate_config(cfg: Config, source: str = "<config>") -> ConfigDict:
    """Validate a merged mmengine Config against :class:`Stage1Cfg`; returns a ConfigDict with defaults.

    Raises:
        ConfigError: an unknown key, a wrong type, a value out of its range (:data:`RANGES`) or an unknown name
            (dataset, head type, CAM source, ...); the message names the key, the value and what is valid.
    """
    raw = cfg.to_dict()
    raw.pop("_base_", None)
    out = _validate(raw, Stage1Cfg, "", source)
    _check_values(out, source)
    return ConfigDict(out)


def default_config(options: Optional[Dict[str, Any]] = None) -> ConfigDict:
    """The schema defaults, with optional dotted-key overrides (validated)."""
    cfg = Config({})
    if options:
        cfg.merge_from_dict(options)
    return validate_config(cfg, "<defaults>")


def save_config(cfg: ConfigDict, path: Union[str, Path]) -> None:
    """Write a resolved config as an mmengine Python config file (loadable by :func:`load_config`)."""
    Config(cfg.to_dict()).dump(str(path))


def load_config(path: Union[str, Path], cfg_options: Optional[Dict[str, Any]] = None) -> ConfigDict:
    """Load a stage-1 config file, apply ``--cfg-options`` style overrides, validate, fill defaults.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ConfigError: unknown keys, wrongly typed or out-of-range values, unknown names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; stage-1 configs live in configs/stage1/")
    cfg = Config.fromfile(str(path))
    if cfg_options:
        # Overrides may only touch keys that exist in the schema; validation below enforces it.
        cfg.merge_from_dict(cfg_options)
    return validate_config(cfg, source=str(path))


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_hash(cfg: ConfigDict, sections: Optional[Sequence[str]] = None) -> str:
    """Stable 12-hex-digit hash of everything in ``cfg`` that affects outputs.

    ``clip.weights = "world:<preset>"`` names weights that ``make world`` trains; the config alone does not
    say which, so the preset's training hash (:func:`stage1_cam.models.world_weights.world_hash`, the key of its cache
    entry) is hashed with it as ``clip.weights_identity``. It is computed from the preset's settings, so
    the world does not have to be trained (or present) for the hash to be known.

    Args:
        sections: restrict to these top-level sections (e.g. ``("data", "clip", "cam")`` for CAM files).
    """
    flat = _flatten(cfg.to_dict())
    flat = {k: v for k, v in flat.items() if k not in _HASH_EXCLUDE and k != "_base_"}
    weights = flat.get("clip.weights")
    if isinstance(weights, str) and weights.startswith("world:"):
        from .models import world_weights  # lazy (cost, not a cycle): models/ loads torch, only world configs need it

        try:
            flat["clip.weights_identity"] = world_weights.world_hash(
                world_weights.get_preset(weights[len("world:"):] or "default"))
        except KeyError:  # unknown preset: loading the weights names the valid ones
            flat["clip.weights_identity"] = None
    if sections is not None:
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in sections}
    blob = json.dumps(flat, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
