"""Finding a layout's files: a pattern is walked one path part at a time with ``os.scandir``, so
folders that cannot match (TikTok's ``masks/``, SHHQ's ``segments/``) are never entered and
nothing is opened or decoded to list hundreds of thousands of files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from disco.pipeline.store.output import JOURNAL_FILE


@dataclass(frozen=True)
class Match:
    rel: str  # POSIX path relative to the root
    clip: str | None  # what {clip} matched


# A file suffix at the end of a pattern part: matched in any case (a camera's IMG_0001.JPG for
# "*.jpg", a phone's .MP4), as the source's own suffix check reads suffixes.
_SUFFIX = re.compile(r"\.[A-Za-z0-9]+\Z")


@lru_cache(maxsize=256)
def _part_regex(part: str) -> re.Pattern:
    suffix = _SUFFIX.search(part)
    if suffix:
        head = _part_regex(part[:suffix.start()]).pattern[:-len(r"\Z")]
        return re.compile(head + "(?i:" + re.escape(suffix.group()) + r")\Z")
    out = []
    i = 0
    while i < len(part):
        if part.startswith("{clip}", i):
            out.append("(?P<clip>[^/]+)")
            i += len("{clip}")
            continue
        ch = part[i]
        out.append("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _is_literal(part: str) -> bool:
    return not any(c in part for c in "*?{")


def _entries(folder: str, root: str | None = None) -> list[os.DirEntry]:
    """The folder's entries, hidden ones aside; none in a disco output below ``root`` (a run's
    own, under its input)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    if folder != root and any(e.name == JOURNAL_FILE for e in entries):
        return []
    return entries


def _is(entry: os.DirEntry | None, path: str, kind: str) -> bool:
    """``is_file`` / ``is_dir`` that answers False for a link that cannot be followed (a loop
    raises instead of answering), so one bad link never stops the listing."""
    try:
        if entry is not None:
            return entry.is_file() if kind == "file" else entry.is_dir()
        return os.path.isfile(path) if kind == "file" else os.path.isdir(path)
    except OSError:
        return False


def iter_matches(root: str, pattern: str):
    """Yield a ``Match`` for every file under ``root`` that ``pattern`` describes, in sorted order."""
    parts = pattern.split("/")
    seen_dirs: set[tuple[int, int]] = set()
    try:  # the root itself: a link back up to it is not a new folder
        st = os.stat(root)
        seen_dirs.add((st.st_dev, st.st_ino))
    except OSError:
        pass

    def walk(folder: str, index: int, rel: tuple[str, ...], clip: str | None):
        part = parts[index]
        last = index == len(parts) - 1
        if part == "**":
            # Zero folders, then one more folder at a time (a symlinked loop is entered once).
            yield from walk(folder, index + 1, rel, clip)
            for entry in _entries(folder, root):
                if _is(entry, entry.path, "dir"):
                    try:
                        st = entry.stat()
                    except OSError:  # gone since the listing (a stale NFS handle): passed over
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in seen_dirs:
                        continue
                    seen_dirs.add(key)
                    yield from walk(entry.path, index, rel + (entry.name,), clip)
            return
        literal = os.path.join(folder, part) if _is_literal(part) else None
        if literal is not None and (os.path.lexists(literal) or not (last and _SUFFIX.search(part))):
            # One lookup, not a listing of the folder; a file named in another case (LIST.PARQUET)
            # is looked for in the listing only where the name as written is not there.
            candidates = [(part, literal, None, clip)] if os.path.lexists(literal) else []
        else:
            regex = _part_regex(part)
            candidates = []
            for entry in _entries(folder, root):
                m = regex.match(entry.name)
                if m:
                    candidates.append((entry.name, entry.path, entry, m.groupdict().get("clip") or clip))
        for name, path, entry, found in candidates:
            # DirEntry answers from the directory listing itself: no stat per file.
            if last:
                if _is(entry, path, "file"):
                    yield Match("/".join(rel + (name,)), found)
            elif _is(entry, path, "dir"):
                yield from walk(path, index + 1, rel + (name,), found)

    yield from walk(root, 0, (), None)
