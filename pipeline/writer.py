"""The output directory: atomic shards, the commit journal that makes runs resumable, recovery.

A unit of work (a still, or a segment of a video) is committed once its rows sit in a shard that
was renamed into place *and* the journal names it. A shard the journal does not name was left by
a run killed between the two steps; recovery deletes it, and its units are simply redone.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from disco.pipeline.schema import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    MANIFEST_FILE,
    PICTURE_COLUMNS,
    REJECT_SCHEMA,
    REJECTS_DIR,
    TRIPLET_SCHEMA,
    TRIPLETS_DIR,
)

JOURNAL_FILE = "_journal.jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _write_parquet_atomic(table: pa.Table, final: Path, row_group_rows: int) -> int:
    tmp = final.with_name(f".{final.name}.tmp")
    with pq.ParquetWriter(tmp, table.schema, **_parquet_options(table.schema)) as writer:
        writer.write_table(table, row_group_size=row_group_rows)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


@dataclass
class JournalState:
    entries: list[dict] = field(default_factory=list)
    params: dict | None = None

    def units(self) -> dict[str, dict[int, dict]]:
        """input_path -> {unit_index: unit record} over every committed shard."""
        out: dict[str, dict[int, dict]] = defaultdict(dict)
        for entry in self.entries:
            for unit in entry.get("units", []):
                out[unit["input_path"]][unit["unit_index"]] = unit
        return out

    def complete_inputs(self) -> set[str]:
        return {
            path for path, units in self.units().items()
            if len(units) == next(iter(units.values()))["unit_count"]
        }

    def partial_units(self) -> dict[str, list[int]]:
        done = self.complete_inputs()
        return {path: sorted(units) for path, units in self.units().items() if path not in done}


class OutputStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.triplets = self.root / TRIPLETS_DIR
        self.errors = self.root / ERRORS_DIR
        self.rejects = self.root / REJECTS_DIR
        self.journal = self.root / JOURNAL_FILE
        self.manifest = self.root / MANIFEST_FILE

    def clear(self) -> None:
        """--overwrite: remove what this tool wrote, and nothing else of the user's."""
        for d in (self.triplets, self.errors, self.rejects):
            if d.exists():
                shutil.rmtree(d)
        for f in (self.journal, self.manifest):
            f.unlink(missing_ok=True)

    def prepare(self) -> None:
        self.triplets.mkdir(parents=True, exist_ok=True)
        self.errors.mkdir(parents=True, exist_ok=True)

    def read_journal(self) -> JournalState:
        state = JournalState()
        if not self.journal.exists():
            return state
        with open(self.journal, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: nothing after it was committed
                if record.get("type") == "params":
                    state.params = record["params"]
                elif record.get("type") == "commit":
                    state.entries.append(record)
        return state

    def recover(self, state: JournalState) -> list[str]:
        """Delete temporary files and shards that no journal entry names, and rewrite the journal
        whole (with ``state.params``); returns what was removed."""
        named = {name for e in state.entries for name in e.get("files", [])}
        removed = []
        for d in (self.triplets, self.errors, self.rejects):
            if not d.exists():
                continue
            for path in d.iterdir():
                rel = path.relative_to(self.root).as_posix()
                if path.name.endswith(".tmp") or (path.suffix == ".parquet" and rel not in named):
                    path.unlink()
                    removed.append(rel)
        # Rewrite the journal without a torn last line, so later appends start on a clean line.
        self._rewrite_journal(state)
        return removed

    def _rewrite_journal(self, state: JournalState) -> None:
        lines = []
        if state.params is not None:
            lines.append(json.dumps({"type": "params", "params": state.params}))
        lines += [json.dumps(e) for e in state.entries]
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.journal)

    def append(self, record: dict) -> None:
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def next_shard_index(self, state: JournalState) -> int:
        indices = [e["shard_index"] for e in state.entries]
        return max(indices) + 1 if indices else 0


class ShardWriter:
    """Buffers complete units and commits them as shards of at most ``shard_rows`` rows.

    A unit is never split across shards, so a shard holds at most max(shard_rows, rows of one
    unit) rows; video segments (``--segment-frames``) keep units small.
    """

    def __init__(self, store: OutputStore, shard_index: int, shard_rows: int, row_group_rows: int):
        self.store = store
        self.shard_index = shard_index
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._units: list[dict] = []
        self._errors: list[dict] = []
        self._rejects: list[dict] = []
        self.committed: list[dict] = []

    def add_unit(self, rows: pa.Table, unit: dict, errors: list[dict], rejects: list[dict] | None = None) -> None:
        if self._rows and self._rows + rows.num_rows > self.shard_rows:
            self.flush()
        if rows.num_rows:
            self._tables.append(rows)
            self._rows += rows.num_rows
        self._units.append(unit)
        self._errors.extend(errors)
        self._rejects.extend(rejects or ())
        if self._rows >= self.shard_rows:
            self.flush()

    def flush(self) -> dict | None:
        if not self._units:
            return None
        name = f"part-{self.shard_index:05d}.parquet"
        files, shards = [], []
        if self._tables:
            table = pa.concat_tables(self._tables).cast(TRIPLET_SCHEMA)
            size = _write_parquet_atomic(table, self.store.triplets / name, self.row_group_rows)
            files.append(f"{TRIPLETS_DIR}/{name}")
            shards.append({"path": f"{TRIPLETS_DIR}/{name}", "rows": table.num_rows, "bytes": size})
        if self._errors:
            table = pa.Table.from_pylist(self._errors, schema=ERROR_SCHEMA)
            size = _write_parquet_atomic(table, self.store.errors / name, self.row_group_rows)
            files.append(f"{ERRORS_DIR}/{name}")
            shards.append({"path": f"{ERRORS_DIR}/{name}", "rows": table.num_rows, "bytes": size})
        if self._rejects:
            self.store.rejects.mkdir(exist_ok=True)
            table = pa.Table.from_pylist(self._rejects, schema=REJECT_SCHEMA)
            size = _write_parquet_atomic(table, self.store.rejects / name, self.row_group_rows)
            files.append(f"{REJECTS_DIR}/{name}")
            shards.append({"path": f"{REJECTS_DIR}/{name}", "rows": table.num_rows, "bytes": size})
            _fsync_dir(self.store.rejects)
        if files:
            _fsync_dir(self.store.triplets)
            _fsync_dir(self.store.errors)
        entry = {
            "type": "commit", "shard_index": self.shard_index, "files": files, "shards": shards,
            "units": self._units,
        }
        self.store.append(entry)
        self.committed.append(entry)
        self.shard_index += 1
        self._tables, self._rows, self._units, self._errors, self._rejects = [], 0, [], [], []
        return entry
