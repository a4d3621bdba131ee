"""One input cannot end its actor's process for ever.

Ray Data restarts a pool actor whose process dies, as often as it dies, and hands it the same
call again (``max_restarts`` and ``max_task_retries`` -1, its defaults). An input that kills the
process (FFmpeg aborting on a damaged video, a segfault in native code, the kernel's or Ray's
out-of-memory killer) would then run, kill and restart for ever, the models reloaded each time,
and the run would never end. So each unit's work is an *attempt*: a file written before it and
removed after it, whatever Python raised (that is the unit's errors row). A file left behind is
a process that ended on that unit; a unit with ``STRIKES`` of them becomes its errors row
(``worker_crashed``, or ``gpu_failed`` where the process ended because the GPU broke:
``device_loss``) without running again, so the units beside it in a call are never blamed.

The files live in the output folder (``.strikes/RUN/``, storage every node sees), so an actor
restarted on another node counts the same strikes; a new run (a resume) starts from none, and
the driver removes the folder when the run ends (``OutputStore.recover``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import tempfile
from pathlib import Path

STRIKES = 2
FOLDER = ".strikes"
GPU_MARK = "gpu: "  # an attempt that ended because the GPU broke (device_loss.restart)


class GpuFailed(RuntimeError):
    """The errors row of a unit that broke the GPU ``STRIKES`` times (``error_type`` gpu_failed)."""


class WorkerCrashed(RuntimeError):
    """The errors row of a unit whose actor's process ended ``STRIKES`` times while on it
    (``error_type`` worker_crashed)."""


def strike_folder(settings: dict) -> Path:
    root = Path(settings["output"]) / FOLDER if settings.get("output") else \
        Path(tempfile.gettempdir()) / f"disco-strikes-{os.getuid()}"  # outside a run (a bare loop)
    return root / (settings.get("run") or "run")


def _key(unit: dict, stage: str) -> str:
    return hashlib.sha1(f"{stage}\0{unit['input_path']}\0{unit.get('unit_index', 0)}".encode()).hexdigest()


def strikes(settings: dict, unit: dict, stage: str) -> list[str]:
    """What each attempt at ``unit`` that ended its process left (oldest first)."""
    try:
        files = sorted(strike_folder(settings).glob(_key(unit, stage) + ".*"), key=lambda p: p.stat().st_mtime)
        return [p.read_text().strip() for p in files]
    except OSError:  # none yet, or unreadable: the unit runs (as before any strike)
        return []


def given_up(settings: dict, unit: dict, stage: str) -> Exception | None:
    """The error for ``unit``'s row when attempts at it ended their process ``STRIKES`` times."""
    left = strikes(settings, unit, stage)
    if len(left) < STRIKES:
        return None
    gpu = [s[len(GPU_MARK):] for s in left if s.startswith(GPU_MARK)]
    if gpu:
        return GpuFailed(f"the GPU failed {len(left)} times on this unit ({gpu[-1]})")
    return WorkerCrashed(f"the actor's process ended {len(left)} times while on this unit (killed, e.g. for "
                         f"memory, or crashed in native code; {left[-1]}); its log on that node says more")


def begin(settings: dict, unit: dict, stage: str) -> Path | None:
    """The attempt's file, written before the work; None where it cannot be written (then the
    unit runs unguarded rather than not at all)."""
    folder = strike_folder(settings)
    path = folder / f"{_key(unit, stage)}.{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(f"process {os.getpid()} on {socket.gethostname()}, {stage}\n")
    except OSError:
        return None
    return path


def end(attempt: Path | None) -> None:
    """The attempt finished (its result, or its errors row, goes on): no strike."""
    if attempt is not None:
        try:
            attempt.unlink()
        except OSError:
            pass


def mark_gpu(attempt: Path | None, message: str) -> None:
    """The attempt ends its process because the GPU broke: its strike says so."""
    if attempt is not None:
        attempt.write_text(GPU_MARK + message + "\n")
