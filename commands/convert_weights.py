"""``convert-weights``: the original GroundingDINO checkpoint into the transformers layout, once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from disco.commands.terminal import usage_error


def convert_weights(
    weights: Annotated[Optional[Path], typer.Option(envvar="DISCO_WEIGHTS", help="Weights folder whose grounding-dino/ holds groundingdino_swint_ogc.pth (layout in the README).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a transformers layout already in grounding-dino/.")] = False,
) -> None:
    """Convert GroundingDINO's original groundingdino_swint_ogc.pth into the transformers files beside it."""
    from disco.pipeline.annotators.grounded_sam import GROUNDING_DINO_DIR
    from disco.pipeline.annotators.grounding_dino_checkpoint import (
        CHECKPOINT_NAME,
        CheckpointError,
        write_transformers_folder,
    )

    if weights is None:
        usage_error("--weights DIR (or $DISCO_WEIGHTS) is needed: the folder whose grounding-dino/ holds "
                    f"{CHECKPOINT_NAME}")
    if not weights.is_dir():
        usage_error(f"--weights {weights} is not a folder")
    folder = weights / GROUNDING_DINO_DIR
    checkpoint = folder / CHECKPOINT_NAME
    if not checkpoint.is_file():
        usage_error(f"{checkpoint} not found: put the original GroundingDINO SwinT-OGC checkpoint there")
    # A transformers layout already there may be the hub's own folder (with the real BERT
    # vocabulary): never replaced unless asked.
    if (folder / "config.json").exists() and not overwrite:
        usage_error(f"{folder} already holds a transformers layout (config.json); pass --overwrite to replace it")
    try:
        written = write_transformers_folder(checkpoint, folder)
    except (CheckpointError, OSError) as exc:
        usage_error(str(exc))
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {folder} (converted from {CHECKPOINT_NAME})")
