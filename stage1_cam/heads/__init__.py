"""Refinement heads (registry ``HEADS``): ``weclip``, ``weakclip``, ``excel``, ``none`` (training-free); the contract
they follow is ``base.Stage1Head``."""

from ..registry import HEADS
from .base import INITIAL_CAMS, DecoderHeadConfig, HeadConfig, Stage1Head, TrainBatch, head_class, register_head
from .weclip import PseudoLabelCfg, WeCLIPHead, WeCLIPHeadCfg  # registers 'weclip'
from .weakclip import WeakCLIPHead, WeakCLIPHeadCfg  # registers 'weakclip'
from .excel import ExcelHead, ExcelHeadCfg  # registers 'excel'
from .training_free import NoHeadCfg, TrainingFreeHead, is_training_free  # registers 'none'

__all__ = ["DecoderHeadConfig", "ExcelHead", "ExcelHeadCfg", "HEADS", "INITIAL_CAMS", "HeadConfig", "NoHeadCfg",
           "PseudoLabelCfg", "Stage1Head", "TrainBatch", "TrainingFreeHead", "WeCLIPHead", "WeCLIPHeadCfg",
           "WeakCLIPHead", "WeakCLIPHeadCfg", "head_class", "is_training_free", "register_head"]
