"""The preprocessing job: list, plan, annotate on Ray actors, commit shards, write the manifest."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa

from disco.pipeline.annotators import BackendError, resolve_backends, weight_files
from disco.pipeline.annotators.registry import get as get_backend
from disco.pipeline.cluster import WORKING_DIR_PREFIX, init_ray, input_identity
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import (ConfigError, RunFailed, first_line, run_stops_off_ray_datas_console, starved_stages_reported,
                                   stops_in_one_line)
from disco.pipeline.sources import list_source
from disco.pipeline.sources.generic import ends_digest, local_path
from disco.pipeline.filter import filter_section, filter_settings
from disco.pipeline.store.manifest import RunResult, build_manifest, write_manifest
from disco.pipeline.store.schema import commit_entry, unit_blocks, unit_table
from disco.pipeline.pools import PoolPlan, cluster_nodes, describe_pools, plan_pools
from disco.pipeline.actors import AnnotateStage, MattingStage, PoseStage, check_storage, held_resources
from disco.pipeline.gpu_balance import start_ledger, stop_ledger, takes_whole_cluster
from disco.pipeline.stages import plan_units
from disco.pipeline.store.output import OutputStore, run_token
from disco.pipeline.store.shards import failed_units, retract_units

MAX_BLOCKS = 10_000


def stage_settings(cfg: PreprocessConfig) -> dict:
    """The plain-dict settings shipped to Ray tasks and actors."""
    keys = ("fps", "max_side", "min_side", "max_pixels", "image_format", "jpeg_quality", "pose_style",
            "hands", "min_visibility", "joint_threshold", "min_mask_area", "segment_frames", "shard_rows",
            "row_group_rows", "smooth_poses", "unit_timeout")
    settings = {k: getattr(cfg, k) for k in keys}
    settings.update(matting=cfg.resolved["matting"], pose=cfg.resolved["pose"],
                    backend_options=backend_options(cfg),
                    # Where each backend is declared: an actor imports a backend it does not know.
                    backend_modules={name: get_backend(name).module
                                     for name in (cfg.resolved["matting"], cfg.resolved["pose"]) if name != "none"},
                    # The writing actors put shards straight into the output: an absolute path on
                    # storage that every node sees, and a name part of this run's own.
                    output=os.path.abspath(cfg.output),
                    # As the listing names the units' files (resolved), so the check sees what they will.
                    input_root=str(Path(cfg.input).resolve()), run=run_token())
    settings.update(filter_settings(cfg))
    return settings


def backend_options(cfg: PreprocessConfig) -> dict:
    """What the paper-faithful backends are built with, inside each actor."""
    return {
        "weights": cfg.resolved.get("weights"), "device": cfg.resolved.get("device", "cpu"),
        "sam_model": cfg.sam_model, "sam2_model": cfg.sam2_model, "box_threshold": cfg.box_threshold,
        "text_threshold": cfg.text_threshold, "largest_person": cfg.largest_person, "face": cfg.face,
        "half": cfg.half, "batch_size": cfg.batch_size,
    }


def preprocess(cfg: PreprocessConfig, progress=None, log=print) -> RunResult:
    """Run the job. ``progress``, if given, has ``start(total_inputs)`` and ``update(inputs, frames)``."""
    cfg.validate()
    cluster_cuda = None
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        import ray

        # On a cluster the GPUs are the workers'; the driver (often a CPU head node) may have none.
        init_ray(cfg.ray_address, log=log)
        cluster_cuda = ray.cluster_resources().get("GPU", 0) > 0
        if not cluster_cuda and cfg.device == "cuda":
            if not cfg.actors:
                raise ConfigError("--device cuda asked for, but the cluster has no GPU now; where an autoscaler adds "
                                  "GPU nodes on demand, pass --actors N too: the actors' GPU requests bring them")
            # An autoscaling cluster whose GPU nodes are scaled to zero: the actors ask for their
            # GPU shares, the autoscaler adds nodes for them, and Ray Data waits until they start.
            log(f"no GPU in the cluster now: {cfg.actors} actor(s) of each stage ask for GPU shares; the run "
                "starts when nodes with GPUs join (an autoscaler's; without one, add GPU nodes, or stop with Ctrl-C "
                "and pass --device cpu)")
            cluster_cuda = True
    try:
        cfg.resolved = resolve_backends(cfg.matting, cfg.pose, weights=cfg.weights, device=cfg.device,
                                        cuda=cluster_cuda, sam_model=cfg.sam_model, sam2_model=cfg.sam2_model,
                                        hands=cfg.hands, face=cfg.face)
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    log(f"backends: matting={cfg.resolved['matting']} pose={cfg.resolved['pose']} ({cfg.resolved['reason']})")
    if cluster_cuda is False and cfg.device == "auto" and cfg.resolved["device"] == "cpu":
        # A cluster whose GPU nodes are scaled to zero would do the whole data set on the CPU.
        log("the cluster has no GPU now, so this run uses CPU backends on every node; where an autoscaler adds GPU "
            "nodes on demand, stop it (Ctrl-C, or `ray job stop JOB_ID` for a job) and pass --device cuda "
            "--actors N: the actors' GPU requests bring them")
    store = OutputStore(cfg.output)
    with store.locked():
        return _preprocess_locked(cfg, store, progress, log)


def _preprocess_locked(cfg: PreprocessConfig, store: OutputStore, progress, log) -> RunResult:
    with _SigtermStops() as sigterm:
        return _preprocess_run(cfg, store, progress, log, sigterm)


def _preprocess_run(cfg: PreprocessConfig, store: OutputStore, progress, log, sigterm: "_SigtermStops") -> RunResult:
    state, removed = store.begin(cfg.output_params(), cfg.overwrite)
    if removed:
        log(f"recovered from an interrupted run: removed {len(removed)} uncommitted file(s)")
    listing = list_source(cfg, log)
    listed = [i.input_path for i in listing.items]
    if not listed:
        log(f"no {cfg.source} inputs found under {cfg.input}")
    versions = input_versions(listing.items, by_content=_versions_by_content(cfg))
    changed = changed_inputs(state, versions)
    if cfg.retry_errors:
        state = _retry_errors(cfg, store, state, set(changed), log)
        changed = changed_inputs(state, versions)  # an input retried whole starts afresh from its new file
    if changed:
        log(f"{len(changed)} input(s) changed since their units were committed ({', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''}): their rows are from the earlier file and are kept, and "
            "nothing more is read of them (the rest of a partly done one would be cut from another file); pass "
            "--overwrite to redo the output")
    complete = state.complete_inputs() | set(changed)  # a changed one stays as it is, partly done or not
    pending = [i for i in listing.items if i.input_path not in complete]
    pending_inputs = len(pending)
    if progress is not None:
        progress.start(len(pending))
    partial = state.partial_units()
    if complete or partial:
        units = sum(len(v) for v in partial.values())
        log(f"resuming: {len(listed) - len(pending)} of {len(listed)} inputs already committed, "
            f"and {units} unit(s) of {len(partial)} partly done input(s)")
    # What planning needs of the partly done ones: how many units each was cut into.
    unit_counts = {path: next(iter(units.values()))["unit_count"] for path, units in state.units().items()
                   if path in partial}
    # The journal as it was goes (GBs at millions of committed units): the wind-up reads it again.
    state = complete = None

    weights = None  # the model files' digests for the manifest
    started = time.time()
    done = {"frames": 0}  # what this run committed, counted as it goes: a stop keeps the count
    pools: list[PoolPlan] = []
    held: dict[str, list[dict]] = {}
    missing = 0
    interrupted = False
    streaming = False  # the actors were started: a failure from here on leaves commits to describe
    failure: Exception | None = None
    try:
        if pending_inputs:
            init_ray(cfg.ray_address, log=log)
            sigterm.arm()  # after ray.init, which sets its own handler
            # Read now: hashing the model files (2.4 GB for SAM ViT-H, maybe over NFS) in the wind-up
            # would outlast the seconds `ray job stop` leaves before SIGKILL.
            weights = run_weight_files(cfg)
            settings = stage_settings(cfg)
            units = plan_all(pending, settings, partial, log=log, unit_counts=unit_counts)
            # The units hold what the run needs of the inputs: their records go (GBs for millions).
            pending, listing.items = [], []
            import ray

            nodes, available = cluster_nodes(), ray.available_resources()
            pools = plan_pools(cfg, nodes, units)
            for line in describe_pools(pools, nodes, available):
                log(line)
            whole_cluster = takes_whole_cluster(nodes, available)
            streaming = True
            with stops_in_one_line():  # an actor that cannot start on its node: the run's one line
                with starved_stages_reported(log):
                    missing = _run_ray(units, settings, partial, store, pools, progress, held, done, versions,
                                       whole_cluster)
            if missing:
                log(f"{missing} unit(s) of work never came back committed; re-run the same command to finish them")
    except KeyboardInterrupt:
        sigterm.wind_up()
        interrupted = True
        log("interrupted: what the actors committed is kept")
    except Exception as exc:  # noqa: BLE001 - raised again once the manifest says what was committed
        stopped = sigterm.state == "interrupted"  # a SIGTERM that Ray passed on wrapped
        sigterm.wind_up()
        if not streaming:
            raise
        # Ray Data's error (an actor that cannot start, a lost driver connection, ...): the
        # manifest of an earlier run, or none, would stand for this one's commits.
        failure = exc
        if stopped:
            failure, interrupted = None, True
            log("interrupted: what the actors committed is kept")
    sigterm.wind_up()  # the manifest is written whatever comes now
    manifest = None
    try:
        manifest = _wind_up(cfg, store, log, started=started, done=done, interrupted=interrupted, failure=failure,
                            weights=weights, pools=pools, held=held, listed=listed, listing=listing,
                            pending_inputs=pending_inputs, changed=changed)
    except Exception as exc:  # noqa: BLE001 - the failure that ended the run is the one to show
        if failure is None:
            raise
        log(f"the manifest was not written either: {first_line(exc)}")
    if isinstance(failure, ConfigError):  # (an actor that cannot start on its node: the run's one line)
        raise failure
    if failure is not None:
        raise RunFailed(failure, manifest) from failure
    counts = manifest["counts"]
    if interrupted:
        code = 130
    elif counts["inputs"] == 0 or counts["inputs_failed"] == counts["inputs"] or missing:
        code = 1
    else:
        code = 0
    return RunResult(manifest=manifest, exit_code=code, removed_on_recovery=removed)


def _wind_up(cfg: PreprocessConfig, store: OutputStore, log, *, started: float, done: dict, interrupted: bool,
             failure: Exception | None, weights, pools: list, held: dict, listed: list, listing, pending_inputs: int,
             changed: list) -> dict:
    """The run's manifest, written: what the journal holds now, and how this run went."""
    wall = time.time() - started
    frames_done = done["frames"]
    final_state = store.read_journal()
    if not interrupted and failure is None:  # (after a failure an actor may still be writing)
        # Shards that a lost actor wrote but never got committed (its task ran again elsewhere):
        # every writer is done now, so anything the journal does not name can go.
        orphans = store.recover(final_state)
        if orphans:
            log(f"removed {len(orphans)} shard(s) written by lost actors and never committed")
    backends = {
        "matting": {"name": cfg.resolved["matting"]},
        "pose": {"name": cfg.resolved["pose"]},
        "reason": cfg.resolved["reason"],
        "cuda": cfg.resolved["cuda"],
        "device": cfg.resolved["device"],
        "weights_dir": cfg.resolved["weights"],
        "weights": weights if weights is not None else run_weight_files(cfg),
    }
    run = {
        "wall_time_s": round(wall, 3),
        "frames_processed": frames_done,
        "frames_per_s": round(frames_done / wall, 3) if wall > 0 else None,
        "inputs_processed": pending_inputs,
        "pools": [p.to_dict() for p in pools],
        # What Ray actually gave the actors that did the work: one entry per actor and stage.
        "stage_resources": held,
        "ray_address": cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local",
        "interrupted": interrupted,
        "failed": first_line(failure) if failure is not None else None,
    }
    config = {k: v for k, v in cfg.to_dict().items() if k != "resolved"}
    # The input as the journal knows it: absolute, or in a job's --working-dir copy (deleted when
    # the job ends) its path in that folder, not the path as typed (relative to a folder gone).
    config["input"] = input_identity(cfg.input)
    manifest = build_manifest(config=config, backends=backends, state=final_state, listed=listed,
                              ignored=listing.ignored, run=run)
    manifest.update(dataset_section(cfg, listing, final_state))
    if changed:  # every later resume says it again: the rows stay until an --overwrite
        manifest["changed_inputs"] = changed
    store.still_held()  # the manifest of a folder another run took is that run's to write
    write_manifest(store.manifest, manifest)
    return manifest


