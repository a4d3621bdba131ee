"""DDIM sampling with classifier-free guidance on the reference (DESIGN.md: 50 steps, eta 0, scale 1.5)."""

from __future__ import annotations

import copy
import threading
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler

from disco.model.conditioning import HOLE, check_size, pose_size, to_uint8, unit_pose, vae_factor
from disco.model.controlnets import pose_embedding_cache
from disco.model.guidance import guided_noise
from disco.model.configs import SCHEDULER
from disco.model.disco import VAE_SCALING, DisCoModel
from disco.model.temporal import POSE_CACHE_BYTES


def copy_to(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A copy of ``model`` whose tensors are made on ``device`` directly: ``deepcopy(model).to(device)``
    first holds a whole second copy on the model's own device (the primary GPU: twice the model
    there, for a moment, per replica)."""
    memo: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        moved = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = type(tensor)(moved, tensor.requires_grad) if isinstance(
            tensor, torch.nn.Parameter) else moved
    return copy.deepcopy(model, memo)


class DisCoPipeline:
    """The model plus a DDIM scheduler built from the model's own scheduler config.

    With a temporal-module (TM) model the frames are denoised in overlapping windows of ``window``
    frames (default: the clip length it trained on), sharing ``overlap`` frames (default a
    quarter of a window), blended at every step (``model/temporal.py``, ``windowed_ddim``);
    ``batch_size`` frames per forward pass there means as many whole windows as fit (at least
    one), and at most ``pose_cache_bytes`` of the windows' pose embeddings are kept (None: all)."""

    window: int | None = None
    overlap: int | None = None
    pose_cache_bytes: int | None = POSE_CACHE_BYTES

    def __init__(self, model: DisCoModel, scheduler: DDIMScheduler | None = None):
        if model.pose_controlnet is None:
            raise ValueError("this checkpoint is a pre-training (HAP) model without a pose ControlNet; "
                             "generation needs a fine-tuned model")
        self.model = model.eval()
        self.scheduler = scheduler or DDIMScheduler.from_config(model.config.scheduler_config or dict(SCHEDULER))
        # The background's person-hole value the model was trained with (generate sets a run's own).
        self.background_hole = HOLE
        self.replicas: list[DisCoModel] = []  # copies of the model on further devices (``spread``)

    def spread(self, devices: list[str | torch.device]) -> None:
        """Sample on these devices too: a copy of the model on each, and the frames' batches dealt
        out among them, each device's in a thread of its own (the frames are the same as on one:
        every frame's noise is drawn up front, and a batch holds the same frames). The per-frame
        model only: a temporal-module model's overlapping windows are blended at every step."""
        if getattr(self.model, "temporal", None) is not None and devices:
            raise ValueError("a temporal-module model samples on one device (its overlapping windows are blended "
                             "at every step)")
        self.replicas = [copy_to(self.model, device) for device in devices]

    @property
    def device(self) -> torch.device:
        return next(self.model.reference_projection.parameters()).device

    @torch.no_grad()
    def __call__(
        self,
        reference: torch.Tensor,
        background: torch.Tensor,
        poses: torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.5,
        seed: int = 0,
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
        done: dict[int, np.ndarray] | None = None,
        on_batch: Callable[[list[int], np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """One frame per pose: ``reference`` 1 x 3 x 224 x 224 (CLIP input), ``background``
        1 x 3 x S x S in [-1, 1], ``poses`` N x 3 x P x P, uint8 (``pose_pixels``, made [0, 1] a
        batch at a time) or float in [0, 1] -> N x S x S x 3 uint8.
        ``progress(frames)`` is told the frames done as they are (a TM model: frames' worth of
        its windows' steps), adding up to N.

        Every frame's initial noise comes from one generator seeded with ``seed``, drawn for all
        frames up front, so the frames do not depend on ``batch_size``.

        The per-frame model only: ``done`` holds frames already sampled (by index: a stopped
        run's, ``generate/partial.py``), which are not sampled again (the others go in batches of
        ``batch_size`` in order), and ``on_batch(indices, frames)`` is told each batch as it is
        finished (in its device's thread).
        """
        model, device = self.model, self.device
        size = background.shape[-1]
        check_size(model, size)
        if poses.shape[-1] != pose_size(model, size):
            raise ValueError(f"pose pictures must be {pose_size(model, size)} px for {size} px frames, "
                             f"not {poses.shape[-1]}")
        dtype = next(model.unet.parameters()).dtype
        latent_side = size // vae_factor(model)
        channels = model.unet.config.in_channels
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(len(poses), channels, latent_side, latent_side, generator=generator)
        tokens = model.encode_reference(reference.to(device, dtype))
        empty = model.unconditional_reference(1).to(dtype)
        background_latents = model.encode_background(background.to(device, dtype))
        if getattr(model, "temporal", None) is not None:
            if done or on_batch is not None:
                raise ValueError("a temporal-module model samples all its frames at once: none can be kept or resumed")
            from disco.model.temporal import decode_frames, windowed_ddim

            latents = windowed_ddim(model, self.scheduler, noise.to(device, dtype) * self.scheduler.init_noise_sigma,
                                    tokens, empty, background_latents, poses, num_inference_steps,
                                    guidance_scale, window=self.window, overlap=self.overlap, batch_size=batch_size,
                                    progress=progress, pose_cache_bytes=self.pose_cache_bytes)
            return decode_frames(model, latents / VAE_SCALING, batch_size)
        frames: dict[int, np.ndarray] = dict(done or {})
        if any(not 0 <= i < len(poses) or frame.shape != (size, size, 3) for i, frame in frames.items()):
            raise ValueError(f"frames given as done must be {size} x {size} x 3, of indices 0 to {len(poses) - 1}")
        todo = [i for i in range(len(poses)) if i not in frames]
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        models = [model, *self.replicas]
        # One scheduler per device, copied before any thread starts: it keeps the timesteps it is set to.
        schedulers = [self.scheduler, *(copy.deepcopy(self.scheduler) for _ in self.replicas)]
        told = threading.Lock()
        stop = threading.Event()  # one device failed, or the user interrupted: the others stop too

        def sample_on(k: int) -> None:
            """Every ``len(models)``-th batch, from the ``k``-th, on model ``k``."""
            one, scheduler = models[k], schedulers[k]
            on = next(one.reference_projection.parameters()).device
            with torch.no_grad(), pose_embedding_cache(one):  # (grad mode is per thread)
                conditions = (tokens, empty, background_latents) if k == 0 else \
                    (one.encode_reference(reference.to(on, dtype)), empty.to(on), one.encode_background(background.to(on, dtype)))
                for batch in batches[k::len(models)]:
                    if stop.is_set():
                        return
                    # (A slice where the batch is one run of frames, as it is unless a run resumed.)
                    rows = slice(batch[0], batch[-1] + 1) if batch[-1] - batch[0] == len(batch) - 1 else batch
                    sampled = _sample(one, scheduler, noise[rows], poses[rows], *conditions, num_inference_steps,
                                      guidance_scale)
                    frames.update(zip(batch, sampled))
                    if on_batch is not None:
                        on_batch(batch, sampled)
                    if progress is not None:
                        with told:
                            progress(len(sampled))

        if len(models) == 1:
            sample_on(0)
        else:
            from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

            with ThreadPoolExecutor(len(models)) as pool:
                running = [pool.submit(sample_on, k) for k in range(len(models))]
                try:
                    # The first device's error as it happens: waiting on the devices in order let
                    # the others sample their whole share (hours of a long video) before it came.
                    wait(running, return_when=FIRST_EXCEPTION)
                finally:
                    # An error, or Ctrl-C in this thread: every device ends after its current batch
                    # (the pool's exit waits for that), not after all of its frames.
                    stop.set()
                for future in running:
                    future.result()  # a device's error is raised here
        return np.stack([frames[i] for i in range(len(poses))])


def _sample(model: DisCoModel, scheduler: DDIMScheduler, noise, pose, tokens, empty, background_latents,
            num_inference_steps, guidance_scale):
    device = next(model.reference_projection.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    n = len(pose)
    latents = noise.to(device, dtype) * scheduler.init_noise_sigma
    images = guided_ddim(model, scheduler, latents, tokens.expand(n, -1, -1), empty.expand(n, -1, -1),
                         background_latents.expand(n, -1, -1, -1), unit_pose(pose).to(device, dtype),
                         num_inference_steps, guidance_scale)
    return to_uint8(images)


def guided_ddim(model: DisCoModel, scheduler: DDIMScheduler, latents: torch.Tensor, tokens: torch.Tensor,
                empty: torch.Tensor, background_latents: torch.Tensor, pose: torch.Tensor | None, steps: int,
                guidance_scale: float, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The one DDIM loop (generation and the trainer's sample grids): classifier-free guidance on
    the reference only (``empty`` is the zero-image reference; background and pose are kept).
    ``latents`` is the initial noise already scaled by the scheduler; returns decoded pictures in
    [-1, 1]."""
    guided = guidance_scale != 1.0
    if guided:
        tokens = torch.cat([empty, tokens])
        background_latents = torch.cat([background_latents] * 2)
        pose = torch.cat([pose] * 2) if pose is not None else None
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        eps = guided_noise(model, scheduler, latents, t, tokens, background_latents, pose, guidance_scale)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return model.vae.decode(latents / VAE_SCALING).sample.clamp(-1, 1)

