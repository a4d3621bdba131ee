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
    """The wrapped module's outputs for the input tensors it was called with (by identity: the
    sampling loops pass the same pose tensor at every denoising step), at most ``size`` of them
    and at most ``max_bytes`` (each entry counted as its output's bytes plus its input's, which
    the entry keeps alive). An entry that does not fit evicts the oldest ones, or with ``pin``
    is not kept (the entries kept stay: a loop over more inputs than fit still finds those
    instead of missing every time)."""

    def __init__(self, inner: nn.Module, size: int | None = 1, max_bytes: int | None = None, pin: bool = False):
        super().__init__()
        self.inner, self.seen = inner, []
        self.size = None if size is None else max(1, size)
        self.max_bytes, self.pin = max_bytes, pin
        self.nbytes = self.peak_bytes = 0  # held now, and the most ever held
        self.hits = self.misses = 0

    def holds(self, x: torch.Tensor) -> bool:
        return any(key is x for key, _ in self.seen)

    def _fits(self, count: int, nbytes: int) -> bool:
        return (self.size is None or count <= self.size) and (self.max_bytes is None or nbytes <= self.max_bytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key, value in self.seen:
            if key is x:
                self.hits += 1
                return value
        self.misses += 1
        value = self.inner(x)
        cost = _cost(x, value)
        if not self._fits(1, cost):  # too big on its own: keeping it would only evict the others
            return value
        while not self.pin and self.seen and not self._fits(len(self.seen) + 1, self.nbytes + cost):
            self.nbytes -= _cost(*self.seen.pop(0))
        if not self._fits(len(self.seen) + 1, self.nbytes + cost):
            return value
        self.seen.append((x, value))
        self.nbytes += cost
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return value


def _cost(x: torch.Tensor, value: torch.Tensor) -> int:
    return value.nbytes + x.nbytes


@contextmanager
def pose_embedding_cache(model, size: int | None = 1, max_bytes: int | None = None,
                         pin: bool = False) -> Iterator[_EmbeddingCache]:
    """The pose ControlNet's conditioning embedding does not depend on the timestep: computed once
    per pose tensor instead of once per denoising step (it runs at 8 x the latent size). At most
    ``size`` pose tensors (None: any number) and ``max_bytes`` are kept (a batch of frames: 1,
    the next batch replacing it; the temporal model's windows: a byte budget, ``pin``-ned, the
    windows past it embedded again at each step). Yields the cache."""
    controlnet = model.pose_controlnet
    inner = controlnet.controlnet_cond_embedding
    cache = _EmbeddingCache(inner, size, max_bytes, pin)
    controlnet.controlnet_cond_embedding = cache
    try:
        yield cache
    finally:
        controlnet.controlnet_cond_embedding = inner
