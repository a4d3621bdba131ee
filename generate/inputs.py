"""A user's reference photo, background and pose source -> pictures at the model's resolution.

Matting and pose come from the preprocessing pipeline's own annotators (``resolve_backends`` +
``FrameAnnotator``) and skeletons from its one renderer, so a generated clip is driven exactly
as the training data was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from disco.model.conditioning import square
from disco.generate.config import GenerateInputError
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.decode import (cover_size, decode_every_frame, load_image, open_video, probe_video,
                                   resample_sequence, shrink_square, target_size)
from disco.pipeline.store.encode import decode_picture, split_person
from disco.pipeline.errors import InputError
from disco.pipeline.annotators.render import render_pose
from disco.generate.align import align_sequence
from disco.model.precision import on_cuda

# MediaPipe needs pictures of some size: smaller models' frames are annotated at this side and the
# mask and keypoints scaled down (at 64 px it finds people in a cup of coffee).
MIN_ANNOTATE_SIDE = 256

_DEFAULTS = {f.name: f.default for f in fields(PreprocessConfig) if f.name in (
    "hands", "min_visibility", "min_mask_area", "joint_threshold", "pose_style", "max_side")}


@dataclass
class Reference:
    image: np.ndarray  # size x size x 3 uint8, the square reference
    alpha: np.ndarray  # size x size uint8 person alpha
    foreground: np.ndarray
    background: np.ndarray
    pose: np.ndarray | None = None  # 18 x 3 body keypoints in pixels of the square (``with_pose``; None: not found)


@dataclass
class PoseSequence:
    frames: list[np.ndarray]  # skeleton pictures, RGB uint8, pose-size squares
    fps: float
    empty: int = 0  # frames where no person was found (black skeleton)
    alignment: dict | None = None  # the pose alignment applied (generate/align.py), None: not aligned
    smoothed: bool = False  # the keypoints went through the One-Euro filter
    bodies: list | None = None  # a video's drawn 18 x 3 body keypoints per frame (None: nobody), pose-size pixels
    cut_short: str = ""  # a pose video cut short (read up to the cut): what of it is missing


def annotator_backends(with_pose: bool, device: str | None = None) -> dict:
    """``resolve_backends``' answer for generate's annotators on ``device`` (see ``make_annotator``)."""
    from disco.pipeline.annotators import resolve_backends

    on_cpu = device is not None and not on_cuda(device)
    # On the CPU `auto` takes the embedded backends, as where no GPU exists: a GPU backend on the
    # CPU is only ever asked for by name.
    return resolve_backends("auto", "auto" if with_pose else "none", device="cpu" if on_cpu else "auto",
                            cuda=False if on_cpu else None)


def finds_faces(device: str | None = None) -> bool:
    """Whether the pose annotator ``make_annotator`` picks on ``device`` finds face points
    (OpenPose and DWPose do; MediaPipe, the embedded one, does not)."""
    from disco.pipeline.annotators.registry import load

    return "--face" in load(annotator_backends(True, device)["pose"]).options


def make_annotator(with_pose: bool, hands: bool | None = None, device: str | None = None, face: bool = False):
    """The pipeline's annotators, resolved as ``preprocess`` resolves ``auto`` (hands found unless
    ``hands`` is False, face points where ``face`` and the backend finds them), on the torch
    ``device`` the model runs on (``cpu``, ``cuda``, ``cuda:1``; None: a CUDA GPU where there is one)."""
    from disco.pipeline.annotators import FrameAnnotator

    backends = annotator_backends(with_pose, device)
    # `auto` may pick the paper-faithful backends (CUDA and $DISCO_WEIGHTS): build them from what
    # it resolved, the weights folder and device included (the model's GPU where one is named).
    run_device = device if backends["device"] == "cuda" and device is not None else backends["device"]
    hands = _DEFAULTS["hands"] if hands is None else hands
    return FrameAnnotator(backends["matting"], backends["pose"], hands and with_pose,
                          _DEFAULTS["min_visibility"], _DEFAULTS["min_mask_area"], _DEFAULTS["joint_threshold"],
                          weights=backends["weights"], device=run_device, face=face and with_pose)


# A reference photo straight off a phone's 108 or 200 MP mode (16320 x 12240) is taken: one
# picture, a JPEG decoded at a reduced scale; preprocessing's default limit (--max-pixels) is
# Pillow's decompression-bomb bound, 89.5 MP.
# A picture smaller than this a side (preprocess's --min-side default) holds no person to
# generate from: an 8 x 8 icon was blown up to the model's size and "matted" without a word.
PICTURE_MIN_SIDE = 32
PICTURE_MAX_PIXELS = 2 ** 28


def read_picture(path: str | Path, what: str) -> np.ndarray:
    path = Path(path)
    if path.is_dir():
        raise GenerateInputError(f"{what} {path} is a folder, not a picture")
    if not path.is_file():
        raise GenerateInputError(f"{what} {path} does not exist")
    try:
        return load_image(path, max_side=4096, min_side=PICTURE_MIN_SIDE, max_pixels=PICTURE_MAX_PIXELS)
    except InputError as exc:
        if exc.error_type == "image_too_small":
            raise GenerateInputError(f"{what} {path} is smaller than {PICTURE_MIN_SIDE} pixels a side: too small to "
                                     "hold a person to generate from") from None
        if exc.error_type == "image_too_large":
            raise GenerateInputError(f"{what} {path} has more than {PICTURE_MAX_PIXELS} pixels: shrink it first") from None
        raise GenerateInputError(f"{what} {path}: {exc.message}") from None


def probe_pose_video(path: str | Path):
    """The driving video's ``VideoInfo``; one that does not exist or cannot be read is refused."""
    path = Path(path)
    if not path.is_file():
        raise GenerateInputError(f"pose video {path} does not exist")
    try:
        return probe_video(path)
    except InputError as exc:
        raise GenerateInputError(f"pose video {path}: {exc.message}") from None


