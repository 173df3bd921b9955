"""The WeakCLIP refinement head: learnable prompts, pyramid adapter, co-attention, text-guided decoder.

Modules: ``config`` (the ``head`` schema and parity switches), ``data`` (mask crops), ``modules`` (prompts,
adapter, co-attention, FPN, decoder), ``losses``, ``head`` (the ``Stage1Head``).

Re-implemented from the description in ``reference_spec`` section 5 (WeakCLIP, IJCV 2025). The head trains
on existing pseudo-masks (the stage-1 CAM shards of ``python -m stage1_cam.cams``, or any dump's
``pseudo_masks/``) and predicts better ones through the same dump path as the WeCLIP head.

Per training step:

1. The frozen CLIP image tower runs all blocks without gradients; the patch tokens of blocks
   ``out_indices`` (3/5/7/11 for ViT-B/16) feed the pyramid adapter (4x up, 2x up, identity, 2x down),
   and ``ln_post(tokens) @ proj`` of the last block gives the visual context ``[global; patches]``.
2. The class names (background included) run through the frozen text tower with ``n_ctx`` learnable
   context vectors inserted after the start token.
3. Co-attention: text-to-pixel and pixel-to-text cross-attention decoders update the text embeddings
   and the visual context residually, scaled by learnable per-channel vectors (init 0.1).
4. Score map = cosine similarity of pixels and classes; it is concatenated to every pyramid level, then a
   compact FPN neck and an FPN head predict logits at stride 4.
5. Losses against the input pseudo-mask crop (255 = no cue): balanced seed loss and CRF-constraint
   boundary loss at stride ``loss_stride``, plus ``score_weight`` x CE of ``score_map / tau``.

Reference bugs fixed by default, each behind an option (``parity=True`` selects the reference values of these six):
co-attention layers are chained (``chain_coattention``), the class embedding is added once
(``class_embedding_twice``), the pyramid adapters are trained (``train_adapters``), no stochastic depth in
the frozen encoder (``backbone_drop_path``), context init std 0.02 (``ctx_init_std``), and the score-map CE
is averaged over labelled pixels (``ce_avg_non_ignore``). Not reproduced at all: the unused kNN matrix.

Other deliberate differences: plain BatchNorm (the reference's SyncBN; convert under DDP if wanted); the
2x-down level uses ``ceil_mode`` (equal for even grids, never empty for a 1-patch side); name prompts keep
every token of the longest class name (the reference truncated to 5 tokens; identical for VOC/COCO names);
the CRF image is downsampled with torch bilinear (corners aligned) instead of scipy zoom; crops come from
the shared WeCLIP augmentation (no cat_max_ratio, no photometric distortion).

Not covered by ``parity`` (reference_spec 5.4, 7.4; no switch): the training split is ``train_aug`` alone (the
reference lists VOC train twice: its 1,464 images are 24% of the samples there, 14% here); the rescale is WeCLIP's,
the original image by ``r ~ U(0.5, 2)`` (mmseg scales the short side to ``512 r``, about 1.37x larger for a 500x375
image), padded black at a random offset (mmseg: zero after normalisation, bottom-right); the schedule decays
linearly (the reference: cosine to 1e-6); the dump uses the shared protocol, long side ``dump.long_side``, whole
images, logits averaged over scales (the reference: short side 512, slide windows 512 / stride 341, softmax
probabilities averaged); the positional embedding is interpolated from 14x14 to the grid in one step (the
reference: 14 -> 32 -> grid; equal at the 512 training crops); the final checkpoint is dumped (the reference
picked its checkpoint on val).

The training loop hands the head the mask crop that matches each image crop: :meth:`WeakCLIPHead.
wrap_train_dataset` wraps the loop's ``TrainCropDataset`` in :class:`MaskedTrainCrops`, which applies the
sample's seeded geometry (rescale, flip, pad, crop) to the mask as well, and the loop passes the
collated ``mask`` to ``forward_train`` (``TrainBatch.masks``). The head never reads files in ``forward``.
"""

from .config import BOUNDARY_CRF, DEFAULT_OPTIONS, PARITY_OPTIONS, WeakCLIPHeadCfg, resolve_options
from .data import MaskedTrainCrops, augment_mask
from .head import WeakCLIPHead  # registers 'weakclip'
from .losses import boundary_loss, crf_targets, dgcn_softmax, score_map_loss, seed_loss
from .modules import CoAttention, CompactFPN, FPNSegHead, PromptTextEncoder, PyramidAdapter, WeakCLIPDecoder

__all__ = ["BOUNDARY_CRF", "DEFAULT_OPTIONS", "PARITY_OPTIONS", "CoAttention", "CompactFPN", "FPNSegHead",
           "MaskedTrainCrops", "PromptTextEncoder", "PyramidAdapter", "WeakCLIPDecoder", "WeakCLIPHead",
           "WeakCLIPHeadCfg", "augment_mask", "boundary_loss", "crf_targets", "dgcn_softmax",
           "resolve_options", "score_map_loss", "seed_loss"]
