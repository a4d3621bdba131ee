"""Steady keypoints through video: a One-Euro filter over each joint's track (Casiez, Roussel and
Vogel, CHI 2012), the filter pose-estimation tools apply to per-frame keypoints.

Each coordinate is smoothed by an exponential filter whose cut-off frequency rises with the
joint's speed: a joint that holds still is smoothed hard (the jitter goes), a joint that moves
fast is followed closely (no lag on a real move). Coordinates are filtered in units of the
picture's height, so the same settings serve every resolution.

Confidence-aware: a joint that is missing in a frame (confidence 0) stays missing, and its track
restarts where it is found again, so nothing is carried across a gap or drawn where the model saw
nothing; a low-confidence joint moves the filter less (its weight in the blend is scaled by its
confidence relative to ``full_confidence``). Stills are never smoothed: only frames of one video
unit, in order, form a track.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuro:
    """Filter settings. ``min_cutoff`` (Hz): the smoothing of a still joint (lower: smoother);
    ``beta``: how fast the cut-off rises with speed (higher: less lag on fast moves);
    ``d_cutoff`` (Hz): the smoothing of the speed estimate itself."""

    # Chosen on synthetic tracks at 30 fps, 256 px (tests/test_smoothing.py): a still joint's
    # jitter / 8; a joint crossing the picture at 300 px/s lags 5 px, at 60 px/s 3 px.
    min_cutoff: float = 0.5
    beta: float = 5.0
    d_cutoff: float = 1.0
    full_confidence: float = 0.5

    def __post_init__(self):
        if self.min_cutoff <= 0 or self.d_cutoff <= 0 or self.beta < 0:
            raise ValueError("One-Euro settings: min_cutoff and d_cutoff must be positive, beta not negative")


def _alpha(cutoff: np.ndarray | float, rate: float) -> np.ndarray | float:
    """The exponential filter's blend for a cut-off frequency at ``rate`` samples per second."""
    tau = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + tau * rate)


def smooth_track(points: np.ndarray, fps: float, height: float, settings: OneEuro = OneEuro()) -> np.ndarray:
    """T x J x 3 keypoints (x, y, confidence in pixels of a picture ``height`` tall; a missing
    joint has confidence 0) of consecutive frames at ``fps`` -> the same with x, y filtered.
    Confidences are kept as they are; missing joints stay exactly as given."""
    points = np.asarray(points, np.float32)
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"expected T x J x 3 keypoints, got shape {points.shape}")
    if fps <= 0 or height <= 0:
        raise ValueError("fps and height must be positive")
    out = points.copy()
    scale = float(height)
    joints = points.shape[1]
    value = np.zeros((joints, 2), np.float64)  # filtered position, in picture heights
    speed = np.zeros((joints, 2), np.float64)  # filtered speed, picture heights per second
    live = np.zeros(joints, bool)  # the joint's track has a value (seen in the previous frame)
    for t in range(points.shape[0]):
        present = points[t, :, 2] > 0
        raw = points[t, :, :2].astype(np.float64) / scale
        start = present & ~live
        value[start], speed[start] = raw[start], 0.0
        going = present & live
        if going.any():
            measured = (raw[going] - value[going]) * fps
            a_d = _alpha(settings.d_cutoff, fps)
            speed[going] = speed[going] + a_d * (measured - speed[going])
            cutoff = settings.min_cutoff + settings.beta * np.linalg.norm(speed[going], axis=1)
            a = _alpha(cutoff, fps)
            trust = np.clip(points[t, going, 2] / settings.full_confidence, 0.0, 1.0)
            a = (a * trust)[:, None]
            value[going] = value[going] + a * (raw[going] - value[going])
        out[t, present, :2] = (value[present] * scale).astype(np.float32)
        live = present
    return out


def smooth_sequence(frames: list, fps: float, height: float, settings: OneEuro = OneEuro()) -> list:
    """The keypoints of consecutive frames, each an array of (x, y, confidence) rows (an 18 x 3
    body, 2 x 21 x 3 hands) or None where none were found -> the same through ``smooth_track``, in
    the same shapes. A None frame breaks every track (nothing is carried over it) and stays None;
    missing joints stay as given. The one way preprocess (``--smooth-poses``) and generate smooth."""
    shape = next((np.shape(f) for f in frames if f is not None), None)
    if shape is None:
        return list(frames)
    track = np.zeros((len(frames), int(np.prod(shape[:-1])), 3), np.float32)
    for i, f in enumerate(frames):
        if f is not None:
            track[i] = np.asarray(f, np.float32).reshape(-1, 3)
    smoothed = smooth_track(track, fps, height, settings)
    return [None if f is None else smoothed[i].reshape(np.shape(f)) for i, f in enumerate(frames)]
