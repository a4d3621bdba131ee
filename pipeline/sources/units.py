"""Units of work for the data set kinds: a stretch of a frame folder, or a range of a tar shard's
samples. Planned on the driver from cheap metadata; decoded inside the annotator actor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from disco.pipeline import strikes
from disco.pipeline.sources import webdataset
from disco.pipeline.decode import Frame, decode_image_bytes, load_image, resample_indices
from disco.pipeline.errors import InputError, display_path, error_record, failed_unit, input_error
from disco.pipeline.store.schema import payload, sample_id
from disco.pipeline.sources.generic import local_path

KINDS = ("frames", "tar")


def plan_units(base: dict, settings: dict, skip: set[int]) -> list[dict]:
    step = settings["segment_frames"]
    try:
        if base["kind"] == "frames":
            extra = base["extra"]
            names = extra["frames"]
            # Frame k of the output is the folder's frame nearest to k / fps (like a video).
            indices = resample_indices(len(names), float(extra["fps"]), settings["fps"])
            chunks = [indices[k:k + step] for k in range(0, len(indices), step)]
            payloads = [payload(frames=[names[i] for i in chunk], fps=extra["fps"]) for chunk in chunks]
        else:
            # A range of samples and the byte offset of its first: a unit seeks there instead of
            # walking every header before it again (a 10K-sample shard is 300+ units).
            repeated: list[int] = []
            offsets = webdataset.entry_offsets(local_path(base), repeated)
            payloads = [payload(start=k, stop=min(len(offsets), k + step), offset=offsets[k],
                                repeated=[i for i in repeated if k <= i < k + step] or None)
                        for k in range(0, len(offsets), step)]
            chunks = [[] for _ in payloads]  # its samples are the payload's range, not frame indices
    except Exception as exc:  # noqa: BLE001 - any failure of this input is its errors row
        return [failed_unit(base, input_error("list", exc))]
    if not payloads:
        empty = (InputError("list", "no_frames", "the folder holds no frames") if base["kind"] == "frames"
                 else InputError("list", "empty_shard", "the shard holds no samples"))
        return [failed_unit(base, empty)]
    return [
        {**base, "unit_index": k, "unit_count": len(payloads), "src_indices": chunks[k], "frame_start": k * step,
         "extra": payloads[k]}
        for k in range(len(payloads))
        if k not in skip
    ]


def unit_frames(units) -> np.ndarray:
    """Frames (or samples) each planned unit covers, at most (one for a still), of a ``UNIT_TYPE``
    table or a list of unit dicts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(units, pa.Table):
        return np.array([(int(u["extra"]["stop"]) - int(u["extra"]["start"]))
                         if (u.get("extra") or {}).get("stop") is not None else len(u.get("src_indices") or ()) or 1
                         for u in units], np.int64)
    if not units.num_rows:
        return np.zeros(0, np.int64)
    extra = units.column("extra").combine_chunks()
    # flatten(): the fields with the struct's own nulls (field() would read a null payload's as 0)
    start, stop = (extra.flatten()[extra.type.get_field_index(name)] for name in ("start", "stop"))
    ranges = pc.subtract(stop, start)
    listed = pc.fill_null(pc.list_value_length(units.column("src_indices")), 0)
    frames = pc.if_else(pc.is_valid(ranges), ranges, listed).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.maximum(frames, 1)


def _load_frame(path: Path, sizes):
    try:
        return load_image(path, *sizes)
    except FileNotFoundError as exc:  # the folder changed since it was listed
        raise InputError("decode", "missing_file", str(exc)) from None


def decode_unit(unit: dict, settings: dict, errors: list) -> list[Frame]:
    """Frames of the unit as ``(frame_index, timestamp, frame, row_unit)``; a frame that fails
    becomes an error row and the others go on."""
    sizes = (settings["max_side"], settings["min_side"], settings["max_pixels"])
    extra = unit["extra"]
    out = []
    if unit["kind"] == "frames":
        folder = Path(local_path(unit))
        fps = float(extra["fps"])
        for offset, (src, raw) in enumerate(zip(unit["src_indices"], extra["frames"])):
            name = os.fsdecode(raw)
            index = int(unit["frame_start"]) + offset
            sid = sample_id(unit["source"], unit["clip_id"], index)
            try:
                with strikes.frame(sid):
                    frame = _load_frame(folder / name, sizes)
            except Exception as exc:  # noqa: BLE001 - this frame's errors row; the others go on
                exc = input_error("decode", exc)
                errors.append(error_record(exc.stage, exc.error_type, f"{display_path(name)}: {exc.message}",
                                         unit["input_path"], sid))
                continue
            out.append(Frame(index, src / fps, frame, unit))
        return out
    repeated = set(extra.get("repeated") or ())
    entries = webdataset.read_entries(local_path(unit), extra["start"], extra["stop"], extra["offset"])
    for index, (entry, name, data) in enumerate(entries, start=int(extra["start"])):
        if entry is None:  # the shard ends damaged here; what was read before it is kept
            errors.append(error_record(data.stage, data.error_type, data.message, unit["input_path"]))
            break
        if entry.problem:
            errors.append(error_record("list", "unsafe_member", display_path(entry.problem), unit["input_path"]))
            continue
        # Member names that are not valid UTF-8 come escaped: they end up in Arrow strings.
        row_unit = {**unit, "clip_id": f"{unit['clip_id']}/{display_path(entry.key)}"}
        sid = sample_id(unit["source"], row_unit["clip_id"], 0)
        if index in repeated:  # its row would take the id of the sample of that key before it
            errors.append(error_record("list", "repeated_key", f"sample {display_path(entry.key)!r} appears again "
                                       f"(entry {index} of the shard): the first one is kept", unit["input_path"]))
            continue
        if name is None:
            members = ", ".join(display_path(m.name) for m in entry.members)
            errors.append(error_record("decode", "missing_image", f"sample {display_path(entry.key)!r} holds no image ({members})",
                                     unit["input_path"], sid))
            continue
        try:
            if isinstance(data, InputError):
                raise data
            with strikes.frame(sid):
                frame = decode_image_bytes(data, name, *sizes)
        except Exception as exc:  # noqa: BLE001 - this sample's errors row; the others go on
            exc = input_error("decode", exc)
            errors.append(error_record(exc.stage, exc.error_type, f"{display_path(name)}: {exc.message}",
                                     unit["input_path"], sid))
            continue
        out.append(Frame(0, None, frame, row_unit))
    return out
