"""Keypoint smoothing (One-Euro, confidence-aware): jitter goes, real motion is followed, gaps
stay gaps; and the effect on a real clip's MediaPipe poses."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from disco.pipeline.annotators.smoothing import OneEuro, smooth_sequence, smooth_track
from disco.pipeline.temporal_quality import sequence_jitter

FPS, HEIGHT = 30.0, 256.0


def _track(positions: np.ndarray, confidence: float = 1.0) -> np.ndarray:
    """T x 2 positions of one joint -> T x 1 x 3 keypoints."""
    out = np.zeros((len(positions), 1, 3), np.float32)
    out[:, 0, :2], out[:, 0, 2] = positions, confidence
    return out


def test_a_still_joints_jitter_goes_and_a_moving_joint_is_followed():
    rng = np.random.default_rng(0)
    still = _track(np.full((120, 2), 100.0) + rng.normal(0, 2.0, (120, 2)))
    smoothed = smooth_track(still, FPS, HEIGHT)
    raw_step = np.abs(np.diff(still[:, 0, :2], axis=0)).mean()
    new_step = np.abs(np.diff(smoothed[:, 0, :2], axis=0)).mean()
    assert new_step < raw_step / 4  # frame-to-frame jitter down by 4x or more
    assert np.abs(smoothed[60:, 0, :2] - 100).mean() < 1.0  # and no drift
    # A joint crossing the picture at 300 px/s: followed within a few pixels once under way.
    moving = _track(np.stack([np.arange(120) * 10.0, np.full(120, 50.0)], axis=1))
    followed = smooth_track(moving, FPS, HEIGHT)
    assert np.abs(followed[20:, 0, 0] - moving[20:, 0, 0]).max() < 6
    # Smoothing harder (lower min cut-off) smooths the still joint more.
    harder = smooth_track(still, FPS, HEIGHT, OneEuro(min_cutoff=0.2))
    assert np.abs(np.diff(harder[:, 0, :2], axis=0)).mean() < new_step


def test_missing_joints_stay_missing_and_their_track_restarts():
    positions = np.stack([np.linspace(0, 50, 10), np.zeros(10)], axis=1)
    track = _track(positions)
    track[4:6, 0] = 0  # lost for two frames
    smoothed = smooth_track(track, FPS, HEIGHT)
    assert np.array_equal(smoothed[4:6], track[4:6])  # nothing drawn where nothing was seen
    assert np.array_equal(smoothed[6], track[6])  # the track restarts at the raw point
    assert np.array_equal(smoothed[:, 0, 2], track[:, 0, 2])  # confidences untouched
    # A low-confidence detection moves the filter less than a confident one.
    jump = _track(np.array([[0.0, 0.0], [0.0, 0.0], [20.0, 0.0]]))
    sure, unsure = smooth_track(jump, FPS, HEIGHT), jump.copy()
    unsure[2, 0, 2] = 0.1
    assert 0 < smooth_track(unsure, FPS, HEIGHT)[2, 0, 0] < sure[2, 0, 0]
    with pytest.raises(ValueError, match="T x J x 3"):
        smooth_track(np.zeros((3, 4)), FPS, HEIGHT)


def test_a_sequence_keeps_its_shapes_and_a_frame_without_keypoints_breaks_the_tracks():
    rng = np.random.default_rng(1)
    body = [np.tile([[100.0, 100.0, 0.9]], (18, 1)) + np.c_[rng.normal(0, 2, (18, 2)), np.zeros(18)] for _ in range(8)]
    body[3] = None
    smoothed = smooth_sequence(body, FPS, HEIGHT)
    assert smoothed[3] is None and all(s.shape == (18, 3) for i, s in enumerate(smoothed) if i != 3)
    assert np.allclose(smoothed[0], body[0]) and np.allclose(smoothed[4], body[4])  # each track's first frame
    assert not np.allclose(smoothed[5], body[5])
    assert smooth_sequence([None, None], FPS, HEIGHT) == [None, None]


def test_hands_missing_in_one_frame_break_only_the_hands_tracks_in_preprocess_and_generate():
    """The pipeline's stage and generate smooth the same way (one function): a frame whose pose has
    no hands keeps None there, the frames around it have their hands smoothed, the body's track
    goes on through it."""
    from disco.pipeline.annotators.base import Pose
    from disco.pipeline.stages import smooth_unit_poses

    rng = np.random.default_rng(2)
    frames = 8
    body = [np.tile([[120.0, 90.0, 0.9]], (18, 1)) + np.c_[rng.normal(0, 3, (18, 2)), np.zeros(18)] for _ in range(frames)]
    hands = [np.tile([[60.0, 70.0, 0.8]], (42, 1)).reshape(2, 21, 3) + np.concatenate(
        [rng.normal(0, 3, (2, 21, 2)), np.zeros((2, 21, 1))], axis=2) for _ in range(frames)]
    hands[4] = None
    picture = np.zeros((int(HEIGHT), int(HEIGHT), 3), np.uint8)
    posed = [(i, i / FPS, picture, Pose(body=body[i].astype(np.float32),
                                        hands=None if hands[i] is None else hands[i].astype(np.float32)))
             for i in range(frames)]
    stage = [p[-1] for p in smooth_unit_poses(posed, FPS)]
    assert stage[4].hands is None
    assert not np.allclose(stage[3].hands, hands[3]) and not np.allclose(stage[7].hands, hands[7])
    assert np.allclose(stage[5].hands, hands[5])  # the hands' track starts again after the gap
    assert not np.allclose(stage[4].body, body[4])  # the body's track goes on through it
    # generate's path: the same function over the same keypoints gives the same values.
    assert all(np.allclose(a.body, b) for a, b in zip(stage, smooth_sequence(body, FPS, HEIGHT)))
    again = smooth_sequence(hands, FPS, HEIGHT)
    assert all((a.hands is None and b is None) or np.allclose(a.hands, b) for a, b in zip(stage, again))


def test_on_a_real_clip_smoothing_lowers_the_pose_jitter():
    """MediaPipe's poses of a real photo panned and zoomed like a camera move, each frame on its
    own (static mode, the most jitter): the mean joint displacement per frame, divided by the
    body's size, before and after smoothing."""
    from disco.pipeline.annotators import FrameAnnotator
    from disco.pipeline.demo_data import pan_zoom_frames

    frames = pan_zoom_frames(data.astronaut(), 30, 256)
    annotator = FrameAnnotator("mediapipe", "mediapipe", False, 0.5, 0.01)
    try:
        annotator.begin_unit({"kind": "image"})  # static: every frame detected afresh
        raw = [annotator.annotate(f).pose for f in frames]
    finally:
        annotator.close()
    body = np.stack([p.body for p in raw if p is not None])
    assert len(body) == 30
    smoothed = smooth_track(body, FPS, 256)
    before, after = sequence_jitter(list(body)), sequence_jitter(list(smoothed))
    print(f"pose jitter on the clip: {before:.4f} raw, {after:.4f} smoothed")
    assert after < before


