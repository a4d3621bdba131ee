"""Listing the inputs of the generic ``video`` and ``images`` sources."""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from disco.pipeline.errors import display_path, error_type_of
from disco.pipeline.io_threads import map_in_threads
from disco.pipeline.store.output import JOURNAL_FILE
from disco.pipeline.store.schema import payload

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"})
# Media we recognise but cannot decode: listed as errors so the user sees them, not dropped silently.
UNSUPPORTED_SUFFIXES = {
    "images": frozenset({".heic", ".heif", ".svg", ".cr2", ".nef", ".arw", ".dng", ".raf", ".orf", ".jxl", ".psd"}),
    "video": frozenset({".swf", ".rm", ".rmvb", ".vob", ".gif"}),
}
# What to do instead, where there is something.
UNSUPPORTED_HINTS = {
    ".gif": "; an animated GIF is not read as a video: convert it (ffmpeg -i in.gif out.mp4), or use --source "
            "images to take its first frame as a still",
}
KIND = {"images": "image", "video": "video"}


@dataclass
class InputItem:
    input_path: str  # relative to --input, POSIX separators (``display_path``: always valid UTF-8)
    abs_path: str  # as text (``display_path``); open the file with ``local_path(item)``
    source: str
    clip_id: str
    kind: str  # image | video
    split: str
    error_type: str | None = None
    error_message: str | None = None
    # What the data set kind needs to plan and decode it: a ``PAYLOAD_TYPE`` record
    # (``store.schema.payload``), every field null for a plain video or image.
    extra: dict = field(default_factory=payload)
    # The exact path as bytes where its name is not valid UTF-8 (``abs_path`` then shows it
    # escaped); empty otherwise.
    raw_path: bytes = b""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Listing:
    items: list[InputItem]
    ignored: int  # files that are not media of this source (sidecars, notes...)
    filtered: dict = field(default_factory=dict)  # inputs left out on purpose at listing, by reason
    dataset: dict | None = None  # the data set manifest's summary, for the output manifest


def local_path(item: dict) -> str:
    """The path to open for a listed item (or a unit planned from one)."""
    return os.fsdecode(item["raw_path"]) if item.get("raw_path") else item["abs_path"]


def path_fields(path: str) -> dict:
    """``abs_path`` and ``raw_path`` of an ``InputItem`` for a file at ``path`` (made absolute,
    symlinks kept: the listing never resolves a link, so a link loop cannot stop it)."""
    full = os.path.abspath(path)
    text = display_path(full)
    return {"abs_path": text, "raw_path": b"" if text == full else os.fsencode(full)}


def file_problem(path: str) -> tuple[str, str] | None:
    """(error_type, message) for a listed name that cannot be read as a file: a dangling symbolic
    link, a link loop, a FIFO or device (opening one could block the run forever)."""
    return _checked_file(path)[0]


