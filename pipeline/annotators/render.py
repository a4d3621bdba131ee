"""The one skeleton renderer: body-18 and hands drawn OpenPose-style, for every pose backend."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

# Limbs as pairs of body-18 indices, in OpenPose's drawing order, and OpenPose's 18 colours (RGB).
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
HAND_COLORS = tuple(
    tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
    for i in range(len(HAND_EDGES))
)
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_COLOR = (255, 255, 255)
STICK_WIDTH = 4
LIMB_INTENSITY = 0.6


def render_pose(
    width: int,
    height: int,
    body: np.ndarray | None,
    hands: np.ndarray | None = None,
    style: str = "openpose",
    face: np.ndarray | None = None,
) -> np.ndarray:
    """Draw a skeleton on black; returns H x W x 3 uint8 RGB.

    ``body`` is 18 x 3 (x, y, confidence) in pixels, ``hands`` 2 x 21 x 3, ``face`` N x 3; joints with
    confidence 0 are not drawn. ``style="disco"`` swaps red and blue as the official DisCo renders do.
    """
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if body is not None:
        body = np.asarray(body, dtype=np.float64).reshape(18, 3)
        for (a, b), color in zip(BODY_LIMBS, BODY_COLORS):
            if body[a, 2] > 0 and body[b, 2] > 0:
                _draw_limb(canvas, body[a, :2], body[b, :2], [int(c * LIMB_INTENSITY) for c in color])
        for joint, color in zip(body, BODY_COLORS):
            if joint[2] > 0:
                cv2.circle(canvas, (int(joint[0]), int(joint[1])), 4, color, thickness=-1)
    if hands is not None:
        for hand in np.asarray(hands, dtype=np.float64).reshape(-1, 21, 3):
            for (a, b), color in zip(HAND_EDGES, HAND_COLORS):
                if hand[a, 2] > 0 and hand[b, 2] > 0:
                    p, q = hand[a, :2].astype(int), hand[b, :2].astype(int)
                    cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), color, thickness=2)
            for point in hand:
                if point[2] > 0:
                    cv2.circle(canvas, (int(point[0]), int(point[1])), 3, HAND_POINT_COLOR, thickness=-1)
    if face is not None:
        for point in np.asarray(face, dtype=np.float64).reshape(-1, 3):
            if point[2] > 0:
                cv2.circle(canvas, (int(point[0]), int(point[1])), 2, FACE_POINT_COLOR, thickness=-1)
    if style == "disco":
        canvas = np.ascontiguousarray(canvas[..., ::-1])
    return canvas


def _draw_limb(canvas: np.ndarray, p: np.ndarray, q: np.ndarray, color: list[int]) -> None:
    center = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
    length = float(np.hypot(*(p - q)))
    angle = float(np.degrees(np.arctan2(p[1] - q[1], p[0] - q[0])))
    polygon = cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, color)
