"""Refinement heads (registry ``HEADS``): ``weclip``, ``weakclip``."""

from ..registry import HEADS
from .weclip import PseudoLabelCfg, WeCLIPHead, build_weclip_head  # registers 'weclip'
from .weakclip import WeakCLIPHead, build_weakclip_head  # registers 'weakclip'

__all__ = ["HEADS", "PseudoLabelCfg", "WeCLIPHead", "WeakCLIPHead", "build_weakclip_head", "build_weclip_head"]
