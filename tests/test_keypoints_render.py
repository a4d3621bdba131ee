from __future__ import annotations

import numpy as np

from disco.pipeline.annotators.keypoints import BLAZEPOSE_TO_BODY18, BODY18_NAMES, blazepose_to_body18, hand_to_pixels
from disco.pipeline.annotators.render import BODY_COLORS, BODY_LIMBS, render_pose


def _blazepose(visible: float = 1.0) -> np.ndarray:
    lm = np.zeros((33, 3))
    rng = np.random.default_rng(1)
    lm[:, :2] = rng.uniform(0.1, 0.9, (33, 2))
    lm[:, 2] = visible
    return lm


def test_body18_order_and_neck():
    lm = _blazepose()
    body = blazepose_to_body18(lm, width=200, height=100, min_visibility=0.5)
    assert body.shape == (18, 3) and body.dtype == np.float32
    assert BODY18_NAMES[:5] == ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist")
    # r-shoulder is BlazePose 12, l-hip 23, r-ear 8: pixels = normalised * size.
    np.testing.assert_allclose(body[2, :2], [lm[12, 0] * 200, lm[12, 1] * 100], rtol=1e-6)
    np.testing.assert_allclose(body[11, :2], [lm[23, 0] * 200, lm[23, 1] * 100], rtol=1e-6)
    np.testing.assert_allclose(body[16, :2], [lm[8, 0] * 200, lm[8, 1] * 100], rtol=1e-6)
    np.testing.assert_allclose(body[1, :2], (body[2, :2] + body[5, :2]) / 2, rtol=1e-6)
    assert len(set(BLAZEPOSE_TO_BODY18.values())) == 17


def test_missing_joints_have_zero_confidence_and_no_neck_without_both_shoulders():
    lm = _blazepose()
    lm[11, 2] = 0.1  # left shoulder barely visible
    lm[0, :2] = (1.5, 0.5)  # nose outside the picture
    body = blazepose_to_body18(lm, 100, 100, min_visibility=0.5)
    assert body[5].tolist() == [0, 0, 0]
    assert body[0].tolist() == [0, 0, 0]
    assert body[1].tolist() == [0, 0, 0]
    assert body[2, 2] == 1.0


def test_hands_keep_the_21_point_order():
    lm = np.stack([np.linspace(0.1, 0.9, 21), np.linspace(0.2, 0.8, 21), np.zeros(21)], axis=1)
    hand = hand_to_pixels(lm, 100, 50)
    np.testing.assert_allclose(hand[:, 0], lm[:, 0] * 100, rtol=1e-6)
    assert (hand[:, 2] == 1).all()
    assert not hand_to_pixels(None, 10, 10).any()


def _body_line() -> np.ndarray:
    body = np.zeros((18, 3), np.float32)
    body[1] = (50, 20, 1)  # neck
    body[2] = (20, 20, 1)  # right shoulder
    body[8] = (50, 90, 1)  # right hip
    return body


def test_render_draws_openpose_colours_only_for_present_limbs():
    canvas = render_pose(100, 120, _body_line())
    assert canvas.shape == (120, 100, 3) and canvas.dtype == np.uint8
    neck_rshoulder = BODY_LIMBS.index((1, 2))
    neck_rhip = BODY_LIMBS.index((1, 8))
    expected = [int(c * 0.6) for c in BODY_COLORS[neck_rshoulder]]
    assert canvas[20, 35].tolist() == expected  # midpoint of neck -> right shoulder
    assert canvas[55, 50].tolist() == [int(c * 0.6) for c in BODY_COLORS[neck_rhip]]
    assert canvas[20, 50].tolist() == list(BODY_COLORS[1])  # the neck joint itself
    assert canvas[110, 90].tolist() == [0, 0, 0]
    assert render_pose(100, 120, np.zeros((18, 3))).max() == 0


def test_disco_style_is_the_official_drawing_not_a_channel_swap():
    # The official DisCo code stores its colour triples as RGB, as the openpose style does; what
    # differs is the order and blending (tests/test_pose_style.py checks it pixel for pixel).
    standard = render_pose(100, 120, _body_line())
    disco = render_pose(100, 120, _body_line(), style="disco")
    neck_rshoulder = BODY_LIMBS.index((1, 2))
    assert disco[20, 35].tolist() == standard[20, 35].tolist() == [int(c * 0.6) for c in BODY_COLORS[neck_rshoulder]]
    assert not np.array_equal(disco, standard[..., ::-1])
    assert not np.array_equal(disco, standard)


def test_hands_are_drawn():
    hands = np.zeros((2, 21, 3), np.float32)
    hands[1, :, 0] = np.linspace(10, 90, 21)
    hands[1, :, 1] = 60
    hands[1, :, 2] = 1
    assert render_pose(100, 100, None, hands)[55:66].any()
    assert not render_pose(100, 100, None, np.zeros((2, 21, 3)))[55:66].any()
