"""The pipeline's stages: planning units of work, and annotating them inside a Ray actor.

A unit is a still image or a segment of a video. Decoding, both annotators and encoding run
fused in the actor that owns the unit, so raw frames never cross the object store.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa

from disco.pipeline.datasets import units as dataset_units
from disco.pipeline.decode import (
    check_size,
    decode_video_frames,
    load_image,
    probe_video,
    resample_indices,
    target_size,
)
from disco.pipeline.encode import build_row
from disco.pipeline.errors import InputError
from disco.pipeline.filter import reject_reason, reject_record
from disco.pipeline.schema import UNIT_RECORD_SCHEMA, sample_id


def _error(stage: str, error_type: str, message: str, input_path: str, sid: str | None = None) -> dict:
    return {"input_path": input_path, "sample_id": sid, "stage": stage, "error_type": error_type, "message": message}


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
        info = probe_video(item["abs_path"])
        check_size(info.width, info.height, settings["min_side"], settings["max_pixels"])
    except InputError as exc:
        return [{**base, "error_type": exc.error_type, "error_message": exc.message, "error_stage": exc.stage}]
    indices = resample_indices(info.num_frames, info.fps, settings["fps"])
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


def process_unit(unit: dict, annotator, settings: dict) -> list[dict]:
    """Decode, annotate and encode one unit; returns its triplet rows and one closing "done" record."""
    rows: list[dict] = []
    skipped: Counter = Counter()
    errors: list[dict] = []
    rejects: list[dict] = []
    # (frame_index, timestamp, frame, the unit its row belongs to: a tar member has its own clip_id)
    frames: list[tuple[int, float | None, np.ndarray, dict]] = []
    path = unit["input_path"]
    if unit.get("error_type"):
        errors.append(_error(unit.get("error_stage") or "list", unit["error_type"], unit["error_message"], path))
    else:
        try:
            if unit["kind"] == "image":
                image = load_image(unit["abs_path"], settings["max_side"], settings["min_side"], settings["max_pixels"])
                frames = [(0, None, image, unit)]
            elif unit["kind"] in dataset_units.KINDS:
                frames = dataset_units.decode_unit(unit, settings, errors, _error)
            else:
                decoded, times = decode_video_frames(
                    unit["abs_path"], list(unit["src_indices"]), int(unit["width"]), int(unit["height"])
                )
                frames = [(int(unit["frame_start"]) + i, times[i], decoded[i], unit) for i in range(len(decoded))]
        except InputError as exc:
            errors.append(_error(exc.stage, exc.error_type, exc.message, path))
    for frame_index, timestamp, frame, row_unit in frames:
        sid = sample_id(row_unit["source"], row_unit["clip_id"], frame_index)
        try:
            annotation = annotator.annotate(frame)
        except Exception as exc:  # a model failing on one frame must not sink the unit
            errors.append(_error("matting", type(exc).__name__, str(exc), path, sid))
            continue
        reason = reject_reason(annotation, settings)
        if reason:
            skipped[reason] += 1
            if settings.get("keep_rejects"):
                rejects.append(reject_record(row_unit, frame_index, timestamp, frame, annotation, reason))
            continue
        try:
            rows.append(
                build_row(row_unit, frame_index, timestamp, frame, annotation,
                          image_format=settings["image_format"], jpeg_quality=settings["jpeg_quality"],
                          pose_style=settings["pose_style"], with_pose=settings["pose"] != "none")
            )
        except InputError as exc:
            errors.append(_error(exc.stage, exc.error_type, exc.message, path, sid))
    for row in rows:
        row.update(_kind="row", _unit_index=unit["unit_index"])
    done = {
        "input_path": path, "_kind": "done", "_unit_index": unit["unit_index"], "_unit_count": unit["unit_count"],
        "_unit_rows": len(rows), "_frames": len(frames), "_skipped": json.dumps(dict(skipped)),
        "_errors": json.dumps(errors), "_rejects": json.dumps(rejects),
    }
    return rows + [done]


def records_to_table(records: list[dict]) -> pa.Table:
    columns = {name: [r.get(name) for r in records] for name in UNIT_RECORD_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=UNIT_RECORD_SCHEMA)


class AnnotateStage:
    """Ray Data actor: loads the annotators once, then decodes, annotates and encodes its units."""

    def __init__(self, settings: dict):
        import cv2

        from disco.pipeline.annotators import FrameAnnotator

        cv2.setNumThreads(1)  # one actor per core; OpenCV's own pool would fight the others
        self.settings = settings
        self.annotator = FrameAnnotator(
            settings["matting"], settings["pose"], settings["hands"],
            settings["min_visibility"], settings["min_mask_area"], settings["joint_threshold"],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        records: list[dict] = []
        for unit in batch.to_pylist():
            records.extend(process_unit(unit, self.annotator, self.settings))
        return records_to_table(records)
