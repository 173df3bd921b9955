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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

from mmengine.config import Config, ConfigDict, DictAction  # noqa: F401  (DictAction re-exported for entry points)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


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


def validate_config(cfg: Config, source: str = "<config>") -> ConfigDict:
    """Validate a merged mmengine Config against :class:`Stage1Cfg`; returns a ConfigDict with defaults."""
    raw = cfg.to_dict()
    raw.pop("_base_", None)
    return ConfigDict(_validate(raw, Stage1Cfg, "", source))


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
        ConfigError: unknown keys or wrongly typed values.
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
