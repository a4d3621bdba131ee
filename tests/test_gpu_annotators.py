"""The paper-faithful annotators (Grounded-SAM, OpenPose) without a GPU: the real architectures
with random weights, saved in the documented weights layout, loaded by the real code; and the GPU
pipeline scheduled as GPU actors on a Ray instance that declares fake GPUs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from disco.cli import app
from disco.pipeline.annotators import BackendError, FrameAnnotator, cuda_available, resolve_backends
from disco.pipeline.annotators.base import Matte
from disco.pipeline.annotators.dwpose_backend import DWPOSE_FILES
from disco.pipeline.annotators.random_weights import write_random_weights
from disco.pipeline.annotators.grounded_sam import SAM_FILES
from disco.pipeline.annotators.openpose_backend import OPENPOSE_FILES
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.store.encode import decode_picture
from disco.pipeline.store.reader import open_triplets
from disco.pipeline.run import preprocess
from disco.pipeline.store.schema import TRIPLET_SCHEMA
from helpers import CodeRunningPickle, save


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    # The paper's two backends; DWPose and SAM 2 have their own test files.
    return write_random_weights(tmp_path_factory.mktemp("weights"), size="small", sam_model="vit_b",
                                only=("grounded-sam", "openpose"))


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::4, ::4])  # 128 x 128: a person, small


def test_grounded_sam_loads_from_the_layout_and_mattes_a_frame(weights, frame):
    from disco.pipeline.annotators.grounded_sam import GroundedSamMatting

    # Random weights give random boxes; a zero threshold lets every query through to SAM.
    matting = GroundedSamMatting(weights, sam_model="vit_b", box_threshold=0.0, text_threshold=0.0, device="cpu")
    assert matting.sam.image_encoder.img_size == 1024 and len(matting.sam.image_encoder.blocks) == 12  # ViT-B
    (matte,) = matting.matte_batch([frame])
    assert matte.alpha.shape == frame.shape[:2] and matte.alpha.dtype == np.uint8
    assert set(np.unique(matte.alpha)) <= {0, 255}
    assert 1 <= matte.count <= 6  # the small detector has 6 queries
    assert 0.0 <= matte.score <= 1.0 and matte.model == "grounded-sam"

    # Merging: the union of every person's mask, or only the largest one.
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :1, :1] = True
    masks[1, 2:, 2:] = True
    merged = matting._merge(np.zeros((4, 4, 3), np.uint8), np.array([0.4, 0.9]), masks)
    assert (merged.alpha == 255).sum() == 5 and merged.count == 2 and merged.score == pytest.approx(0.9)
    matting.largest_person = True
    largest = matting._merge(np.zeros((4, 4, 3), np.uint8), np.array([0.4, 0.9]), masks)
    assert (largest.alpha == 255).sum() == 4 and largest.alpha[3, 3] == 255


def test_a_stills_person_boxes_do_not_hang_on_the_stills_beside_it_in_its_batch(weights, frame):
    """GroundingDINO's processor pads a batch of stills to its largest: the padding changed what the
    model found in the smaller still (a still's boxes hung on its neighbours in the call, and a
    resume that batched it otherwise wrote another mask). Stills of one size go together."""
    from disco.pipeline.annotators.grounded_sam import PersonDetector

    detector = PersonDetector(weights, box_threshold=0.0, text_threshold=0.0, device="cpu")
    detector.processor.image_processor.size = {"shortest_edge": 128, "longest_edge": 224}  # a short CPU run
    wide = np.ascontiguousarray(data.coffee()[::5, ::5])  # 80 x 120: another size than ``frame``
    together = detector.detect([frame, wide, frame[::-1].copy()])
    alone = [detector.detect([frame])[0], detector.detect([wide])[0], detector.detect([frame[::-1].copy()])[0]]
    for (boxes, scores), (boxes_alone, scores_alone) in zip(together, alone):
        np.testing.assert_allclose(boxes, boxes_alone, atol=1e-3)
        np.testing.assert_allclose(scores, scores_alone, atol=1e-5)


def test_openpose_loads_from_the_layout_and_gives_contract_shapes(weights, frame):
    from disco.pipeline.annotators.openpose_backend import OpenPosePose

    pose = OpenPosePose(weights, hands=True, face=True, device="cpu").pose(frame)
    assert pose.body.shape == (18, 3) and pose.body.dtype == np.float32
    assert pose.hands.shape == (2, 21, 3) and pose.face.shape == (70, 3)
    for points in (pose.body, pose.hands.reshape(-1, 3), pose.face):
        found = points[points[:, 2] > 0]
        assert np.all(found[:, 0] < frame.shape[1]) and np.all(found[:, 1] < frame.shape[0])
        assert np.all(points[points[:, 2] == 0][:, :2] == 0)


@pytest.mark.parametrize("forced", [False, True])
def test_openpose_checkpoints_load_tensors_only(tmp_path, forced, monkeypatch):
    """A checkpoint that would run code when unpickled is refused, and the code never runs; the
    refusal names the file in one line (an actor makes it the run's line). Also where the
    environment turns torch's default off (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1): controlnet-aux and
    segment-anything call torch.load without weights_only, so the file's code ran there."""
    import torch

    if forced:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    from disco.pipeline.annotators.openpose_backend import OpenPosePose
    from disco.pipeline.annotators.weights import WeightsError

    marker = tmp_path / "ran"
    (tmp_path / "openpose").mkdir()
    torch.save({"conv1_1.weight": CodeRunningPickle(marker)}, tmp_path / OPENPOSE_FILES["body"])
    with pytest.raises(WeightsError) as info:
        OpenPosePose(tmp_path, hands=False, device="cpu")
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(f"{tmp_path / OPENPOSE_FILES['body']} was not loaded: it holds a pickled ")
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_a_damaged_weights_file_is_named_in_one_line(weights, tmp_path, damage):
    """A weights file the driver found but that does not load (cut short by a copy, another file
    under the name): segment-anything's and controlnet-aux's loaders raise what torch raises; the
    backends name the file in one line (a WeightsError, which stops the run in that line from an
    actor, as a damaged DWPose graph does)."""
    import shutil

    from disco.pipeline.annotators.grounded_sam import GroundedSamMatting
    from disco.pipeline.annotators.openpose_backend import OpenPosePose
    from disco.pipeline.annotators.weights import WeightsError

    for name, build in ((OPENPOSE_FILES["body"], lambda root: OpenPosePose(root, hands=False, device="cpu")),
                        (SAM_FILES["vit_b"], lambda root: GroundedSamMatting(root, sam_model="vit_b", device="cpu"))):
        root = tmp_path / name.replace("/", "-")
        shutil.copytree(weights, root)
        good = (weights / name).read_bytes()
        (root / name).write_bytes(b"not a checkpoint" * 64 if damage == "garbage" else good[:len(good) // 2])
        with pytest.raises(WeightsError) as info:
            build(root)
        message = str(info.value)
        # Garbage reads as a pickle the tensors-only unpickler refuses; a cut zip as a damaged file.
        assert message.startswith(f"{root / name} ") and "damaged" in message and "\n" not in message, message


def test_missing_weights_name_the_file_and_where_it_belongs(weights, tmp_path):
    partial = tmp_path / "w"
    (partial / "openpose").mkdir(parents=True)
    (partial / OPENPOSE_FILES["body"]).write_bytes((weights / OPENPOSE_FILES["body"]).read_bytes())
    with pytest.raises(BackendError) as info:
        resolve_backends("mediapipe", "openpose", weights=partial, device="cpu", hands=True)
    assert "openpose/hand_pose_model.pth" in str(info.value) and str(partial / "openpose") in str(info.value)
    assert "body_pose_model" not in str(info.value)
    with pytest.raises(BackendError, match="sam/sam_vit_h_4b8939.pth"):
        resolve_backends("grounded-sam", "none", weights=weights, device="cpu", sam_model="vit_h")
    with pytest.raises(BackendError, match="--weights"):
        resolve_backends("grounded-sam", "none", weights=None, device="cpu")


def test_gpu_backend_without_cuda_fails_instead_of_falling_back(weights, monkeypatch):
    monkeypatch.setattr("disco.pipeline.annotators.cuda_available", lambda: False)
    with pytest.raises(BackendError, match="CUDA"):
        resolve_backends("grounded-sam", "openpose", weights=weights, sam_model="vit_b")
    with pytest.raises(BackendError, match="CUDA"):
        resolve_backends("mediapipe", "mediapipe", device="cuda")
    # Asked for on purpose, the CPU is allowed.
    resolved = resolve_backends("grounded-sam", "openpose", weights=weights, device="cpu", sam_model="vit_b")
    assert (resolved["matting"], resolved["pose"], resolved["device"]) == ("grounded-sam", "openpose", "cpu")


def test_auto_picks_gpu_backends_only_with_cuda_and_weights(weights, tmp_path, monkeypatch):
    monkeypatch.setattr("disco.pipeline.annotators.cuda_available", lambda: False)
    resolved = resolve_backends("auto", "auto", weights=weights, sam_model="vit_b")
    assert (resolved["matting"], resolved["pose"]) == ("mediapipe", "mediapipe")
    assert "no CUDA" in resolved["reason"]
    monkeypatch.setattr("disco.pipeline.annotators.cuda_available", lambda: True)
    resolved = resolve_backends("auto", "auto", weights=weights, sam_model="vit_b", face=True)
    assert (resolved["matting"], resolved["pose"], resolved["device"]) == ("grounded-sam", "openpose", "cuda")
    # vit_h is not in the folder: matting falls back to MediaPipe and says why; pose still finds its files.
    resolved = resolve_backends("auto", "auto", weights=weights, sam_model="vit_h")
    assert (resolved["matting"], resolved["pose"]) == ("mediapipe", "openpose")
    assert "sam2 or grounded-sam weights not found" in resolved["reason"]
    # With DWPose's graphs beside OpenPose's, auto takes DWPose, the better of the two; without
    # them it says DWPose was preferred.
    both = write_random_weights(tmp_path / "both", only=("openpose", "dwpose"))
    import onnxruntime

    # The CPU-only onnxruntime wheel (this machine's) cannot run DWPose on CUDA: auto passes it
    # over and says why, asked for by name it is refused here instead of in every actor.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    resolved = resolve_backends("mediapipe", "auto", weights=both)
    assert resolved["pose"] == "openpose"
    assert "dwpose weights found but this onnxruntime has no CUDA provider" in resolved["reason"]
    with pytest.raises(BackendError, match="dwpose cannot run on CUDA: .*onnxruntime-gpu"):
        resolve_backends("mediapipe", "dwpose", weights=both)
    # On a cluster the driver (a CPU head, other wheels) says nothing of the GPU workers' onnxruntime.
    assert resolve_backends("mediapipe", "auto", weights=both, cuda=True)["pose"] == "dwpose"
    assert resolve_backends("mediapipe", "dwpose", weights=both, cuda=True)["pose"] == "dwpose"
    assert resolve_backends("mediapipe", "dwpose", weights=both, device="cpu")["pose"] == "dwpose"
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])  # onnxruntime-gpu
    resolved = resolve_backends("mediapipe", "auto", weights=both)
    assert resolved["pose"] == "dwpose" and "pose: CUDA and dwpose weights found" in resolved["reason"]
    (both / "dwpose" / "yolox_l.onnx").unlink()
    resolved = resolve_backends("mediapipe", "auto", weights=both)
    assert resolved["pose"] == "openpose" and "(dwpose preferred, weights not found)" in resolved["reason"]
    monkeypatch.delenv("DISCO_WEIGHTS", raising=False)
    resolved = resolve_backends("auto", "auto")
    assert (resolved["matting"], resolved["pose"]) == ("mediapipe", "mediapipe")


def test_weights_folder_from_the_environment(weights, monkeypatch):
    monkeypatch.setenv("DISCO_WEIGHTS", str(weights))
    resolved = resolve_backends("mediapipe", "openpose", device="cpu", face=True)
    assert resolved["weights"] == str(weights)


def test_a_relative_weights_folder_reaches_the_actors_absolute(weights, monkeypatch):
    """Ray's workers (other nodes, a ``ray job submit`` job) do not run in the driver's working
    directory: the folder they load from is made absolute where it is given."""
    from disco.pipeline.run import stage_settings

    monkeypatch.chdir(weights.parent)
    relative = Path(weights.name)
    resolved = resolve_backends("mediapipe", "openpose", weights=relative, device="cpu", face=True)
    assert resolved["weights"] == str(weights.absolute())
    cfg = PreprocessConfig(source="images", input=weights, output=weights.parent / "out", matting="mediapipe",
                           pose="openpose", weights=relative, device="cpu", face=True).validate()
    cfg.resolved = resolved
    assert stage_settings(cfg)["backend_options"]["weights"] == str(weights.absolute())


# 40-80 s on 2 cores (Grounded-SAM's ViT-B at 1024 px inside an actor). Covered in the default
# run by the pools test below (a whole preprocess through GPU actors with fractional GPUs, OpenPose
# among them, and what Ray gave each) and by the Grounded-SAM and OpenPose tests above (each
# backend loads the weights layout and gives the contract's shapes).
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_gpu_pipeline_runs_as_gpu_actors_and_writes_the_contract(weights, tmp_path, ray_local):
    import ray

    assert ray.cluster_resources().get("GPU") == 2  # the session's fake GPUs
    folder = tmp_path / "in"
    save(folder / "astronaut.png", Image.fromarray(data.astronaut()))
    cfg = PreprocessConfig(
        source="images", input=folder, output=tmp_path / "out", matting="grounded-sam", pose="openpose",
        weights=weights, device="cpu", sam_model="vit_b", box_threshold=0.0, text_threshold=0.0, face=True,
        max_side=128, matting_gpus=1.0, pose_gpus=0.5,
    )
    result = preprocess(cfg, log=lambda *_: None)
    assert result.exit_code == 0
    manifest = result.manifest
    pools = {p["stage"]: p for p in manifest["run"]["pools"]}
    assert pools["matting"]["gpus_per_actor"] == 1.0 and pools["pose"]["gpus_per_actor"] == 0.5
    # What Ray actually handed the actors that did the work.
    held = manifest["run"]["stage_resources"]
    assert [r["GPU"] for r in held["matting"]] == [1.0] and [r["GPU"] for r in held["pose"]] == [0.5]
    assert manifest["backends"]["matting"]["name"] == "grounded-sam"
    assert manifest["backends"]["pose"]["name"] == "openpose"
    recorded = {w["name"]: w["sha256"] for w in manifest["backends"]["weights"]}
    sam = SAM_FILES["vit_b"]
    assert recorded[sam] == hashlib.sha256((weights / sam).read_bytes()).hexdigest()
    assert {OPENPOSE_FILES["body"], OPENPOSE_FILES["hand"], OPENPOSE_FILES["face"]} <= set(recorded)

    table = open_triplets(tmp_path / "out").to_table()
    assert table.schema.equals(TRIPLET_SCHEMA) and table.num_rows == 1
    row = table.to_pylist()[0]
    assert (row["width"], row["height"]) == (128, 128)
    assert len(row["body_keypoints"]) == 54 and len(row["hand_keypoints"]) == 126 and len(row["face_keypoints"]) == 210
    mask = decode_picture(row["mask"], grayscale=True)
    assert mask.shape == (128, 128) and row["mask_area"] == pytest.approx((mask >= 128).mean(), abs=1e-6)
    assert decode_picture(row["pose"]).shape == (128, 128, 3)
    assert 1 <= row["person_count"] <= 6


def test_gpu_pools_fill_every_gpu_with_one_matting_and_one_pose_actor(weights, tmp_path, ray_local):
    """On the session's instance (2 CPUs, 2 fake GPUs) with half a GPU per model actor: two actors
    of each stage, one of each per GPU, and Ray handed every actor what the plan asked for. (MediaPipe
    matting beside OpenPose keeps the actors cheap to start; the planner treats both stages alike.)"""
    folder = tmp_path / "in"
    photo = Image.fromarray(data.astronaut()).resize((128, 128))
    for k in range(4):
        save(folder / f"p{k}.png", photo.rotate(k * 5))
    cfg = PreprocessConfig(
        source="images", input=folder, output=tmp_path / "out", matting="mediapipe", pose="openpose",
        weights=weights, device="cpu", hands=False, max_side=128, matting_gpus=0.5, pose_gpus=0.5,
    )
    result = preprocess(cfg, log=lambda *_: None)
    assert result.exit_code == 0 and result.manifest["counts"]["rows_written"] == 4
    pools = {p["stage"]: p for p in result.manifest["run"]["pools"]}
    assert pools["matting"]["actors"] == pools["pose"]["actors"] == 2
    assert pools["matting"]["gpus_per_actor"] == pools["pose"]["gpus_per_actor"] == 0.5
    assert pools["matting"]["cpus_per_actor"] * 4 <= 2 - 0.1
    held = result.manifest["run"]["stage_resources"]
    for stage in ("matting", "pose"):
        assert 1 <= len(held[stage]) <= 2
        for actor in held[stage]:
            assert actor["GPU"] == 0.5 and actor["CPU"] == pools[stage]["cpus_per_actor"]
            assert len(actor["gpu_ids"]) == 1
        # Two actors of one stage never share a GPU (Ray alone would pack them: see below).
        assert len({tuple(actor["gpu_ids"]) for actor in held[stage]}) == len(held[stage])


def test_half_gpu_actors_spread_one_of_each_stage_over_the_gpus(ray_local):
    """Ray places fractional GPU shares best fit and cannot tell the stages apart: two half-GPU
    matting actors started first share GPU 0 and the pose actors GPU 1. Through the run's ledger
    each actor takes the GPU of its node with the fewest of its stage, before any model loads
    (``CUDA_VISIBLE_DEVICES``): one matting and one pose actor per GPU, as the plan has it."""
    import ray

    from disco.pipeline.gpu_balance import balance_gpu, start_ledger, stop_ledger

    @ray.remote(num_gpus=0.5, num_cpus=0)
    class Stage:
        def __init__(self, ledger, stage):
            self.used = balance_gpu(ledger, stage)

        def devices(self):
            import os

            return [str(g) for g in ray.get_gpu_ids()], self.used, os.environ.get("CUDA_VISIBLE_DEVICES")

    def start(ledger, stages):
        actors, seen = [], []
        for stage in stages:  # one after the other, as a pool's actors come up
            actors.append(Stage.remote(ledger, stage))
            seen.append(ray.get(actors[-1].devices.remote()))
        for actor in actors:
            ray.kill(actor)
        return seen

    alone = start(None, ["matting", "matting", "pose", "pose"])
    # Ray's packing, unbalanced: the two matting actors on one GPU, the pose actors on the other
    # (which GPU comes first is Ray's choice: it varied between machines).
    packed = [ray_ids for ray_ids, _, _ in alone]
    assert packed[0] == packed[1] and packed[2] == packed[3] and sorted(packed[1:3]) == [["0"], ["1"]], packed
    name, ledger = start_ledger("test")
    try:
        spread = start(name, ["matting", "matting", "pose", "pose"])
    finally:
        stop_ledger(ledger)
    used = [ids for _, ids, _ in spread]
    assert sorted(map(tuple, used[:2])) == sorted(map(tuple, used[2:])) == [("0",), ("1",)]
    assert all(visible == ids[0] for _, ids, visible in spread)  # what CUDA will see in each actor


def test_frame_annotator_uses_the_box_threshold_as_the_person_threshold(weights):
    annotator = FrameAnnotator("mediapipe", "none", hands=False, min_visibility=0.5, min_mask_area=0.01)
    person = np.zeros((10, 10), np.uint8)
    person[:5] = 255
    assert not annotator.present(Matte(alpha=person, score=0.4, count=1))
    annotator.min_score = 0.3  # what grounded-sam sets from --box-threshold
    assert annotator.present(Matte(alpha=person, score=0.4, count=1))
    annotator.close()


def test_cli_refuses_a_gpu_backend_without_cuda_in_one_line(tmp_path, weights):
    if cuda_available():
        pytest.skip("this machine has CUDA")
    save(tmp_path / "in" / "a.png", Image.fromarray(data.astronaut()))
    result = CliRunner().invoke(app, ["preprocess", "--source", "images", "--input", str(tmp_path / "in"),
                                      "--output", str(tmp_path / "out"), "--matting", "grounded-sam",
                                      "--weights", str(weights), "--sam-model", "vit_b"])
    assert result.exit_code == 2
    assert "CUDA" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_doctor_reports_backends_and_weights(weights, tmp_path):
    result = CliRunner().invoke(app, ["doctor", "--weights", str(weights), "--sam-model", "vit_b", "--face", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    files = {f["name"]: f["present"] for f in report["files"]}
    assert files[SAM_FILES["vit_b"]] and files[OPENPOSE_FILES["face"]]
    backends = {b["name"]: b for b in report["backends"]}
    assert backends["mediapipe"]["can_run"]
    if not report["cuda"]:
        assert not backends["grounded-sam"]["can_run"]
        assert any("CUDA" in p for p in backends["grounded-sam"]["problems"])
    result = CliRunner().invoke(app, ["doctor", "--weights", str(weights), "--sam-model", "vit_h", "--json"])
    report = json.loads(result.output)
    missing = [f["name"] for f in report["files"] if not f["present"]]
    # The folder holds the paper's two backends only; DWPose's graphs are named as missing too.
    assert [name for name in missing if not name.startswith(("dwpose/", "sam2/"))] == [SAM_FILES["vit_h"]]
    assert set(DWPOSE_FILES.values()) <= set(missing)
    assert not {b["name"]: b for b in report["backends"]}["dwpose"]["can_run"]
    # The SAM 2 size asked for is the checkpoint looked for.
    tiny = CliRunner().invoke(app, ["doctor", "--weights", str(weights), "--sam2-model", "tiny", "--json"])
    assert "sam2/sam2.1_hiera_tiny.pt" in {f["name"] for f in json.loads(tiny.output)["files"]}
    assert any(SAM_FILES["vit_h"] in p for p in {b["name"]: b for b in report["backends"]}["grounded-sam"]["problems"])
    text = CliRunner().invoke(app, ["doctor", "--weights", str(weights)])
    assert text.exit_code == 0 and "grounded-sam" in text.output and "CUDA" in text.output
    bad = CliRunner().invoke(app, ["doctor", "--weights", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not a folder" in bad.output


# Skipped before its fixtures are built: without a GPU the random weights would cost 18 s for nothing.
@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_grounded_sam_on_cuda_in_half_precision(weights, frame):
    from disco.pipeline.annotators.grounded_sam import GroundedSamMatting

    matting = GroundedSamMatting(weights, sam_model="vit_b", box_threshold=0.0, text_threshold=0.0, device="cuda")
    assert matting.half
    mattes = matting.matte_batch([frame, frame])
    assert all(m.alpha.shape == frame.shape[:2] for m in mattes)
    assert np.array_equal(mattes[0].alpha, mattes[1].alpha)  # a batch of equal frames gives equal masks



def test_a_matted_unit_survives_the_trip_between_the_gpu_stages():
    """Frames, mattes and each row's own clip_id (a tar member's) come back exactly."""
    import pyarrow as pa
    from collections import Counter

    from disco.pipeline.sources.generic import InputItem
    from disco.pipeline.store.schema import PACKED_UNIT_SCHEMA, UNIT_FIELDS, payload
    from disco.pipeline.actors import pack_unit, unpack_unit
    from disco.pipeline.stages import MattedFrame

    rng = np.random.default_rng(0)
    listed = InputItem(input_path="shard-0.tar", abs_path="/data/caf\\xe9/shard-0.tar", source="laion",
                       clip_id="shard-0", kind="tar", split="train", extra=payload(start=8, stop=16),
                       raw_path=b"/data/caf\xe9/shard-0.tar")  # a name that is not UTF-8 keeps its bytes
    unit = {**listed.to_dict(), "error_stage": None, "unit_index": 1, "unit_count": 3, "src_indices": [8, 9],
            "frame_start": 8, "width": 0, "height": 0}
    assert set(unit) == UNIT_FIELDS  # what the planner gives every unit, as the type declares
    kept = []
    for k in range(2):
        frame = rng.integers(0, 256, (5 + k, 7, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, (5 + k, 7), dtype=np.uint8)
        kept.append(MattedFrame(k, None, frame, {**unit, "clip_id": f"shard-0/{k:09d}"}, Matte(alpha, 0.7 + k / 10, k + 1, "grounded-sam")))
    errors = [{"input_path": "shard-0.tar", "sample_id": None, "stage": "list", "error_type": "unsafe_member",
               "message": "../x"}]
    reject = {"sample_id": "laion/shard-0/000000002", "source": "laion", "clip_id": "shard-0/000000002",
              "frame_index": 2, "timestamp_s": None, "split": "train", "input_path": "shard-0.tar", "width": 7,
              "height": 5, "reason": "no_person", "person_score": 0.25, "person_count": 0, "mask_area": 0.0}
    record = pack_unit(unit, 3, kept, errors, Counter(no_person=1), [reject], {"matting": {"GPU": 0.5}})
    # Through Arrow, as Ray Data carries it.
    record = pa.Table.from_pylist([record], schema=PACKED_UNIT_SCHEMA).to_pylist()[0]
    back_unit, frames, back, back_errors, skipped, rejects, resources = unpack_unit(record)
    assert back_unit == unit and frames == 3 and back_errors == errors and skipped == Counter(no_person=1)
    assert rejects == [reject] and resources == {"matting": {"GPU": 0.5}}
    with pytest.raises(ValueError, match="does not declare"):  # Arrow would drop it on the way
        pack_unit({**unit, "note": 1}, 3, kept, errors, Counter(), [], {})
    for (fi, ts, frame, row_unit, matte), (fi2, ts2, frame2, row_unit2, matte2) in zip(kept, back):
        assert (fi, ts, row_unit) == (fi2, ts2, row_unit2)
        assert np.array_equal(frame, frame2) and np.array_equal(matte.alpha, matte2.alpha)
        assert (matte.score, matte.count, matte.model) == (matte2.score, matte2.count, matte2.model)


def test_generate_builds_its_annotators_on_the_models_device(weights, monkeypatch):
    """``generate --device cpu`` on a machine with a GPU and $DISCO_WEIGHTS takes the embedded
    annotators (not OpenPose on GPU 0 beside a CPU model); ``--device cuda:1`` puts a GPU backend
    on that GPU, DWPose's ONNX Runtime session included."""
    import onnxruntime

    from disco.generate.inputs import make_annotator
    from disco.pipeline.annotators import dwpose_backend

    built = []
    monkeypatch.setattr("disco.pipeline.annotators.FrameAnnotator",
                        lambda matting, pose, *args, **kwargs: built.append((matting, pose, kwargs["device"])))
    monkeypatch.setattr("disco.pipeline.annotators.cuda_available", lambda: True)
    monkeypatch.setenv("DISCO_WEIGHTS", str(weights))
    for device in ("cpu", "cuda:1", None):
        make_annotator(with_pose=True, device=device)
    assert built == [("mediapipe", "mediapipe", "cpu"), ("mediapipe", "openpose", "cuda:1"),
                     ("mediapipe", "openpose", "cuda")]
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert dwpose_backend.providers_for("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert dwpose_backend.providers_for("cpu") == ["CPUExecutionProvider"]


def test_a_matting_batch_out_of_gpu_memory_halves_the_batch_for_the_rest_of_the_actor():
    """SAM's batch of 8 on a GPU that holds 2 frames (a smaller card, or its half of one shared
    with the pose actor): the batch halves until it fits and stays so for the actor's later units.
    Before, every unit tried 8 again, failed, and went one frame at a time."""
    import importlib
    from collections import Counter

    import annotator_plugin

    from disco.pipeline.annotators import registry
    from disco.pipeline.decode import Frame
    from disco.pipeline.stages import matte_unit

    before = {backend.name for backend in registry.backends()}
    importlib.reload(annotator_plugin)
    try:
        annotator = FrameAnnotator("tight-memory", "none", hands=False, min_visibility=0.5, min_mask_area=0.01)
        backend = annotator.matting
        picture = np.zeros((16, 16, 3), np.uint8)
        errors: list[dict] = []
        def unit_of(frames: int, name: str) -> int:
            unit = {"source": "video", "clip_id": name, "input_path": f"{name}.mp4", "kind": "video"}
            return len(matte_unit(unit, [Frame(i, i / 8, picture, unit) for i in range(frames)], annotator, {},
                                  errors, Counter(), []))

        kept_per_unit = [unit_of(8, "a"), unit_of(8, "b")]
        assert kept_per_unit == [8, 8] and errors == []
        assert backend.calls == [8, 4, 2, 2, 2, 2] + [2, 2, 2, 2]  # 8 and 4 ran out once; then 2 from the start
        # A frame that does not fit even alone (a huge still) tells nothing of the batch: it is its
        # errors row after one retry, and the next units keep batches of 2.
        backend.fits, backend.calls = 0, []
        assert unit_of(1, "huge") == 0 and backend.calls == [1, 1] and backend.batch_size == 2
        assert [e["error_type"] for e in errors] == ["gpu_out_of_memory"]
        assert annotator.shrink_batch(3) == 1 and annotator.shrink_batch(8) is None  # down to one frame, no further
    finally:  # the registry as it was (a later test imports the plugin and expects its declarations)
        for name in {backend.name for backend in registry.backends()} - before:
            registry.unregister(name)


def test_onnx_runtimes_out_of_memory_is_a_gpu_out_of_memory_error_not_a_lost_device():
    """ONNX Runtime (DWPose) raises a plain RuntimeError when the GPU is full: typed
    ``gpu_out_of_memory`` (--retry-errors gpu_out_of_memory runs it again), the actor kept."""
    from disco.pipeline.device_loss import device_lost
    from disco.pipeline.errors import error_type_of

    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

    # ONNX Runtime's own exception classes (not RuntimeError), with its messages.
    full = RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                            "running Conv node. Name:'/backbone/Conv' Status Message: Failed to allocate memory for "
                            "requested buffer of size 268435456")
    cuda = Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory ; GPU=0 ; hostname=n1")
    for exc in (full, cuda):
        assert error_type_of(exc) == "gpu_out_of_memory" and not device_lost(exc)
    assert error_type_of(Fail("[ONNXRuntimeError] : 1 : FAIL : bad input shape")) == "unexpected_Fail"
    # Not ONNX Runtime's: a message that only mentions such words stays what it is.
    assert error_type_of(RuntimeError("Failed to allocate memory for the cache")) == "unexpected_RuntimeError"


def test_a_frame_given_up_for_the_gpu_it_broke_is_its_row_not_another_broken_gpu():
    """The error of a frame given up after breaking the GPU quotes CUDA's message: read as a
    broken device, it restarted a healthy actor (the unit's strike) instead of being the frame's row."""
    from disco.pipeline.device_loss import device_lost
    from disco.pipeline.errors import GpuFailed, error_type_of

    cuda = RuntimeError("CUDA error: an illegal memory access was encountered")
    given_up = GpuFailed(f"the GPU failed 2 times on this frame ({cuda})")
    assert device_lost(cuda) and not device_lost(given_up) and error_type_of(given_up) == "gpu_failed"


def test_an_actor_on_a_share_of_a_gpu_sees_its_own_gpu_and_takes_its_share_of_memory(ray_local):
    """With RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (clusters shared with vLLM-style
    frameworks) Ray leaves every GPU visible, and "cuda" was GPU 0 for every actor of the node:
    the actor sets CUDA_VISIBLE_DEVICES to what Ray gave it. An actor on half a GPU holds
    PyTorch's allocator and DWPose's ONNX Runtime arena to half the device's memory (the CUDA
    calls are stood in for in the actor: no GPU here); a whole GPU is not capped."""
    import ray

    @ray.remote(num_cpus=0)
    class Stage:
        def __init__(self):
            import torch

            self.fraction = []
            torch.cuda.is_available = lambda: True
            torch.cuda.set_per_process_memory_fraction = lambda share, device: self.fraction.append((share, device))
            torch.cuda.get_device_properties = lambda device: type("Props", (), {"total_memory": 80 << 30})()

        def start(self):
            import os

            import onnxruntime

            from disco.pipeline.annotators.dwpose_backend import providers_for
            from disco.pipeline.gpu_balance import balance_gpu, cap_gpu_memory

            used = balance_gpu(None, "pose")
            limit = cap_gpu_memory()
            onnxruntime.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
            return (used, os.environ.get("CUDA_VISIBLE_DEVICES"), limit, self.fraction,
                    providers_for("cuda")[0][1])

    noset = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    results = []
    for gpus, env in ((0.5, noset), (1, None)):
        actor = Stage.options(num_gpus=gpus, runtime_env=env).remote()
        try:
            results.append(ray.get(actor.start.remote()))
        finally:
            ray.kill(actor)
    from disco.pipeline.gpu_balance import CONTEXT_BYTES

    (used, visible, limit, fraction, options), whole = results
    assert len(used) == 1 and visible == used[0]  # Ray left it unset (its own variable says so); the actor set it
    assert limit == (40 << 30) - CONTEXT_BYTES  # half the device, less what its CUDA context takes outside
    assert fraction == [(limit / (80 << 30), 0)]
    assert options == {"device_id": 0, "gpu_mem_limit": limit, "arena_extend_strategy": "kSameAsRequested"}
    assert whole[1] == whole[0][0] and whole[2] is None and whole[3] == []  # a whole GPU: nothing capped
    assert whole[4] == {"device_id": 0}


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_the_memory_cap_of_a_half_gpu_actor_holds_on_cuda(ray_local):
    """On a GPU: an actor on half of it cannot allocate more than half its memory (PyTorch's
    error, which the matting stage answers with smaller batches), and can allocate below it."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=0.5)
    def probe():
        import torch

        from disco.pipeline.gpu_balance import balance_gpu, cap_gpu_memory

        balance_gpu(None, "matting")
        limit = cap_gpu_memory()
        small = torch.empty(limit // 4, dtype=torch.uint8, device="cuda")
        del small
        try:
            torch.empty(int(limit * 1.2), dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError:
            return limit, True
        return limit, False

    limit, refused = ray.get(probe.remote())
    assert limit > 0 and refused


@pytest.mark.parametrize(("cuda_error", "says"), [
    ("CUDA error: all CUDA-capable devices are busy or unavailable", "--matting-gpus 1 --pose-gpus 1"),
    ("CUDA error: no kernel image is available for execution on the device", "install a PyTorch wheel built for it"),
])
def test_a_gpu_the_actor_cannot_use_stops_the_run_in_one_line(ray_local, tmp_path, cuda_error, says):
    """A GPU in exclusive-process compute mode (HPC clusters) takes one process: the second actor
    on it could not start, a Ray traceback ended the run. A PyTorch without kernels for the GPU
    loaded the models (a copy needs no kernel) and failed every frame, each an errors row. Both are
    found by a first kernel at the actor's start, before its models load: one line naming the node,
    the GPU and the remedy (the CUDA call is stood in for in the actor: no GPU here)."""
    import ray

    from disco.pipeline.errors import STOPS_THE_RUN, stopping_error

    @ray.remote(num_cpus=0, num_gpus=0.5)
    class Start:
        def run(self, settings, error):
            import torch

            from disco.pipeline.actors import MattingStage

            def ones(*args, **kwargs):
                raise RuntimeError(error)

            torch.cuda.is_available = lambda: True
            torch.cuda.set_per_process_memory_fraction = lambda share, device: None
            torch.cuda.get_device_properties = lambda device: type("Props", (), {"total_memory": 80 << 30})()
            torch.ones = ones
            try:
                MattingStage(settings)
            except Exception as exc:  # noqa: BLE001 - what Ray Data would get from the actor's start
                return str(exc)
            return None

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    settings = {"input_root": str(tmp_path / "in"), "output": str(tmp_path), "matting": "grounded-sam",
                "backend_options": {"device": "cuda"}}
    actor = Start.remote()
    try:
        message = ray.get(actor.run.remote(settings, cuda_error))
        # An actor whose models run on the CPU (--device cpu with a GPU share, MediaPipe) starts no
        # CUDA context: the same GPU does not stop it.
        mediapipe = {**settings, "matting": "mediapipe", "pose": "none", "hands": False, "min_visibility": 0.5,
                     "min_mask_area": 0.01, "joint_threshold": 0.2, "backend_modules": {}}
        on_cpu = [ray.get(actor.run.remote(changed, cuda_error)) for changed in (
            mediapipe, {**mediapipe, "backend_options": {"device": "cpu"}})]
        # Grounded-SAM on the CPU gets as far as its weights (none here), never to the GPU.
        grounded_on_cpu = ray.get(actor.run.remote(
            {**mediapipe, "matting": "grounded-sam", "backend_options": {"device": "cpu", "weights": None}}, cuda_error))
    finally:
        ray.kill(actor)
    assert on_cpu == [None, None]
    assert grounded_on_cpu is not None and "cannot use GPU" not in grounded_on_cpu and "weights" in grounded_on_cpu
    assert message is not None and message.startswith(STOPS_THE_RUN), message
    line = str(stopping_error(RuntimeError(message)))
    assert line.startswith("the matting actor cannot use GPU ") and " of node " in line and says in line
