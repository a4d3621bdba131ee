"""Training's real path: NCCL-like collectives, Ctrl-C, the learning-rate schedule across resumes,
and a node of a two-node Ray cluster (on loopback) lost mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from typer.testing import CliRunner

from disco.cli import app
from disco.pipeline.errors import ConfigError
from disco.model.checkpoint import find_checkpoint, list_checkpoints, read_checkpoint
from disco.train.collectives import CollectiveDeviceError, Collectives, nccl_guard
from disco.train.config import TrainConfig, load_run_config
from disco.train.launch import TrainingFailed, train
from disco.train.monitor import read_metrics
from helpers import TWO_WORKER_RUN, cli_process, submit_job
from loopback_cluster import loopback_cluster

RES = 64
OPTIONS = ["--stage", "finetune", "--model", "tiny", "--resolution", str(RES), "--batch-size", "2",
           "--sample-every", "1000", "--sample-steps", "2", "--warmup-steps", "0", "--no-progress"]


def _weights(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    return read_checkpoint(find_checkpoint(run, step))[0]


def _same_weights(a: Path, b: Path, step: int) -> bool:
    wa, wb = _weights(a, step), _weights(b, step)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# -- collectives ------------------------------------------------------------------------------------

@pytest.fixture
def fake_group():
    """A two-rank process group whose collectives do nothing (torch's ``fake`` backend), so that
    tensors on any device, ``meta`` included, reach the guard."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_collectives_live_on_the_training_device_and_the_guard_refuses_others(fake_group):
    """The training device here is ``meta``, standing in for a GPU: the guard refuses a CPU
    tensor as NCCL would (the bug that crashed every multi-GPU run at its first log step), and
    ``Collectives`` passes because it places its tensors on the training device."""
    import torch.distributed as dist

    from disco.train.collectives import _collective

    with nccl_guard("meta", enabled=True):
        with pytest.raises(CollectiveDeviceError, match="training device is meta"), _collective():
            dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))  # what the loop used to do
        mean = Collectives(2, "meta").mean([1.0, 2.0])
        assert mean.device.type == "meta" and mean.shape == (2,)
    dist.all_reduce(torch.tensor([1.0]))  # outside the block the guard is gone


def test_under_the_guard_a_collective_outside_collectives_is_refused_even_on_the_cpu(fake_group):
    """The tests train on the CPU under gloo, where the training device is the CPU: a loop that
    all-reduced a CPU tensor itself would pass the device check there and crash under NCCL. The
    guard refuses any collective issued outside ``Collectives``, tensor and object ones alike."""
    import torch.distributed as dist

    with nccl_guard("cpu", enabled=True):
        with pytest.raises(CollectiveDeviceError, match="outside train.collectives.Collectives"):
            dist.all_reduce(torch.tensor([1.0]))
        with pytest.raises(CollectiveDeviceError, match="outside train.collectives.Collectives"):
            dist.all_gather_object([None, None], {"rows": 1})
        # A barrier (NCCL's runs on the current GPU) and point-to-point sends are refused too.
        with pytest.raises(CollectiveDeviceError, match="barrier called outside"):
            dist.barrier()
        with pytest.raises(CollectiveDeviceError, match="send called outside"):
            dist.send(torch.tensor([1.0]), dst=1)
        collectives = Collectives(2, "cpu")
        assert collectives.mean([2.0]).item() == 2.0 / 2  # the fake group sums nothing: 2 / world
        assert collectives.any_of(True, False) == (True, False)
        assert len(collectives.gather(3)) == 2


def test_under_gloo_object_collectives_pass_for_workers_training_on_a_gpu():
    """Workers sharing a GPU (``--gpus-per-worker`` below 1) train over gloo, whose object
    collectives run on CPU tensors whatever the training device: the guard lets those through
    (``meta`` standing for the GPU) and still refuses a CPU tensor in a tensor collective."""
    import torch.distributed as dist

    from disco.train.collectives import _collective

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with nccl_guard("meta", enabled=True):
            out = [None]
            with _collective("object"):
                dist.all_gather_object(out, {"rows": 3})
            assert out == [{"rows": 3}]
            with pytest.raises(CollectiveDeviceError, match="training device is meta"), _collective():
                dist.all_reduce(torch.tensor([1.0]))
    finally:
        dist.destroy_process_group()


