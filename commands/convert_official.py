"""``convert-official``: a released DisCo checkpoint (the official code's DeepSpeed file) into a run
directory of this package, once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from disco.commands.terminal import choices, plain, usage_error

Variant = choices("variant", ("auto", "pretrain", "finetune"))


def convert_official(
    checkpoint: Annotated[Path, typer.Argument(help="The released checkpoint: DeepSpeed's mp_rank_00_model_states.pt (weights under 'module'), a plain state dict, or .safetensors.")],
    base: Annotated[Optional[Path], typer.Option("--base", help="The local sd-image-variations-diffusers folder (unet/, vae/, image_encoder/) the checkpoint was trained from; the file's frozen tensors must equal its weights.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Run directory to write (config.yaml and one checkpoint-XXXXXXXX/), for generate, evaluate and train --init-from.")] = None,
    variant: Annotated[Variant, typer.Option(help="pretrain (HAP: background ControlNet only), finetune (pose and background), or auto: told by the file's keys.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the config and checkpoints of a run already in --output.")] = False,
) -> None:
    """Convert a released DisCo checkpoint (HAP pre-training or fine-tuning) into a run directory."""
    from disco.model.official import convert_official as convert
    from disco.pipeline.errors import ConfigError

    if base is None:
        usage_error("--base DIR is needed: the local sd-image-variations-diffusers folder the checkpoint was trained from")
    if output is None:
        usage_error("--output DIR is needed: the run directory to write")
    if not checkpoint.is_file():
        usage_error(f"{checkpoint} is not a file")
    try:
        result = convert(checkpoint, base, output, variant=plain(variant), overwrite=overwrite,
                         progress=lambda message: typer.echo(message, err=True))
    except (ConfigError, OSError) as exc:
        usage_error(str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__)
    for line in result.summary():
        typer.echo(line)
    typer.echo(f"wrote {result.checkpoint} ({result.variant}, step {result.step}, file dtypes "
               f"{', '.join(result.dtypes)}): use it as generate --checkpoint {result.output}, evaluate --run {result.output}"
               + (f", or train --stage finetune --init-from {result.output}" if result.variant == "pretrain" else ""))
