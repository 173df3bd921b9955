"""Refinement heads (registry ``HEADS``): ``weclip``, ``weakclip``, ``excel``; their contract is ``base.Stage1Head``."""

from ..registry import HEADS
from .base import INITIAL_CAMS, DecoderHeadConfig, HeadConfig, Stage1Head, TrainBatch, head_class, register_head
from .weclip import PseudoLabelCfg, WeCLIPHead, WeCLIPHeadCfg  # registers 'weclip'
from .weakclip import WeakCLIPHead, WeakCLIPHeadCfg  # registers 'weakclip'
from .excel import ExcelHead, ExcelHeadCfg  # registers 'excel'

__all__ = ["DecoderHeadConfig", "ExcelHead", "ExcelHeadCfg", "HEADS", "INITIAL_CAMS", "HeadConfig", "PseudoLabelCfg",
           "Stage1Head", "TrainBatch", "WeCLIPHead",
           "WeCLIPHeadCfg", "WeakCLIPHead", "WeakCLIPHeadCfg", "head_class", "register_head"]