def _retry_errors(cfg: PreprocessConfig, store: OutputStore, state, changed: set[str], log):
    """``--retry-errors``: the failed units of its types leave the output, to run again. Of an
    input whose file changed since, only all its units at once: the rest of a partly done one
    would be cut from another file (``changed_inputs``), so its failed units stay as they are."""
    from collections import Counter

    again = failed_units(store, state, set(cfg.retry_errors))
    units, taken = state.units(), Counter(path for path, _ in again)
    kept = {path for path in changed if 0 < taken[path] < len(units[path])}
    again = {unit for unit in again if unit[0] not in kept}
    if again:
        state = retract_units(store, state, again, cfg.row_group_rows)
    inputs = sorted({path for path, _ in again})
    log(f"--retry-errors {','.join(cfg.retry_errors)}: {len(again)} unit(s) that wrote no rows, of {len(inputs)} "
        "input(s), run again" + (f" ({', '.join(inputs[:3])}{', ...' if len(inputs) > 3 else ''})" if again else "")
        + (f"; {len(kept)} partly done input(s) changed since are left as they are" if kept else ""))
    return state


def run_weight_files(cfg: PreprocessConfig) -> list[dict]:
    return weight_files(cfg.resolved, {"hands": cfg.hands, "face": cfg.face, "sam_model": cfg.sam_model,
                                       "sam2_model": cfg.sam2_model})


