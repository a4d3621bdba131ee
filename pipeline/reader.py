"""Reading an output directory back: the trainer, ``inspect`` and the tests all go through here."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads

from disco.pipeline.schema import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    REJECT_SCHEMA,
    REJECTS_DIR,
    TRIPLET_SCHEMA,
    TRIPLETS_DIR,
)


def _open(folder: Path, schema) -> pads.Dataset:
    files = sorted(str(p) for p in folder.glob("*.parquet")) if folder.exists() else []
    return pads.dataset(files, schema=schema, format="parquet")


def open_triplets(output: str | Path) -> pads.Dataset:
    """The committed triplet shards (temporary files of a running writer are never included)."""
    return _open(Path(output) / TRIPLETS_DIR, TRIPLET_SCHEMA)


def open_errors(output: str | Path) -> pads.Dataset:
    return _open(Path(output) / ERRORS_DIR, ERROR_SCHEMA)


def open_rejects(output: str | Path) -> pads.Dataset:
    """What ``filter-humans --keep-rejects`` turned away, with its scores and areas."""
    return _open(Path(output) / REJECTS_DIR, REJECT_SCHEMA)
