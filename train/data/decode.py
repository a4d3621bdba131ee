"""The decode stage: encoded pictures -> cropped uint8 arrays, at the lowest CPU priority."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from disco.train.data.index import REFERENCE_COLUMNS, DataError
from disco.train.data.order import sample_seed
from disco.train.data.read import LRU


REFERENCE_CACHE_ROWS = 64  # decoded: 3 pictures each



DECODE_NICENESS = 19  # the lowest priority that is still never starved


def _lower_thread_priority() -> None:
    """The calling thread gets the lowest CPU priority (nice 19).

    Why: on a machine with few cores the decode tasks share them with the training loop, and a
    thread of the model's parallel ops that gets preempted stalls all the others at the next
    barrier, while a decode task only needs to stay a few batches ahead. Nice 19 rather than
    Linux's ``SCHED_IDLE``: both measured alike (README), but an idle-class thread gets no CPU at
    all while other processes keep the cores busy, so training on a loaded node would starve.
    Nice values are per thread on Linux, so it ends with the thread: the Ray worker that ran the
    task keeps its priority. Where it is not permitted, decoding runs at normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, DECODE_NICENESS)
    except (AttributeError, OSError):
        pass


def at_low_priority(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread of its own at the lowest priority with one OpenCV thread;
    the caller's thread and the process's OpenCV setting are as before afterwards."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max_workers=1, initializer=_lower_thread_priority) as pool:
            return pool.submit(fn, *args, **kwargs).result()
    finally:
        cv2.setNumThreads(threads)


_REFERENCES = LRU(max_items=REFERENCE_CACHE_ROWS)


def _decode_reference(image: bytes | np.ndarray, mask: bytes) -> dict:
    from disco.pipeline.store.encode import decode_picture

    return {"image": image if isinstance(image, np.ndarray) else decode_picture(image),
            "mask": decode_picture(mask, grayscale=True)}


def _reference(batch: dict, i: int, image: np.ndarray) -> dict:
    """Sample ``i``'s decoded reference pictures (``REFERENCE_COLUMNS``; ``image``: the sample's
    own, decoded). Under ``--ref-mode first`` every sample of a clip has the same reference, so
    decoded references are kept per process (``ref_key``): decoded once per clip, not once per
    sample."""
    key = batch["ref_key"][i] if "ref_key" in batch else None
    if key is None:  # pre-training: the row is its own reference
        return _decode_reference(image, batch["ref_mask"][i])
    pictures = [batch[f"ref_{c}"][i] for c in REFERENCE_COLUMNS]
    decoded = _REFERENCES.get(key)
    if decoded is None:
        decoded = _decode_reference(*pictures)
        _REFERENCES.put(key, decoded)
    return decoded


def _rendered_pose(batch: dict, i: int, shape: tuple, pose_render: dict) -> np.ndarray:
    """Sample ``i``'s pose picture drawn from its keypoints in the run's style, at the size of
    its stored image (``shape``)."""
    from disco.pipeline.store.pose import row_pose

    body = batch["body_keypoints"][i]
    if body is None:  # its stored picture is of another drawing, so it cannot stand in
        raise DataError(f"a row has no keypoints to draw its {pose_render['style']} pose from, and its stored "
                        "pose picture is drawn otherwise; train with the data's own --pose-style / --hands")
    return row_pose(shape[1], shape[0], body, batch["hand_keypoints"][i], batch["face_keypoints"][i],
                    pose_render["style"], pose_render["hands"])


def _chw(picture: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(picture.transpose(2, 0, 1)) if picture.ndim == 3 else picture[None]


def decode_samples(blocks: pa.Table, stage: str, resolution: int, augment: bool, seed: int,
                   pose_render: dict | None = None, clip_frames: int = 1) -> Iterator[dict]:
    """The decode stage: each row of ``blocks`` (one encoded block of ``read_samples``) -> one row
    holding the block's uint8 pictures, cropped alike. A sample that fails to decode is kept with
    ``ok = False`` and zero pictures, so the loop can count it and skip it. The work runs at the
    lowest CPU priority (``at_low_priority``). ``pose_render``: the run's pose drawing, for the
    samples the read stage marked ``render`` (their pose picture is drawn from their keypoints at
    the stored image's size, then cropped as the target is)."""
    for row in blocks.to_pylist():
        out = at_low_priority(_decode_samples, row, stage, resolution, augment, seed, pose_render, clip_frames)
        out["read_bytes"] = np.asarray(row["read_bytes"], np.int64)
        out["reference_bytes"] = np.asarray(row["reference_bytes"], np.int64)
        yield {name: value[None] for name, value in out.items()}


def _decode_samples(batch: dict, stage: str, resolution: int, augment: bool, seed: int,
                    pose_render: dict | None = None, clip_frames: int = 1) -> dict:
    from disco.pipeline.store.encode import decode_picture
    from disco.train.augment import CLIP_SIZE, apply_box, crop_box, scale_box

    n = len(batch["position"])
    out = {
        "position": np.asarray(batch["position"], np.int64),
        "ok": np.zeros(n, bool),
        "target": np.zeros((n, 3, resolution, resolution), np.uint8),
        "background": np.zeros((n, 3, resolution, resolution), np.uint8),
        "pose": np.zeros((n, 3, resolution, resolution), np.uint8),
        "reference": np.zeros((n, 3, CLIP_SIZE, CLIP_SIZE), np.uint8),
        "reference_mask": np.zeros((n, 1, CLIP_SIZE, CLIP_SIZE), np.uint8),
        # The reference's alpha at the background's size: the background's person hole.
        "background_mask": np.zeros((n, 1, resolution, resolution), np.uint8),
    }
    for i in range(n):
        try:
            image = decode_picture(batch["image"][i])
            box = crop_box(image.shape[0], image.shape[1], stage, sample_seed(seed, out["position"][i] // clip_frames), augment)  # clip_frames > 1: one crop per clip (train/data/clips.py)
            out["target"][i] = _chw(apply_box(image, box, resolution))
            if stage == "finetune":
                if pose_render is not None and batch.get("render", [False] * n)[i]:
                    pose = _rendered_pose(batch, i, image.shape, pose_render)
                elif batch["pose"][i] is None:
                    raise ValueError("the row has no pose picture (preprocessed with --pose none)")
                else:
                    pose = decode_picture(batch["pose"][i])
                out["pose"][i] = _chw(apply_box(pose, box, resolution))
            ref = _reference(batch, i, image)
            ref_box = scale_box(box, image.shape[:2], ref["image"].shape[:2])
            # Whole pictures: the masks cut the person out at this size (``train/inputs.py``).
            out["background"][i] = _chw(apply_box(ref["image"], ref_box, resolution))
            out["reference"][i] = _chw(apply_box(ref["image"], ref_box, CLIP_SIZE))
            out["reference_mask"][i] = _chw(apply_box(ref["mask"], ref_box, CLIP_SIZE))
            out["background_mask"][i] = _chw(apply_box(ref["mask"], ref_box, resolution))
            out["ok"][i] = True
        except DataError:  # the run's pose cannot be drawn for this data: the run stops, saying why
            raise
        except Exception:  # noqa: BLE001 - any undecodable row is skipped and counted, never fatal
            for key in ("target", "background", "pose", "reference", "reference_mask", "background_mask"):
                out[key][i] = 0
    return out


