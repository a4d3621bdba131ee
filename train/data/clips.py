"""The temporal stage's stream: samples are clips of ``frames`` consecutive frames of one video
clip, in order, each frame paired with its clip's reference (the first frame).

The order is the row stream's (``order.py``) applied to windows instead of rows: each run of
consecutive frames (a clip, or where preprocessing dropped frames of it, each stretch between the
jumps of ``frame_index``: a window never spans one) holds ``count = length // frames`` windows of
``frames`` consecutive frames, laid end to end from a per-epoch offset (the frames before it, and
a tail shorter than a window after the last, are left out that epoch), the windows of one run
form a group, and an epoch permutes the groups, deals them to the data shards and permutes
windows inside runs of groups, exactly as the row stream does with row groups. The offset of a
run in an epoch is drawn in ``[0, length - count * frames]`` from (run seed, epoch) alone, so
different epochs see different windows, a resumed run the same ones, and the number of windows
per run (the plan's group sizes) never changes; a run whose length is a whole number of windows
keeps offset 0. A window then expands into its frames,
so the stream's items stay frames (``SampleStream`` reads, decodes, prefetches, counts and
resumes them as before) and a micro-batch of ``batch`` clips is ``batch * frames`` items: frame
``k`` of window ``w`` of a micro-batch sits at item ``w * frames + k``. Every frame of a window is
cropped alike (the crop is drawn from the window's position).

A window with a frame that does not decode is skipped whole, as the row stream skips a row: its
``frames`` items count as consumed (``position``) and as skipped (``skipped``, the run's
``skipped_rows``), and the windows after it fill the micro-batch, which always holds ``batch``
whole clips (a clip is never trained with a hole or a stand-in frame). Read tasks and blocks start
and end on window boundaries (windows are whole per shard and per micro-batch), so a block always
holds whole windows."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from disco.train.data.index import DataError, TripletIndex
from disco.train.data.order import StreamPlan
from disco.train.data.stream import SampleStream


OFFSET_SALT = 0x0FF5E7  # keeps the offsets' draws apart from the order's (``epoch_plan``: [seed, epoch])


@dataclass
class WindowIndex:
    """The windows of every run of consecutive frames, as an index ``epoch_plan`` can order:
    ``first`` is each window's first frame at offset 0 (an offset into
    ``TripletIndex.clip_order``), ``group_starts`` where each group of windows starts, plus the
    end (a group: a run's windows, or a part of them, ``window_index``'s ``group_frames``); per
    group, ``run`` its run and ``slack`` its run's frames beyond its whole windows (the largest
    offset); per window, ``group`` its group. A run is a clip, or where frames of the clip
    are missing (rows preprocessing rejected or could not annotate: its ``frame_index`` jumps), each
    stretch of it between the gaps: a window never spans a gap. ``runs`` counts them all,
    ``unused`` the frames in runs shorter than a window."""

    first: np.ndarray
    group_starts: np.ndarray
    slack: np.ndarray
    group: np.ndarray
    run: np.ndarray
    runs: int = 0
    clips: int = 0
    unused: int = 0

    def __len__(self) -> int:
        return len(self.first)

    def offsets(self, seed: int, epoch: int) -> np.ndarray:
        """Each group's offset in ``epoch``: its run's, uniform in ``[0, slack]``, from (seed,
        epoch) alone (the groups of one run share it: their windows stay end to end)."""
        first_group = np.flatnonzero(np.diff(self.run, prepend=-1))  # each run's first group
        drawn = np.random.default_rng([seed, int(epoch), OFFSET_SALT]).integers(0, self.slack[first_group] + 1)
        return drawn[self.run]

    def describe(self, frames: int) -> str:
        """One line for the run's log: what the windows cover."""
        frames_in = int(self.group_starts[-1]) * frames
        runs = int(self.run[-1]) + 1 if len(self.run) else 0
        return (f"{len(self)} windows of {frames} consecutive frames from {runs} runs of {self.clips} clips "
                f"({self.runs - self.clips} gaps where preprocessing dropped frames; {self.unused} frames in runs "
                f"shorter than a window, {frames_in} frames covered at offset 0)")


