"""Refinement heads (registry ``HEADS``): ``weclip``, ``weakclip``."""

from .weclip import HEADS, PseudoLabelCfg, WeCLIPHead, build_weclip_head
from .weakclip import WeakCLIPHead, build_weakclip_head  # registers 'weakclip'

__all__ = ["HEADS", "PseudoLabelCfg", "WeCLIPHead", "WeakCLIPHead", "build_weakclip_head", "build_weclip_head"]
