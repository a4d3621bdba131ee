"""The temporal stage's pieces of a training step (``--stage temporal``, model/temporal.py): its
stream of clips and its random draws."""

from __future__ import annotations

import functools

import torch

from disco.train.data import SampleStream
from disco.train.data.clips import ClipStream


def stream_class(cfg):
    """The stream a run trains on: clips of ``clip_frames`` frames for the temporal stage (a
    micro-batch of ``batch_size`` clips), single samples otherwise."""
    if cfg.stage == "temporal":
        return functools.partial(ClipStream, frames=cfg.clip_frames, offsets=cfg.window_offsets,
                                 split_at_gaps=cfg.split_at_gaps, group_frames=cfg.window_group_frames)
    return SampleStream


def frames_per_clip(cfg) -> int:
    return cfg.clip_frames if cfg.stage == "temporal" else 1


def clip_draws(draws: dict, frames: int) -> dict:
    """Per-frame draws (``sample_draws``) made per clip where a clip is one sample: every frame of
    a clip takes its first frame's diffusion timestep and condition-dropout uniforms (one noise
    level and one reference drop per clip, as the official TM trains); noise stays per frame."""
    if frames == 1:
        return draws

    def per_clip(t: torch.Tensor) -> torch.Tensor:
        clips = t.reshape(-1, frames, *t.shape[1:])
        return clips[:, :1].expand_as(clips).reshape(t.shape).contiguous()

    return {**draws, "timesteps": per_clip(draws["timesteps"]),
            "uniforms": per_clip(torch.as_tensor(draws["uniforms"])).numpy()}  # host-side (sample_draws)
