"""manifest.json: what produced an output directory, and what it holds."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from disco.pipeline.errors import ConfigError
from disco.pipeline.store.output import JournalState
from disco.pipeline.store.schema import MANIFEST_FILE

# The name of a data set manifest's own split rule (pipeline/sources/dataset_manifest.py), as the
# output's manifest records it; here because the store records it and sits below the sources.
DEFAULT_SPLIT_RULE = "default"


@dataclass
class RunResult:
    """What a `preprocess` or `filter-humans` run returns: its manifest and its exit code."""

    manifest: dict
    exit_code: int
    removed_on_recovery: list[str] = field(default_factory=list)


PACKAGES = ("disco", "ray", "pyarrow", "numpy", "pillow", "mediapipe", "decord", "opencv-contrib-python",
            "opencv-python-headless", "scikit-image", "torch")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def summarize(state: JournalState, listed: list[str]) -> dict:
    """Counts over every committed unit, across all runs that wrote this directory."""
    units = state.units()
    complete = state.complete_inputs()
    skipped: Counter = Counter()
    frames = rows = errors = failed = 0
    for path, by_index in units.items():
        input_rows = input_skipped = input_errors = 0
        for unit in by_index.values():
            frames += unit["frames"]
            input_rows += unit["rows"]
            input_errors += unit["errors"]
            for reason, n in unit["skipped"].items():
                skipped[reason] += n
                input_skipped += n
        rows += input_rows
        errors += input_errors
        if path in complete and input_errors and not (input_rows or input_skipped):
            failed += 1
    listed_set = set(listed)
    done = len(complete & listed_set)
    return {
        "inputs": len(listed),
        "inputs_done": done,
        "inputs_failed": failed,
        "inputs_pending": len(listed_set - complete),
        "frames": frames,
        "rows_written": rows,
        "rows_skipped": dict(sorted(skipped.items())),
        "errors": errors,
    }


def build_manifest(*, config: dict, backends: dict, state: JournalState, listed: list[str], ignored: int,
                   run: dict) -> dict:
    counts = summarize(state, listed)
    counts["ignored_files"] = ignored
    shards = [s for e in state.entries for s in e.get("shards", [])]
    image_format = config["image_format"]
    return {
        "format": "disco-triplets/1",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "parameters": config,
        "backends": backends,
        "encoding": {"image": image_format, "foreground": image_format, "background": image_format,
                     "mask": "png", "pose": "png"},
        "packages": package_versions(),
        "counts": counts,
        "shards": [s for s in shards if s["path"].startswith("triplets/")],
        "error_shards": [s for s in shards if s["path"].startswith("errors/")],
        "run": run,
    }


def write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=2, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())  # before the rename: a crash leaves the old file or the new, never an empty one
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """A folder's ``manifest.json``; one that is not JSON is a one-line ``ConfigError``."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); `disco-cli preprocess` writes it again at the end of a run "
                          "on the same output") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path} is not a manifest (a JSON object)")
    return manifest


def split_rule(folder: str | Path) -> tuple[str, str] | None:
    """(data set, split rule) a data folder's rows were split by (a filter-humans of a triplets
    folder: its source's); None for the generic sources and folders without a manifest."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = read_manifest(path)
    dataset = manifest.get("dataset") or (manifest.get("filtered_from") or {}).get("dataset")
    if not isinstance(dataset, dict) or not dataset.get("name"):
        return None
    return str(dataset["name"]), str(dataset.get("split_rule_name") or DEFAULT_SPLIT_RULE)


def split_conflicts(trained: list[str | Path], evaluated: list[str | Path] = ()) -> list[str]:
    """Data sets split by different rules among ``trained`` folders, or between them and
    ``evaluated`` ones: a clip one rule holds out, another may train on. One line each."""
    rules: dict[str, dict[str, list[str]]] = {}
    for folder in [*trained, *evaluated]:
        found = split_rule(folder)
        if found is not None:
            rules.setdefault(found[0], {}).setdefault(found[1], []).append(str(folder))
    return [f"{name} data split by different rules: " + "; ".join(f"{rule!r} in {', '.join(folders)}"
                                                                  for rule, folders in by_rule.items())
            for name, by_rule in rules.items() if len(by_rule) > 1]
