"""The SAM 2.1 matting backend without a GPU: SAM 2.1 Hiera-tiny and a small GroundingDINO with
random weights, written in the documented weights layout and loaded by the backend's own code.

Random weights give random boxes and masks; what these tests hold the backend to is the plumbing:
one detection seeds the tracking of a video unit, a frame where every person is lost is detected
again, stills go through the image predictor, and the contract's shapes come out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from disco.pipeline.annotators import BackendError, resolve_backends
from disco.pipeline.annotators.random_weights import write_random_weights
from disco.pipeline.annotators.sam2_backend import SAM2_FILES, Sam2Matting, build_model
from disco.pipeline.annotators.weights import WeightsError
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError
from helpers import CodeRunningPickle

SIZE = 128


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("weights"), size="small", sam2_model="tiny", only=("sam2",))


@pytest.fixture(scope="module")
def matting(weights) -> Sam2Matting:
    # Random weights give random boxes; zero thresholds let every query through to SAM 2.
    return Sam2Matting(weights, sam2_model="tiny", box_threshold=0.0, text_threshold=0.0, device="cpu")


def clip(frames: int) -> list[np.ndarray]:
    """The astronaut at 128 px, moving right 6 px a frame: consecutive frames of one shot."""
    still = np.asarray(Image.fromarray(data.astronaut()).resize((SIZE, SIZE)))
    return [np.ascontiguousarray(np.roll(still, 6 * k, axis=1)) for k in range(frames)]


class CountingDetector:
    """The backend's own GroundingDINO, recording every frame it is asked about. It keeps the
    ``keep`` best boxes (each is an object SAM 2 tracks: on the CPU each costs about a second a
    frame), and ``blind`` frames get none."""

    def __init__(self, real, frames: list[np.ndarray], blind: tuple[int, ...] = (), keep: int = 2):
        self.real, self.frames, self.blind, self.keep = real, frames, blind, keep
        self.asked: list[int] = []

    def index(self, frame: np.ndarray) -> int:
        return next(i for i, f in enumerate(self.frames) if np.array_equal(f, frame))

    def detect(self, frames):
        found = []
        for frame, (boxes, scores) in zip(frames, self.real.detect(frames)):
            index = self.index(frame)
            self.asked.append(index)
            keep = 0 if index in self.blind else self.keep
            found.append((boxes[:keep], scores[:keep]))
        return found


def no_image_predictor(*_args, **_kwargs):
    raise AssertionError("a video unit went through the image predictor")


def test_random_checkpoint_is_metas_format_and_is_what_the_backend_runs(weights, matting):
    import torch

    path = weights / SAM2_FILES["tiny"]
    assert SAM2_FILES["tiny"] == "sam2/sam2.1_hiera_tiny.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"}  # as Meta's files hold it
    loaded = matting.model.state_dict()
    assert set(checkpoint["model"]) == set(loaded)
    for name in ("image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.iou_prediction_head.layers.0.weight",
                 "memory_attention.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(loaded[name], checkpoint["model"][name])
    assert matting.model.image_size == 1024 and matting.model.image_encoder.trunk.blocks[0].dim == 96  # Hiera-T


def test_checkpoints_load_tensors_only_and_must_fit(tmp_path):
    import torch

    marker = tmp_path / "ran"
    torch.save({"model": {"no_mem_embed": CodeRunningPickle(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="evil.pt was not loaded: it holds a pickled"):
        build_model("tiny", tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"model": {"no_mem_embed": torch.zeros(1, 1, 256)}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="does not fit SAM 2.1 Hiera tiny"):
        build_model("tiny", tmp_path / "other.pt")


def test_video_state_is_what_sam2_builds_from_a_jpeg_folder(matting, tmp_path):
    """The in-memory frames make the state SAM 2's own loader makes from files."""
    frames = clip(2)
    for k, frame in enumerate(frames):  # the test writes files, to compare; the backend never does
        Image.fromarray(frame).save(tmp_path / f"{k}.jpg", quality=100)
    theirs = matting.model.init_state(str(tmp_path))
    ours = matting.video_state(frames)
    assert set(ours) == set(theirs)
    for key in ("num_frames", "video_height", "video_width", "device", "storage_device", "offload_video_to_cpu"):
        assert ours[key] == theirs[key], key
    assert ours["images"].shape == theirs["images"].shape == (2, 3, 1024, 1024)
    assert float((ours["images"] - theirs["images"]).abs().mean()) < 0.05  # JPEG's loss only


