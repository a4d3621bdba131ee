"""One step of classifier-free guidance, shared by the image model's DDIM loop (``pipeline.py``)
and the temporal model's windows (``temporal.py``)."""

from __future__ import annotations

import torch


def guided_noise(model, scheduler, latents: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                 background_latents: torch.Tensor, pose: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The noise predicted for ``latents`` at step ``t``: with guidance (scale other than 1) the
    conditions come doubled, unconditional reference first, and the two predictions are combined."""
    guided = guidance_scale != 1.0
    model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
    eps = model(model_in, t.expand(model_in.shape[0]), tokens, background_latents, pose)
    if guided:
        uncond, cond = eps.chunk(2)
        eps = uncond + guidance_scale * (cond - uncond)
    return eps
