"""Starting a run: resolve and save the configuration, find the checkpoint to resume, then run the
loop in this process (one worker) or on N Ray Train workers (``TorchTrainer``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

from disco.pipeline.config import ConfigError
from disco.train.checkpoint import clean_temporary, list_checkpoints
from disco.train.config import CONFIG_FILE, TrainConfig, load_run_config
from disco.train.data import build_index
from disco.train.loop import SUMMARY_FILE, train_loop_per_worker
from disco.train.monitor import read_metrics

# Options a resumed run may change; all others decide the data order or the model and must stay.
RESUME_MAY_CHANGE = {
    "max_steps", "checkpoint_every", "keep", "sample_every", "sample_count", "sample_steps", "guidance_scale",
    "log_every", "ray_address", "cpus_per_worker", "data_cpus", "prefetch_batches", "resume",
}


def resolve(cfg: TrainConfig, given: set[str] | None = None) -> tuple[TrainConfig, Path | None]:
    """The run's configuration and the checkpoint to start from. ``given``: the options the user
    set explicitly (a resume checks them against the saved configuration)."""
    run = Path(cfg.output) if cfg.output else None
    if run is None:
        raise ConfigError("--output is required")
    if cfg.resume:
        if not (run / CONFIG_FILE).exists():
            raise ConfigError(f"--resume: {run} is not a training run (no {CONFIG_FILE})")
        saved = load_run_config(run)
        changes = {}
        for name in sorted((given or set()) - {"output", "resume"}):
            new, old = getattr(cfg, name), getattr(saved, name)
            if name in RESUME_MAY_CHANGE:
                changes[name] = new
            elif new != old and not (name == "data" and not new):
                raise ConfigError(f"--resume keeps the run's {name.replace('_', '-')} ({old!r}); "
                                  f"it cannot become {new!r}")
        cfg = saved.updated({**changes, "resume": True, "output": str(run)})
        clean_temporary(run)
        checkpoints = list_checkpoints(run)
        checkpoint = checkpoints[max(checkpoints)] if checkpoints else None
    else:
        if (run / CONFIG_FILE).exists() or list_checkpoints(run):
            raise ConfigError(f"{run} already holds a training run; pass --resume to continue it, or choose another --output")
        checkpoint = None
        if cfg.init_from:
            if not (Path(cfg.init_from) / CONFIG_FILE).exists():
                raise ConfigError(f"--init-from {cfg.init_from} is not a training run (no {CONFIG_FILE})")
            hap = load_run_config(cfg.init_from)
            if (hap.model, hap.pretrained and str(Path(hap.pretrained).resolve())) != \
                    (cfg.model, cfg.pretrained and str(Path(cfg.pretrained).resolve())):
                raise ConfigError(f"--init-from {cfg.init_from} was trained on another base model "
                                  f"({hap.pretrained or hap.model}); use the same --pretrained / --model")
            cfg = cfg.updated({"model_seed": hap.model_seed})
        if cfg.model_seed is None:
            cfg = cfg.updated({"model_seed": cfg.seed})
        cfg = cfg.updated({"data": [str(Path(d)) for d in cfg.data], "output": str(run)})
    cfg.validate()
    if checkpoint is not None and cfg.max_steps <= int(checkpoint.name.split("-")[1]):
        raise ConfigError(f"{checkpoint.name} is already at --max-steps {cfg.max_steps}; raise --max-steps to train on")
    return cfg, checkpoint


def _resources(cfg: TrainConfig, distributed: bool) -> tuple[float, float]:
    """CPUs Ray accounts per training worker and per data task. On a small machine, fractions: two
    workers of 1 CPU on a 2-CPU node would leave Ray Data's decode tasks nothing and hang."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    worker = cfg.cpus_per_worker or (min(1.0, total / (2 * cfg.num_workers)) if distributed else 0.0)
    data = cfg.data_cpus or (0.25 if total < 8 else 1.0)
    return worker, data


def train(cfg: TrainConfig, given: set[str] | None = None, on_metrics: Callable[[dict], None] | None = None,
          log: Callable[[str], None] = lambda message: None) -> dict:
    """Run (or resume) a training run; returns a summary (final step, loss, skipped rows)."""
    import ray

    from disco.pipeline.run import init_ray

    cfg, checkpoint = resolve(cfg, given)
    index = build_index(cfg.data, cfg.split)  # fails early, with a clear message, on empty data
    run = Path(cfg.output)
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run)
    log(f"{len(index)} {cfg.split} rows from {len(index.files)} shards; "
        + (f"resuming from {checkpoint.name}" if checkpoint else "starting at step 0"))
    init_ray(cfg.ray_address)
    distributed = cfg.num_workers > 1 or bool(cfg.ray_address)
    worker_cpus, data_cpus = _resources(cfg, distributed)
    loop_config = {"config": cfg.to_dict(), "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
                   "distributed": distributed, "data_cpus": data_cpus}
    stop = threading.Event()
    poller = threading.Thread(target=_follow_metrics, args=(run, on_metrics, stop), daemon=True)
    if on_metrics is not None:
        poller.start()
    try:
        if not distributed:
            return train_loop_per_worker(loop_config)
        return _fit(cfg, loop_config, worker_cpus, ray)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join()


def _fit(cfg: TrainConfig, loop_config: dict, worker_cpus: float, ray) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": worker_cpus}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        # Checkpoints are written by rank 0 into the run directory itself (shared storage on a
        # multi-node cluster); Ray Train's own storage only holds its bookkeeping.
        run_config=RunConfig(storage_path=str((Path(cfg.output) / "ray").resolve()), name="train",
                             failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()
    return json.loads((Path(cfg.output) / SUMMARY_FILE).read_text())


def _follow_metrics(run: Path, on_metrics: Callable[[dict], None], stop: threading.Event) -> None:
    metrics = run / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0  # a resumed run shows only its own progress
    while True:
        finished = stop.wait(0.5)
        lines, offset = read_metrics(run, offset)
        for line in lines:
            on_metrics(line)
        if finished:
            return
