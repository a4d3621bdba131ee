"""DWPose whole-body pose through ONNX Runtime, from the two published ONNX graphs.

YOLOX-L finds the persons (COCO class 0), then DWPose's RTMPose-style whole-body model (SimCC
heads) places COCO-WholeBody's 133 points in each person's box: 0-16 the COCO body, 17-22 the feet,
23-90 the face (68), 91-111 the left hand, 112-132 the right hand. They map to the contract's
body-18 in OpenPose order (``keypoints.COCO17_TO_BODY18``, the neck from the shoulders), both hands
(21 points each, already in OpenPose's hand order) and the face (the 68 points; OpenPose's two
pupils stay missing). Pre- and post-processing follow the DWPose reference: the frame as BGR;
YOLOX's letterbox at 640 x 640 (grey 114, top-left, no normalisation); each box widened by 1.25 to
the pose model's aspect ratio and warped to 288 x 384, ImageNet mean and std; SimCC read at
half-pixel bins and mapped back through the crop.

Person rule (the same as OpenPose's): the contract stores one skeleton, so of the detected persons
the one with the highest mean confidence over its 17 body points is kept; DisCo's clips have one
dancer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import EMPTY_BODY, Pose
from disco.pipeline.annotators.keypoints import (BODY18_NAMES, COCO17_TO_BODY18, FACE_POINTS, HAND_POINTS,
                                                 with_neck)
from disco.pipeline.annotators.registry import Backend, BackendError, register
from disco.pipeline.annotators.weights import WeightFile, WeightsError, needs_folder, require, weights_dir
from disco.pipeline.gpu_balance import gpu_memory_limit

# In the weights folder, as the DWPose authors publish them (huggingface.co/yzd-v/DWPose).
DWPOSE_FILES = {"detector": "dwpose/yolox_l.onnx", "pose": "dwpose/dw-ll_ucoco_384.onnx"}

DETECTOR_SIZE = 640  # YOLOX's square letterbox
STRIDES = (8, 16, 32)
ANCHORS = sum((DETECTOR_SIZE // s) ** 2 for s in STRIDES)  # 8400
COCO_CLASSES = 80
POSE_SIZE = (288, 384)  # the pose model's input, width x height
SIMCC_SPLIT = 2.0  # SimCC bins per input pixel
KEYPOINTS = 133
BODY_POINTS = 17
FACE_SLICE = slice(23, 91)
HAND_SLICES = (slice(91, 112), slice(112, 133))  # left, right
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # R, G, B
STD = np.array([58.395, 57.12, 57.375], np.float32)
# The reference's person score, NMS overlap and box padding.
PERSON_SCORE = 0.3
NMS_IOU = 0.45
BOX_PADDING = 1.25

# Each graph's input and outputs: name and shape (None: any size, the pose model's batch).
DETECTOR_IO = (("images", (1, 3, DETECTOR_SIZE, DETECTOR_SIZE)),
               (("output", (1, ANCHORS, 5 + COCO_CLASSES)),))
POSE_IO = (("input", (None, 3, POSE_SIZE[1], POSE_SIZE[0])),
           (("simcc_x", (None, KEYPOINTS, int(POSE_SIZE[0] * SIMCC_SPLIT))),
            ("simcc_y", (None, KEYPOINTS, int(POSE_SIZE[1] * SIMCC_SPLIT)))))


def weight_files(root: Path | None, options: dict) -> list[WeightFile]:
    """The two ONNX graphs read from the weights folder (the same whatever the options)."""
    root = needs_folder("dwpose", root)
    return [WeightFile(DWPOSE_FILES["detector"], root / DWPOSE_FILES["detector"], "DWPose person detector (YOLOX-L)"),
            WeightFile(DWPOSE_FILES["pose"], root / DWPOSE_FILES["pose"], "DWPose whole-body model (dw-ll_ucoco_384)")]


# -- the detector ---------------------------------------------------------------------------------

def letterbox(bgr: np.ndarray, size: int = DETECTOR_SIZE) -> tuple[np.ndarray, float]:
    """The frame scaled by ``r = min(size / h, size / w)``, top-left on a ``size`` x ``size`` canvas
    of grey 114, as a 1 x 3 x size x size float32 batch (no normalisation); and ``r``."""
    import cv2

    height, width = bgr.shape[:2]
    ratio = min(size / height, size / width)
    canvas = np.full((size, size, 3), 114, np.uint8)
    resized = cv2.resize(bgr, (int(width * ratio), int(height * ratio)), interpolation=cv2.INTER_LINEAR)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32), ratio


def _grids(size: int = DETECTOR_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Each anchor's cell (x, y) and stride, in the order of YOLOX's output rows."""
    cells, strides = [], []
    for stride in STRIDES:
        side = size // stride
        xs, ys = np.meshgrid(np.arange(side), np.arange(side))
        cells.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


