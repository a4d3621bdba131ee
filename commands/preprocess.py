"""``preprocess`` and ``filter-humans``: data sets in, triplets out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disco.commands.terminal import RAY_ADDRESS_HELP, console, usage_error
from disco.commands.report import print_summary


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
    from disco.pipeline.manifest_yaml import load_manifest

    try:
        return load_manifest(manifest).name
    except ConfigError as exc:
        usage_error(str(exc))



class ProgressBar:
    """Adapts a rich progress bar to the pipeline's progress callbacks."""

    # Where no terminal shows the bar (a `ray job submit` log, a redirected file): a line this often.
    LINE_EVERY_S = 10.0

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = bar.add_task("preprocess", total=None, frames=0, speed="-")
        self.frames = 0
        self.inputs = 0
        self.total = None
        self.started = time.time()
        self.lines = not bar.console.is_terminal and not bar.disable
        self.last_line = self.started

    def start(self, total_inputs: int) -> None:
        self.started = self.last_line = time.time()
        self.total = total_inputs
        self.bar.update(self.task, total=total_inputs)

    def update(self, inputs: int, frames: int) -> None:
        self.frames += frames
        self.inputs += inputs
        now = time.time()
        rate = self.frames / max(1e-6, now - self.started)
        self.bar.update(self.task, advance=inputs, frames=self.frames, speed=f"{rate:.1f}")
        if self.lines and (now - self.last_line >= self.LINE_EVERY_S or self.inputs == self.total):
            self.last_line = now
            self.bar.console.print(f"progress: {self.inputs}/{self.total} inputs, {self.frames} frames, "
                                   f"{rate:.1f} frames/s", highlight=False)


def run_preprocess(config, show_progress: bool = True, title: str = "preprocess") -> dict:
    """Run a preprocess job with a progress bar and a summary; returns the manifest."""
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.run import preprocess

    try:
        config.validate()
    except ConfigError as exc:
        usage_error(str(exc))
    columns = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"),
               TextColumn("{task.fields[frames]} frames, {task.fields[speed]} frames/s"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress) as bar:
        try:
            result = preprocess(config, progress=ProgressBar(bar),
                                log=lambda message: bar.console.print(message, highlight=False))
        except ConfigError as exc:
            usage_error(str(exc))
        except ConnectionError as exc:
            usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
    print_summary(result.manifest, f"{title} summary")
    console.print(f"output: {Path(config.output).resolve()}  (manifest.json, triplets/, errors/)")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
    return result.manifest



def _annotator_help() -> tuple[str, str, str, str]:
    """The backend options' help, from the annotator registry (a new backend shows up by itself)."""
    from disco.pipeline.annotators import registry

    gpu = " / ".join(b.name for b in registry.backends() if b.gpu)
    return (f"Person matting backend: {registry.describe_choices('matting')}.",
            f"Pose backend: {registry.describe_choices('pose')}.",
            f"Folder of local weights for {gpu} (layout in the README).",
            f"Where {gpu} run: auto (CUDA, else refuse), cuda, or cpu (on purpose, slow).")


MATTING_HELP, POSE_HELP, WEIGHTS_HELP, DEVICE_HELP = _annotator_help()


