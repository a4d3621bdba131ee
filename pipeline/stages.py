"""The pipeline's stages: planning units of work, and annotating them inside Ray actors.

A unit is a still image or a segment of a video. On the CPU pipeline decoding, both annotators
and encoding run fused in the actor that owns the unit, so raw frames never cross the object
store. On the GPU pipeline matting and pose are separate actor pools, each with its share of a
GPU; a matted unit travels between them as one packed record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from disco.pipeline.sources import units as dataset_units
from disco.pipeline.decode import (
    Frame,
    check_size,
    decode_video_frames,
    load_image,
    probe_video,
    target_size,
)
from disco.pipeline.annotators import Annotation
from disco.pipeline.annotators.base import Matte
from disco.pipeline.store.encode import build_row
from disco.pipeline.errors import error_record, failed_unit, input_error
from disco.pipeline.filter import reject_reason, reject_record
from disco.pipeline.store.schema import (COMMIT_SCHEMA, PACKED_UNIT_SCHEMA, TRIPLET_SCHEMA, UNIT_FIELDS, commit_record,
                                         sample_id, skipped_counts, skipped_records)
from disco.pipeline.sources.generic import local_path
from disco.pipeline.store.writer import OutputStore, ShardWriter


def plan_units(item: dict, settings: dict, done_units: dict[str, list[int]] | None = None) -> list[dict]:
    """Split one listed input into units; a video is probed here and cut into segments."""
    # Every unit carries every key with a stable type, so Ray's blocks share one schema.
    base = {**item, "error_stage": "list" if item.get("error_type") else None, "unit_index": 0,
            "unit_count": 1, "src_indices": [], "frame_start": 0, "width": 0, "height": 0}
    if item.get("error_type"):
        return [base]
    if item["kind"] == "image":
        return [base]
    if item["kind"] in dataset_units.KINDS:
        return dataset_units.plan_units(base, settings, set((done_units or {}).get(item["input_path"], ())))
    try:
        info = probe_video(local_path(item))
        check_size(info.width, info.height, settings["min_side"], settings["max_pixels"])
    except Exception as exc:  # noqa: BLE001 - any failure of this input is its errors row
        return [failed_unit(base, input_error("decode", exc))]
    indices = info.resample(settings["fps"])
    width, height = target_size(info.width, info.height, settings["max_side"])
    step = settings["segment_frames"]
    count = (len(indices) + step - 1) // step
    skip = set((done_units or {}).get(item["input_path"], ()))
    return [
        {**base, "unit_index": k, "unit_count": count, "src_indices": indices[k * step:(k + 1) * step],
         "frame_start": k * step, "width": width, "height": height}
        for k in range(count)
        if k not in skip
    ]


class MattedFrame(NamedTuple):
    """A frame that holds a person, with its matte: what the pose stage and the encoder take."""

    index: int
    timestamp: float | None
    picture: np.ndarray
    unit: dict
    matte: Matte


def decode_unit(unit: dict, settings: dict) -> tuple[list[Frame], list[dict]]:
    """The unit's frames, and the errors met decoding them. A frame carries the unit its row
    belongs to: a tar member has its own clip_id."""
    path = unit["input_path"]
    if unit.get("error_type"):
        return [], [error_record(unit.get("error_stage") or "list", unit["error_type"], unit["error_message"], path)]
    errors: list[dict] = []
    try:
        if unit["kind"] == "image":
            image = load_image(local_path(unit), settings["max_side"], settings["min_side"], settings["max_pixels"])
            return [Frame(0, None, image, unit)], errors
        if unit["kind"] in dataset_units.KINDS:
            return dataset_units.decode_unit(unit, settings, errors), errors
        decoded, times = decode_video_frames(
            local_path(unit), list(unit["src_indices"]), int(unit["width"]), int(unit["height"])
        )
        return [Frame(int(unit["frame_start"]) + i, times[i], decoded[i], unit) for i in range(len(decoded))], errors
    except Exception as exc:  # noqa: BLE001 - any failure of this input is its errors row
        exc = input_error("decode", exc)
        return [], errors + [error_record(exc.stage, exc.error_type, exc.message, path)]


def matte_unit(unit: dict, frames: list[Frame], annotator, settings: dict, errors: list[dict], skipped: Counter,
               rejects: list[dict]) -> list[MattedFrame]:
    """Matting over the unit's frames (batched where the backend can). Returns the frames that hold
    a person, with their mattes; the others are counted by reason."""
    annotator.begin_unit(unit)
    try:
        mattes = annotator.matte_batch([f.picture for f in frames])
    except Exception:  # one bad frame must not sink the others: go again one at a time
        mattes = []
        for frame_index, _, frame, row_unit in frames:
            try:
                mattes.append(annotator.matte_batch([frame])[0])
            except Exception as exc:
                sid = sample_id(row_unit["source"], row_unit["clip_id"], frame_index)
                errors.append(error_record("matting", type(exc).__name__, str(exc), unit["input_path"], sid))
                mattes.append(None)
    kept = []
    for (frame_index, timestamp, frame, row_unit), matte in zip(frames, mattes):
        if matte is None:
            continue
        annotation = Annotation(matte=matte, pose=None, present=annotator.present(matte))
        reason = reject_reason(annotation, settings, annotator.min_score)
        if reason:
            skipped[reason] += 1
            if settings.get("keep_rejects"):
                rejects.append(reject_record(row_unit, frame_index, timestamp, frame, annotation, reason))
            continue
        kept.append(MattedFrame(frame_index, timestamp, frame, row_unit, matte))
    return kept


@dataclass
class UnitResult:
    """One unit of work, finished: its triplet rows, its journal record, its errors and rejects."""

    rows: pa.Table
    unit: dict
    errors: list[dict]
    rejects: list[dict]


def finish_unit(unit: dict, kept: list[MattedFrame], annotator, settings: dict, *, frames: int, errors: list[dict],
                skipped: Counter, rejects: list[dict]) -> UnitResult:
    """Pose and encoding for the frames that hold a person."""
    annotator.begin_unit(unit, resume=True)  # right after its matting (CPU pipeline): results kept
    rows: list[dict] = []
    path = unit["input_path"]
    for frame_index, timestamp, frame, row_unit, matte in kept:
        sid = sample_id(row_unit["source"], row_unit["clip_id"], frame_index)
        try:
            pose = annotator.pose_of(frame)
        except Exception as exc:  # a model failing on one frame must not sink the unit
            errors.append(error_record("pose", type(exc).__name__, str(exc), path, sid))
            continue
        try:
            rows.append(
                build_row(row_unit, frame_index, timestamp, frame, Annotation(matte, pose, True),
                          image_format=settings["image_format"], jpeg_quality=settings["jpeg_quality"],
                          pose_style=settings["pose_style"], with_pose=settings["pose"] != "none")
            )
        except Exception as exc:  # noqa: BLE001 - one row that cannot be encoded costs that row only
            exc = input_error("encode", exc)
            errors.append(error_record(exc.stage, exc.error_type, exc.message, path, sid))
    record = {"input_path": path, "unit_index": unit["unit_index"], "unit_count": unit["unit_count"],
              "frames": frames, "rows": len(rows), "skipped": dict(skipped), "errors": len(errors)}
    return UnitResult(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), record, errors, rejects)


def failed_result(unit: dict, stage: str, exc: BaseException) -> UnitResult:
    """The result of a unit whose work raised: no rows, one errors row naming what went wrong."""
    error = input_error(stage, exc)
    errors = [error_record(error.stage, error.error_type, error.message, unit["input_path"])]
    record = {"input_path": unit["input_path"], "unit_index": unit["unit_index"], "unit_count": unit["unit_count"],
              "frames": 0, "rows": 0, "skipped": {}, "errors": 1}
    return UnitResult(TRIPLET_SCHEMA.empty_table(), record, errors, [])


def guarded(unit: dict, stage: str, work) -> UnitResult:
    """``work()`` for one unit; whatever it raises becomes that unit's errors row (the boundary
    that keeps one input from stopping a run)."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - see above
        return failed_result(unit, stage, exc)


