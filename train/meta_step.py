"""One training step run on the meta device: the trainer's own objective, forward and backward,
under an emulation of CUDA autocast, while a dispatch mode counts the bytes of every live tensor
storage (``measure_step``) or PyTorch's FLOP counter counts the work (``step_flops``). Nothing is
allocated: the model is built on the meta device. The memory plan (train/memory.py) is made of
these measurements; its docstring says how."""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from disco.model.configs import SCHEDULER
from disco.model.disco import DisCoModel
from disco.model.temporal import clip_frames
from disco.pipeline.errors import ConfigError
from disco.train.config import TrainConfig

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
    if variant == "temporal":  # the fine-tuned image model plus the temporal layers (model/temporal.py)
        from disco.model.temporal import TemporalConfig, add_temporal

        model = meta_model(cfg, "finetune")
        with torch.device("meta"):
            return add_temporal(model, TemporalConfig(frames=cfg.clip_frames))
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


def block_bytes(tensors) -> int:
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
    pictures["background_mask"] = torch.empty(batch, 1, resolution, resolution, dtype=torch.uint8, device=meta)
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
    exist before the step, are not in it).

    With several workers (``cfg.num_workers`` > 1) the gradients are DDP's buckets, there before
    the step and zeroed in place by each update (``train/loop.py``): every backward accumulates
    into them, and the step's figures do not hold them."""
    from disco.train.objective import DiffusionObjective, zero_gradients

    objective = DiffusionObjective(model)
    params = [p for p in model.parameters() if p.requires_grad]
    buckets = zero_gradients(params) if cfg.num_workers > 1 else []
    semantics = _StepSemantics(PRECISIONS[cfg.mixed_precision], device)
    for module in (model.unet, model.background_controlnet, model.pose_controlnet):
        if module is not None and module.is_gradient_checkpointing:
            module.enable_gradient_checkpointing(semantics.checkpoint_function())
    micro_batches = min(cfg.grad_accum, 2)  # from the second on, each one starts with every gradient alive
    tracker = _LiveBytes(known=list(model.parameters()) + list(model.buffers()) + buckets)
    activations = 0
    # The temporal stage: a sample is a clip, ``batch`` clips of clip_frames frames in (B F) layout.
    frames = cfg.clip_frames if cfg.stage == "temporal" else 1
    try:
        with tracker, semantics, clip_frames(model, frames):
            for micro in range(micro_batches):
                inputs, draws = _meta_batch(model, batch * frames, cfg.resolution)
                semantics.forward = True
                loss = objective(**inputs, **draws)
                semantics.end_forward()
                del inputs, draws
                if micro == micro_batches - 1:
                    activations = tracker.live - (_grad_bytes(params) if micro and not buckets else 0)
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

    from disco.train.objective import DiffusionObjective

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
    sizes = [block_bytes([p]) for p in params]
    if foreach:
        return sum(sizes)
    return max((2 * size + (sizes[i - 1] if i else 0) for i, size in enumerate(sizes)), default=0)


def _grad_bytes(params) -> int:
    return block_bytes(p.grad for p in params if p.grad is not None)
