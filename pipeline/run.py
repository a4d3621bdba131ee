"""The preprocessing job: list, plan, annotate on Ray actors, commit shards, write the manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from disco.pipeline.annotators import BackendError, gpu_backend, resolve_backends, weight_files
from disco.pipeline.annotators.registry import get as get_backend
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError
from disco.pipeline.datasets import list_source
from disco.pipeline.filter import filter_section, filter_settings
from disco.pipeline.manifest import RunResult, build_manifest, write_manifest
from disco.pipeline.stages import AnnotateStage, MattingStage, PoseStage, plan_units
from disco.pipeline.writer import OutputStore, run_token

# Quiet the MediaPipe / TFLite start-up chatter in every Ray worker.
WORKER_ENV = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
MAX_BLOCKS = 10_000
RESERVED_CPUS = 0.1
MIN_ACTOR_CPUS = 0.1
CONNECT_TIMEOUT_S = 60.0  # how long an unreachable --ray-address is tried ($DISCO_RAY_TIMEOUT)
CALLS_PER_ACTOR = 4  # the last stage's calls per actor at least, so commits come often enough


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             log=None) -> None:
    """Connect to the cluster at ``address`` (or ``$RAY_ADDRESS``, which ``ray job submit`` sets),
    or start a private local instance on loopback. Without an address a private instance is
    started even where ``ray start`` runs a cluster on this machine (said in one line): pass
    ``--ray-address auto`` to use that cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker output (MediaPipe's start-up chatter) stays in Ray's log files; failures still
    # surface as exceptions through Ray Data.
    common = dict(logging_level=logging.ERROR, log_to_driver=False, runtime_env=_runtime_env())
    if address:
        _wait_until_reachable(address, _connect_timeout())
        # A cluster on this machine's loopback (as tests start them): stay on loopback, or Ray
        # dials the interface address instead, where nothing listens.
        host = _host_port(address)[0]
        with loopback_only() if host in ("127.0.0.1", "localhost") else contextlib.nullcontext():
            ray.init(address=address, **common)
        return
    running = _cluster_on_this_machine()
    if running and log is not None:
        log(f"this machine runs a Ray cluster ({running}); starting a private instance anyway: pass "
            "--ray-address auto to run on that cluster")
    with loopback_only(), _free_agent_port():
        # "local": a new instance, never one that `ray start` left in /tmp/ray/ray_current_cluster.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus,
                 include_dashboard=False, _node_ip_address="127.0.0.1", **common)


def _connect_timeout() -> float:
    raw = os.environ.get("DISCO_RAY_TIMEOUT", "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"DISCO_RAY_TIMEOUT={raw!r}: give the seconds to wait for a cluster, a number >= 0")
    return value


class ClusterUnreachable(ConfigError):
    """--ray-address names a cluster that does not answer."""


def _runtime_env() -> dict:
    """Our worker settings, minus any variable a job's own runtime env sets: Ray refuses to merge
    a job's runtime env (``ray job submit --runtime-env-json``) with a driver's that names the same
    variable, and the user's choice wins."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    env = {k: v for k, v in WORKER_ENV.items() if k not in taken}
    return {"env_vars": env} if env else {}


def _host_port(address: str) -> tuple[str, int | None]:
    rest = address.split("://")[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, None
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return rest, None


def _wait_until_reachable(address: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds, in one line, when nothing answers at the cluster's address
    (``ray.init`` itself would wait forever)."""
    import socket

    if address in ("auto", "local"):
        return
    host, port = _host_port(address)
    if port is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, timeout))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address} ({exc.strerror or exc}) after {timeout:g} s; check the "
                    "address (the head's `ray start` prints it) and that the head is running"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _cluster_on_this_machine() -> str | None:
    """The address `ray start` recorded here, if its cluster is still up."""
    try:
        recorded = open("/tmp/ray/ray_current_cluster", encoding="utf-8").read().strip()
    except OSError:
        return None
    try:
        _wait_until_reachable(recorded, 0.0)
    except ClusterUnreachable:
        return None
    return recorded


