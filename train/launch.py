"""Starting a run: resolve and save the configuration, find the checkpoint to resume, then run the
loop in this process (one worker) or on N Ray Train workers (``TorchTrainer``).

On Ray Train, a lost worker or node makes Ray Train restart the worker group (``--max-failures``
times) and the loop continues from the last checkpoint it reported. Ctrl-C asks every worker to
stop after its current step; the run then writes a checkpoint of that step and ends, so that
``--resume`` loses nothing."""

from __future__ import annotations

import contextlib
import math
import json
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Callable

from disco.pipeline.errors import ConfigError, stops_in_one_line
from disco.model.checkpoint import INIT_MODEL_DIRS, STATE_FILE, clean_temporary, list_checkpoints
from disco.model.conditioning import HOLE
from disco.train.collectives import GUARD_ENV
from disco.train.config import (RUN_CONFIG_FILE, STOP_FILE, STOP_REQUESTED, SUMMARY_FILE, WORKERS_FILE, WORKERS_STARTED,
                                TrainConfig, init_run, load_run_config, lr_factor, schedule_note)
from disco.train.condition_gaps import evaluates, held_out_rows
from disco.train.data import build_index
from disco.train.monitor import read_metrics

# Options a resumed run may change; all others decide the data order or the model and must stay.
RESUME_MAY_CHANGE = {
    "max_steps", "schedule_steps", "max_failures", "checkpoint_every", "keep", "sample_every", "sample_count", "sample_steps", "guidance_scale",
    "log_every", "ray_address", "cpus_per_worker", "data_cpus", "prefetch_batches", "resume",
    "eval_every",  # how often the condition gaps are measured; what is measured (eval_rows, eval_split) stays
}

PATH_OPTIONS = {"pretrained", "init_from"}


def resume_changes(cfg: TrainConfig, saved: TrainConfig, given: set[str] | None) -> dict:
    """What a resume of the run ``saved`` takes of ``cfg``: the options in ``given`` it may change;
    one it may not change, given another value, is a one-line error."""
    changes = {}
    for name in sorted((given or set()) - {"output", "resume"}):
        new, old = _comparable(name, getattr(cfg, name)), _comparable(name, getattr(saved, name))
        if name in RESUME_MAY_CHANGE:
            changes[name] = new
        elif differs(name, new, old):
            raise ConfigError(f"--resume keeps the run's {name.replace('_', '-')} ({old!r}); "
                              f"it cannot become {new!r}")
    return changes


def _comparable(name: str, value):
    if name in PATH_OPTIONS:
        return _absolute(value)
    if name == "data":
        return [_absolute(d) for d in value or []]
    return value


def differs(name: str, new, old) -> bool:
    """Whether option ``name``'s value ``new`` is another than the saved run's ``old`` (paths as
    absolute; no --data means the run's own)."""
    new, old = _comparable(name, new), _comparable(name, old)
    return new != old and not (name == "data" and not new) and not (name == "init_from" and _same_init(new, old))


