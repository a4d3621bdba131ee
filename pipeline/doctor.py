"""What `disco-cli doctor` reports: CUDA, GPUs, which annotator backends can run, which weights exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from disco.pipeline.annotators import cuda_available
from disco.pipeline.annotators.weights import WEIGHTS_ENV, grounded_sam_files, openpose_files, weights_dir

# The Python packages each backend imports.
PACKAGES = {
    "mediapipe": ("mediapipe",),
    "grounded-sam": ("segment_anything", "transformers"),
    "openpose": ("controlnet_aux",),
}


def _gpus() -> list[str]:
    if not cuda_available():
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _torch_version() -> str:
    import torch

    return torch.__version__


def diagnose(weights: str | Path | None, *, sam_model: str = "vit_h", hands: bool = True, face: bool = False) -> dict:
    root = weights_dir(weights)
    cuda = cuda_available()
    files = {"grounded-sam": [], "openpose": []}
    if root is not None:
        files = {"grounded-sam": grounded_sam_files(root, sam_model), "openpose": openpose_files(root, hands, face)}
    backends = []
    for name, roles in (("mediapipe", "matting, pose"), ("grounded-sam", "matting"), ("openpose", "pose")):
        problems = [f"package {p} is not installed" for p in PACKAGES[name] if importlib.util.find_spec(p) is None]
        if name != "mediapipe":
            if not cuda:
                problems.append("no CUDA device (--device cpu runs it on the CPU on purpose)")
            if root is None:
                problems.append(f"no weights folder (--weights or ${WEIGHTS_ENV})")
            missing = [f.name for f in files[name] if not f.present]
            if missing:
                problems.append("missing " + ", ".join(missing))
        backends.append({"name": name, "role": roles, "can_run": not problems, "problems": problems})
    return {
        "cuda": cuda,
        "gpus": _gpus(),
        "torch": _torch_version(),
        "weights_dir": str(root) if root else None,
        "backends": backends,
        "files": [
            {"name": f.name, "purpose": f.purpose, "present": f.present, "path": str(f.path)}
            for group in files.values() for f in group
        ],
    }
