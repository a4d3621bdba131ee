"""``evaluate``: the paper's metrics on generated frames."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from disco.commands.terminal import check_device, console, usage_error


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

    check_device(device)
    for name, arch in (("--fid-vid-arch", fid_vid_arch), ("--fvd-arch", fvd_arch)):
        if arch not in VIDEO_NETS:
            usage_error(f"{name}: unknown video network {arch!r}; choose one of {', '.join(VIDEO_NETS)}")
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
        usage_error(str(exc))
    except ValueError as exc:  # a checkpoint that is not a DisCo model, or one without a pose branch
        usage_error(str(exc))
    counts = report["counts"]
    table = Table(title="scores")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name.upper(), f"{value:.3e}" if name == "l1" else f"{value:.4f}")
    Console().print(table)
    console.print(f"{counts['sequences']} sequences, {counts['frames']} frames, {counts['clips']} clips of 16 frames; "
                  f"report: {output.resolve()}")
