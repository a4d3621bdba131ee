"""The frames a ``generate`` run has finished so far, kept beside its output until the video is
written: a long driving video is hours of sampling on a GPU, and a run that stops before the end
(out of memory, a preempted node, ``ray job stop``, Ctrl-C) would otherwise lose every frame. The
same command again (``--batch-size`` and ``--gpus`` may change) samples only the frames it had not
finished: every frame's noise is drawn from the seed up front, whichever run samples it.

The folder (``OUTPUT.mp4.partial/``) holds ``key.json``, what the frames depend on (the
checkpoint, the inputs' content, the sampling settings), and one ``frames-FIRST.npz`` per finished
batch (its frame indices and uint8 frames, read back without pickle). A run with another key
starts afresh."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

SUFFIX = ".partial"
KEY_FILE = "key.json"


def content_digest(*arrays) -> str:
    """A digest of the arrays' values (the reference, background and pose pictures as the model
    gets them): a changed input file, or other poses from it, is another run."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class PartialFrames:
    def __init__(self, output: Path, key: dict):
        self.folder = Path(output).with_name(Path(output).name + SUFFIX)
        self.key = json.loads(json.dumps(key))  # as key.json holds it

    def resume(self, total: int, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
        """The frames (by index) a stopped run with the same key finished; the folder is then this
        run's. One of another run goes; a file cut short by a kill is sampled again."""
        done: dict[int, np.ndarray] = {}
        if self.folder.exists():
            try:
                same = json.loads((self.folder / KEY_FILE).read_text()) == self.key
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            _write_atomic(self.folder / KEY_FILE, json.dumps(self.key, indent=1).encode())
            return done
        for path in sorted(self.folder.glob("frames-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as saved:
                    index, frames = saved["index"], saved["frames"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                continue
            if frames.dtype == np.uint8 and frames.shape == (len(index), *shape) and index.dtype.kind == "i" \
                    and len(index) and index.min() >= 0 and index.max() < total:
                done.update(zip(index.tolist(), frames))
        return done

    def save(self, indices: list[int], frames: np.ndarray) -> None:
        """One finished batch (called from the devices' threads: each writes its own file)."""
        path = self.folder / f"frames-{indices[0]:08d}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, index=np.asarray(indices, np.int64), frames=np.ascontiguousarray(frames))
        os.replace(tmp, path)

    def finish(self) -> None:
        """The video is written: the frames go."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
