"""How steady an output's annotations are through video: mask flicker and pose jitter.

Both compare each stored frame of a clip with the clip's previous frame (consecutive frame
indices only: a frame skipped for having no person breaks the pair). Stills have no pairs.

- mask flicker: the mean IoU of consecutive person masks (alpha >= 128); 1.0 is a mask that never
  flickers (nor moves).
- pose jitter: the mean displacement of a body joint between consecutive frames, over the joints
  found in both, divided by the body's size (the diagonal of the box around the joints found in
  both frames, averaged over the two): 0.0 is a skeleton that never moves.

The dancer's own motion counts in both, so compare backends (or smoothing settings) on the same
clips, as ``disco-cli inspect`` prints them for one output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc

from disco.pipeline.store.encode import decode_picture
from disco.pipeline.store.reader import take_rows
from disco.pipeline.store.schema import PERSON_ALPHA

MAX_FRAMES = 2000  # frames read by default: a few clips' worth say what a whole output would


@dataclass
class TemporalQuality:
    clips: int  # clips with at least one pair of consecutive frames
    pairs: int  # pairs of consecutive frames compared
    mask_iou: float | None  # mean IoU of consecutive masks
    pose_jitter: float | None  # mean joint displacement / body size (None: no joint in both frames)

    def to_dict(self) -> dict:
        return asdict(self)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree fully."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def pose_jitter(previous: np.ndarray, current: np.ndarray) -> float | None:
    """Mean displacement of the joints found in both skeletons (N x 3: x, y, confidence; a
    missing joint has confidence 0), divided by the body's size; None when fewer than two joints
    are in both (no size to divide by)."""
    both = (previous[:, 2] > 0) & (current[:, 2] > 0)
    if np.count_nonzero(both) < 2:
        return None
    sizes = [np.hypot(*np.ptp(points[both, :2], axis=0)) for points in (previous, current)]
    size = float(np.mean(sizes))
    if size <= 0:
        return None
    return float(np.linalg.norm(current[both, :2] - previous[both, :2], axis=1).mean() / size)


def sequence_jitter(skeletons: list[np.ndarray]) -> float | None:
    """Mean ``pose_jitter`` over a sequence of consecutive skeletons."""
    values = [j for a, b in zip(skeletons, skeletons[1:]) if (j := pose_jitter(a, b)) is not None]
    return float(np.mean(values)) if values else None


def temporal_quality(triplets, max_frames: int = MAX_FRAMES) -> TemporalQuality:
    """Mask flicker and pose jitter of an output's video clips (``triplets``: the output's Arrow
    dataset), over the clips' first ``max_frames`` frames in clip order."""
    keys = triplets.to_table(columns=["clip_id", "frame_index"])
    # In Arrow and NumPy, not per row in Python: an output of millions of stills (no pairs at all)
    # is scanned to its end.
    order = pc.sort_indices(keys, sort_keys=[("clip_id", "ascending"), ("frame_index", "ascending")])
    clip_ids = keys.column("clip_id").take(order)
    frames = keys.column("frame_index").take(order).to_numpy()
    # pair[i]: the i-th and (i+1)-th rows in clip order are consecutive frames of one clip.
    pair = (pc.equal(clip_ids[1:], clip_ids[:-1]).to_numpy(zero_copy_only=False)
            & (np.diff(frames) == 1)) if len(frames) > 1 else np.zeros(0, bool)
    in_pair = np.zeros(len(frames), bool)
    in_pair[:-1] |= pair
    in_pair[1:] |= pair
    wanted = order.to_numpy()[in_pair][:max_frames]
    if not len(wanted):
        return TemporalQuality(clips=0, pairs=0, mask_iou=None, pose_jitter=None)
    # Only the masks of those rows are read (row numbers in the dataset's own order, as above).
    rows = take_rows(triplets, wanted, ["clip_id", "frame_index", "mask", "body_keypoints"])
    ious, jitters, clips = [], [], set()
    previous = None
    for clip_id, frame_index, mask, body in zip(*(rows.column(c).to_pylist() for c in rows.column_names)):
        current = (clip_id, frame_index, decode_picture(mask, grayscale=True) >= PERSON_ALPHA,
                   np.asarray(body, np.float32).reshape(-1, 3))
        if previous is not None and previous[0] == clip_id and previous[1] + 1 == frame_index:
            clips.add(clip_id)
            ious.append(mask_iou(previous[2], current[2]))
            jitter = pose_jitter(previous[3], current[3])
            if jitter is not None:
                jitters.append(jitter)
        previous = current
    return TemporalQuality(clips=len(clips), pairs=len(ious), mask_iou=float(np.mean(ious)) if ious else None,
                           pose_jitter=float(np.mean(jitters)) if jitters else None)

