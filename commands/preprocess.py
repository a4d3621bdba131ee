"""``preprocess`` and ``filter-humans``: data sets in, triplets out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disco.commands.terminal import (RAY_ADDRESS_HELP, ProgressLines, choices, clear_progress, console, defaults, plain,
                                     print_error, say, usage_error)
from disco.commands.report import print_summary
from disco.pipeline.annotators import registry
from disco.pipeline.config import DEVICES, IMAGE_FORMATS, POSE_STYLES, SAM2_MODELS, SAM_MODELS, PreprocessConfig
from disco.pipeline.store.schema import SPLITS


SOURCE_HELP = ("Input kind: video or images (any folder of videos or stills), or a data set in its published "
               "layout: tiktok, coco, shhq, deepfashion2, laion (see manifests/). With --manifest, defaults to its name.")
MANIFEST_HELP = "A dataset manifest YAML describing a layout (see manifests/*.yaml); replaces the built-in one."


def source_name(source: Optional[str], manifest: Optional[Path]) -> str:
    """--source, or the name inside --manifest when only that is given."""
    if source:
        return source
    if manifest is None:
        usage_error("--source is required (or --manifest, whose name then serves as the source)")
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.sources.dataset_manifest import load_manifest

    try:
        return load_manifest(manifest).name
    except ConfigError as exc:
        usage_error(str(exc))



class ProgressBar:
    """Adapts a rich progress bar to the pipeline's progress callbacks."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = bar.add_task("preprocess", total=None, frames=0, speed="-")
        self.frames = 0
        self.inputs = 0
        self.total = None
        self.started = time.time()
        self.lines = ProgressLines(bar, first_after_s=ProgressLines.EVERY_S)

    def start(self, total_inputs: int) -> None:
        self.started = time.time()
        self.total = total_inputs
        self.bar.update(self.task, total=total_inputs)

    def update(self, inputs: int, frames: int) -> None:
        self.frames += frames
        self.inputs += inputs
        rate = self.frames / max(1e-6, time.time() - self.started)
        self.bar.update(self.task, advance=inputs, frames=self.frames, speed=f"{rate:.1f}")
        self.lines.say(f"{self.inputs}/{self.total} inputs, {self.frames} frames, {rate:.1f} frames/s",
                       final=self.inputs == self.total)


def run_preprocess(config, show_progress: bool = True, title: str = "preprocess") -> dict:
    """Run a preprocess job with a progress bar and a summary; returns the manifest."""
    from disco.pipeline.errors import ConfigError, RunFailed
    from disco.pipeline.run import preprocess

    from disco.pipeline.cluster import check_job_paths, refuse_urls

    try:
        refuse_urls(input=config.input, output=config.output)
        check_job_paths(output=config.output)
        config.validate()
    except ConfigError as exc:
        usage_error(str(exc))
    columns = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"),
               TextColumn("{task.fields[frames]} frames, {task.fields[speed]} frames/s"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress) as bar:
        try:
            result = preprocess(config, progress=ProgressBar(bar),
                                log=lambda message: say(message, bar.console))
        except ConfigError as exc:
            clear_progress(bar)
            usage_error(str(exc))
        except ConnectionError as exc:
            clear_progress(bar)
            usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
        except RunFailed as exc:
            clear_progress(bar)
            failed = exc
        else:
            failed = None
    if failed is not None:  # what was committed, then the error in one line (Ray's logs hold its traceback)
        if failed.manifest is not None:
            print_summary(failed.manifest, f"{title} summary")
        print_error(f"{failed}; what the actors committed is kept ({Path(config.output).resolve()}), and the same "
                    "command finishes the rest")
        raise typer.Exit(1)
    print_summary(result.manifest, f"{title} summary")
    rejects = ", rejects/" if getattr(config, "keep_rejects", False) else ""
    say(f"output: {Path(config.output).resolve()}  (manifest.json, triplets/, errors/{rejects})")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
    return result.manifest



def _annotator_help() -> tuple[str, str, str, str]:
    """The backend options' help, from the annotator registry (a new backend shows up by itself)."""
    gpu = " / ".join(b.name for b in registry.backends() if b.gpu)
    return (f"Person matting backend: {registry.describe_choices('matting')}.",
            f"Pose backend: {registry.describe_choices('pose')}.",
            f"Folder of local weights for {gpu} (layout in the README).",
            f"Where {gpu} run: auto (CUDA, else refuse), cuda, or cpu (on purpose, slow).")


MATTING_HELP, POSE_HELP, WEIGHTS_HELP, DEVICE_HELP = _annotator_help()
D = defaults(PreprocessConfig)
Matting = choices("matting backend", registry.choices("matting"))
PoseBackend = choices("pose backend", registry.choices("pose"))
Device = choices("device", DEVICES)
SamModel = choices("SAM model", SAM_MODELS)
Sam2Model = choices("SAM 2 model", SAM2_MODELS)
PoseStyle = choices("pose style", POSE_STYLES)
ImageFormat = choices("image format", IMAGE_FORMATS)
Split = choices("split", SPLITS)