class _SigtermStops:
    """SIGTERM (what `ray job stop`, Slurm and Kubernetes send first) stops the run as Ctrl-C does:
    the commits kept, the manifest written, exit code 130 (Ray's handler, which ``ray.init`` sets,
    exited at once: code 15, no manifest). ``arm`` installs it (after ``ray.init``); once the run
    winds up (``wind_up``: the journal read, the manifest written) a SIGTERM no longer interrupts
    it. The handler before comes back at the end. Main thread only (signals are delivered there)."""

    def __init__(self):
        self.previous, self.state = None, "off"

    def __enter__(self) -> "_SigtermStops":
        return self

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread() and self.previous is None:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.previous = signal.SIG_DFL if self.previous is None else self.previous  # set outside Python
            self.state = "armed"

    def _handle(self, signum, frame) -> None:
        if self.state == "armed":
            self.state = "interrupted"
            raise KeyboardInterrupt
        if self.state == "interrupted":  # a second one before the wind-up: what it did before (Ray's exit)
            signal.signal(signal.SIGTERM, self.previous)
            if callable(self.previous):
                self.previous(signum, frame)
            elif self.previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
        # winding up: the manifest is being written, and will be

    def wind_up(self) -> None:
        self.state = "winding up"

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def dataset_section(cfg: PreprocessConfig, listing, state) -> dict:
    """What data set sources and filter-humans add to the manifest."""
    section: dict = {}
    if listing.dataset is not None:
        section["dataset"] = listing.dataset
    if listing.filtered:
        section["filtered_at_listing"] = listing.filtered
    if cfg.human_filter:
        section.update(filter_section(state, cfg.min_visibility, cfg.min_mask_area, cfg.max_persons))
    return section


