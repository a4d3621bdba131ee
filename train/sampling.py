"""A short DDIM sampler with classifier-free guidance on the reference (DESIGN.md: DDIM, eta 0,
guidance 1.5 at inference). The trainer uses it for its sample grids; ``generate`` can reuse it."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from disco.model.disco import VAE_SCALING, DisCoModel


def latent_factor(model: DisCoModel) -> int:
    """How much the VAE shrinks a picture (8 for Stable Diffusion's)."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def fit_pose(model: DisCoModel, pose: torch.Tensor | None, latent_side: int) -> torch.Tensor | None:
    """The skeleton at the size the pose ControlNet's conditioning embedding expects (it shrinks
    by 8, like SD's VAE; the tiny VAE shrinks by 4, so there the pose is enlarged)."""
    if pose is None or model.pose_controlnet is None:
        return None
    blocks = model.pose_controlnet.config.conditioning_embedding_out_channels
    side = latent_side * 2 ** (len(blocks) - 1)
    if pose.shape[-1] == side:
        return pose
    return torch.nn.functional.interpolate(pose, size=(side, side), mode="bilinear", align_corners=False)


@torch.no_grad()
def ddim_sample(
    model: DisCoModel,
    reference: torch.Tensor,
    background: torch.Tensor,
    pose: torch.Tensor | None = None,
    *,
    steps: int = 50,
    guidance_scale: float = 1.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generated pictures in [-1, 1], B x 3 x H x W.

    ``reference``: the CLIP input (B x 3 x 224 x 224, normalised and masked, see
    ``disco.train.inputs.model_inputs``); ``background``: B x 3 x H x W in [-1, 1]; ``pose``:
    B x 3 x H x W in [0, 1] (needed by the ``finetune`` variant). The unconditional branch is the
    zero-image reference (``DisCoModel.unconditional_reference``); background and pose are kept.
    """
    scheduler = DDIMScheduler.from_config(model.config.scheduler_config)
    scheduler.set_timesteps(steps)
    device = background.device
    dtype = next(model.unet.parameters()).dtype
    batch, _, height, width = background.shape
    tokens = model.encode_reference(reference.to(dtype))
    background_latents = model.encode_background(background.to(dtype))
    factor = latent_factor(model)
    pose = fit_pose(model, pose, height // factor)
    if pose is not None:
        pose = pose.to(dtype)
    guided = guidance_scale != 1.0
    if guided:
        tokens = torch.cat([model.unconditional_reference(batch).to(tokens.dtype), tokens])
        background_latents = torch.cat([background_latents] * 2)
        pose = torch.cat([pose] * 2) if pose is not None else None
    shape = (batch, model.unet.config.in_channels, height // factor, width // factor)
    latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        timestep = t.expand(model_input.shape[0]).to(device)
        eps = model(model_input, timestep, tokens, background_latents, pose)
        if guided:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return model.vae.decode(latents / VAE_SCALING).sample.clamp(-1, 1)
