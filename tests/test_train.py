"""The trainer on triplets written by the real pipeline (tiny model, CPU, local 2-CPU Ray)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data
import typer
from typer.testing import CliRunner

from disco.cli import app
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.encode import decode_picture
from disco.pipeline.store.output import OutputBusy
from disco.pipeline.store.reader import open_triplets
from disco.pipeline.store.schema import TRIPLET_SCHEMA
from disco.train.augment import apply_box, crop_box
from disco.model.checkpoint import find_checkpoint, list_checkpoints, load_model, read_checkpoint
from disco.train.initial import initial_model
from disco.train.config import TrainConfig, load_run_config
from disco.train.data import SampleStream, at_low_priority, build_index, epoch_order
from disco.train.inputs import model_inputs
from disco.train.launch import resolve, train
from disco.train.objective import apply_update
from disco.train.monitor import read_metrics
from helpers import TWO_WORKER_RUN, cli_process, first_batch, lock_held_elsewhere

pytestmark = pytest.mark.usefixtures("ray_local")
FRAMES = 8
RES = 64


def _config(tmp_path: Path, triplets, name: str, **options) -> TrainConfig:
    values = dict(stage="finetune", data=[str(triplets["video"])], output=str(tmp_path / name), model="tiny",
                  resolution=RES, batch_size=2, max_steps=2, checkpoint_every=1000, sample_every=1000,
                  sample_steps=2, log_every=1, warmup_steps=0)
    values.update(options)
    return TrainConfig(**values)


def _weights(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    return read_checkpoint(find_checkpoint(run, step))[0]


# -- data -------------------------------------------------------------------------------------------

def _stream(triplets, stage="finetune", batch=FRAMES, **options) -> dict:
    folders = [str(triplets["video"])] + ([str(triplets["images"])] if stage == "pretrain" else [])
    settings = dict(stage=stage, ref_mode="first", resolution=RES, augment=False, seed=0, batch=batch)
    return first_batch(folders, **{**settings, **options})


def _rows_by_frame(folder: Path) -> dict[int, dict]:
    return {r["frame_index"]: r for r in open_triplets(folder).to_table().to_pylist()}


def test_finetune_pairs_every_target_with_its_clips_first_frame(triplets):
    batch = _stream(triplets)
    rows = _rows_by_frame(triplets["video"])
    side = rows[0]["height"]
    box = crop_box(side, side, "finetune", 0, augment=False)
    first_bg = apply_box(decode_picture(rows[0]["image"]), box, RES).transpose(2, 0, 1)  # cut by its mask later
    targets = {bytes(apply_box(decode_picture(r["image"]), box, RES).transpose(2, 0, 1).tobytes()): f
               for f, r in rows.items()}
    seen = set()
    for i in range(FRAMES):
        # Background (and foreground) from frame 0, target from the row itself.
        assert np.array_equal(batch["background"][i].numpy(), first_bg)
        seen.add(targets[bytes(batch["target"][i].numpy().tobytes())])
    assert seen == set(range(FRAMES))  # one epoch holds every frame once
    # Pre-training: each image is its own reference.
    hap = _stream(triplets, stage="pretrain", batch=FRAMES + 2)
    assert len({bytes(b.numpy().tobytes()) for b in hap["background"]}) == FRAMES + 2


def test_the_background_hole_is_mid_grey_in_training_and_generation(triplets):
    """Official value of the person's hole in the background condition: [-1, 1] * (1 - mask) = 0
    (mid grey), not the -1 (black) that scaling the stored picture alone gives. Training (from
    the stream) and generation / evaluation (``background_pixels``) give the same tensor."""
    from disco.model.conditioning import background_pixels

    batch = _stream(triplets, batch=2)
    inputs = model_inputs(batch)
    rows = _rows_by_frame(triplets["video"])
    side = rows[0]["height"]
    box = crop_box(side, side, "finetune", 0, augment=False)
    alpha = apply_box(decode_picture(rows[0]["mask"], grayscale=True), box, RES)
    person = torch.from_numpy(alpha >= 128)
    assert 0.05 < person.float().mean() < 0.9
    background = inputs["background"][0]
    assert (background[:, person] == 0).all()
    outside = background[:, ~person]
    assert outside.min() < -0.2 and outside.max() > 0.2  # the scene keeps its values
    # Generation and evaluation: the same rule on the reference's own background and alpha.
    stored, cut = decode_picture(rows[0]["background"]), decode_picture(rows[0]["mask"], grayscale=True)
    generated = background_pixels(stored, RES, cut)[0]
    from disco.model.conditioning import square

    hole = torch.from_numpy(square(cut, RES, nearest=True) >= 128)
    assert hole.any() and (generated[:, hole] == 0).all()
    # A run trained before the official value (its config.yaml does not say) keeps black: -1.
    legacy = model_inputs(batch, hole=-1.0)["background"][0]
    assert (legacy[:, person] == -1).all() and torch.equal(legacy[:, ~person], background[:, ~person])
    from disco.model.checkpoint import background_hole

    run = Path(str(TrainConfig(output="x").save(triplets["video"].parent / "hole-run")))
    assert background_hole(run.parent) == 0.0 and load_run_config(run.parent).background_hole == 0.0
    run.write_text("\n".join(l for l in run.read_text().splitlines() if not l.startswith("background_hole")))
    assert background_hole(run.parent) == -1.0 and load_run_config(run.parent).background_hole == -1.0
    plain = background_pixels(stored, RES)[0]  # another scene: nothing is cut out
    assert torch.equal(generated[:, ~hole], plain[:, ~hole])
    assert (plain[:, hole] < -0.9).float().mean() > 0.8  # black there (bar the edge's blend)


def test_random_reference_mode_draws_frames_of_the_same_clip(triplets):
    batch = _stream(triplets, ref_mode="random")
    rows = _rows_by_frame(triplets["video"])
    side = rows[0]["height"]
    box = crop_box(side, side, "finetune", 0, augment=False)
    backgrounds = {bytes(apply_box(decode_picture(r["image"]), box, RES).transpose(2, 0, 1).tobytes()): f
                   for f, r in rows.items()}
    refs = [backgrounds[bytes(b.numpy().tobytes())] for b in batch["background"]]
    assert len(set(refs)) > 1  # not always the first frame


def test_one_crop_for_every_picture_of_a_sample(triplets):
    batch = _stream(triplets, stage="pretrain", batch=4, augment=True)
    target, background = batch["target"].float(), batch["background"].float()
    # Away from the person's edge the background *is* the image: same crop, so the same pixels
    # (up to JPEG noise). A crop drawn with another seed does not line up.
    keep = (background > 8).all(1, keepdim=True).expand_as(background)
    aligned = (target - background).abs()[keep].mean()
    shifted = (target.roll(6, dims=-1) - background).abs()[keep].mean()
    assert aligned < 6 < shifted
    boxes = {crop_box(96, 96, "finetune", s) for s in range(20)}
    assert len(boxes) > 10 and all(h == w and 0.9 * 96 * 96 <= h * w * 1.02 for _, _, h, w in boxes)


def _undecodable():
    raise ValueError("not a decodable picture")


def test_decoding_runs_at_the_lowest_priority_and_changes_nothing_around_it(triplets):
    import cv2
    import ray.data

    def caller():
        options = ray.data.DataContext.get_current().execution_options
        return (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0), cv2.getNumThreads(),
                options.preserve_order, options.resource_limits.object_store_memory,
                len(ray.data.DataContext.get_current().custom_execution_callback_classes))

    before = caller()
    nice, threads, thread = at_low_priority(lambda: (os.getpriority(os.PRIO_PROCESS, 0), cv2.getNumThreads(),
                                                     threading.get_native_id()))
    assert (nice, threads) == (19, 1) and thread != threading.get_native_id()
    with pytest.raises(ValueError, match="not a decodable picture"):
        at_low_priority(_undecodable)
    # The stream's Ray Data settings (order, read-ahead bound, idle pause) stay in its own context.
    assert _stream(triplets, batch=2)["target"].shape == (2, 3, RES, RES)
    assert caller() == before


def test_training_and_generation_mask_the_clip_reference_alike():
    from disco.model.conditioning import reference_pixels

    image = data.astronaut()[:224, 100:324]
    alpha = np.tile(np.arange(224, dtype=np.uint8)[None] + 16, (224, 1))  # 16..239 across the width
    generated = reference_pixels(image, alpha)
    trained = model_inputs({k: torch.from_numpy(v)[None] for k, v in
                            {"target": np.zeros((3, 8, 8), np.uint8), "background": np.zeros((3, 8, 8), np.uint8),
                             "pose": np.zeros((3, 8, 8), np.uint8), "reference": image.transpose(2, 0, 1).copy(),
                             "reference_mask": alpha[None], "background_mask": np.zeros((1, 8, 8), np.uint8)}.items()})["reference"]
    assert torch.equal(trained, generated)
    kept = (generated != 0).any(1)[0]
    assert not kept[:, 127 - 16].any() and kept[:, 128 - 16:].all()  # alpha 127 out, 128 in (the contract)


def test_the_stream_resumes_at_its_position(triplets):
    """(How two workers split a batch: test_train_data.py's one worker with two shards against two
    workers.)"""
    index = build_index([str(triplets["video"])])
    # One worker reading the 2 data shards that 2 workers split (the run's data_shards).
    full = SampleStream(index, stage="finetune", ref_mode="first", resolution=RES, augment=False, seed=3, batch=4,
                        shards=2)
    full.next_batch()
    second = full.next_batch()["position"]
    full.close()
    resumed = SampleStream(index, stage="finetune", ref_mode="first", resolution=RES, augment=False, seed=3, batch=4,
                           shards=2, position=4)
    assert torch.equal(resumed.next_batch()["position"], second)
    resumed.close()


def test_a_worker_whose_rows_never_decode_stops_after_an_epoch_of_its_own_shards(triplets, tmp_path, monkeypatch):
    """The "no row decodes" stop waited for a data set's length of failed rows in a row; a worker
    reads only its shards (a half, of two): it walked two epochs of them without a batch while
    the other ranks waited in the all-reduce. It stops after one epoch of its own rows now."""

    import disco.train.data.stream as stream_module
    from disco.train.data import DataError
    from helpers import garbled_copy

    garbled = garbled_copy(triplets["video"], tmp_path / "garbled")
    monkeypatch.setattr(stream_module, "SAMPLES_PER_BLOCK", 2)  # blocks of one micro-batch: the count is exact
    index = build_index([str(garbled)])
    stream = SampleStream(index, stage="finetune", ref_mode="first", resolution=RES, augment=False, seed=3, batch=2,
                          rank=1, world=2)
    try:
        with pytest.raises(DataError, match="no row decodes"):
            stream.next_batch()
        own = -(-len(index) // 2)  # the larger shard's rows
        assert own < stream.position + 2 <= own + 2, (stream.position, len(index))
    finally:
        stream.close()


# -- training ---------------------------------------------------------------------------------------

def test_resume_reaches_the_same_weights_bit_exactly(triplets, tmp_path, monkeypatch):
    cfg = _config(tmp_path, triplets, "whole", max_steps=4, checkpoint_every=1, keep=2, sample_every=2)
    train(cfg)
    run = Path(cfg.output)
    assert sorted(list_checkpoints(run)) == [3, 4]  # --keep 2
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".old-*"))
    # A crash right after step 3: the run directory as it was then, plus a half-written checkpoint.
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("checkpoint-00000004", "summary.json"))
    (crashed / ".tmp-checkpoint-00000004-999").mkdir()
    (crashed / ".tmp-checkpoint-00000004-999" / "trainable.safetensors").write_bytes(b"cut short")
    # While another process holds the run (a first job still training), a resume is refused and
    # leaves the run as it is: its checkpoint in the making, its configuration.
    config_before = (crashed / "config.yaml").read_bytes()
    with lock_held_elsewhere(crashed) as holder:
        with pytest.raises(OutputBusy, match=rf"{crashed} is being written by another run \(pid {holder.pid} on "):
            train(TrainConfig(output=str(crashed), resume=True, max_steps=8, schedule_steps=8),
                  given={"output", "resume", "max_steps", "schedule_steps"})
    assert (crashed / ".tmp-checkpoint-00000004-999" / "trainable.safetensors").exists()
    assert (crashed / "config.yaml").read_bytes() == config_before
    lines: list[str] = []
    # Once loaded, the checkpoint as read is let go (on a GPU the model and optimizer hold copies,
    # and it would stay in host memory to the end of the run): checked at the first update.
    import disco.train.loop as loop

    class Read(dict):  # a dict that takes a weak reference
        pass

    read, alive = [], []

    def tracked_read(path):
        parts = [Read(part) if isinstance(part, dict) else part for part in read_checkpoint(path)]
        read.extend(weakref.ref(part) for part in parts[:2])  # the weights, the optimizer's state
        return tuple(parts)

    def update(*args, **kwargs):
        if not alive:
            gc.collect()
            alive.extend(ref() is not None for ref in read)
        return apply_update(*args, **kwargs)

    monkeypatch.setattr(loop, "read_checkpoint", tracked_read)
    monkeypatch.setattr(loop, "apply_update", update)
    summary = train(TrainConfig(output=str(crashed), resume=True), given={"output", "resume"}, log=lines.append)
    monkeypatch.undo()
    assert summary["step"] == 4
    assert len(read) == 2 and alive == [False, False]
    assert not (crashed / ".tmp-checkpoint-00000004-999").exists()
    # The checkpoint records the data it trained on; the same data resumes without a word ...
    recorded = json.loads((crashed / "checkpoint-00000003" / "state.json").read_text())["data"]
    assert recorded == build_index([str(triplets["video"])]).summary() and recorded["rows"] == 8
    assert not [line for line in lines if "data changed" in line]
    # ... and data that changed since (a shard rewritten with a row fewer) is said in one line.
    changed, fewer = tmp_path / "changed", tmp_path / "fewer-rows"
    shutil.copytree(run, changed, ignore=shutil.ignore_patterns("checkpoint-00000004", "summary.json"))
    shutil.copytree(triplets["video"], fewer)
    assert build_index([str(fewer)]).summary() == recorded  # moved elsewhere, the same data: nothing to say
    shard = next((fewer / "triplets").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).slice(1), shard, row_group_size=4)
    (changed / "config.yaml").write_text((changed / "config.yaml").read_text().replace(str(triplets["video"]), str(fewer)))
    lines.clear()
    assert train(TrainConfig(output=str(changed), resume=True), given={"output", "resume"}, log=lines.append)["step"] == 4
    assert "the data changed since checkpoint-00000003 (1 shards, 8 rows then; 1, 7 now)" in " ".join(lines), lines
    whole, resumed = _weights(run, 4), _weights(crashed, 4)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    optimizer_a = read_checkpoint(find_checkpoint(run, 4))[1]["optimizer"]["state"]
    optimizer_b = read_checkpoint(find_checkpoint(crashed, 4))[1]["optimizer"]["state"]
    assert all(torch.equal(optimizer_a[i]["exp_avg_sq"], optimizer_b[i]["exp_avg_sq"]) for i in optimizer_a)
    assert json.loads((run / "checkpoint-00000004" / "state.json").read_text())["positions"] == [8]
    # Logging: TensorBoard scalars and the sample grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/data_wait_fraction"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    grid = np.asarray(Image.open(run / "samples" / "step-00000004.png"))
    assert grid.shape == (2 * RES, 4 * RES, 3)  # 2 samples x reference | pose | generated | target
    assert grid[:, 3 * RES:].std() > 10 and grid[:, RES:2 * RES].any()
    # The public loader: a run directory (latest or a step) or a checkpoint folder.
    model = load_model(run)
    assert all(torch.equal(model.get_parameter(k), whole[k]) for k in whole)
    assert torch.equal(load_model(run / "checkpoint-00000003").get_parameter(next(iter(whole))),
                       _weights(run, 3)[next(iter(whole))])
    with pytest.raises(ConfigError, match="no checkpoint of step 1"):
        load_model(run, step=1)


def test_a_checkpoint_holds_the_step_it_was_taken_at_while_training_goes_on(tmp_path):
    """The host copy a checkpoint is written from is the state at its step: training's in-place
    updates made while the writer thread writes do not reach the files."""
    from disco.model.checkpoint import checkpoint_snapshot, write_checkpoint
    from disco.model.disco import DisCoModel

    torch.manual_seed(0)
    model = DisCoModel.from_architecture("tiny")
    model.set_trainable()
    params = dict(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    ema = {n: p.detach().clone() for n, p in params.items()}
    snapshot = checkpoint_snapshot(model, {"optimizer": optimizer.state_dict()}, ema)
    expected = {n: p.detach().clone() for n, p in params.items()}
    moment = {i: s["exp_avg"].clone() for i, s in optimizer.state_dict()["state"].items()}
    optimizer.step()  # in place, as the next training step does
    for t in ema.values():
        t.mul_(0.5)
    path = write_checkpoint(tmp_path, 7, snapshot, {"positions": [0]}, keep=2)
    weights, training, state, ema_read = read_checkpoint(path)
    assert state["step"] == 7 and weights.keys() == expected.keys()
    assert all(torch.equal(weights[n], expected[n]) for n in expected)
    assert not all(torch.equal(weights[n], params[n].detach()) for n in expected)  # training did move on
    assert all(torch.equal(training["optimizer"]["state"][i]["exp_avg"], moment[i]) for i in moment)
    assert all(torch.equal(ema_read[n], expected[n]) for n in expected)


def test_reading_a_checkpoint_maps_its_files_instead_of_copying_them(tmp_path):
    """The workers of a node that resume from one checkpoint each read it whole: AdamW's moments,
    the EMA and the weights (about 25 GB for a full fine-tune) in private memory per worker, 8 to
    a node. The files are mapped instead (shared pages): reading a checkpoint of 256 MB adds little
    to the process's private memory, while PyTorch's plain ``torch.load`` of its training state,
    measured the same way, adds its size; the values are the same. Once the loop has restored
    the optimizer and the EMA from it, nothing holds the files mapped (a mapped file outlives its
    pruning, and on NFS makes the prune fail)."""
    import ctypes
    import gc

    import psutil

    from disco.model.checkpoint import TRAINING_STATE_FILE, write_checkpoint
    from disco.train.loop import load_optimizer_state

    def adamw(weight):
        return torch.optim.AdamW([weight], lr=1e-3)

    weight = torch.nn.Parameter(torch.randn(16 << 20))  # 64 MB
    optimizer = adamw(weight)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    snapshot = {"weights": {"w": weight.detach().clone()}, "training": {"optimizer": optimizer.state_dict()},
                "ema": {"w": torch.randn_like(weight)}}
    path = write_checkpoint(tmp_path, 1, snapshot, {}, keep=1)
    process = psutil.Process()

    def private_growth(read) -> tuple[object, float]:
        gc.collect()
        # Free heap pages go back to the system first: an earlier test's freed memory, still the
        # process's, would otherwise take a copy without any growth (measured 0.0 once, in the suite).
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = process.memory_full_info().uss
        value = read()
        return value, (process.memory_full_info().uss - before) / (1 << 20)

    (weights, training, _, ema), ours = private_growth(lambda: read_checkpoint(path))
    assert ours < 64, ours  # MB, of 256
    expected = snapshot["training"]["optimizer"]["state"][0]
    assert all(torch.equal(training["optimizer"]["state"][0][k], expected[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(weights["w"], snapshot["weights"]["w"]) and torch.equal(ema["w"], snapshot["ema"]["w"])
    plain, theirs = private_growth(lambda: torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True))
    assert theirs > 100, theirs  # the training state's 128 MB, copied
    del plain

    def mapped() -> list[str]:
        gc.collect()
        return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]

    assert mapped()  # the read above: views into the files
    restored = adamw(torch.nn.Parameter(snapshot["weights"]["w"].clone()))
    load_optimizer_state(restored, training["optimizer"])  # as the loop restores a run on the CPU
    shadow = ema["w"].to("cpu", copy=True)  # and its EMA
    del weights, training, ema
    assert mapped() == []
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg_sq"], expected["exp_avg_sq"])
    assert torch.equal(shadow, snapshot["ema"]["w"])


def test_checkpoints_are_written_beside_training_and_a_failed_write_stops_the_run(triplets, tmp_path, monkeypatch):
    import disco.train.loop as loop
    from disco.model.checkpoint import write_checkpoint

    writers, steps_when_written = [], []
    state = {"step": 0}

    def apply(*args, **kwargs):
        state["step"] += 1
        return apply_update(*args, **kwargs)

    def write(run, step, snapshot, info, keep, *rest):
        writers.append(threading.current_thread().name)
        deadline = time.monotonic() + 60
        while step == 1 and state["step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # a slow disk: step 2 trains meanwhile (a write in the loop's thread would wait here)
        if step == 3:
            raise OSError(28, "No space left on device")
        path = write_checkpoint(run, step, snapshot, info, keep, *rest)
        steps_when_written.append((step, state["step"]))
        return path

    monkeypatch.setattr(loop, "apply_update", apply)
    monkeypatch.setattr(loop, "write_checkpoint", write)
    cfg = _config(tmp_path, triplets, "slow-disk", max_steps=5, checkpoint_every=1, keep=5)
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg)
    assert set(writers) == {"disco-checkpoint-writer"} and len(writers) == 3
    assert steps_when_written[0][0] == 1 and steps_when_written[0][1] >= 2  # step 2 trained while 1 was written
    assert sorted(list_checkpoints(Path(cfg.output))) == [1, 2]  # the failed write left no checkpoint 3


@pytest.mark.parametrize("when", ["after a checkpoint", "while one is written", "its temporary folder cleared"])
def test_a_run_whose_folder_another_run_took_stops_before_its_next_checkpoint(triplets, tmp_path, monkeypatch, when):
    """Where locks hold on one node only (NFS mounted with nolock or local_lock), a second run of
    the same folder on another node gets the lock too and writes its name into the lock file. The
    first run's next checkpoint stops it, in one line, writing nothing more into the folder; a
    checkpoint being written when the other run came is not put in place (nor are older ones
    pruned)."""
    import fcntl
    from types import SimpleNamespace

    import disco.model.checkpoint as checkpoint
    import disco.train.loop as loop
    from disco.model.checkpoint import write_checkpoint
    from disco.pipeline.store import output

    taken = []

    def take(run):  # the other run starts, as if on another node
        with monkeypatch.context() as node_local:
            node_local.setattr(output, "fcntl", SimpleNamespace(flock=lambda fd, operation: None,
                                                                LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
            with output.folder_lock(run) as theirs:
                taken.append(theirs)

    def write(run, step, *rest):
        if not taken and when == "while one is written":
            take(run)
        if not taken and when == "its temporary folder cleared":
            take(run)  # ... whose start clears every temporary checkpoint folder, ours included
            with monkeypatch.context() as cleared:
                cleared.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(
                    FileNotFoundError(2, "No such file or directory")))
                return write_checkpoint(run, step, *rest)
        path = write_checkpoint(run, step, *rest)
        if not taken:
            take(run)
        return path

    monkeypatch.setattr(loop, "write_checkpoint", write)
    cfg = _config(tmp_path, triplets, "taken", max_steps=6, checkpoint_every=2, keep=1)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message and f"{cfg.output} was taken by another run ({taken[0].strip()})" in message
    assert "local_lock" in message
    if when == "after a checkpoint":
        assert "before its checkpoint of step 4" in message
        assert sorted(list_checkpoints(Path(cfg.output))) == [2]  # nothing written after the other run came
    else:
        assert "before its checkpoint of step 2" in message
        assert not list_checkpoints(Path(cfg.output)) and not list(Path(cfg.output).glob(".tmp-*"))
    assert (Path(cfg.output) / output.LOCK_FILE).read_text() == taken[0]


def test_a_run_killed_mid_training_resumes_to_the_same_weights(triplets, tmp_path):
    """A real ``kill -9`` of ``disco-cli train`` (its own process and Ray instance) once it has
    written two checkpoints; ``--resume`` then continues from whichever checkpoint was complete
    when it died and reaches the uninterrupted run's weights exactly."""
    steps = 5
    options = ["--stage", "finetune", "--data", str(triplets["video"]), "--model", "tiny", "--resolution", str(RES),
               "--batch-size", "2", "--max-steps", str(steps), "--checkpoint-every", "1", "--keep", "2",
               "--sample-every", "1000", "--sample-steps", "2", "--log-every", str(steps), "--warmup-steps", "0",
               "--no-progress"]
    whole = tmp_path / "whole"
    runner = CliRunner()
    assert runner.invoke(app, ["train", *options, "--output", str(whole)]).exit_code == 0
    killed = tmp_path / "killed"
    command, env = cli_process("train", *options, "--output", str(killed))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list_checkpoints(killed)) < 2 or max(list_checkpoints(killed)) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run wrote no second checkpoint in 4 minutes"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        process.wait()
    died_at = max(list_checkpoints(killed))
    assert died_at < steps, "the run finished before the kill; nothing was resumed"
    result = runner.invoke(app, ["train", "--output", str(killed), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"trained to step {steps}" in result.output
    expected, resumed = _weights(whole, steps), _weights(killed, steps)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert not list(killed.glob(".tmp-*"))
    # One logging window spans the kill: the checkpoint carried its loss sums, so the resumed
    # run reports the loss of the uninterrupted one.
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, killed)]
    assert summaries[0] == summaries[1]


