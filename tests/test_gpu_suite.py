"""benchmarks/gpu_suite.py runs before a GPU ever sees it: its --smoke path on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def _suite(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "gpu_suite.json"
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=900)
    return proc, json.loads(out.read_text()) if out.exists() else None


def _check(report: dict, steps: list[str]) -> dict:
    assert report["smoke"] is True and report["environment"]["torch"]
    by_step = {r["step"]: r for r in report["steps"]}
    assert list(by_step) == steps
    failed = {name: r.get("log", r.get("error")) for name, r in by_step.items() if r["status"] != "ok"}
    assert not failed, failed
    return by_step


def _check_train(step: dict) -> None:
    (config,) = step["configs"]
    assert config["config"] == "finetune no gc-on b2"
    assert config["steps_per_s"] > 0 and config["samples_per_s"] == pytest.approx(2 * config["steps_per_s"], rel=0.3)
    # The plan of `train --dry-run` and the FLOPs of a sample come from the real (tiny) architecture.
    assert 0.001 < config["plan_gib"] < 1 and config["flops_per_sample"] > 1e8
    assert config["mfu"] == pytest.approx(config["samples_per_s"] * config["flops_per_sample"] / 989e12)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_driver_runs_a_step_in_a_child_and_reports_it(tmp_path):
    """The command as a user runs it, with its quickest steps: the cuda-marked tests (collected;
    without a GPU they skip, with one they pass) and the opt-in CPU pipeline comparison (the plain
    MediaPipe loop, the project's loop and two Ray jobs on a Ray instance of the step's own) in
    child processes, the JSON report, the table."""
    proc, report = _suite(tmp_path, "--smoke", "--only", "cuda-tests,cpu-pipeline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _check(report, ["cuda-tests", "cpu-pipeline"])
    tests = steps["cuda-tests"]
    import torch

    ran = tests["passed"] if torch.cuda.is_available() else tests["skipped"]
    assert tests["tests"] >= 1 and ran == tests["tests"] and tests["failed"] == []
    assert "gpu_suite on CPU (smoke)" in proc.stdout and "cuda-tests" in proc.stdout

    cpu = steps["cpu-pipeline"]
    lines = [cpu[k] for k in ("plain_loop", "plain_side_by_side", "project_loop", "ray_first_job", "ray_again")]
    assert cpu["frames"] == 30 and all(line["frames"] == 30 and line["frames_per_s"] > 0 for line in lines)
    assert cpu["plain_side_by_side"]["processes"] == min(2, len(os.sched_getaffinity(0)))  # a clip each, up to the cores
    assert cpu["graph_runs_per_frame"] == 1.0
    assert cpu["plain_loop"]["cpu_ms_per_frame"] > 1 and cpu["project_loop"]["cpu_ms_per_frame"] > 1
    assert cpu["ray_cpus"] == cpu["cores"] == len(os.sched_getaffinity(0))
    assert cpu["ceiling_frames_per_s"] == pytest.approx(cpu["cores"] * 1000 / cpu["project_loop"]["cpu_ms_per_frame"])
    assert cpu["ratio_again_over_plain"] == pytest.approx(
        cpu["ray_again"]["frames_per_s"] / cpu["plain_loop"]["frames_per_s"])


def test_the_training_and_generation_steps_measure_at_smoke_size(tmp_path, ray_local):
    """The training and generation steps' own code at smoke size, in this process and on the
    suite's Ray instance (the driver's child processes: the test above and the slow one below)."""
    suite = _module()
    args = argparse.Namespace(smoke=True, result=tmp_path / "train.json", config_timeout=600.0, peak_tflops=989.0)
    size = suite.sizes(args)
    # The driver writes one random sd-image-variations folder that every model step loads.
    size["pretrained"] = str(suite.random_pretrained(tmp_path, size))
    assert (Path(size["pretrained"]) / "unet" / "config.json").exists()
    train = suite.step_train(args, size, tmp_path / "train", run_one=suite.train_one)
    _check_train(train)
    assert json.loads(args.result.read_text())["partial"] is True  # written after every configuration
    generate = suite.step_generate(args, size, tmp_path / "generate")
    assert generate["frames"] == 2 and generate["batched_frames_per_s"] > 0
    assert generate["one_at_a_time_frames_per_s"] > 0 and generate["ratio"] > 0
    assert generate["half_dtype"] == "bfloat16" and generate["half_batched_frames_per_s"] > 0


def test_without_a_gpu_the_full_suite_refuses_in_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc, report = _suite(tmp_path, "--only", "generate")
    assert proc.returncode == 2 and "no CUDA GPU is visible" in proc.stderr and report is None
    proc, _ = _suite(tmp_path, "--smoke", "--only", "generate,warp")
    assert proc.returncode == 2 and "unknown step 'warp'" in proc.stderr
    proc, _ = _suite(tmp_path, "--smoke", "--only", "annotators", "--annotators", "sam2,sam3")
    assert proc.returncode == 2 and "--annotators: unknown sam3" in proc.stderr


def test_a_deadline_starts_no_step_it_cannot_fit_and_the_report_lands_under_out(tmp_path, monkeypatch):
    """A device call is cut at 10 minutes (the suite's steps at full size took 27-30): with
    ``--deadline-s`` no step is started that cannot finish in it, the training step starts no
    configuration past it, and the report is written where the device returns files ($OUT)."""
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--only", "cuda-tests,generate", "--deadline-s", "50"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [(r["step"], r["status"]) for r in report["steps"]] == [("cuda-tests", "skipped"), ("generate", "skipped")]
    suite = _module()
    args = argparse.Namespace(smoke=True, result=tmp_path / "train.json", config_timeout=600.0, peak_tflops=989.0,
                              deadline_at=time.time() + 30)
    ran = []
    step = suite.step_train(args, suite.sizes(args), tmp_path / "train", run_one=lambda spec, timeout: ran.append(1))
    assert not ran and [c["error"] for c in step["configs"]] == ["not run: --deadline-s reached"]


@pytest.mark.slow
def test_the_smoke_run_of_every_step(tmp_path):
    """Every step, the annotators and the Grounded-SAM + OpenPose preprocess included (SAM's
    encoder at 1024 px takes several minutes on two cores)."""
    proc, report = _suite(tmp_path, "--smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _check(report, ["cuda-tests", "annotators", "preprocess", "train", "nccl", "generate", "trainer-vs-loop"])
    assert steps["preprocess"]["rows"] == steps["preprocess"]["frames"] == 2
    assert all(v > 0 for k, v in steps["annotators"]["frames_per_s"].items() if v is not None)
    assert steps["nccl"]["backend"] == "gloo" and steps["nccl"]["steps_per_s"] > 0
    assert [run["workers"] for run in steps["nccl"]["runs"]] == [2]  # DDP's path, on the CPU
    assert steps["trainer-vs-loop"]["ratio"] > 0
    _check_train(steps["train"])


def test_the_device_payload_lists_what_the_gpu_machine_lacks_and_nothing_it_has():
    """benchmarks/gpu_payload.py (the packages carried to a GPU machine without a package index):
    the dependency walk follows extras (Ray's [default] brings its dashboard's packages), reads
    markers for Python 3.12, and leaves out what the machine has or must keep (its CUDA PyTorch)."""
    spec = importlib.util.spec_from_file_location("gpu_payload", SUITE.parent / "gpu_payload.py")
    payload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(payload)
    from importlib import metadata

    roots = [r for r in metadata.distribution("disco").requires if "extra ==" not in r]
    wanted = payload.closure(roots)
    for name in ("ray", "decord", "diffusers", "sam2", "hydra-core", "pydantic-core", "aiohttp-cors", "opencensus"):
        assert name in wanted, name
    for name in ("torch", "torchvision", "numpy", "transformers", "mediapipe", "protobuf", "pytest", "onnx"):
        assert name not in wanted, name
    assert not any(n.startswith("nvidia-") for n in wanted)
    assert wanted["ray"][0] == metadata.version("ray")  # the version the suite passed with here
    assert payload.compiled("ray") and not payload.compiled("diffusers")
