"""The settings of ``disco-cli generate``: one config object, checked before any model loads
(light to import: the command line reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from disco.model.precision import dtype_problem, gpus_problem, resolve_device


# Pictures given where a video is asked for (decord's own message about them is of no help).
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class GenerateInputError(ValueError):
    """An input picture, video or clip that cannot drive generation (a user's mistake)."""


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
    device: str = "auto"  # resolve_device: the GPU where there is one
    gpus: int = 1  # frames generated on this many GPUs, from --device's on (``gpu_devices``)
    align_pose: bool = True  # refit the driving skeletons to the reference person (when its pose is found)
    smooth_poses: bool = True  # One-Euro filter over a pose video's keypoints
    ema: bool = True  # a training run's EMA weights where it kept them; False: the weights as trained
    dtype: str = "float32"  # DTYPES: float16 / bfloat16 halve the model's memory and speed a GPU up

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
        if self.fps is not None and not self.fps > 0:  # (NaN too)
            raise GenerateInputError(f"--fps must be positive, not {self.fps:g}")
        if self.max_frames is not None and self.max_frames < 1:
            raise GenerateInputError("--max-frames must be at least 1")
        if self.size is not None and self.size < 1:
            raise GenerateInputError(f"--size must be a positive number of pixels, not {self.size}")
        if not 0 <= self.guidance_scale < float("inf"):  # (NaN sampled every frame, then failed)
            raise GenerateInputError(f"--guidance-scale must be 0 or more (1 turns guidance off), not {self.guidance_scale:g}")
        self.device = resolve_device(self.device)
        problem = dtype_problem(self.dtype, self.device) or gpus_problem(self.gpus, self.device)
        if problem:
            raise GenerateInputError(problem)
        # Every input is checked here, before a model is loaded (seconds to minutes).
        for what, path in (("--checkpoint", self.checkpoint), ("--reference: reference picture", self.reference),
                           ("--pose: pose video or folder", self.pose),
                           ("--background: background picture", self.background)):
            if path is not None and not path.exists():
                raise GenerateInputError(f"{what} {path} does not exist")
        if self.pose.is_dir() and not (self.pose / "triplets").is_dir():
            raise GenerateInputError(f"--pose {self.pose} is a folder but not a `disco-cli preprocess` output (no "
                                     "triplets/): --pose takes a video, or such a folder with --clip")
        from disco.pipeline.sources.generic import UNSUPPORTED_SUFFIXES

        if self.pose.is_file() and self.pose.suffix.lower() in UNSUPPORTED_SUFFIXES["video"]:
            # (decord's words were about "broken metadata")
            raise GenerateInputError(f"--pose {self.pose}: a {self.pose.suffix.lower()} file is not read as a video; "
                                     f"convert it (ffmpeg -i {self.pose.name} pose.mp4)")
        if self.pose.is_file() and self.pose.suffix.lower() in PICTURE_SUFFIXES:
            raise GenerateInputError(f"--pose {self.pose} is a picture: --pose takes a video (or a `disco-cli "
                                     "preprocess` output folder with --clip)")
        self.check_outputs()
        return self

    def outputs(self) -> dict[str, Path]:
        """The files a run writes, by the flag that names them."""
        out = {"--output": self.output, "--output's settings (.json)": self.output.with_suffix(".json")}
        if self.side_by_side:
            out["--side-by-side"] = self.output.with_name(self.output.stem + "_side_by_side.mp4")
        return out

    def check_outputs(self) -> None:
        """Before a model loads: every output can be written, and none is an input (the driving
        video given as --output was overwritten). They were written after every frame was
        sampled, and a folder of the output's name lost them to a traceback."""
        from disco.pipeline.errors import output_file_problem, output_folder_problem
        from disco.pipeline.sources.generic import IMAGE_SUFFIXES, VIDEO_SUFFIXES

        inputs = (self.reference, self.pose, self.background)
        for flag, path in self.outputs().items():
            problem = output_file_problem(path, flag, inputs, reads=IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if problem:
                raise GenerateInputError(problem)
        if self.frames is not None:
            problem = output_folder_problem(self.frames, "--frames")
            if problem:
                raise GenerateInputError(problem)
            if any(path.resolve() == self.frames.resolve() for path in self.outputs().values()):
                raise GenerateInputError(f"--frames {self.frames} is an output file of this run")
            from disco.generate.video import frames_folder_problem

            problem = frames_folder_problem(self.frames)
            if problem:
                raise GenerateInputError(problem)