# About 70 s: joining an address from another process is covered by tests/test_cluster.py, Ray
# Train's fit and checkpoint pointers by the lost-worker test, both together by the slow node test.
@pytest.mark.slow
def test_training_on_an_existing_ray_cluster_through_ray_address(triplets, tmp_path):
    """``disco-cli train --ray-address`` from another process joins this session's Ray instance
    (it stands in for a cluster) and trains there through Ray Train."""
    import ray

    address = ray.get_runtime_context().gcs_address
    run = tmp_path / "on-cluster"
    command, env = cli_process("train", "--stage", "finetune", "--data", str(triplets["video"]), "--model", "tiny",
                               "--resolution", str(RES), "--batch-size", "2", "--max-steps", "2", "--sample-every",
                               "1000", "--sample-steps", "2", "--log-every", "1", "--output", str(run), "--ray-address", address,
                               "--no-progress")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained to step 2" in result.stderr  # the console's summary line (rich writes to stderr)
    state = json.loads((find_checkpoint(run) / "state.json").read_text())
    assert (state["step"], state["world_size"], state["positions"]) == (2, 1, [4])
    # Ray Train's bookkeeping, with the pointer to the checkpoint it reported: it ran as a TorchTrainer.
    reported = list((run / "ray").glob("train-*/checkpoint-00000002"))
    assert reported
    # Ray Train's folder of that report points at ours: generate / evaluate take it for the checkpoint.
    assert find_checkpoint(reported[0]) == find_checkpoint(run)
    assert load_run_config(run).ray_address == address


