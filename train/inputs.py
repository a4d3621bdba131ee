"""From the data stream's uint8 pictures to the model's inputs: one home for the value ranges."""

from __future__ import annotations

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from disco.pipeline.schema import PERSON_ALPHA


def model_inputs(batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``target`` and ``background`` in [-1, 1], ``pose`` in [0, 1], ``reference`` the CLIP input
    (224 x 224, CLIP mean and std) multiplied by the person mask (DESIGN.md)."""

    def unit(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True).float() / 255.0

    return {
        "target": unit("target") * 2 - 1,
        "background": unit("background") * 2 - 1,
        "pose": unit("pose"),
        "reference": clip_input(unit("reference"), unit("reference_mask")),
    }


def clip_input(pictures: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """N x 3 x 224 x 224 pictures in [0, 1] and the person alpha (N x 1 x 224 x 224, in [0, 1]) ->
    the reference encoder's input: CLIP's mean and std, then the binary person mask (alpha at
    least ``PERSON_ALPHA``, DESIGN.md). Training and generation both go through here, so the
    model sees the same mask in both."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pictures.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=pictures.device).view(1, 3, 1, 1)
    person = (alpha * 255 >= PERSON_ALPHA - 0.5).to(pictures.dtype)
    return (pictures - mean) / std * person


def reference_picture(reference: torch.Tensor) -> torch.Tensor:
    """The CLIP input back in [0, 1], for looking at it (sample grids)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=reference.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=reference.device).view(1, 3, 1, 1)
    return (reference * std + mean).clamp(0, 1) * (reference != 0).any(1, keepdim=True)
