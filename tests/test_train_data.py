"""The training data stream: its order and data shards, what it reads, and how it behaves on a
cluster with few free CPUs (``disco.train.data``). The data here is written directly with the
pipeline's Parquet writer (small synthetic pictures), so no preprocessing runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from disco.pipeline.store.encode import encode_png
from disco.pipeline.store.schema import TRIPLET_SCHEMA
from disco.pipeline.store.shards import write_parquet_atomic
from disco.train.data import (
    WINDOW_GROUPS,
    DataError,
    SampleStream,
    StreamPlan,
    build_index,
    epoch_order,
    epoch_plan,
    global_positions,
)

SIDE = 16


def write_triplets(folder: Path, clip_frames: list[int], *, row_group_rows: int, shard_rows: int,
                   noise: bool = False) -> Path:
    """A preprocess-like output folder: clip ``c``'s frame ``f`` has an image of colour (c, f, 7)
    (so a decoded sample names its row) and a background of (7, f, c); with ``noise``, random
    pictures of realistic (incompressible) size instead."""
    rng = np.random.default_rng(0)
    rows = []
    for clip, frames in enumerate(clip_frames):
        for f in range(frames):
            if noise:
                image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
            else:
                image = np.full((SIDE, SIDE, 3), (clip, f, 7), np.uint8)
            rows.append(dict(
                sample_id=f"video/c{clip}/{f:06d}", source="video", clip_id=f"c{clip}", frame_index=f,
                timestamp_s=f / 30, split="train", input_path=f"c{clip}.mp4", width=SIDE, height=SIDE,
                image=encode_png(image), mask=encode_png(np.full((SIDE, SIDE), 200, np.uint8)),
                foreground=encode_png(image), background=encode_png(image[..., ::-1].copy()), pose=encode_png(image),
                body_keypoints=[0.0] * 54, hand_keypoints=None, face_keypoints=None, person_score=1.0,
                person_count=1, mask_area=0.5))
    out = folder / "triplets"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), shard_rows):
        table = pa.Table.from_pylist(rows[i:i + shard_rows], schema=TRIPLET_SCHEMA)
        write_parquet_atomic(table, out / f"shard-{i // shard_rows:05d}.parquet", row_group_rows)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """39 frames of 4 clips in row groups of 4 rows (10 groups) over 3 files."""
    return write_triplets(tmp_path_factory.mktemp("clips"), [10, 7, 13, 9], row_group_rows=4, shard_rows=16)


def _stream(index, **options) -> SampleStream:
    settings = dict(stage="finetune", ref_mode="first", resolution=SIDE, augment=False, seed=3, batch=4)
    settings.update(options)
    return SampleStream(index, **settings)


def _batches(index, count: int, **options) -> list[dict]:
    stream = _stream(index, **options)
    try:
        return [stream.next_batch() for _ in range(count)]
    finally:
        stream.close()


# -- the order (no Ray) ----------------------------------------------------------------------------

def test_every_row_once_per_epoch_over_the_shards_in_windows_of_a_few_row_groups(clips):
    index = build_index([str(clips)])
    groups = len(index.group_starts) - 1
    group_of = np.repeat(np.arange(groups), np.diff(index.group_starts))
    for shards in (1, 2, 3, 8, 39):
        plan = epoch_plan(index, 5, 2, shards)
        every = np.concatenate(plan.rows)
        assert sorted(every.tolist()) == list(range(len(index))), shards
        assert max(len(r) for r in plan.rows) - min(len(r) for r in plan.rows) <= 1
        for rows, windows in zip(plan.rows, plan.windows):
            sizes = [len(set(group_of[rows[a:b]])) for a, b in pairwise(windows)]
            assert max(sizes) <= WINDOW_GROUPS and max(sizes) - min(sizes) <= 1  # balanced: no lone tail group
    # One shard is the windowed epoch order: row groups permuted, rows permuted in windows.
    assert np.array_equal(epoch_order(index, 5, 2), epoch_plan(index, 5, 2, 1).rows[0])
    assert not np.array_equal(epoch_order(index, 5, 2), epoch_order(index, 5, 3))
    # The global stream: each shard's stream goes through its epochs in turn.
    plan = StreamPlan(index, 5, 3, 12)
    for epoch in range(3):
        shard, sample = plan.locate(np.arange(0, 12 * 20))
        rows = plan.rows(np.arange(0, 12 * 20))
        for s in range(3):
            size = int(plan.sizes[s])
            mine = rows[(shard == s) & (sample // size == epoch)]
            assert np.array_equal(np.sort(mine), np.sort(plan.epoch(epoch).rows[s]))


def test_clip_ids_number_the_clips_as_sorted_keys(clips):
    """The index numbers clips by their sorted (folder, source, clip) keys, now in Arrow: the same
    numbers as the per-row NumPy keys it replaced (a resumed run's order depends on them)."""
    import pyarrow.dataset as pads

    index = build_index([str(clips), str(clips)])  # the same rows twice: two folders, two clips each
    keys = []
    for folder_id, folder in enumerate([clips, clips]):
        table = pads.dataset(sorted((folder / "triplets").glob("*.parquet")), format="parquet").to_table()
        keys += [f"{folder_id}\x00{s}/{c}" for s, c in zip(table["source"].to_pylist(), table["clip_id"].to_pylist())]
    _, expected = np.unique(np.array(keys, dtype=object), return_inverse=True)
    assert np.array_equal(index.clip, expected) and index.clip.max() == 7


def test_the_index_is_read_by_several_threads_and_kept_in_the_shards_order(clips, tmp_path, monkeypatch):
    """The shards' index columns are read concurrently (on NFS, one shard after another took
    minutes at 30 K shards), the first shards' reads ending last here: the index is the one read
    in order, row by row, from every shard of both folders."""
    import threading
    import time

    import pyarrow.parquet as pq

    from disco.train.data import index as index_module

    more = write_triplets(tmp_path / "more", [5, 6, 4, 9, 3], row_group_rows=2, shard_rows=3)
    folders = [str(clips), str(more)]
    shards = [str(p) for f in folders for p in sorted((Path(f) / "triplets").glob("*.parquet"))]
    real, threads = index_module._index_part, set()

    def late_first(path, folder_id, split):
        threads.add(threading.current_thread().name)
        time.sleep(0.05 * (len(shards) - shards.index(path)) / len(shards))  # the first ends last
        return real(path, folder_id, split)

    monkeypatch.setattr(index_module, "_index_part", late_first)
    index = build_index(folders)
    assert len(threads) > 1 and all(name.startswith("disco-index") for name in threads)
    assert index.files == shards
    expected = []
    for file_id, path in enumerate(shards):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            frames = parquet.read_row_group(group, columns=["frame_index"]).column("frame_index").to_pylist()
            expected += [(file_id, group, row, frame) for row, frame in enumerate(frames)]
    assert list(zip(index.file.tolist(), index.group.tolist(), index.row.tolist(), index.frame.tolist())) == expected
    assert len(index) == 39 + 27 and index.clip.max() == 4 + 5 - 1


def test_data_shards_must_fit_the_workers_and_the_data(clips):
    index = build_index([str(clips)])
    with pytest.raises(DataError, match="3 data shards cannot be shared evenly by 2 workers"):
        _stream(index, batch=2, world=2, shards=3)
    with pytest.raises(DataError, match="batch size \\(3\\) must be a multiple of 2"):
        _stream(index, batch=3, world=2, shards=4)
    with pytest.raises(DataError, match="39 training rows cannot fill 40 data shards"):
        _stream(index, batch=1, world=40)


def test_a_worker_reads_only_the_row_groups_of_its_own_shard(clips):
    index = build_index([str(clips)])
    starts = index.group_starts[:-1]
    group_id = {(index.files[index.file[r]], int(index.group[r])): g for g, r in enumerate(starts)}
    group_of = np.repeat(np.arange(len(starts)), np.diff(index.group_starts))
    plan = StreamPlan(index, 3, 2, 4)
    for rank in range(2):
        stream = _stream(index, batch=2, rank=rank, world=2)
        size = int(plan.sizes[rank])

        def windows(epoch: int, shard: int = rank) -> set[int]:
            return set(plan.epoch(epoch).windows[shard].tolist())

        start = 0
        while start < 3 * size:  # three epochs of this worker's shard, task by task
            end = stream.task_end(start)
            # Whole windows (several while they hold fewer than a block of samples), of this shard only.
            assert start % size in windows(start // size) and end % size in windows(end // size)
            table = stream.locators(start, end)
            read = {group_id[key] for key in zip(table.column("path").to_pylist(), table.column("group").to_pylist())}
            assert read <= {int(g) for e in range(start // size, (end - 1) // size + 1)
                            for g in group_of[plan.epoch(e).rows[rank]]}
            start = end
        stream.close()


# -- what the stream reads (Ray) ---------------------------------------------------------------------

@pytest.mark.usefixtures("ray_local")
def test_one_worker_with_two_shards_sees_what_two_workers_see(clips):
    index = build_index([str(clips)])
    whole = _batches(index, 25, batch=4, shards=2)  # 100 samples: more than 2 epochs
    halves = [_batches(index, 25, batch=2, rank=r, world=2) for r in range(2)]
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][i]["position"], halves[1][i]["position"]]), batch["position"])
        assert torch.equal(torch.cat([halves[0][i]["target"], halves[1][i]["target"]]), batch["target"])
        assert np.array_equal(batch["position"].numpy(), global_positions(np.arange(4 * i, 4 * i + 4), 0, 1, 4))
    # The samples are the rows the plan names: clip and frame are in the image's colour, and the
    # background is cut from the clip's first frame's image (clip, 0, 7).
    plan = StreamPlan(index, 3, 2, 4)
    positions = torch.cat([b["position"] for b in whole]).numpy()
    rows = plan.rows(positions)
    colours = torch.cat([b["target"] for b in whole])[:, :, 0, 0].numpy()
    assert np.array_equal(colours[:, 0], index.clip[rows]) and np.array_equal(colours[:, 1], index.frame[rows])
    backgrounds = torch.cat([b["background"] for b in whole])[:, :, 0, 0].numpy()
    assert (backgrounds[:, 1] == 0).all() and np.array_equal(backgrounds[:, 0], index.clip[rows])
    # A micro-batch mixes clips: over the run, most batches hold frames of more than one clip.
    mixed = [len(set(index.clip[plan.rows(b["position"].numpy())])) > 1 for b in whole]
    assert sum(mixed) >= 0.8 * len(mixed)


