"""Sampling a batch of training samples, each with its own reference, for the trainer's grids
(DESIGN.md: DDIM, eta 0, guidance 1.5). The DDIM loop itself is the model's ``guided_ddim``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler

from disco.model.conditioning import fit_pose, reference_picture, vae_factor
from disco.model.disco import DisCoModel
from disco.model.pipeline import guided_ddim
from disco.model.temporal import clip_frames
from disco.train.inputs import model_inputs
from disco.train.temporal import frames_per_clip

if TYPE_CHECKING:
    from disco.train.config import TrainConfig
    from disco.train.monitor import Monitor


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
    device = background.device
    dtype = next(model.unet.parameters()).dtype
    batch, _, height, width = background.shape
    tokens = model.encode_reference(reference.to(dtype))
    background_latents = model.encode_background(background.to(dtype))
    factor = vae_factor(model)
    pose = fit_pose(model, pose, height // factor)
    if pose is not None:
        pose = pose.to(dtype)
    shape = (batch, model.unet.config.in_channels, height // factor, width // factor)
    latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    empty = model.unconditional_reference(batch).to(tokens.dtype)
    return guided_ddim(model, scheduler, latents, tokens, empty, background_latents, pose, steps, guidance_scale,
                       eta=eta, generator=generator)


SAMPLE_CHUNK = 4  # samples of a training grid denoised at once (the default sample_count)


def preview_samples(batch: dict, cfg: TrainConfig) -> dict:
    """The samples the trainer's grids show, from the first micro-batch the run saw: the first
    ``sample_count`` of them, or for the temporal stage the first whole clips holding at least
    that many frames (its grids sample a clip jointly, so the temporal layers act in them)."""
    frames = frames_per_clip(cfg)
    count = frames * max(1, -(-cfg.sample_count // frames))
    return {k: v[:count].clone() for k, v in batch.items()}


def write_sample_grid(model: DisCoModel, preview: dict, cfg: TrainConfig, step: int, monitor: Monitor, device,
                      precision) -> Path:
    """reference | pose | generated | target for the first samples the run saw, with the current
    weights (a temporal run's clips denoised jointly, as generation does)."""
    inputs = model_inputs(preview, device, cfg.background_hole)
    frames = frames_per_clip(cfg)
    # A few samples at a time (whole clips), and without autocast's cache of cast weights (kept
    # for the whole 50-step loop: 2.95 GiB beside a fine-tuning run's): a grid of 16 samples at
    # 512 px took 13 GiB over the training step's memory, and ran out of it at the first grid.
    chunk = frames * max(1, SAMPLE_CHUNK // frames)
    generator = torch.Generator().manual_seed(cfg.seed)
    parts = []
    model.eval()
    try:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None, cache_enabled=False), \
                clip_frames(model, frames):
            for start in range(0, len(inputs["reference"]), chunk):
                part = slice(start, start + chunk)
                parts.append(ddim_sample(model, inputs["reference"][part], inputs["background"][part],
                                         inputs["pose"][part] if model.pose_controlnet is not None else None,
                                         steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                                         generator=generator))
    finally:
        model.train()
    generated = torch.cat(parts)
    columns = [reference_picture(inputs["reference"]), inputs["pose"], (generated.float() + 1) / 2,
               (inputs["target"] + 1) / 2]
    return monitor.grid(step, columns)
