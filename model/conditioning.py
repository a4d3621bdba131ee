"""Pictures -> the model's three conditions, at the model's resolution (DESIGN.md, "The DisCo model").

- reference: the foreground as CLIP sees it: a 224 x 224 square, normalised with CLIP's mean and
  std, then multiplied by the person mask;
- background: the picture with the person removed, in [-1, 1], at the generated size, the person's
  hole 0 (mid grey: ``[-1, 1] * (1 - mask)``, the value the official checkpoints were trained on);
- pose: the skeleton picture in [0, 1], at the pose ControlNet's size (8 x the latent side).

Training (from the data stream's tensors), generation and evaluation (from pictures) all go
through here, so the model sees the same conditions in each.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from disco.pipeline.store.schema import PERSON_ALPHA

DISCO_SIZE = 256  # the paper trains and samples at 256 x 256


def square(image: np.ndarray, side: int, nearest: bool = False) -> np.ndarray:
    """Centre crop to a square along the long side, then resize to ``side`` x ``side``."""
    height, width = image.shape[:2]
    short = min(height, width)
    y0, x0 = (height - short) // 2, (width - short) // 2
    crop = image[y0:y0 + short, x0:x0 + short]
    if short == side:
        return np.ascontiguousarray(crop)
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if short > side else cv2.INTER_CUBIC
    return cv2.resize(crop, (side, side), interpolation=interpolation)


def vae_factor(model) -> int:
    """How much the VAE shrinks a picture (8 for Stable Diffusion's)."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def pose_factor(model) -> int:
    """Pixels of the pose picture per latent pixel: the ControlNet's conditioning embedding stride."""
    controlnet = model.pose_controlnet if model.pose_controlnet is not None else model.background_controlnet
    channels = getattr(controlnet.config, "conditioning_embedding_out_channels", (16, 32, 96, 256))
    return 2 ** (len(channels) - 1)


def size_multiple(model) -> int:
    """Generated sides must be multiples of this (the VAE and the UNet's down-sampling)."""
    return vae_factor(model) * 2 ** (len(model.unet.config.block_out_channels) - 1)


def default_size(model) -> int:
    """256 for the full model (the paper's resolution); the UNet's native size for smaller VAEs."""
    if vae_factor(model) == 8:
        return DISCO_SIZE
    return model.unet.config.sample_size * vae_factor(model)


def check_size(model, size: int) -> None:
    multiple = size_multiple(model)
    if size <= 0 or size % multiple:
        raise ValueError(f"size {size} is not a positive multiple of {multiple} (what this model's VAE and UNet need)")


def pose_size(model, size: int) -> int:
    return size // vae_factor(model) * pose_factor(model)


def fit_pose(model, pose: torch.Tensor | None, latent_side: int) -> torch.Tensor | None:
    """A skeleton tensor at the size the pose ControlNet's conditioning embedding expects (it
    shrinks by 8, like SD's VAE; the tiny VAE shrinks by 4, so there the pose is enlarged)."""
    if pose is None or model.pose_controlnet is None:
        return None
    side = latent_side * pose_factor(model)
    if pose.shape[-1] == side:
        return pose
    return torch.nn.functional.interpolate(pose, size=(side, side), mode="bilinear", align_corners=False)


def person_mask(alpha: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The person alpha in [0, 1] -> 1 where it is a person (alpha at least ``PERSON_ALPHA``, the
    threshold the pipeline split foreground and background with), else 0."""
    return (alpha * 255 >= PERSON_ALPHA - 0.5).to(dtype)


def clip_input(pictures: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """N x 3 x 224 x 224 pictures in [0, 1] and the person alpha (N x 1 x 224 x 224, in [0, 1]) ->
    the reference encoder's input: CLIP's mean and std, then the binary person mask (DESIGN.md)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pictures.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=pictures.device).view(1, 3, 1, 1)
    return (pictures - mean) / std * person_mask(alpha, pictures.dtype)


# The value of the person's hole in the background condition: 0 (mid grey), the official code's;
# runs trained before this package followed it had -1 (black) and keep it (``background_hole``).
HOLE = 0.0
LEGACY_HOLE = -1.0


def background_input(background: torch.Tensor, alpha: torch.Tensor | None, hole: float = HOLE) -> torch.Tensor:
    """N x 3 x H x W backgrounds in [0, 1] and the person alpha at the same size (N x 1 x H x W, in
    [0, 1]; None for a scene without a person cut out) -> the background ControlNet's input:
    [-1, 1], then times (1 - person mask), so the hole is 0 (mid grey) as in the official code,
    whose checkpoints were trained on it, not -1 (black)."""
    pictures = background * 2 - 1
    if alpha is None:
        return pictures
    person = person_mask(alpha, pictures.dtype)
    return pictures * (1 - person) + hole * person


def reference_picture(reference: torch.Tensor) -> torch.Tensor:
    """The CLIP input back in [0, 1], for looking at it (sample grids)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=reference.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=reference.device).view(1, 3, 1, 1)
    return (reference * std + mean).clamp(0, 1) * (reference != 0).any(1, keepdim=True)


def reference_pixels(image: np.ndarray, alpha: np.ndarray, clip_size: int = 224) -> torch.Tensor:
    """RGB uint8 picture and its person alpha (0..255) -> 1 x 3 x 224 x 224 CLIP input, masked."""
    rgb = torch.from_numpy(square(image, clip_size).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    alpha = torch.from_numpy(square(alpha, clip_size, nearest=True).astype(np.float32) / 255.0)[None, None]
    return clip_input(rgb, alpha).contiguous()


def background_pixels(background: np.ndarray, size: int, alpha: np.ndarray | None = None,
                      hole: float = HOLE) -> torch.Tensor:
    """RGB uint8 background and the person alpha cut out of it (0..255, same size; None for
    another scene) -> 1 x 3 x size x size, ``background_input``'s values."""
    rgb = torch.from_numpy(square(background, size).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    if alpha is not None:
        alpha = torch.from_numpy(square(alpha, size, nearest=True).astype(np.float32) / 255.0)[None, None]
    return background_input(rgb, alpha, hole).contiguous()


def pose_pixels(poses: list[np.ndarray] | np.ndarray, side: int) -> torch.Tensor:
    """Skeleton pictures (RGB uint8) -> N x 3 x side x side uint8, which ``DisCoPipeline`` takes
    to [0, 1] a batch at a time (a float copy of a long video's poses was 12 MB a frame at 512 px:
    17 GB for three minutes)."""
    frames = [square(p, side, nearest=False) for p in poses]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def unit_pose(poses: torch.Tensor) -> torch.Tensor:
    """Pose pictures as the model takes them, float in [0, 1]: ``pose_pixels``' uint8 divided by
    255, float ones as they are."""
    return poses.float() / 255.0 if poses.dtype == torch.uint8 else poses


class NonFiniteFrames(ValueError):
    """Sampled frames with NaN or inf values (a half-precision overflow)."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded VAE output in [-1, 1], N x 3 x H x W -> N x H x W x 3 uint8. NaN or inf values are
    refused: clamped and cast, NaN became 0, a black frame written (and kept for a resume) without
    a word where half precision overflowed."""
    if not bool(torch.isfinite(images).all()):
        raise NonFiniteFrames(f"the sampled frames hold NaN or inf values (computed in {images.dtype}: a half-"
                              "precision overflow; --dtype bfloat16 or float32 avoids it)")
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
