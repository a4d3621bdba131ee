"""generate's pose alignment (generate/align.py): driving skeletons refitted limb by limb to the
reference person's proportions and put where the reference stands."""

from __future__ import annotations

import numpy as np
import pytest

from disco.generate.align import (
    FOREARMS,
    LIMBS,
    MIRROR,
    align_body,
    align_hands,
    align_sequence,
    fit_alignment,
    limb_lengths,
)
from disco.pipeline.annotators.keypoints import BODY18_NAMES, NECK

J = BODY18_NAMES.index
# A standing person's limb lengths (px) and directions (degrees, image axes: y down).
LENGTHS = {"r_shoulder": 20, "r_elbow": 28, "r_wrist": 25, "l_shoulder": 20, "l_elbow": 28, "l_wrist": 25,
           "r_hip": 55, "r_knee": 40, "r_ankle": 38, "l_hip": 55, "l_knee": 40, "l_ankle": 38,
           "nose": 22, "r_eye": 6, "r_ear": 8, "l_eye": 6, "l_ear": 8}
STANDING = {"r_shoulder": 180, "r_elbow": 100, "r_wrist": 90, "l_shoulder": 0, "l_elbow": 80, "l_wrist": 90,
            "r_hip": 100, "r_knee": 90, "r_ankle": 90, "l_hip": 80, "l_knee": 90, "l_ankle": 90,
            "nose": -90, "r_eye": -150, "r_ear": 180, "l_eye": -30, "l_ear": 0}
# The driver dances: arms up, one knee out.
DANCING = {**STANDING, "r_elbow": -120, "r_wrist": -100, "l_elbow": -45, "l_wrist": -10, "l_knee": 60}


def skeleton(neck, angles, scale=1.0, lengths=LENGTHS) -> np.ndarray:
    body = np.zeros((18, 3), np.float32)
    body[NECK] = [*neck, 1.0]
    for parent, child in LIMBS:
        name = BODY18_NAMES[child]
        a = np.radians(angles[name])
        body[child, :2] = body[parent, :2] + scale * lengths[name] * np.array([np.cos(a), np.sin(a)])
        body[child, 2] = 0.9
    return body


def direction(body, limb):
    a, b = LIMBS[limb]
    v = body[b, :2].astype(np.float64) - body[a, :2]
    return v / np.linalg.norm(v)


REFERENCE = skeleton((128, 60), STANDING)
DRIVER = skeleton((40, 30), DANCING, scale=2.0)  # twice as tall, standing far to the left


def test_every_limb_gets_the_references_length_and_keeps_the_drivers_direction():
    alignment = fit_alignment(REFERENCE, DRIVER)
    assert alignment.known.all() and alignment.scale == pytest.approx(0.5)
    np.testing.assert_allclose(alignment.ratios, 0.5, atol=1e-6)
    aligned = align_body(DRIVER, alignment)
    np.testing.assert_allclose(limb_lengths(aligned), limb_lengths(REFERENCE), atol=1e-4)
    for limb in range(len(LIMBS)):
        np.testing.assert_allclose(direction(aligned, limb), direction(DRIVER, limb), atol=1e-5)
    # It stands where the reference stands: the same neck, hips at the reference's (the torso did not move).
    np.testing.assert_allclose(aligned[NECK, :2], REFERENCE[NECK, :2], atol=1e-4)
    np.testing.assert_allclose(aligned[[J("r_hip"), J("l_hip")], :2], REFERENCE[[J("r_hip"), J("l_hip")], :2], atol=1e-3)
    np.testing.assert_array_equal(aligned[:, 2], DRIVER[:, 2])  # confidences kept


def test_limbs_of_other_proportions_each_get_their_own_ratio():
    long_legs = {**LENGTHS, "r_knee": 60, "l_knee": 60, "r_ankle": 50, "l_ankle": 50}
    driver = skeleton((200, 40), DANCING, lengths=long_legs)
    aligned = align_body(driver, fit_alignment(REFERENCE, driver))
    np.testing.assert_allclose(limb_lengths(aligned), limb_lengths(REFERENCE), atol=1e-4)


def test_every_frame_uses_the_first_frames_ratios():
    later = skeleton((60, 50), DANCING, scale=2.0)
    forearm = FOREARMS[1]  # right elbow -> wrist, foreshortened by half in the later frame
    elbow, wrist = LIMBS[forearm]
    later[wrist, :2] = later[elbow, :2] + 0.5 * (later[wrist, :2] - later[elbow, :2])
    bodies, _, _, alignment = align_sequence(REFERENCE, [DRIVER, later])
    first, second = bodies
    np.testing.assert_allclose(limb_lengths(first), limb_lengths(REFERENCE), atol=1e-4)
    expected = limb_lengths(REFERENCE)
    expected[forearm] *= 0.5  # its own relative change, at the reference's scale
    np.testing.assert_allclose(limb_lengths(second), expected, atol=1e-4)
    # The neck's own travel (20 px right, 20 px down for the driver) is scaled by the body ratio.
    np.testing.assert_allclose(second[NECK, :2] - first[NECK, :2], [10, 10], atol=1e-4)