# Tar shards are counted (every header walked, in Python: the GIL keeps threads from helping) in
# Ray tasks, SHARDS_PER_PLAN_TASK a task, once a run has RAY_PLAN_FROM of them: 40K shards of 10K
# samples are 7 hours on one driver thread. A task asks for a quarter of a CPU, which no pool holds
# yet at planning time, and sends back its units as Arrow rows.
RAY_PLAN_FROM = 16
SHARDS_PER_PLAN_TASK = 8
PLAN_TASK_CPUS = 0.25
# Videos are probed in such tasks too, VIDEOS_PER_PLAN_TASK a task, however few: reading a
# container's header is FFmpeg's native code, and a damaged file can end the process that reads it
# (one wrong sample count in a clip's "stts" box makes decord throw std::bad_alloc, an abort). On
# the driver that ended the run, and every resume of it, at the same video.
VIDEOS_PER_PLAN_TASK = 16
# A planning task whose node is lost runs again, this many tries in all; one stuck past
# PLAN_TIMEOUT_S (or --unit-timeout, if lower) ends its process (faulthandler's watchdog), and its
# inputs are planned again one a task: a header read, or counting 8 shards, takes seconds.
PLAN_NODE_TRIES = 3
PLAN_TIMEOUT_S = 600.0
# The driver plans the other inputs PLAN_CHUNK at a time and turns their units into Arrow rows
# (about 240 bytes a unit, against about 1.5 KB as dicts) every UNITS_PER_TABLE units, so it never
# holds millions of unit dicts (20K stills, or the segments of a few hundred long videos).
PLAN_CHUNK = 2_000
UNITS_PER_TABLE = 100_000


