"""The pipeline's Ray Data actors (a stateful class per stage, its models loaded once in
``__init__``): on the CPU pipeline one ``AnnotateStage`` decodes, annotates, encodes and writes
each unit, so raw frames never cross the object store; on the GPU pipeline ``MattingStage`` and
``PoseStage`` are separate pools, each with its share of a GPU, and a matted unit travels between
them as one packed record (``PACKED_UNIT_SCHEMA``). The last stage writes its own shards and
hands the driver commit records (``UnitWriter``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from disco.pipeline.annotators.base import Matte
from disco.pipeline.annotators.registry import BackendError, load as load_backend
from disco.pipeline.annotators.weights import WeightsError
from disco.pipeline import strikes
from disco.pipeline.decode import LastVideo
from disco.pipeline.device_loss import DeviceLost, device_lost, restart
from disco.pipeline.errors import STOPS_THE_RUN, ConfigError, first_line, out_of_gpu_memory
from disco.pipeline.gpu_balance import balance_gpu, cap_gpu_memory, first_kernel, gpu_unusable
from disco.pipeline.stages import (
    MattedFrame,
    UnitResult,
    decode_unit,
    failed_result,
    finish_unit,
    matte_unit,
    process_unit,
)
from disco.pipeline.sources.units import unit_frames
from disco.pipeline.store.schema import (COMMIT_SCHEMA, PACKED_UNIT_SCHEMA, UNIT_TYPE, check_declared, commit_record,
                                         skipped_counts, skipped_records)
from disco.pipeline.store.output import OutputStore
from disco.pipeline.store.shards import ShardWriter


def pack_unit(unit: dict, frames: int, kept: list[MattedFrame], errors: list[dict], skipped: Counter,
              rejects: list[dict], resources: dict) -> dict:
    """One record carrying a matted unit from the matting actors to the pose actors
    (``PACKED_UNIT_SCHEMA``: typed fields, the planned unit a ``UNIT_TYPE`` struct)."""
    check_declared(unit, UNIT_TYPE, "the unit")
    return {
        "unit": unit,
        "frames": frames,
        "pictures": [k.picture.tobytes() for k in kept],
        "alphas": [k.matte.alpha.tobytes() for k in kept],
        "kept": [{"frame_index": k.index, "timestamp_s": k.timestamp, "shape": list(k.picture.shape),
                  "clip_id": k.unit["clip_id"], "person_score": k.matte.score, "person_count": k.matte.count,
                  "model": k.matte.model} for k in kept],
        "skipped": skipped_records(skipped),
        "errors": errors,
        "rejects": rejects,
        "resources": resource_records(resources),
    }


def matted_table(packed: list[dict]) -> pa.Table:
    """The matting stage's output: its call's packed units as one table (one block)."""
    return pa.Table.from_pylist(packed, schema=PACKED_UNIT_SCHEMA)


def resource_records(held: dict[str, dict]) -> list[dict]:
    """{stage: what its actor held} as ``RESOURCES_TYPE`` records."""
    return [{"stage": stage, **resources} for stage, resources in held.items()]


def held_resources(records: list[dict]) -> list[dict]:
    """``RESOURCES_TYPE`` records back as the dicts they were made of (nulls: fields not known)."""
    return [{k: v for k, v in record.items() if v is not None} for record in records]


def unpack_unit(record: dict) -> tuple[dict, int, list[MattedFrame], list[dict], Counter, list[dict], dict]:
    unit = dict(record["unit"])
    kept = []
    for meta, picture, alpha in zip(record["kept"], record["pictures"], record["alphas"]):
        shape = tuple(meta["shape"])
        frame = np.frombuffer(picture, np.uint8).reshape(shape)
        matte = Matte(alpha=np.frombuffer(alpha, np.uint8).reshape(shape[:2]), score=meta["person_score"],
                      count=meta["person_count"], model=meta["model"])
        kept.append(MattedFrame(meta["frame_index"], meta["timestamp_s"], frame, {**unit, "clip_id": meta["clip_id"]},
                                matte))
    skipped = Counter(skipped_counts(record["skipped"]))
    resources = {r.pop("stage"): r for r in held_resources(record["resources"])}
    return unit, record["frames"], kept, record["errors"], skipped, record["rejects"], resources


class UnitWriter:
    """The last stage's writer: each call's units go into shards that this actor writes straight
    into the output folder (shared storage on a cluster); the call returns one commit record per
    shard, and the driver, the journal's only writer, commits them. So the pictures never travel
    to the driver, and writing grows with the actors."""

    def __init__(self, settings: dict, stage: str, gpu_ids: list[str] | None = None):
        import secrets

        self.settings = settings
        self.held = [{"stage": stage, **_assigned_resources(gpu_ids)}]
        self._entries: list[dict] = []
        self._call: dict | None = None
        # A name part of its own per actor: a restarted actor or a resumed run never reuses a name.
        prefix = f"part-{settings['run']}-{secrets.token_hex(8)}-"
        self.writer = ShardWriter(OutputStore(Path(settings["output"])), prefix, settings["shard_rows"],
                                  settings["row_group_rows"], commit=self._entries.append)

    def start_call(self, units: list[dict]) -> Exception | None:
        """A call's units are written together, and its shards are written between their work: a
        process that died writing them (killed for memory as a shard is packed, stuck on a hung
        mount) is a strike against the call (``strikes.call_of``). Where the call has ``STRIKES``
        of them, the error its units' rows carry instead of running (and dying) again."""
        self._call = strikes.call_of(units)
        return strikes.given_up(self.settings, self._call, "write",
                                what=f"writing the shards of this unit's call ({len(units)} units)")

    def writing(self):
        """The window in which a death is a strike against this call (``start_call``)."""
        if self._call is None:  # (no call started: the benchmark's plain loop)
            return contextlib.nullcontext()
        return strikes.strike_window(self.settings, self._call, "write")

    def add(self, result: UnitResult) -> None:
        with self.writing():  # adding a unit writes a shard when it fills one
            self.writer.add_unit(result.rows, result.unit, result.errors, result.rejects)

    def commits(self, upstream: list[dict] = ()) -> pa.Table:
        """Flush what this call added; its commit records, with the resources that this actor and
        the upstream actors of its units held."""
        with self.writing():
            self.writer.flush()
        entries = list(self._entries)
        self._entries.clear()  # the writer appends to this very list
        resources = self.held + list(upstream)
        return pa.Table.from_pylist([{"entry": commit_record(e), "resources": resources} for e in entries],
                                    schema=COMMIT_SCHEMA)


