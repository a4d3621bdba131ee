"""The DisCo model on its tiny configuration (same structure as the full one, random weights)."""

from __future__ import annotations

import copy

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from typer.testing import CliRunner

from disco.cli import app
from disco.model.controlnets import BackgroundControlNet
from disco.model.disco import DisCoModel, parameter_counts


def _inputs(model: DisCoModel, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = model.unet.config.sample_size
    sample = torch.randn(batch, 4, side, side, generator=g)
    timestep = torch.tensor([10, 500][:batch])
    reference = model.encode_reference(torch.randn(batch, 3, 224, 224, generator=g))
    background = model.encode_background(torch.rand(batch, 3, side * 4, side * 4, generator=g) * 2 - 1)
    pose = torch.rand(batch, 3, side * 8, side * 8, generator=g)
    return sample, timestep, reference, background, pose


@pytest.fixture(scope="module")
def tiny() -> DisCoModel:
    torch.manual_seed(0)
    return DisCoModel.from_architecture("tiny", variant="finetune").eval()


def test_reference_tokens_are_all_257_projected(tiny):
    tokens = tiny.encode_reference(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 257, tiny.unet.config.cross_attention_dim)
    torch.testing.assert_close(tiny.unconditional_reference(2), tokens.expand(2, -1, -1))
    # Initialised from CLIP's visual projection.
    assert torch.equal(tiny.reference_projection.weight, tiny.image_encoder.visual_projection.weight)


def test_at_initialisation_the_model_predicts_exactly_what_the_bare_unet_predicts(tiny):
    sample, timestep, reference, background, pose = _inputs(tiny)
    with torch.no_grad():
        ours = tiny(sample, timestep, reference, background, pose)
        bare = tiny.unet(sample, timestep, encoder_hidden_states=reference).sample
    assert torch.equal(ours, bare)
    # The background embedding starts as the UNet's conv_in, not as zeros.
    assert torch.equal(tiny.background_controlnet.controlnet_cond_embedding.weight, tiny.unet.conv_in.weight)


@pytest.mark.parametrize("variant", ["pretrain", "finetune"])
def test_one_optimiser_step_changes_exactly_the_documented_parameters(variant):
    torch.manual_seed(1)
    model = DisCoModel.from_architecture("tiny", variant=variant)
    model.set_trainable()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-3)
    sample, timestep, _, background, pose = _inputs(model)
    reference = model.encode_reference(torch.randn(2, 3, 224, 224))
    loss = torch.nn.functional.mse_loss(model(sample, timestep, reference, background, pose), torch.randn_like(sample))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    # A trainable parameter that stays put after one step is one that can't move yet: zero-valued
    # (biases, the zero convolutions) with a zero gradient, because the ControlNets' outputs start
    # at zero. Everything else that trains moved, and nothing else did.
    still = set(trainable) - changed
    assert all(not before[n].any() and not model.get_parameter(n).grad.any() for n in still)
    assert changed <= set(trainable) and len(changed) > len(trainable) // 2
    assert not any(n.startswith(("vae.", "image_encoder.")) for n in changed)
    unet_changed = {n for n in changed if n.startswith("unet.")}
    if variant == "pretrain":
        assert model.pose_controlnet is None
        # The official "transblocks" set: the transformer blocks only, not the Transformer2D
        # wrappers' norm / proj_in / proj_out, nor the ResNet blocks.
        assert unet_changed and all(".transformer_blocks." in n for n in unet_changed)
        wrappers = {n for n in trainable if n.startswith("unet.") and ".attentions." in n
                    and ".transformer_blocks." not in n}
        assert not wrappers
        assert any(n.startswith("unet.") and n.endswith(("proj_in.weight", "attentions.0.norm.weight"))
                   for n in before)
        assert any(n.startswith("unet.") and ".resnets." in n for n in before) and not any(".resnets." in n for n in unet_changed)
    else:
        assert any(".resnets." in n for n in unet_changed) and any(n.startswith("pose_controlnet.") for n in changed)