def plan_all(pending, settings: dict, partial_units: dict[str, list[int]], threads: int = 8,
             log=lambda message: None, ray_from: int = RAY_PLAN_FROM, unit_counts: dict[str, int] | None = None
             ) -> pa.Table:
    """Cut every pending input into units (``UNIT_TYPE`` rows). Videos are probed in Ray tasks
    (``VIDEOS_PER_PLAN_TASK``), and so are tar shards, counted there once a run has ``ray_from``
    of them; the other inputs are planned on the driver, on a few threads (stills need no
    reading). The tasks' units come after the driver's, in listing order. ``unit_counts``: how
    many units each partly done input was cut into (``_fit_partly_done``)."""
    from concurrent.futures import ThreadPoolExecutor

    videos = [item for item in pending if item.kind == "video" and not item.error_type]
    shards = [item for item in pending if item.kind == "tar" and not item.error_type]
    chunks = _chunks(videos, VIDEOS_PER_PLAN_TASK)
    if len(shards) >= ray_from:
        log(f"counting the samples of {len(shards)} tar shards in Ray tasks")
        chunks += _chunks(shards, SHARDS_PER_PLAN_TASK)
    if chunks:
        taken = {item["input_path"] for chunk in chunks for item in chunk}
        pending = [item for item in pending if item.input_path not in taken]
        refs = _plan_tasks(chunks, settings, partial_units)
    tables, units = [], []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for k in range(0, len(pending), PLAN_CHUNK):  # map() holds a chunk's results, not the run's
            for planned in pool.map(lambda item: plan_units(item.to_dict(), settings, partial_units),
                                    pending[k:k + PLAN_CHUNK]):
                units += planned
                if len(units) >= UNITS_PER_TABLE:
                    tables.append(unit_table(units))
                    units = []
    tables.append(unit_table(units))
    if chunks:
        with stops_in_one_line():
            tables += [table for planned in _planned_in_tasks(chunks, refs, settings, partial_units) for table in planned]
    return _fit_partly_done(pa.concat_tables(tables), partial_units, unit_counts or {}, log)


def _fit_partly_done(units: pa.Table, partial_units: dict[str, list[int]], unit_counts: dict[str, int],
                     log=lambda message: None) -> pa.Table:
    """The units planned for partly done inputs, fitted to how each was cut before (``unit_counts``):
    - one that fails before it is cut this time (a listing error, a probe that fails or ends its
      process) is its errors unit, the input's first of one, which in the journal would take the
      place of the committed unit 0 (its rows no longer counted, the input partly done for good):
      it becomes the error of each unit still to do instead, numbered as the input was cut, so
      that the input is done and its failed units known to --retry-errors;
    - one now cut into another number of units (a frame folder that gained frames: folders are
      not versioned) would join units of two cuttings: it is kept as it is, as a changed file is."""
    import pyarrow.compute as pc

    if not partial_units or not units.num_rows:
        return units
    partly = pc.is_in(units.column("input_path"), pa.array(sorted(partial_units), pa.string()))
    if not pc.any(partly).as_py():
        return units
    fitted, recut, changed = [], set(), False
    for unit in units.filter(partly).to_pylist():
        path = unit["input_path"]
        count = unit_counts.get(path)
        if count is None or unit["unit_count"] == count:  # cut as before
            fitted.append(unit)
            continue
        changed = True
        if unit["error_type"]:
            done = set(partial_units[path])
            fitted += [{**unit, "unit_index": k, "unit_count": count} for k in range(count) if k not in done]
        else:
            recut.add(path)
    if not changed:
        return units  # as planned, in the listing's order
    if recut:
        log(f"{len(recut)} partly done input(s) are now cut into another number of units than their committed ones "
            f"({', '.join(sorted(recut)[:3])}{', ...' if len(recut) > 3 else ''}): their files changed, so they are "
            "kept as they are; pass --overwrite to redo the output")
    return pa.concat_tables([units.filter(pc.invert(partly)), unit_table(fitted)])


