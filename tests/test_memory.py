"""Memory: every weight built once (the model on the meta device, weights assigned into it), and
the per-GPU memory plan of ``disco-cli train --dry-run`` against what a CPU run really takes."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from typer.testing import CliRunner

from disco.model.configs import CONFIGS
from disco.model.disco import DisCoModel
from disco.model.checkpoint import ModelSource, base_model, save_checkpoint
from disco.train.config import TrainConfig

MIB = 1024 ** 2
ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_plan_benchmark", ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The CPU training runs the plan is checked against (model, stage, batch, resolution, precision,
# checkpointing).
CPU_RUNS = [("tiny", "finetune", 4, 128, "no", False), ("small", "finetune", 2, 128, "no", False)]


@pytest.fixture(scope="module", autouse=True)
def fresh_processes(request, tmp_path_factory):
    """The measurements that need a fresh process each (peak resident memory) start with the
    module: single-threaded, they run beside the tests before the ones that read them, whose meta
    steps are single-threaded Python too, so both cores work. Started only for the tests selected."""
    selected = {item.name for item in request.session.items if getattr(item, "module", None) is request.module}
    started = {}
    try:  # a failed start (setup error) stops the processes started before it too
        if "test_plan_is_within_a_quarter_of_what_a_cpu_run_takes" in selected:
            bench = _benchmark()
            started["cpu_runs"] = [bench.start(*case, steps=2, threads=1) for case in CPU_RUNS]
        if "test_building_the_finetune_model_from_hap_holds_each_weight_once" in selected:
            started["build"] = _start_build(tmp_path_factory.mktemp("hap") / "hap")
        yield started
    finally:
        for process in [*started.get("cpu_runs", []), started.get("build")]:
            if process is not None and process.returncode is None:  # never read: stop it, close its pipes
                process.kill()
                process.communicate()


# -- one copy of every weight ---------------------------------------------------------------------------

def _plain_cpu_build(name: str, variant: str) -> dict[str, torch.Tensor]:
    """The state dict of the model as it was built before construction moved to the meta device:
    every module drawn on the CPU, the ControlNets by diffusers' ``from_unet`` (a random
    ControlNet, then the UNet's blocks copied over it)."""
    arch = copy.deepcopy(CONFIGS[name])
    unet = UNet2DConditionModel.from_config(arch["unet"])
    vae = AutoencoderKL.from_config(arch["vae"])
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch["image_encoder"]))
    projection = nn.Linear(clip.config.hidden_size, clip.config.projection_dim, bias=False)
    background = ControlNetModel.from_unet(unet)
    conv = nn.Conv2d(unet.config.in_channels, unet.config.block_out_channels[0], kernel_size=3, padding=1)
    with torch.no_grad():
        projection.weight.copy_(clip.visual_projection.weight)
        conv.weight.copy_(unet.conv_in.weight)
        conv.bias.copy_(unet.conv_in.bias)
    background.controlnet_cond_embedding = conv
    pose = ControlNetModel.from_unet(unet) if variant == "finetune" else None
    parts = {"unet": unet, "vae": vae, "image_encoder": clip, "reference_projection": projection,
             "background_controlnet": background, "pose_controlnet": pose}
    return {f"{part}.{k}": v for part, module in parts.items() if module is not None
            for k, v in module.state_dict().items()}


