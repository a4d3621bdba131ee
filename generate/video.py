"""Writing generated clips and reading clips back: H.264 through PyAV's bundled FFmpeg (libx264),
decord reads."""

from __future__ import annotations

import itertools
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

__all__ = ["read_video", "side_by_side", "write_frames", "write_video"]

# What every browser, notebook and chat app plays: H.264, 4:2:0 chroma, the index at the front.
CODEC, PIXEL_FORMAT = "libx264", "yuv420p"
CRF = 18  # visually lossless for generated frames; x264's default (23) smears fine texture


def write_video(path: str | Path, frames, fps: float) -> Path:
    """RGB uint8 frames (N x H x W x 3, a list, or any iterable: encoded as they come, never all
    held at once) -> an H.264 MP4 (yuv420p, ``+faststart``).

    4:2:0 needs even sides, so an odd width or height gets one edge pixel repeated. Written to a
    temporary name and renamed, so a failure leaves no half-written video under ``path``."""
    import av

    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to write")
    frames = itertools.chain([first], frames)
    height, width = first.shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(CODEC, rate=rate)
            stream.width, stream.height = width + width % 2, height + height % 2
            stream.pix_fmt = PIXEL_FORMAT
            stream.options = {"crf": str(CRF)}
            for frame in frames:
                if frame.shape[:2] != (height, width):
                    raise ValueError(f"frame of {frame.shape[1]} x {frame.shape[0]} in a video of {width} x {height}")
                frame = np.ascontiguousarray(frame)
                picture = np.pad(frame, pad, mode="edge") if any(p[1] for p in pad) else frame
                for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames of a video as N x H x W x 3 uint8 RGB, and its frame rate."""
    from disco.pipeline.decode import decode_every_frame, probe_whole_video

    info = probe_whole_video(path)
    frames, _ = decode_every_frame(path, list(range(info.num_frames)), info.width, info.height)
    return frames, info.fps


def side_by_side(poses: list[np.ndarray], frames: np.ndarray) -> Iterator[np.ndarray]:
    """pose | generated, the pose picture scaled to the frame's size, one pair at a time (for
    ``write_video``: a long video's pairs all at once were twice its frames again in memory)."""
    height, width = frames.shape[1:3]
    return (np.concatenate([cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA), f], axis=1)
            for p, f in zip(poses, frames))


FRAME_NAME = re.compile(r"^\d{6}\.png$")
# The file that marks a folder of frames this module wrote: only there are frames overwritten.
FRAMES_MARK = ".disco-generated-frames"


def frames_folder_problem(folder: str | Path, flag: str = "--frames") -> str | None:
    """Why frames cannot be written into ``folder``: it holds frames of that name that this
    module did not write (a user's real frames, overwritten and the later ones deleted)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / FRAMES_MARK).exists():
        return None
    theirs = sorted(p.name for p in folder.iterdir() if FRAME_NAME.match(p.name))
    if not theirs:
        return None
    return (f"{flag} {folder} holds numbered frames ({theirs[0]}, ...) in a folder generate has not marked as its "
            f"own ({FRAMES_MARK}): they would be overwritten; choose an empty or new folder")


def write_frames(folder: str | Path, frames: np.ndarray) -> list[Path]:
    """PNG per frame, ``000000.png`` upwards. Frames of that name past the last one (an earlier,
    longer run into the same folder) go: left, they read as the end of this run's frames. The
    folder is marked (``FRAMES_MARK``) as one such frames are written into."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FRAMES_MARK).write_text("frames written by disco-cli generate; the next run into this folder replaces them\n")
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"{index:06d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    for stale in folder.iterdir():
        if FRAME_NAME.match(stale.name) and int(stale.name[:6]) >= len(frames):
            stale.unlink()
    return paths