@contextlib.contextmanager
def loopback_only():
    """Within the block, Ray starts its processes on 127.0.0.1 (a private instance must not be
    reachable from the network: Ray has no authentication by default).

    Why a switch and not just ``_node_ip_address="127.0.0.1"``: on Linux Ray rewrites a loopback
    node address to the machine's interface address (``services.resolve_ip_for_localhost``) unless
    its multi-node support is off, which is exactly the switch that macOS and Windows use to keep
    a local instance on loopback."""
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The processes started meanwhile (GCS, raylet, and through it workers and agents) read the
    # same switch from their environment when they connect.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[0]
        if previous[1] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = previous[1]


@contextlib.contextmanager
def _free_agent_port():
    """Within the block, a Ray instance started here gives its dashboard agent a free port.

    Why: Ray gives every instance's agent the fixed port 52365, and ``ray.init`` has no option for
    it. A private instance holding it leaves a cluster that ``ray start --head`` starts later on
    this machine without a job agent: ``ray job submit`` then answers "No available agent" for
    ever. Where Ray's internals differ from what this expects, the default stays."""
    try:
        from ray._private.parameter import RayParams
    except ImportError:
        yield
        return
    original = RayParams.__init__
    port = _free_port()

    def with_free_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    RayParams.__init__ = with_free_port
    try:
        yield
    finally:
        RayParams.__init__ = original


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage_settings(cfg: PreprocessConfig) -> dict:
    """The plain-dict settings shipped to Ray tasks and actors."""
    keys = ("fps", "max_side", "min_side", "max_pixels", "image_format", "jpeg_quality", "pose_style",
            "hands", "min_visibility", "joint_threshold", "min_mask_area", "segment_frames", "shard_rows",
            "row_group_rows")
    settings = {k: getattr(cfg, k) for k in keys}
    settings.update(matting=cfg.resolved["matting"], pose=cfg.resolved["pose"],
                    backend_options=backend_options(cfg),
                    # Where each backend is declared: an actor imports a backend it does not know.
                    backend_modules={name: get_backend(name).module
                                     for name in (cfg.resolved["matting"], cfg.resolved["pose"]) if name != "none"},
                    # The writing actors put shards straight into the output: an absolute path on
                    # storage that every node sees, and a name part of this run's own.
                    output=str(Path(cfg.output).resolve()), run=run_token())
    settings.update(filter_settings(cfg))
    return settings


def backend_options(cfg: PreprocessConfig) -> dict:
    """What the paper-faithful backends are built with, inside each actor."""
    return {
        "weights": cfg.resolved.get("weights"), "device": cfg.resolved.get("device", "cpu"),
        "sam_model": cfg.sam_model, "box_threshold": cfg.box_threshold, "text_threshold": cfg.text_threshold,
        "largest_person": cfg.largest_person, "face": cfg.face, "half": cfg.half, "batch_size": cfg.batch_size,
    }


def uses_gpu_pipeline(resolved: dict) -> bool:
    return gpu_backend(resolved["matting"]) or gpu_backend(resolved["pose"])


@dataclass
class PoolPlan:
    """One actor pool of the pipeline: how many actors, what each holds, units per call."""

    stage: str
    actors: int
    cpus: float
    gpus: float
    units_per_call: int = 1

    def to_dict(self) -> dict:
        return {"stage": self.stage, "actors": self.actors, "cpus_per_actor": self.cpus, "gpus_per_actor": self.gpus,
                "units_per_call": self.units_per_call}


def cluster_nodes() -> list[dict]:
    """The CPUs and GPUs of each live node of the connected Ray cluster."""
    import ray

    return [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]


def plan_pools(cfg: PreprocessConfig, nodes: list[dict], units: list[dict]) -> list[PoolPlan]:
    """The actor pools for this cluster and these units. The last pool writes the shards, so its
    units per call are sized to fill a shard without leaving an actor idle."""
    if uses_gpu_pipeline(cfg.resolved):
        pools = gpu_pools(cfg, nodes, len(units))
    else:
        actors, cpus = actor_resources(cfg, nodes, len(units))
        pools = [PoolPlan("annotate", actors, cpus, cfg.gpus_per_actor)]
    pools[-1].units_per_call = units_per_call(units, cfg.shard_rows, pools[-1].actors)
    return pools


