"""Writing generated clips and reading clips back (OpenCV's bundled FFmpeg writes, decord reads)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from disco.pipeline.demo_data import write_video

__all__ = ["read_video", "side_by_side", "write_frames", "write_video"]


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames of a video as N x H x W x 3 uint8 RGB, and its frame rate."""
    from disco.pipeline.decode import decode_video_frames, probe_video

    info = probe_video(path)
    frames, _ = decode_video_frames(path, list(range(info.num_frames)), info.width, info.height)
    return frames, info.fps


def side_by_side(poses: list[np.ndarray], frames: np.ndarray) -> list[np.ndarray]:
    """pose | generated, the pose picture scaled to the frame's size."""
    height, width = frames.shape[1:3]
    return [np.concatenate([cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA), f], axis=1)
            for p, f in zip(poses, frames)]


def write_frames(folder: str | Path, frames: np.ndarray) -> list[Path]:
    """PNG per frame, ``000000.png`` upwards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"{index:06d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    return paths
