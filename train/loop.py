"""The training loop: one function for every worker. ``launch.train`` calls it in-process for one
worker, or hands it to Ray Train's ``TorchTrainer`` for N workers (DDP over gloo or NCCL).

Everything random about a sample (its crop, diffusion timestep, noise, latent sample, condition
dropout) is drawn from a seed derived from (run seed, the sample's position in the global
stream). So the update of a step depends only on which positions it holds: the same with one
worker and batch 2b as with two workers and batch b, and the same after a resume.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from disco.model.conditioning import vae_factor
from disco.model.checkpoint import (POINTER_FILE, STATE_FILE, checkpoint_snapshot, clean_temporary, legacy_hap_names,
                                   list_checkpoints, load_trainable, read_checkpoint, write_checkpoint)
from disco.pipeline.errors import STOPS_THE_RUN, ConfigError
from disco.pipeline.store.output import taken_by
from disco.train.initial import initial_model
from disco.train.checkpoint_writer import CheckpointWriter
from disco.train.collectives import Collectives, nccl_guard
from disco.train.config import SUMMARY_FILE, WORKERS_FILE, WORKERS_STARTED, TrainConfig, lr_schedule, stop_requested
from disco.train.data import TripletIndex, build_index
from disco.train.inputs import model_inputs
from disco.train.monitor import Monitor
from disco.train.objective import DiffusionObjective, apply_update, parameter_groups, sample_draws, zero_gradients
from disco.train.sampling import preview_samples, write_sample_grid
from disco.train.stack_samples import stack_samples
from disco.train.temporal import clip_draws, frames_per_clip, stream_class
from disco.model.temporal import clip_frames
from disco.train.condition_gaps import ConditionGaps

log = logging.getLogger(__name__)

# DDP keeps each gradient as a view into its all-reduce bucket instead of a second fp32 copy of
# the gradients: 5.9 GiB less per GPU when fine-tuning the full model, the same update bit for bit.
# The buckets live as long as DDP does; the updates zero the views in place (apply_update's
# keep_gradients), so every backward, those of --grad-accum's micro-batches under no_sync
# included, accumulates into the buckets themselves (train/memory.py counts them for the whole step).
DDP_OPTIONS = {"gradient_as_bucket_view": True}


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` of a checkpoint's state, holding nothing of the file: its
    tensors are views into the mapped file (``read_checkpoint``), and PyTorch keeps some of them
    as they are (AdamW's ``step`` counters, on the host; on a CPU run every moment), which would
    keep the checkpoint mapped for the whole run: its pages in memory after it is pruned, and on
    NFS its pruning failing (a file still open is renamed ``.nfsXXXX``, and its folder cannot go)."""
    optimizer.load_state_dict(state)
    for values in optimizer.state.values():
        for name, value in values.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                values[name] = value.clone()


# Every this many steps a Ray Train run asks whether a node of it is being preempted (a spot
# reclaim; a node drained as its raylet is stopped): while one is, it writes a checkpoint at each
# ask, so the restart Ray Train makes when the node goes starts at most this many steps back
# (plus what was trained while the last checkpoint was written), not from the last periodic one.
# Each ask is a round trip through Ray that every worker makes: not every step.
PREEMPTION_CHECK_STEPS = 10


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": _jsonable(random.getstate())}


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _restore_rng(state: dict, training_state: dict) -> None:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(training_state["torch_rng"])
    if "cuda_rng" in training_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(training_state["cuda_rng"])


def _start_checkpoint(loop_config: dict, distributed: bool, since_reported: bool = True) -> Path | None:
    """Where this attempt starts: after a worker or node was lost and Ray Train restarted the
    group, the latest checkpoint reported to Ray Train (a pointer into the run directory);
    otherwise the one the launcher resolved (``--resume``), or none."""
    if distributed:
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is not None:
            with reported.as_directory() as folder:
                pointed = Path(json.loads((Path(folder) / POINTER_FILE).read_text())["checkpoint"])
            if pointed.exists():
                return _written_since(loop_config, pointed) if since_reported else pointed
            # Pruned by --keep after a newer checkpoint was written whose report the lost worker
            # cut short: the newest one in the run directory (written whole, then renamed).
            written = list_checkpoints(loop_config["config"]["output"])
            if not written:  # never a silent start from an older checkpoint, or from step 0
                raise ConfigError(f"Ray Train restarts from {pointed}, which this node does not see, nor any checkpoint of "
                                f"{loop_config['config']['output']}: the run directory must be on storage every node "
                                "sees")
            return written[max(written)]
    checkpoint = loop_config.get("checkpoint")
    checkpoint = Path(checkpoint) if checkpoint else None
    if distributed and since_reported:
        # Nothing reported yet: a restart after a worker lost between this invocation's first
        # checkpoint and its report takes that checkpoint, not --resume's one (or step 0).
        return _written_since(loop_config, checkpoint)
    return checkpoint