def process_unit(unit: dict, annotator, settings: dict) -> UnitResult:
    """Decode, annotate and encode one unit in one place (the CPU pipeline)."""
    frames, errors = decode_unit(unit, settings)
    skipped: Counter = Counter()
    rejects: list[dict] = []
    kept = matte_unit(unit, frames, annotator, settings, errors, skipped, rejects)
    return finish_unit(unit, kept, annotator, settings, frames=len(frames), errors=errors, skipped=skipped,
                       rejects=rejects)


def pack_unit(unit: dict, frames: int, kept: list[MattedFrame], errors: list[dict], skipped: Counter,
              rejects: list[dict], resources: dict) -> dict:
    """One record carrying a matted unit from the matting actors to the pose actors
    (``PACKED_UNIT_SCHEMA``: typed fields, the planned unit a ``UNIT_TYPE`` struct)."""
    unknown = set(unit) - UNIT_FIELDS
    if unknown:  # Arrow would drop them silently on the way
        raise ValueError(f"the unit has fields UNIT_TYPE does not declare: {sorted(unknown)}")
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

    def __init__(self, settings: dict, stage: str):
        import secrets

        self.held = [{"stage": stage, **_assigned_resources()}]
        self._entries: list[dict] = []
        # A name part of its own per actor: a restarted actor or a resumed run never reuses a name.
        prefix = f"part-{settings['run']}-{secrets.token_hex(8)}-"
        self.writer = ShardWriter(OutputStore(Path(settings["output"])), prefix, settings["shard_rows"],
                                  settings["row_group_rows"], commit=self._entries.append)

    def add(self, result: UnitResult) -> None:
        self.writer.add_unit(result.rows, result.unit, result.errors, result.rejects)

    def commits(self, upstream: list[dict] = ()) -> pa.Table:
        """Flush what this call added; its commit records, with the resources that this actor and
        the upstream actors of its units held."""
        self.writer.flush()
        entries = list(self._entries)
        self._entries.clear()  # the writer appends to this very list
        resources = self.held + list(upstream)
        return pa.Table.from_pylist([{"entry": commit_record(e), "resources": resources} for e in entries],
                                    schema=COMMIT_SCHEMA)


