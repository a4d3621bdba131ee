"""Pose formats: OpenPose body-18 is the contract; every backend maps into it here."""

from __future__ import annotations

import numpy as np

BODY18_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
NECK = BODY18_NAMES.index("neck")

# BlazePose's 33 landmarks -> body-18; the neck has no landmark and is built from the shoulders.
BLAZEPOSE_TO_BODY18 = {
    "nose": 0, "r_shoulder": 12, "r_elbow": 14, "r_wrist": 16, "l_shoulder": 11, "l_elbow": 13,
    "l_wrist": 15, "r_hip": 24, "r_knee": 26, "r_ankle": 28, "l_hip": 23, "l_knee": 25,
    "l_ankle": 27, "r_eye": 5, "l_eye": 2, "r_ear": 8, "l_ear": 7,
}
# COCO's 17 body points (the first 17 of COCO-WholeBody's 133, DWPose's output) -> body-18;
# the neck again comes from the shoulders.
COCO17_TO_BODY18 = {
    "nose": 0, "r_shoulder": 6, "r_elbow": 8, "r_wrist": 10, "l_shoulder": 5, "l_elbow": 7,
    "l_wrist": 9, "r_hip": 12, "r_knee": 14, "r_ankle": 16, "l_hip": 11, "l_knee": 13,
    "l_ankle": 15, "r_eye": 2, "l_eye": 1, "r_ear": 4, "l_ear": 3,
}
# MediaPipe's 21 hand landmarks follow OpenPose's hand order already (wrist, then thumb to pinky).
HAND_POINTS = 21
# OpenPose's face model: 68 landmarks and the two pupils.
FACE_POINTS = 70


def blazepose_to_body18(
    landmarks: np.ndarray, width: int, height: int, min_visibility: float
) -> np.ndarray:
    """Map BlazePose landmarks (33 x [x, y, visibility], x and y normalised) to body-18 pixels.

    Returns an 18 x 3 float32 array (x, y, confidence). A joint below ``min_visibility`` or
    outside the image is missing: all three values 0.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    out = np.zeros((18, 3), dtype=np.float32)
    for name, src in BLAZEPOSE_TO_BODY18.items():
        out[BODY18_NAMES.index(name)] = _joint(landmarks[src], width, height, min_visibility)
    return with_neck(out)


def with_neck(body: np.ndarray) -> np.ndarray:
    """``body`` (18 x 3) with the neck at the shoulders' midpoint, at the lower of their
    confidences; missing unless both shoulders are found (no backend's model has a neck)."""
    r_sh = body[BODY18_NAMES.index("r_shoulder")]
    l_sh = body[BODY18_NAMES.index("l_shoulder")]
    if r_sh[2] > 0 and l_sh[2] > 0:
        body[NECK] = [(r_sh[0] + l_sh[0]) / 2, (r_sh[1] + l_sh[1]) / 2, min(r_sh[2], l_sh[2])]
    return body


def _joint(lm: np.ndarray, width: int, height: int, min_visibility: float) -> list[float]:
    x, y, vis = float(lm[0]) * width, float(lm[1]) * height, float(lm[2])
    if vis < min_visibility or not (0 <= x < width and 0 <= y < height):
        return [0.0, 0.0, 0.0]
    return [x, y, vis]


def hand_to_pixels(landmarks: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """21 normalised hand landmarks -> 21 x 3 pixels with confidence 1; a missing hand is all 0."""
    out = np.zeros((HAND_POINTS, 3), dtype=np.float32)
    if landmarks is None:
        return out
    lm = np.asarray(landmarks, dtype=np.float64)
    out[:, 0] = lm[:, 0] * width
    out[:, 1] = lm[:, 1] * height
    inside = (out[:, 0] >= 0) & (out[:, 0] < width) & (out[:, 1] >= 0) & (out[:, 1] < height)
    out[:, 2] = inside.astype(np.float32)
    out[~inside, :2] = 0
    return out
