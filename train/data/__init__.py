"""Streaming the Parquet triplets into the training loop.

The modules follow the data: ``index`` (which rows exist), ``order`` (which row comes when),
``read`` and ``decode`` (the two Ray Data stages), ``watch`` (start-up watch and idle pause),
``stream`` (``SampleStream``, what a worker trains on).

Why not ``ray.data.read_parquet`` over the picture columns: it does not say which row of which
file a picture came from, and the trainer needs exactly that to resume bit-exactly (the data
position is a row count), to give every worker a deterministic share of each global batch (two
workers with batch b must see what one worker with batch 2b sees), and to pair a target frame
with its clip's reference frame. So the data path is split in two:

1. ``build_index`` reads only the small metadata columns (clip, frame index, split) and the row
   group sizes of every shard, with pyarrow. That is tens of bytes a row (700K rows: tens of MB),
   never a picture. Fine-tuning's pairing is decided here: each row gets the *locator*
   (file, row group, row) of its reference frame -- the clip's first frame, or a random frame
   of the clip drawn per sample -- not the reference's bytes.
2. ``SampleStream`` turns a deterministic order of row locators into a Ray Data stream of two
   stages. A *read* task (``read_samples``, one at a time) takes one window of the order (below),
   reads every row group the window touches once -- only the columns training uses -- and emits
   the window's encoded pictures in stream order, in blocks; a *decode* task (``decode_samples``,
   ``data_tasks`` at a time, at the lowest CPU priority) decodes, crops and ships uint8 arrays for
   one block of about ``SAMPLES_PER_BLOCK`` samples. The blocks are prefetched into the loop by
   ``iter_torch_batches``, which the loop cuts into micro-batches.
   Memory is bounded by the encoded bytes of the windows in flight (the one being read and the
   one being decoded), the decode prefetch depth and small per-process caches of reference rows,
   whatever the data size.

**The order: data shards.** A run has ``shards`` virtual data shards (``data_shards``, by default
the number of workers; a resume keeps it). Each epoch permutes the row groups (seeded by run seed
and epoch), lays their rows end to end and cuts that sequence into ``shards`` contiguous ranges of
equal size (+-1 row; a row group on a cut is split between two shards, so a data set with fewer
row groups than shards still gives every row to exactly one shard). A shard's range is cut into
windows of consecutive row groups -- as few as hold at most ``WINDOW_GROUPS`` groups each, of
balanced sizes, so none is a lone group where the range has more -- and the rows are permuted
inside each window. A shard's stream is its epochs one after the other.

Global micro-batch ``c`` (``B = shards * k`` samples) is shard-major: slot ``j`` holds sample
``c * k + j % k`` of shard ``j // k``. Worker ``r`` of ``N`` (``shards % N == 0``) takes slice ``r``
of it (``global_positions``), which is exactly shards ``[r * shards / N, (r + 1) * shards / N)``:
so 1 worker with batch ``2b`` and 2 workers with batch ``b`` see the same global batches when
they have the same ``shards``, and a worker only ever reads row groups of its own shards. With one
shard per worker (the default) a worker's stream *is* its shard's stream and every read task is
one whole window: each row group is read once per epoch (twice at most where a window or shard
boundary cuts it), so bytes read per sample used stay close to 1x -- ``benchmarks/
train_throughput.py`` measures it. With several shards per worker (fewer workers than shards) the
tasks follow the first shard's windows and read the others' partly, which costs reads, not
correctness. Every row is seen once per epoch of its shard; each sample's randomness comes from
``sample_seed(seed, its global position)``.

**Mixing.** Rows of one row group are consecutive frames of one clip, so a micro-batch must not come
from one group. Within a shard, consecutive samples are uniform draws without replacement from
the rows of one window: ``WINDOW_GROUPS // 2`` to ``WINDOW_GROUPS`` row groups (fewer only where
a shard's whole range has fewer), which come from all over the data set because the groups are
permuted. A global micro-batch holds ``k`` such draws from each of the ``shards`` independent
windows, so its samples come from up to ``shards * WINDOW_GROUPS`` row groups; with one shard
per worker and a worker batch ``b``, each worker's ``b`` samples are ``b`` draws from 4 to 8
groups (the ``b`` frames of one window are rarely neighbours), as one global micro-batch was
before data shards.
"""

from disco.train.data.decode import at_low_priority, decode_samples
from disco.train.data.index import DataError, TripletIndex, build_index
from disco.train.data.order import (
    WINDOW_GROUPS,
    EpochPlan,
    StreamPlan,
    epoch_order,
    epoch_plan,
    global_positions,
    locator_table,
    sample_seed,
    shard_bounds,
)
from disco.train.data.read import ReferenceStore, read_row_group, read_samples
from disco.train.data.stream import SampleStream
from disco.train.data.watch import STARTUP_TIMEOUT_S, startup_failure

__all__ = [
    "STARTUP_TIMEOUT_S", "WINDOW_GROUPS", "DataError", "EpochPlan", "ReferenceStore", "SampleStream", "StreamPlan",
    "TripletIndex", "at_low_priority", "build_index", "decode_samples", "epoch_order", "epoch_plan",
    "global_positions", "locator_table", "read_row_group", "read_samples", "sample_seed", "shard_bounds",
    "startup_failure",
]
