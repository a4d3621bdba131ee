"""Checkpoints written while training goes on.

A full fine-tuning checkpoint is 19 GB (the 1.58 B trained parameters in float32 and their AdamW
moments); on the H200 lease of 2026-11-28 writing it (safetensors, ``torch.save``, fsync) held the
training loop for 24-28 s, every ``checkpoint_every`` steps, on every rank (the others wait for
rank 0 at the next collective), while copying it to host memory took about a second. So the
loop takes the host copy (``checkpoint_snapshot``) and a thread writes it, one checkpoint at a
time; the checkpoint exists only once written whole and renamed, as before.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Callable


class CheckpointWriter:
    """One write at a time, in a thread of its own. ``wait`` returns the written checkpoint or
    raises what the write raised."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Path | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """A write was started and has ended (written, or failed: ``wait`` says which)."""
        return self._thread is not None and not self._thread.is_alive()

    def start(self, write: Callable[[], Path]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint is still being written")

        def run() -> None:
            try:
                self._result = write()
            except BaseException as exc:  # noqa: BLE001 - handed to the training loop by wait()
                self._error = exc

        self._result = self._error = None
        # A daemon: the loop always waits for the write (wait, close), but a second Ctrl-C aborts
        # at once, as it promises; a write cut short leaves a temporary folder --resume removes.
        self._thread = threading.Thread(target=run, name="disco-checkpoint-writer", daemon=True)
        self._thread.start()

    def _join(self) -> BaseException | None:
        self._thread.join()  # an interrupt here leaves the write in progress, and this writer as it was
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            # The frames of the write (ended now) hold the snapshot, tens of GB: not kept with the error.
            traceback.clear_frames(error.__traceback__)
        return error

    def wait(self) -> Path:
        if self._thread is None:
            raise RuntimeError("no checkpoint is being written")
        error = self._join()
        if error is not None:
            raise error
        return self._result

    def close(self) -> BaseException | None:
        """Let a write in progress finish (the loop is ending on an error); the write's own error,
        if any, is returned, not raised (an interrupt while waiting is raised)."""
        return None if self._thread is None else self._join()
