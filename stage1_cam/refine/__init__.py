"""CAM refinement: Sinkhorn transition matrix, CAM box masks, attention/RFM affinities, PAR, pseudo-label
decoding and dense CRF. Pure functions (and the parameter-free :class:`PAR` module), tested alone.

pydensecrf is imported lazily by :mod:`stage1_cam.refine.crf`, so importing this package never needs it.
"""

from stage1_cam.refine.affinity import RFM_SCORES, attention_affinity, refine_cams, rfm_affinity, strip_cls
from stage1_cam.refine.boxes import box_mask, boxes_from_cam
from stage1_cam.refine.crf import CRF_PRESETS, crf_labels, dense_crf
from stage1_cam.refine.labels import background_sweep, cams_to_label, cams_to_label_batch, minmax_normalize
from stage1_cam.refine.par import PAR, neighbour_offsets
from stage1_cam.refine.sinkhorn import sinkhorn_normalize, transition_matrix

__all__ = [
    "CRF_PRESETS",
    "PAR",
    "RFM_SCORES",
    "attention_affinity",
    "background_sweep",
    "box_mask",
    "boxes_from_cam",
    "cams_to_label",
    "cams_to_label_batch",
    "crf_labels",
    "dense_crf",
    "minmax_normalize",
    "neighbour_offsets",
    "refine_cams",
    "rfm_affinity",
    "sinkhorn_normalize",
    "strip_cls",
    "transition_matrix",
]
