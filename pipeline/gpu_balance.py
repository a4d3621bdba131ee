"""Which GPU of its node each actor of the GPU pipeline with a fractional share uses.

The plan puts one matting and one pose actor on every GPU (half a GPU each), but Ray places
fractional shares best-fit and cannot tell the two stages apart: the matting actors, started
first, fill GPU 0 two by two, and the pose actors the next GPUs. Matting, the heavy stage, then
gets half the GPUs, and two matting peaks share one GPU's memory. So the actors balance
themselves: before any model loads, each asks the run's ledger (a small actor the driver starts)
for the GPU of its node that holds the fewest actors of its stage, and sets ``CUDA_VISIBLE_DEVICES``
to it. What Ray granted per node stays the same; only which device of the node holds which share
moves, and no GPU takes more than a whole one. The driver starts the ledger only when every GPU
pool has a fractional share (whole-GPU actors are never moved, nor counted); on a node whose
raylet was started with its own ``CUDA_VISIBLE_DEVICES`` the ids are that list's.
"""

from __future__ import annotations

import os


class GpuLedger:
    """Remembers which GPU each balanced actor took and its share, per node (a Ray actor; ``claim``
    is its call).

    ``whole_cluster``: no other work held a GPU of the cluster when the run started; then an actor
    may move to any GPU of its node. Otherwise Ray gave some GPUs to other work (another job, a
    job's own reservation), and which ones is not told: an actor moves only among the GPUs Ray
    gave this run's actors on its node (moving to any, actors took GPUs another job held), which
    mostly keeps Ray's own placement: safe, not balanced."""

    def __init__(self, whole_cluster: bool = True):
        self.claims: dict[str, tuple[str, str, str, float]] = {}  # actor -> (node, gpu, stage, share)
        self.whole_cluster = whole_cluster
        self.granted: dict[str, set[str]] = {}  # node -> the GPUs Ray assigned this run's actors there

    def claim(self, actor: str, node: str, stage: str, share: float, assigned: list[str], ids: list[str]) -> list[str]:
        """The GPU for ``actor`` among the node's ``ids``: the fewest actors of ``stage``, then the
        least taken, then where Ray put it; never past a whole GPU (Ray's own assignment then)."""
        self.claims.pop(actor, None)  # a restarted actor keeps its id and claims again
        if len(assigned) != 1 or assigned[0] not in ids:
            return assigned
        granted = self.granted.setdefault(node, set())
        granted.add(assigned[0])
        if not self.whole_cluster:
            ids = [gpu for gpu in ids if gpu in granted]
        on_node = [(gpu, other, taken) for n, gpu, other, taken in self.claims.values() if n == node]

        def taken(gpu: str) -> float:
            return sum(t for g, _, t in on_node if g == gpu)

        def load(gpu: str) -> tuple:
            same = sum(1 for g, other, _ in on_node if g == gpu and other == stage)
            return same, taken(gpu), gpu != assigned[0], ids.index(gpu)

        room = [gpu for gpu in ids if taken(gpu) + share <= 1 + 1e-9]
        chosen = min(room, key=load) if room else assigned[0]
        self.claims[actor] = (node, chosen, stage, share)
        return [chosen]


NAMESPACE = "disco"


def start_ledger(run: str, whole_cluster: bool = True):
    """The run's ledger, a named actor of no CPU: ``(name, handle)``. It lives while the handle
    does (Ray ends a non-detached actor whose handles are all gone), until ``stop_ledger``."""
    import ray

    name = f"disco-gpu-ledger-{run}"
    return name, ray.remote(num_cpus=0)(GpuLedger).options(name=name, namespace=NAMESPACE).remote(whole_cluster)


def takes_whole_cluster(nodes: list[dict], available: dict) -> bool:
    """Whether no other work held a GPU of the cluster when the run started (``GpuLedger``'s
    ``whole_cluster``): then its actors balance over every GPU of their node."""
    total = sum(n["GPU"] for n in nodes)
    return available.get("GPU", 0.0) >= total - 1e-6


def stop_ledger(handle) -> None:
    import ray

    ray.kill(handle)


