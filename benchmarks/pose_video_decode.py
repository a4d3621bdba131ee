"""Decoding a video the way the product reads it, against the loop a user would write (one decord
reader, the frames in order), in one process on the same file: a synthetic 720p clip encoded with
x264's default 250-frame GOP.

- ``generate``'s driving video (``generate/inputs.py: poses_from_video``): batches of frames in
  order from one opened video; before, it opened the video anew for every batch (each batch seeks
  back to its keyframe and decodes from there). Its frames are decoded at the size they are
  annotated at (the short side at 256 px) and squared: before, whole-size, then shrunk frame by
  frame (a 4K clip's batch of 32 frames: 800 MB).
- ``preprocess``'s units (``pipeline/stages.py: decode_unit``): 32-frame segments, each pipeline
  actor keeping its last video open (``LastVideo``). Ray Data hands an actor calls of consecutive
  units; here two actors take calls of ``--units-per-call`` in turn (each call after the other
  actor's call seeks once). Before, every unit opened the video anew.

    python benchmarks/pose_video_decode.py [--frames 1200] [--batch 32] [--gop 250] [--units-per-call 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_clip(path: Path, frames: int, gop: int, width: int = 1280, height: int = 720) -> None:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "preset": "ultrafast"}
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32, help="generate's annotation batch")
    parser.add_argument("--gop", type=int, default=250)
    parser.add_argument("--units-per-call", type=int, default=5,
                        help="preprocess units per actor call (the CPU pipeline's planner picks ~5 for one such "
                             "clip on two actors)")
    args = parser.parse_args()

    import decord

    from disco.generate.inputs import MIN_ANNOTATE_SIDE
    from disco.model.conditioning import square
    from disco.pipeline.decode import LastVideo, cover_size, decode_video_frames, open_video, probe_video
    from disco.pipeline.stages import decode_unit

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        write_clip(path, args.frames, args.gop)
        info = probe_video(path)
        indices = list(range(info.num_frames))
        batches = [indices[i:i + args.batch] for i in range(0, len(indices), args.batch)]

        def user_loop():  # what a user would write: one reader, every frame in order
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            return sum(len(reader[i].asnumpy()) > 0 for i in indices)

        def ours():
            video = open_video(path, info.width, info.height)
            return sum(len(decode_video_frames(path, b, info.width, info.height, video)[0]) for b in batches)

        def reopened():
            return sum(len(decode_video_frames(path, b, info.width, info.height)[0]) for b in batches)

        largest = {}

        def squared(width, height):  # generate's annotation input: a 256 px square per frame
            video, done = open_video(path, width, height), 0
            for b in batches:
                frames = decode_video_frames(path, b, width, height, video)[0]
                largest[(width, height)] = frames.nbytes
                done += sum(square(f, MIN_ANNOTATE_SIDE).shape[0] == MIN_ANNOTATE_SIDE for f in frames)
            return done

        sized = cover_size(info.width, info.height, MIN_ANNOTATE_SIDE)

        # The video's units as preprocess plans them (full size, ``--segment-frames`` = --batch).
        units = [{"input_path": path.name, "abs_path": str(path), "kind": "video", "src_indices": b,
                  "frame_start": k * args.batch, "width": info.width, "height": info.height}
                 for k, b in enumerate(batches)]
        calls = [units[i:i + args.units_per_call] for i in range(0, len(units), args.units_per_call)]

        def actors_kept_open():
            actors = [LastVideo(), LastVideo()]
            return sum(len(decode_unit(u, {}, actors[k % 2])[0]) for k, call in enumerate(calls) for u in call)

        def units_reopened():
            return sum(len(decode_unit(u, {})[0]) for u in units)

        seconds = {}
        for name, run in (("user loop (one reader, frame by frame)", user_loop), ("generate (one reader, batches)", ours),
                          ("reopened per batch (before)", reopened),
                          (f"generate squares, decoded at {sized[0]}x{sized[1]}", lambda: squared(*sized)),
                          ("generate squares, decoded whole (before)", lambda: squared(info.width, info.height)),
                          (f"preprocess units, 2 actors, calls of {args.units_per_call}", actors_kept_open),
                          ("preprocess units reopened (before)", units_reopened)):
            started = time.perf_counter()
            assert run() == len(indices)
            seconds[name] = time.perf_counter() - started
        base = seconds["user loop (one reader, frame by frame)"]
        print(f"{len(indices)} frames of {info.width}x{info.height}, GOP {args.gop}, batches of {args.batch}")
        for name, spent in seconds.items():
            print(f"  {name:40s} {spent:6.2f} s  {len(indices) / spent:6.1f} frames/s  {spent / base:5.2f}x the user loop")
        print(f"  a batch of {args.batch} decoded for generate's squares: "
              + ", ".join(f"{w}x{h} {n / 2**20:.1f} MiB" for (w, h), n in largest.items()))


if __name__ == "__main__":
    main()
