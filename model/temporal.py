"""DisCo's temporal module (TM, DESIGN.md "The DisCo model"): zero-initialised temporal
convolutions and temporal attention layers added to a trained image model, trained alone on clips.

Where they go follows the official ``config/disco_w_tm/tem_disco_temp_attn`` code: every ResNet
block gets a temporal convolution (GroupNorm, SiLU, a 1-D convolution of kernel 3 over the frames,
zero-initialised, added as a residual after the block's second convolution, before its shortcut
sum), and every transformer block gets a temporal self-attention (LayerNorm, attention over the
frames of each spatial position, output projection zero-initialised, added as a residual after
the spatial self-attention, before the cross-attention) -- in the UNet and in both ControlNets.

Frames are laid out as today's batches, ``(B * F) x C x H x W`` (clip-major: the F frames of a
clip are consecutive); the frame count is an input (``clip_frames``), so the layers do not depend
on a clip length. They are attached to the diffusers modules with forward hooks (no fork of
diffusers): the parameters live in one ``TemporalLayers`` module, ``model.temporal``, so a
model's state dict (``save_pretrained``, the trainer's checkpoints) holds them under
``temporal.``. At initialisation every layer adds exactly zero: a TM model's output equals its
image model's, bit for bit.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from disco.model.conditioning import to_uint8, unit_pose
from disco.model.controlnets import pose_embedding_cache
from disco.model.guidance import guided_noise

# ``DisCoModel`` (model/disco.py) builds its temporal layers with ``attach_temporal``; this module
# does not import it back (annotations name it as ``nn.Module``).
DisCoModel = nn.Module

# The official clip length (``--nframe 16`` in its TM training command; config name "S256L16").
DEFAULT_CLIP_FRAMES = 16
PREFIX = "temporal."


@dataclasses.dataclass
class TemporalConfig:
    """What the temporal module adds; stored in the model's config as ``temporal_config``."""

    convolution: bool = True  # a temporal convolution in every ResNet block
    attention: bool = True  # a temporal self-attention in every transformer block
    controlnets: bool = True  # in both ControlNets too (the official ControlNetModel3D), not only the UNet
    kernel_size: int = 3
    # The clip length the module was trained on: the window of joint denoising in generation.
    frames: int = DEFAULT_CLIP_FRAMES

    @classmethod
    def of(cls, value: "TemporalConfig | dict | None") -> "TemporalConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(value).items() if k in known})


def _clips(x: torch.Tensor, frames: int) -> int:
    if x.shape[0] % frames:
        raise ValueError(f"a batch of {x.shape[0]} frames is not a whole number of clips of {frames} frames")
    return x.shape[0] // frames


class TemporalConv(nn.Module):
    """GroupNorm over each clip, SiLU, then a 1-D convolution over the frames of every pixel
    (zero-initialised): ``(B F) C H W`` -> the residual to add."""

    def __init__(self, channels: int, groups: int, eps: float, kernel_size: int = 3):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = _clips(x, frames)
        y = x.reshape(b, frames, c, h, w).permute(0, 2, 1, 3, 4)  # b c f h w: statistics over the clip
        y = nn.functional.silu(self.norm(y))
        y = y.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, frames)
        y = self.conv(y)
        return y.reshape(b, h, w, c, frames).permute(0, 4, 3, 1, 2).reshape(bf, c, h, w)


# Sequences (clips x token positions) per attention call. CUDA's memory-efficient attention
# launches a grid with one block row per sequence and fails past 65,535 of them ("invalid
# configuration argument", pytorch/pytorch#142228): at 512 px a forward of 16 clips has 65,536.
MAX_SEQUENCES = 32768


