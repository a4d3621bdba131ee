"""The GPU figures in one command: CUDA tests, annotators, the whole preprocess, training of the
full-size model (a matrix of configurations, and one NCCL run through Ray Train), generation, and
the trainer against a bare loop. Nothing is downloaded: random full-size weights unless
``--weights`` (annotators) / ``--pretrained`` (sd-image-variations) are given.

    python benchmarks/gpu_suite.py                       # everything, on the visible CUDA GPU
    python benchmarks/gpu_suite.py --only train,nccl     # some steps
    python benchmarks/gpu_suite.py --train-matrix quick  # 3 training configurations instead of 24
    python benchmarks/gpu_suite.py --smoke               # tiny sizes on the CPU (a few minutes)
    python benchmarks/gpu_suite.py --only cpu-pipeline   # the MediaPipe pipeline on the machine's cores

Each step runs in a process of its own under its own time limit, so one that fails, runs out of
memory or hangs loses nothing else; the results so far are rewritten to ``--out`` (default
gpu_suite.json) after every step, and one table is printed at the end. While a step runs the
GPU's utilisation and memory are sampled (NVML through nvidia-ml-py, else ``nvidia-smi``).

MFU = samples/s x model FLOPs per sample / the GPU's dense bf16 peak. The FLOPs per sample are
counted once from the architecture (PyTorch's FLOP counter over the trainer's objective, forward
and backward, on the meta device; gradient checkpointing's recompute is not counted); the peak is
``--peak-tflops`` (default: 989, the H100 / H200 SXM dense bf16 figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from annotators import _frames as frames, _timed  # noqa: E402  (the annotator benchmark's frames and timer)

ANNOTATORS = ("grounded-sam", "openpose", "sam2", "dwpose", "mediapipe")
STEPS = ("cuda-tests", "annotators", "preprocess", "train", "nccl", "generate", "trainer-vs-loop", "cpu-pipeline")
# Run only when named in --only: the GPU's minutes go to the GPU's figures first.
OPT_IN = {"cpu-pipeline"}
MODEL_STEPS = {"train", "nccl", "generate", "trainer-vs-loop"}  # the steps that build a DisCo model
H100_BF16_DENSE_TFLOPS = 989.0
# --deadline-s: a step is not started with less than this left, and the run keeps this much
# back for the report, the table and the temporary folder's removal (gigabytes full-size).
MIN_STEP_S, DEADLINE_SLACK_S = 60.0, 30.0


def time_left(args) -> float:
    """Seconds to --deadline-s (infinite without one)."""
    deadline = getattr(args, "deadline_at", None)
    return float("inf") if deadline is None else deadline - time.time()

# The training matrix: stage x precision x gradient checkpointing x per-GPU batch.
MATRICES = {
    "full": [(stage, precision, gc, batch) for stage in ("pretrain", "finetune") for precision in ("bf16", "fp16")
             for gc in (True, False) for batch in (8, 32, 64)],
    "quick": [("pretrain", "bf16", True, 32), ("finetune", "bf16", False, 32), ("finetune", "fp16", True, 64)],
    "smoke": [("finetune", "no", True, 2)],
}


# -- sizes ------------------------------------------------------------------------------------------

def sizes(args) -> dict:
    """Everything that differs between the GPU run and the CPU smoke run."""
    if args.smoke:
        # SAM's encoder sees 1024 x 1024 whatever the frame: a few seconds a picture on a CPU.
        return dict(device="cpu", weights_size="small", sam_model="vit_b", sam2_model="tiny", frames=1, frame_size=96, batch_sizes=(1,),
                    reload_images=1, pipeline_frames=2, model="tiny", resolution=64, train_steps=4, log_every=2,
                    matrix=MATRICES["smoke"], nccl=("finetune", "no", False, 2), generate_frames=2, generate_size=64,
                    generate_steps=2, loop_steps=4, triplet_frames=8, cpu_clips=2, cpu_clip_seconds=0.5, cpu_size=128)
    return dict(device="cuda", weights_size="full", sam_model=args.sam_model, sam2_model=args.sam2_model, frames=64, frame_size=512,
                batch_sizes=(1, 8, 32), reload_images=4, pipeline_frames=args.pipeline_frames, model="sd-image-variations",
                resolution=256, train_steps=args.train_steps, log_every=10, matrix=MATRICES[args.train_matrix],
                nccl=("finetune", "bf16", True, 32), generate_frames=16, generate_size=256, generate_steps=50,
                loop_steps=20, triplet_frames=64, cpu_clips=16, cpu_clip_seconds=5.0, cpu_size=320)


# -- shared inputs ----------------------------------------------------------------------------------

def annotator_weights(args, size: dict, root: Path, only: tuple[str, ...] | None = None) -> tuple[Path, bool]:
    """The annotators' weights folder (random: of the backends in ``only``, None: all) and whether
    it is random (thresholds 0: random detectors score near chance)."""
    if args.weights:
        return args.weights, False
    from disco.pipeline.annotators.random_weights import write_random_weights

    return write_random_weights(root / "weights", size=size["weights_size"], sam_model=size["sam_model"],
                                sam2_model=size["sam2_model"], only=only), True


def random_pretrained(root: Path, size: dict) -> Path:
    """An sd-image-variations folder (unet/, vae/, image_encoder/) with random weights of the
    step's architecture, written once for the whole run: building the full-size model from random
    draws costs about 100 s a time on the CPU, loading it from safetensors a few seconds, and every
    training configuration, the NCCL run, generation and the trainer-vs-loop comparison build one."""
    import torch

    from disco.model.disco import DisCoModel

    folder = root / "sd-image-variations-random"
    if not (folder / "image_encoder" / "config.json").exists():
        torch.manual_seed(0)
        model = DisCoModel.from_architecture(size["model"], variant="pretrain")
        model.unet.save_pretrained(folder / "unet")
        model.vae.save_pretrained(folder / "vae")
        model.image_encoder.save_pretrained(folder / "image_encoder")
    return folder


def synthetic_triplets(root: Path, count: int, side: int) -> Path:
    """A preprocessed output without any annotator: real frames, an elliptic person mask and a
    standing skeleton per frame, written by the pipeline's own row builder and schema. Training
    speed does not depend on what the masks and poses show."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from disco.pipeline.annotators import Annotation
    from disco.pipeline.annotators.base import Matte, Pose
    from disco.pipeline.store.encode import build_row
    from disco.pipeline.store.schema import TRIPLET_SCHEMA

    yy, xx = np.mgrid[:side, :side] / side
    alpha = ((((xx - 0.5) / 0.22) ** 2 + ((yy - 0.55) / 0.4) ** 2) <= 1).astype(np.uint8) * 255
    # Body-18 (OpenPose order) of a person standing in the middle, in fractions of the side.
    body = np.array([[.5, .2], [.5, .3], [.4, .3], [.37, .45], [.35, .58], [.6, .3], [.63, .45], [.65, .58],
                     [.44, .58], [.43, .75], [.43, .9], [.56, .58], [.57, .75], [.57, .9], [.48, .18], [.52, .18],
                     [.46, .19], [.54, .19]], dtype=np.float32) * side
    pose = Pose(body=np.concatenate([body, np.ones((18, 1), np.float32)], axis=1))
    annotation = Annotation(Matte(alpha, 0.9, 1, "synthetic"), pose, True)
    rows = []
    for clip in range(2):
        unit = {"source": "video", "clip_id": f"clip{clip}", "split": "train", "input_path": f"clip{clip}.mp4"}
        for i, frame in enumerate(frames(count // 2, side)):
            rows.append(build_row(unit, i, i / 30, frame, annotation, image_format="jpeg", jpeg_quality=95,
                                  pose_style="openpose", with_pose=True))
    (root / "triplets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), root / "triplets" / "part-0.parquet",
                   row_group_size=16)
    return root


RANDOM_PRETRAINED_HELP = ("write the --model's random weights once as an sd-image-variations folder and start every "
                          "run from it (building a full-size model from random draws costs about 100 s a run)")


def training_inputs(root: Path, frames_count: int, side: int, model: str, random: bool) -> tuple[Path, Path | None]:
    """A training benchmark's data and starting weights: ``frames_count`` rows preprocessed by
    MediaPipe, or where it is not installed (the GPU machines) ``synthetic_triplets``; with
    ``random``, ``random_pretrained``'s folder of ``model``, else None (the runs build ``model``)."""
    import importlib.util

    if importlib.util.find_spec("mediapipe"):
        from train_throughput import make_triplets

        data = make_triplets(root, frames_count)
    else:
        data = synthetic_triplets(root / "synthetic", frames_count, side)
    return data, random_pretrained(root, {"model": model}) if random else None


# -- steps (each runs in a child process; returns a dict with a one-line "summary") ----------------

def step_cuda_tests(args, size, work: Path) -> dict:
    report = work / "cuda-tests.xml"
    # Only the files that hold cuda-marked tests: collecting the whole suite costs half a minute.
    files = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py"))
             if "mark.cuda" in p.read_text()]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *files], cwd=REPO, capture_output=True, text=True)
    import xml.etree.ElementTree as ET

    if not report.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "failed": failed, "exit_code": proc.returncode,
            "summary": f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                       f"{counts['skipped']} skipped"}


