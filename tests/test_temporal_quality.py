"""Mask flicker and pose jitter: exact values on rows written by the real row builder, and the
report of `inspect` on a real preprocess output."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from disco.pipeline.annotators import Annotation
from disco.pipeline.annotators.base import Matte, Pose
from disco.pipeline.store.encode import build_row
from disco.pipeline.store.schema import TRIPLET_SCHEMA
from disco.pipeline.temporal_quality import mask_iou, pose_jitter, sequence_jitter, temporal_quality

SIZE = 64


def _skeleton(dx: float) -> np.ndarray:
    """Three joints: a 30 x 40 box (diagonal 50), shifted by ``dx`` pixels."""
    return np.array([[10 + dx, 10, 1.0], [40 + dx, 10, 1.0], [10 + dx, 50, 1.0]] + [[0, 0, 0]] * 15, np.float32)


def _row(clip: str, index: int, square_x: int, dx: float) -> dict:
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    alpha[10:30, square_x:square_x + 20] = 255  # a 20 x 20 person
    frame = np.full((SIZE, SIZE, 3), 90, np.uint8)
    unit = {"source": "video", "clip_id": clip, "split": "train", "input_path": f"{clip}.mp4"}
    return build_row(unit, index, index / 30, frame, Annotation(Matte(alpha, 0.9, 1), Pose(_skeleton(dx)), True),
                     image_format="png", jpeg_quality=90, pose_style="openpose", with_pose=True)


def test_the_measures_of_known_masks_and_skeletons():
    a = np.zeros((8, 8), bool)
    a[:, :4] = True
    b = np.roll(a, 2, axis=1)  # 4 columns each, 2 shared: IoU 2/6
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, a) == 1.0 and mask_iou(a & False, b & False) == 1.0
    # Every joint moves 5 px; the body is 50 px across: jitter 0.1.
    moved = _skeleton(0.0)
    moved[:3, :2] += (3.0, 4.0)
    assert pose_jitter(_skeleton(0.0), moved) == pytest.approx(0.1)
    # A joint missing in one of the frames does not count; one joint alone has no size.
    lost = moved.copy()
    lost[2] = 0
    assert pose_jitter(_skeleton(0.0), lost) == pytest.approx(5 / np.mean([30, 30]))
    lost[1] = 0
    assert pose_jitter(_skeleton(0.0), lost) is None
    assert sequence_jitter([_skeleton(0.0), _skeleton(0.0), moved]) == pytest.approx(0.05)


def test_only_consecutive_frames_of_one_clip_are_compared(tmp_path):
    # Clip a: frames 0, 1, 2 with the square 2 px further each frame (IoU 18/22) and the skeleton
    # 5 px further (jitter 0.1); frame 4 follows a gap, so it pairs with nothing.
    # Clip b: one still-like frame. Rows are written out of order, over two shards.
    rows = [_row("a", 2, 14, 10.0), _row("b", 0, 30, 0.0), _row("a", 0, 10, 0.0)]
    more = [_row("a", 4, 40, 40.0), _row("a", 1, 12, 5.0)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), tmp_path / "data" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(more, schema=TRIPLET_SCHEMA), tmp_path / "data" / "part-1.parquet")
    quality = temporal_quality(pads.dataset(tmp_path / "data", format="parquet"))
    assert (quality.clips, quality.pairs) == (1, 2)
    assert quality.mask_iou == pytest.approx(18 * 20 / (22 * 20))
    assert quality.pose_jitter == pytest.approx(0.1)
    # A limit on the frames read bounds the pairs.
    limited = temporal_quality(pads.dataset(tmp_path / "data", format="parquet"), max_frames=2)
    assert limited.pairs == 1


def test_stills_have_no_pairs(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [_row("x", 0, 10, 0.0), _row("y", 0, 10, 0.0)]
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), tmp_path / "data" / "part-0.parquet")
    quality = temporal_quality(pads.dataset(tmp_path / "data", format="parquet"))
    assert quality.pairs == 0 and quality.mask_iou is None and quality.pose_jitter is None
