"""Annotator backends (declared in ``registry``) and the choice between them.

``auto`` picks the paper-faithful CUDA backends (Grounded-SAM, OpenPose) only where they can run: a
CUDA device and their weights in the weights folder. Otherwise it picks the embedded CPU backend
(MediaPipe), and says why. A CUDA backend asked for by name never falls back: without CUDA it
fails, unless ``device="cpu"`` asks for the CPU on purpose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import Matte, Pose, mask_area, person_present
from disco.pipeline.annotators.registry import Backend, BackendError, backends, get, gpu_backend, load
from disco.pipeline.annotators.weights import WeightsError, describe, require, weights_dir

__all__ = ["FrameAnnotator", "Matte", "Pose", "mask_area", "person_present", "resolve_backends", "BackendError",
           "gpu_backend", "cuda_available"]

DEVICES = ("auto", "cuda", "cpu")


def cuda_available() -> bool:
    # Without an NVIDIA driver there is no CUDA; skip the costly torch import on such machines.
    if not os.path.exists("/proc/driver/nvidia/version"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _cuda_missing(backend: Backend) -> str | None:
    return backend.cuda_missing() if backend.cuda_missing is not None else None


def _files_ok(backend: Backend, root: Path | None, options: dict) -> bool:
    try:
        return all(f.present for f in backend.files(root, options))
    except WeightsError:
        return False


def resolve_backends(matting: str, pose: str, *, weights: str | os.PathLike | None = None, device: str = "auto",
                     cuda: bool | None = None, **options) -> dict:
    """Turn the requested backends (``auto`` allowed) into the ones that will run, with a reason.

    ``options`` are the backend options that decide which weight files are needed (``sam_model``,
    ``hands``, ``face``). ``cuda`` overrides the local check: on a Ray cluster the GPUs are on the
    workers, not on the driver. Raises ``BackendError`` for a request that cannot run here.
    """
    # The CUDA libraries of this process stand for the GPU machine's only when it is that machine
    # (on a cluster the driver is often a CPU head node with other wheels).
    local = cuda is None
    cuda = cuda_available() if cuda is None else cuda
    root = weights_dir(weights)
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not cuda:
        raise BackendError("--device cuda asked for, but no CUDA device is available")
    run_device = "cuda" if (device == "auto" and cuda) else ("cpu" if device == "auto" else device)
    reasons = []

    def auto(role: str) -> str:
        candidates = [b for b in backends(role) if b.auto]
        embedded = next((b for b in candidates if not b.gpu), None)
        on_gpu = [b for b in candidates if b.gpu]
        if embedded is None:
            raise BackendError(f"no {role} backend runs without CUDA; name one with --{role}")
        if not on_gpu:
            return embedded.name
        if not cuda:
            reasons.append(f"{role}: no CUDA device, using {embedded.label}")
            return embedded.name
        # The first in the registry's order of preference whose weights are all there.
        for rank, backend in enumerate(on_gpu):
            missing = _cuda_missing(backend) if local and run_device == "cuda" else None
            if missing and _files_ok(backend, root, options):
                reasons.append(f"{role}: {backend.name} weights found but {missing}")
                continue
            if not missing and _files_ok(backend, root, options):
                passed = [b.name for b in on_gpu[:rank]]
                reasons.append(f"{role}: CUDA and {backend.name} weights found"
                               + (f" ({', '.join(passed)} preferred, weights not found)" if passed else ""))
                return backend.name
        where = f"in {root}" if root else "(no --weights / $DISCO_WEIGHTS)"
        names = " or ".join(b.name for b in on_gpu)
        reasons.append(f"{role}: {names} weights not found {where}, using {embedded.label}")
        return embedded.name

    def pick(role: str, asked: str) -> str:
        if asked == "none" and role == "pose":
            return "none"
        if asked == "auto":
            return auto(role)
        backend = get(asked)
        if role not in backend.roles:
            raise BackendError(f"{asked} is not a {role} backend; {role} backends: "
                               f"{', '.join(b.name for b in backends(role))}")
        if backend.gpu:
            if run_device == "cpu" and device != "cpu":
                cpu = ", ".join(b.name for b in backends(role) if not b.gpu) or "none registered"
                raise BackendError(
                    f"{asked} runs on a CUDA GPU and none is available; use the embedded backend "
                    f"({cpu}), or pass --device cpu to run {asked} on the CPU on purpose (slow)"
                )
            try:
                require(backend.files(root, options), asked)
            except WeightsError as exc:
                raise BackendError(str(exc)) from None
            missing = _cuda_missing(backend) if local and run_device == "cuda" else None
            if missing:  # here, not in every actor at start-up
                raise BackendError(f"{asked} cannot run on CUDA: {missing}; or pass --device cpu to run it on the "
                                   "CPU on purpose (slow)")
        return asked

    resolved = {
        "matting": pick("matting", matting),
        "pose": pick("pose", pose),
        "cuda": cuda,
        "device": run_device,
        "weights": str(root) if root else None,
    }
    resolved["reason"] = ("auto: " + "; ".join(reasons)) if reasons else "as requested"
    return resolved


def weight_files(resolved: dict, options: dict) -> list[dict]:
    """Manifest entries (name, sha256) for every model file the resolved backends load."""
    root = Path(resolved["weights"]) if resolved.get("weights") else None
    files: list[dict] = []
    used = [get(n) for n in dict.fromkeys(resolved[role] for role in ("matting", "pose")) if n != "none"]
    for backend in sorted(used, key=lambda b: b.embedded_files is None):  # the packaged models first
        if backend.embedded_files is not None:
            files += backend.embedded_files(options, resolved)
        if backend.files is not None and root is not None:
            files += describe(backend.files(root, options))
    return files


@dataclass
class Annotation:
    matte: Matte
    pose: Pose | None
    present: bool


# Unit kinds whose frames are consecutive frames of one shot (decode.py, datasets/units.py).
SEQUENCE_KINDS = ("video", "frames")


def person_threshold(matting: Backend, options: dict, min_visibility: float) -> float:
    """The detection score a person must reach: --min-visibility, unless the matting backend has
    its own (Grounded-SAM's box threshold: a box below it was never proposed)."""
    return matting.person_score(options, min_visibility) if matting.person_score else min_visibility


class FrameAnnotator:
    """Matting and pose for frames; built once per actor, never per image.

    ``roles`` limits what is loaded: a matting-only actor of the GPU pipeline never builds the
    pose model, and the other way round. ``modules`` names the module that declares a backend
    this process may not know yet (one declared outside disco, in the driver's process).
    """

    def __init__(self, matting: str, pose: str, hands: bool, min_visibility: float, min_mask_area: float,
                 joint_threshold: float = 0.2, roles: tuple[str, ...] = ("matting", "pose"),
                 modules: dict[str, str] | None = None, **options):
        names = {"matting": matting if "matting" in roles else None,
                 "pose": pose if "pose" in roles and pose != "none" else None}
        options = {**options, "hands": hands, "joint_threshold": joint_threshold, "backends": names}
        modules = modules or {}
        self.shared: dict = {}  # what the backends of both roles share (MediaPipe's engine)
        built = {role: load(name, modules.get(name)).build(role, options, self.shared)
                 for role, name in names.items() if name}
        self.matting = built.get("matting")
        self.pose = built.get("pose")
        self.min_score = person_threshold(load(matting, modules.get(matting)), options, min_visibility)
        self._unit = None
        self.min_mask_area = min_mask_area

    def _parts(self, method: str) -> list:
        """The shared objects and annotators that have ``method``, each once."""
        parts = {id(p): p for p in [*self.shared.values(), self.matting, self.pose] if hasattr(p, method)}
        return list(parts.values())

    def begin_unit(self, unit: dict, resume: bool = False) -> None:
        """The next frames belong to ``unit`` (a video segment or frame folder is a sequence):
        MediaPipe keeps each frame's graph result for the unit and tracks through a sequence.
        ``resume``: the same unit object as the last one begun keeps its results (its poses after
        its matting); otherwise, or for any other unit, tracking starts afresh."""
        if resume and unit is self._unit:
            return
        self._unit = unit  # held, so that no other unit can take its id
        for part in self._parts("begin_unit"):
            part.begin_unit(sequence=unit.get("kind") in SEQUENCE_KINDS)

    def tracks_sequence(self) -> bool:
        """Whether the matting backend tracks the frames of the unit begun as one video (SAM 2): a
        call per frame would give other mattes than a call for them all."""
        tracks = getattr(self.matting, "tracks_sequence", None)
        return bool(tracks()) if callable(tracks) else False

    def matte_batch(self, frames: list[np.ndarray]) -> list[Matte]:
        if hasattr(self.matting, "matte_batch"):
            return self.matting.matte_batch(frames)
        return [self.matting.matte(frame) for frame in frames]

    def shrink_batch(self, frames: int) -> int | None:
        """After a matting call of ``frames`` frames ran out of GPU memory: the backend's batch,
        halved from what the call used, for the rest of this process's life; the new size, or None
        where nothing smaller can run (one frame, or a backend without a batch): one frame at a
        time is then the caller's retry."""
        size = getattr(self.matting, "batch_size", None)
        if hasattr(self.matting, "shrink_batch"):  # a backend whose batch is not always the frames'
            smaller = self.matting.shrink_batch(frames)
        elif isinstance(size, int) and min(size, frames) > 1:
            smaller = self.matting.batch_size = min(size, frames) // 2
        else:
            return None
        # A backend's own rule that did not shrink would have the caller retry for ever.
        return smaller if smaller is not None and smaller < min(size or frames, frames) else None

    def present(self, matte: Matte) -> bool:
        return person_present(matte, self.min_score, self.min_mask_area)

    def pose_of(self, frame: np.ndarray) -> Pose | None:
        return self.pose.pose(frame) if self.pose is not None else None

    def annotate(self, frame: np.ndarray) -> Annotation:
        matte = self.matte_batch([frame])[0]
        present = self.present(matte)
        pose = self.pose_of(frame) if present else None
        return Annotation(matte=matte, pose=pose, present=present)

    def close(self) -> None:
        for part in self._parts("close"):
            part.close()