def _chunks(items, size: int) -> list[list[dict]]:
    return [[item.to_dict() for item in items[k:k + size]] for k in range(0, len(items), size)]


def _plan_tasks(chunks: list[list[dict]], settings: dict, partial_units: dict[str, list[int]]) -> list:
    """A planning task per chunk of inputs. Never retried by Ray: a task whose process ended is
    run again here, one input a task (``_planned_in_tasks``)."""
    import ray

    plan = ray.remote(num_cpus=PLAN_TASK_CPUS, max_retries=0)(plan_inputs)
    return [plan.remote(chunk, settings, {item["input_path"]: partial_units[item["input_path"]]
                                          for item in chunk if item["input_path"] in partial_units})
            for chunk in chunks]


def _planned_in_tasks(chunks: list[list[dict]], refs: list, settings: dict, partial_units: dict[str, list[int]],
                      node_tries: int = PLAN_NODE_TRIES) -> list[list[pa.Table]]:
    """Each planning task's units (its tables), in order. A task whose node was lost runs again
    (``node_tries`` tries in all). The inputs of a task whose process ended (native code that
    crashed or aborted on a damaged file, a kill for memory, the planning time limit) are planned
    again one a task, all such tasks at once, so that the one to blame is found and the others go
    on; an input whose own task ended so is its errors unit (``worker_crashed``)."""
    from disco.pipeline.errors import failed_unit, first_line, input_error
    from disco.pipeline.stages import unit_base
    from disco.pipeline.errors import WorkerCrashed

    parts: list = []  # per chunk: its tables, or the range of ``again`` that plans it
    again: list[list[dict]] = []
    for chunk, result in zip(chunks, _every_result(refs, keep=_task_ended)):
        if not isinstance(result, BaseException):
            parts.append([result])
        elif isinstance(result, _node_lost_errors()) and node_tries > 1:
            parts.append(range(len(again), len(again) + 1))
            again.append(chunk)
        elif len(chunk) > 1:
            parts.append(range(len(again), len(again) + len(chunk)))
            again += [[item] for item in chunk]
        else:
            crash = WorkerCrashed(f"reading it ended the process that read it (a crash or an abort in native code "
                                  f"on a damaged file, a kill for memory, or stuck past the planning time limit): "
                                  f"{first_line(result)}")
            parts.append([unit_table([failed_unit(unit_base(chunk[0]), input_error("decode", crash))])])
    replanned = _planned_in_tasks(again, _plan_tasks(again, settings, partial_units), settings, partial_units,
                                  node_tries - 1) if again else []
    return [part if isinstance(part, list) else [table for k in part for table in replanned[k]] for part in parts]


def _task_ended(exc: BaseException) -> bool:
    """Whether a Ray task failed because its process, or its node, ended under it."""
    from ray.exceptions import OutOfMemoryError, WorkerCrashedError

    return isinstance(exc, (WorkerCrashedError, OutOfMemoryError, *_node_lost_errors()))


def _node_lost_errors() -> tuple:
    from ray.exceptions import LocalRayletDiedError, NodeDiedError

    return NodeDiedError, LocalRayletDiedError


# Tasks watched at once for their results. ``ray.wait`` scans every ref it is given: called for one
# result at a time over all the tasks, the 62,500 planning tasks of a million videos cost the
# driver hours before the first unit (``benchmarks/plan_wait.py``).
WAIT_WINDOW = 512