def test_a_worker_that_does_not_see_the_drivers_run_directory_stops_the_run_at_its_start(triplets, tmp_path,
                                                                                          monkeypatch):
    """Every Ray Train worker first checks that it sees the run directory the driver holds (the
    lock file's text, unique to this invocation); the multi-worker runs of this suite pass it. On
    a node where --output is a folder of its own (a local disk: no lock file, or an older run's),
    the worker stops before building the model, not at the first checkpoint's report, and the
    driver says why in one line (no advice to --resume, which cannot help)."""
    from contextlib import contextmanager

    import ray

    from disco.pipeline.store import output
    from disco.pipeline.store.output import LOCK_FILE, folder_lock
    from disco.train.loop import check_run_directory

    run, node_local = tmp_path / "run", tmp_path / "node-local"
    with folder_lock(run) as holder:
        check_run_directory(run, holder, 1)
        node_local.mkdir()
        for stale in (None, "pid 1 on another-host, since 2026-01-01 00:00:00\n"):
            if stale is not None:
                (node_local / LOCK_FILE).write_text(stale)
            with pytest.raises(ConfigError, match=rf"worker 1 on node .* does not see the run directory {node_local} "
                                                  "that the driver holds: --output must be on storage every node sees"):
                check_run_directory(node_local, holder, 1)

    # Through Ray Train: the worker reads a lock text other than the driver's (as on a node with a
    # run directory of its own).
    @contextmanager
    def held_elsewhere(root, advice="wait", **options):
        with folder_lock(root, advice, **options):
            yield "pid 1 on another-host, since 2026-01-01 00:00:00\n"

    monkeypatch.setattr(output, "folder_lock", held_elsewhere)
    # Three restarts allowed: the error ends the run at the first (train/failure_policy.py).
    cfg = _config(tmp_path, triplets, "elsewhere", ray_address=ray.get_runtime_context().gcs_address, max_failures=3)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("worker 0 on node ") and f"does not see the run directory {cfg.output}" in message
    assert "\n" not in message and "--resume" not in message
    assert not list(Path(cfg.output).glob("checkpoint-*"))


