"""The pipeline's work on one unit: planning units, decoding, matting, pose and encoding, and
the errors row of a unit that failed (``failed_result``). The Ray actors that run these steps,
and the boundary around each unit, are in ``actors.py`` (``unit_result``).

A unit is a still image or a segment of a video.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from disco.pipeline import strikes
from disco.pipeline.sources import units as dataset_units
from disco.pipeline.decode import (
    Frame,
    LastVideo,
    check_size,
    decode_video_frames,
    load_image,
    probe_video,
    salvage_video_frames,
    target_size,
)
from disco.pipeline.annotators import SEQUENCE_KINDS, Annotation
from disco.pipeline.annotators.base import Matte
from disco.pipeline.store.encode import build_row
from disco.pipeline.device_loss import raise_if_device_lost
from disco.pipeline.errors import GivenUp, InputError, error_record, failed_unit, input_error, out_of_gpu_memory
from disco.pipeline.filter import reject_reason, reject_record
from disco.pipeline.store.schema import TRIPLET_SCHEMA, sample_id
from disco.pipeline.sources.generic import local_path


def unit_base(item: dict) -> dict:
    """A listed input as its first unit, before planning. Every unit carries every key with a
    stable type, so Ray's blocks share one schema."""
    return {**item, "error_stage": "list" if item.get("error_type") else None, "unit_index": 0,
            "unit_count": 1, "src_indices": [], "frame_start": 0, "width": 0, "height": 0}


def plan_units(item: dict, settings: dict, done_units: dict[str, list[int]] | None = None) -> list[dict]:
    """Split one listed input into units; a video is probed here and cut into segments."""
    base = unit_base(item)
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
    total = count + bool(info.cut_short)  # a video read up to where it is cut: one more unit, its errors row
    units = [
        {**base, "unit_index": k, "unit_count": total, "src_indices": indices[k * step:(k + 1) * step],
         "frame_start": k * step, "width": width, "height": height}
        for k in range(count)
        if k not in skip
    ]
    if info.cut_short and count not in skip:
        units.append(failed_unit({**base, "unit_index": count, "unit_count": total, "frame_start": count * step,
                                  "width": width, "height": height},
                                 InputError("decode", "decode_failed", info.cut_short)))
    return units


class MattedFrame(NamedTuple):
    """A frame that holds a person, with its matte: what the pose stage and the encoder take."""

    index: int
    timestamp: float | None
    picture: np.ndarray
    unit: dict
    matte: Matte


def decode_unit(unit: dict, settings: dict, videos: LastVideo | None = None) -> tuple[list[Frame], list[dict]]:
    """The unit's frames, and the errors met decoding them. A frame carries the unit its row
    belongs to: a tar member has its own clip_id. ``videos``: the actor's last video, kept open
    for the next segment of it."""
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
        decoded = _decode_segment(unit, videos, errors)
        return [Frame(int(unit["frame_start"]) + i, time, frame, unit) for i, frame, time in decoded], errors
    except Exception as exc:  # noqa: BLE001 - any failure of this input is its errors row
        return [], errors + [frame_error("decode", exc, path)]


def _decode_segment(unit: dict, videos: LastVideo | None, errors: list[dict]) -> list[tuple[int, np.ndarray, float]]:
    """The segment's frames as (position in the unit, frame, time). Where the segment does not
    decode as a whole, the frames that do are kept, and each run of frames that does not is an
    errors row (``salvage_video_frames``); none decoding, the segment's one error is raised."""
    path, width, height = local_path(unit), int(unit["width"]), int(unit["height"])
    indices = list(unit["src_indices"])
    if strikes.one_by_one():
        return _decode_apart(unit, videos, errors)
    try:
        frames, times = decode_video_frames(path, indices, width, height,
                                            None if videos is None else videos.reader(path, width, height))
        return [(i, frames[i], times[i]) for i in range(len(frames))]
    except InputError:
        if videos is not None:
            videos.close()
        decoded, failed = salvage_video_frames(path, indices, width, height)
        if not decoded:
            raise
        errors.extend(error_record(e.stage, e.error_type, e.message, unit["input_path"]) for e in failed)
        return decoded
    except BaseException:
        if videos is not None:
            videos.close()
        raise


