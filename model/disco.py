"""The DisCo network: CLIP-image reference tokens, a background ControlNet on VAE latents and a
pose ControlNet, both adding residuals to the image-variations UNet (DESIGN.md, "The DisCo model")."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from disco.model.configs import CONFIGS, SCHEDULER
from disco.model.controlnets import background_controlnet, controlnet_from_unet
from disco.model.meta_init import SeededMeta, seeded_meta_active

VARIANTS = ("pretrain", "finetune")
VAE_SCALING = 0.18215


def _clip_from_config(config: dict) -> CLIPVisionModelWithProjection:
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    if seeded_meta_active() and clip.visual_projection.weight.is_meta:
        # transformers skips its weight initialisation on the meta device; a SeededMeta build
        # must make the draws a CPU build makes.
        clip.initialize_weights()
    return clip


# The folders ``DisCoModel.export_diffusers`` writes (those of the model's parts).
EXPORT_PARTS = ("unet", "controlnet_pose", "controlnet_background", "temporal")


class DisCoModel(ModelMixin, ConfigMixin):
    """UNet + background ControlNet (+ pose ControlNet for ``finetune``), frozen VAE and CLIP.

    ``pretrain`` is the human-attribute pre-training (HAP) variant: no pose branch.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        vae_config: dict,
        image_encoder_config: dict,
        scheduler_config: dict | None = None,
        variant: str = "finetune",
        pose_scale: float = 1.0,
        background_scale: float = 1.0,
        reference_dropout: float = 0.05,
        pose_dropout: float = 0.0,
        background_dropout: float = 0.0,
        temporal_config: dict | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        self._assemble(
            UNet2DConditionModel.from_config(unet_config),
            AutoencoderKL.from_config(vae_config),
            _clip_from_config(image_encoder_config),
        )
        if temporal_config is not None:  # a temporal-module (TM) model: model/temporal.py
            from disco.model.temporal import attach_temporal

            attach_temporal(self, temporal_config)

    def _assemble(self, unet: UNet2DConditionModel, vae: AutoencoderKL, clip: CLIPVisionModelWithProjection) -> None:
        """Derive every trainable branch from the three base models."""
        self.unet, self.vae, self.image_encoder = unet, vae, clip
        # All 257 tokens, projected 1024 -> 768 by a trainable copy of CLIP's visual projection.
        self.reference_projection = nn.Linear(clip.config.hidden_size, clip.config.projection_dim, bias=False)
        with torch.no_grad():
            self.reference_projection.weight.copy_(clip.visual_projection.weight)
        self.background_controlnet = background_controlnet(unet)
        self.pose_controlnet = controlnet_from_unet(unet) if self.config.variant == "finetune" else None
        self.vae.requires_grad_(False)
        self.image_encoder.requires_grad_(False)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_architecture(cls, name: str = "tiny", variant: str = "finetune", **options) -> "DisCoModel":
        """Random weights in a named configuration (``tiny`` or ``sd-image-variations``)."""
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; choose one of {', '.join(CONFIGS)}")
        arch = copy.deepcopy(CONFIGS[name])
        return cls(unet_config=arch["unet"], vae_config=arch["vae"], image_encoder_config=arch["image_encoder"],
                   scheduler_config=dict(SCHEDULER), variant=variant, **options)

    @classmethod
    def from_sd_image_variations(cls, path: str | Path, variant: str = "finetune", **options) -> "DisCoModel":
        """Build from a local image-variations directory in diffusers layout; nothing is downloaded."""
        path = Path(path)
        for sub in ("unet", "vae", "image_encoder"):
            if not (path / sub / "config.json").exists():
                raise FileNotFoundError(f"{path / sub / 'config.json'} is missing: expected the diffusers layout "
                                        "unet/, vae/, image_encoder/ (and scheduler/)")
        # In float32 whatever each folder's config says (transformers 5 loads CLIP in the dtype its
        # config names: a half-precision folder gave a model with a float16 CLIP and float32 rest).
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).float()
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).float()
        clip = CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", local_files_only=True).float()
        scheduler = dict(SCHEDULER)
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        if scheduler_file.exists():
            import json

            scheduler.update({k: v for k, v in json.loads(scheduler_file.read_text()).items() if not k.startswith("_")})
        clip_config = {k: getattr(clip.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "image_size", "patch_size",
                                                           "projection_dim")}
        with torch.device("meta"):  # the architecture only: its weights come from the folder
            model = cls(unet_config=dict(unet.config), vae_config=dict(vae.config), image_encoder_config=clip_config,
                        scheduler_config=scheduler, variant=variant, **options)
        model._assemble(unet, vae, clip)
        return model

    @classmethod
    def unet_from_architecture(cls, name: str) -> UNet2DConditionModel:
        """The UNet of ``from_architecture(name)`` alone: the first module it draws, so after the
        same seed its weights are the same."""
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; choose one of {', '.join(CONFIGS)}")
        return UNet2DConditionModel.from_config(copy.deepcopy(CONFIGS[name]["unet"]))

    @classmethod
    def finetune_from_hap(cls, hap: "DisCoModel", base_unet: UNet2DConditionModel) -> "DisCoModel":
        """The fine-tuning model after HAP: UNet, projection and background ControlNet (and the
        frozen VAE and CLIP) from ``hap``; the pose ControlNet a fresh copy of the *base* UNet.

        Nothing is copied and nothing random is allocated: the new model takes ``hap``'s modules
        and ``base_unet``'s down and mid blocks (both are consumed), so the peak is HAP's weights
        plus the base UNet's. The global generator still advances as it did when this built a
        whole random fine-tuning model and a ControlNet on the CPU (the draws are made on the
        meta device), so the pose ControlNet's conditioning embedding, which comes from it, and
        every draw after it are unchanged.
        """
        config = {k: v for k, v in hap.config.items() if not k.startswith("_")}
        config["variant"] = "finetune"
        with SeededMeta(record=False):
            model = cls(**config)
        ours = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("pose_controlnet.")}
        theirs = {k: v.shape for k, v in hap.state_dict().items()}
        if ours != theirs:
            missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            wrong = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
            raise ValueError(f"{hap.__class__.__name__} checkpoint does not fit: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}")
        for part in ("unet", "vae", "image_encoder", "reference_projection", "background_controlnet"):
            setattr(model, part, getattr(hap, part))
        model.pose_controlnet = controlnet_from_unet(base_unet, take=True)
        return model

    def export_diffusers(self, folder: str | Path) -> list[Path]:
        """Write the networks as diffusers folders: ``unet/`` and ``controlnet_pose/``
        (``UNet2DConditionModel`` / ``ControlNetModel``), and ``controlnet_background/``
        (``BackgroundControlNet``, a ``ControlNetModel`` whose conditioning is the VAE latent);
        a temporal-module model also ``temporal/`` (its layers' tensors and config).
        ``disco-cli export`` writes them from a checkpoint."""
        folder = Path(folder)
        written = [folder / "unet"]
        self.unet.save_pretrained(folder / "unet")
        if self.pose_controlnet is not None:
            self.pose_controlnet.save_pretrained(folder / "controlnet_pose")
            written.append(folder / "controlnet_pose")
        self.background_controlnet.save_pretrained(folder / "controlnet_background")
        written.append(folder / "controlnet_background")
        if getattr(self, "temporal", None) is not None:
            # diffusers has no class for the temporal module (it hooks into the networks above):
            # its tensors and config go beside them instead of being dropped without a word.
            import json

            from safetensors.torch import save_file

            target = folder / "temporal"
            target.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.temporal.state_dict().items()},
                      str(target / "temporal.safetensors"))
            (target / "config.json").write_text(json.dumps(
                {"temporal_config": self.config.get("temporal_config"),
                 "note": "temporal layers of a DisCo TM model, attached by disco.model.temporal.add_temporal to "
                         "the UNet and ControlNets exported beside this folder; load the whole model with "
                         "DisCoModel.from_pretrained"}, indent=2))
            written.append(target)
        return written

    # -- conditioning ---------------------------------------------------------------------------

    def encode_reference(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised 224 x 224 references (already masked) -> B x 257 x cross-attention tokens."""
        hidden = self.image_encoder.vision_model(pixel_values=pixel_values).last_hidden_state
        hidden = self.image_encoder.vision_model.post_layernorm(hidden)
        return self.reference_projection(hidden)

    def unconditional_reference(self, batch: int) -> torch.Tensor:
        """The classifier-free-guidance reference: the CLIP encoding of an all-zero image, through
        the trainable projection (with gradient when grad is on: the official code trains the
        projection on it too)."""
        size = self.image_encoder.config.image_size
        param = next(self.reference_projection.parameters())
        zeros = torch.zeros(batch, 3, size, size, device=param.device, dtype=param.dtype)
        return self.encode_reference(zeros)

    def encode_background(self, background: torch.Tensor) -> torch.Tensor:
        """Background pictures in [-1, 1] (person removed) -> scaled VAE latents."""
        return self.vae.encode(background).latent_dist.mode() * VAE_SCALING

    def drop_conditions(
        self,
        reference_tokens: torch.Tensor,
        background_latents: torch.Tensor,
        pose_image: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Classifier-free-guidance dropout, drawn per sample (the official code drops a whole batch).

        A dropped reference becomes the zero-image CLIP encoding, a dropped background a zero
        latent, a dropped pose an empty (black) skeleton picture. ``uniforms`` (B x 3: reference,
        background, pose; a host tensor or NumPy array), when given, replaces the draws from
        ``generator``: the trainer draws them from each sample's own seed, so a sample's dropout
        does not depend on its batch.
        """
        batch = reference_tokens.shape[0]
        columns = iter(range(3))

        def draw(p: float) -> torch.Tensor:
            # Decided on the host (no device synchronisation for ``any``), then moved.
            column = next(columns)
            u = (torch.as_tensor(uniforms[:, column], device="cpu") if uniforms is not None
                 else torch.rand(batch, generator=generator, device="cpu"))
            return u < p

        drop_ref = draw(self.config.reference_dropout)
        if drop_ref.any():
            # With gradient: a dropped sample trains the projection on the zero image's tokens,
            # as the official code does (CLIP itself is frozen, so only the projection learns).
            empty = self.unconditional_reference(1).to(reference_tokens.dtype)
            drop_ref = drop_ref.to(reference_tokens.device)
            reference_tokens = torch.where(drop_ref[:, None, None], empty, reference_tokens)
        drop_bg = draw(self.config.background_dropout).to(reference_tokens.device)
        background_latents = background_latents * (~drop_bg).to(background_latents.dtype)[:, None, None, None]
        if pose_image is not None:
            drop_pose = draw(self.config.pose_dropout).to(reference_tokens.device)
            pose_image = pose_image * (~drop_pose).to(pose_image.dtype)[:, None, None, None]
        return reference_tokens, background_latents, pose_image

    def enable_memory_savings(self, gradient_checkpointing: bool = True) -> None:
        """Gradient checkpointing in the UNet and both ControlNets (attention already runs on
        PyTorch's SDPA kernels in diffusers; mixed precision is the trainer's autocast)."""
        for module in (self.unet, self.background_controlnet, self.pose_controlnet):
            if module is None:
                continue
            if gradient_checkpointing:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()

    # -- the network ----------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        reference_tokens: torch.Tensor,
        background_latents: torch.Tensor,
        pose_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted noise for ``sample`` (noisy latents); ``pose_image`` is the skeleton in [0, 1]."""
        down, mid = self.background_controlnet(
            sample, timestep, encoder_hidden_states=reference_tokens, controlnet_cond=background_latents,
            conditioning_scale=self.config.background_scale, return_dict=False,
        )
        if self.pose_controlnet is not None:
            if pose_image is None:
                raise ValueError("the finetune variant needs a pose image")
            pose_down, pose_mid = self.pose_controlnet(
                sample, timestep, encoder_hidden_states=reference_tokens, controlnet_cond=pose_image,
                conditioning_scale=self.config.pose_scale, return_dict=False,
            )
            down = [a + b for a, b in zip(down, pose_down)]
            mid = mid + pose_mid
        return self.unet(
            sample, timestep, encoder_hidden_states=reference_tokens,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample

    # -- what trains ------------------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters each stage trains (DESIGN.md): HAP trains the UNet's transformer blocks
        (``transformer_blocks``: not the ResNet blocks, and not the norm / ``proj_in`` /
        ``proj_out`` of their Transformer2D wrappers, as the official "transblocks" setting), the
        projection and the background ControlNet; fine-tuning trains all but CLIP and the VAE."""
        out = {}
        if getattr(self, "temporal", None) is not None:
            # The temporal stage trains its temporal layers alone (model/temporal.py).
            return {name: param for name, param in self.named_parameters() if name.startswith("temporal.")}
        for name, param in self.named_parameters():
            if name.startswith(("vae.", "image_encoder.")):
                continue
            if self.config.variant == "pretrain" and name.startswith("unet.") and ".transformer_blocks." not in name:
                continue
            out[name] = param
        return out

    def set_trainable(self) -> None:
        train = set(self.trainable_parameters())
        for name, param in self.named_parameters():
            param.requires_grad_(name in train)


def parameter_counts(model: DisCoModel) -> dict[str, int]:
    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    return {
        "unet": count(model.unet),
        "pose_controlnet": count(model.pose_controlnet),
        "background_controlnet": count(model.background_controlnet),
        "image_encoder": count(model.image_encoder),
        "reference_projection": count(model.reference_projection),
        "vae": count(model.vae),
    }
