"""COCO annotations: how many people each image holds, by file name."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from disco.pipeline.errors import ConfigError


def person_counts(path: Path) -> dict[str, int]:
    """file_name -> number of non-crowd person annotations (0 for images without any)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        person_ids = {c["id"] for c in data.get("categories", []) if c.get("name") == "person"} or {1}
        images = {img["id"]: img["file_name"] for img in data["images"]}
        counts = Counter(
            a["image_id"] for a in data.get("annotations", [])
            if a.get("category_id") in person_ids and not a.get("iscrowd", 0)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the COCO annotations {path}: {type(exc).__name__}: {exc}") from None
    return {name: counts.get(image_id, 0) for image_id, name in images.items()}
