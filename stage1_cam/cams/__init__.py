"""Initial CAM sources on a frozen CLIP backbone (registry ``CAM_SOURCES``).

A CAM source is built with keyword arguments (``backbone``, ``fg_text``, ``bg_text``, ...) and called as
``source(images, labels) -> CamOutput``:

- ``images``: ``(B, 3, H, W)`` normalised images;
- ``labels``: per image, the foreground class ids present (1-based label ids, background excluded);
  they are sorted and de-duplicated, and the CAMs come out in that order.

Registered sources:

- ``clip_es_gradcam`` (:class:`~stage1_cam.cams.gradcam.ClipESGradCAM`): CLIP-ES / WeCLIP GradCAM on the
  last block, batched over images and present classes (one forward + one backward).
- ``excel_svc`` (:class:`~stage1_cam.cams.excel.ExcelSVC`): ExCEL's gradient-free patch-text alignment maps
  from static visual calibration, batched.
"""

from ..registry import CAM_SOURCES
from .base import (CamOutput, attention_without_cls, build_cam_source, check_attn_layers, minmax_scale,
                   normalize_labels)
from .attributes import build_attribute_bank
from .excel import ExcelSVC, enrich_text  # registers 'excel_svc'
from .gradcam import ClipESGradCAM  # registers 'clip_es_gradcam'

__all__ = ["CAM_SOURCES", "CamOutput", "ClipESGradCAM", "ExcelSVC", "attention_without_cls", "build_attribute_bank",
           "build_cam_source", "check_attn_layers", "enrich_text", "minmax_scale", "normalize_labels"]