def step_annotators(args, size, work: Path) -> dict:
    """Frames/s of each annotator on the same frames, in this process."""
    import torch  # noqa: F401  (CUDA initialised before the timings)

    from disco.pipeline.annotators import FrameAnnotator, grounded_sam
    from disco.pipeline.annotators.grounded_sam import GroundedSamMatting
    from disco.pipeline.annotators.openpose_backend import OpenPosePose

    device = size["device"]
    weights, random = annotator_weights(args, size, work)
    threshold = 0.0 if random else 0.3
    grounded_sam.MAX_BOXES = 2  # random detectors: a fixed number of boxes per frame
    pictures = frames(size["frames"], size["frame_size"])

    def gsam(batch: int) -> GroundedSamMatting:
        return GroundedSamMatting(weights, sam_model=size["sam_model"], box_threshold=threshold,
                                  text_threshold=threshold, device=device, batch_size=batch)

    fps = {}
    chosen = set(args.annotators.split(","))
    for batch in size["batch_sizes"] if "grounded-sam" in chosen else ():
        matting = gsam(batch)
        matting.matte_batch(pictures[:batch])  # warm-up: kernels, allocator
        fps[f"grounded-sam batch {batch}"] = len(pictures) / _timed(lambda: matting.matte_batch(pictures), device)
        if batch == 1:
            fps["grounded-sam loaded once, one image at a time"] = len(pictures) / _timed(
                lambda: [matting.matte_batch([p]) for p in pictures], device)
        matting = None  # frees the GPU before the next batch size
    if "grounded-sam" in chosen:
        few = pictures[: size["reload_images"]]
        # The official scripts built GroundingDINO and SAM again for every image.
        fps["grounded-sam rebuilt per image (official scripts)"] = len(few) / _timed(
            lambda: [gsam(1).matte_batch([p]) for p in few], device)
    if "openpose" in chosen:
        pose = OpenPosePose(weights, hands=True, face=False, device=device)
        pose.pose(pictures[0])
        fps["openpose body+hands"] = len(pictures) / _timed(lambda: [pose.pose(p) for p in pictures], device)
        pose = None
    notes = []
    for name, label, measure in (
            ("sam2", f"sam2 {size['sam2_model']} tracking a clip", lambda: _sam2_fps(weights, size, threshold, pictures)),
            ("dwpose", "dwpose body+hands", lambda: _dwpose_fps(weights, device, pictures))):
        if name not in chosen:
            continue
        try:  # each newer backend on its own: one missing (a wheel, a CUDA provider) loses only its line
            fps[label] = measure()
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the step stands
            fps[label] = None
            notes.append(f"{label}: {str(exc).splitlines()[0][:160]}")
    note = ""
    if "mediapipe" in chosen:
        try:
            mediapipe = FrameAnnotator("mediapipe", "mediapipe", hands=True, min_visibility=0.5, min_mask_area=0.01)
        except Exception as exc:  # not installed where the GPU is: the rest stands
            fps["mediapipe (host CPU)"] = None
            note = f"mediapipe unavailable: {str(exc).splitlines()[0][:120]}"
        else:
            mediapipe.annotate(pictures[0])
            fps["mediapipe (host CPU)"] = len(pictures) / _timed(lambda: [mediapipe.annotate(p) for p in pictures], "cpu")
            mediapipe.close()
    note = "; ".join([n for n in (note, *notes) if n])
    batched = [v for k, v in fps.items() if k.startswith("grounded-sam batch")]
    ratio = max(batched) / fps["grounded-sam rebuilt per image (official scripts)"] if batched else None
    return {"frames_per_s": fps, "frames": len(pictures), "frame_size": size["frame_size"],
            "sam_model": size["sam_model"], "random_weights": random, "batched_vs_rebuilt": ratio, "note": note,
            "summary": ", ".join(f"{k} {v:.1f}" for k, v in fps.items() if v is not None)
                       + " frames/s" + (f"; batched / rebuilt per image {ratio:.1f}x" if ratio else "")}


