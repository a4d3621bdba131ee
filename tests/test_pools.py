"""The actor-pool planner against the clusters users run: 1, 2 and 8 GPUs per node, several nodes,
a CPU-only head beside GPU workers. Every plan must fit the nodes it is for (an actor Ray cannot
place is, on an autoscaling cluster, a request for another node)."""

from __future__ import annotations

import math

import pytest

from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError
from disco.pipeline.pools import RESERVED_CPUS, plan_pools


def _cfg(tmp_path, matting="grounded-sam", pose="openpose", device="cuda", **options) -> PreprocessConfig:
    cfg = PreprocessConfig(source="video", input=tmp_path, output=tmp_path / "out", **options)
    cfg.resolved = {"matting": matting, "pose": pose, "device": device}
    return cfg


def _units(count: int, frames: int = 32) -> list[dict]:
    return [{"src_indices": list(range(frames))} for _ in range(count)]


def _fits(nodes: list[dict], pools) -> bool:
    """Place the actors greedily, as Ray does: CPUs per node, GPUs device by device (a share below
    1 inside one GPU, whole GPUs otherwise). Every actor must find a place."""
    free = [{"CPU": n["CPU"], "GPU": [1.0] * int(n["GPU"])} for n in nodes]

    def place(node: dict, cpus: float, gpus: float) -> bool:
        if node["CPU"] < cpus - 1e-9:
            return False
        if 0 < gpus < 1:
            device = next((i for i, f in enumerate(node["GPU"]) if f >= gpus - 1e-9), None)
            if device is None:
                return False
            node["GPU"][device] -= gpus
        elif gpus >= 1:
            whole = [i for i, f in enumerate(node["GPU"]) if f >= 1 - 1e-9][:int(gpus)]
            if len(whole) < gpus:
                return False
            for i in whole:
                node["GPU"][i] = 0.0
        node["CPU"] -= cpus
        return True

    for pool in pools:
        for _ in range(pool.actors):
            if not any(place(node, pool.cpus, pool.gpus) for node in free):
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
    # A shard's worth of 32-frame units per call of the writing (pose) stage; the decoding
    # (matting) stage takes a video's next segments, read on from one reader, as many as one
    # 128 MiB block holds of frames and mattes: 4 units of stills at the 512 px bound.
    assert by["pose"].units_per_call == 1024 // 32 and by["matting"].units_per_call == 4


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


def test_shares_pack_inside_each_gpu_as_ray_places_them(tmp_path):
    nodes = [{"CPU": 64.0, "GPU": 8.0}]
    # 0.4 + 0.4 leaves 0.2 of each GPU: a third 0.4 actor fits in none, so 8 sets, not 10.
    pools = plan_pools(_cfg(tmp_path, matting_gpus=0.4, pose_gpus=0.4), nodes, _units(1000))
    assert [p.actors for p in pools] == [8, 8]
    assert _fits(nodes, pools)
    # 0.25 + 0.25: two sets per GPU.
    pools = plan_pools(_cfg(tmp_path, matting_gpus=0.25, pose_gpus=0.25), nodes, _units(1000))
    assert [p.actors for p in pools] == [16, 16]
    assert _fits(nodes, pools)


def test_few_cpus_cap_the_sets_and_shares_round_down(tmp_path):
    starved = [{"CPU": 1.0, "GPU": 8.0}]  # (1 - 0.1) CPU / 0.1 per actor: 4 sets, not 8
    pools = plan_pools(_cfg(tmp_path), starved, _units(1000))
    assert [p.actors for p in pools] == [4, 4] and _fits(starved, pools)
    big = [{"CPU": 32.0, "GPU": 0.0}]  # 32 actors of (32 - 0.1) / 32 = 0.996, kept below 1
    cpu = plan_pools(_cfg(tmp_path, matting="mediapipe", pose="mediapipe", device="cpu"), big, _units(1000))
    assert cpu[0].actors == 32 and cpu[0].cpus == 0.99 and _fits(big, cpu)


def test_a_share_above_one_gpu_must_be_whole(tmp_path):
    with pytest.raises(ConfigError, match="whole number of GPUs"):
        _cfg(tmp_path, matting_gpus=1.5).validate()


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


