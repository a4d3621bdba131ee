"""The actor pools of a preprocessing run, sized to the cluster: one matting and one pose actor
per GPU for the GPU backends, CPU actors spread over the nodes otherwise, and the units each call
of the last (writing) pool takes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from disco.pipeline.annotators import gpu_backend
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError
from disco.pipeline.sources.units import unit_frames

RESERVED_CPUS = 0.1
MIN_ACTOR_CPUS = 0.1
CALLS_PER_ACTOR = 4  # the last stage's calls per actor at least, so commits come often enough


def uses_gpu_pipeline(resolved: dict) -> bool:
    return gpu_backend(resolved["matting"]) or gpu_backend(resolved["pose"])


@dataclass
class PoolPlan:
    """One actor pool of the pipeline: how many actors, what each holds, units per call."""

    stage: str
    actors: int
    cpus: float
    gpus: float
    units_per_call: int = 1

    def to_dict(self) -> dict:
        return {"stage": self.stage, "actors": self.actors, "cpus_per_actor": self.cpus, "gpus_per_actor": self.gpus,
                "units_per_call": self.units_per_call}


def cluster_nodes() -> list[dict]:
    """The CPUs and GPUs of each live node of the connected Ray cluster."""
    import ray

    return [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]


def plan_pools(cfg: PreprocessConfig, nodes: list[dict], units) -> list[PoolPlan]:
    """The actor pools for this cluster and these units. The last pool writes the shards, so its
    units per call are sized to fill a shard without leaving an actor idle; on the GPU pipeline
    the first decodes, and its calls of consecutive units read a video's segments in order."""
    if uses_gpu_pipeline(cfg.resolved):
        pools = gpu_pools(cfg, nodes, _count(units))
    else:
        actors, cpus = actor_resources(cfg, nodes, _count(units))
        pools = [PoolPlan("annotate", actors, cpus, cfg.gpus_per_actor)]
    pools[-1].units_per_call = units_per_call(units, cfg.shard_rows, pools[-1].actors)
    if len(pools) > 1:
        # The writing (pose) stage's calls join the matting stage's blocks of decoded frames and
        # mattes: about a shard's rows of them was 4 GiB a call for stills at --max-side 1024 (two
        # calls in flight per actor, copied once more into Python): POSE_CALL_BYTES at most.
        pools[-1].units_per_call = units_within(units, cfg.max_side, pools[-1].units_per_call, POSE_CALL_BYTES)
        # The decoding (matting) stage: consecutive units in one call are the next segments of a
        # video, which it reads on from the last (``LastVideo``), as many as one block holds.
        pools[0].units_per_call = matting_units_per_call(units, cfg.max_side, pools[-1].units_per_call)
    return pools


def describe_pools(pools: list[PoolPlan], nodes: list[dict], available: dict) -> list[str]:
    """What the run asks of the cluster, for its log: the pools as planned (from the nodes alive
    now, by their totals), and, where other work holds part of it now (``available``: Ray's free
    resources), that some actors will wait; a stage none of whose actors starts waits with them,
    and Ray Data says so only for the first stage."""
    total = {k: sum(n[k] for n in nodes) for k in ("CPU", "GPU")}
    asked = {"CPU": sum(p.actors * p.cpus for p in pools), "GPU": sum(p.actors * p.gpus for p in pools)}
    plan = ", ".join(f"{p.stage} {p.actors} actor(s) x {p.cpus:g} CPU" + (f" + {p.gpus:g} GPU" if p.gpus else "")
                     for p in pools)
    lines = [f"pools: {plan}; planned from the {len(nodes)} node(s) alive now ({total['CPU']:g} CPU, "
             f"{total['GPU']:g} GPU)"]
    # GPUs only: the CPUs this run's own planning tasks held a moment ago read as taken for a while
    # (Ray's view of free resources lags), and CPU actors that wait are the usual case.
    free = available.get("GPU", 0.0)
    if free + 1e-6 < asked["GPU"] <= total["GPU"] + 1e-6:
        lines.append(f"other work holds GPUs of the cluster now ({asked['GPU']:g} asked, {free:g} free): some actors "
                     "wait until they free, and a stage none of whose actors can start holds the run still; pass "
                     "--actors N to ask for fewer")
    if any(asked[k] > total[k] + 1e-6 for k in ("CPU", "GPU")):
        lines.append("the pools ask for more than the nodes alive now hold: their actors wait for nodes an autoscaler "
                     "adds (the pools keep the size planned now: on a cluster that grows, --actors N sets it)")
    return lines


