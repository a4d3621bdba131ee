"""Steps/s of the real trainer (Parquet -> Ray Data decode/crop -> loop) against a minimal loop over
the same model and objective fed from tensors already in memory, in one process.

    .venv/bin/python benchmarks/train_throughput.py [--steps 40] [--rounds 4] [--batch-size 4] [--resolution 64]

The ratio trainer / minimal shows what the data path costs; the goal is >= 0.9. The tiny model
runs on CPU; with a CUDA GPU the full-size architecture (random weights) runs too (--full).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_triplets(root: Path, frames: int) -> Path:
    from skimage import data

    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.demo_data import pan_zoom_frames, write_video
    from disco.pipeline.run import preprocess

    write_video(root / "videos" / "dance.mp4", pan_zoom_frames(data.astronaut(), frames, 256), 30.0)
    preprocess(PreprocessConfig(source="video", input=root / "videos", output=root / "triplets", max_side=256),
               log=lambda *_: None)
    return root / "triplets"


def trainer_speed(cfg, first_step: int, skip_steps: int) -> tuple[float, float]:
    """Steady-state steps/s and data-wait fraction of one segment of the run (steps after
    ``first_step``), from the run's own metrics; its first ``skip_steps`` (start-up) excluded."""
    from disco.train.launch import train

    train(cfg, given={"max_steps"} if cfg.resume else None)
    lines = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if m["step"] > first_step + skip_steps]
    seconds = sum(cfg.log_every / m["steps_per_s"] for m in steady)
    waited = sum(cfg.log_every / m["steps_per_s"] * m["data_wait_fraction"] for m in steady)
    return len(steady) * cfg.log_every / seconds, waited / seconds


def minimal_speed(cfg, steps: int, device: str) -> float:
    """The same model, objective and optimizer on one batch held in memory."""
    from diffusers.optimization import get_scheduler

    from disco.train.checkpoint import initial_model
    from disco.train.data import SampleStream, build_index
    from disco.train.inputs import model_inputs
    from disco.train.loop import DiffusionObjective, sample_draws
    from disco.train.sampling import latent_factor

    stream = SampleStream(build_index(cfg.data), stage=cfg.stage, ref_mode=cfg.ref_mode, resolution=cfg.resolution,
                          augment=cfg.augment, seed=cfg.seed, batch=cfg.batch_size)
    batch = stream.next_batch()
    stream.close()
    model = initial_model(cfg)
    model.set_trainable()
    model.train()
    objective = DiffusionObjective(model).to(device)
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.98), weight_decay=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps * 2)
    side = cfg.resolution // latent_factor(model)
    inputs = model_inputs(batch, device)
    precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    start = None
    for step in range(steps + 5):
        if step == 5:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        draws = sample_draws(batch["position"] + step * cfg.batch_size, cfg.seed, (4, side, side), 1000, device)
        with torch.autocast(device, dtype=precision, enabled=precision is not None):
            loss = objective(**inputs, **draws)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        float(loss.detach())
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def compare(label: str, triplets: Path, work: Path, steps: int, rounds: int, **options) -> None:
    """Rounds of: the minimal loop, then ``steps`` more steps of the trainer (the first round
    starts the run, later ones resume it), then the minimal loop once more at the end. Each round's
    ratio divides the trainer by the mean of the minimal runs on either side of it: on a shared
    machine the load drifts within seconds, and neighbouring runs see the same load."""
    from disco.train.config import TrainConfig

    log_every = max(1, steps // 4)
    segment = steps + log_every  # the first window of each segment is start-up, not counted
    cfg = TrainConfig(stage="finetune", data=[str(triplets)], output=str(work / label), max_steps=segment,
                      checkpoint_every=segment, keep=1, sample_every=10**9, log_every=log_every, warmup_steps=0,
                      **options)
    device = "cuda" if cfg.use_gpu else "cpu"
    minimal = [minimal_speed(cfg, steps, device)]
    trainer, waited = [], []
    for r in range(rounds):
        run_cfg = cfg if r == 0 else cfg.updated({"resume": True, "max_steps": segment * (r + 1)})
        speed, wait = trainer_speed(run_cfg, first_step=segment * r, skip_steps=log_every)
        trainer.append(speed)
        waited.append(wait)
        minimal.append(minimal_speed(cfg, steps, device))
    ratios = [t / ((a + b) / 2) for t, a, b in zip(trainer, minimal, minimal[1:])]
    for r, (t, w, ratio) in enumerate(zip(trainer, waited, ratios)):
        print(f"{label} round {r + 1}: trainer {t:.2f} steps/s (waiting for data {w:.1%}), minimal loop "
              f"{minimal[r]:.2f} before / {minimal[r + 1]:.2f} after, ratio {ratio:.2f}", flush=True)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{label}: trainer {statistics.median(trainer):.2f} steps/s, minimal in-memory loop "
          f"{statistics.median(minimal):.2f} steps/s (medians); ratio median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f} over {rounds} rounds (load average {load})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per round and loop")
    parser.add_argument("--rounds", type=int, default=4, help="trainer segments, each between two minimal runs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--full", action="store_true", help="also the full-size model (needs CUDA)")
    args = parser.parse_args()
    from disco.pipeline.run import init_ray

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        triplets = make_triplets(work, args.frames)
        print(f"triplets: {args.frames} frames preprocessed in {time.perf_counter() - started:.0f} s", flush=True)
        compare("tiny-cpu", triplets, work, args.steps, args.rounds, model="tiny", resolution=args.resolution,
                batch_size=args.batch_size)
        if torch.cuda.is_available():
            compare("tiny-gpu", triplets, work, args.steps, args.rounds, model="tiny", resolution=args.resolution,
                    batch_size=args.batch_size, use_gpu=True)
            if args.full:
                compare("full-gpu", triplets, work, args.steps, args.rounds, model="sd-image-variations", resolution=256,
                        batch_size=8, use_gpu=True, mixed_precision="bf16", gradient_checkpointing=True)
        else:
            print("no CUDA GPU: the full-size comparison was not run")


if __name__ == "__main__":
    main()
