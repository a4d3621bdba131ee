"""What one training step computes and how it updates: the diffusion objective (the loss of a
batch, the same module the memory plan runs on the meta device), each sample's random draws (from
its position in the global stream only), and the optimizer update."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from disco.model.conditioning import fit_pose
from disco.model.disco import VAE_SCALING, DisCoModel
from disco.train.data import sample_seed

DRAW_SALT = 0x9E3779B9


class DiffusionObjective(nn.Module):
    """Epsilon-prediction MSE on VAE latents (DDPM schedule of the model's scheduler config)."""

    def __init__(self, model: DisCoModel):
        super().__init__()
        self.model = model
        self.noise_scheduler = DDPMScheduler.from_config(model.config.scheduler_config)
        predicts = self.noise_scheduler.config.prediction_type
        if predicts != "epsilon":  # the loss below is the noise's (train.config.check_prediction_type)
            raise ValueError(f"the model's scheduler predicts {predicts!r}; training predicts the noise (epsilon)")

    def forward(self, target, background, pose, reference, noise, latent_noise, timesteps, uniforms):
        model = self.model
        frames = clip_length(model)
        with torch.no_grad():
            posterior = model.vae.encode(target).latent_dist
            latents = (posterior.mean + posterior.std * latent_noise) * VAE_SCALING
            background_latents = once_per_clip(model.encode_background, background, frames)
        tokens = once_per_clip(model.encode_reference, reference, frames)
        pose = fit_pose(model, pose, latents.shape[-1])
        tokens, background_latents, pose = model.drop_conditions(tokens, background_latents, pose, uniforms=uniforms)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        predicted = model(noisy, timesteps, tokens, background_latents, pose)
        return F.mse_loss(predicted.float(), noise.float())


def clip_length(model: DisCoModel) -> int:
    """The frames per clip of the batch a temporal model runs on (``clip_frames``); 1 otherwise."""
    return int(getattr(getattr(model, "temporal", None), "frames", 1) or 1)


def once_per_clip(encode, pictures: torch.Tensor, frames: int) -> torch.Tensor:
    """``encode`` of pictures every frame of a clip shares (its reference, its background: the
    clip stream's contract, tests/test_temporal.py), run on each clip's first frame and repeated
    for its frames: a 16-frame clip encoded its background 16 times (a VAE encoding, about a tenth
    of a 512 px step) and its reference through CLIP as often."""
    if frames == 1:
        return encode(pictures)
    if len(pictures) % frames:
        raise ValueError(f"a batch of {len(pictures)} frames is not whole clips of {frames}")
    return encode(pictures[::frames]).repeat_interleave(frames, dim=0)


def sample_draws(positions: torch.Tensor, seed: int, latent_shape: tuple, timesteps: int, device) -> dict:
    """Noise, latent-sampling noise, timestep and three dropout uniforms for each sample."""
    noise, latent_noise, steps, uniforms = [], [], [], []
    for position in positions.tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, position) ^ DRAW_SALT)
        steps.append(torch.randint(0, timesteps, (1,), generator=g))
        uniforms.append(torch.rand(3, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        latent_noise.append(torch.randn(latent_shape, generator=g))
    # The dropout uniforms stay a NumPy array: the dropout is decided on the host, and DDP moves
    # every *tensor* argument of the objective to the GPU, where reading them back would stall
    # the step three times per micro-batch.
    return {
        "noise": torch.stack(noise).to(device), "latent_noise": torch.stack(latent_noise).to(device),
        "timesteps": torch.cat(steps).to(device), "uniforms": torch.stack(uniforms).numpy(),
    }


# The official optimizer's no-decay names (substrings of a parameter's name): biases and norm weights.
NO_DECAY = ("bias", "LayerNorm.weight", "norm.weight", "norm1.weight", "norm2.weight")


def parameter_groups(named: dict[str, torch.nn.Parameter], cfg) -> list[dict]:
    """AdamW's parameter groups: one group decayed by ``cfg.weight_decay``; with
    ``cfg.official_weight_decay`` the official code's split, biases and norm weights (``NO_DECAY``)
    in a second group without weight decay."""
    if not cfg.official_weight_decay:
        return [{"params": list(named.values())}]
    decay = [p for n, p in named.items() if not any(word in n for word in NO_DECAY)]
    plain = [p for n, p in named.items() if any(word in n for word in NO_DECAY)]
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0}]


def zero_gradients(params) -> list[torch.Tensor]:
    """Zero gradients for ``params`` before DDP wraps them (returned): DDP then makes them views
    into its buckets at once, so the first step's micro-batches under ``no_sync`` accumulate there
    too (without, they would make fresh gradients: a second copy, at the first step only)."""
    params = list(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def apply_update(params, optimizer, scheduler, scaler, ema, max_grad_norm: float | None,
                 keep_gradients: bool = False) -> bool:
    """One optimizer update from the accumulated gradients: unscale and clip (when asked), step
    through the loss scaler (a no-op without fp16), clear, advance the schedule and the EMA.
    Returns False where fp16's loss scaler found inf or NaN gradients and skipped the update:
    then the schedule and the EMA stay where they are (as DeepSpeed's and Accelerate's loss
    scaling do), so that the burst of skips while the scale settles does not eat the warm-up.

    ``keep_gradients`` (under DDP): the gradients are zeroed in place, not dropped. They are views
    into DDP's all-reduce buckets (``train/loop.py``'s ``DDP_OPTIONS``), which DDP keeps whatever
    happens to the views; kept, the next backward accumulates straight into the buckets. Dropped,
    every backward makes fresh gradients that DDP then copies in, and the micro-batches of
    ``--grad-accum`` > 1 (under ``no_sync``, no copy) hold a second fp32 copy of the gradients."""
    if max_grad_norm is not None and max_grad_norm > 0:  # 0 or below: off, as the official flag
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    # The scaler's step already waits for its inf check (an .item()): reading the scale is free.
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=not keep_gradients)
    if scale is not None and scaler.get_scale() < scale:  # backed off: the step was skipped
        return False
    scheduler.step()
    if ema is not None:
        ema.step(params)
    return True
