"""DWPose through ONNX Runtime: the decoding on crafted arrays, the mapping to the contract, the
backend on random-weight graphs of the published files' shapes, and a whole preprocess through Ray."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

# Imported before any preprocess: the module registers "dwpose", and Ray's actors import it by name.
from disco.pipeline.annotators import dwpose_backend as dw
from disco.pipeline.annotators.keypoints import BODY18_NAMES
from disco.pipeline.annotators.weights import WeightsError
from helpers import save

BODY = {name: k for k, name in enumerate(BODY18_NAMES)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dwpose-weights")
    dw.write_dwpose(root)
    return root


def _raw() -> np.ndarray:
    """YOLOX's output for an empty picture: every score low."""
    raw = np.zeros((8400, 85), np.float32)
    raw[:, 4:] = 0.01
    return raw


def _row(stride: int, x: int, y: int) -> int:
    before = sum((640 // s) ** 2 for s in (8, 16, 32) if s < stride)
    return before + y * (640 // stride) + x


# -- the detector -----------------------------------------------------------------------------------

def test_letterbox_puts_the_scaled_frame_top_left_on_grey():
    frame = np.zeros((320, 480, 3), np.uint8)  # h x w: r = min(640 / 320, 640 / 480) = 4 / 3
    frame[:, :, 0] = 200  # the blue channel of a BGR frame
    batch, ratio = dw.letterbox(frame)
    assert ratio == pytest.approx(4 / 3)
    assert batch.shape == (1, 3, 640, 640) and batch.dtype == np.float32 and batch.flags["C_CONTIGUOUS"]
    assert np.all(batch[0, 0, :426, :640] == 200) and np.all(batch[0, 1:, :426, :640] == 0)  # 320 * 4/3 = 426.7
    assert np.all(batch[0, :, 427:, :] == 114)


def test_a_person_anchor_decodes_to_its_box_in_frame_pixels():
    raw = _raw()
    person = _row(16, 7, 3)  # cell (7, 3) of the stride-16 level
    raw[person, :4] = [0.25, 0.5, math.log(4), math.log(6)]  # centre offset in cells, log size in cells
    raw[person, 4:6] = [0.9, 0.8]  # objectness, person
    car = _row(8, 40, 40)  # a confident object of another class is no person
    raw[car, 4] = 0.95
    raw[car, 5], raw[car, 7] = 0.01, 0.9
    ratio = 4 / 3  # a 480 x 320 frame in the 640 letterbox
    boxes, scores = dw.decode_detections(raw, ratio)
    # Centre ((7 + 0.25) * 16, (3 + 0.5) * 16) = (116, 56), size (64, 96) in the letterbox.
    expected = np.array([116 - 32, 56 - 48, 116 + 32, 56 + 48]) / ratio
    assert boxes.shape == (1, 4)
    np.testing.assert_allclose(boxes[0], expected, rtol=1e-5)
    assert scores[0] == pytest.approx(0.72)


def test_nms_keeps_the_best_of_two_overlapping_boxes():
    boxes = np.array([[0, 0, 100, 100], [5, 5, 105, 105], [300, 300, 400, 400]], np.float32)
    assert list(dw.nms(boxes, np.array([0.7, 0.9, 0.5]), 0.45)) == [1, 2]
    # Through the decoder: two neighbouring anchors of the same large person give one box.
    raw = _raw()
    for x, obj in ((5, 0.8), (6, 0.95)):
        row = _row(32, x, 5)
        raw[row, :4] = [0.5, 0.5, math.log(6), math.log(8)]
        raw[row, 4:6] = [obj, 1.0]
    boxes, scores = dw.decode_detections(raw, 1.0)
    assert len(boxes) == 1 and scores[0] == pytest.approx(0.95)
    np.testing.assert_allclose(boxes[0], [6.5 * 32 - 96, 5.5 * 32 - 128, 6.5 * 32 + 96, 5.5 * 32 + 128])


# -- the pose model ---------------------------------------------------------------------------------

def test_a_box_becomes_a_padded_crop_of_the_models_aspect_ratio():
    # 100 x 300 box, padded by 1.25 -> 125 x 375, then widened to 288 / 384 of its height: 281.25.
    centre, scale = dw.box_to_crop(np.array([100, 50, 200, 350]))
    np.testing.assert_allclose(centre, [150, 200])
    np.testing.assert_allclose(scale, [281.25, 375])
    # A wide box grows in height instead: 400 x 100 -> 500 x 125 -> 500 x 666.7.
    _, wide = dw.box_to_crop(np.array([0, 0, 400, 100]))
    np.testing.assert_allclose(wide, [500, 500 * 384 / 288], rtol=1e-6)

    # The warp: a frame whose first channel is its x and second its y; a 100 x 100 box at (150, 100)
    # becomes a 125 x 166.7 region from (87.5, 16.7), seen at 288 x 384.
    ys, xs = np.mgrid[0:240, 0:256]
    frame = np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    centre, scale = dw.box_to_crop(np.array([100, 50, 200, 150]))
    np.testing.assert_allclose(scale, [125, 125 / 0.75], rtol=1e-6)
    patch = dw.crop(frame, centre, scale)
    assert patch.shape == (3, 384, 288) and patch.dtype == np.float32
    seen = patch.transpose(1, 2, 0) * dw.STD + dw.MEAN  # back to pixel values
    for u, v in ((0, 0), (144, 192), (287, 383), (30, 300)):
        expected = [u * 125 / 288 + 87.5, v * (125 / 0.75) / 384 + (100 - 125 / 1.5), 7]
        np.testing.assert_allclose(seen[v, u], expected, atol=0.6)


def test_simcc_peaks_decode_to_frame_pixels_through_the_crop():
    centre, scale = np.array([150.0, 200.0]), np.array([281.25, 375.0])  # the crop above
    simcc_x = np.full((1, 133, 576), -1.0, np.float32)
    simcc_y = np.full((1, 133, 768), -1.0, np.float32)
    # Point 0 at bins (288, 384): input pixel (144, 192), the crop's centre.
    simcc_x[0, 0, 288], simcc_y[0, 0, 384] = 0.9, 0.6
    # Point 7 at bins (0, 0): the crop's top-left corner.
    simcc_x[0, 7, 0], simcc_y[0, 7, 0] = 0.5, 0.8
    # Point 9 at bins (100, 700): input pixel (50, 350).
    simcc_x[0, 9, 100], simcc_y[0, 9, 700] = 0.7, 0.7
    # Point 3 peaks at 0 on one axis: missing.
    simcc_x[0, 3, 10], simcc_y[0, 3, 10] = 0.9, 0.0
    out = dw.decode_simcc(simcc_x, simcc_y, centre[None], scale[None])
    assert out.shape == (1, 133, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [150, 200, 0.6], rtol=1e-6)
    np.testing.assert_allclose(out[0, 7], [150 - 140.625, 200 - 187.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(out[0, 9], [50 * 281.25 / 288 + 9.375, 350 * 375 / 384 + 12.5, 0.7], rtol=1e-6)
    assert np.all(out[0, 3] == 0)
    assert np.all(out[0, [1, 2, 4]] == 0)  # every other point peaks at -1


# -- to the contract --------------------------------------------------------------------------------

def test_wholebody_points_land_in_the_contracts_slots():
    width, height, threshold = 64, 48, 0.3
    points = np.zeros((133, 3), np.float32)
    points[0] = [25, 10, 0.8]  # nose
    points[5] = [40, 30, 0.9]  # left shoulder
    points[6] = [20, 30, 0.6]  # right shoulder
    points[9] = [50, 40, 0.7]  # left wrist
    points[12] = [22, 44, 0.5]  # right hip
    points[1] = [-5, 10, 0.9]  # left eye, left of the picture
    points[2] = [22, 8, 0.1]  # right eye, below the threshold
    points[16] = [30, 48, 0.9]  # right ankle, on the bottom edge: outside
    points[17:23] = [10, 10, 0.9]  # feet: no slot in the contract
    points[91] = [1, 2, 0.5]  # left hand: wrist
    points[111] = [3, 4, 0.6]  # left hand: pinky tip
    points[112] = [5, 6, 0.7]  # right hand: wrist
    points[132] = [64, 6, 0.7]  # right hand: pinky tip, on the right edge: outside
    points[23] = [7, 8, 0.4]  # face: jaw's first point
    points[90] = [9, 10, 0.45]  # face: the last of the 68
    body, hands, face = dw.wholebody_to_contract(points, width, height, threshold)
    assert body.shape == (18, 3) and hands.shape == (2, 21, 3) and face.shape == (70, 3)
    assert body.dtype == hands.dtype == face.dtype == np.float32

    np.testing.assert_allclose(body[BODY["nose"]], [25, 10, 0.8])
    np.testing.assert_allclose(body[BODY["l_shoulder"]], [40, 30, 0.9])
    np.testing.assert_allclose(body[BODY["r_shoulder"]], [20, 30, 0.6])
    np.testing.assert_allclose(body[BODY["neck"]], [30, 30, 0.6])  # midpoint, the lower confidence
    np.testing.assert_allclose(body[BODY["l_wrist"]], [50, 40, 0.7])
    np.testing.assert_allclose(body[BODY["r_hip"]], [22, 44, 0.5])
    found = {BODY18_NAMES[k] for k in np.flatnonzero(body[:, 2] > 0)}
    assert found == {"nose", "neck", "l_shoulder", "r_shoulder", "l_wrist", "r_hip"}
    assert np.all(body[body[:, 2] == 0] == 0)

    np.testing.assert_allclose(hands[0, 0], [1, 2, 0.5])
    np.testing.assert_allclose(hands[0, 20], [3, 4, 0.6])
    np.testing.assert_allclose(hands[1, 0], [5, 6, 0.7])
    assert np.all(hands[1, 20] == 0) and (hands[..., 2] > 0).sum() == 3
    np.testing.assert_allclose(face[0], [7, 8, 0.4])
    np.testing.assert_allclose(face[67], [9, 10, 0.45])
    assert (face[:, 2] > 0).sum() == 2 and np.all(face[68:] == 0)  # OpenPose's pupils: missing

    # Every COCO body point to its body-18 slot (COCO's own order, from its annotation files).
    coco = ("nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
            "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle")
    points = np.zeros((133, 3), np.float32)
    points[:17] = [[k + 1, k + 2, 0.9] for k in range(17)]
    body, _, _ = dw.wholebody_to_contract(points, width, height, threshold)
    for k, name in enumerate(coco):
        np.testing.assert_allclose(body[BODY[name]], [k + 1, k + 2, 0.9])
    np.testing.assert_allclose(body[BODY["neck"]], [(6 + 7) / 2, (7 + 8) / 2, 0.9])

    # One shoulder dropped: no neck.
    points[:17] = 0
    points[5] = [40, 30, 0.9]
    points[6, 2] = 0.2
    body, _, _ = dw.wholebody_to_contract(points, width, height, threshold)
    assert np.all(body[BODY["neck"]] == 0) and np.all(body[BODY["r_shoulder"]] == 0)


def test_the_person_with_the_highest_mean_body_confidence_is_kept():
    pose = object.__new__(dw.DWPosePose)  # the person rule alone, without the graphs
    pose.hands, pose.face, pose.joint_threshold = True, False, 0.0
    people = np.zeros((2, 133, 3), np.float32)
    people[:, :17, :2] = [[10, 10]]
    people[0, 0, 2] = 0.99  # one sure joint, the rest weak: mean 0.1
    people[0, 1:17, 2] = 0.0444
    people[1, :17, 2] = 0.5  # every joint fair: mean 0.5
    people[1, :17, 0] = 20
    pose.detect = lambda bgr: (np.zeros((2, 4), np.float32), np.ones(2, np.float32))
    pose.people = lambda bgr, boxes: people
    result = pose.pose(np.zeros((32, 32, 3), np.uint8))
    assert result.body[BODY["nose"], 0] == 20 and result.face is None and result.hands.shape == (2, 21, 3)
    # Nobody found: the empty pose of the contract's shapes.
    pose.people = lambda bgr, boxes: np.zeros((0, 133, 3), np.float32)
    pose.face = True
    empty = pose.pose(np.zeros((32, 32, 3), np.uint8))
    assert not empty.body.any() and empty.body.shape == (18, 3)
    assert empty.hands.shape == (2, 21, 3) and not empty.hands.any() and empty.face.shape == (70, 3)


# -- the backend on random-weight graphs --------------------------------------------------------------

def test_random_graphs_have_the_published_files_inputs_and_outputs(weights):
    import onnx

    def io(path):
        graph = onnx.load(str(path)).graph
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else None
                                                        for d in v.type.tensor_type.shape.dim])
                for v in [*graph.input, *graph.output]]

    f32 = onnx.TensorProto.FLOAT
    assert io(weights / "dwpose/yolox_l.onnx") == [("images", f32, [1, 3, 640, 640]), ("output", f32, [1, 8400, 85])]
    assert io(weights / "dwpose/dw-ll_ucoco_384.onnx") == [
        ("input", f32, [None, 3, 384, 288]), ("simcc_x", f32, [None, 133, 576]), ("simcc_y", f32, [None, 133, 768])]


def test_backend_on_random_weights_gives_the_contract_in_the_picture(weights):
    frame = data.astronaut()
    pose_model = dw.DWPosePose(weights, hands=True, face=True, device="cpu", joint_threshold=0.2)
    runs = []
    run = pose_model.model.run
    pose_model.model.run = lambda names, feed: runs.append(feed["input"].shape) or run(names, feed)  # counts runs
    pose = pose_model.pose(frame)
    assert runs == [(2, 3, 384, 288)]  # the random detector's two persons, in one run
    assert pose.body.shape == (18, 3) and pose.hands.shape == (2, 21, 3) and pose.face.shape == (70, 3)
    assert pose.body.dtype == pose.hands.dtype == pose.face.dtype == np.float32
    stored = 0
    for points in (pose.body, pose.hands.reshape(-1, 3), pose.face):
        found = points[points[:, 2] > 0]
        stored += len(found)
        assert np.all(found[:, :2] >= 0) and np.all(found[:, 0] < frame.shape[1]) and np.all(found[:, 1] < frame.shape[0])
        assert np.all(found[:, 2] >= 0.2)
        assert np.all(points[points[:, 2] == 0] == 0)
    assert stored > 0
    assert np.all(pose.face[68:] == 0)
    bare = dw.DWPosePose(weights, hands=False, face=False, device="cpu").pose(frame)
    assert bare.hands is None and bare.face is None
    np.testing.assert_array_equal(bare.body[bare.body[:, 2] >= 0.2], pose.body[pose.body[:, 2] >= 0.2])

    # The detector sees the frame as BGR (a red RGB frame is red in its last channel), the pose
    # model as RGB, normalised with the RGB mean: each as it was trained (mmdet's YOLOX config has no
    # colour conversion; mmpose's data preprocessor for dw-ll_ucoco_384 turns BGR into RGB).
    seen = {}

    def spy(run, key):
        def spied(names, feed):
            seen.setdefault(key, feed[key])
            return run(names, feed)
        return spied

    pose_model.detector.run = spy(pose_model.detector.run, "images")
    pose_model.model.run = spy(pose_model.model.run, "input")
    red = np.zeros((96, 128, 3), np.uint8)
    red[..., 0] = 255
    pose_model.pose(red)
    np.testing.assert_array_equal(seen["images"][0, :, 0, 0], [0, 0, 255])  # inside the letterboxed frame
    np.testing.assert_allclose(seen["input"][0, :, 192, 144], (np.array([255, 0, 0]) - dw.MEAN) / dw.STD, rtol=1e-5)


def test_missing_or_wrong_graphs_are_named(weights, tmp_path):
    with pytest.raises(WeightsError, match="--weights"):
        dw.DWPosePose(None, device="cpu")
    (tmp_path / "dwpose").mkdir()
    detector = (weights / dw.DWPOSE_FILES["detector"]).read_bytes()
    (tmp_path / dw.DWPOSE_FILES["detector"]).write_bytes(detector)
    with pytest.raises(WeightsError, match="dwpose/dw-ll_ucoco_384.onnx") as info:
        dw.DWPosePose(tmp_path, device="cpu")
    assert "yolox_l" not in str(info.value)
    (tmp_path / dw.DWPOSE_FILES["pose"]).write_bytes(detector)  # the detector in the pose model's place
    with pytest.raises(WeightsError, match=r"dw-ll_ucoco_384\.onnx is not DWPose's whole-body pose model") as info:
        dw.DWPosePose(tmp_path, device="cpu")
    assert "'simcc_x'" in str(info.value) and "'images'" in str(info.value)
    (tmp_path / dw.DWPOSE_FILES["pose"]).write_bytes(b"not a graph")
    with pytest.raises(WeightsError, match="dw-ll_ucoco_384.onnx is not a readable ONNX graph"):
        dw.DWPosePose(tmp_path, device="cpu")


def test_cuda_without_onnxruntimes_cuda_provider_is_refused(weights):
    import onnxruntime

    from disco.pipeline.annotators import BackendError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        dw.DWPosePose(weights, device="cuda")


# -- a whole preprocess -----------------------------------------------------------------------------

def test_preprocess_with_dwpose_writes_rows_and_names_its_weights(weights, tmp_path, ray_local):
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.run import preprocess
    from disco.pipeline.store.reader import open_triplets

    folder = tmp_path / "in"
    photo = Image.fromarray(data.astronaut()).resize((128, 128))
    save(folder / "astronaut.png", photo)
    save(folder / "mirrored.png", photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    cfg = PreprocessConfig(source="images", input=folder, output=tmp_path / "out", matting="mediapipe",
                           pose="dwpose", weights=weights, device="cpu", face=True, max_side=128)
    result = preprocess(cfg, log=lambda *_: None)
    assert result.exit_code == 0 and result.manifest["counts"]["rows_written"] == 2
    backends = result.manifest["backends"]
    assert backends["pose"]["name"] == "dwpose" and backends["matting"]["name"] == "mediapipe"
    recorded = {w["name"]: w["sha256"] for w in backends["weights"]}
    for name in dw.DWPOSE_FILES.values():
        assert recorded[name] == hashlib.sha256((weights / name).read_bytes()).hexdigest()
    rows = open_triplets(tmp_path / "out").to_table().to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert len(row["body_keypoints"]) == 54 and len(row["hand_keypoints"]) == 126
        assert len(row["face_keypoints"]) == 210
        body = np.array(row["body_keypoints"]).reshape(18, 3)
        found = body[body[:, 2] > 0]
        assert np.all(found[:, :2] >= 0) and np.all(found[:, :2] < 128)


def test_a_pose_model_an_actor_cannot_load_stops_preprocess_in_one_line(weights, tmp_path, ray_local, capfd):
    """The driver sees the files (present), an actor cannot load one (damaged here; on a cluster,
    often a node that does not see the weights folder): every actor would fail the same way, so
    the run stops with that error in one line, not Ray's traceback of the actor's start."""
    import shutil

    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.run import preprocess
    from disco.pipeline.store.reader import open_triplets

    damaged = tmp_path / "weights"
    shutil.copytree(weights, damaged)
    (damaged / dw.DWPOSE_FILES["pose"]).write_bytes(b"not a graph")
    save(tmp_path / "in" / "astronaut.png", Image.fromarray(data.astronaut()).resize((64, 64)))
    cfg = PreprocessConfig(source="images", input=tmp_path / "in", output=tmp_path / "out", matting="mediapipe",
                           pose="dwpose", weights=damaged, device="cpu", max_side=64)
    with pytest.raises(ConfigError) as info:
        preprocess(cfg, log=lambda *_: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{damaged / dw.DWPOSE_FILES['pose']} is not a readable ONNX graph")
    assert "(node " in message and "every node must see the same --weights folder" in message
    assert open_triplets(tmp_path / "out").count_rows() == 0
    # Ray Data reported the actor's failed start as a Ray bug, with its whole stack, before our line.
    printed = "".join(capfd.readouterr())
    for noise in ("Traceback", "Ray Core internal code", "died during initialization", "not a readable ONNX graph"):
        assert noise not in printed, printed[:3000]
    # The driver's Ray printed the raylet's message of it ("Task ... failed ... will be retried",
    # its stack with our line), which reaches the driver when it does: its deduplicator now drops a
    # message that holds our marker (disco puts it in RAY_DEDUP_LOGS_SKIP_REGEX before Ray loads),
    # and keeps any other.
    from ray._private.ray_logging import stdout_deduplicator

    from disco.pipeline.errors import STOPS_THE_RUN

    def printed_of(message: str) -> list[str]:
        batches = stdout_deduplicator.deduplicate({"lines": [message], "pid": "raylet", "ip": "127.0.0.1"})
        return [line for batch in batches for line in batch["lines"]]

    assert printed_of(f"Task x failed.\nTraceback ...\nActorCannotStart: {STOPS_THE_RUN} damaged weights") == []
    assert printed_of("Task y failed: out of memory") == ["Task y failed: out of memory"]


def test_an_actor_whose_onnx_runtime_falls_back_to_the_cpu_stops_the_run_in_one_line(weights, monkeypatch):
    """onnxruntime-gpu that cannot load CUDA's or cuDNN's libraries on a node falls back to the
    CPU by itself. In a pose actor that is every actor of the node: the run stops in one line
    naming the node and what to install (a Ray traceback of the actor's start before), and the
    message no longer points at a log the driver never shows."""
    import onnxruntime

    from disco.pipeline.actors import ActorCannotStart, _annotator
    from disco.pipeline.errors import STOPS_THE_RUN, stopping_error

    # What onnxruntime-gpu reports before a session, on a node without the libraries: the CUDA
    # provider is there; the session made with it runs on the CPU (this CPU build does the same).
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    settings = {"matting": "mediapipe", "pose": "dwpose", "hands": True, "min_visibility": 0.5,
                "min_mask_area": 0.01, "joint_threshold": 0.2, "backend_modules": {},
                "backend_options": {"device": "cuda", "weights": str(weights)}}
    with pytest.raises(ActorCannotStart) as info:
        _annotator(settings, ("pose",))
    message = str(info.value)
    assert message.startswith(STOPS_THE_RUN) and "CUDA provider did not load" in message
    assert "onnxruntime-gpu needs the CUDA and cuDNN major versions it was built for" in message
    assert "log above" not in message
    assert str(stopping_error(info.value)).endswith(")") and "(node " in message


def test_sessions_take_the_threads_the_process_has(weights, monkeypatch):
    """ONNX Runtime ignores OMP_NUM_THREADS and starts a thread per physical core for each session:
    in the pipeline's actors (OMP_NUM_THREADS=1, an actor per CPU) DWPose's two sessions took a
    node's every core each. They take the process's thread count where it is set, the default
    (a thread per core) where it is not."""
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    def threads() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    dw.DWPosePose(weights, device="cpu")  # the first session starts ONNX Runtime's environment
    before = threads()
    pose = dw.DWPosePose(weights, device="cpu")
    assert threads() == before  # no pool thread started (the default starts one per core but one, per session)
    for session in (pose.detector, pose.model):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    pose.pose(np.zeros((96, 64, 3), np.uint8))  # and runs so
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert dw.session_options().intra_op_num_threads == 0  # ONNX Runtime's default


def test_a_person_the_detector_misses_is_posed_in_the_whole_frame(weights):
    """The matting kept the frame because it holds a person; where YOLOX finds nobody (a close-up,
    a dancer cut by the frame's edge), the whole frame is the person's box, as DWPose's own
    annotator and rtmlib do: the row gets a skeleton, not a blank pose picture."""
    frame = data.astronaut()
    pose_model = dw.DWPosePose(weights, hands=False, face=False, device="cpu", joint_threshold=0.0)
    crops = []
    run = pose_model.model.run
    pose_model.model.run = lambda names, feed: crops.append(feed["input"]) or run(names, feed)
    pose_model.detect = lambda bgr: (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    pose = pose_model.pose(frame)
    assert len(crops) == 1 and crops[0].shape == (1, 3, 384, 288)
    centre, scale = dw.box_to_crop(np.array([0, 0, frame.shape[1], frame.shape[0]], np.float32))
    np.testing.assert_allclose(crops[0][0], dw.crop(frame, centre, scale))
    assert (pose.body[:, 2] > 0).any()
