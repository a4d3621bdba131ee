"""Contact sheets: image | mask | foreground | background | pose for a few rows, as one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from disco.pipeline.store.encode import decode_picture
from disco.pipeline.store.reader import take_rows
from disco.pipeline.store.schema import PICTURE_COLUMNS

THUMB = 160
LABEL_H = 18


def _thumb(data: bytes | None, grayscale: bool) -> Image.Image:
    if data is None:
        tile = Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
        ImageDraw.Draw(tile).text((6, THUMB // 2 - 6), "(none)", fill=(200, 200, 200))
        return tile
    array = decode_picture(data, grayscale=grayscale)
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    tile = Image.new("RGB", (THUMB, THUMB))
    tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return tile


def contact_sheet(rows: pa.Table) -> Image.Image:
    """One line per row: its sample id above the five pictures."""
    records = rows.select(["sample_id", *PICTURE_COLUMNS]).to_pylist()
    cols = len(PICTURE_COLUMNS)
    line_h = THUMB + LABEL_H
    sheet = Image.new("RGB", (cols * THUMB, LABEL_H + max(1, len(records)) * line_h), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(PICTURE_COLUMNS):
        draw.text((c * THUMB + 4, 3), name, fill=(255, 255, 255))
    for r, record in enumerate(records):
        top = LABEL_H + r * line_h
        draw.text((4, top + 3), record["sample_id"], fill=(255, 255, 0))
        for c, name in enumerate(PICTURE_COLUMNS):
            sheet.paste(_thumb(record[name], grayscale=name == "mask"), (c * THUMB, top + LABEL_H))
    return sheet


def sample_indices(total: int, count: int) -> list[int]:
    """Evenly spread row indices, so a sheet shows the whole set, not only its first shard."""
    if total <= 0:
        return []
    count = min(count, total)
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, count)})


def write_contact_sheet(dataset, path: Path, count: int = 8) -> int:
    """Sample ``count`` rows of a pyarrow dataset into a PNG at ``path``; returns the rows shown."""
    total = dataset.count_rows()
    indices = sample_indices(total, count)
    rows = take_rows(dataset, indices, ["sample_id", *PICTURE_COLUMNS]) if indices else None
    image = contact_sheet(rows) if rows is not None else contact_sheet(pa.table({n: [] for n in ["sample_id", *PICTURE_COLUMNS]}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return len(indices)