class TemporalAttention(nn.Module):
    """LayerNorm, then self-attention across the frames of each token position (output
    projection zero-initialised): ``(B F) D C`` tokens -> the residual to add."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.norm = nn.LayerNorm(dim)
        self.attention = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        nn.init.zeros_(self.attention.to_out[0].weight)
        nn.init.zeros_(self.attention.to_out[0].bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, d, c = x.shape
        b = _clips(x, frames)
        y = self.norm(x.reshape(b, frames, d, c).permute(0, 2, 1, 3).reshape(b * d, frames, c))
        if len(y) > MAX_SEQUENCES:
            y = torch.cat([self.attention(part) for part in y.split(MAX_SEQUENCES)])
        else:
            y = self.attention(y)
        return y.reshape(b, d, frames, c).permute(0, 2, 1, 3).reshape(bf, d, c)


class TemporalLayers(nn.Module):
    """Every temporal layer of a model, by the dotted path of the block it belongs to (dots
    written as ``-``), and the frame count of the batches now running (``frames``; 1 outside
    ``clip_frames``: each sample its own clip)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict()
        self.attentions = nn.ModuleDict()
        self.frames = 1
        self._handles: list = []


def _parts(model: DisCoModel, config: TemporalConfig) -> list[tuple[str, nn.Module]]:
    parts = [("unet", model.unet)]
    if config.controlnets:
        parts += [(name, getattr(model, name)) for name in ("background_controlnet", "pose_controlnet")
                  if getattr(model, name) is not None]
    return parts


