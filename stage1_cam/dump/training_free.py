"""Training-free pseudo-masks (``head.type="none"``): the refined initial CAMs written as the dump's shards.

ExCEL's ``tools/infer_lam.py`` (reference_spec 4.9: attribute maps without LVC or RFM, box 0.79, PAR, argmax) and
CLIP-ES's pseudo-masks (3.9: GradCAM maps, bg ``(1 - max)^1``, CRF) on one code path. Per image of
``data.dump_split``:

1. the refined initial maps of :class:`~stage1_cam.cams.initial.InitialCams`, the same computation as
   ``python -m stage1_cam.cams`` (``cam.source``, ``cam.attn_layers``, ``cam.box_threshold``, ...), on the CLIP-ES
   input size, or on the square ``dump.square_size`` under ``dump.protocol="excel"`` (ExCEL's 320 x 320);
   ``dump.long_side``, ``dump.scales`` and ``dump.flip`` do not apply (one pass, no augmentation);
2. scores ``[(1 - max)^cam.bg_exponent; maps]`` at the image size, refined by PAR (``cam.par``) on the image;
3. normalised to sum to one per pixel, rounded to float16 once (as the model dump's probabilities), then the
   dump's post-processing: argmax, or the dense CRF of ``dump.crf`` (CLIP-ES's values: ``config.CLIP_ES_CRF``;
   the normalisation adds the same constant to every label's unary, so up to the clipping of tiny values the CRF
   sees what CLIP-ES's un-normalised scores give), ``dump.ignore_threshold``.

Only background and the image-level classes can appear (the maps exist for those only). Images without a
foreground label are written as background. With PAR and the CRF off, the labels are those stored by
``python -m stage1_cam.cams`` (up to ties within the float16 rounding). The shards say ``training_free: true``
and carry no checkpoint hash; ``make retrain`` and ``make report`` read them like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cams.initial import InitialCams, with_background
from ..config import DumpCfg
from ..io import ShardWriter
from ..refine.par import PAR
from .postprocess import OrderedPostprocessor
from .shard_loop import Progress, Submission, iter_images, postprocess_into

_logger = logging.getLogger(__name__)


@dataclass
class TrainingFreeMaps:
    """Image -> (probabilities, keys) from the refined initial CAMs (steps 1-3 of the module docstring, before the
    post-processing).

    Attributes:
        initial: the initial-CAM pipeline.
        bg_exponent: ``alpha`` of the background ``(1 - max)^alpha``.
        par: PAR module (None: no PAR).
    """

    initial: InitialCams
    bg_exponent: float = 1.0
    par: Optional[PAR] = None

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device) -> "TrainingFreeMaps":
        """Build the CAM stack as ``python -m stage1_cam.cams`` does: seeded with ``run.seed`` (a CLIP without
        pretrained weights, in tests and the demo, is randomly initialised), leaving the global RNG untouched."""
        settings = DumpCfg.from_config(cfg)
        square = settings.square_size if settings.protocol == "excel" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            initial = InitialCams.from_config(cfg, device, square=square)
        return cls(initial=initial, bg_exponent=cfg.cam.bg_exponent, par=PAR().to(device) if cfg.cam.par else None)

    def describe(self) -> str:
        size = f"square {self.initial.square}" if self.initial.square else "CLIP-ES size"
        return (f"refined initial CAMs ({size} input, last {self.initial.attn_layers} attention maps, box "
                f"{self.initial.box_threshold}), bg (1-max)^{self.bg_exponent:g}, PAR {'on' if self.par else 'off'}")

    @torch.no_grad()
    def __call__(self, image: np.ndarray, labels: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB + foreground ids -> (1 + K, H, W) float16 probabilities and the (1 + K,) int64 class
        ids (background 0 first)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size == 0:
            return np.ones((1, *image.shape[:2]), np.float16), np.zeros(1, np.int64)
        x = self.initial.normalized(image)
        maps, keys = self.initial(image, labels, normalized=x)
        full = with_background(maps, self.bg_exponent)
        if self.par is not None:  # at the image size, on the normalised image (PAR is invariant to the normalisation)
            full = self.par(x, torch.from_numpy(full).to(x.device)[None])[0].float().cpu().numpy()
        probs = full / np.maximum(full.sum(0, keepdims=True), np.finfo(np.float32).tiny)
        return probs.astype(np.float16), np.concatenate([[0], keys]).astype(np.int64)


def training_free_shard(maps: TrainingFreeMaps, dataset: Any, names: Sequence[str], writer: ShardWriter, *,
                        postprocessor: OrderedPostprocessor, progress: bool = True) -> Dict[str, float]:
    """Write the training-free masks of ``names`` into ``writer`` (skipping ``writer.done_ids``), then finalize.

    Args:
        maps: the maps of each image.
        dataset: a :class:`~stage1_cam.data.SegDataset` (``load_image``, ``image_labels``).
        names: the shard's image ids, in shard order.
        writer: an open shard writer (may hold finished images of an earlier, interrupted run).
        postprocessor: CRF/argmax stage.
        progress: show progress (rank 0).

    Returns:
        ``images`` (newly written), ``seconds``, ``images_per_s``.
    """
    done = set(writer.done_ids)
    bar = Progress(total=len(names), done=len(done & set(names)),
                   desc=f"shard {writer.shard_index}/{writer.num_shards} (training-free)", enabled=progress)

    def submissions() -> Iterator[Submission]:
        for name, image in iter_images(dataset.load_image, [n for n in names if n not in done]):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {name!r} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            labels = dataset.image_labels(name)
            probs, keys = maps(image, labels)
            yield name, image, probs, keys, labels

    return postprocess_into(submissions(), writer=writer, settings=postprocessor.settings,
                            postprocessor=postprocessor, bar=bar, what=" (training-free)")


def training_free_record(cfg: Any, settings: DumpCfg) -> Dict[str, Any]:
    """The shard metadata (``ShardMeta.extra``) of training-free masks: what made the maps, and the post-processing
    (the model dump's :meth:`DumpCfg.record` without the test-time augmentation, which does not apply)."""
    out = {k: v for k, v in settings.record().items()
           if k not in ("long_side", "scales", "flip", "label_constrained", "parity_no_flip_at_1")}
    out.update(training_free=True, label_constrained=True,
               input=f"square {settings.square_size}" if settings.protocol == "excel" else "clip-es",
               cam={k: cfg.cam[k] for k in ("source", "box_threshold", "attn_layers", "bg_exponent", "par", "parity",
                                            "descriptors", "num_attributes", "topk")})
    return out


__all__ = ["TrainingFreeMaps", "training_free_record", "training_free_shard"]
