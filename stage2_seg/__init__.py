"""Stage 2 of the WSSS pipeline: MMSegmentation retraining on the stage-1 pseudo-mask shards.

Importing the package registers its mmseg plug-ins (``PseudoMaskSegDataset``, ``WSSSValDataset``,
``LoadPseudoMaskFromShards``), so configs only need
``custom_imports = dict(imports=['stage2_seg'], allow_failed_imports=False)``. Entry points:
``python -m stage2_seg.train`` and ``python -m stage2_seg.test``.
"""

from . import datasets, transforms
from .checkpoint import safe_checkpoint_loading
from .datasets import PseudoMaskSegDataset, WSSSValDataset
from .transforms import LoadPseudoMaskFromShards

__all__ = ["LoadPseudoMaskFromShards", "PseudoMaskSegDataset", "WSSSValDataset", "datasets", "safe_checkpoint_loading",
           "transforms"]
