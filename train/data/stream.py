"""The stream a worker trains on: ``SampleStream`` plans read tasks over its share of the order
and runs the read and decode stages through Ray Data."""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
import warnings
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from disco.train.data.decode import decode_samples
from disco.train.data.index import REFERENCE_COLUMNS, TARGET_COLUMNS, DataError, TripletIndex, damaged_shard
from disco.train.data.order import WINDOW_GROUPS, StreamPlan, global_positions, locator_table
from disco.train.data.read import REFERENCE_STORE_BYTES, REFERENCE_STORE_NAMESPACE, ReferenceStore, read_samples
from disco.train.data.watch import STALL_TIMEOUT_S, STARTUP_TIMEOUT_S, Watch, stream_callback


# How long closing a stream waits for the next chunk's start in the background before leaving it
# (one stuck waiting for CPUs ends by its start-up watch).
CLOSE_WAIT_S = 5.0
CHUNK_BATCHES = 256  # at least this many micro-batches of read tasks per Ray Data execution; chained
# Samples one decode task loads. Ray Data costs a few ms of driver and worker CPU per task
# whatever its size; per micro-batch of 4 that was as much CPU as the decoding itself.
SAMPLES_PER_BLOCK = 32
# The worker threads of Ray Data's batch iterator (ray.data._internal.block_batching.util).
RAY_DATA_ITERATOR_THREADS = "iter_threaded"



def _on_this_node() -> dict:
    """The data tasks' scheduling: on this worker's node, or another where it has no room now.
    Ray Data spreads small tasks over the cluster: each worker's reads and decodes ran on any node,
    taking CPUs planned for the workers there, and every decoded batch crossed the network back.
    A plain soft node affinity would wait for this node's CPUs (a worker given them all would hang
    its own stream), hence Ray's option to spill; where this Ray lacks it, or map_batches no longer
    takes a strategy, Ray Data's own placement as before."""
    import inspect

    import ray
    from ray.data import Dataset
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    takes_strategy = any(p.kind is inspect.Parameter.VAR_KEYWORD
                         for p in inspect.signature(Dataset.map_batches).parameters.values())
    if not takes_strategy or "_spill_on_unavailable" not in inspect.signature(NodeAffinitySchedulingStrategy).parameters:
        return {}
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)}


