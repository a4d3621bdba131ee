"""The embedded MediaPipe annotators on real photographs, without Ray."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from disco.pipeline.annotators import FrameAnnotator
from disco.pipeline.annotators.mediapipe_backend import is_close_up


@pytest.fixture(scope="module")
def annotator():
    a = FrameAnnotator("mediapipe", "mediapipe", hands=False, min_visibility=0.5, min_mask_area=0.01)
    yield a
    a.close()


def _hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def test_half_body_photo_uses_blazepose_mask(annotator):
    result = annotator.annotate(data.astronaut())
    assert result.present and result.matte.model == "blazepose"
    assert result.pose is not None and result.pose.body.shape == (18, 3)


def test_close_up_uses_selfie_segmentation(annotator):
    frame = _hopper()
    result = annotator.annotate(frame)
    assert result.present and result.matte.model == "selfie_segmentation"
    person = result.matte.alpha >= 128
    assert 0.3 < person.mean() < 0.9
    # The face (centre, upper third) is person; the flag in the top-left corner is not.
    h, w = person.shape
    assert person[h // 3, w // 2] and not person[h // 10, w // 20]


def test_no_person_in_a_cup_of_coffee(annotator):
    result = annotator.annotate(data.coffee())
    assert not result.present and result.pose is None


def test_close_up_rule():
    lm = np.zeros((33, 3))
    lm[11, 0], lm[12, 0] = 0.85, 0.15
    assert is_close_up(lm)
    lm[23, 2] = 0.9  # a visible hip: not a close-up
    assert not is_close_up(lm)
    lm[23, 2], lm[11, 0] = 0.0, 0.5  # narrow shoulders: not a close-up
    assert not is_close_up(lm)


# -- one graph run per frame, tracking through video units (issue 15) ---------------------------------

def _video_units(tmp_path, frames: int, segment: int = 8):
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.demo_data import pan_zoom_frames, write_video
    from disco.pipeline.run import stage_settings
    from disco.pipeline.sources.generic import list_inputs
    from disco.pipeline.stages import plan_units

    write_video(tmp_path / "videos" / "dance.mp4", pan_zoom_frames(data.astronaut(), frames, 160), 30.0)
    cfg = PreprocessConfig(source="video", input=tmp_path / "videos", output=tmp_path / "out", segment_frames=segment)
    cfg.resolved = {"matting": "mediapipe", "pose": "mediapipe"}
    settings = stage_settings(cfg)
    (item,) = list_inputs(cfg.source, cfg.input, cfg.split).items
    return plan_units(item.to_dict(), settings), settings


def _annotator(settings) -> FrameAnnotator:
    return FrameAnnotator(settings["matting"], settings["pose"], settings["hands"], settings["min_visibility"],
                          settings["min_mask_area"], settings["joint_threshold"])


def test_each_frame_goes_through_the_graph_once(tmp_path):
    from disco.pipeline.stages import process_unit

    units, settings = _video_units(tmp_path, 12, segment=8)
    annotator = _annotator(settings)
    results = [process_unit(unit, annotator, settings) for unit in units]
    frames = sum(r.unit["frames"] for r in results)
    assert frames == 12 and sum(r.unit["rows"] for r in results) == 12  # mask and pose of every frame
    assert annotator.shared["mediapipe"].graph_runs == frames
    # Stills: one run per picture, matting and pose alike; asking again for a still of the unit
    # reads the kept result.
    stills = [data.astronaut(), np.ascontiguousarray(data.astronaut()[:, ::-1])]
    before = annotator.shared["mediapipe"].graph_runs
    annotator.begin_unit({"input_path": "photos", "unit_index": 0, "kind": "image"})
    for still in stills:
        assert annotator.annotate(still).present
        annotator.annotate(still)
    assert annotator.shared["mediapipe"].graph_runs - before == len(stills)
    annotator.close()


def test_tracked_rows_do_not_depend_on_where_a_run_started(tmp_path):
    """A video unit is tracked from its own first frame: the same rows whether it runs after the
    unit before it, after another clip's unit (another actor), alone (a resumed run), or again."""
    from disco.pipeline.stages import process_unit

    units, settings = _video_units(tmp_path, 16, segment=8)
    annotator = _annotator(settings)
    first, second = (process_unit(u, annotator, settings).rows for u in units)
    again = process_unit(units[1], annotator, settings).rows  # right after itself
    fresh = _annotator(settings)
    alone = process_unit(units[1], fresh, settings).rows
    process_unit(units[0], fresh, settings)
    after_first = process_unit(units[1], fresh, settings).rows
    for other in (again, alone, after_first):
        assert other.equals(second)
    assert first.num_rows == second.num_rows == 8
    # Tracking, not static: a static graph gives other landmarks on the same frames.
    engine = fresh.shared["mediapipe"]
    assert True in engine._graphs and engine._graphs[True] is not engine._graphs[False]
    annotator.close()
    fresh.close()


