"""The preprocessing job: list, plan, annotate on Ray actors, commit shards, write the manifest."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from disco.pipeline.annotators import resolve_backends
from disco.pipeline.annotators.mediapipe_backend import MediaPipeEngine
from disco.pipeline.config import ConfigError, PreprocessConfig
from disco.pipeline.datasets import list_source
from disco.pipeline.filter import filter_section, filter_settings
from disco.pipeline.manifest import build_manifest, write_manifest
from disco.pipeline.schema import TRIPLET_SCHEMA
from disco.pipeline.stages import AnnotateStage, plan_units
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


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker output (MediaPipe's start-up chatter) stays in Ray's log files; failures still
    # surface as exceptions through Ray Data.
    common = dict(logging_level=logging.ERROR, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **common)


def stage_settings(cfg: PreprocessConfig) -> dict:
    """The plain-dict settings shipped to Ray tasks and actors."""
    keys = ("fps", "max_side", "min_side", "max_pixels", "image_format", "jpeg_quality", "pose_style",
            "hands", "min_visibility", "joint_threshold", "min_mask_area", "segment_frames")
    settings = {k: getattr(cfg, k) for k in keys}
    settings.update(matting=cfg.resolved["matting"], pose=cfg.resolved["pose"])
    settings.update(filter_settings(cfg))
    return settings


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
    cfg.resolved = resolve_backends(cfg.matting, cfg.pose)
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
    actors = cpus = 0
    interrupted = False
    try:
        if pending:
            import ray

            init_ray(cfg.ray_address)
            settings = stage_settings(cfg)
            units = plan_all(pending, settings, partial)
            total_cpus = float(ray.cluster_resources().get("CPU", 1))
            actors, cpus = actor_resources(cfg, total_cpus, len(units))
            frames_done = _run_ray(cfg, units, settings, partial, writer, actors, cpus, progress)
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
        "weights": MediaPipeEngine.weight_files(cfg.hands and cfg.resolved["pose"] != "none"),
    }
    run = {
        "wall_time_s": round(wall, 3),
        "frames_processed": frames_done,
        "frames_per_s": round(frames_done / wall, 3) if wall > 0 else None,
        "inputs_processed": len(pending),
        "actors": actors,
        "cpus_per_actor": cpus,
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


def _run_ray(cfg, units, settings, partial_units, writer, actors, cpus, progress) -> int:
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    # Importing Ray Data sets up its own loggers; keep its per-run notices off the console.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Small blocks, so a video's segments spread over the actors instead of queueing on one.
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), MAX_BLOCKS)))
    ds = ds.map_batches(
        AnnotateStage,
        fn_constructor_kwargs={"settings": settings},
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        num_cpus=cpus,
        num_gpus=cfg.gpus_per_actor or None,
    )
    collector = UnitCollector(writer)
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
