"""The numerically sensitive tests pass under every CPU kernel set and thread count (issue 16).

Each run is a subprocess pytest with ``ATEN_CPU_CAPABILITY`` in {default (no SIMD), avx2, unset (the best this CPU
has)} and ``WSSS_TEST_THREADS`` in {1, 2}: other SIMD widths and thread splits sum the float32 terms in other
orders, which the tolerances of ``tests/numerics.py`` must cover.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The tests that compare float32 results with another evaluation order (see tests/numerics.py), or that assert
#: exact equality of two paths through float kernels: whole files, or single tests of files that are mostly other work.
NUMERIC_FILES = (
    "tests/test_clip_backbone.py", "tests/test_cams.py", "tests/test_refine.py", "tests/test_crf.py",
    "tests/test_weakclip.py", "tests/test_excel_head.py", "tests/test_step_syncs.py", "tests/test_dump_protocol.py",
    "tests/test_weclip.py::test_balanced_loss_equals_reference_and_is_finite_without_foreground",
    "tests/test_weclip.py::test_balanced_loss_same_for_channels_last_logits",
    "tests/test_world.py::test_windowed_encoding_matches_open_clip_and_the_pipeline_pooling",
    "tests/test_world.py::test_contrastive_loss_reduces_to_clip_with_one_positive_each",
    "tests/test_data.py::test_normalize", "tests/test_data.py::test_train_augment_img_box_marks_the_image_region",
    "tests/test_bench.py::test_gpu_check_run_is_deterministic_and_complete_on_cpu",
    "tests/test_dump.py::test_msc_flip_matches_per_image_reference",
)
_CAPABILITY_PROBE = "tests/test_portability.py::test_reported_cpu_capability"


def test_reported_cpu_capability():
    """Run inside the subprocesses: torch took the kernel set that ATEN_CPU_CAPABILITY asked for, and the threads."""
    import torch

    want = os.environ.get("WSSS_EXPECT_CAPABILITY")
    if want is None:
        pytest.skip("only meaningful inside test_numerics_under_cpu_capabilities_and_threads")
    assert torch.backends.cpu.get_cpu_capability() == want
    assert torch.get_num_threads() == int(os.environ["WSSS_TEST_THREADS"])


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_numerics_under_cpu_capabilities_and_threads(capability, threads):
    import torch

    best = torch.backends.cpu.get_cpu_capability()
    if capability == "avx2" and best not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU has no AVX2 kernels (torch reports {best})")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["WSSS_TEST_THREADS"] = str(threads)
    env["WSSS_EXPECT_CAPABILITY"] = capability.upper() if capability else best
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider",
           _CAPABILITY_PROBE, *NUMERIC_FILES]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"ATEN_CPU_CAPABILITY={capability} threads={threads}:\n{tail}"
    assert " passed" in res.stdout and " failed" not in res.stdout, tail
    assert "only meaningful inside" not in res.stdout, tail  # the capability probe ran (-rs lists skip reasons)


@pytest.mark.slow
def test_every_numeric_entry_selects_tests_outside_slow():
    """The runs above pass ``-m "not slow"``: every NUMERIC_FILES entry must select at least one test there (an entry
    whose tests are all marked slow would drop out silently; a missing file or test fails the runs themselves)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "not slow", "-p", "no:cacheprovider",
           *NUMERIC_FILES]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    ids = [line.strip() for line in res.stdout.splitlines() if "::" in line]
    for entry in NUMERIC_FILES:
        assert any(i == entry or i.startswith((entry + "::", entry + "[")) for i in ids), f"{entry} selects no test"
