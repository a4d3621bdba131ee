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
from disco.pipeline.annotators.registry import Backend, register
from disco.pipeline.annotators.keypoints import blazepose_to_body18, hand_to_pixels

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


HOLISTIC_GRAPH = "holistic_landmark/holistic_landmark_cpu.binarypb"


def holistic_without_face(tracking: bool):
    """MediaPipe Holistic (BlazePose full, segmentation, both hands from the pose) without its face
    mesh, which the contract never stores: the Holistic graph with the face nodes taken out, run
    with the settings ``mp.solutions.holistic.Holistic`` gives it (model complexity 1, smoothing
    only when tracking). Pose, mask and hands are the same as Holistic's, bit for bit (landmarks
    keep their ``presence`` field, which Holistic clears and nothing here reads)."""
    import mediapipe as mp
    from mediapipe.framework import calculator_pb2
    from mediapipe.python.solution_base import SolutionBase

    config = calculator_pb2.CalculatorGraphConfig()
    config.ParseFromString((Path(mp.__file__).parent / "modules" / HOLISTIC_GRAPH).read_bytes())
    keep = [node for node in config.node
            if not any("face_landmarks" in stream for stream in node.output_stream)]
    if len(keep) != len(config.node) - 2:  # the split of the pose's face points, and the face mesh
        raise RuntimeError(f"unexpected MediaPipe Holistic graph ({len(config.node)} nodes): mediapipe==0.10.14 "
                           "is the version this project uses")
    del config.node[:]
    config.node.extend(keep)
    outputs = [s for s in config.output_stream if not s.startswith("FACE_LANDMARKS")]
    del config.output_stream[:]
    config.output_stream.extend(outputs)
    sides = [s for s in config.input_side_packet if "REFINE_FACE" not in s]
    del config.input_side_packet[:]
    config.input_side_packet.extend(sides)
    return SolutionBase(
        graph_config=config,
        side_inputs={"model_complexity": 1, "smooth_landmarks": tracking, "enable_segmentation": True,
                     "smooth_segmentation": tracking, "use_prev_landmarks": tracking},
        calculator_params={
            "poselandmarkcpu__posedetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": 0.5,
            "poselandmarkcpu__poselandmarkbyroicpu__tensorstoposelandmarksandsegmentation__ThresholdingCalculator"
            ".threshold": 0.5,
        },
        outputs=["pose_landmarks", "pose_world_landmarks", "left_hand_landmarks", "right_hand_landmarks",
                 "segmentation_mask"])


