"""The per-GPU memory plan of a training run, computed before anything is allocated
(``disco-cli train --dry-run``).

What the trainer keeps (train/loop.py): the whole model on the GPU in fp32 (frozen VAE and CLIP
included; autocast casts per op), fp32 gradients, AdamW's two fp32 states (PyTorch's default
multi-tensor implementation on a GPU) and an fp32 EMA copy on the GPU with ``--ema-decay``. With
several workers the gradients are views into DDP's all-reduce buckets, which stay allocated as
long as DDP does: they are counted for the whole step (one worker's gradients exist from the
backward to the update). These are counted from the model's parameters (built on
the meta device: no weight is allocated), and so is the update (every gradient alive, plus the
square-root copy of the second moments the multi-tensor AdamW makes).

Activations and every other tensor of the forward and backward are not estimated by hand: the
step is *run* on the meta device -- the trainer's own ``DiffusionObjective`` forward (VAE
encodings under no_grad, CLIP reference tokens, both ControlNets and the UNet, the MSE) and its
backward -- while a dispatch mode adds up the bytes of every tensor storage alive at each moment
(a storage counts from the op that creates it until its last reference goes, as the CUDA caching
allocator's "allocated" bytes do).

Meta tensors have no CUDA autocast, so the step runs under an emulation of it that follows
PyTorch's autocast op reference (the ops cast to the lower precision, those cast to float32,
those promoted to the widest type, and the cast cache of trainable weights for the forward);
``scaled_dot_product_attention`` runs as the fused flash kernel (output and log-sum-exp saved,
no attention matrix), as it does on the GPU. Gradient checkpointing is diffusers' own
(non-reentrant ``torch.utils.checkpoint``), so only the checkpoint inputs stay alive and each
block is recomputed inside the backward: the measurement sees both.

On top of the allocator's peak comes an allowance the allocator does not see: the CUDA context
and the cuBLAS / cuDNN workspaces (``CUDA_CONTEXT_GIB``) and fragmentation of the caching
allocator (``fragmentation(cfg)`` of the peak).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from disco.pipeline.errors import ConfigError
from disco.train.config import TrainConfig
from disco.train.meta_step import adamw_temporaries, block_bytes, measure_step, meta_model

GIB = 1024 ** 3
# Not seen by PyTorch's allocator: the CUDA context (about 0.5 GiB on an H100 with lazy module
# loading) and the cuBLAS / cuDNN workspaces.
CUDA_CONTEXT_GIB = 1.0
# NCCL's communicator buffers with several workers, also outside the allocator: 0.5-0.7 GiB a
# communicator reported (NVIDIA/nccl issue 964), more with NVLS on NVSwitch nodes.
NCCL_BUFFERS_GIB = 0.5
# The caching allocator reserves more than is allocated (block rounding, split blocks), much more
# when gradient checkpointing frees and re-allocates every block's activations in the backward.
# Measured with benchmarks/gpu_suite.py, full size, bf16, batch 32, 2026-11-26: with checkpointing
# 14 % (H200, fine-tuning: 31.3 GiB allocated, 35.6 reserved) and 30 % (H100, HAP: 15.6 / 20.3);
# without, 2 % (H100, fine-tuning: 40.1 / 40.8).
FRAGMENTATION = 0.15
FRAGMENTATION_CHECKPOINTING = 0.30
DEFAULT_GPU_GIB = 80.0

# Measured steps of this process, by what a step depends on (``_step_key``): a step of the full
# model takes seconds on the meta device, and plans that differ only in what the step does not
# see (EMA, how many workers beyond two, the GPU's size) or a search that comes back to a batch reuse it.
_MEASURED: dict[tuple, dict] = {}


def _step_key(cfg: TrainConfig, batch: int, device: str) -> tuple:
    """The architecture (a ``--pretrained`` folder's configurations as they are now), the stage,
    picture size, precision, checkpointing, whether gradients accumulate, whether they are DDP's
    buckets, the batch and the device whose autocast rules apply: everything ``measure_step`` reads."""
    folder = Path(cfg.pretrained) if cfg.pretrained else None
    configs = tuple((folder / part / "config.json").read_text() if (folder / part / "config.json").exists() else None
                    for part in ("unet", "vae", "image_encoder")) if folder else ()
    return (cfg.model, configs, cfg.stage, cfg.resolution, cfg.mixed_precision, cfg.gradient_checkpointing,
            min(cfg.grad_accum, 2), cfg.num_workers > 1, batch, device, cfg.clip_frames if cfg.stage == "temporal" else 1)


def _measured_step(model, cfg: TrainConfig, batch: int, device: str) -> dict:
    key = _step_key(cfg, batch, device)
    if key not in _MEASURED:
        _MEASURED[key] = measure_step(model, cfg, batch, device)
    return dict(_MEASURED[key])
# -- the plan ---------------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """Per-GPU bytes of a training run; ``lines`` (label, bytes, how) add up to ``total``."""

    stage: str
    base: str
    batch_size: int
    resolution: int
    mixed_precision: str
    gradient_checkpointing: bool
    ema: bool
    grad_accum: int
    num_workers: int
    device: str
    trainable_params: int
    frozen_params: int
    lines: list[tuple[str, int, str]] = field(default_factory=list)
    total: int = 0
    gpu_memory: int = 0  # what one worker has: the GPU's memory, or its share where workers share one
    workers_per_gpu: int = 1  # --gpus-per-worker below 1: workers on one GPU, each with a whole model
    fits: bool = True
    max_batch: int | None = None  # None: not searched
    per_sample: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["lines"] = [{"item": label, "bytes": n, "how": how} for label, n, how in self.lines]
        out["GiB"] = {label: n / GIB for label, n, _ in self.lines}
        out["total_GiB"] = self.total / GIB
        out["gpu_memory_GiB"] = self.gpu_memory / GIB
        return out


def workers_per_gpu(cfg: TrainConfig) -> int:
    """Workers Ray puts on one GPU: ``--gpus-per-worker`` below 1 packs 1 / share of them (as many
    as there are), each with its own model, optimizer, CUDA context: a plan per worker must fit
    its part of the GPU, not the whole."""
    if not cfg.use_gpu or cfg.gpus_per_worker >= 1:
        return 1
    return max(1, min(cfg.num_workers, int(1 / cfg.gpus_per_worker + 1e-9)))


def fragmentation(cfg: TrainConfig) -> float:
    """The caching allocator's share on top of the allocated peak, for ``cfg``'s step."""
    return FRAGMENTATION_CHECKPOINTING if cfg.gradient_checkpointing else FRAGMENTATION


def context_gib(cfg: TrainConfig) -> float:
    """What a training process holds on its GPU outside PyTorch's allocator: the CUDA context, and
    with several workers NCCL's communicator buffers (half a GiB to over one, by NCCL version and
    topology; not with workers sharing a GPU, which talk over gloo)."""
    nccl = cfg.num_workers > 1 and workers_per_gpu(cfg) == 1
    return CUDA_CONTEXT_GIB + (NCCL_BUFFERS_GIB if nccl else 0.0)


def _allowance(allocated: int, device: str, share: float, context: float = CUDA_CONTEXT_GIB) -> int:
    if device != "cuda":
        return 0
    return int(context * GIB + share * allocated)


def memory_plan(cfg: TrainConfig, gpu_memory_gib: float | None = None, device: str = "cuda",
                search: bool = True) -> MemoryPlan:
    """The per-GPU memory of training ``cfg`` (``device`` "cuda": what the trainer does on a GPU;
    "cpu": its CPU run, without the CUDA allowance), and the largest per-GPU batch that fits
    ``gpu_memory_gib`` (default: the visible GPU's memory, else 80 GiB)."""
    cfg.validate_model()  # the stage's default batch, the preset's accumulation
    if gpu_memory_gib is None:
        gpu_memory_gib = visible_gpu_gib() or DEFAULT_GPU_GIB
    model = meta_model(cfg)
    model.set_trainable()
    if cfg.gradient_checkpointing:
        model.enable_memory_savings(gradient_checkpointing=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    weights_trainable, weights_frozen = block_bytes(trainable), block_bytes(frozen) + block_bytes(model.buffers())
    grads = block_bytes(trainable)
    ema = grads if cfg.ema_decay else 0
    # Several workers: the gradients are DDP's buckets (DDP_OPTIONS in train/loop.py), allocated for
    # as long as DDP lives; the step measured accumulates into them (measure_step). One worker: they
    # exist from the backward to the update, inside the step's peak and the update's.
    buckets = grads if cfg.num_workers > 1 else 0
    static = weights_trainable + weights_frozen + ema + buckets

    states = 2 * block_bytes(trainable)
    update = grads - buckets + adamw_temporaries(trainable, foreach=device == "cuda")

    def allocated(step: dict) -> int:
        """Weights, EMA and buckets, AdamW states, and the larger of the forward/backward peak
        and the update's (every gradient alive, plus AdamW's temporaries)."""
        return static + states + max(step["peak"], update)

    step = _measured_step(model, cfg, cfg.batch_size, device)
    precision = {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[cfg.mixed_precision]
    plan = MemoryPlan(
        stage=cfg.stage, base=cfg.pretrained or cfg.model, batch_size=cfg.batch_size, resolution=cfg.resolution,
        mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
        ema=bool(cfg.ema_decay), grad_accum=cfg.grad_accum, num_workers=cfg.num_workers, device=device,
        trainable_params=sum(p.numel() for p in trainable), frozen_params=sum(p.numel() for p in frozen),
        gpu_memory=int(gpu_memory_gib * GIB / workers_per_gpu(cfg)), workers_per_gpu=workers_per_gpu(cfg),
    )
    transients = max(step["peak"], update) - (grads - buckets) - step["activations"]
    plan.lines = [
        ("weights, trainable", weights_trainable, f"{plan.trainable_params / 1e6:,.1f} M params, fp32"),
        ("weights, frozen", weights_frozen, f"{plan.frozen_params / 1e6:,.1f} M params (VAE, CLIP"
         f"{', UNet ResNets' if cfg.stage == 'pretrain' else ''}"
         f"{', the image model' if cfg.stage == 'temporal' else ''}), fp32"),
        ("gradients", grads, "fp32, DDP's all-reduce buckets, allocated for the whole run" if buckets
         else "fp32, from the backward to the update"),
        ("AdamW states", states, "exp_avg + exp_avg_sq, fp32"),
        ("EMA", ema, "fp32 copy of the trainable weights" if ema else "off"),
    ]
    plan.lines += [
        (f"activations (batch {cfg.batch_size}"
         f"{f' clips x {cfg.clip_frames} frames' if cfg.stage == 'temporal' else ''})", step["activations"],
         f"measured, {precision}" + (", checkpointing" if cfg.gradient_checkpointing else "")),
        ("backward / update transients", transients, "step peak - gradients - activations"),
    ]
    total = allocated(step)
    allowance = _allowance(total, device, fragmentation(cfg), context_gib(cfg))
    if allowance:
        nccl = f" + {NCCL_BUFFERS_GIB:g} GiB NCCL" if context_gib(cfg) > CUDA_CONTEXT_GIB else ""
        plan.lines.append(("CUDA context + allocator", allowance,
                           f"{CUDA_CONTEXT_GIB:g} GiB{nccl} + {fragmentation(cfg):.0%} fragmentation"))
    plan.total = total + allowance
    plan.fits = plan.total <= plan.gpu_memory
    if search:
        plan.max_batch, plan.per_sample = _largest_batch(model, cfg, device, plan.gpu_memory, static + states, update,
                                                         step)
    return plan


def _largest_batch(model, cfg, device, budget: int, fixed: int, update: int, step: dict) -> tuple[int, int]:
    """The largest batch whose plan fits ``budget``, and the bytes each sample adds there.

    The plan at batch b is ``fixed + max(peak(b), update)`` plus the allowance, where ``peak`` is
    the measured forward + backward peak: a maximum of lines in b (at small batches the peak is
    where every gradient is alive, at large ones where the activations are, growing with the
    batch). So the line is drawn through two measurements near the answer: a first guess from the
    activations per sample, and three quarters of it; if the answer lands far from them, once
    more through the answer and its nearer neighbour."""
    context, factor = (context_gib(cfg) * GIB, 1 + fragmentation(cfg)) if device == "cuda" else (0, 1.0)
    room = int((budget - context) / factor) - fixed  # what the step's peak may reach
    if room < update:
        return 0, 0
    peaks = {cfg.batch_size: step["peak"]}

    def peak(b: int) -> int:
        if b not in peaks:
            peaks[b] = _measured_step(model, cfg, b, device)["peak"]
        return peaks[b]

    per_sample = max(1, step["activations"] // cfg.batch_size)
    high = max(2, cfg.batch_size + (room - step["peak"]) // per_sample)
    low = max(1, high * 3 // 4)
    if low == high:
        low = high - 1
    answer, slope = high, per_sample
    for _ in range(2):
        slope = max(1, (peak(high) - peak(low)) // (high - low))
        answer = max(0, high + (room - peak(high)) // slope)
        if low <= answer <= high + high // 4 or answer < 1:
            break
        low, high = sorted((answer, min((high, low), key=lambda b: abs(b - answer))))
        if low == high:
            break
    return int(answer), int(slope)


def visible_gpu_gib() -> float | None:
    """Total memory of the visible CUDA GPU (the first), or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


# -- printing -----------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def plan_table(plan: MemoryPlan):
    """The plan as a rich table."""
    from rich.table import Table

    checkpointing = "gradient checkpointing" if plan.gradient_checkpointing else "no gradient checkpointing"
    title = (f"memory per {'worker' if plan.workers_per_gpu > 1 else 'GPU'}: {plan.stage} on {plan.base}, {plan.resolution} px, batch {plan.batch_size}"
             f" x {plan.grad_accum} accumulation, {plan.mixed_precision if plan.mixed_precision != 'no' else 'fp32'}, "
             f"{checkpointing}")
    table = Table(title=title)
    table.add_column("item")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for label, n, how in plan.lines:
        table.add_row(label, _gib(n), how)
    shared = (f" (1/{plan.workers_per_gpu} of a {plan.gpu_memory * plan.workers_per_gpu / GIB:g} GiB GPU: "
              f"--gpus-per-worker puts {plan.workers_per_gpu} workers on one)" if plan.workers_per_gpu > 1 else "")
    who = "per worker" if plan.workers_per_gpu > 1 else "per GPU"
    table.add_row(f"[bold]total {who}[/bold]", f"[bold]{_gib(plan.total)}[/bold]",
                  f"{'fits' if plan.fits else 'does NOT fit'} in {plan.gpu_memory / GIB:g} GiB{shared}")
    if plan.max_batch:
        table.add_row(f"largest batch {who}", str(plan.max_batch),
                      f"in {plan.gpu_memory / GIB:g} GiB, {plan.per_sample / GIB:.3f} GiB per sample")
    elif plan.max_batch == 0:
        table.add_row(f"largest batch {who}", "none",
                      f"no batch fits in {plan.gpu_memory / GIB:g} GiB")
    return table



# -- the command line ---------------------------------------------------------------------------------

def plan_config(cfg: TrainConfig, given: set[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """``cfg`` checked for what a plan needs (the base model, the batch shape, the precision),
    and notes on what a real run would still refuse: the plan reads no data and writes nothing,
    so a missing ``--data`` or ``--output`` is a note, not an error. With ``--resume`` the run's
    saved configuration is planned, with what of ``given`` (the options set) a resume takes."""
    from disco.train.config import RUN_CONFIG_FILE, init_run, load_run_config

    notes = []
    resumed = cfg.resume
    if resumed:
        if not cfg.output or not (Path(cfg.output) / RUN_CONFIG_FILE).exists():
            raise ConfigError(f"--resume: {cfg.output or '(no --output)'} is not a training run (no {RUN_CONFIG_FILE})")
        from disco.train.launch import resume_changes

        saved = load_run_config(cfg.output)
        # As the resume itself takes them: a --batch-size it refuses is refused here too.
        cfg = saved.updated({**resume_changes(cfg, saved, given), "resume": True})
        notes.append(f"planned from the saved configuration of {cfg.output}")
    source = init_run(cfg.init_from) if cfg.init_from else None  # a run or one checkpoint of it
    if cfg.stage == "temporal" and source:
        init = load_run_config(source)  # the base of the image model it starts from, and its size
        if cfg.model is None and cfg.pretrained is None:
            cfg = cfg.updated({"model": init.model, "pretrained": init.pretrained})
        if cfg.resolution == TrainConfig.resolution and not resumed:  # as the run takes it (launch.resolve)
            cfg = cfg.updated({"resolution": init.resolution})
    cfg.validate_model()
    if not cfg.data and not cfg.resume:
        notes.append("no --data given: a real run needs at least one (the plan does not read data)")
    for folder in cfg.data:
        if not (Path(folder) / "triplets").is_dir():
            notes.append(f"--data {folder} holds no triplets/ folder: a real run would stop there")
    if not cfg.output:
        notes.append("no --output given: a real run needs one")
    # (A resumed run's saved --init-from is the checkpoint folder it pinned when it started.)
    if cfg.init_from and not resumed and not source:
        notes.append(f"--init-from {cfg.init_from} is not a training run: a real run would stop there")
    if cfg.mixed_precision != "no" and not cfg.use_gpu:
        notes.append(f"planned for a GPU (--mixed-precision {cfg.mixed_precision} under CUDA autocast); "
                     "this run has no --use-gpu")
    return cfg, notes


def host_build_bytes(cfg: TrainConfig) -> int:
    """Host memory the model takes while it is built (every weight once in fp32; with
    ``--init-from``, the HAP model and the base UNet, which then make up the fine-tuning model, until
    the run's first checkpoint: a resumed run builds from the base)."""
    from disco.model.checkpoint import list_checkpoints

    if cfg.stage == "finetune" and cfg.init_from and not (cfg.resume and cfg.output and list_checkpoints(cfg.output)):
        hap = meta_model(cfg, "pretrain")
        return block_bytes(hap.parameters()) + block_bytes(hap.buffers()) + block_bytes(hap.unet.parameters())
    model = meta_model(cfg)
    return block_bytes(model.parameters()) + block_bytes(model.buffers())


def host_checkpoint_bytes(plan: MemoryPlan) -> int:
    """Host memory of the copy rank 0 takes of a checkpoint while a thread writes it (train/
    checkpoint_writer.py): the plan's trainable weights in fp32, AdamW's two moments, the EMA weights."""
    return sum(n for label, n, _ in plan.lines if label in ("weights, trainable", "AdamW states", "EMA"))