def decode_detections(raw: np.ndarray, ratio: float, score: float = PERSON_SCORE,
                      iou: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX's raw rows (8400 x 85: centre offsets in cells, log sizes, then objectness and the 80
    class scores, already through a sigmoid) -> person boxes (x0, y0, x1, y1 in frame pixels) and
    their scores (objectness x person), best first, after NMS."""
    raw = np.asarray(raw, np.float32)
    cells, strides = _grids()
    centre = (raw[:, :2] + cells) * strides
    size = np.exp(raw[:, 2:4]) * strides
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / ratio
    scores = raw[:, 4] * raw[:, 5]
    keep = scores > score
    boxes, scores = boxes[keep], scores[keep]
    chosen = nms(boxes, scores, iou)
    return boxes[chosen], scores[chosen]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression: the indices kept, best first."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = (x1 - x0).clip(0) * (y1 - y0).clip(0)
        overlap = inter / np.maximum(area[best] + area[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.array(kept, dtype=np.int64)


# -- the pose model -------------------------------------------------------------------------------

def box_to_crop(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A person box -> the centre and size (x, y) of the region the pose model sees: the box
    widened by 1.25, then grown along one axis to the model's aspect ratio (288 / 384)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2], np.float32)
    width, height = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
    aspect = POSE_SIZE[0] / POSE_SIZE[1]
    if width > height * aspect:
        height = width / aspect
    else:
        width = height * aspect
    return centre, np.array([width, height], np.float32)


def crop(rgb: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The region of an RGB frame as the pose model's normalised 3 x 384 x 288 input."""
    import cv2

    # One factor for both axes: the region already has the model's aspect ratio.
    factor = POSE_SIZE[0] / float(scale[0])
    origin = np.asarray(centre, np.float64) - np.asarray(scale, np.float64) / 2
    warp = np.array([[factor, 0, -factor * origin[0]], [0, factor, -factor * origin[1]]], np.float64)
    patch = cv2.warpAffine(rgb, warp, POSE_SIZE, flags=cv2.INTER_LINEAR).astype(np.float32)
    return ((patch - MEAN) / STD).transpose(2, 0, 1)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, centres: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """SimCC outputs (N x 133 x 576, N x 133 x 768) of N crops (centres and scales N x 2) -> N x 133
    x 3 frame pixels and confidences: each axis's peak bin / 2, the lower of the two peaks as the
    confidence; a point whose confidence is not above 0 is missing (all 0)."""
    locations = np.stack([simcc_x.argmax(axis=-1), simcc_y.argmax(axis=-1)], axis=-1) / SIMCC_SPLIT
    confidence = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1))
    centres = np.asarray(centres, np.float64)[:, None]
    scales = np.asarray(scales, np.float64)[:, None]
    points = locations / np.array(POSE_SIZE, np.float64) * scales + centres - scales / 2
    out = np.concatenate([points, confidence[..., None]], axis=-1).astype(np.float32)
    out[confidence <= 0] = 0
    return out


# -- to the contract ------------------------------------------------------------------------------