def _assert_same(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("variant", ["pretrain", "finetune"])
def test_seeded_weights_and_random_stream_are_those_of_a_plain_cpu_build(variant):
    torch.manual_seed(5)
    expected = _plain_cpu_build("tiny", variant)
    expected_rng = torch.get_rng_state()
    torch.manual_seed(5)
    model = DisCoModel.from_architecture("tiny", variant=variant)
    _assert_same(model.state_dict(), expected)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert not any(t.is_meta for t in model.state_dict().values())


def test_finetune_from_hap_takes_the_weights_and_keeps_the_random_stream():
    torch.manual_seed(2)
    hap = DisCoModel.from_architecture("tiny", variant="pretrain")
    with torch.no_grad():
        for p in hap.trainable_parameters().values():
            p.add_(0.01)
    base_unet = DisCoModel.unet_from_architecture("tiny")
    start = torch.get_rng_state()
    # Before: a whole random fine-tuning model, HAP's weights copied into it, and a ControlNet
    # made by from_unet from the base UNet, all on the CPU and from the global generator.
    _plain_cpu_build("tiny", "finetune")
    pose = ControlNetModel.from_unet(base_unet)
    expected = {**{k: v.clone() for k, v in hap.state_dict().items()},
                **{f"pose_controlnet.{k}": v.clone() for k, v in pose.state_dict().items()}}
    expected_rng = torch.get_rng_state()
    del pose
    torch.set_rng_state(start)
    hap_unet = hap.unet.conv_in.weight
    base_block = base_unet.down_blocks[0].resnets[0].conv1.weight
    model = DisCoModel.finetune_from_hap(hap, base_unet)
    _assert_same(model.state_dict(), expected)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    # Taken, not copied: the same storage.
    assert model.unet.conv_in.weight.data_ptr() == hap_unet.data_ptr()
    assert model.pose_controlnet.down_blocks[0].resnets[0].conv1.weight.data_ptr() == base_block.data_ptr()
    assert all(not p.is_meta for p in model.parameters())


def test_the_base_unet_alone_is_the_base_models_unet():
    from disco.model.checkpoint import base_unet

    cfg = TrainConfig(stage="finetune", model="tiny", model_seed=3)
    _assert_same(base_unet(ModelSource.of(cfg)).state_dict(), base_model(ModelSource.of(cfg), "pretrain").unet.state_dict())


_BUILD = """
import json, os, resource, sys
import torch
import disco.model.disco  # the libraries' own memory is not the build's (checkpoint imports them lazily)
from disco.train.initial import initial_model
from disco.train.config import TrainConfig

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak_rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))

def nbytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

cfg = TrainConfig(stage="finetune", model="small", model_seed=0, seed=0, init_from=sys.argv[1])
torch.manual_seed(0)
before = rss()
model = initial_model(cfg)
peak = peak_rss()  # VmHWM: ru_maxrss keeps the high mark of the parent across fork + exec
print(json.dumps({"taken": peak - before, "model": nbytes(model), "pose": nbytes(model.pose_controlnet),
                  "unet": nbytes(model.unet)}))
"""


def _start_build(run: Path) -> subprocess.Popen:
    """A HAP run (``small``) with one checkpoint, then ``initial_model`` for fine-tuning from it
    in a fresh process (``_BUILD``)."""
    cfg = TrainConfig(stage="pretrain", model="small", model_seed=0, seed=0, output=str(run))
    hap = base_model(ModelSource.of(cfg), "pretrain")
    cfg.save(run)
    save_checkpoint(run, 1, hap, {}, {"positions": [0], "skipped": 0}, None, keep=1)
    del hap
    # Every tensor over 64 KiB in pages of its own, returned when freed: RSS follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return subprocess.Popen([sys.executable, "-c", _BUILD, str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# -- the memory plan --------------------------------------------------------------------------------------

def test_adamw_temporaries_are_what_the_update_allocates():
    from disco.train.meta_step import _LiveBytes, adamw_temporaries

    with torch.device("meta"):
        params = [nn.Parameter(torch.empty(n, 64)) for n in (300, 1000, 50)]
    for p in params:
        p.grad = torch.zeros_like(p)
    for foreach in (True, False):
        optimizer = torch.optim.AdamW(params, foreach=foreach)
        optimizer.step()  # the states
        tracker = _LiveBytes(known=params + [p.grad for p in params]
                             + [s for state in optimizer.state.values() for s in state.values()])
        with tracker:
            optimizer.step()
        assert tracker.peak == pytest.approx(adamw_temporaries(params, foreach), rel=0.01)


def test_plan_lines_add_up_and_follow_the_options():
    from disco.train.memory import GIB, memory_plan

    def plan(**options):
        cfg = TrainConfig(stage="finetune", model="tiny", resolution=64, **{"batch_size": 4, **options})
        return memory_plan(cfg, 80, search=False)

    base = plan(mixed_precision="bf16").as_dict()
    assert sum(line["bytes"] for line in base["lines"]) == base["total"]
    assert base["total_GiB"] == pytest.approx(base["total"] / GIB)
    items = {line["item"]: line["bytes"] for line in base["lines"]}
    model = DisCoModel.from_architecture("tiny")
    trainable = sum(p.numel() for p in model.trainable_parameters().values())
    assert items["gradients"] == pytest.approx(4 * trainable, rel=0.02)
    assert items["AdamW states"] == pytest.approx(8 * trainable, rel=0.02)
    assert items["EMA"] == 0 and plan(mixed_precision="bf16", ema_decay=0.999).as_dict()["GiB"]["EMA"] > 0
    twice = plan(mixed_precision="bf16", batch_size=8).as_dict()
    assert twice["GiB"]["activations (batch 8)"] == pytest.approx(2 * base["GiB"]["activations (batch 4)"], rel=0.2)
    checkpointed = plan(mixed_precision="bf16", gradient_checkpointing=True).as_dict()
    assert checkpointed["GiB"]["activations (batch 4)"] < 0.5 * base["GiB"]["activations (batch 4)"]
    fp32 = plan(mixed_precision="no").as_dict()
    assert fp32["GiB"]["activations (batch 4)"] > 1.3 * base["GiB"]["activations (batch 4)"]
    # Several workers: the gradients are DDP's buckets (train/loop.py's DDP_OPTIONS), alive through
    # the whole step: on top of the forward's activations (the peak without checkpointing), which
    # one worker reaches before its backward makes any gradient. Accumulating micro-batches add
    # nothing: they accumulate into the buckets.
    workers = plan(mixed_precision="bf16", num_workers=2).as_dict()
    assert "buckets" in next(line["how"] for line in workers["lines"] if line["item"] == "gradients")
    assert workers["GiB"]["gradients"] == base["GiB"]["gradients"]
    grown = workers["total"] - base["total"] - 0.5 * GIB  # (NCCL's buffers: below)
    assert 0.5 * items["gradients"] < grown <= 1.16 * items["gradients"], (grown, items["gradients"])
    accumulating = plan(mixed_precision="bf16", num_workers=2, grad_accum=2).as_dict()
    assert accumulating["total"] == pytest.approx(workers["total"], rel=0.02)
    assert sum(line["bytes"] for line in workers["lines"]) == workers["total"]
    # The allowance on top of the allocated peak: the CUDA context, and the caching allocator's
    # share, larger with checkpointing (measured 14-30 % against 2 % without on H100 / H200).
    for options, share in (({}, 0.15), ({"gradient_checkpointing": True}, 0.30)):
        lines = plan(mixed_precision="bf16", **options).as_dict()["lines"]
        allowance = next(line for line in lines if line["item"] == "CUDA context + allocator")
        allocated = sum(line["bytes"] for line in lines) - allowance["bytes"]
        assert allowance["bytes"] == pytest.approx(GIB + share * allocated, rel=1e-6)
        assert f"{share:.0%} fragmentation" in allowance["how"]
    # Several workers: NCCL's communicator buffers too, outside PyTorch's allocator.
    lines = workers["lines"]
    allowance = next(line for line in lines if line["item"] == "CUDA context + allocator")
    allocated = sum(line["bytes"] for line in lines) - allowance["bytes"]
    assert allowance["bytes"] == pytest.approx(1.5 * GIB + 0.15 * allocated, rel=1e-6)
    assert "0.5 GiB NCCL" in allowance["how"]


def test_workers_sharing_a_gpu_each_fit_their_part_of_it():
    """``--gpus-per-worker 0.5``: two workers on one GPU, each with its model, optimizer and CUDA
    context. The plan said a worker's total "fits" the whole GPU (twice that in use); now each
    must fit its half, and the largest batch is a half's."""
    from disco.train.memory import GIB, memory_plan, plan_table

    def plan(**options):
        cfg = TrainConfig(stage="finetune", model="tiny", resolution=64, batch_size=4, mixed_precision="bf16",
                          num_workers=2, **options)
        return memory_plan(cfg, 3)

    alone, shared = plan(), plan(use_gpu=True, gpus_per_worker=0.5)
    assert (alone.workers_per_gpu, shared.workers_per_gpu) == (1, 2)
    # (Workers sharing a GPU talk over gloo: no NCCL buffers.)
    assert shared.total == alone.total - GIB // 2 and shared.gpu_memory == alone.gpu_memory // 2 == int(1.5 * GIB)
    assert 0 < shared.max_batch < alone.max_batch / 2
    from rich.console import Console

    out = Console(width=200, record=True)
    out.print(plan_table(shared))
    text = " ".join(out.export_text().split())
    assert "memory per worker: finetune" in text and "total per worker" in text and "1/2 of a 3 GiB GPU" in text
    # 0.3 of a GPU each: three workers fit on one, but a run of two puts two there.
    cfg = TrainConfig(stage="finetune", model="tiny", use_gpu=True, gpus_per_worker=0.3, num_workers=2)
    assert memory_plan(cfg, 2, search=False).workers_per_gpu == 2


def test_a_step_is_measured_once_for_the_plans_that_share_it(tmp_path, monkeypatch):
    """A step of the full model takes seconds on the meta device: plans that differ only in what
    the step does not see reuse its measurement; a new picture size, or a --pretrained folder
    whose configuration changed, is measured again."""
    import disco.train.memory as memory

    calls = []

    def counted(model, cfg, batch, device="cuda"):
        calls.append((cfg.resolution, batch, cfg.num_workers > 1))
        return {"activations": 1, "peak": 2}

    monkeypatch.setattr(memory, "measure_step", counted)
    monkeypatch.setattr(memory, "_MEASURED", {})
    cfg = TrainConfig(stage="finetune", model="tiny", resolution=64, batch_size=4)
    for options in ({}, {"ema_decay": 0.999}, {"max_steps": 7}, {"num_workers": 2}, {"num_workers": 8}):
        memory.memory_plan(cfg.updated(options), 80, search=False)
    memory.memory_plan(cfg.updated({"resolution": 32}), 80, search=False)
    # DDP's gradients change the step (its buckets are there before it); how many workers does not.
    assert calls == [(64, 4, False), (64, 4, True), (32, 4, False)]
    torch.manual_seed(0)
    tiny = DisCoModel.from_architecture("tiny")
    for part in ("unet", "vae", "image_encoder"):
        getattr(tiny, part).save_pretrained(tmp_path / part)
    folder = TrainConfig(stage="finetune", pretrained=str(tmp_path), resolution=64, batch_size=4)
    memory.memory_plan(folder, 80, search=False)
    memory.memory_plan(folder, 80, search=False)
    assert len(calls) == 4
    unet = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**unet, "attention_head_dim": 8}))
    memory.memory_plan(folder, 80, search=False)
    assert len(calls) == 5


