"""The one skeleton renderer, for every pose backend: body-18 and hands drawn OpenPose-style
(``openpose``), or body-18 drawn the way the official DisCo code draws its pose pictures
(``disco``)."""

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
JOINT_RADIUS = 4
LIMB_INTENSITY = 0.6
POSE_STYLES = ("openpose", "disco")
# ``disco``: each limb is laid over the picture so far at this weight (the picture keeps 1 - it).
DISCO_LIMB_WEIGHT = 0.6


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
    confidence 0 are not drawn.

    ``style="openpose"``: limbs at 60 % of OpenPose's colours, then the joints over them, then
    hands and face. ``style="disco"``: the official DisCo drawing (body only: ``hands`` and
    ``face`` are ignored): the joints first (full colour, radius 4), then each limb, one after
    the other, blended over the picture so far at 0.4 (picture) / 0.6 (limb colour).
    """
    if style not in POSE_STYLES:
        raise ValueError(f"unknown pose style {style!r}; choose openpose or disco")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if style == "disco":
        return _render_disco(canvas, body)
    if body is not None:
        body = np.asarray(body, dtype=np.float64).reshape(18, 3)
        for (a, b), color in zip(BODY_LIMBS, BODY_COLORS):
            if body[a, 2] > 0 and body[b, 2] > 0:
                _draw_limb(canvas, body[a, :2], body[b, :2], [int(c * LIMB_INTENSITY) for c in color])
        for joint, color in zip(body, BODY_COLORS):
            if joint[2] > 0:
                cv2.circle(canvas, (int(joint[0]), int(joint[1])), JOINT_RADIUS, color, thickness=-1)
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
    return canvas


def _render_disco(canvas: np.ndarray, body: np.ndarray | None) -> np.ndarray:
    """The official DisCo pose picture (its ``draw_bodypose``): the colour triples are the
    picture's RGB values, as in the ``openpose`` style."""
    if body is None:
        return canvas
    body = np.asarray(body, dtype=np.float64).reshape(18, 3)
    for joint, color in zip(body, BODY_COLORS):
        if joint[2] > 0:
            cv2.circle(canvas, (int(joint[0]), int(joint[1])), JOINT_RADIUS, color, thickness=-1)
    height, width = canvas.shape[:2]
    for (a, b), color in zip(BODY_LIMBS, BODY_COLORS):
        if not (body[a, 2] > 0 and body[b, 2] > 0):
            continue
        polygon = _limb_polygon(body[a, :2], body[b, :2])
        # Outside the limb the blend leaves the picture as it was, so only its bounding box is blended.
        x, y, w, h = cv2.boundingRect(polygon)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            continue
        under = canvas[y0:y1, x0:x1]
        layer = under.copy()
        cv2.fillConvexPoly(layer, polygon - np.array([x0, y0], polygon.dtype), color)
        canvas[y0:y1, x0:x1] = cv2.addWeighted(under, 1.0 - DISCO_LIMB_WEIGHT, layer, DISCO_LIMB_WEIGHT, 0)
    return canvas


def _limb_polygon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The limb from ``p`` to ``q``: an ellipse STICK_WIDTH wide (semi-axis), as OpenPose draws it."""
    center = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
    length = float(np.hypot(*(p - q)))
    angle = float(np.degrees(np.arctan2(p[1] - q[1], p[0] - q[0])))
    return cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)


def _draw_limb(canvas: np.ndarray, p: np.ndarray, q: np.ndarray, color: list[int]) -> None:
    cv2.fillConvexPoly(canvas, _limb_polygon(p, q), color)