def test_preprocess_smooth_poses_smooths_a_video_units_rows_and_draws_them(tmp_path):
    """--smooth-poses in the pipeline's stage: the stored keypoints of a video unit are the
    smoothed track (less jitter, same joints found), its pose pictures are drawn from them, and the
    option joins the resume parameters and the manifest's."""
    from test_annotators import _annotator, _video_units

    from disco.pipeline.annotators.render import render_pose
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.store.encode import decode_picture
    from disco.pipeline.stages import process_unit

    units, settings = _video_units(tmp_path, 16, segment=16)
    annotator = _annotator(settings)
    try:
        plain = process_unit(units[0], annotator, settings).rows.to_pylist()
        smooth = process_unit(units[0], annotator, {**settings, "smooth_poses": True}).rows.to_pylist()
    finally:
        annotator.close()
    assert [r["sample_id"] for r in plain] == [r["sample_id"] for r in smooth] and len(plain) == 16

    def body(rows):
        return [np.asarray(r["body_keypoints"], np.float32).reshape(18, 3) for r in rows]

    raw, steady = body(plain), body(smooth)
    assert all(np.array_equal(a[:, 2] > 0, b[:, 2] > 0) for a, b in zip(raw, steady))
    assert np.array_equal(raw[0], steady[0]) and not np.array_equal(raw[5], steady[5])
    assert sequence_jitter(steady) < sequence_jitter(raw)
    row = smooth[5]
    hands = None if row["hand_keypoints"] is None else np.asarray(row["hand_keypoints"], np.float32).reshape(2, 21, 3)
    drawn = render_pose(row["width"], row["height"], steady[5], hands, style="openpose")
    assert np.array_equal(decode_picture(row["pose"]), drawn)
    cfg = PreprocessConfig(source="video", input=tmp_path / "videos", output=tmp_path / "o", smooth_poses=True)
    assert cfg.output_params()["smooth_poses"] is True
    assert "smooth_poses" not in PreprocessConfig(source="video", input=tmp_path / "videos",
                                                  output=tmp_path / "o").output_params()