def resolve(cfg: TrainConfig, given: set[str] | None = None) -> tuple[TrainConfig, Path | None]:
    """The run's configuration and the checkpoint to start from. ``given``: the options the user
    set explicitly (a resume checks them against the saved configuration)."""
    if not cfg.output:
        raise ConfigError("--output is required")
    # Absolute paths, stored so: Ray Train runs each worker in a working directory of its own.
    run = Path(cfg.output).absolute()
    if cfg.resume:
        if not (run / RUN_CONFIG_FILE).exists():
            raise ConfigError(f"--resume: {run} is not a training run (no {RUN_CONFIG_FILE})")
        saved = load_run_config(run)
        cfg = saved.updated({**resume_changes(cfg, saved, given), "resume": True, "output": str(run)})
        clean_temporary(run)
        checkpoints = list_checkpoints(run)
        checkpoint = checkpoints[max(checkpoints)] if checkpoints else None
        state = json.loads((checkpoint / STATE_FILE).read_text()) if checkpoint is not None else {}
        if "converted_from" in state:
            raise ConfigError(f"--resume: {run} holds a converted official checkpoint (`disco-cli convert-official`), "
                              "with no optimizer state to resume; start a run from it with --init-from (HAP) "
                              "or use it in generate / evaluate")
        # The schedule's position: the updates applied, fewer than the steps where fp16 skipped some.
        cfg = _resumed_schedule(cfg, saved, int(state.get("updates", state.get("step", 0))))
        if cfg.init_from:
            cfg = cfg.updated({"init_from": str(_resumed_init(run, cfg, checkpoint))})
    else:
        if (run / RUN_CONFIG_FILE).exists() or list_checkpoints(run):
            raise ConfigError(f"{run} already holds a training run; pass --resume to continue it, or choose another --output")
        checkpoint = None
        if cfg.init_from:
            source = init_run(cfg.init_from)  # a run (its latest checkpoint) or one checkpoint folder of it
            if source is None:
                raise ConfigError(f"--init-from {cfg.init_from} is not a training run (no {RUN_CONFIG_FILE})")
            hap = load_run_config(source)
            if cfg.stage == "temporal" and cfg.model is None and cfg.pretrained is None:
                cfg = cfg.updated({"model": hap.model, "pretrained": hap.pretrained})  # the image model's base
            if not _same_base(hap, cfg):
                raise ConfigError(f"--init-from {cfg.init_from} was trained on another base model "
                                  f"({hap.pretrained or hap.model}); use the same --pretrained / --model")
            cfg = cfg.updated({"model_seed": hap.model_seed})
            if cfg.background_hole == HOLE:
                # The background ControlNet goes on with the hole value it learned: a run started
                # from one trained before the official value (-1) keeps -1 (a YAML's own other value stands).
                cfg = cfg.updated({"background_hole": hap.background_hole})
            # Pinned to the init run's checkpoint now: the temporal weights belong to that image
            # model, and a fine-tuning run restarted before its first checkpoint starts again from the
            # same HAP weights, even if the init run trains on (and its --keep prunes that checkpoint).
            from disco.model.checkpoint import find_checkpoint

            cfg = cfg.updated({"init_from": str(find_checkpoint(cfg.init_from).absolute())})
            if cfg.stage == "temporal":  # the fine-tuning run's pose drawing is the default
                cfg = cfg.updated({"pose_style": cfg.pose_style or hap.pose_style,
                                   "hands": hap.hands if cfg.hands is None else cfg.hands})
                if "resolution" not in (given or set()) and cfg.resolution == TrainConfig.resolution:
                    # And its size: the temporal layers learn on the frozen image model's frames (a
                    # model fine-tuned at 512 took 256 px clips, and generated at 256 by default).
                    cfg = cfg.updated({"resolution": hap.resolution})
        if cfg.model_seed is None:
            cfg = cfg.updated({"model_seed": cfg.seed})
        # The schedule is fixed now: a later --resume with more --max-steps keeps it.
        cfg = cfg.updated({"schedule_steps": cfg.schedule_length, "warmup_steps": cfg.warmup, "decay_from": None,
                           "data_shards": cfg.data_shards or cfg.num_workers, "output": str(run)})
    cfg = cfg.updated({"data": [_absolute(d) for d in cfg.data], "init_from": _absolute(cfg.init_from),
                       "pretrained": _absolute(cfg.pretrained)})
    cfg.validate()
    if cfg.pretrained:
        from disco.model.checkpoint import base_weights_digest, check_base_weights

        if cfg.resume:  # the folder must still hold the weights the run started from
            check_base_weights(cfg.pretrained, cfg.pretrained_digest, run, where="--resume: ")
        # Recorded when the run starts, from the folder (never a value its --config YAML carried
        # over from another run's config.yaml), and by a run of an older version at its next resume.
        recorded = cfg.pretrained_digest if cfg.resume else None
        cfg = cfg.updated({"pretrained_digest": recorded or base_weights_digest(cfg.pretrained)})
    if cfg.stage in ("finetune", "temporal") or cfg.pose_style is not None or cfg.hands is not None:
        # The run's pose drawing, recorded in its config.yaml (generate and evaluate use it).
        from disco.train.data.pose import resolve_pose_setting

        style, hands = resolve_pose_setting(cfg.data, cfg.pose_style, cfg.hands)
        cfg = cfg.updated({"pose_style": style, "hands": hands})
    if cfg.init_from and not cfg.resume and Path(cfg.init_from).parent.name not in INIT_MODEL_DIRS.values():
        # The run keeps its own copy of that checkpoint (hard links): the init run's --keep
        # pruning, as it trains on, cannot take it away.
        from disco.model.checkpoint import keep_init_model

        cfg = cfg.updated({"init_from": str(keep_init_model(run, Path(cfg.init_from), cfg.stage))})
    if checkpoint is not None and cfg.max_steps <= int(checkpoint.name.split("-")[1]):
        raise ConfigError(f"{checkpoint.name} is already at --max-steps {cfg.max_steps}; raise --max-steps to train on")
    return cfg, checkpoint


