"""The embedded CPU annotators: MediaPipe BlazePose (full) for pose and for the person mask.

BlazePose's own segmentation output keeps a whole full-body person at a distance, where selfie
segmentation cuts legs off, so the same graph serves both roles and runs once per frame. Selfie
segmentation, the model made for people close to the camera, draws the mask of close-ups only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import EMPTY_BODY, Matte, Pose
from disco.pipeline.keypoints import blazepose_to_body18, hand_to_pixels

# Landmarks the person score is built from: nose and shoulders, which the detector always frames
# (hips and legs are legitimately out of view in half-body photos).
SCORE_LANDMARKS = (0, 11, 12)
# A close-up: shoulders spanning at least this fraction of the width, and no hip in view.
CLOSE_UP_SHOULDER_SPAN = 0.5
HIPS = (23, 24)


def is_close_up(landmarks: np.ndarray, min_visibility: float = 0.5) -> bool:
    span = abs(landmarks[11, 0] - landmarks[12, 0])
    return span >= CLOSE_UP_SHOULDER_SPAN and all(landmarks[h, 2] < min_visibility for h in HIPS)


def _landmark_array(landmarks) -> np.ndarray | None:
    if landmarks is None:
        return None
    return np.array(
        [(lm.x, lm.y, getattr(lm, "visibility", 1.0)) for lm in landmarks.landmark], dtype=np.float64
    )


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def native_notices_silenced():
    """File descriptor 2 goes to /dev/null for the block. MediaPipe's C++ side (TFLite's
    "Created TensorFlow Lite XNNPACK delegate", absl's pre-InitializeLog warnings) writes its
    start-up notices straight to it, past Python's logging and the GLOG settings; in Ray workers
    they land in log files, but ``generate`` runs the annotators in the user's terminal. Used
    only around building a graph and its first frame: errors still surface as exceptions."""
    with _STDERR_LOCK:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class MediaPipeEngine:
    """One BlazePose graph (Holistic when hands are wanted); remembers its last frame's result."""

    def __init__(self, hands: bool):
        import mediapipe as mp

        self.hands = hands
        common = dict(static_image_mode=True, model_complexity=1, enable_segmentation=True)
        with native_notices_silenced():
            if hands:
                self._graph = mp.solutions.holistic.Holistic(refine_face_landmarks=False, **common)
            else:
                self._graph = mp.solutions.pose.Pose(**common)
        self._last_frame = None
        self._last_result = None
        self._started = False

    def process(self, frame: np.ndarray):
        # Matting and pose both ask for the same frame object; run the graph once.
        if frame is not self._last_frame:
            quiet = native_notices_silenced() if not self._started else contextlib.nullcontext()
            with quiet:
                self._last_result = self._graph.process(np.ascontiguousarray(frame))
            self._started = True
            self._last_frame = frame
        return self._last_result

    def close(self) -> None:
        self._graph.close()

    @staticmethod
    def weight_files(hands: bool) -> list[dict]:
        import mediapipe

        root = Path(mediapipe.__file__).parent / "modules"
        names = [
            "pose_detection/pose_detection.tflite",
            "pose_landmark/pose_landmark_full.tflite",
            "selfie_segmentation/selfie_segmentation.tflite",
        ]
        if hands:
            names += [
                "holistic_landmark/hand_recrop.tflite",
                "hand_landmark/hand_landmark_full.tflite",
                "face_landmark/face_landmark.tflite",
            ]
        files = []
        for name in names:
            path = root / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
            files.append({"name": f"mediapipe/{name}", "sha256": digest})
        return files


class MediaPipeMatting:
    name = "mediapipe"

    def __init__(self, engine: MediaPipeEngine):
        self.engine = engine
        self._selfie = None  # built on the first close-up

    def matte(self, frame: np.ndarray) -> Matte:
        result = self.engine.process(frame)
        height, width = frame.shape[:2]
        landmarks = _landmark_array(result.pose_landmarks)
        if landmarks is None or result.segmentation_mask is None:
            return Matte(alpha=np.zeros((height, width), np.uint8), score=0.0, count=0)
        score = float(np.mean(landmarks[list(SCORE_LANDMARKS), 2]))
        if is_close_up(landmarks):
            mask, model = self._selfie_mask(frame), "selfie_segmentation"
        else:
            mask, model = result.segmentation_mask, "blazepose"
        alpha = np.clip(np.round(mask * 255.0), 0, 255).astype(np.uint8)
        return Matte(alpha=alpha, score=score, count=1, model=model)

    def _selfie_mask(self, frame: np.ndarray) -> np.ndarray:
        if self._selfie is None:
            import mediapipe as mp

            with native_notices_silenced():
                self._selfie = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
                return self._selfie.process(np.ascontiguousarray(frame)).segmentation_mask
        return self._selfie.process(np.ascontiguousarray(frame)).segmentation_mask


class MediaPipePose:
    name = "mediapipe"

    def __init__(self, engine: MediaPipeEngine, min_visibility: float):
        self.engine = engine
        self.min_visibility = min_visibility

    def pose(self, frame: np.ndarray) -> Pose:
        result = self.engine.process(frame)
        height, width = frame.shape[:2]
        landmarks = _landmark_array(result.pose_landmarks)
        if landmarks is None:
            return Pose(body=EMPTY_BODY.copy())
        body = blazepose_to_body18(landmarks, width, height, self.min_visibility)
        hands = None
        if self.engine.hands:
            left = _landmark_array(getattr(result, "left_hand_landmarks", None))
            right = _landmark_array(getattr(result, "right_hand_landmarks", None))
            if left is not None or right is not None:
                hands = np.stack([hand_to_pixels(left, width, height), hand_to_pixels(right, width, height)])
        return Pose(body=body, hands=hands)
