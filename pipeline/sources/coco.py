"""COCO annotations: how many people each image holds, by file name."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from disco.pipeline.errors import ConfigError


def person_counts(path: Path, single_person: bool = False) -> dict[str, int]:
    """file_name -> number of non-crowd person annotations (0 for images without any; for every
    image of a file whose categories hold no person, which ``single_person`` refuses)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        categories = data.get("categories")
        # COCO's person is category 1; a file that lists its categories without one holds no person.
        person_ids = {c["id"] for c in categories if c.get("name") == "person"} if categories else {1}
        if categories and not person_ids and single_person:
            names = ", ".join(sorted(str(c.get("name")) for c in categories)[:5])
            raise ConfigError(f"the COCO annotations {path} have no \"person\" category (they list {names}"
                              f"{', ...' if len(categories) > 5 else ''}): --coco-single-person counts persons")
        images = {img["id"]: img["file_name"] for img in data["images"]}
        counts = Counter(
            a["image_id"] for a in data.get("annotations", [])
            if a.get("category_id") in person_ids and not a.get("iscrowd", 0)
        )
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the COCO annotations {path}: {type(exc).__name__}: {exc}") from None
    return {name: counts.get(image_id, 0) for image_id, name in images.items()}
