"""The preprocessing job: list, plan, annotate on Ray actors, commit shards, write the manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from disco.pipeline.annotators import GPU_BACKENDS, BackendError, resolve_backends, weight_files
from disco.pipeline.config import ConfigError, PreprocessConfig
from disco.pipeline.datasets import list_source
from disco.pipeline.filter import filter_section, filter_settings
from disco.pipeline.manifest import build_manifest, write_manifest
from disco.pipeline.schema import TRIPLET_SCHEMA
from disco.pipeline.stages import AnnotateStage, MattingStage, PoseStage, plan_units
from disco.pipeline.writer import OutputStore, ShardWriter

# Quiet the MediaPipe / TFLite start-up chatter in every Ray worker.
WORKER_ENV = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
MAX_BLOCKS = 10_000
RESERVED_CPUS = 0.1


@dataclass
class RunResult:
    manifest: dict
    exit_code: int
    removed_on_recovery: list[str] = field(default_factory=list)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker output (MediaPipe's start-up chatter) stays in Ray's log files; failures still
    # surface as exceptions through Ray Data.
    common = dict(logging_level=logging.ERROR, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    if address:
        # A cluster on this machine's loopback (as tests start them): stay on loopback, or Ray
        # dials the interface address instead, where nothing listens.
        host = address.split("://")[-1].rsplit(":", 1)[0]
        with loopback_only() if host in ("127.0.0.1", "localhost") else contextlib.nullcontext():
            ray.init(address=address, **common)
    else:
        with loopback_only():
            # "local": a new instance, never one that `ray start` left in /tmp/ray/ray_current_cluster.
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus,
                     include_dashboard=False, _node_ip_address="127.0.0.1", **common)


@contextlib.contextmanager
def loopback_only():
    """Within the block, Ray starts its processes on 127.0.0.1 (a private instance must not be
    reachable from the network: Ray has no authentication by default).

    Why a switch and not just ``_node_ip_address="127.0.0.1"``: on Linux Ray rewrites a loopback
    node address to the machine's interface address (``services.resolve_ip_for_localhost``) unless
    its multi-node support is off, which is exactly the switch that macOS and Windows use to keep
    a local instance on loopback."""
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def stage_settings(cfg: PreprocessConfig) -> dict:
    """The plain-dict settings shipped to Ray tasks and actors."""
    keys = ("fps", "max_side", "min_side", "max_pixels", "image_format", "jpeg_quality", "pose_style",
            "hands", "min_visibility", "joint_threshold", "min_mask_area", "segment_frames")
    settings = {k: getattr(cfg, k) for k in keys}
    settings.update(matting=cfg.resolved["matting"], pose=cfg.resolved["pose"],
                    backend_options=backend_options(cfg))
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
    return resolved["matting"] in GPU_BACKENDS or resolved["pose"] in GPU_BACKENDS


@dataclass
class PoolPlan:
    """One actor pool of the pipeline: how many actors and what each holds."""

    stage: str
    actors: int
    cpus: float
    gpus: float

    def to_dict(self) -> dict:
        return {"stage": self.stage, "actors": self.actors, "cpus_per_actor": self.cpus, "gpus_per_actor": self.gpus}


def gpu_pools(cfg: PreprocessConfig, total_cpus: float, total_gpus: float, units: int) -> list[PoolPlan]:
    """The GPU pipeline's two pools. By default each model actor takes half a GPU, so a matting
    and a pose actor share each GPU; on ``--device cpu`` they take none unless asked."""
    on_gpu = cfg.resolved["device"] == "cuda"
    wants = {
        "matting": cfg.matting_gpus if cfg.matting_gpus is not None else (0.5 if on_gpu else 0.0),
        "pose": cfg.pose_gpus if cfg.pose_gpus is not None else (
            0.5 if on_gpu and cfg.resolved["pose"] in GPU_BACKENDS else 0.0),
    }
    counts = {}
    for stage, gpus in wants.items():
        if cfg.actors:
            counts[stage] = cfg.actors
        elif gpus > 0:
            counts[stage] = max(1, int(total_gpus // gpus)) if total_gpus >= gpus else 1
        else:
            counts[stage] = 1
        counts[stage] = max(1, min(counts[stage], units))
    cpus = cfg.cpus_per_actor
    if cpus is None:
        cpus = round(min(1.0, max(0.1, (total_cpus - RESERVED_CPUS) / sum(counts.values()))), 2)
    return [PoolPlan(stage, counts[stage], cpus, wants[stage]) for stage in ("matting", "pose")]


def actor_resources(cfg: PreprocessConfig, total_cpus: float, units: int) -> tuple[int, float]:
    """Actor count and CPUs per actor. A little CPU is left free: 2 actors x 1 CPU on a 2-CPU node
    starve Ray Data's own tasks."""
    actors = cfg.actors or max(1, int(total_cpus))
    actors = max(1, min(actors, units))
    cpus = cfg.cpus_per_actor
    if cpus is None:
        cpus = round(min(1.0, max(0.1, (total_cpus - RESERVED_CPUS) / actors)), 2)
    return actors, cpus


