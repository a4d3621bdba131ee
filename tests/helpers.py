"""Small media the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_counter_video(path: Path, frames: int, fps: float, size: int = 64) -> Path:
    """A clip whose frame k has grey level 2k + 10, so decoded frames can be told apart."""
    from disco.pipeline.demo_data import write_video

    levels = [np.full((size, size, 3), 10 + 2 * k, np.uint8) for k in range(frames)]
    return write_video(path, levels, fps)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path
