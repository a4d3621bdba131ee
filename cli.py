"""``disco-cli``: the command line of the DisCo data pipeline."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    name="disco-cli",
    help="Preprocess dance videos and photos into DisCo training triplets (foreground, background, pose), and train DisCo on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


# The demo's scale: small enough for a few minutes on 2 cores.
DEMO_STEPS = 30
DEMO_RESOLUTION = 64
DEMO_SAMPLE_STEPS = 10
DEMO_FRAMES = 16


def _usage_error(message: str) -> None:
    # A message quotes paths and library errors: its brackets are text, never rich markup.
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


SOURCE_HELP = ("Input kind: video or images (any folder of videos or stills), or a data set in its published "
               "layout: tiktok, coco, shhq, deepfashion2, laion (see manifests/). With --manifest, defaults to its name.")
RAY_ADDRESS_HELP = ("Ray cluster to run on: HOST:PORT, or auto for the one `ray start` runs on this machine "
                    "(default: a private local instance on 127.0.0.1; $DISCO_RAY_TIMEOUT s to reach a cluster, 60).")
MANIFEST_HELP = "A dataset manifest YAML describing a layout (see manifests/*.yaml); replaces the built-in one."


def _source_name(source: Optional[str], manifest: Optional[Path]) -> str:
    """--source, or the name inside --manifest when only that is given."""
    if source:
        return source
    if manifest is None:
        _usage_error("--source is required (or --manifest, whose name then serves as the source)")
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.manifest_yaml import load_manifest

    try:
        return load_manifest(manifest).name
    except ConfigError as exc:
        _usage_error(str(exc))


def _check_device(device: str) -> None:
    """A GPU asked for where there is none is the user's mistake, never a silent fallback to CPU."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        _usage_error(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if kind == "cuda" and not torch.cuda.is_available():
        _usage_error(f"--device {device}: no CUDA device is available on this machine")




def _print_summary(manifest: dict, title: str = "preprocess summary") -> None:
    counts, run = manifest["counts"], manifest["run"]
    table = Table(title=title, show_header=False)
    table.add_row("inputs", f"{counts['inputs']} ({counts['inputs_done']} done, {counts['inputs_failed']} failed, "
                  f"{counts['inputs_pending']} pending)")
    table.add_row("frames", str(counts["frames"]))
    table.add_row("rows written", str(counts["rows_written"]))
    skipped = ", ".join(f"{k}: {v}" for k, v in counts["rows_skipped"].items()) or "none"
    table.add_row("rows skipped", skipped)
    table.add_row("errors", str(counts["errors"]))
    if counts.get("ignored_files"):
        table.add_row("ignored files", f"{counts['ignored_files']} (not media of this source)")
    if manifest.get("filtered_at_listing"):
        table.add_row("left out at listing", ", ".join(f"{k}: {v}" for k, v in manifest["filtered_at_listing"].items()))
    if manifest.get("dataset"):
        dataset = manifest["dataset"]
        table.add_row("data set", f"{dataset['name']} ({dataset['manifest']}); split: {dataset['split_rule'][:60]}"
                      + ("..." if len(dataset["split_rule"]) > 60 else ""))
    if manifest.get("reject_shards"):
        table.add_row("rejects table", f"{sum(s['rows'] for s in manifest['reject_shards'])} rows in rejects/")
    fps = run.get("frames_per_s")
    table.add_row("this run", f"{run['frames_processed']} frames in {run['wall_time_s']:.1f} s"
                  + (f" ({fps:.1f} frames/s)" if fps else ""))
    table.add_row("shards", str(len(manifest["shards"])))
    console.print(table)


class _ProgressBar:
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
        _usage_error(str(exc))
    columns = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"),
               TextColumn("{task.fields[frames]} frames, {task.fields[speed]} frames/s"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress) as bar:
        try:
            result = preprocess(config, progress=_ProgressBar(bar),
                                log=lambda message: bar.console.print(message, highlight=False))
        except ConfigError as exc:
            _usage_error(str(exc))
        except ConnectionError as exc:
            _usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
    _print_summary(result.manifest, f"{title} summary")
    console.print(f"output: {Path(config.output).resolve()}  (manifest.json, triplets/, errors/)")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
    return result.manifest


