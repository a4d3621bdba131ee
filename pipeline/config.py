"""The one configuration object of the preprocessing stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from disco.pipeline.annotators import registry
from disco.pipeline.annotators.grounded_sam import SAM_FILES
from disco.pipeline.annotators.sam2_backend import SAM2_MODELS
from disco.pipeline.cluster import check_ray_address, input_identity
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.schema import SOURCES, SPLITS

SAM_MODELS = tuple(SAM_FILES)
DEVICES = ("auto", "cuda", "cpu")
IMAGE_FORMATS = ("jpeg", "png")
POSE_STYLES = ("openpose", "disco")
MAX_UNIT_TIMEOUT_S = 10_000_000  # about 4 months: faulthandler's watchdog takes little more on some systems


@dataclass
class PreprocessConfig:
    source: str
    input: Path
    output: Path
    matting: str = "auto"
    pose: str = "auto"
    hands: bool = True
    pose_style: str = "openpose"
    # Which drawing `disco` means (recorded in the manifest's parameters): 2 is the official
    # renderer; outputs written before (no value: 1) hold the OpenPose drawing with red and blue
    # swapped under that name, which readers redraw from the keypoints.
    pose_renderer: int = 2
    # A One-Euro filter over each joint of a video unit's poses (pipeline/annotators/smoothing.py).
    smooth_poses: bool = False
    fps: float = 30.0
    max_side: int = 512
    min_side: int = 32
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    split: str = "train"
    # "person present" needs both signals (DESIGN.md): pose visibility and mask area.
    min_visibility: float = 0.5
    # A joint is kept down to a lower visibility (OpenPose renders from 0.05); its confidence is
    # stored, so a consumer can be stricter.
    joint_threshold: float = 0.2
    min_mask_area: float = 0.01
    shard_rows: int = 1024
    row_group_rows: int = 64
    segment_frames: int = 32
    # Seconds one unit of work may take in an actor (0: no limit). A unit past it ends its actor's
    # process (a decoder stuck in native code on a damaged file, a hung mount), which Ray starts
    # again; a unit past it twice is its errors row (``strikes``), so no input holds a run for ever.
    unit_timeout: float = 3600.0
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 0.0
    ray_address: str | None = None
    overwrite: bool = False
    # Error types (errors/ error_type, or "all") whose inputs a resume does again: an input that
    # wrote no rows and failed with one of them leaves the output (its errors rows) and runs again.
    retry_errors: list[str] | None = None
    # The paper-faithful backends (Grounded-SAM, OpenPose): their weights folder and options.
    weights: Path | None = None
    device: str = "auto"
    sam_model: str = "vit_h"
    sam2_model: str = "large"  # the sam2 backend's SAM 2.1 size
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    largest_person: bool = False
    face: bool = False
    half: bool = True
    batch_size: int = 8
    # GPUs per actor of the GPU pipeline's two pools; fractions let both share one GPU.
    matting_gpus: float | None = None
    pose_gpus: float | None = None
    # Filled in when backends are resolved; recorded in the manifest.
    resolved: dict = field(default_factory=dict)
    # Data set sources (tiktok, coco, ...): a YAML describing the layout instead of the built-in one.
    manifest: Path | None = None
    # With a data set source the manifest's split rule decides each row's split; set False to
    # write ``split`` on every row instead (the CLI does when --split is given).
    split_from_manifest: bool = True
    # A named split rule of the data set's manifest (e.g. tiktok's ``official``); None: its own.
    split_rule: str | None = None
    coco_single_person: bool = False
    # filter-humans: rejected frames are counted by reason (no_person, too_small, too_many_people).
    human_filter: bool = False
    max_persons: int | None = None
    keep_rejects: bool = False

    def validate(self) -> "PreprocessConfig":
        check_ray_address(self.ray_address)
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise ConfigError(f"--cpus-per-actor must be above 0, not {self.cpus_per_actor:g}")
        for flag, value in (("--gpus-per-actor", self.gpus_per_actor), ("--matting-gpus", self.matting_gpus),
                            ("--pose-gpus", self.pose_gpus)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} cannot be negative ({value:g})")
        if self.retry_errors is not None:
            self.retry_errors = sorted({t.strip() for value in self.retry_errors for t in str(value).split(",") if t.strip()})
            if not self.retry_errors:
                raise ConfigError("--retry-errors needs an error type (errors/ error_type, e.g. gpu_failed) or all")
            if self.overwrite:
                raise ConfigError("--retry-errors redoes some inputs of an existing output; --overwrite redoes all of it")
        if self.source not in SOURCES and self.manifest is None:
            raise ConfigError(f"unknown source {self.source!r}; choose one of {', '.join(SOURCES)}, "
                              "or describe a new data set with --manifest")
        if self.source in ("video", "images") and self.manifest is not None:
            raise ConfigError(f"--manifest describes a data set; the generic {self.source!r} source takes none")
        if self.split_rule is not None and self.source in ("video", "images"):
            raise ConfigError(f"--split-rule picks a data set manifest's split rule; the generic {self.source!r} "
                              "source has none (use --split)")
        if self.split_rule is not None and not self.split_from_manifest:
            raise ConfigError("give --split (one split for every row) or --split-rule (the manifest's rule), not both")
        if self.coco_single_person and self.source != "coco" and self.manifest is None:
            raise ConfigError("--coco-single-person only applies to --source coco")
        if self.max_persons is not None and self.max_persons < 1:
            raise ConfigError("--max-persons must be at least 1")
        if not Path(self.input).exists():
            raise ConfigError(f"input {self.input} does not exist")
        for role, asked in (("matting", self.matting), ("pose", self.pose)):
            if asked not in registry.choices(role):
                raise ConfigError(f"unknown {role} backend {asked!r}; choose one of {', '.join(registry.choices(role))}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"unknown image format {self.image_format!r}; choose jpeg or png")
        if self.pose_style not in POSE_STYLES:
            raise ConfigError(f"unknown pose style {self.pose_style!r}; choose openpose or disco")
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; choose train or test")
        if self.fps <= 0:
            raise ConfigError("--fps must be positive")
        if self.max_side < self.min_side or self.min_side < 1:
            raise ConfigError("--max-side must be at least --min-side, and both positive")
        if self.shard_rows < 1 or self.row_group_rows < 1 or self.segment_frames < 1:
            raise ConfigError("--shard-rows, --row-group-rows and --segment-frames must be positive")
        if not 0 <= self.unit_timeout <= MAX_UNIT_TIMEOUT_S:  # (nan too) faulthandler takes no more
            raise ConfigError(f"--unit-timeout must be 0 (no limit) to {MAX_UNIT_TIMEOUT_S:,} seconds")
        if self.actors is not None and self.actors < 1:
            raise ConfigError("--actors must be at least 1")
        if self.sam_model not in SAM_MODELS:
            raise ConfigError(f"unknown SAM model {self.sam_model!r}; choose one of {', '.join(SAM_MODELS)}")
        if self.sam2_model not in SAM2_MODELS:
            raise ConfigError(f"unknown SAM 2.1 model {self.sam2_model!r} (--sam2-model); "
                              f"choose one of {', '.join(SAM2_MODELS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        # Scores and a fraction of the picture: a value above 1 (a percentage, `--min-mask-area 2`)
        # rejected every frame without a word.
        for flag, value in (("--box-threshold", self.box_threshold), ("--text-threshold", self.text_threshold),
                            ("--min-visibility", self.min_visibility), ("--joint-threshold", self.joint_threshold),
                            ("--min-mask-area", self.min_mask_area)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} must be between 0 and 1, not {value:g}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be at least 1, not {self.max_pixels}")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        for flag, value in (("--matting-gpus", self.matting_gpus), ("--pose-gpus", self.pose_gpus)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} cannot be negative")
            if value is not None and value > 1 and value != int(value):
                # Ray places a share below 1 inside one GPU; above 1 it takes whole GPUs only.
                raise ConfigError(f"{flag} {value:g}: above 1 a share must be a whole number of GPUs")
        if self.weights is not None and not Path(self.weights).is_dir():
            raise ConfigError(f"--weights {self.weights} is not a folder")
        if self.source not in ("video", "images"):
            from disco.pipeline.sources import resolve_manifest

            resolve_manifest(self)  # a broken manifest is a usage error, before anything runs
        return self

    def output_params(self) -> dict:
        """The options that decide what the rows hold; a resume must use the same ones."""
        keys = (
            "source", "fps", "max_side", "min_side", "max_pixels", "image_format", "jpeg_quality",
            "split", "min_visibility", "joint_threshold", "min_mask_area", "segment_frames", "hands", "pose_style",
            "sam_model", "box_threshold", "text_threshold", "largest_person", "face",
        )
        params = {k: getattr(self, k) for k in keys}
        params["input"] = input_identity(self.input)
        if self.smooth_poses:  # only when on: an output written before it resumes as it was
            params["smooth_poses"] = True
        params["backends"] = {k: self.resolved.get(k) for k in ("matting", "pose")}
        if params["backends"]["matting"] == "grounded-sam" and not self.half:
            # float32 SAM masks differ from half precision's; only when off (the default is on), so an
            # output written before this key resumes as it was.
            params["half"] = False
        if params["backends"]["matting"] == "sam2":
            # Only where it decides the masks: an output written before SAM 2 existed resumes as it was.
            params["sam2_model"] = self.sam2_model
        params.update(self._dataset_params())
        if self.split_rule is not None:  # only when given: an output written before it resumes as it was
            params["split_rule"] = self.split_rule
        return params

    def _dataset_params(self) -> dict:
        if self.source in ("video", "images") and not self.human_filter:
            return {}
        from disco.pipeline.sources import resolve_manifest

        manifest = None if self.source in ("video", "images") else resolve_manifest(self)
        return {
            "dataset_manifest": manifest.digest if manifest else None,
            "split_from_manifest": self.split_from_manifest, "coco_single_person": self.coco_single_person,
            "human_filter": self.human_filter, "max_persons": self.max_persons, "keep_rejects": self.keep_rejects,
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input"] = str(self.input)
        d["output"] = str(self.output)
        d["weights"] = str(self.weights) if self.weights is not None else None
        return d
