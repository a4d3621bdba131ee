"""DisCo's two ControlNets as built from the UNet: the pose ControlNet (diffusers' own, copied
from the UNet without a random full-size build) and the background ControlNet, whose
conditioning is the background's VAE latent."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from disco.model.meta_init import SeededMeta

# What ``ControlNetModel.from_unet`` takes from the UNet (every other ControlNet weight is its own:
# the conditioning embedding and the zero convolutions).
_FROM_UNET = ("conv_in.", "time_proj.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.",
              "mid_block.")


class BackgroundControlNet(ControlNetModel):
    """DisCo's background ControlNet: a ControlNet whose conditioning embedding is one 3 x 3 conv
    over the background's VAE latent (``in_channels`` of them, like the UNet's ``conv_in``) instead
    of diffusers' pixel-space embedding. Its config says so (the class, ``conditioning_channels``
    = the latent's channels), so ``save_pretrained`` / ``from_pretrained`` give it back whole."""

    # diffusers reads the configuration's keys from __init__'s signature: the ControlNet's own.
    @functools.wraps(ControlNetModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        channels = self.config.in_channels
        self.register_to_config(conditioning_channels=channels)
        self.controlnet_cond_embedding = nn.Conv2d(channels, self.config.block_out_channels[0], kernel_size=3,
                                                   padding=1)


def controlnet_from_unet(unet: UNet2DConditionModel, take: bool = False,
                         cls: type[ControlNetModel] = ControlNetModel) -> ControlNetModel:
    """``ControlNetModel.from_unet(unet)``, bit for bit, without a random full-size ControlNet.

    diffusers builds a whole random ControlNet and then copies the UNet's blocks over it. Here the
    ControlNet is built on the meta device (``SeededMeta``: the global generator still advances
    exactly as the CPU build advances it), then gets the UNet's tensors -- cloned, or with
    ``take`` the UNet's own tensors (the UNet is consumed: its blocks now belong to the ControlNet)
    -- and its own conditioning embedding and zero convolutions are materialised with the values
    the CPU build would have drawn. A UNet on the meta device gives a meta ControlNet.
    """
    if unet.conv_in.weight.is_meta:
        return cls.from_unet(unet)
    with SeededMeta() as init:
        controlnet = cls.from_unet(unet, load_weights_from_unet=False)
    source = unet.state_dict()
    ours = controlnet.state_dict()
    tensors = {k: v if take else v.detach().clone() for k, v in source.items() if k.startswith(_FROM_UNET) and k in ours}
    bad = [k for k, v in tensors.items() if v.shape != ours[k].shape]
    if bad:
        raise ValueError(f"the UNet's {bad[0]} does not fit the ControlNet built from its configuration")
    controlnet.load_state_dict(tensors, strict=False, assign=True)
    return init.materialize_module(controlnet)


def background_controlnet(unet: UNet2DConditionModel) -> BackgroundControlNet:
    """The background ControlNet copied from the UNet, its latent conv initialised from the UNet's
    ``conv_in`` (not zero)."""
    controlnet = controlnet_from_unet(unet, cls=BackgroundControlNet)
    with torch.no_grad():
        controlnet.controlnet_cond_embedding.weight.copy_(unet.conv_in.weight)
        controlnet.controlnet_cond_embedding.bias.copy_(unet.conv_in.bias)
    return controlnet


class _EmbeddingCache(nn.Module):
    """The wrapped module's outputs for the last ``size`` input tensors it was called with (by
    identity: the sampling loops pass the same pose tensor at every denoising step)."""

    def __init__(self, inner: nn.Module, size: int):
        super().__init__()
        self.inner, self.size, self.seen = inner, max(1, size), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key, value in self.seen:
            if key is x:
                return value
        value = self.inner(x)
        self.seen = (self.seen + [(x, value)])[-self.size:]
        return value


@contextmanager
def pose_embedding_cache(model, size: int = 1) -> Iterator[None]:
    """The pose ControlNet's conditioning embedding does not depend on the timestep: computed once
    per pose tensor instead of once per denoising step (it runs at 8 x the latent size). ``size``
    pose tensors are kept (a batch of frames: 1; the temporal model's windows: one each)."""
    controlnet = model.pose_controlnet
    inner = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = _EmbeddingCache(inner, size)
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = inner