def _checked_file(path: str) -> tuple[tuple[str, str] | None, tuple | None]:
    """``file_problem``, and where it has none the file's identity: (device, inode, size, time),
    and whether it has several names (hard links)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if not os.path.islink(path):
            return (error_type_of(exc), exc.strerror or str(exc)), None
        if exc.errno == errno.ENOENT:
            return (error_type_of(exc), "a symbolic link to a missing file"), None
        return (error_type_of(exc), f"a symbolic link that cannot be followed ({exc.strerror})"), None
    if not stat.S_ISREG(info.st_mode):
        return ("not_a_regular_file", "not a regular file (a FIFO, socket or device); it was not opened"), None
    # (An inode number of 0 names no file: some FUSE and network mounts give every file that.)
    return None, ((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns), info.st_nlink > 1) if info.st_ino else None


SAME_FILE = "same_file_as_another_input"  # a link (or hard link) to a file listed under another name


def _walk(root: Path):
    """(path, problem) for every file under ``root``: the tree's own folders first, in sorted order
    (as it was always listed), then the folders linked into it (a collection gathered from links,
    as the data set layouts follow them), each real folder listed once (a link to a folder of the
    tree, or back up, adds nothing: its files keep their names). A folder that cannot be read is
    yielded with its problem (an errors row, not a silent gap)."""
    if root.is_file():
        yield root, None
        return
    failed: list[OSError] = []
    seen: set[tuple[int, int]] = set()
    links: list[str] = []

    def problems():
        while failed:
            exc = failed.pop()
            if exc.filename is not None and os.path.abspath(exc.filename) != os.path.abspath(root):
                yield Path(exc.filename), (error_type_of(exc), f"a folder that cannot be read ({exc.strerror or exc})")

    def walk(top, follow: bool):
        for dirpath, dirnames, filenames in os.walk(top, onerror=failed.append, followlinks=follow):
            yield from problems()
            try:
                info = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            if (info.st_dev, info.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((info.st_dev, info.st_ino))
            if JOURNAL_FILE in filenames and dirpath != str(top):  # a disco output below (a run's own): no inputs
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if not follow:  # entered after the whole tree: its own folders keep their names
                links.extend(os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            for name in sorted(filenames):
                if not name.startswith("."):
                    yield Path(dirpath) / name, None
        yield from problems()

    yield from walk(root, False)
    for link in links:
        yield from walk(link, True)


LISTING_STATS = 32


def list_inputs(source: str, root: Path, split: str) -> Listing:
    root = Path(root)
    supported = IMAGE_SUFFIXES if source == "images" else VIDEO_SUFFIXES
    unsupported = UNSUPPORTED_SUFFIXES[source]
    base = root.parent if root.is_file() else root
    # Files named under the folder's real place, as the data set listings and the workers' storage
    # check name it: a link to the share on the head (--input ~/data -> /mnt/nfs/data) need not
    # exist on the other nodes, whose units would all be missing_file rows.
    base_abs = base.resolve()
    found: list[tuple[str, Path, str | None]] = []
    ignored = 0
    checked: list[int] = []  # the entries of ``found`` whose file is checked (file_problem)
    for path, folder_problem in _walk(root):
        suffix = path.suffix.lower()
        rel = display_path(path.relative_to(base).as_posix())
        if folder_problem:
            found.append((rel, path, folder_problem))
        elif suffix in supported:
            checked.append(len(found))
            found.append((rel, path, None))
        elif suffix in unsupported:
            found.append((rel, path, ("unsupported_format", f"{suffix} files are not supported by the {source} "
                                                            f"source{UNSUPPORTED_HINTS.get(suffix, '')}")))
        else:
            ignored += 1
    # A stat per file, LISTING_STATS at once: one after the other, a million stills on NFS (half
    # a millisecond a stat) kept the driver listing for 8 minutes.
    problems = map_in_threads(_checked_file, [str(found[i][1]) for i in checked], LISTING_STATS, "disco-listing")
    named: dict[tuple[int, int], int] = {}  # a file's identity -> the entry of ``found`` that lists it
    twice: set[int] = set()
    for i, (problem, known) in zip(checked, problems):
        found[i] = (found[i][0], found[i][1], problem)
        if known is None:
            continue
        identity, linked = known
        first = named.setdefault(identity, i)
        if first == i:
            continue
        # One file under two names (a link beside it) is one input: by its own name. Only a name
        # that is a link, or a file with several: some mounts (9p, virtiofs) show the files of
        # several file systems on one device, where inode numbers repeat.
        first_link, this_link = os.path.islink(found[first][1]), os.path.islink(found[i][1])
        if not (linked or first_link or this_link):
            continue
        if first_link and not this_link:
            named[identity], i = i, first
        twice.add(i)
    if twice:
        found = [entry for i, entry in enumerate(found) if i not in twice]
    # clip_id is the path without its suffix; where two files differ only by suffix, keep it.
    stems = Counter(str(PurePosixPath(rel).with_suffix("")) for rel, _, _ in found)
    items = []
    for rel, path, problem in found:
        stem = str(PurePosixPath(rel).with_suffix(""))
        items.append(
            InputItem(
                input_path=rel,
                **path_fields(str(base_abs / path.relative_to(base))),
                source=source,
                clip_id=stem if stems[stem] == 1 else rel,
                kind=KIND[source],
                split=split,
                error_type=problem[0] if problem else None,
                error_message=problem[1] if problem else None,
            )
        )
    return Listing(items=items, ignored=ignored, filtered={SAME_FILE: len(twice)} if twice else {})


def ends_digest(path: str | os.PathLike, size: int, span: int = 1 << 20) -> str:
    """A hash of a file's first and last ``span`` bytes: a growing tar shard or a replaced video
    changes them, and it reads 2 MiB of a file, not all of it."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(span))
        if size > span:
            handle.seek(max(span, size - span))
            digest.update(handle.read(span))
    return digest.hexdigest()
