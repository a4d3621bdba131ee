"""Annotator backends and the choice between them.

``auto`` picks the paper-faithful backends (Grounded-SAM, OpenPose) only where they can run: a
CUDA device and their weights in the weights folder. Otherwise it picks the embedded MediaPipe
backends, and says why. A paper-faithful backend asked for by name never falls back: without
CUDA it fails, unless ``device="cpu"`` asks for the CPU on purpose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import Matte, Pose, mask_area, person_present
from disco.pipeline.annotators.weights import WeightsError, backend_files, weights_dir

__all__ = ["FrameAnnotator", "Matte", "Pose", "mask_area", "person_present", "resolve_backends",
           "GPU_BACKENDS", "cuda_available"]

GPU_BACKENDS = ("grounded-sam", "openpose")
DEVICES = ("auto", "cuda", "cpu")


class BackendError(ValueError):
    """A backend that cannot run here as asked (no CUDA, missing weights)."""


def cuda_available() -> bool:
    # Without an NVIDIA driver there is no CUDA; skip the costly torch import on such machines.
    if not os.path.exists("/proc/driver/nvidia/version"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _files_ok(backend: str, root: Path | None, options: dict) -> bool:
    try:
        return all(f.present for f in _files(backend, root, options))
    except WeightsError:
        return False


def _files(backend: str, root: Path | None, options: dict):
    return backend_files(backend, root, sam_model=options.get("sam_model", "vit_h"),
                         hands=options.get("hands", True), face=options.get("face", False))


def resolve_backends(matting: str, pose: str, *, weights: str | os.PathLike | None = None, device: str = "auto",
                     cuda: bool | None = None, **options) -> dict:
    """Turn the requested backends (``auto`` allowed) into the ones that will run, with a reason.

    ``options`` are the backend options that decide which weight files are needed (``sam_model``,
    ``hands``, ``face``). ``cuda`` overrides the local check: on a Ray cluster the GPUs are on the
    workers, not on the driver. Raises ``BackendError`` for a request that cannot run here.
    """
    cuda = cuda_available() if cuda is None else cuda
    root = weights_dir(weights)
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not cuda:
        raise BackendError("--device cuda asked for, but no CUDA device is available")
    run_device = "cuda" if (device == "auto" and cuda) else ("cpu" if device == "auto" else device)
    reasons = []

    def pick(role: str, asked: str, gpu_name: str) -> str:
        if asked == "auto":
            if not cuda:
                reasons.append(f"{role}: no CUDA device, using MediaPipe")
                return "mediapipe"
            if not _files_ok(gpu_name, root, options):
                where = f"in {root}" if root else "(no --weights / $DISCO_WEIGHTS)"
                reasons.append(f"{role}: {gpu_name} weights not found {where}, using MediaPipe")
                return "mediapipe"
            reasons.append(f"{role}: CUDA and {gpu_name} weights found")
            return gpu_name
        if asked in GPU_BACKENDS:
            if run_device == "cpu" and device != "cpu":
                raise BackendError(
                    f"{asked} runs on a CUDA GPU and none is available; use the embedded backend "
                    f"(mediapipe), or pass --device cpu to run {asked} on the CPU on purpose (slow)"
                )
            try:
                from disco.pipeline.annotators.weights import require

                require(_files(asked, root, options), asked)
            except WeightsError as exc:
                raise BackendError(str(exc)) from None
        return asked

    resolved = {
        "matting": pick("matting", matting, "grounded-sam"),
        "pose": pick("pose", pose, "openpose") if pose != "none" else "none",
        "cuda": cuda,
        "device": run_device,
        "weights": str(root) if root else None,
    }
    resolved["reason"] = ("auto: " + "; ".join(reasons)) if reasons else "as requested"
    return resolved


def weight_files(resolved: dict, options: dict) -> list[dict]:
    """Manifest entries (name, sha256) for every model file the resolved backends load."""
    from disco.pipeline.annotators.mediapipe_backend import MediaPipeEngine
    from disco.pipeline.annotators.weights import describe

    root = Path(resolved["weights"]) if resolved.get("weights") else None
    files: list[dict] = []
    if "mediapipe" in (resolved["matting"], resolved["pose"]):
        files += MediaPipeEngine.weight_files(options.get("hands", True) and resolved["pose"] == "mediapipe")
    for role in ("matting", "pose"):
        if resolved[role] in GPU_BACKENDS:
            files += describe(_files(resolved[role], root, options))
    return files


@dataclass
class Annotation:
    matte: Matte
    pose: Pose | None
    present: bool


def build_matting(name: str, options: dict, engine=None):
    if name == "mediapipe":
        from disco.pipeline.annotators.mediapipe_backend import MediaPipeMatting

        return MediaPipeMatting(engine)
    if name == "grounded-sam":
        from disco.pipeline.annotators.grounded_sam import GroundedSamMatting

        return GroundedSamMatting(
            weights_dir(options.get("weights")), sam_model=options.get("sam_model", "vit_h"),
            box_threshold=options.get("box_threshold", 0.3), text_threshold=options.get("text_threshold", 0.25),
            largest_person=options.get("largest_person", False), device=options.get("device", "cuda"),
            half=options.get("half", True), batch_size=options.get("batch_size", 8),
        )
    raise ValueError(f"unknown matting backend {name!r}")


def build_pose(name: str, options: dict, engine=None):
    if name == "none":
        return None
    if name == "mediapipe":
        from disco.pipeline.annotators.mediapipe_backend import MediaPipePose

        return MediaPipePose(engine, options.get("joint_threshold", 0.2))
    if name == "openpose":
        from disco.pipeline.annotators.openpose_backend import OpenPosePose

        return OpenPosePose(weights_dir(options.get("weights")), hands=options.get("hands", True),
                            face=options.get("face", False), device=options.get("device", "cuda"))
    raise ValueError(f"unknown pose backend {name!r}")


def _mediapipe_engine(matting: str, pose: str, hands: bool):
    if "mediapipe" not in (matting, pose):
        return None
    from disco.pipeline.annotators.mediapipe_backend import MediaPipeEngine

    return MediaPipeEngine(hands=hands and pose == "mediapipe")


# Unit kinds whose frames are consecutive frames of one shot (decode.py, datasets/units.py).
SEQUENCE_KINDS = ("video", "frames")


def person_threshold(matting: str, options: dict, min_visibility: float) -> float:
    """The detection score a person must reach: MediaPipe's landmark visibility, or for
    Grounded-SAM its own box threshold (a box below it was never proposed)."""
    return options.get("box_threshold", 0.3) if matting == "grounded-sam" else min_visibility


class FrameAnnotator:
    """Matting and pose for frames; built once per actor, never per image.

    ``roles`` limits what is loaded: a matting-only actor of the GPU pipeline never builds the
    pose model, and the other way round.
    """

    def __init__(self, matting: str, pose: str, hands: bool, min_visibility: float, min_mask_area: float,
                 joint_threshold: float = 0.2, roles: tuple[str, ...] = ("matting", "pose"), **options):
        options = {**options, "hands": hands, "joint_threshold": joint_threshold}
        self.engine = _mediapipe_engine(matting if "matting" in roles else None,
                                        pose if "pose" in roles else None, hands)
        self.matting = build_matting(matting, options, self.engine) if "matting" in roles else None
        self.pose = build_pose(pose, options, self.engine) if "pose" in roles else None
        self.min_score = person_threshold(matting, options, min_visibility)
        self._unit = None
        self.min_mask_area = min_mask_area

    def begin_unit(self, unit: dict, resume: bool = False) -> None:
        """The next frames belong to ``unit`` (a video segment or frame folder is a sequence):
        MediaPipe keeps each frame's graph result for the unit and tracks through a sequence.
        ``resume``: the same unit object as the last one begun keeps its results (its poses after
        its matting); otherwise, or for any other unit, tracking starts afresh."""
        if self.engine is None or (resume and unit is self._unit):
            return
        self._unit = unit  # held, so that no other unit can take its id
        self.engine.begin_unit(sequence=unit.get("kind") in SEQUENCE_KINDS)

    def matte_batch(self, frames: list[np.ndarray]) -> list[Matte]:
        if hasattr(self.matting, "matte_batch"):
            return self.matting.matte_batch(frames)
        return [self.matting.matte(frame) for frame in frames]

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
        if self.engine is not None:
            self.engine.close()