def test_a_first_frame_without_a_pose_is_passed_over_and_foreshortened_limbs_are_held():
    """Stored rows without a pose hold all-zero keypoints: the ratios come from the first frame
    with a limb to measure. A limb pointing at the camera in that frame (a few px long) would get
    a huge ratio: it is held within 3x of the overall scale."""
    nobody = np.zeros((18, 3), np.float32)
    bodies, _, _, alignment = align_sequence(REFERENCE, [nobody, DRIVER])
    assert alignment is not None and np.array_equal(bodies[0], nobody)
    np.testing.assert_allclose(limb_lengths(bodies[1]), limb_lengths(REFERENCE), atol=1e-4)
    pointing = DRIVER.copy()
    forearm = FOREARMS[1]
    elbow, wrist = LIMBS[forearm]
    pointing[wrist, :2] = pointing[elbow, :2] + 0.01 * (pointing[wrist, :2] - pointing[elbow, :2])
    held = fit_alignment(REFERENCE, pointing)
    assert held.ratios[forearm] == pytest.approx(3 * held.scale)


def test_missing_joints_stay_missing_and_their_children_hang_from_the_nearest_found_joint():
    driver = DRIVER.copy()
    driver[J("l_elbow")] = 0
    alignment = fit_alignment(REFERENCE, DRIVER)
    aligned = align_body(driver, alignment)
    assert not aligned[J("l_elbow")].any()
    l_shoulder, l_wrist = J("l_shoulder"), J("l_wrist")
    assert aligned[l_wrist, 2] > 0
    np.testing.assert_allclose(aligned[l_wrist, :2] - aligned[l_shoulder, :2],
                               0.5 * (driver[l_wrist, :2] - driver[l_shoulder, :2]), atol=1e-4)
    # Nobody at all in a frame: None stays None.
    bodies, _, _, _ = align_sequence(REFERENCE, [None, DRIVER, None])
    assert bodies[0] is None and bodies[2] is None and bodies[1] is not None


def test_limbs_missing_in_the_reference_take_the_mirror_or_the_mean_ratio():
    reference = REFERENCE.copy()
    reference[J("r_ear")] = 0  # the mirror limb (l_eye -> l_ear) is known
    long_head = {**LENGTHS, "l_ear": 16, "r_ear": 16}
    driver = skeleton((40, 30), DANCING, lengths=long_head)  # ears twice as far: ratio 0.5 there, 1 elsewhere
    alignment = fit_alignment(reference, driver)
    r_ear_limb = LIMBS.index((J("r_eye"), J("r_ear")))
    assert not alignment.known[r_ear_limb]
    assert alignment.ratios[r_ear_limb] == pytest.approx(alignment.ratios[MIRROR[r_ear_limb]]) == pytest.approx(0.5)
    reference[J("l_ear")] = 0  # neither ear: the mean of the known ratios
    alignment = fit_alignment(reference, driver)
    assert alignment.ratios[r_ear_limb] == pytest.approx(alignment.ratios[alignment.known].mean())
    assert fit_alignment(np.zeros((18, 3)), driver) is None  # nothing to measure the reference by


def test_without_a_neck_the_body_is_put_on_the_references_joints():
    reference = REFERENCE.copy()
    reference[NECK] = 0
    aligned = align_body(DRIVER, fit_alignment(reference, DRIVER))
    np.testing.assert_allclose(limb_lengths(aligned), limb_lengths(REFERENCE), atol=1e-4)
    found = reference[:, 2] > 0
    np.testing.assert_allclose(aligned[found, :2].mean(axis=0), reference[found, :2].mean(axis=0), atol=1e-3)


def test_hands_follow_their_wrist_scaled_by_the_forearm_ratio():
    hands = np.zeros((2, 21, 3), np.float32)
    for side, wrist in enumerate((J("l_wrist"), J("r_wrist"))):
        hands[side, :, :2] = DRIVER[wrist, :2] + np.arange(21)[:, None] * np.array([1.0, 2.0])
        hands[side, :, 2] = 1
    hands[1, 5] = 0  # a missing hand point
    alignment = fit_alignment(REFERENCE, DRIVER)
    aligned = align_body(DRIVER, alignment)
    out = align_hands(hands, DRIVER, aligned, alignment)
    for side, wrist in enumerate((J("l_wrist"), J("r_wrist"))):
        found = hands[side, :, 2] > 0
        np.testing.assert_allclose(out[side, found, :2] - aligned[wrist, :2],
                                   0.5 * (hands[side, found, :2] - DRIVER[wrist, :2]), atol=1e-4)
    assert not out[1, 5].any()


