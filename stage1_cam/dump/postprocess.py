"""Probabilities -> (label, confidence): argmax or the dense CRF in a pool of worker processes, in order."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Deque, List, Optional, Tuple

import numpy as np

from ..config import DumpCfg
from ..refine.crf import crf_labels
from ..utils.procs import worker_initializer

_logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ decoding
def decode_probs(probs: np.ndarray, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Argmax decoding: (K, H, W) probabilities of classes ``keys`` -> (label uint8, confidence float32)."""
    p = probs.astype(np.float32, copy=False)
    idx = p.argmax(axis=0)
    return np.asarray(keys, dtype=np.int64)[idx].astype(np.uint8), p.max(axis=0)


def apply_ignore(label: np.ndarray, confidence: np.ndarray, threshold: float, ignore_index: int) -> np.ndarray:
    """``label`` with pixels of ``confidence < threshold`` set to ``ignore_index`` (a copy; no-op at 0)."""
    if threshold <= 0:
        return label
    out = label.copy()
    out[confidence < threshold] = ignore_index
    return out


@dataclass
class Job:
    name: str
    image_labels: np.ndarray
    probs: Optional[np.ndarray]  # (K, H, W) float16; None when decoded on the device
    keys: np.ndarray  # (K,) int64
    result: "Future[Tuple[np.ndarray, np.ndarray]] | Tuple[np.ndarray, np.ndarray]"


class OrderedPostprocessor:
    """Turns probabilities into (label, confidence), with the CRF in worker processes, results in order.

    At most ``max_in_flight`` jobs are pending; :meth:`submit` blocks on the oldest job beyond that.

    Args:
        settings: CRF parameters, ignore threshold and index.
        executor: process pool for the CRF (None: run inline; required when the CRF is on).
        max_in_flight: bound on pending jobs (memory).
    """

    def __init__(self, *, settings: DumpCfg, executor: Optional[Executor], max_in_flight: int) -> None:
        if settings.crf_params is not None and executor is None:
            raise ValueError("the CRF needs an executor (process pool)")
        self.settings, self.executor = settings, executor
        self.max_in_flight = max(1, max_in_flight)
        self._queue: Deque[Job] = deque()

    def submit(self, name: str, *, image: np.ndarray, probs: Optional[np.ndarray], keys: np.ndarray,
               image_labels: np.ndarray, decoded: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> List[Job]:
        """Queue one image; returns the jobs now finished at the head of the queue (in submission order).

        Args:
            name: image id.
            image: (H, W, 3) uint8 RGB (the CRF's input).
            probs: (K, H, W) float16 probabilities, or None with ``decoded``.
            keys: (K,) int64 class ids of the channels.
            image_labels: image-level class ids (passed through to the job).
            decoded: (label uint8, confidence float32) already decoded from the same rounded probabilities
                (:func:`~stage1_cam.dump.tta.decode_on_device`); only without the CRF.

        Raises:
            ValueError: neither or both of ``probs`` and ``decoded``, or ``decoded`` with the CRF on.
        """
        s = self.settings
        if (probs is None) == (decoded is None):
            raise ValueError(f"{name}: pass exactly one of probs and decoded")
        if decoded is not None and s.crf_params is not None:
            raise ValueError(f"{name}: the CRF needs probabilities, not labels decoded on the device")
        shape = probs.shape[1:] if probs is not None else decoded[0].shape  # type: ignore[index]
        if s.crf_params is not None and len(keys) > 1:
            assert self.executor is not None
            # float16 probabilities travel to the worker; crf_labels computes in float32.
            result: Any = self.executor.submit(crf_labels, image, probs, keys, **s.crf_params)
        elif len(keys) == 1:  # background only: nothing to decide
            result = (np.full(shape, keys[0], np.uint8), np.ones(shape, np.float32))
        elif decoded is not None:
            result = decoded
        else:
            result = decode_probs(probs, keys)  # type: ignore[arg-type]
        self._queue.append(Job(name, image_labels, probs, keys, result))
        return self._pop(block_over=self.max_in_flight)

    def drain(self) -> List[Job]:
        """Wait for and return all remaining jobs, in order."""
        return self._pop(block_over=0)

    def cancel(self) -> None:
        """Drop pending jobs (after an error)."""
        for job in self._queue:
            if isinstance(job.result, Future):
                job.result.cancel()
        self._queue.clear()

    def _pop(self, *, block_over: int) -> List[Job]:
        out = []
        while self._queue:
            head = self._queue[0]
            if isinstance(head.result, Future):
                if not head.result.done() and len(self._queue) <= block_over:
                    break
                head.result = head.result.result()
            self._queue.popleft()
            label, conf = head.result  # type: ignore[misc]
            label = np.asarray(label, dtype=np.uint8)
            conf = np.asarray(conf, dtype=np.float32)
            head.result = (apply_ignore(label, conf, self.settings.ignore_threshold, self.settings.ignore_index),
                           conf)
            out.append(head)
        return out


def make_crf_executor(settings: DumpCfg) -> Optional[ProcessPoolExecutor]:
    """The dense-CRF worker pool of ``settings`` (``spawn`` processes), or None when the CRF runs in-process."""
    n = settings.num_crf_workers()
    if n == 0:
        return None
    # spawn: safe next to CUDA and torch's thread pools. The workers are started (and import the CRF module)
    # right away, so their start-up overlaps with building the model. They die with this process, also when it
    # is killed (kill -9) and cannot shut them down (utils/procs.py); multiprocessing's resource tracker then
    # exits too (it ends when the last process sharing its pipe is gone).
    executor = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_initializer, initargs=(os.getpid(), "stage1_cam.refine.crf"))
    for _ in range(n):
        executor.submit(os.getpid)
    return executor