def _assigned_resources(gpu_ids: list[str] | None = None) -> dict:
    """What Ray gave this actor; ``gpu_ids``: the GPUs it uses, where it moved (``gpu_balance``)."""
    import ray

    try:
        context = ray.get_runtime_context()
        assigned = context.get_assigned_resources()
        held = {k: round(float(v), 3) for k, v in assigned.items() if k in ("CPU", "GPU")}
        # Which actor on which node, and which GPUs: the manifest shows how the pools were placed.
        held.update(actor=context.get_actor_id(), node=context.get_node_id(),
                    gpu_ids=gpu_ids if gpu_ids is not None else [str(g) for g in ray.get_gpu_ids()])
        return held
    except Exception:  # outside a Ray worker (the benchmark's plain loop)
        return {}


class ActorCannotStart(ConfigError):
    """An actor cannot start on its node for a reason every actor there would meet: the run stops
    in one line (the message after ``STOPS_THE_RUN``) instead of Ray's traceback of the actor."""


class StorageNotShared(ActorCannotStart):
    """The run's input or output folder is missing on an actor's node."""


def check_storage(settings: dict, output: bool = True) -> None:
    """At an actor's start (and a planning task's, ``output=False``): the run's input and output
    must be on storage this node sees. A missing mount would otherwise turn every unit of this
    node into errors rows that a resume counts as done (its input), or fail on the first shard
    (its output). An empty input folder counts as missing: the driver listed inputs in it, and an
    unmounted mount point is an empty folder."""
    checks = [("input", settings.get("input_root")), ("output folder", settings.get("output") if output else None)]
    for what, path in checks:
        if not path:
            continue
        missing = not os.path.exists(path)
        empty = what == "input" and not missing and os.path.isdir(path) and _empty(path)
        if missing or empty:
            state = "does not exist" if missing else "is an empty folder (a mount point not mounted?)"
            raise StorageNotShared(
                f"{STOPS_THE_RUN} the {what} {path} {state} on node {socket.gethostname()}; the input and "
                "the output must be on storage every node sees (NFS, a shared mount), by the same path")


