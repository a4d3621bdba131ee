"""Building modules on the meta device with the random stream of a CPU build.

diffusers and transformers draw every parameter's initial value from torch's global generator
while a module is constructed. Built on the meta device, a module allocates nothing, but it also
draws nothing: the weights a seeded CPU build gives, and the generator's state after it, would be
lost. Inside ``SeededMeta`` a module is built on the meta device and yet:

* every random initialisation done to a meta tensor is repeated on a scratch CPU tensor of the
  same shape, dtype and strides (so it consumes exactly the draws the CPU build would), and the
  scratch tensor is freed at once: the generator ends where a CPU build leaves it, while at most
  one parameter's worth of memory is ever held;
* every initialisation of a meta tensor that only depends on itself (random draws with the
  generator state before them, ``zero_``, ``fill_``, ``mul_`` by a number, ...) is recorded, so
  that ``materialize`` can later give any parameter exactly the values the CPU build gave it.

This is what lets the DisCo model take its ControlNets' weights from the UNet by assignment (or
one clone) instead of first building a random full-size ControlNet and copying over it, and lets
the fine-tuning model be assembled from a HAP model without a second random model beside it,
while a seeded run keeps, bit for bit, the weights it always had.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

META = torch.device("meta")
_active: list["SeededMeta"] = []


def seeded_meta_active() -> bool:
    """Whether a ``SeededMeta`` build is under way (model code that skips random initialisation
    on the meta device, as transformers does, must then run it: the draws are what counts)."""
    return bool(_active)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _is_meta_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def _geometry(t: torch.Tensor) -> tuple:
    return tuple(t.size()), tuple(t.stride()), t.storage_offset()


def _plain(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "generator"}


@dataclass(frozen=True)
class _Shape:
    """A tensor argument of an op whose result depends only on its shape (``zeros_like``, ...)."""

    size: tuple
    stride: tuple
    dtype: torch.dtype

    def cpu(self) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device="cpu")


def _shape_of(value):
    return _Shape(tuple(value.size()), tuple(value.stride()), value.dtype) if isinstance(value, torch.Tensor) else value


def _cpu(value):
    return value.cpu() if isinstance(value, _Shape) else value


_aten = torch.ops.aten
_EMPTY = {_aten.empty, _aten.empty_strided, _aten.empty_like, _aten.new_empty, _aten.new_empty_strided}
# Results that depend on the input's shape and dtype only.
_SHAPE_ONLY = {_aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.rand_like, _aten.randn_like,
               _aten.randint_like, _aten.new_zeros, _aten.new_ones, _aten.new_full}


@dataclass
class _Op:
    func: torch._ops.OpOverload
    geometry: tuple  # (size, stride, storage offset) of the tensor the op wrote
    args: tuple  # the arguments after the written tensor (numbers only), or a factory's arguments
    kwargs: dict
    rng_state: torch.Tensor | None  # generator state before a random op
    explicit_generator: bool  # the op was given a generator (else the global one)
    factory: bool  # a new tensor made from numbers only (``randn``, ``zeros``, ``arange``, ...)


class SeededMeta(TorchDispatchMode):
    """``with SeededMeta() as init:`` builds modules on the meta device with the random stream of
    a CPU build; ``init.materialize_module(m)`` then gives ``m``'s remaining meta tensors the
    values the CPU build would have given them. ``record=False`` only keeps the stream (nothing
    can be materialised), for a build whose weights are all thrown away or replaced."""

    def __init__(self, record: bool = True):
        super().__init__()
        self.record = record
        self._log: dict[int, list[_Op]] = {}
        self._derived: set[int] = set()  # storages whose values depend on other tensors
        self._alive: dict[int, torch.UntypedStorage] = {}  # keeps meta storages (and so their keys) unique
        self._device = None

    # -- the context ------------------------------------------------------------------------

    def __enter__(self):
        if _active:
            raise RuntimeError("SeededMeta builds do not nest")
        self._device = torch.device("meta")
        self._device.__enter__()
        _active.append(self)
        try:
            return super().__enter__()
        except BaseException:
            _active.pop()
            self._device.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _active.pop()
            self._device.__exit__(*exc)

    # -- every operation on the way -------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        on_meta = any(_is_meta_tensor(v) for v in flat) or kwargs.get("device") == META
        state = explicit = None
        if on_meta and torch.Tag.nondeterministic_seeded in func.tags:
            generator = kwargs.get("generator")
            explicit = generator is not None
            if self.record:
                state = (generator if explicit else torch.default_generator).get_state()
            self._draw_on_cpu(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.record and on_meta:
            self._note(func, args, kwargs, out, state, bool(explicit))
        return out

    @staticmethod
    def _draw_on_cpu(func, args, kwargs) -> None:
        """The same random op on scratch CPU tensors: the draws a CPU build makes, then freed."""

        def scratch(value):
            if _is_meta_tensor(value):
                return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="cpu")
            return value

        cpu_args = tree_map(scratch, args)
        cpu_kwargs = tree_map(scratch, kwargs)
        if cpu_kwargs.get("device") == META:
            cpu_kwargs["device"] = torch.device("cpu")
        func(*cpu_args, **cpu_kwargs)

    def _note(self, func, args, kwargs, out, state, explicit) -> None:
        schema = func._schema.arguments
        written = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema)
                   if a.alias_info is not None and a.alias_info.is_write]
        inputs = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        if written:
            target = args[0] if len(written) == 1 and args and written[0] is args[0] else None
            if target is not None and target.is_meta and all(v is target for v in inputs):
                self._log.setdefault(self._keep(target), []).append(_Op(
                    func, _geometry(target), tuple(args[1:]), _plain(kwargs), state, explicit, factory=False))
                return
            # an out= variant, or values computed from other tensors (a copy_, ...): not replayable
            for value in tree_flatten(written)[0]:
                if _is_meta_tensor(value):
                    self._derived.add(self._keep(value))
            return
        shape_only = func.overloadpacket in _SHAPE_ONLY
        input_keys = {_storage_key(v) for v in inputs if v.is_meta}
        for result in tree_flatten(out)[0]:
            if not _is_meta_tensor(result):
                continue
            key = _storage_key(result)
            if key in input_keys:
                continue  # a view of an input: same storage, nothing new
            self._keep(result)
            if func.overloadpacket in _EMPTY:
                self._log[key] = []  # fresh memory: its values come from the ops that follow
            elif inputs and not shape_only:
                self._derived.add(key)
            else:
                self._log[key] = [_Op(func, _geometry(result), tree_map(_shape_of, tuple(args)),
                                      tree_map(_shape_of, _plain(kwargs)), state, explicit, factory=True)]

    def _keep(self, t: torch.Tensor) -> int:
        key = _storage_key(t)
        self._alive.setdefault(key, t.untyped_storage())
        return key

    # -- materialising ------------------------------------------------------------------------

    def materialize(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor holding the values a CPU build would have given the meta tensor ``t``."""
        if not self.record:
            raise RuntimeError("this SeededMeta build recorded nothing (record=False)")
        key = _storage_key(t)
        if key in self._derived:
            raise ValueError("this tensor's values were computed from other tensors; assign it instead")
        ops = self._log.get(key)
        if ops is None:
            raise ValueError("this tensor was not made inside the SeededMeta build")
        # No ops: allocated and never initialised (diffusers' loading switches initialisation off):
        # uninitialised memory, as on the CPU.
        storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
        for op in ops:
            view = storage.as_strided(*op.geometry)
            with self._replay_rng(op) as kwargs:
                if op.factory:
                    args, factory_kwargs = tree_map(_cpu, op.args), tree_map(_cpu, op.kwargs)
                    if "device" in factory_kwargs or not any(isinstance(a, torch.Tensor) for a in args):
                        factory_kwargs["device"] = torch.device("cpu")
                    view.copy_(op.func(*args, **factory_kwargs, **kwargs))
                else:
                    op.func(view, *op.args, **op.kwargs, **kwargs)
        return storage.as_strided(t.size(), t.stride(), t.storage_offset())

    @staticmethod
    @contextlib.contextmanager
    def _replay_rng(op: _Op):
        if op.rng_state is None:
            yield {}
        elif op.explicit_generator:
            generator = torch.Generator()
            generator.set_state(op.rng_state)
            yield {"generator": generator}
        else:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(op.rng_state)
                yield {}

    def materialize_module(self, module: nn.Module) -> nn.Module:
        """Replace every parameter and buffer of ``module`` still on the meta device by its
        materialised CPU values (parameters keep their ``requires_grad``)."""
        for name, param in list(module.named_parameters()):
            if param.is_meta:
                set_tensor(module, name, self.materialize(param))
        for name, buffer in list(module.named_buffers()):
            if buffer.is_meta:
                set_tensor(module, name, self.materialize(buffer))
        return module


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (dotted) of ``module`` without
    copying it; a parameter stays a parameter with its ``requires_grad``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer")