def test_two_gloo_workers_make_the_same_update_as_one_with_twice_the_batch(triplets, two_worker_run, tmp_path):
    # The same data shards (the default for 2 workers: 2), so the same global batches, and the
    # same schedule: the two-worker run's first 4 of its 16 steps.
    one = _config(tmp_path, triplets, "one", batch_size=4, data_shards=2, max_steps=4, schedule_steps=16, log_every=4)
    assert train(one)["step"] == 4
    two = {m["step"]: m for m in read_metrics(two_worker_run)[0]}[4]
    assert two["loss"] == pytest.approx(train_loss(one), rel=1e-4)
    assert json.loads((find_checkpoint(two_worker_run, 4) / "state.json").read_text())["world_size"] == 2
    # Ray Train's folder of a reported checkpoint points at ours: generate / evaluate take it for it.
    reported = sorted((two_worker_run / "ray").glob("train-*/checkpoint-00000004"))
    assert reported and find_checkpoint(reported[0]) == find_checkpoint(two_worker_run, 4)
    copy = tmp_path / "copied-run"  # the pointer names the original; a copy of the run leads to its own
    shutil.copytree(two_worker_run, copy)
    record = copy / reported[0].relative_to(two_worker_run)
    assert find_checkpoint(record) == copy / "checkpoint-00000004"
    # ... and to its config.yaml: the pose drawing and background hole generate takes from the run.
    from disco.model.checkpoint import background_hole, pose_setting

    saved = (copy / "config.yaml").read_text()
    assert "pose_scale: null" in saved
    (copy / "config.yaml").write_text(saved.replace("background_hole: 0.0", "background_hole: -1.0")
                                      .replace("hands: true", "hands: false").replace("pose_scale: null", "pose_scale: 0.5"))
    assert background_hole(record) == -1.0 and pose_setting(record)[1] is False
    # ... and the pose residuals' scale the run trained with (--pose-scale), which the model keeps.
    from disco.model.checkpoint import load_model

    assert load_model(record).config.pose_scale == 0.5 and load_model(two_worker_run).config.pose_scale == 1.0
    # ... and the side it trained at, which generate and evaluate --run sample at by default (the
    # tiny model's own default is 128).
    from disco.generate.run import open_pipeline

    assert open_pipeline(record, "cpu", None)[1] == TWO_WORKER_RUN["resolution"] == 64
    # A save_pretrained folder kept inside a run is not that run: no training side, no data of its own.
    from disco.model.checkpoint import trained_data, trained_resolution

    load_model(record).save_pretrained(copy / "exported")
    assert trained_resolution(copy / "exported") is None and trained_data(copy / "exported") == []
    assert trained_data(record) == [str(triplets["video"])]
    a, b = _weights(Path(one.output)), _weights(two_worker_run, 4)
    start = initial_model(load_run_config(one.output)).trainable_parameters()
    difference = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    update = torch.sqrt(sum(((a[k] - start[k].detach()) ** 2).sum() for k in a))
    # Same samples, noise and timesteps; only the order of float sums differs (gloo all-reduce of
    # two half-batch means against one mean). Adam divides by sqrt(v), which enlarges that noise
    # on near-zero gradients, so the bound is relative to the update, not bit-exact.
    assert update > 0.01 and difference / update < 1e-3
    assert max((a[k] - b[k]).abs().max() for k in a) < 0.5 * one.learning_rate


