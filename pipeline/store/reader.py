"""Reading an output directory back: the trainer, ``inspect`` and the tests all go through here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from disco.pipeline.errors import STOPS_THE_RUN, ConfigError, first_line
from disco.pipeline.io_threads import map_in_threads

from disco.pipeline.store.schema import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    REJECT_SCHEMA,
    REJECTS_DIR,
    TRIPLET_SCHEMA,
    TRIPLETS_DIR,
)
from disco.pipeline.store.output import OutputStore


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


class DamagedShard(ConfigError):
    """A shard of an output folder cannot be read as what it should hold."""


def damaged(path: str | Path, exc: BaseException) -> DamagedShard:
    """The one-line error for a shard that failed to read: the file and what is wrong. A file
    that is not there was listed where it was (the driver): on a node without the storage (a
    Ray task of another node), or removed since; not damaged."""
    try:
        gone = isinstance(exc, FileNotFoundError) or not Path(path).exists()
    except OSError:  # the storage fails the look too (an NFS error): the read's error is the news
        gone = False
    if gone:
        import socket

        return DamagedShard(f"{STOPS_THE_RUN} {path} does not exist on node {socket.gethostname()}: it was listed, "
                            "then removed, or this node does not see the storage it was listed on (on a cluster "
                            "the data must be on storage every node sees, by the same path)")
    # (Not "remove it": the journal names it, and every reader would then stop at the missing file.)
    return DamagedShard(f"{path} is damaged ({first_line(exc)}); restore it from a copy, or write the output "
                        "again with the command that made it and --overwrite")


def check_shard(path: str | Path, schema: pa.Schema) -> None:
    """Read the shard's footer and compare its columns with ``schema``: a cut or overwritten file,
    or a file of another table, is refused here with one line, not deep inside a reader."""
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise damaged(path, exc) from None
    missing = [f.name for f in schema if f.name not in found.names]
    if missing:
        raise DamagedShard(f"{path} is not a shard of this table: it lacks {', '.join(missing[:5])}")


# Shards whose footers are checked at once (``io_threads``): 30 K shards on NFS, one after the
# other, took a minute and a half before a training run or an evaluation began.
FOOTER_READERS = 16


def _open(output: str | Path, folder: str, schema) -> pads.Dataset:
    files = shard_files(output, folder)
    map_in_threads(lambda path: check_shard(path, schema), files, FOOTER_READERS, "disco-footers")
    return pads.dataset([str(p) for p in files], schema=schema, format="parquet")


def open_triplets(output: str | Path) -> pads.Dataset:
    """The committed triplet shards (temporary or uncommitted files of a writer are never included)."""
    return _open(output, TRIPLETS_DIR, TRIPLET_SCHEMA)


def open_errors(output: str | Path) -> pads.Dataset:
    return _open(output, ERRORS_DIR, ERROR_SCHEMA)


def open_rejects(output: str | Path) -> pads.Dataset:
    """What ``filter-humans --keep-rejects`` turned away, with its scores and areas."""
    return _open(output, REJECTS_DIR, REJECT_SCHEMA)


def take_rows(dataset: pads.Dataset, positions: Sequence[int], columns: list[str]) -> pa.Table:
    """The rows at ``positions`` (row numbers in the dataset's order: file by file, row group by
    row group), in the order given, reading only the row groups that hold them.

    pyarrow's ``Dataset.take`` reads the whole of every file up to the last position asked for: a
    contact sheet of 8 rows spread over a COCO-sized output read all of its 12-18 GB of pictures."""
    positions = np.asarray(positions, np.int64)
    wanted = np.unique(positions)
    if not len(wanted):
        return dataset.schema.empty_table().select(columns)
    if wanted[0] < 0:
        raise IndexError(f"row {int(wanted[0])}: rows are numbered from 0")
    parts, start = [], 0
    for fragment in dataset.get_fragments():
        fragment.ensure_complete_metadata()  # the row groups' sizes, from the footer
        for group in fragment.row_groups:
            inside = wanted[(wanted >= start) & (wanted < start + group.num_rows)]
            if len(inside):
                table = fragment.subset(row_group_ids=[group.id]).to_table(columns=columns, schema=dataset.schema)
                parts.append(table.take(pa.array(inside - start)))
            start += group.num_rows
        if start > wanted[-1]:
            break
    if start <= wanted[-1]:
        raise IndexError(f"row {int(wanted[-1])} is past the dataset's last row ({start - 1})")
    return pa.concat_tables(parts).take(pa.array(np.searchsorted(wanted, positions)))
