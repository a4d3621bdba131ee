"""The Parquet contract between the pipeline and the trainer.

One home for the column names and types: the writer casts to these schemas, the reader,
``inspect`` and the trainer read them from here. See ``DESIGN.md`` for the meaning of each column.
"""

from __future__ import annotations

import pyarrow as pa

SOURCES = ("tiktok", "coco", "shhq", "deepfashion2", "laion", "video", "images")
SPLITS = ("train", "test")
ERROR_STAGES = ("list", "decode", "matting", "pose", "encode", "write")
# A pixel is the person's where the mask (alpha 0..255) is at least this: the foreground /
# background split, mask_area, and the person mask on the CLIP reference input all use it.
PERSON_ALPHA = 128

BODY_JOINTS = 18
HAND_JOINTS = 21

TRIPLET_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("frame_index", pa.int32(), nullable=False),
        pa.field("timestamp_s", pa.float64()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("input_path", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),
        pa.field("foreground", pa.binary(), nullable=False),
        pa.field("background", pa.binary(), nullable=False),
        pa.field("pose", pa.binary()),
        pa.field("body_keypoints", pa.list_(pa.float32()), nullable=False),
        pa.field("hand_keypoints", pa.list_(pa.float32())),
        pa.field("face_keypoints", pa.list_(pa.float32())),
        pa.field("person_score", pa.float32(), nullable=False),
        pa.field("person_count", pa.int32(), nullable=False),
        pa.field("mask_area", pa.float32(), nullable=False),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("input_path", pa.string(), nullable=False),
        pa.field("sample_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)

TRIPLETS_DIR = "triplets"
ERRORS_DIR = "errors"
REJECTS_DIR = "rejects"
MANIFEST_FILE = "manifest.json"

# Columns holding encoded pictures; everything else is small metadata.
PICTURE_COLUMNS = ("image", "mask", "foreground", "background", "pose")


def sample_id(source: str, clip_id: str, frame_index: int) -> str:
    return f"{source}/{clip_id}/{frame_index:06d}"




# `filter-humans --keep-rejects`: one row per rejected frame or still, with what the thresholds
# were applied to, so they can be re-tuned later without running the models again.
REJECT_REASONS = ("no_person", "too_small", "too_many_people")
REJECT_SCHEMA = pa.schema(
    [TRIPLET_SCHEMA.field(n) for n in ("sample_id", "source", "clip_id", "frame_index", "timestamp_s", "split",
                                       "input_path", "width", "height")]
    + [pa.field("reason", pa.string(), nullable=False)]
    + [TRIPLET_SCHEMA.field(n) for n in ("person_score", "person_count", "mask_area")]
)


# The Ray resources an actor of a stage held, and where: the manifest shows how the pools were
# placed (fields a context does not know stay null).
RESOURCES_TYPE = pa.list_(pa.struct([
    pa.field("stage", pa.string()), pa.field("CPU", pa.float64()), pa.field("GPU", pa.float64()),
    pa.field("actor", pa.string()), pa.field("node", pa.string()), pa.field("gpu_ids", pa.list_(pa.string())),
]))
_SKIPPED_TYPE = pa.list_(pa.struct([pa.field("reason", pa.string()), pa.field("count", pa.int64())]))

# What a data set kind needs to plan and decode an input, beside its path: a frame folder's file
# names (bytes, as the file system gives them: a name need not be UTF-8) and frame rate, a tar
# shard's range of samples (a unit's), what an image's annotations say. Every record has every
# field (``payload``), null where the kind has none.
PAYLOAD_TYPE = pa.struct([
    pa.field("frames", pa.list_(pa.binary())), pa.field("fps", pa.float64()),
    pa.field("start", pa.int64()), pa.field("stop", pa.int64()), pa.field("offset", pa.int64()),
    pa.field("annotated_persons", pa.int64()), pa.field("has_annotation", pa.bool_()),
    pa.field("repeated", pa.list_(pa.int64())),  # a tar unit's entries whose key came earlier in the shard
])


def payload(**fields) -> dict:
    """A ``PAYLOAD_TYPE`` record: ``fields``, and null for the others."""
    record = {field.name: None for field in PAYLOAD_TYPE}
    check_declared(fields, PAYLOAD_TYPE, "the data set kind's payload")
    record.update(fields)
    return record


# A planned unit of work (a listed input, or a stretch of one) as the stages receive it: the
# listing's fields (``sources.generic.InputItem``), then the plan's. ``extra`` is the data set
# kind's payload (``PAYLOAD_TYPE``).
UNIT_TYPE = pa.struct([
    pa.field("input_path", pa.string()), pa.field("abs_path", pa.string()), pa.field("source", pa.string()),
    pa.field("clip_id", pa.string()), pa.field("kind", pa.string()), pa.field("split", pa.string()),
    pa.field("error_type", pa.string()), pa.field("error_message", pa.string()), pa.field("extra", PAYLOAD_TYPE),
    pa.field("raw_path", pa.binary()),
    pa.field("error_stage", pa.string()), pa.field("unit_index", pa.int64()), pa.field("unit_count", pa.int64()),
    pa.field("src_indices", pa.list_(pa.int64())), pa.field("frame_start", pa.int64()),
    pa.field("width", pa.int64()), pa.field("height", pa.int64()),
])
UNIT_FIELDS = frozenset(field.name for field in UNIT_TYPE)


def unit_table(units: list[dict]) -> pa.Table:
    """Planned units as ``UNIT_TYPE`` rows (about 240 bytes a unit, against 1.5 KB as dicts)."""
    for unit in units:
        check_declared(unit, UNIT_TYPE, "the unit")
    return pa.Table.from_pylist(units, schema=pa.schema(list(UNIT_TYPE)))


def unit_blocks(units: list[dict] | pa.Table, blocks: int) -> list[pa.Table]:
    """The planned units as ``UNIT_TYPE`` rows, in up to ``blocks`` tables of about equal size."""
    table = units if isinstance(units, pa.Table) else unit_table(units)
    size = max(1, -(-table.num_rows // max(1, blocks)))
    return [table.slice(k, size) for k in range(0, table.num_rows, size)] or [table]

# One commit of the journal: the shards a writer wrote and the units whose rows they hold.
COMMIT_ENTRY_TYPE = pa.struct([
    pa.field("type", pa.string()),
    pa.field("files", pa.list_(pa.string())),
    pa.field("shards", pa.list_(pa.struct([pa.field("path", pa.string()), pa.field("rows", pa.int64()),
                                           pa.field("bytes", pa.int64())]))),
    pa.field("units", pa.list_(pa.struct([
        pa.field("input_path", pa.string()), pa.field("unit_index", pa.int64()), pa.field("unit_count", pa.int64()),
        pa.field("frames", pa.int64()), pa.field("rows", pa.int64()), pa.field("skipped", _SKIPPED_TYPE),
        pa.field("errors", pa.int64()), pa.field("rejects", pa.int64()),
    ]))),
])
# What the writing actors hand the driver: one commit per shard they wrote, which the driver
# appends to the journal, and the Ray resources their stages held.
COMMIT_SCHEMA = pa.schema([pa.field("entry", COMMIT_ENTRY_TYPE), pa.field("resources", RESOURCES_TYPE)])


def check_declared(record: dict, struct: pa.StructType, what: str) -> None:
    """Refuse a record with fields ``struct`` does not declare: Arrow would drop them silently."""
    unknown = set(record) - {field.name for field in struct}
    if unknown:
        raise ValueError(f"{what} has fields its Arrow type does not declare: {sorted(unknown)}")


def skipped_records(skipped: dict[str, int]) -> list[dict]:
    """{reason: count} as ``reason``/``count`` records (Arrow has no dict with free keys)."""
    return [{"reason": reason, "count": count} for reason, count in skipped.items()]


def skipped_counts(records: list[dict]) -> dict[str, int]:
    return {r["reason"]: r["count"] for r in records}


def commit_record(entry: dict) -> dict:
    """A journal commit as a ``COMMIT_ENTRY_TYPE`` value (refuses fields the type does not hold)."""
    check_declared(entry, COMMIT_ENTRY_TYPE, "a commit")
    for unit in entry["units"]:
        check_declared(unit, COMMIT_ENTRY_TYPE.field("units").type.value_type, "a commit's unit")
    return {**entry, "units": [{**u, "skipped": skipped_records(u["skipped"])} for u in entry["units"]]}


def commit_entry(record: dict) -> dict:
    """``commit_record``'s value back as the journal's commit."""
    return {**record, "units": [{**u, "skipped": skipped_counts(u["skipped"])} for u in record["units"]]}


def _transport(schema: pa.Schema) -> pa.DataType:
    """A table's rows as a list of structs between actors (nulls allowed: a record in flight)."""
    return pa.list_(pa.struct([field.with_nullable(True) for field in schema]))


# A unit between the GPU pipeline's matting and pose actors: the frames that hold a person, raw,
# with their mattes; frames without one were already counted as skipped.
PACKED_UNIT_SCHEMA = pa.schema(
    [
        pa.field("unit", UNIT_TYPE),  # the planned unit
        pa.field("frames", pa.int32()),  # frames decoded
        pa.field("pictures", pa.list_(pa.binary())),  # raw H x W x 3 uint8
        pa.field("alphas", pa.list_(pa.binary())),  # raw H x W uint8
        pa.field("kept", pa.list_(pa.struct([  # per kept frame, beside its picture and alpha
            pa.field("frame_index", pa.int64()), pa.field("timestamp_s", pa.float64()),
            pa.field("shape", pa.list_(pa.int32())), pa.field("clip_id", pa.string()),
            pa.field("person_score", pa.float64()), pa.field("person_count", pa.int32()), pa.field("model", pa.string()),
        ]))),
        pa.field("skipped", _SKIPPED_TYPE),
        pa.field("errors", _transport(ERROR_SCHEMA)),
        pa.field("rejects", _transport(REJECT_SCHEMA)),
        pa.field("resources", RESOURCES_TYPE),
    ]
)
