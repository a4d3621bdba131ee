"""Which GPU of its node each actor of the GPU pipeline with a fractional share uses.

The plan puts one matting and one pose actor on every GPU (half a GPU each), but Ray places
fractional shares best-fit and cannot tell the two stages apart: the matting actors, started
first, fill GPU 0 two by two, and the pose actors the next GPUs. Matting, the heavy stage, then
gets half the GPUs, and two matting peaks share one GPU's memory. So the actors balance
themselves: before any model loads, each asks the run's ledger (a small actor the driver starts)
for the GPU of its node that holds the fewest actors of its stage, and sets ``CUDA_VISIBLE_DEVICES``
to it. What Ray granted per node stays the same; only which device of the node holds which share
moves. Whole-GPU shares are left as Ray placed them (no two actors share a GPU then), and so is
a node whose GPU ids are not ``0 .. n-1`` (a raylet started with its own ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import os


class GpuLedger:
    """Remembers which GPU each balanced actor took, per node (a Ray actor; ``claim`` is its call)."""

    def __init__(self):
        self.claims: dict[str, tuple[str, str, str]] = {}  # actor -> (node, gpu, stage)

    def claim(self, actor: str, node: str, stage: str, assigned: list[str], gpus: int) -> list[str]:
        self.claims.pop(actor, None)  # a restarted actor keeps its id and claims again
        ids = [str(i) for i in range(gpus)]
        if len(assigned) != 1 or assigned[0] not in ids:
            return assigned
        on_node = [(gpu, other) for n, gpu, other in self.claims.values() if n == node]

        def load(gpu: str) -> tuple:
            same = sum(1 for g, other in on_node if g == gpu and other == stage)
            every = sum(1 for g, _ in on_node if g == gpu)
            return same, every, gpu != assigned[0], int(gpu)

        chosen = min(ids, key=load)
        self.claims[actor] = (node, chosen, stage)
        return [chosen]


NAMESPACE = "disco"


def start_ledger(run: str):
    """The run's ledger, a named actor of no CPU: ``(name, handle)``. It lives while the handle
    does (Ray ends a non-detached actor whose handles are all gone), until ``stop_ledger``."""
    import ray

    name = f"disco-gpu-ledger-{run}"
    return name, ray.remote(num_cpus=0)(GpuLedger).options(name=name, namespace=NAMESPACE).remote()


def stop_ledger(handle) -> None:
    import ray

    ray.kill(handle)


def balance_gpu(ledger: str | None, stage: str) -> list[str]:
    """In a GPU actor, before its models load: the GPU ids it is to use, ``CUDA_VISIBLE_DEVICES``
    set to them. Ray's own assignment where there is no ledger or the share is a whole GPU."""
    import ray

    context = ray.get_runtime_context()
    assigned = [str(g) for g in ray.get_gpu_ids()]
    share = float(context.get_assigned_resources().get("GPU", 0.0))
    if not ledger or not 0 < share < 1:
        return assigned
    node = context.get_node_id()
    gpus = next((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node), 0)
    chosen = ray.get(ray.get_actor(ledger, namespace=NAMESPACE).claim.remote(context.get_actor_id(), node, stage, assigned, gpus))
    if chosen != assigned:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return chosen