def _empty(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def unit_result(settings: dict, unit: dict, stage: str, work, failed=None):
    """``work()`` for one unit: the boundary that keeps one input from stopping a run. Whatever it
    raises becomes the unit's errors row (``failed(exc)``; default ``failed_result``), except a
    broken GPU: a restart of this actor (``device_loss``). A unit whose attempts ended their
    process too often (a broken GPU, a crash, a kill) is its row without running again
    (``strikes``); one that ended it once runs its frames apart, so that the frame that ended it
    again is the only one lost (``strikes.frames_apart``)."""
    if failed is None:
        failed = lambda exc: failed_result(unit, stage, exc)  # noqa: E731
    error = strikes.given_up(settings, unit, stage)
    if error is not None:
        return failed(error)
    attempt = strikes.begin(settings, unit, stage)
    try:
        with strikes.frames_apart(settings, unit, stage, int(unit_frames([unit])[0])):
            result = work()
    except DeviceLost as lost:
        restart(unit, stage, lost, attempt)
    except Exception as exc:  # noqa: BLE001 - see above
        if device_lost(exc):
            restart(unit, stage, DeviceLost(exc), attempt)
        result = failed(exc)
    strikes.end(attempt)
    return result


def _annotator(settings: dict, roles: tuple[str, ...]):
    import cv2

    from disco.pipeline.annotators import FrameAnnotator

    cv2.setNumThreads(1)  # one actor per core; OpenCV's own pool would fight the others
    try:
        return FrameAnnotator(
            settings["matting"], settings["pose"], settings["hands"], settings["min_visibility"],
            settings["min_mask_area"], settings["joint_threshold"], roles=roles,
            modules=settings.get("backend_modules"), **settings["backend_options"],
        )
    except WeightsError as exc:
        # The driver found the files; here they are missing (not on this node's storage) or do
        # not load (damaged, another model): every actor would fail the same way.
        raise ActorCannotStart(f"{STOPS_THE_RUN} {exc} (node {socket.gethostname()}, where the driver found the "
                               "files: every node must see the same --weights folder)") from None
    except BackendError as exc:
        # What this node lacks to run the backend (onnxruntime-gpu's CUDA provider, its libraries):
        # every actor here would fail the same way.
        raise ActorCannotStart(f"{STOPS_THE_RUN} {exc} (node {socket.gethostname()})") from None
    except Exception as exc:  # noqa: BLE001 - the GPU's memory, else re-raised
        if not out_of_gpu_memory(exc):
            raise
        # The models do not fit the actor's share of its GPU (half of one by default, capped:
        # gpu_balance.cap_gpu_memory): every actor of the stage would fail the same way, and Ray
        # Data ended the run on the first with the actor's traceback.
        raise ActorCannotStart(f"{STOPS_THE_RUN} the {'/'.join(roles)} models do not fit this actor's share of its "
                               f"GPU (node {socket.gethostname()}: {first_line(exc)}); give each actor more of a GPU "
                               "(--matting-gpus / --pose-gpus 1) or use a GPU with more memory") from None


def _start_gpu(settings: dict, stage: str) -> list[str]:
    """Before a GPU actor's models load: the GPU it uses (``balance_gpu``), its share of the
    device's memory (``cap_gpu_memory``) and a first kernel there. A GPU this process cannot use
    (exclusive-process compute mode with two actors a GPU, a PyTorch without kernels for it)
    stops the run in one line that names the node, the GPU and the remedy, instead of Ray's
    traceback of the actor's start, or an errors row for every frame."""
    gpu_ids = balance_gpu(settings.get("gpu_ledger"), stage)
    name = settings[stage]
    if not str(settings.get("backend_options", {}).get("device", "cpu")).startswith("cuda") or name in ("none", "auto"):
        return gpu_ids  # its models run on the CPU (--device cpu): no CUDA context to start
    try:
        # By the registry's record, importing the module that declares it where this process does
        # not know it yet (a backend declared in the driver's process, as ``_annotator`` builds it).
        model = load_backend(name, (settings.get("backend_modules") or {}).get(name))
    except BackendError:
        return gpu_ids  # ``_annotator`` says why, in one line
    if not model.gpu:
        return gpu_ids  # a CPU backend (MediaPipe): no CUDA context to start
    try:
        cap_gpu_memory()
        first_kernel()
    except RuntimeError as exc:
        why = gpu_unusable(exc)
        if why is None:
            raise
        raise ActorCannotStart(f"{STOPS_THE_RUN} the {stage} actor cannot use GPU {','.join(gpu_ids)} of node "
                               f"{socket.gethostname()}: {why}") from None
    return gpu_ids


class AnnotateStage:
    """Ray Data actor of the CPU pipeline: loads the annotators once, then decodes, annotates,
    encodes and writes its units, so frames and pictures never cross the object store."""

    def __init__(self, settings: dict):
        self.settings = settings
        check_storage(settings)
        self.annotator = _annotator(settings, ("matting", "pose"))
        self.out = UnitWriter(settings, "annotate")
        self.videos = LastVideo()

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.to_pylist()
        stopped = self.out.start_call(units)
        for unit in units:
            self.out.add(failed_result(unit, "write", stopped) if stopped is not None else unit_result(
                self.settings, unit, "encode", lambda: process_unit(unit, self.annotator, self.settings, self.videos)))
        return self.out.commits()


class MattingStage:
    """Ray Data actor of the GPU pipeline: decodes units and mattes their frames in batches."""

    def __init__(self, settings: dict):
        self.settings = settings
        check_storage(settings)
        gpu_ids = _start_gpu(settings, "matting")  # before any model loads
        self.annotator = _annotator(settings, ("matting",))
        self.resources = {"matting": _assigned_resources(gpu_ids)}
        self.videos = LastVideo()

    def __call__(self, batch: pa.Table) -> pa.Table:
        # One table, one block, per call (``pools.matting_units_per_call`` sizes the calls).
        units = batch.to_pylist()
        # The call's frames are copied once more into its table, the stage's peak of memory: a
        # process killed there (for memory) is a strike against the call, and after ``STRIKES``
        # its units are errors rows; before, Ray ran the call again for ever.
        call = strikes.call_of(units)
        stopped = strikes.given_up(self.settings, call, "matting", what=f"packing the matted frames of this unit's "
                                                                      f"call ({len(units)} units)")
        packed = []
        for unit in units:
            def failed(exc, unit=unit):  # the unit's errors row travels to the writing stage
                errors = failed_result(unit, "matting", exc).errors
                return pack_unit(unit, 0, [], errors, Counter(), [], self.resources)

            packed.append(failed(stopped) if stopped is not None else
                          unit_result(self.settings, unit, "matting", lambda: self._matte(unit), failed))
        # (open until the next call: Ray copies the table into the object store after this returns)
        with strikes.strike_window(self.settings, call, "matting", until_next=True):
            return matted_table(packed)

    def _matte(self, unit: dict) -> dict:
        frames, errors = decode_unit(unit, self.settings, self.videos)
        skipped: Counter = Counter()
        rejects: list[dict] = []
        kept = matte_unit(unit, frames, self.annotator, self.settings, errors, skipped, rejects)
        return pack_unit(unit, len(frames), kept, errors, skipped, rejects, self.resources)


class PoseStage:
    """Ray Data actor of the GPU pipeline: pose for the matted frames, encoding, and writing."""

    def __init__(self, settings: dict):
        self.settings = settings
        check_storage(settings)
        gpu_ids = _start_gpu(settings, "pose")  # before any model loads
        self.annotator = _annotator(settings, ("pose",))
        self.out = UnitWriter(settings, "pose", gpu_ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        upstream: list[dict] = []
        stopped = self.out.start_call(batch.column("unit").to_pylist())
        if stopped is not None:  # its frames are never unpacked again
            records = [(unit, 0, [], [], Counter(), [], {}) for unit in batch.column("unit").to_pylist()]
        else:
            with self.out.writing():  # unpacking copies the call's frames once more: a death there is the call's
                records = [unpack_unit(record) for record in batch.to_pylist()]
        for unit, frames, kept, errors, skipped, rejects, resources in records:
            for stage, held in resources.items():
                if {"stage": stage, **held} not in upstream:
                    upstream.append({"stage": stage, **held})
            self.out.add(failed_result(unit, "write", stopped) if stopped is not None else unit_result(
                self.settings, unit, "pose", lambda: finish_unit(
                    unit, kept, self.annotator, self.settings, frames=frames, errors=errors, skipped=skipped,
                    rejects=rejects)))
        return self.out.commits(upstream)
