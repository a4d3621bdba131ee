"""The memory plan of ``disco-cli train --dry-run`` against the memory a CPU training run really
takes, for the ``tiny`` and ``small`` configurations.

    python benchmarks/memory_plan.py                     # the default cases, one table
    python benchmarks/memory_plan.py --model small --batch-size 4 --resolution 256 --mixed-precision bf16

Each measurement runs in a fresh process of its own: its resident memory is read just before the
model is built, then a few training steps run (the trainer's ``DiffusionObjective``, AdamW, the
trainer's autocast and gradient checkpointing) and the process's peak resident memory
(``VmHWM`` of /proc/self/status; ``ru_maxrss`` would keep the parent's high mark across fork + exec) minus that starting point is what the run took: weights, AdamW states, gradients,
activations, temporaries. ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB in that process, so every
tensor larger than that gets pages of its own that go back to the system when it is freed (with
glibc's default moving threshold, freed tensors stay in the heap and the peak overstates what was
alive). The estimate is ``memory_plan(..., device="cpu")``: the same method as for a GPU plan, with
the CPU's autocast op lists, the per-tensor AdamW of a CPU, and no CUDA allowance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [
    # (model, stage, batch, resolution, precision, gradient checkpointing)
    ("tiny", "finetune", 4, 256, "no", False),
    ("tiny", "finetune", 4, 256, "no", True),
    ("small", "pretrain", 2, 256, "no", False),
    ("small", "finetune", 2, 256, "no", False),
    ("small", "finetune", 4, 256, "no", True),
    # bf16 on a CPU without native bf16 is slow, and oneDNN's bf16 kernels hold memory outside
    # PyTorch's tensors (a fixed few tens of MiB): a small case.
    ("tiny", "finetune", 4, 128, "bf16", False),
]
MIB = 1024 ** 2


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident memory since it started (its exec), in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def child(options: dict) -> dict:
    """Build the model and run ``steps`` training steps in this process; bytes taken."""

    import torch

    from disco.model.disco import DisCoModel
    from disco.train.inputs import model_inputs
    from disco.train.objective import DiffusionObjective
    from disco.model.conditioning import vae_factor

    torch.set_num_threads(options.get("threads", 2))
    precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options["mixed_precision"])
    batch, resolution = options["batch_size"], options["resolution"]
    before = _rss()
    torch.manual_seed(0)
    model = DisCoModel.from_architecture(options["model"], variant=options["stage"])
    model.set_trainable()
    if options["gradient_checkpointing"]:
        model.enable_memory_savings(gradient_checkpointing=True)
    model.train()
    objective = DiffusionObjective(model)
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-3)
    side = resolution // vae_factor(model)
    for _ in range(options["steps"]):
        pictures = {name: torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
                    for name in ("target", "background", "pose")}
        pictures["reference"] = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
        pictures["reference_mask"] = torch.full((batch, 1, 224, 224), 255, dtype=torch.uint8)
        pictures["background_mask"] = torch.zeros((batch, 1, resolution, resolution), dtype=torch.uint8)
        inputs = model_inputs(pictures)
        uniforms = torch.ones(batch, 3)
        uniforms[0, 0] = 0.0
        draws = {"noise": torch.randn(batch, 4, side, side), "latent_noise": torch.randn(batch, 4, side, side),
                 "timesteps": torch.randint(0, 1000, (batch,)), "uniforms": uniforms}
        with torch.autocast("cpu", dtype=precision, enabled=precision is not None):
            loss = objective(**inputs, **draws)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del pictures, inputs, draws, loss
    peak = peak_rss()  # VmHWM: ru_maxrss keeps the high mark of the parent across fork + exec
    return {"before": before, "peak": peak, "taken": peak - before}


def start(model: str, stage: str, batch_size: int, resolution: int, mixed_precision: str,
          gradient_checkpointing: bool, steps: int = 3, threads: int = 2) -> subprocess.Popen:
    """Start measuring the bytes a CPU training run takes (see the module's docstring) in a fresh
    process; ``finish`` reads the result."""
    options = dict(model=model, stage=stage, batch_size=batch_size, resolution=resolution,
                   mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, steps=steps,
                   threads=threads)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", json.dumps(options)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 900) -> int:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    if process.returncode:
        raise RuntimeError(f"measurement failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])["taken"]


def measure(*case, steps: int = 3) -> int:
    """Bytes a CPU training run takes, measured in a fresh process."""
    return finish(start(*case, steps=steps))


def estimate(model: str, stage: str, batch_size: int, resolution: int, mixed_precision: str,
             gradient_checkpointing: bool) -> int:
    """The plan's bytes for the same run on a CPU."""
    from disco.train.config import TrainConfig
    from disco.train.memory import memory_plan

    cfg = TrainConfig(stage=stage, model=model, batch_size=batch_size, resolution=resolution,
                      mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing)
    return memory_plan(cfg, device="cpu", search=False).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["tiny", "small"])
    parser.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cases = CASES if args.model is None else [(args.model, args.stage, args.batch_size, args.resolution,
                                               args.mixed_precision, args.gradient_checkpointing)]
    print(f"{'model':6s} {'stage':8s} {'batch':>5s} {'px':>4s} {'precision':9s} {'ckpt':4s} "
          f"{'measured MiB':>12s} {'estimated MiB':>13s} {'estimate/measured':>17s}")
    for case in cases:
        measured = measure(*case, steps=args.steps)
        estimated = estimate(*case)
        model, stage, batch, resolution, precision, checkpointing = case
        print(f"{model:6s} {stage:8s} {batch:5d} {resolution:4d} {precision:9s} {'on' if checkpointing else 'off':4s} "
              f"{measured / MIB:12.0f} {estimated / MIB:13.0f} {estimated / measured:17.2f}", flush=True)


if __name__ == "__main__":
    main()
