"""The synthetic world's CLIP: the in-repo tiny CLIP trained contrastively on captioned synthetic images.

``python -m stage1_cam.world_clip`` (``make world``) trains it once and caches it; stage-1 configs load it with
``clip.weights = "world:<preset>"``. ``train`` holds the trainer and its command line; what a ``world:`` spec
names (presets, hash, cache entry) lives in :mod:`stage1_cam.models.world_weights`, so that loading the weights
needs no training code.
"""

from .train import WorldResult, train_world_clip

__all__ = ["WorldResult", "train_world_clip"]
