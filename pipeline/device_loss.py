"""A GPU actor whose CUDA context broke restarts instead of failing every unit after it.

An illegal memory access, a device-side assert or a lost device leaves the process's CUDA
context unusable: every later call fails too. Caught like any model error, each would become an
errors row, and the actor would turn the rest of its share of the run into errors rows that a
resume counts as done. So those errors escape the per-frame and per-unit boundaries
(``DeviceLost`` is a ``BaseException``), and the actor exits: Ray starts it again, with a fresh
CUDA context, and Ray Data gives it the same units again. A unit that breaks the device a second
time on the same node (a strike file records the first) becomes its errors row instead, so one
input cannot restart actors for ever. Out-of-memory errors are not among these: they leave the
context usable, and the one-frame-at-a-time retry handles them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

# What CUDA, cuBLAS, cuDNN and ONNX Runtime's CUDA provider say when the context is gone.
MARKERS = ("CUDA error", "CUDA failure", "illegal memory access", "device-side assert", "CUBLAS_STATUS_EXECUTION_FAILED",
           "CUDNN_STATUS_EXECUTION_FAILED", "uncorrectable ECC", "unspecified launch failure")
EXIT_CODE = 75  # EX_TEMPFAIL: Ray restarts an actor that exits; the code shows up in its log


class DeviceLost(BaseException):
    """A CUDA error that leaves the device unusable for this process; ``error``: what was raised."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def device_lost(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    text = str(exc)
    return any(marker in text for marker in MARKERS)


def raise_if_device_lost(exc: BaseException) -> None:
    """Called in the pipeline's ``except Exception`` boundaries: lets a broken device through."""
    if device_lost(exc):
        raise DeviceLost(exc) from exc


def strike_file(run: str, unit: dict) -> Path:
    key = hashlib.sha1(f"{unit['input_path']}\0{unit.get('unit_index', 0)}".encode()).hexdigest()
    return Path(tempfile.gettempdir()) / "disco-strikes" / run / key


def restart_or_give_up(settings: dict, unit: dict, lost: DeviceLost) -> BaseException:
    """The first time ``unit`` breaks the device on this node: exit the actor (Ray restarts it and
    the unit runs again). The second time: the error, for the unit's errors row."""
    path = strike_file(settings["run"], unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x"):
            pass
    except FileExistsError:
        return lost.error
    print(f"disco: the GPU failed on {unit['input_path']} (unit {unit.get('unit_index', 0)}): {lost.error}; "
          "restarting this actor, its units run again", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)
