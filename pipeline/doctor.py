"""What `disco-cli doctor` reports: CUDA, GPUs, which annotator backends can run, which weights exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from disco.pipeline.annotators import cuda_available
from disco.pipeline.annotators.registry import backends
from disco.pipeline.annotators.weights import WEIGHTS_ENV, weights_dir


def _gpus() -> list[str]:
    if not cuda_available():
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _torch_version() -> str:
    import torch

    return torch.__version__


def diagnose(weights: str | Path | None, *, sam_model: str = "vit_h", sam2_model: str = "large", hands: bool = True,
             face: bool = False) -> dict:
    root = weights_dir(weights)
    cuda = cuda_available()
    options = {"sam_model": sam_model, "sam2_model": sam2_model, "hands": hands, "face": face}
    report, files = [], []
    for backend in backends():
        problems = [f"package {p} is not installed" for p in backend.packages if importlib.util.find_spec(p) is None]
        needed = backend.files(root, options) if backend.files is not None and root is not None else []
        if backend.gpu:
            if not cuda:
                problems.append("no CUDA device (--device cpu runs it on the CPU on purpose)")
            if root is None:
                problems.append(f"no weights folder (--weights or ${WEIGHTS_ENV})")
        missing = [f.name for f in needed if not f.present]
        if missing:
            problems.append("missing " + ", ".join(missing))
        report.append({"name": backend.name, "role": ", ".join(backend.roles), "about": backend.summary,
                       "options": list(backend.options), "can_run": not problems, "problems": problems})
        files += needed
    return {
        "cuda": cuda,
        "gpus": _gpus(),
        "torch": _torch_version(),
        "weights_dir": str(root) if root else None,
        "backends": report,
        "files": [{"name": f.name, "purpose": f.purpose, "present": f.present, "path": str(f.path)} for f in files],
    }
