"""[worker] The prefetch thread: a batch iterator run ahead of its consumer in a daemon thread.

Pure Python (no torch, no pyspark): :class:`~sparkdl.data.loader.ShardLoader` wraps its
producer in :func:`prefetched` when ``prefetch_batches > 0``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

__all__ = ["HANDOVER_BATCHES", "prefetched"]

T = TypeVar("T")

HANDOVER_BATCHES = 16
"""Batches handed from the thread to the consumer at a time (one thread switch per group)."""


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetched(source: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``source`` in a daemon thread, about ``depth`` batches ahead, in the same order.

    Batches cross over in groups of up to ``HANDOVER_BATCHES`` (one thread switch per group
    rather than per batch, which otherwise costs ~60 us a batch under the GIL), so the thread
    works ahead by ``depth`` rounded up to a whole group. The thread stops when the consumer
    stops (break, exception, garbage collection); its exceptions re-raise in the consumer.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, math.ceil(depth / HANDOVER_BATCHES)))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            group: list[T] = []
            for item in source:
                group.append(item)
                if len(group) >= HANDOVER_BATCHES:
                    if not put(group):
                        return
                    group = []
            if (not group or put(group)) and put(_DONE):
                return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="sparkdl-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield from item
    finally:
        stop.set()
        while not q.empty():
            q.get_nowait()
        thread.join(timeout=10)
