"""Streaming the Parquet triplets into the training loop.

Why not ``ray.data.read_parquet`` over the picture columns: it does not say which row of which
file a picture came from, and the trainer needs exactly that to resume bit-exactly (the data
position is a row count), to give every worker a deterministic share of each global batch (two
workers with batch b must see what one worker with batch 2b sees), and to pair a target frame
with its clip's reference frame. So the data path is split in two:

1. ``build_index`` reads only the small metadata columns (clip, frame index, split) and the row
   group sizes of every shard, with pyarrow. That is tens of bytes a row (700K rows: tens of MB),
   never a picture. Fine-tuning's pairing is decided here: each row gets the *locator*
   (file, row group, row) of its reference frame -- the clip's first frame, or a random frame
   of the clip drawn per sample -- not the reference's bytes.
2. ``SampleStream`` turns a deterministic order of row locators into a Ray Data stream of two
   stages. A *read* task (``read_samples``, one at a time) takes one window of the order (below),
   reads every row group the window touches once -- only the columns training uses -- and emits
   the window's encoded pictures in stream order, in blocks; a *decode* task (``decode_samples``,
   ``data_tasks`` at a time, at the lowest CPU priority) decodes, crops and ships uint8 arrays for
   one block of about ``SAMPLES_PER_BLOCK`` samples. The blocks are prefetched into the loop by
   ``iter_torch_batches``, which the loop cuts into micro-batches.
   Memory is bounded by the encoded bytes of the windows in flight (the one being read and the
   one being decoded), the decode prefetch depth and small per-process caches of reference rows,
   whatever the data size.

**The order: data shards.** A run has ``shards`` virtual data shards (``data_shards``, by default
the number of workers; a resume keeps it). Each epoch permutes the row groups (seeded by run seed
and epoch), lays their rows end to end and cuts that sequence into ``shards`` contiguous ranges of
equal size (+-1 row; a row group on a cut is split between two shards, so a data set with fewer
row groups than shards still gives every row to exactly one shard). A shard's range is cut into
windows of consecutive row groups -- as few as hold at most ``WINDOW_GROUPS`` groups each, of
balanced sizes, so none is a lone group where the range has more -- and the rows are permuted
inside each window. A shard's stream is its epochs one after the other.

Global micro-batch ``c`` (``B = shards * k`` samples) is shard-major: slot ``j`` holds sample
``c * k + j % k`` of shard ``j // k``. Worker ``r`` of ``N`` (``shards % N == 0``) takes slice ``r``
of it (``global_positions``), which is exactly shards ``[r * shards / N, (r + 1) * shards / N)``:
so 1 worker with batch ``2b`` and 2 workers with batch ``b`` see the same global batches when
they have the same ``shards``, and a worker only ever reads row groups of its own shards. With one
shard per worker (the default) a worker's stream *is* its shard's stream and every read task is
one whole window: each row group is read once per epoch (twice at most where a window or shard
boundary cuts it), so bytes read per sample used stay close to 1x -- ``benchmarks/
train_throughput.py`` measures it. With several shards per worker (fewer workers than shards) the
tasks follow the first shard's windows and read the others' partly, which costs reads, not
correctness. Every row is seen once per epoch of its shard; each sample's randomness comes from
``sample_seed(seed, its global position)``.

**Mixing.** Rows of one row group are consecutive frames of one clip, so a micro-batch must not come
from one group. Within a shard, consecutive samples are uniform draws without replacement from
the rows of one window: ``WINDOW_GROUPS // 2`` to ``WINDOW_GROUPS`` row groups (fewer only where
a shard's whole range has fewer), which come from all over the data set because the groups are
permuted. A global micro-batch holds ``k`` such draws from each of the ``shards`` independent
windows, so its samples come from up to ``shards * WINDOW_GROUPS`` row groups; with one shard
per worker and a worker batch ``b``, each worker's ``b`` samples are ``b`` draws from 4 to 8
groups (the ``b`` frames of one window are rarely neighbours), as one global micro-batch was
before data shards.
"""

from __future__ import annotations

import io
import os
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from disco.pipeline.ray_idle import IdlePause
from disco.pipeline.reader import open_triplets
from disco.pipeline.schema import TRIPLETS_DIR

# Picture decoding and cropping (OpenCV, torch) are imported where the decode stage runs, so a read
# task's worker process starts with pyarrow alone.

WINDOW_GROUPS = 8
CHUNK_BATCHES = 256  # at least this many micro-batches of read tasks per Ray Data execution; chained
# Samples one decode task loads. Ray Data costs a few ms of driver and worker CPU per task
# whatever its size; per micro-batch of 4 that was as much CPU as the decoding itself.
SAMPLES_PER_BLOCK = 32
# A stream whose first decoded block has not arrived this long after its Ray Data execution
# started fails with a ``DataError`` naming the resource it waits for.
STARTUP_TIMEOUT_S = 120.0
REFERENCE_CACHE_ROWS = 64  # decoded: 3 pictures each
ENCODED_REFERENCE_CACHE_BYTES = 256 << 20  # encoded reference rows a read process keeps
METADATA_CACHE_FILES = 1024  # Parquet footers a read process keeps
REFERENCE_STORE_BYTES = 512 << 20  # encoded reference rows the cluster's ReferenceStore keeps
REFERENCE_STORE_NAMESPACE = "disco-train-data"
REFERENCE_STORE_TIMEOUT_S = 20.0  # a read task that waits longer for the store reads without it
INDEX_COLUMNS = ["source", "clip_id", "frame_index", "split"]
REFERENCE_COLUMNS = ("foreground", "background", "mask")
# The picture columns a training sample uses. Pre-training (HAP) has no pose branch and is its own
# reference; fine-tuning reads its reference row's pictures separately (``_encoded_references``).
TARGET_COLUMNS = {"finetune": ("image", "pose"), "pretrain": ("image", *REFERENCE_COLUMNS)}