def _resumed_init(run: Path, cfg: TrainConfig, checkpoint: Path | None) -> Path:
    """A resumed run's ``init_from``: its own copy of the checkpoint it pinned (where the run was
    moved too). Needed by a temporal-stage run (its frozen image model) and by a fine-tuning run
    with no checkpoint yet; a fine-tuning run's checkpoint holds every weight its HAP run gave."""
    from disco.model.checkpoint import find_checkpoint, own_init_model

    init = own_init_model(run, cfg.init_from)
    if cfg.stage == "temporal" or checkpoint is None:
        try:
            find_checkpoint(init)
        except ConfigError as error:
            why = "needs its image model," if cfg.stage == "temporal" else "has no checkpoint yet and starts from"
            raise ConfigError(f"--resume: {run} {why} --init-from {init}, which is not there any more ({error})") from None
    return init


def _same_base(init: TrainConfig, cfg: TrainConfig) -> bool:
    """Whether the run ``cfg`` starts from the base model the run ``init`` was trained on: the same
    architecture, or sd-image-variations weights that are the same by content where ``init``
    recorded them (a copy of the folder elsewhere is the same, another revision at the same path
    is not), else by path (a run of an older version)."""
    if init.model != cfg.model or bool(init.pretrained) != bool(cfg.pretrained):
        return False
    if not cfg.pretrained:
        return True
    if init.pretrained_digest and Path(cfg.pretrained).is_dir():
        from disco.model.checkpoint import base_weights_digest

        return base_weights_digest(cfg.pretrained) == init.pretrained_digest
    return Path(init.pretrained).resolve() == Path(cfg.pretrained).resolve()


def _same_init(given: str | None, saved: str | None) -> bool:
    """``--init-from RUN`` given again with ``--resume``: the run pinned one checkpoint of RUN when
    it started (``RUN/checkpoint-N``, or its own copy of it, ``image-model/`` or ``hap-model/``,
    whose config.yaml is RUN's and names RUN as its output)."""
    if not given or not saved:
        return False
    given_path, pinned = Path(given).resolve(), Path(saved).resolve()
    if pinned.name.startswith("checkpoint-") and pinned.parent == given_path:
        return True
    if pinned.parent.name in INIT_MODEL_DIRS.values() and (pinned.parent / RUN_CONFIG_FILE).exists():
        return Path(load_run_config(pinned.parent).output).resolve() == given_path
    return False


