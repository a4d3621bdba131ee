"""The human filter behind ``disco-cli filter-humans``: which frames hold a usable person, why the
others were turned away, and filtering an existing triplets folder by its stored scores."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from disco.pipeline.annotators import mask_area
from disco.pipeline.cluster import input_identity
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.schema import MANIFEST_FILE, REJECT_SCHEMA, TRIPLET_SCHEMA, TRIPLETS_DIR, sample_id


def classify(score: float, count: int, area: float, min_score: float, min_area: float,
             max_persons: int | None) -> str | None:
    """The reason a picture is turned away, or None to keep it. One rule for both modes: on the
    models' output, and on the columns stored in an existing triplets folder."""
    if count <= 0 or score < min_score:
        return "no_person"
    if area < min_area:
        return "too_small"
    if max_persons is not None and count > max_persons:
        return "too_many_people"
    return None


def reject_reason(annotation, settings: dict, min_score: float) -> str | None:
    """In the pipeline's actors: why a frame is turned away (None: kept). ``preprocess`` keeps what
    the annotator finds present and names the threshold the others failed, with the annotator's
    own score threshold (``min_score``: Grounded-SAM's is its box threshold); ``filter-humans``
    (``classify_rejects``) applies its own thresholds, the person count included."""
    filtering = settings.get("classify_rejects")
    if not filtering and annotation.present:
        return None
    matte = annotation.matte
    return classify(matte.score, matte.count, mask_area(matte.alpha),
                    settings["min_visibility"] if filtering else min_score, settings["min_mask_area"],
                    settings.get("max_persons") if filtering else None)


def reject_record(unit: dict, frame_index: int, timestamp: float | None, frame: np.ndarray, annotation,
                  reason: str) -> dict:
    height, width = frame.shape[:2]
    matte = annotation.matte
    return {
        "sample_id": sample_id(unit["source"], unit["clip_id"], frame_index), "source": unit["source"],
        "clip_id": unit["clip_id"], "frame_index": frame_index, "timestamp_s": timestamp,
        "split": unit["split"], "input_path": unit["input_path"], "width": width, "height": height,
        "reason": reason, "person_score": float(matte.score), "person_count": int(matte.count),
        "mask_area": mask_area(matte.alpha),
    }


def is_triplets_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_FILE).is_file() and (path / TRIPLETS_DIR).is_dir()


def filter_triplets(input_dir: Path, output: Path, *, min_score: float, min_area: float,
                    max_persons: int | None, keep_rejects: bool, overwrite: bool = False,
                    shard_rows: int = 1024, row_group_rows: int = 64, log=print):
    """Filter an existing triplets folder by its stored ``person_score``, ``mask_area`` and
    ``person_count``, without running a model. Kept rows are copied unchanged; each input shard is
    one unit of work, so an interrupted run resumes."""
    from disco.pipeline.store.manifest import read_manifest
    from disco.pipeline.store.output import OutputStore

    input_dir, output = Path(input_dir), Path(output)
    if input_dir.resolve() == output.resolve():
        raise ConfigError("--output must differ from --input: the filtered set is written beside the original")
    source_manifest = read_manifest(input_dir / MANIFEST_FILE)
    params = {"mode": "triplets", "input": input_identity(input_dir), "min_score": min_score,
              "min_area": min_area, "max_persons": max_persons, "keep_rejects": keep_rejects}
    store = OutputStore(output)
    with store.locked():
        return _filter_locked(store, input_dir, params, source_manifest, min_score=min_score, min_area=min_area,
                              max_persons=max_persons, keep_rejects=keep_rejects, overwrite=overwrite,
                              shard_rows=shard_rows, row_group_rows=row_group_rows, log=log)


