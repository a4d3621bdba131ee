"""Dataset manifests: one YAML per source that says where its files are, how they split, where the
data set comes from. The built-in ones ship in ``disco/manifests/``; ``--manifest my.yaml``
describes a new data set the same way, with no code.

A layout's ``pattern`` is a path under ``--input`` whose parts are globs (``*``, ``?``), where
``**`` stands for any number of folders and ``{clip}`` for one name part that becomes the clip id.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from disco.pipeline.errors import ConfigError
from disco.pipeline.store.manifest import DEFAULT_SPLIT_RULE  # the name of a manifest's own split rule

LAYOUT_KINDS = ("images", "video", "frames", "webdataset", "parquet")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
CLIP_TEMPLATES = ("{clip}", "{stem}", "{path}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Layout(_Strict):
    """One way the data set's files can lie under ``--input``."""

    name: str
    kind: Literal["images", "video", "frames", "webdataset", "parquet"]
    pattern: list[str] = Field(min_length=1)
    # File suffixes kept among the pattern's matches (default: the kind's media suffixes).
    suffixes: Optional[list[str]] = None
    # Every row of this layout gets this split (else the data set's split rule decides).
    split: Optional[Literal["train", "test"]] = None
    clip_id: Literal["{clip}", "{stem}", "{path}"] = "{clip}"
    # frames: the frame rate the folder's frames were taken at.
    fps: Optional[float] = Field(default=None, gt=0)
    # images: COCO-style annotation files (first existing one is read) and their format.
    annotations: Optional[list[str]] = None
    annotation_format: Optional[Literal["coco"]] = None
    # images: a per-image file beside the image (``{clip}`` filled in), e.g. DeepFashion2's annos.
    sidecar: Optional[str] = None
    # parquet: candidate names of the column holding image paths, and of an optional id column.
    path_column: list[str] = ["path", "image_path", "filepath", "file_path"]
    key_column: list[str] = ["key"]
    notes: Optional[str] = None

    @field_validator("pattern", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("pattern")
    @classmethod
    def _relative(cls, patterns):
        for p in patterns:
            parts = p.split("/")
            if p.startswith("/") or ".." in parts or "" in parts:
                raise ValueError(f"pattern {p!r} must be a relative path under --input without '..' or '//'")
            if p.count("{clip}") > 1 or re.search(r"\{(?!clip\})", p):
                raise ValueError(f"pattern {p!r}: the only placeholder is a single {{clip}}")
        return patterns

    @field_validator("suffixes")
    @classmethod
    def _dotted(cls, suffixes):
        if suffixes is None:
            return None
        return [s.lower() if s.startswith(".") else "." + s.lower() for s in suffixes]

    @model_validator(mode="after")
    def _consistent(self):
        has_clip = all("{clip}" in p for p in self.pattern)
        if self.clip_id == "{clip}" and not has_clip and self.kind not in ("webdataset", "parquet"):
            raise ValueError(f"layout {self.name!r}: clip_id is {{clip}} but a pattern has no {{clip}} placeholder")
        if self.kind == "frames" and not has_clip:
            raise ValueError(f"layout {self.name!r}: a frames layout needs {{clip}} (the sequence folder) in its pattern")
        if self.kind == "frames" and self.fps is None:
            raise ValueError(f"layout {self.name!r}: a frames layout needs fps (the rate its frames were taken at)")
        if self.annotation_format and not self.annotations:
            raise ValueError(f"layout {self.name!r}: annotation_format without annotations")
        if self.annotations and not self.annotation_format:
            raise ValueError(f"layout {self.name!r}: annotations need annotation_format (coco)")
        return self


class SplitRule(_Strict):
    default: Literal["train", "test"] = "train"
    # Clip ids that are held out; every other clip gets ``default`` (unless its layout fixes one).
    test: list[str] = []
    # Clip ids the rule leaves out of both splits (they are not listed at all).
    exclude: list[str] = []
    rule: str = Field(min_length=1)

    @field_validator("test", "exclude", mode="before")
    @classmethod
    def _strings(cls, value):
        # YAML reads 00002 as an int unless quoted; clip ids are names, so keep them as written.
        return [str(v) for v in (value or [])]

    @cached_property
    def held_out(self) -> frozenset[str]:
        """``test`` as a set: looked up once per listed item (a list of 20 K ids, searched for each
        of a million items, kept the driver busy for minutes)."""
        return frozenset(self.test)


class Splits(SplitRule):
    """The data set's own split rule, and other rules by name (``preprocess --split-rule NAME``),
    e.g. the one an official code base used."""

    named: dict[str, SplitRule] = {}

    @field_validator("named")
    @classmethod
    def _names(cls, named):
        for name in named:
            if not NAME_RE.match(name) or name == DEFAULT_SPLIT_RULE:
                raise ValueError(f"split rule name {name!r} must be lower-case letters, digits, '-' or '_', "
                                 f"and not {DEFAULT_SPLIT_RULE!r}")
        return named


class Expected(_Strict):
    clips: Optional[int] = Field(default=None, ge=0)
    images: Optional[int] = Field(default=None, ge=0)
    frames: Optional[int] = Field(default=None, ge=0)
    notes: Optional[str] = None


class Provenance(_Strict):
    homepage: str
    paper: Optional[str] = None
    license: Optional[str] = None
    download: Optional[str] = None
    notes: Optional[str] = None


class DatasetManifest(_Strict):
    name: str
    description: str
    provenance: Provenance
    layouts: list[Layout] = Field(min_length=1)
    splits: Splits
    expected: Expected = Expected()
    # Where the manifest was read from, and a digest of its text (a resume must use the same one).
    origin: str = ""
    digest: str = ""
    # Which split rule ``splits`` holds: the manifest's own, or one of its named rules.
    split_rule: str = DEFAULT_SPLIT_RULE

    @field_validator("name")
    @classmethod
    def _name(cls, name):
        if not NAME_RE.match(name):
            raise ValueError(f"name {name!r} must be lower-case letters, digits, '-' or '_'")
        return name

    @model_validator(mode="after")
    def _unique_layouts(self):
        names = [layout.name for layout in self.layouts]
        if len(set(names)) != len(names):
            raise ValueError(f"layout names must be unique, got {names}")
        return self

    def split_of(self, clip_id: str, layout: Layout) -> str:
        if layout.split is not None:
            return layout.split
        return "test" if clip_id in self.splits.held_out else self.splits.default

    def split_rules(self) -> list[str]:
        return [DEFAULT_SPLIT_RULE, *self.splits.named]

    def with_split_rule(self, name: str | None) -> "DatasetManifest":
        """This manifest with split rule ``name`` (None or ``default``: its own) in ``splits``."""
        if name in (None, DEFAULT_SPLIT_RULE):
            return self
        if name not in self.splits.named:
            raise ConfigError(f"--split-rule {name!r}: the {self.name} manifest has the split rules "
                              f"{', '.join(self.split_rules())}")
        rule = self.splits.named[name]
        return self.model_copy(update={"splits": Splits(**rule.model_dump(), named=self.splits.named),
                                       "split_rule": name})

    def summary(self) -> dict:
        """What the output manifest records about the data set."""
        return {
            "name": self.name, "manifest": self.origin, "sha256": self.digest,
            "provenance": self.provenance.model_dump(exclude_none=True),
            "split_rule_name": self.split_rule, "split_rule": self.splits.rule, "test_clips": len(self.splits.test),
            "excluded_clips": len(self.splits.exclude),
            "expected": self.expected.model_dump(exclude_none=True),
        }


def _format_errors(origin: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        problems.append(f"{where}: {err['msg']}")
    return f"invalid dataset manifest {origin}: " + "; ".join(problems)


def parse_manifest(text: str, origin: str) -> DatasetManifest:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"dataset manifest {origin} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"dataset manifest {origin} must be a YAML mapping with name, layouts, splits...")
    data = {**data, "origin": origin, "digest": hashlib.sha256(text.encode()).hexdigest()}
    try:
        return DatasetManifest.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(origin, exc)) from None


def load_manifest(path: str | Path) -> DatasetManifest:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset manifest {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset manifest {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_manifest(text, str(path))


def builtin_names() -> list[str]:
    folder = resources.files("disco.manifests")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_manifest(source: str) -> DatasetManifest:
    entry = resources.files("disco.manifests") / f"{source}.yaml"
    if not entry.is_file():
        raise ConfigError(f"no built-in manifest for source {source!r}; built-in: {', '.join(builtin_names())}")
    return parse_manifest(entry.read_text(encoding="utf-8"), f"disco/manifests/{source}.yaml")
