"""A user's reference photo, background and pose source -> pictures at the model's resolution.

Matting and pose come from the preprocessing pipeline's own annotators (``resolve_backends`` +
``FrameAnnotator``) and skeletons from its one renderer, so a generated clip is driven exactly
as the training data was made.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from disco.model.conditioning import square
from disco.generate.config import GenerateInputError
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.decode import decode_video_frames, load_image, probe_video
from disco.pipeline.store.encode import decode_picture, split_person
from disco.pipeline.errors import InputError
from disco.pipeline.annotators.render import render_pose

# MediaPipe needs pictures of some size: smaller models' frames are annotated at this side and the
# mask and keypoints scaled down (at 64 px it finds people in a cup of coffee).
MIN_ANNOTATE_SIDE = 256

_DEFAULTS = {f.name: f.default for f in fields(PreprocessConfig) if f.name in (
    "hands", "min_visibility", "min_mask_area", "joint_threshold", "pose_style")}


@dataclass
class Reference:
    image: np.ndarray  # size x size x 3 uint8, the square reference
    alpha: np.ndarray  # size x size uint8 person alpha
    foreground: np.ndarray
    background: np.ndarray


@dataclass
class PoseSequence:
    frames: list[np.ndarray]  # skeleton pictures, RGB uint8, pose-size squares
    fps: float
    empty: int = 0  # frames where no person was found (black skeleton)


def make_annotator(with_pose: bool):
    """The pipeline's annotators, resolved as ``preprocess`` resolves ``auto``."""
    from disco.pipeline.annotators import FrameAnnotator, resolve_backends

    backends = resolve_backends("auto", "auto" if with_pose else "none")
    # `auto` may pick the paper-faithful backends (CUDA and $DISCO_WEIGHTS): build them from what
    # it resolved, the weights folder and device included.
    return FrameAnnotator(backends["matting"], backends["pose"], _DEFAULTS["hands"] and with_pose,
                          _DEFAULTS["min_visibility"], _DEFAULTS["min_mask_area"], _DEFAULTS["joint_threshold"],
                          weights=backends["weights"], device=backends["device"])


def read_picture(path: str | Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise GenerateInputError(f"{what} {path} does not exist")
    try:
        return load_image(path, max_side=4096)
    except InputError as exc:
        raise GenerateInputError(f"{what} {path}: {exc.message}") from None


def matte_reference(image: np.ndarray, size: int, annotator=None) -> Reference:
    """Square the photo to ``size`` and split it into person and background with the pipeline's matting."""
    own = annotator is None
    annotator = annotator or make_annotator(with_pose=False)
    side = max(size, MIN_ANNOTATE_SIDE)
    try:
        annotation = annotator.annotate(square(image, side))
    finally:
        if own:
            annotator.close()
    if not annotation.present:
        raise GenerateInputError("no person was found in the reference picture")
    picture, alpha = square(image, size), square(annotation.matte.alpha, size)
    foreground, background = split_person(picture, alpha)
    return Reference(picture, alpha, foreground, background)


def poses_from_video(path: str | Path, side: int, fps: float | None = None, annotator=None,
                     style: str | None = None, batch: int = 32) -> PoseSequence:
    """Every frame of a video (resampled to ``fps`` when given) -> a skeleton picture of ``side`` px."""
    path = Path(path)
    if not path.is_file():
        raise GenerateInputError(f"pose video {path} does not exist")
    try:
        info = probe_video(path)
    except InputError as exc:
        raise GenerateInputError(f"pose video {path}: {exc.message}") from None
    indices = info.resample(fps or info.fps)
    own = annotator is None
    annotator = annotator or make_annotator(with_pose=True)
    analysed = max(side, MIN_ANNOTATE_SIDE)
    frames, empty = [], 0
    try:
        for start in range(0, len(indices), batch):
            decoded, _ = decode_video_frames(path, indices[start:start + batch], info.width, info.height)
            for frame in decoded:
                pose = annotator.annotate(square(frame, analysed)).pose
                empty += pose is None
                body = None if pose is None else scale_keypoints(pose.body, side / analysed)
                hands = None if pose is None or pose.hands is None else scale_keypoints(pose.hands, side / analysed)
                frames.append(render_pose(side, side, body, hands, style=style or _DEFAULTS["pose_style"]))
    except InputError as exc:
        raise GenerateInputError(f"pose video {path}: {exc.message}") from None
    finally:
        if own:
            annotator.close()
    return PoseSequence(frames, fps=min(fps or info.fps, info.fps), empty=empty)


def scale_keypoints(points: np.ndarray, factor: float) -> np.ndarray:
    """(x, y, confidence) rows with x and y scaled; missing joints stay all 0."""
    out = np.array(points, dtype=np.float32, copy=True)
    out[..., :2] *= factor
    return out


def read_clip(triplets: str | Path, clip: str, columns: list[str], split: str | None = None) -> list[dict]:
    """The rows of one preprocessed clip, in frame order."""
    import pyarrow.compute as pc

    from disco.pipeline.store.reader import open_triplets

    dataset = open_triplets(triplets)
    if not dataset.files:
        raise GenerateInputError(f"{triplets} holds no triplets/*.parquet; is it a `disco-cli preprocess` output?")
    condition = pc.field("clip_id") == clip
    if split is not None:
        condition = condition & (pc.field("split") == split)
    rows = dataset.to_table(columns=["frame_index", *columns], filter=condition).to_pylist()
    if not rows:
        known = sorted(set(dataset.to_table(columns=["clip_id"]).column("clip_id").to_pylist()))
        shown = ", ".join(known[:5]) + (" ..." if len(known) > 5 else "")
        raise GenerateInputError(f"clip {clip!r} is not in {triplets} (clips: {shown})")
    return sorted(rows, key=lambda r: r["frame_index"])


def clip_fps(rows: list[dict], default: float = 30.0) -> float:
    times = [r["timestamp_s"] for r in rows if r.get("timestamp_s") is not None]
    if len(times) < 2 or times[-1] <= times[0]:
        return default
    return (len(times) - 1) / (times[-1] - times[0])


def poses_from_triplets(triplets: str | Path, clip: str, side: int) -> PoseSequence:
    """The stored pose pictures of a preprocessed clip, squared to ``side`` px."""
    rows = read_clip(triplets, clip, ["pose", "timestamp_s"])
    if any(r["pose"] is None for r in rows):
        raise GenerateInputError(f"clip {clip!r} was preprocessed with --pose none: it has no pose pictures")
    frames = [square(decode_picture(r["pose"]), side) for r in rows]
    return PoseSequence(frames, fps=clip_fps(rows))
