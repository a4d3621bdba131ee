"""The temporal stage's stream: samples are clips of ``frames`` consecutive frames of one video
clip, in order, each frame paired with its clip's reference (the first frame).

The order is the row stream's (``order.py``) applied to windows instead of rows: each clip is
cut into windows of ``frames`` consecutive frames (from its first frame; a tail shorter than a
window is left out), the windows of one clip form a group, and an epoch permutes the groups,
deals them to the data shards and permutes windows inside runs of groups, exactly as the row
stream does with row groups. A window then expands into its frames, so the stream's items stay
frames (``SampleStream`` reads, decodes, prefetches, counts and resumes them as before) and a
micro-batch of ``batch`` clips is ``batch * frames`` items: frame ``k`` of window ``w`` of a
micro-batch sits at item ``w * frames + k``. Every frame of a window is cropped alike (the crop
is drawn from the window's position)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from disco.train.data.index import DataError, TripletIndex
from disco.train.data.order import StreamPlan
from disco.train.data.stream import SampleStream


@dataclass
class WindowIndex:
    """The windows of every clip, as an index ``epoch_plan`` can order: ``first`` is each
    window's first frame (an offset into ``TripletIndex.clip_order``), ``group_starts`` where
    each clip's run of windows starts, plus the end."""

    first: np.ndarray
    group_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def window_index(index: TripletIndex, frames: int) -> WindowIndex:
    firsts, starts = [], [0]
    for lo, hi in zip(index.clip_starts[:-1], index.clip_starts[1:]):
        count = int(hi - lo) // frames
        if count:
            firsts.append(lo + frames * np.arange(count, dtype=np.int64))
            starts.append(starts[-1] + count)
    if not firsts:
        raise DataError(f"no clip has {frames} frames: the temporal stage needs clips of at least --clip-frames "
                        f"{frames} frames (the longest has {int(np.diff(index.clip_starts).max())})")
    return WindowIndex(np.concatenate(firsts), np.asarray(starts, np.int64))


class ClipPlan(StreamPlan):
    """A ``StreamPlan`` over frame items whose order is a window plan's: items ``frames`` at a
    time are the frames of one window, in order. ``global_batch`` counts frames."""

    def __init__(self, index: TripletIndex, frames: int, seed: int, shards: int, global_batch: int):
        if global_batch % (shards * frames):
            raise DataError(f"the global micro-batch ({global_batch} frames) must be whole clips of {frames} frames "
                            f"for each of the {shards} data shards")
        self.windows = window_index(index, frames)
        self.frames = frames
        self.inner = StreamPlan(self.windows, seed, shards, global_batch // frames)
        self.index, self.seed, self.shards = index, seed, shards
        self.global_batch, self.per_shard = global_batch, global_batch // shards
        self.sizes = self.inner.sizes * frames

    def epoch(self, epoch: int):
        return self.inner.epoch(epoch)

    def window_positions(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame positions -> (the window's position in the window stream, frame in the window)."""
        shard, sample = self.locate(positions)
        window, frame = np.divmod(sample, self.frames)
        batch, slot = np.divmod(window, self.inner.per_shard)
        return batch * self.inner.global_batch + shard * self.inner.per_shard + slot, frame

    def rows(self, positions: np.ndarray) -> np.ndarray:
        windows, frame = self.window_positions(positions)
        return self.index.clip_order[self.windows.first[self.inner.rows(windows)] + frame]

    def window_starts(self, shard: int, epoch: int) -> np.ndarray:
        return self.inner.window_starts(shard, epoch) * self.frames


class ClipStream(SampleStream):
    """``SampleStream`` of fine-tuning samples in clips: ``batch`` clips of ``frames`` frames per
    micro-batch (``next_batch`` returns ``batch * frames`` samples, clip-major). A frame that
    does not decode would break its clip: the stream stops with a ``DataError`` saying so."""

    def __init__(self, index: TripletIndex, *, frames: int, batch: int, world: int = 1, shards: int | None = None,
                 seed: int = 0, **options):
        options.pop("stage", None)
        super().__init__(index, stage="finetune", batch=batch * frames, world=world, shards=shards, seed=seed,
                         **options)
        self.clip_frames = frames
        self._plan = ClipPlan(index, frames, seed, self.shards, batch * frames * world)

    def next_batch(self) -> dict:
        skipped = self.skipped
        batch = super().next_batch()
        if self.skipped != skipped:
            raise DataError("a frame of a training clip did not decode; the temporal stage needs every frame of "
                            "its clips (filter the data, or remove the clip)")
        return batch
