"""The model at step 0 of a training run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from disco.model.checkpoint import ModelSource, base_model, base_unet, load_model
from disco.pipeline.errors import ConfigError
from disco.train.config import TrainConfig

if TYPE_CHECKING:
    from disco.model.disco import DisCoModel


def initial_model(cfg: TrainConfig, resuming: bool = False) -> DisCoModel:
    """The run's base model (``--pretrained`` or ``--model``) for its stage. Fine-tuning from a HAP
    run (``init_from``) takes the UNet, projection and background ControlNet from it and a fresh
    pose ControlNet from the base UNet.

    Every weight exists once: the HAP model and the base UNet are built, then assembled into the
    fine-tuning model without copies (``DisCoModel.finetune_from_hap``); the peak is their sum.

    ``resuming`` (a checkpoint of this run is loaded next): fine-tuning trains every weight the HAP
    run gave it (all but CLIP and the VAE, which are the base's in both), so the checkpoint
    overwrites them all and the HAP run is not read, as ``load_model`` rebuilds a fine-tuned model.
    A restarted worker group does not build a 9 GiB model to overwrite it, nor depend on the HAP
    run's folder, which may have moved on (its newest checkpoint another) or away."""
    source = ModelSource.of(cfg)
    if cfg.stage == "temporal":
        from disco.model.temporal import TemporalConfig, add_temporal

        image = load_model(cfg.init_from)
        if image.config.variant != "finetune" or image.config.get("temporal_config") is not None:
            raise ConfigError(f"--init-from {cfg.init_from} is not a fine-tuning (image model) run")
        # The temporal layers' random parts are drawn from the run's seed (the loop seeded it).
        return add_temporal(image.train(), TemporalConfig(frames=cfg.clip_frames))
    if cfg.stage == "finetune" and cfg.init_from and not resuming:
        from disco.model.disco import DisCoModel

        hap = load_model(cfg.init_from)
        if hap.config.variant != "pretrain":
            raise ConfigError(f"--init-from {cfg.init_from} is a {hap.config.variant} run, not a pretrain (HAP) run")
        model = DisCoModel.finetune_from_hap(hap.train(), base_unet(source))
    else:
        model = base_model(source, cfg.stage)
    if getattr(cfg, "pose_scale", None) is not None:
        # --pose-scale 0 cuts the pose branch: its zero-initialised output convolutions then get
        # no gradient and stay 0, so the trained model ignores the pose at any scale it is loaded with.
        model.register_to_config(pose_scale=float(cfg.pose_scale))
    return model
