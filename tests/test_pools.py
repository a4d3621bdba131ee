"""The actor-pool planner against the clusters users run: 1, 2 and 8 GPUs per node, several nodes,
a CPU-only head beside GPU workers. Every plan must fit the nodes it is for (an actor Ray cannot
place is, on an autoscaling cluster, a request for another node)."""

from __future__ import annotations

import math

import pytest

from disco.pipeline.config import ConfigError, PreprocessConfig
from disco.pipeline.run import RESERVED_CPUS, plan_pools


def _cfg(tmp_path, matting="grounded-sam", pose="openpose", device="cuda", **options) -> PreprocessConfig:
    cfg = PreprocessConfig(source="video", input=tmp_path, output=tmp_path / "out", **options)
    cfg.resolved = {"matting": matting, "pose": pose, "device": device}
    return cfg


def _units(count: int, frames: int = 32) -> list[dict]:
    return [{"src_indices": list(range(frames))} for _ in range(count)]


def _fits(nodes: list[dict], pools) -> bool:
    """Place the actors greedily, node by node, as Ray would: every one finds a node."""
    free = [dict(n) for n in nodes]
    for pool in pools:
        for _ in range(pool.actors):
            for node in free:
                if node["CPU"] >= pool.cpus - 1e-9 and node["GPU"] >= pool.gpus - 1e-9:
                    node["CPU"] -= pool.cpus
                    node["GPU"] -= pool.gpus
                    break
            else:
                return False
    return True


@pytest.mark.parametrize(("gpus", "workers"), [(1, 1), (2, 1), (8, 1), (8, 4), (1, 3)])
def test_one_matting_and_one_pose_actor_per_gpu(tmp_path, gpus, workers):
    head = {"CPU": 4.0, "GPU": 0.0}  # the usual CPU-only head
    nodes = [head] + [{"CPU": 12.0 * gpus, "GPU": float(gpus)} for _ in range(workers)]
    pools = plan_pools(_cfg(tmp_path), nodes, _units(10_000))
    by = {p.stage: p for p in pools}
    assert by["matting"].actors == by["pose"].actors == gpus * workers
    assert by["matting"].gpus == by["pose"].gpus == 0.5
    assert by["matting"].cpus == 1.0  # plenty of CPUs: a whole one each for decoding and encoding
    assert _fits(nodes, pools)
    # A shard's worth of 32-frame units per call of the writing (pose) stage.
    assert by["pose"].units_per_call == 1024 // 32 and by["matting"].units_per_call == 1


def test_cpu_share_shrinks_to_fit_a_node_with_few_cpus(tmp_path):
    nodes = [{"CPU": 4.0, "GPU": 8.0}]
    pools = plan_pools(_cfg(tmp_path), nodes, _units(100))
    assert [p.actors for p in pools] == [8, 8]
    assert pools[0].cpus == pytest.approx(round((4 - RESERVED_CPUS) / 16, 2))
    assert _fits(nodes, pools)


def test_a_few_units_get_no_more_actors_than_units_and_small_calls(tmp_path):
    nodes = [{"CPU": 96.0, "GPU": 8.0}]
    pools = plan_pools(_cfg(tmp_path), nodes, _units(3))
    assert [p.actors for p in pools] == [3, 3]
    assert pools[-1].units_per_call == 1


def test_explicit_shares_place_as_many_sets_as_fit(tmp_path):
    nodes = [{"CPU": 32.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 2.0}]
    pools = plan_pools(_cfg(tmp_path, matting_gpus=1.0, pose_gpus=0.5), nodes, _units(100))
    assert [(p.actors, p.gpus) for p in pools] == [(2, 1.0), (2, 0.5)]
    assert _fits(nodes, pools)


def test_shares_that_fit_no_node_are_a_clear_error(tmp_path):
    nodes = [{"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(ConfigError, match="do not fit on any node .*largest has 1 GPU"):
        plan_pools(_cfg(tmp_path, matting_gpus=1.0, pose_gpus=0.5), nodes, _units(10))
    with pytest.raises(ConfigError, match="--actors"):
        plan_pools(_cfg(tmp_path), [{"CPU": 8.0, "GPU": 0.0}], _units(10))


def test_gpu_backends_on_the_cpu_take_no_gpu(tmp_path):
    nodes = [{"CPU": 2.0, "GPU": 0.0}]
    pools = plan_pools(_cfg(tmp_path, device="cpu"), nodes, _units(10))
    assert [(p.actors, p.gpus) for p in pools] == [(1, 0.0), (1, 0.0)]
    assert _fits(nodes, pools)


def test_mediapipe_pose_beside_gpu_matting_takes_no_gpu(tmp_path):
    nodes = [{"CPU": 16.0, "GPU": 2.0}]
    pools = plan_pools(_cfg(tmp_path, pose="mediapipe"), nodes, _units(100))
    assert [(p.stage, p.actors, p.gpus) for p in pools] == [("matting", 4, 0.5), ("pose", 4, 0.0)]
    assert _fits(nodes, pools)


@pytest.mark.parametrize("cpus", [[2.0], [1.0, 2.0, 2.0], [16.0, 16.0, 16.0]])
def test_cpu_pipeline_takes_one_actor_per_cpu_of_every_node(tmp_path, cpus):
    nodes = [{"CPU": c, "GPU": 0.0} for c in cpus]
    pools = plan_pools(_cfg(tmp_path, matting="mediapipe", pose="mediapipe", device="cpu"), nodes, _units(10_000))
    assert [p.stage for p in pools] == ["annotate"]
    assert pools[0].actors == sum(int(c) for c in cpus)
    assert _fits(nodes, pools)
    # Every node keeps a little room for Ray Data's own tasks.
    assert pools[0].cpus * max(int(c) for c in cpus) <= max(cpus) - RESERVED_CPUS + 1e-9


def test_stills_fill_a_shard_per_call_only_when_every_actor_still_gets_several_calls(tmp_path):
    cfg = _cfg(tmp_path, matting="mediapipe", pose="mediapipe", device="cpu", shard_rows=256)
    many = plan_pools(cfg, [{"CPU": 2.0, "GPU": 0.0}], _units(100_000, frames=0))
    few = plan_pools(cfg, [{"CPU": 2.0, "GPU": 0.0}], _units(40, frames=0))
    assert many[0].units_per_call == 256
    assert few[0].units_per_call == math.ceil(40 / (2 * 4))
