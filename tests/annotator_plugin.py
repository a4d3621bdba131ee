"""A matting backend that only the test suite declares: a new backend is one file like this.

The middle half of every frame is "the person". Ray's actors import this module by the name the
registry recorded (the tests folder is on the driver's path, which Ray gives its workers).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import Matte
from disco.pipeline.annotators.registry import Backend, register


class CentreBox:
    def __init__(self, options: dict):
        self.margin = options.get("box_margin", 4)  # a quarter of each side, by default
        self.units = []  # what begin_unit was told, per unit

    def begin_unit(self, sequence: bool) -> None:
        self.units.append(sequence)

    def matte(self, frame: np.ndarray) -> Matte:
        height, width = frame.shape[:2]
        alpha = np.zeros((height, width), np.uint8)
        alpha[height // self.margin: height - height // self.margin, width // self.margin: width - width // self.margin] = 255
        return Matte(alpha=alpha, score=1.0, count=1, model="centre-box")


register(Backend(name="centre-box", roles=("matting",), build=lambda role, options, shared: CentreBox(options),
                 summary="the middle of the frame (tests only)"))


# -- a GPU that breaks ------------------------------------------------------------------------------

FAULT = (255, 0, 255)  # a frame whose top-left pixel is this breaks "the device"


def marked_block(frame: np.ndarray) -> bool:
    """A frame whose top-left 4 x 4 pixels are near FAULT (a 16 x 16 block of it survives H.264)."""
    return bool(np.abs(frame[:4, :4].astype(np.int16) - np.array(FAULT, np.int16)).max() <= 48)


class BrokenDevice(CentreBox):
    """The centre box, on a make-believe GPU: a frame marked with FAULT raises the error CUDA
    raises after an illegal memory access, and from then on every call in this process fails
    the same way, as a broken CUDA context does."""

    broken = False  # per process, like a CUDA context

    def matte(self, frame: np.ndarray) -> Matte:
        if tuple(frame[0, 0]) == FAULT:
            BrokenDevice.broken = True
        if BrokenDevice.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().matte(frame)


register(Backend(name="broken-device", roles=("matting",), build=lambda role, options, shared: BrokenDevice(options),
                 summary="the centre box on a GPU that breaks (tests only)"))


# A GPU broken for a while: while this file exists (the tests make and remove it), a marked frame
# raises as on ``BrokenDevice``; once it is gone (the GPU mended), every frame goes through.
FLAKY = Path(tempfile.gettempdir()) / f"disco-tests-gpu-broken-{os.getuid()}"


class FlakyDevice(CentreBox):
    """Marked frames: the top-left 4 x 4 pixels near FAULT (a 16 x 16 block of it survives H.264)."""

    def matte(self, frame: np.ndarray) -> Matte:
        if marked_block(frame) and FLAKY.exists():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().matte(frame)


register(Backend(name="flaky-device", roles=("matting",), build=lambda role, options, shared: FlakyDevice(options),
                 summary="the centre box on a GPU broken while a file exists (tests only)"))


# -- an input that kills the process ----------------------------------------------------------------

class KillingInput(CentreBox):
    """The centre box, until a frame marked with FAULT: then the process is killed at once
    (SIGKILL, as the kernel's out-of-memory killer does, or a crash in native code), with nothing
    raised that Python could catch."""

    def matte(self, frame: np.ndarray) -> Matte:
        if tuple(frame[0, 0]) == FAULT or marked_block(frame):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return super().matte(frame)




register(Backend(name="killing-input", roles=("matting",), build=lambda role, options, shared: KillingInput(options),
                 summary="the centre box; a marked frame kills the process (tests only)"))


# -- an input that never ends ----------------------------------------------------------------------

class StuckInput(CentreBox):
    """The centre box, until a frame marked with FAULT: then the process is stuck in native code
    for an hour, holding the GIL (ctypes.PyDLL keeps it through the call), as a decoder caught
    in a loop on a damaged file can be: no Python thread of the process runs again."""

    def matte(self, frame: np.ndarray) -> Matte:
        if tuple(frame[0, 0]) == FAULT:
            import ctypes

            ctypes.PyDLL(None).sleep(3600)
        return super().matte(frame)


register(Backend(name="stuck-input", roles=("matting",), build=lambda role, options, shared: StuckInput(options),
                 summary="the centre box; a marked frame is stuck for an hour (tests only)"))


# -- a unit whose shard cannot be written --------------------------------------------------------

FAULTY_NAME = "faulty.png"


def _killing_writer(options: dict) -> CentreBox:
    """The centre box, in an actor whose shard writes are killed (SIGKILL, as the out-of-memory
    killer does while a shard is packed) when the shard holds the input named FAULTY_NAME."""
    import os
    import signal

    from disco.pipeline.store import shards

    write = shards.write_parquet_atomic

    def killed(table, final, row_group_rows):  # the triplets shard (its errors rows are written)
        if final.parent.name == "triplets" and FAULTY_NAME in table.column("input_path").to_pylist():
            os.kill(os.getpid(), signal.SIGKILL)
        return write(table, final, row_group_rows)

    shards.write_parquet_atomic = killed
    return CentreBox(options)


register(Backend(name="killing-writer", roles=("matting",), build=lambda role, options, shared: _killing_writer(options),
                 summary="the centre box; writing a marked input's shard kills the process (tests only)"))


# -- a call that kills a GPU pipeline's actor between its units ----------------------------------

class StandingPose:
    """A pose backend that finds the same standing person in every frame."""

    def pose(self, frame: np.ndarray):
        from disco.pipeline.annotators.base import Pose

        height, width = frame.shape[:2]
        rows = np.linspace(0.2, 0.8, 18, dtype=np.float32) * height
        body = np.stack([np.full(18, width / 2, np.float32), rows, np.ones(18, np.float32)], axis=1)
        return Pose(body=body)


def _kills_a_call(name: str, holds_faulty) -> None:
    """In this actor's process, ``disco.pipeline.actors.<name>`` kills the process (SIGKILL, as
    the out-of-memory killer does at a call's peak of memory) when its argument holds the input
    named FAULTY_NAME."""
    import os
    import signal

    from disco.pipeline import actors

    original = getattr(actors, name)

    def killed(argument):
        if holds_faulty(argument):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(argument)

    setattr(actors, name, killed)


def _killing_packer(options: dict) -> CentreBox:
    """The centre box, a GPU model (the GPU pipeline: matting and pose actors), whose actor is
    killed while it packs a call's matted frames into its output table when they hold
    FAULTY_NAME's."""
    _kills_a_call("matted_table", lambda packed: any(p["unit"]["input_path"] == FAULTY_NAME and p["pictures"]
                                                     for p in packed))  # (not its errors row: a few bytes)
    return CentreBox(options)


def _killing_unpacker(options: dict) -> StandingPose:
    """The standing pose, a GPU model, whose actor is killed while it unpacks the matted frames
    of FAULTY_NAME."""
    _kills_a_call("unpack_unit", lambda record: record["unit"]["input_path"] == FAULTY_NAME and record["pictures"])
    return StandingPose()


register(Backend(name="killing-packer", roles=("matting",), gpu=True, files=lambda weights, options: [],
                 build=lambda role, options, shared: _killing_packer(options),
                 summary="the centre box on the GPU pipeline; packing a marked input's call kills the process (tests only)"))
register(Backend(name="killing-unpacker", roles=("pose",), gpu=True, files=lambda weights, options: [],
                 build=lambda role, options, shared: _killing_unpacker(options),
                 summary="a standing pose on the GPU pipeline; unpacking a marked input kills the process (tests only)"))


class KillingPose(StandingPose):
    """The standing pose, a GPU model, whose process is killed on a marked frame (``marked_block``)."""

    def pose(self, frame: np.ndarray):
        if marked_block(frame):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return super().pose(frame)


register(Backend(name="killing-gpu-input", roles=("matting",), gpu=True, files=lambda weights, options: [],
                 build=lambda role, options, shared: KillingInput(options),
                 summary="the centre box on the GPU pipeline; a marked frame kills the process (tests only)"))
register(Backend(name="killing-pose", roles=("pose",), gpu=True, files=lambda weights, options: [],
                 build=lambda role, options, shared: KillingPose(),
                 summary="a standing pose on the GPU pipeline; a marked frame kills the process (tests only)"))


# -- an actor that cannot start again ----------------------------------------------------------------

# Written "gone" by the first marked frame, which then kills its process: the restarted actor's
# model does not load (its weights deleted, its node's mount gone), and Ray Data's run fails
# mid-way. Once the test writes "mended", the models load and marked frames go through.
UNLOADABLE = Path(tempfile.gettempdir()) / f"disco-tests-unloadable-{os.getuid()}"


class DyingRestart(CentreBox):
    def __init__(self, options: dict):
        if UNLOADABLE.exists() and UNLOADABLE.read_text() == "gone":
            raise RuntimeError("the model's weights are gone")
        super().__init__(options)

    def matte(self, frame: np.ndarray) -> Matte:
        if tuple(frame[0, 0]) == FAULT and not UNLOADABLE.exists():
            import signal

            UNLOADABLE.write_text("gone")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().matte(frame)


register(Backend(name="dying-restart", roles=("matting",), build=lambda role, options, shared: DyingRestart(options),
                 summary="the centre box; a marked frame kills the process, which cannot start again (tests only)"))


# -- a frame that does not fit in GPU memory -------------------------------------------------------

class OutOfMemory(CentreBox):
    """The centre box; a frame marked with FAULT raises what PyTorch raises when the GPU is full."""

    def matte(self, frame: np.ndarray) -> Matte:
        if tuple(frame[0, 0]) == FAULT:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().matte(frame)


register(Backend(name="out-of-memory", roles=("matting",), build=lambda role, options, shared: OutOfMemory(options),
                 summary="the centre box; a marked frame is out of GPU memory (tests only)"))


# -- a GPU whose memory holds a few frames at a time ------------------------------------------------

class TightMemory(CentreBox):
    """The centre box in batches of ``batch_size`` (8, as Grounded-SAM's) on a GPU that holds
    ``fits`` frames at a time: a larger batch raises PyTorch's out-of-memory error, as SAM's batch
    does on a GPU shared with another actor. ``calls``: each batch's size, in order."""

    def __init__(self, options: dict):
        super().__init__(options)
        self.batch_size = options.get("batch_size", 8)
        self.fits = options.get("fits", 2)
        self.calls: list[int] = []

    def matte_batch(self, frames: list[np.ndarray]) -> list[Matte]:
        import torch

        out = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start:start + self.batch_size]
            self.calls.append(len(chunk))
            if len(chunk) > self.fits:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
            out += [self.matte(frame) for frame in chunk]
        return out


register(Backend(name="tight-memory", roles=("matting",), build=lambda role, options, shared: TightMemory(options),
                 summary="the centre box in batches; more than 2 frames at once is out of GPU memory (tests only)"))