def test_save_and_load_round_trip_is_bit_exact(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").exists()
    loaded = DisCoModel.from_pretrained(tmp_path / "ckpt")
    a, b = tiny.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_export_loads_in_plain_diffusers(tiny, tmp_path):
    """`disco-cli export` of a checkpoint: each folder loads with its diffusers class; the background
    ControlNet's config says what it is, so it comes back whole without a side file."""
    from typer.testing import CliRunner

    from disco.cli import app

    tiny.save_pretrained(tmp_path / "ckpt")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet", local_files_only=True)
    pose = ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet_pose", local_files_only=True)
    assert torch.equal(unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert all(torch.equal(p, q) for p, q in zip(pose.parameters(), tiny.pose_controlnet.parameters()))
    folder = tmp_path / "export" / "controlnet_background"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    background = BackgroundControlNet.from_pretrained(folder, local_files_only=True)
    assert background.config.conditioning_channels == tiny.unet.config.in_channels == 4
    assert background.controlnet_cond_embedding.weight.shape[1] == 4
    ours, theirs = background.state_dict(), tiny.background_controlnet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    missing = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output


def test_attention_runs_on_pytorch_sdpa(tiny):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = tiny.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_hap_to_finetune_mapping(tmp_path):
    torch.manual_seed(2)
    base = DisCoModel.from_architecture("tiny", variant="pretrain")
    base_unet = UNet2DConditionModel.from_config(base.unet.config)
    base_unet.load_state_dict(base.unet.state_dict())
    hap = DisCoModel.from_architecture("tiny", variant="pretrain")  # stands for a trained HAP model
    with torch.no_grad():
        for p in hap.trainable_parameters().values():
            p.add_(0.01)
    model = DisCoModel.finetune_from_hap(hap, base_unet)
    assert model.config.variant == "finetune"
    for part in ("unet", "reference_projection", "background_controlnet"):
        ours, theirs = getattr(model, part).state_dict(), getattr(hap, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    # The pose ControlNet copies the base UNet's blocks, not HAP's.
    pose_blocks = model.pose_controlnet.down_blocks.state_dict()
    assert all(torch.equal(v, base_unet.down_blocks.state_dict()[k]) for k, v in pose_blocks.items())
    assert any(not torch.equal(v, hap.unet.down_blocks.state_dict()[k]) for k, v in pose_blocks.items())


def test_build_from_a_local_image_variations_folder(tiny, tmp_path):
    folder = tmp_path / "sd-iv"
    tiny.unet.save_pretrained(folder / "unet")
    tiny.vae.save_pretrained(folder / "vae")
    tiny.image_encoder.save_pretrained(folder / "image_encoder")
    model = DisCoModel.from_sd_image_variations(folder, variant="finetune")
    assert all(torch.equal(p, q) for p, q in zip(model.unet.parameters(), tiny.unet.parameters()))
    assert torch.equal(model.reference_projection.weight, tiny.image_encoder.visual_projection.weight)
    for k, v in model.pose_controlnet.down_blocks.state_dict().items():
        assert torch.equal(v, tiny.unet.down_blocks.state_dict()[k])
    sample, timestep, reference, background, pose = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(sample, timestep, reference, background, pose),
                           tiny.unet(sample, timestep, encoder_hidden_states=reference).sample)
    with pytest.raises(FileNotFoundError, match="vae"):
        DisCoModel.from_sd_image_variations(tmp_path / "empty")
    # A folder saved in half precision (as many are published) gives a float32 model all through:
    # transformers 5 loaded its CLIP in float16 beside a float32 rest, which then failed to run.
    half = tmp_path / "sd-iv-fp16"
    for name in ("unet", "vae", "image_encoder"):
        copy.deepcopy(getattr(tiny, name)).half().save_pretrained(half / name)
    model = DisCoModel.from_sd_image_variations(half, variant="finetune")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.unconditional_reference(1).dtype == torch.float32


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tiny, tmp_path):
    """A save_pretrained folder missing a weight loaded with that weight left random (diffusers
    only warns); a trainable tensor of another shape was broadcast into the parameter."""
    from safetensors.torch import load_file, save_file

    from disco.model.checkpoint import DamagedCheckpoint, load_checkpoint, load_trainable_file

    tiny.save_pretrained(tmp_path / "pretrained")
    weights = next((tmp_path / "pretrained").glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors["reference_projection.weight"]
    save_file(tensors, weights)
    with pytest.raises(DamagedCheckpoint, match=r"missing keys \['reference_projection.weight'\]"):
        load_checkpoint(tmp_path / "pretrained")
    trainable = {k: v.detach().clone() for k, v in tiny.trainable_parameters().items()}
    name = next(k for k, v in trainable.items() if v.ndim == 1 and len(v) > 1)
    trainable[name] = torch.tensor([7.0])
    save_file(trainable, tmp_path / "trainable.safetensors")
    with pytest.raises(DamagedCheckpoint, match=rf"{name} is \(1,\) in the checkpoint"):
        load_trainable_file(DisCoModel.from_architecture("tiny", variant="finetune"), tmp_path / "trainable.safetensors")


def test_full_size_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        model = DisCoModel.from_architecture("sd-image-variations")
    counts = parameter_counts(model)
    assert round(counts["unet"] / 1e6, 1) == 859.5
    assert 355e6 < counts["pose_controlnet"] < 365e6 and 355e6 < counts["background_controlnet"] < 365e6
    assert 300e6 < counts["image_encoder"] < 308e6
    result = CliRunner().invoke(app, ["model-info", "--config", "sd-image-variations", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["unet"] == counts["unet"]


def test_condition_dropout_is_per_sample():
    torch.manual_seed(3)
    model = DisCoModel.from_architecture("tiny", variant="finetune", reference_dropout=0.5, background_dropout=0.5,
                                         pose_dropout=0.5)
    batch = 64
    reference = torch.randn(batch, 257, 32)
    background = torch.randn(batch, 4, 8, 8)
    pose = torch.rand(batch, 3, 64, 64)
    ref, bg, po = model.drop_conditions(reference, background, pose, generator=torch.Generator().manual_seed(0))
    empty = model.unconditional_reference(1)[0]
    dropped_ref = torch.tensor([torch.allclose(r, empty) for r in ref])
    kept_ref = torch.tensor([torch.equal(r, o) for r, o in zip(ref, reference)])
    assert (dropped_ref ^ kept_ref).all()
    assert 10 < dropped_ref.sum() < 54  # per sample, not all-or-nothing
    dropped_bg = bg.flatten(1).abs().sum(1) == 0
    assert 10 < dropped_bg.sum() < 54 and torch.equal(bg[~dropped_bg], background[~dropped_bg])
    dropped_pose = po.flatten(1).sum(1) == 0
    assert 10 < dropped_pose.sum() < 54
    # Default probability 0.05 for the reference, none for pose and background.
    default = DisCoModel.from_architecture("tiny", variant="pretrain")
    assert (default.config.reference_dropout, default.config.pose_dropout) == (0.05, 0.0)


def test_the_trainers_dropout_draws_stay_on_the_host_when_ddp_moves_the_inputs():
    """DDP moves every tensor argument of the objective to the GPU; the dropout uniforms are read
    on the host, so the trainer hands them over as a NumPy array, which DDP leaves alone (reading
    them back from a GPU stalled every micro-batch three times). ``meta`` stands in for the GPU,
    where ``.cpu()`` would fail; the decisions equal those from a tensor of the same draws."""
    import numpy as np
    from torch.distributed.utils import _recursive_to  # what DDP's forward applies to its inputs

    from disco.train.objective import sample_draws
    from disco.train.temporal import clip_draws

    draws = clip_draws(sample_draws(torch.arange(8), 0, (4, 8, 8), 1000, "cpu"), 2)
    (moved,) = _recursive_to(draws, torch.device("meta"), False)
    assert moved["noise"].device.type == "meta" and isinstance(moved["uniforms"], np.ndarray)
    assert (moved["uniforms"][0::2] == moved["uniforms"][1::2]).all()  # one draw per clip of 2 frames
    model = DisCoModel.from_architecture("tiny", variant="finetune", reference_dropout=0.5, background_dropout=0.5,
                                         pose_dropout=0.5)
    reference, background, pose = torch.randn(8, 257, 32), torch.randn(8, 4, 8, 8), torch.rand(8, 3, 64, 64)
    host = model.drop_conditions(reference, background, pose, uniforms=moved["uniforms"])
    tensor = model.drop_conditions(reference, background, pose, uniforms=torch.from_numpy(moved["uniforms"]))
    assert all(torch.equal(a, b) for a, b in zip(host, tensor))
    assert (host[1].flatten(1).abs().sum(1) == 0).any()  # some background dropped at p = 0.5 over 8 samples


def test_a_dropped_reference_trains_the_projection_on_the_zero_image():
    """Official CFG training: the zero image's CLIP tokens go through the trainable projection with
    gradient, so a batch whose every reference is dropped still moves the projection."""
    torch.manual_seed(5)
    model = DisCoModel.from_architecture("tiny", variant="pretrain", reference_dropout=1.0)
    model.set_trainable()
    reference = torch.randn(2, 257, 32)  # kept references would be these; every one is dropped
    tokens, _, _ = model.drop_conditions(reference, torch.zeros(2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tokens, model.unconditional_reference(2).detach())
    tokens.square().sum().backward()
    grad = model.reference_projection.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image_encoder.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = DisCoModel.from_architecture("tiny", variant="finetune")
    with torch.no_grad():  # move the zero convolutions so gradients reach every branch
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model.set_trainable()
    sample, timestep, reference, background, pose = _inputs(model)
    reference, background = reference.detach(), background.detach()

    def grads():
        model.zero_grad()
        model(sample, timestep, reference, background, pose).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_memory_savings(gradient_checkpointing=True)
    model.train()
    assert model.unet.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_forward_stays_close_to_float32(tiny):
    sample, timestep, reference, background, pose = _inputs(tiny)
    with torch.no_grad():
        full = tiny(sample, timestep, reference, background, pose)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = tiny(sample, timestep, reference, background, pose)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().mean() < 0.05 * full.abs().mean()


def test_a_runs_base_model_is_read_from_its_config(tmp_path):
    """What the checkpoint format needs of a run's config.yaml: the base model, its seed and the
    stage, read as the trainer reads the file (dashed keys too)."""
    import yaml

    from disco.model.checkpoint import ModelSource
    from disco.pipeline.errors import ConfigError
    from disco.train.config import TrainConfig

    cfg = TrainConfig(stage="pretrain", model="tiny", seed=5, model_seed=3, output=str(tmp_path / "run"))
    cfg.save(tmp_path / "run")
    assert ModelSource.of_run(tmp_path / "run") == (ModelSource(model="tiny", pretrained=None, seed=3), "pretrain")
    assert ModelSource.of(cfg) == ModelSource(model="tiny", seed=3)
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "seed": 7, "model-seed": None}))
    assert ModelSource.of_run(tmp_path / "edited") == (ModelSource(model="tiny", seed=7), "finetune")
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        ModelSource.of_run(tmp_path)
    # A run whose base model folder is not on this machine: said, with the line to change.
    from disco.model.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_name, load_model

    moved = tmp_path / "moved"
    TrainConfig(stage="finetune", pretrained=str(tmp_path / "gone" / "sd-image-variations"),
                output=str(moved)).save(moved)
    (moved / checkpoint_name(2)).mkdir()
    (moved / checkpoint_name(2) / WEIGHTS_FILE).write_bytes(b"")
    (moved / checkpoint_name(2) / STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match=r"base model .*gone.* \(`pretrained` in its config.yaml\) is not on this"):
        load_model(moved)


def test_a_hap_checkpoint_of_the_earlier_trainable_set_still_loads(tmp_path):
    """HAP checkpoints written while the Transformer2D wrappers (norm, proj_in, proj_out) trained
    too hold those tensors besides today's set: they load whole (generate, evaluate, --init-from)."""
    from safetensors.torch import save_file

    from disco.model.checkpoint import legacy_hap_names, load_model
    from disco.train.config import TrainConfig

    TrainConfig(stage="pretrain", model="tiny", seed=0, output=str(tmp_path / "run")).save(tmp_path / "run")
    torch.manual_seed(0)
    model = DisCoModel.from_architecture("tiny", variant="pretrain")
    old = {n: p.detach() + 0.5 for n, p in model.named_parameters()
           if not n.startswith(("vae.", "image_encoder.")) and not (n.startswith("unet.") and ".attentions." not in n)}
    wrappers = set(old) - set(model.trainable_parameters())
    assert wrappers and all(".proj_in." in n or ".proj_out." in n or ".norm." in n for n in wrappers)
    assert legacy_hap_names(model, old) == wrappers
    checkpoint = tmp_path / "run" / "checkpoint-00000002"
    checkpoint.mkdir()
    save_file({n: t.contiguous() for n, t in old.items()}, str(checkpoint / "trainable.safetensors"))
    (checkpoint / "state.json").write_text(json.dumps({"step": 2}))
    loaded = load_model(tmp_path / "run")
    for name in sorted(wrappers)[:3] + sorted(set(old) - wrappers)[:3]:
        assert torch.equal(loaded.get_parameter(name), old[name]), name
    # Anything else left over is still refused.
    assert legacy_hap_names(model, {**old, "unet.conv_in.weight": old[next(iter(old))]}) == set()


def test_a_run_knows_its_base_weights_by_content_not_by_path(tiny, tmp_path):
    """The frozen parts (and HAP's UNet ResNets) are not in a run's checkpoints: they are rebuilt
    from its --pretrained folder. Another revision put at that path gave another model with
    nothing said; a copy of the same folder at another path (another machine's mount) was refused
    as "another base model" by --init-from. Now the run records the weights' digest when it starts:
    generate / evaluate (``load_model``), a resume and --init-from go by it."""
    import shutil

    from disco.model.checkpoint import base_weights_digest, load_model, save_checkpoint
    from disco.pipeline.errors import ConfigError
    from disco.train.config import TrainConfig
    from disco.train.launch import resolve

    folder = tmp_path / "sd-iv"
    for name in ("unet", "vae", "image_encoder"):
        getattr(tiny, name).save_pretrained(folder / name)
    digest = base_weights_digest(folder)
    elsewhere = shutil.copytree(folder, tmp_path / "mounted-elsewhere")
    assert base_weights_digest(elsewhere) == digest
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant the model does not read")
    assert base_weights_digest(folder) == digest
    data = tmp_path / "data"
    (data / "triplets").mkdir(parents=True)
    run = tmp_path / "hap"
    cfg, _ = resolve(TrainConfig(stage="pretrain", pretrained=str(folder), data=[str(data)], output=str(run)))
    assert cfg.pretrained_digest == digest
    cfg.save(run)
    save_checkpoint(run, 1, DisCoModel.from_sd_image_variations(folder, variant="pretrain"), {},
                    {"positions": [0], "skipped": 0}, None, keep=1)
    load_model(run)
    # A fine-tuning run from it on the copy at another path: the same base.
    finetune = TrainConfig(stage="finetune", pretrained=str(elsewhere), init_from=str(run), data=[str(data)],
                           output=str(tmp_path / "ft"))
    assert resolve(finetune)[0].pretrained_digest == digest
    # Another revision of the UNet at the run's path: refused by generate / evaluate, the resume,
    # and a fine-tuning run from the HAP run.
    other = copy.deepcopy(tiny.unet)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(folder / "unet")
    with pytest.raises(ConfigError, match=f"{folder} is not the base model {run} was trained on"):
        load_model(run)
    with pytest.raises(ConfigError, match="--resume: .* is not the base model"):
        resolve(TrainConfig(output=str(run), resume=True, max_steps=5), given={"max_steps"})
    with pytest.raises(ConfigError, match="was trained on another base model"):
        resolve(TrainConfig(stage="finetune", pretrained=str(folder), init_from=str(run), data=[str(data)],
                            output=str(tmp_path / "ft2")))
    # A new run started from a copy of the HAP run's config.yaml (a template, as the README
    # suggests) on other weights records its own folder's digest, not the one the YAML carried.
    fresh = TrainConfig.from_yaml(run / "config.yaml").updated(
        {"pretrained": str(folder), "output": str(tmp_path / "again"), "init_from": None, "data": [str(data)]})
    assert fresh.pretrained_digest == digest and resolve(fresh)[0].pretrained_digest == base_weights_digest(folder) != digest
    # Put back as it was: loads again (the digest is of the weights, not of when they were written).
    shutil.rmtree(folder / "unet")
    shutil.copytree(elsewhere / "unet", folder / "unet")
    load_model(run)
