"""One background thread that writes the dump's results in order, so that validating, compressing and writing an
image overlaps with the network pass of the next ones."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Generic, Optional, TypeVar

_logger = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()  # queue sentinel: no more items


class BackgroundWriter(Generic[T]):
    """Calls ``write(item)`` for each :meth:`put` item, in order, in a single daemon thread.

    The queue is bounded (:meth:`put` blocks when ``max_queue`` items wait), so memory stays bounded. The first
    exception raised by ``write`` is re-raised, as the same object, by the next :meth:`put` or by :meth:`close`;
    later items are then dropped. :meth:`abort` drops the waiting items and returns once the item being written
    (if any) is done, so the caller can close the file after it.

    Args:
        write: called with each item, in the background thread.
        max_queue: items waiting at most (>= 1).
        name: thread name.
    """

    def __init__(self, write: Callable[[T], None], *, max_queue: int, name: str = "dump-write") -> None:
        self._write = write
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, int(max_queue)))
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is not None or self._stop.is_set():
                continue  # keep taking items: a put() never waits on a thread that no longer writes
            try:
                self._write(item)
            except BaseException as e:  # handed to the caller's thread by put() / close()
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: T) -> None:
        """Queue ``item`` (blocks while the queue is full).

        Raises:
            BaseException: the exception an earlier ``write`` raised in the thread.
        """
        self._raise()
        if self._ended:
            raise ValueError("the writer thread has been closed")
        self._queue.put(item)

    def close(self) -> None:
        """Wait until every queued item is written; re-raise the thread's exception, if any."""
        self._finish()
        self._raise()

    def abort(self) -> None:
        """Drop the waiting items, wait for the item being written, and stop the thread (errors are not raised)."""
        self._stop.set()
        self._finish()
        if self._error is not None:
            _logger.debug("writer thread error after an interruption: %r", self._error)

    def _finish(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put(_END)
        self._thread.join()