def test_mediapipe_matting_beside_gpu_pose_takes_no_gpu(tmp_path):
    """``auto`` with only pose weights: MediaPipe mattes on the CPU; half of every GPU held for it
    would sit idle (and cap its actors at one per GPU)."""
    nodes = [{"CPU": 16.0, "GPU": 2.0}]
    pools = plan_pools(_cfg(tmp_path, matting="mediapipe"), nodes, _units(100))
    assert [(p.stage, p.actors, p.gpus) for p in pools] == [("matting", 4, 0.0), ("pose", 4, 0.5)]
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


def test_the_gpu_ledger_gives_each_gpu_its_share_of_every_stage():
    """The ledger's choice (pipeline/gpu_balance.py), fed what Ray's best-fit packing assigns:
    the actors of a stage spread over the node's GPUs, no GPU past a whole one, the node's own
    ids (a raylet started with CUDA_VISIBLE_DEVICES=1,3), and a restarted actor claims afresh."""
    from collections import Counter

    from disco.pipeline.gpu_balance import GpuLedger

    ledger = GpuLedger()
    # Quarter shares on 2 GPUs: Ray packs 4 matting actors on GPU 0, 4 pose actors on GPU 1.
    got = [(stage, ledger.claim(f"{stage}{k}", "n1", stage, 0.25, [gpu], ["0", "1"])[0])
           for stage, gpu in [("matting", "0")] * 4 + [("pose", "1")] * 4 for k in [len(ledger.claims)]]
    assert Counter(got) == {("matting", "0"): 2, ("matting", "1"): 2, ("pose", "0"): 2, ("pose", "1"): 2}
    # Another node is counted apart; its ids are the raylet's.
    assert ledger.claim("a", "n2", "matting", 0.5, ["1"], ["1", "3"]) == ["1"]
    assert ledger.claim("b", "n2", "matting", 0.5, ["1"], ["1", "3"]) == ["3"]
    assert ledger.claim("c", "n2", "pose", 0.5, ["3"], ["1", "3"]) == ["3"]  # the least taken GPU first
    assert ledger.claim("d", "n2", "pose", 0.5, ["3"], ["1", "3"]) == ["1"]
    on_n2 = lambda: sorted(k for k, claim in ledger.claims.items() if claim[0] == "n2")  # noqa: E731
    assert ledger.claim("b", "n2", "matting", 0.5, ["1"], ["1", "3"]) == ["3"]  # b restarted: its half of 3 again
    assert on_n2() == ["a", "b", "c", "d"]
    assert ledger.claim("e", "n2", "pose", 0.5, ["3"], ["1", "3"]) == ["3"]  # no room left: where Ray put it
    assert ledger.claim("f", "n2", "pose", 0.5, ["7"], ["1", "3"]) == ["7"]  # not an id of the node: untouched


def test_the_planner_reads_frames_per_unit_from_the_units_rows(tmp_path):
    """preprocess hands the planner its units as Arrow rows: a video segment's frames (its
    indices), a tar range's samples, a still's one (also with no payload), as from the dicts."""
    from disco.pipeline.sources.units import unit_frames
    from disco.pipeline.store.schema import payload, unit_table

    units = [{"input_path": "v.mp4", "kind": "video", "src_indices": list(range(32)), "extra": payload()},
             {"input_path": "v.mp4", "kind": "video", "src_indices": list(range(7)), "extra": payload()},
             {"input_path": "a.tar", "kind": "tar", "src_indices": [], "extra": payload(start=64, stop=96, offset=9)},
             {"input_path": "a.jpg", "kind": "image", "src_indices": [], "extra": payload()},
             {"input_path": "b.jpg", "kind": "image", "src_indices": [3, 4], "extra": None}]
    table = unit_table(units)
    assert unit_frames(table).tolist() == unit_frames(units).tolist() == [32, 7, 32, 1, 2]
    nodes = [{"CPU": 8.0, "GPU": 0.0}]
    cfg = _cfg(tmp_path, matting="mediapipe", pose="mediapipe", device="cpu")
    assert [p.to_dict() for p in plan_pools(cfg, nodes, table)] == [p.to_dict() for p in plan_pools(cfg, nodes, units)]