class DataError(ValueError):
    """The data folders cannot be trained on (no rows, no pose for fine-tuning), or the data
    stream cannot run (it could not start on the cluster, its shards do not fit the workers)."""


def _damaged_shard(exc: BaseException) -> DataError | None:
    """The ``DataError`` a read task raised (a damaged shard), out of Ray's wrapping, whose text
    carries the remote traceback."""
    seen = exc
    for _ in range(8):
        if isinstance(seen, DataError) and not type(seen).__name__.startswith("RayTaskError"):
            return seen
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None:
            return None
        seen = cause
    return None


@dataclass
class TripletIndex:
    """One entry per training row: where it lives, its clip and frame, and its reference row."""

    files: list[str]
    file: np.ndarray  # int32, into ``files``
    group: np.ndarray  # int32, row group inside the file
    row: np.ndarray  # int32, row inside the row group
    clip: np.ndarray  # int64 clip code (data folder, source, clip id)
    frame: np.ndarray  # int32
    group_starts: np.ndarray  # row ids where each (file, row group) run starts, plus the end
    clip_order: np.ndarray  # row ids sorted by (clip, frame)
    clip_starts: np.ndarray  # offsets of each clip in ``clip_order``, plus the end

    def __len__(self) -> int:
        return len(self.file)

    def first_reference(self) -> np.ndarray:
        """Row id of each row's reference under ``--ref-mode first``: its clip's first frame."""
        return self.clip_order[self.clip_starts[:-1]][self.clip]

    def random_reference(self, rows: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """A frame of the same clip drawn per sample from its seed (``--ref-mode random``)."""
        clips = self.clip[rows]
        counts = self.clip_starts[clips + 1] - self.clip_starts[clips]
        draws = np.array([np.random.default_rng(int(s) ^ 0x5EF).integers(n) for s, n in zip(seeds, counts)], np.int64)
        return self.clip_order[self.clip_starts[clips] + draws]


def build_index(folders: list[str], split: str = "train") -> TripletIndex:
    files, file_ids, groups, rows, clip_keys, frames = [], [], [], [], [], []
    for folder_id, folder in enumerate(folders):
        for path in open_triplets(folder).files:
            parquet = pq.ParquetFile(path)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            meta = parquet.read(columns=INDEX_COLUMNS)
            keep = np.asarray(meta.column("split").to_numpy(zero_copy_only=False) == split)
            group = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
            row = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]) if sizes else np.zeros(0, np.int32)
            source = meta.column("source").to_numpy(zero_copy_only=False)
            clip = meta.column("clip_id").to_numpy(zero_copy_only=False)
            file_ids.append(np.full(int(keep.sum()), len(files), np.int32))
            files.append(path)
            groups.append(group[keep])
            rows.append(row[keep])
            clip_keys.append(np.array([f"{folder_id}\x00{s}/{c}" for s, c in zip(source[keep], clip[keep])], dtype=object))
            frames.append(meta.column("frame_index").to_numpy()[keep].astype(np.int32))
    if not files or not sum(len(f) for f in file_ids):
        where = ", ".join(str(f) for f in folders)
        raise DataError(f"no {split!r} rows in {where} ({TRIPLETS_DIR}/*.parquet)")
    file = np.concatenate(file_ids)
    group = np.concatenate(groups)
    frame = np.concatenate(frames)
    _, clip = np.unique(np.concatenate(clip_keys), return_inverse=True)
    clip = clip.astype(np.int64)
    change = np.flatnonzero((np.diff(file) != 0) | (np.diff(group) != 0)) + 1
    group_starts = np.concatenate([[0], change, [len(file)]]).astype(np.int64)
    clip_order = np.lexsort((frame, clip))
    clip_starts = np.searchsorted(clip[clip_order], np.arange(clip.max() + 2)).astype(np.int64)
    return TripletIndex(files, file, group, np.concatenate(rows), clip, frame, group_starts, clip_order, clip_starts)


# -- the order ------------------------------------------------------------------------------------

@dataclass
class EpochPlan:
    """One epoch of every data shard: its rows in stream order and where its windows start."""

    rows: list[np.ndarray]  # per shard: row ids, in the order the shard's stream takes them
    windows: list[np.ndarray]  # per shard: offsets into ``rows`` where a window starts, plus the end


def shard_bounds(rows: int, shards: int) -> np.ndarray:
    """Where each shard's range starts in an epoch's row sequence, plus the end (sizes differ by
    at most one row)."""
    return (np.arange(shards + 1, dtype=np.int64) * rows) // shards