def test_video_unit_is_seeded_once_then_tracked(matting, monkeypatch):
    frames = clip(3)
    detector = CountingDetector(matting.detector, frames)
    monkeypatch.setattr(matting, "detector", detector)
    monkeypatch.setattr(matting.image_predictor, "set_image_batch", no_image_predictor)
    starts = []
    real = matting.propagate

    def propagate(state, start):
        starts.append(start)
        yield from real(state, start)

    monkeypatch.setattr(matting, "propagate", propagate)
    matting.begin_unit(sequence=True)
    mattes = matting.matte_batch(frames)
    assert len(mattes) == 3
    for matte in mattes:
        assert matte.alpha.shape == (SIZE, SIZE) and matte.alpha.dtype == np.uint8
        assert set(np.unique(matte.alpha)) <= {0, 255} and matte.model == "sam2"
    assert mattes[0].count == 2 and 0.0 <= mattes[0].score <= 1.0  # a person seeded on the first frame
    # The persons were followed, not looked for again: one detection, one propagation.
    assert detector.asked == [0] and starts == [0]
    assert all(m.count >= 1 and m.alpha.any() for m in mattes[1:])


def test_a_video_unit_struck_once_is_still_tracked_whole(matting, monkeypatch):
    """A unit that ended its process once runs its frames apart (``strikes.frames_apart``), the
    matting frame by frame: SAM 2 would then see each frame of a video unit as a video of its own
    (detected again, never tracked: other mattes than the run's). A tracking backend keeps its
    call for the unit's frames; a still unit's frames still go one at a time."""
    from collections import Counter

    from disco.pipeline import strikes
    from disco.pipeline.annotators import FrameAnnotator
    from disco.pipeline.decode import Frame
    from disco.pipeline.stages import matte_unit

    frames = clip(3)
    detector = CountingDetector(matting.detector, frames, keep=1)
    monkeypatch.setattr(matting, "detector", detector)
    annotator = FrameAnnotator("sam2", "none", hands=False, min_visibility=0.5, min_mask_area=0.01, roles=("pose",))
    annotator.matting = matting
    monkeypatch.setattr(strikes._Process, "apart", ({}, {"input_path": "clip.mp4"}, "encode"))
    assert strikes.one_by_one()
    settings = {"min_visibility": 0.5, "min_mask_area": 0.0}
    calls = []
    real = matting.matte_batch
    monkeypatch.setattr(matting, "matte_batch", lambda batch: calls.append(len(batch)) or real(batch))
    for kind, expected in (("video", [3]), ("image", [1, 1, 1])):
        calls.clear()
        unit = {"kind": kind, "input_path": "clip.mp4", "source": "video", "clip_id": "clip"}
        found = [Frame(k, k / 30, frame, unit) for k, frame in enumerate(frames)]
        matte_unit(unit, found, annotator, settings, [], Counter(), [])
        assert calls == expected, (kind, calls)
        assert annotator.tracks_sequence() is (kind == "video")
    assert detector.asked[0] == 0 and detector.asked.count(0) == 2  # the video seeded once, the stills each