def _absolute(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else path


def _resumed_schedule(cfg: TrainConfig, saved: TrainConfig, step: int) -> TrainConfig:
    """The learning-rate schedule of a resumed run. It keeps the length fixed when the run started
    (runs from before that rule: their --max-steps). A new --schedule-steps stretches (or
    shortens) the decay from the rate at the resumed point, so the rate never jumps. ``step``:
    the schedule's position there (the updates applied, ``state.json``'s ``updates``)."""
    old_length = saved.schedule_steps if saved.schedule_steps is not None else saved.max_steps
    cfg = cfg.updated({"schedule_steps": cfg.schedule_steps if cfg.schedule_steps is not None else old_length,
                       "warmup_steps": saved.warmup_steps if saved.warmup_steps is not None else max(0, old_length // 10)})
    if cfg.schedule_steps != old_length:
        if cfg.schedule_steps <= step:
            raise ConfigError(f"--schedule-steps {cfg.schedule_steps} must be beyond the resumed step {step}")
        if step < cfg.warmup and saved.decay_from is None:
            # Still warming up: the warm-up goes on to the peak rate and the decay starts from
            # there (the rate so far depends on the warm-up alone, so it does not jump); decaying
            # from the rate at this step would have trained the whole run below the peak.
            if cfg.schedule_steps <= cfg.warmup:
                raise ConfigError(f"--schedule-steps {cfg.schedule_steps} must be beyond the run's warm-up "
                                  f"({cfg.warmup} steps)")
        else:
            factor = lr_factor(step, cfg.warmup, old_length, saved.decay_from)
            cfg = cfg.updated({"decay_from": [step, factor]})
    if cfg.max_steps > cfg.schedule_steps:
        raise ConfigError(
            f"--max-steps {cfg.max_steps} goes past the run's learning-rate schedule, which ends at step "
            f"{cfg.schedule_steps} (fixed when the run started): the rate would be 0 from there. Pass "
            f"--schedule-steps {cfg.max_steps} too, to stretch the decay from the current rate to 0 at step {cfg.max_steps}")
    return cfg


def _resources(cfg: TrainConfig, distributed: bool, nodes: list[dict] | None = None) -> tuple[float, float]:
    """CPUs Ray accounts per training worker and per data task. On a small machine, fractions: two
    workers of 1 CPU on a 2-CPU node would leave Ray Data's decode tasks nothing and hang.
    ``nodes``: the cluster's (``cluster_nodes``), read from Ray where not given."""
    import ray

    if nodes is None:
        from disco.pipeline.pools import cluster_nodes

        nodes = cluster_nodes()
    total = sum(n["CPU"] for n in nodes) or float(ray.cluster_resources().get("CPU", 1.0))
    worker = min(1.0, total / (2 * cfg.num_workers))
    if cfg.use_gpu:
        # Workers go where their GPUs are: a GPU node holds as many as its GPUs take, and their
        # CPUs must fit beside them there (with half left to the data tasks). From the cluster's
        # total, 8 workers on a node of 8 GPUs and 4 CPUs asked 1 CPU each, and never started.
        for node in nodes:
            hosted = min(cfg.num_workers, int(node["GPU"] / cfg.gpus_per_worker + 1e-9))
            if hosted > 0:
                worker = min(worker, node["CPU"] / (2 * hosted))
    # 0 is a value (Ray accounts no CPU): only an unset option takes the default.
    if cfg.cpus_per_worker is not None:
        worker = cfg.cpus_per_worker
    elif not distributed:
        worker = 0.0
    else:
        # Rounded down to what fits; 0 only beside a GPU (a GPU node of no CPU: a bundle of its GPU
        # alone), else the least Ray accounts.
        worker = math.floor(max(0.0, worker) * 100) / 100
        if worker <= 0 and not cfg.use_gpu:
            worker = 0.01
    data = cfg.data_cpus if cfg.data_cpus is not None else (0.25 if total < 8 else 1.0)
    return worker, data


def worker_resources(cfg: TrainConfig, worker_cpus: float) -> dict[str, float]:
    """What Ray accounts each training worker."""
    return {"CPU": worker_cpus, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}


def workers_that_fit(nodes: list[dict], each: dict[str, float]) -> int:
    """Training workers of ``each`` (``worker_resources``) that ``nodes`` (CPUs and GPUs of each
    node, as ``cluster_nodes`` gives them, or what is free of them) hold."""
    fit = 0
    for node in nodes:
        room = [int(node.get(kind, 0.0) / need + 1e-9) for kind, need in each.items() if need > 0]
        fit += min(room) if room else 1_000_000
    return fit


def describe_workers(cfg: TrainConfig, nodes: list[dict], available: dict, worker_cpus: float) -> list[str]:
    """Lines for the log where the worker group cannot start now: Ray Train waits for room without a
    word (a run asking 2 GPUs of a cluster of 1 sat at step 0 for ever). ``available``: Ray's free
    resources now (other work may hold part of the cluster)."""
    resources = worker_resources(cfg, worker_cpus)
    gpus = resources.get("GPU", 0.0)
    each = f"{worker_cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    fit = workers_that_fit(nodes, resources)
    total = {k: sum(n[k] for n in nodes) for k in ("CPU", "GPU")}
    if fit < cfg.num_workers:
        room = f"room for {fit}" if fit else "room for none"
        return [f"the {cfg.num_workers} training workers ({each} each) ask for more than the {len(nodes)} node(s) alive "
                f"now hold ({total['CPU']:g} CPU, {total['GPU']:g} GPU: {room}): they wait for nodes an autoscaler "
                "adds; Ctrl-C stops the run at once while none has started"
                + (f", and --num-workers {fit} trains on what is here" if fit else "")]
    free = {k: float(available.get(k, 0.0)) for k in ("CPU", "GPU")}
    asked = {"CPU": worker_cpus * cfg.num_workers, "GPU": gpus * cfg.num_workers}
    if any(asked[k] > free[k] + 1e-6 for k in ("CPU", "GPU")):
        return [f"other work holds part of the cluster now ({asked['CPU']:g} CPU, {asked['GPU']:g} GPU asked; "
                f"{free['CPU']:g} CPU, {free['GPU']:g} GPU free): the training workers wait until it frees (a job "
                "submitted with --entrypoint-num-gpus holds GPUs for its driver too, which train's does not use)"]
    return []


def worker_threads(worker_cpus: float) -> int | None:
    """PyTorch threads of a Ray Train worker: the whole CPUs Ray accounts it, at least one (the
    job's workers otherwise run one, our OMP_NUM_THREADS); None where a ``ray job submit`` job
    sets OMP_NUM_THREADS itself: its value stands."""
    from disco.pipeline.cluster import job_env_vars

    return None if "OMP_NUM_THREADS" in job_env_vars() else max(1, int(worker_cpus or 1))


def train_loop_per_worker(loop_config: dict) -> dict:
    """The training loop, imported where it runs: the driver of a Ray Train run never builds a
    model, and importing diffusers and transformers costs it about 10 s of CPU."""
    from disco.train.loop import train_loop_per_worker as loop

    return loop(loop_config)


class TrainingFailed(RuntimeError):
    """A distributed run gave up (its restarts used up); the message says how to continue."""


def train(cfg: TrainConfig, given: set[str] | None = None, on_metrics: Callable[[dict], None] | None = None,
          log: Callable[[str], None] = lambda message: None) -> dict:
    """Run (or resume) a training run; returns a summary (final step, loss, skipped rows, and
    ``interrupted: True`` when Ctrl-C stopped it after a checkpoint of its last step).

    The driver holds the run directory's lock from before ``resolve`` (which clears what an
    interrupted checkpoint write left) to the end: a second ``--resume`` of a run still training
    (a job resubmitted while the first runs) is refused instead of deleting the live run's
    checkpoint in the making and interleaving its own checkpoints and metrics with it."""
    from disco.pipeline.store.output import folder_lock

    run = Path(cfg.output).absolute() if cfg.output else None
    if run is None or (cfg.resume and not (run / RUN_CONFIG_FILE).exists()):
        resolve(cfg, given)  # raises: no --output, or --resume of what is not a run
    # A new run refused before it wrote anything leaves no folder behind (tidy).
    with folder_lock(run, "wait for it to finish, or stop it (Ctrl-C, `ray job stop`) and resume then",
                     tidy=True) as holder:
        cfg, checkpoint = resolve(cfg, given)
        # A resume given no address takes the run's (config.yaml): a cluster made anew since has another.
        saved_address = cfg.resume and "ray_address" not in (given or set()) and bool(cfg.ray_address)
        return _locked_train(cfg, checkpoint, on_metrics, log, holder, saved_address)


def _locked_train(cfg: TrainConfig, checkpoint: Path | None, on_metrics: Callable[[dict], None] | None,
                  log: Callable[[str], None], holder: str, saved_address: bool = False) -> dict:
    from disco.pipeline.cluster import ClusterUnreachable, init_ray

    if cfg.init_from and not cfg.resume and cfg.background_hole != HOLE:
        log(f"background hole {cfg.background_hole:g}: the value the --init-from run was trained with")
    index = build_index(cfg.data, cfg.split)  # fails early, with a clear message, on empty data
    if cfg.stage in ("finetune", "temporal"):
        from disco.train.data.pose import render_plan

        render_plan(cfg.data, index.files, cfg.pose_style, cfg.hands)  # data it cannot draw: fails here
    from disco.model.checkpoint import trained_data
    from disco.pipeline.store.manifest import split_conflicts

    for line in split_conflicts([*cfg.data, *(trained_data(cfg.init_from) if cfg.init_from else [])]):
        log(f"warning: {line} (this run and the runs it starts from): a clip one rule holds out for testing, "
            "another trains on")
    if schedule_note(cfg):
        log(schedule_note(cfg))
    items, what = len(index), "samples"
    if cfg.stage == "temporal":
        from disco.train.data.clips import window_index

        # Here, before any worker loads the model (and Ray Train retries a data error it cannot fix).
        windows = window_index(index, cfg.clip_frames, cfg.split_at_gaps)
        log(windows.describe(cfg.clip_frames))
        items, what = len(windows), "clips"
    shards = cfg.data_shards or cfg.num_workers
    if items < shards:  # found here, not by every worker after loading the model (and again per restart)
        raise ConfigError(f"{items} training {what} cannot fill {shards} data shards (one per worker unless "
                          "data_shards says otherwise): train with fewer workers or on more data")
    per_step = cfg.batch_size * cfg.grad_accum * cfg.num_workers
    log(f"{cfg.max_steps} steps of {per_step} {what}: {cfg.max_steps * per_step / items:.2f} epochs of the data")
    run = Path(cfg.output)  # made, and held, by train()
    cfg.save(run)
    # Read after every step. An earlier run's request goes first (unlinked, not written over: the
    # file may be another uid's, left by a driver that was killed).
    for name in (STOP_FILE, WORKERS_FILE):
        (run / name).unlink(missing_ok=True)
        (run / name).write_text("")
    log(f"{len(index)} {cfg.split} rows from {len(index.files)} shards; "
        + (f"resuming from {checkpoint.name}" if checkpoint else "starting at step 0"))
    if checkpoint is not None:
        then = json.loads((checkpoint / STATE_FILE).read_text()).get("data")
        now = index.summary()
        if then is not None and then != now:
            log(f"the data changed since {checkpoint.name} ({then['shards']} shards, {then['rows']} rows then; "
                f"{now['shards']}, {now['rows']} now): the run trains on today's, in another order than an "
                "uninterrupted run would have read")
    try:
        init_ray(cfg.ray_address, log=log)
    except ClusterUnreachable as exc:
        if not saved_address:
            raise
        raise ClusterUnreachable(f"{exc}; that is the address the run was started on (its {RUN_CONFIG_FILE}): "
                                 "pass --ray-address for the cluster it resumes on") from None
    warning = job_stop_warning()
    if warning:
        log(warning)
    distributed = cfg.num_workers > 1 or bool(cfg.ray_address)
    nodes = None
    if distributed:
        import ray

        from disco.pipeline.pools import cluster_nodes

        nodes = cluster_nodes()
    worker_cpus, data_cpus = _resources(cfg, distributed, nodes)
    # Said once the stop handler is in place (the line says what a stop does then).
    waiting = describe_workers(cfg, nodes, ray.available_resources(), worker_cpus) if distributed else []
    # The index the driver built goes to every worker (through the object store; numpy arrays are
    # shared, not copied, by the workers of a node): they all train on the same shards even when a
    # data folder gains some meanwhile, and no worker re-reads every shard's metadata.
    # So do the condition gaps' rows (rank 0 alone reading every footer while the others wait in a
    # collective could outlast NCCL's timeout).
    eval_rows = held_out_rows(cfg, index) if evaluates(cfg) else None
    if distributed:
        shared_index = ray.put(index)
        if eval_rows is not None:
            eval_rows = (shared_index if eval_rows[0] is index else ray.put(eval_rows[0]), *eval_rows[1:])
    else:
        shared_index = index
    loop_config = {"config": cfg.to_dict(), "checkpoint": str(checkpoint) if checkpoint else None,
                   "distributed": distributed, "data_cpus": data_cpus, "worker_threads": worker_threads(worker_cpus),
                   "nccl_guard": os.environ.get(GUARD_ENV) == "1", "index": shared_index,
                   "eval_rows": eval_rows, "run_holder": holder}
    stop = threading.Event()
    poller = threading.Thread(target=_follow_metrics, args=(run, on_metrics, stop, cfg.max_steps), daemon=True)
    if on_metrics is not None:
        poller.start()
    try:
        with _stop_on_interrupt(run, log, waits_for_workers=distributed):
            for line in waiting:
                log(line)
            if not distributed:
                return train_loop_per_worker(loop_config)
            return _fit(cfg, loop_config, worker_cpus)
    except StoppedBeforeStart as stopped:
        if cfg.resume or list_checkpoints(run):
            raise
        # Nothing was trained: the folder holds no run, and the same command (with fewer workers,
        # as the wait's line suggests) starts anew in it instead of being sent to a --resume that
        # must keep the options it was stopped with.
        (run / RUN_CONFIG_FILE).unlink(missing_ok=True)
        raise StoppedBeforeStart(f"{stopped}; {run} holds no run: the same command starts it anew, with other "
                                 "options if need be") from None
    finally:
        stop.set()
        if poller.is_alive():
            poller.join()
        for name in (STOP_FILE, WORKERS_FILE):
            (run / name).unlink(missing_ok=True)


# The least time `ray job stop` should leave between its SIGTERM and its SIGKILL: a step and a
# full-size checkpoint (1.6 B trainable parameters with their AdamW state: ~25 GB written).
JOB_STOP_GRACE_S = 120


def job_stop_warning() -> str | None:
    """The line to warn a ``ray job submit`` job with whose ``ray job stop`` would kill it before
    it can write its checkpoint; None outside a job or with time enough."""
    from disco.pipeline.cluster import JOB_STOP_WAIT_ENV, job_stop_wait_s

    grace = job_stop_wait_s()
    if grace is None or grace >= JOB_STOP_GRACE_S:
        return None
    return (f"warning: `ray job stop` gives this job {grace:g} s ({JOB_STOP_WAIT_ENV}) to write its checkpoint "
            "before it kills it: the steps since the last checkpoint would be lost; submit with --runtime-env-json "
            f"'{{\"env_vars\": {{\"{JOB_STOP_WAIT_ENV}\": \"300\"}}}}'")


@contextlib.contextmanager
def _stop_on_interrupt(run: Path, log: Callable[[str], None], waits_for_workers: bool = False):
    """Ctrl-C (SIGINT), or SIGTERM (what ``ray job stop`` sends a job's driver), asks the run to
    stop: a file in the run directory that rank 0 reads after each step (on the shared storage
    every node sees), telling the others in the step's collective. A second signal interrupts at
    once. ``waits_for_workers``
    (a Ray Train run): while no worker group has started (``WORKERS_FILE``), the first signal
    ends the run at once (``StoppedBeforeStart``): nothing was trained, and nothing would read
    the request."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if waits_for_workers and not _workers_started(run):
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            raise StoppedBeforeStart(f"stopped at once ({again}): no training worker had started, nothing was trained")
        try:
            (run / STOP_FILE).write_text(STOP_REQUESTED)
        except OSError as exc:  # (a full disk): the second signal must still abort
            log(f"cannot ask the workers to stop ({exc}); {again} again to abort at once")
        else:
            log(f"stopping after the current step and writing a checkpoint ({again} again to abort at once)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        before = previous[signal.SIGTERM]  # what ran before (Ray's exit, or the default): fatal again
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StoppedBeforeStart(Exception):
    """A stop asked before any training worker started. Ray Train's request for the worker group
    stays with Ray until this driver disconnects: the command exits; a caller of ``train`` that
    goes on must call ``ray.shutdown()``, or a group that finds room later starts training."""


def _workers_started(run: Path) -> bool:
    try:
        return (run / WORKERS_FILE).read_text().strip() == WORKERS_STARTED
    except OSError:  # a passing storage error: say started, and the stop waits for the step as before
        return True


def process_group_backend(cfg: TrainConfig) -> str:
    """NCCL for workers with a GPU each; gloo on the CPU, and where workers share a GPU (NCCL
    refuses two ranks on one device; gloo takes CUDA tensors)."""
    return "nccl" if cfg.use_gpu and cfg.gpus_per_worker >= 1 else "gloo"


def _fit(cfg: TrainConfig, loop_config: dict, worker_cpus: float) -> dict:
    import time

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError

    from disco.train.failure_policy import trainer_class
    from disco.train.process_group import WorkerTorchConfig

    resources = worker_resources(cfg, worker_cpus)
    max_failures = cfg.max_failures if cfg.max_failures is not None else 3
    invocation = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"  # a container's pid repeats
    # Each checkpoint records the invocation that wrote it (loop.py's _start_checkpoint).
    loop_config = {**loop_config, "invocation": invocation}
    # A worker's error that stops the run (STOPS_THE_RUN) is not retried max_failures times.
    trainer = trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=WorkerTorchConfig(backend=process_group_backend(cfg)),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        # Checkpoints are written by rank 0 into the run directory itself (shared storage on a
        # multi-node cluster); Ray Train's storage holds its bookkeeping and, per checkpoint, a
        # pointer to ours, which a restarted worker group starts from. A name per invocation: the
        # first attempt starts from what --resume resolved, never from an older invocation's pointer.
        run_config=RunConfig(storage_path=str(Path(cfg.output) / "ray"), name=invocation,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        # A worker that found the run unable to go on (STOPS_THE_RUN): its one line, no advice to resume.
        with stops_in_one_line():
            _fit_in_thread(trainer)
    except TrainingFailedError as exc:
        checkpoints = list_checkpoints(cfg.output)
        where = (f"the last checkpoint is {checkpoints[max(checkpoints)].name}" if checkpoints
                 else "no checkpoint was written yet")
        raise TrainingFailed(
            f"training stopped after {max_failures} restart(s): {_root_cause(exc)}; {where}; continue with "
            f"`disco-cli train --output {cfg.output} --resume` (--max-failures N allows more restarts)") from exc
    return json.loads((Path(cfg.output) / SUMMARY_FILE).read_text())


def _fit_in_thread(trainer) -> None:
    """``trainer.fit()`` in a thread of its own. Why: run from the main thread, Ray Train replaces
    the SIGINT handler with one that aborts the workers at once, without a checkpoint; the main
    thread keeps ours (stop after the step, checkpoint) and waits here, handling signals."""
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]


def _root_cause(exc: BaseException) -> str:
    """One line naming what failed, from Ray Train's nested errors."""
    seen = exc
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    errors = getattr(exc, "worker_failures", None) or {}
    for error in errors.values():
        seen = error
        break
    lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
    text = lines[-1] if lines else type(seen).__name__
    return f"{type(seen).__name__}: {text}"[:300]


def _follow_metrics(run: Path, on_metrics: Callable[[dict], None], stop: threading.Event, max_steps: int) -> None:
    """Each metrics line the workers write, as it comes, with the run's ``max_steps`` (a resume's
    may be the saved one): for a progress bar."""
    metrics = run / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0  # a resumed run shows only its own progress
    while True:
        finished = stop.wait(0.5)
        lines, offset = read_metrics(run, offset)
        for line in lines:
            on_metrics({**line, "max_steps": max_steps})
        if finished:
            return
