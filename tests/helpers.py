"""Small media the tests make themselves, and running ``disco-cli`` as a process of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_counter_video(path: Path, frames: int, fps: float, size: int = 64) -> Path:
    """A clip whose frame k has grey level 2k + 10, so decoded frames can be told apart."""
    from disco.pipeline.demo_data import write_video

    levels = [np.full((size, size, 3), 10 + 2 * k, np.uint8) for k in range(frames)]
    return write_video(path, levels, fps)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def cli_process(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``disco-cli ARGS`` in a process of its own, with
    its own local Ray instance unless ARGS name ``--ray-address`` (a ``RAY_ADDRESS`` set around
    the tests must not leak in)."""
    return [sys.executable, "-m", "disco.cli", *args], {**os.environ, "RAY_ADDRESS": ""}


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path):
    """A process of its own that holds ``folder``'s lock (a run still writing it) until the block
    ends; yields that process."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from disco.pipeline.store.output import folder_lock\n"
         f"with folder_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def first_batch(folders: list[str], **settings) -> dict:
    """The first batch a training stream over ``folders`` reads (``SampleStream``'s settings)."""
    from disco.train.data import SampleStream, build_index

    stream = SampleStream(build_index(folders), **settings)
    try:
        return stream.next_batch()
    finally:
        stream.close()


def objective_on(model, batch: dict, repeats: int = 4) -> float:
    """The training objective of ``model`` on ``batch`` with fixed noise and timesteps, so that
    two models (before and after training) are compared on the same draws."""
    import torch

    from disco.model.conditioning import vae_factor
    from disco.train.inputs import model_inputs
    from disco.train.objective import DiffusionObjective, sample_draws

    objective = DiffusionObjective(model.eval())
    side = batch["target"].shape[-1] // vae_factor(model)
    shape = (model.unet.config.in_channels, side, side)
    with torch.no_grad():
        losses = [float(objective(**model_inputs(batch), **sample_draws(batch["position"] + 1000 * r, 7, shape, 1000, "cpu")))
                  for r in range(repeats)]
    return sum(losses) / repeats


# The options of ``two_worker_run``; a test repeats them (and adds its own) to get the same run.
TWO_WORKER_RUN = dict(stage="finetune", model="tiny", resolution=64, batch_size=2, num_workers=2, max_steps=16,
                      checkpoint_every=2, keep=10, log_every=4, sample_every=1000, sample_steps=2, warmup_steps=0)


class CodeRunningPickle:
    """Unpickling this runs code (it touches ``marker``): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def submit_job(client, entrypoint: str, env_vars: dict[str, str]) -> str:
    """``client.submit_job`` (Ray's job API) once the head's job agent has registered with the
    dashboard, which it does a while after the cluster starts; the job's id."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env_vars})
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def agreed_checkpoint_rank(rank: int, store: str, run: str, pointers: list[str], visible: list[list[list[int]]],
                           out: str) -> None:
    """One rank of a two-process gloo group (``torch.multiprocessing.spawn``): for each case, where
    the loop starts when Ray Train points at ``pointers[case]`` and this rank's view of the shared
    run directory lists the steps ``visible[case][rank]`` only (a node whose NFS view lags)."""
    import json

    import ray.train
    import torch.distributed as dist

    from disco.pipeline.errors import ConfigError
    from disco.train import loop
    from disco.train.collectives import Collectives

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    every = loop.list_checkpoints
    results = []
    for pointer, views in zip(pointers, visible):
        loop.list_checkpoints = lambda folder, seen=views[rank]: {s: p for s, p in every(folder).items() if s in seen}
        ray.train.get_checkpoint = lambda pointer=pointer: ray.train.Checkpoint.from_directory(pointer)
        try:
            start = loop._agreed_checkpoint(Collectives(2, "cpu"), {"config": {"output": run}}, True)
            results.append(Path(start).name)
        except ConfigError as exc:
            results.append(f"error: {exc}")
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def garbled_copy(source: Path, dest: Path) -> Path:
    """A copy of the preprocessed folder ``source`` whose every picture is garbage (JPEG's
    start bytes, then text): no row decodes."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from disco.pipeline.store.schema import TRIPLET_SCHEMA

    shutil.copytree(source, dest)
    for shard in (dest / "triplets").glob("*.parquet"):
        table = pq.read_table(shard)
        junk = pa.array([b"\xff\xd8 not a picture"] * table.num_rows, pa.binary())
        table = table.set_column(table.schema.get_field_index("image"), "image", junk)
        pq.write_table(table.cast(TRIPLET_SCHEMA), shard, row_group_size=4)
    return dest


def faststart_clip(path: Path, frames: list[np.ndarray], fps: int, turn: int = 0) -> Path:
    """H.264 with its index at the front (``+faststart``, as web downloads are) and a keyframe
    every 10 frames: cut short, it still opens, and its first frames still decode. ``turn``: a
    display rotation (counter-clockwise degrees, as a phone writes)."""
    import av
    import pytest

    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=fps, options={"x264-params": "scenecut=0"})  # keyframes every 10 only
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.gop_size = 10
        if turn:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display rotation")
            stream.set_display_rotation(turn)
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


def cut_clip(folder: Path, decord_opens: bool = True, turn: int = 0, width: int = 256) -> tuple[Path, bytes]:
    """A 40-frame 256 px clip (``faststart_clip``) and its bytes cut short. ``decord_opens``: cut
    inside frame 20's keyframe, where decord still opens the file; else inside the first frame
    after it whose cut decord cannot open (FFmpeg's reader meets invalid data as decord lists the
    packets: two cuts in three, at random)."""
    import av
    import decord
    import pytest
    from skimage import data

    if "libx264" not in av.codecs_available:
        pytest.skip("PyAV without libx264")
    from disco.pipeline.demo_data import pan_zoom_frames

    frames = [frame[:, :width] for frame in pan_zoom_frames(data.astronaut(), 40, 256)]
    whole = faststart_clip(folder / "whole.mp4", frames, 30, turn)
    with av.open(str(whole)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    assert packets[20].is_keyframe
    content = whole.read_bytes()
    for packet in packets[20:] if not decord_opens else packets[20:21]:
        cut = content[:packet.pos + packet.size // 2]
        (folder / "probe.mp4").write_bytes(cut)
        try:
            decord.VideoReader(str(folder / "probe.mp4"))
            opens = True
        except Exception:  # noqa: BLE001 - decord's DECORDError
            opens = False
        if opens == decord_opens:
            return whole, cut
    raise AssertionError("no cut of the clip that decord cannot open")
