"""Generation speed: DDIM sampling with the pose embedding computed once per batch (the default)
against recomputing it at every step, in one process on the same inputs.

    python benchmarks/generate_speed.py [--size 64] [--frames 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import disco.model.pipeline as pipeline_module
from disco.model.conditioning import pose_size
from disco.model.pipeline import DisCoPipeline
from disco.model.disco import DisCoModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DisCoModel.from_architecture(args.config)
    pipe = DisCoPipeline(model)
    side = pose_size(model, args.size)
    reference = torch.randn(1, 3, 224, 224)
    background = torch.rand(1, 3, args.size, args.size) * 2 - 1
    poses = torch.rand(args.frames, 3, side, side)

    def timed() -> float:
        started = time.perf_counter()
        pipe(reference, background, poses, num_inference_steps=args.steps, batch_size=args.frames)
        return time.perf_counter() - started

    original = pipeline_module.pose_embedding_cache

    def uncached_run() -> float:
        pipeline_module.pose_embedding_cache = lambda model: contextlib.nullcontext()
        try:
            return timed()
        finally:
            pipeline_module.pose_embedding_cache = original

    timed()  # warm-up
    # Alternate the two and keep each one's best, so load from other processes hurts both alike.
    runs = [(timed(), uncached_run()) for _ in range(args.repeats)]
    cached, uncached = min(r[0] for r in runs), min(r[1] for r in runs)
    frames = args.frames
    print(f"{args.config} model, {frames} frames of {args.size} px, {args.steps} DDIM steps, guidance 1.5")
    print(f"pose embedding every step: {uncached:.2f} s ({frames / uncached:.2f} frames/s)")
    print(f"pose embedding once:       {cached:.2f} s ({frames / cached:.2f} frames/s)")
    print(f"ratio: {uncached / cached:.2f}x")


if __name__ == "__main__":
    main()