Input = Annotated[Path, typer.Option("--input", "-i", help="Folder (or single file) to read.")]
Source = Annotated[Optional[str], typer.Option(help=SOURCE_HELP)]
Manifest = Annotated[Optional[Path], typer.Option(help=MANIFEST_HELP)]
CocoSinglePerson = Annotated[bool, typer.Option(help="coco: keep only images with exactly one annotated person.")]
SplitRuleName = Annotated[Optional[str], typer.Option(help="A named split rule of the data set's manifest instead of its own (tiktok: official, the official DisCo code's split).")]
Weights = Annotated[Optional[Path], typer.Option(envvar="DISCO_WEIGHTS", help=WEIGHTS_HELP)]
DeviceOption = Annotated[Device, typer.Option(help=DEVICE_HELP)]
SamModelOption = Annotated[SamModel, typer.Option(help="SAM variant for grounded-sam.")]
Sam2ModelOption = Annotated[Sam2Model, typer.Option(
    help="SAM 2.1 size for sam2: tiny, small, base_plus or large (checkpoint sam2/sam2.1_hiera_<size>.pt).")]
BatchSize = Annotated[int, typer.Option(help="Frames per batch through GroundingDINO and SAM's image encoder.")]
MaxSide = Annotated[int, typer.Option(help="Shrink pictures so the long side is at most this many pixels.")]
ShardRows = Annotated[int, typer.Option(help="Rows per Parquet shard.")]
Actors = Annotated[Optional[int], typer.Option(help="Annotator actors (default: one per CPU of the Ray cluster).")]
RayAddress = Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP)]
Overwrite = Annotated[bool, typer.Option(help="Delete what a previous run wrote to OUTPUT and start fresh.")]
RetryErrors = Annotated[Optional[list[str]], typer.Option(
    help="Run again the inputs that wrote no rows and failed with this error type (errors/ error_type, e.g. "
         "gpu_failed, worker_crashed, gpu_out_of_memory, missing_file; repeat it or separate with commas; all: every "
         "type); their errors rows go.")]
