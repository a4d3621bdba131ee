"""A GPU actor whose CUDA context broke restarts instead of failing every unit after it.

An illegal memory access, a device-side assert or a lost device leaves the process's CUDA
context unusable: every later call fails too. Caught like any model error, each would become an
errors row, and the actor would turn the rest of its share of the run into errors rows that a
resume counts as done. So those errors escape the per-frame and per-unit boundaries
(``DeviceLost`` is a ``BaseException``), and the actor exits at once, whatever unit it was on:
Ray starts it again with a fresh CUDA context, and Ray Data gives it the same units again. The
unit's attempt counts as a strike (``strikes``); a unit that broke the device ``STRIKES`` times
becomes its errors row (``gpu_failed``) without running again, so one input cannot restart
actors for ever, and the units beside it in a call never take the blame.
Out-of-memory errors are not among these: they leave the context usable, and the
one-frame-at-a-time retry handles them (``gpu_out_of_memory`` where even one frame does not fit).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from disco.pipeline.errors import DeviceLost, device_lost, first_line
from disco.pipeline.strikes import mark_gpu

EXIT_CODE = 75  # EX_TEMPFAIL: Ray restarts an actor that exits; the code shows up in its log


def raise_if_device_lost(exc: BaseException) -> None:
    """Called in the pipeline's ``except Exception`` boundaries: lets a broken device through."""
    if device_lost(exc):
        raise DeviceLost(exc) from exc


def restart(unit: dict, stage: str, lost: DeviceLost, attempt: str | None) -> NoReturn:
    """Marks ``attempt`` (``strikes.begin``) as a broken GPU and ends this actor's process (Ray
    starts it again), whatever happens while marking: a process with a broken CUDA context must
    not go on."""
    try:
        message = first_line(lost.error, 300)
        print(f"disco: the GPU failed on {unit['input_path']} (unit {unit.get('unit_index', 0)}, {stage}): {message}; "
              "restarting this actor, its units run again", file=sys.stderr, flush=True)
        mark_gpu(attempt, message)
    finally:
        os._exit(EXIT_CODE)
