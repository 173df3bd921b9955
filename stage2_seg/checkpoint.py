"""Loading mmengine checkpoints under ``torch.load(weights_only=True)``.

Since PyTorch 2.6 ``torch.load`` defaults to ``weights_only=True``. mmengine 0.10.7 calls ``torch.load``
without that argument (mmengine issue 1655), and its checkpoints hold more than tensors: the message hub
stores ``HistoryBuffer`` objects (numpy arrays and numpy scalars inside, plus references to the buffer's
statistics methods), so ``--resume`` and ``load_from`` fail with "Unsupported global".

The fix here keeps ``weights_only=True`` and allowlists, for the duration of a ``with`` block, exactly the
globals those checkpoints need. The one risky global in them, ``builtins.getattr`` (pickle's way of naming
``HistoryBuffer.mean`` and friends), is not allowed as such: its name is bound to a restricted function that
only returns those four statistics methods and refuses everything else. Nothing is changed globally and no
environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) is involved.

Example:
    >>> with safe_checkpoint_loading():
    ...     runner.train()  # resume/load_from inside may call torch.load
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any, Callable, Iterator, List, Tuple, Union

import numpy as np
import torch

# ``HistoryBuffer`` pickles its default statistics methods by reference (``getattr(HistoryBuffer, name)``).
_HISTORY_BUFFER_METHODS = frozenset({"min", "max", "current", "mean"})

SafeGlobal = Union[Callable[..., Any], Tuple[Callable[..., Any], str]]


def _history_buffer_getattr(owner: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` while unpickling: only ``HistoryBuffer.{min,max,current,mean}``.

    Raises:
        pickle.UnpicklingError: for any other object or attribute.
    """
    from mmengine.logging import HistoryBuffer

    if owner is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"refusing getattr({owner!r}, {name!r}) while loading a checkpoint with weights_only=True: only "
        f"HistoryBuffer.{{{', '.join(sorted(_HISTORY_BUFFER_METHODS))}}} may be looked up; the checkpoint was "
        "not written by mmengine or has been tampered with")


def _numpy_safe_globals() -> List[SafeGlobal]:
    """numpy arrays, dtypes and scalars, under both the numpy>=2 and numpy<2 module paths."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]

    out: List[SafeGlobal] = [np.ndarray, np.dtype]
    for fn_name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, fn_name)
        out += [(fn, f"numpy._core.multiarray.{fn_name}"), (fn, f"numpy.core.multiarray.{fn_name}")]
    # numpy>=1.25 pickles some dtypes through their classes (numpy.dtypes.Float64DType, ...): plain numeric ones.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType") and not name.startswith(("Object", "Void", "String", "Str", "Bytes")):
                out.append(getattr(dtypes, name))
    return out


def mmengine_safe_globals() -> List[SafeGlobal]:
    """The globals an mmengine 0.10 checkpoint needs beyond torch's default ``weights_only`` allowlist.

    Returns:
        Entries for ``torch.serialization.safe_globals``: classes/functions, or ``(callable, "module.name")``
        pairs where the pickled name differs from the object's own path.
    """
    from mmengine.logging import HistoryBuffer

    return [
        HistoryBuffer,
        (_history_buffer_getattr, "builtins.getattr"),
        *_numpy_safe_globals(),
    ]


@contextlib.contextmanager
def safe_checkpoint_loading() -> Iterator[None]:
    """Allow mmengine checkpoints to load with ``weights_only=True`` inside the block.

    Torch's allowlist is process-global; this adds the entries on entry and removes them on exit. Use it
    around ``Runner.train()`` / ``load_checkpoint`` calls in entry points, not at import time.
    """
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield
