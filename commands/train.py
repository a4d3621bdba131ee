"""``train`` (and its ``--dry-run`` memory plan) and ``model-info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from disco.commands.terminal import (RAY_ADDRESS_HELP, ProgressLines, choices, clear_progress, console, defaults, plain,
                                     print_error, say, usage_error)
from disco.model.configs import CONFIGS
from disco.train.config import DEFAULT_BATCH, DEFAULT_LR, PRECISIONS, REF_MODES, STAGES, TrainConfig
from disco.train.presets import PRESETS


def run_training(cfg, given: set[str] | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) a training run with a progress bar; returns its summary."""
    from disco.pipeline.errors import ConfigError
    from disco.train.data import DataError
    from disco.train.launch import StoppedBeforeStart, TrainingFailed
    from disco.train.launch import train as launch_training

    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TextColumn("loss {task.fields[loss]}, {task.fields[speed]} samples/s, data wait {task.fields[wait]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress) as bar:
        task = bar.add_task("train", total=None, loss="-", speed="-", wait="-")
        lines = ProgressLines(bar)
        # A resume's total is the run's own (the saved --max-steps, or the one given): its metrics say it.
        steps = {"total": None if cfg.resume else cfg.max_steps}

        def on_metrics(m: dict) -> None:
            if "loss" not in m:  # an evaluation's line (eval/...), not a training window's
                return
            steps["total"] = m.get("max_steps", steps["total"])
            total = steps["total"]
            bar.update(task, completed=m["step"], total=total, loss=f"{m['loss']:.4f}",
                       speed=f"{m['samples_per_s']:.1f}", wait=f"{m['data_wait_fraction']:.0%}")
            lines.say(f"step {m['step']}{'' if total is None else f'/{total}'}, loss {m['loss']:.4f}, "
                      f"{m['samples_per_s']:.1f} samples/s, data wait {m['data_wait_fraction']:.0%}",
                      final=total is not None and m["step"] >= total)

        def log(message: str) -> None:
            say(message, bar.console)
            bar.update(task, total=steps["total"])

        try:
            summary = launch_training(cfg, given=given, on_metrics=on_metrics, log=log)
        except (ConfigError, DataError) as exc:
            clear_progress(bar)
            usage_error(str(exc))
        except ConnectionError as exc:
            clear_progress(bar)
            usage_error(f"cannot connect to the Ray cluster (--ray-address / RAY_ADDRESS): {exc}")
        except TrainingFailed as exc:
            clear_progress(bar)
            print_error(str(exc))
            raise typer.Exit(1) from None
        except StoppedBeforeStart as exc:
            clear_progress(bar)
            say(str(exc))
            raise typer.Exit(130) from None
        # A stopped run's bar stays short of its total (it did not finish).
        bar.update(task, completed=summary["step"],
                   total=steps["total"] if summary.get("interrupted") and steps["total"] else summary["step"])
    if summary.get("interrupted"):
        say(f"interrupted: checkpoint of step {summary['step']} written; continue with "
            f"`disco-cli train --output {cfg.output} --resume`")
        raise typer.Exit(130)
    return summary


MAX_GPU_MEMORY_GIB = 4096


def print_memory_plan(cfg, gpu_memory: float | None = None, given: set[str] | None = None) -> None:
    """``train --dry-run``: the per-GPU memory plan of ``cfg`` as a table (see train/memory.py)."""
    from disco.pipeline.errors import ConfigError
    from disco.train.memory import (GIB, host_build_bytes, host_checkpoint_bytes, memory_plan, plan_config, plan_table,
                                    visible_gpu_gib)

    # (Above a few TiB the largest-batch search would measure batches of millions of samples.)
    if gpu_memory is not None and not 0 < gpu_memory <= MAX_GPU_MEMORY_GIB:
        usage_error(f"--gpu-memory must be above 0 and at most {MAX_GPU_MEMORY_GIB} (GiB), not {gpu_memory:g}")
    try:
        cfg, notes = plan_config(cfg, given)
        plan = memory_plan(cfg, gpu_memory)
        host, host_checkpoint = host_build_bytes(cfg), host_checkpoint_bytes(plan)
    except ConfigError as exc:
        usage_error(str(exc))
    out = Console()
    out.print(plan_table(plan))
    if gpu_memory is None:
        visible = visible_gpu_gib()
        out.print(f"GPU memory: {plan.gpu_memory * plan.workers_per_gpu / GIB:g} GiB ("
                  + ("the visible CUDA GPU" if visible else "no CUDA GPU visible: the default") + "; --gpu-memory to change)")
    out.print(f"host memory to build the model: {host / GIB:,.2f} GiB (every weight once, fp32)")
    out.print(f"host memory of a checkpoint while it is written: {host_checkpoint / GIB:,.2f} GiB on rank 0's node "
              "(trainable weights, AdamW moments" + (", EMA" if cfg.ema_decay else "") + ")")
    for note in notes:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)



