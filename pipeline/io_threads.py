"""Many small file operations at once (stats, Parquet footers and index columns): on NFS each is
a round trip to the file server (0.5-1 ms), so one after another a million of them keeps a run
from starting for many minutes. Threads suffice: the waits happen without the GIL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], threads: int, name: str) -> list[R]:
    """``[fn(item) for item in items]``, up to ``threads`` at once, in the items' order. The first
    item (in order) whose call raises raises here, and the calls still queued do not run."""
    items = list(items)
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(items))), thread_name_prefix=name)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