def matte_reference(image: np.ndarray, size: int, annotator=None, with_pose: bool = False,
                    device: str | None = None) -> Reference:
    """Square the photo to ``size`` and split it into person and background with the pipeline's matting
    (``with_pose``: also its body keypoints, from the same annotators' pose, in pixels of the square;
    ``device``: where annotators built here run, ``make_annotator``)."""
    own = annotator is None
    annotator = annotator or make_annotator(with_pose=with_pose, hands=False, device=device)
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
    pose = None if annotation.pose is None else scale_keypoints(annotation.pose.body, size / side)
    return Reference(picture, alpha, foreground, background, pose)


# Frames annotated as one video unit (MediaPipe tracking mode; the engine keeps each result of a
# unit, so a long video is cut into units of this many frames, each starting the tracking afresh).
UNIT_FRAMES = 256


def poses_from_video(path: str | Path, side: int, fps: float | None = None, annotator=None,
                     style: str | None = None, batch: int = 32, hands: bool | None = None,
                     smooth: bool = False, reference: np.ndarray | None = None, face: bool = False,
                     max_side: int | None = None,
                     max_frames: int | None = None, device: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> PoseSequence:
    """Every frame of a video (resampled to ``fps`` when given, the first ``max_frames`` only when
    given: the rest is never decoded) -> a skeleton picture of ``side`` px, drawn in ``style``
    with or without ``hands`` and face points (``face``, where the annotator finds them), as if
    the frames had been stored at ``max_side`` (``drawing_side``; default: the preprocessing
    defaults).

    The frames are annotated as a video (tracking mode, as ``preprocess`` does). ``smooth``: the
    keypoints go through the One-Euro filter (``pipeline/annotators/smoothing.py``) first;
    ``reference``: then they are aligned to this 18 x 3 skeleton (pixels of the ``side`` square,
    ``generate/align.py``). ``progress(done, total)``: frames annotated so far, after each batch
    (a long video takes minutes: several frames a second)."""
    hands = _DEFAULTS["hands"] if hands is None else hands
    path = Path(path)
    info = probe_pose_video(path)
    indices, rate = info.resampled(fps or info.fps)
    indices = indices[:max_frames]
    own = annotator is None
    annotator = annotator or make_annotator(with_pose=True, hands=hands, device=device, face=face)
    analysed = max(side, MIN_ANNOTATE_SIDE)
    bodies, drawn_hands, faces = [], [], []
    begin_unit = getattr(annotator, "begin_unit", None)
    # Decoded straight to the size analysed (its short side): a 4K phone clip's batch of 32 frames
    # is 800 MB at full size, only to be shrunk to a 256 px square frame by frame.
    width, height = cover_size(info.width, info.height, analysed)
    try:
        video = open_video(path, width, height)  # once: read in order, batch after batch
        for start in range(0, len(indices), batch):
            decoded, _ = decode_every_frame(path, indices[start:start + batch], width, height, video)
            for offset, frame in enumerate(decoded):
                if begin_unit is not None and (start + offset) % UNIT_FRAMES == 0:
                    begin_unit({"kind": "video", "path": str(path), "frame_start": start + offset})
                pose = annotator.annotate(square(frame, analysed)).pose
                bodies.append(None if pose is None else scale_keypoints(pose.body, side / analysed))
                drawn_hands.append(None if not hands or pose is None or pose.hands is None else
                                   scale_keypoints(pose.hands, side / analysed))
                faces.append(None if not face or pose is None or pose.face is None else
                             scale_keypoints(pose.face, side / analysed))
            if progress is not None:
                progress(len(bodies), len(indices))
    except InputError as exc:
        raise GenerateInputError(f"pose video {path}: {exc.message}") from None
    finally:
        if own:
            annotator.close()
    if smooth and len(bodies) > 1:
        from disco.pipeline.annotators.smoothing import smooth_sequence

        bodies, drawn_hands, faces = (smooth_sequence(points, rate, side) for points in (bodies, drawn_hands, faces))
    alignment = None
    if reference is not None:
        bodies, drawn_hands, faces, fitted = align_sequence(reference, bodies, drawn_hands, faces)
        alignment = None if fitted is None else fitted.to_dict()
    drawn = drawing_side(info.width, info.height, side, max_side)
    frames = [_drawn_at(drawn, side, body, hand, style or _DEFAULTS["pose_style"], face_points)
              for body, hand, face_points in zip(bodies, drawn_hands, faces)]
    return PoseSequence(frames, fps=rate, empty=sum(b is None for b in bodies), alignment=alignment,
                        smoothed=smooth and len(bodies) > 1, bodies=bodies, cut_short=info.cut_short)


def drawing_side(width: int, height: int, side: int, max_side: int | None = None) -> int:
    """The square a driving video's skeletons are drawn on before they shrink to ``side``: the
    short side of the frame as ``preprocess`` stores it with ``--max-side`` ``max_side`` (the
    model's training data's, ``trained_drawing``; 512 by default). Training
    draws each skeleton at its stored frame's size and shrinks the crop to the training size, and
    lines and joints are fixed pixel counts: drawn straight at 256 px, a square video's limbs
    were twice as thick as those the model learnt (1080p stored at 512 x 512), a 16:9 one's 1.1x."""
    return max(side, min(target_size(width, height, max_side or _DEFAULTS["max_side"])))


def _drawn_at(drawn: int, side: int, body, hand, style: str, face=None) -> np.ndarray:
    factor = drawn / side
    picture = render_pose(drawn, drawn, None if body is None else scale_keypoints(body, factor),
                          None if hand is None else scale_keypoints(hand, factor), style=style,
                          face=None if face is None else scale_keypoints(face, factor))
    return picture if drawn == side else shrink_square(picture, side)  # as training shrinks its crop


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


# What ``pose_pictures`` reads of each row: the stored picture, and what to draw one from.
POSE_READ_COLUMNS = ("pose", "width", "height", "body_keypoints", "hand_keypoints", "face_keypoints")


def pose_pictures(triplets: str | Path, rows: list[dict], style: str | None = None, hands: bool | None = None,
                  clip: str = "", redraw: bool = False, face: bool | None = None) -> list[np.ndarray]:
    """The pose pictures (stored size) of ``rows`` of the preprocessed folder ``triplets`` (read
    with ``POSE_READ_COLUMNS``) in ``style`` / ``hands`` / ``face`` (default: as stored; face
    points only where the folder has them): the stored pictures
    where the folder's manifest says they are drawn so, else drawn from the stored keypoints.
    Stored pictures of another drawing with no keypoints to redraw them are refused. ``redraw``:
    always drawn from the keypoints (rows whose keypoints were changed, e.g. aligned)."""
    from disco.pipeline.store.pose import data_pose, row_pose

    data = data_pose(triplets)
    style = style or data.style
    hands = data.hands if hands is None else hands
    if not redraw and check_pose_folder(triplets, style, hands, face):
        if any(r["pose"] is None for r in rows):
            raise GenerateInputError(f"clip {clip!r} was preprocessed with --pose none: it has no pose pictures")
        return [decode_picture(r["pose"]) for r in rows]
    if any(r["body_keypoints"] is None for r in rows):
        raise _other_drawing(triplets, data.style, style)
    return [row_pose(r["width"], r["height"], r["body_keypoints"], r["hand_keypoints"],
                     r["face_keypoints"] if face is None or face else None, style, hands) for r in rows]


def check_pose_folder(triplets: str | Path, style: str, hands: bool, face: bool | None = None) -> bool:
    """Whether the preprocessed folder ``triplets`` stores its pose pictures drawn in ``style`` /
    ``hands`` / ``face`` (None: either; face points asked of a folder without them: its own
    pictures are the nearest) (else they are drawn from its keypoints); a folder of another
    drawing without keypoints (``--pose none``) is refused with one line, before any model loads."""
    from disco.pipeline.store.pose import data_pose, same_drawing

    data = data_pose(triplets)
    if same_drawing(data, style, hands, None if face is None else face and data.face):
        return True
    if not data.keypoints:
        raise _other_drawing(triplets, data.style, style)
    return False


def _other_drawing(triplets, stored: str, style: str) -> GenerateInputError:
    return GenerateInputError(f"{triplets} holds {stored} pose pictures (or none) and no keypoints to draw the "
                              f"model's {style} poses from; preprocess it with --pose-style {style}")


def poses_from_triplets(triplets: str | Path, clip: str, side: int, style: str | None = None,
                        hands: bool | None = None, reference: np.ndarray | None = None,
                        fps: float | None = None, max_frames: int | None = None,
                        face: bool | None = None) -> PoseSequence:
    """The pose pictures of a preprocessed clip in ``style`` / ``hands`` / ``face`` (``pose_pictures``),
    squared to ``side`` px; resampled to ``fps`` as a pose video is, the first ``max_frames``
    only. ``reference``: the stored keypoints are first aligned to this 18 x 3 skeleton (pixels of
    the ``side`` square, ``generate/align.py``) and drawn from."""
    rows = read_clip(triplets, clip, [*POSE_READ_COLUMNS, "timestamp_s"])
    rate = clip_fps(rows)
    if fps is not None:
        times = [r.get("timestamp_s") for r in rows]
        picked, rate = resample_sequence(times if None not in times else (), len(rows), rate, fps)
        rows = [rows[i] for i in picked]
    rows = rows[:max_frames]
    alignment = None
    if reference is not None and all(r["body_keypoints"] is not None for r in rows):
        rows, alignment = align_rows(rows, reference, side)
    frames = [square(picture, side)
              for picture in pose_pictures(triplets, rows, style, hands, clip, redraw=alignment is not None,
                                           face=face)]
    return PoseSequence(frames, fps=rate, alignment=alignment)


def _square_frame(row: dict, side: int) -> tuple[np.ndarray, float]:
    """Where ``square`` puts a row's stored picture: (crop corner, stored pixels per square pixel)."""
    width, height = row["width"], row["height"]
    short = min(width, height)
    return np.array([(width - short) // 2, (height - short) // 2], np.float32), short / side


def align_rows(rows: list[dict], reference: np.ndarray, side: int) -> tuple[list[dict], dict | None]:
    """Rows of a clip (``POSE_READ_COLUMNS``) with their keypoints aligned to ``reference``
    (pixels of the ``side`` square the pictures are squared to); (rows, None) when it could not be measured."""
    def to_square(points, row, joints):
        if points is None:
            return None
        corner, factor = _square_frame(row, side)
        out = np.asarray(points, np.float32).reshape(*joints, 3).copy()
        found = out[..., 2] > 0
        out[..., :2] = np.where(found[..., None], (out[..., :2] - corner) / factor, 0)
        return out

    def back(points, row):
        if points is None:
            return None
        corner, factor = _square_frame(row, side)
        out = np.array(points, np.float32, copy=True)
        found = out[..., 2] > 0
        out[..., :2] = np.where(found[..., None], out[..., :2] * factor + corner, 0)
        return out.reshape(-1).tolist()

    bodies = [to_square(r["body_keypoints"], r, (18,)) for r in rows]
    hands = [to_square(r["hand_keypoints"], r, (2, 21)) for r in rows]
    faces = [to_square(r["face_keypoints"], r, (-1,)) for r in rows]
    bodies, hands, faces, fitted = align_sequence(reference, bodies, hands, faces)
    if fitted is None:
        return rows, None
    aligned = [{**r, "body_keypoints": back(b, r), "hand_keypoints": back(h, r), "face_keypoints": back(f, r)}
               for r, b, h, f in zip(rows, bodies, hands, faces)]
    return aligned, fitted.to_dict()