def _every_result(refs: list, settle_s: float = 10.0, keep=lambda exc: False, window: int = WAIT_WINDOW) -> list:
    """Every task's result, in order, an error that ``keep`` accepts as its result; at the first
    other error, the tasks left are cancelled and their results read (those that end within
    ``settle_s``) before it is raised: a failed task whose result nobody read has Ray print it,
    stack and all, as an "Unhandled error" (the planning tasks on a node without the input all
    fail, and the run says so once), and one task stuck on a dead mount must not hold the run.
    The first ``window`` tasks not read yet are watched, and all of them that have ended are read
    at once: the cost of a wait is the window's, whatever the number of tasks. (An error of a task
    behind the window is seen once the window reaches it: the tasks before it end, or reach their
    time limit, first.)"""
    import ray

    results, queue, first = {}, iter(refs), None
    watched = list(itertools.islice(queue, window))
    while watched and first is None:
        # Until one has ended, then every one that has (read by ray.get, wherever it ended).
        ready, watched = ray.wait(watched, num_returns=1, fetch_local=False)
        if watched:
            more, watched = ray.wait(watched, num_returns=len(watched), timeout=0, fetch_local=False)
            ready += more
        try:
            results.update(zip(ready, ray.get(ready)))
            ready = []
        except Exception:  # one by one, to tell which
            pass
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except Exception as exc:
                if keep(exc):
                    results[ref] = exc
                elif first is None:
                    first = exc
                else:
                    results[ref] = exc  # read: a second error is not printed as unhandled
        watched += itertools.islice(queue, window - len(watched))
    if first is None:
        return [results[ref] for ref in refs]
    pending = watched + list(queue)
    for ref in pending:
        ray.cancel(ref)
    settled, _ = ray.wait(pending, num_returns=len(pending), timeout=settle_s) if pending else ([], [])
    for ref in settled:
        with contextlib.suppress(Exception):
            ray.get(ref)
    raise first


def plan_inputs(items: list[dict], settings: dict, partial_units: dict[str, list[int]]) -> pa.Table:
    """The units of these inputs as ``UNIT_TYPE`` rows (what a planning task runs, on any node:
    on one that does not see the input, the run stops instead of committing every shard the task
    was given as a listing error)."""
    import faulthandler
    import sys

    check_storage(settings, output=False)
    if settings.get("unit_timeout"):  # a header read stuck in native code ends the task (see strikes.py)
        faulthandler.dump_traceback_later(min(float(settings["unit_timeout"]), PLAN_TIMEOUT_S), exit=True,
                                          file=sys.stderr)
    try:
        return unit_table([unit for item in items for unit in plan_units(item, settings, partial_units)])
    finally:
        faulthandler.cancel_dump_traceback_later()


# Inputs whose file can change under a run: a tar shard img2dataset is still writing, a video
# replaced by a longer take. (Stills are not stat-ed: millions, and each is one unit.)
VERSIONED_KINDS = ("tar", "video")


# Files whose version is read at once (``io_threads``): one after the other, a million videos on
# NFS kept the run from starting for 8-17 minutes.
VERSION_READERS = 32


def input_versions(items, by_content: bool = False) -> dict[str, str]:
    """Size and modification time of each listed tar shard and video, as the journal records
    them with its committed units. ``by_content``: size and a hash of the file's first and last
    MiB instead, for inputs whose times say nothing (a job's copy of its --working-dir)."""
    from disco.pipeline.io_threads import map_in_threads

    def version(item) -> str | None:
        path = local_path({"raw_path": item.raw_path, "abs_path": item.abs_path})
        try:
            stat = os.stat(path)
            return (f"{stat.st_size}-c{ends_digest(path, stat.st_size)}" if by_content
                    else f"{stat.st_size}-{stat.st_mtime_ns}")
        except OSError:
            return None  # its units will say what is wrong with it

    versioned = [item for item in items if item.kind in VERSIONED_KINDS and not item.error_type]
    found = map_in_threads(version, versioned, VERSION_READERS, "disco-versions")
    return {item.input_path: seen for item, seen in zip(versioned, found) if seen is not None}


def _versions_by_content(cfg: PreprocessConfig) -> bool:
    """Inputs in a ``ray job submit`` job's copy of its --working-dir: Ray extracts that copy
    anew, with new modification times, whenever the folder changed, so a resubmitted job would
    take every partly done video for a changed one; there they are known by their content."""
    return input_identity(cfg.input).startswith(WORKING_DIR_PREFIX)


def changed_inputs(state, versions: dict[str, str]) -> list[str]:
    """Inputs with committed units whose file is not the one they were cut from. (Versions of one
    output are all of one kind, by time or by content: the kind follows the input's identity,
    which a resume must keep.)"""
    return sorted(path for path, units in state.units().items() if path in versions and
                  any(unit.get("version") not in (None, versions[path]) for unit in units.values()))


