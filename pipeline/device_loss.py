"""A GPU actor whose CUDA context broke restarts instead of failing every unit after it.

An illegal memory access, a device-side assert or a lost device leaves the process's CUDA
context unusable: every later call fails too. Caught like any model error, each would become an
errors row, and the actor would turn the rest of its share of the run into errors rows that a
resume counts as done. So those errors escape the per-frame and per-unit boundaries
(``DeviceLost`` is a ``BaseException``), and the actor exits at once, whatever unit it was on:
Ray starts it again with a fresh CUDA context, and Ray Data gives it the same units again. A
strike file per unit and stage on the node counts the breaks; a unit that broke the device
``STRIKES`` times becomes its errors row (``gpu_failed``) without running again, so one input
cannot restart actors for ever, and the units beside it in a call never take the blame.
Out-of-memory errors are not among these: they leave the context usable, and the
one-frame-at-a-time retry handles them (``gpu_out_of_memory`` where even one frame does not fit).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

# What CUDA, cuBLAS, cuDNN and ONNX Runtime's CUDA provider say when the context is gone...
MARKERS = ("CUDA error", "CUDA failure", "illegal memory access", "device-side assert", "CUBLAS_STATUS_EXECUTION_FAILED",
           "CUDNN_STATUS_EXECUTION_FAILED", "uncorrectable ECC", "unspecified launch failure")
# ... and what among those leaves it usable (memory, a build without kernels for this GPU).
RECOVERABLE = ("out of memory", "ALLOC_FAILED", "no kernel image")
STRIKES = 2
EXIT_CODE = 75  # EX_TEMPFAIL: Ray restarts an actor that exits; the code shows up in its log


class DeviceLost(BaseException):
    """A CUDA error that leaves the device unusable for this process; ``error``: what was raised."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class GpuFailed(RuntimeError):
    """The errors row of a unit that broke the GPU ``STRIKES`` times (``error_type`` gpu_failed)."""


def device_lost(exc: BaseException) -> bool:
    if isinstance(exc, OSError):  # a file's trouble, whatever its name or message says
        return False
    text = str(exc)
    if any(marker in text for marker in RECOVERABLE):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None) if torch is not None else None
    return (accelerator is not None and isinstance(exc, accelerator)) or any(marker in text for marker in MARKERS)


def raise_if_device_lost(exc: BaseException) -> None:
    """Called in the pipeline's ``except Exception`` boundaries: lets a broken device through."""
    if device_lost(exc):
        raise DeviceLost(exc) from exc


def strike_file(run: str, unit: dict, stage: str) -> Path:
    key = hashlib.sha1(f"{stage}\0{unit['input_path']}\0{unit.get('unit_index', 0)}".encode()).hexdigest()
    return Path(tempfile.gettempdir()) / f"disco-strikes-{os.getuid()}" / (run or "run") / key


def given_up(settings: dict, unit: dict, stage: str) -> GpuFailed | None:
    """The error for ``unit``'s row when it has broken the GPU ``STRIKES`` times on this node."""
    try:
        strikes = strike_file(settings.get("run", ""), unit, stage).read_text().splitlines()
    except OSError:  # none yet (or unreadable: then the unit runs again, as before any strike)
        return None
    if len(strikes) < STRIKES:
        return None
    return GpuFailed(f"the GPU failed {len(strikes)} times on this unit ({strikes[-1]})")


def restart(settings: dict, unit: dict, stage: str, lost: DeviceLost) -> NoReturn:
    """Counts the break against ``unit`` and ends this actor's process (Ray starts it again),
    whatever happens while counting: a process with a broken CUDA context must not go on."""
    try:
        message = (str(lost.error).strip().splitlines() or [type(lost.error).__name__])[0][:300]
        print(f"disco: the GPU failed on {unit['input_path']} (unit {unit.get('unit_index', 0)}, {stage}): {message}; "
              "restarting this actor, its units run again", file=sys.stderr, flush=True)
        path = strike_file(settings.get("run", ""), unit, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as strikes:
            strikes.write(message + "\n")
    finally:
        os._exit(EXIT_CODE)