def attach_temporal(model: DisCoModel, config: TemporalConfig | dict | None = None) -> TemporalLayers:
    """Build the temporal layers of ``model`` (on its device and dtype; on the meta device for a
    meta model) and hook them into its UNet (and ControlNets). Called by ``DisCoModel.__init__``
    when its config has a ``temporal_config``; use ``add_temporal`` on a built image model."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    config = TemporalConfig.of(config)
    layers = TemporalLayers()
    targets = []
    for prefix, part in _parts(model, config):
        for name, module in part.named_modules():
            key = f"{prefix}.{name}".replace(".", "-")
            if config.convolution and isinstance(module, ResnetBlock2D):
                layers.convs[key] = TemporalConv(module.conv2.out_channels, module.norm2.num_groups, module.norm2.eps,
                                                 config.kernel_size)
                targets.append(("conv", key, module))
            elif config.attention and isinstance(module, BasicTransformerBlock):
                if module.norm_type != "layer_norm":
                    raise ValueError(f"temporal attention supports layer_norm transformer blocks, not {module.norm_type}")
                layers.attentions[key] = TemporalAttention(module.attn1.query_dim, module.attn1.heads)
                targets.append(("attention", key, module))
    reference = model.unet.conv_in.weight
    layers.to(device=reference.device, dtype=reference.dtype)
    model.temporal = layers
    for kind, key, module in targets:
        if kind == "conv":
            layers._handles.append(module.conv2.register_forward_hook(_conv_hook(layers, key)))
        else:
            pre, post = _attention_hooks(layers, key)
            layers._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            layers._handles.append(module.attn1.register_forward_hook(post))
    return layers


def _conv_hook(layers: TemporalLayers, key: str) -> Callable:
    def hook(module, inputs, output):
        return output + layers.convs[key](output, layers.frames)

    return hook


def _attention_hooks(layers: TemporalLayers, key: str) -> tuple[Callable, Callable]:
    """The transformer block's input is kept by a pre-hook; after its spatial self-attention the
    block adds ``attn1``'s output to that input, so returning ``out + temporal(input + out)``
    makes the block continue from ``h + temporal(h)``, ``h`` = input + spatial attention."""
    stash = {}

    def pre(module, args, kwargs):
        stash["input"] = args[0] if args else kwargs["hidden_states"]

    def post(module, inputs, output):
        hidden = stash.pop("input") + output
        return output + layers.attentions[key](hidden, layers.frames)

    return pre, post


def add_temporal(model: DisCoModel, config: TemporalConfig | dict | None = None) -> DisCoModel:
    """Turn a fine-tuned image model into a TM model in place: the temporal layers are built
    (their random parts drawn from the global generator), hooked in, and recorded in the model's
    config, so ``save_pretrained`` / ``from_pretrained`` give the TM model back whole."""
    if getattr(model, "temporal", None) is not None:
        raise ValueError("this model already has a temporal module")
    if model.pose_controlnet is None:
        raise ValueError("the temporal module goes on a fine-tuned model (with a pose ControlNet), not a HAP model")
    config = TemporalConfig.of(config)
    attach_temporal(model, config)
    model.register_to_config(temporal_config=dataclasses.asdict(config))
    return model


def is_temporal(model) -> bool:
    return getattr(model, "temporal", None) is not None


@contextmanager
def clip_frames(model: DisCoModel, frames: int) -> Iterator[None]:
    """Run ``model`` on batches of clips of ``frames`` consecutive frames (``(B F) ...`` layout).
    A no-op on an image model."""
    layers = getattr(model, "temporal", None)
    if layers is None:
        yield
        return
    before, layers.frames = layers.frames, int(frames)
    try:
        yield
    finally:
        layers.frames = before


def temporal_parameter_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith(PREFIX)]


# -- generation: overlapping windows denoised jointly ------------------------------------------------

def window_starts(total: int, window: int, overlap: int) -> list[int]:
    """Starts of the windows covering ``total`` frames: ``window`` frames each (or one window of
    all frames when fewer), consecutive windows sharing ``overlap`` frames (more for the last
    one, which ends at the last frame)."""
    if total <= window:
        return [0]
    stride = max(1, window - overlap)
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] + window < total:
        starts.append(total - window)
    return starts


def window_weights(window: int, overlap: int) -> torch.Tensor:
    """Linear ramps over the first and last ``overlap`` frames of a window, 1 between: the
    blending weights of overlapping windows (normalised per frame by their sum)."""
    i = torch.arange(window, dtype=torch.float32)
    ramp = float(overlap + 1)
    return torch.minimum(torch.ones(window), torch.minimum((i + 1) / ramp, (window - i) / ramp))


# The pose ControlNet's conditioning embeddings kept through windowed sampling, in bytes (the
# windows' pose pictures they are computed from included): a long video does not hold one per
# window; the windows past it are embedded again at every step (a small conv stack, cheap next
# to the UNet). About 30 windows of 16 frames of the 256 px model with guidance, in half precision.
POSE_CACHE_BYTES = 1 << 30


def window_plan(model: DisCoModel, total: int, window: int | None = None,
                overlap: int | None = None) -> tuple[int, int, list[int]]:
    """(window, overlap, window starts) of windowed sampling over ``total`` frames: ``window``
    defaults to the clip length the model's temporal module trained on, ``overlap`` to a
    quarter of a window."""
    window = int(window or TemporalConfig.of(model.config.get("temporal_config")).frames)
    window = min(window, total)
    overlap = window // 4 if overlap is None else min(int(overlap), window - 1)
    return window, overlap, window_starts(total, window, overlap)


def windowed_ddim(model: DisCoModel, scheduler, latents: torch.Tensor, tokens: torch.Tensor, empty: torch.Tensor,
                  background_latents: torch.Tensor, pose: torch.Tensor, steps: int, guidance_scale: float,
                  window: int | None = None, overlap: int | None = None, batch_size: int = 1,
                  on_window: Callable[[int, int], None] | None = None,
                  progress: Callable[[int], None] | None = None,
                  pose_cache_bytes: int | None = POSE_CACHE_BYTES) -> torch.Tensor:
    """DDIM over a whole sequence with a TM model: at every step each window of ``window``
    consecutive frames is denoised jointly (its frames see each other in the temporal layers),
    and the noise predictions of overlapping windows are averaged with linear weights, so the
    step moves every frame's latent once and there is no seam between windows. ``latents``
    (N x C x h x w, already scaled) and ``pose`` hold every frame; ``tokens`` / ``empty`` /
    ``background_latents`` one sample each (the reference). Returns the denoised latents (still
    scaled by the VAE factor).

    ``batch_size`` frames go through the model at once: as many whole windows as fit (at least
    one), each a clip of the batch (with guidance the doubled batch is every window
    unconditional, then every window conditional: each run of ``window`` items is one clip).
    ``on_window(start, window)`` is called for every window at every step; ``progress(frames)``
    after a pass with the work done since its last call, in frames (the whole sampling's work
    counted as N frames, the units of the per-frame sampler's progress): the calls add up to N.
    At most ``pose_cache_bytes`` of pose embeddings are
    kept (None: every window's); the windows past it are embedded again at each step.
    """
    total = latents.shape[0]
    window, overlap, starts = window_plan(model, total, window, overlap)
    per_pass = max(1, int(batch_size) // window)
    groups = [starts[i:i + per_pass] for i in range(0, len(starts), per_pass)]
    weights = window_weights(window, overlap).to(latents.device, latents.dtype)[:, None, None, None]
    guided = guidance_scale != 1.0
    conditions = {}  # windows in a pass -> (reference tokens, background latents) of the pass

    def pass_conditions(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in conditions:
            cond = tokens.expand(n * window, -1, -1)
            background = background_latents.expand(n * window, -1, -1, -1)
            if guided:
                cond = torch.cat([empty.expand(n * window, -1, -1), cond])
                background = torch.cat([background] * 2)
            conditions[n] = cond, background
        return conditions[n]

    def windows_of(frames: torch.Tensor, group: list[int]) -> torch.Tensor:
        """The group's windows of ``frames``, one after the other (a view for a single window)."""
        return torch.cat([frames[s:s + window] for s in group]) if len(group) > 1 else \
            frames[group[0]:group[0] + window]

    def pass_poses(group: list[int]) -> torch.Tensor:
        # ``pose`` may stay on the host: only a pass's windows go to the model's device (a long
        # video's pose pictures would otherwise take ~0.8 MB of GPU memory per frame throughout).
        # Held as uint8 (``pose_pixels``): made [0, 1] in the model's precision a pass at a time.
        poses = unit_pose(windows_of(pose, group).to(latents.device)).to(latents.dtype)
        return torch.cat([poses] * 2) if guided else poses

    scheduler.set_timesteps(steps, device=latents.device)
    work, done, reported = len(scheduler.timesteps) * len(starts) * window, 0, 0
    # A pass's pose pictures are one tensor, the same at every step while the cache keeps its
    # embedding (the cache knows them by identity); the others are built again at each step.
    kept: dict[int, torch.Tensor] = {}
    with clip_frames(model, window), pose_embedding_cache(model, size=None, max_bytes=pose_cache_bytes,
                                                          pin=True) as cache:
        for t in scheduler.timesteps:
            eps_sum = torch.zeros_like(latents)
            weight_sum = torch.zeros(total, 1, 1, 1, device=latents.device, dtype=latents.dtype)
            for g, group in enumerate(groups):
                poses = kept.get(g)
                if poses is None:
                    poses = pass_poses(group)
                cond, background = pass_conditions(len(group))
                eps = guided_noise(model, scheduler, windows_of(latents, group), t, cond, background, poses,
                                   guidance_scale)
                if g not in kept and cache.holds(poses):
                    kept[g] = poses
                for i, start in enumerate(group):
                    eps_sum[start:start + window] += eps[i * window:(i + 1) * window] * weights
                    weight_sum[start:start + window] += weights
                    if on_window is not None:
                        on_window(start, window)
                done += len(group) * window
                if progress is not None and total * done // work > reported:
                    progress(total * done // work - reported)
                    reported = total * done // work
            latents = scheduler.step(eps_sum / weight_sum, t, latents, eta=0.0).prev_sample
    return latents


def decode_frames(model: DisCoModel, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Unscaled latents -> N x H x W x 3 uint8 frames, decoded ``batch_size`` at a time and each
    batch brought to the host at once (a long video's decoded float frames never all sit on the GPU)."""
    return np.concatenate([to_uint8(model.vae.decode(latents[i:i + batch_size]).sample)
                           for i in range(0, len(latents), batch_size)])