@pytest.mark.parametrize("hands", [False, True])
def test_a_frame_folder_whose_frames_change_size_is_tracked_frame_by_frame(hands):
    """A frame folder of several sizes: MediaPipe's tracking graph failed on the first frame of
    another size and on every call after it, the rest of the unit and the actor's next units
    (their frames' rows lost as errors of the whole unit). The graph starts afresh at a new size."""
    from disco.pipeline.annotators.mediapipe_backend import MediaPipeEngine

    engine = MediaPipeEngine(hands=hands)
    big = np.asarray(Image.fromarray(data.astronaut()).resize((200, 200)))
    small = np.asarray(Image.fromarray(data.astronaut()).resize((160, 120)))
    engine.begin_unit(sequence=True)
    results = [engine.process(frame.copy()) for frame in (big, small, big, big)]
    assert all(r.pose_landmarks is not None and r.segmentation_mask.shape == f.shape[:2]
               for r, f in zip(results, (big, small, big, big)))
    engine.begin_unit(sequence=True)  # the next unit of the actor
    assert engine.process(big.copy()).pose_landmarks is not None


def test_no_face_model_and_the_same_landmarks_as_holistic():
    """The face mesh is not run (the contract never stores MediaPipe's face); pose, mask and hands
    are Holistic's, bit for bit."""
    import mediapipe as mp

    from disco.pipeline.annotators.mediapipe_backend import MediaPipeEngine

    engine = MediaPipeEngine(hands=True)
    assert not any("face" in f["name"] for f in MediaPipeEngine.weight_files(True))
    photo = data.astronaut()
    ours = engine.process(photo)
    assert not hasattr(ours, "face_landmarks")
    with mp.solutions.holistic.Holistic(static_image_mode=True, model_complexity=1, enable_segmentation=True) as full:
        theirs = full.process(photo)
    assert theirs.face_landmarks is not None  # Holistic itself did run a face model here

    def points(landmarks):
        return np.array([(p.x, p.y, getattr(p, "visibility", 0.0)) for p in landmarks.landmark])

    assert np.array_equal(points(ours.pose_landmarks), points(theirs.pose_landmarks))
    assert np.array_equal(ours.segmentation_mask, theirs.segmentation_mask)
    for side in ("left_hand_landmarks", "right_hand_landmarks"):
        a, b = getattr(ours, side), getattr(theirs, side)
        assert (a is None) == (b is None) and (a is None or np.array_equal(points(a), points(b)))
    engine.close()


def test_no_leg_is_stored_or_drawn_for_a_photo_cut_at_the_waist():
    """The astronaut is cut at the waist: BlazePose still guesses knees and ankles (below the
    picture, at low visibility); none is stored and no leg limb is drawn."""
    from disco.pipeline.annotators.keypoints import BODY18_NAMES
    from disco.pipeline.annotators.render import render_pose

    annotator = FrameAnnotator("mediapipe", "mediapipe", hands=True, min_visibility=0.5, min_mask_area=0.01)
    photo = data.astronaut()
    result = annotator.annotate(photo)
    raw = annotator.shared["mediapipe"].process(photo).pose_landmarks.landmark
    assert all(raw[i].y > 1 for i in (25, 26, 27, 28))  # the guesses exist, below the edge
    body = result.pose.body
    for joint in ("r_knee", "l_knee", "r_ankle", "l_ankle"):
        assert body[BODY18_NAMES.index(joint)].tolist() == [0.0, 0.0, 0.0]
    # In the drawing (the body alone), no pixel has the colour of a leg limb or of a knee or ankle.
    from disco.pipeline.annotators.render import BODY_COLORS, BODY_LIMBS, LIMB_INTENSITY

    height, width = photo.shape[:2]
    drawn = render_pose(width, height, body).reshape(-1, 3)
    colours = {tuple(int(c * LIMB_INTENSITY) for c in BODY_COLORS[BODY_LIMBS.index(limb)])
               for limb in ((8, 9), (9, 10), (11, 12), (12, 13))}
    colours |= {BODY_COLORS[j] for j in (9, 10, 12, 13)}
    present = {tuple(c) for c in np.unique(drawn, axis=0)}
    assert len(present) > 5 and not colours & present
    annotator.close()


def test_a_backend_declaration_that_cannot_work_is_refused_at_once():
    from disco.pipeline.annotators import registry
    from disco.pipeline.annotators.registry import Backend, BackendError, register

    def build(role, options, shared):
        return None

    with pytest.raises(ValueError, match="cannot name a backend"):
        register(Backend(name="auto", roles=("matting",), build=build))
    with pytest.raises(ValueError, match="roles must be among matting, pose"):
        register(Backend(name="x", roles=("depth",), build=build))
    with pytest.raises(ValueError, match="a CUDA backend names its weight files"):
        register(Backend(name="x", roles=("pose",), build=build, gpu=True))
    build.__module__ = "__main__"  # as if declared in a user's script: Ray's actors could not import it
    with pytest.raises(ValueError, match="importable module"):
        register(Backend(name="x", roles=("pose",), build=build))
    assert "x" not in registry.choices("pose")
    known = ", ".join(sorted(b.name for b in registry.backends()))
    with pytest.raises(BackendError, match=re.escape(f"unknown annotator backend 'x'; known: {known}")):
        registry.get("x")
