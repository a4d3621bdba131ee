"""Listing the inputs of the generic ``video`` and ``images`` sources."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"})
# Media we recognise but cannot decode: listed as errors so the user sees them, not dropped silently.
UNSUPPORTED_SUFFIXES = {
    "images": frozenset({".heic", ".heif", ".svg", ".cr2", ".nef", ".arw", ".dng", ".raf", ".orf", ".jxl", ".psd"}),
    "video": frozenset({".swf", ".rm", ".rmvb", ".vob"}),
}
KIND = {"images": "image", "video": "video"}


@dataclass
class InputItem:
    input_path: str  # relative to --input, POSIX separators
    abs_path: str
    source: str
    clip_id: str
    kind: str  # image | video
    split: str
    error_type: str | None = None
    error_message: str | None = None
    # JSON with what a data set kind needs to plan and decode (a frame folder's file names...).
    extra: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Listing:
    items: list[InputItem]
    ignored: int  # files that are not media of this source (sidecars, notes...)
    filtered: dict = field(default_factory=dict)  # inputs left out on purpose at listing, by reason
    dataset: dict | None = None  # the data set manifest's summary, for the output manifest


def _walk(root: Path):
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def list_inputs(source: str, root: Path, split: str) -> Listing:
    root = Path(root)
    supported = IMAGE_SUFFIXES if source == "images" else VIDEO_SUFFIXES
    unsupported = UNSUPPORTED_SUFFIXES[source]
    base = root.parent if root.is_file() else root
    found: list[tuple[str, Path, str | None]] = []
    ignored = 0
    for path in _walk(root):
        suffix = path.suffix.lower()
        rel = path.relative_to(base).as_posix()
        if suffix in supported:
            found.append((rel, path, None))
        elif suffix in unsupported:
            found.append((rel, path, f"{suffix} files are not supported by the {source} source"))
        else:
            ignored += 1
    # clip_id is the path without its suffix; where two files differ only by suffix, keep it.
    stems = Counter(str(PurePosixPath(rel).with_suffix("")) for rel, _, _ in found)
    items = []
    for rel, path, problem in found:
        stem = str(PurePosixPath(rel).with_suffix(""))
        items.append(
            InputItem(
                input_path=rel,
                abs_path=str(path.resolve()),
                source=source,
                clip_id=stem if stems[stem] == 1 else rel,
                kind=KIND[source],
                split=split,
                error_type="unsupported_format" if problem else None,
                error_message=problem,
            )
        )
    return Listing(items=items, ignored=ignored)
