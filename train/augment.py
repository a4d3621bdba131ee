"""Crops of DisCo's recipe (DESIGN.md): one crop box per sample, applied to every picture of it.

The box is drawn by torchvision's own ``RandomResizedCrop.get_params`` under a generator seeded
from the sample, so a sample gets the same crop on every run, on any worker, after any resume.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

FINETUNE_SCALE = (0.9, 1.0)
PRETRAIN_SCALE = (0.5, 1.0)
SQUARE = (1.0, 1.0)
CLIP_SIZE = 224

Box = tuple[int, int, int, int]  # top, left, height, width


def _resized_crop_box(height: int, width: int, scale: tuple[float, float], seed: int) -> Box:
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: ``torch.manual_seed`` also queues a lazy CUDA seeding that
        # records a stack trace, several times the cost of the whole crop.
        torch.default_generator.manual_seed(seed)
        return tuple(int(v) for v in RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(SQUARE)))


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
    """Crop then resize to ``size`` x ``size``: the area filter when shrinking by 2x or more, where
    bilinear would alias; bilinear otherwise (it reads every source pixel when shrinking by less
    than 2x, and OpenCV's area filter at such fractional scales costs several times as much)."""
    top, left, h, w = box
    crop = picture[top:top + h, left:left + w]
    interpolation = cv2.INTER_AREA if h >= 2 * size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)