def epoch_plan(index: TripletIndex, seed: int, epoch: int, shards: int = 1) -> EpochPlan:
    """Row groups permuted, their rows laid end to end and cut into ``shards`` contiguous ranges;
    each range's row groups (a group split by a cut counts in both ranges) dealt into as few
    windows of at most ``WINDOW_GROUPS`` consecutive groups as will hold them, of balanced sizes
    (so no window is a lone group while its range has more); rows permuted inside each window."""
    rng = np.random.default_rng([seed, epoch])
    starts = index.group_starts
    groups = rng.permutation(len(starts) - 1)
    sizes = starts[groups + 1] - starts[groups]
    rank = np.repeat(np.arange(len(groups)), sizes)  # each row's group, as its place in the permutation
    first = np.cumsum(sizes) - sizes
    sequence = starts[groups][rank] + np.arange(len(rank), dtype=np.int64) - first[rank]
    bounds = shard_bounds(len(sequence), shards)
    rows, windows = [], []
    for lo, hi in pairwise(bounds):
        if hi == lo:
            rows.append(np.zeros(0, np.int64))
            windows.append(np.zeros(1, np.int64))
            continue
        local = rank[lo:hi] - rank[lo]  # the range's row groups, 0 .. groups - 1
        groups_here = int(local[-1]) + 1
        window = local * -(-groups_here // WINDOW_GROUPS) // groups_here  # balanced: sizes differ by <= 1
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(window)) + 1, [hi - lo]]).astype(np.int64)
        part = sequence[lo:hi].copy()
        for a, b in pairwise(cuts):
            part[a:b] = rng.permutation(part[a:b])
        rows.append(part)
        windows.append(cuts)
    return EpochPlan(rows, windows)


def epoch_order(index: TripletIndex, seed: int, epoch: int) -> np.ndarray:
    """Row ids of one epoch of a one-shard stream: row groups permuted, then rows permuted inside
    windows of at most ``WINDOW_GROUPS`` groups."""
    return epoch_plan(index, seed, epoch, 1).rows[0]


def sample_seed(seed: int, position: int) -> int:
    """The seed of one sample of the stream: crops, noise, timestep and condition dropout."""
    return int(np.random.SeedSequence([seed, int(position)]).generate_state(1, np.uint32)[0])