def _decode_apart(unit: dict, videos: LastVideo | None, errors: list[dict]) -> list[tuple[int, np.ndarray, float]]:
    """The segment's frames one at a time, each in a strike window of its own (a unit that ended
    its process once, ``strikes.frames_apart``); a frame that fails is its errors row."""
    path, width, height = local_path(unit), int(unit["width"]), int(unit["height"])
    decoded = []
    for position, index in enumerate(unit["src_indices"]):
        sid = sample_id(unit["source"], unit["clip_id"], int(unit["frame_start"]) + position)
        try:
            with strikes.frame(sid):
                reader = None if videos is None else videos.reader(path, width, height)
                frames, times = decode_video_frames(path, [index], width, height, reader)
        except Exception as exc:  # noqa: BLE001 - this frame's errors row; the others go on
            if videos is not None and not isinstance(exc, GivenUp):
                videos.close()  # a fresh reader for the next frame (one given up never opened one)
            errors.append(frame_error("decode", exc, unit["input_path"], sid))
            continue
        decoded.append((position, frames[0], times[0]))
    return decoded


def matte_unit(unit: dict, frames: list[Frame], annotator, settings: dict, errors: list[dict], skipped: Counter,
               rejects: list[dict]) -> list[MattedFrame]:
    """Matting over the unit's frames (batched where the backend can). Returns the frames that hold
    a person, with their mattes; the others are counted by reason."""
    annotator.begin_unit(unit)
    # Frame by frame where a frame failed the batch, or where the unit's frames run apart (not
    # where the backend tracks them as one video: apart, each would be a video of one frame).
    apart = strikes.one_by_one() and not annotator.tracks_sequence()
    mattes = None if apart else _batched_mattes(annotator, [f.picture for f in frames])
    if mattes is None:  # one bad frame must not sink the others: go again one at a time
        mattes = []
        for frame_index, _, frame, row_unit in frames:
            sid = sample_id(row_unit["source"], row_unit["clip_id"], frame_index)
            try:
                with strikes.frame(sid):
                    mattes.append(annotator.matte_batch([frame])[0])
            except Exception as exc:
                raise_if_device_lost(exc)
                errors.append(frame_error("matting", exc, unit["input_path"], sid))
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


def _batched_mattes(annotator, pictures: list[np.ndarray]) -> list | None:
    """The frames' mattes in the backend's batches; None where a batch failed. A batch out of GPU
    memory halves the backend's batch for the rest of this actor's life and runs again: the peak
    is the same for every unit of this size, so retrying the same batch on each would fail each
    time (and fall back to one frame at a time), and a GPU shared with another actor leaves less
    than the batch was sized for."""
    while True:
        try:
            return annotator.matte_batch(pictures)
        except Exception as exc:
            raise_if_device_lost(exc)
            smaller = annotator.shrink_batch(len(pictures)) if out_of_gpu_memory(exc) else None
        # Outside the except block: its traceback holds the failed batch's frames and tensors,
        # which the retry needs freed.
        release_device_memory()
        if smaller is None:
            return None
        print(f"disco: matting a batch ran out of GPU memory; batches of {smaller} frame(s) from now on",
              file=sys.stderr, flush=True)