# The reference stores this process started or joined (the last few), by name, held beyond the
# streams that use them: Ray ends an actor when its creator's handles are gone, and a stream made
# again in the same worker (a stream start retried) would otherwise lose, with the first stream,
# the store of every worker.
_STORES: dict = {}  # by name, oldest first
KEPT_STORES = 4  # a worker's training and held-out streams need two


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
    which resource it waits for; one that delivered blocks and then none for ``stall_timeout_s``
    (default ``STALL_TIMEOUT_S``) while its consumer waits, that it stalled.
    """

    clip_frames = 1  # frames cropped alike (ClipStream, train/data/clips.py: one crop per clip)

    def __init__(self, index: TripletIndex, *, stage: str, ref_mode: str, resolution: int, augment: bool,
                 seed: int, batch: int, rank: int = 0, world: int = 1, position: int = 0, shards: int | None = None,
                 data_cpus: float = 0.25, data_tasks: int = 2, prefetch_batches: int = 2, device=None,
                 startup_timeout_s: float | None = None, pose_render: dict | None = None,
                 stall_timeout_s: float | None = None):
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
        # train/data/pose.py ``render_plan``: the files whose pose pictures are drawn from keypoints.
        self.pose_render = pose_render
        self.startup_timeout_s = STARTUP_TIMEOUT_S if startup_timeout_s is None else startup_timeout_s
        self.stall_timeout_s = STALL_TIMEOUT_S if stall_timeout_s is None else stall_timeout_s
        self._plan = StreamPlan(index, seed, shards, batch * world)
        self._first_shard = rank * (shards // world)
        self._first_references = index.first_reference() if stage == "finetune" and ref_mode == "first" else None
        self._store = None  # (name, handle) of the data set's ReferenceStore, once started
        self._iterator_threads: list[threading.Thread] = []  # Ray Data's, of this stream's executions
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
            # A list column (the keypoints) is stored as its leaf column ("name.list.element").
            return (sum(row_group.column(i).total_compressed_size for name, i in index.items()
                        if name.split(".")[0] in columns), footer, row_group.num_rows)

        start = self.position
        while counts["samples"] < samples:
            end = self.task_end(start)
            spec = self.locators(start, end).to_pydict()
            keys = list(zip(spec["path"], spec["group"]))
            uses = defaultdict(int)
            for key in keys:
                uses[key] += 1
            for (path, group), used in uses.items():
                nbytes, footer, rows = chunks(path, group, self._read_columns())
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

    def _read_columns(self) -> tuple[str, ...]:
        """The columns the read tasks read of a sample's row group (``read_samples``)."""
        if self.stage == "finetune" and self.pose_render is not None:
            from disco.pipeline.store.pose import KEYPOINT_COLUMNS

            return (*TARGET_COLUMNS[self.stage], *KEYPOINT_COLUMNS)
        return TARGET_COLUMNS[self.stage]

    # -- Ray Data -----------------------------------------------------------------------------------

    def _configure(self, context, watch: Watch) -> None:
        """Settings of this stream's own Ray Data context (a copy: nothing else in the process
        sees them). Blocks in order: resume and the workers' shares depend on it. A bound on how
        far Ray Data decodes ahead: by default it fills its object-store budget (a whole chunk),
        competing with the model for the CPU; a few blocks beyond the loop's prefetch are enough,
        plus the encoded windows of the read tasks (per execution: while the next chunk starts,
        two executions hold a budget each). And the start-up watch and idle pause of its
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
        callback = stream_callback(watch)
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
            # One store per job: it lives as long as the worker that started it, so a store shared
            # with another run on the same data would die with that run, leaving this one without.
            # Named by the files' paths, not stat-ed (30K shards on NFS, by every worker at once):
            # its rows are keyed by their file's version (``read._encoded_references``).
            files = "\0".join(self.index.files)
            name = (f"references-{hashlib.sha256(files.encode()).hexdigest()[:24]}-"
                    f"{ray.get_runtime_context().get_job_id()}")
            try:
                if name not in _STORES:
                    _STORES[name] = ray.remote(num_cpus=0)(ReferenceStore).options(
                        name=name, namespace=REFERENCE_STORE_NAMESPACE, get_if_exists=True,
                        scheduling_strategy="DEFAULT").remote(REFERENCE_STORE_BYTES)
                    while len(_STORES) > KEPT_STORES:  # a long-lived process (a notebook) lets old ones go
                        _STORES.pop(next(iter(_STORES)))
                self._store = name, _STORES[name]
            except Exception:  # noqa: BLE001 - the store only saves reads
                self._store = None, None
        return self._store[0]

    def _dataset(self, tasks: list[tuple[int, int]], watch: Watch):
        import ray

        specs = [self.locators(start, stop) for start, stop in tasks]
        here = _on_this_node()
        with warnings.catch_warnings():
            # Ray 2.60 calls a task's scheduling strategy a deprecated argument of map_batches and
            # has no other way to prefer a node without waiting for it (``_on_this_node``).
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = (
                ray.data.from_blocks(specs)
                # Two stages that Ray Data does not fuse (their CPU requests differ): fused, each task
                # would read and decode a whole window, and as blocks stay in order the next window's
                # task could not decode ahead of it.
                .map_batches(read_samples, batch_size=None, batch_format="pyarrow", num_cpus=0,
                             compute=ray.data.TaskPoolStrategy(size=1),
                             fn_kwargs=dict(stage=self.stage, block=self.samples_per_block,
                                            store=self._reference_store(), pose_render=self.pose_render), **here)
                .map_batches(decode_samples, batch_size=None, batch_format="pyarrow", num_cpus=self.data_cpus,
                             compute=ray.data.TaskPoolStrategy(size=self.data_tasks),
                             fn_kwargs=dict(stage=self.stage, resolution=self.resolution, augment=self.augment,
                                            seed=self.seed, pose_render=self.pose_render,
                                            clip_frames=self.clip_frames), **here)
            )
        self._configure(dataset.context, watch)
        return dataset

    def _chunk_tasks(self, start: int) -> tuple[list[tuple[int, int]], int]:
        """The read tasks of the Ray Data execution that starts at stream item ``start``, and where
        it stops."""
        tasks, stop = [], start
        while not tasks or stop - start < CHUNK_BATCHES * self.batch:
            end = self.task_end(stop)
            tasks.append((stop, end))
            stop = end
        return tasks, stop

    def _chunk(self, tasks: list[tuple[int, int]], watch: Watch):
        """The decoded blocks of one Ray Data execution, with its own start-up watch (two
        executions overlap at a chunk's end)."""
        try:
            before = {thread.ident for thread in threading.enumerate()}
            for block in self._dataset(tasks, watch).iter_torch_batches(
                batch_size=None, prefetch_batches=self.prefetch_blocks, device=self.device or "cpu",
            ):
                watch.waiting_since = None
                if not watch.delivered:  # its iterator's threads start with the first block
                    self._iterator_threads = [t for t in self._iterator_threads if t.is_alive()] + [
                        t for t in threading.enumerate() if t.name == RAY_DATA_ITERATOR_THREADS and t.ident not in before]
                watch.delivered = True
                watch.blocks += 1
                yield block
                watch.waiting_since = time.monotonic()  # the consumer asks for the next one (the stall watch)
        except Exception as exc:
            if watch.error is not None:
                raise DataError(watch.error) from None
            damaged = damaged_shard(exc)
            if damaged is not None:
                raise damaged from None
            raise

    def _stream(self):
        """Every block of the stream, one Ray Data execution (chunk) after another. Each
        execution's start (a new executor, a window read, a block decoded: about half a second
        on two cores; at an epoch's start also the epoch's plan) would stall the consumer once per
        chunk, and under DDP every rank's stall (each at its own step) holds up the whole group:
        the next chunk starts in the background while the last blocks of the current one are
        consumed. Only one chunk starts at a time, and the consumer touches neither the read plan
        nor its caches while it does."""
        current, following = _Chunk(self, self.position), None
        try:
            while True:
                for block in current:
                    # Started while the consumer still has twice Ray Data's prefetch to go.
                    if following is None and current.remaining <= 2 * self.prefetch_blocks * self.samples_per_block:
                        following = _Chunk(self, current.stop, background=True)
                    yield block
                current, following = following or _Chunk(self, current.stop), None
        finally:
            try:
                current.close()
            finally:
                if following is not None:
                    following.close()

    def close(self) -> None:
        """Stop the running Ray Data execution (its prefetching tasks) now, not at interpreter exit,
        and wait (up to ``CLOSE_WAIT_S``) for the threads of Ray Data's batch iterator to end.

        Closed early, the iterator only tells its worker threads to stop once its generators are
        collected, and they sit in reference cycles; a worker still dropping a block reference
        while Ray shuts down (the user's ``ray.shutdown()`` after the run, or the one at
        interpreter exit) ends the whole process with exit code 1 ("The core worker has already
        been shutdown"): a finished run reported as failed."""
        blocks, self._blocks = self._blocks, _closed()
        blocks.close()
        del blocks
        if any(thread.is_alive() for thread in self._iterator_threads):
            gc.collect()
        deadline = time.monotonic() + CLOSE_WAIT_S
        for thread in self._iterator_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._iterator_threads = [thread for thread in self._iterator_threads if thread.is_alive()]

    # -- skipping what does not decode ---------------------------------------------------------------

    def _usable(self, block: dict):
        """Which items of a decoded block training takes (a bool tensor): here the ones that
        decoded; the others are skipped and counted (``skipped``) and the micro-batch filled from
        the items after them (``ClipStream`` takes whole clips only)."""
        return block["ok"]

    @property
    def _epoch_items(self) -> int:
        """Stream items of one epoch of this worker's shards: this many unusable items in a row and
        none will ever do. Its own shards only: sized by the whole data set, a rank whose rows
        all fail walked ``world`` epochs of its shards without a batch while the other ranks
        waited in the all-reduce (past NCCL's timeout, on a large data set)."""
        mine = self._plan.sizes[self._first_shard:self._first_shard + self.shards // self.world]
        return max(1, int(len(mine) * mine.max()))

    def _nothing_decodes(self) -> DataError:
        return DataError(f"no row decodes: {self._bad_run} in a row failed (corrupt pictures, or no pose for "
                         "fine-tuning)")

    def next_batch(self) -> dict:
        """The next ``batch`` decodable samples, as torch tensors (uint8 pictures): an item that
        does not decode is skipped (counted in ``skipped``, and in ``position`` as consumed) and
        the items after it fill its place, so every worker gets a whole micro-batch each step."""
        import torch

        parts, need = [], self.batch
        while need:
            if self._block is None or self._offset >= len(self._block["position"]):
                self._block, self._offset = {k: v[0] for k, v in next(self._blocks).items()}, 0
                self.read_bytes += int(self._block.pop("read_bytes").sum())
                self.reference_bytes += int(self._block.pop("reference_bytes").sum())
                self._block["ok"] = self._usable(self._block)
            ok = self._block["ok"][self._offset:]
            taken = torch.cumsum(ok.to(torch.int64), 0)
            hits = torch.nonzero(taken == need)
            end = self._offset + (int(hits[0]) + 1 if len(hits) else len(ok))
            rows = slice(self._offset, end)
            keep = self._block["ok"][rows]
            parts.append({k: v[rows][keep] for k, v in self._block.items()})
            self.skipped += int((~keep).sum())
            self._bad_run = 0 if keep.any() else self._bad_run + int((~keep).sum())
            if self._bad_run > self._epoch_items:  # a whole epoch without one usable sample
                raise self._nothing_decodes()
            need -= int(keep.sum())
            self.position += end - self._offset
            self._offset = end
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


_END = object()


def _closed():
    """A closed stream's blocks: none (a generator, so that closing it again is a no-op)."""
    return
    yield


class _Chunk:
    """One Ray Data execution of ``stream``'s items from ``start`` on: its read tasks planned and
    its execution started, with ``background`` in a thread of its own that also fetches its first
    block (the consumer joins that thread before it reads the chunk). ``stop``: where the next
    chunk starts; ``remaining``: items still to come from this one, as it is consumed."""

    def __init__(self, stream: SampleStream, start: int, background: bool = False):
        self.watch = Watch(stream.startup_timeout_s, stream.data_cpus, stream.stall_timeout_s)
        self._stream, self.start, self.stop = stream, start, None
        self._blocks, self._first, self._error, self._thread = None, _END, None, None
        if background:
            self._thread = threading.Thread(target=self._begin, args=(True,), name="disco-next-chunk", daemon=True)
            self._thread.start()
        else:
            self._begin(False)
            if self._error is not None:
                raise self._error

    def _begin(self, fetch: bool) -> None:
        try:
            tasks, self.stop = self._stream._chunk_tasks(self.start)
            self.remaining = self.stop - self.start
            if self.watch.cancelled:  # closed while planning: nothing starts
                return
            self._blocks = self._stream._chunk(tasks, self.watch)
            if fetch:
                self._first = next(self._blocks)
        except StopIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer's thread instead
            self._error = exc

    def __iter__(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        blocks = self._blocks if self._first is _END else itertools.chain([self._first], self._blocks)
        self._first = _END
        for block in blocks:
            self.remaining -= len(block["position"][0])  # a block is one row of list columns
            yield block

    def close(self) -> None:
        """Stops the execution; one starting in the background is told to stop (its watch) and
        waited for up to ``CLOSE_WAIT_S`` (a Ray without execution callbacks cannot be told)."""
        if self._thread is not None:
            if self._thread.is_alive():  # still starting: a started one closes as the current one does
                self.watch.cancelled = True
            self._thread.join(CLOSE_WAIT_S)
            if self._thread.is_alive():
                return
        if self._blocks is not None:
            self._blocks.close()
