"""Annotator backends and the choice between them.

``auto`` picks the paper-faithful GPU backends only where they can run (CUDA and local weights);
this version ships the embedded MediaPipe backends, so ``auto`` resolves to them and says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from disco.pipeline.annotators.base import Matte, Pose, mask_area, person_present

__all__ = ["FrameAnnotator", "Matte", "Pose", "mask_area", "person_present", "resolve_backends"]


def _cuda_available() -> bool:
    # Without an NVIDIA driver there is no CUDA; skip the costly torch import on such machines.
    if not os.path.exists("/proc/driver/nvidia/version"):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_backends(matting: str, pose: str) -> dict:
    """Turn the requested backends (``auto`` allowed) into the ones that will run, with a reason."""
    cuda = _cuda_available()
    reason = (
        "auto: the paper-faithful backends (Grounded-SAM, OpenPose) are not part of this build; "
        if cuda
        else "auto: no CUDA device; "
    ) + "using the embedded CPU annotators (MediaPipe)"
    resolved = {
        "matting": "mediapipe" if matting == "auto" else matting,
        "pose": "mediapipe" if pose == "auto" else pose,
        "cuda": cuda,
    }
    resolved["reason"] = reason if "auto" in (matting, pose) else "as requested"
    return resolved


@dataclass
class Annotation:
    matte: Matte
    pose: Pose | None
    present: bool


class FrameAnnotator:
    """Matting and pose for one frame at a time; built once per actor, never per image."""

    def __init__(self, matting: str, pose: str, hands: bool, min_visibility: float, min_mask_area: float,
                 joint_threshold: float = 0.2):
        from disco.pipeline.annotators.mediapipe_backend import (
            MediaPipeEngine,
            MediaPipeMatting,
            MediaPipePose,
        )

        if matting != "mediapipe":
            raise ValueError(f"unknown matting backend {matting!r}")
        if pose not in ("mediapipe", "none"):
            raise ValueError(f"unknown pose backend {pose!r}")
        self.engine = MediaPipeEngine(hands=hands and pose == "mediapipe")
        self.matting = MediaPipeMatting(self.engine)
        self.pose = MediaPipePose(self.engine, joint_threshold) if pose == "mediapipe" else None
        self.min_visibility = min_visibility
        self.min_mask_area = min_mask_area

    def annotate(self, frame: np.ndarray) -> Annotation:
        matte = self.matting.matte(frame)
        present = person_present(matte, self.min_visibility, self.min_mask_area)
        pose = self.pose.pose(frame) if (present and self.pose is not None) else None
        return Annotation(matte=matte, pose=pose, present=present)

    def weight_files(self) -> list[dict]:
        return self.engine.weight_files(self.engine.hands)

    def close(self) -> None:
        self.engine.close()