def release_device_memory() -> None:
    """Hands the CUDA caching allocator's unused blocks back (after a failed batch), where torch
    is loaded and CUDA started; nothing otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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
    posed = []
    for frame_index, timestamp, frame, row_unit, matte in kept:
        sid = sample_id(row_unit["source"], row_unit["clip_id"], frame_index)
        try:
            with strikes.frame(sid):
                pose = annotator.pose_of(frame)
            posed.append((frame_index, timestamp, frame, row_unit, matte, pose))
        except Exception as exc:  # a model failing on one frame must not sink the unit
            raise_if_device_lost(exc)
            errors.append(frame_error("pose", exc, path, sid))
    if settings.get("smooth_poses") and unit.get("kind") in SEQUENCE_KINDS:
        posed = smooth_unit_poses(posed, settings["fps"])
    for frame_index, timestamp, frame, row_unit, matte, pose in posed:
        sid = sample_id(row_unit["source"], row_unit["clip_id"], frame_index)
        try:
            with strikes.frame(sid):
                rows.append(
                    build_row(row_unit, frame_index, timestamp, frame, Annotation(matte, pose, True),
                              image_format=settings["image_format"], jpeg_quality=settings["jpeg_quality"],
                              pose_style=settings["pose_style"], with_pose=settings["pose"] != "none")
                )
        except Exception as exc:  # noqa: BLE001 - one row that cannot be encoded costs that row only
            errors.append(frame_error("encode", exc, path, sid))
    record = {"input_path": path, "unit_index": unit["unit_index"], "unit_count": unit["unit_count"],
              "frames": frames, "rows": len(rows), "skipped": dict(skipped), "errors": len(errors)}
    return UnitResult(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), record, errors, rejects)


def smooth_unit_poses(posed: list[tuple], fps: float) -> list[tuple]:
    """``--smooth-poses``: the One-Euro filter over the poses of a video unit's frames (tuples
    ending in the frame's ``Pose`` or None). Tracks run through consecutive frame indices only:
    a frame without a person (not kept) or without a pose breaks them, so nothing is carried over
    a gap; a frame without hands breaks the hands' tracks alone. Body and hands are smoothed; the
    face is kept as found."""
    from disco.pipeline.annotators.base import Pose
    from disco.pipeline.annotators.smoothing import smooth_sequence

    out = list(posed)
    runs: list[list[int]] = []
    for i, item in enumerate(posed):
        if item[-1] is None:
            continue
        if runs and runs[-1][-1] == i - 1 and posed[i - 1][0] == item[0] - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        poses = [posed[i][-1] for i in run]
        height = posed[run[0]][2].shape[0]
        # The frames' own rate (a slower source is not up-sampled to --fps): from their times.
        times = [posed[i][1] for i in run]
        span = times[-1] - times[0] if len(run) > 1 and None not in times else 0.0
        rate = (len(run) - 1) / span if span > 0 else fps
        bodies = smooth_sequence([p.body for p in poses], rate, height)
        hands = smooth_sequence([p.hands for p in poses], rate, height)
        for k, i in enumerate(run):
            out[i] = (*posed[i][:-1], Pose(body=bodies[k], hands=hands[k], face=poses[k].face))
    return out


def frame_error(stage: str, exc: BaseException, path: str, sid: str | None = None) -> dict:
    """The errors row of what one frame (``sid``) or one unit raised: its ``error_type`` by
    ``errors.error_type_of`` (a GPU out-of-memory error is ``gpu_out_of_memory``, which
    ``--retry-errors`` can name), its message in one line."""
    error = input_error(stage, exc)
    return error_record(error.stage, error.error_type, error.message, path, sid)


def failed_result(unit: dict, stage: str, exc: BaseException) -> UnitResult:
    """The result of a unit whose work raised: no rows, one errors row naming what went wrong."""
    errors = [frame_error(stage, exc, unit["input_path"])]
    record = {"input_path": unit["input_path"], "unit_index": unit["unit_index"], "unit_count": unit["unit_count"],
              "frames": 0, "rows": 0, "skipped": {}, "errors": 1}
    return UnitResult(TRIPLET_SCHEMA.empty_table(), record, errors, [])


def process_unit(unit: dict, annotator, settings: dict, videos: LastVideo | None = None) -> UnitResult:
    """Decode, annotate and encode one unit in one place (the CPU pipeline)."""
    frames, errors = decode_unit(unit, settings, videos)
    skipped: Counter = Counter()
    rejects: list[dict] = []
    kept = matte_unit(unit, frames, annotator, settings, errors, skipped, rejects)
    return finish_unit(unit, kept, annotator, settings, frames=len(frames), errors=errors, skipped=skipped,
                       rejects=rejects)
