"""The head contract: what training, the dump, validation, the report and ``pipelines`` call on a head.

A refinement head is registered in ``HEADS`` (``stage1_cam.registry``) as a :class:`Stage1Head` subclass with
its own config schema (:attr:`Stage1Head.config_class`, the ``head`` section of the stage-1 config). Nothing
outside the head's module knows its internals: ``train.py`` calls :meth:`~Stage1Head.forward_train` and
:meth:`~Stage1Head.validation_figures`, the dump calls :meth:`~Stage1Head.predict_logits`, checkpoints hold
:meth:`~Stage1Head.trainable_state`, and ``pipelines`` produces what :meth:`~Stage1Head.requires` names before
training. A new head is a module with one subclass; ``tests/test_head_contract.py`` trains, dumps and evaluates
one defined in the test file.

A head class with :attr:`Stage1Head.training_free` set (the registered ``none``, :mod:`.training_free`) has nothing
to train: ``pipelines`` skips training and the dump writes the refined initial maps instead of running a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..registry import HEADS
from ..utils.schema import COUNT, COUNT0, Range, SectionSchema

# What a head may need before its training starts (``Stage1Head.requires``); ``pipelines`` knows how to make each.
INITIAL_CAMS = "initial_cams"  # the run's initial CAM shards (<run>/cams, `python -m stage1_cam.cams`)
REQUIREMENTS = (INITIAL_CAMS,)


@dataclass
class HeadConfig(SectionSchema):
    """Base of a head's config schema: ``type`` plus the head's own fields (subclasses add them and ``RANGES``)."""

    PREFIX: ClassVar[str] = "head"
    type: str = ""


@dataclass
class DecoderHeadConfig(HeadConfig):
    """Base of the schemas of heads with a transformer/attention decoder (subclasses may change the defaults)."""

    embed_dim: int = 256  # decoder width
    decoder_layers: int = 3  # decoder layers
    decoder_heads: int = 8  # attention heads
    dropout: float = 0.1

    RANGES: ClassVar[Dict[str, Range]] = {"embed_dim": COUNT, "decoder_layers": COUNT0, "decoder_heads": COUNT,
                                          "dropout": Range(0.0, 1.0, high_open=True)}


@dataclass
class TrainBatch:
    """One collated training batch, on the training device.

    Attributes:
        images: (B, 3, S, S) normalised crops.
        labels: per image the sorted foreground class ids (1..C-1), the image-level labels.
        masks: (B, S, S) int64 pseudo-mask crops (255: no cue), for heads whose :meth:`Stage1Head.wrap_train_dataset`
            adds them; else None.
        names: image names (for messages).
    """

    images: torch.Tensor
    labels: List[np.ndarray]
    masks: Optional[torch.Tensor] = None
    names: Sequence[str] = ()


class Stage1Head(nn.Module):
    """A trainable refinement head on the frozen CLIP. Subclasses set :attr:`config_class` and implement the
    abstract methods; the defaults cover a head whose trainable part is one module (:meth:`trainable_module`).

    The frozen backbone and CAM source are held by reference, not as submodules, so ``state_dict()`` holds the
    trainable part only.
    """

    config_class: ClassVar[type] = HeadConfig  # the schema of the config's ``head`` section
    # Validation figure name -> what it is (the report's row label); validation_figures returns these keys.
    FIGURES: ClassVar[Dict[str, str]] = {}
    # No trainable part: no training; the dump writes the refined initial CAMs (stage1_cam.dump.training_free).
    training_free: ClassVar[bool] = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Any, *, backbone: nn.Module, cam_source: Any, num_classes: int,
                    run: Any = None) -> "Stage1Head":
        """Build the head from a validated stage-1 config (``cfg.head`` follows :attr:`config_class`).

        Args:
            backbone: the frozen :class:`~stage1_cam.models.clip_backbone.FrozenClipBackbone`.
            cam_source: the CAM source over the same backbone (``stage1_cam.cams``).
            num_classes: classes including background.
            run: the run's :class:`~stage1_cam.utils.run_dir.RunDir` (where the head's required inputs are).
        """
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Rules between the head and the other sections (e.g. the CAM source it needs), checked when the config is
        validated, before anything is built or created; raise :class:`~stage1_cam.utils.schema.ConfigError` naming
        the keys. Default: none."""

    @classmethod
    def requires(cls, cfg: Any) -> Tuple[str, ...]:
        """Inputs that must exist before training (names in :data:`REQUIREMENTS`); ``pipelines`` makes them."""
        return ()

    @classmethod
    def attention_layers(cls, cfg: Any) -> int:
        """How many of the last blocks' attention maps the head reads from the CAM source (GradCAM keeps these)."""
        return int(cfg.cam.attn_layers)

    # ------------------------------------------------------------------ training
    def trainable_module(self) -> nn.Module:
        """The module holding every trainable parameter (optimised, checkpointed, wrapped in DDP)."""
        raise NotImplementedError

    def wrap_trainable(self, wrapper: nn.Module) -> None:
        """Route calls of :meth:`trainable_module` through ``wrapper`` (DDP) without adding it to the state dict."""
        object.__setattr__(self, "_trainable_call", wrapper)

    def call_trainable(self, *args: Any, **kwargs: Any) -> Any:
        """Call the trainable module (or its DDP wrapper); heads call it in their forward passes."""
        fn = self.__dict__.get("_trainable_call") or self.trainable_module()
        return fn(*args, **kwargs)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """The checkpointed weights."""
        return self.trainable_module().state_dict()

    def load_trainable_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state` output (strictly: a mismatch is an error)."""
        self.trainable_module().load_state_dict(state, strict=True)

    def wrap_train_dataset(self, crops: Any) -> Any:
        """The training dataset the loop iterates (default: the image-level crops as they are)."""
        return crops

    def forward_train(self, batch: TrainBatch, step: int) -> Dict[str, torch.Tensor]:
        """One training forward.

        Args:
            batch: the collated batch.
            step: 0-based training step (for step-dependent behaviour; no hidden counters).

        Returns:
            ``loss`` (the scalar to minimise) and its named scalar terms ``loss_<name>`` (logged); other entries
            (e.g. ``pseudo_label``) are ignored by the loop.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ inference
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The dump path: (B, 3, H, W) normalised images -> float32 class logits (B, C, h, w) at any stride."""
        raise NotImplementedError

    def validation_figures(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, out_size: Tuple[int, int],
                           full_images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Label maps to score during validation, one per name in :attr:`FIGURES`.

        Args:
            images: (1, 3, h, w) the network input (the image resized to a multiple of the patch size).
            labels: per image the foreground class ids.
            out_size: (H, W) of the ground truth.
            full_images: (1, 3, H, W) the normalised image at full resolution.

        Returns:
            name -> (B, H, W) int64 label map.
        """
        raise NotImplementedError


class BlockDecoderHead(Stage1Head):
    """A head whose trainable part is ``self.decoder`` over the tokens of the first ``self.num_inputs`` frozen
    blocks, with ``decode(features) -> (logits, ...)`` (WeCLIP, ExCEL): the dump path runs just those blocks."""

    num_inputs: int
    decoder: nn.Module

    def decode(self, features: Any) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def trainable_module(self) -> nn.Module:
        return self.decoder

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder-only inference (the dump path): (B, 3, H, W) -> logits (B, C, H//p, W//p)."""
        feats = self.backbone(images, num_blocks=self.num_inputs, with_attn=False)
        return self.decode(feats)[0].float()


def head_class(name: str) -> type:
    """The registered :class:`Stage1Head` subclass ``name`` (importing this package registers the built-in heads).

    Raises:
        UnknownNameError: no such head (the message lists the registered ones).
    """
    return HEADS.get(name)


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`Stage1Head` subclass (with its ``config_class``) under ``name``."""

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Stage1Head)):
            raise TypeError(f"head {name!r} must be a Stage1Head subclass, got {cls!r}")
        if not (dataclasses.is_dataclass(cls.config_class) and issubclass(cls.config_class, HeadConfig)):
            raise TypeError(f"head {name!r}: config_class must be a HeadConfig dataclass")
        return HEADS.register(name)(cls)

    return deco


__all__ = ["BlockDecoderHead", "DecoderHeadConfig", "HeadConfig", "INITIAL_CAMS", "REQUIREMENTS", "Stage1Head",
           "TrainBatch", "head_class",
           "register_head"]
