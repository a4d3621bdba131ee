"""OpenPose body-18 (with hands and face) through controlnet-aux, from local checkpoint files.

OpenPose finds every person; the contract holds one skeleton, so the person with the highest
OpenPose score is kept (DisCo's TikTok clips have one dancer). Its joints are already in body-18
order; hands are 21 points, left then right; the face is OpenPose's 70 points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import EMPTY_BODY, Pose
from disco.pipeline.annotators.registry import Backend, register
from disco.pipeline.annotators.weights import WeightFile, loading, needs_folder, require, weights_dir
from disco.pipeline.annotators.keypoints import FACE_POINTS, HAND_POINTS

# In the weights folder, as lllyasviel/Annotators publishes them: body-18, hands (with --hands),
# face (with --face).
OPENPOSE_FILES = {
    "body": "openpose/body_pose_model.pth",
    "hand": "openpose/hand_pose_model.pth",
    "face": "openpose/facenet.pth",
}

# OpenPose's own peak threshold for face heatmaps.
FACE_PEAK_THRESHOLD = 0.05


def weight_files(root: Path | None, options: dict) -> list[WeightFile]:
    """The OpenPose files read from the weights folder with these ``hands`` / ``face`` options."""
    root = needs_folder("openpose", root)
    parts = ["body"] + (["hand"] if options.get("hands", True) else []) + (["face"] if options.get("face") else [])
    return [WeightFile(OPENPOSE_FILES[p], root / OPENPOSE_FILES[p], f"OpenPose {p}") for p in parts]


def _silence_controlnet_aux():
    import warnings

    # controlnet-aux imports every detector it has (timm and friends) and those warn about
    # deprecated import paths; nothing for a user to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose import Body, Face, Hand, OpenposeDetector, util
    return Body, Face, Hand, OpenposeDetector, util


class OpenPosePose:
    name = "openpose"

    def __init__(self, weights: Path | None, *, hands: bool = True, face: bool = False, device: str = "cuda",
                 joint_threshold: float = 0.0):
        Body, Face, Hand, OpenposeDetector, util = _silence_controlnet_aux()
        self.files = weight_files(weights, {"hands": hands, "face": face})
        require(self.files, self.name)
        root = Path(weights)
        # controlnet-aux reads these with torch.load, which loads tensors only (weights_only is
        # the default from torch 2.6, the floor of our pin).
        with loading(root / OPENPOSE_FILES["body"]):
            body = Body(str(root / OPENPOSE_FILES["body"]))
        with loading(root / OPENPOSE_FILES["hand"]):
            hand = Hand(str(root / OPENPOSE_FILES["hand"])) if hands else None
        with loading(root / OPENPOSE_FILES["face"]):
            face_model = Face(str(root / OPENPOSE_FILES["face"])) if face else None
        self.detector = OpenposeDetector(body, hand, face_model)
        for part in (body, hand, face_model):
            if part is not None:
                part.to(device)
        self.hands = hands
        self.face = face
        self.joint_threshold = joint_threshold
        self._util = util

    def pose(self, frame: np.ndarray) -> Pose:
        import torch

        height, width = frame.shape[:2]
        bgr = np.ascontiguousarray(frame[:, :, ::-1])  # OpenPose's networks were trained on BGR
        with torch.no_grad():
            candidate, subset = self.detector.body_estimation(bgr)
        people = self.detector.body_estimation.format_body_result(candidate, subset)
        if not people:
            return Pose(body=EMPTY_BODY.copy(), hands=self._no_hands(), face=self._no_face())
        person = max(people, key=lambda p: p.total_score)
        body = np.zeros((18, 3), np.float32)
        for j, kp in enumerate(person.keypoints):
            if kp is not None and kp.score >= self.joint_threshold and 0 <= kp.x < width and 0 <= kp.y < height:
                body[j] = (kp.x, kp.y, kp.score)
        hands = self._hands(person, bgr) if self.hands else None
        face = self._face(person, bgr) if self.face else None
        return Pose(body=body, hands=hands, face=face)

    def _no_hands(self):
        return np.zeros((2, HAND_POINTS, 3), np.float32) if self.hands else None

    def _no_face(self):
        return np.zeros((FACE_POINTS, 3), np.float32) if self.face else None

    def _hands(self, person, bgr: np.ndarray) -> np.ndarray:
        height, width = bgr.shape[:2]
        out = np.zeros((2, HAND_POINTS, 3), np.float32)
        left, right = self.detector.detect_hands(person, bgr)
        for slot, points in enumerate((left, right)):
            for k, kp in enumerate(points or []):
                # controlnet-aux marks a joint it did not find with a negative coordinate.
                if kp.x >= 0 and kp.y >= 0:
                    out[slot, k] = (kp.x * width, kp.y * height, 1.0)
        return out

    def _face(self, person, bgr: np.ndarray) -> np.ndarray:
        out = np.zeros((FACE_POINTS, 3), np.float32)
        box = self._util.faceDetect(person, bgr)
        if box is None:
            return out
        x, y, w = box
        heatmaps = self.detector.face_estimation(bgr[y:y + w, x:x + w, :])
        # One point per heatmap, in OpenPose's 70-point order; controlnet-aux's own peak list
        # drops weak points and so loses that order.
        for k, heatmap in enumerate(heatmaps[:FACE_POINTS]):
            py, px = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            peak = float(heatmap[py, px])
            if peak > FACE_PEAK_THRESHOLD:
                out[k] = (px + x, py + y, peak)
        return out


def write_openpose(root: Path, hands: bool = True, face: bool = True, seed: int = 0) -> list[Path]:
    """OpenPose's networks with random weights, saved as the published files are (tests, benchmarks)."""
    import torch

    _silence_controlnet_aux()  # the warnings of controlnet-aux's first import
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(seed)
    written = []
    parts = [("body", bodypose_model, True), ("hand", handpose_model, hands), ("face", FaceNet, face)]
    for part, build, wanted in parts:
        if not wanted:
            continue
        state = build().state_dict()
        if part != "face":
            # The published body and hand files name layers without the block prefix
            # ("conv1_1.weight" for "model0.conv1_1.weight"); controlnet-aux maps them back.
            state = {key.split(".", 1)[1]: value for key, value in state.items()}
        path = Path(root) / OPENPOSE_FILES[part]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        written.append(path)
    return written


def _build(role: str, options: dict, shared: dict) -> OpenPosePose:
    return OpenPosePose(weights_dir(options.get("weights")), hands=options.get("hands", True),
                        face=options.get("face", False), device=options.get("device", "cuda"))


register(Backend(
    name="openpose", roles=("pose",), build=_build, gpu=True, auto=True,
    summary="OpenPose body-18 with hands and face (DisCo's own)", packages=("controlnet_aux",),
    files=weight_files, options=("--hands", "--face"),
    random_weights=lambda root, size, options: write_openpose(root, options.get("hands", True),
                                                              options.get("face", True)),
))
