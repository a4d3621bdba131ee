"""``demo``: the whole journey on media that ship with installed packages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from disco.commands.terminal import console, job_outputs, say, usage_error
from disco.commands.generate import run_generation
from disco.commands.preprocess import run_preprocess
from disco.commands.train import run_training


# The demo's scale: small enough for a few minutes on 2 cores.
DEMO_STEPS = 30
DEMO_RESOLUTION = 64
DEMO_SAMPLE_STEPS = 10
DEMO_FRAMES = 16
# The temporal stage (model/temporal.py): a few steps on clips of a few frames.
DEMO_TEMPORAL_STEPS = 4
DEMO_CLIP_FRAMES = 4


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's inputs and results.")] = Path("demo-output"),
    steps: Annotated[int, typer.Option(help="Training steps of each stage (pre-training, then fine-tuning).")] = DEMO_STEPS,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """The whole journey on photos and a clip that ship with installed packages: preprocess, a short
    tiny-model pre-training, fine-tuning and temporal-module training, and a generated clip."""
    import shutil

    from disco.generate.config import GenerateConfig
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.contact_sheet import write_contact_sheet
    from disco.pipeline.demo_data import DEMO_CLIP, write_demo_images, write_demo_video
    from disco.pipeline.errors import output_folder_problem
    from disco.pipeline.store.reader import open_triplets
    from disco.train.config import TrainConfig

    if steps < 1:
        usage_error("--steps must be at least 1")
    job_outputs(output=output)  # (under `ray job submit --working-dir`, before its inputs are written)
    images_in, videos_in = output / "inputs" / "images", output / "inputs" / "videos"
    problem = output_folder_problem(output, "--output")
    if problem:
        usage_error(problem)
    write_demo_images(images_in)
    write_demo_video(videos_in)
    console.print(f"[bold]1/5 preprocess[/bold]: {escape(str(images_in.resolve()))} and "
                  f"{escape(str(videos_in.resolve()))}", soft_wrap=True)
    triplets = {}
    for source, folder in (("images", images_in), ("video", videos_in)):
        out = output / f"triplets-{source}"
        run_preprocess(PreprocessConfig(source=source, input=folder, output=out, overwrite=True),
                       show_progress=progress)
        write_contact_sheet(open_triplets(out), out / "contact_sheet.png", 8)
        triplets[source] = out
    # A demo always starts over: a run folder left by an earlier demo would be refused (resume).
    runs = {"pretrain": output / "run-pretrain", "finetune": output / "run-finetune",
            "temporal": output / "run-temporal"}
    for run in runs.values():
        shutil.rmtree(run, ignore_errors=True)
    common = dict(model="tiny", resolution=DEMO_RESOLUTION, batch_size=2, max_steps=steps, checkpoint_every=steps,
                  sample_every=steps, sample_steps=DEMO_SAMPLE_STEPS, sample_count=2, log_every=5)
    console.print("[bold]2/5 pre-train[/bold] (human attributes, on every still and frame)")
    summary = run_training(TrainConfig(stage="pretrain", data=[str(triplets["images"]), str(triplets["video"])],
                                       output=str(runs["pretrain"]), **common), show_progress=progress)
    console.print(f"  step {summary['step']}, loss {summary['loss']:.4f}")
    console.print("[bold]3/5 fine-tune[/bold] (with pose, on the clip)")
    summary = run_training(TrainConfig(stage="finetune", data=[str(triplets["video"])], output=str(runs["finetune"]),
                                       init_from=str(runs["pretrain"]), **common), show_progress=progress)
    console.print(f"  step {summary['step']}, loss {summary['loss']:.4f}")
    console.print(f"[bold]4/5 temporal module[/bold] (temporal layers alone, on clips of {DEMO_CLIP_FRAMES} frames)")
    summary = run_training(TrainConfig(stage="temporal", data=[str(triplets["video"])], output=str(runs["temporal"]),
                                       init_from=str(runs["finetune"]), clip_frames=DEMO_CLIP_FRAMES,
                                       **{**common, "batch_size": 1, "max_steps": DEMO_TEMPORAL_STEPS,
                                          "checkpoint_every": DEMO_TEMPORAL_STEPS,
                                          "sample_every": DEMO_TEMPORAL_STEPS}), show_progress=progress)
    console.print(f"  step {summary['step']}, loss {summary['loss']:.4f}")
    console.print("[bold]5/5 generate[/bold] (the astronaut photo, moving as the clip's stored poses; the temporal "
                  f"model denoises overlapping windows of {DEMO_CLIP_FRAMES} frames)")
    video = output / "generated.mp4"
    result = run_generation(GenerateConfig(
        checkpoint=runs["temporal"], reference=images_in / "astronaut.png", pose=triplets["video"], clip=DEMO_CLIP,
        output=video, steps=DEMO_SAMPLE_STEPS, size=DEMO_RESOLUTION, max_frames=DEMO_FRAMES, side_by_side=True,
    ), show_progress=progress)

    console.print("\n[bold green]demo finished[/bold green] (a tiny model trained for seconds: expect noise, not dancers)")
    for source, out in triplets.items():
        say(f"  {source:7s} triplets: {(out / 'triplets').resolve()}")
        say(f"  {source:7s} contact sheet: {(out / 'contact_sheet.png').resolve()}")
    for stage, run in runs.items():
        say(f"  {stage:8s} run: {run.resolve()}  (checkpoints, logs/ for TensorBoard, samples/*.png)")
    say(f"  generated clip: {result.video.resolve()}  ({result.frames} frames)")
    say(f"  pose | generated: {result.side_by_side.resolve()}")
    say(f"look inside with: disco-cli inspect {triplets['images']}")
