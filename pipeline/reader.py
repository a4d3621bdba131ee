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
from disco.pipeline.writer import OutputStore


def shard_files(output: str | Path, folder: str) -> list[Path]:
    """The committed shards of one table, in commit order. The journal decides: a shard that a
    writer renamed into place but never got committed (its actor or node died, or a run was
    killed) is not data, even before the next run's recovery deletes it."""
    store = OutputStore(Path(output))
    named = store.committed_files(store.root / folder)
    if named is not None:
        return named
    path = store.root / folder
    return sorted(path.glob("*.parquet")) if path.exists() else []


def _open(output: str | Path, folder: str, schema) -> pads.Dataset:
    return pads.dataset([str(p) for p in shard_files(output, folder)], schema=schema, format="parquet")


def open_triplets(output: str | Path) -> pads.Dataset:
    """The committed triplet shards (temporary or uncommitted files of a writer are never included)."""
    return _open(output, TRIPLETS_DIR, TRIPLET_SCHEMA)


def open_errors(output: str | Path) -> pads.Dataset:
    return _open(output, ERRORS_DIR, ERROR_SCHEMA)


def open_rejects(output: str | Path) -> pads.Dataset:
    """What ``filter-humans --keep-rejects`` turned away, with its scores and areas."""
    return _open(output, REJECTS_DIR, REJECT_SCHEMA)
