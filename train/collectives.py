"""The collective operations of the training loop, and a guard that makes a CPU test run refuse
what NCCL refuses.

NCCL has no CPU backend: every tensor handed to a collective must live on the worker's GPU. gloo
accepts CPU tensors, so a loop that all-reduces a CPU tensor passes every CPU test and crashes at
its first log step on GPUs. Two rules keep that class of bug out:

- every collective the loop issues goes through ``Collectives``, which places its tensors on the
  training device it was given (the one the model and the batches use);
- ``nccl_guard`` (on when ``DISCO_NCCL_GUARD=1``, set by the test suite, and installed in every
  training worker) wraps ``torch.distributed``'s tensor collectives and raises, as NCCL would,
  when a tensor is not on the training device, and also when a collective is issued anywhere but
  inside ``Collectives``: the tests train on the CPU under gloo, where the training device *is*
  the CPU and a stray ``dist.all_reduce(cpu_tensor)`` would pass the device check, so the tests
  hold the rule itself. The tests run the multi-worker loop under it, and a unit test runs
  ``Collectives`` with a device that is not the CPU (``meta``).

Object collectives (``all_gather_object``) are left to torch, which places their byte tensors
on the device the backend needs (``torch.cuda.current_device()`` under NCCL; Ray Train sets it).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import torch.distributed as dist

GUARD_ENV = "DISCO_NCCL_GUARD"
GUARDED = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
           "reduce_scatter_tensor", "all_to_all_single", "all_to_all", "gather", "scatter", "barrier", "send",
           "recv", "isend", "irecv", "batch_isend_irecv")


class CollectiveDeviceError(RuntimeError):
    """A collective was handed a tensor off the training device (NCCL would refuse it), or was
    issued outside ``Collectives`` under the guard."""


_issuing = contextvars.ContextVar("disco_collective", default="")


@contextlib.contextmanager
def _collective(kind: str = "tensor"):
    """Marks the collectives ``Collectives`` issues (the guard lets only those through); ``kind``:
    "tensor", or "object" for torch's object collectives, whose byte tensors torch places."""
    token = _issuing.set(kind)
    try:
        yield
    finally:
        _issuing.reset(token)


class Collectives:
    """The few collectives the loop needs, on tensors placed on ``device``; no-ops for one worker."""

    def __init__(self, world: int, device: torch.device | str):
        self.world, self.device = world, torch.device(device)

    def mean(self, values: torch.Tensor | list[float]) -> torch.Tensor:
        """Element-wise mean over the workers of a small vector (float64, on the training device)."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.world > 1:
            with _collective():
                dist.all_reduce(t)
            t = t / self.world
        return t

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag: True when any worker says so (all workers then agree, e.g. on stopping at
        this step); several flags in one collective."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.device)
        with _collective():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, value) -> list:
        """Every worker's ``value`` (small picklable values), in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        with _collective("object"):
            dist.all_gather_object(out, value)
        return out


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def nccl_guard(device: torch.device | str, enabled: bool | None = None):
    """Within the block, ``torch.distributed`` tensor collectives refuse tensors not on ``device``,
    and any call made outside ``Collectives`` (DDP's gradient buckets go through its C++ reducer,
    not these functions).

    ``enabled`` defaults to the ``DISCO_NCCL_GUARD`` environment variable. Object collectives
    call the guarded functions too, with tensors on the backend's device: under gloo that is the
    CPU whatever the training device (workers sharing a GPU train over gloo), so under gloo they
    pass; under any other backend their tensors are checked like the rest."""
    if enabled is None:
        enabled = os.environ.get(GUARD_ENV) == "1"
    if not enabled:
        yield
        return
    from torch.distributed import distributed_c10d

    device = torch.device(device)
    # Both the public names and c10d's own (object collectives call those).
    modules = (dist, distributed_c10d)
    originals = {(m, name): getattr(m, name) for m in modules for name in GUARDED if hasattr(m, name)}

    def guarded(name, fn):
        @functools.wraps(fn)
        def check(*args, **kwargs):
            if not _issuing.get():
                raise CollectiveDeviceError(
                    f"{name} called outside train.collectives.Collectives: the loop's collectives go through it, "
                    "which places their tensors where NCCL takes them (on the GPU)")
            if _issuing.get() == "object" and dist.get_backend() == "gloo":
                # gloo's object collectives run on CPU tensors, also for workers training on a
                # GPU (--gpus-per-worker below 1): legal there; NCCL's are on the GPU, checked.
                return fn(*args, **kwargs)
            for t in _tensors(args, kwargs):
                if t.device.type != device.type:
                    raise CollectiveDeviceError(
                        f"{name} got a tensor on {t.device}, but the training device is {device}: NCCL has no "
                        "CPU backend, so every collective tensor must live on the training device")
            return fn(*args, **kwargs)
        return check

    for (module, name), fn in originals.items():
        setattr(module, name, guarded(name, fn))
    try:
        yield
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
