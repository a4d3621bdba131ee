"""How a data folder's ``pose`` pictures were drawn, and drawing a row's pose from its keypoints.

The stored keypoints (``body_keypoints``, ``hand_keypoints``, ``face_keypoints``, pixels of the
stored image) are the truth; the ``pose`` PNG is a cache of one rendering of them, the one the
preprocessing run's ``--pose-style`` / ``--hands`` asked for (its ``manifest.json`` records them).
A consumer that wants another drawing (a training run, generate, evaluate) draws it from the
keypoints with the one renderer (``pipeline/annotators/render.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.render import render_pose

MANIFEST_FILE = "manifest.json"
# What `disco-cli preprocess` draws when nothing is said (PreprocessConfig's defaults); also the
# setting of a data folder without a manifest and of a run that recorded none.
DEFAULT_STYLE, DEFAULT_HANDS = "openpose", True
# The size and rate preprocess stores frames at by default (--max-side, --fps).
DEFAULT_MAX_SIDE, DEFAULT_FPS = 512, 30.0
CURRENT_RENDERER = 2  # PreprocessConfig.pose_renderer: the disco drawing's version written today
KEYPOINT_COLUMNS = ("body_keypoints", "hand_keypoints", "face_keypoints")


@dataclass(frozen=True)
class DataPose:
    """How one data folder's ``pose`` pictures were drawn."""

    style: str = DEFAULT_STYLE
    hands: bool = DEFAULT_HANDS
    keypoints: bool = True  # False: preprocessed with --pose none (no pose picture, no keypoints)
    face: bool = False  # face points found and drawn (--face)
    # The longest side frames were stored at (skeletons are drawn at the stored size: lines and
    # joints are fixed pixel counts) and the rate videos were taken at.
    max_side: int = DEFAULT_MAX_SIDE
    fps: float = DEFAULT_FPS


def data_pose(folder: str | Path, _depth: int = 0) -> DataPose:
    """The pose drawing ``folder``'s manifest recorded; of a folder whose first run is still
    writing it (no manifest yet), its journal's options; the preprocessing defaults without either."""
    path = Path(folder) / MANIFEST_FILE
    if path.exists():
        from disco.pipeline.store.manifest import read_manifest

        manifest = read_manifest(path)
    else:
        from disco.pipeline.store.output import journal_params

        params = journal_params(folder)
        if params is None:
            return DataPose()
        if params.get("mode") == "triplets" and params.get("input") and _depth < 8:
            from disco.pipeline.cluster import identity_path

            source = identity_path(params["input"])  # filter-humans still writing: its rows are its source's
            return data_pose(source, _depth + 1) if source is not None else DataPose()
        # A run writing now draws with today's renderer (its options do not name it).
        manifest = {"parameters": {"pose_renderer": CURRENT_RENDERER, **params}}
    params = manifest.get("parameters") or {}
    source_path = (manifest.get("filtered_from") or {}).get("path")
    if source_path and not {"max_side", "fps", "face"} <= set(params) and Path(source_path, MANIFEST_FILE).exists() \
            and _depth < 8:  # (a chain of filters; a loop of hand-edited manifests stops)
        # A filter-humans output written before it carried these: its source's (the same rows).
        inherited = data_pose(source_path, _depth + 1)
        params = {"max_side": inherited.max_side, "fps": inherited.fps, "face": inherited.face, **params}
    backends = params.get("backends") or manifest.get("backends") or {}
    backend = backends.get("pose")
    if isinstance(backend, dict):  # what preprocess writes: {"name": ..., ...} per stage
        backend = backend.get("name")
    source = backends
    while backend is None and isinstance(source.get("source_backends"), dict):
        # filter-humans of a triplets folder (of a filtered one, ...): no model ran, its source's did
        source = source["source_backends"]
        backend = source.get("pose")
        backend = backend.get("name") if isinstance(backend, dict) else backend
    style = params.get("pose_style", DEFAULT_STYLE)
    if style == "disco" and int(params.get("pose_renderer") or 1) < 2:
        style = "disco-v1"  # the earlier drawing of that name: never what a reader asks for, so redrawn
    return DataPose(style=style, hands=bool(params.get("hands", DEFAULT_HANDS)), keypoints=backend != "none",
                    face=bool(params.get("face", False)), max_side=int(params.get("max_side") or DEFAULT_MAX_SIDE),
                    fps=float(params.get("fps") or DEFAULT_FPS))


def same_drawing(data: DataPose, style: str, hands: bool, face: bool | None = None) -> bool:
    """Whether ``data``'s stored pictures are what ``style`` / ``hands`` draws (the disco style
    draws no hands, so there the hands setting does not matter); ``face``: and with or without
    face points (None: either)."""
    return (data.style == style and (style == "disco" or data.hands == hands)
            and (face is None or style == "disco" or data.face == face))


def row_pose(width: int, height: int, body, hands, face, style: str, with_hands: bool) -> np.ndarray:
    """One row's pose picture (H x W x 3 uint8 RGB) drawn from its stored keypoints."""
    if body is None:
        raise ValueError("the row has no body keypoints to draw its pose from")
    body = np.asarray(body, np.float32).reshape(18, 3)
    hands = np.asarray(hands, np.float32).reshape(2, 21, 3) if with_hands and hands is not None else None
    face = np.asarray(face, np.float32).reshape(-1, 3) if face is not None else None
    return render_pose(width, height, body, hands, style=style, face=face)
