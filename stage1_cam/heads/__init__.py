"""Refinement heads (registry ``HEADS``): ``weclip``."""

from .weclip import HEADS, PseudoLabelCfg, WeCLIPHead, build_weclip_head

__all__ = ["HEADS", "PseudoLabelCfg", "WeCLIPHead", "build_weclip_head"]
