"""How long checkpoints hold training: the trainer writing each checkpoint in a thread while it
trains on (train/checkpoint_writer.py) against the same trainer writing it in the loop, as the
official code's ``torch.save`` does (the baseline: the same files, the same fsyncs), in one process.

    .venv/bin/python benchmarks/checkpoint_stall.py [--model small] [--steps 24] [--checkpoint-every 4]
        [--resolution 64] [--batch-size 2] [--rounds 2]

Prints each run's wall time, from ``train`` called to its last checkpoint written (model building,
the first batch and the last checkpoint, written in the loop in both, cost both the same), and the
ratio. On a GPU machine, with checkpoints further apart than a write
takes: ``--use-gpu --model sd-image-variations --random-pretrained --resolution 256 --batch-size 32
--mixed-precision bf16 --steps 100 --checkpoint-every 50 --rounds 1`` (19 GB per full fine-tuning
checkpoint: 24-28 s written in the loop on the H200 lease of 2026-11-28).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


class InlineWriter:
    """The baseline: ``CheckpointWriter``'s interface, the write done at once in the loop's thread."""

    def __init__(self) -> None:
        self._result = None

    def done(self) -> bool:
        return self._result is not None

    def start(self, write) -> None:
        self._result = write()

    def wait(self):
        result, self._result = self._result, None
        return result

    def close(self) -> None:
        self._result = None


def run(data: Path, work: Path, args, inline: bool) -> float:
    import disco.train.loop as loop
    from disco.train.checkpoint_writer import CheckpointWriter
    from disco.train.config import TrainConfig
    from disco.train.launch import train

    loop.CheckpointWriter = InlineWriter if inline else CheckpointWriter
    output = work / ("inline" if inline else "thread")
    cfg = TrainConfig(stage="finetune", data=[str(data)], output=str(output),
                      **({"pretrained": str(args.pretrained)} if args.pretrained else {"model": args.model}),
                      resolution=args.resolution, batch_size=args.batch_size, max_steps=args.steps,
                      checkpoint_every=args.checkpoint_every, keep=2, log_every=1, sample_every=10**6,
                      warmup_steps=0, use_gpu=args.use_gpu, mixed_precision=args.mixed_precision,
                      gradient_checkpointing=args.use_gpu)
    started = time.perf_counter()
    try:
        train(cfg)
    finally:
        loop.CheckpointWriter = CheckpointWriter
    # The whole run, to its last checkpoint written: every wait for a write is in it (the thread's
    # included); model building and the first batch cost both modes the same.
    return time.perf_counter() - started


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_suite import RANDOM_PRETRAINED_HELP, training_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true", help="train on the GPU (with gradient checkpointing)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--random-pretrained", action="store_true", help=RANDOM_PRETRAINED_HELP)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, args.pretrained = training_inputs(Path(tmp), 48, args.resolution, args.model, args.random_pretrained)
        times = {"inline": [], "thread": []}
        for round_ in range(args.rounds):
            for inline in (True, False):
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    seconds = run(data, Path(work), args, inline)
                times["inline" if inline else "thread"].append(seconds)
                print(f"round {round_ + 1}, checkpoints {'in the loop' if inline else 'in a thread'}: "
                      f"{seconds:.2f} s", flush=True)
        inline, thread = statistics.median(times["inline"]), statistics.median(times["thread"])
        print(f"\n{args.model}, {args.steps} steps, a checkpoint every {args.checkpoint_every}: written in the loop "
              f"{inline:.2f} s, in a thread {thread:.2f} s (medians of {args.rounds}): {inline / thread:.2f}x")


if __name__ == "__main__":
    main()