def _filter_locked(store, input_dir: Path, params: dict, source_manifest: dict, *, min_score: float,
                   min_area: float, max_persons: int | None, keep_rejects: bool, overwrite: bool, shard_rows: int,
                   row_group_rows: int, log):
    from disco.pipeline.store.manifest import RunResult, build_manifest, write_manifest
    from disco.pipeline.store.reader import check_shard, damaged, shard_files
    from disco.pipeline.store.output import run_token
    from disco.pipeline.store.shards import ShardWriter

    shards = shard_files(input_dir, TRIPLETS_DIR)
    for path in shards:  # a damaged shard stops the run before any work (or --overwrite), in one line
        check_shard(path, TRIPLET_SCHEMA)
    listed = [p.relative_to(input_dir).as_posix() for p in shards]
    state, _ = store.begin(params, overwrite)
    done = state.complete_inputs()
    gone = sorted(set(done) - set(listed))
    if gone:
        # The source was written again since (--overwrite, --retry-errors: new shard names): its
        # new shards hold the rows of the ones filtered already, which would be kept twice.
        raise ConfigError(f"{len(gone)} shard(s) of {input_dir} this output was filtered from are gone ({gone[0]}, ...): "
                          "the source was written again since; pass --overwrite to filter it afresh")
    writer = ShardWriter(store, f"part-{run_token()}-", shard_rows, row_group_rows)
    started, frames = time.time(), 0
    try:
        for path, rel in zip(shards, listed):
            if rel in done:
                continue
            try:
                table = pq.read_table(path, schema=TRIPLET_SCHEMA)
            except (OSError, pa.ArrowException, ValueError) as exc:  # pages damaged behind a good footer
                raise damaged(path, exc) from None
            reasons = [
                classify(s, c, a, min_score, min_area, max_persons)
                for s, c, a in zip(table.column("person_score").to_pylist(), table.column("person_count").to_pylist(),
                                   table.column("mask_area").to_pylist())
            ]
            keep = pa.array([r is None for r in reasons])
            kept = table.filter(keep)
            rejects = []
            if keep_rejects:
                meta = table.select([n for n in REJECT_SCHEMA.names if n != "reason"]).to_pylist()
                rejects = [{**m, "reason": r} for m, r in zip(meta, reasons) if r is not None]
            skipped = Counter(r for r in reasons if r is not None)
            unit = {"input_path": rel, "unit_index": 0, "unit_count": 1, "frames": table.num_rows,
                    "rows": kept.num_rows, "skipped": dict(skipped), "errors": 0}
            writer.add_unit(kept, unit, [], rejects)
            frames += table.num_rows
    finally:
        writer.flush()
    wall = time.time() - started
    # The rows are the source's, pose pictures included: how they were drawn is the source's too
    # (train, generate and evaluate read it here: store/pose.py data_pose).
    drawn = {k: v for k, v in (source_manifest.get("parameters") or {}).items()
             if k in ("pose_style", "hands", "pose_renderer", "face", "max_side", "fps", "smooth_poses",
                      "joint_threshold")}
    config = {"mode": "triplets", **drawn, **params, "output": str(store.root),
              "image_format": source_manifest.get("encoding", {}).get("image", "jpeg")}
    backends = {"matting": {"name": None}, "pose": {"name": None},
                "reason": "filtered by the stored person_score, mask_area and person_count; no model ran",
                "source_backends": source_manifest.get("backends")}
    run = {"wall_time_s": round(wall, 3), "frames_processed": frames,
           "frames_per_s": round(frames / wall, 3) if wall > 0 else None, "inputs_processed": len(listed) - len(done),
           "pools": [], "ray_address": None, "interrupted": False, "failed": None}
    final = store.read_journal()
    manifest = build_manifest(config=config, backends=backends, state=final, listed=listed, ignored=0, run=run)
    manifest.update(filter_section(final, min_score, min_area, max_persons))
    manifest["filtered_from"] = {"path": str(input_dir.resolve()), "command": source_manifest.get("command"),
                                 "dataset": source_manifest.get("dataset")}
    write_manifest(store.manifest, manifest)
    log(f"kept {manifest['counts']['rows_written']} of {frames} rows; rejected: "
        + (", ".join(f"{k} {v}" for k, v in manifest["counts"]["rows_skipped"].items()) or "none"))
    code = 0 if manifest["counts"]["rows_written"] or listed else 1
    return RunResult(manifest=manifest, exit_code=code)


def filter_section(state, min_score: float, min_area: float, max_persons: int | None) -> dict:
    """What the manifest of a filtered set adds: the thresholds and the rejects table's shards."""
    shards = [s for e in state.entries for s in e.get("shards", []) if s["path"].startswith("rejects/")]
    return {"filter": {"min_score": min_score, "min_area": min_area, "max_persons": max_persons},
            "reject_shards": shards}


def filter_settings(cfg) -> dict:
    """The settings the actors need for filter-humans (empty for a plain preprocess)."""
    if not getattr(cfg, "human_filter", False):
        return {}
    return {"classify_rejects": True, "max_persons": cfg.max_persons, "keep_rejects": cfg.keep_rejects}