class UnitCollector:
    """Reassembles each unit's rows and its closing record from the stream of Ray blocks."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self._rows: dict[tuple[str, int], list[pa.Table]] = defaultdict(list)
        self._done: dict[tuple[str, int], dict] = {}
        self.resources: dict[str, list[dict]] = {}

    def consume(self, block: pa.Table) -> list[dict]:
        """Take one block; returns the unit records that became complete."""
        kinds = block.column("_kind")
        rows = block.filter(pc.equal(kinds, "row"))
        if rows.num_rows:
            keys = list(zip(rows.column("input_path").to_pylist(), rows.column("_unit_index").to_pylist()))
            for key in dict.fromkeys(keys):
                mask = pc.and_(pc.equal(rows.column("input_path"), key[0]), pc.equal(rows.column("_unit_index"), key[1]))
                self._rows[key].append(rows.filter(mask).select(TRIPLET_SCHEMA.names))
        finished = []
        for record in block.filter(pc.equal(kinds, "done")).to_pylist():
            self._done[(record["input_path"], record["_unit_index"])] = record
            for stage, held in json.loads(record.get("_resources") or "{}").items():
                if held not in self.resources.setdefault(stage, []):
                    self.resources[stage].append(held)
        for key, record in list(self._done.items()):
            parts = self._rows.get(key, [])
            if sum(t.num_rows for t in parts) != record["_unit_rows"]:
                continue  # its rows are still on their way in another block
            errors = json.loads(record["_errors"])
            unit = {
                "input_path": key[0], "unit_index": key[1], "unit_count": record["_unit_count"],
                "frames": record["_frames"], "rows": record["_unit_rows"],
                "skipped": json.loads(record["_skipped"]), "errors": len(errors),
            }
            table = pa.concat_tables(parts) if parts else TRIPLET_SCHEMA.empty_table()
            self.writer.add_unit(table, unit, errors, json.loads(record.get("_rejects") or "[]"))
            del self._done[key]
            self._rows.pop(key, None)
            finished.append(unit)
        return finished


def preprocess(cfg: PreprocessConfig, progress=None, log=print) -> RunResult:
    """Run the job. ``progress``, if given, has ``start(total_inputs)`` and ``update(inputs, frames)``."""
    cfg.validate()
    cluster_cuda = None
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        import ray

        # On a cluster the GPUs are the workers'; the driver (often a CPU head node) may have none.
        init_ray(cfg.ray_address)
        cluster_cuda = ray.cluster_resources().get("GPU", 0) > 0
    try:
        cfg.resolved = resolve_backends(cfg.matting, cfg.pose, weights=cfg.weights, device=cfg.device,
                                        cuda=cluster_cuda, sam_model=cfg.sam_model, hands=cfg.hands, face=cfg.face)
    except BackendError as exc:
        raise ConfigError(str(exc)) from None
    log(f"backends: matting={cfg.resolved['matting']} pose={cfg.resolved['pose']} ({cfg.resolved['reason']})")
    store = OutputStore(cfg.output)
    if cfg.overwrite:
        store.clear()
    store.prepare()
    state = store.read_journal()
    params = cfg.output_params()
    if state.params is not None and state.params != params:
        changed = sorted(k for k in set(params) | set(state.params) if params.get(k) != state.params.get(k))
        raise ConfigError(
            f"{cfg.output} was written with different options ({', '.join(changed)}); "
            "re-run with the same options to resume, or pass --overwrite to start fresh"
        )
    state.params = params
    removed = store.recover(state)
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

    writer = ShardWriter(store, store.next_shard_index(state), cfg.shard_rows, cfg.row_group_rows)
    started = time.time()
    frames_done = 0
    pools: list[PoolPlan] = []
    collector = None
    interrupted = False
    try:
        if pending:
            import ray

            init_ray(cfg.ray_address)
            settings = stage_settings(cfg)
            units = plan_all(pending, settings, partial)
            resources = ray.cluster_resources()
            total_cpus = float(resources.get("CPU", 1))
            if uses_gpu_pipeline(cfg.resolved):
                pools = gpu_pools(cfg, total_cpus, float(resources.get("GPU", 0)), len(units))
            else:
                actors, cpus = actor_resources(cfg, total_cpus, len(units))
                pools = [PoolPlan("annotate", actors, cpus, cfg.gpus_per_actor)]
            collector = UnitCollector(writer)
            frames_done = _run_ray(units, settings, partial, collector, pools, progress)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: committing finished work")
    finally:
        writer.flush()
    wall = time.time() - started

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
        # What Ray actually gave the actors that did the work, per stage.
        "stage_resources": collector.resources if collector is not None else {},
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
    elif counts["inputs"] == 0 or counts["inputs_failed"] == counts["inputs"]:
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


def _run_ray(units, settings, partial_units, collector, pools: list[PoolPlan], progress) -> int:
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

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
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=2),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus or None,
        )
    units_left: dict[str, int] = {}
    frames = 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for unit in collector.consume(block):
            frames += unit["frames"]
            path = unit["input_path"]
            left = units_left.setdefault(path, unit["unit_count"] - len(partial_units.get(path, [])))
            units_left[path] = left - 1
            if progress is not None:
                progress.update(1 if units_left[path] == 0 else 0, unit["frames"])
    return frames
