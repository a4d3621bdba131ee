"""``disco-cli``: the command line of the DisCo data pipeline."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
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


def _usage_error(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _print_summary(manifest: dict) -> None:
    counts, run = manifest["counts"], manifest["run"]
    table = Table(title="preprocess summary", show_header=False)
    table.add_row("inputs", f"{counts['inputs']} ({counts['inputs_done']} done, {counts['inputs_failed']} failed, "
                  f"{counts['inputs_pending']} pending)")
    table.add_row("frames", str(counts["frames"]))
    table.add_row("rows written", str(counts["rows_written"]))
    skipped = ", ".join(f"{k}: {v}" for k, v in counts["rows_skipped"].items()) or "none"
    table.add_row("rows skipped", skipped)
    table.add_row("errors", str(counts["errors"]))
    if counts.get("ignored_files"):
        table.add_row("ignored files", f"{counts['ignored_files']} (not media of this source)")
    fps = run.get("frames_per_s")
    table.add_row("this run", f"{run['frames_processed']} frames in {run['wall_time_s']:.1f} s"
                  + (f" ({fps:.1f} frames/s)" if fps else ""))
    table.add_row("shards", str(len(manifest["shards"])))
    console.print(table)


class _ProgressBar:
    """Adapts a rich progress bar to the pipeline's progress callbacks."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = bar.add_task("preprocess", total=None, frames=0, speed="-")
        self.frames = 0
        self.started = time.time()

    def start(self, total_inputs: int) -> None:
        self.started = time.time()
        self.bar.update(self.task, total=total_inputs)

    def update(self, inputs: int, frames: int) -> None:
        self.frames += frames
        rate = self.frames / max(1e-6, time.time() - self.started)
        self.bar.update(self.task, advance=inputs, frames=self.frames, speed=f"{rate:.1f}")


