"""``generate`` a dance video and ``export`` a checkpoint as diffusers folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disco.generate.config import GenerateConfig
from disco.model.precision import DTYPES
from disco.commands.terminal import (ProgressLines, choices, clear_progress, command_device, console, defaults, gpus_named,
                                     job_outputs, out_of_memory, plain, say, sigterm_as_ctrl_c, usage_error)

G = defaults(GenerateConfig)
Dtype = choices("dtype", DTYPES)


def run_generation(config, show_progress: bool = True):
    """Generate a video with a progress bar; a user's mistake is a one-line usage error."""
    from disco.generate.inputs import GenerateInputError
    from disco.generate.run import generate as run_generate
    from disco.model.checkpoint import trained_stage
    from disco.pipeline.errors import out_of_gpu_memory

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not show_progress) as bar:
        task = bar.add_task("generate", total=None)
        lines = ProgressLines(bar)

        def progress(done: int, total: int, phase: str) -> None:
            bar.update(task, completed=done, total=total, description=phase)
            lines.say(f"{phase} {done}/{total} frames", final=done == total)

        try:
            with sigterm_as_ctrl_c():
                result = run_generate(config, log=lambda m: say(m, bar.console), progress=progress)
        except KeyboardInterrupt:
            clear_progress(bar)
            say("interrupted" + (kept_frames(config.output) or ": no batch of frames was finished"))
            raise typer.Exit(130) from None
        except (GenerateInputError, FileNotFoundError) as exc:
            usage_error(str(exc))
        except ValueError as exc:  # a checkpoint that is not a DisCo model, or one without a pose branch
            usage_error(str(exc))
        except Exception as exc:  # noqa: BLE001 - the GPU's memory, else re-raised
            if not out_of_gpu_memory(exc):
                raise
            out_of_memory(gpus_named(config.device, config.gpus), config.batch_size, kept=kept_frames(config.output),
                          temporal=trained_stage(config.checkpoint) == "temporal")
    return result


def kept_frames(output) -> str:
    """What a stopped run's message adds where it finished frames (``generate/partial.py``)."""
    from disco.generate.partial import partial_folder

    folder = partial_folder(output)
    saved = len(list(folder.glob("frames-*.npz"))) if folder.is_dir() else 0
    return (f" (the {saved} batch(es) of frames it finished are kept in {folder}: run it again, also with another "
            "--batch-size or --gpus, and they are not sampled again)") if saved else ""



def generate(
    checkpoint: Annotated[Path, typer.Option(help="A DisCoModel.save_pretrained folder, or a training run / checkpoint folder.")],
    reference: Annotated[Path, typer.Option(help="Photo of the person (and, without --background, the scene).")],
    pose: Annotated[Path, typer.Option(help="Video to take the pose sequence from, or a `preprocess` output folder with --clip.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The generated video (.mp4); a .json with the settings is written beside it.")],
    clip: Annotated[Optional[str], typer.Option(help="With --pose TRIPLETS_DIR: the clip_id whose stored poses drive the model.")] = G.clip,
    background: Annotated[Optional[Path], typer.Option(help="Put the person into this scene instead of the reference's own background.")] = G.background,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = G.steps,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale on the reference (1 turns guidance off).")] = G.guidance_scale,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise; the same seed gives the same frames.")] = G.seed,
    batch_size: Annotated[int, typer.Option(help="Frames per forward pass (a temporal-module model: whole windows of its clip length, several when two or more fit).")] = G.batch_size,
    fps: Annotated[Optional[float], typer.Option(help="Rate the poses (video or --clip) are resampled to, never above the source's own; the output plays at it. Default: the source's rate.")] = G.fps,
    size: Annotated[Optional[int], typer.Option(help="Side of the square frames (default: the side a training run trained at; else the model's, 256 for the full model).")] = G.size,
    max_frames: Annotated[Optional[int], typer.Option(help="Generate only the first N pose frames.")] = G.max_frames,
    frames: Annotated[Optional[Path], typer.Option(help="Also write every generated frame as PNG into this folder.")] = G.frames,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Also write OUTPUT_side_by_side.mp4: pose | generated.")] = G.side_by_side,
    device: Annotated[str, typer.Option(help="torch device: auto (the GPU where there is one, else the CPU), cpu, cuda or cuda:N.")] = G.device,
    gpus: Annotated[int, typer.Option(help="Generate on this many GPUs, from --device's on (cuda:0 for cuda or auto): a copy of the model on each, the frames' batches shared out; the same frames as on one. Not for a temporal-module model.")] = G.gpus,
    align_pose: Annotated[bool, typer.Option("--align-pose/--no-align-pose", help="Refit the driving skeletons limb by limb to the reference person's proportions and put them where it stands (when its pose is found); --no-align-pose keeps the driver's skeleton.")] = G.align_pose,
    dtype: Annotated[Dtype, typer.Option(help="What the model samples in: float16 or bfloat16 halve its GPU memory and speed a GPU up (float16 on CUDA only); checkpoints are float32.")] = G.dtype,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="A training run's EMA weights where it kept them (--ema-decay); --no-ema samples with the weights as trained.")] = G.ema,
    smooth_poses: Annotated[bool, typer.Option("--smooth-poses/--no-smooth-poses", help="With --pose VIDEO: steady the keypoints with a One-Euro filter before drawing (and aligning) them.")] = G.smooth_poses,
) -> None:
    """Generate a dance video: the person of --reference, in its own or another scene, moving as --pose."""
    job_outputs(output=output, frames=frames)
    device = command_device(device)
    config = GenerateConfig(
        checkpoint=checkpoint, reference=reference, pose=pose, output=output, clip=clip, background=background,
        steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, fps=fps, size=size,
        frames=frames, side_by_side=side_by_side, max_frames=max_frames, device=device, gpus=gpus,
        align_pose=align_pose, smooth_poses=smooth_poses, ema=ema, dtype=plain(dtype),
    )
    result = run_generation(config)
    say(f"wrote {result.video.resolve()}: {result.frames} frames, {result.size} x {result.size} px, "
        f"{result.fps:g} fps, in {result.seconds:.1f} s")
    for extra in (result.side_by_side, result.frames_dir):
        if extra is not None:
            say(f"wrote {extra.resolve()}")


def export(
    checkpoint: Annotated[Path, typer.Option(help="A DisCoModel.save_pretrained folder, or a training run / checkpoint folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for unet/, controlnet_pose/ and controlnet_background/ (and temporal/ for a temporal-module model).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the parts of an earlier export in --output.")] = False,
) -> None:
    """Write a checkpoint's UNet and ControlNets as diffusers folders, each loadable with from_pretrained."""
    import shutil

    from disco.model.checkpoint import load_checkpoint
    from disco.model.disco import EXPORT_PARTS
    from disco.pipeline.errors import output_folder_problem

    job_outputs(output=output)
    # Checked before the model loads; an earlier export's parts (another model's temporal/ or
    # controlnet_pose/) would stay beside this one's and make it read as a model it is not.
    earlier = [part for part in EXPORT_PARTS if (output / part).exists()] if output.is_dir() else []
    if earlier and not overwrite:
        usage_error(f"{output} holds an earlier export ({', '.join(earlier)}); pass --overwrite to replace it, or "
                    "pick another --output")
    problem = output_folder_problem(output, "--output")
    if problem:
        usage_error(problem)
    try:
        model = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError: not a DisCo checkpoint
        usage_error(str(exc))
    for part in earlier:
        shutil.rmtree(output / part)
    for folder in model.export_diffusers(output):
        say(f"wrote {folder.resolve()}")
