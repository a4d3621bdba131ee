"""What a run reports (rank 0 only): TensorBoard scalars, ``metrics.jsonl`` (read by the console
progress bar, also when training runs in Ray Train workers) and PNG sample grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

METRICS_FILE = "metrics.jsonl"
LOG_DIR = "logs"
SAMPLES_DIR = "samples"


class Monitor:
    def __init__(self, run: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run = Path(run)
        self.writer = SummaryWriter(str(self.run / LOG_DIR))
        self._metrics = open(self.run / METRICS_FILE, "a")

    def log(self, step: int, values: dict[str, float]) -> None:
        """Scalars under ``train/`` in TensorBoard, unless their name has its own group (``eval/loss``)."""
        for name, value in values.items():
            self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics.flush()
        self.writer.flush()

    def grid(self, step: int, columns: list[torch.Tensor]) -> Path:
        """One row per sample, one column per picture (each B x 3 x H x W in [0, 1])."""
        size = columns[-1].shape[-1]  # the training resolution (the CLIP reference is 224)
        tiles = [torch.nn.functional.interpolate(c.float().cpu(), size=(size, size), mode="bilinear",
                                                 align_corners=False) for c in columns]
        rows = torch.stack(tiles, dim=1).permute(0, 2, 3, 1, 4).reshape(len(tiles[0]), 3, size, size * len(tiles))
        picture = torch.cat(list(rows), dim=1)
        array = (picture.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = self.run / SAMPLES_DIR / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        self.writer.add_image("samples/reference|pose|generated|target", array, step, dataformats="HWC")
        self.writer.flush()
        return path

    def close(self) -> None:
        self.writer.close()
        self._metrics.close()


def read_metrics(run: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """New complete lines of ``metrics.jsonl`` from byte ``offset``; returns them and the new offset."""
    path = Path(run) / METRICS_FILE
    if not path.exists():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    lines = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return lines, offset + end
