"""Generation with a tiny random model: playable videos, one frame per pose frame, seeds, composition,
preprocessed clips as pose sources, ``evaluate --run`` and the command line's usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from disco.cli import app
from disco.model.checkpoint import load_checkpoint
from disco.model.conditioning import background_pixels, pose_pixels, pose_size
from disco.generate.config import GenerateInputError
from disco.generate.inputs import matte_reference
from disco.model.pipeline import DisCoPipeline
from disco.generate.run import conditions_from_reference
from disco.generate.video import read_video, write_frames
from disco.model.disco import DisCoModel
from disco.pipeline.annotators import FrameAnnotator
from disco.pipeline.demo_data import pan_zoom_frames, write_video
from disco.pipeline.store.encode import build_row
from disco.pipeline.store.reader import open_triplets
from disco.pipeline.store.schema import TRIPLET_SCHEMA

SIZE = 64  # the tiny model: 16 x 16 latents, 128 px pose pictures
POSE_FRAMES = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    model = DisCoModel.from_architecture("tiny", variant="finetune")
    with torch.no_grad():  # move the zero convolutions so the pose and background branches matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    model.save_pretrained(folder / "ckpt")
    Image.fromarray(data.astronaut()).save(folder / "person.png")
    Image.fromarray(data.coffee()).save(folder / "scene.png")
    write_video(folder / "dance.mp4", pan_zoom_frames(data.astronaut(), POSE_FRAMES, 96), fps=10)
    return folder


@pytest.fixture(scope="module")
def pipeline(inputs):
    return DisCoPipeline(load_checkpoint(inputs / "ckpt"))


@pytest.fixture(scope="module")
def conditions(pipeline):
    """The astronaut as reference: CLIP input and own background, matted once."""
    return conditions_from_reference(pipeline, data.astronaut(), SIZE)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_writes_a_playable_video_with_one_frame_per_pose_frame(inputs, tmp_path):
    out = tmp_path / "out.mp4"
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", out, "--steps", 2, "--size", SIZE, "--fps", 12,
                  "--batch-size", 4, "--side-by-side", "--frames", tmp_path / "frames")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # (the console wraps long lines)
    assert "seed 0, float32 on cpu" in said and "--dtype float16" not in said
    # No terminal shows the bar here (as in a `ray job submit` log): lines say how far it is, the
    # last one of each phase at its end.
    assert f"progress: annotating poses {POSE_FRAMES}/{POSE_FRAMES} frames" in said
    assert f"progress: generating {POSE_FRAMES}/{POSE_FRAMES} frames" in said
    frames, fps = read_video(out)  # decord reads it back
    # --fps 12 above the 10 fps source: every pose frame, played at the source's rate (not faster).
    assert frames.shape == (POSE_FRAMES, SIZE, SIZE, 3) and fps == pytest.approx(10)
    assert frames.std() > 1  # a picture, not a blank
    pair, _ = read_video(tmp_path / "out_side_by_side.mp4")
    assert pair.shape == (POSE_FRAMES, SIZE, 2 * SIZE, 3)
    for video in (out, tmp_path / "out_side_by_side.mp4"):  # what browsers play
        assert _codec(video) == ("h264", "yuv420p", True)
    assert np.abs(pair[:, :, SIZE:].astype(int) - frames).mean() < 8  # pose | generated (each encoded once)
    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert len(pngs) == POSE_FRAMES and np.asarray(Image.open(pngs[0])).shape == (SIZE, SIZE, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["frames"] == POSE_FRAMES and record["settings"]["steps"] == 2
    assert record["checkpoint"] == {"path": str(inputs / "ckpt"), "kind": "save_pretrained"}


@pytest.mark.parametrize("source,max_side,face", [((512, 512), None, False), ((640, 360), None, False),
                                                  ((1920, 1080), 1024, True)])
def test_a_driving_videos_skeletons_are_as_thick_as_the_ones_training_drew(tmp_path, source, max_side, face):
    """Training draws each skeleton on its stored frame (short side up to 512 px at the default
    --max-side) and shrinks the crop to 256; lines and joints are fixed pixel counts. generate drew
    a driving video's skeletons straight at 256: a square video's limbs came out twice as thick as
    those the model learnt. Now drawn as training draws them: the same picture of the same pose,
    at the training data's --max-side and with its face points (``trained_drawing``)."""
    from types import SimpleNamespace

    from disco.generate.inputs import poses_from_video
    from disco.pipeline.decode import target_size
    from disco.pipeline.store.pose import row_pose
    from disco.train.augment import apply_box, crop_box

    width, height = source
    write_video(tmp_path / "v.mp4", [np.zeros((height, width, 3), np.uint8)] * 2, fps=10)
    # One pose, in fractions of the centre square: a standing figure, arms out.
    fractions = np.array([[0.5, 0.15], [0.5, 0.3], [0.35, 0.3], [0.25, 0.45], [0.15, 0.55], [0.65, 0.3],
                          [0.75, 0.45], [0.85, 0.55], [0.42, 0.6], [0.42, 0.78], [0.42, 0.95], [0.58, 0.6],
                          [0.58, 0.78], [0.58, 0.95], [0.47, 0.12], [0.53, 0.12], [0.44, 0.14], [0.56, 0.14]],
                         np.float32)

    def body(side: float, left: float = 0.0, top: float = 0.0) -> np.ndarray:
        points = np.ones((18, 3), np.float32)
        points[:, :2] = fractions * side + [left, top]
        return points

    def face_points(side: float, left: float = 0.0, top: float = 0.0) -> np.ndarray:
        angles = np.linspace(0, 2 * np.pi, 70, endpoint=False)
        points = np.ones((70, 3), np.float32)
        points[:, 0], points[:, 1] = 0.5 + 0.05 * np.cos(angles), 0.12 + 0.05 * np.sin(angles)
        points[:, :2] = points[:, :2] * side + [left, top]
        return points

    class OnePose:
        def annotate(self, frame):
            return SimpleNamespace(pose=SimpleNamespace(body=body(frame.shape[0]), hands=None,
                                                        face=face_points(frame.shape[0])))

        def close(self):
            pass

    (drawn, _), side = poses_from_video(tmp_path / "v.mp4", 256, annotator=OnePose(), hands=False, face=face,
                                        max_side=max_side).frames, 256
    # The training path: the frame as preprocess stores it, its keypoints, the pose drawn there,
    # the centre square cropped and shrunk to the training size.
    stored_w, stored_h = target_size(width, height, max_side or 512)
    square_side = min(stored_w, stored_h)
    left, top = (stored_w - square_side) / 2, (stored_h - square_side) / 2
    picture = row_pose(stored_w, stored_h, body(square_side, left, top), None,
                       face_points(square_side, left, top) if face else None, "openpose", False)
    trained = apply_box(picture, crop_box(stored_h, stored_w, "finetune", 0, augment=False), side)
    lit, lit_trained = (drawn.max(axis=2) > 0).mean(), (trained.max(axis=2) > 0).mean()
    assert lit == pytest.approx(lit_trained, rel=0.08), (lit, lit_trained)
    assert np.abs(drawn.astype(int) - trained.astype(int)).mean() < 6