def _count(units) -> int:
    return units.num_rows if hasattr(units, "num_rows") else len(units)


def units_per_call(units, shard_rows: int, actors: int) -> int:
    """Units per call of the writing stage (``units``: a ``UNIT_TYPE`` table or unit dicts): about
    a shard's rows, but at least CALLS_PER_ACTOR calls per actor, so every actor has work and
    commits come often."""
    if not _count(units):
        return 1
    rows_per_unit = float(unit_frames(units).mean())
    fill = math.ceil(shard_rows / max(1.0, rows_per_unit))
    spread = math.ceil(_count(units) / (max(1, actors) * CALLS_PER_ACTOR))
    return max(1, min(fill, spread))


# What one call of the matting stage hands on: its units' frames and mattes, in one block of at
# most Ray Data's own target block size. One block per call, always: a call retried on a restarted
# actor then hands on the same block (a call's output split into blocks by size could split
# otherwise the second time, and Ray keeps the blocks of the first attempt it already has).
MATTED_CALL_BYTES = 128 << 20
# What one call of the writing stage of the GPU pipeline holds at most (the default --max-side's
# stills fill a shard's 1024 rows in one call: 1 GiB).
POSE_CALL_BYTES = 1 << 30


def matting_units_per_call(units, max_side: int, most: int) -> int:
    """Units per call of the matting stage: as many (up to ``most``) as MATTED_CALL_BYTES holds
    of their frames and mattes (``units_within``)."""
    return units_within(units, max_side, most, MATTED_CALL_BYTES)