def _agreed_checkpoint(collectives: Collectives, loop_config: dict, distributed: bool) -> Path | None:
    """The checkpoint every rank starts from. Each rank looks in its own node's view of shared
    storage: ranks started from different steps would reach their collectives at different steps
    (a hang under NCCL). Where they differ (a checkpoint renamed just before a worker was lost may
    not show yet everywhere), all take the one Ray Train heard of, which every node saw; where
    that one was pruned too, the newest that every rank lists; where none is, the run stops."""
    checkpoint = _start_checkpoint(loop_config, distributed)
    if collectives.world == 1 or len(set(collectives.gather(str(checkpoint)))) == 1:
        return checkpoint
    checkpoint = _start_checkpoint(loop_config, distributed, since_reported=False)
    if len(set(collectives.gather(str(checkpoint)))) == 1:
        return checkpoint
    run = loop_config["config"]["output"]
    written = list_checkpoints(run)
    seen = collectives.gather(sorted(written))
    common = set.intersection(*map(set, seen))
    if not common:
        views = "; ".join(f"rank {rank}: {', '.join(map(str, steps)) or 'none'}" for rank, steps in enumerate(seen))
        raise ConfigError(f"the workers see different checkpoints of {run} and none in common (steps {views}): "
                          "the run directory must be on storage every node sees alike")
    return written[max(common)]


def _written_since(loop_config: dict, pointed: Path | None) -> Path | None:
    """The run directory's newest checkpoint if it is newer than ``pointed`` (the one Ray Train
    last heard of; None: none, nor one to resume from) and this invocation wrote it, else
    ``pointed``. A checkpoint is reported at the first step after it is written whole
    (train/checkpoint_writer.py): a worker lost in between would otherwise send the restart one
    ``--checkpoint-every`` further back. Another invocation's later checkpoints (a run resumed
    from an earlier step) are never taken."""
    written = list_checkpoints(loop_config["config"]["output"])
    steps = {path.name: step for step, path in written.items()}
    # A pointed checkpoint no longer listed (--keep pruned it as the next was written): any of
    # this invocation's is newer.
    after = steps.get(pointed.name, -1) if pointed is not None else -1
    since = [step for step in written if step > after]
    if loop_config.get("invocation") is None:
        return pointed
    for step in sorted(since, reverse=True):  # the newest of this invocation's
        try:
            invocation = json.loads((written[step] / STATE_FILE).read_text()).get("invocation")
        except (OSError, ValueError):
            continue
        if invocation == loop_config["invocation"]:
            return written[step]
    return pointed


def _report_checkpoint(path: Path | None, rank: int, metrics: dict) -> None:
    """Tell Ray Train about a checkpoint (every worker calls this, rank 0 with the checkpoint):
    a small pointer is uploaded to Ray Train's storage, the weights stay in the run directory."""
    import tempfile

    import ray.train

    if rank != 0 or path is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / POINTER_FILE).write_text(json.dumps({"checkpoint": str(path.absolute())}))  # links kept
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=path.name)


def _preemption_notice() -> bool:
    """Whether Ray Train knows of a node of this run being preempted (the same answer on every
    worker: every worker must ask, as often as the others). Never, with a Ray Train that cannot
    say (before Ray 2.60's notices)."""
    import ray.train

    ask = getattr(ray.train, "get_preemption_info", None)
    return ask is not None and ask() is not None


def diverged(step: int, what: str, saved_step: int | None) -> ConfigError:
    """The run's loss or weights are no longer numbers (without fp16's loss scaler, which skips
    such updates, NaN gradients go into the weights): it stops before a checkpoint of those weights
    is written. Left to go on, every checkpoint after it held NaN weights, and --keep pruned the
    good ones away."""
    kept = f"the last checkpoint, of step {saved_step}, is kept" if saved_step else "no checkpoint was written"
    return ConfigError(f"{STOPS_THE_RUN} {what} by step {step}: the run diverged, and stops before writing these "
                       f"weights ({kept}); train again with a lower --lr, or clip the gradients with "
                       "--max-grad-norm (e.g. 1.0)")