def test_only_the_collectives_module_talks_to_torch_distributed():
    """The rule the guard holds at run time, read from the source: no other module of the trainer,
    the model or generation imports ``torch.distributed``."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("train", "model", "generate", "evaluate", "pipeline", "commands"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
                module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
                if any(n.startswith("torch.distributed") for n in names) or module.startswith("torch.distributed") \
                        or (module == "torch" and "distributed" in names):
                    offenders.append(str(path.relative_to(root)))
    assert sorted(set(offenders)) == ["train/collectives.py"]
    assert Collectives(1, "cpu").mean([3.0]).item() == 3.0 and Collectives(1, "cpu").any_of(True) == (True,)


def test_the_suite_trains_under_the_guard():
    """Every multi-worker test of the suite runs its loop under the guard (conftest sets it)."""
    assert os.environ.get("DISCO_NCCL_GUARD") == "1"


# -- Ctrl-C ---------------------------------------------------------------------------------------

# About 50 s: the two-worker test below takes the same path (the SIGINT handler, the stop file
# every loop checks, a checkpoint of the last step, exit 130) and the kill -9 test in
# test_train.py resumes an interrupted run to the uninterrupted weights.
@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_of_the_last_step_and_exits_130(triplets, tmp_path):
    """SIGINT to the command's process group (what a terminal's Ctrl-C does) once training has
    logged a step: the run stops after the step in progress, checkpoints it (no periodic
    checkpoint is due), exits 130, and ``--resume`` reaches the uninterrupted run's weights."""
    steps = 8
    options = [*OPTIONS, "--data", str(triplets["video"]), "--max-steps", str(steps), "--checkpoint-every", "1000",
               "--log-every", "1"]
    whole = tmp_path / "whole"
    runner = CliRunner()  # the runs around the interrupted one: in this process, on its Ray instance
    assert runner.invoke(app, ["train", *options, "--output", str(whole)]).exit_code == 0
    stopped = tmp_path / "stopped"
    command, env = cli_process("train", *options, "--output", str(stopped))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    out, err = _interrupt_after_first_log(stopped, process)
    assert process.returncode == 130, err[-2000:]
    stopped_at = _summary(stopped)["step"]
    assert _summary(stopped)["interrupted"] and 1 <= stopped_at < steps
    assert list(list_checkpoints(stopped)) == [stopped_at]  # the step it stopped at, and only that
    assert "--resume" in out + err and "Traceback" not in err
    resumed = runner.invoke(app, ["train", "--output", str(stopped), "--resume", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert _same_weights(whole, stopped, steps)
    assert _summary(stopped) == _summary(whole)


def _interrupt_after_first_log(run: Path, process: subprocess.Popen) -> tuple[str, str]:
    try:
        deadline = time.monotonic() + 240
        while not read_metrics(run)[0]:
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no step logged in 4 minutes"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        return process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_ctrl_c_stops_ray_train_workers_after_a_checkpoint(triplets, tmp_path):
    """The same with two Ray Train workers (gloo): Ray Train's own Ctrl-C handler would abort the
    workers without a checkpoint; ours stops them after the step and checkpoints it. (With
    --eval-every: rank 0 reads its held-out rows, found by the driver, from the object store.)"""
    run = tmp_path / "two"
    command, env = cli_process("train", *OPTIONS, "--data", str(triplets["video"]), "--max-steps", "20",
                               "--checkpoint-every", "1000", "--log-every", "1", "--num-workers", "2",
                               "--eval-every", "1000", "--output", str(run))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    out, err = _interrupt_after_first_log(run, process)
    assert process.returncode == 130, err[-2000:]
    summary = _summary(run)
    assert summary["interrupted"] and summary["workers"] == 2 and 1 <= summary["step"] < 20
    assert list(list_checkpoints(run)) == [summary["step"]]
    assert json.loads((run / f"checkpoint-{summary['step']:08d}" / "state.json").read_text())["world_size"] == 2


def test_a_worker_group_the_cluster_cannot_hold_is_said_and_a_stop_ends_it_at_once(triplets, tmp_path, ray_local):
    """Ray Train waits for room for its worker group without a word: `--num-workers 2 --use-gpu` on
    a cluster of one GPU sat at step 0 for ever, and the first Ctrl-C or SIGTERM (`timeout`, `ray
    job stop`) asked workers that never started to stop after their step: only a second one
    ended it. The log says what the workers ask and what the nodes hold; a stop before any worker
    started ends the run at once (here: workers of 100000 CPUs each on this machine's instance)."""
    run = tmp_path / "waits"
    options = tmp_path / "big-workers.yaml"
    options.write_text("cpus_per_worker: 100000\n")  # more than any node has
    command, env = cli_process("train", *OPTIONS, "--data", str(triplets["video"]), "--max-steps", "4",
                               "--num-workers", "2", "--config", str(options), "--output", str(run))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(process.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("ask for more than" in line for line in said):
            assert process.poll() is None, "".join(said)[-2000:]
            assert time.monotonic() < deadline, "".join(said)[-2000:]
            time.sleep(0.1)
        time.sleep(2)  # Ray Train is waiting for its placement group now
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        reader.join(10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = "".join(said)
    assert process.returncode == 130 and time.monotonic() - stopped < 60, text[-2000:]
    wants = next(line for line in text.splitlines() if "ask for more than" in line)
    assert wants.startswith("the 2 training workers (100000 CPU each) ask for more than the 1 node(s) alive now hold"), wants
    assert "room for none" in wants and "Ctrl-C stops the run at once while none has started" in wants
    assert "stopped at once (SIGTERM): no training worker had started, nothing was trained" in text, text[-2000:]
    assert "Traceback" not in text and not list_checkpoints(run)
    # Nothing was trained, so the folder is no run: the same command on what is here (the line's
    # advice) trains, where it was sent to a --resume that kept the workers it could not have.
    assert f"{run} holds no run: the same command starts it anew" in text, text[-2000:]
    again = CliRunner().invoke(app, [*command[3:command.index("--num-workers")], "--max-steps", "1",
                                     "--num-workers", "1", "--output", str(run)])
    assert again.exit_code == 0 and "trained to step 1" in again.output, again.output[-2000:]


def test_workers_given_gpus_that_pytorch_cannot_use_stop_the_run_in_one_line_without_restarts(triplets, tmp_path,
                                                                                              ray_local):
    """A node whose Ray offers GPUs that PyTorch cannot use (`ray start --num-gpus` on a node
    without them, a broken driver; here the session's fake GPUs): NCCL's "no GPUs found" came out
    of Ray Train's controller after --max-failures restarts, with advice to --resume, which fails
    the same way. It is found on the workers before the process group, and stops the run at once."""
    import ray

    from disco.pipeline.cluster import init_ray

    if torch.cuda.is_available():
        pytest.skip("PyTorch here can use the GPU Ray gives the worker")
    init_ray()
    run = tmp_path / "gpu"
    cfg = _config(tmp_path, triplets, "gpu", use_gpu=True, num_workers=1, max_failures=3,
                  ray_address=ray.get_runtime_context().gcs_address)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"a training worker on node .* was given GPU \S+ by Ray, and PyTorch there "
                                          r"finds (a PyTorch built without CUDA|no CUDA device it can open)") as caught:
        train(cfg)
    assert "--resume" not in str(caught.value) and "restart" not in str(caught.value)
    assert time.monotonic() - started < 60 and not list_checkpoints(run)
    # The group's resources are given back (raised while the group started, Ray kept its
    # placement group, and the session's next runs waited for CPUs that never came).
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources().get("GPU", 0):
        assert time.monotonic() < deadline, ray.util.placement_group_table()
        time.sleep(0.2)


def test_the_log_says_how_many_training_workers_the_nodes_hold():
    from disco.train.launch import describe_workers, workers_that_fit

    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 0.0}]
    assert workers_that_fit(nodes, {"CPU": 1.0, "GPU": 1.0}) == 1 and workers_that_fit(nodes, {"CPU": 1.0, "GPU": 0.5}) == 2
    assert workers_that_fit(nodes, {"CPU": 0.0}) >= 1000 and workers_that_fit(nodes, {"CPU": 3.0}) == 3
    two = TrainConfig(model="tiny", num_workers=2, use_gpu=True)
    [line] = describe_workers(two, nodes, {"CPU": 12.0, "GPU": 1.0}, 1.0)
    assert "(1 CPU + 1 GPU each)" in line and "(12 CPU, 1 GPU: room for 1)" in line and "--num-workers 1" in line
    assert describe_workers(two.updated({"gpus_per_worker": 0.5}), nodes, {"CPU": 12.0, "GPU": 1.0}, 1.0) == []
    [busy] = describe_workers(two.updated({"gpus_per_worker": 0.5}), nodes, {"CPU": 12.0, "GPU": 0.5}, 1.0)
    assert busy.startswith("other work holds part of the cluster now (2 CPU, 1 GPU asked; 12 CPU, 0.5 GPU free)")


# -- the learning-rate schedule -------------------------------------------------------------------

def _config(tmp_path, triplets, name, **options) -> TrainConfig:
    values = dict(stage="finetune", data=[str(triplets["video"])], output=str(tmp_path / name), model="tiny",
                  resolution=RES, batch_size=2, max_steps=4, checkpoint_every=2, sample_every=1000, sample_steps=2, log_every=1,
                  warmup_steps=0)
    values.update(options)
    return TrainConfig(**values)


def _lrs(run: Path) -> dict[int, float]:
    return {line["step"]: line["lr"] for line in read_metrics(run)[0]}


def test_resume_keeps_the_schedule_and_a_new_length_stretches_it_without_a_jump(triplets, tmp_path):
    cfg = _config(tmp_path, triplets, "run")
    train(cfg)
    run = Path(cfg.output)
    saved = load_run_config(run)
    assert (saved.schedule_steps, saved.warmup_steps) == (4, 0)
    assert Path(saved.output).is_absolute() and all(Path(d).is_absolute() for d in saved.data)
    peak = cfg.learning_rate
    assert _lrs(run) == pytest.approx({1: 0.75 * peak, 2: 0.5 * peak, 3: 0.25 * peak, 4: 0.0})
    # Back to step 2, as after a crash; then more steps than the schedule has.
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("checkpoint-00000004", "summary.json", "metrics.jsonl"))
    with pytest.raises(ConfigError, match="--schedule-steps 6"):
        train(TrainConfig(output=str(crashed), resume=True, max_steps=6), given={"output", "resume", "max_steps"})
    train(TrainConfig(output=str(crashed), resume=True, max_steps=6, schedule_steps=6),
          given={"output", "resume", "max_steps", "schedule_steps"})
    # From the rate at step 2 (half the peak) down to 0 at the new end, step by step: no jump.
    assert _lrs(crashed) == pytest.approx({3: 0.375 * peak, 4: 0.25 * peak, 5: 0.125 * peak, 6: 0.0})
    assert load_run_config(crashed).decay_from == [2, 0.5]
    # The stretched rates differ from the original schedule's from step 3 on, and so do the weights.
    assert not _same_weights(run, crashed, 4)
    # The schedule's position is the updates applied (state.json's "updates"), fewer than the steps
    # where fp16's loss scaler skipped some: the stretch starts from there, not from the step.
    state_file = crashed / "checkpoint-00000006" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["updates"] == state["step"] == 6  # nothing skipped without fp16
    state_file.write_text(json.dumps({**state, "updates": 5}))  # as after one skipped update
    from disco.train.launch import resolve

    stretched, _ = resolve(TrainConfig(output=str(crashed), resume=True, max_steps=8, schedule_steps=8),
                           given={"output", "resume", "max_steps", "schedule_steps"})
    assert stretched.decay_from == [5, pytest.approx(0.125)]  # the rate at position 5: 0.5 x (6 - 5) / (6 - 2)


