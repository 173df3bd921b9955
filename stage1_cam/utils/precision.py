"""Which autocast dtype a network pass runs in, and what the CPU can do natively.

``train.amp`` (used by every stage-1 network pass: CAMs, training, dump) takes:

* ``"auto"``: bf16 on CUDA, and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX-BF16, as the CPU reports
  it, and an ATen kernel level that uses it); float32 elsewhere. On a CPU without native bf16, bf16 is emulated and
  slower than float32.
* ``"bf16"``: bf16 autocast on any device. ``"fp16"``: fp16 autocast on CUDA (with a gradient scaler), float32 on
  a CPU. ``"none"``: float32.

The CLIP-ES GradCAM block stays in float32 under autocast on every device (see ``cams/gradcam.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch

_logger = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "none")


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset:
    """The first CPU's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _torch_probe(name: str) -> Optional[bool]:
    fn = getattr(torch.cpu, name, None)  # private cpuinfo probes; absent in some torch builds
    try:
        return bool(fn()) if fn is not None else None
    except RuntimeError:
        return None


def cpu_features() -> Dict[str, Any]:
    """What the benchmarks record next to their figures: ATen's kernel level and the bf16-relevant ISA flags."""
    flags = _cpuinfo_flags()
    amx = _torch_probe("_is_amx_tile_supported")
    return {
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": "avx2" in flags or bool(_torch_probe("_is_avx2_supported")),
        "avx512f": "avx512f" in flags or bool(_torch_probe("_is_avx512_supported")),
        "avx512_bf16": "avx512_bf16" in flags or bool(_torch_probe("_is_avx512_bf16_supported")),  # as native_bf16
        "amx_bf16": "amx_bf16" in flags or bool(amx),
        "native_bf16": native_bf16_cpu(),
        "threads": torch.get_num_threads(),
    }


def native_bf16_cpu() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16) and ATen runs its AVX-512 kernels.

    Read from the CPU's own feature flags, not guessed from its model name. ``ATEN_CPU_CAPABILITY=avx2`` (or
    ``default``) turns it off: the user asked for the narrower kernels.
    """
    flags = _cpuinfo_flags()
    has = bool(_torch_probe("_is_avx512_bf16_supported")) or "avx512_bf16" in flags or "amx_bf16" in flags
    return has and torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp`` on ``device``; None means float32 (autocast off)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is not one of {', '.join(AMP_MODES)}")
    if amp == "none":
        return None
    if device.type == "cuda":
        return torch.float16 if amp == "fp16" else torch.bfloat16
    if amp == "bf16" or (amp == "auto" and native_bf16_cpu()):
        return torch.bfloat16
    return None


def autocast(device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> torch.autocast:
    """``torch.autocast`` on ``device``'s type in ``dtype`` (from :func:`autocast_dtype`); None: off (float32)."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=dtype or torch.float32, enabled=dtype is not None)


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """``"bf16"``, ``"fp16"`` or ``"float32"`` (for logs and summaries)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "float32")


_WHOLE_BATCH = [False]  # set by whole_batch_passes()


def images_per_pass(device: torch.device, batch: int) -> int:
    """Images per pass of a loop over per-image ``L x L`` (or ``K x H x W``) maps: one on a CPU, where one image's
    maps stay in cache (about twice as fast there as the batch at once, ViT-B/16 at 320x320), the whole batch
    elsewhere (each kernel launched once per batch) and inside :func:`whole_batch_passes`. The results are the
    same either way."""
    return 1 if torch.device(device).type == "cpu" and not _WHOLE_BATCH[0] else max(1, int(batch))


@contextlib.contextmanager
def whole_batch_passes() -> Iterator[None]:
    """Inside it, :func:`images_per_pass` gives the whole batch on every device: a GPU's loop shapes on a CPU (e.g.
    to estimate a GPU step's peak memory there, ``python -m tools.bench --only train_memory``)."""
    old, _WHOLE_BATCH[0] = _WHOLE_BATCH[0], True
    try:
        yield
    finally:
        _WHOLE_BATCH[0] = old
