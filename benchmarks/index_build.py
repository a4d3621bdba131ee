"""The start of every training run: the index of its rows (``train/data/index.py: build_index``),
which reads four small columns and the row-group sizes of every shard, against the loop a user
would write for the same columns (``pq.read_table(shard, columns=...)`` shard after shard), in one
process on the same files.

``build_index`` first checks every shard's footer (``open_triplets``), then reads the columns.
The shards are in the pipeline's layout (1024 rows, row groups of 64, the triplet schema with
small pictures). Each read can be made to wait ``--latency-ms`` first, as a read from NFS waits
for the server (about 0.5-1 ms a round trip on a data-centre network; 0 reads the local disk as
it is: then the page cache answers and only the CPU work shows).

    python benchmarks/index_build.py [--shards 200] [--latency-ms 1.0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


class _SlowFile(io.RawIOBase):
    """A file whose every read waits ``latency`` s first (the GIL released, as in a real read)."""

    def __init__(self, path: str, latency: float, counter: list[int]):
        self._file = open(path, "rb")  # noqa: SIM115 - closed with this object
        self._latency, self._counter = latency, counter

    def readinto(self, buffer) -> int:
        self._counter[0] += 1
        if self._latency:
            time.sleep(self._latency)
        return self._file.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()
        super().close()


def write_shards(folder: Path, shards: int) -> None:
    import pyarrow as pa

    from disco.pipeline.store.schema import TRIPLET_SCHEMA
    from disco.pipeline.store.shards import write_parquet_atomic

    rng = np.random.default_rng(0)
    out = folder / "triplets"
    out.mkdir(parents=True)
    picture = lambda: rng.bytes(200)  # noqa: E731 - small pictures: the index never reads them
    for s in range(shards):
        rows = [dict(sample_id=f"video/c{s}-{i // 128}/{i % 128:06d}", source="video", clip_id=f"c{s}-{i // 128}",
                     frame_index=i % 128, timestamp_s=i / 30, split="train", input_path=f"c{s}.mp4", width=64, height=64,
                     image=picture(), mask=picture(), foreground=picture(), background=picture(), pose=picture(),
                     body_keypoints=[0.0] * 54, hand_keypoints=None, face_keypoints=None, person_score=1.0,
                     person_count=1, mask_area=0.5) for i in range(1024)]
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), out / f"shard-{s:05d}.parquet", 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from disco.train.data import build_index
    from disco.train.data.index import INDEX_COLUMNS

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        write_shards(folder, args.shards)
        files = sorted(str(p) for p in (folder / "triplets").glob("*.parquet"))
        reads = [0]
        real = pq.ParquetFile

        real_schema = pq.read_schema

        def slow(source, **kwargs):  # build_index's reader
            return real(_SlowFile(source, args.latency_ms / 1000, reads) if isinstance(source, str) else source, **kwargs)

        def slow_schema(source, **kwargs):  # its check of every shard's footer first
            return real_schema(_SlowFile(str(source), args.latency_ms / 1000, reads), **kwargs)

        pq.ParquetFile, pq.read_schema = slow, slow_schema
        try:
            def user_loop() -> int:
                return sum(len(pq.read_table(_SlowFile(path, args.latency_ms / 1000, reads), columns=INDEX_COLUMNS))
                           for path in files)

            def ours() -> int:
                return len(build_index([str(folder)]))

            results = {}
            for _ in range(args.rounds):  # the best of each, in turns (the first round warms the page cache)
                for name, run in (("user loop (pq.read_table a shard)", user_loop), ("build_index", ours)):
                    reads[0] = 0
                    started = time.perf_counter()
                    rows = run()
                    spent = time.perf_counter() - started
                    if name not in results or spent < results[name][0]:
                        results[name] = (spent, reads[0], rows)
        finally:
            pq.ParquetFile, pq.read_schema = real, real_schema
    base = results["user loop (pq.read_table a shard)"][0]
    print(f"{args.shards} shards of 1024 rows (row groups of 64), {args.latency_ms:g} ms a read")
    for name, (seconds, count, rows) in results.items():
        print(f"  {name:32s} {seconds:7.2f} s  {count / args.shards:5.1f} reads a shard  {rows} rows  "
              f"{base / seconds:5.2f}x the user loop's speed")


if __name__ == "__main__":
    main()