def _sam2_fps(weights: Path, size: dict, threshold: float, pictures: list) -> float:
    """SAM 2.1 masks propagated through the frames as one video unit (GroundingDINO seeds the first)."""
    from disco.pipeline.annotators.sam2_backend import Sam2Matting

    matting = Sam2Matting(weights, sam2_model=size["sam2_model"], box_threshold=threshold, text_threshold=threshold,
                          device=size["device"])
    matting.begin_unit(sequence=True)
    matting.matte_batch(pictures[:2])  # warm-up
    return len(pictures) / _timed(lambda: matting.matte_batch(pictures), size["device"])


def _dwpose_fps(weights: Path, device: str, pictures: list) -> float:
    """DWPose (YOLOX-L + dw-ll_ucoco_384 through ONNX Runtime; CUDA needs onnxruntime-gpu)."""
    from disco.pipeline.annotators.dwpose_backend import DWPosePose

    pose = DWPosePose(weights, hands=True, face=False, device=device)
    pose.pose(pictures[0])
    return len(pictures) / _timed(lambda: [pose.pose(p) for p in pictures], device)


def step_preprocess(args, size, work: Path) -> dict:
    """`disco-cli preprocess` as a user runs it: a clip through Grounded-SAM and OpenPose."""
    from disco.pipeline.demo_data import write_video

    # Only the two backends it runs (SAM 2 large alone costs seconds to write at full size).
    weights, random = annotator_weights(args, size, work, only=("grounded-sam", "openpose"))
    write_video(work / "videos" / "dance.mp4", frames(size["pipeline_frames"], size["frame_size"]), 30.0)
    command = [sys.executable, "-m", "disco.cli", "preprocess", "--source", "video", "--input", str(work / "videos"),
               "--output", str(work / "out"), "--matting", "grounded-sam", "--pose", "openpose", "--weights", str(weights),
               "--device", size["device"], "--sam-model", size["sam_model"], "--max-side", str(size["frame_size"]),
               "--min-mask-area", "0", "--no-progress"]
    if random:
        command += ["--box-threshold", "0", "--text-threshold", "0"]
    if size["device"] == "cpu":
        command += ["--matting-gpus", "0", "--pose-gpus", "0"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    processed = manifest["run"]["frames_processed"]
    return {"frames": processed, "rows": manifest["counts"]["rows_written"], "wall_s": wall,
            "frames_per_s": processed / wall, "pools": manifest["run"].get("pools"),
            "summary": f"{processed} frames in {wall:.1f} s: {processed / wall:.1f} frames/s (start-up included)"}


def _train_config(size: dict, data: Path, output: Path, stage: str, precision: str, gc: bool, batch: int, **extra):
    from disco.train.config import TrainConfig

    return TrainConfig(stage=stage, data=[str(data)], output=str(output), model=None if size.get("pretrained") else
                       size["model"], pretrained=size.get("pretrained"), resolution=size["resolution"],
                       batch_size=batch, mixed_precision=precision, gradient_checkpointing=gc,
                       max_steps=size["train_steps"], log_every=size["log_every"], checkpoint_every=10**9,
                       sample_every=10**9, sample_steps=2, warmup_steps=0, use_gpu=size["device"] == "cuda", **extra)


def _steady(metrics: list[dict]) -> dict:
    """The logged windows after the first (start-up: compilation, allocator, data pipeline)."""
    steady = metrics[1:] or metrics
    seconds = sum(1 / m["steps_per_s"] for m in steady)
    out = {"steps_per_s": len(steady) / seconds, "samples_per_s": sum(m["samples_per_s"] for m in steady) / len(steady),
           "data_wait_fraction": sum(m["data_wait_fraction"] for m in steady) / len(steady)}
    for key in ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib"):
        if key in metrics[-1]:
            out[key] = metrics[-1][key]
    return out


def train_one(spec: dict, timeout: float | None = None) -> dict:
    """One configuration of the matrix: the plan of `train --dry-run`, then the trainer itself
    (``timeout`` is the child's, see ``_train_one_in_child``)."""
    from disco.pipeline.cluster import init_ray
    from disco.train.launch import train
    from disco.train.memory import GIB, memory_plan
    from disco.train.meta_step import step_flops

    size = spec["size"]
    cfg = _train_config(size, Path(spec["data"]), Path(spec["output"]), *spec["config"])
    plan = memory_plan(cfg, search=False, device=size["device"])
    flops = step_flops(cfg, batch=1)
    out = {"plan_gib": plan.total / GIB, "flops_per_sample": flops}
    init_ray()
    try:
        train(cfg)
    except Exception as exc:  # out of memory is a result here, as the plan predicts it or not
        text = str(exc)
        out["error"] = "out of memory" if "out of memory" in text.lower() else text.splitlines()[0][:300]
        return out
    metrics = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    out.update(_steady(metrics))
    return out


def _mfu(samples_per_s: float, flops: int, peak_tflops: float) -> float:
    return samples_per_s * flops / (peak_tflops * 1e12)


def _run_group(command: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run ``command`` in a process group of its own; past ``timeout`` the whole group (Ray, pytest,
    the CLI and whatever they started) is killed. Returns (exit code or None on timeout, out, err).
    A group, not a session: where the device tool ends a command that ran past its limit, it ends
    the processes of the command's session, and a new session's would run on (a training child
    holding the GPU into the next call)."""
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                            **group)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def _summary_of_training(rows: list[dict], peak_tflops: float) -> dict:
    done = [r for r in rows if "samples_per_s" in r]
    best = max(done, key=lambda r: r["samples_per_s"], default=None)
    summary = f"{len(done)}/{len(rows)} configurations ran"
    if best:
        summary += f"; best {best['config']}: {best['samples_per_s']:.1f} samples/s, MFU {best['mfu']:.1%}"
    return {"configs": rows, "peak_tflops": peak_tflops, "summary": summary}


def _train_one_in_child(spec: dict, timeout: float) -> dict:
    """``train_one`` in a fresh process of its own (its own peak memory; an OOM or a hang stays
    there), killed past ``timeout``."""
    code, out, err = _run_group([sys.executable, __file__, "--train-one", json.dumps(spec)], timeout)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return {"error": f"over {timeout:g} s" if code is None else f"exit {code}: {last}"}


def step_train(args, size, work: Path, run_one=_train_one_in_child) -> dict:
    """Every configuration of the matrix, each by ``run_one(spec, timeout)`` (by default in a
    child process; the suite's own test passes ``train_one`` to run them in its process)."""
    data = synthetic_triplets(work / "data", size["triplet_frames"], size["resolution"])
    rows = []
    for config in size["matrix"]:
        stage, precision, gc, batch = config
        label = f"{stage} {precision} gc-{'on' if gc else 'off'} b{batch}"
        left = time_left(args)
        if left < MIN_STEP_S:  # --deadline-s: the configurations still to run are listed as not run
            rows.append({"config": label, "error": "not run: --deadline-s reached"})
            continue
        output = work / label.replace(" ", "_")
        spec = {"size": size, "data": str(data), "output": str(output), "config": config}
        started = time.perf_counter()
        row = {"config": label, **run_one(spec, min(args.config_timeout, left))}
        row["wall_s"] = time.perf_counter() - started
        if "samples_per_s" in row:
            row["mfu"] = _mfu(row["samples_per_s"], row["flops_per_sample"], args.peak_tflops)
        rows.append(row)
        # The run's final checkpoint holds AdamW's states (about 19 GB full-size): one at a time.
        shutil.rmtree(output, ignore_errors=True)
        # What has run so far survives the step's own time limit.
        args.result.write_text(json.dumps({**_summary_of_training(rows, args.peak_tflops), "partial": True}))
        print(json.dumps(row), flush=True)
    return _summary_of_training(rows, args.peak_tflops)


def step_nccl(args, size, work: Path) -> dict:
    """`disco-cli train --use-gpu` through Ray Train on a Ray cluster of one node on loopback, as a
    user's `ray start --head` gives it: one worker on NCCL, then two workers sharing the GPU
    (`--gpus-per-worker 0.5`, over gloo: NCCL refuses two ranks on one device), the path only
    several workers take (DDP on CUDA, the loop's collectives on CUDA tensors), which a machine of
    one GPU can run. ``--smoke``: the two workers on the CPU (gloo)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    data = synthetic_triplets(work / "data", size["triplet_frames"], size["resolution"])
    ray_constants.ENABLE_RAY_CLUSTER = False
    head = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": os.cpu_count()}
    if size["device"] == "cuda":
        import torch

        head["num_gpus"] = torch.cuda.device_count()
    variants = [(1, 1.0), (2, 0.5)] if size["device"] == "cuda" else [(2, 0.0)]
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    try:
        runs = [_train_through_ray(size, data, work / f"run-{workers}", cluster.address, workers, share)
                for workers, share in variants]
    finally:
        cluster.shutdown()
    return {**runs[0], "runs": runs, "summary": "; ".join(run["summary"] for run in runs)}


def _train_through_ray(size, data: Path, output: Path, address: str, workers: int, share: float) -> dict:
    from disco.train.memory import GIB, memory_plan

    stage, precision, gc, batch = size["nccl"]
    if workers > 1:
        # A check of the path (two ranks on one GPU go through gloo and host memory: 0.23 steps/s
        # full-size on an H200), not a speed: two log windows of half the usual length at most.
        log_every = max(1, size["log_every"] // 2)
        size = {**size, "log_every": log_every, "train_steps": min(size["train_steps"], 2 * log_every)}
    cfg = _train_config(size, data, output, stage, precision, gc, batch)
    plan = memory_plan(cfg, search=False, device=size["device"])
    command = [sys.executable, "-m", "disco.cli", "train", "--ray-address", address, "--num-workers", str(workers),
               "--stage", stage, "--data", str(data), "--output", str(output), "--resolution",
               str(size["resolution"]), "--batch-size", str(batch), "--mixed-precision", precision,
               "--gradient-checkpointing" if gc else "--no-gradient-checkpointing",
               "--max-steps", str(size["train_steps"]), "--log-every", str(size["log_every"]),
               "--checkpoint-every", str(size["train_steps"]), "--sample-every", str(10**6), "--warmup-steps", "0",
               "--no-progress"]
    command += ["--pretrained", size["pretrained"]] if size.get("pretrained") else ["--model", size["model"]]
    if share:
        command += ["--use-gpu", "--gpus-per-worker", f"{share:g}"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"train ({workers} workers) exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    backend = "nccl" if share >= 1 else "gloo"
    on = f"{share:g} GPU each" if share else "CPU"
    out = {"config": f"{stage} {precision} gc-{'on' if gc else 'off'} b{batch}", "workers": workers, "wall_s": wall,
           "plan_gib": plan.total / GIB, "backend": backend, **_steady(metrics)}
    peak = out.get("gpu_peak_reserved_gib")
    out["summary"] = (f"{backend}, {workers} worker(s) at {on}, {out['config']}: {out['steps_per_s']:.2f} steps/s, "
                      + (f"peak {peak:.1f} GiB reserved vs plan {out['plan_gib']:.1f} GiB" if peak else
                         f"plan {out['plan_gib']:.2f} GiB"))
    return out


def step_generate(args, size, work: Path) -> dict:
    """DDIM sampling of the full-size model: the whole clip in one batch against one frame at a
    time (what a loop over `generate` per frame does)."""
    import torch

    from disco.model.conditioning import pose_size
    from disco.model.pipeline import DisCoPipeline
    from disco.model.precision import on_cuda
    from disco.train.initial import initial_model

    device = size["device"]
    torch.manual_seed(0)
    model = initial_model(_train_config(size, work, work / "unused", "finetune", "no", False, 1))
    model.to(device).eval()
    pipe = DisCoPipeline(model)
    side, n = pose_size(model, size["generate_size"]), size["generate_frames"]
    reference = torch.randn(1, 3, 224, 224)
    background = torch.rand(1, 3, size["generate_size"], size["generate_size"]) * 2 - 1
    poses = torch.rand(n, 3, side, side)

    def run(batch: int) -> float:
        return _timed(lambda: pipe(reference, background, poses, num_inference_steps=size["generate_steps"],
                                   batch_size=batch), device)

    run(n)  # warm-up
    batched, single = n / run(n), n / run(1)
    out = {"frames": n, "size": size["generate_size"], "steps": size["generate_steps"], "dtype": "float32",
           "batched_frames_per_s": batched, "one_at_a_time_frames_per_s": single, "ratio": batched / single,
           "summary": f"{n} frames, {size['generate_steps']} DDIM steps: batched {batched:.2f} frames/s, one at a "
                      f"time {single:.2f} frames/s ({batched / single:.1f}x)"}
    args.result.write_text(json.dumps({**out, "partial": True}))  # kept if what follows is cut short
    # `generate --dtype`: float16 on a GPU (bfloat16 where the smoke run is on the CPU), batched.
    half = "float16" if on_cuda(device) else "bfloat16"
    model.to(getattr(torch, half))
    try:
        run(n)
        halved = n / run(n)
    except Exception as exc:  # noqa: BLE001 - e.g. random weights overflowing in float16 (NaN frames)
        return {**out, "half_dtype": half, "half_error": str(exc).splitlines()[0][:200],
                "summary": out["summary"] + f"; --dtype {half} failed: {str(exc).splitlines()[0][:80]}"}
    return {**out, "half_dtype": half, "half_batched_frames_per_s": halved, "half_ratio": halved / batched,
            "summary": out["summary"] + f"; --dtype {half} batched {halved:.2f} frames/s ({halved / batched:.2f}x float32)"}


def step_trainer_vs_loop(args, size, work: Path) -> dict:
    """The trainer (Parquet -> Ray Data -> loop) against a bare loop on batches held in memory."""
    from train_throughput import minimal_speed, trainer_speed

    from disco.pipeline.cluster import init_ray

    data = synthetic_triplets(work / "data", size["triplet_frames"], size["resolution"])
    stage, precision, gc, batch = size["nccl"]
    steps = size["loop_steps"]
    log_every = max(1, steps // 4)
    size = {**size, "train_steps": steps + log_every, "log_every": log_every}
    cfg = _train_config(size, data, work / "run", stage, precision, gc, batch)
    init_ray()
    device = "cuda" if cfg.use_gpu else "cpu"
    before = minimal_speed(cfg, steps, device)
    trainer, waited = trainer_speed(cfg, first_step=0, skip_steps=log_every)
    after = minimal_speed(cfg, steps, device)
    ratio = trainer / ((before + after) / 2)
    return {"config": f"{stage} {precision} gc-{'on' if gc else 'off'} b{batch}", "trainer_steps_per_s": trainer,
            "bare_loop_steps_per_s": [before, after], "data_wait_fraction": waited, "ratio": ratio,
            "summary": f"trainer {trainer:.2f} steps/s, bare loop {before:.2f} / {after:.2f}: ratio {ratio:.2f}"}


def step_cpu_pipeline(args, size, work: Path) -> dict:
    """The embedded CPU pipeline (MediaPipe on Ray actors) against the loop a user would write, on
    the lent machine's cores: `benchmarks/preprocess_throughput.py`'s comparison, 2400 frames in
    16 clips of 5 s (a clip per core for the side-by-side line; each process and actor pays its
    start once, against 150 frames of work). The development VM has 2 cores;
    this is where more of them show what the actors do with them."""
    from preprocess_throughput import measure

    m = measure(size["cpu_clips"], size["cpu_clip_seconds"], size["cpu_size"], work=work)
    m["summary"] = (f"{m['frames']} frames on {m['cores']} cores: plain loop "
                    f"{m['plain_loop']['frames_per_s']:.1f}, side by side {m['plain_side_by_side']['frames_per_s']:.1f}, Ray {m['ray_first_job']['frames_per_s']:.1f} (first job, "
                    f"{m['ratio_first_over_plain']:.2f}x) / {m['ray_again']['frames_per_s']:.1f} (next job, "
                    f"{m['ratio_again_over_plain']:.2f}x) frames/s")
    return m


STEP_FUNCTIONS = {"cuda-tests": step_cuda_tests, "annotators": step_annotators, "preprocess": step_preprocess,
                  "train": step_train, "nccl": step_nccl, "generate": step_generate,
                  "trainer-vs-loop": step_trainer_vs_loop, "cpu-pipeline": step_cpu_pipeline}


# -- the driver ---------------------------------------------------------------------------------------

def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class GpuSampler:
    """GPU utilisation (%) and memory used (GiB) every ``period`` s while a step runs."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._loop, daemon=True) if self._read else None

    @staticmethod
    def _reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def nvml():
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                return util, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30

            return nvml
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            def smi():
                line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                util, used = line.split(",")
                return float(util), float(used) / 1024

            try:
                smi()
                return smi
            except Exception:
                return None
        return None

    def _loop(self):
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self._read())
            except Exception:
                pass

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def figures(self) -> dict:
        if not self.samples:
            return {}
        utils = [s[0] for s in self.samples]
        return {"gpu_util_mean": sum(utils) / len(utils), "gpu_util_max": max(utils),
                "gpu_memory_used_max_gib": max(s[1] for s in self.samples)}


def run_step(name: str, args, work: Path) -> dict:
    result_file = work / f"{name}.json"
    command = [sys.executable, __file__, "--child", name, "--result", str(result_file), "--work", str(work / name)]
    command += _passed_on(args)
    timeout = args.step_timeout
    if name == "train":  # room for every configuration of the matrix
        timeout = max(timeout, args.config_timeout * len(sizes(args)["matrix"]) + 300)
    # --deadline-s: the step ends in time for the report to be written (and come back).
    timeout = min(timeout, time_left(args) + DEADLINE_SLACK_S / 2)
    started = time.perf_counter()
    record = {"step": name}
    with GpuSampler() as sampler:
        code, out, err = _run_group(command, timeout)
    record["seconds"] = time.perf_counter() - started
    tail = (out + err).strip().splitlines()
    if code == 0 and result_file.exists():
        record.update(status="ok", **json.loads(result_file.read_text()))
    elif code is None:
        record.update(status="timeout", error=f"over {timeout:g} s", log="\n".join(tail[-40:]))
        if result_file.exists():  # what the step finished before its limit
            record.update(json.loads(result_file.read_text()))
    else:
        record.update(status="failed", error=tail[-1] if tail else f"exit {code}", log="\n".join(tail[-40:]))
    record.update(sampler.figures())
    shutil.rmtree(work / name, ignore_errors=True)  # checkpoints and weights: gigabytes full-size
    return record


def _passed_on(args) -> list[str]:
    out = ["--smoke"] if args.smoke else []
    if args.deadline_at is not None:
        out += ["--deadline-at", repr(args.deadline_at)]
    for flag in ("weights", "pretrained"):
        if getattr(args, flag):
            out += [f"--{flag}", str(getattr(args, flag))]
    out += ["--sam-model", args.sam_model, "--sam2-model", args.sam2_model, "--pipeline-frames", str(args.pipeline_frames), "--train-matrix",
            args.train_matrix, "--train-steps", str(args.train_steps), "--peak-tflops", str(args.peak_tflops),
            "--config-timeout", str(args.config_timeout), "--annotators", args.annotators]
    return out


def environment() -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["environment"]
    table = Table(title=f"gpu_suite on {env.get('gpu', 'CPU (smoke)')}, {env['date']}, torch {env['torch']}")
    for column in ("step", "status", "s", "GPU util (mean/max)", "result"):
        table.add_column(column, overflow="fold")
    for r in report["steps"]:
        util = f"{r['gpu_util_mean']:.0f}% / {r['gpu_util_max']:.0f}%" if "gpu_util_mean" in r else "-"
        table.add_row(r["step"], r["status"], f"{r.get('seconds', 0):.0f}", util, r.get("summary") or r.get("error", ""))
    Console(width=160).print(table)
    for r in report["steps"]:
        if r["step"] == "train" and r["status"] == "ok":
            matrix = Table(title="training, full-size model" if not report["smoke"] else "training (smoke)")
            for column in ("configuration", "steps/s", "samples/s", "MFU", "peak reserved GiB", "plan GiB", "note"):
                matrix.add_column(column)
            for c in r["configs"]:
                matrix.add_row(c["config"], f"{c['steps_per_s']:.2f}" if "steps_per_s" in c else "-",
                               f"{c['samples_per_s']:.1f}" if "samples_per_s" in c else "-",
                               f"{c['mfu']:.1%}" if "mfu" in c else "-",
                               f"{c['gpu_peak_reserved_gib']:.1f}" if "gpu_peak_reserved_gib" in c else "-",
                               f"{c['plan_gib']:.1f}" if "plan_gib" in c else "-", c.get("error", ""))
            Console(width=160).print(matrix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the suite runs")
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {', '.join(STEPS)} "
                                         f"({', '.join(sorted(OPT_IN))} only when named here)")
    parser.add_argument("--skip", default="", help="comma-separated steps not to run")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_suite.json" if os.environ.get("OUT")
                        else Path("gpu_suite.json"), help="the JSON report (default: $OUT/gpu_suite.json where $OUT "
                        "is set, as on the device machines, whose calls return what is under $OUT; else ./gpu_suite.json)")
    parser.add_argument("--deadline-s", type=float, help="seconds the whole run may take (a device call's limit "
                        "less its start): each step's limit is cut to what is left, a step with under "
                        f"{MIN_STEP_S:g} s left is not started, and the report is written in time")
    parser.add_argument("--weights", type=Path, help="annotator weights folder (default: random full-size ones)")
    parser.add_argument("--pretrained", help="sd-image-variations folder (default: random weights of its architecture)")
    parser.add_argument("--sam-model", default="vit_h", choices=("vit_h", "vit_l", "vit_b"))
    parser.add_argument("--sam2-model", default="large", choices=("tiny", "small", "base_plus", "large"),
                        help="SAM 2.1 size for the annotator step")
    parser.add_argument("--annotators", default=",".join(ANNOTATORS),
                        help=f"comma-separated annotators of the annotator step, of: {','.join(ANNOTATORS)}")
    parser.add_argument("--pipeline-frames", type=int, default=300, help="frames of the preprocess step's clip")
    parser.add_argument("--train-matrix", default="full", choices=("full", "quick"),
                        help="24 configurations (stage x bf16/fp16 x checkpointing x batch 8/32/64) or 3")
    parser.add_argument("--train-steps", type=int, default=30, help="steps per training configuration")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the GPU's dense bf16 peak that MFU divides by")
    parser.add_argument("--step-timeout", type=float, default=1800, help="seconds one step may take")
    parser.add_argument("--config-timeout", type=float, default=600, help="seconds one training configuration may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--train-one", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)  # the parent's deadline, as a time
    args = parser.parse_args(argv)
    if args.deadline_s is not None and args.deadline_at is None:
        args.deadline_at = time.time() + args.deadline_s - DEADLINE_SLACK_S
    unknown = set(args.annotators.split(",")) - set(ANNOTATORS)
    if unknown:
        parser.error(f"--annotators: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ANNOTATORS)})")

    if args.train_one:
        print(json.dumps(train_one(json.loads(args.train_one))), flush=True)
        return 0
    if args.child:
        args.work.mkdir(parents=True, exist_ok=True)
        size = sizes(args)
        if args.pretrained:
            size["pretrained"] = args.pretrained
        args.result.write_text(json.dumps(STEP_FUNCTIONS[args.child](args, size, args.work)))
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: pass --smoke to check the suite on the CPU")
    chosen = [s.strip() for s in args.only.split(",")] if args.only else [s for s in STEPS if s not in OPT_IN]
    unknown = [s for s in chosen + [s for s in args.skip.split(",") if s] if s not in STEPS]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}: the steps are {', '.join(STEPS)}")
    chosen = [s for s in chosen if s not in args.skip.split(",")]
    report = {"environment": environment(), "smoke": args.smoke, "steps": []}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        if not args.pretrained and set(chosen) & MODEL_STEPS:
            started = time.perf_counter()
            try:
                args.pretrained = str(random_pretrained(Path(tmp), sizes(args)))
                report["random_pretrained_s"] = time.perf_counter() - started
                print(f"[{time.strftime('%H:%M:%S')}] random sd-image-variations weights written once in "
                      f"{report['random_pretrained_s']:.0f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - the steps then build their own random models
                report["random_pretrained_error"] = f"{type(exc).__name__}: {exc}"
                print(f"random sd-image-variations weights not written ({report['random_pretrained_error']}); "
                      "each model step builds its own", flush=True)
        for name in chosen:
            if time_left(args) < MIN_STEP_S:
                report["steps"].append({"step": name, "status": "skipped", "error": "--deadline-s reached"})
                print(f"[{time.strftime('%H:%M:%S')}] {name}: not started, --deadline-s reached", flush=True)
                args.out.write_text(json.dumps(report, indent=2, default=str))
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            record = run_step(name, args, Path(tmp))
            report["steps"].append(record)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {record['status']} in {record['seconds']:.0f} s: "
                  f"{record.get('summary') or record.get('error', '')}", flush=True)
            if record["status"] != "ok" and record.get("log"):
                print(record["log"], flush=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    print(f"report: {args.out.resolve()}")
    return 0 if all(r["status"] == "ok" for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
