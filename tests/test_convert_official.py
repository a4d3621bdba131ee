"""``convert-official``: released DisCo checkpoints, in the official code's key layout and DeepSpeed
wrapping, into this package's run format (model/official.py)."""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CodeRunningPickle
from safetensors.torch import save_file
from typer.testing import CliRunner

from disco.cli import app
from disco.model.checkpoint import DamagedCheckpoint, list_checkpoints, load_model
from disco.model.disco import DisCoModel
from disco.model.official import OfficialCheckpointError, UnsafeCheckpoint, convert_official, read_official
from disco.pipeline.errors import ConfigError

# The official network's layout, written down here independently of model/official.py: our
# prefix -> the official module path (net.py: self.unet, self.controlnet, self.refer_clip_proj,
# self.vae, self.clip_image_encoder; fine-tuning wraps the pose and background ControlNets in
# MultiControlNetModel_MultiHiddenStates.nets, HAP keeps the background ControlNet alone).
LAYOUT = {
    "finetune": {"unet.": "unet.", "pose_controlnet.": "controlnet.nets.0.",
                 "background_controlnet.": "controlnet.nets.1.", "reference_projection.": "refer_clip_proj.",
                 "vae.": "vae.", "image_encoder.": "clip_image_encoder."},
    "pretrain": {"unet.": "unet.", "background_controlnet.": "controlnet.", "reference_projection.": "refer_clip_proj.",
                 "vae.": "vae.", "image_encoder.": "clip_image_encoder."},
}
# diffusers 0.14's VAE AttentionBlock, and the official ControlNetConditioningConvin module.
OLD_VAE_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def official_state_dict(model: DisCoModel) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the names the official code's ``Net.state_dict()`` gives them."""
    out = {}
    for name, tensor in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in LAYOUT[model.config.variant].items() if name.startswith(o))
        rest = name[len(ours):]
        if ours == "vae.":
            for new, old in OLD_VAE_ATTENTION.items():
                rest = rest.replace(new, old)
        if ours == "background_controlnet." and rest.startswith("controlnet_cond_embedding."):
            rest = "controlnet_cond_embedding.conv_in." + rest[len("controlnet_cond_embedding."):]
        out[theirs + rest] = tensor.detach().clone()
    clip = model.image_encoder.config
    # transformers 4.27 saved CLIP's position ids as a buffer.
    out["clip_image_encoder.vision_model.embeddings.position_ids"] = torch.arange((clip.image_size // clip.patch_size) ** 2 + 1)[None]
    return out


def deepspeed_file(path: Path, module: dict, step: int = 25000, **extra) -> Path:
    """What DeepSpeed 0.6's ``save_checkpoint`` writes to mp_rank_00_model_states.pt (ZeRO 2: no
    optimizer state in it)."""
    torch.save({
        "module": module, "buffer_names": ["clip_image_encoder.vision_model.embeddings.position_ids"],
        "optimizer": None, "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items() if v.is_floating_point())],
        "lr_scheduler": {"max_iter": 25000, "min_lr": 1e-8, "warmup_ratio": 0.1, "base_lrs": [1e-3], "last_epoch": step,
                         "_step_count": step + 1, "_last_lr": [1e-8]},
        "sparse_tensor_module_names": set(), "skipped_steps": 3, "global_steps": step, "global_samples": step * 64,
        "dp_world_size": 8, "mp_world_size": 1, "ds_version": "0.6.3",
        "ds_config": {"train_micro_batch_size_per_gpu": 64, "fp16": {"enabled": True},
                      "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}},
        **extra,
    }, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny sd-image-variations folder in diffusers layout."""
    torch.manual_seed(0)
    tiny = DisCoModel.from_architecture("tiny", variant="finetune")
    folder = tmp_path_factory.mktemp("sd-image-variations")
    for part in ("unet", "vae", "image_encoder"):
        getattr(tiny, part).save_pretrained(folder / part)
    return folder


def trained(base: Path, variant: str, half: bool = False) -> DisCoModel:
    """The base model with its trainable weights moved (as training would); ``half``: rounded to fp16."""
    model = DisCoModel.from_sd_image_variations(base, variant=variant).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
            if half:
                param.copy_(param.half().float())
    return model


def inputs(model: DisCoModel, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = model.unet.config.sample_size
    with torch.no_grad():
        reference = model.encode_reference(torch.randn(2, 3, 224, 224, generator=g))
        background = model.encode_background(torch.rand(2, 3, side * 4, side * 4, generator=g) * 2 - 1)
    return (torch.randn(2, 4, side, side, generator=g), torch.tensor([10, 500]), reference, background,
            torch.rand(2, 3, side * 8, side * 8, generator=g))


def assert_same_model(converted: DisCoModel, source: DisCoModel) -> None:
    ours, theirs = converted.trainable_parameters(), source.trainable_parameters()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    sample, timestep, reference, background, pose = inputs(source)
    pose = pose if source.pose_controlnet is not None else None
    with torch.no_grad():
        assert torch.equal(converted(sample, timestep, reference, background, pose),
                           source(sample, timestep, reference, background, pose))


def test_finetune_checkpoint_round_trips(base, tmp_path):
    source = trained(base, "finetune")
    module = official_state_dict(source)
    # Older (ldm-converted) VAE files hold the attention projections as 1 x 1 convolutions.
    query = "vae.decoder.mid_block.attentions.0.query.weight"
    module[query] = module[query][:, :, None, None]
    path = deepspeed_file(tmp_path / "mp_rank_00_model_states.pt", module, step=70000)
    result = convert_official(path, base, tmp_path / "run")
    assert (result.variant, result.step, result.reshaped) == ("finetune", 70000, 1)
    assert result.checkpoint.name == "checkpoint-00070000"
    counts = result.counts
    assert counts["pose controlnet"]["trainable"] == counts["pose controlnet"]["tensors"] > 0
    assert counts["vae"]["checked"] == counts["vae"]["tensors"] and counts["vae"]["trainable"] == 0
    assert counts["clip"]["checked"] == counts["clip"]["tensors"]
    assert sum(c["tensors"] for c in counts.values()) == len(source.state_dict()) and result.dropped == 1
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["stage"], config["pretrained"], config["model"]) == ("finetune", str(base.resolve()), None)
    if "pose_style" in config:  # trained on the official renderer's body-only pictures
        assert (config["pose_style"], config["hands"]) == ("disco", False)
    assert_same_model(load_model(tmp_path / "run"), source)


def test_hap_fp16_checkpoint_converts_on_the_command_line_and_initialises_fine_tuning(base, tmp_path):
    from disco.train.config import TrainConfig
    from disco.train.initial import initial_model

    source = trained(base, "pretrain", half=True)
    # DeepSpeed fp16: the whole network in half precision; the official Net.half halves everything,
    # then turns CLIP back to float: fp32 tensors holding fp16-rounded values.
    module = {k: v if not v.is_floating_point() else v.half().float() if k.startswith("clip_image_encoder.") else v.half()
              for k, v in official_state_dict(source).items()}
    assert any(not torch.equal(v, official_state_dict(source)[k]) for k, v in module.items()
               if k.startswith("clip_image_encoder.") and v.is_floating_point())
    path = deepspeed_file(tmp_path / "mp_rank_00_model_states.pt", module)
    run = tmp_path / "hap"
    result = CliRunner().invoke(app, ["convert-official", str(path), "--base", str(base), "--output", str(run)])
    assert result.exit_code == 0, result.output
    assert "background controlnet:" in result.output and "pose controlnet" not in result.output.split("wrote")[0]
    assert "checkpoint-00025000 (pretrain, step 25000" in result.output
    converted = load_model(run)
    assert converted.config.variant == "pretrain"
    assert_same_model(converted, source)
    # Written again only with --overwrite.
    again = CliRunner().invoke(app, ["convert-official", str(path), "--base", str(base), "--output", str(run)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, ["convert-official", str(path), "--base", str(base), "--output", str(run),
                                    "--overwrite"]).exit_code == 0
    # --overwrite with a file of another step: a write that fails (the disk full) leaves the run as
    # it was; one that succeeds leaves the new checkpoint alone.
    later = deepspeed_file(tmp_path / "later.pt", module, step=30000)
    from disco.model import official

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(official, "save_checkpoint", full_disk)
        with pytest.raises(OSError):
            official.convert_official(later, base, run, overwrite=True)
    assert list(list_checkpoints(run)) == [25000]
    assert_same_model(load_model(run), source)
    official.convert_official(later, base, run, overwrite=True)
    assert list(list_checkpoints(run)) == [30000]
    # train --init-from: the fine-tuning model takes the UNet, projection and background ControlNet from it.
    model = initial_model(TrainConfig(stage="finetune", pretrained=str(base), init_from=str(run)))
    for part in ("unet", "reference_projection", "background_controlnet"):
        theirs = getattr(source, part).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(model, part).state_dict().items()), part
    # It has no optimizer state: --resume says so in one line.
    resumed = CliRunner().invoke(app, ["train", "--output", str(run), "--resume", "--no-progress"])
    assert resumed.exit_code == 2 and "converted official checkpoint" in resumed.output
    assert len(resumed.output.strip().splitlines()) == 1


def test_a_key_left_over_or_missing_fails_naming_it(base, tmp_path):
    module = official_state_dict(DisCoModel.from_sd_image_variations(base, variant="finetune"))
    extra = dict(module, **{"controlnet.nets.2.conv_in.weight": torch.zeros(1)})
    with pytest.raises(OfficialCheckpointError, match=r"controlnet\.nets\.2\.conv_in\.weight is not mapped"):
        convert_official(deepspeed_file(tmp_path / "extra.pt", extra), base, tmp_path / "out")
    short = {k: v for k, v in module.items() if k != "controlnet.nets.1.controlnet_cond_embedding.conv_in.bias"}
    with pytest.raises(OfficialCheckpointError, match=r"lacks our parameter background_controlnet\.controlnet_cond_embedding\.bias"):
        convert_official(deepspeed_file(tmp_path / "short.pt", short), base, tmp_path / "out")
    with pytest.raises(OfficialCheckpointError, match="is a finetune checkpoint"):
        convert_official(deepspeed_file(tmp_path / "ft.pt", module), base, tmp_path / "out", variant="pretrain")
    # Other settings of the official code are other architectures, refused with the reason.
    for change, reason in ((lambda m: m.update({"text_encoder.text_model.final_layer_norm.weight": torch.ones(2)}),
                            "--ref_null_caption"),
                           (lambda m: m.update({"controlnet.nets.1.controlnet_cond_embedding.conv_out.weight": torch.ones(2)}),
                            "without --refer_sdvae"),
                           (lambda m: m.pop("refer_clip_proj.weight"), "no refer_clip_proj"),
                           # the official TM net: temporal layers in every ResNet and transformer block
                           (lambda m: m.update({"unet.down_blocks.0.resnets.0.tem_conv.weight": torch.ones(2),
                                                "unet.down_blocks.0.attentions.0.transformer_blocks.0.tem_attn.to_q.weight":
                                                    torch.ones(2)}), "temporal-module .TM. model")):
        changed = dict(module)
        change(changed)
        with pytest.raises(OfficialCheckpointError, match=reason):
            convert_official(deepspeed_file(tmp_path / "other.pt", changed), base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_frozen_tensor_that_differs_from_the_base_fails(base, tmp_path):
    module = official_state_dict(DisCoModel.from_sd_image_variations(base, variant="pretrain"))
    vae = dict(module)
    vae["vae.encoder.mid_block.attentions.0.query.weight"] = vae["vae.encoder.mid_block.attentions.0.query.weight"] + 1e-3
    with pytest.raises(OfficialCheckpointError, match=r"frozen vae\.encoder\.mid_block\.attentions\.0\.query\.weight differs"):
        convert_official(deepspeed_file(tmp_path / "vae.pt", vae), base, tmp_path / "out")
    # HAP trains only the UNet's transformer blocks: its ResNets must be the base's too.
    unet = dict(module)
    unet["unet.conv_in.weight"] = unet["unet.conv_in.weight"] * 1.01
    with pytest.raises(OfficialCheckpointError, match=r"frozen unet\.conv_in\.weight differs"):
        convert_official(deepspeed_file(tmp_path / "unet.pt", unet), base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"module": {"unet.conv_in.weight": torch.zeros(1)}, "client_state": CodeRunningPickle(marker)}, path)
    with pytest.raises(UnsafeCheckpoint, match="refused without running it") as err:
        read_official(path)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    assert not marker.exists()
    result = CliRunner().invoke(app, ["convert-official", str(path), "--base", str(tmp_path), "--output",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "refused without running it" in result.output and not marker.exists()


def test_plain_state_dicts_safetensors_and_argparse_client_state_are_read(tmp_path):
    weights = {"unet.conv_in.weight": torch.ones(2, 2), "controlnet.conv_in.weight": torch.zeros(3)}
    torch.save(weights, tmp_path / "plain.pt")
    save_file(weights, str(tmp_path / "w.safetensors"))
    save_file({f"module.{k}": v for k, v in weights.items()}, str(tmp_path / "ddp.safetensors"))  # a DDP wrapper's names
    torch.save({"module": weights, "args": argparse.Namespace(lr=1e-3, name="x"), "global_steps": 5}, tmp_path / "ds.pt")
    for name in ("plain.pt", "w.safetensors", "ddp.safetensors", "ds.pt"):
        found = read_official(tmp_path / name)
        assert set(found.weights) == set(weights) and torch.equal(found.weights["unet.conv_in.weight"], torch.ones(2, 2))
    assert read_official(tmp_path / "ds.pt").step == 5
    torch.save({"module": None, "param_shapes": [OrderedDict(a=torch.Size([2]))], "ds_version": "0.10.0"}, tmp_path / "z3.pt")
    with pytest.raises(DamagedCheckpoint, match="no weights under 'module'"):
        read_official(tmp_path / "z3.pt")
    # ZeRO-3's model states: the module's tensors are empty stand-ins for what its shards hold.
    torch.save({"module": {k: torch.empty(0) for k in weights}, "ds_version": "0.10.0"}, tmp_path / "z3-empty.pt")
    with pytest.raises(DamagedCheckpoint, match="only empty tensors .*zero_to_fp32"):
        read_official(tmp_path / "z3-empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedCheckpoint, match="damaged or not a tensors-only checkpoint"):
        read_official(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedCheckpoint, match="damaged or not a safetensors file"):
        read_official(tmp_path / "junk.safetensors")
