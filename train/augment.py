"""Crops of DisCo's recipe (DESIGN.md): one crop box per sample, applied to every picture of it.

The box is drawn by RandomResizedCrop's rule under a generator seeded from the sample, so a
sample gets the same crop on every run, on any worker, after any resume. It is drawn with NumPy,
not torchvision: this module runs in Ray Data's decode processes, and importing torch there cost
each new process about 5 s on two cores (9 s of a cold stream's 16 s to its first batch).
"""

from __future__ import annotations

import math

import numpy as np

FINETUNE_SCALE = (0.9, 1.0)
PRETRAIN_SCALE = (0.5, 1.0)
CROP_TRIES = 10  # as torchvision's RandomResizedCrop.get_params
CLIP_SIZE = 224

Box = tuple[int, int, int, int]  # top, left, height, width


def _resized_crop_box(height: int, width: int, scale: tuple[float, float], seed: int) -> Box:
    """RandomResizedCrop's box with aspect ratio 1: a square whose area is a uniform fraction in
    ``scale`` of the picture's, placed uniformly; drawn again where it does not fit (up to
    ``CROP_TRIES`` times), else the centre square."""
    rng = np.random.default_rng(seed)
    for _ in range(CROP_TRIES):
        side = int(round(math.sqrt(height * width * rng.uniform(*scale))))
        if 0 < side <= min(height, width):
            return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_box(height: int, width: int, stage: str, seed: int, augment: bool = True) -> Box:
    """Fine-tuning: RandomResizedCrop scale (0.9, 1), ratio 1. Pre-training (HAP): a random square
    along the long side, then RandomResizedCrop scale (0.5, 1) inside it. Without augmentation:
    the centre square."""
    side = min(height, width)
    if not augment:
        return (height - side) // 2, (width - side) // 2, side, side
    if stage == "finetune":
        return _resized_crop_box(height, width, FINETUNE_SCALE, seed)
    rng = np.random.default_rng(seed)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    t, l, h, w = _resized_crop_box(side, side, PRETRAIN_SCALE, seed + 1)
    return top + t, left + l, h, w


def scale_box(box: Box, src: tuple[int, int], dst: tuple[int, int]) -> Box:
    """The same relative box on a picture of another size (a reference frame of another size)."""
    if src == dst:
        return box
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    top, left, h, w = box
    return int(round(top * sy)), int(round(left * sx)), max(1, int(round(h * sy))), max(1, int(round(w * sx)))


def apply_box(picture: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Crop then resize to ``size`` x ``size`` (``pipeline.decode.shrink_square``)."""
    from disco.pipeline.decode import shrink_square

    top, left, h, w = box
    return shrink_square(picture[top:top + h, left:left + w], size)
