"""What every matting and pose backend returns, and how a frame is judged to hold a person."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from disco.pipeline.store.schema import PERSON_ALPHA


@dataclass
class Matte:
    alpha: np.ndarray  # H x W uint8, 0..255
    score: float  # detector confidence of the person (max over merged persons)
    count: int  # persons detected; all of them are merged into ``alpha``
    model: str = ""  # which model drew ``alpha`` (for the record and for tests)


@dataclass
class Pose:
    body: np.ndarray  # 18 x 3 float32, body-18 order, pixels
    hands: np.ndarray | None = None  # 2 x 21 x 3 (left, right)
    face: np.ndarray | None = None


EMPTY_BODY = np.zeros((18, 3), dtype=np.float32)


def mask_area(alpha: np.ndarray) -> float:
    return float(np.count_nonzero(alpha >= PERSON_ALPHA)) / alpha.size


def person_present(matte: Matte, min_score: float, min_area: float) -> bool:
    """Both signals must agree: a confident detection and a mask of real size (DESIGN.md)."""
    return matte.count > 0 and matte.score >= min_score and mask_area(matte.alpha) >= min_area