def weights_finite(params) -> bool:
    """Whether every trained weight is a number: one norm over them all (a checkpoint's worth of
    reading on the device, once a checkpoint)."""
    with torch.no_grad():
        return bool(torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in params])))


def check_run_directory(run: Path, holder: str | None, rank: int) -> None:
    """A Ray Train worker, before anything else: it must see the run directory the driver holds
    (its lock file says who holds it). On a node where it is a folder of its own (a local disk),
    rank 0 would write every checkpoint there, and Ray Train would only notice at the first
    checkpoint's report, after hours of training."""
    if holder is None:  # a caller of the loop that took no lock
        return
    theirs = taken_by(run, holder)
    if theirs is not None:
        import socket

        raise ConfigError(f"{STOPS_THE_RUN} worker {rank} on node {socket.gethostname()} does not see the run directory {run} that the "
                          "driver holds: --output must be on storage every node sees (NFS, a shared mount), by the "
                          f"same path (the lock file there: {theirs}; another run on the same storage, if it is one, "
                          "got in because its locks hold on one node only: stop one of them)")


def train_loop_per_worker(loop_config: dict) -> dict:
    cfg = TrainConfig().updated(loop_config["config"])
    distributed = loop_config.get("distributed", False)
    if distributed:
        import ray.train
        import ray.train.torch

        from disco.train.process_group import raise_worker_problem

        raise_worker_problem()  # what the group's start found (GPUs PyTorch cannot use)
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        check_run_directory(Path(cfg.output), loop_config.get("run_holder"), rank)
        if rank == 0:  # a stop asked from now on waits for the step and its checkpoint
            (Path(cfg.output) / WORKERS_FILE).write_text(WORKERS_STARTED)
        if cfg.pretrained:  # each node reads the base from its own disk: the driver's was checked
            import socket

            from disco.model.checkpoint import check_base_weights

            if not Path(cfg.pretrained).is_dir():  # (a model load's traceback, retried --max-failures times)
                raise ConfigError(f"{STOPS_THE_RUN} worker {rank} on node {socket.gethostname()} does not see the base "
                                  f"model folder {cfg.pretrained}: copy it there by the same path, or put it on "
                                  "storage every node sees")
            check_base_weights(cfg.pretrained, cfg.pretrained_digest, cfg.output,
                               where=f"{STOPS_THE_RUN} worker {rank} on node {socket.gethostname()}: ")
        device = ray.train.torch.get_device()
        if device.type == "cuda":  # (Ray's context sets it too): NCCL's object collectives use the current device
            torch.cuda.set_device(device)
        # The job's workers run with OMP_NUM_THREADS=1 (pipeline/cluster.py): a training worker
        # gets the whole CPUs Ray accounts it (`cpus_per_worker`) as threads (launch.worker_threads).
        if loop_config.get("worker_threads"):
            torch.set_num_threads(int(loop_config["worker_threads"]))
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if cfg.use_gpu else "cpu")
    label = f"rank{rank}-{'ray-train' if distributed else 'in-process'}"
    with nccl_guard(device, enabled=loop_config.get("nccl_guard")), stack_samples(label):
        return _train(cfg, loop_config, distributed, rank, world, device)


def _local(value):
    """What the driver shipped (``launch``): an index, or ``(index, split, held_out)``, as it is,
    or fetched from the object store where a Ray Train worker got a reference to it."""
    if isinstance(value, tuple):
        return (_local(value[0]), *value[1:])
    if value is None or isinstance(value, TripletIndex):
        return value
    import ray

    return ray.get(value)