def units_per_call(units: list[dict], shard_rows: int, actors: int) -> int:
    """Units per call of the writing stage: about a shard's rows, but at least CALLS_PER_ACTOR
    calls per actor, so every actor has work and commits come often."""
    if not units:
        return 1
    rows_per_unit = sum(len(u.get("src_indices") or ()) or 1 for u in units) / len(units)
    fill = math.ceil(shard_rows / max(1.0, rows_per_unit))
    spread = math.ceil(len(units) / (max(1, actors) * CALLS_PER_ACTOR))
    return max(1, min(fill, spread))


def _per_node_cpus(nodes: list[dict], actors_on: list[int]) -> float:
    """CPUs per actor such that each node's actors fit beside a little room for Ray Data's own
    tasks (rounded down: rounding up would take that room back)."""
    shares = [(n["CPU"] - RESERVED_CPUS) / k for n, k in zip(nodes, actors_on) if k > 0]
    share = min(1.0, min(shares, default=1.0))
    return max(MIN_ACTOR_CPUS, math.floor(share * 100 + 1e-6) / 100)


def _sets_on(node: dict, wants: dict[str, float]) -> int:
    """Matting + pose sets (one actor of each stage) that one node holds: GPU shares packed device
    by device as Ray places them (a share below 1 inside one GPU, a whole number of GPUs
    otherwise), and at least MIN_ACTOR_CPUS for every actor beside the reserved room."""
    free = [1.0] * int(node["GPU"] + 1e-9)
    by_cpu = int((node["CPU"] - RESERVED_CPUS) / (len(wants) * MIN_ACTOR_CPUS) + 1e-9)
    sets = 0
    while sets < by_cpu:
        trial = list(free)
        for share in wants.values():
            if share <= 0:
                continue
            if share < 1:
                k = next((i for i, f in enumerate(trial) if f >= share - 1e-9), None)
                if k is None:
                    return sets
                trial[k] -= share
            else:
                whole = [i for i, f in enumerate(trial) if f >= 1 - 1e-9][:int(share)]
                if len(whole) < share:
                    return sets
                for i in whole:
                    trial[i] = 0.0
        free = trial
        sets += 1
    return sets


def gpu_pools(cfg: PreprocessConfig, nodes: list[dict], units: int) -> list[PoolPlan]:
    """The GPU pipeline's two pools: on every GPU one matting and one pose actor at half a GPU
    each (by default), so a node with N GPUs holds N of each. On ``--device cpu`` the models take
    no GPU unless ``--matting-gpus`` / ``--pose-gpus`` ask; then the same rule places them."""
    on_gpu = cfg.resolved["device"] == "cuda"
    wants = {
        "matting": cfg.matting_gpus if cfg.matting_gpus is not None else (0.5 if on_gpu else 0.0),
        "pose": cfg.pose_gpus if cfg.pose_gpus is not None else (
            0.5 if on_gpu and gpu_backend(cfg.resolved["pose"]) else 0.0),
    }
    per_set = sum(wants.values())
    if cfg.actors:
        sets = cfg.actors
        sets_on = _spread(cfg.actors, [n["CPU"] for n in nodes])
    elif per_set > 0:
        # A "set" is one actor of each stage; each node holds as many sets as its GPUs fit.
        sets_on = [_sets_on(n, wants) for n in nodes]
        sets = sum(sets_on)
        if sets == 0:
            largest = max((n["GPU"] for n in nodes), default=0)
            raise ConfigError(
                f"a matting actor ({wants['matting']:g} GPU) and a pose actor ({wants['pose']:g} GPU) do not fit on any "
                f"node of this cluster (the largest has {largest:g} GPU); lower --matting-gpus / --pose-gpus, or set "
                "--actors to ask for actors that an autoscaler will bring nodes for")
    else:
        sets_on = _spread(1, [n["CPU"] for n in nodes])
        sets = 1
    counts = {stage: max(1, min(sets, units)) for stage in wants}
    cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else _per_node_cpus(nodes, [2 * k for k in sets_on])
    return [PoolPlan(stage, counts[stage], cpus, wants[stage]) for stage in ("matting", "pose")]