def test_a_matting_call_hands_on_one_block_of_at_most_128_mib():
    from disco.pipeline.pools import MATTED_CALL_BYTES, matting_units_per_call

    def units(width, height, count=100):
        return [{"src_indices": list(range(32)), "width": width, "height": height} for _ in range(count)]

    assert matting_units_per_call(units(512, 288), 512, 32) == MATTED_CALL_BYTES // (32 * 512 * 288 * 4) == 7
    assert matting_units_per_call(units(1280, 720), 1280, 32) == 1  # one unit is most of a block
    assert matting_units_per_call(units(256, 256), 512, 5) == 5  # never more than the writer's calls
    assert matting_units_per_call(units(0, 0), 256, 32) == MATTED_CALL_BYTES // (32 * 256 * 256 * 4)  # stills
    assert matting_units_per_call([], 512, 32) == 1
    # Sized by the largest unit: a call may hold a video's segments only, amid many stills.
    stills = [{"src_indices": [], "width": 0, "height": 0} for _ in range(3000)]
    assert matting_units_per_call(units(512, 288) + stills, 64, 128) == 7


def test_a_writing_call_of_the_gpu_pipeline_holds_at_most_a_gib_of_frames(tmp_path):
    """The pose (writing) stage's calls were sized to a shard's rows whatever the pictures: stills
    at --max-side 1024 joined 4 GiB of frames and mattes a call (two in flight per actor, copied
    again into Python). At the default --max-side a call still fills a shard."""
    from disco.pipeline.pools import POSE_CALL_BYTES

    node = [{"CPU": 16.0, "GPU": 8.0}]
    stills = [{"src_indices": [], "width": 0, "height": 0} for _ in range(200_000)]
    large = plan_pools(_cfg(tmp_path, max_side=1024), node, stills)
    assert large[-1].units_per_call == POSE_CALL_BYTES // (1024 * 1024 * 4) == 256
    assert plan_pools(_cfg(tmp_path), node, stills)[-1].units_per_call == 1024  # --max-side 512: a shard


def test_ray_datas_warning_that_a_stage_cannot_start_reaches_the_runs_log():
    """A first stage whose actors cannot start (--actors asking for more GPU shares or CPUs than
    the cluster has) hangs the run; Ray Data warns after a minute, but the run keeps the
    "ray.data" logger at ERROR, so the user saw nothing. Its warning is the run's line now (the
    logger and the words Ray Data 2.60 uses, from its own module; the warning itself is Ray
    Data's: here it is sent through that logger as Ray Data sends it)."""
    import inspect
    import logging

    import ray.data._internal.execution.resource_manager as resource_manager

    from disco.pipeline.errors import STARVATION_LOGGER, STARVATION_TEXT, starved_stages_reported

    assert resource_manager.logger.name == STARVATION_LOGGER
    assert STARVATION_TEXT in inspect.getsource(resource_manager)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # as the run sets it
    lines = []
    with starved_stages_reported(lines.append):
        resource_manager.logger.warning("Cluster resources are not enough to run any task from "
                                        "MapBatches(MattingStage). The job may hang forever unless the cluster scales up.")
        resource_manager.logger.info("a notice")
    assert len(lines) == 1 and "MapBatches(MattingStage)" in lines[0] and "--actors" in lines[0]
    resource_manager.logger.warning("Cluster resources are not enough to run any task from X.")
    assert len(lines) == 1  # only within the run


@pytest.mark.parametrize("options, words", [({"cpus_per_actor": 0}, "--cpus-per-actor must be above 0"),
                                            ({"gpus_per_actor": -1}, "--gpus-per-actor cannot be negative"),
                                            ({"pose_gpus": -0.5}, "--pose-gpus cannot be negative")])
def test_actor_resources_that_ray_would_refuse_are_one_line(tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, **options).validate()


def test_models_that_do_not_fit_an_actors_gpu_share_stop_the_run_in_one_line(monkeypatch):
    """SAM ViT-H with GroundingDINO on half of an 8 GB GPU runs out of memory while it loads: Ray
    Data ended the run on the first actor with its traceback. Now the run's one line, saying what
    to give the actors."""
    import torch

    from disco.pipeline.actors import ActorCannotStart, _annotator
    from disco.pipeline.annotators import registry
    from disco.pipeline.annotators.registry import Backend
    from disco.pipeline.errors import STOPS_THE_RUN, stopping_error

    def too_big(role, options, shared):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.44 GiB")

    registry.register(Backend(name="too-big", roles=("matting",), build=too_big, summary="(tests only)"))
    try:
        settings = {"matting": "too-big", "pose": "none", "hands": False, "min_visibility": 0.5,
                    "min_mask_area": 0.01, "joint_threshold": 0.2, "backend_options": {}}
        with pytest.raises(ActorCannotStart) as info:
            _annotator(settings, ("matting",))
    finally:
        registry.unregister("too-big")
    assert STOPS_THE_RUN in str(info.value) and "--matting-gpus / --pose-gpus 1" in str(info.value)
    assert "\n" not in str(stopping_error(info.value))