def _train(cfg: TrainConfig, loop_config: dict, distributed: bool, rank: int, world: int, device) -> dict:
    collectives = Collectives(world, device)
    run = Path(cfg.output)
    holder = loop_config.get("run_holder")  # the driver's holding of the run directory's lock
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    checkpoint = _agreed_checkpoint(collectives, loop_config, distributed)
    model = initial_model(cfg, resuming=checkpoint is not None)
    state, weights, training_state, ema_weights = {}, None, {}, None
    if checkpoint:
        weights, training_state, state, ema_weights = read_checkpoint(checkpoint)
        if legacy_hap_names(model, weights):
            raise ConfigError(f"{checkpoint} is of a HAP run trained before its trainable set became the official "
                              "one (transformer blocks only): it loads for generate, evaluate and --init-from, "
                              "but cannot be resumed")
        load_trainable(model, weights, checkpoint)
    if rank == 0:
        # A restart of the worker group (a lost worker or node, a preemption) may have cut a
        # checkpoint write short: its temporary folder (19-25 GB for a full fine-tune, named by the
        # old process) would stay for good, one more per restart. The old group is gone now.
        removed = clean_temporary(run)
        if removed:
            log.info("removed %d checkpoint folder(s) an earlier attempt left unfinished: %s", len(removed),
                     ", ".join(p.name for p in removed))
    model.set_trainable()
    if cfg.gradient_checkpointing:
        model.enable_memory_savings(gradient_checkpointing=True)
    model.train()
    objective = DiffusionObjective(model)
    timesteps = objective.noise_scheduler.config.num_train_timesteps
    objective.to(device)
    if world > 1:
        import ray.train.torch

        zero_gradients(model.trainable_parameters().values())
        objective = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs=DDP_OPTIONS)
    names = list(model.trainable_parameters())
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(parameter_groups(model.trainable_parameters(), cfg), lr=cfg.learning_rate,
                                  betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        # foreach: one fused update over the ~1.7k trainable tensors instead of a Python loop per step.
        ema = EMAModel(params, decay=cfg.ema_decay, foreach=True)
    step, position, skipped_before = 0, 0, 0
    # The current logging window (this worker's loss sum and its steps) is part of a checkpoint, so
    # a resumed or restarted run logs, and ends with, the loss an uninterrupted run would.
    window_steps, loss_sum = 0, torch.zeros((), dtype=torch.float64, device=device)
    if checkpoint:
        load_optimizer_state(optimizer, training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        scaler.load_state_dict(training_state["scaler"])
        if ema is not None and ema_weights is None:
            # Every checkpoint of a run with an EMA holds it: one without was cut short or edited.
            # (A fresh EMA would restart from the current weights with nothing said.)
            raise ConfigError(f"{STOPS_THE_RUN} {checkpoint} has no ema.safetensors, though this run keeps an EMA "
                              "(ema_decay): the file was removed; put it back, or resume from another checkpoint")
        if ema is not None:
            # A copy even on the CPU: the file is mapped (read_checkpoint), see load_optimizer_state.
            ema.shadow_params = [ema_weights[n].to(device, copy=True) for n in names]
            ema.optimization_step = int(scheduler.last_epoch)  # the EMA's decay counts updates, as the schedule does
        _restore_rng(state["rng"], training_state)
        step, position = int(state["step"]), int(state["positions"][rank])
        skipped_before = int(state["skipped"])
        window = state.get("window")
        if window:
            window_steps = int(window["steps"])
            loss_sum.fill_(float(window["loss_sums"][rank]))
    # The checkpoint as read (host memory) is in the model, optimizer and EMA now: on a GPU those
    # hold copies, and these would keep the host's (weights and AdamW state: about 19 GB per worker
    # for full fine-tuning) to the end of the run.
    weights = training_state = ema_weights = None

    precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    # Condition gaps (--eval-every): rank 0 only, on the bare model; no collective involved. The
    # held-out batch is read now, before the training stream holds the data CPUs: read later, on
    # a busy cluster, it could wait while the other ranks sit in their next all-reduce.
    gaps = ConditionGaps.for_run(cfg, rank, model, device, precision, loop_config.get("data_cpus", 0.25),
                                 _local(loop_config.get("eval_rows")) if rank == 0 else None)
    if gaps is not None:
        with torch.random.fork_rng(devices=[]):
            gaps.held_out()
    index = loop_config.get("index")
    if index is None:  # a caller of the loop that did not build one (launch.train always does)
        index = build_index(cfg.data, cfg.split)
    index = _local(index)
    trained_on = index.summary()  # recorded in every checkpoint; a resume compares
    pose_render = None
    if cfg.stage in ("finetune", "temporal"):
        from disco.train.data.pose import render_plan

        pose_render = render_plan(cfg.data, index.files, cfg.pose_style or "openpose",
                                  True if cfg.hands is None else cfg.hands)
    stream = stream_class(cfg)(index, stage=cfg.stage, ref_mode=cfg.ref_mode, resolution=cfg.resolution, pose_render=pose_render,
                          augment=cfg.augment, seed=cfg.seed, batch=cfg.batch_size, rank=rank, world=world,
                          position=position, shards=cfg.data_shards or world,
                          data_cpus=loop_config.get("data_cpus", 0.25),
                          prefetch_batches=cfg.prefetch_batches)
    monitor = Monitor(run) if rank == 0 else None
    side = cfg.resolution // vae_factor(model)
    latent_shape = (model.unet.config.in_channels, side, side)
    preview = None
    window_start, waited, last_loss = time.perf_counter(), 0.0, float("nan")
    timed_steps = skipped_updates = 0
    saved_step = step if checkpoint else None

    # Rank 0 writes each checkpoint in a thread while training goes on (checkpoint_writer.py);
    # `unreported` is the step of that write on every rank, so that all of them report it to Ray
    # Train at the same step: the first step at which rank 0 sees it written (told to all with
    # the stop flag), before the next checkpoint, or at the loop's end.
    writer = CheckpointWriter()
    unreported = None

    def report_written() -> None:
        nonlocal unreported
        path = writer.wait() if rank == 0 else None
        if distributed:
            _report_checkpoint(path, rank, {"step": unreported})
        unreported = None

    def taken(theirs: str, at_step: int) -> ConfigError:
        # Where flock holds on one node only (NFS with nolock or local_lock), a second run on
        # another node got the lock too: it cleared this run's checkpoint in the making and writes
        # its own here; one more of ours would interleave with them, or prune theirs.
        return ConfigError(f"{STOPS_THE_RUN} {run} was taken by another run ({theirs}) while this one ({holder.strip()}) "
                           "trained in it: its file system's locks did not keep the other out (NFS mounted with "
                           f"nolock or local_lock); this run stops before its checkpoint of step {at_step}, writing "
                           "nothing more, the other one goes on")

    def still_ours(at_step: int) -> None:  # in the writer's thread, before it renames or prunes
        theirs = taken_by(run, holder)
        if theirs is not None:
            raise taken(theirs, at_step)

    def checkpoint_now(wait: bool) -> None:
        nonlocal saved_step, unreported
        if unreported is not None:  # one write at a time (and the lock read after it)
            report_written()
        # Rank 0 reads the lock file too: who holds the run directory now, told to every rank.
        theirs = taken_by(run, holder) if rank == 0 and holder is not None else None
        gathered = collectives.gather((stream.position, stream.skipped, float(loss_sum), theirs))
        if gathered[0][3] is not None:
            raise taken(gathered[0][3], step)
        window = [g[2] for g in gathered]
        if cfg.mixed_precision != "fp16" and not all(math.isfinite(x) for x in window):
            raise diverged(step, f"the training loss became {next(x for x in window if not math.isfinite(x))}",
                           saved_step)
        # (The loss of a step is taken before its update: NaN gradients show in the weights first.
        # Every rank holds the same weights, so every rank decides alike.)
        if not weights_finite(params):
            raise diverged(step, "the trained weights hold NaN or inf values", saved_step)
        if rank == 0:
            training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()}
            if device.type == "cuda":
                training["cuda_rng"] = torch.cuda.get_rng_state()
            # ``updates``: the schedule's position, the updates applied (fp16's skipped ones are
            # steps, not updates); a resume stretches the schedule from there.
            info = {"positions": [g[0] for g in gathered], "skipped": skipped_before + sum(g[1] for g in gathered),
                    "updates": int(scheduler.last_epoch),
                    "world_size": world, "rng": _rng_state(), "data": trained_on,
                    "invocation": loop_config.get("invocation"),
                    "window": {"steps": window_steps, "loss_sums": [g[2] for g in gathered]}}
            ema_state = dict(zip(names, ema.shadow_params)) if ema is not None else None
            snapshot = checkpoint_snapshot(model, training, ema_state)
            writer.start(functools.partial(write_checkpoint, run, step, snapshot, info, cfg.keep,
                                           None if holder is None else functools.partial(still_ours, step)))
        unreported = saved_step = step
        if wait:
            report_written()

    # Whatever stops the loop (an error included: no decodable row, a lost peer), the stream's
    # prefetch threads and the TensorBoard writer are stopped, so the process can exit.
    aborted = False
    try:
        interrupted = False
        while step < cfg.max_steps:
            # Rank 0 reads the stop file, the collective tells the others (64 ranks each opening a
            # file on NFS at every step were some 200 opens a second).
            stop, written = collectives.any_of(rank == 0 and stop_requested(run), writer.done())
            if written:
                report_written()
            if stop:
                interrupted = True
                break
            for micro in range(cfg.grad_accum):
                started = time.perf_counter()
                batch = stream.next_batch()
                waited += time.perf_counter() - started
                if rank == 0 and preview is None:
                    preview = preview_samples(batch, cfg)
                inputs = model_inputs(batch, device, cfg.background_hole)
                draws = clip_draws(sample_draws(batch["position"], cfg.seed, latent_shape, timesteps, device),
                                   frames_per_clip(cfg))
                last_micro = micro == cfg.grad_accum - 1
                sync = objective.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
                with sync, clip_frames(model, frames_per_clip(cfg)):  # (B F) layout, backward included
                    with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                        loss = objective(**inputs, **draws)
                    scaler.scale(loss / cfg.grad_accum).backward()
                # Accumulated on the device: no host synchronisation per micro-batch.
                loss_sum += loss.detach().double() / cfg.grad_accum
            if not apply_update(params, optimizer, scheduler, scaler, ema, cfg.max_grad_norm, keep_gradients=world > 1):
                skipped_updates += 1  # the same on every rank: the gradients were all-reduced
            step += 1
            window_steps += 1
            timed_steps += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                last_loss = float(collectives.mean(loss_sum / window_steps))
                if cfg.mixed_precision != "fp16" and not math.isfinite(last_loss):
                    raise diverged(step, f"the training loss became {last_loss}", saved_step)
                # Under DDP every step waits for the slowest worker: the wait logged is the
                # largest of the workers', not rank 0's alone.
                counts = collectives.gather((stream.skipped, waited))
                skipped = skipped_before + int(sum(count for count, _ in counts))
                waited = max(wait for _, wait in counts)
                if monitor is not None:
                    # Steps timed in this attempt only: a resumed window's earlier steps ran
                    # before the restart, and its loss sum alone carries over.
                    samples_per_s = timed_steps * cfg.batch_size * cfg.grad_accum * world / elapsed
                    monitor.log(step, {
                        "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": samples_per_s,  # clips in the temporal stage: its batch counts clips
                        **({"frames_per_s": samples_per_s * cfg.clip_frames} if cfg.stage == "temporal" else {}),
                        "steps_per_s": timed_steps / elapsed, "data_wait_fraction": waited / elapsed,
                        "skipped_rows": skipped,
                        # fp16 updates the loss scaler skipped (inf/NaN gradients) in this window:
                        # they count as steps, but move neither the weights nor the schedule.
                        "skipped_updates": skipped_updates,
                        **_gpu_memory(device),
                    })
                window_start, waited, window_steps, timed_steps, skipped_updates = time.perf_counter(), 0.0, 0, 0, 0
                loss_sum.zero_()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint_now(wait=step == cfg.max_steps)
            if distributed and step % PREEMPTION_CHECK_STEPS == 0 and _preemption_notice():
                if saved_step != step:
                    checkpoint_now(wait=True)
                elif unreported is not None:
                    report_written()
                if monitor is not None:
                    monitor.log(step, {"preemption_checkpoint": float(step)})
            if monitor is not None and preview is not None and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                write_sample_grid(model, preview, cfg, step, monitor, device, precision)
            if gaps is not None and gaps.due(step):
                monitor.log(step, gaps.measure())
        if interrupted and saved_step != step:
            checkpoint_now(wait=True)  # Ctrl-C: keep every finished step
        if unreported is not None:
            report_written()
    except KeyboardInterrupt:  # a second Ctrl-C: abort at once, a write in progress left to die
        aborted = True
        raise
    finally:
        try:
            # On an error, a checkpoint being written is finished (a write that failed too is
            # logged: not what the user needs to read first).
            failed_write = None if aborted else writer.close()
            if failed_write is not None:
                log.warning("the checkpoint being written when the run failed was not written: %s", failed_write)
            del failed_write
        finally:
            stream.close()
            if monitor is not None:
                monitor.close()
    skipped = skipped_before + int(sum(collectives.gather(stream.skipped)))
    summary = {"step": step, "loss": last_loss, "skipped_rows": skipped, "workers": world}
    if interrupted:
        summary["interrupted"] = True
    evaluations = gaps.summary(run) if gaps is not None else None
    if evaluations is not None:
        summary["eval"] = evaluations  # the condition gaps at the first and the last evaluation
    if rank == 0:
        (run / SUMMARY_FILE).write_text(json.dumps(summary))
    if distributed:
        import ray.train

        ray.train.report(summary)
    return summary


def _gpu_memory(device) -> dict:
    """This worker's peak CUDA memory so far, in GiB: what the caching allocator handed out and what it
    holds from the driver (the figure to compare with ``train --dry-run``'s plan, which adds the
    context on top)."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