def test_the_largest_batch_fits_and_one_more_sample_in_ten_does_not():
    from disco.train.memory import memory_plan

    cfg = TrainConfig(stage="finetune", model="tiny", resolution=64, batch_size=4, mixed_precision="bf16",
                      gradient_checkpointing=True)
    plan = memory_plan(cfg, 1.5)
    assert plan.max_batch > 4
    assert memory_plan(cfg.updated({"batch_size": plan.max_batch}), 1.5, search=False).fits
    assert not memory_plan(cfg.updated({"batch_size": plan.max_batch * 11 // 10 + 1}), 1.5, search=False).fits


def _cpu_step(objective, batch: int, side: int, precision: str, tracker=None) -> int:
    """One training step's forward and backward on the CPU; the live bytes at the end of the
    forward (with ``tracker`` counting from the first op)."""
    from disco.train.inputs import model_inputs

    def pictures() -> dict:  # the batch's uint8 pictures, gone once the inputs are made (the loop's are on the host)
        out = {n: torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8) for n in ("target", "background", "pose")}
        out["reference"] = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
        out["reference_mask"] = torch.full((batch, 1, 224, 224), 255, dtype=torch.uint8)
        out["background_mask"] = torch.zeros((batch, 1, side, side), dtype=torch.uint8)
        return out

    with tracker if tracker is not None else contextlib.nullcontext():
        inputs = model_inputs(pictures())
        latent = (batch, 4, side // 4, side // 4)
        uniforms = torch.ones(batch, 3)
        uniforms[0, 0] = 0.0
        draws = {"noise": torch.randn(latent), "latent_noise": torch.randn(latent),
                 "timesteps": torch.randint(0, 1000, (batch,)), "uniforms": uniforms}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective(**inputs, **draws)
        del inputs, draws
        activations = tracker.live if tracker is not None else 0
        loss.backward()
        del loss
    return activations


@pytest.mark.parametrize("precision,checkpointing,workers", [("no", False, 1), ("no", True, 1), ("bf16", False, 1),
                                                             ("no", False, 2), ("no", True, 2)])
def test_the_simulated_step_allocates_the_tensors_a_real_cpu_step_does(precision, checkpointing, workers,
                                                                        monkeypatch):
    """The step run on the meta device against the same step on the CPU, both counted tensor by
    tensor (the same live-bytes counter on CPU storages): activations and the forward + backward
    peak agree to a few percent, with the CPU's autocast, with gradient checkpointing, and under
    DDP (``workers`` 2: a real one-rank gloo DDP built as the loop builds it, in its steady state:
    its gradients live in DDP's buckets, zeroed in place by each update; the step counts none of
    them, the plan counts them for the whole step)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from disco.pipeline.cluster import loopback_interface
    from disco.train.loop import DDP_OPTIONS
    from disco.train.objective import DiffusionObjective, zero_gradients
    from disco.train.meta_step import _LiveBytes, measure_step, meta_model

    # Under DDP a small step, where the gradients outweigh the activations (counted in the step, a
    # gradient checkpointing run's peak would be more than twice what the real step holds).
    batch, side = (2, 64) if workers == 1 else (1, 32)
    cfg = TrainConfig(stage="finetune", model="tiny", batch_size=batch, resolution=side, mixed_precision=precision,
                      gradient_checkpointing=checkpointing, num_workers=workers)
    torch.manual_seed(0)
    model = DisCoModel.from_architecture("tiny")
    model.set_trainable()
    model.enable_memory_savings(gradient_checkpointing=checkpointing)
    model.train()
    objective = DiffusionObjective(model)
    params = [p for p in model.parameters() if p.requires_grad]
    buckets = []
    with contextlib.ExitStack() as stack:
        if workers > 1:
            monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback_interface())
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
            zero_gradients(params)
            objective = DistributedDataParallel(objective, **DDP_OPTIONS)
            for _ in range(2):  # DDP rebuilds its buckets at the second step, in the order gradients came
                _cpu_step(objective, batch, side, precision)
                for p in params:
                    p.grad.zero_()  # apply_update(keep_gradients=True)
            buckets = [p.grad for p in params]
            assert len({b.untyped_storage().data_ptr() for b in buckets}) < len(buckets)  # views into buckets
        tracker = _LiveBytes(known=list(model.parameters()) + list(model.buffers()) + buckets, device="cpu")
        activations = _cpu_step(objective, batch, side, precision, tracker)
    model = meta_model(cfg)
    model.set_trainable()
    model.enable_memory_savings(gradient_checkpointing=checkpointing)
    model.train()
    simulated = measure_step(model, cfg, batch, device="cpu")
    assert simulated["activations"] == pytest.approx(activations, rel=0.05)
    assert simulated["peak"] == pytest.approx(tracker.peak, rel=0.05)


def test_dry_run_plans_the_full_model_without_data_or_ray(tmp_path, monkeypatch):
    import disco.pipeline.cluster
    from disco.cli import app

    def no_ray(*args, **kwargs):
        raise AssertionError("the dry run started Ray")

    monkeypatch.setattr(disco.pipeline.cluster, "init_ray", no_ray)

    args = ["train", "--dry-run", "--stage", "finetune", "--model", "sd-image-variations", "--resolution", "256",
            "--batch-size", "32", "--mixed-precision", "bf16", "--gradient-checkpointing", "--gpu-memory", "80",
            "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "total per GPU" in result.output and "largest batch per GPU" in result.output
    assert "holds no triplets/" in result.output
    assert "host memory of a checkpoint while it is written: 17.68 GiB on rank 0's node" in result.output  # 3 x 1.58 B x fp32
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(app, ["train", "--dry-run", "--model", "nope"])
    assert bad.exit_code == 2 and "unknown architecture 'nope' (--model)" in bad.output


@pytest.mark.parametrize("ema_decay", [None, 0.999])
def test_the_checkpoint_copys_host_memory_is_what_a_snapshot_holds(ema_decay):
    """``train --dry-run``'s host memory of a checkpoint being written against the tensors of a
    real snapshot (a fine-tuning model after one AdamW step, its EMA weights)."""
    from disco.model.checkpoint import checkpoint_snapshot
    from disco.train.memory import host_checkpoint_bytes, memory_plan

    cfg = TrainConfig(stage="finetune", model="tiny", ema_decay=ema_decay)
    torch.manual_seed(0)
    model = DisCoModel.from_architecture("tiny")
    model.set_trainable()
    params = dict(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params.values())
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    ema = {n: p.detach() for n, p in params.items()} if ema_decay else None
    snapshot = checkpoint_snapshot(model, {"optimizer": optimizer.state_dict()}, ema)
    tensors = [*snapshot["weights"].values(), *(snapshot["ema"] or {}).values(),
               *(t for state in snapshot["training"]["optimizer"]["state"].values() for t in state.values())]
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert host_checkpoint_bytes(memory_plan(cfg, search=False)) == pytest.approx(held, rel=0.02)


def test_dry_run_reads_a_pretrained_folders_configurations(tmp_path):
    from disco.train.memory import memory_plan

    torch.manual_seed(0)
    tiny = DisCoModel.from_architecture("tiny")
    for part in ("unet", "vae", "image_encoder"):
        getattr(tiny, part).save_pretrained(tmp_path / part)
    common = dict(stage="finetune", resolution=64, batch_size=2)
    ours = memory_plan(TrainConfig(pretrained=str(tmp_path), **common), 80, search=False)
    named = memory_plan(TrainConfig(model="tiny", **common), 80, search=False)
    assert ours.trainable_params == named.trainable_params and ours.frozen_params == named.frozen_params
    assert ours.total == named.total


# -- measured in fresh processes (started with the module: ``fresh_processes``) ------------------

def test_building_the_finetune_model_from_hap_holds_each_weight_once(fresh_processes):
    """Peak resident memory of ``initial_model`` for fine-tuning from a HAP run (``small``, in a
    fresh process) is at most 1.1 x (HAP model + base UNet) + 32 MiB.

    Those two must exist together: every weight of the HAP model goes into the fine-tuning model,
    and the base UNet's down and mid blocks become the pose ControlNet (its up blocks are dropped
    after). Their sum is the fine-tuning model plus the base UNet's unused blocks; 10 % and 32 MiB
    cover the allocator and the one checkpoint tensor being read. The earlier construction (a
    random base model to take its UNet, a random fine-tuning model beside HAP's, a random
    ControlNet under the copy) took about 2.2 x this bound's base.
    """
    process = fresh_processes["build"]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    m = json.loads(stdout.strip().splitlines()[-1])
    hap_bytes = m["model"] - m["pose"]
    needed = hap_bytes + m["unet"]
    bound = 1.1 * needed + 32 * MIB
    assert m["taken"] <= bound, (f"building took {m['taken'] / MIB:.0f} MiB; HAP {hap_bytes / MIB:.0f} MiB + base UNet "
                                 f"{m['unet'] / MIB:.0f} MiB allow {bound / MIB:.0f} MiB")
    assert m["taken"] >= 0.8 * m["model"]  # the measurement sees the model itself


def test_plan_is_within_a_quarter_of_what_a_cpu_run_takes(fresh_processes):
    """The plan's method on a CPU (device="cpu": CPU autocast lists, per-tensor AdamW, no CUDA
    allowance) against the peak resident memory of the same training steps, each in a fresh
    process (benchmarks/memory_plan.py says how it is measured), for ``tiny`` and ``small``.
    fp32: on a CPU without native bf16, oneDNN's bf16 kernels take memory outside PyTorch's
    tensors (the tensors themselves are checked above), and they are slow."""
    bench = _benchmark()
    estimated = [bench.estimate(*case) for case in CPU_RUNS]
    measured = [bench.finish(process) for process in fresh_processes["cpu_runs"]]
    for case, ours, theirs in zip(CPU_RUNS, estimated, measured):
        assert ours == pytest.approx(theirs, rel=0.25), (case[0], theirs / MIB, ours / MIB)