def _spread(actors: int, cpus: list[float]) -> list[int]:
    """How ``actors`` spread over nodes by their CPUs (for the CPU share only; Ray places them)."""
    total = sum(cpus) or 1.0
    return [max(0, math.ceil(actors * c / total)) for c in cpus]


def actor_resources(cfg: PreprocessConfig, nodes: list[dict], units: int) -> tuple[int, float]:
    """The CPU pipeline: one actor per CPU of every node, each a little under a CPU, since 2 actors
    x 1 CPU on a 2-CPU node starve Ray Data's own tasks."""
    per_node = [int(n["CPU"]) for n in nodes]
    actors = cfg.actors or max(1, sum(per_node))
    actors = max(1, min(actors, units))
    if cfg.cpus_per_actor is not None:
        return actors, cfg.cpus_per_actor
    on = per_node if not cfg.actors else _spread(cfg.actors, [n["CPU"] for n in nodes])
    return actors, _per_node_cpus(nodes, on)


def preprocess(cfg: PreprocessConfig, progress=None, log=print) -> RunResult:
    """Run the job. ``progress``, if given, has ``start(total_inputs)`` and ``update(inputs, frames)``."""
    cfg.validate()
    cluster_cuda = None
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        import ray

        # On a cluster the GPUs are the workers'; the driver (often a CPU head node) may have none.
        init_ray(cfg.ray_address, log=log)
        cluster_cuda = ray.cluster_resources().get("GPU", 0) > 0
    try:
        cfg.resolved = resolve_backends(cfg.matting, cfg.pose, weights=cfg.weights, device=cfg.device,
                                        cuda=cluster_cuda, sam_model=cfg.sam_model, hands=cfg.hands, face=cfg.face)
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    log(f"backends: matting={cfg.resolved['matting']} pose={cfg.resolved['pose']} ({cfg.resolved['reason']})")
    store = OutputStore(cfg.output)
    with store.locked():
        return _preprocess_locked(cfg, store, progress, log)


