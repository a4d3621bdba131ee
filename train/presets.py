"""The paper's training recipe as named presets (``train --preset disco-hap`` / ``disco-finetune`` / ``disco-temporal``).

A preset is a set of ``TrainConfig`` values with, for each, where it comes from: the DisCo paper
(Wang et al., "DisCo: Disentangled Control for Realistic Human Dance Generation", CVPR 2024) or a
file of the official code (GitHub ``Wangt-CN/DisCo``). Order of precedence: the defaults, then the
preset, then a ``--config`` YAML, then the flags; the resolved ``config.yaml`` records the preset.

The official global batch came from GPUs x per-GPU batch (HAP 32 x 64, fine-tuning 8 x 32). A
preset keeps the per-GPU batch and the global batch: gradient accumulation makes up the
difference on fewer workers (``TrainConfig.global_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

from disco.pipeline.errors import ConfigError

PAPER = "paper"
README = "official README.md (training commands)"
AGENT = "official agent.py (build_optimizer, WarmupLinearLR)"
ARGS = "official utils/args.py"
NET = "official config/*/net.py (freeze_pretrained_part_in_ddpm)"
CONFIG_FT = "official config/ref_attn_clip_combine_controlnet/tiktok_S256L16_xformers_tsv.py"
CONFIG_HAP = "official config/ref_attn_clip_combine_controlnet_attr_pretraining/coco_S256_xformers_tsv_strongrand.py"
DATASET_FT = "official dataset/tiktok_controlnet_t2i_imagevar_combine_tsv.py"
DATASET_HAP = "official dataset/coco_controlnet_t2i_imagevar_combine_tsv_strongrand.py"
DEEPSPEED = "official utils/deepspeed.py (fp16 under --deepspeed)"
README_TM = "official README.md (temporal module training command)"
CONFIG_TM = "official config/disco_w_tm/yz_tiktok_S256L16_xformers_tsv.py"


@dataclass(frozen=True)
class Setting:
    value: object
    source: str
    note: str = ""


_SHARED = {
    "resolution": Setting(256, f"{PAPER}; {CONFIG_FT} img_size (256, 256)"),
    "adam_betas": Setting((0.9, 0.98), AGENT),
    "weight_decay": Setting(1e-3, f"{ARGS} --decay"),
    "official_weight_decay": Setting(True, AGENT, "biases and norm weights get no weight decay"),
    "warmup_steps": Setting(None, f"{ARGS} --warmup_ratio 0.1; {AGENT}", "10 % of the steps, then linear decay to 0"),
    "max_grad_norm": Setting(None, f"{ARGS} --max_grad_norm -1", "no clipping"),
    "ema_decay": Setting(None, PAPER, "no EMA"),
    "mixed_precision": Setting("fp16", DEEPSPEED),
    "gradient_checkpointing": Setting(True, f"{CONFIG_FT} gradient_checkpointing = True"),
    "augment": Setting(True, f"{DATASET_FT}; {DATASET_HAP}", "the stage's crops (DESIGN.md, Recipe)"),
}

PRESETS: dict[str, dict[str, Setting]] = {
    "disco-hap": {
        "stage": Setting("pretrain", f"{PAPER}; {CONFIG_HAP}"),
        **_SHARED,
        "lr": Setting(1e-3, f"{README} --learning_rate 1e-3"),
        "max_steps": Setting(25_000, PAPER),
        "batch_size": Setting(64, f"{README} --local_train_batch_size 64", "per GPU"),
        "global_batch": Setting(2048, PAPER, "32 GPUs x 64"),
        "gradient_checkpointing": Setting(True, f"{CONFIG_HAP} gradient_checkpointing = True"),
    },
    "disco-finetune": {
        "stage": Setting("finetune", f"{PAPER}; {CONFIG_FT}"),
        **_SHARED,
        "lr": Setting(2e-4, f"{README} --learning_rate 2e-4"),
        "max_steps": Setting(70_000, PAPER),
        "batch_size": Setting(32, f"{README} --local_train_batch_size 32", "per GPU"),
        "global_batch": Setting(256, f"{PAPER}; {README} mpirun -np 8", "8 GPUs x 32"),
        "ref_mode": Setting("first", f"{DATASET_FT}", "the clip's first frame"),
        "pose_style": Setting("disco", "official pose renders", "what the released checkpoints saw"),
    },
    "disco-temporal": {
        "stage": Setting("temporal", f"{PAPER}; {CONFIG_TM}"),
        **_SHARED,
        "lr": Setting(1e-4, f"{README_TM} --learning_rate 1e-4"),
        "batch_size": Setting(2, f"{README_TM} --local_train_batch_size 2", "clips per GPU"),
        "clip_frames": Setting(16, f"{CONFIG_TM} (S256L16)", "frames per clip"),
        "gradient_checkpointing": Setting(True, f"{CONFIG_TM} gradient_checkpointing = True"),
        "ref_mode": Setting("first", PAPER, "each clip's first frame"),
    },
}


def preset_values(name: str) -> dict:
    """The ``TrainConfig`` values of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {key: setting.value for key, setting in PRESETS[name].items()}


def preset_table(name: str) -> list[tuple[str, str, str]]:
    """(option, value, source and note) rows of a preset, for the README and ``--help``."""
    rows = []
    for key, setting in PRESETS[name].items():
        value = "10 % of max_steps" if key == "warmup_steps" else ("off" if setting.value is None else setting.value)
        source = f"{setting.source} ({setting.note})" if setting.note else setting.source
        rows.append((key, str(value), source))
    return rows
