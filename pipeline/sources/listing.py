"""Listing a data set from its manifest: one ``InputItem`` per still or video, per frame folder,
per tar shard, or per row of a Parquet file of paths. Nothing is decoded to list."""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

from disco.pipeline.cluster import URL
from disco.pipeline.errors import ConfigError, display_path, first_line
from disco.pipeline.sources.coco import person_counts
from disco.pipeline.sources.walk import Match, iter_matches
from disco.pipeline.store.schema import payload
from disco.pipeline.sources.dataset_manifest import DatasetManifest, Layout
from disco.pipeline.sources.generic import (
    IMAGE_SUFFIXES,
    UNSUPPORTED_SUFFIXES,
    VIDEO_SUFFIXES,
    InputItem,
    Listing,
    path_fields,
)

DEFAULT_SUFFIXES = {
    "images": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES, "frames": IMAGE_SUFFIXES,
    "webdataset": frozenset({".tar"}), "parquet": frozenset({".parquet"}),
}
UNSUPPORTED = {"images": UNSUPPORTED_SUFFIXES["images"], "video": UNSUPPORTED_SUFFIXES["video"]}
ITEM_KIND = {"images": "image", "video": "video", "frames": "frames", "webdataset": "tar", "parquet": "image"}


def natural_key(name: str):
    """0010.png after 0009.png, and 10.png after 9.png."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# Plain string operations on POSIX relative paths: pathlib objects cost several times more, and
# listing runs over hundreds of thousands of files.
def _name(rel: str) -> str:
    return rel.rpartition("/")[2]


def _suffix(rel: str) -> str:
    return os.path.splitext(_name(rel))[1].lower()


def _without_suffix(rel: str) -> str:
    folder, sep, name = rel.rpartition("/")
    return folder + sep + os.path.splitext(name)[0]


def clip_of(layout: Layout, match: Match) -> str:
    if layout.clip_id == "{clip}" and match.clip is not None:
        return match.clip
    if layout.clip_id == "{stem}":
        return _name(match.rel).split(".")[0]
    return _without_suffix(match.rel)


def _matches(root: Path, pattern: str):
    if root.is_file():
        # A single file passed as --input: match its name against the pattern's last part.
        parts = [p for p in pattern.split("/") if p != "**"]
        if len(parts) == 1:
            yield from (m for m in iter_matches(str(root.parent), parts[0]) if m.rel == root.name)
        return
    yield from iter_matches(str(root), pattern)


class _Lister:
    def __init__(self, manifest: DatasetManifest, root: Path, source: str, split_override: str | None,
                 coco_single_person: bool):
        self.manifest = manifest
        self.root = Path(root)
        self.base = self.root.parent if self.root.is_file() else self.root
        self.base_abs = str(self.base.resolve())  # once: resolving every path costs a syscall per part
        self.source = source
        self.split_override = split_override
        self.coco_single_person = coco_single_person
        self.items: list[InputItem] = []
        self.ignored = 0
        self.filtered: Counter = Counter()
        self.by_layout: Counter = Counter()
        self.notes: Counter = Counter()
        self.seen: set[str] = set()
        self.row_targets: dict[str, Path] = {}  # a Parquet row's input name -> the file it names
        self.row_files: set[Path] = set()  # the files Parquet rows named (normalised paths)

    def split(self, clip: str, layout: Layout) -> str:
        return self.split_override or self.manifest.split_of(clip, layout)

    def item(self, layout: Layout, rel: str, clip: str, kind: str, extra: dict | None = None,
             error: tuple[str, str] | None = None, abs_path: str | None = None) -> InputItem:
        self.by_layout[layout.name] += 1
        # Names that are not valid UTF-8 are shown escaped; raw_path keeps the bytes to open.
        return InputItem(
            input_path=display_path(rel), **path_fields(abs_path or f"{self.base_abs}/{rel}"), source=self.source,
            clip_id=display_path(clip), kind=kind, split=self.split(clip, layout),
            error_type=error[0] if error else None, error_message=error[1] if error else None,
            extra=payload(**(extra or {})),
        )

    def run(self) -> Listing:
        for layout in self.manifest.layouts:
            matches = []
            for pattern in layout.pattern:
                for match in _matches(self.root, pattern):
                    if match.rel not in self.seen:
                        self.seen.add(match.rel)
                        matches.append(match)
            getattr(self, f"_{layout.kind}")(layout, matches)
        self._exclude()
        self._dedupe_clip_ids()
        return Listing(items=self.items, ignored=self.ignored, filtered=dict(self.filtered),
                       dataset={**self.manifest.summary(), "listed_by_layout": dict(self.by_layout),
                                "notes": dict(self.notes)})

    def _media(self, layout: Layout, matches: list[Match]):
        """Keep the layout's media; unsupported media become errors, anything else is ignored."""
        allowed = set(layout.suffixes or DEFAULT_SUFFIXES[layout.kind])
        unsupported = UNSUPPORTED.get(layout.kind, frozenset())
        for match in matches:
            suffix = _suffix(match.rel)
            if suffix in allowed:
                yield match, None
            elif suffix in unsupported:
                yield match, ("unsupported_format", f"{suffix} files are not supported by the {self.source} source")
            else:
                self.ignored += 1

    def _images(self, layout: Layout, matches: list[Match]):
        counts = self._annotations(layout) if layout.annotations else None
        for match, error in self._media(layout, matches):
            clip = clip_of(layout, match)
            extra = {}
            if counts is not None:
                persons = counts.get(_name(match.rel))
                extra["annotated_persons"] = persons
                if self.coco_single_person and persons != 1:
                    self.filtered["not_single_person" if persons is not None else "not_annotated"] += 1
                    continue
            if layout.sidecar:
                has = (self.base / layout.sidecar.replace("{clip}", match.clip or clip)).is_file()
                extra["has_annotation"] = has
                if not has:
                    self.notes["missing_annotation"] += 1
            self.items.append(self.item(layout, match.rel, clip, "image", extra, error))

    def _video(self, layout: Layout, matches: list[Match]):
        for match, error in self._media(layout, matches):
            self.items.append(self.item(layout, match.rel, clip_of(layout, match), "video", None, error))

    def _frames(self, layout: Layout, matches: list[Match]):
        folders: dict[tuple[str, str], list[str]] = defaultdict(list)
        for match, error in self._media(layout, matches):
            if error:
                self.ignored += 1
                continue
            folder, _, name = match.rel.rpartition("/")
            folders[(match.clip, folder)].append(name)
        for (clip, folder), names in sorted(folders.items(), key=lambda kv: natural_key(kv[0][1])):
            names.sort(key=natural_key)
            self.items.append(self.item(layout, folder, clip, "frames",
                                         {"frames": [os.fsencode(n) for n in names], "fps": layout.fps}))

    def _webdataset(self, layout: Layout, matches: list[Match]):
        for match, error in self._media(layout, matches):
            self.items.append(self.item(layout, match.rel, clip_of(layout, match), "tar", None, error))

    def _parquet(self, layout: Layout, matches: list[Match]):
        import pyarrow.parquet as pq

        for match, _ in self._media(layout, matches):
            table_path = Path(self.base_abs) / match.rel  # its relative paths under the folder's real place
            try:
                names = pq.read_schema(table_path).names
            except Exception as exc:
                raise ConfigError(f"cannot read the Parquet file {table_path}: {exc}") from None
            path_col = next((c for c in layout.path_column if c in names), None)
            if path_col is None and table_path.with_suffix(".tar").is_file():
                # img2dataset writes NNNNN.parquet (url, key, caption, status) beside each NNNNN.tar
                # shard: the shard's own metadata, not a list of local images.
                self.notes["shard_metadata_parquet"] += 1
                continue
            if path_col is None:
                raise ConfigError(f"{table_path} has no column naming image paths; looked for "
                                  f"{', '.join(layout.path_column)} (columns: {', '.join(names)})")
            key_col = next((c for c in layout.key_column if c in names), None)
            # Only the path (and key) columns are read, never the rest of the metadata.
            try:
                table = pq.read_table(table_path, columns=[path_col] + ([key_col] if key_col else []))
            except Exception as exc:  # pages damaged behind a good footer
                raise ConfigError(f"cannot read the Parquet file {table_path}: {first_line(exc)}") from None
            paths = table.column(path_col).to_pylist()
            keys = table.column(key_col).to_pylist() if key_col else [None] * len(paths)
            folder = table_path.parent
            # A row's relative path is the file's beside this table, named as written; where an
            # earlier table's row took that name for another file (two tables' img/1.jpg), by its
            # place under --input (B/img/1.jpg): one journal entry and one sample id held both.
            prefix = PurePosixPath(match.rel).parent.as_posix()
            for path, key in zip(paths, keys):
                if isinstance(path, bytes):
                    path = os.fsdecode(path)
                if not path:
                    self.notes["empty_path"] += 1
                    continue
                if not isinstance(path, str):
                    raise ConfigError(f"{table_path}: the column {path_col} holds {type(path).__name__} values, "
                                      "not paths")
                error = None
                if URL.match(path):
                    target, name = Path(path), path
                    error = ("remote_url", f"{path.split(':', 1)[0]}:// URLs are not read; download the images to a "
                                           "folder every node mounts first (img2dataset writes tar shards: --source laion)")
                else:
                    target = Path(os.path.normpath(path if os.path.isabs(path) else folder / path))
                    name = path
                    if self._named(name) not in (None, target):
                        name = f"{prefix}/{path}" if prefix != "." and not os.path.isabs(path) else str(target)
                        if self._named(name) not in (None, target):
                            name = str(target)
                # The same file twice (under one name or two: img/1.jpg, A/img/1.jpg, its absolute
                # path; a file a pattern listed too): one input.
                if self._named(name) is not None or target in self.row_files or self._named(
                        os.path.relpath(target, self.base_abs)) == target:
                    self.notes["duplicate_path"] += 1
                    continue
                self.row_targets[name] = target
                self.row_files.add(target)
                self.seen.add(name)  # taken: a later layout's match of that name is not listed again
                clip = str(key) if key is not None else _without_suffix(path).lstrip("/")
                # Not stat-ed here (millions of rows, one round trip each on NFS): a file that is
                # missing is its row's missing_file error when the actor opens it.
                if error is None and target.suffix.lower() not in IMAGE_SUFFIXES:
                    error = ("unsupported_format", f"{target.suffix} files are not supported by the {self.source} source")
                self.items.append(self.item(layout, name, clip, "image", None, error, abs_path=str(target)))

    def _named(self, name: str) -> Path | None:
        """The file the input name ``name`` is taken for already (a Parquet row's, or a file a
        pattern matched), or None."""
        if name in self.row_targets:
            return self.row_targets[name]
        return Path(os.path.normpath(Path(self.base_abs) / name)) if name in self.seen else None

    def _annotations(self, layout: Layout) -> dict[str, int] | None:
        for rel in layout.annotations:
            path = self.base / rel
            if path.is_file():
                self.notes[f"annotations:{rel}"] = 1
                return person_counts(path, self.coco_single_person)
        if self.coco_single_person:
            raise ConfigError(f"--coco-single-person needs COCO annotations; none of "
                              f"{', '.join(layout.annotations)} exists under {self.base}")
        return None

    def _exclude(self):
        """Clips the split rule leaves out of both splits (a --split for every row keeps them)."""
        excluded = set(self.manifest.splits.exclude)
        if excluded and not self.split_override:
            kept = [i for i in self.items if i.clip_id not in excluded]
            if len(kept) < len(self.items):
                self.filtered["excluded_by_split_rule"] += len(self.items) - len(kept)
            self.items = kept

    def _dedupe_clip_ids(self):
        # Two files with the same clip id would share sample ids: keep their full paths instead.
        counts = Counter(i.clip_id for i in self.items)
        for item in self.items:
            if counts[item.clip_id] > 1:
                item.clip_id = item.input_path


def list_dataset(manifest: DatasetManifest, root: Path, source: str, *, split_override: str | None = None,
                 coco_single_person: bool = False) -> Listing:
    return _Lister(manifest, root, source, split_override, coco_single_person).run()