def run_preprocess(config, show_progress: bool = True) -> dict:
    """Run a preprocess job with a progress bar and a summary; returns the manifest."""
    from disco.pipeline.config import ConfigError
    from disco.pipeline.run import preprocess

    try:
        config.validate()
    except ConfigError as exc:
        _usage_error(str(exc))
    columns = [TextColumn("[bold]preprocess"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"),
               TextColumn("{task.fields[frames]} frames, {task.fields[speed]} frames/s"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress) as bar:
        try:
            result = preprocess(config, progress=_ProgressBar(bar),
                                log=lambda message: bar.console.print(message, highlight=False))
        except ConfigError as exc:
            _usage_error(str(exc))
        except ConnectionError as exc:
            _usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
    _print_summary(result.manifest)
    console.print(f"output: {Path(config.output).resolve()}  (manifest.json, triplets/, errors/)")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
    return result.manifest


@app.command()
def preprocess(
    source: str = typer.Option(..., help="Input kind: video (a folder of videos) or images (a folder of stills)."),
    input: Path = typer.Option(..., "--input", "-i", help="Folder (or single file) to read."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: triplets/, errors/, manifest.json."),
    matting: str = typer.Option("auto", help="Person matting backend: auto or mediapipe."),
    pose: str = typer.Option("auto", help="Pose backend: auto, mediapipe or none."),
    hands: bool = typer.Option(True, "--hands/--no-hands", help="Also estimate hand keypoints."),
    pose_style: str = typer.Option("openpose", help="Skeleton colours: openpose, or disco (red/blue swapped as in the official renders)."),
    fps: float = typer.Option(30.0, help="Frame rate to resample videos to (a slower source is never up-sampled)."),
    max_side: int = typer.Option(512, help="Shrink pictures so the long side is at most this many pixels."),
    min_side: int = typer.Option(32, help="Reject inputs whose short side is below this."),
    max_pixels: int = typer.Option(89_478_485, help="Reject inputs with more pixels than this."),
    image_format: str = typer.Option("jpeg", help="Encoding of image, foreground and background: jpeg or png (mask and pose are always PNG)."),
    jpeg_quality: int = typer.Option(95, min=1, max=100, help="JPEG quality."),
    split: str = typer.Option("train", help="Split written for every row: train or test."),
    min_visibility: float = typer.Option(0.5, help="Minimum detection score (nose and shoulder visibility) for a person."),
    joint_threshold: float = typer.Option(0.2, help="Minimum visibility for a joint to be stored with a confidence (else 0)."),
    min_mask_area: float = typer.Option(0.01, help="Minimum fraction of the picture the person mask must cover."),
    shard_rows: int = typer.Option(1024, help="Rows per Parquet shard."),
    row_group_rows: int = typer.Option(64, help="Rows per Parquet row group (the streaming unit)."),
    segment_frames: int = typer.Option(32, help="Frames per unit of work when splitting videos."),
    actors: Optional[int] = typer.Option(None, help="Annotator actors (default: one per CPU of the Ray cluster)."),
    cpus_per_actor: Optional[float] = typer.Option(None, help="CPUs per annotator actor (default: fits the cluster)."),
    gpus_per_actor: float = typer.Option(0.0, help="GPUs per annotator actor (fractions allowed)."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Existing Ray cluster to run on (default: a local instance)."),
    overwrite: bool = typer.Option(False, help="Delete what a previous run wrote to OUTPUT and start fresh."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Turn videos or photos into foreground / background / pose triplets in Parquet."""
    from disco.pipeline.config import PreprocessConfig

    config = PreprocessConfig(
        source=source, input=input, output=output, matting=matting, pose=pose, hands=hands,
        pose_style=pose_style, fps=fps, max_side=max_side, min_side=min_side, max_pixels=max_pixels,
        image_format=image_format, jpeg_quality=jpeg_quality, split=split, min_visibility=min_visibility,
        joint_threshold=joint_threshold, min_mask_area=min_mask_area, shard_rows=shard_rows, row_group_rows=row_group_rows,
        segment_frames=segment_frames, actors=actors, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor, ray_address=ray_address, overwrite=overwrite,
    )
    run_preprocess(config, show_progress=progress)


@app.command()
def inspect(
    output: Path = typer.Argument(..., help="An output folder written by `disco-cli preprocess`."),
    sheet: Optional[Path] = typer.Option(None, help="Where to write the contact sheet PNG (default OUTPUT/contact_sheet.png)."),
    rows: int = typer.Option(8, min=1, help="Rows to show on the contact sheet."),
) -> None:
    """Print the manifest summary, schema and counts of an output folder, and write a contact sheet."""
    from disco.pipeline.contact_sheet import write_contact_sheet
    from disco.pipeline.manifest import read_manifest
    from disco.pipeline.reader import open_errors, open_triplets
    from disco.pipeline.schema import MANIFEST_FILE

    if not (output / MANIFEST_FILE).exists():
        _usage_error(f"{output} holds no {MANIFEST_FILE}; is it a `disco-cli preprocess` output?")
    manifest = read_manifest(output / MANIFEST_FILE)
    out = Console()
    out.print(f"[bold]{output}[/bold]  written by: {manifest['command']}")
    backends = manifest["backends"]
    out.print(f"backends: matting={backends['matting']['name']} pose={backends['pose']['name']} ({backends['reason']})")
    _print_summary(manifest)
    triplets, errors = open_triplets(output), open_errors(output)
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
        by_type = errors.to_table(columns=["error_type"]).column("error_type").value_counts().to_pylist()
        out.print("errors by type: " + ", ".join(f"{d['values']}: {d['counts']}" for d in by_type))
    target = sheet or output / "contact_sheet.png"
    shown = write_contact_sheet(triplets, target, rows)
    out.print(f"contact sheet ({shown} rows): {target.resolve()}")


@app.command("model-info")
def model_info(
    config: str = typer.Option("sd-image-variations", help="Architecture: sd-image-variations or tiny."),
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
def train(
    stage: Optional[str] = typer.Option(None, help="pretrain (human-attribute pre-training on stills) or finetune (with pose). Default finetune."),
    data: Optional[list[Path]] = typer.Option(None, "--data", "-d", help="A `disco-cli preprocess` output folder; repeat for several."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The run directory: config.yaml, checkpoints, logs/, samples/."),
    pretrained: Optional[Path] = typer.Option(None, help="Local sd-image-variations folder (diffusers layout) to start from."),
    model: Optional[str] = typer.Option(None, help="Start from random weights of a named architecture instead (tiny, sd-image-variations)."),
    init_from: Optional[Path] = typer.Option(None, help="Fine-tune from this pre-training (HAP) run: its UNet, projection and background ControlNet."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options (dashes or underscores); flags override it."),
    ref_mode: Optional[str] = typer.Option(None, help="Fine-tuning reference frame: first (the clip's first frame, default) or random."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution in pixels (default 256)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random crops of DisCo's recipe (default on); off: centre crop."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps to train (default 1000)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per worker per micro-batch (default 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default 1)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: pretrain 1e-3, finetune 2e-4)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps (default 10% of --max-steps), then linear decay to 0."),
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
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Existing Ray cluster to train on (default: a local instance)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest checkpoint of --output with its saved configuration."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train DisCo on preprocessed triplets: --stage pretrain (HAP) or finetune; resumable."""
    from disco.pipeline.config import ConfigError
    from disco.train.config import TrainConfig
    from disco.train.data import DataError
    from disco.train.launch import train as run_training

    flags = dict(stage=stage, data=[str(d) for d in data] if data else None, output=str(output) if output else None,
                 pretrained=str(pretrained) if pretrained else None, model=model,
                 init_from=str(init_from) if init_from else None, ref_mode=ref_mode, resolution=resolution,
                 augment=augment, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                 warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
                 mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
                 checkpoint_every=checkpoint_every, keep=keep, sample_every=sample_every, sample_steps=sample_steps,
                 log_every=log_every, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        cfg = cfg.updated({**given, "resume": resume})
    except ConfigError as exc:
        _usage_error(str(exc))
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TextColumn("loss {task.fields[loss]}, {task.fields[speed]} samples/s, data wait {task.fields[wait]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("train", total=None, loss="-", speed="-", wait="-")

        def on_metrics(m: dict) -> None:
            bar.update(task, completed=m["step"], loss=f"{m['loss']:.4f}", speed=f"{m['samples_per_s']:.1f}",
                       wait=f"{m['data_wait_fraction']:.0%}")

        def log(message: str) -> None:
            bar.console.print(message, highlight=False)
            bar.update(task, total=cfg.max_steps if not resume else None)

        try:
            summary = run_training(cfg, given=set(given), on_metrics=on_metrics, log=log)
        except (ConfigError, DataError) as exc:
            _usage_error(str(exc))
        except ConnectionError as exc:
            _usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
        bar.update(task, completed=summary["step"], total=summary["step"])
    console.print(f"trained to step {summary['step']}: loss {summary['loss']:.4f}, "
                  f"{summary['skipped_rows']} undecodable rows skipped")
    console.print(f"run: {Path(cfg.output).resolve()}  (config.yaml, checkpoint-*/, logs/ for TensorBoard, samples/)")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Folder for the demo's inputs and results."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Preprocess real photos and a short clip of people that ship with installed packages."""
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.contact_sheet import write_contact_sheet
    from disco.pipeline.demo_data import write_demo_images, write_demo_video
    from disco.pipeline.reader import open_triplets

    images_in, videos_in = output / "inputs" / "images", output / "inputs" / "videos"
    write_demo_images(images_in)
    write_demo_video(videos_in)
    console.print(f"demo inputs: {images_in.resolve()} and {videos_in.resolve()}")
    results = []
    for source, folder in (("images", images_in), ("video", videos_in)):
        out = output / f"triplets-{source}"
        config = PreprocessConfig(source=source, input=folder, output=out, overwrite=True)
        run_preprocess(config, show_progress=progress)
        sheet = out / "contact_sheet.png"
        write_contact_sheet(open_triplets(out), sheet, 8)
        results.append((source, out, sheet))
    console.print("\n[bold green]demo finished[/bold green]")
    for source, out, sheet in results:
        console.print(f"  {source:7s} triplets: {(out / 'triplets').resolve()}")
        console.print(f"  {source:7s} contact sheet: {sheet.resolve()}")
    console.print(f"look inside with: disco-cli inspect {results[0][1]}")


def main() -> None:
    app(prog_name="disco-cli")


if __name__ == "__main__":
    sys.exit(main())
