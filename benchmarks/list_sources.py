"""How cheap listing a data set is: the manifest-driven listing against a bare ``os.walk`` that
only counts the files of the same tree (the least any lister must do), in one process.

Builds a TikTok-shaped tree of empty files (N sequences x F frames in images/, masks/ and
densepose/) and a COCO-shaped folder of empty .jpg files, then times both. Nothing is decoded:
the files are empty, and a lister that opened them would fail.

Then it measures the driver's memory per unit for the COCO listing: listed, planned into units
(``plan_all``), and with the listing dropped as ``preprocess`` does.

Last, the versions of ``--videos`` listed videos (``pipeline/run.py: input_versions``, size and
time of each, read at every start) against the loop a user would write (``os.stat`` one file
after another), and the ``video`` source's listing (a check of each file) against checking them
in turn, each stat made to wait ``--stat-latency-ms`` first, as a stat on NFS waits for the
server (a GETATTR round trip).

    python benchmarks/list_sources.py [--sequences 340] [--frames 300] [--images 100000]
                                      [--videos 5000] [--stat-latency-ms 0.5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from disco.pipeline.config import PreprocessConfig
from disco.pipeline.sources import list_source


def build_tiktok(root: Path, sequences: int, frames: int) -> int:
    count = 0
    for s in range(1, sequences + 1):
        for sub in ("images", "masks", "densepose"):
            folder = root / f"{s:05d}" / sub
            folder.mkdir(parents=True)
            for k in range(frames):
                (folder / f"{k:04d}.png").touch()
                count += 1
    return count


def build_coco(root: Path, images: int) -> int:
    folder = root / "train2017"
    folder.mkdir(parents=True)
    for i in range(images):
        (folder / f"{i:012d}.jpg").touch()
    return images


def walk_count(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=340)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--videos", type=int, default=5000)
    parser.add_argument("--stat-latency-ms", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for source, build, size in (("tiktok", build_tiktok, (args.sequences, args.frames)),
                                    ("coco", build_coco, (args.images,))):
            root = Path(tmp) / source
            files = build(root, *size)
            cfg = PreprocessConfig(source=source, input=root, output=Path(tmp) / "out").validate()
            walk_s, _ = timed(lambda: walk_count(root))
            list_s, listing = timed(lambda: list_source(cfg, log=lambda *_: None))
            print(f"{source:7s} {files:>8d} files on disk, {len(listing.items):>7d} inputs listed: "
                  f"os.walk {walk_s:.3f} s, listing {list_s:.3f} s, ratio listing/os.walk {list_s / walk_s:.2f}x "
                  f"({files / list_s:,.0f} files/s)")
            if source == "coco":
                driver_memory(cfg)
        video_versions(Path(tmp) / "videos", args.videos, args.stat_latency_ms / 1000)


def driver_memory(cfg: PreprocessConfig) -> None:
    """The driver's memory per unit of work: the listing, then ``plan_all`` (the units as Arrow
    rows, planned PLAN_CHUNK inputs at a time), then with the listing's records dropped as
    ``preprocess`` drops them (RSS growth of this process; freed memory the allocator keeps
    stays counted)."""
    import gc

    import psutil

    from disco.pipeline.run import plan_all

    process = psutil.Process()
    gc.collect()
    start = process.memory_info().rss
    listing = list_source(cfg, log=lambda *_: None)
    listed = process.memory_info().rss
    units = plan_all(listing.items, {"segment_frames": 32, "fps": 30.0}, {})
    planned = process.memory_info().rss
    listing.items = []
    gc.collect()
    after = process.memory_info().rss
    n = units.num_rows
    print(f"driver memory per unit ({n} stills): listing {(listed - start) / n:,.0f} B, at the peak of planning "
          f"{(planned - start) / n:,.0f} B, once planned {(after - start) / n:,.0f} B (the units' Arrow rows "
          f"{units.nbytes / n:,.0f} B)")


def video_versions(folder: Path, videos: int, latency: float) -> None:
    from disco.pipeline.run import input_versions
    from disco.pipeline.sources.generic import list_inputs

    folder.mkdir()
    for i in range(videos):
        (folder / f"{i:07d}.mp4").touch()
    items = list_inputs("video", folder, "train").items
    real_stat = os.stat

    def waiting_stat(path, *args, **kwargs):
        time.sleep(latency)
        return real_stat(path, *args, **kwargs)

    os.stat = waiting_stat
    try:
        loop_s, by_loop = timed(lambda: {item.input_path: os.stat(item.abs_path) for item in items}, repeats=1)
        ours_s, versions = timed(lambda: input_versions(items), repeats=1)
        # The listing itself checks every file (a dangling link, a FIFO): one stat each.
        from disco.pipeline.sources.generic import file_problem

        paths = [str(p) for p in sorted(folder.iterdir())]
        serial_s, _ = timed(lambda: [file_problem(p) for p in paths], repeats=1)
        listing_s, listed = timed(lambda: list_inputs("video", folder, "train"), repeats=1)
    finally:
        os.stat = real_stat
    assert len(by_loop) == len(versions) == len(listed.items) == videos
    print(f"versions of {videos} videos, {latency * 1000:g} ms a stat: os.stat loop {loop_s:.2f} s, input_versions "
          f"{ours_s:.2f} s ({loop_s / ours_s:.1f}x the loop's speed)")
    print(f"listing {videos} videos, {latency * 1000:g} ms a stat: each file checked in turn {serial_s:.2f} s, "
          f"list_inputs {listing_s:.2f} s ({serial_s / listing_s:.1f}x)")


if __name__ == "__main__":
    main()