@pytest.mark.usefixtures("ray_local")
def test_the_next_ray_data_execution_starts_before_the_current_one_runs_out(clips, monkeypatch):
    """The stream is a chain of Ray Data executions (chunks); each one's start stalled the consumer
    (about a second on two cores; under DDP every rank at its own step). The next starts in the
    background while the current one's last blocks are consumed, and the samples are those of
    one long execution."""
    import disco.train.data.stream as stream_module

    index = build_index([str(clips)])
    whole = _batches(index, 25)  # 100 samples in one execution
    events, chunk = [], stream_module.SampleStream._chunk

    def logged(self, *args):
        k = sum(event == "started" for event, _ in events)
        events.append(("started", k))
        yield from chunk(self, *args)
        events.append(("done", k))

    monkeypatch.setattr(stream_module, "CHUNK_BATCHES", 1)  # a chunk is one read task: 32-40 samples
    monkeypatch.setattr(stream_module.SampleStream, "_chunk", logged)
    chained = _batches(index, 25)
    assert all(torch.equal(a["position"], b["position"]) and torch.equal(a["target"], b["target"])
               for a, b in zip(whole, chained))
    started = [k for event, k in events if event == "started"]
    assert len(started) >= 3 and ("done", 1) in events
    for k in started[1:]:  # (the last one the consumer was still in when the stream closed: no "done")
        done = events.index(("done", k - 1)) if ("done", k - 1) in events else len(events)
        assert events.index(("started", k)) < done, events