def _preprocess_locked(cfg: PreprocessConfig, store: OutputStore, progress, log) -> RunResult:
    state, removed = store.begin(cfg.output_params(), cfg.overwrite)
    if removed:
        log(f"recovered from an interrupted run: removed {len(removed)} uncommitted file(s)")

    listing = list_source(cfg, log)
    listed = [i.input_path for i in listing.items]
    if not listed:
        log(f"no {cfg.source} inputs found under {cfg.input}")
    complete = state.complete_inputs()
    pending = [i for i in listing.items if i.input_path not in complete]
    if progress is not None:
        progress.start(len(pending))
    partial = state.partial_units()
    if complete or partial:
        units = sum(len(v) for v in partial.values())
        log(f"resuming: {len(listed) - len(pending)} of {len(listed)} inputs already committed, "
            f"and {units} unit(s) of {len(partial)} partly done input(s)")

    started = time.time()
    frames_done = 0
    pools: list[PoolPlan] = []
    held: dict[str, list[dict]] = {}
    missing = 0
    interrupted = False
    try:
        if pending:
            init_ray(cfg.ray_address, log=log)
            settings = stage_settings(cfg)
            units = plan_all(pending, settings, partial)
            pools = plan_pools(cfg, cluster_nodes(), units)
            frames_done, missing = _run_ray(units, settings, partial, store, pools, progress, held)
            if missing:
                log(f"{missing} unit(s) of work never came back committed; re-run the same command to finish them")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: what the actors committed is kept")
    wall = time.time() - started
    if not interrupted:
        # Shards that a lost actor wrote but never got committed (its task ran again elsewhere):
        # every writer is done now, so anything the journal does not name can go.
        orphans = store.recover(store.read_journal())
        if orphans:
            log(f"removed {len(orphans)} shard(s) written by lost actors and never committed")

    final_state = store.read_journal()
    backends = {
        "matting": {"name": cfg.resolved["matting"]},
        "pose": {"name": cfg.resolved["pose"]},
        "reason": cfg.resolved["reason"],
        "cuda": cfg.resolved["cuda"],
        "device": cfg.resolved["device"],
        "weights_dir": cfg.resolved["weights"],
        "weights": weight_files(cfg.resolved, {"hands": cfg.hands, "face": cfg.face, "sam_model": cfg.sam_model}),
    }
    run = {
        "wall_time_s": round(wall, 3),
        "frames_processed": frames_done,
        "frames_per_s": round(frames_done / wall, 3) if wall > 0 else None,
        "inputs_processed": len(pending),
        "pools": [p.to_dict() for p in pools],
        # What Ray actually gave the actors that did the work: one entry per actor and stage.
        "stage_resources": held,
        "ray_address": cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local",
        "interrupted": interrupted,
    }
    config = {k: v for k, v in cfg.to_dict().items() if k != "resolved"}
    manifest = build_manifest(config=config, backends=backends, state=final_state, listed=listed,
                              ignored=listing.ignored, run=run)
    manifest.update(dataset_section(cfg, listing, final_state))
    write_manifest(store.manifest, manifest)
    counts = manifest["counts"]
    if interrupted:
        code = 130
    elif counts["inputs"] == 0 or counts["inputs_failed"] == counts["inputs"] or missing:
        code = 1
    else:
        code = 0
    return RunResult(manifest=manifest, exit_code=code, removed_on_recovery=removed)


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


def plan_all(pending, settings: dict, partial_units: dict[str, list[int]], threads: int = 8) -> list[dict]:
    """Cut every pending input into units. Reading a video's header is cheap and mostly I/O, so
    the driver probes videos on a few threads; stills need no probe."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        planned = pool.map(lambda item: plan_units(item.to_dict(), settings, partial_units), pending)
        return [unit for units in planned for unit in units]


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


def _run_ray(units, settings, partial_units, store: OutputStore, pools: list[PoolPlan], progress,
             held: dict[str, list[dict]]) -> tuple[int, int]:
    """Stream the units through the pools. The last pool's actors write the shards; what reaches
    the driver is one small commit record per shard, appended to the journal as it arrives.
    Returns the frames committed and the number of units that never were."""
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    from disco.pipeline.ray_idle import idle_pause_callback

    # Importing Ray Data sets up its own loggers; keep its per-run notices off the console.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Small blocks, so a video's segments spread over the actors instead of queueing on one.
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), MAX_BLOCKS)))
    stages = {"annotate": AnnotateStage, "matting": MattingStage, "pose": PoseStage}
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
    frames = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for entry_json, resources in zip(batch.column("entry").to_pylist(), batch.column("resources").to_pylist()):
            entry = json.loads(entry_json)
            keys = [(u["input_path"], u["unit_index"]) for u in entry["units"]]
            if any(k in committed for k in keys):
                # The same work came back twice (a task of a lost node ran again after its first
                # result had arrived): the first commit stands; these shards go at the end.
                continue
            _check_shards(store, entry)
            store.append(entry)  # the commit: from here on its shards are data
            committed.update(keys)
            for actor in json.loads(resources):
                stage = actor.pop("stage")
                if actor not in held.setdefault(stage, []):
                    held[stage].append(actor)
            for unit in entry["units"]:
                frames += unit["frames"]
                path = unit["input_path"]
                left = units_left.setdefault(path, unit["unit_count"] - len(partial_units.get(path, [])))
                units_left[path] = left - 1
                if progress is not None:
                    progress.update(1 if units_left[path] == 0 else 0, unit["frames"])
    return frames, len({(u["input_path"], u["unit_index"]) for u in units} - committed)