def units_within(units, max_side: int, most: int, budget: int) -> int:
    """As many units (up to ``most``) as ``budget`` bytes hold of their frames and mattes (RGB + 1
    byte a pixel), each unit counted as the largest (a call may hold a video's segments only, in
    a data set of mostly stills), a still at ``max_side`` square."""
    if not _count(units):
        return 1
    sizes = [np.asarray(units.column(name).to_numpy(zero_copy_only=False) if hasattr(units, "column")
                        else [u.get(name) or 0 for u in units], np.float64) for name in ("width", "height")]
    width, height = (np.where(side > 0, side, max_side) for side in sizes)
    per_unit = float((unit_frames(units) * width * height * 4).max())
    return max(1, min(most, int(budget // max(per_unit, 1.0))))


def _per_node_cpus(nodes: list[dict], actors_on: list[int]) -> float:
    """CPUs per actor such that each node's actors fit beside a little room for Ray Data's own
    tasks (rounded down: rounding up would take that room back)."""
    shares = [(n["CPU"] - RESERVED_CPUS) / k for n, k in zip(nodes, actors_on) if k > 0]
    share = min(1.0, min(shares, default=1.0))
    return max(MIN_ACTOR_CPUS, math.floor(share * 100 + 1e-6) / 100)


def _sets_on(node: dict, wants: dict[str, float]) -> int:
    """Matting + pose sets (one actor of each stage) that one node holds: GPU shares packed device
    by device as Ray places them (a share below 1 inside one GPU, a whole number of GPUs
    otherwise), and at least MIN_ACTOR_CPUS for every actor beside the reserved room."""
    free = [1.0] * int(node["GPU"] + 1e-9)
    by_cpu = int((node["CPU"] - RESERVED_CPUS) / (len(wants) * MIN_ACTOR_CPUS) + 1e-9)
    sets = 0
    while sets < by_cpu:
        trial = list(free)
        for share in wants.values():
            if share <= 0:
                continue
            if share < 1:
                k = next((i for i, f in enumerate(trial) if f >= share - 1e-9), None)
                if k is None:
                    return sets
                trial[k] -= share
            else:
                whole = [i for i, f in enumerate(trial) if f >= 1 - 1e-9][:int(share)]
                if len(whole) < share:
                    return sets
                for i in whole:
                    trial[i] = 0.0
        free = trial
        sets += 1
    return sets


def gpu_pools(cfg: PreprocessConfig, nodes: list[dict], units: int) -> list[PoolPlan]:
    """The GPU pipeline's two pools: on every GPU one matting and one pose actor at half a GPU
    each (by default), so a node with N GPUs holds N of each. On ``--device cpu`` the models take
    no GPU unless ``--matting-gpus`` / ``--pose-gpus`` ask; then the same rule places them."""
    on_gpu = cfg.resolved["device"] == "cuda"
    # A stage whose backend runs on the CPU (MediaPipe beside a GPU model) holds no GPU share: half
    # of every GPU would sit reserved for it, idle.
    wants = {stage: given if given is not None else (0.5 if on_gpu and gpu_backend(cfg.resolved[stage]) else 0.0)
             for stage, given in (("matting", cfg.matting_gpus), ("pose", cfg.pose_gpus))}
    for stage, share in wants.items():
        if on_gpu and share <= 0 and gpu_backend(cfg.resolved[stage]):
            # Its models would be built on a CUDA device that Ray did not give it (Ray leaves every
            # GPU visible to an actor without a GPU share): outside Ray's accounting, on GPU 0.
            raise ConfigError(f"--{stage}-gpus 0 with {cfg.resolved[stage]} on CUDA: its actors would use a GPU Ray "
                              f"did not reserve for them; give them a share above 0, or pass --device cpu")
    per_set = sum(wants.values())
    if cfg.actors:
        sets = cfg.actors
        # The actors hold GPU shares: only nodes with GPUs hold them (a CPU-only head node's CPUs
        # must not thin the shares planned for the GPU nodes).
        gpu_nodes = [n["CPU"] if n["GPU"] > 0 or per_set <= 0 else 0.0 for n in nodes]
        sets_on = _spread(cfg.actors, gpu_nodes if any(gpu_nodes) else [n["CPU"] for n in nodes])
    elif per_set > 0:
        # A "set" is one actor of each stage; each node holds as many sets as its GPUs fit.
        sets_on = [_sets_on(n, wants) for n in nodes]
        sets = sum(sets_on)
        if sets == 0:
            largest = max((n["GPU"] for n in nodes), default=0)
            raise ConfigError(
                f"a matting actor ({wants['matting']:g} GPU) and a pose actor ({wants['pose']:g} GPU) do not fit on any "
                f"node of this cluster (the largest has {largest:g} GPU); lower --matting-gpus / --pose-gpus, or set "
                "--actors to ask for actors that an autoscaler will bring nodes for")
    else:
        sets_on = _spread(1, [n["CPU"] for n in nodes])
        sets = 1
    counts = {stage: max(1, min(sets, units)) for stage in wants}
    cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else _per_node_cpus(nodes, [2 * k for k in sets_on])
    return [PoolPlan(stage, counts[stage], cpus, wants[stage]) for stage in ("matting", "pose")]


def _spread(actors: int, cpus: list[float]) -> list[int]:
    """How ``actors`` spread over nodes by their CPUs (for the CPU share only; Ray places them)."""
    total = sum(cpus) or 1.0
    return [max(0, math.ceil(actors * c / total)) for c in cpus]


def actor_resources(cfg: PreprocessConfig, nodes: list[dict], units: int) -> tuple[int, float]:
    """The CPU pipeline: one actor per CPU of every node, each a little under a CPU, since 2 actors
    x 1 CPU on a 2-CPU node starve Ray Data's own tasks."""
    per_node = [int(n["CPU"]) for n in nodes]
    actors = cfg.actors or max(1, sum(per_node))
    actors = max(1, min(actors, units))
    if cfg.cpus_per_actor is not None:
        return actors, cfg.cpus_per_actor
    on = per_node if not cfg.actors else _spread(cfg.actors, [n["CPU"] for n in nodes])
    return actors, _per_node_cpus(nodes, on)