def test_a_schedule_stretched_during_the_warm_up_still_reaches_the_peak_rate(tmp_path):
    """A run stopped in its warm-up and resumed with a longer --schedule-steps decayed linearly from
    the rate at the resumed step: stopped at step 50 of a 100-step warm-up, the whole 70,000-step run
    trained at half the peak at most. The warm-up now goes on to the peak, then the decay."""
    from disco.train.config import lr_factor
    from disco.train.launch import _resumed_schedule

    saved = TrainConfig(stage="finetune", data=[str(tmp_path)], output=str(tmp_path / "run"), model="tiny",
                        max_steps=1000, warmup_steps=100)
    resumed = _resumed_schedule(TrainConfig(**{**saved.to_dict(), "max_steps": 70000, "schedule_steps": 70000}),
                                saved, step=50)
    assert resumed.decay_from is None and resumed.schedule_length == 70000

    def rate(step: int) -> float:
        return lr_factor(step, resumed.warmup, resumed.schedule_length, resumed.decay_from)

    assert rate(50) == lr_factor(50, 100, 1000) == 0.5  # no jump at the resumed step
    assert rate(100) == 1.0 and max(rate(s) for s in range(0, 70000, 50)) == 1.0
    assert rate(35050) == pytest.approx(0.5, abs=1e-3) and rate(70000) == 0.0
    # Past the warm-up, a stretch decays from the rate where the run stopped, as before.
    late = _resumed_schedule(TrainConfig(**{**saved.to_dict(), "max_steps": 2000, "schedule_steps": 2000}), saved,
                             step=550)
    assert late.decay_from == [550, pytest.approx(lr_factor(550, 100, 1000))]
    with pytest.raises(ConfigError, match="beyond the run's warm-up"):
        _resumed_schedule(TrainConfig(**{**saved.to_dict(), "max_steps": 80, "schedule_steps": 80}), saved, step=50)


