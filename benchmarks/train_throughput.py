"""Steps/s of the real trainer (Parquet -> Ray Data decode/crop -> loop) against a minimal loop over
the same model and objective fed from tensors already in memory, in one process; and the bytes the
training data stream reads from the Parquet files per sample it uses.

    .venv/bin/python benchmarks/train_throughput.py [--steps 40] [--rounds 4] [--batch-size 4] [--resolution 64]
    .venv/bin/python benchmarks/train_throughput.py --reads-only [--clips 8] [--clip-frames 240]

The ratio trainer / minimal shows what the data path costs; the goal is >= 0.9. The tiny model
runs on CPU; with a CUDA GPU the full-size architecture (random weights) runs too (--full).

Bytes read per sample used (goal: at most 2x the sample's own bytes): the preprocessed frames are
laid out as ``--clips`` clips of ``--clip-frames`` frames in the pipeline's Parquet layout (shards of
1024 rows, row groups of 64); world size 1 is measured through the real stream (Ray Data read and
decode tasks, bytes counted at the file), and worlds 1, 2 and 8 (one data shard per worker) are
computed from the stream's own read plan and the Parquet metadata, summed over the workers; each
for the first epoch and the second (reference rows, once read, are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
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


def many_clips(triplets: Path, out: Path, clips: int, frames: int) -> Path:
    """``clips`` clips of ``frames`` frames made of the preprocessed rows (cycled), written like the
    pipeline writes them (``--shard-rows`` and ``--row-group-rows`` defaults, pictures stored plain)."""
    import pyarrow as pa

    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.store.reader import open_triplets
    from disco.pipeline.store.schema import TRIPLET_SCHEMA, TRIPLETS_DIR, sample_id
    from disco.pipeline.store.shards import write_parquet_atomic

    source = open_triplets(triplets).to_table().sort_by("frame_index").to_pylist()
    rows = []
    for clip in range(clips):
        for frame in range(frames):
            row = dict(source[frame % len(source)])
            row.update(clip_id=f"clip{clip:04d}", frame_index=frame, sample_id=sample_id(row["source"], f"clip{clip:04d}", frame))
            rows.append(row)
    fields = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}
    shard_rows, group_rows = fields["shard_rows"], fields["row_group_rows"]
    (out / TRIPLETS_DIR).mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), shard_rows):
        table = pa.Table.from_pylist(rows[i:i + shard_rows], schema=TRIPLET_SCHEMA)
        write_parquet_atomic(table, out / TRIPLETS_DIR / f"part-{i // shard_rows:05d}.parquet", group_rows)
    return out


def read_amplification(data: Path, batch: int, resolution: int, worlds: tuple[int, ...] = (1, 2, 8)) -> None:
    """Bytes read from the Parquet files per sample used, in the first epoch and in the second
    (a reference row, once read, is kept by the reading process and the cluster's
    ``ReferenceStore``): world 1 measured through the real stream, every world in ``worlds`` by the
    stream's read plan."""
    from disco.train.data import SampleStream, build_index

    index = build_index([str(data)])
    n = len(index)
    kib = 1024
    options = dict(stage="finetune", ref_mode="first", resolution=resolution, augment=True, seed=0, batch=batch)
    plan = SampleStream(index, **options).planned_reads(n)
    own = plan["needed_bytes"] / plan["samples"]  # the samples' own bytes (image and pose)
    print(f"reads: {n} rows of {int(index.clip.max()) + 1} clips in {len(index.group_starts) - 1} row groups; "
          f"a sample's own picture bytes (image + pose) {own / kib:.1f} KiB", flush=True)
    stream = SampleStream(index, **options)
    try:
        for epoch in (1, 2):
            started, before = time.perf_counter(), (stream.position, stream.read_bytes, stream.reference_bytes)
            while stream.position < epoch * n:
                stream.next_batch()
            used = stream.position - before[0]
            groups, references = stream.read_bytes - before[1], stream.reference_bytes - before[2]
            print(f"reads world 1, epoch {epoch} (measured, {used} samples in {time.perf_counter() - started:.0f} s): "
                  f"{groups / used / kib:.1f} KiB per sample from the samples' row groups + {references / used / kib:.1f} "
                  f"KiB from reference rows: {(groups + references) / used / own:.2f}x the samples' own bytes", flush=True)
    finally:
        stream.close()
    for world in worlds:
        streams = [SampleStream(index, **options, rank=r, world=world) for r in range(world)]
        seen = set()  # reference rows read so far, by any worker: the cluster's ReferenceStore
        for epoch in (1, 2):
            shares = []
            for stream in streams:
                shares.append(stream.planned_reads(n // world, seen))
                stream.position += shares[-1]["samples"]
            total = {k: sum(s[k] for s in shares) for k in shares[0]}
            read = total["target_bytes"] + total["footer_bytes"]
            print(f"reads world {world}, epoch {epoch} (read plan, {world} data shards): {read / total['samples'] / kib:.1f} "
                  f"KiB per sample from row groups and footers + {total['reference_bytes'] / total['samples'] / kib:.1f} "
                  f"KiB from reference rows: {(read + total['reference_bytes']) / total['needed_bytes']:.2f}x the "
                  f"samples' own bytes", flush=True)


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

    from disco.train.initial import initial_model
    from disco.train.data import SampleStream, build_index
    from disco.train.inputs import model_inputs
    from disco.train.objective import DiffusionObjective, apply_update, sample_draws
    from disco.model.conditioning import vae_factor

    stream = SampleStream(build_index(cfg.data), stage=cfg.stage, ref_mode=cfg.ref_mode, resolution=cfg.resolution,
                          augment=cfg.augment, seed=cfg.seed, batch=cfg.batch_size)
    batch = stream.next_batch()
    stream.close()
    model = initial_model(cfg)
    model.set_trainable()
    # The same work per step as the trainer's configuration: gradient checkpointing recomputes the
    # activations (a third more compute), fp16 scales the loss, clipping and EMA touch every weight.
    if cfg.gradient_checkpointing:
        model.enable_memory_savings(gradient_checkpointing=True)
    model.train()
    objective = DiffusionObjective(model).to(device)
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.98), weight_decay=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps * 2)
    scaler = torch.amp.GradScaler(device, enabled=cfg.mixed_precision == "fp16")
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay, foreach=True)  # as the trainer does
    side = cfg.resolution // vae_factor(model)
    inputs = model_inputs(batch, device)
    precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    start = None
    for step in range(steps + 5):
        if step == 5:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for micro in range(cfg.grad_accum):  # as the trainer: the update after grad_accum micro-batches
            position = batch["position"] + (step * cfg.grad_accum + micro) * cfg.batch_size
            draws = sample_draws(position, cfg.seed, (4, side, side), 1000, device)
            with torch.autocast(device, dtype=precision, enabled=precision is not None):
                loss = objective(**inputs, **draws)
            scaler.scale(loss / cfg.grad_accum).backward()
        apply_update(params, optimizer, scheduler, scaler, ema, cfg.max_grad_norm)
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
    parser.add_argument("--clips", type=int, default=8, help="clips of the data set the reads are measured on")
    parser.add_argument("--clip-frames", type=int, default=240, help="frames of each of those clips")
    parser.add_argument("--reads-only", action="store_true", help="only the bytes read per sample")
    args = parser.parse_args()
    from disco.pipeline.cluster import init_ray

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        triplets = make_triplets(work, args.frames)
        print(f"triplets: {args.frames} frames preprocessed in {time.perf_counter() - started:.0f} s", flush=True)
        read_amplification(many_clips(triplets, work / "many-clips", args.clips, args.clip_frames), args.batch_size,
                           args.resolution)
        if args.reads_only:
            return
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
