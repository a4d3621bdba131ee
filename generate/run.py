"""``disco-cli generate``: a person, a background and a pose sequence -> a video."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from disco.generate.checkpoint import load_checkpoint
from disco.model.conditioning import background_pixels, check_size, default_size, pose_pixels, pose_size, reference_pixels
from disco.generate.inputs import (
    GenerateInputError,
    matte_reference,
    poses_from_triplets,
    poses_from_video,
    read_picture,
)
from disco.model.pipeline import DisCoPipeline
from disco.generate.video import side_by_side, write_frames, write_video


@dataclass
class GenerateConfig:
    checkpoint: Path
    reference: Path
    pose: Path  # a video, or a `preprocess` output folder with ``clip``
    output: Path
    clip: str | None = None
    background: Path | None = None
    steps: int = 50
    guidance_scale: float = 1.5
    seed: int = 0
    batch_size: int = 8
    fps: float | None = None  # default: the pose source's frame rate
    size: int | None = None  # default: the model's resolution
    frames: Path | None = None
    side_by_side: bool = False
    max_frames: int | None = None
    device: str = "cpu"

    def validate(self) -> "GenerateConfig":
        if self.output.suffix.lower() != ".mp4":
            raise GenerateInputError(f"--output must be an .mp4 file, not {self.output.name!r}")
        if self.pose.is_dir() and self.clip is None:
            raise GenerateInputError(f"{self.pose} is a folder: name the clip to take poses from with --clip")
        if self.clip is not None and not self.pose.is_dir():
            raise GenerateInputError("--clip needs --pose to be a `disco-cli preprocess` output folder")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise GenerateInputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.fps is not None and self.fps <= 0:
            raise GenerateInputError("--fps must be positive")
        if self.max_frames is not None and self.max_frames < 1:
            raise GenerateInputError("--max-frames must be at least 1")
        if self.size is not None and self.size < 1:
            raise GenerateInputError(f"--size must be a positive number of pixels, not {self.size}")
        if self.guidance_scale < 0:
            raise GenerateInputError("--guidance-scale must be 0 or more (1 turns guidance off)")
        # Every input is checked here, before a model is loaded (seconds to minutes).
        for what, path in (("--checkpoint", self.checkpoint), ("--reference: reference picture", self.reference),
                           ("--pose: pose video or folder", self.pose),
                           ("--background: background picture", self.background)):
            if path is not None and not path.exists():
                raise GenerateInputError(f"{what} {path} does not exist")
        return self


@dataclass
class GenerateResult:
    video: Path
    frames: int
    size: int
    fps: float
    empty_poses: int
    seconds: float
    side_by_side: Path | None = None
    frames_dir: Path | None = None


def conditions_from_reference(pipeline: DisCoPipeline, reference: np.ndarray, size: int,
                              background: np.ndarray | None = None, annotator=None):
    """Reference photo (and optional other scene) -> the CLIP input and background tensors."""
    matted = matte_reference(reference, size, annotator)
    scene = matted.background if background is None else background
    return reference_pixels(matted.image, matted.alpha), background_pixels(scene, size)


def open_pipeline(checkpoint: Path, device: str, size: int | None) -> tuple[DisCoPipeline, int, int]:
    """The sampling pipeline of a checkpoint, the frame side (default: the model's) and the pose side."""
    model = load_checkpoint(checkpoint, device=device)
    pipeline = DisCoPipeline(model)
    size = size or default_size(model)
    try:
        check_size(model, size)
    except ValueError as exc:
        raise GenerateInputError(f"--size: {exc}") from None
    return pipeline, size, pose_size(model, size)


def generate(config: GenerateConfig, log: Callable[[str], None] = print,
             progress: Callable[[int, int], None] | None = None) -> GenerateResult:
    config.validate()
    started = time.time()
    pipeline, size, side = open_pipeline(config.checkpoint, config.device, config.size)
    reference = read_picture(config.reference, "reference picture")
    background = read_picture(config.background, "background picture") if config.background else None
    reference_in, background_in = conditions_from_reference(pipeline, reference, size, background)
    if config.clip is not None:
        poses = poses_from_triplets(config.pose, config.clip, side)
    else:
        poses = poses_from_video(config.pose, side, fps=config.fps)
    frames_in = poses.frames[:config.max_frames] if config.max_frames else poses.frames
    if poses.empty:
        log(f"{poses.empty} of {len(poses.frames)} pose frames show no person: they get an empty skeleton")
    log(f"generating {len(frames_in)} frames of {size} x {size} px, {config.steps} DDIM steps, "
        f"guidance {config.guidance_scale}, seed {config.seed}")
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(frames_in))

    frames = pipeline(reference_in, background_in, pose_pixels(frames_in, side), num_inference_steps=config.steps,
                      guidance_scale=config.guidance_scale, seed=config.seed, batch_size=config.batch_size,
                      progress=step)
    fps = config.fps or poses.fps
    write_video(config.output, list(frames), fps)
    result = GenerateResult(video=config.output, frames=len(frames), size=size, fps=fps, empty_poses=poses.empty,
                            seconds=0.0)
    if config.side_by_side:
        result.side_by_side = config.output.with_name(config.output.stem + "_side_by_side.mp4")
        write_video(result.side_by_side, side_by_side(frames_in, frames), fps)
    if config.frames is not None:
        write_frames(config.frames, frames)
        result.frames_dir = config.frames
    result.seconds = time.time() - started
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    record = {"settings": settings, "frames": result.frames, "size": size, "fps": fps,
              "empty_poses": poses.empty, "wall_time_s": round(result.seconds, 3)}
    config.output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return result
