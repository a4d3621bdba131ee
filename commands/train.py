"""``train`` (and its ``--dry-run`` memory plan) and ``model-info``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from disco.commands.terminal import RAY_ADDRESS_HELP, console, usage_error


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
            usage_error(str(exc))
        except ConnectionError as exc:
            usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
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
        usage_error("--gpu-memory must be positive (GiB)")
    try:
        cfg, notes = plan_config(cfg)
        plan = memory_plan(cfg, gpu_memory)
        host = host_build_bytes(cfg)
    except ConfigError as exc:
        usage_error(str(exc))
    out = Console()
    out.print(plan_table(plan))
    if gpu_memory is None:
        visible = visible_gpu_gib()
        out.print(f"GPU memory: {plan.gpu_memory / GIB:g} GiB ("
                  + ("the visible CUDA GPU" if visible else "no CUDA GPU visible: the default") + "; --gpu-memory to change)")
    out.print(f"host memory to build the model: {host / GIB:,.2f} GiB (every weight once, fp32)")
    for note in notes:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)



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
        usage_error(f"unknown configuration {config!r}; choose one of {', '.join(CONFIGS)}")
    if variant not in VARIANTS:
        usage_error(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
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
        usage_error(str(exc))
    if dry_run:
        print_memory_plan(cfg, gpu_memory)
        return
    summary = run_training(cfg, given=set(given), show_progress=progress)
    console.print(f"trained to step {summary['step']}: loss {summary['loss']:.4f}, "
                  f"{summary['skipped_rows']} undecodable rows skipped")
    console.print(f"run: {Path(cfg.output).resolve()}  (config.yaml, checkpoint-*/, logs/ for TensorBoard, samples/)")