def test_a_frame_where_every_person_is_lost_is_detected_again(matting, monkeypatch):
    frames = clip(3)
    detector = CountingDetector(matting.detector, frames, keep=1)
    monkeypatch.setattr(matting, "detector", detector)
    starts = []
    real = matting.propagate

    def losing(state, start):
        """SAM 2's propagation, except that every person vanishes on frame 1 when tracked there."""
        starts.append(start)
        for index, masks in real(state, start):
            yield index, (np.zeros_like(masks) if index == 1 and start == 0 else masks)

    monkeypatch.setattr(matting, "propagate", losing)
    matting.begin_unit(sequence=True)
    mattes = matting.matte_batch(frames)
    assert detector.asked == [0, 1] and starts == [0, 1]  # detected again on frame 1, tracked from there
    assert mattes[1].count == 1 and mattes[1].alpha.any()  # frame 1's matte is the new seed's
    assert mattes[2].alpha.shape == (SIZE, SIZE) and mattes[2].count >= 1


def test_nobody_on_the_first_frame_is_looked_for_on_the_next(matting, monkeypatch):
    frames = clip(2)
    detector = CountingDetector(matting.detector, frames, blind=(0,), keep=1)
    monkeypatch.setattr(matting, "detector", detector)
    matting.begin_unit(sequence=True)
    first, second = matting.matte_batch(frames)
    assert detector.asked == [0, 1]
    assert first.count == 0 and first.score == 0.0 and not first.alpha.any() and first.alpha.shape == (SIZE, SIZE)
    assert second.count == 1


def test_stills_go_through_the_image_predictor(weights, matting, monkeypatch):
    stills = [clip(1)[0], np.ascontiguousarray(clip(1)[0][16:112])]  # 128 x 128 and 96 x 128
    detector = CountingDetector(matting.detector, stills, blind=(1,))
    monkeypatch.setattr(matting, "detector", detector)
    embedded = []
    real = matting.image_predictor.set_image_batch

    def set_image_batch(images):
        embedded.append(len(images))
        return real(images)

    monkeypatch.setattr(matting.image_predictor, "set_image_batch", set_image_batch)
    monkeypatch.setattr(matting, "track", lambda frames: pytest.fail("a still was tracked as video"))
    matting.begin_unit(sequence=True)
    matting.begin_unit(sequence=False)  # a still unit after a video one
    first, second = matting.matte_batch(stills)
    assert first.alpha.shape == (SIZE, SIZE) and first.count == 2 and first.alpha.dtype == np.uint8
    assert set(np.unique(first.alpha)) <= {0, 255} and first.alpha.any()
    assert second.alpha.shape == (96, SIZE) and second.count == 0 and not second.alpha.any()
    assert embedded == [1]  # only the still with a person is embedded

    # No unit begun at all (a caller matting single pictures): stills too.
    fresh = Sam2Matting(weights, sam2_model="tiny", box_threshold=0.0, text_threshold=0.0, device="cpu")
    fresh.detector = CountingDetector(fresh.detector, stills, keep=1)
    monkeypatch.setattr(fresh, "track", lambda frames: pytest.fail("a still was tracked as video"))
    assert fresh.matte(stills[0]).count == 1 and fresh.detector.asked == [0]


def test_merge_unions_every_person():
    from disco.pipeline.annotators.grounded_sam import merge_persons

    masks = np.zeros((2, 4, 4), bool)
    masks[0, :1, :1] = True
    masks[1, 2:, 2:] = True
    merged = merge_persons(np.zeros((4, 4, 3), np.uint8), np.array([0.4, 0.9]), masks, "sam2")
    assert (merged.alpha == 255).sum() == 5 and merged.count == 2 and merged.score == pytest.approx(0.9)
    empty = merge_persons(np.zeros((4, 4, 3), np.uint8), np.zeros(0), np.zeros((0, 4, 4), bool), "sam2")
    assert empty.count == 0 and empty.score == 0.0 and not empty.alpha.any()


