"""The stream's order: epochs of permuted row groups cut into data shards and windows, and each
worker's slice of every global micro-batch (the package docstring says why)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pyarrow as pa

from disco.train.data.index import DataError, TripletIndex


WINDOW_GROUPS = 8



@dataclass
class EpochPlan:
    """One epoch of every data shard: its rows in stream order and where its windows start."""

    rows: list[np.ndarray]  # per shard: row ids, in the order the shard's stream takes them
    windows: list[np.ndarray]  # per shard: offsets into ``rows`` where a window starts, plus the end


def shard_bounds(rows: int, shards: int) -> np.ndarray:
    """Where each shard's range starts in an epoch's row sequence, plus the end (sizes differ by
    at most one row)."""
    return (np.arange(shards + 1, dtype=np.int64) * rows) // shards


def epoch_plan(index: TripletIndex, seed: int, epoch: int, shards: int = 1) -> EpochPlan:
    """Row groups permuted, their rows laid end to end and cut into ``shards`` contiguous ranges;
    each range's row groups (a group split by a cut counts in both ranges) dealt into as few
    windows of at most ``WINDOW_GROUPS`` consecutive groups as will hold them, of balanced sizes
    (so no window is a lone group while its range has more); rows permuted inside each window."""
    rng = np.random.default_rng([seed, epoch])
    starts = index.group_starts
    groups = rng.permutation(len(starts) - 1)
    sizes = starts[groups + 1] - starts[groups]
    rank = np.repeat(np.arange(len(groups)), sizes)  # each row's group, as its place in the permutation
    first = np.cumsum(sizes) - sizes
    sequence = starts[groups][rank] + np.arange(len(rank), dtype=np.int64) - first[rank]
    bounds = shard_bounds(len(sequence), shards)
    rows, windows = [], []
    for lo, hi in pairwise(bounds):
        if hi == lo:
            rows.append(np.zeros(0, np.int64))
            windows.append(np.zeros(1, np.int64))
            continue
        local = rank[lo:hi] - rank[lo]  # the range's row groups, 0 .. groups - 1
        groups_here = int(local[-1]) + 1
        window = local * -(-groups_here // WINDOW_GROUPS) // groups_here  # balanced: sizes differ by <= 1
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(window)) + 1, [hi - lo]]).astype(np.int64)
        part = sequence[lo:hi].copy()
        for a, b in pairwise(cuts):
            part[a:b] = rng.permutation(part[a:b])
        rows.append(part)
        windows.append(cuts)
    return EpochPlan(rows, windows)


def epoch_order(index: TripletIndex, seed: int, epoch: int) -> np.ndarray:
    """Row ids of one epoch of a one-shard stream: row groups permuted, then rows permuted inside
    windows of at most ``WINDOW_GROUPS`` groups."""
    return epoch_plan(index, seed, epoch, 1).rows[0]


def sample_seed(seed: int, position: int) -> int:
    """The seed of one sample of the stream: crops, noise, timestep and condition dropout."""
    return int(np.random.SeedSequence([seed, int(position)]).generate_state(1, np.uint32)[0])


def global_positions(local: np.ndarray, rank: int, world: int, batch: int) -> np.ndarray:
    """Worker ``rank``'s local stream positions -> positions in the global stream: micro-batch
    ``c`` of the global stream (``world * batch`` samples) gives slice ``rank`` to this worker, so
    the union over workers of a step is what one worker with ``world * batch`` would take."""
    local = np.asarray(local, np.int64)
    return ((local // batch) * world + rank) * batch + local % batch


class StreamPlan:
    """Which row each position of the global stream holds, for ``shards`` data shards and global
    micro-batches of ``global_batch`` samples (``k = global_batch / shards`` per shard). Epoch
    plans are computed on demand, the last few kept."""

    def __init__(self, index: TripletIndex, seed: int, shards: int, global_batch: int):
        if shards < 1:
            raise DataError(f"data shards must be at least 1, not {shards}")
        if len(index) < shards:
            raise DataError(f"{len(index)} training rows cannot fill {shards} data shards; use fewer data shards "
                            "(data_shards) or fewer workers")
        if global_batch % shards:
            raise DataError(f"the global micro-batch ({global_batch} samples) must be a multiple of the "
                            f"{shards} data shards")
        self.index, self.seed, self.shards = index, seed, shards
        self.global_batch, self.per_shard = global_batch, global_batch // shards
        self.sizes = np.diff(shard_bounds(len(index), shards))  # rows of each shard per epoch
        self._epochs: OrderedDict = OrderedDict()

    def epoch(self, epoch: int) -> EpochPlan:
        epoch = int(epoch)
        if epoch not in self._epochs:
            self._epochs[epoch] = epoch_plan(self.index, self.seed, epoch, self.shards)
            while len(self._epochs) > 3:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (shard, sample index in the shard's stream)."""
        positions = np.asarray(positions, np.int64)
        batch, slot = np.divmod(positions, self.global_batch)
        return slot // self.per_shard, batch * self.per_shard + slot % self.per_shard

    def rows(self, positions: np.ndarray) -> np.ndarray:
        shard, sample = self.locate(positions)
        size = self.sizes[shard]
        epoch, offset = sample // size, sample % size
        out = np.empty(len(shard), np.int64)
        for e, s in sorted({(int(e), int(s)) for e, s in zip(epoch, shard)}):
            sel = (epoch == e) & (shard == s)
            out[sel] = self.epoch(e).rows[s][offset[sel]]
        return out

    def window_starts(self, shard: int, epoch: int) -> np.ndarray:
        """Samples of ``shard``'s stream where one of its windows in ``epoch`` starts."""
        return epoch * int(self.sizes[shard]) + self.epoch(epoch).windows[shard][:-1]


def locator_table(index: TripletIndex, plan: StreamPlan, positions: np.ndarray, stage: str, ref_mode: str,
                  seed: int, first_references: np.ndarray | None = None) -> pa.Table:
    """What a read task needs to load the samples at these global stream positions."""
    rows = plan.rows(positions)
    if stage == "pretrain":
        refs = rows  # HAP: each image is its own reference
    elif ref_mode == "first":
        refs = (index.first_reference() if first_references is None else first_references)[rows]
    else:
        refs = index.random_reference(rows, np.array([sample_seed(seed, p) for p in positions]))
    files = np.asarray(index.files, dtype=object)
    return pa.table({
        "position": np.asarray(positions, np.int64),
        "path": files[index.file[rows]], "group": index.group[rows], "row": index.row[rows],
        "ref_path": files[index.file[refs]], "ref_group": index.group[refs], "ref_row": index.row[refs],
    })