def _assigned_resources() -> dict:
    import ray

    try:
        context = ray.get_runtime_context()
        assigned = context.get_assigned_resources()
        held = {k: round(float(v), 3) for k, v in assigned.items() if k in ("CPU", "GPU")}
        # Which actor on which node, and which GPUs: the manifest shows how the pools were placed.
        held.update(actor=context.get_actor_id(), node=context.get_node_id(),
                    gpu_ids=[str(g) for g in ray.get_gpu_ids()])
        return held
    except Exception:  # outside a Ray worker (the benchmark's plain loop)
        return {}


def _annotator(settings: dict, roles: tuple[str, ...]):
    import cv2

    from disco.pipeline.annotators import FrameAnnotator

    cv2.setNumThreads(1)  # one actor per core; OpenCV's own pool would fight the others
    return FrameAnnotator(
        settings["matting"], settings["pose"], settings["hands"], settings["min_visibility"],
        settings["min_mask_area"], settings["joint_threshold"], roles=roles,
        modules=settings.get("backend_modules"), **settings["backend_options"],
    )


class AnnotateStage:
    """Ray Data actor of the CPU pipeline: loads the annotators once, then decodes, annotates,
    encodes and writes its units, so frames and pictures never cross the object store."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.annotator = _annotator(settings, ("matting", "pose"))
        self.out = UnitWriter(settings, "annotate")

    def __call__(self, batch: pa.Table) -> pa.Table:
        for unit in batch.to_pylist():
            self.out.add(guarded(unit, "encode", lambda: process_unit(unit, self.annotator, self.settings)))
        return self.out.commits()


class MattingStage:
    """Ray Data actor of the GPU pipeline: decodes units and mattes their frames in batches."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.annotator = _annotator(settings, ("matting",))
        self.resources = {"matting": _assigned_resources()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        packed = []
        for unit in batch.to_pylist():
            try:
                packed.append(self._matte(unit))
            except Exception as exc:  # noqa: BLE001 - the unit's errors row; the others go on
                failed = failed_result(unit, "matting", exc)
                packed.append(pack_unit(unit, 0, [], failed.errors, Counter(), [], self.resources))
        return pa.Table.from_pylist(packed, schema=PACKED_UNIT_SCHEMA)

    def _matte(self, unit: dict) -> dict:
        frames, errors = decode_unit(unit, self.settings)
        skipped: Counter = Counter()
        rejects: list[dict] = []
        kept = matte_unit(unit, frames, self.annotator, self.settings, errors, skipped, rejects)
        return pack_unit(unit, len(frames), kept, errors, skipped, rejects, self.resources)


class PoseStage:
    """Ray Data actor of the GPU pipeline: pose for the matted frames, encoding, and writing."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.annotator = _annotator(settings, ("pose",))
        self.out = UnitWriter(settings, "pose")

    def __call__(self, batch: pa.Table) -> pa.Table:
        upstream: list[dict] = []
        for record in batch.to_pylist():
            unit, frames, kept, errors, skipped, rejects, resources = unpack_unit(record)
            for stage, held in resources.items():
                if {"stage": stage, **held} not in upstream:
                    upstream.append({"stage": stage, **held})
            self.out.add(guarded(unit, "pose", lambda: finish_unit(
                unit, kept, self.annotator, self.settings, frames=frames, errors=errors, skipped=skipped,
                rejects=rejects)))
        return self.out.commits(upstream)
