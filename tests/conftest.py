"""Shared fixtures: CPU only, offline, seeded; a tiny random CLIP and a small synthetic dataset."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny models: threading overhead dominates on 2 cores


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _reset_project_loggers():
    """Entry points called in-process configure our loggers (no propagation); undo it so caplog works."""
    yield
    for name in ("stage1_cam", "stage2_seg", "pipelines"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_wsss", False)]:
            lg.removeHandler(h)
            h.close()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic VOC-layout dataset (generated once per test session)."""
    from stage1_cam.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, num_train=16, num_val=8, image_size=(96, 128), max_objects=3, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_clip():
    """The in-repo tiny CLIP (12 blocks, width 64, patch 16), randomly initialised, in eval mode."""
    from stage1_cam.models.clip_backbone import load_clip

    torch.manual_seed(0)
    return load_clip("wsss-tiny-ViT-16", pretrained=None)
