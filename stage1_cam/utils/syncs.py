"""Host<->device synchronisation detector that works on the CPU (issue 20: a training step without syncs).

On a GPU the real check is ``torch.cuda.set_sync_debug_mode("error")`` (``tools/gpu_check.py --sync-check``). On
the CPU nothing synchronises, so :class:`SyncCounter` flags the operations that *would* synchronise if the tensors
lived on a GPU:

* at the dispatcher (every tensor, whatever Python code calls it): ``_local_scalar_dense`` (``.item()``,
  ``bool(t)``, ``int(t)``, ``float(t)``, ``t.__index__()``, a tensor in an ``if``), ``nonzero`` /
  ``argwhere`` / ``masked_select`` / ``unique*`` / ``bincount`` / ``repeat_interleave`` without ``output_size``
  (data-dependent shapes), indexing and ``index_put_`` with boolean masks, ``equal``, and copies to the CPU from
  another device;
* in Python (invisible to the dispatcher for CPU tensors): ``Tensor.numpy``, ``Tensor.tolist``, ``Tensor.cpu`` and
  a blocking ``Tensor.to`` with a device (here always the CPU; on a GPU a device-to-host copy, or a host-to-device
  copy that waits for the stream).

It over-counts what it sees: a CPU tensor that would stay on the host in a GPU run (e.g. an optimizer's step
counter) is counted too, so count only code that handles device tensors. It does not see, and the GPU check adds:
host-to-device copies made by factories (``torch.tensor(data, device=...)``), ``torch.tensor`` / ``torch.as_tensor``
of a list of 0-d device tensors, ``torch.allclose`` (a Python ``bool``), and ``copy_`` from a device tensor into a
host buffer. None of these is in the training step (grep before adding one).
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_logger = logging.getLogger(__name__)

__all__ = ["HostSyncError", "SyncCounter"]


class HostSyncError(RuntimeError):
    """Raised by :class:`SyncCounter` with ``raise_on_sync=True`` at the first synchronising operation."""


_ALWAYS = {"_local_scalar_dense", "nonzero", "nonzero_static", "argwhere", "masked_select", "_unique", "_unique2",
           "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "equal", "is_nonzero",
           "masked_scatter", "masked_scatter_"}
_BOOL_INDEX = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}
_PY_METHODS = ("numpy", "tolist", "cpu", "to")


def _is_cpu_target(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` is a blocking copy to a device that is the CPU here.

    On the CPU a host-to-device copy looks like ``.to(x.device)`` with ``x`` on the CPU, so every blocking
    ``.to(<device>)`` counts: on CUDA it synchronises in both directions (host-to-device from pageable memory with
    ``non_blocking=False`` waits for the stream), or is a no-op that the code need not call per step.
    """
    if kwargs.get("non_blocking") or (len(args) > 1 and isinstance(args[1], bool) and args[1]) or \
            (len(args) > 2 and isinstance(args[2], bool) and args[2]):
        return False
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    return dev is not None and torch.device(dev).type == "cpu"


class _Mode(TorchDispatchMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Optional[Dict] = None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _ALWAYS:
            self.record(name)
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None \
                and not args[0].dtype.is_floating_point and len(args) < 2:
            self.record(name)  # repeats given as a tensor without output_size: the result size is read on the host
        elif name in _BOOL_INDEX and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.record(f"{name}[bool mask]")
        elif name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                    and torch.device(dst).type == "cpu":
                self.record(f"{name} to cpu")
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting (or refusing) operations that synchronise host and device; see the module doc.

    Args:
        raise_on_sync: raise :class:`HostSyncError` at the first one instead of counting.

    Attributes:
        counts: operation name -> number of calls.
        where: one short stack summary per call (the innermost project frames), in call order.
    """

    def __init__(self, *, raise_on_sync: bool = False) -> None:
        self.raise_on_sync = raise_on_sync
        self.counts: Counter = Counter()
        self.where: List[str] = []
        self._mode: Optional[_Mode] = None
        self._saved: Dict[str, Any] = {}
        self._depth = 0  # > 0 inside a patched Python method: its own dispatcher calls are not counted twice

    @property
    def total(self) -> int:
        """Number of synchronising operations seen."""
        return sum(self.counts.values())

    def _record(self, name: str) -> None:
        if self._depth:
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and
                  not f.filename.endswith("syncs.py")]
        site = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
        self.counts[name] += 1
        self.where.append(f"{name} at {site}")
        if self.raise_on_sync:
            raise HostSyncError(f"host<->device synchronisation: {name} at {site}")

    def _patch(self, method: str) -> Callable[..., Any]:
        original = self._saved[method]
        counter = self

        def wrapper(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if method != "to" or _is_cpu_target(args, kwargs):
                counter._record(f"Tensor.{method}")
            counter._depth += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                counter._depth -= 1

        return wrapper

    def __enter__(self) -> "SyncCounter":
        for method in _PY_METHODS:
            self._saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._patch(method))
        self._mode = _Mode(self._record)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        if self.counts:
            _logger.debug("host syncs: %s", dict(self.counts))