def test_poses_from_a_video_use_the_pipelines_annotators_and_renderer(tmp_path):
    from disco.generate.inputs import poses_from_video

    frames = pan_zoom_frames(data.astronaut(), 4, 96) + [np.zeros((96, 96, 3), np.uint8)] * 2
    write_video(tmp_path / "v.mp4", frames, fps=10)
    poses = poses_from_video(tmp_path / "v.mp4", 128)
    assert len(poses.frames) == 6 and poses.fps == pytest.approx(10) and poses.empty == 2
    assert all(p.shape == (128, 128, 3) for p in poses.frames)
    assert poses.frames[0].any() and not poses.frames[-1].any()  # a skeleton, then empty ones
    assert len(poses_from_video(tmp_path / "v.mp4", 128, fps=5).frames) == 3  # resampled, not stretched
    # Never up-sampled: the rate stays the video's. --max-frames: only those frames are annotated.
    assert poses_from_video(tmp_path / "v.mp4", 128, fps=25).fps == pytest.approx(10)
    annotated = []
    first = poses_from_video(tmp_path / "v.mp4", 128, max_frames=2, progress=lambda *done: annotated.append(done))
    assert len(first.frames) == 2 and first.empty == 0 and annotated == [(2, 2)]
    # A long video reports as it goes: after every batch of frames annotated.
    batches, opened = [], []
    import disco.pipeline.decode as decode

    real_open = decode._open_video
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "_open_video", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
        assert len(poses_from_video(tmp_path / "v.mp4", 128, batch=4, progress=lambda *done: batches.append(done)).frames) == 6
    assert batches == [(4, 6), (6, 6)]
    # Opened once for its frames, besides the probe: a batch opened anew seeks back to its
    # keyframe and decodes from there (5x the decoding of a 720p video with 250-frame GOPs).
    assert len(opened) == 2, opened
    assert all(np.array_equal(a, b) for a, b in zip(first.frames, poses.frames))


def test_a_large_driving_video_is_decoded_at_the_size_it_is_annotated_at(tmp_path):
    """A phone's 4K driving video was decoded whole-size (800 MB a batch of 32 frames) to be shrunk
    to a 256 px square frame by frame: it is decoded at that size, the skeletons as before."""
    import disco.generate.inputs as inputs
    import disco.pipeline.decode as decode

    person = pan_zoom_frames(data.astronaut(), 3, 360)
    write_video(tmp_path / "v.mp4", [np.pad(f, ((0, 0), (140, 140), (0, 0)), constant_values=90) for f in person], fps=10)
    opened, real_open = [], decode._open_video
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "_open_video", lambda *a, **k: (opened.append(k), real_open(*a, **k))[1])
        small = inputs.poses_from_video(tmp_path / "v.mp4", 128, hands=False)
        patch.setattr(inputs, "cover_size", lambda width, height, side: (width, height))  # as before: whole size
        whole = inputs.poses_from_video(tmp_path / "v.mp4", 128, hands=False)
    assert opened[1] == {"width": 455, "height": 256}  # the short side at the 256 px analysed (after the probe's open)
    assert opened[3] == {"width": 640, "height": 360}
    assert small.empty == whole.empty == 0
    for a, b in zip(small.bodies, whole.bodies):
        found = (a[:, 2] > 0) & (b[:, 2] > 0)
        gap = np.abs(a[found, :2] - b[found, :2])  # px of the 128 px picture
        assert found.sum() >= 10 and np.median(gap) < 1 and gap.max() < 6


def test_a_run_that_stops_keeps_its_frames_and_the_same_command_samples_only_the_rest(inputs, tmp_path):
    """A long driving video is hours of sampling: a run that ran out of GPU memory (or was killed)
    at its second batch lost every frame. Its finished batches stay beside the output; the same
    command again, at the smaller --batch-size the message asks for, samples only the others, and
    its video has the frames of a run that never stopped."""
    import disco.model.pipeline as sampling

    common = ["generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png", "--pose",
              inputs / "dance.mp4", "--steps", 2, "--size", SIZE, "--no-align-pose"]
    whole = _run(*common, "--batch-size", 2, "--output", tmp_path / "whole.mp4", "--frames", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    real, sampled = sampling._sample, []

    def sample(model, scheduler, noise, *args):
        if stops_at is not None and len(sampled) == stops_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sampled.append(len(noise))
        return real(model, scheduler, noise, *args)

    out, partial = tmp_path / "out.mp4", tmp_path / "out.mp4.partial"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_sample", sample)
        stops_at = 1
        stopped = _run(*common, "--batch-size", 2, "--output", out)
        said = " ".join(stopped.output.split())
        assert stopped.exit_code == 2 and "lower --batch-size" in said and str(partial) in said, said
        assert not out.exists() and sampled == [2] and len(list(partial.glob("frames-*.npz"))) == 1
        (partial / "frames-00000004.npz").write_bytes(b"")  # emptied by a crash: sampled again, not a stop
        stops_at, sampled = None, []
        again = _run(*common, "--batch-size", 1, "--output", out, "--frames", tmp_path / "again")
        assert again.exit_code == 0, again.output
    assert sampled == [1] * (POSE_FRAMES - 2)  # the two frames of the first run are not sampled again
    assert f"resuming: 2 of {POSE_FRAMES} frames" in " ".join(again.output.split())
    frames = [np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))])
              for name in ("whole", "again")]
    assert frames[0].shape == frames[1].shape == (POSE_FRAMES, SIZE, SIZE, 3)
    assert np.array_equal(frames[1][:2], frames[0][:2])  # kept as the stopped run sampled them
    assert np.abs(frames[1].astype(int) - frames[0].astype(int)).max() <= 1  # the rest at batch 1, not 2
    assert not partial.exists()  # the video is written: the kept frames go
    # Kept frames of a run with other settings (another seed) are not taken for this one's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_sample", sample)
        stops_at, sampled = 1, []
        assert _run(*common, "--batch-size", 2, "--output", out).exit_code == 2 and partial.exists()
        stops_at, sampled = None, []
        other = _run(*common, "--batch-size", 3, "--output", out, "--seed", 1)
    assert other.exit_code == 0 and "resuming" not in other.output and sampled == [3, 3] and not partial.exists()
    # Nor those of a run whose `auto` annotators were others (stopped on a GPU node with
    # $DISCO_WEIGHTS: DWPose and SAM; resumed where MediaPipe runs).
    import disco.generate.run as run_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_sample", sample)
        stops_at, sampled = 1, []
        assert _run(*common, "--batch-size", 2, "--output", out).exit_code == 2 and partial.exists()
        stops_at, sampled = None, []
        patch.setattr(run_module, "annotator_backends", lambda *a, **k: {"matting": "grounded-sam", "pose": "dwpose"})
        other = _run(*common, "--batch-size", 3, "--output", out)
    assert other.exit_code == 0 and "resuming" not in other.output and sampled == [3, 3] and not partial.exists()
    # Stopped by a SIGTERM (`ray job stop`) after its first batch: it says what it kept, exit 130
    # (it died without a word; here Ray's handler would have exited 15).
    import os
    import signal
    import sys

    def stopping(model, scheduler, noise, *args):
        if sampled:
            os.kill(os.getpid(), signal.SIGTERM)
        sampled.append(len(noise))
        return real(model, scheduler, noise, *args)

    ray_like = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(15))  # as Ray's handler
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sampling, "_sample", stopping)
            sampled = []
            stopped = _run(*common, "--batch-size", 2, "--output", out)
    finally:
        signal.signal(signal.SIGTERM, ray_like)
    said = " ".join(stopped.output.split())
    assert stopped.exit_code == 130 and " interrupted (the 1 batch(es) of frames it finished are kept in" in said, said
    assert len(list(partial.glob("frames-*.npz"))) == 1


