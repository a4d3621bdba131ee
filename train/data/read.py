"""The read stage: one task reads every row group a window of the order touches, once, and emits
the window's encoded pictures in stream order; fine-tuning's reference rows come through small
caches and the cluster's ``ReferenceStore``.

Picture decoding and cropping (OpenCV, torch) are not imported here, so that a read task's worker
process starts with pyarrow alone."""

from __future__ import annotations

import errno
import io
import os
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from disco.train.data.index import REFERENCE_COLUMNS, TARGET_COLUMNS, DataError


ENCODED_REFERENCE_CACHE_BYTES = 256 << 20  # encoded reference rows a read process keeps
METADATA_CACHE_FILES = 1024  # Parquet footers a read process keeps
REFERENCE_STORE_BYTES = 512 << 20  # encoded reference rows the cluster's ReferenceStore keeps
REFERENCE_STORE_NAMESPACE = "disco-train-data"
REFERENCE_STORE_TIMEOUT_S = 20.0  # a read task that waits longer for the store reads without it
# Errors of shared storage that pass (an NFS server restarting or failing over, a stale handle, a
# time-out): a read is tried again, READ_TRIES times in all, READ_BACKOFF_S, then twice that, apart,
# before its shard is called damaged. A read task's error is not retried by Ray Data: it failed
# the training stream, and Ray Train restarted the whole worker group from its last checkpoint.
PASSING_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
                            errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})
READ_TRIES, READ_BACKOFF_S = 3, 2.0


def retried(read, *args):
    """``read(*args)``, tried again on an error of storage that passes (``PASSING_ERRNOS``)."""
    for attempt in range(READ_TRIES):
        try:
            return read(*args)
        except OSError as exc:
            if exc.errno not in PASSING_ERRNOS or attempt == READ_TRIES - 1:
                raise
            time.sleep(READ_BACKOFF_S * 2 ** attempt)



class _CountingFile(io.RawIOBase):
    """A file opened for reading that counts the bytes read from it."""

    def __init__(self, path: str):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed with this object
        self.count = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.count += n or 0
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.count += len(data)
        return data

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()
        super().close()


