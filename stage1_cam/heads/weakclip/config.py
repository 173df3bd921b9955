"""WeakCLIP head config: the ``head`` section schema and its resolved options (parity switches)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from ...utils.schema import COUNT, COUNT0, NONNEG, POSITIVE, ConfigError, DenseCrfParams, Range, validate_section
from ..base import DecoderHeadConfig


def _boundary_crf() -> DenseCrfParams:
    """Dense CRF of the boundary loss (reference: Gaussian 3/3, bilateral 80/13/10, 10 iterations)."""
    return DenseCrfParams(iterations=10, pos_xy_std=3.0, pos_w=3.0, bi_xy_std=80.0, bi_rgb_std=13.0, bi_w=10.0)


BOUNDARY_CRF: Dict[str, float] = _boundary_crf().params()

# Values of the options that replicate reference quirks, chosen by parity=True (explicit values still win), and the
# documented defaults otherwise.
DEFAULT_OPTIONS: Dict[str, Any] = dict(ctx_init_std=0.02, chain_coattention=True, class_embedding_twice=False,
                                       train_adapters=True, backbone_drop_path=0.0, ce_avg_non_ignore=True)
PARITY_OPTIONS: Dict[str, Any] = dict(ctx_init_std=1.0, chain_coattention=False, class_embedding_twice=True,
                                      train_adapters=False, backbone_drop_path=0.1, ce_avg_non_ignore=False)


@dataclass
class WeakCLIPHeadCfg(DecoderHeadConfig):
    """``head=dict(type="weakclip", ...)``. Fields left None take the fixed default, or the reference's value
    (:data:`PARITY_OPTIONS`) with ``parity=True``; comments give both."""

    type: str = "weakclip"
    decoder_heads: int = 4  # co-attention heads (embed_dim: co-attention width and FPN channels; decoder_layers:
    # co-attention layers per direction; dropout: co-attention and classifier dropout)
    masks: Optional[str] = None  # pseudo-mask shard dir to train on; None -> this run's CAM shards (<run>/cams)
    out_indices: Tuple[int, ...] = (3, 5, 7, 11)  # image blocks feeding the 4 pyramid levels
    n_ctx: int = 8  # learnable context vectors inserted after the start token
    ctx_init_std: Optional[float] = None  # 0.02; reference 1.0 (trunc-normal in [-2, 2])
    coattn_scale_init: float = 0.1  # initial per-channel residual scales of the co-attention updates
    chain_coattention: Optional[bool] = None  # True; reference False (each layer fed the original input)
    class_embedding_twice: Optional[bool] = None  # False; reference True (CLS token and CLS position both hold it)
    train_adapters: Optional[bool] = None  # True; reference False (adapters under lr_mult 0, frozen at random init)
    backbone_drop_path: Optional[float] = None  # 0.0; reference 0.1 (stochastic depth in the frozen encoder)
    ce_avg_non_ignore: Optional[bool] = None  # True; reference (mmseg 0.19) False: score-map CE over all pixels
    tau: float = 0.07  # temperature of the score-map loss
    loss_stride: int = 8  # seed and boundary losses at (H / 8, W / 8): 64x64 for 512 crops (reference)
    seed_weight: float = 1.0
    boundary_weight: float = 1.0
    score_weight: float = 0.4
    crf: DenseCrfParams = field(default_factory=_boundary_crf)  # boundary-loss CRF
    parity: bool = False  # the None fields above take the reference's values

    RANGES: ClassVar[Dict[str, Range]] = {
        **DecoderHeadConfig.RANGES, "out_indices": COUNT0, "n_ctx": COUNT0, "ctx_init_std": POSITIVE,
        "coattn_scale_init": NONNEG, "backbone_drop_path": Range(0.0, 1.0, high_open=True), "tau": POSITIVE,
        "loss_stride": COUNT, "seed_weight": NONNEG, "boundary_weight": NONNEG, "score_weight": NONNEG,
        **{f"crf.{k}": r for k, r in DenseCrfParams.RANGES.items()}}

    def check(self) -> None:
        idx = list(self.out_indices)
        if len(idx) != 4 or sorted(set(idx)) != idx:
            raise ConfigError(f"head.out_indices={self.out_indices!r} must be 4 increasing block indices (one per "
                              f"pyramid level)")


def resolve_options(head: Optional[Mapping[str, Any]] = None, *, source: str = "<head>") -> WeakCLIPHeadCfg:
    """Validate a ``head`` section of type weakclip (a mapping, e.g. ``cfg.head``) and resolve its defaults.

    Args:
        head: the section (``type`` optional); missing keys take their defaults.

    Returns:
        The schema with no None left among the parity fields: they take :data:`PARITY_OPTIONS` values with
        ``parity=True``, else :data:`DEFAULT_OPTIONS`.

    Raises:
        ConfigError: an unknown key, a wrongly typed or out-of-range value (the message names it).
    """
    raw = {k: v for k, v in dict(head or {}).items() if k != "type"}
    cfg = WeakCLIPHeadCfg.from_values(validate_section(raw, WeakCLIPHeadCfg, "head", source), source=source)
    chosen = PARITY_OPTIONS if cfg.parity else DEFAULT_OPTIONS
    return dataclasses.replace(cfg, **{k: v for k, v in chosen.items() if getattr(cfg, k) is None},
                               out_indices=tuple(int(i) for i in cfg.out_indices))