def global_positions(local: np.ndarray, rank: int, world: int, batch: int) -> np.ndarray:
    """Worker ``rank``'s local stream positions -> positions in the global stream: micro-batch
    ``c`` of the global stream (``world * batch`` samples) gives slice ``rank`` to this worker, so
    the union over workers of a step is what one worker with ``world * batch`` would take."""
    local = np.asarray(local, np.int64)
    return ((local // batch) * world + rank) * batch + local % batch


class StreamPlan:
    """Which row each position of the global stream holds, for ``shards`` data shards and global
    micro-batches of ``global_batch`` samples (``k = global_batch / shards`` per shard). Epoch
    plans are computed on demand, the last few kept."""

    def __init__(self, index: TripletIndex, seed: int, shards: int, global_batch: int):
        if shards < 1:
            raise DataError(f"data shards must be at least 1, not {shards}")
        if len(index) < shards:
            raise DataError(f"{len(index)} training rows cannot fill {shards} data shards; use fewer data shards "
                            "(data_shards) or fewer workers")
        if global_batch % shards:
            raise DataError(f"the global micro-batch ({global_batch} samples) must be a multiple of the "
                            f"{shards} data shards")
        self.index, self.seed, self.shards = index, seed, shards
        self.global_batch, self.per_shard = global_batch, global_batch // shards
        self.sizes = np.diff(shard_bounds(len(index), shards))  # rows of each shard per epoch
        self._epochs: OrderedDict = OrderedDict()

    def epoch(self, epoch: int) -> EpochPlan:
        epoch = int(epoch)
        if epoch not in self._epochs:
            self._epochs[epoch] = epoch_plan(self.index, self.seed, epoch, self.shards)
            while len(self._epochs) > 3:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (shard, sample index in the shard's stream)."""
        positions = np.asarray(positions, np.int64)
        batch, slot = np.divmod(positions, self.global_batch)
        return slot // self.per_shard, batch * self.per_shard + slot % self.per_shard

    def rows(self, positions: np.ndarray) -> np.ndarray:
        shard, sample = self.locate(positions)
        size = self.sizes[shard]
        epoch, offset = sample // size, sample % size
        out = np.empty(len(shard), np.int64)
        for e, s in sorted({(int(e), int(s)) for e, s in zip(epoch, shard)}):
            sel = (epoch == e) & (shard == s)
            out[sel] = self.epoch(e).rows[s][offset[sel]]
        return out

    def window_starts(self, shard: int, epoch: int) -> np.ndarray:
        """Samples of ``shard``'s stream where one of its windows in ``epoch`` starts."""
        return epoch * int(self.sizes[shard]) + self.epoch(epoch).windows[shard][:-1]


def locator_table(index: TripletIndex, plan: StreamPlan, positions: np.ndarray, stage: str, ref_mode: str,
                  seed: int, first_references: np.ndarray | None = None) -> pa.Table:
    """What a read task needs to load the samples at these global stream positions."""
    rows = plan.rows(positions)
    if stage == "pretrain":
        refs = rows  # HAP: each image is its own reference
    elif ref_mode == "first":
        refs = (index.first_reference() if first_references is None else first_references)[rows]
    else:
        refs = index.random_reference(rows, np.array([sample_seed(seed, p) for p in positions]))
    files = np.asarray(index.files, dtype=object)
    return pa.table({
        "position": np.asarray(positions, np.int64),
        "path": files[index.file[rows]], "group": index.group[rows], "row": index.row[rows],
        "ref_path": files[index.file[refs]], "ref_group": index.group[refs], "ref_row": index.row[refs],
    })


# -- the read stage ---------------------------------------------------------------------------------

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


class _LRU:
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


_FOOTERS = _LRU(max_items=METADATA_CACHE_FILES)
_ENCODED_REFERENCES = _LRU(max_bytes=ENCODED_REFERENCE_CACHE_BYTES)


def read_row_group(path: str, group: int, columns: list[str]) -> tuple[pa.Table, int]:
    """Some columns of one row group, and the bytes read from the file for them: their column
    chunks, plus the footer the first time this process opens the file (footers are kept, by
    path, size and modification time: a file written anew is read anew)."""
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
    worker process: a reference row costs a whole row group's three reference columns (about 64x
    the row), and every worker meets every clip. Bounded in bytes; a stream works without it."""

    def __init__(self, max_bytes: int):
        self._rows = _LRU(max_bytes=max_bytes)

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


def _file_version(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _encoded_references(keys: list[tuple[str, int, int]], store: str | None = None) -> tuple[dict, int]:
    """The encoded reference pictures of these rows, and the bytes read from Parquet for them.
    Under ``--ref-mode first`` every sample of a clip has the same reference, so reference rows are
    kept encoded, in this process and in the stream's ``ReferenceStore`` (``store``: its name):
    the row group of a clip's reference is read about once per run, not once per task or sample."""
    # Cached rows are keyed by file version too (size, modification time): a file written anew
    # is read anew, in this process and in the store.
    versions = {path: _file_version(path) for path in dict.fromkeys(key[0] for key in keys)}
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
        table, nbytes = read_row_group(path, group, list(REFERENCE_COLUMNS))
        read += nbytes
        for r in rows:
            values = tuple(table.column(c)[r].as_py() for c in REFERENCE_COLUMNS)
            key = (path, group, r)
            found[key] = new[cached[key]] = values
            _ENCODED_REFERENCES.put(cached[key], values, sum(len(v or b"") for v in values))
    _store_references(store, new)
    return found, read


def read_samples(spec: pa.Table, stage: str, block: int, store: str | None = None) -> Iterator[pa.Table]:
    """The read stage: one task per window of the order (``spec``: the locators of its samples).
    Reads each row group the samples lie in once, only the columns training uses, and yields the
    samples' encoded pictures in stream order, each with its reference's pictures, in blocks of
    ``block`` samples. A block is one row of list columns, so Ray Data ships it as it is (see
    ``SampleStream._configure``). The first carries the bytes this task read from Parquet
    (``read_bytes`` for the samples' row groups, ``reference_bytes`` for reference rows), for the
    stream's accounting; ``store``: the name of the data set's ``ReferenceStore``."""
    paths = spec.column("path").to_pylist()
    groups = spec.column("group").to_pylist()
    columns = list(TARGET_COLUMNS[stage])
    parts, offsets, read, base = [], {}, 0, 0
    for key in dict.fromkeys(zip(paths, groups)):
        try:
            table, nbytes = read_row_group(key[0], key[1], columns)
        except (OSError, pa.ArrowException, ValueError) as exc:  # pages damaged behind a good footer
            from disco.pipeline.reader import damaged

            raise DataError(f"{damaged(key[0], exc)} (row group {key[1]})") from None
        offsets[key] = base
        base += table.num_rows
        parts.append(table)
        read += nbytes
    where = np.array([offsets[key] for key in zip(paths, groups)], np.int64) + spec.column("row").to_numpy()
    taken = pa.concat_tables(parts).take(pa.array(where))
    n = spec.num_rows
    out = {"position": spec.column("position"), "image": taken.column("image")}
    reference_read = 0
    if stage == "finetune":
        out["pose"] = taken.column("pose")
        keys = list(zip(spec.column("ref_path").to_pylist(), spec.column("ref_group").to_pylist(),
                        spec.column("ref_row").to_pylist()))
        encoded, reference_read = _encoded_references(keys, store)
        for i, column in enumerate(REFERENCE_COLUMNS):
            out[f"ref_{column}"] = pa.array([encoded[key][i] for key in keys], pa.binary())
        versions = {path: _file_version(path) for path in dict.fromkeys(key[0] for key in keys)}
        out["ref_key"] = pa.array([f"{p}\x00{versions[p]}\x00{g}\x00{r}" for p, g, r in keys], pa.string())
    else:
        for column in REFERENCE_COLUMNS:
            out[f"ref_{column}"] = taken.column(column)
    window = pa.table(out)
    for start in range(0, n, block):
        part = window.slice(start, block)
        row = {name: pa.ListArray.from_arrays(pa.array([0, part.num_rows], pa.int32()), part.column(name).combine_chunks())
               for name in part.column_names}
        row["read_bytes"] = pa.array([read if start == 0 else 0], pa.int64())
        row["reference_bytes"] = pa.array([reference_read if start == 0 else 0], pa.int64())
        yield pa.table(row)


# -- the decode stage -------------------------------------------------------------------------------

DECODE_NICENESS = 19  # the lowest priority that is still never starved


def _lower_thread_priority() -> None:
    """The calling thread gets the lowest CPU priority (nice 19).

    Why: on a machine with few cores the decode tasks share them with the training loop, and a
    thread of the model's parallel ops that gets preempted stalls all the others at the next
    barrier, while a decode task only needs to stay a few batches ahead. Nice 19 rather than
    Linux's ``SCHED_IDLE``: both measured alike (README), but an idle-class thread gets no CPU at
    all while other processes keep the cores busy, so training on a loaded node would starve.
    Nice values are per thread on Linux, so it ends with the thread: the Ray worker that ran the
    task keeps its priority. Where it is not permitted, decoding runs at normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, DECODE_NICENESS)
    except (AttributeError, OSError):
        pass


def at_low_priority(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread of its own at the lowest priority with one OpenCV thread;
    the caller's thread and the process's OpenCV setting are as before afterwards."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max_workers=1, initializer=_lower_thread_priority) as pool:
            return pool.submit(fn, *args, **kwargs).result()
    finally:
        cv2.setNumThreads(threads)


_REFERENCES = _LRU(max_items=REFERENCE_CACHE_ROWS)


def _decode_reference(foreground: bytes, background: bytes, mask: bytes) -> dict:
    from disco.pipeline.encode import decode_picture

    return {"foreground": decode_picture(foreground), "background": decode_picture(background),
            "mask": decode_picture(mask, grayscale=True)}


def _reference(batch: dict, i: int) -> dict:
    """Sample ``i``'s decoded reference pictures. Under ``--ref-mode first`` every sample of a
    clip has the same reference, so decoded references are kept per process (``ref_key``): decoded
    once per clip, not once per sample."""
    pictures = [batch[f"ref_{c}"][i] for c in REFERENCE_COLUMNS]
    key = batch["ref_key"][i] if "ref_key" in batch else None
    if key is None:  # pre-training: the row is its own reference
        return _decode_reference(*pictures)
    decoded = _REFERENCES.get(key)
    if decoded is None:
        decoded = _decode_reference(*pictures)
        _REFERENCES.put(key, decoded)
    return decoded


def _chw(picture: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(picture.transpose(2, 0, 1)) if picture.ndim == 3 else picture[None]


def decode_samples(blocks: pa.Table, stage: str, resolution: int, augment: bool, seed: int) -> Iterator[dict]:
    """The decode stage: each row of ``blocks`` (one encoded block of ``read_samples``) -> one row
    holding the block's uint8 pictures, cropped alike. A sample that fails to decode is kept with
    ``ok = False`` and zero pictures, so the loop can count it and skip it. The work runs at the
    lowest CPU priority (``at_low_priority``)."""
    for row in blocks.to_pylist():
        out = at_low_priority(_decode_samples, row, stage, resolution, augment, seed)
        out["read_bytes"] = np.asarray(row["read_bytes"], np.int64)
        out["reference_bytes"] = np.asarray(row["reference_bytes"], np.int64)
        yield {name: value[None] for name, value in out.items()}


def _decode_samples(batch: dict, stage: str, resolution: int, augment: bool, seed: int) -> dict:
    from disco.pipeline.encode import decode_picture
    from disco.train.augment import CLIP_SIZE, apply_box, crop_box, scale_box

    n = len(batch["position"])
    out = {
        "position": np.asarray(batch["position"], np.int64),
        "ok": np.zeros(n, bool),
        "target": np.zeros((n, 3, resolution, resolution), np.uint8),
        "background": np.zeros((n, 3, resolution, resolution), np.uint8),
        "pose": np.zeros((n, 3, resolution, resolution), np.uint8),
        "reference": np.zeros((n, 3, CLIP_SIZE, CLIP_SIZE), np.uint8),
        "reference_mask": np.zeros((n, 1, CLIP_SIZE, CLIP_SIZE), np.uint8),
    }
    for i in range(n):
        try:
            image = decode_picture(batch["image"][i])
            box = crop_box(image.shape[0], image.shape[1], stage, sample_seed(seed, out["position"][i]), augment)
            out["target"][i] = _chw(apply_box(image, box, resolution))
            if stage == "finetune":
                if batch["pose"][i] is None:
                    raise ValueError("the row has no pose picture (preprocessed with --pose none)")
                out["pose"][i] = _chw(apply_box(decode_picture(batch["pose"][i]), box, resolution))
            ref = _reference(batch, i)
            ref_box = scale_box(box, image.shape[:2], ref["background"].shape[:2])
            out["background"][i] = _chw(apply_box(ref["background"], ref_box, resolution))
            out["reference"][i] = _chw(apply_box(ref["foreground"], ref_box, CLIP_SIZE))
            out["reference_mask"][i] = _chw(apply_box(ref["mask"], ref_box, CLIP_SIZE))
            out["ok"][i] = True
        except Exception:  # noqa: BLE001 - any undecodable row is skipped and counted, never fatal
            for key in ("target", "background", "pose", "reference", "reference_mask"):
                out[key][i] = 0
    return out


# -- Ray Data: start-up watch and idle pause ------------------------------------------------------

def _free_cpus_per_node() -> list[tuple[str, float | None, float]]:
    """(address, free CPUs or None where unknown, CPUs) of every live node of the cluster."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private Ray API: without it, the totals still say something
        free = None
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = float(node.get("Resources", {}).get("CPU", 0.0))
        available = None if free is None else float(free.get(node["NodeID"], {}).get("CPU", 0.0))
        nodes.append((node.get("NodeManagerAddress", "?"), available, total))
    return nodes


def startup_failure(data_cpus: float, timeout_s: float) -> str:
    """One line: why the stream's decode tasks did not deliver a first block (for ``DataError``)."""
    try:
        nodes = _free_cpus_per_node()
    except Exception as exc:  # noqa: BLE001 - the message must come out whatever Ray says
        nodes, listing = [], f"unknown: {exc}"
    else:
        listing = ", ".join(f"{address} {'?' if free is None else f'{free:g}'} of {total:g}"
                            for address, free, total in nodes) or "no live node"
    head = f"the training data stream could not start within {timeout_s:g} s"
    if nodes and all(free is None for _, free, _ in nodes):
        return (f"{head}: its decode tasks need {data_cpus:g} CPU each (CPUs per node: {listing}; Ray did not say "
                "how many are free)")
    if not any(free is not None and free >= data_cpus for _, free, _ in nodes):
        return (f"{head}: its decode tasks need {data_cpus:g} CPU each and no node has that free (free CPU per "
                f"node: {listing}); lower data_cpus (--data-cpus in a config file) or free CPUs on a node")
    return (f"{head}: no decode task delivered a block, although a node has the {data_cpus:g} CPU a task needs "
            f"free now (free CPU per node: {listing})")


class _Watch:
    """What a stream's execution callback and its consumer share."""

    def __init__(self, timeout_s: float, data_cpus: float):
        self.timeout_s, self.data_cpus = timeout_s, data_cpus
        self.started: float | None = None  # when the current Ray Data execution started
        self.delivered = False  # whether it delivered a block yet
        self.error: str | None = None


def stream_callback(watch: _Watch):
    """A Ray Data execution callback class for one stream, or None where this Ray lacks the
    callback interface (then the loop runs as Ray ships it and nothing watches the start-up).

    Start-up watch: an execution whose first block has not reached the consumer
    ``watch.timeout_s`` after it started fails with a ``DataError`` that names the missing
    resource (Ray would wait for it forever; Ray Data itself gives up only after 30 minutes
    without progress, with no word about resources).

    Idle pause (pipeline/ray_idle.py): while the consumer holds the stream back (the model is
    slower than decoding, the normal case), Ray Data's scheduling loop would poll on most of a
    core; it rests instead. The prefetched blocks cover the pause many times over."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:
        return None

    class StreamWatch(ExecutionCallback):
        def __init__(self):
            self._pause = IdlePause()

        def before_execution_starts(self, executor) -> None:
            watch.started, watch.delivered = time.monotonic(), False

        def on_execution_step(self, executor) -> None:
            if not watch.delivered and watch.started is not None \
                    and time.monotonic() - watch.started > watch.timeout_s:
                watch.error = watch.error or startup_failure(watch.data_cpus, watch.timeout_s)
                raise DataError(watch.error)
            self._pause.step()

    return StreamWatch


# -- the stream a worker trains on ----------------------------------------------------------------

class SampleStream:
    """Micro-batches of exactly ``batch`` decodable samples from this worker's share of the stream.

    ``position`` counts this worker's stream items consumed so far (skipped ones included, rows
    already fetched but not yet used excluded): a checkpoint stores it and a resume restarts there.
    ``shards``: the run's data shards (default: ``world``); it must be a multiple of ``world``, and
    ``batch`` a multiple of ``shards / world``. ``read_bytes`` and ``reference_bytes`` count what the
    read tasks behind the blocks handed out so far read from the Parquet files.

    Every Ray task and actor of the stream asks for at most ``data_cpus`` CPUs: the decode tasks
    exactly that (``data_tasks`` at a time), the read task (I/O, one at a time, a few ms of CPU per
    window) and the ``ReferenceStore`` actor none, and the source is built on the driver
    (``from_blocks``: no metadata tasks, which ``from_arrow`` starts at Ray's default of 1 CPU; Ray
    Data's own helper actors ask for none; ``iter_torch_batches`` works in threads of this
    process). A stream whose first block has not arrived within
    ``startup_timeout_s`` (default ``STARTUP_TIMEOUT_S``) of starting raises ``DataError`` saying
    which resource it waits for.
    """

    def __init__(self, index: TripletIndex, *, stage: str, ref_mode: str, resolution: int, augment: bool,
                 seed: int, batch: int, rank: int = 0, world: int = 1, position: int = 0, shards: int | None = None,
                 data_cpus: float = 0.25, data_tasks: int = 2, prefetch_batches: int = 2, device=None,
                 startup_timeout_s: float | None = None):
        shards = shards or world
        if shards % world:
            raise DataError(f"{shards} data shards cannot be shared evenly by {world} workers; make data_shards "
                            "a multiple of the number of workers")
        if batch % (shards // world):
            raise DataError(f"each of the {world} workers reads {shards // world} data shards, so its batch size "
                            f"({batch}) must be a multiple of {shards // world}")
        self.index, self.stage, self.ref_mode = index, stage, ref_mode
        self.resolution, self.augment, self.seed = resolution, augment, seed
        self.batch, self.rank, self.world, self.shards = batch, rank, world, shards
        self.position, self.skipped = position, 0
        self.read_bytes, self.reference_bytes = 0, 0
        self.data_cpus, self.data_tasks = data_cpus, data_tasks
        self.prefetch_batches, self.device = prefetch_batches, device
        self.startup_timeout_s = STARTUP_TIMEOUT_S if startup_timeout_s is None else startup_timeout_s
        self._plan = StreamPlan(index, seed, shards, batch * world)
        self._first_shard = rank * (shards // world)
        self._first_references = index.first_reference() if stage == "finetune" and ref_mode == "first" else None
        self._watch = _Watch(self.startup_timeout_s, data_cpus)
        self._store = None  # (name, handle) of the data set's ReferenceStore, once started
        self._blocks = self._stream()
        self._block, self._offset, self._bad_run = None, 0, 0

    @property
    def samples_per_block(self) -> int:
        """Samples per decode task: whole micro-batches, about ``SAMPLES_PER_BLOCK`` of them."""
        return self.batch * max(1, round(SAMPLES_PER_BLOCK / self.batch))

    @property
    def prefetch_blocks(self) -> int:
        """``prefetch_batches`` micro-batches, in decode-task outputs (at least one)."""
        return max(1, -(-self.prefetch_batches * self.batch // self.samples_per_block))

    # -- the read plan ------------------------------------------------------------------------------

    def _first_shard_item(self, samples: np.ndarray) -> np.ndarray:
        """Samples of this worker's first shard -> this worker's stream items."""
        k = self._plan.per_shard
        return (samples // k) * self.batch + samples % k

    def _next_window_start(self, item: int) -> int:
        """The first stream item after ``item`` where a window of this worker's first shard starts."""
        size = int(self._plan.sizes[self._first_shard])
        epoch = (item // self.batch) * self._plan.per_shard // size
        while True:
            items = self._first_shard_item(self._plan.window_starts(self._first_shard, epoch))
            later = items[items > item]
            if len(later):
                return int(later[0])
            epoch += 1

    def task_end(self, start: int) -> int:
        """Where the read task that starts at stream item ``start`` ends: at the next window
        start, or later ones while that leaves it under ``samples_per_block`` samples."""
        end = self._next_window_start(start)
        while end - start < self.samples_per_block:
            end = self._next_window_start(end)
        return end

    def locators(self, start: int, stop: int) -> pa.Table:
        """The locators of this worker's stream items ``[start, stop)``."""
        positions = global_positions(np.arange(start, stop, dtype=np.int64), self.rank, self.world, self.batch)
        return locator_table(self.index, self._plan, positions, self.stage, self.ref_mode, self.seed,
                             self._first_references)

    def planned_reads(self, samples: int, references: set | None = None) -> dict:
        """What this worker's read tasks read for its next ``samples`` stream items or more (whole
        tasks), by its own read plan, without Ray or reading a picture: ``target_bytes`` (the
        column chunks of the row groups the tasks read, from the Parquet metadata),
        ``reference_bytes`` (those of the reference row groups not in ``references`` yet: the
        reference rows read so far, which this call adds to; pass one set to several workers'
        calls to plan for the shared ``ReferenceStore``), ``footer_bytes`` (what opening each file once reads),
        ``needed_bytes`` (the samples' own share of their row groups' column chunks: what a reader
        of exactly these rows would read) and ``samples``."""
        footers, opened = {}, set()
        references = set() if references is None else references
        counts = dict(samples=0, target_bytes=0, footer_bytes=0, reference_bytes=0, needed_bytes=0.0)

        def chunks(path: str, group: int, columns) -> tuple[int, int, int]:
            """(bytes of these column chunks, bytes of the footer if the file is new, rows)"""
            if path not in footers:
                metadata = pq.read_metadata(path)
                index = {metadata.row_group(0).column(i).path_in_schema: i for i in range(metadata.num_columns)}
                footers[path] = (metadata, index)
            metadata, index = footers[path]
            row_group = metadata.row_group(group)
            footer = 0 if path in opened else min(64 << 10, os.path.getsize(path))  # pyarrow reads 64 KiB
            opened.add(path)
            return sum(row_group.column(index[c]).total_compressed_size for c in columns), footer, row_group.num_rows

        start = self.position
        while counts["samples"] < samples:
            end = self.task_end(start)
            spec = self.locators(start, end).to_pydict()
            keys = list(zip(spec["path"], spec["group"]))
            uses = defaultdict(int)
            for key in keys:
                uses[key] += 1
            for (path, group), used in uses.items():
                nbytes, footer, rows = chunks(path, group, TARGET_COLUMNS[self.stage])
                counts["target_bytes"] += nbytes
                counts["footer_bytes"] += footer
                counts["needed_bytes"] += used * nbytes / rows
            if self.stage == "finetune":
                refs = list(zip(spec["ref_path"], spec["ref_group"], spec["ref_row"]))
                for path, group in dict.fromkeys(key[:2] for key in refs if key not in references):
                    nbytes, footer, _ = chunks(path, group, REFERENCE_COLUMNS)
                    counts["reference_bytes"] += nbytes
                    counts["footer_bytes"] += footer
                references.update(refs)
            counts["samples"] += end - start
            start = end
        return counts

    # -- Ray Data -----------------------------------------------------------------------------------

    def _configure(self, context) -> None:
        """Settings of this stream's own Ray Data context (a copy: nothing else in the process
        sees them). Blocks in order: resume and the workers' shares depend on it. A bound on how
        far Ray Data decodes ahead: by default it fills its object-store budget (a whole chunk),
        competing with the model for the CPU; a few blocks beyond the loop's prefetch are enough,
        plus the encoded windows of the read tasks. And the start-up watch and idle pause of its
        scheduling loop."""
        from disco.train.augment import CLIP_SIZE

        per_sample = 3 * self.resolution ** 2 * 3 + 4 * CLIP_SIZE ** 2
        blocks = self.prefetch_blocks + 2 * self.data_tasks + 1
        context.enable_progress_bars = False  # the trainer has its own progress
        # Every block the stages yield is one row (a whole encoded or decoded block) and goes out
        # as it is: Ray Data neither merges a read task's blocks into one nor slices a decoded one.
        context.target_max_block_size = 1
        options = context.execution_options
        options.preserve_order = True  # the stream's order is part of the run's determinism
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=blocks * self.samples_per_block * per_sample + 2 * self._window_bytes())
        callback = stream_callback(self._watch)
        if callback is not None:
            context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, callback]

    def _window_bytes(self) -> int:
        """About the encoded bytes of one window (from the first file's footer), for the budget."""
        if not hasattr(self, "_window_estimate"):
            try:
                metadata = pq.read_metadata(self.index.files[0])
                names = {metadata.row_group(0).column(i).path_in_schema: i for i in range(metadata.num_columns)}
                columns = set(TARGET_COLUMNS[self.stage]) | set(REFERENCE_COLUMNS)
                groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
                per_row = sum(g.column(names[c]).total_compressed_size for g in groups for c in columns) / \
                    max(1, sum(g.num_rows for g in groups))
                rows = max(g.num_rows for g in groups)
            except Exception:  # noqa: BLE001 - only a budget estimate
                per_row, rows = 200 << 10, 64
            self._window_estimate = int(per_row * rows * WINDOW_GROUPS)
        return self._window_estimate

    def _reference_store(self) -> str | None:
        """The name of this data set's ``ReferenceStore`` on the cluster, started here unless one
        runs (fine-tuning only; None where it cannot start: the stream reads without it)."""
        if self.stage != "finetune":
            return None
        import hashlib

        import ray

        if self._store is None:
            files = "\0".join(f"{path}\0{_file_version(path)}" for path in self.index.files)
            name = "references-" + hashlib.sha256(files.encode()).hexdigest()[:24]
            try:
                self._store = name, ray.remote(num_cpus=0)(ReferenceStore).options(
                    name=name, namespace=REFERENCE_STORE_NAMESPACE, get_if_exists=True, scheduling_strategy="DEFAULT",
                ).remote(REFERENCE_STORE_BYTES)
            except Exception:  # noqa: BLE001 - the store only saves reads
                self._store = None, None
        return self._store[0]

    def _dataset(self, tasks: list[tuple[int, int]]):
        import ray

        specs = [self.locators(start, stop) for start, stop in tasks]
        dataset = (
            ray.data.from_blocks(specs)
            # Two stages that Ray Data does not fuse (their CPU requests differ): fused, each task
            # would read and decode a whole window, and as blocks stay in order the next window's
            # task could not decode ahead of it.
            .map_batches(read_samples, batch_size=None, batch_format="pyarrow", num_cpus=0, concurrency=1,
                         fn_kwargs=dict(stage=self.stage, block=self.samples_per_block, store=self._reference_store()))
            .map_batches(decode_samples, batch_size=None, batch_format="pyarrow", num_cpus=self.data_cpus,
                         concurrency=self.data_tasks,
                         fn_kwargs=dict(stage=self.stage, resolution=self.resolution, augment=self.augment,
                                        seed=self.seed))
        )
        self._configure(dataset.context)
        return dataset

    def _stream(self):
        start = self.position
        while True:
            tasks, stop = [], start
            while not tasks or stop - start < CHUNK_BATCHES * self.batch:
                end = self.task_end(stop)
                tasks.append((stop, end))
                stop = end
            try:
                for block in self._dataset(tasks).iter_torch_batches(
                    batch_size=None, prefetch_batches=self.prefetch_blocks, device=self.device or "cpu",
                ):
                    self._watch.delivered = True
                    yield block
            except Exception as exc:
                if self._watch.error is not None:
                    raise DataError(self._watch.error) from None
                damaged = _damaged_shard(exc)
                if damaged is not None:
                    raise damaged from None
                raise
            start = stop

    def close(self) -> None:
        """Stop the running Ray Data execution (its prefetching tasks) now, not at interpreter exit."""
        self._blocks.close()

    def next_batch(self) -> dict:
        """The next ``batch`` decodable samples, as torch tensors (uint8 pictures)."""
        import torch

        parts, need = [], self.batch
        while need:
            if self._block is None or self._offset >= len(self._block["position"]):
                self._block, self._offset = {k: v[0] for k, v in next(self._blocks).items()}, 0
                self.read_bytes += int(self._block.pop("read_bytes").sum())
                self.reference_bytes += int(self._block.pop("reference_bytes").sum())
            ok = self._block["ok"][self._offset:]
            taken = torch.cumsum(ok.to(torch.int64), 0)
            hits = torch.nonzero(taken == need)
            end = self._offset + (int(hits[0]) + 1 if len(hits) else len(ok))
            rows = slice(self._offset, end)
            keep = self._block["ok"][rows]
            parts.append({k: v[rows][keep] for k, v in self._block.items()})
            self.skipped += int((~keep).sum())
            self._bad_run = 0 if keep.any() else self._bad_run + int((~keep).sum())
            if self._bad_run > len(self.index):  # a whole epoch without one decodable row
                raise DataError(f"no row decodes: {self._bad_run} in a row failed (corrupt pictures, or no pose "
                                "for fine-tuning)")
            need -= int(keep.sum())
            self.position += end - self._offset
            self._offset = end
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
