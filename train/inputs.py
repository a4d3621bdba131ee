"""From the data stream's uint8 pictures to the model's inputs: one home for the value ranges."""

from __future__ import annotations

import torch

from disco.model.conditioning import clip_input


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
