"""Many small file operations at once (stats, Parquet footers and index columns): on NFS each is
a round trip to the file server (0.5-1 ms), so one after another a million of them keeps a run
from starting for many minutes. Threads suffice: the waits happen without the GIL."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

AHEAD = 4  # calls queued per thread: a million items are not a million futures at once (~2 GB)


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], threads: int, name: str) -> list[R]:
    """``[fn(item) for item in items]``, up to ``threads`` at once, in the items' order. The first
    item (in order) whose call raises raises here, and no later call starts."""
    items = iter(items)
    results: list[R] = []
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= threads * AHEAD:
                results.append(pending.popleft().result())
        while pending:
            results.append(pending.popleft().result())
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