class MediaPipeEngine:
    """BlazePose graphs (Holistic when hands are wanted): one in static mode for stills, and one in
    tracking mode for the frames of a video segment or frame folder, which follows the person from
    the previous frame instead of detecting it again (faster, steadier landmarks).

    Every result of the current unit is kept, so matting and pose read one graph run per frame
    whatever order they ask in (the pipeline mattes a whole unit before it asks for poses).
    ``begin_unit`` starts a unit: the kept results go, and the tracking graph starts afresh, so a
    unit's rows depend on that unit's frames alone (not on which actor ran the unit before it, nor
    on where a resumed run started). Outside units (``generate``, one-off calls) frames are stills.
    """

    MAX_KEPT = 2  # results kept outside units (``generate``): the frame asked for by matting, then pose

    def __init__(self, hands: bool):
        self.hands = hands
        self._graphs: dict[bool, object] = {}
        self._results: dict[int, tuple] = {}
        self._unit = False  # inside a unit (begin_unit was called)
        self._tracking = False
        self._dirty = False  # the tracking graph has seen frames since its last reset
        self._shape = None  # the size of the frames the tracking graph follows
        self._quiet_done: set[bool] = set()  # graphs whose first frame (start-up notices) went by
        self.graph_runs = 0  # frames that went through a graph (tests, the benchmark)
        self._graph(False)  # build the static graph now: a broken install fails at start, not mid-run

    def _graph(self, tracking: bool):
        if tracking not in self._graphs:
            import mediapipe as mp

            with native_notices_silenced():
                if self.hands:
                    graph = holistic_without_face(tracking)
                else:
                    graph = mp.solutions.pose.Pose(static_image_mode=not tracking, model_complexity=1,
                                                   enable_segmentation=True)
            self._graphs[tracking] = graph
        return self._graphs[tracking]

    def begin_unit(self, sequence: bool) -> None:
        """Frames from here on belong to a new unit; ``sequence``: consecutive frames of one video
        (tracking mode) rather than unrelated stills."""
        self._unit, self._tracking = True, sequence
        self._results.clear()
        if sequence and self._dirty:
            self._restart_tracking()

    def _restart_tracking(self) -> None:
        """The tracking graph starts afresh (built anew where it cannot be reset: one that failed)."""
        graph = self._graphs.get(True)
        try:
            if graph is not None:
                graph.reset()
        except Exception:  # noqa: BLE001 - a graph in error: the next frame builds another
            self._drop(True)
        self._dirty, self._shape = False, None
        self._quiet_done.discard(True)  # a restarted graph prints its start-up notices again

    def _drop(self, tracking: bool) -> None:
        graph = self._graphs.pop(tracking, None)
        try:
            if graph is not None:
                graph.close()
        except Exception:  # noqa: BLE001 - it goes either way
            pass
        self._quiet_done.discard(tracking)

    def process(self, frame: np.ndarray):
        kept = self._results.get(id(frame))
        if kept is not None and kept[0] is frame:
            return kept[1]
        tracking = self._tracking and self._unit
        if tracking and self._dirty and frame.shape != self._shape:
            # A frame folder whose frames change size: the tracking graph's mask smoothing fails on
            # a frame of another size, and every call after it (the rest of the unit, and the next
            # units of this actor) failed too. The person is looked for afresh at the new size.
            self._restart_tracking()
        graph = self._graph(tracking)
        quiet = native_notices_silenced() if tracking not in self._quiet_done else contextlib.nullcontext()
        try:
            with quiet:
                result = graph.process(np.ascontiguousarray(frame))
        except Exception:
            self._drop(tracking)  # a graph in error fails every later call: the next frame builds another
            if tracking:
                self._dirty, self._shape = False, None
            raise
        self._quiet_done.add(tracking)
        self._dirty = self._dirty or tracking
        if tracking:
            self._shape = frame.shape
        self.graph_runs += 1
        if not self._unit and len(self._results) >= self.MAX_KEPT:
            self._results.clear()
        self._results[id(frame)] = (frame, result)  # the frame is held, so its id stays its own
        return result

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
        self._results.clear()
        self._unit, self._tracking, self._dirty, self._shape = False, False, False, None
        self._quiet_done.clear()

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


def _engine(options: dict, shared: dict) -> MediaPipeEngine:
    """One engine per actor for both roles: matting and pose read the same graph result."""
    if "mediapipe" not in shared:
        # Hands only when the pose role is ours (matting alone never needs them).
        hands = options.get("hands", True) and options.get("backends", {}).get("pose") == "mediapipe"
        shared["mediapipe"] = MediaPipeEngine(hands=hands)
    return shared["mediapipe"]


def _build(role: str, options: dict, shared: dict):
    engine = _engine(options, shared)
    if role == "matting":
        return MediaPipeMatting(engine)
    return MediaPipePose(engine, options.get("joint_threshold", 0.2))


register(Backend(
    name="mediapipe", label="MediaPipe", roles=("matting", "pose"), build=_build, auto=True, packages=("mediapipe",),
    summary="BlazePose (Holistic with hands) and Selfie Segmentation on the CPU; models ship in the wheel",
    options=("--hands", "--joint-threshold", "--min-visibility"),
    embedded_files=lambda options, resolved: MediaPipeEngine.weight_files(
        options.get("hands", True) and resolved.get("pose") == "mediapipe"),
))
