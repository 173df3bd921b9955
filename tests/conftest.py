"""Shared fixtures: CPU only, offline, seeded; a tiny random CLIP and a small synthetic dataset."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

#: Torch intra-op threads for the whole session (default 1: tiny models, threading overhead dominates on 2 cores).
#: Other counts split the float sums differently; tests/test_portability.py runs the numerics under 1 and 2.
ENV_TEST_THREADS = "WSSS_TEST_THREADS"


def _test_threads() -> int:
    raw = os.environ.get(ENV_TEST_THREADS, "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise pytest.UsageError(f"{ENV_TEST_THREADS}={raw!r}: expected a positive integer (torch threads), e.g. 2")
    return n


def pytest_configure(config):
    torch.set_num_threads(_test_threads())


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
    from stage1_cam.models.pretrained import load_clip

    torch.manual_seed(0)
    return load_clip("wsss-tiny-ViT-16", pretrained=None)
