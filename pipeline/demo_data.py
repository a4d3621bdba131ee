"""The demo's inputs: real photographs of people that ship inside installed packages.

scikit-image ships the astronaut (Eileen Collins) and the cameraman, matplotlib ships Grace
Hopper; coffee and a cat are there to be rejected as having no person. The "video" is a short
pan-and-zoom clip over the astronaut photo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _grace_hopper() -> np.ndarray | None:
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            return np.asarray(Image.open(fh).convert("RGB"))
    except Exception:  # matplotlib without its sample data: the demo goes on without her
        return None


def write_demo_images(folder: Path) -> list[Path]:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    pictures = {
        "astronaut.png": data.astronaut(),
        "cameraman.png": data.camera(),  # grayscale: stored as mode L
        "coffee.png": data.coffee(),
        "cat.png": data.chelsea(),
    }
    hopper = _grace_hopper()
    if hopper is not None:
        pictures["grace_hopper.jpg"] = hopper
    paths = []
    for name, array in pictures.items():
        path = folder / name
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def pan_zoom_frames(image: np.ndarray, frames: int, size: int) -> list[np.ndarray]:
    """A slow zoom from the whole picture to its upper centre, as frames of ``size`` x ``size``."""
    height, width = image.shape[:2]
    out = []
    for k in range(frames):
        t = k / max(1, frames - 1)
        side = int(min(height, width) * (1.0 - 0.25 * t))
        x0 = (width - side) // 2
        y0 = int((height - side) * 0.2 * t)
        crop = Image.fromarray(image[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(crop))
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """Write RGB frames as an MPEG-4 .mp4 through OpenCV's bundled FFmpeg."""
    import cv2

    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


DEMO_CLIP = "astronaut_zoom"


def write_demo_video(folder: Path, seconds: float = 2.0, fps: float = 30.0, size: int = 320) -> Path:
    from skimage import data

    frames = pan_zoom_frames(data.astronaut(), int(seconds * fps), size)
    return write_video(folder / f"{DEMO_CLIP}.mp4", frames, fps)
