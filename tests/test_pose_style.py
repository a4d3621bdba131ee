"""The pose picture's style: the official DisCo drawing (``--pose-style disco``), training poses
drawn from the stored keypoints when the run's drawing is not the data's, and generate / evaluate
drawing with the run's setting."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from disco.cli import app
from disco.model.checkpoint import pose_setting
from disco.model.conditioning import square
from disco.pipeline.annotators import Annotation
from disco.pipeline.annotators.base import Matte, Pose
from disco.pipeline.annotators.render import BODY_COLORS, BODY_LIMBS, render_pose
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.encode import build_row, decode_picture
from disco.pipeline.store.schema import TRIPLET_SCHEMA

# A fixed skeleton on a 96 x 72 picture (x, y, confidence); the right hip (8) and the left ear (17)
# are missing (confidence 0), so the limbs through them are not drawn.
SKELETON = np.array([
    (40, 14, 1), (40, 24, 1), (28, 25, 1), (22, 38, 1), (18, 50, 1), (52, 25, 1), (58, 38, 1), (63, 50, 1),
    (0, 0, 0), (33, 66, 1), (31, 84, 1), (47, 52, 1), (48, 67, 1), (50, 86, 1), (37, 11, 1), (43, 11, 1),
    (34, 13, 1), (0, 0, 0)], np.float32)
WIDTH, HEIGHT = 72, 96
HANDS = np.zeros((2, 21, 3), np.float32)
HANDS[1, :, 0], HANDS[1, :, 1], HANDS[1, :, 2] = np.linspace(5, 15, 21), np.linspace(85, 93, 21), 1
# Face points (--face): a ring around the nose, inside the centre square generate crops.
FACE = np.ones((70, 3), np.float32)
FACE[:, 0], FACE[:, 1] = 40 + 6 * np.cos(np.linspace(0, 6.28, 70)), 19 + 4 * np.sin(np.linspace(0, 6.28, 70))


def official_disco_drawing(width: int, height: int, body: np.ndarray) -> np.ndarray:
    """The official DisCo pose picture written from its description, independently of render.py:
    a black canvas; every present joint a filled circle of radius 4 in its colour; then for each
    of the 17 limbs in order whose two joints are present, a copy of the canvas gets the limb as a
    filled ellipse (semi-axes half its length and 4, rotated to the limb, at the midpoint) and the
    canvas becomes 0.4 x canvas + 0.6 x copy. The colour triples are the picture's RGB values."""
    colors = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
              [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
              [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
    limbs = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
             (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]  # 1-based, as OpenPose writes them
    canvas = np.zeros((height, width, 3), np.uint8)
    for i in range(18):
        x, y, c = body[i]
        if c > 0:
            cv2.circle(canvas, (int(x), int(y)), 4, colors[i], -1)
    for k, (a, b) in enumerate(limbs):
        (xa, ya, ca), (xb, yb, cb) = body[a - 1], body[b - 1]
        if ca <= 0 or cb <= 0:
            continue
        layer = canvas.copy()
        length = math.sqrt((xa - xb) ** 2 + (ya - yb) ** 2)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        polygon = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(layer, polygon, colors[k])
        canvas = cv2.addWeighted(canvas, 0.4, layer, 0.6, 0)
    return canvas


# -- the renderer ---------------------------------------------------------------------------------

def test_disco_style_is_the_official_drawing_pixel_for_pixel():
    drawn = render_pose(WIDTH, HEIGHT, SKELETON, style="disco")
    assert drawn.shape == (HEIGHT, WIDTH, 3) and drawn.dtype == np.uint8
    np.testing.assert_array_equal(drawn, official_disco_drawing(WIDTH, HEIGHT, SKELETON))
    # Limbs that leave the picture are clipped the same way.
    moved = SKELETON.copy()
    moved[:, 0] -= 30
    np.testing.assert_array_equal(render_pose(WIDTH, HEIGHT, moved, style="disco"),
                                  official_disco_drawing(WIDTH, HEIGHT, moved))


def test_disco_joints_first_then_limbs_blended_at_point_four_point_six():
    body = np.zeros((18, 3), np.float32)
    body[1], body[2] = (40, 20, 1), (40, 60, 1)  # neck above the right shoulder: one vertical limb
    drawn = render_pose(WIDTH, HEIGHT, body, style="disco").astype(int)
    limb, neck = BODY_COLORS[BODY_LIMBS.index((1, 2))], BODY_COLORS[1]
    # Over black the limb is 0.6 of its colour, in RGB order (the colour list is not swapped).
    assert drawn[40, 40].tolist() == [round(0.6 * c) for c in limb] == [153, 0, 0]
    # Where the limb covers the neck's circle, the joint (drawn first) is blended under it 0.4 / 0.6.
    assert drawn[22, 40].tolist() == [round(0.4 * j + 0.6 * c) for j, c in zip(neck, limb)] == [255, 34, 0]
    # Off the limb the joint keeps its full colour.
    assert drawn[20, 43].tolist() == list(neck)
    openpose = render_pose(WIDTH, HEIGHT, body).astype(int)
    assert openpose[22, 40].tolist() == list(neck)  # the openpose style draws the joints last
    # Missing joints and the limbs through them are not drawn (the right hip of SKELETON).
    drawn = render_pose(WIDTH, HEIGHT, SKELETON, style="disco")
    assert drawn[66, 33].any() and not drawn[33, 16].any() and not drawn[HEIGHT - 3:, :].any()
    assert render_pose(WIDTH, HEIGHT, np.zeros((18, 3)), style="disco").max() == 0


def test_disco_style_draws_the_body_only():
    face = np.array([[60, 90, 1], [62, 90, 1]], np.float32)
    body_only = render_pose(WIDTH, HEIGHT, SKELETON, style="disco")
    np.testing.assert_array_equal(render_pose(WIDTH, HEIGHT, SKELETON, HANDS, style="disco", face=face), body_only)
    assert not render_pose(WIDTH, HEIGHT, None, HANDS, style="disco").any()
    assert render_pose(WIDTH, HEIGHT, None, HANDS, style="openpose")[84:95, 4:17].any()  # openpose draws them
    with pytest.raises(ValueError, match="unknown pose style"):
        render_pose(WIDTH, HEIGHT, SKELETON, style="bgr")


# -- data folders ---------------------------------------------------------------------------------

def _frame(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _skeleton(i: int) -> np.ndarray:
    body = SKELETON.copy()
    body[:, :2] += np.where(body[:, 2:] > 0, i, 0)  # a little motion
    return body


def write_data(folder, *, style: str = "openpose", hands: bool = True, pose: str = "mediapipe",
               frames: int = 4, clip: str = "dance", split: str = "train", face: bool = False, **parameters):
    """A preprocessed folder of one clip, as `preprocess` writes it, with a manifest."""
    unit = {"source": "video", "clip_id": clip, "split": split, "input_path": f"{clip}.mp4"}
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    alpha[10:90, 15:60] = 255
    rows = []
    for i in range(frames):
        annotation = Annotation(Matte(alpha, 0.9, 1), Pose(_skeleton(i), HANDS if hands else None,
                                                           FACE if face else None), True)
        rows.append(build_row(unit, i, i / 10, _frame(i), annotation, image_format="png", jpeg_quality=95,
                              pose_style=style, with_pose=pose != "none"))
    (folder / "triplets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), folder / "triplets" / f"{clip}.parquet")
    # As preprocess writes it: the backends beside the parameters, one record per stage.
    manifest = {"format": "disco-triplets/1", "parameters": {"pose_style": style, "hands": hands, "pose_renderer": 2,
                                                             "face": face, **parameters},
                "backends": {"matting": {"name": "mediapipe"}, "pose": {"name": pose}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def openpose_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("openpose"))


# -- training -------------------------------------------------------------------------------------

def _stream_samples(folder, style, hands, resolution=32, seed=3):
    """The decoded samples of the training stream's first items: read and decode stages called as
    the Ray Data tasks call them."""
    from disco.train.data import SampleStream, build_index, decode_samples, read_samples
    from disco.train.data.pose import render_plan

    index = build_index([str(folder)])
    plan = render_plan([str(folder)], index.files, style, hands)
    stream = SampleStream(index, stage="finetune", ref_mode="first", resolution=resolution, augment=True,
                          seed=seed, batch=len(index), pose_render=plan)
    spec = stream.locators(0, len(index))
    blocks = list(read_samples(spec, "finetune", block=len(index), pose_render=plan))
    # The read plan counts what the read task read (the keypoints too, when it draws).
    read = sum(block.column("read_bytes")[0].as_py() for block in blocks)
    planned = stream.planned_reads(len(index))
    assert read in (planned["target_bytes"], planned["target_bytes"] + planned["footer_bytes"])  # footer: once
    decoded = [row for block in blocks for row in decode_samples(block, "finetune", resolution, True, seed,
                                                                   pose_render=plan)]
    return plan, spec, {k: np.concatenate([d[k][0] for d in decoded]) for k in ("ok", "pose", "target")}, index


def test_a_disco_run_on_openpose_data_draws_its_poses_from_the_keypoints(openpose_data):
    from disco.train.augment import apply_box, crop_box
    from disco.train.data import sample_seed

    plan, spec, out, index = _stream_samples(openpose_data, "disco", True)
    assert plan is not None and plan["style"] == "disco" and len(plan["files"]) == 1
    assert out["ok"].all()
    frames = pq.read_table(index.files[0], columns=["frame_index", "body_keypoints"]).to_pylist()
    body = {r["frame_index"]: r["body_keypoints"] for r in frames}
    positions = spec.column("position").to_numpy()
    rows = spec.column("row").to_numpy()
    for k, (position, row) in enumerate(zip(positions, rows)):
        frame = int(row)  # one shard of one row group, written in frame order
        box = crop_box(HEIGHT, WIDTH, "finetune", sample_seed(3, int(position)), True)
        drawn = render_pose(WIDTH, HEIGHT, np.asarray(body[frame]).reshape(18, 3), style="disco")
        expected = apply_box(drawn, box, 32).transpose(2, 0, 1)
        np.testing.assert_array_equal(out["pose"][k], expected)
        # The target went through the same crop.
        image = _frame(frame)
        np.testing.assert_array_equal(out["target"][k], apply_box(image, box, 32).transpose(2, 0, 1))


def test_a_run_with_the_datas_drawing_reads_the_stored_pictures(openpose_data):
    from disco.train.augment import apply_box, crop_box
    from disco.train.data import sample_seed

    plan, spec, out, index = _stream_samples(openpose_data, "openpose", True)
    assert plan is None
    stored = pq.read_table(index.files[0], columns=["pose"]).column("pose").to_pylist()
    position, row = int(spec.column("position")[0].as_py()), int(spec.column("row")[0].as_py())
    box = crop_box(HEIGHT, WIDTH, "finetune", sample_seed(3, position), True)
    np.testing.assert_array_equal(out["pose"][0], apply_box(decode_picture(stored[row]), box, 32).transpose(2, 0, 1))
    # Without hands, the openpose style is drawn again from the keypoints: no hand pixels.
    plan, _, no_hands, _ = _stream_samples(openpose_data, "openpose", False)
    assert plan is not None and plan["hands"] is False
    assert not np.array_equal(no_hands["pose"], out["pose"])


def test_the_runs_pose_setting_is_resolved_from_the_data_and_recorded(openpose_data, tmp_path):
    from disco.train.config import TrainConfig
    from disco.train.launch import resolve

    base = dict(stage="finetune", data=[str(openpose_data)], model="tiny", max_steps=2)
    cfg, _ = resolve(TrainConfig(**base, output=str(tmp_path / "a")))
    assert (cfg.pose_style, cfg.hands) == ("openpose", True)  # the data's manifest
    cfg, _ = resolve(TrainConfig(**base, output=str(tmp_path / "b"), pose_style="disco", hands=False))
    cfg.save(tmp_path / "b")
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["pose_style"] == "disco" and saved["hands"] is False
    assert pose_setting(tmp_path / "b") == ("disco", False)
    assert pose_setting(tmp_path / "b" / "checkpoint-00000002") == ("disco", False)  # a checkpoint of the run


def test_folders_that_disagree_need_a_flag(openpose_data, tmp_path):
    from disco.train.data.pose import render_plan, resolve_pose_setting

    disco = write_data(tmp_path / "disco", style="disco")
    with pytest.raises(ConfigError, match="different pose styles") as failed:
        resolve_pose_setting([str(openpose_data), str(disco)], None, None)
    assert "\n" not in str(failed.value)
    assert resolve_pose_setting([str(openpose_data), str(disco)], "disco", None) == ("disco", True)
    # Only the folders of another drawing are drawn again.
    files = [str(openpose_data / "triplets" / "dance.parquet"), str(disco / "triplets" / "dance.parquet")]
    assert render_plan([str(openpose_data), str(disco)], files, "disco", True)["files"] == files[:1]
    # A folder written before `disco` meant the official drawing (no pose_renderer recorded) holds
    # the earlier, red/blue-swapped drawing under that name: it is drawn again too.
    manifest = json.loads((disco / "manifest.json").read_text())
    del manifest["parameters"]["pose_renderer"]
    (disco / "manifest.json").write_text(json.dumps(manifest))
    assert render_plan([str(openpose_data), str(disco)], files, "disco", True)["files"] == files
    bare = write_data(tmp_path / "bare", pose="none")
    with pytest.raises(ConfigError, match="--pose none"):
        render_plan([str(bare)], [str(bare / "triplets" / "dance.parquet")], "disco", True)


def test_train_command_takes_pose_style_and_hands(openpose_data, tmp_path, monkeypatch):
    import disco.train.launch as launch

    seen = {}

    def fake_train(cfg, given=None, on_metrics=None, log=None):
        seen["cfg"], seen["given"] = cfg, given
        return {"step": 1, "loss": 0.0, "skipped_rows": 0}

    monkeypatch.setattr(launch, "train", fake_train)
    result = CliRunner().invoke(app, ["train", "--data", str(openpose_data), "--output", str(tmp_path / "run"),
                                      "--model", "tiny", "--pose-style", "disco", "--no-hands", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].pose_style, seen["cfg"].hands) == ("disco", False)
    assert {"pose_style", "hands"} <= seen["given"]
    bad = CliRunner().invoke(app, ["train", "--data", str(openpose_data), "--output", str(tmp_path / "r2"),
                                   "--model", "tiny", "--pose-style", "bgr"])
    assert bad.exit_code == 2


# -- generate and evaluate ------------------------------------------------------------------------

def _disco_run(folder):
    from disco.train.config import TrainConfig

    TrainConfig(stage="finetune", model="tiny", pose_style="disco", hands=True).save(folder)
    return folder


def test_generate_draws_a_clip_with_the_runs_style(openpose_data, tmp_path):
    from disco.generate.inputs import poses_from_triplets

    style, hands = pose_setting(_disco_run(tmp_path / "run"))
    assert (style, hands) == ("disco", True)
    poses = poses_from_triplets(openpose_data, "dance", 48, style=style, hands=hands)
    for i, picture in enumerate(poses.frames):
        np.testing.assert_array_equal(picture, square(render_pose(WIDTH, HEIGHT, _skeleton(i), style="disco"), 48))
    # The data's own drawing: the stored pictures as they are.
    stored = poses_from_triplets(openpose_data, "dance", 48, style="openpose", hands=True)
    np.testing.assert_array_equal(stored.frames[0], square(render_pose(WIDTH, HEIGHT, _skeleton(0), HANDS), 48))


def _stub_generate(tmp_path, monkeypatch):
    """``generate`` with the model and matting stubbed: a function (checkpoint, pose folder) ->
    what it fed the model (``{"poses": tensor}``) for the clip ``dance``."""
    from PIL import Image

    import disco.generate.run as run_module
    from disco.generate.config import GenerateConfig

    fed = {}

    def pipeline(reference, background, poses, **kwargs):
        fed["poses"] = poses
        return np.zeros((len(poses), 32, 32, 3), np.uint8)

    monkeypatch.setattr(run_module, "open_pipeline", lambda checkpoint, device, size, **_: (pipeline, 32, 48))
    monkeypatch.setattr(run_module, "conditions_from_reference", lambda *args, **kwargs: (None, None))
    Image.fromarray(_frame(0)).save(tmp_path / "person.png")

    def generate(checkpoint, pose):
        run_module.generate(GenerateConfig(checkpoint=checkpoint, reference=tmp_path / "person.png", pose=pose,
                                           clip="dance", output=tmp_path / "out.mp4", steps=1), log=lambda *_: None)
        return fed

    return generate


def test_generate_feeds_the_model_poses_in_the_runs_style(openpose_data, tmp_path, monkeypatch):
    """The whole ``generate`` path, with the model and matting stubbed: the pose tensor it feeds
    is the disco drawing of the clip's keypoints."""
    from disco.model.conditioning import pose_pixels

    fed = _stub_generate(tmp_path, monkeypatch)(_disco_run(tmp_path / "run"), openpose_data)
    expected = pose_pixels([render_pose(WIDTH, HEIGHT, _skeleton(i), style="disco") for i in range(4)], 48)
    assert torch.equal(fed["poses"], expected)


def test_generate_draws_video_poses_with_the_runs_setting(tmp_path):
    from disco.generate.inputs import MIN_ANNOTATE_SIDE, poses_from_video, scale_keypoints
    from disco.pipeline.demo_data import write_video

    class Annotator:  # stands in for the pipeline's annotators: the fixed skeleton, with hands
        def annotate(self, frame):
            side = frame.shape[0]
            body, hands = SKELETON.copy(), HANDS.copy()
            body[:, :2] *= side / HEIGHT
            hands[:, :, :2] *= side / HEIGHT
            return Annotation(None, Pose(body, hands), True)

    write_video(tmp_path / "v.mp4", [np.full((96, 96, 3), 100, np.uint8)] * 2, 10.0)
    disco = poses_from_video(tmp_path / "v.mp4", 96, annotator=Annotator(), style="disco", hands=True).frames[0]
    body = SKELETON.copy()
    body[:, :2] *= MIN_ANNOTATE_SIDE / HEIGHT  # found on the frame analysed at 256 px, drawn at 96 px
    np.testing.assert_array_equal(disco, render_pose(96, 96, scale_keypoints(body, 96 / MIN_ANNOTATE_SIDE), style="disco"))
    with_hands = poses_from_video(tmp_path / "v.mp4", 96, annotator=Annotator(), hands=True).frames[0]
    without = poses_from_video(tmp_path / "v.mp4", 96, annotator=Annotator(), hands=False).frames[0]
    assert with_hands[84:95, 4:17].any() and not without[84:95, 4:17].any()


def test_pictures_of_another_drawing_without_keypoints_are_refused(tmp_path):
    bare = write_data(tmp_path / "bare", pose="none")  # openpose manifest, no pose pictures, no keypoints
    run = _disco_run(tmp_path / "run")
    (tmp_path / "person.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(run), "--reference", str(tmp_path / "person.png"),
                                      "--pose", str(bare), "--clip", "dance", "--output", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "disco" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--data", str(bare), "--split", "train",
                                      "--metrics", "psnr", "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    assert "no keypoints" in result.output


def test_generate_draws_face_points_and_skeletons_as_the_model_learnt_them(openpose_data, tmp_path, monkeypatch):
    """A model trained on --face data learnt skeletons with face points, one trained without
    learnt none: generate and evaluate drew whatever the driving folder stored (or, for a video,
    never any), and the driving video's skeletons at the default stored size whatever the
    training data's --max-side. The run's data manifests now say (``trained_drawing``)."""
    import shutil

    from disco.generate.inputs import poses_from_triplets
    from disco.model.checkpoint import trained_drawing
    from disco.model.conditioning import pose_pixels
    from disco.train.config import TrainConfig

    faced = write_data(tmp_path / "faced", face=True, max_side=1024, fps=25.0)

    def run_on(folder, data):
        TrainConfig(stage="finetune", model="tiny", data=[str(data)], pose_style="openpose", hands=True).save(folder)
        return folder

    def drawn(i, face):
        return square(render_pose(WIDTH, HEIGHT, _skeleton(i), HANDS, face=FACE if face else None), 48)

    assert not np.array_equal(drawn(0, True), drawn(0, False))  # the face points show at this size
    plain, with_face = run_on(tmp_path / "plain", openpose_data), run_on(tmp_path / "with-face", faced)
    assert trained_drawing(plain).face is False
    learnt = trained_drawing(with_face)
    assert (learnt.face, learnt.max_side, learnt.fps, learnt.style, learnt.hands) == (True, 1024, 25.0, "openpose", True)
    # A clip stored with face points, for the model that never saw any: drawn again without them.
    poses = poses_from_triplets(faced, "dance", 48, style="openpose", hands=True, face=False)
    for i, picture in enumerate(poses.frames):
        np.testing.assert_array_equal(picture, drawn(i, False))
    # For the model that learnt them: the stored pictures, with them; a folder without any: its own.
    np.testing.assert_array_equal(poses_from_triplets(faced, "dance", 48, style="openpose", hands=True,
                                                      face=True).frames[0], drawn(0, True))
    np.testing.assert_array_equal(poses_from_triplets(openpose_data, "dance", 48, style="openpose", hands=True,
                                                      face=True).frames[0], drawn(0, False))
    # The whole generate path (model and matting stubbed) feeds the plain model face-less poses.
    generate = _stub_generate(tmp_path, monkeypatch)
    for run, face in ((plain, False), (with_face, True)):
        fed = generate(run, faced)
        expected = pose_pixels([render_pose(WIDTH, HEIGHT, _skeleton(i), HANDS, face=FACE if face else None)
                                for i in range(4)], 48)
        assert torch.equal(fed["poses"], expected), face
    # A checkpoint away from its data: the preprocessing defaults.
    shutil.rmtree(faced)
    assert (trained_drawing(with_face).face, trained_drawing(with_face).max_side) == (False, 512)


def test_a_folder_still_being_written_is_read_by_its_journals_options(tmp_path):
    """``manifest.json`` is written when a run ends; a training run started on a folder whose first
    run still writes (its shards are read from the journal) took the default drawing (openpose
    with hands) for a --pose-style disco folder, and drew nothing again."""
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.store.output import OutputStore
    from disco.pipeline.store.pose import CURRENT_RENDERER

    assert CURRENT_RENDERER == PreprocessConfig.pose_renderer
    from disco.pipeline.store.pose import data_pose

    folder = write_data(tmp_path / "writing", style="disco", hands=False)
    (folder / "manifest.json").unlink()
    store = OutputStore(folder)
    store.begin({"pose_style": "disco", "hands": False, "face": False, "max_side": 768, "fps": 15.0,
                 "backends": {"matting": "mediapipe", "pose": "mediapipe"}}, overwrite=True)
    got = data_pose(folder)
    assert (got.style, got.hands, got.max_side, got.fps, got.keypoints) == ("disco", False, 768, 15.0, True)
    store.begin({"pose_style": "openpose", "hands": True, "backends": {"matting": "mediapipe", "pose": "none"}},
                overwrite=True)
    assert data_pose(folder).keypoints is False
