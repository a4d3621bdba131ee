"""The paper's recipe as presets: values, precedence (defaults < preset < YAML < flags), the global
batch made up by accumulation, the official weight-decay groups."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from disco.cli import app
from disco.commands.train import configured
from disco.pipeline.errors import ConfigError
from disco.train.objective import parameter_groups
from disco.train.presets import PRESETS, preset_table


def test_the_finetune_preset_is_the_papers_recipe_and_flags_override_it(tmp_path):
    cfg = configured("disco-finetune", None, {"model": "tiny"}, resume=False).validate_model()
    assert (cfg.stage, cfg.resolution, cfg.learning_rate, cfg.max_steps, cfg.adam_betas, cfg.weight_decay) == (
        "finetune", 256, 2e-4, 70_000, (0.9, 0.98), 1e-3)
    assert (cfg.warmup, cfg.schedule_length) == (7_000, 70_000)  # 10 % warm-up, then linear decay
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.ema_decay, cfg.max_grad_norm) == ("fp16", True, None, None)
    assert (cfg.batch_size, cfg.global_batch, cfg.grad_accum, cfg.preset) == (32, 256, 8, "disco-finetune")
    assert (cfg.pose_style, cfg.ref_mode, cfg.augment, cfg.official_weight_decay) == ("disco", "first", True, True)
    # On 4 workers the global batch needs 2 micro-batches; on 3 it cannot be made.
    assert configured("disco-finetune", None, {"model": "tiny", "num_workers": 4}, False).validate_model().grad_accum == 2
    with pytest.raises(ConfigError, match="global batch 256 .of --preset disco-finetune. is not a multiple"):
        configured("disco-finetune", None, {"model": "tiny", "num_workers": 3}, False).validate_model()
    # A YAML overrides the preset, a flag the YAML; an explicit accumulation drops the global batch.
    yaml = tmp_path / "run.yaml"
    yaml.write_text("lr: 1.0e-4\nmax-steps: 100\ngrad_accum: 4\n")
    cfg = configured("disco-finetune", yaml, {"model": "tiny", "max_steps": 10}, False).validate_model()
    assert (cfg.learning_rate, cfg.max_steps, cfg.grad_accum, cfg.global_batch) == (1e-4, 10, 4, None)
    (tmp_path / "triplets").mkdir()
    with pytest.raises(ConfigError, match="fp16 .of --preset disco-finetune. needs --use-gpu"):
        configured("disco-finetune", None, {"model": "tiny", "output": "x", "data": [str(tmp_path)]}, False).validate()
    with pytest.raises(ConfigError, match="keeps the configuration"):
        configured("disco-hap", None, {}, resume=True)
    # A flag's accumulation wins over a YAML's global batch; a run's own config.yaml (naming its
    # preset) can be given again with --resume.
    yaml.write_text("preset: disco-finetune\nglobal_batch: 64\n")
    cfg = configured(None, yaml, {"model": "tiny", "grad_accum": 2}, False).validate_model()
    assert (cfg.grad_accum, cfg.global_batch, cfg.preset) == (2, None, "disco-finetune")
    assert configured(None, yaml, {"output": "run"}, resume=True).lr is None  # the preset's values not applied
    with pytest.raises(ConfigError, match="unknown --preset 'hap'"):
        configured("hap", None, {}, resume=False)
    # Every value carries where it comes from.
    assert all(source for name in PRESETS for _, _, source in preset_table(name))


def test_hap_preset_through_the_cli_dry_run():
    result = CliRunner().invoke(app, ["train", "--preset", "disco-hap", "--model", "tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "pretrain on tiny, 256 px, batch 64 x 32 accumulation, fp16" in " ".join(result.output.split())
    wrong = CliRunner().invoke(app, ["train", "--preset", "disco", "--model", "tiny", "--dry-run"])
    assert wrong.exit_code == 2 and "disco-hap" in wrong.output


def test_official_weight_decay_spares_biases_and_norm_weights():
    from disco.model.disco import DisCoModel

    torch.manual_seed(0)
    named = DisCoModel.from_architecture("tiny", variant="pretrain").trainable_parameters()

    class Cfg:
        official_weight_decay = True

    decay, plain = parameter_groups(named, Cfg)
    ids = {id(p) for p in plain["params"]}
    spared = {n for n, p in named.items() if id(p) in ids}
    assert plain["weight_decay"] == 0.0 and len(decay["params"]) + len(plain["params"]) == len(named)
    assert any(n.endswith(".bias") for n in spared) and any(n.endswith("norm1.weight") for n in spared)
    assert all(n.endswith(".bias") or "norm" in n for n in spared)
    assert any(n.endswith("norm3.weight") for n in named) and not any(n.endswith("norm3.weight") for n in spared)
    # One AdamW step with zero gradients: the decayed weights shrink, the spared ones stay.
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = torch.optim.AdamW([decay, plain], lr=0.1, weight_decay=0.5)
    for p in named.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in named.items():
        if n in spared:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
    Cfg.official_weight_decay = False
    assert len(parameter_groups(named, Cfg)) == 1


def test_the_temporal_stage_defaults_to_a_batch_that_fits_a_gpu_and_has_the_official_preset():
    """8 clips of 16 frames is 128 frames a GPU: the full-size plan did not fit an 80 GiB card.
    The temporal stage's own default (2 clips) does, and --preset disco-temporal (the official TM
    command: 2 clips, lr 1e-4, fp16, checkpointing) fits with room to spare."""
    from disco.train.memory import GIB, memory_plan

    full = {"model": "sd-image-variations"}
    default = configured(None, None, {**full, "stage": "temporal"}, False).validate_model()
    preset = configured("disco-temporal", None, full, False).validate_model()
    assert (default.batch_size, configured(None, None, {**full, "stage": "finetune"}, False).validate_model().batch_size) == (2, 8)
    assert (preset.stage, preset.batch_size, preset.clip_frames, preset.learning_rate, preset.mixed_precision,
            preset.gradient_checkpointing) == ("temporal", 2, 16, 1e-4, "fp16", True)
    # (8 clips: 138 GiB, measured when the default changed; the plan of each takes seconds)
    assert memory_plan(default, gpu_memory_gib=80, search=False).fits
    assert memory_plan(preset, gpu_memory_gib=80, search=False).total < 25 * GIB
