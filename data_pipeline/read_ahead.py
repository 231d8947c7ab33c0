"""Reads issued ahead of their use, delivered in order: what hides an object store's round trip.

``read_ahead(items, fetch, depth)`` runs ``fetch(item)`` for up to ``depth`` items at once in a
small thread pool and yields ``(item, result)`` in the order of ``items``; a failed fetch yields
the exception as its result (the caller decides: the stream skips and counts the sample). The
order of items, hence of samples, crop seeds and stream positions, is exactly that of ``items``:
reading ahead changes when bytes arrive, never what is served, so a resumed stream is the same.

Cost: ``depth`` fetched results held at most (for samples: ``depth`` x the image size), ``depth``
threads, and ``depth`` requests in flight. ``depth`` 0 fetches each item when it is used (local
shards: one ``pread`` is faster than a hand-off to a thread).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _attempt(fetch: Callable[[T], R], item: T) -> R | BaseException:
    try:
        return fetch(item)
    except Exception as err:  # delivered in order, to the consumer
        return err


def read_ahead(items: Iterable[T], fetch: Callable[[T], R], depth: int) -> Iterator[tuple[T, R | Exception]]:
    """``(item, fetch(item) or its exception)`` for every item, in order, ``depth`` fetched ahead."""
    if depth <= 0:
        for item in items:
            yield item, _attempt(fetch, item)
        return
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="seer-read-ahead")
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(_attempt, fetch, item)))
            if len(pending) > depth:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
