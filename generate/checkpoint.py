"""The one place that turns a path into a DisCo model for inference."""

from __future__ import annotations

import json
from pathlib import Path

from disco.model.disco import DisCoModel

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def is_pretrained_folder(path: Path) -> bool:
    """A ``DisCoModel.save_pretrained`` folder: its config names the class and the weights are safetensors."""
    config = path / "config.json"
    if not (config.is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == DisCoModel.__name__
    except (OSError, ValueError):
        return False


def load_checkpoint(path: str | Path, device: str = "cpu") -> DisCoModel:
    """A ``save_pretrained`` folder, or (through the trainer's ``load_model``) a training run or
    one of its checkpoints; the model comes back in eval mode on ``device``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_pretrained_folder(path):
        model = DisCoModel.from_pretrained(path, local_files_only=True)
    else:
        from disco.train.checkpoint import load_model

        model = load_model(path, device=device)
    return model.to(device).eval()
