"""The frames a ``generate`` run has finished so far, kept beside its output until the video is
written: a long driving video is hours of sampling on a GPU, and a run that stops before the end
(out of memory, a preempted node, ``ray job stop``, Ctrl-C) would otherwise lose every frame. The
same command again (``--batch-size`` and ``--gpus`` may change) samples only the frames it had not
finished: every frame's noise is drawn from the seed up front, whichever run samples it.

The folder (``OUTPUT.mp4.partial/``) holds ``key.json``, what the frames depend on (the
checkpoint's and the input files' identities, the settings), and one ``frames-FIRST.npz`` per
finished batch (its frame indices and uint8 frames, uncompressed: size x size x 3 bytes a frame,
read back without pickle). A run with another key starts afresh."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from disco.pipeline.sources.generic import ends_digest
from disco.pipeline.store.manifest import write_manifest

SUFFIX = ".partial"
KEY_FILE = "key.json"


def file_identity(path: str | Path | None, span: int = 1 << 20) -> str | None:
    """A file by its size and a digest of its first and last ``span`` bytes (a photo whole; a
    video or a weights file is not read through), or a folder by the identities of its files: an
    input or a checkpoint replaced under the same name is another run. (Not by what the models
    made of them: matting on a GPU need not give the same bits twice.)"""
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_dir():
        return hashlib.blake2b("".join(f"{p.relative_to(path)}:{file_identity(p, span)}\n" for p in sorted(path.rglob("*"))
                                       if p.is_file()).encode(), digest_size=16).hexdigest()
    size = path.stat().st_size
    return f"{size}-{ends_digest(path, size, span)}"


def partial_folder(output: str | Path) -> Path:
    """Where the frames of a run writing ``output`` are kept."""
    return Path(output).with_name(Path(output).name + SUFFIX)


class PartialFrames:
    def __init__(self, output: Path, key: dict):
        self.folder = partial_folder(output)
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
            write_manifest(self.folder / KEY_FILE, self.key)
            return done
        for path in sorted(self.folder.glob("frames-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as saved:
                    index, frames = saved["index"], saved["frames"]
            except Exception:  # noqa: BLE001 - a file cut short or emptied by a crash: sampled again
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
            handle.flush()
            os.fsync(handle.fileno())  # a crash must not leave an empty file under the final name
        os.replace(tmp, path)

    def finish(self) -> None:
        """The video is written: the frames go."""
        shutil.rmtree(self.folder, ignore_errors=True)
