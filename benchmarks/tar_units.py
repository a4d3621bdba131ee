"""Reading a big WebDataset shard unit by unit: each unit seeking to its first sample's offset
(recorded when the shard is counted) against each unit walking the shard's headers from the
start (what reading a range with ``tarfile`` does unless told where it starts, and what this
project did before), in one process.

Builds one img2dataset-shaped shard (KEY.jpg + KEY.json + KEY.txt per sample, small members, so
the header walk is what costs) and reads it in units of ``--segment-frames`` samples both ways,
checking that both read the same bytes.

    python benchmarks/tar_units.py [--samples 10000] [--segment-frames 32]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

from disco.pipeline.sources.webdataset import entry_offsets, read_entries


def build_shard(path: Path, samples: int) -> None:
    with tarfile.open(path, "w") as tar:
        for k in range(samples):
            for suffix, data in ((".jpg", b"\xff\xd8" + bytes(2000)), (".json", b'{"caption": "x"}'), (".txt", b"x")):
                member = tarfile.TarInfo(f"{k:09d}{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def read_all(shard: str, units: list[tuple[int, int, int]], seek: bool) -> tuple[float, int]:
    started, total = time.perf_counter(), 0
    for start, stop, offset in units:
        for _, _, data in read_entries(shard, start, stop, offset if seek else None):
            total += len(data or b"")
    return time.perf_counter() - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--segment-frames", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = str(Path(tmp) / "00000.tar")
        build_shard(Path(shard), args.samples)
        started = time.perf_counter()
        offsets = entry_offsets(shard)
        counted = time.perf_counter() - started
        step = args.segment_frames
        units = [(k, min(len(offsets), k + step), offsets[k]) for k in range(0, len(offsets), step)]
        sought, sought_bytes = read_all(shard, units, seek=True)
        walked, walked_bytes = read_all(shard, units, seek=False)
        assert sought_bytes == walked_bytes, "the two ways read different bytes"
    print(f"{args.samples} samples ({3 * args.samples} members), {len(units)} units of {step}; "
          f"counting the shard (offsets recorded): {counted:.2f} s")
    print(f"units walking the headers from the start: {walked:.2f} s")
    print(f"units seeking to their first sample:      {sought:.2f} s   ({walked / sought:.1f}x faster)")


if __name__ == "__main__":
    main()