def test_ddp_keeps_the_gradients_in_its_buckets_and_updates_the_same(monkeypatch):
    """The loop's DDP options and updates make every gradient a view into DDP's all-reduce buckets
    (no second fp32 copy of the gradients per GPU) from the first micro-batch of the first step
    on, those accumulated under ``no_sync`` included, and keep them there after each update; the
    weights come out bit for bit those of DDP's default (fresh gradients each step, dropped by
    every update). A one-rank gloo group on loopback, in this process."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from disco.train.loop import DDP_OPTIONS
    from disco.train.objective import apply_update, zero_gradients

    def run(options: dict, loops_way: bool) -> tuple[list[torch.Tensor], list[int]]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
        params = list(net.parameters())
        if loops_way:
            zero_gradients(params)
        ddp = DistributedDataParallel(net, bucket_cap_mb=0.02, **options)  # several buckets
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        x = torch.randn(8, 64)
        storages = []  # gradient storages after each micro-batch
        for step in range(3):
            for micro in range(2):  # --grad-accum 2
                with ddp.no_sync() if micro == 0 else contextlib.nullcontext():
                    ddp(x + step + micro).square().mean().backward()
                storages.append(len({p.grad.untyped_storage().data_ptr() for p in params}))
            apply_update(params, optimizer, scheduler, scaler, None, 1.0, keep_gradients=loops_way)
        return [p.detach().clone() for p in params], storages

    from disco.pipeline.cluster import loopback_interface

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback_interface())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        default_weights, default_storages = run({}, loops_way=False)
        weights, storages = run(DDP_OPTIONS, loops_way=True)
    finally:
        dist.destroy_process_group()
    count = len(default_weights)
    assert set(default_storages) == {count}  # DDP's default: a gradient tensor of its own per parameter
    # The loop's: a few bucket storages hold every gradient, at every micro-batch of every step.
    assert 1 < max(storages) < count, storages
    assert all(torch.equal(a, b) for a, b in zip(weights, default_weights))


def test_an_fp16_update_the_loss_scaler_skips_moves_neither_the_schedule_nor_the_ema():
    """fp16's loss scaler skips an update whose gradients hold inf or NaN (a burst of them while the
    scale settles at the start, one after each growth): the schedule went on all the same (the
    warm-up eaten by updates that never happened) and the EMA pulled once more. Now a skipped update
    is said (False) and moves nothing; the next real one takes the schedule's next rate."""
    from diffusers.training_utils import EMAModel

    from disco.train.config import lr_factor
    from disco.train.objective import apply_update

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup=10, total=100))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    ema = EMAModel([param], decay=0.9)
    shadow = ema.shadow_params[0].clone()

    def update(gradient: float) -> bool:
        scaler.scale((param * gradient).sum()).backward()
        return apply_update([param], optimizer, scheduler, scaler, ema, None)

    for _ in range(2):  # overflowing gradients: skipped
        assert update(float("inf")) is False
    assert torch.equal(param.detach(), torch.ones(3)) and not optimizer.state
    assert scheduler.last_epoch == 0 and ema.optimization_step == 0 and torch.equal(ema.shadow_params[0], shadow)
    assert scaler.get_scale() == 2.0 ** 14
    assert update(1.0) is True  # the first real update, at the warm-up's first rate (0)
    assert int(optimizer.state[param]["step"]) == 1
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(1, 10, 100))
    assert ema.optimization_step == 1
    assert update(1.0) is True and not torch.equal(param.detach(), torch.ones(3))  # at the second rate
    assert scheduler.last_epoch == 2
    # Without fp16 (bf16, fp32: the scaler off) every update counts, as before.
    plain = torch.amp.GradScaler("cpu", enabled=False)
    param.grad = torch.ones(3)
    assert apply_update([param], optimizer, scheduler, plain, None, None) is True and scheduler.last_epoch == 3


