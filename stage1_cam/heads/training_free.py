"""``head.type="none"``: training-free pseudo-masks (ExCEL's ``infer_lam``, CLIP-ES's pseudo-masks).

A registered pseudo-head with an empty config schema and :attr:`~.base.Stage1Head.training_free` set. Nothing is
trained: ``pipelines`` skips training (and the initial-CAM job) and runs the dump's training-free writer
(:mod:`stage1_cam.dump.training_free`), which writes the refined initial CAMs of ``cam.*`` -> background
``(1 - max)^cam.bg_exponent`` + PAR (``cam.par``) -> labels (CRF optional: ``dump.crf``) into the usual shards.

With the default ``cam.source="clip_es_gradcam"`` these are CLIP-ES's pseudo-masks; with ``cam.source="excel_svc"``,
``cam.box_threshold=0.79`` and ``cam.attn_layers=6`` (ExCEL's ``refine_cams_with_aff``) ExCEL's training-free
labels (``dump.protocol="excel"`` gives its square ``dump.square_size`` input).

Switching a config to it: ``--head none`` (``make pseudo-labels HEAD=none``) replaces the config's whole ``head``
section with ``dict(type="none")`` (:func:`stage1_cam.config.with_head`); in a config file
``head=dict(_delete_=True, type="none")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..utils.cli import BadInputError
from .base import HeadConfig, Stage1Head, head_class, register_head


@dataclass
class NoHeadCfg(HeadConfig):
    """The empty schema of ``head.type="none"`` (``type`` only)."""


@register_head("none")
class TrainingFreeHead(Stage1Head):
    """No head: the pseudo-masks are the refined initial CAMs (see the module docstring)."""

    config_class = NoHeadCfg
    training_free: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> "TrainingFreeHead":
        raise BadInputError("head.type='none' has nothing to train or to run: its pseudo-masks are written by "
                            "`python -m stage1_cam.dump CONFIG` (or `make pseudo-labels HEAD=none`)")


def is_training_free(head_type: str) -> bool:
    """Whether the registered head ``head_type`` is training-free (:attr:`Stage1Head.training_free`)."""
    return bool(head_class(head_type).training_free)


__all__ = ["NoHeadCfg", "TrainingFreeHead", "is_training_free"]
