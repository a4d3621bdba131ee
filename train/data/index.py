"""The index of the training rows: where each row lives, its clip and frame, its reference row
(metadata columns and row-group sizes only, never a picture)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from disco.pipeline.io_threads import map_in_threads
from disco.pipeline.store.reader import open_triplets
from disco.pipeline.store.schema import TRIPLETS_DIR


INDEX_COLUMNS = ["source", "clip_id", "frame_index", "split"]
# The reference row's whole picture and its person mask: the CLIP reference and the background
# are both cut from the picture at the size they are used at (``model.conditioning``'s masks), as
# generate cuts them and the official code did. The stored foreground and background, cut at the
# stored size and shrunk after, had the black of the cut blended into the person's edge.
REFERENCE_COLUMNS = ("image", "mask")
# The picture columns a training sample uses. Pre-training (HAP) has no pose branch and is its own
# reference; fine-tuning reads its reference row's pictures separately (``_encoded_references``).
TARGET_COLUMNS = {"finetune": ("image", "pose"), "pretrain": ("image", "mask")}


class DataError(ValueError):
    """The data folders cannot be trained on (no rows, no pose for fine-tuning), or the data
    stream cannot run (it could not start on the cluster, its shards do not fit the workers)."""


def damaged_shard(exc: BaseException) -> DataError | None:
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

    def summary(self) -> dict:
        """What the run trains on, for its checkpoints: shards, rows, and a digest of both (the
        shards' file names, unique per writer, and rows per shard: data moved elsewhere is the same
        data) that a resume compares."""
        import hashlib
        import os

        digest = hashlib.sha256("\0".join(os.path.basename(f) for f in self.files).encode())
        digest.update(np.bincount(self.file, minlength=len(self.files)).astype(np.int64).tobytes())
        return {"shards": len(self.files), "rows": len(self), "digest": digest.hexdigest()[:16]}

    def first_reference(self) -> np.ndarray:
        """Row id of each row's reference under ``--ref-mode first``: its clip's first frame."""
        return self.clip_order[self.clip_starts[:-1]][self.clip]

    def random_reference(self, rows: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """A frame of the same clip drawn per sample from its seed (``--ref-mode random``)."""
        clips = self.clip[rows]
        counts = self.clip_starts[clips + 1] - self.clip_starts[clips]
        draws = np.array([np.random.default_rng(int(s) ^ 0x5EF).integers(n) for s, n in zip(seeds, counts)], np.int64)
        return self.clip_order[self.clip_starts[clips] + draws]


# Shards whose index columns are read at once (their pre-buffered reads go through Arrow's I/O
# pool, 8 threads by default). On NFS each read is a round trip to the server (~1 ms): a data set
# of 30 K shards read one after the other took minutes before training began.
INDEX_READERS = 16


def _index_part(path: str, folder_id: int, split: str) -> tuple:
    """One shard's index columns: its row groups' sizes (footer) and the rows of ``split``.
    Pre-buffered: the four small columns of each row group in one read, not one read each."""
    parquet = pq.ParquetFile(path, pre_buffer=True)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    # In this thread: with Arrow's CPU pool (as many threads as cores) every reader's reads would
    # queue there, and the waits would not overlap.
    meta = parquet.read(columns=INDEX_COLUMNS, use_threads=False)
    keep = np.asarray(meta.column("split").to_numpy(zero_copy_only=False) == split)
    group = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    row = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]) if sizes else np.zeros(0, np.int32)
    # "<folder>\0<source>/<clip>", in Arrow: per row in Python it took minutes at 30 M rows.
    key = pc.binary_join_element_wise(f"{folder_id}\x00", meta.column("source").fill_null("None"), "/",
                                      meta.column("clip_id").fill_null("None"), "")
    return (int(keep.sum()), group[keep], row[keep], key.filter(pa.array(keep)),
            meta.column("frame_index").to_numpy()[keep].astype(np.int32))


def build_index(folders: list[str], split: str = "train") -> TripletIndex:
    shards = [(path, folder_id) for folder_id, folder in enumerate(folders) for path in open_triplets(folder).files]
    files, file_ids, groups, rows, clip_keys, frames = [], [], [], [], [], []
    parts = map_in_threads(lambda shard: _index_part(*shard, split), shards, INDEX_READERS, "disco-index")
    for (path, _), (kept, group, row, key, frame) in zip(shards, parts):
        file_ids.append(np.full(kept, len(files), np.int32))
        files.append(path)
        groups.append(group)
        rows.append(row)
        clip_keys.append(key)
        frames.append(frame)
    if not files or not sum(len(f) for f in file_ids):
        where = ", ".join(str(f) for f in folders)
        raise DataError(f"no {split!r} rows in {where} ({TRIPLETS_DIR}/*.parquet)")
    file = np.concatenate(file_ids)
    group = np.concatenate(groups)
    frame = np.concatenate(frames)
    # Clip ids number the keys in sorted order (UTF-8 byte order is code point order: the ids
    # np.unique gave, which runs written before keep).
    keys = pa.chunked_array(clip_keys, pa.string())
    names = pc.unique(keys)
    clip = pc.index_in(keys, value_set=names.take(pc.sort_indices(names))).to_numpy().astype(np.int64)
    change = np.flatnonzero((np.diff(file) != 0) | (np.diff(group) != 0)) + 1
    group_starts = np.concatenate([[0], change, [len(file)]]).astype(np.int64)
    clip_order = np.lexsort((frame, clip))
    clip_starts = np.searchsorted(clip[clip_order], np.arange(clip.max() + 2)).astype(np.int64)
    return TripletIndex(files, file, group, np.concatenate(rows), clip, frame, group_starts, clip_order, clip_starts)


