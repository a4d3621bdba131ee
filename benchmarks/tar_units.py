"""WebDataset shards at scale, in one process. (1) Reading a big shard unit by unit: each unit
seeking to its first sample's offset (recorded when the shard is counted) against each unit
walking the shard's headers from the start (what reading a range with ``tarfile`` does unless
told where it starts, and what this project did before). (2) Planning many shards (counting
their samples: every header walked, in Python): ``plan_all`` in Ray tasks on a local Ray
instance against the driver's threads (what it did before; the GIL serialises them).

Builds img2dataset-shaped shards (KEY.jpg + KEY.json + KEY.txt per sample, small members, so the
header walk is what costs), checking that both ways read the same bytes and plan the same units.

    python benchmarks/tar_units.py [--samples 10000] [--segment-frames 32] [--shards 16]
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
    parser.add_argument("--shards", type=int, default=16, help="shards of --samples / 4 samples to plan")
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
    plan_shards(args.shards, max(1, args.samples // 4), args.segment_frames)


def plan_shards(count: int, samples: int, step: int) -> None:
    import ray

    from disco.pipeline.cluster import init_ray
    from disco.pipeline.run import plan_all
    from disco.pipeline.sources.generic import InputItem
    from disco.pipeline.store.schema import payload

    with tempfile.TemporaryDirectory() as tmp:
        build_shard(Path(tmp) / "00000.tar", samples)
        items = []
        for k in range(count):
            path = Path(tmp) / f"{k:05d}.tar"
            if k:
                path.hardlink_to(Path(tmp) / "00000.tar")
            items.append(InputItem(input_path=path.name, abs_path=str(path), source="laion", clip_id=path.stem,
                                   kind="tar", split="train", extra=payload()))
        settings = {"segment_frames": step, "fps": 30.0}
        init_ray(None, log=lambda message: None)
        plan_all(items[:2], settings, {}, ray_from=1)  # start the task workers: not what is measured
        started = time.perf_counter()
        on_driver = plan_all(items, settings, {}, ray_from=10**9)
        driver = time.perf_counter() - started
        started = time.perf_counter()
        on_ray = plan_all(items, settings, {}, ray_from=1)
        tasks = time.perf_counter() - started
        assert on_ray.equals(on_driver), "the two ways planned different units"
        cpus = ray.cluster_resources().get("CPU", 0)
        ray.shutdown()
    print(f"planning {count} shards of {samples} samples ({on_ray.num_rows} units): driver threads {driver:.2f} s, "
          f"Ray tasks {tasks:.2f} s on {cpus:g} CPUs ({driver / tasks:.1f}x)")


if __name__ == "__main__":
    main()