# -- a lost worker ------------------------------------------------------------------------------------

def _train_workers() -> set[psutil.Process]:
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.add(process)
        except psutil.Error:
            continue
    return found


CUT_SHORT = ".tmp-checkpoint-00000003-4194303"  # a checkpoint write a lost process left (its pid)


def _kill_workers_twice(run: Path, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL one Ray Train worker process of this session's Ray instance once ``run`` holds
    checkpoint 2; then, once the restarted group (other processes) has written checkpoint 4, one
    of its workers."""
    deadline = time.monotonic() + 300
    first: set[psutil.Process] = set()
    while not stop.is_set() and time.monotonic() < deadline and len(killed) < 2:
        steps = list_checkpoints(run)
        workers = _train_workers()
        if not killed and 2 in steps and workers:
            first = workers
            victim = next(iter(workers))
        elif killed and max(steps, default=0) >= 4 and workers and not workers & first:
            victim = next(iter(workers))
        else:
            time.sleep(0.05)
            continue
        if not killed:  # as if the kill had cut rank 0's write of checkpoint 3 short
            (run / CUT_SHORT).mkdir(exist_ok=True)
            (run / CUT_SHORT / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4096)
        try:
            victim.kill()
            killed.append(victim.pid)
        except psutil.Error:
            pass


def test_a_lost_worker_restarts_training_from_its_last_checkpoint(triplets, two_worker_run, tmp_path):
    """Two Ray Train workers on this session's Ray instance, --max-failures 1. One worker's process
    is killed (SIGKILL) after checkpoint 2: Ray Train starts the worker group again and the loop
    continues from the checkpoint it was last told of, bit for bit (checkpoint 4 and the loss
    logged at step 4, whose window spans the restart, equal an uninterrupted run's). A worker of
    the new group is killed after checkpoint 4: the restarts are used up, and the run ends with
    one line naming the last checkpoint and the --resume command. The restarted group's rank 0
    removes the checkpoint folder whose write the kill cut short. (A whole node lost on a
    multi-node cluster: the slow test below.)"""
    # 16 steps: the second kill has 12 steps' time to land after checkpoint 4.
    whole = two_worker_run
    lost = TrainConfig(**TWO_WORKER_RUN, data=[str(triplets["video"])], output=str(tmp_path / "lost"), max_failures=1)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_workers_twice, args=(Path(lost.output), stop, killed))
    killer.start()
    try:
        with pytest.raises(TrainingFailed) as failed:
            train(lost)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 2
    assert not (Path(lost.output) / CUT_SHORT).exists()
    assert _same_weights(whole, Path(lost.output), 4)
    logged = {m["step"]: m["loss"] for m in read_metrics(Path(lost.output))[0]}
    assert logged[4] == {m["step"]: m["loss"] for m in read_metrics(whole)[0]}[4]
    message = str(failed.value)
    last = max(list_checkpoints(Path(lost.output)))
    assert "\n" not in message and "--resume" in message and f"checkpoint-{last:08d}" in message


# -- a lost node --------------------------------------------------------------------------------------

def _cluster_train(address: str, data: Path, run: Path, config: Path, *extra: str) -> subprocess.Popen:
    command, env = cli_process("train", *OPTIONS, "--data", str(data), "--output", str(run), "--config", str(config),
                               "--num-workers", "2", "--max-steps", "6", "--checkpoint-every", "2", "--log-every", "4",
                               "--ray-address", address, *extra)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out + err


def _wait_for_checkpoint(run: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 300
    while step not in list_checkpoints(run):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint of step {step} in 5 minutes"
        time.sleep(0.1)


def test_a_node_being_preempted_gets_a_checkpoint_written_at_once(triplets, tmp_path, monkeypatch):
    """A spot reclaim notice: the node of a Ray Train worker is drained as preempted, with its
    deadline minutes away. Ray Train tells the workers, which ask every ``PREEMPTION_CHECK_STEPS``
    steps: from the first ask after the notice, each writes a checkpoint (periodic ones are 1,000
    steps apart), for the restart Ray Train makes when the node goes to start from; here the run
    reaches its end first. (One worker: every worker asks, however many.)"""
    from disco.train.loop import PREEMPTION_CHECK_STEPS

    config = tmp_path / "resources.yaml"
    config.write_text(yaml.safe_dump({"cpus_per_worker": 1.5, "data_cpus": 0.25}))
    steps = 3 * PREEMPTION_CHECK_STEPS
    run = tmp_path / "drained"
    # Ray Train's watcher looks for drained nodes every 5 s, and the tiny run may train its steps
    # in less: here it looks every 0.2 s.
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")
    with loopback_cluster(head_cpus=1) as cluster:
        doomed = cluster.add_node(2)
        command, env = cli_process("train", *OPTIONS, "--data", str(triplets["video"]), "--output", str(run),
                                   "--config", str(config), "--num-workers", "1", "--max-steps", str(steps),
                                   "--checkpoint-every", "1000", "--log-every", "1", "--keep", "100",
                                   "--ray-address", cluster.address)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not read_metrics(run)[0]:
                assert process.poll() is None, process.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "no step logged in 5 minutes"
                time.sleep(0.05)
            cluster.drain_node(doomed, 600)
        finally:
            code, output = _finish(process)
    assert code == 0, output[-3000:]
    metrics = read_metrics(run)[0]
    noticed = [m["step"] for m in metrics if "preemption_checkpoint" in m]
    # From the first ask after the notice, a checkpoint at every ask (the last step's is the run's own).
    assert noticed and noticed == list(range(noticed[0], steps + 1, PREEMPTION_CHECK_STEPS)), metrics
    assert noticed[0] < steps and sorted(list_checkpoints(run)) == noticed
    assert _summary(run)["step"] == steps and "Traceback" not in output


@pytest.mark.slow  # about 8 minutes on 2 cores; the lost-worker test above takes the same restart path
def test_a_lost_node_restarts_training_from_its_last_checkpoint(triplets, tmp_path):
    """Two Ray nodes besides a head with one CPU, on loopback; two workers of 1.5 CPU, so one runs
    on each node. The second node is killed (SIGKILL of all its processes) after checkpoint 2 and
    a replacement node joins, as an autoscaler would bring one: Ray Train restarts the worker
    group, the loop continues from checkpoint 2, and the final weights and summary equal an
    uninterrupted run's bit for bit. With --max-failures 0 the same loss ends the command with
    one line that names the last checkpoint and the --resume command (which the kill -9 test
    shows continues exactly)."""
    config = tmp_path / "resources.yaml"
    config.write_text(yaml.safe_dump({"cpus_per_worker": 1.5, "data_cpus": 0.25}))
    with loopback_cluster(head_cpus=1) as cluster:
        cluster.add_node(2)
        doomed = cluster.add_node(2)
        whole = tmp_path / "whole"
        code, output = _finish(_cluster_train(cluster.address, triplets["video"], whole, config))
        assert code == 0, output[-3000:]
        assert _summary(whole)["workers"] == 2

        survived = tmp_path / "survived"
        process = _cluster_train(cluster.address, triplets["video"], survived, config)
        _wait_for_checkpoint(survived, process, 2)
        cluster.kill_node(doomed)
        doomed = cluster.add_node(2)
        code, output = _finish(process)
        assert code == 0, output[-3000:]
        assert _same_weights(whole, survived, 6)
        assert _summary(survived) == _summary(whole)

        gave_up = tmp_path / "gave-up"
        process = _cluster_train(cluster.address, triplets["video"], gave_up, config, "--max-failures", "0")
        _wait_for_checkpoint(gave_up, process, 2)
        cluster.kill_node(doomed)
        code, output = _finish(process)
        assert code == 1, output[-3000:]
        # Ray's own notices about the lost node (pushed to every driver, "(raylet) ...") may come
        # too; ours is the one "error:" line.
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert "Traceback" not in output and len(errors) == 1, output[-3000:]
        assert "--resume" in errors[0] and "checkpoint-0000000" in errors[0]


def test_sigterm_asks_the_run_to_stop_as_ctrl_c_does(tmp_path):
    """``ray job stop`` sends the job's driver SIGTERM (then SIGKILL after
    RAY_JOB_STOP_WAIT_TIME_S): like Ctrl-C it leaves the stop file every worker checks after its
    step (the Ctrl-C tests follow a run from there to its checkpoint), and a second one is fatal."""
    from disco.train.config import STOP_FILE, stop_requested
    from disco.train.launch import _stop_on_interrupt

    said = []
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / STOP_FILE).write_text("")  # as the run starts: there, and read (never a name that appears: NFS)
    assert not stop_requested(tmp_path)
    with _stop_on_interrupt(tmp_path, said.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested(tmp_path)
        assert said == ["stopping after the current step and writing a checkpoint (SIGTERM again to abort at once)"]
        assert signal.getsignal(signal.SIGTERM) == before  # a second one does what it did before
    assert signal.getsignal(signal.SIGTERM) == before
    # A request that cannot be written (a full disk; here a folder gone) says so, and a second
    # signal still aborts.
    said.clear()
    with _stop_on_interrupt(tmp_path / "gone", said.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert said and said[0].startswith("cannot ask the workers to stop") and "SIGTERM again to abort" in said[0]
        assert signal.getsignal(signal.SIGTERM) == before


# About 50 s (a cluster with its dashboard, a job's driver and two Ray Train workers starting on
# two cores): the SIGTERM test above holds the handler, the two-worker Ctrl-C test the stop
# from the stop file to the checkpoint.
@pytest.mark.slow
def test_ray_job_stop_stops_a_training_job_after_a_checkpoint(triplets, tmp_path):
    """`ray job stop` through the dashboard's job API, as a user stops a submitted training job:
    the supervisor's SIGTERM reaches the driver, the two Ray Train workers on the cluster stop
    after their step and checkpoint it, and the job ends STOPPED within the grace its runtime env
    gives it, resumable; with that grace the job hears no warning at its start."""
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    run = tmp_path / "job"
    cli = Path(sys.executable).with_name("disco-cli")
    entrypoint = " ".join([str(cli), "train", *OPTIONS, "--data", str(triplets["video"]), "--max-steps", "500",
                           "--checkpoint-every", "1000", "--log-every", "1", "--num-workers", "2",
                           "--output", str(run)])
    with loopback_cluster(head_cpus=1, dashboard=True) as cluster:
        cluster.add_node(2)
        client = JobSubmissionClient(cluster.dashboard)
        job = submit_job(client, entrypoint, {"RAY_JOB_STOP_WAIT_TIME_S": "150"})
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.time() + 300
        while not read_metrics(run)[0]:
            assert client.get_job_status(job) not in ended, client.get_job_logs(job)[-3000:]
            assert time.time() < deadline, "no step logged in time"
            time.sleep(0.1)
        assert client.stop_job(job)
        deadline = time.time() + 160
        while client.get_job_status(job) not in ended:
            assert time.time() < deadline, "the job did not stop in time"
            time.sleep(0.5)
        logs, status = client.get_job_logs(job), client.get_job_status(job)
    assert status == JobStatus.STOPPED, logs[-3000:]
    summary = _summary(run)
    assert summary["interrupted"] and summary["workers"] == 2 and 1 <= summary["step"] < 500, logs[-3000:]
    assert list(list_checkpoints(run)) == [summary["step"]]
    assert "stopping after the current step and writing a checkpoint" in logs and "--resume" in logs
    assert "Traceback" not in logs and "ray job stop` gives this job" not in logs, logs[-3000:]


def test_a_restart_finds_the_newest_checkpoint_when_the_reported_one_was_pruned(tmp_path, monkeypatch):
    """With --keep 1, rank 0 prunes the reported checkpoint when it writes the next; a worker lost
    before that one's report leaves Ray Train pointing at a folder that is gone. The restarted
    group starts from the newest checkpoint in the run directory instead of failing each attempt."""
    import ray.train

    from disco.model.checkpoint import STATE_FILE, checkpoint_name, list_checkpoints
    from disco.train import loop

    run = tmp_path / "run"
    for step in (4, 8):
        (run / checkpoint_name(step)).mkdir(parents=True)
        (run / checkpoint_name(step) / STATE_FILE).write_text("{}")
    assert sorted(list_checkpoints(run)) == [4, 8]
    pointer = tmp_path / "pointer"
    pointer.mkdir()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(pointer)))
    config = {"config": {"output": str(run)}}
    (pointer / loop.POINTER_FILE).write_text(json.dumps({"checkpoint": str(run / checkpoint_name(2))}))
    assert loop._start_checkpoint(config, distributed=True) == run / checkpoint_name(8)
    (pointer / loop.POINTER_FILE).write_text(json.dumps({"checkpoint": str(run / checkpoint_name(4))}))
    assert loop._start_checkpoint(config, distributed=True) == run / checkpoint_name(4)  # still there: used
    # Checkpoint 8 written whole but not reported yet (a report comes at the step after the write
    # ends): the restart takes it when this invocation wrote it, not when another one did.
    (run / checkpoint_name(8) / STATE_FILE).write_text(json.dumps({"invocation": "train-b"}))
    assert loop._start_checkpoint({**config, "invocation": "train-b"}, distributed=True) == run / checkpoint_name(8)
    assert loop._start_checkpoint({**config, "invocation": "train-c"}, distributed=True) == run / checkpoint_name(4)
    assert loop._start_checkpoint(config, distributed=True) == run / checkpoint_name(4)
    # A node that sees no checkpoint of the run (its folder not on shared storage): never a silent
    # start from --resume's checkpoint or from step 0.
    for path in list_checkpoints(run).values():
        shutil.rmtree(path)
    with pytest.raises(ConfigError, match="must be on storage every node sees"):
        loop._start_checkpoint({**config, "checkpoint": None}, distributed=True)


def test_a_restart_before_the_first_report_takes_the_checkpoint_this_invocation_wrote(tmp_path, monkeypatch):
    """Ray Train hears of a checkpoint at the step after its write ends. A worker lost in between
    for an invocation's first checkpoint left Ray Train with none: the restart went back to
    --resume's checkpoint (or step 0), up to a --checkpoint-every of steps trained again."""
    import ray.train

    from disco.model.checkpoint import STATE_FILE, checkpoint_name
    from disco.train import loop

    run = tmp_path / "run"
    for step, invocation in ((4, "train-a"), (8, "train-b")):
        (run / checkpoint_name(step)).mkdir(parents=True)
        (run / checkpoint_name(step) / STATE_FILE).write_text(json.dumps({"invocation": invocation}))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    resumed = {"config": {"output": str(run)}, "checkpoint": str(run / checkpoint_name(4))}
    assert loop._start_checkpoint({**resumed, "invocation": "train-b"}, distributed=True) == run / checkpoint_name(8)
    assert loop._start_checkpoint({**resumed, "invocation": "train-c"}, distributed=True) == run / checkpoint_name(4)
    new = {"config": {"output": str(run)}, "checkpoint": None}
    assert loop._start_checkpoint({**new, "invocation": "train-b"}, distributed=True) == run / checkpoint_name(8)
    assert loop._start_checkpoint({**new, "invocation": "train-c"}, distributed=True) is None
    # --keep 1 pruned the resumed checkpoint as this invocation wrote the next: still that one.
    shutil.rmtree(run / checkpoint_name(4))
    assert loop._start_checkpoint({**resumed, "invocation": "train-b"}, distributed=True) == run / checkpoint_name(8)
    # Another invocation's later checkpoint (a run resumed from an earlier step) is passed over.
    (run / checkpoint_name(12)).mkdir()
    (run / checkpoint_name(12) / STATE_FILE).write_text(json.dumps({"invocation": "train-a"}))
    assert loop._start_checkpoint({**new, "invocation": "train-b"}, distributed=True) == run / checkpoint_name(8)
    # The agreement's fallback (ranks whose views differ) still means what was resolved.
    assert loop._start_checkpoint({**new, "invocation": "train-b"}, distributed=True, since_reported=False) is None
    assert loop._start_checkpoint({**new, "invocation": "train-b"}, distributed=False) is None


def test_ranks_whose_views_of_the_run_differ_start_from_one_checkpoint(tmp_path):
    """After a restart each rank looks for its checkpoint in its own node's view of the run
    directory. Ranks that start from different steps reach the checkpoint, log and last-step
    collectives at different steps: under NCCL, a hang. Two real gloo processes whose views differ
    (a node's NFS view lagging): they agree on the checkpoint Ray Train points at; where it was
    pruned, on the newest one both see; where they see none in common, both stop, saying so."""
    import torch.multiprocessing as mp

    from disco.model.checkpoint import STATE_FILE, checkpoint_name
    from disco.train import loop
    from helpers import agreed_checkpoint_rank

    run = tmp_path / "run"
    for step in (8, 12):
        (run / checkpoint_name(step)).mkdir(parents=True)
        (run / checkpoint_name(step) / STATE_FILE).write_text("{}")
    pointers = []
    for step in (8, 4, 4):  # step 4 was pruned (--keep) before the newer ones were reported
        pointers.append(str(tmp_path / f"pointer-{len(pointers)}"))
        Path(pointers[-1]).mkdir()
        (Path(pointers[-1]) / loop.POINTER_FILE).write_text(json.dumps({"checkpoint": str(run / checkpoint_name(step))}))
    # Rank 0 sees checkpoint 12 (written by another invocation, so not taken past the pointed 8;
    # with the pointed one pruned, the newest it sees), rank 1 not yet.
    visible = [[[8, 12], [8]], [[8, 12], [8]], [[12], [8]]]
    mp.spawn(agreed_checkpoint_rank, args=(str(tmp_path / "store"), str(run), pointers, visible, str(tmp_path)),
             nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0][:2] == ranks[1][:2] == [checkpoint_name(8), checkpoint_name(8)]
    for rank in ranks:
        assert rank[2].startswith("error: the workers see different checkpoints of") and "rank 0: 12; rank 1: 8" in rank[2]


def test_an_error_that_stops_the_run_is_not_retried_from_the_last_checkpoint(monkeypatch):
    """Ray Train restarts the worker group after any worker error (``--max-failures``, 3 by
    default), each restart loading the model and training again from the last checkpoint: a
    node that does not see the data or the run directory failed the same way three more times
    before the run ended. Such an error (``STOPS_THE_RUN``) now ends it at once; any other
    worker error (a lost node, a crash) is retried as before. Ray's own policy and error types."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, create_failure_policy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    from disco.pipeline.errors import STOPS_THE_RUN
    from disco.train.failure_policy import StopsTheRunPolicy, trainer_class

    policy = StopsTheRunPolicy(create_failure_policy(FailureConfig(max_failures=3)))
    stopping = ConfigError(f"{STOPS_THE_RUN} /data/a.parquet does not exist on node n2: ...")
    assert policy.make_decision(WorkerGroupError("x", {0: RuntimeError("collective aborted"), 1: stopping})) \
        == FailureDecision.RAISE
    crash = WorkerGroupError("x", {0: RuntimeError("worker died")})
    assert [policy.make_decision(crash) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]
    # The trainer the run builds hands Ray's controller this policy around the one Ray built
    # (its fit() passes the policy by that name; called here without starting Ray).
    import inspect

    assert "failure_policy=create_failure_policy(" in inspect.getsource(DataParallelTrainer.fit)
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", lambda self, **kwargs: kwargs)
    trainer = trainer_class()
    inner = create_failure_policy(FailureConfig(max_failures=3))
    handed = trainer._initialize_and_run_controller(object.__new__(trainer), failure_policy=inner, callbacks=[])
    assert isinstance(handed["failure_policy"], StopsTheRunPolicy) and handed["failure_policy"].inner is inner
    assert handed["callbacks"] == []


def test_a_checkpoint_caught_while_being_replaced_is_put_back(tmp_path):
    """A step written again (a resume from an older checkpoint) moves the old one aside, then puts
    the new one in place: a kill between the two renames left no checkpoint of that step, and the
    next start deleted the one moved aside (with --keep 1, the run's only checkpoint)."""
    from disco.model.checkpoint import REPLACED_PREFIX, clean_temporary

    aside = tmp_path / f"{REPLACED_PREFIX}checkpoint-00000002-4242"
    aside.mkdir()
    (aside / "state.json").write_text('{"step": 2}')
    (tmp_path / ".old-checkpoint-00000001-4242").mkdir()  # a prune cut short: deleted
    (tmp_path / ".tmp-checkpoint-00000003").mkdir()  # a write cut short: deleted
    clean_temporary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002"]
    assert (tmp_path / "checkpoint-00000002" / "state.json").read_text() == '{"step": 2}'
    # Killed after the new one was in place: the copy aside goes.
    aside.mkdir()
    clean_temporary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002"]