def test_kept_frames_are_known_by_their_checkpoints_and_inputs_files(tmp_path):
    """The key of kept frames names the files by content (a checkpoint re-exported under the same
    path, or a photo replaced, is another run), reading a big file's ends only."""
    from disco.generate.partial import file_identity

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "weights.safetensors"
    weights.write_bytes(b"a" * (3 << 20))
    before = file_identity(model)
    weights.write_bytes(b"b" + b"a" * ((3 << 20) - 1))  # same size, other bytes
    assert file_identity(model) != before and file_identity(weights) != file_identity(tmp_path / "nothing")
    assert file_identity(tmp_path / "nothing") is None and file_identity(None) is None

def test_the_same_seed_gives_the_same_frames_and_batching_does_not_matter(pipeline, inputs, conditions):
    reference, background = conditions
    side = pose_size(pipeline.model, SIZE)
    poses = pose_pixels([np.asarray(Image.open(inputs / "person.png"))] * 3, side)
    run = dict(num_inference_steps=2, guidance_scale=1.5)
    a = pipeline(reference, background, poses, seed=7, batch_size=3, **run)
    b = pipeline(reference, background, poses, seed=7, batch_size=3, **run)
    c = pipeline(reference, background, poses, seed=8, batch_size=3, **run)
    d = pipeline(reference, background, poses, seed=7, batch_size=1, **run)
    assert a.shape == (3, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a.astype(int) - d.astype(int)).max() <= 1  # same noise per frame whatever the batch
    # The poses are held as uint8 (a quarter of a float copy: a long video's poses at 512 px), made
    # [0, 1] a batch at a time: the frames of float poses.
    from disco.model.conditioning import unit_pose

    assert poses.dtype == torch.uint8
    assert np.array_equal(pipeline(reference, background, unit_pose(poses), seed=7, batch_size=3, **run), a)


def test_a_replica_is_made_on_its_own_device_without_a_second_copy_on_the_first(inputs, monkeypatch):
    """--gpus N: each replica's tensors are made on its device directly; ``deepcopy(model).to(dev)``
    made a whole second copy on the primary GPU first. Here the replica goes to the meta device,
    and copying any parameter or buffer where it is fails: the copy never does."""
    from disco.model.pipeline import copy_to

    model = load_checkpoint(inputs / "ckpt")

    def refused(self, memo):
        raise AssertionError("a tensor of the model was copied on its own device")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refused)
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refused)
    replica = copy_to(model, "meta")
    monkeypatch.undo()
    ours, theirs = dict(model.named_parameters()), dict(replica.named_parameters())
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, parameter in theirs.items():
        assert parameter.is_meta and isinstance(parameter, torch.nn.Parameter)
        assert parameter.shape == ours[name].shape and parameter.requires_grad == ours[name].requires_grad
        assert ours[name].device.type == "cpu"
    assert all(buffer.is_meta for buffer in replica.buffers())
    assert sum(1 for _ in replica.buffers()) == sum(1 for _ in model.buffers())


def test_frames_spread_over_several_devices_are_the_frames_of_one(inputs, conditions):
    """--gpus N: a copy of the model per device, the batches dealt out among them, one thread
    each. Two CPU "devices" here (the threads and the copies are the real path; CUDA's streams
    are not): the same frames, in order, as on one, and progress adds up to every frame."""
    reference, background = conditions
    pipeline = DisCoPipeline(load_checkpoint(inputs / "ckpt"))
    side = pose_size(pipeline.model, SIZE)
    person = np.asarray(Image.open(inputs / "person.png"))
    poses = pose_pixels([person, person[:, ::-1].copy(), person[::-1].copy()] * 3, side)  # 9 frames: 4 batches of 2
    run = dict(num_inference_steps=2, guidance_scale=1.5, seed=3, batch_size=2)
    one = pipeline(reference, background, poses, **run)
    pipeline.spread(["cpu"])
    assert len(pipeline.replicas) == 1 and pipeline.replicas[0] is not pipeline.model
    grad_modes: list[bool] = []  # in the replica's thread too (grad mode is per thread)
    pipeline.replicas[0].unet.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    told: list[int] = []
    spread = pipeline(reference, background, poses, progress=told.append, **run)
    assert np.array_equal(spread, one) and sum(told) == 9 and sorted(told) == [1, 2, 2, 2, 2]
    assert grad_modes and not any(grad_modes)
    # A device that fails (out of memory on its first batch) stops the others after their current
    # batch, and its error comes then: they went on with their whole share first (hours of a long
    # video on real GPUs) and every frame was lost anyway.
    import disco.model.pipeline as sampling

    import threading

    real, primary, failed = sampling._sample, [], threading.Event()

    def failing(model, *args):
        if model is pipeline.replicas[0]:
            failed.set()
            raise RuntimeError("CUDA out of memory (the replica's device)")
        primary.append(1)
        failed.wait(60)  # the primary's first batch ends after the replica's error
        return real(model, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_sample", failing)
        with pytest.raises(RuntimeError, match="the replica's device"):
            pipeline(reference, background, poses, **{**run, "batch_size": 1})  # 5 batches are the primary's
    assert 1 <= len(primary) <= 2
    # The command refuses more GPUs than there are, before a model loads.
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png", "--pose",
                  inputs / "dance.mp4", "--output", "o.mp4", "--gpus", 2, "--device", "cpu")
    assert result.exit_code == 2 and "--gpus 2 needs CUDA devices" in result.output, result.output
    # In a `ray job submit` job the driver sees the GPUs its entrypoint reserved: the line says so.
    from disco.model.precision import gpus_problem
    from disco.pipeline.cluster import RAY_JOB_CONFIG_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        assert "entrypoint" not in gpus_problem(2, "cuda:0")
        patch.setenv(RAY_JOB_CONFIG_ENV, "{}")
        assert "submit it with --entrypoint-num-gpus 2" in gpus_problem(2, "cuda:0")


