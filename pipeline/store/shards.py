"""Shards: Parquet files written atomically (a temporary name, fsync, rename), and the writer
that fills them with whole units and hands each finished shard's commit record on.

A unit of work (a still, or a segment of a video) is committed once its rows sit in a shard that
was renamed into place *and* the journal (``output.OutputStore``) names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from disco.pipeline.store.schema import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    PICTURE_COLUMNS,
    REJECT_SCHEMA,
    REJECTS_DIR,
    TRIPLET_SCHEMA,
    TRIPLETS_DIR,
)
from disco.pipeline.store.output import JournalState, OutputStore, fsync_dir, run_token


def _parquet_options(schema: pa.Schema) -> dict:
    """Encoded pictures are already compressed: storing them plain saves the writer's CPU for
    nothing lost; the metadata columns get zstd and dictionaries."""
    pictures = [n for n in PICTURE_COLUMNS if n in schema.names]
    others = [n for n in schema.names if n not in pictures]
    return {
        "compression": {**{n: "none" for n in pictures}, **{n: "zstd" for n in others}},
        "use_dictionary": [n for n in others if pa.types.is_string(schema.field(n).type)],
        "write_statistics": others,
    }


def write_parquet_atomic(table: pa.Table, final: Path, row_group_rows: int) -> int:
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, table.schema, **_parquet_options(table.schema)) as writer:
            writer.write_table(table, row_group_size=row_group_rows)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # pyarrow names no file: name ours, so the failure is known as the output folder's.
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(tmp)) from exc
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


class ShardWriter:
    """Buffers complete units and writes them as shards of at most ``shard_rows`` rows.

    A unit is never split across shards, so a shard holds at most max(shard_rows, rows of one
    unit) rows; video segments (``--segment-frames``) keep units small. Each shard becomes a
    commit entry handed to ``commit``: by default appended to the journal here; the annotating
    actors instead hand theirs to the driver, the one process that appends to the journal.
    """

    def __init__(self, store: OutputStore, prefix: str, shard_rows: int, row_group_rows: int,
                 commit: Callable[[dict], None] | None = None):
        self.store = store
        self.prefix = prefix
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self.commit = commit or store.append
        self._written = 0
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._units: list[dict] = []
        self._errors: list[dict] = []
        self._rejects: list[dict] = []

    def add_unit(self, rows: pa.Table, unit: dict, errors: list[dict], rejects: list[dict] | None = None) -> None:
        if self._rows and self._rows + rows.num_rows > self.shard_rows:
            self.flush()
        if rows.num_rows:
            self._tables.append(rows)
            self._rows += rows.num_rows
        # Counted here, where the rows go in in this order: whose each errors and rejects row is
        # (``_row_units``), so that --retry-errors can take out one failed unit of a video.
        self._units.append({**unit, "errors": len(errors), "rejects": len(rejects or ())})
        self._errors.extend(errors)
        self._rejects.extend(rejects or ())
        if self._rows >= self.shard_rows:
            self.flush()

    def flush(self) -> dict | None:
        if not self._units:
            return None
        name = f"{self.prefix}{self._written:05d}.parquet"
        files, shards = [], []
        parts = [(self.store.triplets, TRIPLETS_DIR, lambda: pa.concat_tables(self._tables).cast(TRIPLET_SCHEMA),
                  self._tables),
                 (self.store.errors, ERRORS_DIR, lambda: pa.Table.from_pylist(self._errors, schema=ERROR_SCHEMA),
                  self._errors),
                 (self.store.rejects, REJECTS_DIR, lambda: pa.Table.from_pylist(self._rejects, schema=REJECT_SCHEMA),
                  self._rejects)]
        for folder, label, build, pending in parts:
            if not pending:
                continue
            folder.mkdir(exist_ok=True)
            table = build()
            size = write_parquet_atomic(table, folder / name, self.row_group_rows)
            fsync_dir(folder)
            files.append(f"{label}/{name}")
            shards.append({"path": f"{label}/{name}", "rows": table.num_rows, "bytes": size})
        entry = {"type": "commit", "files": files, "shards": shards, "units": self._units}
        self.commit(entry)
        self._written += 1
        self._tables, self._rows, self._units, self._errors, self._rejects = [], 0, [], [], []
        return entry


def _row_units(entry: dict, count: str, rows: int) -> list[tuple[str, int]] | None:
    """Whose each row of a commit's errors (``count`` "errors") or rejects ("rejects") shard is,
    as (input_path, unit_index): the writer puts a unit's rows there in the order of the commit's
    units, and the commit counts them per unit. None where the commit cannot say (one written
    before units counted their rejects)."""
    counts = [u.get(count) for u in entry.get("units", [])]
    if None in counts or sum(counts) != rows:
        return None
    return [(u["input_path"], u["unit_index"]) for u, n in zip(entry["units"], counts) for _ in range(n)]


def _shard_rows(entry: dict) -> dict[str, int]:
    return {shard["path"]: shard["rows"] for shard in entry.get("shards", [])}


def failed_units(store: OutputStore, state: JournalState, types: set[str]) -> set[tuple[str, int]]:
    """Committed units, as (input_path, unit_index), that wrote no triplet rows and hold an errors
    row of one of ``types`` ("all": any type): the segment of a video that a passing read error or
    a broken GPU failed, while the segments beside it wrote their rows. Where a commit cannot say
    whose its rows are (``_row_units``), its inputs are taken only whole, when none of their
    units wrote rows."""
    def wanted(kind: str) -> bool:
        return "all" in types or kind in types

    failed: set[tuple[str, int]] = set()
    whole: set[str] = set()
    for entry in state.entries:
        candidates = {(u["input_path"], u["unit_index"]) for u in entry.get("units", []) if u["rows"] == 0 and u["errors"]}
        if not candidates:
            continue
        files, rows = entry.get("files", []), _shard_rows(entry)
        errors = next((f for f in files if f.startswith(f"{ERRORS_DIR}/")), None)
        if errors is None:
            continue
        kinds = pq.read_table(store.root / errors, columns=["input_path", "error_type"])
        owners = _row_units(entry, "errors", kinds.num_rows)
        rejects = next((f for f in files if f.startswith(f"{REJECTS_DIR}/")), None)
        if owners is None or (rejects is not None and _row_units(entry, "rejects", rows.get(rejects, -1)) is None):
            paths = {path for path, _ in candidates}
            whole.update(path for path, kind in zip(kinds.column("input_path").to_pylist(),
                                                    kinds.column("error_type").to_pylist())
                         if path in paths and wanted(kind))
            continue
        failed.update(owner for owner, kind in zip(owners, kinds.column("error_type").to_pylist())
                      if owner in candidates and wanted(kind))
    units = state.units()
    for path in whole:
        if all(u["rows"] == 0 for u in units[path].values()):
            failed.update((path, index) for index in units[path])
    return failed


def retract_units(store: OutputStore, state: JournalState, taken: set[tuple[str, int]],
                  row_group_rows: int) -> JournalState:
    """Take ``taken`` units (input_path, unit_index; units that wrote no triplet rows) out of the
    committed output, so that a run does them again: they leave the journal, and their errors and
    rejects rows the shards that hold them (each rewritten without them under a new name; one left
    empty goes). An input with units left stays partly done, and a resume does the rest. The
    journal is rewritten once, atomically: before that, the new shards are files no commit names
    (recovery deletes them), after it the old ones are."""
    import pyarrow.compute as pc

    committed = state.units()
    by_input: dict[str, set[int]] = {}
    for path, index in taken:
        by_input.setdefault(path, set()).add(index)
    # Inputs taken whole: where a commit cannot say whose its rows are, they go by input_path.
    whole = pa.array(sorted(path for path, indices in by_input.items() if indices >= set(committed.get(path, ()))),
                     pa.string())
    token, renamed = run_token(), {}  # old shard -> its rewrite (None: nothing left in it)
    for entry in state.entries:
        if not any((u["input_path"], u["unit_index"]) in taken for u in entry.get("units", [])):
            continue
        rows = _shard_rows(entry)
        for rel in entry.get("files", []):
            if rel in renamed or not rel.startswith((f"{ERRORS_DIR}/", f"{REJECTS_DIR}/")):
                continue
            table = pq.read_table(store.root / rel)
            owners = _row_units(entry, "errors" if rel.startswith(f"{ERRORS_DIR}/") else "rejects",
                                rows.get(rel, -1))
            keep = (pa.array([owner not in taken for owner in owners], pa.bool_()) if owners is not None
                    else pc.invert(pc.is_in(table.column("input_path"), whole)))
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            renamed[rel] = None
            if kept.num_rows:
                name = Path(rel)
                renamed[rel] = (name.parent / f"{name.stem}-{token}{name.suffix}").as_posix()
                write_parquet_atomic(kept, store.root / renamed[rel], row_group_rows)
    for folder in (store.errors, store.rejects):
        if folder.exists():
            fsync_dir(folder)
    entries = []
    for entry in state.entries:
        units = [u for u in entry.get("units", []) if (u["input_path"], u["unit_index"]) not in taken]
        files = [renamed.get(f, f) for f in entry.get("files", []) if renamed.get(f, f) is not None]
        shards = [_rewritten(store, shard, renamed[shard["path"]]) if shard["path"] in renamed else shard
                  for shard in entry.get("shards", []) if renamed.get(shard["path"], shard["path"]) is not None]
        if units or files:
            entries.append({**entry, "units": units, "files": files, "shards": shards})
    retracted = JournalState(entries, state.params)
    store.rewrite_journal(retracted)
    for rel in renamed:
        (store.root / rel).unlink(missing_ok=True)
    return retracted


def _rewritten(store: OutputStore, shard: dict, path: str) -> dict:
    """A commit's record of a shard, for its rewrite at ``path``."""
    return {**shard, "path": path, "rows": pq.read_metadata(store.root / path).num_rows,
            "bytes": (store.root / path).stat().st_size}