class LRU:
    """A small least-recently-used map with a bound on entries or on their total size."""

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None):
        self.max_items, self.max_bytes, self.bytes = max_items, max_bytes, 0
        self._items: OrderedDict = OrderedDict()

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value[0] if value is not None else None

    def put(self, key, value, size: int = 0) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        self._items[key] = (value, size)
        self.bytes += size
        while self._items and ((self.max_items is not None and len(self._items) > self.max_items)
                               or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            self.bytes -= self._items.popitem(last=False)[1][1]


_FOOTERS = LRU(max_items=METADATA_CACHE_FILES)
_ENCODED_REFERENCES = LRU(max_bytes=ENCODED_REFERENCE_CACHE_BYTES)


def read_row_group(path: str, group: int, columns: list[str]) -> tuple[pa.Table, int]:
    """Some columns of one row group, and the bytes read from the file for them: their column
    chunks, plus the footer the first time this process opens the file (footers are kept, by
    path, size and modification time: a file written anew is read anew). Tried again, the file
    opened anew, on an error of storage that passes (``retried``)."""
    return retried(_read_row_group, path, group, columns)


def _read_row_group(path: str, group: int, columns: list[str]) -> tuple[pa.Table, int]:
    with _CountingFile(path) as file:
        stat = os.fstat(file.fileno())
        key = (path, stat.st_size, stat.st_mtime_ns)
        metadata = _FOOTERS.get(key)
        if metadata is None:
            metadata = pq.read_metadata(file)
            _FOOTERS.put(key, metadata)
        table = pq.ParquetFile(file, metadata=metadata).read_row_group(group, columns=list(columns))
        return table, file.count


class ReferenceStore:
    """A Ray actor (no CPU) that keeps encoded reference rows for every stream of one data set on
    the cluster, so that a clip's reference is read from Parquet about once per run, not once per
    worker process: a reference row costs a whole row group's reference columns (about 64x
    the row), and every worker meets every clip. Bounded in bytes; a stream works without it."""

    def __init__(self, max_bytes: int):
        self._rows = LRU(max_bytes=max_bytes)

    def get(self, keys: list) -> dict:
        return {key: value for key in keys if (value := self._rows.get(tuple(key))) is not None}

    def put(self, rows: dict) -> None:
        for key, value in rows.items():
            self._rows.put(tuple(key), value, sum(len(v or b"") for v in value))


_STORES: dict = {}  # ReferenceStore handles of this process, by name


def _store(name: str):
    import ray

    if name not in _STORES:
        _STORES[name] = ray.get_actor(name, namespace=REFERENCE_STORE_NAMESPACE)
    return _STORES[name]


def _stored_references(name: str | None, keys: list) -> dict:
    """The reference rows among ``keys`` that the named ``ReferenceStore`` holds. Any failure (no
    store, it died, it is slow to start) means no help from it, never an error."""
    if name is None or not keys:
        return {}
    import ray

    try:
        return ray.get(_store(name).get.remote(keys), timeout=REFERENCE_STORE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the store only saves reads
        _STORES.pop(name, None)
        return {}


def _store_references(name: str | None, rows: dict) -> None:
    if name is None or not rows:
        return
    try:
        _store(name).put.remote(rows)
    except Exception:  # noqa: BLE001 - the store only saves reads
        _STORES.pop(name, None)


def file_version(path: str) -> tuple[int, int]:
    stat = retried(os.stat, path)
    return stat.st_size, stat.st_mtime_ns


def _encoded_references(keys: list[tuple[str, int, int]], store: str | None = None) -> tuple[dict, int]:
    """The encoded reference pictures of these rows, and the bytes read from Parquet for them.
    Under ``--ref-mode first`` every sample of a clip has the same reference, so reference rows are
    kept encoded, in this process and in the stream's ``ReferenceStore`` (``store``: its name):
    the row group of a clip's reference is read about once per run, not once per task or sample."""
    # Cached rows are keyed by file version too (size, modification time): a file written anew
    # is read anew, in this process and in the store.
    versions = {path: file_version(path) for path in dict.fromkeys(key[0] for key in keys)}
    cached = {key: (key[0], *versions[key[0]], key[1], key[2]) for key in dict.fromkeys(keys)}
    found, missing = {}, []
    for key, version in cached.items():
        hit = _ENCODED_REFERENCES.get(version)
        if hit is None:
            missing.append(key)
        else:
            found[key] = hit
    stored = _stored_references(store, [cached[key] for key in missing])
    for key in missing:
        if cached[key] in stored:
            found[key] = stored[cached[key]]
            _ENCODED_REFERENCES.put(cached[key], found[key], sum(len(v or b"") for v in found[key]))
    groups = defaultdict(list)
    for key in missing:
        if key not in found:
            groups[key[:2]].append(key[2])
    read, new = 0, {}
    for (path, group), rows in groups.items():
        try:
            table, nbytes = read_row_group(path, group, list(REFERENCE_COLUMNS))
        except (OSError, pa.ArrowException, ValueError) as exc:  # as the samples' own row groups
            from disco.pipeline.store.reader import damaged

            raise DataError(f"{damaged(path, exc)} (row group {group})") from None
        read += nbytes
        for r in rows:
            values = tuple(table.column(c)[r].as_py() for c in REFERENCE_COLUMNS)
            key = (path, group, r)
            found[key] = new[cached[key]] = values
            _ENCODED_REFERENCES.put(cached[key], values, sum(len(v or b"") for v in values))
    _store_references(store, new)
    return found, read


def read_samples(spec: pa.Table, stage: str, block: int, store: str | None = None,
                 pose_render: dict | None = None) -> Iterator[pa.Table]:
    """The read stage: one task per window of the order (``spec``: the locators of its samples).
    Reads each row group the samples lie in once, only the columns training uses, and yields the
    samples' encoded pictures in stream order, each with its reference's pictures, in blocks of
    ``block`` samples. A block is one row of list columns, so Ray Data ships it as it is (see
    ``SampleStream._configure``). The first carries the bytes this task read from Parquet
    (``read_bytes`` for the samples' row groups, ``reference_bytes`` for reference rows), for the
    stream's accounting; ``store``: the name of the data set's ``ReferenceStore``. ``pose_render``
    (``train/data/pose.py``, ``render_plan``): the samples of its files also carry their keypoints
    and ``render = True``, for the decode stage to draw their pose picture."""
    paths = spec.column("path").to_pylist()
    groups = spec.column("group").to_pylist()
    columns = list(TARGET_COLUMNS[stage])
    rendering = stage == "finetune" and pose_render is not None
    if rendering:
        from disco.pipeline.store.pose import KEYPOINT_COLUMNS

        columns += KEYPOINT_COLUMNS
    rows = spec.column("row").to_numpy()
    last: dict = {}  # the last row the samples take of each row group
    for key, row in zip(zip(paths, groups), rows.tolist()):
        last[key] = max(last.get(key, -1), row)
    parts, offsets, read, base = [], {}, 0, 0
    for key in last:
        try:
            table, nbytes = read_row_group(key[0], key[1], columns)
        except (OSError, pa.ArrowException, ValueError) as exc:  # pages damaged behind a good footer
            from disco.pipeline.store.reader import damaged

            raise DataError(f"{damaged(key[0], exc)} (row group {key[1]})") from None
        if last[key] >= table.num_rows:  # every restart would read the same stale index: the run stops
            from disco.pipeline.errors import STOPS_THE_RUN

            raise DataError(f"{STOPS_THE_RUN} {key[0]} changed while the run trains: its row group {key[1]} holds "
                            f"{table.num_rows} rows, the run's index knew {last[key] + 1} or more (a shard written "
                            "anew in place); resume the run (--resume) to index the data as it is now")
        offsets[key] = base
        base += table.num_rows
        parts.append(table)
        read += nbytes
    where = np.array([offsets[key] for key in zip(paths, groups)], np.int64) + rows
    taken = pa.concat_tables(parts).take(pa.array(where))
    n = spec.num_rows
    out = {"position": spec.column("position"), "image": taken.column("image")}
    reference_read = 0
    if stage == "finetune":
        out["pose"] = taken.column("pose")
        if rendering:
            from disco.pipeline.store.pose import KEYPOINT_COLUMNS

            drawn = set(pose_render["files"])
            out["render"] = pa.array([path in drawn for path in paths], pa.bool_())
            for column in KEYPOINT_COLUMNS:
                out[column] = taken.column(column)
        keys = list(zip(spec.column("ref_path").to_pylist(), spec.column("ref_group").to_pylist(),
                        spec.column("ref_row").to_pylist()))
        encoded, reference_read = _encoded_references(keys, store)
        for i, column in enumerate(REFERENCE_COLUMNS):
            out[f"ref_{column}"] = pa.array([encoded[key][i] for key in keys], pa.binary())
        versions = {path: file_version(path) for path in dict.fromkeys(key[0] for key in keys)}
        out["ref_key"] = pa.array([f"{p}\x00{versions[p]}\x00{g}\x00{r}" for p, g, r in keys], pa.string())
    else:  # pre-training: the row is its own reference (its image is shipped once, as the target's)
        out["ref_mask"] = taken.column("mask")
    window = pa.table(out)
    for start in range(0, n, block):
        part = window.slice(start, block)
        row = {name: pa.ListArray.from_arrays(pa.array([0, part.num_rows], pa.int32()), part.column(name).combine_chunks())
               for name in part.column_names}
        row["read_bytes"] = pa.array([read if start == 0 else 0], pa.int64())
        row["reference_bytes"] = pa.array([reference_read if start == 0 else 0], pa.int64())
        yield pa.table(row)