def preprocess(
    source: Optional[str] = typer.Option(None, help=SOURCE_HELP),
    input: Path = typer.Option(..., "--input", "-i", help="Folder (or single file) to read."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: triplets/, errors/, manifest.json."),
    manifest: Optional[Path] = typer.Option(None, help=MANIFEST_HELP),
    coco_single_person: bool = typer.Option(False, help="coco: keep only images with exactly one annotated person."),
    matting: str = typer.Option("auto", help=MATTING_HELP),
    pose: str = typer.Option("auto", help=POSE_HELP),
    hands: bool = typer.Option(True, "--hands/--no-hands", help="Also estimate hand keypoints."),
    face: bool = typer.Option(False, "--face/--no-face", help="Also estimate OpenPose's 70 face keypoints (openpose only)."),
    weights: Optional[Path] = typer.Option(None, envvar="DISCO_WEIGHTS", help=WEIGHTS_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    sam_model: str = typer.Option("vit_h", help="SAM variant for grounded-sam: vit_h, vit_l or vit_b."),
    box_threshold: float = typer.Option(0.3, help="GroundingDINO box threshold (grounded-sam): the person detection score."),
    text_threshold: float = typer.Option(0.25, help="GroundingDINO text threshold (grounded-sam)."),
    largest_person: bool = typer.Option(False, "--largest-person/--all-persons", help="grounded-sam: keep only the largest person's mask instead of merging all."),
    half: bool = typer.Option(True, "--half/--no-half", help="Half precision for SAM's image encoder on CUDA."),
    batch_size: int = typer.Option(8, help="Frames per batch through GroundingDINO and SAM's image encoder."),
    matting_gpus: Optional[float] = typer.Option(None, help="GPUs per matting actor of the GPU pipeline (default 0.5 on CUDA)."),
    pose_gpus: Optional[float] = typer.Option(None, help="GPUs per pose actor of the GPU pipeline (default 0.5 on CUDA)."),
    pose_style: str = typer.Option("openpose", help="Skeleton colours: openpose, or disco (red/blue swapped as in the official renders)."),
    fps: float = typer.Option(30.0, help="Frame rate to resample videos to (a slower source is never up-sampled)."),
    max_side: int = typer.Option(512, help="Shrink pictures so the long side is at most this many pixels."),
    min_side: int = typer.Option(32, help="Reject inputs whose short side is below this."),
    max_pixels: int = typer.Option(89_478_485, help="Reject inputs with more pixels than this."),
    image_format: str = typer.Option("jpeg", help="Encoding of image, foreground and background: jpeg or png (mask and pose are always PNG)."),
    jpeg_quality: int = typer.Option(95, min=1, max=100, help="JPEG quality."),
    split: Optional[str] = typer.Option(None, help="Split written for every row (train or test). Default: the data set manifest's split rule; train for video and images."),
    min_visibility: float = typer.Option(0.5, help="Minimum detection score (nose and shoulder visibility) for a person."),
    joint_threshold: float = typer.Option(0.2, help="Minimum visibility for a joint to be stored with a confidence (else 0)."),
    min_mask_area: float = typer.Option(0.01, help="Minimum fraction of the picture the person mask must cover."),
    shard_rows: int = typer.Option(1024, help="Rows per Parquet shard."),
    row_group_rows: int = typer.Option(64, help="Rows per Parquet row group (the streaming unit)."),
    segment_frames: int = typer.Option(32, help="Frames per unit of work when splitting videos."),
    actors: Optional[int] = typer.Option(None, help="Annotator actors (default: one per CPU of the Ray cluster)."),
    cpus_per_actor: Optional[float] = typer.Option(None, help="CPUs per annotator actor (default: fits the cluster)."),
    gpus_per_actor: float = typer.Option(0.0, help="GPUs per annotator actor (fractions allowed)."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    overwrite: bool = typer.Option(False, help="Delete what a previous run wrote to OUTPUT and start fresh."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Turn videos or photos into foreground / background / pose triplets in Parquet."""
    from disco.pipeline.config import PreprocessConfig

    config = PreprocessConfig(
        source=source_name(source, manifest), manifest=manifest, coco_single_person=coco_single_person,
        split_from_manifest=split is None, input=input, output=output, matting=matting, pose=pose, hands=hands,
        pose_style=pose_style, fps=fps, max_side=max_side, min_side=min_side, max_pixels=max_pixels,
        image_format=image_format, jpeg_quality=jpeg_quality, split=split or "train", min_visibility=min_visibility,
        joint_threshold=joint_threshold, min_mask_area=min_mask_area, shard_rows=shard_rows, row_group_rows=row_group_rows,
        segment_frames=segment_frames, actors=actors, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor, ray_address=ray_address, overwrite=overwrite,
        face=face, weights=weights, device=device, sam_model=sam_model, box_threshold=box_threshold,
        text_threshold=text_threshold, largest_person=largest_person, half=half, batch_size=batch_size,
        matting_gpus=matting_gpus, pose_gpus=pose_gpus,
    )
    run_preprocess(config, show_progress=progress)


def filter_humans(
    input: Path = typer.Option(..., "--input", "-i", help="The data set (as for preprocess), or an existing triplets folder to filter by its stored scores."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder, with the same contract as preprocess (plus rejects/ with --keep-rejects)."),
    source: Optional[str] = typer.Option(None, help=SOURCE_HELP + " Not needed for a triplets folder."),
    manifest: Optional[Path] = typer.Option(None, help=MANIFEST_HELP),
    min_score: float = typer.Option(0.5, help="Keep a picture only if a person is detected with at least this score."),
    min_area: float = typer.Option(0.05, help="... and the person mask covers at least this fraction of the picture."),
    max_persons: Optional[int] = typer.Option(None, help="... and at most this many persons are detected (default: no limit)."),
    with_pose: bool = typer.Option(False, help="Also estimate the pose (default: matting only, the pre-training set needs no pose)."),
    keep_rejects: bool = typer.Option(False, help="Write every rejected picture's reason, score, area and person count to rejects/*.parquet."),
    coco_single_person: bool = typer.Option(False, help="coco: keep only images with exactly one annotated person."),
    split: Optional[str] = typer.Option(None, help="Split written for every row (default: the manifest's split rule)."),
    matting: str = typer.Option("auto", help=MATTING_HELP),
    weights: Optional[Path] = typer.Option(None, envvar="DISCO_WEIGHTS", help=WEIGHTS_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    sam_model: str = typer.Option("vit_h", help="SAM variant for grounded-sam: vit_h, vit_l or vit_b."),
    box_threshold: float = typer.Option(0.3, help="GroundingDINO box threshold (grounded-sam)."),
    batch_size: int = typer.Option(8, help="Frames per batch through GroundingDINO and SAM's image encoder."),
    max_side: int = typer.Option(512, help="Shrink pictures so the long side is at most this many pixels."),
    image_format: str = typer.Option("jpeg", help="Encoding of image, foreground and background: jpeg or png."),
    segment_frames: int = typer.Option(32, help="Frames (or shard members) per unit of work."),
    shard_rows: int = typer.Option(1024, help="Rows per Parquet shard."),
    actors: Optional[int] = typer.Option(None, help="Annotator actors (default: one per CPU of the Ray cluster)."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    overwrite: bool = typer.Option(False, help="Delete what a previous run wrote to OUTPUT and start fresh."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Build the human-attribute pre-training set: keep pictures with one clear, large enough person."""
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.filter import filter_triplets, is_triplets_dir

    for name, value in (("--min-score", min_score), ("--min-area", min_area)):
        if not 0.0 <= value <= 1.0:
            usage_error(f"{name} must be between 0 and 1")
    if max_persons is not None and max_persons < 1:
        usage_error("--max-persons must be at least 1")
    if is_triplets_dir(input):
        try:
            result = filter_triplets(input, output, min_score=min_score, min_area=min_area, max_persons=max_persons,
                                     keep_rejects=keep_rejects, overwrite=overwrite, shard_rows=shard_rows,
                                     log=lambda message: console.print(message, highlight=False))
        except ConfigError as exc:
            usage_error(str(exc))
        print_summary(result.manifest, "filter-humans summary")
        console.print(f"output: {Path(output).resolve()}")
        if result.exit_code:
            raise typer.Exit(result.exit_code)
        return
    config = PreprocessConfig(
        source=source_name(source, manifest), input=input, output=output, manifest=manifest, matting=matting,
        pose="auto" if with_pose else "none", hands=with_pose, max_side=max_side, image_format=image_format,
        split=split or "train", split_from_manifest=split is None, min_visibility=min_score,
        min_mask_area=min_area, segment_frames=segment_frames, shard_rows=shard_rows, actors=actors,
        ray_address=ray_address, overwrite=overwrite, coco_single_person=coco_single_person, human_filter=True,
        max_persons=max_persons, keep_rejects=keep_rejects, weights=weights, device=device, sam_model=sam_model,
        box_threshold=box_threshold, batch_size=batch_size,
    )
    run_preprocess(config, show_progress=progress, title="filter-humans")
