"""The pose picture a training run uses: its style and hands setting, and when it is drawn from
the stored keypoints rather than read from the stored ``pose`` PNG (``pipeline/store/pose.py``).

A run whose setting equals a data folder's reads that folder's pictures as they are; for the
other folders the decode stage draws the picture from the keypoints with the one renderer, at the
stored image's size, before the crop (``decode.py``).
"""

from __future__ import annotations

from pathlib import Path

from disco.pipeline.annotators.render import POSE_STYLES
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.pose import DEFAULT_HANDS, DEFAULT_STYLE, data_pose, same_drawing


def resolve_pose_setting(folders: list[str], style: str | None, hands: bool | None) -> tuple[str, bool]:
    """The run's (pose style, hands): what was asked, else what the data folders' manifests
    recorded; folders that disagree with nothing asked are a one-line error."""
    if style is not None and style not in POSE_STYLES:
        raise ConfigError(f"unknown --pose-style {style!r}; choose openpose or disco")
    settings = {folder: data_pose(folder) for folder in folders}
    if style is None:
        styles = sorted({s.style for s in settings.values()})
        if len(styles) > 1:
            raise ConfigError(f"the --data folders were drawn in different pose styles ({', '.join(styles)}); "
                              "choose one with --pose-style openpose|disco")
        style = styles[0] if styles else DEFAULT_STYLE
    if hands is None:
        # Hands matter only where they are drawn: the disco style never draws them.
        values = sorted({s.hands for s in settings.values() if s.style == "openpose"} or
                        {s.hands for s in settings.values()})
        if len(values) > 1 and style == "openpose":
            raise ConfigError("the --data folders disagree on hands (preprocessed with and without --hands); "
                              "choose one with --hands or --no-hands")
        hands = values[0] if values else DEFAULT_HANDS
    return style, bool(hands)


def render_plan(folders: list[str], files: list[str], style: str, hands: bool) -> dict | None:
    """What the training stream renders: ``None`` when every folder's stored pictures fit the
    run's setting, else ``{"style", "hands", "files"}`` with the shard files (of ``files``, the
    index's) of the folders whose pictures must be rendered from their keypoints."""
    render = []
    for folder in folders:
        data = data_pose(folder)
        if same_drawing(data, style, hands):
            continue
        if not data.keypoints:
            raise ConfigError(f"--data {folder} was preprocessed with --pose none: it has no keypoints to draw "
                              f"a {style} pose from")
        root = Path(folder).resolve()
        render += [f for f in files if Path(f).resolve().is_relative_to(root)]
    if not render:
        return None
    return {"style": style, "hands": hands, "files": sorted(render)}
