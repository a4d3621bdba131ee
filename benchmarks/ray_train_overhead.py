"""Steps/s of one Ray Train worker against the same training run in the driver's own process (what
`disco-cli train` does without --ray-address or workers), same data, model and options, on this
machine; the Ray Train run on a one-node Ray cluster on loopback, as `ray start --head` gives it.

    .venv/bin/python benchmarks/ray_train_overhead.py [--model small] [--resolution 256] [--batch-size 4]
        [--steps 30] [--frames 96] [--worker-cpus 1 2] [--use-gpu] [--cluster-cpus N] [--random-pretrained]
        [--train-args "..."]

The data: ``--frames`` rows preprocessed by MediaPipe, or where MediaPipe is not installed (the GPU
machines) the GPU suite's synthetic rows (real frames, a drawn mask and skeleton).

On a GPU machine (where Ray Train's single worker has waited for data a quarter of the time against
2 % in the driver's process: README, Benchmarks), for example ``--use-gpu --model sd-image-variations --random-pretrained
--batch-size 32 --cluster-cpus 16 --worker-cpus 1 4 --train-args "--mixed-precision bf16
--gradient-checkpointing"``: both runs on the GPU, the cluster as large as the machine.

Each Ray Train line names the CPUs Ray accounts its worker (``cpus_per_worker``), which is also
its number of PyTorch threads; the cluster declares one CPU more than the largest of them, so that
the decode tasks can always be scheduled (on a machine with that many cores or fewer they share
the worker's cores, as they share the driver's in the in-process run). Steps/s and the data-wait fraction are the trainer's own
(``metrics.jsonl``), from the log windows after the first (start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(data: Path, output: Path, args, extra: list[str]) -> dict:
    start = ["--pretrained", str(args.pretrained)] if args.pretrained else ["--model", args.model]
    command = [sys.executable, "-m", "disco.cli", "train", "--stage", "finetune", "--data", str(data), *start,
               "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
               "--max-steps", str(args.steps), "--log-every", str(max(1, args.steps // 3)), "--sample-every", str(10**6),
               "--checkpoint-every", str(10**6), "--warmup-steps", "0", "--output", str(output), "--no-progress",
               *extra]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        raise SystemExit(f"train failed: {proc.stderr[-2000:]}")
    windows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "steps_per_s" in w]
    windows = windows[1:] or windows  # the first window holds the start-up
    return {"steps_per_s": statistics.mean(w["steps_per_s"] for w in windows),
            "data_wait": statistics.mean(w["data_wait_fraction"] for w in windows),
            "wall_s": time.perf_counter() - started}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_suite import RANDOM_PRETRAINED_HELP, training_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--worker-cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--use-gpu", action="store_true", help="train on the GPU, in the process and through Ray Train")
    parser.add_argument("--cluster-cpus", type=int, help="CPUs of the loopback cluster (default: the largest --worker-cpus + 1)")
    parser.add_argument("--random-pretrained", action="store_true", help=RANDOM_PRETRAINED_HELP)
    parser.add_argument("--train-args", default="", help="more `disco-cli train` options for every run")
    args = parser.parse_args()
    common = shlex.split(args.train_args) + (["--use-gpu"] if args.use_gpu else [])

    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, args.pretrained = training_inputs(work, args.frames, args.resolution, args.model, args.random_pretrained)
        import ray

        ray.shutdown()  # the preprocessing's private instance: the runs below start their own
        baseline = train(data, work / "in-process", args, common)
        print(f"in-process: {baseline['steps_per_s']:.3f} steps/s, {baseline['data_wait']:.1%} waiting for data "
              f"({baseline['wall_s']:.0f} s)", flush=True)
        ray_constants.ENABLE_RAY_CLUSTER = False  # every address Ray derives stays 127.0.0.1
        head = {"node_ip_address": "127.0.0.1", "include_dashboard": False,
                "num_cpus": args.cluster_cpus or max(args.worker_cpus) + 1}
        if args.use_gpu:
            import torch

            head["num_gpus"] = torch.cuda.device_count()
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
        try:
            for cpus in args.worker_cpus:
                (work / f"cpus-{cpus}.yaml").write_text(f"cpus_per_worker: {cpus}\n")
                run = train(data, work / f"ray-train-{cpus}", args,
                            ["--ray-address", cluster.address, "--config", str(work / f"cpus-{cpus}.yaml"), *common])
                print(f"Ray Train, 1 worker, cpus_per_worker {cpus}: {run['steps_per_s']:.3f} steps/s, "
                      f"{run['data_wait']:.1%} waiting for data ({run['wall_s']:.0f} s): "
                      f"{run['steps_per_s'] / baseline['steps_per_s']:.2f}x in-process", flush=True)
        finally:
            cluster.shutdown()


if __name__ == "__main__":
    main()