def test_the_log_says_what_the_pools_ask_and_that_other_work_holds_part_of_it(tmp_path):
    """The pools are planned from the nodes' totals: where another job holds half the GPUs, half
    the actors wait, and if they are all of one stage the run holds still with nothing said
    (Ray Data warns for its first stage only). The run's log now says what it asks and what is free."""
    from disco.pipeline.pools import describe_pools

    nodes = [{"CPU": 4.0, "GPU": 0.0}, {"CPU": 96.0, "GPU": 8.0}]
    pools = plan_pools(_cfg(tmp_path), nodes, _units(10_000))
    idle = describe_pools(pools, nodes, {"CPU": 100.0, "GPU": 8.0})
    assert idle == ["pools: matting 8 actor(s) x 1 CPU + 0.5 GPU, pose 8 actor(s) x 1 CPU + 0.5 GPU; planned from "
                    "the 2 node(s) alive now (100 CPU, 8 GPU)"]
    shared = describe_pools(pools, nodes, {"CPU": 100.0, "GPU": 4.0})
    assert len(shared) == 2 and "other work holds GPUs of the cluster now (8 asked, 4 free)" in shared[1]
    assert len(describe_pools(pools, nodes, {"CPU": 1.0, "GPU": 8.0})) == 1  # (CPUs: this run's tasks a moment ago)
    # A pool asking for more than the cluster has (an autoscaler's nodes to come) is not "other work".
    more = plan_pools(_cfg(tmp_path, actors=16), nodes, _units(10_000))
    waiting = describe_pools(more, nodes, {"CPU": 100.0, "GPU": 8.0})
    assert len(waiting) == 2 and "wait for nodes an autoscaler adds" in waiting[1]
    # A head of no CPU, its workers scaled to zero: one actor planned, waiting for a node.
    head = [{"CPU": 0.0, "GPU": 0.0}]
    alone = describe_pools(plan_pools(_cfg(tmp_path, "mediapipe", "mediapipe", "cpu"), head, _units(100)), head, {})
    assert "planned from the 1 node(s) alive now (0 CPU, 0 GPU)" in alone[0] and "--actors N sets it" in alone[-1]


def test_the_ledger_moves_actors_only_among_the_runs_gpus_where_other_work_holds_some():
    """Another job holds GPUs 0-3 of an 8-GPU node and Ray gives this run's half-GPU actors 4-7:
    moving "to the GPU with the fewest of its stage", the ledger put them on 0-3, the other job's
    devices (out of memory in both). It moves freely only where the run takes every GPU of a
    cluster nobody else used when it started."""
    from disco.pipeline.gpu_balance import GpuLedger, takes_whole_cluster

    ids = [str(g) for g in range(8)]
    shared = GpuLedger(whole_cluster=False)
    packed = [("matting", "4"), ("matting", "4"), ("matting", "5"), ("matting", "5"),
              ("pose", "6"), ("pose", "6"), ("pose", "7"), ("pose", "7")]
    got = [shared.claim(f"a{k}", "n1", stage, 0.5, [gpu], ids)[0] for k, (stage, gpu) in enumerate(packed)]
    assert set(got) <= {"4", "5", "6", "7"}
    alone = GpuLedger()
    moved = [alone.claim(f"a{k}", "n1", stage, 0.5, [gpu], ids)[0] for k, (stage, gpu) in enumerate(packed)]
    assert set(moved) & {"0", "1", "2", "3"}  # (what the run does where the cluster is all its own)
    nodes = [{"CPU": 96.0, "GPU": 8.0}]
    assert takes_whole_cluster(nodes, {"GPU": 8.0})  # a run alone, also with few actors: balanced
    assert not takes_whole_cluster(nodes, {"GPU": 4.0})  # another job holds half