def window_index(index: TripletIndex, frames: int, split_at_gaps: bool = True,
                 group_frames: int | None = None) -> WindowIndex:
    """``split_at_gaps`` False: windows of a clip's rows in order whatever their frame indices (a
    run started before windows were cut at gaps resumes on the windows it was reading).
    ``group_frames``: a run's windows form groups of at most that many frames (at least one
    window), as the row stream's groups are Parquet row groups: the order reads a few groups at a
    time, and a whole run (a minute of video is 1,800 frames) made every read task hold thousands
    of frames. None: one group per run (runs started before)."""
    n = len(index.clip_order)
    clip_starts = index.clip_starts[:-1][index.clip_starts[:-1] < n]
    run_start = np.zeros(n, bool)
    run_start[clip_starts] = True
    if split_at_gaps and n:
        ordered = index.frame[index.clip_order].astype(np.int64)
        run_start[1:] |= np.diff(ordered) != 1
    starts = np.flatnonzero(run_start)
    lengths = np.diff(np.append(starts, n))
    count = lengths // frames
    kept = count > 0
    if not kept.any():
        raise DataError(f"no clip has {frames} consecutive frames: the temporal stage needs runs of at least "
                        f"--clip-frames {frames} frames with no frame missing (the longest has "
                        f"{int(lengths.max()) if len(lengths) else 0})")
    count, kept_starts = count[kept], starts[kept]
    run_starts = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    within = np.arange(int(run_starts[-1]), dtype=np.int64) - np.repeat(run_starts[:-1], count)
    first = np.repeat(kept_starts, count).astype(np.int64) + frames * within
    slack = (lengths[kept] - count * frames).astype(np.int64)
    per_group = max(1, group_frames // frames) if group_frames else None
    groups_of_run = -(-count // per_group) if per_group else np.ones(len(count), np.int64)
    run = np.repeat(np.arange(len(count), dtype=np.int64), groups_of_run)
    # A group's first window: its run's first, plus per_group windows per group before it in the run.
    nth = np.arange(len(run), dtype=np.int64) - np.repeat(np.cumsum(groups_of_run) - groups_of_run, groups_of_run)
    group_starts = np.append(run_starts[run] + nth * (per_group or 0), run_starts[-1]).astype(np.int64)
    group = np.repeat(np.arange(len(run), dtype=np.int64), np.diff(group_starts))
    return WindowIndex(first, group_starts, slack[run], group, run, runs=len(starts), clips=len(clip_starts),
                       unused=int(lengths[~kept].sum()))


class ClipPlan(StreamPlan):
    """A ``StreamPlan`` over frame items whose order is a window plan's: items ``frames`` at a
    time are the frames of one window, in order. ``global_batch`` counts frames."""

    def __init__(self, index: TripletIndex, frames: int, seed: int, shards: int, global_batch: int,
                 offsets: bool = True, split_at_gaps: bool = True, group_frames: int | None = None):
        if global_batch % (shards * frames):
            raise DataError(f"the global micro-batch ({global_batch} frames) must be whole clips of {frames} frames "
                            f"for each of the {shards} data shards")
        self.windows = window_index(index, frames, split_at_gaps, group_frames)
        self.frames = frames
        self.inner = StreamPlan(self.windows, seed, shards, global_batch // frames)
        self.index, self.seed, self.shards = index, seed, shards
        self.global_batch, self.per_shard = global_batch, global_batch // shards
        self.sizes = self.inner.sizes * frames
        self._offsets: OrderedDict = OrderedDict()
        self.use_offsets = offsets  # False: windows from each clip's first frame (runs from before offsets)

    def epoch(self, epoch: int):
        return self.inner.epoch(epoch)

    def window_positions(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame positions -> (the window's position in the window stream, frame in the window)."""
        shard, sample = self.locate(positions)
        window, frame = np.divmod(sample, self.frames)
        batch, slot = np.divmod(window, self.inner.per_shard)
        return batch * self.inner.global_batch + shard * self.inner.per_shard + slot, frame

    def offsets(self, epoch: int) -> np.ndarray:
        """Each clip's (window group's) offset in ``epoch``, the last few epochs' kept."""
        epoch = int(epoch)
        if epoch not in self._offsets:
            self._offsets[epoch] = self.windows.offsets(self.seed, epoch) if self.use_offsets else \
                np.zeros(len(self.windows.slack), np.int64)
            while len(self._offsets) > 3:
                self._offsets.popitem(last=False)
        self._offsets.move_to_end(epoch)
        return self._offsets[epoch]

    def window_firsts(self, positions: np.ndarray) -> np.ndarray:
        """Window positions -> the window's first frame that epoch (an offset into ``clip_order``)."""
        windows = self.inner.rows(positions)
        shard, sample = self.inner.locate(positions)
        epoch = sample // self.inner.sizes[shard]
        offset = np.empty(len(windows), np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            offset[sel] = self.offsets(e)[self.windows.group[windows[sel]]]
        return self.windows.first[windows] + offset

    def rows(self, positions: np.ndarray) -> np.ndarray:
        windows, frame = self.window_positions(positions)
        return self.index.clip_order[self.window_firsts(windows) + frame]

    def window_starts(self, shard: int, epoch: int) -> np.ndarray:
        return self.inner.window_starts(shard, epoch) * self.frames


class ClipStream(SampleStream):
    """``SampleStream`` of fine-tuning samples in clips: ``batch`` clips of ``frames`` frames per
    micro-batch (``next_batch`` returns ``batch * frames`` samples, clip-major). A clip with a
    frame that does not decode is skipped whole, its frames counted in ``skipped``, and the next
    clips fill the micro-batch; a whole epoch of clips without one that decodes is a ``DataError``."""

    def __init__(self, index: TripletIndex, *, frames: int, batch: int, world: int = 1, shards: int | None = None,
                 seed: int = 0, offsets: bool = True, split_at_gaps: bool = True, group_frames: int | None = None,
                 **options):
        options.pop("stage", None)
        super().__init__(index, stage="finetune", batch=batch * frames, world=world, shards=shards, seed=seed,
                         **options)
        self.clip_frames = frames
        self._plan = ClipPlan(index, frames, seed, self.shards, batch * frames * world, offsets, split_at_gaps,
                              group_frames)

    def _usable(self, block: dict):
        """Whole clips: a frame is usable when every frame of its window decoded."""
        import torch

        ok, positions = block["ok"], block["position"]
        frames = self.clip_frames
        firsts = positions[::frames]
        if len(ok) % frames or bool((firsts % frames).any()) or \
                bool((positions.reshape(-1, frames) - firsts[:, None] != torch.arange(frames, device=ok.device)).any()):
            raise RuntimeError(f"a block of the clip stream does not hold whole clips of {frames} frames "
                               f"(positions {positions[:1].tolist()}..{positions[-1:].tolist()}): a bug of the read plan")
        return ok.reshape(-1, frames).all(dim=1).repeat_interleave(frames)

    def _nothing_decodes(self) -> DataError:
        return DataError(f"no clip decodes: {self._bad_run // self.clip_frames} clips of {self.clip_frames} frames "
                         "in a row each had a frame that failed to decode (corrupt pictures, or no pose); the "
                         "temporal stage trains only on clips whose every frame decodes")
