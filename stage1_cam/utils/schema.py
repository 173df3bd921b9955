"""Typed config schemas: dataclass validation with helpful errors, value ranges, per-section checks.

A leaf module (nothing from the package but the error base): ``stage1_cam.config`` validates the whole
stage-1 config with it, and each head's own schema (``stage1_cam.heads``) declares its ranges with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin, \
    get_type_hints

from .cli import BadInputError


class ConfigError(BadInputError):
    """A configuration file or override is invalid (a ``ValueError``; entry points exit with code 2)."""


def check_type(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return check_type(value, args[0], where)
    if origin in (tuple, Tuple, list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a sequence, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        out = [check_type(v, inner, where) for v in value]
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


def validate_section(data: Dict[str, Any], schema: type, prefix: str, source: str,
                     defaults: Optional[Any] = None) -> Dict[str, Any]:
    """Check ``data`` against the dataclass ``schema``: unknown keys, types; missing keys take the defaults (of
    ``defaults``, an instance, when given: a nested section's defaults are those of its parent's default)."""
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
    defaults = schema() if defaults is None else defaults
    for name in names:
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            sub = data.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: {key} must be a dict, got {sub!r}")
            out[name] = validate_section(dict(sub), type(default), key, source, defaults=default)
        elif name in data:
            out[name] = check_type(data[name], tp, f"{source}: {key}")
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


COUNT, COUNT0 = Range(1), Range(0)  # >= 1, >= 0
POSITIVE, NONNEG, UNIT = Range(0, low_open=True), Range(0.0), Range(0.0, 1.0)


@dataclass
class DenseCrfParams:
    """Dense-CRF parameters (``refine.crf.dense_crf``'s arguments), shared by the sections that run one; the
    defaults are CLIP-ES's / WeCLIP's dump values."""

    iterations: int = 10
    pos_xy_std: float = 3.0
    pos_w: float = 3.0
    bi_xy_std: float = 64.0
    bi_rgb_std: float = 5.0
    bi_w: float = 4.0

    RANGES: ClassVar[Dict[str, Range]] = {"iterations": COUNT, "pos_xy_std": POSITIVE, "pos_w": NONNEG,
                                          "bi_xy_std": POSITIVE, "bi_rgb_std": POSITIVE, "bi_w": NONNEG}

    def params(self) -> Dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DenseCrfParams)}


def check_ranges(values: Mapping[str, Any], ranges: Mapping[str, Range], *, prefix: str, source: str) -> None:
    """Raise :class:`ConfigError` for the first value of ``values`` (a flat dotted-key dict) out of its range.

    Args:
        ranges: dotted key (relative to ``prefix``) -> valid range; a sequence must have every element in range.
        prefix: the section's key, for the message (e.g. ``"head"``).
    """
    for key, rng in ranges.items():
        value = values[key]
        if value is None:  # an optional field left unset
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(v not in rng for v in items):
            what = "every value" if isinstance(value, (list, tuple)) else "it"
            full = f"{prefix}.{key}" if prefix else key
            lead = f"{source}: " if source else ""
            raise ConfigError(f"{lead}{full}={value!r} is out of range: {what} must be in {rng}")


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> one dict with dotted keys."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


@dataclass
class SectionSchema:
    """Base of a config section that checks itself: value ranges (:attr:`RANGES`) and cross-field rules.

    Subclasses are dataclasses; constructing one runs ``__post_init__``, which raises :class:`ConfigError`
    naming the key, the value and what is valid (:meth:`from_values` adds the config file to the message).
    """

    RANGES: ClassVar[Dict[str, Range]] = {}  # dotted field -> valid range; every numeric field has one
    PREFIX: ClassVar[str] = ""  # the section's key in the whole config, for messages (e.g. "head")

    def __post_init__(self) -> None:
        check_ranges(flatten(dataclasses.asdict(self)), self.RANGES, prefix=self.PREFIX, source="")
        self.check()

    def check(self) -> None:
        """Cross-field rules (subclasses); raise :class:`ConfigError` naming the keys (without the file)."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any], *, source: str) -> "SectionSchema":
        """Build (and so check) the schema from values validated by :func:`validate_section`."""
        hints = get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            v, tp = values[f.name], hints[f.name]
            kwargs[f.name] = tp(**v) if dataclasses.is_dataclass(tp) and isinstance(v, dict) else v
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
