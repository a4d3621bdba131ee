"""Generation speed of a temporal-module (TM) model, which denoises overlapping windows of frames
jointly, against per-frame sampling with the same image model, in one process on the same inputs.

    python benchmarks/temporal_generate_speed.py [--size 64] [--frames 40] [--window 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from disco.model.conditioning import pose_size
from disco.model.disco import DisCoModel
from disco.model.pipeline import DisCoPipeline
from disco.model.temporal import add_temporal, window_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="per-frame sampling's batch")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DisCoModel.from_architecture(args.config).eval()
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 3, 224, 224, generator=g)
    background = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    side = pose_size(model, args.size)
    poses = torch.rand(args.frames, 3, side, side, generator=g)

    def timed(pipeline) -> float:
        start = time.perf_counter()
        pipeline(reference, background, poses, num_inference_steps=args.steps, guidance_scale=1.5,
                 batch_size=args.batch_size)
        return time.perf_counter() - start

    torch.manual_seed(0)
    tm = add_temporal(DisCoModel.from_architecture(args.config), {"frames": args.window}).eval()
    image, temporal = DisCoPipeline(model), DisCoPipeline(tm)
    per_frame = windowed = float("inf")
    for _ in range(args.repeats):  # interleaved, best of each: a busy machine slows both alike
        per_frame = min(per_frame, timed(image))
        windowed = min(windowed, timed(temporal))
    overlap = args.window // 4
    windows = len(window_starts(args.frames, args.window, overlap))
    print(f"{args.config}, {args.frames} frames of {args.size} px, {args.steps} DDIM steps, guidance 1.5, "
          f"{torch.get_num_threads()} threads")
    print(f"per-frame (image model, batch {args.batch_size}): {per_frame:.2f} s, {args.frames / per_frame:.2f} frames/s")
    print(f"windowed TM ({windows} windows of {args.window}, overlap {overlap}): {windowed:.2f} s, "
          f"{args.frames / windowed:.2f} frames/s ({windowed / per_frame:.2f}x the time; "
          f"{windows * args.window / args.frames:.2f}x the frames denoised)")


if __name__ == "__main__":
    main()