UnitTimeout = Annotated[float, typer.Option(
    help="Seconds one unit of work (a still, or --segment-frames frames) may take in an actor; past it the actor's "
         "process ends and Ray starts it again, and a unit past it twice is its errors row (unit_timeout): a decoder "
         "stuck on a damaged file or a hung mount never holds the run. 0: no limit.")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
# The actors' resources and the GPU backends' settings: preprocess and filter-humans run the same pools.
TextThreshold = Annotated[float, typer.Option(help="GroundingDINO text threshold (grounded-sam, sam2).")]
Half = Annotated[bool, typer.Option("--half/--no-half", help="Half precision for SAM's image encoder on CUDA.")]
MattingGpus = Annotated[Optional[float], typer.Option(help="GPUs per matting actor of the GPU pipeline (default 0.5 on CUDA).")]
PoseGpus = Annotated[Optional[float], typer.Option(help="GPUs per pose actor of the GPU pipeline (default 0.5 on CUDA).")]
CpusPerActor = Annotated[Optional[float], typer.Option(help="CPUs per annotator actor (default: fits the cluster).")]
GpusPerActor = Annotated[float, typer.Option(help="GPUs per annotator actor of the CPU pipeline (fractions allowed); the GPU backends' actors take --matting-gpus / --pose-gpus.")]


def preprocess(
    input: Input,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: triplets/, errors/, manifest.json.")],
    source: Source = None,
    manifest: Manifest = None,
    coco_single_person: CocoSinglePerson = D.coco_single_person,
    matting: Annotated[Matting, typer.Option(help=MATTING_HELP)] = D.matting,
    pose: Annotated[PoseBackend, typer.Option(help=POSE_HELP)] = D.pose,
    hands: Annotated[bool, typer.Option("--hands/--no-hands", help="Also estimate hand keypoints.")] = D.hands,
    face: Annotated[bool, typer.Option("--face/--no-face", help="Also estimate OpenPose's 70 face keypoints (openpose only).")] = D.face,
    weights: Weights = D.weights,
    device: DeviceOption = D.device,
    sam_model: SamModelOption = D.sam_model,
    sam2_model: Sam2ModelOption = D.sam2_model,
    box_threshold: Annotated[float, typer.Option(help="GroundingDINO box threshold (grounded-sam, sam2): the person detection score.")] = D.box_threshold,
    text_threshold: TextThreshold = D.text_threshold,
    largest_person: Annotated[bool, typer.Option("--largest-person/--all-persons", help="grounded-sam: keep only the largest person's mask instead of merging all.")] = D.largest_person,
    half: Half = D.half,
    batch_size: BatchSize = D.batch_size,
    matting_gpus: MattingGpus = D.matting_gpus,
    pose_gpus: PoseGpus = D.pose_gpus,
    pose_style: Annotated[PoseStyle, typer.Option(help="Skeleton drawing: openpose, or disco (the official DisCo drawing: body only, joints first, limbs blended over them 0.4 / 0.6).")] = D.pose_style,
    smooth_poses: Annotated[bool, typer.Option("--smooth-poses/--no-smooth-poses", help="Smooth each joint's track through a video (One-Euro filter, confidence-aware; stills are never smoothed). Recorded in the manifest.")] = D.smooth_poses,
    fps: Annotated[float, typer.Option(help="Frame rate to resample videos to (a slower source is never up-sampled).")] = D.fps,
    max_side: MaxSide = D.max_side,
    min_side: Annotated[int, typer.Option(help="Reject inputs whose short side is below this.")] = D.min_side,
    max_pixels: Annotated[int, typer.Option(help="Reject inputs with more pixels than this.")] = D.max_pixels,
    image_format: Annotated[ImageFormat, typer.Option(help="Encoding of image, foreground and background (mask and pose are always PNG).")] = D.image_format,
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = D.jpeg_quality,
    split: Annotated[Optional[Split], typer.Option(help="Split written for every row. Default: the data set manifest's split rule; train for video and images.")] = None,
    split_rule: SplitRuleName = None,
    min_visibility: Annotated[float, typer.Option(help="Minimum detection score (nose and shoulder visibility) for a person.")] = D.min_visibility,
    joint_threshold: Annotated[float, typer.Option(help="Minimum visibility for a joint to be stored with a confidence (else 0).")] = D.joint_threshold,
    min_mask_area: Annotated[float, typer.Option(help="Minimum fraction of the picture the person mask must cover.")] = D.min_mask_area,
    shard_rows: ShardRows = D.shard_rows,
    row_group_rows: Annotated[int, typer.Option(help="Rows per Parquet row group (the streaming unit).")] = D.row_group_rows,
    segment_frames: Annotated[int, typer.Option(help="Frames per unit of work when splitting videos.")] = D.segment_frames,
    unit_timeout: UnitTimeout = D.unit_timeout,
    actors: Actors = D.actors,
    cpus_per_actor: CpusPerActor = D.cpus_per_actor,
    gpus_per_actor: GpusPerActor = D.gpus_per_actor,
    ray_address: RayAddress = D.ray_address,
    overwrite: Overwrite = D.overwrite,
    retry_errors: RetryErrors = None,
    progress: ShowProgress = True,
) -> None:
    """Turn videos or photos into foreground / background / pose triplets in Parquet."""
    # Every other option is the PreprocessConfig field of its name.
    options = {name: plain(value) for name, value in locals().items() if name not in ("source", "split", "progress")}
    config = PreprocessConfig(source=source_name(source, manifest), split=plain(split) or D.split,
                              split_from_manifest=split is None, **options)
    run_preprocess(config, show_progress=progress)


# What filtering a triplets folder by its stored scores uses; the other options choose models,
# sizes, splits or a cluster for a data set's run, and are refused there (they did nothing).
TRIPLETS_OPTIONS = {"input", "output", "source", "min_score", "min_area", "max_persons", "keep_rejects", "overwrite",
                    "shard_rows", "progress"}  # (--source: its help says it is not needed there, not refused)


def _unused_on_triplets(ctx: typer.Context) -> list[str]:
    """The options given on the command line that a triplets folder's filtering does not use
    (an environment's, such as a job's RAY_ADDRESS, is no user's choice)."""
    def typed(param) -> bool:  # (by its name: typer's click need not be the one installed as click)
        source = ctx.get_parameter_source(param.name)
        return source is not None and source.name == "COMMANDLINE"

    return [param.opts[0] for param in ctx.command.params if param.name not in TRIPLETS_OPTIONS and typed(param)]


def filter_humans(
    ctx: typer.Context,
    input: Annotated[Path, typer.Option("--input", "-i", help="The data set (as for preprocess), or an existing triplets folder to filter by its stored scores.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder, with the same contract as preprocess (plus rejects/ with --keep-rejects).")],
    source: Annotated[Optional[str], typer.Option(help=SOURCE_HELP + " Not needed for a triplets folder.")] = None,
    manifest: Manifest = None,
    min_score: Annotated[float, typer.Option(help="Keep a picture only if a person is detected with at least this score.")] = D.min_visibility,
    min_area: Annotated[float, typer.Option(help="... and the person mask covers at least this fraction of the picture.")] = 0.05,
    max_persons: Annotated[Optional[int], typer.Option(help="... and at most this many persons are detected (default: no limit).")] = D.max_persons,
    with_pose: Annotated[bool, typer.Option(help="Also estimate the pose (default: matting only, the pre-training set needs no pose).")] = False,
    keep_rejects: Annotated[bool, typer.Option(help="Write every rejected picture's reason, score, area and person count to rejects/*.parquet.")] = D.keep_rejects,
    coco_single_person: CocoSinglePerson = D.coco_single_person,
    split: Annotated[Optional[Split], typer.Option(help="Split written for every row (default: the manifest's split rule).")] = None,
    split_rule: SplitRuleName = None,
    matting: Annotated[Matting, typer.Option(help=MATTING_HELP)] = D.matting,
    weights: Weights = D.weights,
    device: DeviceOption = D.device,
    sam_model: SamModelOption = D.sam_model,
    sam2_model: Sam2ModelOption = D.sam2_model,
    box_threshold: Annotated[float, typer.Option(help="GroundingDINO box threshold (grounded-sam, sam2).")] = D.box_threshold,
    text_threshold: TextThreshold = D.text_threshold,
    half: Half = D.half,
    batch_size: BatchSize = D.batch_size,
    matting_gpus: MattingGpus = D.matting_gpus,
    pose_gpus: PoseGpus = D.pose_gpus,
    max_side: MaxSide = D.max_side,
    image_format: Annotated[ImageFormat, typer.Option(help="Encoding of image, foreground and background.")] = D.image_format,
    segment_frames: Annotated[int, typer.Option(help="Frames (or shard members) per unit of work.")] = D.segment_frames,
    unit_timeout: UnitTimeout = D.unit_timeout,
    shard_rows: ShardRows = D.shard_rows,
    actors: Actors = D.actors,
    cpus_per_actor: CpusPerActor = D.cpus_per_actor,
    gpus_per_actor: GpusPerActor = D.gpus_per_actor,
    ray_address: RayAddress = D.ray_address,
    overwrite: Overwrite = D.overwrite,
    retry_errors: RetryErrors = None,
    progress: ShowProgress = True,
) -> None:
    """Build the human-attribute pre-training set: keep pictures with one clear, large enough person."""
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.filter import filter_triplets, is_triplets_dir

    for name, value in (("--min-score", min_score), ("--min-area", min_area)):
        if not 0.0 <= value <= 1.0:
            usage_error(f"{name} must be between 0 and 1")
    if max_persons is not None and max_persons < 1:
        usage_error("--max-persons must be at least 1")
    from disco.pipeline.store.output import unfinished_run

    unfinished = unfinished_run(input)
    if unfinished:  # (neither a data set nor a triplets folder to filter yet)
        usage_error(f"--input {unfinished}")
    if is_triplets_dir(input):
        if retry_errors:
            usage_error("--retry-errors reruns inputs of a data set; a triplets folder is filtered by its stored scores")
        unused = _unused_on_triplets(ctx)
        if unused:
            usage_error(f"{', '.join(unused)}: not used on a triplets folder, which is filtered by its stored scores "
                        "(no model runs; its rows keep their split, size and encoding); filter the data set itself "
                        "(--input DATA --source NAME) to choose them")
        if shard_rows < 1:
            usage_error("--shard-rows must be positive")
        from disco.pipeline.cluster import check_job_paths, refuse_urls

        try:
            refuse_urls(output=output)
            check_job_paths(output=output)
            result = filter_triplets(input, output, min_score=min_score, min_area=min_area, max_persons=max_persons,
                                     keep_rejects=keep_rejects, overwrite=overwrite, shard_rows=shard_rows,
                                     log=say)
        except ConfigError as exc:
            usage_error(str(exc))
        print_summary(result.manifest, "filter-humans summary")
        say(f"output: {Path(output).resolve()}")
        if result.exit_code:
            raise typer.Exit(result.exit_code)
        return
    config = PreprocessConfig(
        source=source_name(source, manifest), input=input, output=output, manifest=manifest, matting=plain(matting),
        pose="auto" if with_pose else "none", hands=with_pose, max_side=max_side, image_format=plain(image_format),
        split=plain(split) or D.split, split_from_manifest=split is None, split_rule=split_rule, min_visibility=min_score,
        min_mask_area=min_area, segment_frames=segment_frames, unit_timeout=unit_timeout, shard_rows=shard_rows,
        actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, matting_gpus=matting_gpus,
        pose_gpus=pose_gpus, text_threshold=text_threshold, half=half, ray_address=ray_address, overwrite=overwrite, retry_errors=retry_errors, coco_single_person=coco_single_person,
        human_filter=True,
        max_persons=max_persons, keep_rejects=keep_rejects, weights=weights, device=plain(device),
        sam_model=plain(sam_model), sam2_model=plain(sam2_model), box_threshold=box_threshold, batch_size=batch_size,
    )
    run_preprocess(config, show_progress=progress, title="filter-humans")