# What a resume may change (train/launch.py RESUME_MAY_CHANGE) that only a --config YAML sets.
YAML_ONLY_RESUME_OPTIONS = {"cpus_per_worker", "data_cpus", "prefetch_batches", "sample_count", "guidance_scale"}


def _say_yaml_kept(cfg: TrainConfig, config: Path, names: set[str]) -> None:
    """On --resume, the --config YAML's values the run does not take (its saved ones stay): said
    where they differ, so that a changed YAML is not dropped without a word."""
    from disco.pipeline.errors import ConfigError
    from disco.train.config import RUN_CONFIG_FILE, load_run_config

    if not cfg.output or not (Path(cfg.output) / RUN_CONFIG_FILE).exists():
        return  # (the resume says what is wrong with the run)
    try:
        saved = load_run_config(cfg.output)
    except ConfigError:
        return
    from disco.train.launch import differs

    differ = sorted(n for n in names if n not in ("output", "resume") and differs(n, getattr(cfg, n), getattr(saved, n)))
    if differ:
        say(f"note: --resume keeps the run's saved {', '.join(differ)}; {config}'s values of them are not applied "
            "(give them as flags: a resume takes --max-steps, --keep and the like, and refuses the rest)")


def configured(preset: str | None, config: Path | None, given: dict, resume: bool) -> TrainConfig:
    """The run's configuration: the defaults, then the preset (``--preset``, or a ``preset`` key of
    the YAML), then the ``--config`` YAML, then the flags. Giving the gradient accumulation
    (YAML or flag) drops the preset's global batch."""
    from disco.pipeline.errors import ConfigError, read_options_yaml
    from disco.train.presets import preset_values

    if config and not Path(config).exists():
        raise ConfigError(f"config file {config} does not exist")
    values = read_options_yaml(config) if config else {}
    if preset and resume:
        raise ConfigError("--preset starts a run; a resumed run keeps the configuration it was started with")
    # A YAML's preset (a run's own config.yaml names it) is the base of a new run; a resumed run
    # takes its saved configuration whatever the YAML says (but YAML_ONLY_RESUME_OPTIONS).
    preset = preset or (None if resume else values.get("preset"))
    cfg = TrainConfig()
    if preset:
        cfg = cfg.updated({**preset_values(preset), "preset": preset}, origin=f"--preset {preset}")
    cfg = cfg.updated(values, origin=str(config))
    # An accumulation given without a global batch at the same level or above wins over the
    # preset's (or the YAML's) global batch.
    if "grad_accum" in given or ("grad_accum" in values and "global_batch" not in values):
        cfg = cfg.updated({"global_batch": None})
    return cfg.updated({**given, "resume": resume})