def test_a_base_that_predicts_anything_but_the_noise_is_refused_before_training(tmp_path):
    """The loss is the noise's (epsilon): a --pretrained base whose scheduler predicts v would have
    been trained against the wrong target without an error. Refused at the start, in one line."""
    from disco.model.disco import DisCoModel
    from disco.pipeline.errors import ConfigError
    from disco.train.objective import DiffusionObjective

    base = tmp_path / "base"
    (base / "scheduler").mkdir(parents=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    cfg = TrainConfig(stage="finetune", data=[str(tmp_path)], output=str(tmp_path / "run"), pretrained=str(base))
    with pytest.raises(ConfigError, match="predicts 'v_prediction'"):
        cfg.validate_model()
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    TrainConfig(stage="finetune", data=[str(tmp_path)], output=str(tmp_path / "run"), pretrained=str(base)).validate_model()
    model = DisCoModel.from_architecture("tiny")
    model.register_to_config(scheduler_config={**model.config.scheduler_config, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        DiffusionObjective(model)


def train_loss(cfg: TrainConfig) -> float:
    return json.loads((Path(cfg.output) / "summary.json").read_text())["loss"]


def _corrupt_copy(folder: Path, target: Path, frame: int) -> str:
    shutil.copytree(folder, target)
    shard = next((target / "triplets").glob("*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[frame] = b"\xff\xd8 not a jpeg any more"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table.cast(TRIPLET_SCHEMA), shard, row_group_size=4)
    return table.column("sample_id")[frame].as_py()


def test_a_corrupt_triplet_is_skipped_and_counted(triplets, tmp_path):
    bad = tmp_path / "bad"
    _corrupt_copy(triplets["video"], bad, frame=5)
    # Also exercises gradient accumulation, clipping and the EMA.
    cfg = _config(tmp_path, triplets, "corrupt", data=[str(bad)], batch_size=2, grad_accum=2, max_steps=3,
                  max_grad_norm=1.0, ema_decay=0.5)
    summary = train(cfg)
    assert summary["step"] == 3
    # Which stream positions the run read: 12 good samples, in the order of the epochs.
    index = build_index([str(bad)])
    corrupt_row = int(np.flatnonzero(index.frame == 5)[0])
    order = np.concatenate([epoch_order(index, cfg.seed, e) for e in range(3)])
    good, expected = 0, 0
    for row in order:
        if good == 12:
            break
        if row == corrupt_row:
            expected += 1
        else:
            good += 1
    assert expected >= 1 and summary["skipped_rows"] == expected
    checkpoint = Path(cfg.output) / "checkpoint-00000003"
    assert json.loads((checkpoint / "state.json").read_text())["skipped"] == expected
    # With an EMA, load_model gives the averaged weights, which trail the trained ones.
    ema, trained = read_checkpoint(checkpoint)[3], _weights(Path(cfg.output))
    name = "unet.conv_in.weight"
    assert torch.equal(load_model(cfg.output).get_parameter(name), ema[name])
    assert not torch.equal(ema[name], trained[name])
    # generate / evaluate --no-ema: the weights as trained; their records say which were loaded.
    assert torch.equal(load_model(cfg.output, ema=False).get_parameter(name), trained[name])
    from disco.model.checkpoint import describe_checkpoint

    assert describe_checkpoint(cfg.output) == {"path": cfg.output, "kind": "training run",
                                               "checkpoint": str(checkpoint), "step": 3, "stage": "finetune",
                                               "weights": "ema"}
    assert describe_checkpoint(cfg.output, ema=False)["weights"] == "trained"
    # A checkpoint of this run without its EMA file (removed by hand, cut short) is refused by a
    # resume: a fresh EMA restarted from the trained weights with nothing said.
    (checkpoint / "ema.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no ema.safetensors, though this run keeps an EMA"):
        train(TrainConfig(output=cfg.output, resume=True, max_steps=4, schedule_steps=4),
              given={"output", "resume", "max_steps", "schedule_steps"})


# -- command line ------------------------------------------------------------------------------------

def test_cli_pretrain_with_a_config_file_then_finetune_from_it(triplets, tmp_path, monkeypatch):
    from disco.pipeline.cluster import JOB_STOP_WAIT_ENV, RAY_JOB_CONFIG_ENV

    # Run as a `ray job submit` job (its driver finds its job config in this variable) under Ray's
    # default grace for `ray job stop`: too short to checkpoint, said at the start.
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, '{"runtime_env": {}}')
    monkeypatch.delenv(JOB_STOP_WAIT_ENV, raising=False)
    config = tmp_path / "run.yaml"
    # The paper's HAP recipe, shrunk by the YAML (which also gives the accumulation: no global
    # batch of 2048 then) and the flags.
    config.write_text(f"preset: disco-hap\nmodel: tiny\nresolution: {RES}\nbatch-size: 4\nlr: 5.0e-4\nmax_steps: 2\n"
                      "grad_accum: 1\nsample_every: 1000\nsample_steps: 2\n")
    run = tmp_path / "hap"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--stage", "pretrain", "--data", str(triplets["images"]), "--data",
                                 str(triplets["video"]), "--output", str(run), "--config", str(config),
                                 "--batch-size", "2", "--mixed-precision", "bf16", "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "trained to step 2" in result.output
    # No terminal shows the bar (as in a `ray job submit` log): a line per log window, the last at the end.
    assert "progress: step 2/2, loss " in result.output and " samples/s, data wait " in result.output
    assert f"warning: `ray job stop` gives this job 3 s ({JOB_STOP_WAIT_ENV})" in result.output
    saved = load_run_config(run)
    assert (saved.batch_size, saved.lr, saved.stage, saved.model_seed) == (2, 5e-4, "pretrain", 0)
    assert (saved.mixed_precision, saved.gradient_checkpointing) == ("bf16", True)
    assert (saved.preset, saved.official_weight_decay, saved.global_batch, saved.grad_accum) == ("disco-hap", True, None, 1)
    assert len(saved.data) == 2 and list_checkpoints(run) and load_model(run).pose_controlnet is None
    # The same output again without --resume, and --resume at the end: one-line usage errors.
    again = runner.invoke(app, ["train", "--stage", "pretrain", "--data", str(triplets["images"]), "--output",
                                str(run), "--model", "tiny", "--no-progress"])
    finished = runner.invoke(app, ["train", "--output", str(run), "--resume", "--no-progress"])
    changed = runner.invoke(app, ["train", "--output", str(run), "--resume", "--batch-size", "8", "--no-progress"])
    for outcome, words in ((again, "--resume"), (finished, "--max-steps"), (changed, "batch-size")):
        assert outcome.exit_code == 2 and words in outcome.output and "Traceback" not in outcome.output
        assert len(outcome.output.strip().splitlines()) == 1
    # What a resume may change with no flag (data_cpus, prefetch_batches), in a --config file:
    # applied (a YAML was dropped without a word); the YAML's other keys (its max_steps, keep,
    # lr) stay the saved run's or the flags'.
    more = tmp_path / "more.yaml"
    more.write_text("max_steps: 99\nkeep: 1\ndata_cpus: 0.5\nprefetch_batches: 3\nlr: 0.1\n")
    resumed = runner.invoke(app, ["train", "--output", str(run), "--resume", "--config", str(more), "--max-steps", "3",
                                  "--schedule-steps", "3"])
    assert resumed.exit_code == 0 and "trained to step 3" in resumed.output, resumed.output
    # A resume's progress lines count to its own end too (they had no total, and no last line).
    assert "progress: step 3/3, loss " in resumed.output, resumed.output
    saved = load_run_config(run)
    assert (saved.data_cpus, saved.prefetch_batches, saved.max_steps, saved.lr) == (0.5, 3, 3, 5e-4)
    assert saved.keep != 1
    from disco.commands.train import YAML_ONLY_RESUME_OPTIONS
    from disco.train.launch import RESUME_MAY_CHANGE

    assert YAML_ONLY_RESUME_OPTIONS <= RESUME_MAY_CHANGE
    # Exactly the changeable options no flag sets.
    flags = {p.name for p in typer.main.get_command(app).commands["train"].params}
    assert YAML_ONLY_RESUME_OPTIONS == {name for name in RESUME_MAY_CHANGE - flags if name != "resume"}
    # A job submitted with the time to checkpoint hears nothing of it; outside a job, neither.
    from disco.train.launch import job_stop_warning

    monkeypatch.setenv(JOB_STOP_WAIT_ENV, "300")
    assert job_stop_warning() is None
    monkeypatch.setenv(JOB_STOP_WAIT_ENV, "60")
    assert "gives this job 60 s" in job_stop_warning()
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV)
    assert job_stop_warning() is None
    # Fine-tuning from the HAP run: UNet, projection and background ControlNet come from it.
    cfg = _config(tmp_path, triplets, "ft", init_from=str(run), model_seed=0)
    model, hap = initial_model(cfg), load_model(run)
    for part in ("unet", "reference_projection", "background_controlnet"):
        ours, theirs = getattr(model, part).state_dict(), getattr(hap, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    assert model.pose_controlnet is not None
    # A fine-tuning run resumed (or its worker group restarted) after its first checkpoint reads
    # nothing of the HAP run: its checkpoint overwrites every weight HAP gave. Here the HAP run's
    # checkpoints are gone by then (pruned as it trained on, moved), and the resumed run still
    # reaches the weights of an uninterrupted one, bit for bit.
    whole = _config(tmp_path, triplets, "ft-whole", init_from=str(run), max_steps=4)
    train(whole)
    cut = _config(tmp_path, triplets, "ft-cut", init_from=str(run), max_steps=2, schedule_steps=4, checkpoint_every=2)
    train(cut)
    # Each pinned the HAP checkpoint it started from, and keeps its own copy of it.
    hap_checkpoint = list_checkpoints(run)[max(list_checkpoints(run))]
    pinned = Path(load_run_config(whole.output).init_from)
    assert pinned == Path(whole.output) / "hap-model" / hap_checkpoint.name
    assert all(torch.equal(load_model(pinned).unet.state_dict()[k], v) for k, v in hap.unet.state_dict().items())
    chosen, _ = resolve(_config(tmp_path, triplets, "ft-chosen", init_from=str(hap_checkpoint)))  # one checkpoint of it
    assert Path(chosen.init_from) == tmp_path / "ft-chosen" / "hap-model" / hap_checkpoint.name
    # A crash before the first checkpoint (a copy of a run without its checkpoints, its config.yaml
    # naming the copy's old place), the HAP run's checkpoints gone by then: --resume starts again
    # from the same HAP weights and reaches the weights of the run it copies, bit for bit.
    early = tmp_path / "ft-early"
    top = shutil.ignore_patterns("checkpoint-0*", "summary.json", "ray")
    shutil.copytree(cut.output, early, ignore=lambda folder, names: top(folder, names) if folder == cut.output else ())
    assert not list_checkpoints(early)
    hap_checkpoints = tmp_path / "hap-checkpoints"
    hap_checkpoints.mkdir()
    for folder in list_checkpoints(run).values():
        folder.rename(hap_checkpoints / folder.name)
    restarted, _ = resolve(TrainConfig(output=str(early), resume=True), given={"output", "resume"})
    assert Path(restarted.init_from) == early / "hap-model" / hap_checkpoint.name
    model = initial_model(restarted)
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in hap.unet.state_dict().items())
    train(TrainConfig(output=str(early), resume=True), given={"output", "resume"})
    first, copied = _weights(early), _weights(Path(cut.output))
    assert first.keys() == copied.keys() and all(torch.equal(first[k], copied[k]) for k in first)
    # Without that copy, such a run says what it misses, in one line.
    shutil.rmtree(early / "hap-model")
    for folder in list_checkpoints(early).values():
        shutil.rmtree(folder)
    with pytest.raises(ConfigError, match="has no checkpoint yet and starts from --init-from .*not there any more"):
        resolve(TrainConfig(output=str(early), resume=True), given={"output", "resume"})
    # After its first checkpoint a run reads nothing of the HAP run, not even its own copy: that
    # checkpoint overwrites every weight HAP gave.
    shutil.rmtree(Path(cut.output) / "hap-model")
    train(TrainConfig(output=cut.output, resume=True, max_steps=4), given={"output", "resume", "max_steps"})
    resumed, uninterrupted = _weights(Path(cut.output)), _weights(Path(whole.output))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # The --dry-run host plan of such a resume does not count the HAP model's build.
    from disco.train.memory import host_build_bytes, plan_config

    planned, notes = plan_config(TrainConfig(output=cut.output, resume=True))
    assert not [n for n in notes if "init-from" in n], notes
    assert host_build_bytes(planned) == host_build_bytes(planned.updated({"init_from": None}))
    assert host_build_bytes(planned) != host_build_bytes(load_run_config(whole.output))  # started from HAP


def test_cli_usage_errors_exit_2_with_one_line(triplets, tmp_path):
    runner = CliRunner()
    base = ["train", "--output", str(tmp_path / "r"), "--no-progress"]
    cases = [
        (["--data", str(tmp_path / "missing"), "--model", "tiny"], "no triplets/"),
        (["--data", str(triplets["video"])], "exactly one of --pretrained"),
        (["--data", str(triplets["video"]), "--model", "tiny", "--stage", "warmup"], "unknown stage"),
        (["--data", str(triplets["video"]), "--model", "tiny", "--mixed-precision", "fp8"], "mixed-precision"),
        (["--data", str(triplets["video"]), "--model", "tiny", "--stage", "pretrain", "--init-from", str(tmp_path)],
         "--init-from"),
        (["--output", str(tmp_path / "nothing"), "--resume"], "not a training run"),
        (["--data", str(triplets["video"]), "--model", "tiny", "--gpus-per-worker", "0.5"], "needs --use-gpu"),
        (["--data", str(triplets["video"]), "--model", "tiny", "--gpus-per-worker", "2"], "at most 1"),
        # Found on the driver: each worker found it after loading the model, and Ray Train retried.
        (["--data", str(triplets["images"]), "--model", "tiny", "--stage", "pretrain", "--num-workers", "4"],
         "2 training samples cannot fill 4 data shards"),
    ]
    for extra, words in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert words in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    # A run refused leaves no folder behind (the lock is taken before the options are checked), and a
    # --resume of a folder that is no run leaves nothing in it.
    assert not (tmp_path / "r").exists() and not (tmp_path / "nothing").exists()
    assert runner.invoke(app, ["train", "--output", str(tmp_path), "--resume"]).exit_code == 2
    assert not (tmp_path / ".lock").exists()


def test_workers_that_share_a_gpu_train_over_gloo(triplets, tmp_path):
    """NCCL refuses two ranks on one GPU: workers with a share below 1 (DDP on CUDA with one GPU)
    get gloo, which takes CUDA tensors; workers with a GPU each get NCCL, the CPU gloo."""
    from disco.train.launch import process_group_backend

    base = dict(model="tiny", data=[str(triplets["video"])], output=str(tmp_path / "r"), num_workers=2)
    assert process_group_backend(TrainConfig(**base)) == "gloo"
    assert process_group_backend(TrainConfig(**base, use_gpu=True)) == "nccl"
    assert process_group_backend(TrainConfig(**base, use_gpu=True, gpus_per_worker=0.5)) == "gloo"


def test_a_run_whose_loss_turns_nan_stops_before_writing_those_weights(triplets, tmp_path):
    """A diverging run (an lr far too high) went on with NaN weights: every checkpoint after it
    held them, and --keep pruned the good ones away. It now stops at the first log or checkpoint
    whose loss is not a number, and no checkpoint holds a NaN."""
    cfg = _config(tmp_path, triplets, "diverges", lr=1e8, max_steps=12, checkpoint_every=1, keep=2, log_every=1)
    with pytest.raises(ConfigError, match="the training loss became nan by step .*: the run diverged"):
        train(cfg)
    written = list_checkpoints(cfg.output)
    assert written and all(torch.isfinite(t).all() for step in written for t in _weights(Path(cfg.output), step).values())


def test_nan_weights_from_an_update_are_never_checkpointed(triplets, tmp_path, monkeypatch):
    """A step's loss is taken before its update: NaN gradients went into the weights, and the
    checkpoint of that very step held them with its loss still a number."""
    import disco.train.loop as loop

    real, updates = loop.apply_update, []

    def update_that_breaks_at_the_second(params, *args, **kwargs):
        applied = real(params, *args, **kwargs)
        updates.append(1)
        if len(updates) == 2:
            with torch.no_grad():
                params[0].fill_(float("nan"))
        return applied

    monkeypatch.setattr(loop, "apply_update", update_that_breaks_at_the_second)
    cfg = _config(tmp_path, triplets, "nan-weights", max_steps=4, checkpoint_every=1, keep=5, log_every=1)
    with pytest.raises(ConfigError, match="the trained weights hold NaN or inf values by step 2: the run diverged"):
        train(cfg)
    assert sorted(list_checkpoints(cfg.output)) == [1]