@pytest.mark.usefixtures("ray_local")
def test_bytes_read_per_sample_used_stay_near_one(tmp_path):
    """Reads counted at the file (world 1, through Ray) and by the read plan (worlds 1, 2, 8):
    the row groups' needed column chunks, each read about once per epoch."""
    folder = write_triplets(tmp_path / "noise", [48] * 8, row_group_rows=8, shard_rows=128, noise=True)
    index = build_index([str(folder)])
    n = len(index)
    stream = _stream(index, batch=4, data_cpus=0.5)
    try:
        for _ in range(n // 4):  # one epoch
            stream.next_batch()
        planned = _stream(index, batch=4).planned_reads(n)
        used = stream.position
        assert planned["needed_bytes"] * 0.99 < planned["target_bytes"] < 1.2 * planned["needed_bytes"]
        # Every read task whose blocks were handed out: about one epoch of row groups, footers and
        # the 8 clips' reference rows on top.
        assert stream.read_bytes < 1.5 * planned["needed_bytes"] * used / planned["samples"] + \
            planned["footer_bytes"] * 2
        assert 0 < stream.reference_bytes <= 2 * planned["reference_bytes"]
    finally:
        stream.close()
    # A clip's reference row is read once: another stream of the data set (another worker) finds
    # it in the cluster's ReferenceStore or this process's cache.
    again = _stream(index, batch=4, data_cpus=0.5, seed=9)
    try:
        for _ in range(n // 4):
            again.next_batch()
        assert again.reference_bytes == 0 and again.read_bytes > 0
    finally:
        again.close()
    for world in (2, 8):
        shares = [_stream(index, batch=4, rank=r, world=world).planned_reads(n // world) for r in range(world)]
        read = sum(s["target_bytes"] for s in shares)
        needed = sum(s["needed_bytes"] for s in shares)
        assert read < 1.5 * needed, (world, read / needed)


OTHER_RUN = textwrap.dedent("""
    import sys
    import ray
    from ray._private import ray_constants

    from disco.train.data import SampleStream, build_index

    ray_constants.ENABLE_RAY_CLUSTER = False  # on loopback, as pipeline.cluster.init_ray
    ray.init(address=sys.argv[2], _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    stream = SampleStream(build_index([sys.argv[1]]), stage="finetune", ref_mode="first", resolution=16,
                          augment=False, seed=0, batch=4)
    stream.next_batch()
    print(stream._reference_store(), flush=True)
    sys.stdin.readline()  # until the other run's stream has found its store
    stream.close()
    ray.shutdown()
""")


@pytest.mark.usefixtures("ray_local")
def test_a_run_keeps_its_reference_store_when_another_run_on_the_same_data_ends(tmp_path):
    """The store of a data set's reference rows lives as long as the process that started it.
    Two runs on the same data (a sweep on one cluster) shared one: when the first ended, the
    second's reads lost it for the rest of the run (every reference row group read again, about
    64x the row). Each job has its own."""
    import ray

    from disco.train.data.read import REFERENCE_STORE_NAMESPACE

    # Data of its own: the module's other streams (this job's, like ours) name their store by the
    # module's clips, and one of them going out of scope ends it.
    clips = write_triplets(tmp_path / "clips", [10, 7, 13], row_group_rows=4, shard_rows=16)
    other = subprocess.Popen([sys.executable, "-c", OTHER_RUN, str(clips), ray.get_runtime_context().gcs_address],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_ADDRESS": ""})
    try:
        theirs = other.stdout.readline().strip()
        assert theirs.startswith("references-"), other.stderr.read()[-3000:] if other.poll() is not None else theirs
        index = build_index([str(clips)])
        stream = _stream(index)
        try:
            stated: list[str] = []  # naming the store stats no shard (30K on NFS, by every worker at once)
            real_stat = os.stat
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(os, "stat", lambda path, *a, **k: (stated.append(str(path)), real_stat(path, *a, **k))[1])
                ours = stream._reference_store()
            assert ours and not set(stated) & set(index.files)
            stream.next_batch()
            assert ray.get(ray.get_actor(theirs, namespace=REFERENCE_STORE_NAMESPACE).get.remote([]), timeout=30) == {}
            other.stdin.write("\n")
            other.stdin.flush()
            assert other.wait(timeout=120) == 0, other.stderr.read()[-3000:]
            assert ray.get(ray.get_actor(ours, namespace=REFERENCE_STORE_NAMESPACE).get.remote([]), timeout=30) == {}
            assert ours != theirs
        finally:
            stream.close()
    finally:
        if other.poll() is None:
            other.kill()


@pytest.mark.usefixtures("ray_local")
def test_closing_a_stream_ends_the_threads_of_ray_datas_iterator(clips):
    """Ray Data's batch iterator, closed early, leaves its worker threads running until its
    generators are collected; one of them dropping a block reference while Ray shuts down (the
    ``ray.shutdown()`` at interpreter exit) ended a finished run's process with exit code 1 (the
    other run of the test above did, in CI). Closing the stream ends them."""
    import threading

    from disco.train.data.stream import RAY_DATA_ITERATOR_THREADS

    before = {thread.ident for thread in threading.enumerate()}
    stream = _stream(build_index([str(clips)]))
    stream.next_batch()
    started = [t for t in threading.enumerate() if t.ident not in before and t.name == RAY_DATA_ITERATOR_THREADS]
    assert started  # the iterator this test is about runs in threads of that name
    stream.close()
    assert [t.name for t in started if t.is_alive()] == []
    stream.close()  # again: nothing left to stop

# -- scheduling ---------------------------------------------------------------------------------------

STARVED = textwrap.dedent("""
    import sys, time
    import ray
    from ray._private import ray_constants

    from disco.train.data import DataError, SampleStream, build_index

    # On loopback only: Linux Ray moves a 127.0.0.1 node to the interface address unless its
    # multi-node switch is off (as pipeline.cluster.init_ray does).
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=1.5)
    class Hog:
        def ready(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    index = build_index([sys.argv[1]])
    options = dict(stage="finetune", ref_mode="first", resolution=16, augment=False, seed=0, batch=4)
    stream = SampleStream(index, data_cpus=0.25, startup_timeout_s=90, **options)
    print("batch", tuple(stream.next_batch()["target"].shape), flush=True)
    stream.close()
    # The closed stream's decode tasks give their CPUs back first (the message names what is free).
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) != 0.5 and time.monotonic() < deadline:
        time.sleep(0.1)
    stream = SampleStream(index, data_cpus=1.0, startup_timeout_s=2, **options)
    started = time.monotonic()
    try:
        stream.next_batch()
    except DataError as exc:
        print(f"error after {time.monotonic() - started:.0f} s: {exc}", flush=True)
    ray.shutdown()
""")


def test_the_stream_starts_when_few_cpus_are_free_and_fails_in_time_when_none_fit(clips, tmp_path):
    """A local Ray of 2 CPUs with 1.5 of them held by an actor: the stream's tasks ask for at most
    ``data_cpus`` (0.25), so it streams; with ``data_cpus`` 1.0 nothing can run, and the stream
    says so within its start-up timeout instead of waiting forever."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, "-c", STARVED, str(clips)], capture_output=True, text=True,
                            timeout=300, env=env, check=False)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr[-3000:]
    assert lines[0] == f"batch (4, 3, {SIDE}, {SIDE})"
    error = lines[1]
    seconds = int(error.split()[2])
    assert 2 <= seconds < 30, error
    assert re.search(r"the training data stream could not start within 2 s: its decode tasks need 1 CPU each and "
                     r"no node has that free \(free CPU per node: 127\.0\.0\.1 0\.5 of 2\); lower data_cpus", error), error


STALLED = textwrap.dedent("""
    import sys, time
    import numpy as np
    import ray
    from ray._private import ray_constants

    from disco.train.data import DataError, SampleStream, build_index

    ray_constants.ENABLE_RAY_CLUSTER = False  # on loopback only (see STARVED)
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)

    def hung_from_four(batch):  # a read on a mount that stopped answering: the fifth block never comes
        if batch["id"][0] >= 4:
            time.sleep(600)
        return {"position": np.array([[int(batch["id"][0])] * 2])}

    class Stalling(SampleStream):  # the stream's own Ray Data execution, watch and consumer; a data set that hangs
        def _dataset(self, tasks, watch):
            dataset = ray.data.range(8, override_num_blocks=8).map_batches(hung_from_four, batch_size=None, num_cpus=1)
            self._configure(dataset.context, watch)
            return dataset

    stream = Stalling(build_index([sys.argv[1]]), stage="finetune", ref_mode="first", resolution=16, augment=False,
                      seed=0, batch=4, startup_timeout_s=90, stall_timeout_s=3)
    blocks = []
    try:
        while True:
            blocks.append(int(next(stream._blocks)["position"][0, 0]))
            last = time.monotonic()
    except DataError as exc:
        print("blocks", blocks, flush=True)
        print(f"error after {time.monotonic() - last:.0f} s: {exc}", flush=True)
    stream.close()
    ray.shutdown()
""")


def test_a_stream_that_stops_delivering_mid_run_fails_in_time(clips):
    """A read stuck on a hung mount after the stream had started: the worker waited for ever and,
    under DDP, the others in their all-reduce until NCCL's 30-minute time-out, which Ray Train
    blamed on them. A stream whose consumer waits ``stall_timeout_s`` for a block says so."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, "-c", STALLED, str(clips)], capture_output=True, text=True,
                            timeout=300, env=env, check=False)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr[-3000:]
    delivered = json.loads(lines[0].removeprefix("blocks "))  # in order, up to where Ray Data's prefetch waits for block 4
    assert delivered and delivered == list(range(len(delivered))) and len(delivered) < 4, lines[0]
    seconds = int(lines[1].split()[2])  # after the last block
    assert 3 <= seconds < 30, lines[1]
    assert re.search(rf"the training data stream on \S+ delivered no block for 3 s while training waited for one "
                     rf"\(after {len(delivered)} blocks\): a read or decode task is stuck", lines[1]), lines[1]


def test_a_cpu_count_of_0_is_a_value_where_ray_takes_it(clips, tmp_path):
    """``data_cpus: 0`` (Ray accounts no CPU to a decode task) was read as unset (1.0 on a big
    node); ``cpus_per_worker: 0`` is refused without a GPU (Ray Train refuses an empty bundle)."""
    from disco.pipeline.errors import ConfigError
    from disco.train.config import TrainConfig
    from disco.train.launch import _resources

    big = [{"CPU": 64.0, "GPU": 0.0}]
    base = dict(stage="finetune", model="tiny", num_workers=2, data=[str(clips)], output=str(tmp_path / "run"))
    assert _resources(TrainConfig(**base, data_cpus=0), distributed=True, nodes=big) == (1.0, 0)
    assert _resources(TrainConfig(**base), distributed=True, nodes=big) == (1.0, 1.0)
    # GPU workers fit beside their GPUs: 8 workers on a node of 8 GPUs and 4 CPUs asked a whole
    # CPU each from the cluster's total (a 64-CPU node without GPUs beside it) and never started.
    gpu_nodes = [{"CPU": 64.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 8.0}]
    eight = TrainConfig(**{**base, "num_workers": 8}, use_gpu=True)
    assert _resources(eight, distributed=True, nodes=gpu_nodes) == (0.25, 1.0)
    assert _resources(eight, distributed=True, nodes=[{"CPU": 128.0, "GPU": 8.0}]) == (1.0, 1.0)
    # A GPU node of no CPU: a bundle of the GPU alone (0 is allowed beside a GPU), not 0.01 CPU it lacks.
    assert _resources(eight, distributed=True, nodes=[{"CPU": 0.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 0.0}])[0] == 0.0
    with pytest.raises(ConfigError, match="cpus_per_worker must be above 0"):
        TrainConfig(**base, cpus_per_worker=0).validate()
    with pytest.raises(ConfigError, match="data_cpus must be 0 or more"):
        TrainConfig(**base, data_cpus=-1).validate()


def _copied_locators(triplets, tmp_path):
    """A copy of the training fixture's clip, its index and the locators of all its samples."""
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(triplets["video"], folder)
    index = build_index([str(folder)])
    stream = SampleStream(index, stage="finetune", ref_mode="first", resolution=32, augment=False, seed=0,
                          batch=len(index))
    return folder, index, stream.locators(0, len(index))


def test_a_shard_missing_on_a_read_tasks_node_is_said_as_missing_not_damaged(triplets, tmp_path):
    """The stream's read tasks run on any node of the cluster; one where --data is not mounted
    (or a shard removed after the listing) used to say the shard was damaged. It says where it
    is missing and why that stops the run, in the line the driver shows."""
    from disco.pipeline.errors import STOPS_THE_RUN, stopping_error
    from disco.train.data import read_samples

    folder, index, spec = _copied_locators(triplets, tmp_path)
    for shard in (folder / "triplets").glob("*.parquet"):
        shard.unlink()  # as on a node that does not see the storage
    with pytest.raises(DataError) as error:
        list(read_samples(spec, "finetune", block=len(index)))
    message = str(error.value)
    assert STOPS_THE_RUN in message and "does not exist on node" in message and "damaged" not in message
    line = str(stopping_error(RuntimeError(f"Traceback ...\n  {message}\n")))
    assert line.startswith(str(folder)) and "storage every node sees" in line


@pytest.mark.usefixtures("ray_local")
def test_the_reference_store_outlives_the_stream_that_started_it(tmp_path):
    """A non-detached actor ends when its creator's handles are gone: the worker whose stream
    started the store (every worker of the job joins it by name) dropped it with that stream (a
    stream start retried), and every worker's reads went on without it, at about 64x for
    references. The process holds it for its life."""
    import gc
    import time

    import ray

    from disco.train.data.read import REFERENCE_STORE_NAMESPACE

    clips = write_triplets(tmp_path / "clips", [6, 5], row_group_rows=4, shard_rows=16)
    stream = _stream(build_index([str(clips)]))
    name = stream._reference_store()
    stream.close()
    del stream
    gc.collect()
    time.sleep(2)  # Ray ends an actor whose handles are gone within moments
    store = ray.get_actor(name, namespace=REFERENCE_STORE_NAMESPACE)
    assert ray.get(store.get.remote([]), timeout=30) == {}
    again = _stream(build_index([str(clips)]))
    try:
        assert again._reference_store() == name
        again.next_batch()
    finally:
        again.close()


ON_A_WORKER_NODE = textwrap.dedent("""
    import json
    import re
    import sys

    import ray
    from ray._private import ray_constants
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray_constants.ENABLE_RAY_CLUSTER = False  # on loopback, as pipeline.cluster.init_ray
    ray.init(address=sys.argv[2], _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    worker = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)

    @ray.remote(num_cpus=0)
    def consume(path):
        from disco.train.data import SampleStream, build_index
        from disco.train.data.watch import Watch

        stream = SampleStream(build_index([path]), stage="finetune", ref_mode="first", resolution=16,
                              augment=False, seed=0, batch=2, data_tasks=2)
        tasks, _ = stream._chunk_tasks(0)
        dataset = stream._dataset(tasks, Watch(600, stream.data_cpus))
        for _ in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass
        used = [int(n) for n in re.findall(r"; (\\d+) nodes used", dataset.stats())]
        return ray.get_runtime_context().get_node_id(), used, len(tasks)

    there = NodeAffinitySchedulingStrategy(worker, soft=False)
    node, used, tasks = ray.get(consume.options(scheduling_strategy=there).remote(sys.argv[1]))

    @ray.remote
    class Hog:  # every CPU of the worker node, as a worker given them all would hold them
        def ready(self):
            return True

    hog = Hog.options(num_cpus=2, scheduling_strategy=there).remote()
    ray.get(hog.ready.remote())
    _, full, _ = ray.get(consume.options(scheduling_strategy=there).remote(sys.argv[1]), timeout=180)
    print(json.dumps({"on_worker": node == worker, "nodes_used": used, "tasks": tasks, "full": full}), flush=True)
    ray.shutdown()
""")


def test_a_workers_data_tasks_run_on_its_own_node(tmp_path):
    """Ray Data spreads a dataset's tasks over the cluster by default: each training worker's reads
    and decodes ran on any node, and every decoded batch crossed the network to it (and took CPUs
    planned for the workers there). They prefer the worker's own node (soft: where it has no room,
    another: a plain soft affinity would wait for the node, and a worker holding all its CPUs
    would hang its own stream). A two-node cluster on loopback; the consumer on the worker node."""
    from loopback_cluster import loopback_cluster

    clips = write_triplets(tmp_path / "clips", [12, 12, 12, 12], row_group_rows=2, shard_rows=8)
    with loopback_cluster(head_cpus=2) as cluster:
        cluster.add_node(2)
        run = subprocess.run([sys.executable, "-c", ON_A_WORKER_NODE, str(clips), cluster.address],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["on_worker"] and result["tasks"] > 1, result
    assert result["nodes_used"] and all(n == 1 for n in result["nodes_used"]), result
    assert result["full"], result  # with the worker node full, the stream still ran (its decodes elsewhere)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_reference_and_background_are_cut_from_the_picture_at_the_size_they_are_used(stage):
    """The CLIP reference and the background came from the stored foreground and background, cut
    at the stored size and then shrunk: the cut's black blended into the person's edge (and the
    person's into the hole's), a rim generate never shows the model (it cuts at the used size, as
    the official code did). Now both come from the whole picture, cut by the mask at their size:
    every person pixel of the reference is the shrunk picture's own, and so is every other pixel
    of the background."""
    import cv2
    from skimage import data

    from disco.model.conditioning import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from disco.train.augment import CLIP_SIZE, apply_box, crop_box
    from disco.train.data.decode import _decode_samples
    from disco.train.inputs import model_inputs

    image = cv2.resize(data.astronaut(), (288, 512), interpolation=cv2.INTER_AREA)  # a 9:16 frame
    alpha = np.zeros((512, 288), np.uint8)
    cv2.ellipse(alpha, (144, 260), (90, 200), 0, 0, 360, 255, -1)  # "the person"
    batch = {"position": [0], "image": [encode_png(image)], "ref_mask": [encode_png(alpha)]}
    if stage == "finetune":
        batch.update(pose=[encode_png(np.zeros_like(image))], ref_image=[encode_png(image)], ref_key=["r"])
    out = _decode_samples(batch, stage, 256, augment=False, seed=0)
    assert out["ok"].all()
    inputs = model_inputs({k: torch.from_numpy(v) for k, v in out.items() if k != "position"})
    box = crop_box(512, 288, stage, 0, augment=False)
    for size, given, person in ((CLIP_SIZE, inputs["reference"][0], True), (256, inputs["background"][0], False)):
        picture = torch.from_numpy(apply_box(image, box, size).astype(np.float32) / 255).permute(2, 0, 1)
        mask = torch.from_numpy(apply_box(alpha, box, size) >= 128)
        if person:  # back from CLIP's normalisation; outside the person it is 0
            given = given * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
            kept = mask
        else:
            given = (given + 1) / 2
            kept = ~mask
        assert 0.1 < kept.float().mean() < 0.9
        torch.testing.assert_close(given[:, kept], picture[:, kept], atol=1e-5, rtol=0)


def test_a_read_error_of_storage_that_passes_is_tried_again_before_the_shard_is_called_damaged(tmp_path, monkeypatch):
    """An NFS error that passes (EIO as a server fails over, a stale handle) failed the read task,
    which Ray Data does not retry: the training stream failed and Ray Train restarted the whole
    worker group from its last checkpoint. The read is tried again, the file opened anew; an error
    that does not pass, or one that persists, is still the shard's one line; and the look at
    whether the file is there, which the same storage may fail, no longer raises in its place."""
    import errno

    import pyarrow.parquet as pq

    from disco.pipeline.store.reader import DamagedShard, damaged
    from disco.train.data import read

    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"image": [b"x"] * 8}), path, row_group_size=4)
    monkeypatch.setattr(read, "READ_BACKOFF_S", 0.0)
    opened = []
    real = read._CountingFile

    def failing(errors):
        def open_(name):
            opened.append(name)
            if len(opened) <= errors[0]:
                raise OSError(errors[1], os.strerror(errors[1]), name)
            return real(name)
        return open_

    monkeypatch.setattr(read, "_CountingFile", failing((2, errno.EIO)))
    table, _ = read.read_row_group(str(path), 1, ["image"])
    assert table.num_rows == 4 and len(opened) == 3
    opened.clear()
    monkeypatch.setattr(read, "_CountingFile", failing((5, errno.ESTALE)))
    with pytest.raises(OSError, match="Stale"):
        read.read_row_group(str(path), 1, ["image"])
    assert len(opened) == read.READ_TRIES
    opened.clear()
    monkeypatch.setattr(read, "_CountingFile", failing((5, errno.EACCES)))
    with pytest.raises(PermissionError):
        read.read_row_group(str(path), 1, ["image"])
    assert len(opened) == 1  # not one that passes: at once
    # The shard's line where the storage fails the existence check too.
    monkeypatch.setattr(Path, "exists", lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    line = damaged(path, OSError(errno.EIO, "Input/output error"))
    assert isinstance(line, DamagedShard) and f"{path} is damaged" in str(line)


def test_a_shard_written_anew_with_fewer_rows_while_a_run_trains_stops_it_in_one_line(triplets, tmp_path):
    """The stream reads by the index the driver built at the start: a shard rewritten in place with
    fewer rows was an ArrowIndexError deep in a read task, and every restart (on the same index)
    failed alike. It is the run's one line, with the way on."""
    import pyarrow.parquet as pq

    from disco.pipeline.errors import STOPS_THE_RUN, stopping_error
    from disco.train.data import read_samples

    folder, index, spec = _copied_locators(triplets, tmp_path)
    assert len(list(read_samples(spec, "finetune", block=len(index)))) == 1
    for shard in (folder / "triplets").glob("*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.slice(0, table.num_rows // 2), shard)  # rewritten with half its rows
    with pytest.raises(DataError) as error:
        list(read_samples(spec, "finetune", block=len(index)))
    line = str(stopping_error(RuntimeError(f"Traceback ...\n  {error.value}\n")))
    assert STOPS_THE_RUN in str(error.value) and "changed while the run trains" in line and "--resume" in line
