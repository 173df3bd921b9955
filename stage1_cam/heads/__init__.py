"""Refinement heads (registry ``HEADS``): ``weclip``, ``weakclip``; the contract they follow is ``base.Stage1Head``."""

from ..registry import HEADS
from .base import INITIAL_CAMS, DecoderHeadConfig, HeadConfig, Stage1Head, TrainBatch, head_class, register_head
from .weclip import PseudoLabelCfg, WeCLIPHead, WeCLIPHeadCfg  # registers 'weclip'
from .weakclip import WeakCLIPHead, WeakCLIPHeadCfg  # registers 'weakclip'

__all__ = ["HEADS", "INITIAL_CAMS", "DecoderHeadConfig", "HeadConfig", "PseudoLabelCfg", "Stage1Head", "TrainBatch", "WeCLIPHead",
           "WeCLIPHeadCfg", "WeakCLIPHead", "WeakCLIPHeadCfg", "head_class", "register_head"]