def test_the_pose_embedding_cache_changes_nothing(pipeline, monkeypatch, conditions):
    import contextlib

    import disco.model.pipeline as module

    reference, background = conditions
    side = pose_size(pipeline.model, SIZE)
    poses = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    embedding = pipeline.model.pose_controlnet.controlnet_cond_embedding
    cached = pipeline(reference, background, poses, num_inference_steps=3, seed=1)
    assert pipeline.model.pose_controlnet.controlnet_cond_embedding is embedding  # restored
    monkeypatch.setattr(module, "pose_embedding_cache", lambda model: contextlib.nullcontext())
    assert np.array_equal(pipeline(reference, background, poses, num_inference_steps=3, seed=1), cached)


def test_guidance_uses_the_unconditional_reference(pipeline, conditions):
    """Scale 1 is the conditional prediction alone; another scale moves the result."""
    reference, background = conditions
    poses = torch.zeros(1, 3, pose_size(pipeline.model, SIZE), pose_size(pipeline.model, SIZE))
    plain = pipeline(reference, background, poses, num_inference_steps=2, guidance_scale=1.0, seed=0)
    guided = pipeline(reference, background, poses, num_inference_steps=2, guidance_scale=3.0, seed=0)
    assert not np.array_equal(plain, guided)


def test_background_composition_replaces_the_scene(pipeline, inputs, tmp_path):
    person = data.astronaut()
    matted = matte_reference(person, SIZE)
    own_ref, own_bg = conditions_from_reference(pipeline, person, SIZE)
    scene = data.coffee()
    other_ref, other_bg = conditions_from_reference(pipeline, person, SIZE, background=scene)
    assert torch.equal(own_ref, other_ref)  # the person is the same
    assert torch.equal(other_bg, background_pixels(scene, SIZE))
    # The own background has the person cut out: mid grey (0 in [-1, 1]), the official value.
    person_pixels = torch.from_numpy(matted.alpha >= 128)
    assert (own_bg[0][:, person_pixels] == 0).all() and person_pixels.float().mean() > 0.1
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--background", inputs / "scene.png", "--output", tmp_path / "a.mp4",
                  "--steps", 2, "--size", SIZE, "--max-frames", 2)
    assert result.exit_code == 0, result.output
    _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
         "--pose", inputs / "dance.mp4", "--output", tmp_path / "b.mp4", "--steps", 2, "--size", SIZE, "--max-frames", 2)
    composed, own = read_video(tmp_path / "a.mp4")[0], read_video(tmp_path / "b.mp4")[0]
    assert composed.shape == own.shape == (2, SIZE, SIZE, 3)
    assert np.abs(composed.astype(int) - own.astype(int)).mean() > 0.5


def _write_triplets(folder, frames, clip_id, split):
    """Real triplet rows (the pipeline's annotators and row builder) for one clip, written as a shard."""
    annotator = FrameAnnotator("mediapipe", "mediapipe", True, 0.5, 0.01)
    unit = {"source": "video", "clip_id": clip_id, "split": split, "input_path": f"{clip_id}.mp4"}
    rows = [build_row(unit, i, i / 10, f, annotator.annotate(f), image_format="png", jpeg_quality=95,
                      pose_style="openpose", with_pose=True) for i, f in enumerate(frames)]
    annotator.close()
    (folder / "triplets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), folder / "triplets" / f"{clip_id}.parquet")


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triplets")
    frames = pan_zoom_frames(data.astronaut(), 17, 96)
    _write_triplets(folder, frames, "dance", "test")
    _write_triplets(folder, frames[:3], "other", "train")
    return folder


def test_poses_from_a_preprocessed_clip(inputs, triplets, tmp_path):
    out = tmp_path / "clip.mp4"
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", triplets, "--clip", "dance", "--output", out, "--steps", 1, "--size", SIZE,
                  "--max-frames", 3)
    assert result.exit_code == 0, result.output
    frames, fps = read_video(out)
    assert frames.shape == (3, SIZE, SIZE, 3) and fps == pytest.approx(10)  # the clip's own rate
    # --fps resamples the stored poses as it does a pose video's, and the output plays at that
    # rate; above the clip's own rate nothing is up-sampled and the video keeps the clip's speed.
    from disco.generate.inputs import poses_from_triplets

    every = poses_from_triplets(triplets, "dance", 32).frames
    halved = poses_from_triplets(triplets, "dance", 32, fps=5)
    assert halved.fps == pytest.approx(5) and len(halved.frames) == 9
    assert all(np.array_equal(a, every[2 * k]) for k, a in enumerate(halved.frames))
    assert len(poses_from_triplets(triplets, "dance", 32, fps=5, max_frames=4).frames) == 4
    faster = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", triplets, "--clip", "dance", "--output", out, "--steps", 1, "--size", SIZE,
                  "--max-frames", 3, "--fps", 30)
    assert faster.exit_code == 0, faster.output
    assert read_video(out)[1] == pytest.approx(10) and json.loads(out.with_suffix(".json").read_text())["fps"] == 10
    bad = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
               "--pose", triplets, "--clip", "nope", "--output", out)
    assert bad.exit_code == 2 and "clip 'nope' is not in" in bad.output


