"""Ray Data hooks of the stream: a start-up watch that fails in time, naming the resource the
stream waits for, and an idle pause of its scheduling loop."""

from __future__ import annotations

import time


from disco.pipeline.ray_idle import IdlePause
from disco.train.data.index import DataError


# A stream whose first decoded block has not arrived this long after its Ray Data execution
# started fails with a ``DataError`` naming the resource it waits for.
STARTUP_TIMEOUT_S = 120.0
# A stream that delivered blocks and then none for this long while training waits for one fails
# too: a read stuck on a hung mount, a decode task on a lost node. Left waiting, under DDP the
# other workers sat in their all-reduce until NCCL's 30-minute time-out, which Ray Train then
# reported as the failure (a healthy worker's), and the next stall did the same.
STALL_TIMEOUT_S = 600.0



def _free_cpus_per_node() -> list[tuple[str, float | None, float]]:
    """(address, free CPUs or None where unknown, CPUs) of every live node of the cluster."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private Ray API: without it, the totals still say something
        free = None
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = float(node.get("Resources", {}).get("CPU", 0.0))
        available = None if free is None else float(free.get(node["NodeID"], {}).get("CPU", 0.0))
        nodes.append((node.get("NodeManagerAddress", "?"), available, total))
    return nodes


def _cpu_listing() -> tuple[list, str]:
    """``_free_cpus_per_node()`` and its one-line listing ("ADDRESS FREE of TOTAL, ..."); no
    nodes and the reason where Ray cannot say (the message must come out whatever Ray says)."""
    try:
        nodes = _free_cpus_per_node()
    except Exception as exc:  # noqa: BLE001
        return [], f"unknown: {exc}"
    return nodes, ", ".join(f"{address} {'?' if free is None else f'{free:g}'} of {total:g}"
                            for address, free, total in nodes) or "no live node"


def startup_failure(data_cpus: float, timeout_s: float) -> str:
    """One line: why the stream's decode tasks did not deliver a first block (for ``DataError``)."""
    nodes, listing = _cpu_listing()
    head = f"the training data stream could not start within {timeout_s:g} s"
    if nodes and all(free is None for _, free, _ in nodes):
        return (f"{head}: its decode tasks need {data_cpus:g} CPU each (CPUs per node: {listing}; Ray did not say "
                "how many are free)")
    if not any(free is not None and free >= data_cpus for _, free, _ in nodes):
        return (f"{head}: its decode tasks need {data_cpus:g} CPU each and no node has that free (free CPU per "
                f"node: {listing}); lower data_cpus (--data-cpus in a config file) or free CPUs on a node")
    return (f"{head}: no decode task delivered a block, although a node has the {data_cpus:g} CPU a task needs "
            f"free now (free CPU per node: {listing})")


def stall_failure(data_cpus: float, stall_s: float, blocks: int) -> str:
    """One line: the stream stopped delivering blocks (for ``DataError``)."""
    import socket

    listing = _cpu_listing()[1]
    return (f"the training data stream on {socket.gethostname()} delivered no block for {stall_s:g} s while "
            f"training waited for one (after {blocks} blocks): a read or decode task is stuck (a hung mount, a lost "
            f"node) or cannot be placed (its tasks need {data_cpus:g} CPU each; free CPU per node: {listing})")


class Watch:
    """What a stream's execution callback and its consumer share."""

    def __init__(self, timeout_s: float, data_cpus: float, stall_s: float = STALL_TIMEOUT_S):
        self.timeout_s, self.data_cpus, self.stall_s = timeout_s, data_cpus, stall_s
        self.started: float | None = None  # when the current Ray Data execution started
        self.delivered = False  # whether it delivered a block yet
        self.blocks = 0  # blocks it delivered
        self.waiting_since: float | None = None  # since when the consumer waits for its next block
        self.error: str | None = None
        self.cancelled = False  # the consumer closed the stream: the execution stops at its next step


def stream_callback(watch: Watch):
    """A Ray Data execution callback class for one stream, or None where this Ray lacks the
    callback interface (then the loop runs as Ray ships it and nothing watches the start-up).

    Start-up watch: an execution whose first block has not reached the consumer
    ``watch.timeout_s`` after it started fails with a ``DataError`` that names the missing
    resource (Ray would wait for it forever; Ray Data itself gives up only after 30 minutes
    without progress, with no word about resources). Stall watch: one whose consumer has waited
    ``watch.stall_s`` for its next block (``watch.waiting_since``, set while it waits) fails so too.

    Idle pause (pipeline/ray_idle.py): while the consumer holds the stream back (the model is
    slower than decoding, the normal case), Ray Data's scheduling loop would poll on most of a
    core; it rests instead. The prefetched blocks cover the pause many times over."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:
        return None

    class StreamWatch(ExecutionCallback):
        def __init__(self):
            self._pause = IdlePause()

        def before_execution_starts(self, executor) -> None:
            watch.started, watch.delivered = time.monotonic(), False

        def on_execution_step(self, executor) -> None:
            if watch.cancelled:
                raise DataError("the stream was closed")
            if not watch.delivered and watch.started is not None \
                    and time.monotonic() - watch.started > watch.timeout_s:
                watch.error = watch.error or startup_failure(watch.data_cpus, watch.timeout_s)
                raise DataError(watch.error)
            waiting = watch.waiting_since
            if waiting is not None and time.monotonic() - waiting > watch.stall_s:
                watch.error = watch.error or stall_failure(watch.data_cpus, watch.stall_s, watch.blocks)
                raise DataError(watch.error)
            self._pause.step()

    return StreamWatch


