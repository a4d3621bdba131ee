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
2. ``SampleStream`` turns a deterministic order of row locators into a Ray Data stream: blocks
   of about ``SAMPLES_PER_TASK`` locators (whole micro-batches) go through a CPU ``map_batches``
   (``load_samples``, at the lowest CPU priority) that reads the picture bytes of just those row groups
   from Parquet, decodes, crops, and ships uint8 arrays; they are prefetched into the loop by
   ``iter_torch_batches``, which the loop cuts into micro-batches. Memory is bounded by the prefetch
   depth and a small per-process cache of reference rows, whatever the size of the data set.

Shuffling is by windows: each epoch permutes the row groups, then permutes the rows inside
windows of ``WINDOW_GROUPS`` consecutive (permuted) row groups, so one map task reads a few row
groups instead of one per row.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from disco.pipeline.encode import decode_picture
from disco.pipeline.reader import open_triplets
from disco.pipeline.schema import TRIPLETS_DIR
from disco.train.augment import CLIP_SIZE, apply_box, crop_box, scale_box

WINDOW_GROUPS = 8
CHUNK_BATCHES = 256  # micro-batches per Ray Data execution; streams are chained chunk by chunk
# Samples one decode task loads. Ray Data costs a few ms of driver and worker CPU per task
# whatever its size; per micro-batch of 4 that was as much CPU as the decoding itself.
SAMPLES_PER_TASK = 32
# How long Ray Data's scheduling loop rests when a step of it did not wait for anything.
IDLE_PAUSE_S = 0.03
REFERENCE_CACHE_ROWS = 64  # decoded: 3 pictures each
INDEX_COLUMNS = ["source", "clip_id", "frame_index", "split"]


class DataError(ValueError):
    """The data folders cannot be trained on (no rows, no pose for fine-tuning)."""


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


def epoch_order(index: TripletIndex, seed: int, epoch: int) -> np.ndarray:
    """Row ids of one epoch: row groups permuted, then rows permuted inside windows of groups."""
    rng = np.random.default_rng([seed, epoch])
    starts = index.group_starts
    groups = rng.permutation(len(starts) - 1)
    out = []
    for w in range(0, len(groups), WINDOW_GROUPS):
        rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups[w:w + WINDOW_GROUPS]])
        out.append(rng.permutation(rows))
    return np.concatenate(out)


def sample_seed(seed: int, position: int) -> int:
    """The seed of one sample of the stream: crops, noise, timestep and condition dropout."""
    return int(np.random.SeedSequence([seed, int(position)]).generate_state(1, np.uint32)[0])


