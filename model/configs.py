"""Architecture configurations: the Stable Diffusion image-variations layout and two smaller twins.

All have the same structure (UNet with cross-attention down/up blocks, KL VAE, CLIP vision
tower with a projection); ``tiny`` only shrinks the widths, so tests and the demo exercise the
same code as a full run. ``small`` sits between them (about 74 M parameters in the fine-tuning
variant): the full model's depth, block layout and 8x VAE at a fifth of the widths, big enough
for memory measurements on a CPU to be dominated by the model and its activations.
"""

from __future__ import annotations

# A training run's resolved configuration, in its run directory: the trainer writes it, and the
# checkpoint format reads which base model the run's checkpoints belong to from it.
RUN_CONFIG_FILE = "config.yaml"

# lambdalabs/sd-image-variations-diffusers: unet/, vae/, image_encoder/ (CLIP ViT-L/14 vision).
SD_IMAGE_VARIATIONS = {
    "unet": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 256,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "image_encoder": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 14, "projection_dim": 768,
    },
}

TINY = {
    "unet": {
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "sample_size": 64,
        "block_out_channels": [16, 32, 32], "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    },
    "image_encoder": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 224, "patch_size": 14, "projection_dim": 32,
    },
}

SMALL = {
    "unet": {
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 256, "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 256,
        "block_out_channels": [32, 64, 128, 128],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "image_encoder": {
        "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
        "image_size": 224, "patch_size": 14, "projection_dim": 256,
    },
}

CONFIGS = {"sd-image-variations": SD_IMAGE_VARIATIONS, "small": SMALL, "tiny": TINY}

# DDPM schedule of Stable Diffusion (scheduler/scheduler_config.json of the image-variations repo).
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