def test_clip_rows_are_aligned_in_the_pictures_square():
    from disco.generate.inputs import align_rows

    side = 50
    # A 200 x 100 stored picture: square() crops x 50..150 and halves it.
    stored = DRIVER.copy()
    stored[:, :2] = stored[:, :2] * 0.2 * 2 + [50, 0]  # the driver at 0.4 x in square pixels -> stored pixels
    stored[J("l_ear")] = 0
    reference = REFERENCE.copy()
    reference[:, :2] *= 0.2  # the reference skeleton in pixels of the 50 px square
    rows = [{"width": 200, "height": 100, "body_keypoints": stored.reshape(-1).tolist(), "hand_keypoints": None,
             "face_keypoints": None}]
    aligned, record = align_rows(rows, reference, side)
    assert record["scale"] == pytest.approx(0.5) and record["anchor"] == "neck"
    body = np.asarray(aligned[0]["body_keypoints"], np.float32).reshape(18, 3)
    assert not body[J("l_ear")].any()
    in_square = body.copy()
    in_square[:, :2] = (body[:, :2] - [50, 0]) / 2
    in_square[J("l_ear")] = 0
    expected = limb_lengths(reference)
    got = limb_lengths(in_square)
    found = np.isfinite(got)
    np.testing.assert_allclose(got[found], expected[found], atol=1e-4)
    np.testing.assert_allclose(in_square[NECK, :2], reference[NECK, :2], atol=1e-4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from skimage import data

    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    folder = tmp_path_factory.mktemp("align")
    write_video(folder / "clip.mp4", pan_zoom_frames(data.astronaut(), 30, 256), fps=30)
    write_video(folder / "short.mp4", pan_zoom_frames(data.astronaut(), 4, 128), fps=10)
    return folder / "clip.mp4"


def test_smoothing_steadies_a_real_clips_keypoints(clip):
    from disco.generate.inputs import poses_from_video
    from disco.pipeline.temporal_quality import sequence_jitter

    raw = poses_from_video(clip, 256, hands=False)
    smooth = poses_from_video(clip, 256, hands=False, smooth=True)
    assert smooth.smoothed and not raw.smoothed and raw.empty == smooth.empty == 0
    before = sequence_jitter(raw.bodies)
    after = sequence_jitter(smooth.bodies)
    print(f"\npose jitter (mean joint displacement / body size), 30 frames: raw {before:.5f}, smoothed {after:.5f}")
    assert after < before
    # Missing joints stay missing.
    for a, b in zip(raw.bodies, smooth.bodies):
        np.testing.assert_array_equal(a[:, 2] > 0, b[:, 2] > 0)


def test_a_video_unit_is_annotated_in_tracking_mode(tmp_path):
    from disco.generate.inputs import poses_from_video
    from disco.pipeline.annotators import Annotation
    from disco.pipeline.annotators.base import Pose
    from disco.pipeline.demo_data import write_video

    class Annotator:
        units = []

        def begin_unit(self, unit):
            self.units.append(unit)

        def annotate(self, frame):
            body = DRIVER.copy()
            body[:, :2] *= frame.shape[0] / 256
            return Annotation(None, Pose(body), True)

    write_video(tmp_path / "v.mp4", [np.full((64, 64, 3), 90, np.uint8)] * 3, 10.0)
    annotator = Annotator()
    poses = poses_from_video(tmp_path / "v.mp4", 256, annotator=annotator, reference=REFERENCE)
    assert [u["kind"] for u in annotator.units] == ["video"]
    assert poses.alignment["scale"] == pytest.approx(0.5, abs=1e-4)
    np.testing.assert_allclose(limb_lengths(poses.bodies[0]), limb_lengths(REFERENCE), atol=1e-3)


def test_generate_feeds_the_model_the_aligned_poses(clip, tmp_path, monkeypatch):
    """The whole ``generate`` path with the model stubbed (the matting and pose annotators are
    real): --align-pose changes the pose pictures fed to the model, and the .json says so."""
    import json

    from PIL import Image
    from skimage import data

    import disco.generate.run as run_module
    from disco.generate.config import GenerateConfig

    fed = {}

    def pipeline(reference, background, poses, **kwargs):
        fed.setdefault("poses", []).append(poses)
        return np.zeros((len(poses), 32, 32, 3), np.uint8)

    monkeypatch.setattr(run_module, "open_pipeline", lambda checkpoint, device, size, **_: (pipeline, 32, 64))
    (tmp_path / "ckpt").mkdir()
    # The reference: the astronaut closer to the camera than in the driving clip's first frame.
    Image.fromarray(data.astronaut()[:320, 96:416]).save(tmp_path / "person.png")
    records = []
    for align in (True, False):
        out = tmp_path / f"out_{align}.mp4"
        run_module.generate(GenerateConfig(checkpoint=tmp_path / "ckpt", reference=tmp_path / "person.png",
                                           pose=clip.with_name("short.mp4"), output=out, steps=1, align_pose=align),
                            log=lambda *_: None)
        records.append(json.loads(out.with_suffix(".json").read_text()))
    aligned, plain = fed["poses"]
    assert aligned.shape == plain.shape and not np.array_equal(aligned, plain)
    assert records[0]["align_pose"]["ran"] and records[0]["align_pose"]["scale"] > 1.1
    assert records[1]["align_pose"] == {"ran": False} and records[0]["smooth_poses"] is True