def test_the_sam2_model_option_names_its_checkpoint(weights, tmp_path):
    # The weights check asks for the chosen size's file.
    with pytest.raises(BackendError, match="sam2/sam2.1_hiera_large.pt"):
        resolve_backends("sam2", "none", weights=weights, device="cpu", sam2_model="large")
    resolved = resolve_backends("sam2", "none", weights=weights, device="cpu", sam2_model="tiny")
    assert resolved["matting"] == "sam2"
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="unknown SAM 2.1 model 'huge'.*tiny, small, base_plus, large"):
        PreprocessConfig(source="images", input=tmp_path / "in", output=tmp_path / "out", sam2_model="huge").validate()
    from disco.cli import app

    result = CliRunner().invoke(app, ["preprocess", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                                      "--source", "images", "--sam2-model", "huge"])
    assert result.exit_code == 2 and "huge" in result.output and "base_plus" in result.output


def test_preprocess_runs_sam2_through_ray(weights, tmp_path, ray_local):
    from disco.pipeline.demo_data import write_video
    from disco.pipeline.run import preprocess
    from disco.pipeline.store.encode import decode_picture
    from disco.pipeline.store.reader import open_triplets

    write_video(tmp_path / "in" / "dance.mp4", clip(2), 30.0)
    cfg = PreprocessConfig(
        source="video", input=tmp_path / "in", output=tmp_path / "out", matting="sam2", pose="none",
        weights=weights, device="cpu", sam2_model="tiny", box_threshold=0.0, text_threshold=0.0, max_side=SIZE,
    )
    result = preprocess(cfg, log=lambda *_: None)
    assert result.exit_code == 0
    manifest = result.manifest
    assert manifest["backends"]["matting"]["name"] == "sam2"
    recorded = {w["name"]: w["sha256"] for w in manifest["backends"]["weights"]}
    checkpoint = SAM2_FILES["tiny"]
    assert recorded[checkpoint] == hashlib.sha256((weights / checkpoint).read_bytes()).hexdigest()
    assert any(name.startswith("grounding-dino/") for name in recorded)
    assert manifest["counts"]["rows_written"] == 2
    rows = open_triplets(tmp_path / "out").to_table().to_pylist()
    for row in rows:
        mask = decode_picture(row["mask"], grayscale=True)
        assert mask.shape == (SIZE, SIZE) and row["person_count"] >= 1


def test_a_video_unit_out_of_gpu_memory_does_not_shrink_the_stills_batch(matting, monkeypatch):
    """SAM 2 tracks a video unit whole, whatever the batch: a tracking run out of GPU memory must
    not halve the stills' batch down to one frame on the way to the one-frame-at-a-time retry."""
    from collections import Counter

    import torch

    from disco.pipeline.annotators import FrameAnnotator
    from disco.pipeline.decode import Frame
    from disco.pipeline.stages import matte_unit

    def full(frames):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    annotator = FrameAnnotator.__new__(FrameAnnotator)  # the pipeline's annotator around this backend
    annotator.matting, annotator.pose, annotator.shared, annotator._unit = matting, None, {}, None
    annotator.min_score, annotator.min_mask_area = 0.0, 0.0
    monkeypatch.setattr(matting, "batch_size", 8)
    monkeypatch.setattr(matting, "track", full)
    unit = {"source": "video", "clip_id": "c", "input_path": "c.mp4", "kind": "video"}
    errors: list[dict] = []
    picture = clip(1)[0]
    kept = matte_unit(unit, [Frame(i, i / 8.0, picture, unit) for i in range(2)], annotator, {}, errors, Counter(), [])
    assert kept == [] and [e["error_type"] for e in errors] == ["gpu_out_of_memory"] * 2
    assert matting.batch_size == 8  # untouched: the next stills still go 8 at a time
    matting.begin_unit(sequence=False)
    assert annotator.shrink_batch(8) == 4 and matting.batch_size == 4
    assert annotator.shrink_batch(2) == 1  # halved from what the call used
