"""The per-GPU memory plan of a training run, computed before anything is allocated
(``disco-cli train --dry-run``).

What the trainer keeps (train/loop.py): the whole model on the GPU in fp32 (frozen VAE and CLIP
included; autocast casts per op), fp32 gradients, AdamW's two fp32 states (PyTorch's default
multi-tensor implementation on a GPU), an fp32 EMA copy on the GPU with ``--ema-decay``, and with
several workers DDP's gradient buckets. These are counted from the model's parameters (built on
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

import contextlib
import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from disco.model.configs import SCHEDULER
from disco.model.disco import DisCoModel
from disco.pipeline.errors import ConfigError
from disco.train.config import TrainConfig

GIB = 1024 ** 3
# Not seen by PyTorch's allocator: the CUDA context (about 0.5 GiB on an H100 with lazy module
# loading) and the cuBLAS / cuDNN workspaces.
CUDA_CONTEXT_GIB = 1.0
# The caching allocator reserves more than is allocated (block rounding, split blocks), much more
# when gradient checkpointing frees and re-allocates every block's activations in the backward.
# Measured with benchmarks/gpu_suite.py, full size, bf16, batch 32, 2026-11-26: with checkpointing
# 14 % (H200, fine-tuning: 31.3 GiB allocated, 35.6 reserved) and 30 % (H100, HAP: 15.6 / 20.3);
# without, 2 % (H100, fine-tuning: 40.1 / 40.8).
FRAGMENTATION = 0.15
FRAGMENTATION_CHECKPOINTING = 0.30
DEFAULT_GPU_GIB = 80.0
_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 bytes
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "projection_dim")


# -- autocast on the meta device -------------------------------------------------------------------

_T = torch.Tensor
# PyTorch's autocast op reference (docs: "Autocast Op Reference"), CUDA: ops that run in the lower
# precision, ops that run in float32, ops that run in the widest input type.
_LOWER_CUDA = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.prelu,
    torch.prelu, torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__, torch.mm, _T.mm, torch.mv, _T.mv,
    torch.bmm, _T.bmm, torch.baddbmm, _T.baddbmm, torch.addmm, _T.addmm, torch.addbmm, _T.addbmm, torch.addmv,
    _T.addmv, torch.addr, _T.addr, torch.chain_matmul, torch.linalg.multi_dot, torch.einsum,
    F.scaled_dot_product_attention,
}
_FP32_CUDA = {
    torch.acos, torch.asin, torch.cosh, torch.sinh, torch.tan, torch.erfinv, torch.exp, _T.exp, torch.expm1,
    torch.log, _T.log, torch.log10, torch.log2, torch.log1p, torch.reciprocal, _T.reciprocal, torch.rsqrt, _T.rsqrt,
    torch.pow, _T.pow, _T.__pow__, _T.__rpow__, _T.__rtruediv__, _T.__rdiv__, F.softplus, F.group_norm,
    torch.group_norm, F.layer_norm, torch.layer_norm, torch.norm, _T.norm, F.normalize, F.cosine_similarity,
    torch.cdist, torch.dist, torch.pdist, torch.renorm, torch.logsumexp, torch.sum, _T.sum, torch.prod, _T.prod,
    torch.cumsum, _T.cumsum, torch.cumprod, _T.cumprod, F.softmax, torch.softmax, _T.softmax, F.log_softmax,
    torch.log_softmax, _T.log_softmax, F.softmin, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    F.cross_entropy, F.nll_loss, F.kl_div, F.binary_cross_entropy_with_logits, F.poisson_nll_loss,
    F.cosine_embedding_loss, F.hinge_embedding_loss, F.margin_ranking_loss, F.multilabel_margin_loss,
    F.soft_margin_loss, F.triplet_margin_loss, F.multi_margin_loss,
}
_WIDEST = {torch.addcdiv, _T.addcdiv, torch.addcmul, _T.addcmul, torch.atan2, torch.bilinear, torch.cross,
           torch.dot, F.grid_sample, torch.index_put, torch.scatter_add, torch.tensordot}
# CPU autocast (what ``--mixed-precision bf16`` does on a CPU; used to check the method there).
_LOWER_CPU = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.prelu,
    torch.prelu, torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__, torch.mm, _T.mm, torch.bmm, _T.bmm,
    torch.baddbmm, _T.baddbmm, torch.addmm, _T.addmm, torch.addbmm, _T.addbmm, F.scaled_dot_product_attention,
}
_FP32_CPU = {
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.cross_entropy, F.nll_loss, F.kl_div,
    F.binary_cross_entropy_with_logits, F.binary_cross_entropy, F.poisson_nll_loss, F.cosine_embedding_loss,
    F.hinge_embedding_loss, F.margin_ranking_loss, F.multilabel_margin_loss, F.soft_margin_loss,
    F.triplet_margin_loss, F.multi_margin_loss, F.grid_sample, torch.prod, _T.prod, torch.cdist, torch.trace,
    F.avg_pool3d, F.adaptive_avg_pool3d,
}


def _castable(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


class _StepSemantics(TorchFunctionMode):
    """What the GPU does that the meta device would not: autocast (CUDA's or the CPU's op lists,
    with the cast cache of trainable weights while ``forward`` is on) and fused attention."""

    def __init__(self, dtype: torch.dtype | None, device: str):
        super().__init__()
        self.dtype = dtype
        self.lower, self.fp32 = (_LOWER_CUDA, _FP32_CUDA) if device == "cuda" else (_LOWER_CPU, _FP32_CPU)
        self.widest = _WIDEST if device == "cuda" else set()
        self.forward = False
        self._cache: dict[int, torch.Tensor] = {}

    def end_forward(self) -> None:
        self.forward = False
        self._cache.clear()  # autocast empties its cache when the autocast region ends

    @contextlib.contextmanager
    def recomputing(self):
        """A checkpointed block recomputed in the backward: torch.utils.checkpoint enters autocast
        again for it (a fresh cast cache); the backward itself runs outside any function mode."""
        with self:
            self.forward = True
            try:
                yield
            finally:
                self.end_forward()

    def checkpoint_function(self):
        """diffusers' default gradient-checkpointing function (non-reentrant
        ``torch.utils.checkpoint``), with this emulation around each recomputation."""
        from torch.utils.checkpoint import checkpoint

        def run(module, *args):
            return checkpoint(module.__call__, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), self.recomputing()))

        return run

    def _cast(self, value, dtype):
        if not _castable(value) or value.dtype == dtype:
            return value
        if self.forward and value.is_leaf and value.requires_grad:
            key = id(value)
            if key not in self._cache:
                self._cache[key] = value.to(dtype)
            return self._cache[key]
        return value.to(dtype)

    def _map(self, args, kwargs, dtype):
        return (tuple(self._cast(a, dtype) if not isinstance(a, (list, tuple)) else type(a)(self._cast(x, dtype) for x in a)
                      for a in args),
                {k: self._cast(v, dtype) for k, v in kwargs.items()})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None and kwargs.get("dtype") is None:
            if func in self.lower:
                args, kwargs = self._map(args, kwargs, self.dtype)
            elif func in self.fp32:
                args, kwargs = self._map(args, kwargs, torch.float32)
            elif func in self.widest:
                floats = [a.dtype for a in tree_flatten((args, kwargs))[0] if _castable(a)]
                if floats:
                    widest = max(floats, key=lambda d: torch.finfo(d).bits)
                    args, kwargs = self._map(args, kwargs, widest)
        if func is F.scaled_dot_product_attention:
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """Attention as the fused (flash) kernel runs it: only the output and the log-sum-exp are kept
    for the backward. (On the meta device the default would be the unfused math, which keeps the
    whole attention matrix.)"""
    if attn_mask is not None or enable_gqa:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                        scale=scale)
    return out


# -- counting live bytes -----------------------------------------------------------------------------

class _LiveBytes(TorchDispatchMode):
    """Bytes of storages alive on ``device`` (meta by default), and their peak: a storage counts from the op that creates it until its last reference is gone (rounded up as the
    CUDA allocator rounds). Storages of ``known`` tensors (weights) are not counted."""

    def __init__(self, known=(), device: str = "meta"):
        super().__init__()
        self.device = device
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._known = {t.untyped_storage()._cdata for t in known}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == self.device:
                storage = value.untyped_storage()
                key = storage._cdata
                if key in self._refs or key in self._known:
                    continue
                size = -(-storage.nbytes() // _BLOCK) * _BLOCK
                self.live += size
                self.peak = max(self.peak, self.live)
                self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        return out

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._refs.pop(key, None)


# -- the model --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} is missing: expected the diffusers layout unet/, vae/, image_encoder/")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def meta_model(cfg: TrainConfig, variant: str | None = None) -> DisCoModel:
    """The run's model on the meta device (shapes only): ``--model NAME``, or the configurations
    of a ``--pretrained`` folder (``unet/``, ``vae/``, ``image_encoder/`` config.json)."""
    variant = variant or cfg.stage
    with torch.device("meta"):
        if cfg.pretrained:
            folder = Path(cfg.pretrained)
            clip = _read_json(folder / "image_encoder" / "config.json")
            clip = clip.get("vision_config", clip)
            missing = [k for k in CLIP_FIELDS if k not in clip]
            if missing:
                raise ConfigError(f"{folder / 'image_encoder' / 'config.json'} lacks {', '.join(missing)}")
            return DisCoModel(unet_config=_read_json(folder / "unet" / "config.json"),
                              vae_config=_read_json(folder / "vae" / "config.json"),
                              image_encoder_config={k: clip[k] for k in CLIP_FIELDS},
                              scheduler_config=dict(SCHEDULER), variant=variant)
        if cfg.model is None:
            raise ConfigError("give exactly one of --pretrained DIR (sd-image-variations weights) or --model tiny")
        return DisCoModel.from_architecture(cfg.model, variant=variant)


def _bytes(tensors) -> int:
    return sum(-(-t.numel() * t.element_size() // _BLOCK) * _BLOCK for t in tensors)


# -- one training step on the meta device ----------------------------------------------------------------

def _meta_batch(model: DisCoModel, batch: int, resolution: int) -> tuple[dict, dict]:
    """A batch as the trainer feeds it: uint8 pictures moved to the device, then ``model_inputs``;
    the draws (noise, latent noise, timesteps; dropout uniforms stay on the host)."""
    from disco.train.augment import CLIP_SIZE
    from disco.train.inputs import model_inputs
    from disco.model.conditioning import vae_factor

    meta = torch.device("meta")
    pictures = {name: torch.empty(batch, 3, resolution, resolution, dtype=torch.uint8, device=meta)
                for name in ("target", "background", "pose")}
    pictures["reference"] = torch.empty(batch, 3, CLIP_SIZE, CLIP_SIZE, dtype=torch.uint8, device=meta)
    pictures["reference_mask"] = torch.empty(batch, 1, CLIP_SIZE, CLIP_SIZE, dtype=torch.uint8, device=meta)
    inputs = model_inputs(pictures, meta)
    side = resolution // vae_factor(model)
    latent = (batch, model.unet.config.in_channels, side, side)
    uniforms = torch.ones(batch, 3)
    uniforms[0, 0] = 0.0  # one reference dropped, as happens in most batches of 32 or more at p = 0.05
    draws = {"noise": torch.empty(latent, device=meta), "latent_noise": torch.empty(latent, device=meta),
             "timesteps": torch.zeros(batch, dtype=torch.long, device=meta), "uniforms": uniforms}
    return inputs, draws


def measure_step(model: DisCoModel, cfg: TrainConfig, batch: int, device: str = "cuda") -> dict:
    """Run the forward and backward of a training step of ``model`` (on the meta device,
    ``set_trainable`` and checkpointing done) at ``batch``; returns, in bytes, ``activations``
    (alive at the end of the forward of the last micro-batch) and ``peak`` (the peak of the
    forward and backward: activations, gradients, temporaries; weights and AdamW states, which
    exist before the step, are not in it)."""
    from disco.train.loop import DiffusionObjective

    objective = DiffusionObjective(model)
    params = [p for p in model.parameters() if p.requires_grad]
    semantics = _StepSemantics(PRECISIONS[cfg.mixed_precision], device)
    for module in (model.unet, model.background_controlnet, model.pose_controlnet):
        if module is not None and module.is_gradient_checkpointing:
            module.enable_gradient_checkpointing(semantics.checkpoint_function())
    micro_batches = min(cfg.grad_accum, 2)  # from the second on, each one starts with every gradient alive
    tracker = _LiveBytes(known=list(model.parameters()) + list(model.buffers()))
    activations = 0
    try:
        with tracker, semantics:
            for micro in range(micro_batches):
                inputs, draws = _meta_batch(model, batch, cfg.resolution)
                semantics.forward = True
                loss = objective(**inputs, **draws)
                semantics.end_forward()
                del inputs, draws
                if micro == micro_batches - 1:
                    activations = tracker.live - (_grad_bytes(params) if micro else 0)
                (loss / cfg.grad_accum).backward()
                del loss
    finally:
        for p in params:
            p.grad = None
    return {"activations": activations, "peak": tracker.peak}


def step_flops(cfg: TrainConfig, batch: int = 1) -> int:
    """Model FLOPs of one training step at ``batch`` (forward and backward, counted once: without
    gradient checkpointing's recompute), counted by PyTorch's FLOP counter while the trainer's
    objective runs on the meta device. Divided by the batch it is what MFU divides by."""
    from torch.utils.flop_counter import FlopCounterMode

    from disco.train.loop import DiffusionObjective

    model = meta_model(cfg)
    model.set_trainable()
    model.train()
    objective = DiffusionObjective(model)
    counter = FlopCounterMode(display=False)
    with counter:
        inputs, draws = _meta_batch(model, batch, cfg.resolution)
        objective(**inputs, **draws).backward()
    return int(counter.get_total_flops())


def adamw_temporaries(params, foreach: bool) -> int:
    """Bytes AdamW's update allocates besides its states: the multi-tensor (foreach)
    implementation, PyTorch's default on a GPU, makes one square-root copy of every second-moment
    state at once; the per-tensor loop (the CPU default) makes two temporaries of a parameter's
    size while the previous parameter's denominator is still referenced."""
    sizes = [_bytes([p]) for p in params]
    if foreach:
        return sum(sizes)
    return max((2 * size + (sizes[i - 1] if i else 0) for i, size in enumerate(sizes)), default=0)


def _grad_bytes(params) -> int:
    return _bytes(p.grad for p in params if p.grad is not None)


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
    gpu_memory: int = 0
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


def fragmentation(cfg: TrainConfig) -> float:
    """The caching allocator's share on top of the allocated peak, for ``cfg``'s step."""
    return FRAGMENTATION_CHECKPOINTING if cfg.gradient_checkpointing else FRAGMENTATION


def _allowance(allocated: int, device: str, share: float) -> int:
    if device != "cuda":
        return 0
    return int(CUDA_CONTEXT_GIB * GIB + share * allocated)


def memory_plan(cfg: TrainConfig, gpu_memory_gib: float | None = None, device: str = "cuda",
                search: bool = True) -> MemoryPlan:
    """The per-GPU memory of training ``cfg`` (``device`` "cuda": what the trainer does on a GPU;
    "cpu": its CPU run, without the CUDA allowance), and the largest per-GPU batch that fits
    ``gpu_memory_gib`` (default: the visible GPU's memory, else 80 GiB)."""
    if gpu_memory_gib is None:
        gpu_memory_gib = visible_gpu_gib() or DEFAULT_GPU_GIB
    model = meta_model(cfg)
    model.set_trainable()
    if cfg.gradient_checkpointing:
        model.enable_memory_savings(gradient_checkpointing=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    weights_trainable, weights_frozen = _bytes(trainable), _bytes(frozen) + _bytes(model.buffers())
    grads = _bytes(trainable)
    ema = grads if cfg.ema_decay else 0
    buckets = grads if cfg.num_workers > 1 else 0  # DDP's gradient buckets (gradient_as_bucket_view off)
    static = weights_trainable + weights_frozen + ema + buckets

    states = 2 * _bytes(trainable)
    update = grads + adamw_temporaries(trainable, foreach=device == "cuda")

    def allocated(step: dict) -> int:
        """Weights, EMA and buckets, AdamW states, and the larger of the forward/backward peak
        and the update's (every gradient alive, plus AdamW's temporaries)."""
        return static + states + max(step["peak"], update)

    step = measure_step(model, cfg, cfg.batch_size, device)
    precision = {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[cfg.mixed_precision]
    plan = MemoryPlan(
        stage=cfg.stage, base=cfg.pretrained or cfg.model, batch_size=cfg.batch_size, resolution=cfg.resolution,
        mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
        ema=bool(cfg.ema_decay), grad_accum=cfg.grad_accum, num_workers=cfg.num_workers, device=device,
        trainable_params=sum(p.numel() for p in trainable), frozen_params=sum(p.numel() for p in frozen),
        gpu_memory=int(gpu_memory_gib * GIB),
    )
    transients = max(step["peak"], update) - grads - step["activations"]
    plan.lines = [
        ("weights, trainable", weights_trainable, f"{plan.trainable_params / 1e6:,.1f} M params, fp32"),
        ("weights, frozen", weights_frozen, f"{plan.frozen_params / 1e6:,.1f} M params (VAE, CLIP"
         f"{', UNet ResNets' if cfg.stage == 'pretrain' else ''}), fp32"),
        ("gradients", grads, "fp32"),
        ("AdamW states", states, "exp_avg + exp_avg_sq, fp32"),
        ("EMA", ema, "fp32 copy of the trainable weights" if ema else "off"),
    ]
    if buckets:
        plan.lines.append(("DDP gradient buckets", buckets, "fp32, a second copy of the gradients"))
    plan.lines += [
        (f"activations (batch {cfg.batch_size})", step["activations"],
         f"measured, {precision}" + (", checkpointing" if cfg.gradient_checkpointing else "")),
        ("backward / update transients", transients, "step peak - gradients - activations"),
    ]
    total = allocated(step)
    allowance = _allowance(total, device, fragmentation(cfg))
    if allowance:
        plan.lines.append(("CUDA context + allocator", allowance,
                           f"{CUDA_CONTEXT_GIB:g} GiB + {fragmentation(cfg):.0%} fragmentation"))
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
    context, factor = (CUDA_CONTEXT_GIB * GIB, 1 + fragmentation(cfg)) if device == "cuda" else (0, 1.0)
    room = int((budget - context) / factor) - fixed  # what the step's peak may reach
    if room < update:
        return 0, 0
    peaks = {cfg.batch_size: step["peak"]}

    def peak(b: int) -> int:
        if b not in peaks:
            peaks[b] = measure_step(model, cfg, b, device)["peak"]
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
    title = (f"memory per GPU: {plan.stage} on {plan.base}, {plan.resolution} px, batch {plan.batch_size}"
             f" x {plan.grad_accum} accumulation, {plan.mixed_precision if plan.mixed_precision != 'no' else 'fp32'}, "
             f"{checkpointing}")
    table = Table(title=title)
    table.add_column("item")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for label, n, how in plan.lines:
        table.add_row(label, _gib(n), how)
    table.add_row("[bold]total per GPU[/bold]", f"[bold]{_gib(plan.total)}[/bold]",
                  f"{'fits' if plan.fits else 'does NOT fit'} in {plan.gpu_memory / GIB:g} GiB")
    if plan.max_batch:
        table.add_row("largest batch per GPU", str(plan.max_batch),
                      f"in {plan.gpu_memory / GIB:g} GiB, {plan.per_sample / GIB:.3f} GiB per sample")
    elif plan.max_batch == 0:
        table.add_row("largest batch per GPU", "none",
                      f"no batch fits in {plan.gpu_memory / GIB:g} GiB")
    return table



# -- the command line ---------------------------------------------------------------------------------

def plan_config(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """``cfg`` checked for what a plan needs (the base model, the batch shape, the precision),
    and notes on what a real run would still refuse: the plan reads no data and writes nothing,
    so a missing ``--data`` or ``--output`` is a note, not an error. With ``--resume`` the run's
    saved configuration is planned."""
    from disco.train.config import CONFIG_FILE, load_run_config

    notes = []
    if cfg.resume:
        if not cfg.output or not (Path(cfg.output) / CONFIG_FILE).exists():
            raise ConfigError(f"--resume: {cfg.output or '(no --output)'} is not a training run (no {CONFIG_FILE})")
        cfg = load_run_config(cfg.output)
        notes.append(f"planned from the saved configuration of {cfg.output}")
    cfg.validate_model()
    if not cfg.data and not cfg.resume:
        notes.append("no --data given: a real run needs at least one (the plan does not read data)")
    for folder in cfg.data:
        if not (Path(folder) / "triplets").is_dir():
            notes.append(f"--data {folder} holds no triplets/ folder: a real run would stop there")
    if not cfg.output:
        notes.append("no --output given: a real run needs one")
    if cfg.init_from and not (Path(cfg.init_from) / CONFIG_FILE).exists():
        notes.append(f"--init-from {cfg.init_from} is not a training run: a real run would stop there")
    if cfg.mixed_precision != "no" and not cfg.use_gpu:
        notes.append(f"planned for a GPU (--mixed-precision {cfg.mixed_precision} under CUDA autocast); "
                     "this run has no --use-gpu")
    return cfg, notes


def host_build_bytes(cfg: TrainConfig) -> int:
    """Host memory the model takes while it is built (every weight once in fp32; with
    ``--init-from``, the HAP model and the base UNet, which then make up the fine-tuning model)."""
    if cfg.stage == "finetune" and cfg.init_from:
        hap = meta_model(cfg, "pretrain")
        return _bytes(hap.parameters()) + _bytes(hap.buffers()) + _bytes(hap.unet.parameters())
    model = meta_model(cfg)
    return _bytes(model.parameters()) + _bytes(model.buffers())