def global_positions(local: np.ndarray, rank: int, world: int, batch: int) -> np.ndarray:
    """Worker ``rank``'s local stream positions -> positions in the global stream: micro-batch
    ``c`` of the global stream (``world * batch`` samples) gives slice ``rank`` to this worker, so
    the union over workers of a step is what one worker with ``world * batch`` would take."""
    local = np.asarray(local, np.int64)
    return ((local // batch) * world + rank) * batch + local % batch


class Orders:
    """Epoch orders, computed on demand (the last few kept)."""

    def __init__(self, index: TripletIndex, seed: int):
        self.index, self.seed, self._cache = index, seed, OrderedDict()

    def rows(self, positions: np.ndarray) -> np.ndarray:
        n = len(self.index)
        epochs, offsets = positions // n, positions % n
        out = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            if epoch not in self._cache:
                self._cache[epoch] = epoch_order(self.index, self.seed, int(epoch))
                while len(self._cache) > 3:
                    self._cache.popitem(last=False)
            sel = epochs == epoch
            out[sel] = self._cache[epoch][offsets[sel]]
        return out


def locator_table(index: TripletIndex, orders: Orders, positions: np.ndarray, stage: str, ref_mode: str,
                  seed: int) -> pa.Table:
    """What a map task needs to load the samples at these global stream positions."""
    rows = orders.rows(positions)
    if stage == "pretrain":
        refs = rows  # HAP: each image is its own reference
    elif ref_mode == "first":
        refs = index.first_reference()[rows]
    else:
        refs = index.random_reference(rows, np.array([sample_seed(seed, p) for p in positions]))
    files = np.asarray(index.files, dtype=object)
    return pa.table({
        "position": positions.astype(np.int64),
        "path": files[index.file[rows]], "group": index.group[rows], "row": index.row[rows],
        "ref_path": files[index.file[refs]], "ref_group": index.group[refs], "ref_row": index.row[refs],
    })


# -- the CPU map stage --------------------------------------------------------------------------

_REFERENCES: OrderedDict = OrderedDict()
REFERENCE_COLUMNS = ("foreground", "background", "mask")


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


def _read_rows(path: str, group: int, rows: list[int], columns: list[str]) -> dict[int, dict]:
    table = pq.ParquetFile(path).read_row_group(group, columns=columns)
    return {r: {c: table.column(c)[r].as_py() for c in columns} for r in set(rows)}


def _decode_reference(values: dict) -> dict:
    return {"foreground": decode_picture(values["foreground"]), "background": decode_picture(values["background"]),
            "mask": decode_picture(values["mask"], grayscale=True)}


def _reference(path: str, group: int, row: int, loaded: dict) -> dict:
    """A reference row's decoded pictures. Under ``--ref-mode first`` every sample of a clip has
    the same reference, so decoded references are cached per process: read and decoded once per
    clip, not once per sample."""
    key = (path, group, row)
    if "foreground" in loaded.get(key, {}):  # pre-training: the row is its own reference
        return _decode_reference(loaded[key])
    if key not in _REFERENCES:
        _REFERENCES[key] = _decode_reference(_read_rows(path, group, [row], list(REFERENCE_COLUMNS))[row])
        while len(_REFERENCES) > REFERENCE_CACHE_ROWS:
            _REFERENCES.popitem(last=False)
    _REFERENCES.move_to_end(key)
    return _REFERENCES[key]


def _chw(picture: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(picture.transpose(2, 0, 1)) if picture.ndim == 3 else picture[None]


def load_samples(batch: dict, stage: str, resolution: int, augment: bool, seed: int) -> dict:
    """Locators -> uint8 pictures, cropped alike. A row that fails to decode is kept with
    ``ok = False`` and zero pictures, so the loop can count it and skip it. The work runs at the
    lowest CPU priority (``at_low_priority``)."""
    return at_low_priority(_load_samples, batch, stage, resolution, augment, seed)


def _load_samples(batch: dict, stage: str, resolution: int, augment: bool, seed: int) -> dict:
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
    target_columns = ["image", "pose", "width", "height"]
    if stage == "pretrain":
        target_columns += list(REFERENCE_COLUMNS)
    loaded: dict = {}
    for path, group in {(p, int(g)) for p, g in zip(batch["path"], batch["group"])}:
        rows = [int(r) for p, g, r in zip(batch["path"], batch["group"], batch["row"]) if p == path and g == group]
        for r, values in _read_rows(path, group, rows, target_columns).items():
            loaded[(path, group, r)] = values
    for i in range(n):
        try:
            target = loaded[(batch["path"][i], int(batch["group"][i]), int(batch["row"][i]))]
            ref = _reference(batch["ref_path"][i], int(batch["ref_group"][i]), int(batch["ref_row"][i]), loaded)
            image = decode_picture(target["image"])
            box = crop_box(image.shape[0], image.shape[1], stage, sample_seed(seed, out["position"][i]), augment)
            out["target"][i] = _chw(apply_box(image, box, resolution))
            if stage == "finetune":
                if target["pose"] is None:
                    raise ValueError("the row has no pose picture (preprocessed with --pose none)")
                out["pose"][i] = _chw(apply_box(decode_picture(target["pose"]), box, resolution))
            ref_box = scale_box(box, image.shape[:2], ref["background"].shape[:2])
            out["background"][i] = _chw(apply_box(ref["background"], ref_box, resolution))
            out["reference"][i] = _chw(apply_box(ref["foreground"], ref_box, CLIP_SIZE))
            out["reference_mask"][i] = _chw(apply_box(ref["mask"], ref_box, CLIP_SIZE))
            out["ok"][i] = True
        except Exception:  # noqa: BLE001 - any undecodable row is skipped and counted, never fatal
            for key in ("target", "background", "pose", "reference", "reference_mask"):
                out[key][i] = 0
    return out


def idle_pause_callback():
    """A Ray Data execution callback that rests the scheduling loop when it is idle, or None
    where this Ray lacks the callback interface (then the loop runs as Ray ships it).

    Why: while the consumer holds the stream back (the model is slower than decoding, the normal
    case), Ray Data's scheduling loop polls without pausing (ray-project/ray#65060). On a
    machine with few cores that is most of a core taken from the model. A step that blocked
    waiting for a decode task spent little CPU for its wall time and is left alone; a step that
    spent its whole interval on the CPU was polling, and the loop rests ``IDLE_PAUSE_S``. The
    prefetched blocks cover the pause many times over."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:
        return None

    class IdlePause(ExecutionCallback):
        def __init__(self):
            self._last = None

        def on_execution_step(self, executor) -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            if self._last is not None and cpu - self._last[1] > 0.5 * (wall - self._last[0]):
                time.sleep(IDLE_PAUSE_S)
            self._last = (time.perf_counter(), time.thread_time())

    return IdlePause


# -- the stream a worker trains on ----------------------------------------------------------------

class SampleStream:
    """Micro-batches of exactly ``batch`` decodable samples from this worker's share of the stream.

    ``position`` counts this worker's stream items consumed so far (skipped ones included, rows
    already fetched but not yet used excluded): a checkpoint stores it and a resume restarts there.
    """

    def __init__(self, index: TripletIndex, *, stage: str, ref_mode: str, resolution: int, augment: bool,
                 seed: int, batch: int, rank: int = 0, world: int = 1, position: int = 0,
                 data_cpus: float = 0.25, data_tasks: int = 2, prefetch_batches: int = 2, device=None):
        self.index, self.stage, self.ref_mode = index, stage, ref_mode
        self.resolution, self.augment, self.seed = resolution, augment, seed
        self.batch, self.rank, self.world = batch, rank, world
        self.position, self.skipped = position, 0
        self.data_cpus, self.data_tasks = data_cpus, data_tasks
        self.prefetch_batches, self.device = prefetch_batches, device
        self._orders = Orders(index, seed)
        self._blocks = self._stream()
        self._block, self._offset, self._bad_run = None, 0, 0

    @property
    def samples_per_task(self) -> int:
        """Samples per decode task: whole micro-batches, about ``SAMPLES_PER_TASK`` of them."""
        return self.batch * max(1, round(SAMPLES_PER_TASK / self.batch))

    @property
    def prefetch_blocks(self) -> int:
        """``prefetch_batches`` micro-batches, in decode-task outputs (at least one)."""
        return max(1, -(-self.prefetch_batches * self.batch // self.samples_per_task))

    def _configure(self, context) -> None:
        """Settings of this stream's own Ray Data context (a copy: nothing else in the process
        sees them). Blocks in order: resume and the workers' shares depend on it. A bound on how
        far Ray Data decodes ahead: by default it fills its object-store budget (a whole chunk),
        competing with the model for the CPU; a few blocks beyond the loop's prefetch are enough.
        And the idle pause of its scheduling loop."""
        per_sample = 3 * self.resolution ** 2 * 3 + 4 * CLIP_SIZE ** 2
        blocks = self.prefetch_blocks + 2 * self.data_tasks + 1
        context.enable_progress_bars = False  # the trainer has its own progress
        options = context.execution_options
        options.preserve_order = True  # the stream's order is part of the run's determinism
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=blocks * self.samples_per_task * per_sample)
        pause = idle_pause_callback()
        if pause is not None:
            context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, pause]

    def _dataset(self, start: int, stop: int):
        import ray

        local = np.arange(start, stop, dtype=np.int64)
        table = locator_table(self.index, self._orders, global_positions(local, self.rank, self.world, self.batch),
                              self.stage, self.ref_mode, self.seed)
        per_task = self.samples_per_task
        blocks = [table.slice(i, per_task) for i in range(0, table.num_rows, per_task)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            load_samples, batch_size=None, batch_format="numpy", num_cpus=self.data_cpus, concurrency=self.data_tasks,
            fn_kwargs=dict(stage=self.stage, resolution=self.resolution, augment=self.augment, seed=self.seed),
        )
        self._configure(dataset.context)
        return dataset

    def _stream(self):
        start = self.position
        while True:
            stop = start + CHUNK_BATCHES * self.batch
            for block in self._dataset(start, stop).iter_torch_batches(
                batch_size=None, prefetch_batches=self.prefetch_blocks, device=self.device or "cpu",
            ):
                yield block
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
                self._block, self._offset = next(self._blocks), 0
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
