"""``evaluate``: the paper's metrics on generated frames."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from disco.commands.terminal import (choices, command_device, defaults, gpus_named, job_outputs, out_of_memory,
                                     plain, print_error, say, usage_error)
from disco.model.precision import DTYPES
from disco.evaluate.config import (FID_PORTS, METRICS, PROTOCOLS, VIDEO_NET_NAMES, EvaluateConfig, EvaluateInputError,
                                   NetworkConfig, parse_metrics)

E = defaults(EvaluateConfig)
NETS = defaults(NetworkConfig)
VideoNet = choices("video network", VIDEO_NET_NAMES)
Protocol = choices("protocol", PROTOCOLS)
FidPort = choices("FID port", FID_PORTS)
Dtype = choices("dtype", DTYPES)


def evaluate(
    pred: Annotated[Optional[Path], typer.Option(help="Generated frames or videos (a video, a folder of videos, of frames, or of frame folders).")] = None,
    gt: Annotated[Optional[Path], typer.Option(help="The real frames or videos, laid out and named like --pred.")] = None,
    run: Annotated[Optional[Path], typer.Option(help="A checkpoint (save_pretrained folder or training run) to generate --data's split with.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="With --run: a `preprocess` output folder (triplets).")] = None,
    split: Annotated[str, typer.Option(help="With --run: the split to generate and score.")] = E.split,
    output: Annotated[Path, typer.Option("--output", "-o", help="The JSON report (scores, counts, settings).")] = Path("metrics.json"),
    work_dir: Annotated[Optional[Path], typer.Option(help="With --run: where pred/ and gt/ frames go (default: OUTPUT without .json).")] = None,
    metrics: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(METRICS)}, or all.")] = "all",
    weights: Annotated[Optional[Path], typer.Option(envvar="DISCO_WEIGHTS", help="Folder holding the feature networks' files under their standard names.")] = NETS.weights,
    inception: Annotated[Optional[Path], typer.Option(help="FID Inception weights (weights-inception-2015-12-05-6726825d.pth, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth).")] = NETS.inception,
    vgg16: Annotated[Optional[Path], typer.Option(help="VGG-16 ImageNet weights for LPIPS (torchvision vgg16-397923af.pth).")] = NETS.vgg16,
    fid_vid_net: Annotated[Optional[Path], typer.Option(help="Weights of the FID-VID video network (r3d_18-b3b3357e.pth; with --protocol disco resnet-50-kinetics.pth).")] = NETS.fid_vid_net,
    fvd_net: Annotated[Optional[Path], typer.Option(help="Weights of the FVD video network (s3d-d76dad2f.pth; with --protocol disco i3d_pretrained_400.pt).")] = NETS.fvd_net,
    protocol: Annotated[Protocol, typer.Option(help="ours: the corrected evaluation; disco: the official DisCo scripts exactly (pytorch-fid's FID, 3D ResNet-50 / I3D, LPIPS on [0, 1], uint8 PSNR, their video clips).")] = E.protocol,
    fid_port: Annotated[Optional[FidPort], typer.Option(help="How frames reach the FID Inception (the same weights): torch-fidelity (TF1-style resize) or pytorch-fid (PyTorch bilinear, [-1, 1], numpy distance: the official `python -m pytorch_fid`). Default: the protocol's.")] = NETS.fid_port,
    fid_vid_arch: Annotated[Optional[VideoNet], typer.Option(help="FID-VID network (default: the protocol's, r3d_18 or resnet3d50).")] = NETS.fid_vid_arch,
    fvd_arch: Annotated[Optional[VideoNet], typer.Option(help="FVD network (default: the protocol's, s3d or i3d).")] = NETS.fvd_arch,
    lpips_legacy: Annotated[Optional[bool], typer.Option("--lpips-legacy/--no-lpips-legacy", help="LPIPS on images in [0, 1] as the official script (default: on with --protocol disco).")] = E.lpips_legacy,
    psnr_legacy: Annotated[Optional[bool], typer.Option("--psnr-legacy/--no-psnr-legacy", help="PSNR of uint8 differences that wrap around, as the official script (default: on with --protocol disco).")] = E.psnr_legacy,
    square_gt: Annotated[bool, typer.Option("--square-gt", help="Centre-crop the --gt frames to squares first, as generate crops its inputs (for real videos that are not square).")] = E.square_gt,
    batch_size: Annotated[int, typer.Option(help="Frames (or 16-frame clips) per forward pass; also frames generated at once with --run.")] = E.batch_size,
    steps: Annotated[int, typer.Option(help="With --run: DDIM steps.")] = E.steps,
    guidance_scale: Annotated[float, typer.Option(help="With --run: guidance scale.")] = E.guidance_scale,
    seed: Annotated[int, typer.Option(help="With --run: seed.")] = E.seed,
    size: Annotated[Optional[int], typer.Option(help="With --run: frame side (default: the side the run trained at; else the model's).")] = E.size,
    max_frames: Annotated[Optional[int], typer.Option(help="With --run: only the first N frames of each clip.")] = E.max_frames,
    dtype: Annotated[Dtype, typer.Option(help="With --run: what the model samples in: float16 or bfloat16 halve its GPU memory and speed a GPU up (float16 on CUDA only); checkpoints are float32.")] = E.dtype,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="With --run: a training run's EMA weights where it kept them (--ema-decay); --no-ema samples with the weights as trained.")] = E.ema,
    device: Annotated[str, typer.Option(help="torch device for generation and the feature networks: auto (the GPU where there is one, else the CPU), cpu, cuda or cuda:N.")] = E.device,
    gpus: Annotated[int, typer.Option(help="With --run: generate on this many GPUs, from --device's on (a copy of the model on each; the same frames as on one).")] = E.gpus,
) -> None:
    """Score generated frames against real ones: FID, SSIM, PSNR, LPIPS, L1, FID-VID, FVD."""
    from disco.evaluate.networks import WeightsError
    from disco.evaluate.run import evaluate as run_evaluate
    from disco.generate.inputs import GenerateInputError
    from disco.model.checkpoint import trained_stage
    from disco.pipeline.errors import out_of_gpu_memory

    job_outputs(output=output, work_dir=work_dir)
    device = command_device(device)
    try:
        config = EvaluateConfig(
            output=output, pred=pred, gt=gt, run=run, data=data, split=split, work_dir=work_dir,
            metrics=parse_metrics(metrics), batch_size=batch_size, steps=steps, guidance_scale=guidance_scale,
            seed=seed, size=size, max_frames=max_frames, device=device, gpus=gpus, ema=ema, dtype=plain(dtype),
            protocol=plain(protocol),
            lpips_legacy=lpips_legacy, psnr_legacy=psnr_legacy, square_gt=square_gt,
            networks=NetworkConfig(weights=weights, inception=inception, vgg16=vgg16, fid_vid_net=fid_vid_net,
                                   fvd_net=fvd_net, fid_vid_arch=plain(fid_vid_arch), fvd_arch=plain(fvd_arch),
                                   fid_port=plain(fid_port)),
        )
        report = run_evaluate(config, log=say)
    except (EvaluateInputError, GenerateInputError, WeightsError, FileNotFoundError, NotADirectoryError,
            PermissionError) as exc:  # a --work-dir or a file it cannot use: one line
        usage_error(str(exc))
    except ValueError as exc:  # a checkpoint that is not a DisCo model, or one without a pose branch
        usage_error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the GPU's memory, else re-raised
        if not out_of_gpu_memory(exc):
            raise
        out_of_memory(gpus_named(device, gpus), batch_size, generating=run is not None,
                      temporal=run is not None and trained_stage(run) == "temporal")
    counts = report["counts"]
    table = Table(title=f"scores (--protocol {config.protocol})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("computed with")
    official = {"resnet3d50": "resnet3d50 (3D ResNet-50, official)", "i3d": "i3d (I3D logits, official)"}
    port = config.networks.fid_port
    how = {"fid": f"Inception 2015-12-05, {port}" + (" (official)" if port == "pytorch-fid" else ""),
           "ssim": "grayscale", "l1": "/ (H x W)",
           "psnr": "uint8, wrapping (official)" if config.psnr_legacy else "float64",
           "lpips": "VGG, [0, 1] (official)" if config.lpips_legacy else "VGG, [-1, 1]",
           "fid-vid": official.get(config.networks.fid_vid_arch, config.networks.fid_vid_arch),
           "fvd": official.get(config.networks.fvd_arch, config.networks.fvd_arch)}
    for name, value in report["metrics"].items():
        shown = "-" if value is None else f"{value:.3e}" if name == "l1" else f"{value:.4f}"
        table.add_row(name.upper(), shown, how[name] if value is not None else "not computed (below)")
    Console().print(table)
    clips = counts["clips"]
    if isinstance(clips, dict):  # --protocol disco: per video metric
        clips = ", ".join(f"{m.upper()} {counts['video_samples'][m]} samples from {n} clips" for m, n in clips.items())
        clips = clips or "no video metric"
    else:
        clips = f"{clips} clips of 16 frames"
    say(f"{counts['sequences']} sequences, {counts['frames']} frames, {clips}; report: {output.resolve()}")
    for name, reason in report.get("failed", {}).items():
        print_error(f"{name.upper()} not computed: {reason}")
    if report.get("failed"):
        raise typer.Exit(1)