def run_training(cfg, given: set[str] | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) a training run with a progress bar; returns its summary."""
    from disco.pipeline.errors import ConfigError
    from disco.train.data import DataError
    from disco.train.launch import TrainingFailed
    from disco.train.launch import train as launch_training

    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TextColumn("loss {task.fields[loss]}, {task.fields[speed]} samples/s, data wait {task.fields[wait]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress) as bar:
        task = bar.add_task("train", total=None, loss="-", speed="-", wait="-")

        def on_metrics(m: dict) -> None:
            bar.update(task, completed=m["step"], loss=f"{m['loss']:.4f}", speed=f"{m['samples_per_s']:.1f}",
                       wait=f"{m['data_wait_fraction']:.0%}")

        def log(message: str) -> None:
            bar.console.print(message, highlight=False)
            bar.update(task, total=cfg.max_steps if not cfg.resume else None)

        try:
            summary = launch_training(cfg, given=given, on_metrics=on_metrics, log=log)
        except (ConfigError, DataError) as exc:
            _usage_error(str(exc))
        except ConnectionError as exc:
            _usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
        except TrainingFailed as exc:
            bar.stop()
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        bar.update(task, completed=summary["step"], total=summary["step"])
    if summary.get("interrupted"):
        console.print(f"interrupted: checkpoint of step {summary['step']} written; continue with "
                      f"`disco-cli train --output {cfg.output} --resume`")
        raise typer.Exit(130)
    return summary


def print_memory_plan(cfg, gpu_memory: float | None = None) -> None:
    """``train --dry-run``: the per-GPU memory plan of ``cfg`` as a table (see train/memory.py)."""
    from disco.pipeline.errors import ConfigError
    from disco.train.memory import GIB, host_build_bytes, memory_plan, plan_config, plan_table, visible_gpu_gib

    if gpu_memory is not None and gpu_memory <= 0:
        _usage_error("--gpu-memory must be positive (GiB)")
    try:
        cfg, notes = plan_config(cfg)
        plan = memory_plan(cfg, gpu_memory)
        host = host_build_bytes(cfg)
    except ConfigError as exc:
        _usage_error(str(exc))
    out = Console()
    out.print(plan_table(plan))
    if gpu_memory is None:
        visible = visible_gpu_gib()
        out.print(f"GPU memory: {plan.gpu_memory / GIB:g} GiB ("
                  + ("the visible CUDA GPU" if visible else "no CUDA GPU visible: the default") + "; --gpu-memory to change)")
    out.print(f"host memory to build the model: {host / GIB:,.2f} GiB (every weight once, fp32)")
    for note in notes:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)


def run_generation(config, show_progress: bool = True):
    """Generate a video with a progress bar; a user's mistake is a one-line usage error."""
    from disco.generate.inputs import GenerateInputError
    from disco.generate.run import generate as run_generate

    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not show_progress) as bar:
        task = bar.add_task("generate", total=None)
        try:
            result = run_generate(config, log=lambda m: bar.console.print(m, highlight=False),
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (GenerateInputError, FileNotFoundError) as exc:
            _usage_error(str(exc))
        except ValueError as exc:  # a checkpoint that is not a DisCo model, or one without a pose branch
            _usage_error(str(exc))
    return result


def _annotator_help() -> tuple[str, str, str, str]:
    """The backend options' help, from the annotator registry (a new backend shows up by itself)."""
    from disco.pipeline.annotators import registry

    gpu = " / ".join(b.name for b in registry.backends() if b.gpu)
    return (f"Person matting backend: {registry.describe_choices('matting')}.",
            f"Pose backend: {registry.describe_choices('pose')}.",
            f"Folder of local weights for {gpu} (layout in the README).",
            f"Where {gpu} run: auto (CUDA, else refuse), cuda, or cpu (on purpose, slow).")


MATTING_HELP, POSE_HELP, WEIGHTS_HELP, DEVICE_HELP = _annotator_help()


@app.command()
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
        source=_source_name(source, manifest), manifest=manifest, coco_single_person=coco_single_person,
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


@app.command("filter-humans")
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
            _usage_error(f"{name} must be between 0 and 1")
    if max_persons is not None and max_persons < 1:
        _usage_error("--max-persons must be at least 1")
    if is_triplets_dir(input):
        try:
            result = filter_triplets(input, output, min_score=min_score, min_area=min_area, max_persons=max_persons,
                                     keep_rejects=keep_rejects, overwrite=overwrite, shard_rows=shard_rows,
                                     log=lambda message: console.print(message, highlight=False))
        except ConfigError as exc:
            _usage_error(str(exc))
        _print_summary(result.manifest, "filter-humans summary")
        console.print(f"output: {Path(output).resolve()}")
        if result.exit_code:
            raise typer.Exit(result.exit_code)
        return
    config = PreprocessConfig(
        source=_source_name(source, manifest), input=input, output=output, manifest=manifest, matting=matting,
        pose="auto" if with_pose else "none", hands=with_pose, max_side=max_side, image_format=image_format,
        split=split or "train", split_from_manifest=split is None, min_visibility=min_score,
        min_mask_area=min_area, segment_frames=segment_frames, shard_rows=shard_rows, actors=actors,
        ray_address=ray_address, overwrite=overwrite, coco_single_person=coco_single_person, human_filter=True,
        max_persons=max_persons, keep_rejects=keep_rejects, weights=weights, device=device, sam_model=sam_model,
        box_threshold=box_threshold, batch_size=batch_size,
    )
    run_preprocess(config, show_progress=progress, title="filter-humans")


@app.command()
def doctor(
    weights: Optional[Path] = typer.Option(None, envvar="DISCO_WEIGHTS", help="Weights folder to check (layout in the README)."),
    sam_model: str = typer.Option("vit_h", help="SAM variant to look for: vit_h, vit_l or vit_b."),
    hands: bool = typer.Option(True, "--hands/--no-hands", help="Look for the OpenPose hand model."),
    face: bool = typer.Option(False, "--face/--no-face", help="Look for the OpenPose face model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report CUDA, GPUs, which annotator backends can run here and which weights were found."""
    import json

    from disco.pipeline.config import SAM_MODELS
    from disco.pipeline.doctor import diagnose

    if sam_model not in SAM_MODELS:
        _usage_error(f"unknown SAM model {sam_model!r}; choose one of {', '.join(SAM_MODELS)}")
    if weights is not None and not weights.is_dir():
        _usage_error(f"--weights {weights} is not a folder")
    report = diagnose(weights, sam_model=sam_model, hands=hands, face=face)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    out = Console()
    gpus = ", ".join(report["gpus"]) or "none"
    out.print(f"CUDA: {'yes' if report['cuda'] else 'no'}   GPUs: {gpus}   torch {report['torch']}")
    out.print(f"weights folder: {report['weights_dir'] or 'not set (--weights / $DISCO_WEIGHTS)'}")
    table = Table(title="annotator backends")
    for column in ("backend", "role", "can run", "why not"):
        table.add_column(column)
    for b in report["backends"]:
        table.add_row(b["name"], b["role"], "yes" if b["can_run"] else "no", "; ".join(b["problems"]))
    out.print(table)
    files = Table(title="weight files")
    for column in ("file", "for", "found"):
        files.add_column(column)
    for f in report["files"]:
        files.add_row(f["name"], f["purpose"], "yes" if f["present"] else f"no (expected at {f['path']})")
    out.print(files)


@app.command()
def inspect(
    output: Path = typer.Argument(..., help="An output folder written by `disco-cli preprocess`."),
    sheet: Optional[Path] = typer.Option(None, help="Where to write the contact sheet PNG (default OUTPUT/contact_sheet.png)."),
    rows: int = typer.Option(8, min=1, help="Rows to show on the contact sheet."),
) -> None:
    """Print the manifest summary, schema and counts of an output folder, and write a contact sheet."""
    import pyarrow as pa

    from disco.pipeline.errors import ConfigError
    from disco.pipeline.contact_sheet import write_contact_sheet
    from disco.pipeline.errors import first_line
    from disco.pipeline.manifest import read_manifest
    from disco.pipeline.reader import open_errors, open_triplets
    from disco.pipeline.schema import MANIFEST_FILE

    if not (output / MANIFEST_FILE).exists():
        _usage_error(f"{output} holds no {MANIFEST_FILE}; is it a `disco-cli preprocess` output?")
    manifest = read_manifest(output / MANIFEST_FILE)
    try:  # every shard's footer is checked here, before anything is printed
        triplets, errors = open_triplets(output), open_errors(output)
    except ConfigError as exc:
        _usage_error(str(exc))
    out = Console()
    out.print(f"[bold]{output}[/bold]  written by: {manifest['command']}")
    backends = manifest["backends"]
    out.print(f"backends: matting={backends['matting']['name']} pose={backends['pose']['name']} ({backends['reason']})")
    _print_summary(manifest)
    schema = Table(title="triplet schema")
    schema.add_column("column")
    schema.add_column("type")
    for field in triplets.schema:
        schema.add_row(field.name, str(field.type))
    out.print(schema)
    counts = Table(title="rows on disk")
    counts.add_column("table")
    counts.add_column("rows", justify="right")
    counts.add_column("files", justify="right")
    counts.add_row("triplets", str(triplets.count_rows()), str(len(triplets.files)))
    counts.add_row("errors", str(errors.count_rows()), str(len(errors.files)))
    out.print(counts)
    if errors.count_rows():
        try:
            by_type = errors.to_table(columns=["error_type"]).column("error_type").value_counts().to_pylist()
        except (OSError, pa.ArrowException) as exc:  # damaged pages, as above
            _usage_error(f"an errors shard of {output} cannot be read ({first_line(exc)})")
        out.print("errors by type: " + ", ".join(f"{d['values']}: {d['counts']}" for d in by_type))
    target = sheet or output / "contact_sheet.png"
    try:
        shown = write_contact_sheet(triplets, target, rows)
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the sheet could not be saved: not the shards' fault
        # pyarrow on damaged pages: an OSError without errno, or one of its own
        _usage_error(f"a shard of {output} cannot be read ({first_line(exc)}); "
                     "the shards are damaged: write the output again with `disco-cli preprocess ... --overwrite`")
    out.print(f"contact sheet ({shown} rows): {target.resolve()}")


@app.command("model-info")
def model_info(
    config: str = typer.Option("sd-image-variations", help="Architecture: sd-image-variations, small or tiny."),
    variant: str = typer.Option("finetune", help="pretrain (HAP, no pose branch) or finetune."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Parameter counts of the DisCo model, built without weights (meta device)."""
    import json

    import torch

    from disco.model.configs import CONFIGS
    from disco.model.disco import VARIANTS, DisCoModel, parameter_counts

    if config not in CONFIGS:
        _usage_error(f"unknown configuration {config!r}; choose one of {', '.join(CONFIGS)}")
    if variant not in VARIANTS:
        _usage_error(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    with torch.device("meta"):
        model = DisCoModel.from_architecture(config, variant=variant)
    counts = parameter_counts(model)
    if as_json:
        typer.echo(json.dumps(counts))
        return
    table = Table(title=f"DisCo {variant} ({config})")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    trainable = sum(p.numel() for p in model.trainable_parameters().values())
    for part, n in counts.items():
        table.add_row(part, f"{n / 1e6:,.1f} M")
    table.add_row("trainable in this stage", f"{trainable / 1e6:,.1f} M")
    Console().print(table)


@app.command()
def generate(
    checkpoint: Path = typer.Option(..., help="A DisCoModel.save_pretrained folder, or a training run / checkpoint folder."),
    reference: Path = typer.Option(..., help="Photo of the person (and, without --background, the scene)."),
    pose: Path = typer.Option(..., help="Video to take the pose sequence from, or a `preprocess` output folder with --clip."),
    output: Path = typer.Option(..., "--output", "-o", help="The generated video (.mp4); a .json with the settings is written beside it."),
    clip: Optional[str] = typer.Option(None, help="With --pose TRIPLETS_DIR: the clip_id whose stored poses drive the model."),
    background: Optional[Path] = typer.Option(None, help="Put the person into this scene instead of the reference's own background."),
    steps: int = typer.Option(50, help="DDIM steps."),
    guidance_scale: float = typer.Option(1.5, help="Classifier-free guidance scale on the reference (1 turns guidance off)."),
    seed: int = typer.Option(0, help="Seed of the initial noise; the same seed gives the same frames."),
    batch_size: int = typer.Option(8, help="Frames generated at once."),
    fps: Optional[float] = typer.Option(None, help="Frame rate of the output (and the rate the pose video is resampled to); default: the pose source's."),
    size: Optional[int] = typer.Option(None, help="Side of the square frames (default: the model's resolution, 256 for the full model)."),
    max_frames: Optional[int] = typer.Option(None, help="Generate only the first N pose frames."),
    frames: Optional[Path] = typer.Option(None, help="Also write every generated frame as PNG into this folder."),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Also write OUTPUT_side_by_side.mp4: pose | generated."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
) -> None:
    """Generate a dance video: the person of --reference, in its own or another scene, moving as --pose."""
    from disco.generate.run import GenerateConfig

    _check_device(device)
    config = GenerateConfig(
        checkpoint=checkpoint, reference=reference, pose=pose, output=output, clip=clip, background=background,
        steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, fps=fps, size=size,
        frames=frames, side_by_side=side_by_side, max_frames=max_frames, device=device,
    )
    result = run_generation(config)
    console.print(f"wrote {result.video.resolve()}: {result.frames} frames, {result.size} x {result.size} px, "
                  f"{result.fps:g} fps, in {result.seconds:.1f} s")
    for extra in (result.side_by_side, result.frames_dir):
        if extra is not None:
            console.print(f"wrote {extra.resolve()}")


@app.command()
def export(
    checkpoint: Path = typer.Option(..., help="A DisCoModel.save_pretrained folder, or a training run / checkpoint folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for unet/, controlnet_pose/ and controlnet_background/."),
) -> None:
    """Write a checkpoint's UNet and ControlNets as diffusers folders, each loadable with from_pretrained."""
    from disco.generate.checkpoint import load_checkpoint

    try:
        model = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError: not a DisCo checkpoint
        _usage_error(str(exc))
    for folder in model.export_diffusers(output):
        console.print(f"wrote {folder.resolve()}")


@app.command()
def evaluate(
    pred: Optional[Path] = typer.Option(None, help="Generated frames or videos (a video, a folder of videos, of frames, or of frame folders)."),
    gt: Optional[Path] = typer.Option(None, help="The real frames or videos, laid out and named like --pred."),
    run: Optional[Path] = typer.Option(None, help="A checkpoint (save_pretrained folder or training run) to generate --data's split with."),
    data: Optional[Path] = typer.Option(None, help="With --run: a `preprocess` output folder (triplets)."),
    split: str = typer.Option("test", help="With --run: the split to generate and score."),
    output: Path = typer.Option(Path("metrics.json"), "--output", "-o", help="The JSON report (scores, counts, settings)."),
    work_dir: Optional[Path] = typer.Option(None, help="With --run: where pred/ and gt/ frames go (default: OUTPUT without .json)."),
    metrics: str = typer.Option("all", help="Comma-separated: fid, ssim, psnr, lpips, l1, fid-vid, fvd, or all."),
    weights: Optional[Path] = typer.Option(None, envvar="DISCO_WEIGHTS", help="Folder holding the feature networks' files under their standard names."),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights (weights-inception-2015-12-05-6726825d.pth)."),
    vgg16: Optional[Path] = typer.Option(None, help="VGG-16 ImageNet weights for LPIPS (torchvision vgg16-397923af.pth)."),
    fid_vid_net: Optional[Path] = typer.Option(None, help="Weights of the FID-VID video network (default r3d_18-b3b3357e.pth)."),
    fvd_net: Optional[Path] = typer.Option(None, help="Weights of the FVD video network (default s3d-d76dad2f.pth)."),
    fid_vid_arch: str = typer.Option("r3d_18", help="FID-VID network: r3d_18, r2plus1d_18, mc3_18 or s3d."),
    fvd_arch: str = typer.Option("s3d", help="FVD network: s3d, r3d_18, r2plus1d_18 or mc3_18."),
    batch_size: int = typer.Option(16, help="Frames (or 16-frame clips) per forward pass; also frames generated at once with --run."),
    steps: int = typer.Option(50, help="With --run: DDIM steps."),
    guidance_scale: float = typer.Option(1.5, help="With --run: guidance scale."),
    seed: int = typer.Option(0, help="With --run: seed."),
    size: Optional[int] = typer.Option(None, help="With --run: frame side (default: the model's resolution)."),
    max_frames: Optional[int] = typer.Option(None, help="With --run: only the first N frames of each clip."),
    device: str = typer.Option("cpu", help="torch device for generation and the feature networks, e.g. cpu or cuda."),
) -> None:
    """Score generated frames against real ones: FID, SSIM, PSNR, LPIPS, L1, FID-VID, FVD."""
    from disco.evaluate.networks import VIDEO_NETS, WeightsError
    from disco.evaluate.run import EvaluateConfig, EvaluateInputError, NetworkConfig, parse_metrics
    from disco.evaluate.run import evaluate as run_evaluate
    from disco.generate.inputs import GenerateInputError

    _check_device(device)
    for name, arch in (("--fid-vid-arch", fid_vid_arch), ("--fvd-arch", fvd_arch)):
        if arch not in VIDEO_NETS:
            _usage_error(f"{name}: unknown video network {arch!r}; choose one of {', '.join(VIDEO_NETS)}")
    try:
        config = EvaluateConfig(
            output=output, pred=pred, gt=gt, run=run, data=data, split=split, work_dir=work_dir,
            metrics=parse_metrics(metrics), batch_size=batch_size, steps=steps, guidance_scale=guidance_scale,
            seed=seed, size=size, max_frames=max_frames, device=device,
            networks=NetworkConfig(weights=weights, inception=inception, vgg16=vgg16, fid_vid_net=fid_vid_net,
                                   fvd_net=fvd_net, fid_vid_arch=fid_vid_arch, fvd_arch=fvd_arch),
        )
        report = run_evaluate(config, log=lambda m: console.print(m, highlight=False))
    except (EvaluateInputError, GenerateInputError, WeightsError, FileNotFoundError) as exc:
        _usage_error(str(exc))
    except ValueError as exc:  # a checkpoint that is not a DisCo model, or one without a pose branch
        _usage_error(str(exc))
    counts = report["counts"]
    table = Table(title="scores")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name.upper(), f"{value:.3e}" if name == "l1" else f"{value:.4f}")
    Console().print(table)
    console.print(f"{counts['sequences']} sequences, {counts['frames']} frames, {counts['clips']} clips of 16 frames; "
                  f"report: {output.resolve()}")


@app.command()
def train(
    stage: Optional[str] = typer.Option(None, help="pretrain (human-attribute pre-training on stills) or finetune (with pose). Default finetune."),
    data: Optional[list[Path]] = typer.Option(None, "--data", "-d", help="A `disco-cli preprocess` output folder; repeat for several."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The run directory: config.yaml, checkpoints, logs/, samples/."),
    pretrained: Optional[Path] = typer.Option(None, help="Local sd-image-variations folder (diffusers layout) to start from."),
    model: Optional[str] = typer.Option(None, help="Start from random weights of a named architecture instead (tiny, small, sd-image-variations)."),
    init_from: Optional[Path] = typer.Option(None, help="Fine-tune from this pre-training (HAP) run: its UNet, projection and background ControlNet."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options (dashes or underscores); flags override it."),
    ref_mode: Optional[str] = typer.Option(None, help="Fine-tuning reference frame: first (the clip's first frame, default) or random."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution in pixels (default 256)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random crops of DisCo's recipe (default on); off: centre crop."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps to train (default 1000)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per worker per micro-batch (default 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default 1)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: pretrain 1e-3, finetune 2e-4)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps (default 10% of the schedule), then linear decay to 0."),
    schedule_steps: Optional[int] = typer.Option(None, help="Length of the learning-rate schedule (default --max-steps, fixed when the run starts; on --resume a new value stretches the decay from the current rate)."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Clip the gradient norm to this (default: no clipping)."),
    ema_decay: Optional[float] = typer.Option(None, help="Keep an EMA of the weights with this decay (default: none, as in DisCo)."),
    mixed_precision: Optional[str] = typer.Option(None, help="no, fp16 (GPU) or bf16 (default no)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory (default off)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the data order, crops, noise and (with --model) the random weights (default 0)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Write a checkpoint every N steps (default 500, and at the end)."),
    keep: Optional[int] = typer.Option(None, help="Checkpoints to keep (default 3)."),
    sample_every: Optional[int] = typer.Option(None, help="Write a reference | pose | generated | target grid every N steps (default 500)."),
    sample_steps: Optional[int] = typer.Option(None, help="DDIM steps for the sample grids (default 50)."),
    log_every: Optional[int] = typer.Option(None, help="Log scalars every N steps (default 10)."),
    num_workers: Optional[int] = typer.Option(None, help="Data-parallel training workers through Ray Train (default 1: in this process)."),
    use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-use-gpu", help="Train on GPUs, one per worker (default off)."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    max_failures: Optional[int] = typer.Option(None, help="Restarts from the last checkpoint after a lost worker or node (Ray Train workers; default 3)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest checkpoint of --output with its saved configuration."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-GPU memory plan of this run (weights, gradients, AdamW, EMA, activations at --batch-size) and the largest batch that fits, then exit: nothing is allocated, no data is read, no Ray is started."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GPU memory in GiB the --dry-run plan must fit (default: the visible CUDA GPU's, else 80)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train DisCo on preprocessed triplets: --stage pretrain (HAP) or finetune; resumable."""
    from disco.pipeline.errors import ConfigError
    from disco.train.config import TrainConfig

    flags = dict(stage=stage, data=[str(d) for d in data] if data else None, output=str(output) if output else None,
                 pretrained=str(pretrained) if pretrained else None, model=model,
                 init_from=str(init_from) if init_from else None, ref_mode=ref_mode, resolution=resolution,
                 augment=augment, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                 warmup_steps=warmup_steps, schedule_steps=schedule_steps, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
                 mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
                 checkpoint_every=checkpoint_every, keep=keep, sample_every=sample_every, sample_steps=sample_steps,
                 log_every=log_every, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address,
                 max_failures=max_failures)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        cfg = cfg.updated({**given, "resume": resume})
    except ConfigError as exc:
        _usage_error(str(exc))
    if dry_run:
        print_memory_plan(cfg, gpu_memory)
        return
    summary = run_training(cfg, given=set(given), show_progress=progress)
    console.print(f"trained to step {summary['step']}: loss {summary['loss']:.4f}, "
                  f"{summary['skipped_rows']} undecodable rows skipped")
    console.print(f"run: {Path(cfg.output).resolve()}  (config.yaml, checkpoint-*/, logs/ for TensorBoard, samples/)")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Folder for the demo's inputs and results."),
    steps: int = typer.Option(DEMO_STEPS, help="Training steps of each stage (pre-training, then fine-tuning)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """The whole journey on photos and a clip that ship with installed packages: preprocess, a short
    tiny-model pre-training and fine-tuning, and a generated clip."""
    import shutil

    from disco.generate.run import GenerateConfig
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.contact_sheet import write_contact_sheet
    from disco.pipeline.demo_data import DEMO_CLIP, write_demo_images, write_demo_video
    from disco.pipeline.reader import open_triplets
    from disco.train.config import TrainConfig

    if steps < 1:
        _usage_error("--steps must be at least 1")
    images_in, videos_in = output / "inputs" / "images", output / "inputs" / "videos"
    write_demo_images(images_in)
    write_demo_video(videos_in)
    console.print(f"[bold]1/4 preprocess[/bold]: {images_in.resolve()} and {videos_in.resolve()}")
    triplets = {}
    for source, folder in (("images", images_in), ("video", videos_in)):
        out = output / f"triplets-{source}"
        run_preprocess(PreprocessConfig(source=source, input=folder, output=out, overwrite=True),
                       show_progress=progress)
        write_contact_sheet(open_triplets(out), out / "contact_sheet.png", 8)
        triplets[source] = out
    # A demo always starts over: a run folder left by an earlier demo would be refused (resume).
    runs = {"pretrain": output / "run-pretrain", "finetune": output / "run-finetune"}
    for run in runs.values():
        shutil.rmtree(run, ignore_errors=True)
    common = dict(model="tiny", resolution=DEMO_RESOLUTION, batch_size=2, max_steps=steps, checkpoint_every=steps,
                  sample_every=steps, sample_steps=DEMO_SAMPLE_STEPS, sample_count=2, log_every=5)
    console.print("[bold]2/4 pre-train[/bold] (human attributes, on every still and frame)")
    summary = run_training(TrainConfig(stage="pretrain", data=[str(triplets["images"]), str(triplets["video"])],
                                       output=str(runs["pretrain"]), **common), show_progress=progress)
    console.print(f"  step {summary['step']}, loss {summary['loss']:.4f}")
    console.print("[bold]3/4 fine-tune[/bold] (with pose, on the clip)")
    summary = run_training(TrainConfig(stage="finetune", data=[str(triplets["video"])], output=str(runs["finetune"]),
                                       init_from=str(runs["pretrain"]), **common), show_progress=progress)
    console.print(f"  step {summary['step']}, loss {summary['loss']:.4f}")
    console.print("[bold]4/4 generate[/bold] (the astronaut photo, moving as the clip's stored poses)")
    video = output / "generated.mp4"
    result = run_generation(GenerateConfig(
        checkpoint=runs["finetune"], reference=images_in / "astronaut.png", pose=triplets["video"], clip=DEMO_CLIP,
        output=video, steps=DEMO_SAMPLE_STEPS, size=DEMO_RESOLUTION, max_frames=DEMO_FRAMES, side_by_side=True,
    ), show_progress=progress)

    console.print("\n[bold green]demo finished[/bold green] (a tiny model trained for seconds: expect noise, not dancers)")
    for source, out in triplets.items():
        console.print(f"  {source:7s} triplets: {(out / 'triplets').resolve()}")
        console.print(f"  {source:7s} contact sheet: {(out / 'contact_sheet.png').resolve()}")
    for stage, run in runs.items():
        console.print(f"  {stage:8s} run: {run.resolve()}  (checkpoints, logs/ for TensorBoard, samples/*.png)")
    console.print(f"  generated clip: {result.video.resolve()}  ({result.frames} frames)")
    console.print(f"  pose | generated: {result.side_by_side.resolve()}")
    console.print(f"look inside with: disco-cli inspect {triplets['images']}")


def main() -> None:
    # MediaPipe (the in-process annotators of generate / demo) logs its start-up through glog and
    # TensorFlow Lite; nothing in it is for a user.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype")
    app(prog_name="disco-cli")


if __name__ == "__main__":
    sys.exit(main())