def wholebody_to_contract(points: np.ndarray, width: int, height: int, threshold: float
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One person's 133 COCO-WholeBody points (x, y, confidence in frame pixels) -> body-18 (18 x 3),
    hands (2 x 21 x 3, left then right) and face (70 x 3: the 68 points, the two pupils missing).
    A point below ``threshold`` or outside the picture is missing (all 0); the neck is the
    shoulders' midpoint at the lower of their confidences, missing unless both are found."""
    kept = np.asarray(points, np.float32).copy()
    x, y, confidence = kept[:, 0], kept[:, 1], kept[:, 2]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    kept[~(inside & (confidence >= threshold) & (confidence > 0))] = 0

    body = np.zeros((18, 3), np.float32)
    for name, src in COCO17_TO_BODY18.items():
        body[BODY18_NAMES.index(name)] = kept[src]
    with_neck(body)
    hands = np.stack([kept[part] for part in HAND_SLICES])
    face = np.zeros((FACE_POINTS, 3), np.float32)
    face[:FACE_SLICE.stop - FACE_SLICE.start] = kept[FACE_SLICE]
    return body, hands, face


# -- the backend ----------------------------------------------------------------------------------

def cuda_provider_missing() -> str | None:
    """Why ONNX Runtime cannot run DWPose on CUDA here (the CPU-only ``onnxruntime`` wheel), or None."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("this onnxruntime has no CUDA provider (install onnxruntime-gpu in place of onnxruntime)")
    return None


def providers_for(device: str) -> list:
    """ONNX Runtime's execution providers for ``device`` (``cuda``, ``cuda:1``, ``cpu``): CUDA only
    where asked for, on that GPU, and never a silent CPU run in its place (DESIGN.md)."""
    kind, _, index = str(device).partition(":")
    if kind != "cuda":
        return ["CPUExecutionProvider"]
    missing = cuda_provider_missing()
    if missing:
        raise BackendError(f"dwpose on CUDA: {missing}, or pass --device cpu")
    # onnxruntime-gpu looks for CUDA's and cuDNN's libraries on the library path only, where pip's
    # copies (the nvidia-* wheels PyTorch depends on) are not: without them it falls back to the
    # CPU. Importing PyTorch first loads them into the process, where ONNX Runtime finds them
    # when their major versions are the ones its build needs (PyTorch 2.14's default Linux wheels
    # are built for CUDA 13; onnxruntime-gpu's PyPI builds have long been for CUDA 12).
    import torch  # noqa: F401
    options = {"device_id": int(index or 0)}
    limit = gpu_memory_limit()
    if limit is not None:  # this actor's share of a GPU it shares with another (gpu_balance)
        # Grown by what is asked, not doubled: the arena's doubling would reach the limit early.
        options.update(gpu_mem_limit=limit, arena_extend_strategy="kSameAsRequested")
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def _provider_names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _describe(io) -> str:
    (name, shape), outputs = io
    dims = lambda s: "(" + ", ".join("N" if d is None else str(d) for d in s) + ")"  # noqa: E731
    return f"input {name!r} {dims(shape)} -> " + ", ".join(f"{n!r} {dims(s)}" for n, s in outputs)


def _fits(declared, expected: tuple) -> bool:
    """A graph's declared shape against the expected one; a symbolic dimension fits anything, an
    expected None any size."""
    if len(declared) != len(expected):
        return False
    return all(e is None or not isinstance(d, int) or d == e for d, e in zip(declared, expected))


def session_options():
    """ONNX Runtime's options for DWPose's sessions: the thread count the rest of the process has
    (``OMP_NUM_THREADS``: 1 in the pipeline's Ray workers, one actor per CPU), where it is set.
    ONNX Runtime's own pool ignores that variable and starts a thread per physical core, spinning
    between runs: with two sessions an actor and an actor per CPU, a 96-core node ran 96 x 190
    threads for 96 cores."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        if int(threads) == 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_session(path: Path, io, what: str, providers: list[str]):
    """An ONNX Runtime session of ``path``, checked against the published graph's inputs and outputs."""
    import onnxruntime as ort

    expected = f"DWPose's {what} ({_describe(io)})"
    try:
        session = ort.InferenceSession(str(path), session_options(), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path} is not a readable ONNX graph ({first}); expected {expected}") from None
    (name, shape), outputs = io
    inputs = session.get_inputs()
    got = session.get_outputs()
    if ([i.name for i in inputs] != [name] or [o.name for o in got] != [n for n, _ in outputs]
            or not _fits(inputs[0].shape, shape)
            or not all(_fits(o.shape, s) for o, (_, s) in zip(got, outputs))):
        found = (", ".join(f"{i.name!r} {tuple(i.shape)}" for i in inputs) + " -> "
                 + ", ".join(f"{o.name!r} {tuple(o.shape)}" for o in got))
        raise WeightsError(f"{path} is not {expected}: it has {found}. Is it the right file?")
    if "CUDAExecutionProvider" in _provider_names(providers) and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu falls back to the CPU by itself when CUDA or cuDNN fail to load.
        raise BackendError(f"ONNX Runtime could not run {path.name} on CUDA: its CUDA provider did not load "
                           "(onnxruntime-gpu needs the CUDA and cuDNN major versions it was built for, which PyTorch's "
                           "wheels bring only where they match; on a cluster, the actor's log on its node names the "
                           "library missing); pass --device cpu to run dwpose on the CPU on "
                           "purpose")
    return session


class DWPosePose:
    """DWPose's two graphs, loaded once; ``pose(frame)`` for an RGB frame."""

    name = "dwpose"

    def __init__(self, weights: Path | None, *, hands: bool = True, face: bool = False, device: str = "cuda",
                 joint_threshold: float = 0.2):
        self.files = weight_files(weights, {})
        require(self.files, self.name)
        providers = providers_for(device)
        root = Path(weights)
        self.detector = load_session(root / DWPOSE_FILES["detector"], DETECTOR_IO, "YOLOX-L person detector",
                                     providers)
        self.model = load_session(root / DWPOSE_FILES["pose"], POSE_IO, "whole-body pose model", providers)
        # A graph exported with a fixed batch of one takes the boxes one at a time.
        batch = self.model.get_inputs()[0].shape[0]
        self.batch = batch if isinstance(batch, int) else None
        self.hands = hands
        self.face = face
        self.joint_threshold = joint_threshold

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Person boxes (x0, y0, x1, y1, frame pixels) and scores, best first."""
        batch, ratio = letterbox(bgr)
        (raw,) = self.detector.run(None, {DETECTOR_IO[0][0]: batch})
        return decode_detections(raw[0], ratio)

    def people(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """N x 133 x 3 frame points, one person per box, the boxes batched into one run."""
        if not len(boxes):
            return np.zeros((0, KEYPOINTS, 3), np.float32)
        regions = [box_to_crop(box) for box in boxes]
        crops = np.stack([crop(rgb, centre, scale) for centre, scale in regions])
        step = self.batch or len(crops)
        runs = [self.model.run(None, {POSE_IO[0][0]: crops[k:k + step]}) for k in range(0, len(crops), step)]
        simcc_x = np.concatenate([r[0] for r in runs])
        simcc_y = np.concatenate([r[1] for r in runs])
        centres, scales = (np.stack(part) for part in zip(*regions))
        return decode_simcc(simcc_x, simcc_y, centres, scales)

    def pose(self, frame: np.ndarray) -> Pose:
        height, width = frame.shape[:2]
        # The detector was trained on BGR pixels as OpenCV reads them (mmdet's YOLOX config has no
        # colour conversion); the pose model on RGB (its mmpose data preprocessor turns BGR into RGB
        # before the RGB mean and std; DWPose's own ONNX annotator feeds it RGB too). Each its own.
        boxes, _ = self.detect(np.ascontiguousarray(frame[:, :, ::-1]))
        if not len(boxes):
            # The frame's matting found a person the detector missed (a close-up, a dancer cut by
            # the frame's edge): the whole frame is the person's box, as DWPose and rtmlib do.
            boxes = np.array([[0, 0, width, height]], np.float32)
        people = self.people(frame, boxes)
        if not len(people):
            return Pose(body=EMPTY_BODY.copy(),
                        hands=np.zeros((2, HAND_POINTS, 3), np.float32) if self.hands else None,
                        face=np.zeros((FACE_POINTS, 3), np.float32) if self.face else None)
        person = people[int(np.argmax(people[:, :BODY_POINTS, 2].mean(axis=1)))]
        body, hands, face = wholebody_to_contract(person, width, height, self.joint_threshold)
        return Pose(body=body, hands=hands if self.hands else None, face=face if self.face else None)


# -- random weights in the graphs' shapes (tests, benchmarks) -------------------------------------

# The random detector's persons: anchors of the coarsest level (stride 32), cell (x, y) and size
# in cells; the first two overlap (NMS keeps one), so a frame gives two boxes.
RANDOM_PERSONS = (((9, 9), (8, 12)), ((10, 9), (8, 12)), ((4, 5), (5, 8)))


def write_dwpose(root: Path, seed: int = 0) -> list[Path]:
    """Both ONNX graphs, with the published files' input and output names, dtypes and shapes
    (the pose model's batch free), from small random networks; returns their paths.

    A random detector would score its 8400 anchors alike and send thousands of boxes to the pose
    model, so its output is a small random function of the picture plus a fixed prior: nobody
    anywhere but at ``RANDOM_PERSONS``. Objectness and class scores go through a sigmoid, as in
    YOLOX's exported graph."""
    import torch
    from torch import nn

    coarse = ANCHORS - (DETECTOR_SIZE // STRIDES[-1]) ** 2  # first row of the stride-32 level
    side = DETECTOR_SIZE // STRIDES[-1]

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Conv2d(3, 5 + COCO_CLASSES, 1) for _ in STRIDES)
            for head in self.heads:
                nn.init.normal_(head.weight, std=0.1)
                nn.init.zeros_(head.bias)
            prior = torch.zeros(1, ANCHORS, 5 + COCO_CLASSES)
            prior[..., 4:] = -8.0  # score logits: no object
            for (x, y), (w, h) in RANDOM_PERSONS:
                row = coarse + y * side + x
                prior[0, row, 2:4] = torch.tensor([math.log(w), math.log(h)])
                prior[0, row, 4:6] = 4.0  # an object, and a person
            self.register_buffer("prior", prior)

        def forward(self, images):
            rows = [head(nn.functional.avg_pool2d(images / 255.0, stride)).flatten(2).transpose(1, 2)
                    for head, stride in zip(self.heads, STRIDES)]
            out = torch.cat(rows, dim=1) + self.prior
            return torch.cat([out[..., :4], out[..., 4:].sigmoid()], dim=-1)

    class WholeBody(nn.Module):
        def __init__(self):
            super().__init__()
            width, height = POSE_SIZE
            self.points = nn.Conv2d(3, KEYPOINTS, 1)
            self.to_x = nn.Linear(width // 8, int(width * SIMCC_SPLIT))
            self.to_y = nn.Linear(height // 8, int(height * SIMCC_SPLIT))

        def forward(self, input):
            maps = self.points(nn.functional.avg_pool2d(input, 8))  # N x 133 x 48 x 36
            return self.to_x(maps.mean(dim=2)), self.to_y(maps.mean(dim=3))

    torch.manual_seed(seed)
    (Path(root) / "dwpose").mkdir(parents=True, exist_ok=True)
    graphs = [
        (Detector(), DETECTOR_IO, DWPOSE_FILES["detector"], None),
        (WholeBody(), POSE_IO, DWPOSE_FILES["pose"],
         {name: {0: "batch"} for name in (POSE_IO[0][0], *(n for n, _ in POSE_IO[1]))}),
    ]
    written = []
    for module, ((name, shape), outputs), file, dynamic in graphs:
        example = torch.zeros(*(2 if d is None else d for d in shape))
        path = Path(root) / file
        torch.onnx.export(module.eval(), (example,), str(path), input_names=[name],
                          output_names=[n for n, _ in outputs], dynamic_axes=dynamic, dynamo=False)
        written.append(path)
    return written


def _build(role: str, options: dict, shared: dict) -> DWPosePose:
    return DWPosePose(weights_dir(options.get("weights")), hands=options.get("hands", True),
                      face=options.get("face", False), device=options.get("device", "cuda"),
                      joint_threshold=options.get("joint_threshold", 0.2))


register(Backend(
    name="dwpose", roles=("pose",), build=_build, gpu=True, auto=True,
    summary="DWPose whole-body (YOLOX-L + dw-ll_ucoco_384, ONNX Runtime)",
    packages=("onnxruntime",), files=weight_files, options=("--hands", "--face", "--joint-threshold"),
    cuda_missing=cuda_provider_missing,
    random_weights=lambda root, size, options: write_dwpose(root),
))