def test_evaluate_run_cuts_the_background_from_the_picture_as_training_does(inputs, triplets, tmp_path, monkeypatch):
    """evaluate --run fed the model the stored background (cut at the stored size, then shrunk: the
    cut's black blended into the hole's edge); training and generate cut it from the whole picture
    at the size used. The background it feeds is now the one cut from the clip's first picture."""
    from types import SimpleNamespace

    import disco.generate.run as generate_run
    from disco.generate.inputs import read_clip
    from disco.model.conditioning import background_pixels
    from disco.pipeline.store.encode import decode_picture

    fed = []

    def pipeline(reference, background, poses, **options):
        fed.append(background)
        return np.zeros((len(poses), SIZE, SIZE, 3), np.uint8)

    stub = SimpleNamespace(device=torch.device("cpu"), background_hole=0.0, source={"path": "stub"})
    monkeypatch.setattr(generate_run, "open_pipeline", lambda *a, **k: (_Callable(pipeline, stub), SIZE, 2 * SIZE))
    result = _run("evaluate", "--run", inputs / "ckpt", "--data", triplets, "--split", "test", "--metrics", "l1",
                  "--steps", 1, "--size", SIZE, "--output", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    first = read_clip(triplets, "dance", ["image", "mask", "background"], split="test")[0]
    mask = decode_picture(first["mask"], grayscale=True)
    cut = background_pixels(decode_picture(first["image"]), SIZE, mask, 0.0)
    stored = background_pixels(decode_picture(first["background"]), SIZE, mask, 0.0)
    assert len(fed) == 1 and torch.equal(fed[0], cut)
    assert not torch.equal(cut, stored)  # the stored one's rim


class _Callable:
    """A stand-in pipeline: called like one, with the attributes evaluate reads."""

    def __init__(self, call, attributes):
        self._call = call
        self.__dict__.update(vars(attributes))

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def test_evaluate_run_generates_the_test_split_and_scores_it(inputs, triplets, tmp_path, monkeypatch):
    from disco.model.pipeline import DisCoPipeline

    report_path = tmp_path / "report.json"
    command = ["evaluate", "--run", inputs / "ckpt", "--data", triplets, "--split", "test", "--metrics",
               "ssim,psnr,l1", "--steps", 1, "--size", SIZE, "--batch-size", 8, "--output", report_path]
    result = _run(*command)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    test_rows = open_triplets(triplets).to_table(columns=["split"]).column("split").to_pylist().count("test")
    assert report["counts"] == {"sequences": 1, "frames": test_rows, "clips": test_rows - 15,
                                "frame_sizes": {f"{SIZE}x{SIZE}": test_rows}}  # the model's squares
    assert report["generated"]["clips"] == 1 and report["generated"]["frames"] == test_rows
    pred = sorted((tmp_path / "report" / "pred" / "dance").glob("*.png"))
    gt = sorted((tmp_path / "report" / "gt" / "dance").glob("*.png"))
    assert len(pred) == len(gt) == test_rows
    # The real frames are the stored images at the generated size.
    assert np.asarray(Image.open(gt[0])).shape == (SIZE, SIZE, 3)
    assert 0 < report["metrics"]["psnr"] < 100 and -1 <= report["metrics"]["ssim"] < 1
    assert report["settings"]["run"] == str(inputs / "ckpt") and report["settings"]["steps"] == 1
    # The same command again (after a crash or a Ctrl-C, at scale): the clips it finished with the
    # same checkpoint and settings are kept, none generated again (another batch size or metric
    # changes no frame).
    work, scored = tmp_path / "report", report["metrics"]

    def generated_again(*args, **kwargs):
        raise AssertionError("a finished clip was generated again")

    with monkeypatch.context() as patch:
        patch.setattr(DisCoPipeline, "__call__", generated_again)
        kept = _run(*command[:-3], 4, "--output", report_path)
        # The same checkpoint copied elsewhere (new times; a job's copy, another mount): its
        # files were known by path, size and time, and the finished clips were deleted.
        import shutil

        shutil.copytree(inputs / "ckpt", tmp_path / "copied")
        moved = _run("evaluate", "--run", tmp_path / "copied", *command[3:-3], 4, "--output", report_path)
        # A work folder an earlier version marked (the checkpoint by path, sizes and times) keeps
        # its clips too: they were hours of GPU time at scale.
        from disco.evaluate.run import WORK_MARK, _model_identity_by_path

        legacy = json.loads((work / WORK_MARK).read_text())
        legacy["checkpoint"] = json.loads(json.dumps(_model_identity_by_path(
            {"path": str(inputs / "ckpt"), "kind": "save_pretrained"})))
        (work / WORK_MARK).write_text(json.dumps(legacy))
        upgraded = _run(*command[:-3], 4, "--output", report_path)
    assert upgraded.exit_code == 0 and "resuming: 1 of 1 clips" in upgraded.output, upgraded.output
    assert json.loads((work / WORK_MARK).read_text())["checkpoint"] != legacy["checkpoint"]  # rewritten
    assert kept.exit_code == 0, kept.output
    assert "resuming: 1 of 1 clips" in kept.output
    assert moved.exit_code == 0 and "resuming: 1 of 1 clips" in moved.output, moved.output
    report = json.loads(report_path.read_text())
    assert report["generated"]["clips_kept"] == 1 and report["generated"]["frames"] == test_rows
    assert report["metrics"] == scored
    # A clip a crash cut short (its gt/ renamed into place, its pred/ still being written) is
    # made again, and a folder in the making is never scored.
    (work / "pred" / "dance").rename(work / "pred" / ".tmp-dance")
    redone = _run(*command)
    assert redone.exit_code == 0, redone.output
    report = json.loads(report_path.read_text())
    assert report["generated"]["clips_kept"] == 0 and report["metrics"] == scored
    assert sorted(p.name for p in (work / "pred").iterdir()) == ["dance"]
    assert len(list((work / "pred" / "dance").glob("*.png"))) == test_rows
    # Run again into the same folder with fewer frames: only this run's frames are scored, none
    # left from the first run or from a clip it no longer generates.
    for side in ("pred", "gt"):
        write_frames(tmp_path / "report" / side / "old_clip", np.zeros((3, SIZE, SIZE, 3), np.uint8))
    again = _run("evaluate", "--run", inputs / "ckpt", "--data", triplets, "--split", "test", "--metrics",
                 "psnr", "--steps", 1, "--size", SIZE, "--max-frames", 4, "--output", report_path)
    assert again.exit_code == 0, again.output
    assert json.loads(report_path.read_text())["counts"]["frames"] == 4
    assert sorted(p.name for p in (tmp_path / "report" / "pred").iterdir()) == ["dance"]
    assert len(list((tmp_path / "report" / "pred" / "dance").glob("*.png"))) == 4
    # A --run still writing the work folder (its lock held) keeps a second one out, in one line.
    from helpers import lock_held_elsewhere

    with lock_held_elsewhere(tmp_path / "report"):
        busy = _run(*command)
    assert busy.exit_code == 2 and "being written by another run" in busy.output, busy.output
    assert len(busy.output.strip().splitlines()) == 1
    # pred/ and gt/ without its mark (a user's frames, laid out as ours) are refused, not deleted.
    (tmp_path / "report" / ".disco-evaluate-run").unlink()
    mine = _run("evaluate", "--run", inputs / "ckpt", "--data", triplets, "--split", "test", "--metrics", "psnr",
                "--output", report_path)
    assert mine.exit_code == 2 and "not marked as written by `evaluate --run`" in mine.output
    assert len(list((tmp_path / "report" / "pred" / "dance").glob("*.png"))) == 4
    # A split with no rows is a usage error.
    bad = _run("evaluate", "--run", inputs / "ckpt", "--data", triplets, "--split", "val", "--metrics", "psnr",
               "--output", tmp_path / "x.json")
    assert bad.exit_code == 2 and "unknown --split 'val'; choose test or train" in bad.output


def test_training_runs_are_read_through_the_run_loader(inputs, tmp_path, monkeypatch):
    from disco.model import checkpoint

    calls = []

    def load_model(path, step=None, device="cpu", ema=True, dtype=None):
        calls.append((path, device))
        return DisCoModel.from_pretrained(inputs / "ckpt").eval()

    monkeypatch.setattr(checkpoint, "load_model", load_model)
    (tmp_path / "run").mkdir()
    model = load_checkpoint(tmp_path / "run")
    assert calls == [(tmp_path / "run", "cpu")] and not model.training
    load_checkpoint(inputs / "ckpt")  # a save_pretrained folder is never read as a training run
    assert len(calls) == 1


def test_a_half_precision_model_is_cast_on_its_way_to_the_device(inputs, monkeypatch):
    """--dtype float16 moved the whole float32 model onto the GPU, then cast it: 7.9 GB at full
    size before it shrank to 3.9 (out of memory on an 8 GB card that holds it in half precision)."""
    from disco.generate.run import open_pipeline

    moves, real_to = [], torch.nn.Module.to

    def to(module, *args, **kwargs):
        if isinstance(module, DisCoModel):
            moves.append((args, kwargs, next(module.parameters()).dtype))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    pipeline, _, _ = open_pipeline(inputs / "ckpt", "cpu", None, dtype="float16")
    assert moves and {p.dtype for p in pipeline.model.parameters()} == {torch.float16}
    # Every move that names the device casts in the same pass (parameter by parameter).
    for args, kwargs, before in moves:
        assert kwargs.get("dtype") == torch.float16 or torch.float16 in args, (args, kwargs, before)


def test_a_float32_model_loads_without_diffusers_float32_warning(inputs):
    """diffusers warns about modules kept in float32 whenever ``to`` names a dtype, None too: every
    float32 load (generate's default, evaluate, --init-from) must not print it."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    from disco.generate.run import open_pipeline

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        pipeline, _, _ = open_pipeline(inputs / "ckpt", "cpu", None)
        pipeline.model.to(device="cpu", dtype=None)  # what it said before, heard here
    finally:
        root.removeHandler(handler)
    assert {p.dtype for p in pipeline.model.parameters()} == {torch.float32}
    assert sum("kept in float32" in line for line in said) == 1, said


def test_kept_frames_are_known_by_the_annotators_that_found_the_reference_pose_too(inputs, tmp_path):
    """With --clip the driving poses are stored ones, but --align-pose (the default) fits them to
    the reference's pose, which the machine's `auto` pose annotator finds: part of the key."""
    from disco.generate.config import GenerateConfig
    from disco.generate.run import partial_key

    def key(**options):
        config = GenerateConfig(checkpoint=inputs / "ckpt", reference=inputs / "person.png", pose=tmp_path,
                                output=tmp_path / "o.mp4", clip="dance", **options)
        return partial_key(config, {"path": str(inputs / "ckpt")}, 64, 4)["annotators"]

    assert key(align_pose=True)["pose"] not in (None, "none") and key(align_pose=False)["pose"] == "none"


def test_unreadable_inputs_are_refused_before_the_model_loads(inputs, tmp_path, monkeypatch):
    """A corrupt reference photo or a driving video that is no video failed after the full model
    had loaded (a minute and GBs); a phone's 108 MP photo was refused, naming a flag generate lacks."""
    import disco.generate.run as run_module
    from disco.generate.config import GenerateConfig
    from disco.generate.inputs import read_picture

    monkeypatch.setattr(run_module, "open_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 100)
    for reference, pose, refused in ((tmp_path / "bad.png", inputs / "dance.mp4", "reference picture"),
                                     (inputs / "person.png", tmp_path / "bad.mp4", "pose video")):
        config = GenerateConfig(checkpoint=inputs / "ckpt", reference=reference, pose=pose, output=tmp_path / "o.mp4")
        with pytest.raises(GenerateInputError, match=refused):
            run_module.generate(config, log=lambda *_: None)
    # An icon-sized picture holds no person: it was blown up to the model's size and matted.
    Image.new("RGB", (8, 8)).save(tmp_path / "icon.png")
    with pytest.raises(GenerateInputError, match="smaller than 32 pixels a side"):
        read_picture(tmp_path / "icon.png", "reference picture")
    # 200 MP (16320 x 12240): over twice Pillow's own bound, which Pillow refuses in Image.open.
    Image.new("L", (16320, 12240), 120).save(tmp_path / "200mp.jpg", quality=50)
    assert read_picture(tmp_path / "200mp.jpg", "reference picture").shape == (3072, 4096, 3)


def test_checkpoint_resolution_errors(tmp_path, inputs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):  # neither a model folder nor a training run
        load_checkpoint(tmp_path / "run")
    result = _run("generate", "--checkpoint", tmp_path / "run", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_a_pretraining_checkpoint_cannot_generate(tmp_path, inputs, monkeypatch):
    DisCoModel.from_architecture("tiny", variant="pretrain").save_pretrained(tmp_path / "hap")
    result = _run("generate", "--checkpoint", tmp_path / "hap", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4")
    assert result.exit_code == 2 and "pose ControlNet" in result.output
    # A HAP training run is refused from its config.yaml, before its model is built.
    import disco.generate.run as run_module
    from disco.model.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_name
    from disco.train.config import TrainConfig

    run = tmp_path / "hap-run"
    TrainConfig(stage="pretrain", model="tiny", output=str(run)).save(run)
    (run / checkpoint_name(5)).mkdir()
    (run / checkpoint_name(5) / WEIGHTS_FILE).write_bytes(b"")
    (run / checkpoint_name(5) / STATE_FILE).write_text('{"step": 5}')
    monkeypatch.setattr(run_module, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    result = _run("generate", "--checkpoint", run, "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4")
    assert result.exit_code == 2 and "is a pre-training (HAP) run, without a pose ControlNet" in result.output


def test_half_precision_samples_nearly_the_same_frames(inputs, tmp_path):
    """--dtype bfloat16 (the half precision a CPU runs; float16 is for GPUs only): the same frames
    within a few grey levels of float32's, and the record says which precision made them."""
    common = ["generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png", "--pose",
              inputs / "dance.mp4", "--steps", 2, "--size", SIZE, "--max-frames", 2, "--no-align-pose"]
    frames = {}
    for dtype in ("float32", "bfloat16"):
        result = _run(*common, "--dtype", dtype, "--output", tmp_path / f"{dtype}.mp4", "--frames", tmp_path / dtype)
        assert result.exit_code == 0, result.output
        frames[dtype] = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / dtype).glob("*.png"))])
        assert json.loads((tmp_path / f"{dtype}.json").read_text())["settings"]["dtype"] == dtype
    difference = np.abs(frames["float32"].astype(int) - frames["bfloat16"].astype(int))
    assert frames["float32"].shape == frames["bfloat16"].shape == (2, SIZE, SIZE, 3)
    assert 0 < difference.mean() < 3 and frames["float32"].std() > 1
    refused = _run(*common, "--dtype", "float16", "--output", tmp_path / "f16.mp4")
    assert refused.exit_code == 2 and "--dtype float16 needs a CUDA --device" in refused.output


def test_running_out_of_gpu_memory_is_one_line(inputs, tmp_path, monkeypatch):
    import torch

    import disco.generate.run as run_module

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(run_module, "generate", exhausted)
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4", "--batch-size", 16)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "out of GPU memory on cpu at --batch-size 16: lower --batch-size" in result.output
    # cuDNN's workspace that cannot be allocated is a RuntimeError (a traceback before), and with
    # --gpus N any of them may be the one that ran out.
    def no_workspace(*args, **kwargs):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY")

    monkeypatch.setattr(run_module, "generate", no_workspace)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4", "--device", "cuda:0", "--gpus", 2)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "out of GPU memory on cuda:0 or another of the --gpus 2 at --batch-size" in " ".join(result.output.split())

    # A temporal-module model samples a window at once: below two windows --batch-size does not lower it.
    from disco.train.config import TrainConfig

    TrainConfig(stage="temporal", model="tiny", init_from=str(inputs / "ckpt")).save(tmp_path / "temporal-run")
    monkeypatch.setattr(run_module, "generate", exhausted)
    result = _run("generate", "--checkpoint", tmp_path / "temporal-run", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "(a temporal-module model samples whole windows of its clip length" in said, said
    from disco.model.checkpoint import trained_stage
    from disco.model.temporal import add_temporal

    add_temporal(load_checkpoint(inputs / "ckpt")).save_pretrained(tmp_path / "temporal-export")
    assert trained_stage(tmp_path / "temporal-export") == "temporal" and trained_stage(inputs / "ckpt") is None

    def bug(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(run_module, "generate", bug)
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4")
    assert isinstance(result.exception, RuntimeError)  # any other error is not taken for memory


@pytest.mark.parametrize("change, message", [
    ({"--reference": "missing.png"}, "reference picture"),
    ({"--output": "out.avi"}, ".mp4"),
    ({"--pose": "missing.mp4"}, "pose video"),
    ({"--size": "60"}, "multiple of"),
    ({"--steps": "0"}, "--steps"),
])
def test_generate_usage_errors_are_one_line_exit_2(inputs, tmp_path, change, message):
    options = {"--checkpoint": inputs / "ckpt", "--reference": inputs / "person.png", "--pose": inputs / "dance.mp4",
               "--output": tmp_path / "out.mp4"}
    for key, value in change.items():
        options[key] = value if key in ("--size", "--steps") else tmp_path / value
    args = ["generate"] + [str(x) for kv in options.items() for x in kv]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_outputs_and_inputs_that_cannot_work_are_refused_before_the_model_loads(inputs, tmp_path, monkeypatch):
    """The video, its settings and the frames were written after every frame was sampled: a
    folder of the output's name, a file where --frames should be, lost them all to a traceback;
    the driving video given as --output was overwritten; NaN flags sampled every frame, then failed."""
    import shutil

    import disco.generate.run as run_module

    monkeypatch.setattr(run_module, "open_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "isdir.mp4").mkdir()
    (tmp_path / "plain").write_text("mine")
    (tmp_path / "pictures").mkdir()
    (tmp_path / "real").mkdir()
    Image.open(inputs / "person.png").save(tmp_path / "dance.gif")
    (tmp_path / "real" / "000050.png").write_bytes(b"a real frame")
    shutil.copy(inputs / "dance.mp4", tmp_path / "drive.mp4")
    base = {"--checkpoint": inputs / "ckpt", "--reference": inputs / "person.png", "--pose": inputs / "dance.mp4",
            "--output": tmp_path / "out.mp4"}
    for change, message in (
            ({"--output": tmp_path / "isdir.mp4"}, f"--output {tmp_path / 'isdir.mp4'} is a folder"),
            ({"--output": tmp_path / "plain" / "out.mp4"}, "cannot be written"),
            ({"--frames": tmp_path / "plain"}, f"--frames {tmp_path / 'plain'} is a file, not a folder"),
            ({"--pose": tmp_path / "drive.mp4", "--output": tmp_path / "drive.mp4"}, "is an input of this command"),
            ({"--guidance-scale": "nan"}, "--guidance-scale must be 0 or more"),
            ({"--fps": "nan"}, "--fps must be positive, not nan"),
            ({"--pose": inputs / "person.png"}, "is a picture: --pose takes a video"),
            ({"--pose": tmp_path / "dance.gif"}, "dance.gif: a .gif file is not read as a video; convert it (ffmpeg -i"),
            ({"--pose": tmp_path / "pictures", "--clip": "a"}, "is a folder but not a `disco-cli preprocess` output"),
            # (a folder was "does not exist"; mps / xpu / meta tracebacks after the poses were drawn)
            ({"--reference": tmp_path / "pictures"}, f"reference picture {tmp_path / 'pictures'} is a folder, not a picture"),
            ({"--device": "mps"}, "--device mps: this command runs on cpu, cuda or cuda:N"),
            ({"--device": "meta"}, "--device meta: this command runs on cpu, cuda or cuda:N"),
            # A folder of the user's own frames: overwritten, and the later ones deleted.
            ({"--frames": tmp_path / "real"}, f"--frames {tmp_path / 'real'} holds numbered frames (000050.png, ...) in a folder generate has not marked")):
        options = {**base, **change}
        result = _run("generate", *[x for kv in options.items() for x in kv])
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and message in said and len(result.output.strip().splitlines()) == 1, said
    assert (tmp_path / "plain").read_text() == "mine" and (tmp_path / "drive.mp4").read_bytes() == (
        inputs / "dance.mp4").read_bytes() and (tmp_path / "real" / "000050.png").read_bytes() == b"a real frame"


def test_a_pose_video_cut_short_drives_its_frames_before_the_cut_and_says_so(inputs, tmp_path):
    """A driving video cut short that decord cannot open is read up to its cut: it drives the
    frames before it, and the run says (and records) what is missing instead of a shorter video
    without a word."""
    from helpers import cut_clip

    _, cut = cut_clip(tmp_path, decord_opens=False)
    (tmp_path / "cut.mp4").write_bytes(cut)
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png", "--pose",
                  tmp_path / "cut.mp4", "--output", tmp_path / "o.mp4", "--size", SIZE, "--steps", 1, "--max-frames", 2)
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert f"warning: the pose video {tmp_path / 'cut.mp4'} is cut short: frames" in said, said
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["frames"] == 2 and "of the 40 it lists are missing" in record["pose_video_cut_short"]


def test_a_size_far_past_the_trained_side_is_said(inputs, tmp_path):
    """``--size 4096`` (a typo's extra digit) ran without a word: minutes a frame on the CPU, or
    the GPU's memory, for figures a model draws broken that far from its training size."""
    native = 128  # the tiny model's own side (a save_pretrained folder: no training run to say)
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png", "--pose",
                  inputs / "dance.mp4", "--output", tmp_path / "o.mp4", "--size", 288, "--steps", 1, "--max-frames", 1)
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert f"warning: --size 288 is 2.25 times the side this model was trained at ({native} px): each frame " \
           "costs at least 5 times" in said, said
    again = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png", "--pose",
                 inputs / "dance.mp4", "--output", tmp_path / "p.mp4", "--size", SIZE, "--steps", 1, "--max-frames", 1)
    assert again.exit_code == 0 and "warning: --size" not in again.output


def test_frames_of_an_earlier_longer_run_leave_the_frames_folder():
    """``--frames DIR`` again with fewer frames kept the earlier run's last ones as this run's end."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_frames(folder, np.zeros((4, 8, 8, 3), np.uint8))
        (Path(folder) / "notes.png").write_bytes(b"not ours")
        assert [p.name for p in write_frames(folder, np.ones((2, 8, 8, 3), np.uint8))] == ["000000.png", "000001.png"]
        assert sorted(p.name for p in Path(folder).iterdir()) == [".disco-generated-frames", "000000.png",
                                                                   "000001.png", "notes.png"]


def test_a_reference_without_a_person_is_refused(inputs, tmp_path):
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "scene.png",
                  "--pose", inputs / "dance.mp4", "--output", tmp_path / "o.mp4", "--size", SIZE, "--steps", 1,
                  "--max-frames", 1)
    assert result.exit_code == 2 and "no person was found in the reference picture" in result.output
    assert not (tmp_path / "o.mp4").exists()


def test_a_pose_folder_needs_a_clip(inputs, triplets, tmp_path):
    result = _run("generate", "--checkpoint", inputs / "ckpt", "--reference", inputs / "person.png",
                  "--pose", triplets, "--output", tmp_path / "o.mp4")
    assert result.exit_code == 2 and "--clip" in result.output


def test_mediapipes_native_start_up_notices_stay_out_of_the_terminal():
    """TFLite and absl write straight to file descriptor 2 when a graph starts (once per process,
    hence a fresh one); the user's own stderr keeps working afterwards."""
    import subprocess
    import sys

    script = ("import sys\nfrom skimage import data\nfrom disco.generate.inputs import matte_reference\n"
              "matte_reference(data.astronaut(), 64)\nprint('after the annotator', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "after the annotator" in result.stderr
    for notice in ("XNNPACK", "absl::InitializeLog", "inference_feedback_manager"):
        assert notice not in result.stderr, result.stderr


def _codec(path) -> tuple[str, str, bool]:
    """The video stream's codec and pixel format (PyAV), and whether the index (moov) comes before
    the media data (mdat): ``+faststart``, so a browser starts playing before the whole file is in."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec, pixels = stream.codec_context.name, stream.codec_context.pix_fmt
    head = path.read_bytes()
    return codec, pixels, 0 < head.find(b"moov") < head.find(b"mdat")


def test_videos_are_h264_yuv420p_with_the_index_first_and_odd_sides_padded(tmp_path):
    from disco.generate.video import write_video as write_h264

    frames = np.stack(pan_zoom_frames(data.astronaut(), 6, 64))[:, :63, :61]  # odd sides
    path = write_h264(tmp_path / "clip.mp4", frames, 25.0)
    assert _codec(path) == ("h264", "yuv420p", True)
    back, fps = read_video(path)
    assert back.shape == (6, 64, 62, 3) and fps == pytest.approx(25.0)
    assert np.abs(back[:, :63, :61].astype(int) - frames).mean() < 8  # 4:2:0 chroma on a 64 px picture
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    with pytest.raises(ValueError, match="no frames"):
        write_h264(tmp_path / "empty.mp4", [], 25.0)
    assert not (tmp_path / "empty.mp4").exists()


def test_a_long_video_and_its_side_by_side_are_encoded_as_their_frames_come(tmp_path):
    """write_video took every frame into a list first, and the side-by-side pairs were built all
    at once: for a long video, two more copies of its frames (the pairs twice their width). Frames
    now go to the encoder as they come; the pairs are made one at a time."""
    import tracemalloc

    from disco.generate.video import side_by_side, write_video as write_h264

    frames = np.stack(pan_zoom_frames(data.astronaut(), 120, 128))  # 5.6 MiB
    poses = [np.zeros((64, 64, 3), np.uint8)] * len(frames)
    tracemalloc.start()
    try:
        write_h264(tmp_path / "pairs.mp4", side_by_side(poses, frames), 25.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20, peak  # all the pairs at once: 11 MiB
    back, _ = read_video(tmp_path / "pairs.mp4")
    assert back.shape == (120, 128, 256, 3) and np.abs(back[:, :, 128:].astype(int) - frames).mean() < 4
    assert back[:, :, :128].mean() < 2  # the black pose pictures (the edge blurred by 4:2:0 chroma)


def test_the_default_device_is_the_gpu_where_there_is_one(monkeypatch):
    """generate and evaluate default to --device auto: the full model samples a frame in seconds on
    a GPU and minutes on a CPU, so a GPU machine must not fall to the CPU for want of a flag."""
    import torch

    from disco.evaluate.config import EvaluateConfig
    from disco.generate.config import GenerateConfig
    from disco.model.precision import resolve_device

    assert GenerateConfig.device == EvaluateConfig.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (a machine with a GPU runs this too)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"


def test_float32_on_a_gpu_says_what_float16_gains(tmp_path):
    from disco.generate.config import GenerateConfig
    from disco.generate.run import sampling_line

    config = GenerateConfig(checkpoint=tmp_path, reference=tmp_path, pose=tmp_path, output=tmp_path / "o.mp4",
                            device="cuda:1")
    assert sampling_line(config, 16, 256).endswith("float32 on cuda:1 (--dtype float16 samples about 2.8x faster on a GPU)")
    config.dtype = "float16"
    assert sampling_line(config, 16, 256).endswith("float16 on cuda:1")


def test_frames_that_overflow_stop_generate_in_one_line_and_are_not_kept(inputs, tmp_path):
    """A model whose VAE overflows (fp16 on a GPU: NaN out of the decoder) wrote black frames
    without a word (NaN clamped and cast to 0), and kept them for a resume. Now refused."""
    model = load_checkpoint(inputs / "ckpt")
    with torch.no_grad():
        model.vae.decoder.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path / "overflows")
    out = tmp_path / "out.mp4"
    result = _run("generate", "--checkpoint", tmp_path / "overflows", "--reference", inputs / "person.png",
                  "--pose", inputs / "dance.mp4", "--output", out, "--steps", 1, "--size", SIZE, "--max-frames", 2)
    assert result.exit_code == 2, result.output
    assert "NaN or inf" in result.output and "--dtype bfloat16" in result.output and "Traceback" not in result.output
    assert not out.exists() and not list((tmp_path / "out.mp4.partial").glob("frames-*.npz"))
