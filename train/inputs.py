"""From the data stream's uint8 pictures to the model's inputs: one home for the value ranges."""

from __future__ import annotations

import torch

from disco.model.conditioning import HOLE, background_input, clip_input


def model_inputs(batch: dict, device: torch.device | str = "cpu", hole: float = HOLE) -> dict[str, torch.Tensor]:
    """``target`` in [-1, 1], ``background`` in [-1, 1] with the person's hole 0
    (``background_mask``: the reference's alpha at the background's size), ``pose`` in [0, 1],
    ``reference`` the CLIP input (224 x 224, CLIP mean and std) multiplied by the person mask
    (DESIGN.md)."""

    def unit(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True).float() / 255.0

    return {
        "target": unit("target") * 2 - 1,
        "background": background_input(unit("background"), unit("background_mask"), hole),
        "pose": unit("pose"),
        "reference": clip_input(unit("reference"), unit("reference_mask")),
    }