def _check_shards(store: OutputStore, entry: dict) -> None:
    """A shard an actor wrote must be in the driver's output folder, whole, before it is
    committed: an output folder that is not shared storage shows up here, not in training."""
    for shard in entry["shards"]:
        path = store.root / shard["path"]
        size = path.stat().st_size if path.exists() else None
        if size != shard["bytes"]:
            seen = "is missing" if size is None else f"holds {size} bytes, not the {shard['bytes']} written"
            raise ConfigError(
                f"{path} {seen} here: an actor on another node wrote it into its own {store.root}; the output "
                "folder must be on storage every node sees (NFS, a shared mount)")


def unit_dataset(units: pa.Table):
    """The planned units as a Ray dataset: small blocks, so a video's segments spread over the
    actors instead of queueing on one, of the units' declared Arrow type whatever kinds a block
    holds. ``from_blocks`` takes their metadata here; ``from_arrow`` would start a task per block
    at Ray's default of 1 CPU and wait for it, for ever on a cluster with no whole CPU free (and a
    second or so of CPU per worker that imports Ray Data for it, on a local instance)."""
    import ray.data

    return ray.data.from_blocks(unit_blocks(units, MAX_BLOCKS))


def _run_ray(units, settings, partial_units, store: OutputStore, pools: list[PoolPlan], progress,
             held: dict[str, list[dict]], done: dict[str, int], versions: dict[str, str] | None = None,
             whole_cluster: bool = True) -> int:
    """Stream the units through the pools. The last pool's actors write the shards; what reaches
    the driver is one small commit record per shard, appended to the journal as it arrives (the
    frames committed counted into ``done["frames"]`` as they are). Returns the number of units
    that never were."""
    from ray.data import ActorPoolStrategy, DataContext

    from disco.pipeline.ray_idle import idle_pause_callback

    # Importing Ray Data sets up its own loggers; keep its per-run notices off the console.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    run_stops_off_ray_datas_console()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = unit_dataset(units)
    stages = {"annotate": AnnotateStage, "matting": MattingStage, "pose": PoseStage}
    ledger = None
    on_gpu = [pool for pool in pools if pool.gpus > 0]
    if len(pools) > 1 and on_gpu and all(pool.gpus < 1 for pool in on_gpu):
        # Ray packs fractional shares best-fit, blind to the stages: the actors spread themselves.
        name, ledger = start_ledger(settings["run"], whole_cluster=whole_cluster)
        settings = {**settings, "gpu_ledger": name}
    for pool in pools:
        ds = ds.map_batches(
            stages[pool.stage],
            fn_constructor_kwargs={"settings": settings},
            batch_size=pool.units_per_call,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=2),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus or None,
        )
    # This run's own context (not the process's): the driver's loop would poll on a core the
    # actors need, so it rests while it only polls.
    rest = idle_pause_callback()
    if rest is not None:
        ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, rest]
    units_left: dict[str, int] = {}
    committed: set[tuple[str, int]] = set()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for record, resources in zip(batch.column("entry").to_pylist(), batch.column("resources").to_pylist()):
                entry = commit_entry(record)
                keys = [(u["input_path"], u["unit_index"]) for u in entry["units"]]
                if any(k in committed for k in keys):
                    # The same work came back twice (a task of a lost node ran again after its first
                    # result had arrived): the first commit stands; these shards go at the end.
                    continue
                _check_shards(store, entry)
                for unit in entry["units"]:
                    if (versions or {}).get(unit["input_path"]):
                        unit["version"] = versions[unit["input_path"]]
                store.append(entry)  # the commit: from here on its shards are data
                committed.update(keys)
                for actor in held_resources(resources):
                    stage = actor.pop("stage")
                    if actor not in held.setdefault(stage, []):
                        held[stage].append(actor)
                for unit in entry["units"]:
                    done["frames"] += unit["frames"]
                    path = unit["input_path"]
                    left = units_left.setdefault(path, unit["unit_count"] - len(partial_units.get(path, [])))
                    units_left[path] = left - 1
                    if progress is not None:
                        progress.update(1 if units_left[path] == 0 else 0, unit["frames"])
    finally:
        if ledger is not None:
            stop_ledger(ledger)
    planned = zip(units.column("input_path").to_pylist(), units.column("unit_index").to_pylist())
    return sum(1 for key in planned if key not in committed)
