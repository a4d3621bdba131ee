"""Turning a frame and its annotation into the encoded pictures of one triplet row."""

from __future__ import annotations

import cv2
import numpy as np

from disco.pipeline.annotators import Annotation, mask_area
from disco.pipeline.errors import InputError
from disco.pipeline.annotators.render import render_pose
from disco.pipeline.store.schema import PERSON_ALPHA, sample_id


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H x W x 3) or single-channel (H x W) uint8 array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise InputError("encode", "encode_failed", "PNG encoding failed")
    return buf.tobytes()


def encode_picture(rgb: np.ndarray, fmt: str, quality: int) -> bytes:
    if fmt == "png":
        return encode_png(rgb)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError("encode", "encode_failed", "JPEG encoding failed")
    return buf.tobytes()


def decode_picture(data: bytes, grayscale: bool = False) -> np.ndarray:
    """Inverse of the encoders above: RGB (or single-channel) uint8."""
    flag = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if array is None:
        raise ValueError("not a decodable picture")
    return array if grayscale else cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def split_person(frame: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground (non-person pixels 0) and background (person pixels 0); person is alpha >= 128."""
    person = (alpha >= PERSON_ALPHA)[..., None]
    return np.where(person, frame, 0).astype(np.uint8), np.where(person, 0, frame).astype(np.uint8)


def build_row(
    unit: dict,
    frame_index: int,
    timestamp: float | None,
    frame: np.ndarray,
    annotation: Annotation,
    *,
    image_format: str,
    jpeg_quality: int,
    pose_style: str,
    with_pose: bool,
) -> dict:
    height, width = frame.shape[:2]
    alpha = annotation.matte.alpha
    foreground, background = split_person(frame, alpha)
    pose = annotation.pose
    body = pose.body if pose is not None else np.zeros((18, 3), np.float32)
    hands = pose.hands if pose is not None else None
    face = pose.face if pose is not None else None
    pose_png = encode_png(render_pose(width, height, body, hands, style=pose_style, face=face)) if with_pose else None
    return {
        "sample_id": sample_id(unit["source"], unit["clip_id"], frame_index),
        "source": unit["source"],
        "clip_id": unit["clip_id"],
        "frame_index": frame_index,
        "timestamp_s": timestamp,
        "split": unit["split"],
        "input_path": unit["input_path"],
        "width": width,
        "height": height,
        "image": encode_picture(frame, image_format, jpeg_quality),
        "mask": encode_png(alpha),
        "foreground": encode_picture(foreground, image_format, jpeg_quality),
        "background": encode_picture(background, image_format, jpeg_quality),
        "pose": pose_png,
        "body_keypoints": np.asarray(body, np.float32).reshape(-1).tolist(),
        "hand_keypoints": None if hands is None else np.asarray(hands, np.float32).reshape(-1).tolist(),
        "face_keypoints": None if face is None else np.asarray(face, np.float32).reshape(-1).tolist(),
        "person_score": float(annotation.matte.score),
        "person_count": int(annotation.matte.count),
        "mask_area": mask_area(alpha),
    }
