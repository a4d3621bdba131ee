"""Rows/s the commit path sustains: actors that write their own shards (the driver only appends
commit records to the journal) against the single-writer design (every encoded byte travels from
the actors to the driver, which writes every shard).

Both run in one process on the same Ray instance, with the same actors producing the same rows:
pictures of the sizes a 512 px row holds (random bytes, so nothing compresses), made once per
actor so that producing a row costs next to nothing and the write path is what is measured.

    python benchmarks/write_path.py [--writers 1 2] [--units 96] [--unit-rows 32] [--shard-rows 256]

On one machine both designs share one disk and its cores; on a cluster every node adds its own
network link and disk to the scaled-out path, while the single writer stays one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa

# Typical encoded sizes of one 512 px row (JPEG image, foreground, background; PNG mask, pose).
PICTURE_BYTES = {"image": 60_000, "mask": 6_000, "foreground": 30_000, "background": 45_000, "pose": 12_000}


def _unit_rows(unit: int, rows: int, pictures: dict[str, bytes]) -> pa.Table:
    from disco.pipeline.store.schema import TRIPLET_SCHEMA

    records = [{
        "sample_id": f"video/c{unit}/{i:06d}", "source": "video", "clip_id": f"c{unit}", "frame_index": i,
        "timestamp_s": i / 30, "split": "train", "input_path": f"c{unit}.mp4", "width": 512, "height": 512,
        **pictures, "body_keypoints": [0.5] * 54, "hand_keypoints": [0.5] * 126, "face_keypoints": None,
        "person_score": 0.9, "person_count": 1, "mask_area": 0.3,
    } for i in range(rows)]
    return pa.Table.from_pylist(records, schema=TRIPLET_SCHEMA)


def _record(unit: int, rows: int) -> dict:
    return {"input_path": f"c{unit}.mp4", "unit_index": 0, "unit_count": 1, "frames": rows, "rows": rows,
            "skipped": {}, "errors": 0}


class Produce:
    """Single-writer design: the actor hands the rows themselves to the driver."""

    def __init__(self, rows: int):
        self.rows = rows
        self.pictures = {k: os.urandom(n) for k, n in PICTURE_BYTES.items()}

    def __call__(self, batch: dict) -> pa.Table:
        return pa.concat_tables([_unit_rows(int(u), self.rows, self.pictures) for u in batch["id"]])


class ProduceAndWrite:
    """Scaled-out design: the actor writes its shards and hands the driver one commit record each."""

    def __init__(self, rows: int, output: str, shard_rows: int):
        import secrets

        from disco.pipeline.store.output import OutputStore
        from disco.pipeline.store.shards import ShardWriter

        self.rows = rows
        self.pictures = {k: os.urandom(n) for k, n in PICTURE_BYTES.items()}
        self.entries: list[dict] = []
        self.writer = ShardWriter(OutputStore(Path(output)), f"part-{secrets.token_hex(3)}-", shard_rows, 64,
                                  commit=self.entries.append)

    def __call__(self, batch: dict) -> pa.Table:
        for u in batch["id"]:
            self.writer.add_unit(_unit_rows(int(u), self.rows, self.pictures), _record(int(u), self.rows), [])
        self.writer.flush()
        entries = list(self.entries)
        self.entries.clear()  # the writer appends to this very list
        return pa.table({"entry": [json.dumps(e) for e in entries]})


def run(design: str, writers: int, units: int, rows: int, shard_rows: int, root: Path,
        name: str = "") -> tuple[float, int, int]:
    import ray.data
    from ray.data import ActorPoolStrategy

    from disco.pipeline.store.output import OutputStore
    from disco.pipeline.store.shards import ShardWriter

    out = root / (name or f"{design}-{writers}")
    store = OutputStore(out)
    store.prepare()
    per_call = max(1, shard_rows // rows)
    ds = ray.data.range(units, override_num_blocks=units)
    to_driver = 0
    started = time.perf_counter()
    if design == "single":
        ds = ds.map_batches(Produce, fn_constructor_kwargs={"rows": rows}, batch_size=1, batch_format="numpy",
                            compute=ActorPoolStrategy(size=writers), num_cpus=0.5)
        writer = ShardWriter(store, "part-", shard_rows, 64)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            to_driver += block.nbytes
            for unit in sorted(set(block.column("clip_id").to_pylist())):
                table = block.filter(pa.compute.equal(block.column("clip_id"), unit))
                writer.add_unit(table, _record(int(unit[1:]), table.num_rows), [])
        writer.flush()
    else:
        ds = ds.map_batches(ProduceAndWrite, fn_constructor_kwargs={"rows": rows, "output": str(out),
                                                                     "shard_rows": shard_rows},
                            batch_size=per_call, batch_format="numpy", compute=ActorPoolStrategy(size=writers),
                            num_cpus=0.5)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            to_driver += block.nbytes
            for entry in block.column("entry").to_pylist():
                store.append(json.loads(entry))
    wall = time.perf_counter() - started
    written = sum(s["rows"] for e in store.read_journal().entries for s in e["shards"])
    assert written == units * rows, (written, units * rows)
    return wall, written, to_driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--units", type=int, default=96)
    parser.add_argument("--unit-rows", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=256)
    args = parser.parse_args()

    import logging

    from ray.data import DataContext

    from disco.pipeline.cluster import init_ray

    init_ray()
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    DataContext.get_current().enable_progress_bars = False
    root = Path(tempfile.mkdtemp(prefix="disco-write-path-"))
    row_bytes = sum(PICTURE_BYTES.values())
    print(f"{args.units} units x {args.unit_rows} rows, {row_bytes / 1e3:.0f} kB of pictures per row, "
          f"shards of {args.shard_rows} rows, on {os.cpu_count()} CPUs")
    try:
        run("scaled", 1, 4, args.unit_rows, args.shard_rows, root, name="warm-up")  # workers, imports
        for writers in args.writers:
            single, rows, single_bytes = run("single", writers, args.units, args.unit_rows, args.shard_rows, root)
            scaled, _, scaled_bytes = run("scaled", writers, args.units, args.unit_rows, args.shard_rows, root)
            print(f"{writers} actor(s): single writer {rows / single:6.0f} rows/s ({rows * row_bytes / single / 1e6:5.1f} MB/s, "
                  f"{single_bytes / 1e6:.0f} MB to the driver) | actors write {rows / scaled:6.0f} rows/s "
                  f"({rows * row_bytes / scaled / 1e6:5.1f} MB/s, {scaled_bytes / 1e3:.0f} kB to the driver) | "
                  f"ratio {single / scaled:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