T = defaults(TrainConfig)
PresetName = choices("preset", PRESETS)
Stage = choices("stage", STAGES)
RefMode = choices("reference mode", REF_MODES)
PoseStyle = choices("pose style", ("openpose", "disco"))
Precision = choices("mixed precision", PRECISIONS)
Architecture = choices("architecture", CONFIGS)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def model_info(
    config: Annotated[Architecture, typer.Option(help="Architecture.")] = "sd-image-variations",
    variant: Annotated[Stage, typer.Option(help="pretrain (HAP, no pose branch), finetune or temporal (the fine-tuned model plus its temporal layers).")] = T.stage,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Parameter counts of the DisCo model, built without weights (meta device)."""
    import json

    import torch

    from disco.model.disco import DisCoModel, parameter_counts

    config, variant = plain(config), plain(variant)
    with torch.device("meta"):
        model = DisCoModel.from_architecture(config, variant="finetune" if variant == "temporal" else variant)
        if variant == "temporal":  # the fine-tuned model plus the temporal layers (model/temporal.py)
            from disco.model.temporal import add_temporal

            add_temporal(model)
    counts = parameter_counts(model)
    if variant == "temporal":
        counts["temporal"] = sum(p.numel() for p in model.temporal.parameters())
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
    stage: Annotated[Optional[Stage], typer.Option(help=f"pretrain (human-attribute pre-training on stills), finetune (with pose) or temporal (the temporal module, on clips; needs --init-from). Default {T.stage}.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="A `disco-cli preprocess` output folder; repeat for several.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The run directory: config.yaml, checkpoints, logs/, samples/.")] = None,
    pretrained: Annotated[Optional[Path], typer.Option(help="Local sd-image-variations folder (diffusers layout) to start from.")] = None,
    model: Annotated[Optional[Architecture], typer.Option(help="Start from random weights of a named architecture instead.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune from this pre-training (HAP) run (its latest checkpoint, or RUN/checkpoint-N): its UNet, projection and background ControlNet; with --stage temporal, the fine-tuning run whose image model gets the temporal layers.")] = None,
    clip_frames: Annotated[Optional[int], typer.Option(help=f"--stage temporal: consecutive frames of one clip per training sample (default {T.clip_frames}, the official length); a batch is --batch-size clips.")] = None,
    preset: Annotated[Optional[PresetName], typer.Option(help="The paper's recipe: disco-hap (pre-training), disco-finetune or disco-temporal; sets the stage, resolution, optimizer, learning rate and schedule, steps, global batch (made up by gradient accumulation on fewer GPUs), precision, checkpointing, crops and pose style. --config and flags override it; README lists each value and its source.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with any of these options (dashes or underscores); flags override it.")] = None,
    ref_mode: Annotated[Optional[RefMode], typer.Option(help=f"Fine-tuning reference frame: first (the clip's first frame) or random (default {T.ref_mode}).")] = None,
    pose_style: Annotated[Optional[PoseStyle], typer.Option(help="Pose picture style: openpose or disco (the official DisCo drawing, body only). Default: the style the --data was preprocessed with; another style is drawn from the stored keypoints.")] = None,
    hands: Annotated[Optional[bool], typer.Option("--hands/--no-hands", help="Draw the hands in openpose-style pose pictures (default: as the --data was preprocessed).")] = None,
    resolution: Annotated[Optional[int], typer.Option(help=f"Training resolution in pixels (default {T.resolution}).")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help=f"Random crops of DisCo's recipe (default {_on(T.augment)}); off: centre crop.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help=f"Optimizer steps to train (default {T.max_steps}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Samples per worker per micro-batch; --stage temporal: clips (default {DEFAULT_BATCH['finetune']}; temporal {DEFAULT_BATCH['temporal']}).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help=f"Micro-batches per optimizer step (default {T.grad_accum}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate (default: pretrain {DEFAULT_LR['pretrain']:g}, finetune {DEFAULT_LR['finetune']:g}, temporal {DEFAULT_LR['temporal']:g}).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (default 10% of the schedule), then linear decay to 0.")] = None,
    schedule_steps: Annotated[Optional[int], typer.Option(help="Length of the learning-rate schedule (default --max-steps, fixed when the run starts; on --resume a new value stretches the decay from the current rate).")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="Clip the gradient norm to this (default: no clipping; 0 or below, as the official -1: no clipping).")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="Keep an EMA of the weights with this decay (default: none, as in DisCo).")] = None,
    mixed_precision: Annotated[Optional[Precision], typer.Option(help=f"no, fp16 (GPU) or bf16 (default {T.mixed_precision}).")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help=f"Trade compute for memory (default {_on(T.gradient_checkpointing)}).")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Seed of the data order, crops, noise and (with --model) the random weights (default {T.seed}).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help=f"Write a checkpoint every N steps (default {T.checkpoint_every}, and at the end).")] = None,
    keep: Annotated[Optional[int], typer.Option(help=f"Checkpoints to keep (default {T.keep}).")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help=f"Write a reference | pose | generated | target grid every N steps (default {T.sample_every}).")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help=f"DDIM steps for the sample grids (default {T.sample_steps}).")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Every N steps (and at the end) log the loss on held-out rows with all conditions and each condition's gap: the loss without it (pose of another clip, background zeroed, zero-image reference) minus with all (default: off; 0: off).")] = None,
    eval_rows: Annotated[Optional[int], typer.Option(help=f"Rows of the --eval-every batch (default {T.eval_rows}).")] = None,
    eval_split: Annotated[Optional[str], typer.Option(help=f"Split the --eval-every rows come from (default {T.eval_split}; data without it: a fixed slice of the training rows).")] = None,
    pose_scale: Annotated[Optional[float], typer.Option(help="Scale of the pose ControlNet's residuals (default 1); 0 cuts the pose branch (an ablation).")] = None,
    log_every: Annotated[Optional[int], typer.Option(help=f"Log scalars every N steps (default {T.log_every}).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help=f"Data-parallel training workers through Ray Train (default {T.num_workers}: in this process).")] = None,
    use_gpu: Annotated[Optional[bool], typer.Option("--use-gpu/--no-use-gpu", help=f"Train on GPUs, one per worker (default {_on(T.use_gpu)}).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help=f"GPU share of each worker with --use-gpu (default {T.gpus_per_worker:g}); below 1 several workers share a GPU, over gloo since NCCL refuses two ranks on one device: DDP on CUDA with one GPU, for testing.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP)] = None,
    max_failures: Annotated[Optional[int], typer.Option(help="Restarts from the last checkpoint after a lost worker or node (Ray Train workers; default 3).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest checkpoint of --output with its saved configuration.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-GPU memory plan of this run (weights, gradients, AdamW, EMA, activations at --batch-size) and the largest batch that fits, then exit: nothing is allocated, no data is read, no Ray is started.")] = False,
    gpu_memory: Annotated[Optional[float], typer.Option("--gpu-memory", help="GPU memory in GiB the --dry-run plan must fit (default: the visible CUDA GPU's, else 80).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train DisCo on preprocessed triplets: --stage pretrain (HAP), finetune or temporal; resumable."""
    from disco.pipeline.errors import ConfigError

    flags = dict(stage=plain(stage), data=[str(d) for d in data] if data else None, output=str(output) if output else None,
                 pretrained=str(pretrained) if pretrained else None, model=plain(model),
                 init_from=str(init_from) if init_from else None, clip_frames=clip_frames, ref_mode=plain(ref_mode), pose_style=plain(pose_style), hands=hands, resolution=resolution,
                 augment=augment, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                 warmup_steps=warmup_steps, schedule_steps=schedule_steps, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
                 mixed_precision=plain(mixed_precision), gradient_checkpointing=gradient_checkpointing, seed=seed,
                 checkpoint_every=checkpoint_every, keep=keep, sample_every=sample_every, sample_steps=sample_steps,
                 log_every=log_every, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address,
                 max_failures=max_failures, gpus_per_worker=gpus_per_worker)
    flags.update(eval_every=eval_every, eval_rows=eval_rows, eval_split=eval_split, pose_scale=pose_scale)
    given = {k: v for k, v in flags.items() if v is not None}
    from disco.pipeline.cluster import check_job_paths, refuse_urls

    try:
        cfg = configured(plain(preset), config, given, resume)
        refuse_urls(output=cfg.output, data=cfg.data, pretrained=cfg.pretrained, init_from=cfg.init_from)
        # The flags' or the --config file's.
        check_job_paths({"data": cfg.data, "pretrained": cfg.pretrained, "init_from": cfg.init_from},
                        output=cfg.output)
    except ConfigError as exc:
        usage_error(str(exc))
    names = set(given)
    if config and not resume:  # a new run's YAML values are given too (a temporal run's resolution)
        from disco.pipeline.errors import read_options_yaml

        names |= set(read_options_yaml(config))
    if resume and config:
        # What a resume may change that has no flag, set in the --config YAML: applied. Its other
        # keys stay the saved run's (the run's first YAML given again must not take back a
        # --max-steps or --keep given since): said where they differ.
        from disco.pipeline.errors import read_options_yaml

        yaml_names = set(read_options_yaml(config))
        names |= yaml_names & YAML_ONLY_RESUME_OPTIONS
        _say_yaml_kept(cfg, config, yaml_names - YAML_ONLY_RESUME_OPTIONS - names)
    if dry_run:
        print_memory_plan(cfg, gpu_memory, names)
        return
    summary = run_training(cfg, given=names, show_progress=progress)
    console.print(f"trained to step {summary['step']}: loss {summary['loss']:.4f}, "
                  f"{summary['skipped_rows']} undecodable rows skipped")
    if summary.get("eval"):
        from disco.train.condition_gaps import describe

        for line in describe(summary["eval"]):
            say(line)
    say(f"run: {Path(cfg.output).resolve()}  (config.yaml, checkpoint-*/, logs/ for TensorBoard, samples/)")