def node_gpu_ids(gpus: int) -> list[str] | None:
    """The ids Ray hands out on this worker's node: the raylet's own ``CUDA_VISIBLE_DEVICES`` where
    it was started with one (Ray keeps what the worker inherited), else ``0 .. gpus-1``; None
    where this Ray does not tell (then nothing moves)."""
    from ray._private import worker

    original = getattr(worker.global_worker, "original_visible_accelerator_ids", None)
    if not isinstance(original, dict):
        return None
    visible = original.get("GPU")
    return [str(i) for i in visible] if visible is not None else [str(i) for i in range(gpus)]


def balance_gpu(ledger: str | None, stage: str) -> list[str]:
    """In a GPU actor, before its models load: the GPU ids it is to use, ``CUDA_VISIBLE_DEVICES``
    set to them. Ray's own assignment where there is no ledger, the share is a whole GPU, or
    the ledger cannot be reached."""
    import ray

    context = ray.get_runtime_context()
    chosen = assigned = [str(g) for g in ray.get_gpu_ids()]
    share = float(context.get_assigned_resources().get("GPU", 0.0))
    if ledger and 0 < share < 1:
        node = context.get_node_id()
        gpus = next((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node), 0)
        ids = node_gpu_ids(gpus)
        try:
            if ids:
                chosen = ray.get(ray.get_actor(ledger, namespace=NAMESPACE).claim.remote(
                    context.get_actor_id(), node, stage, share, assigned, ids))
        except Exception:  # noqa: BLE001 - a ledger that is gone: where Ray put it is a valid place
            chosen = assigned
    if chosen:
        # Set even where Ray put it: with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (clusters
        # shared with vLLM-style frameworks) Ray leaves every GPU visible, and "cuda" is GPU 0 for
        # every actor of the node.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return chosen


_memory_limit: int | None = None
CONTEXT_BYTES = 768 << 20  # a CUDA context with cuDNN and cuBLAS loaded, per process (about)


def cap_gpu_memory() -> int | None:
    """In a GPU actor holding a share of one GPU (below a whole one), after ``balance_gpu`` and
    before any model loads: PyTorch's caching allocator may hold that share of the device's memory
    and no more, and ONNX Runtime's arena the same (``gpu_memory_limit``). Two actors share each
    GPU; without a cap the first one's peak (SAM's batch) stays reserved in its cache and the
    other runs out of memory on frames that fit its share, blamed on their inputs. With it, an
    actor that outgrows its share gets the error itself, and its batches shrink. The bytes, or
    None where nothing is capped (a whole GPU, no GPU, no CUDA)."""
    global _memory_limit
    import ray

    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    if not 0 < share < 1:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    # Each process's CUDA context and cuDNN workspaces sit outside both allocators' counts.
    _memory_limit = max(0, int(share * total) - CONTEXT_BYTES)
    torch.cuda.set_per_process_memory_fraction(_memory_limit / total, 0)
    return _memory_limit


def gpu_memory_limit() -> int | None:
    """The bytes of GPU memory this process may take (``cap_gpu_memory``); None: no cap."""
    return _memory_limit


# What CUDA says when this process cannot use the GPU Ray gave it, and what to do about it.
UNUSABLE = {
    "busy or unavailable": ("CUDA says the device is busy or unavailable: a GPU in exclusive-process compute mode "
                            "takes one process, and this run puts two actors on each GPU; pass --matting-gpus 1 "
                            "--pose-gpus 1 (a GPU per actor), or set the compute mode to DEFAULT (nvidia-smi -c 0)"),
    "no kernel image": ("this PyTorch build has no kernels for this GPU's architecture: install a PyTorch wheel "
                        "built for it (every frame would fail)"),
}


def first_kernel() -> None:
    """Runs one small kernel on the GPU this actor was given, before any model loads: a GPU the
    process cannot use fails here, once, not on every frame. Nothing where the actor holds no GPU
    or CUDA is not there."""
    import ray

    if not ray.get_gpu_ids():
        return
    import torch

    if torch.cuda.is_available():
        torch.ones(1, device="cuda").add_(1).item()


def gpu_unusable(exc: BaseException) -> str | None:
    """Why this process cannot use its GPU, from what CUDA raised at the first kernel; None for
    anything else."""
    text = str(exc)
    return next((why for marker, why in UNUSABLE.items() if marker in text), None)
