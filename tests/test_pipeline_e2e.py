"""The whole job on a local 2-CPU Ray instance, on real photographs of people."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from disco.cli import app
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError
from disco.pipeline.demo_data import pan_zoom_frames, write_video
from disco.pipeline.store.encode import decode_picture
from disco.pipeline.annotators.keypoints import BODY18_NAMES
from disco.pipeline.store.reader import open_errors, open_triplets
from disco.pipeline.run import preprocess
from disco.pipeline.store.schema import ERROR_SCHEMA, TRIPLET_SCHEMA
from helpers import cli_process, save

pytestmark = pytest.mark.usefixtures("ray_local")
J = {name: i for i, name in enumerate(BODY18_NAMES)}


def _run(tmp_path: Path, source: str, folder: Path, name: str = "out", **options):
    cfg = PreprocessConfig(source=source, input=folder, output=tmp_path / name, **options)
    return preprocess(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def astronaut_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("astronaut")
    folder = root / "in"
    save(folder / "astronaut.png", Image.fromarray(data.astronaut()))
    save(folder / "coffee.png", Image.fromarray(data.coffee()))
    save(folder / "cat.png", Image.fromarray(data.chelsea()))
    result = _run(root, "images", folder)
    return root / "out", result


def test_astronaut_gives_one_person_with_a_plausible_mask_and_upright_skeleton(astronaut_run):
    out, result = astronaut_run
    assert result.exit_code == 0
    table = open_triplets(out).to_table()
    assert table.schema.equals(TRIPLET_SCHEMA)
    assert pq.read_schema(next((out / "triplets").glob("*.parquet"))).equals(TRIPLET_SCHEMA)
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["sample_id"] == "images/astronaut/000000" and row["clip_id"] == "astronaut"
    assert row["frame_index"] == 0 and row["timestamp_s"] is None and row["split"] == "train"
    assert (row["width"], row["height"]) == (512, 512)
    assert 0.2 < row["mask_area"] < 0.7
    assert row["person_count"] == 1 and row["person_score"] > 0.9
    body = np.array(row["body_keypoints"]).reshape(18, 3)
    hips = [body[J["r_hip"]], body[J["l_hip"]]]
    present_hips = [h for h in hips if h[2] > 0]
    assert body[J["nose"], 2] > 0 and body[J["neck"], 2] > 0 and present_hips
    assert body[J["nose"], 1] < body[J["neck"], 1] < min(h[1] for h in present_hips)
    # The person's right shoulder is on the left of the picture (she faces the camera).
    assert body[J["r_shoulder"], 0] < body[J["l_shoulder"], 0]
    # Every stored picture decodes at the row's size; fg and bg split the frame along the mask.
    image = decode_picture(row["image"])
    mask = decode_picture(row["mask"], grayscale=True)
    fg, bg = decode_picture(row["foreground"]), decode_picture(row["background"])
    pose = decode_picture(row["pose"])
    for picture in (image, mask, fg, bg, pose):
        assert picture.shape[:2] == (512, 512)
    person = mask >= 128
    assert np.isclose(person.mean(), row["mask_area"], atol=1e-6)
    # Zero outside their part, up to JPEG ringing along the edge; the frame's pixels inside it.
    assert fg[~person].mean() < 1.5 and bg[person].mean() < 1.5
    inner = np.abs(fg.astype(int) - image.astype(int))[person].mean()
    assert inner < 4
    assert pose.any()


def test_pictures_without_people_are_counted_not_written(astronaut_run):
    out, result = astronaut_run
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["inputs"] == 3 and counts["inputs_done"] == 3
    assert counts["rows_written"] == 1
    assert counts["rows_skipped"] == {"no_person": 2}
    assert counts["errors"] == 0


def test_a_person_below_the_area_threshold_is_counted_as_too_small(tmp_path):
    folder = tmp_path / "in"
    save(folder / "astronaut.png", Image.fromarray(data.astronaut()))
    result = _run(tmp_path, "images", folder, min_mask_area=0.9)  # she covers about half the photo
    assert result.manifest["counts"]["rows_written"] == 0
    assert result.manifest["counts"]["rows_skipped"] == {"too_small": 1}
    # The driver's idle pause lives in each run's own Ray Data context, not in the process's.
    from ray.data import DataContext

    from disco.pipeline.ray_idle import idle_pause_callback

    assert idle_pause_callback() not in DataContext.get_current().custom_execution_callback_classes


def test_the_idle_pause_rests_only_after_a_step_spent_polling(monkeypatch):
    import time

    from disco.pipeline import ray_idle

    real_sleep, rests = time.sleep, []
    pause = ray_idle.IdlePause()
    pause.step()
    monkeypatch.setattr(ray_idle.time, "sleep", rests.append)
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:  # a step of the loop that found nothing to wait for
        pass
    pause.step()
    assert rests == [ray_idle.IDLE_PAUSE_S]
    real_sleep(0.05)  # a step that blocked on a task: no CPU spent
    pause.step()
    assert rests == [ray_idle.IDLE_PAUSE_S]


def test_manifest_records_what_ran(astronaut_run):
    out, _ = astronaut_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backends"]["matting"]["name"] == "mediapipe"
    assert "auto" in manifest["backends"]["reason"]
    weights = manifest["backends"]["weights"]
    assert any(w["name"].endswith("pose_landmark_full.tflite") and len(w["sha256"]) == 64 for w in weights)
    assert manifest["encoding"]["mask"] == "png" and manifest["encoding"]["image"] == "jpeg"
    shard = manifest["shards"][0]
    assert shard["rows"] == 1 and shard["bytes"] == (out / shard["path"]).stat().st_size
    assert manifest["packages"]["mediapipe"] == "0.10.14"
    assert manifest["run"]["frames_processed"] == 3


def test_resuming_with_different_options_is_refused(astronaut_run):
    out, _ = astronaut_run
    before = sorted(p.name for p in (out / "triplets").iterdir())
    cfg = PreprocessConfig(source="images", input=out.parent / "in", output=out, fps=12)
    with pytest.raises(ConfigError, match="fps"):
        preprocess(cfg, log=lambda *_: None)
    assert sorted(p.name for p in (out / "triplets").iterdir()) == before


def test_an_empty_folder_exits_1(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no pictures here")
    result = _run(tmp_path, "images", tmp_path / "in")
    assert result.exit_code == 1
    assert result.manifest["counts"]["inputs"] == 0 and result.manifest["counts"]["ignored_files"] == 1


def test_inspect_prints_counts_and_writes_a_contact_sheet(astronaut_run, tmp_path):
    out, _ = astronaut_run
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(app, ["inspect", str(out), "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    assert "rows written" in result.output and "body_keypoints" in result.output
    # The command that wrote the output, whole on its line (rich cut it at 80 columns in a log):
    # a copy whose manifest names a command as long as a user's (this one is the test runner's).
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["command"] = f"disco-cli preprocess --source images --input {out.parent / 'in'} --output {out} --max-side 512"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    header = f"{copy}  written by: {manifest['command']}"
    said = CliRunner().invoke(app, ["inspect", str(copy)])
    assert said.exit_code == 0 and len(header) > 80 and header in said.output.splitlines(), said.output[:600]
    picture = np.asarray(Image.open(sheet))
    assert picture.shape[1] == 5 * 160 and picture.shape[0] > 160
    assert picture[:, 160:320].mean() > 20  # the mask column holds a white person
    # A sheet that cannot be written is one line before the summary (it was a traceback after it).
    (tmp_path / "plain").write_text("mine")
    (tmp_path / "isdir.png").mkdir()
    # A photo of the data the output was made from is no place for it either (it was overwritten).
    source = out.parent / "in" / "astronaut.png"
    for bad, words in ((tmp_path / "sheet.mp4", "give a .png"), (tmp_path / "plain" / "s.png", "cannot be written"),
                       (tmp_path / "isdir.png", "is a folder"), (source, "is a file of the input folder")):
        refused = CliRunner().invoke(app, ["inspect", str(out), "--sheet", str(bad)])
        assert refused.exit_code == 2 and words in refused.output and len(refused.output.strip().splitlines()) == 1
    assert np.asarray(Image.open(source)).shape == data.astronaut().shape
    # The report is one stream: `inspect OUT > report.txt` kept the schema and lost the summary.
    assert "rows written" in said.stdout and "triplet schema" in said.stdout, said.stdout[:600]


def test_video_is_resampled_and_split_into_segments(tmp_path):
    clip = write_video(tmp_path / "in" / "dance.mp4", pan_zoom_frames(data.astronaut(), 45, 160), 30.0)
    result = _run(tmp_path, "video", clip.parent, fps=10, segment_frames=4, shard_rows=6)
    assert result.exit_code == 0
    table = open_triplets(tmp_path / "out").to_table().sort_by("frame_index")
    assert table.column("frame_index").to_pylist() == list(range(15))
    np.testing.assert_allclose(table.column("timestamp_s").to_pylist(), [k / 10 for k in range(15)], atol=1e-3)
    assert set(table.column("clip_id").to_pylist()) == {"dance"}
    assert len(set(table.column("sample_id").to_pylist())) == 15
    assert max(s["rows"] for s in result.manifest["shards"]) <= 6
    assert result.manifest["counts"]["frames"] == 15
    # `inspect` reports how steady the clip's masks and skeletons are, named by their backends.
    report = CliRunner().invoke(app, ["inspect", str(tmp_path / "out"), "--sheet", str(tmp_path / "sheet.png")])
    assert report.exit_code == 0, report.output
    assert "temporal quality (14 pairs of consecutive frames, 1 clips)" in report.output
    iou, jitter = (float(re.search(rf"{name}\s+│\s+mediapipe\s+│\s+([0-9.]+)", report.output).group(1))
                   for name in ("mask flicker", "pose jitter"))
    # The camera pans and zooms over a still photo: masks overlap strongly and joints move a little.
    assert 0.5 < iou < 1.0 and 0.0 < jitter < 0.2, report.output


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Every kind of bad still from the issue, beside one good photo; returns name -> error type."""
    save(folder / "good.png", Image.fromarray(data.astronaut()))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not a picture")
    save(folder / "dot.png", Image.new("RGB", (1, 1)))
    save(folder / "huge.png", Image.new("1", (20000, 20000)))
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:4000])
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    return {"empty.png": "empty_file", "notes.png": "not_an_image", "dot.png": "image_too_small",
            "huge.png": "image_too_large", "cut.jpg": "truncated_image", "photo.heic": "unsupported_format"}


def test_bad_stills_become_error_rows_and_good_ones_still_land(tmp_path):
    expected = _bad_inputs(tmp_path / "in")
    result = _run(tmp_path, "images", tmp_path / "in")
    assert result.exit_code == 0
    errors = open_errors(tmp_path / "out").to_table()
    assert errors.schema.equals(ERROR_SCHEMA)
    got = dict(zip(errors.column("input_path").to_pylist(), errors.column("error_type").to_pylist()))
    assert got == expected
    assert set(pc.unique(errors.column("stage")).to_pylist()) <= {"decode", "list"}
    assert open_triplets(tmp_path / "out").to_table().column("input_path").to_pylist() == ["good.png"]
    assert result.manifest["counts"]["inputs_failed"] == len(expected)


def test_bad_videos_become_error_rows_and_all_bad_exits_1(tmp_path):
    folder = tmp_path / "in"
    clip = write_video(folder / "ok.mp4", pan_zoom_frames(data.astronaut(), 6, 128), 30.0)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    (folder / "cut.mp4").write_bytes(clip.read_bytes()[:3000])
    result = _run(tmp_path, "video", folder)
    assert result.exit_code == 0
    errors = open_errors(tmp_path / "out").to_table()
    got = dict(zip(errors.column("input_path").to_pylist(), errors.column("error_type").to_pylist()))
    assert got == {"empty.mp4": "empty_file", "noise.mp4": "corrupt_video", "cut.mp4": "corrupt_video"}
    assert open_triplets(tmp_path / "out").count_rows() == 6
    clip.unlink()
    assert _run(tmp_path, "video", folder, name="all_bad").exit_code == 1


def test_usage_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["preprocess", "--source", "images", "--input", str(tmp_path / "nope"),
                                  "--output", str(tmp_path / "o")])
    unknown = runner.invoke(app, ["preprocess", "--source", "youtube", "--input", str(tmp_path),
                                  "--output", str(tmp_path / "o")])
    # A fraction given as a percentage rejected every frame as too small, without a word.
    percent = runner.invoke(app, ["preprocess", "--source", "images", "--input", str(tmp_path), "--min-mask-area", "2",
                                  "--output", str(tmp_path / "o")])
    for result, words in ((missing, "does not exist"), (unknown, "unknown source"),
                          (percent, "--min-mask-area must be between 0 and 1, not 2")):
        assert result.exit_code == 2
        assert words in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_the_parsers_own_usage_errors_are_one_line_too(tmp_path):
    """What typer and click reject before a command runs (a choice not offered, a value out of
    range, a missing or unknown option, an unknown command) reads like the commands' own errors:
    one line, exit 2, the option named, and where to look."""
    runner = CliRunner()
    base = ["preprocess", "--source", "video", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    cases = [
        (base + ["--image-format", "gif"], "unknown image format 'gif' (--image-format); choose one of jpeg, png"),
        (base + ["--matting", "sam9"], "unknown matting backend 'sam9' (--matting); choose one of auto, mediapipe"),
        (base + ["--jpeg-quality", "0"], "--jpeg-quality"),
        (base + ["--bogus", "1"], "No such option: --bogus"),
        (["preprocess", "--source", "video", "--output", str(tmp_path / "o")], "Missing option '--input'"),
        (["train", "--mixed-precision", "fp8"], "unknown mixed precision 'fp8' (--mixed-precision)"),
        (["warp"], "No such command 'warp'"),
    ]
    for args, words in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "--help" in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()
    bare = runner.invoke(app, [])  # no arguments: the help, and no error line under it
    assert bare.exit_code == 2 and "Usage" in bare.output and "error" not in bare.output


def _table_by_id(out: Path):
    return open_triplets(out).to_table().sort_by("sample_id")


def test_resume_after_a_kill_gives_exactly_the_rows_of_an_uninterrupted_run(tmp_path):
    folder = tmp_path / "in"
    write_video(folder / "long.mp4", pan_zoom_frames(data.astronaut(), 96, 160), 30.0)
    for name in ("astronaut", "camera"):
        save(folder / f"{name}.png", Image.fromarray(getattr(data, name)()))
    # Two actors whatever the machine's cores: a call of 2 units each, so the kill lands mid-run.
    options = ["--segment-frames", "8", "--shard-rows", "8", "--actors", "2", "--no-progress"]
    reference = _run(tmp_path, "video", folder, name="ref", segment_frames=8, shard_rows=8)
    assert reference.exit_code == 0

    out = tmp_path / "killed"
    command, env = cli_process("preprocess", "--source", "video", "--input", str(folder), "--output", str(out),
                               *options)
    proc = subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "_journal.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count('"commit"') >= 2:
            break
        time.sleep(0.02)
    # A second run on the same output meanwhile is refused, in one line, touching nothing.
    busy = CliRunner().invoke(app, ["preprocess", "--source", "video", "--input", str(folder), "--output", str(out),
                                    *options])
    assert busy.exit_code == 2, busy.output
    assert "being written by another run" in busy.output.strip().splitlines()[-1]
    assert "Traceback" not in busy.output
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    commits_at_kill = journal.read_text().count('"commit"')
    total_units = 14  # 96 frames in segments of 8, and the two stills
    assert 2 <= commits_at_kill < total_units, "the kill came too late to interrupt anything"

    # Resumed in this process (on the session's Ray instance): the kill above was the real one.
    # This run is stopped the way `ray job stop`, Slurm and Kubernetes stop a job, with a SIGTERM:
    # as Ctrl-C, it keeps its commits and writes the manifest (Ray's handler exited with 15).
    assert commits_at_kill + 2 < total_units, "the kill came too late to leave units for the SIGTERM"
    with _signal_when_committed(journal, commits_at_kill + 2, signal.SIGTERM):
        stopped = CliRunner().invoke(app, command[3:])
    assert stopped.exit_code == 130, stopped.output[-2000:]
    assert "interrupted: what the actors committed is kept" in stopped.output and "resuming" in stopped.output
    stopped_run = json.loads((out / "manifest.json").read_text())["run"]
    assert stopped_run["interrupted"] is True
    # What it committed before the stop is its count (it said 0 frames, the count kept to the end).
    assert stopped_run["frames_processed"] >= 2 and stopped_run["frames_per_s"] > 0, stopped_run
    assert f"{stopped_run['frames_processed']} frames in" in stopped.output, stopped.output[-2000:]
    assert journal.read_text().count('"commit"') < total_units, "the SIGTERM came too late to interrupt anything"
    resumed = CliRunner().invoke(app, command[3:])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert "resuming" in resumed.output
    got, want = _table_by_id(out), _table_by_id(tmp_path / "ref")
    assert got.num_rows == want.num_rows == 96
    assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
    for name in TRIPLET_SCHEMA.names:
        assert got.column(name).equals(want.column(name)), name
    assert not list(out.rglob("*.tmp"))
    # A third run finds nothing left to do and duplicates nothing.
    again = CliRunner().invoke(app, command[3:])
    assert again.exit_code == 0, again.output[-2000:]
    assert _table_by_id(out).num_rows == 96


@contextlib.contextmanager
def _signal_when_committed(journal: Path, commits: int, signum: int):
    """Within the block, a thread sends this process ``signum`` once ``journal`` holds ``commits``
    commits; it stops watching when the block ends, signalled or not."""
    done = threading.Event()

    def watch():
        while not done.wait(0.02):
            if journal.exists() and journal.read_text().count('"commit"') >= commits:
                os.kill(os.getpid(), signum)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_a_backend_declared_in_one_file_runs_through_preprocess(tmp_path, ray_local):
    """tests/annotator_plugin.py declares a matting backend; nothing else names it. It becomes a
    choice of --matting (never of --pose, never picked by auto), and a `preprocess` on Ray's actors
    (which import it themselves) stores its masks beside MediaPipe's poses."""
    import annotator_plugin  # noqa: F401 - the declaration

    from disco.pipeline.annotators import registry

    try:
        _run_the_plugin(tmp_path)
    finally:
        registry.unregister("centre-box")  # the tests after this one see the built-in backends only


def _run_the_plugin(tmp_path):
    from disco.pipeline.annotators import FrameAnnotator, registry, resolve_backends

    assert "centre-box" in registry.choices("matting") and "centre-box" not in registry.choices("pose")
    assert resolve_backends("auto", "auto")["matting"] == "mediapipe"
    assert "centre-box" in registry.describe_choices("matting")  # the CLI's help (entry-point plugins)
    local = FrameAnnotator("centre-box", "none", hands=False, min_visibility=0.5, min_mask_area=0.01)
    local.begin_unit({"kind": "video"})
    local.begin_unit({"kind": "image"})
    assert local.matting.units == [True, False]

    folder = tmp_path / "in"
    save(folder / "astronaut.png", Image.fromarray(data.astronaut()).resize((128, 128)))
    write_video(folder / "clip.mp4", pan_zoom_frames(data.astronaut(), 4, 96), 30.0)
    result = _run(tmp_path, "video", folder / "clip.mp4", matting="centre-box", pose="mediapipe")
    assert result.exit_code == 0
    images = _run(tmp_path, "images", folder, name="stills", matting="centre-box", pose="mediapipe")
    assert images.exit_code == 0 and images.manifest["backends"]["matting"]["name"] == "centre-box"
    rows = open_triplets(tmp_path / "out").to_table().to_pylist() + open_triplets(tmp_path / "stills").to_table().to_pylist()
    assert len(rows) == 5
    for row in rows:
        mask = decode_picture(row["mask"], grayscale=True) >= 128
        side = row["height"] // 4, row["width"] // 4
        assert mask[side[0]:-side[0], side[1]:-side[1]].all() and mask.mean() == pytest.approx(0.25, abs=0.02)
        assert row["body_keypoints"] is not None  # MediaPipe's pose of the same frame


def _faulty_folder(folder: Path, good: tuple[str, ...] = ("a", "b", "c")) -> None:
    """Good photos and ``faulty.png``, marked for the test backends (``annotator_plugin.FAULT``)."""
    import annotator_plugin

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((96, 96))).copy()
    for name in good:
        save(folder / f"{name}.png", Image.fromarray(photo))
    photo[0, 0] = annotator_plugin.FAULT
    save(folder / "faulty.png", Image.fromarray(photo))


@pytest.mark.parametrize("backend,error_type,message", [
    ("broken-device", "gpu_failed", "illegal memory access"),  # a CUDA error that breaks the context
    ("killing-input", "worker_crashed", "process ended 2 times"),  # SIGKILL: nothing Python could catch
    # Stuck in native code holding the GIL: only faulthandler's C watchdog can end it.
    ("stuck-input", "unit_timeout", "ran past --unit-timeout (6 s) 2 times"),
])
def test_an_input_that_ends_its_actors_process_is_its_errors_row_after_two_tries(tmp_path, ray_local, backend,
                                                                                  error_type, message):
    """An input that ends its actor's process does not stop the run, nor run for ever: Ray Data
    restarts the actor and hands it the same units (for ever, by default), so each unit's attempt
    leaves a strike in the output folder until it finishes; the unit that ended the process twice
    becomes its errors row without running again, and the units beside it (one actor: they share
    its calls) are written. A broken CUDA context ends the process on purpose (every later call
    would fail); a killed process (SIGKILL, as the out-of-memory killer sends) just ends."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry

    importlib.reload(annotator_plugin)  # its declarations, whatever an earlier test unregistered
    folder = tmp_path / "in"
    _faulty_folder(folder)
    try:
        result = _run(tmp_path, "images", folder, matting=backend, pose="none", actors=1, unit_timeout=6)
    finally:
        for name in ("broken-device", "centre-box", "killing-input", "stuck-input"):
            registry.unregister(name)
    assert result.exit_code == 0
    rows = open_triplets(tmp_path / "out").to_table().column("input_path").to_pylist()
    assert sorted(rows) == ["a.png", "b.png", "c.png"]
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    assert [(e["input_path"], e["error_type"]) for e in errors] == [("faulty.png", error_type)]
    assert message in errors[0]["message"] and "2 times" in errors[0]["message"]
    if backend == "stuck-input":  # where: the innermost frame of the unit's thread
        assert errors[0]["message"].endswith("in matte"), errors[0]["message"]
    assert not (tmp_path / "out" / ".strikes").exists()  # the run's strikes go with it


def _marked_frames(count: int, marked: int) -> list[np.ndarray]:
    """Photos of the astronaut; frame ``marked``'s top-left block is the plugins' FAULT colour."""
    import annotator_plugin

    frames = [frame.copy() for frame in pan_zoom_frames(data.astronaut(), count, 96)]
    frames[marked][:32, :32] = annotator_plugin.FAULT
    return frames


@pytest.mark.parametrize("source,matting,pose", [
    ("laion", "killing-input", "none"), ("tiktok", "killing-input", "none"), ("video", "killing-input", "none"),
    ("laion", "killing-gpu-input", "none"), ("laion", "centre-box", "killing-pose"),  # the GPU pipeline's two stages
    ("tiktok", "broken-device", "none"),  # a CUDA error that breaks the context: the actor exits on purpose
])
def test_a_frame_that_ends_its_actors_process_costs_that_frame_not_its_unit(tmp_path, ray_local, source, matting, pose):
    """One sample of a tar shard, one frame of a frame folder or of a video ended the actor's
    process (SIGKILL, as the out-of-memory killer or a crash in a decoder does): the whole unit
    (--segment-frames samples) ran again, died again and became one errors row, the good samples
    beside it lost. Now the unit runs again with its frames apart: the frame that ends the
    process twice more is its own errors row, and the others are written."""
    import importlib
    import tarfile

    import annotator_plugin

    from disco.pipeline.annotators import registry

    importlib.reload(annotator_plugin)
    frames = _marked_frames(5, marked=2)
    folder = tmp_path / "in"
    if source == "laion":
        folder.mkdir()
        (folder / "shards").mkdir()
        with tarfile.open(folder / "shards" / "00000.tar", "w") as tar:
            for k, frame in enumerate(frames):
                payload = io.BytesIO()
                Image.fromarray(frame).save(payload, format="PNG")
                info = tarfile.TarInfo(f"{k:09d}.png")
                info.size = payload.tell()
                payload.seek(0)
                tar.addfile(info, payload)
        ids = [f"laion/shards/00000/{k:09d}/000000" for k in range(5)]
    elif source == "tiktok":
        for k, frame in enumerate(frames):
            save(folder / "00001" / "images" / f"{k:04d}.png", Image.fromarray(frame))
        ids = [f"tiktok/00001/{k:06d}" for k in range(5)]
    else:
        write_video(folder / "dance.mp4", frames, 30.0)
        ids = [f"video/dance/{k:06d}" for k in range(5)]
    try:
        result = _run(tmp_path, source, folder if source != "video" else folder / "dance.mp4", matting=matting,
                      pose=pose, hands=False, actors=1, device="cpu")
    finally:
        for name in ("killing-input", "killing-gpu-input", "killing-pose", "centre-box", "broken-device", "dying-restart",
                     "stuck-input", "killing-writer", "killing-packer", "killing-unpacker", "out-of-memory",
                     "flaky-device", "tight-memory"):
            registry.unregister(name)
    assert result.exit_code == 0
    pools = {pool["stage"] for pool in result.manifest["run"]["pools"]}
    assert pools == ({"matting", "pose"} if "killing-" in matting + pose and matting != "killing-input" else {"annotate"})
    rows = open_triplets(tmp_path / "out").to_table(columns=["sample_id"]).column("sample_id").to_pylist()
    assert sorted(rows) == sorted(ids[:2] + ids[3:])
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    crashed = ("gpu_failed", "the GPU failed 2 times on this frame") if matting == "broken-device" else \
        ("worker_crashed", "ended 2 times while on this frame")
    assert [(e["sample_id"], e["error_type"]) for e in errors] == [(ids[2], crashed[0])], errors
    assert crashed[1] in errors[0]["message"], errors[0]["message"]
    assert not (tmp_path / "out" / ".strikes").exists()


def test_a_run_that_ray_data_fails_mid_way_writes_its_manifest_and_the_same_command_finishes(tmp_path, ray_local,
                                                                                             capfd):
    """Ray Data ended the run with an error after commits (here the actor's model does not load
    when Ray starts it again): no manifest was written, so the folder showed the earlier run's,
    or none, for rows that are there. Now the manifest counts what was committed and names the
    failure, the error still ends the command, and the same command finishes the rest."""
    import importlib

    import annotator_plugin
    import typer

    from disco.commands.preprocess import run_preprocess
    from disco.pipeline.annotators import registry

    importlib.reload(annotator_plugin)
    folder = tmp_path / "in"
    _faulty_folder(folder, good=tuple("abcdefgh"))
    os.rename(folder / "faulty.png", folder / "m-faulty.png")  # after some good ones, before others
    annotator_plugin.UNLOADABLE.unlink(missing_ok=True)
    options = dict(matting="dying-restart", pose="none", hands=False, actors=1, shard_rows=1)
    try:
        with pytest.raises(typer.Exit) as ended:  # the command's own handling (its --matting offers no plugin)
            run_preprocess(PreprocessConfig(source="images", input=folder, output=tmp_path / "out", **options),
                           show_progress=False)
        output = capfd.readouterr()
        output = output.out + output.err
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        annotator_plugin.UNLOADABLE.write_text("mended")  # the weights back
        again = _run(tmp_path, "images", folder, **options)
    finally:
        annotator_plugin.UNLOADABLE.unlink(missing_ok=True)
        for name in ("dying-restart", "centre-box", "broken-device", "killing-input", "stuck-input"):
            registry.unregister(name)
    # The summary of what was committed, then one line: the error's first line and its cause.
    # (Ray's core worker prints its notices of the actor's failed starts, tracebacks and all.)
    assert ended.value.exit_code == 1 and "preprocess summary" in output, output[-3000:]
    said = " ".join(output[output.index("error: the run failed: "):].split())
    assert said.endswith("the same command finishes the rest") and "Traceback" not in said, said
    assert "The actor died because of an error raised in its creation task" in said, said
    assert "(RuntimeError: the model's weights are gone); what the actors committed is kept" in said, said
    assert "the same command finishes the rest" in said
    assert "The actor died because of an error raised in its creation task" in manifest["run"]["failed"], manifest
    assert manifest["run"]["interrupted"] is False
    written = open_triplets(tmp_path / "out").to_table().num_rows  # (the resume's rows too now)
    assert manifest["counts"]["rows_written"] >= 1, manifest["counts"]
    assert again.exit_code == 0 and again.manifest["run"]["failed"] is None
    assert written == 9 and again.manifest["counts"]["rows_written"] == 9 and again.manifest["counts"]["errors"] == 0
    assert again.manifest["run"]["inputs_processed"] == 9 - manifest["counts"]["rows_written"]  # the rest only


def test_an_output_folder_inside_the_input_is_no_input(tmp_path, ray_local):
    """``--output`` under ``--input``: the next run listed the output's own files, a contact sheet
    that ``inspect --sheet`` wrote there became a training input (a row wherever it shows a
    person). A folder that holds a disco output's journal is not listed, for every source."""
    folder = tmp_path / "in"
    _faulty_folder(folder, good=("a", "b"))
    (folder / "faulty.png").unlink()
    out = folder / "out"
    options = dict(pose="none", hands=False, matting="mediapipe", actors=1)
    first = preprocess(PreprocessConfig(source="images", input=folder, output=out, **options), log=lambda *_: None)
    assert first.exit_code == 0 and first.manifest["counts"]["inputs"] == 2
    for _ in range(2):  # a sheet in the output folder (again: it is no picture of the input)
        said = CliRunner().invoke(app, ["inspect", str(out), "--sheet", str(out / "sheet.png")])
        assert said.exit_code == 0, said.output
    again = preprocess(PreprocessConfig(source="images", input=folder, output=out, **options), log=lambda *_: None)
    assert again.manifest["counts"]["inputs"] == 2 and again.manifest["run"]["inputs_processed"] == 0
    assert sorted(open_triplets(out).to_table().column("input_path").to_pylist()) == ["a.png", "b.png"]
    # The output in the input folder itself: its pictures are still the inputs (the journal's
    # folder is skipped below the listed folder only).
    same = tmp_path / "same"
    _faulty_folder(same, good=("c",))
    (same / "faulty.png").unlink()
    alike = preprocess(PreprocessConfig(source="images", input=same, output=same, **options), log=lambda *_: None)
    assert alike.manifest["counts"]["inputs"] == 1, alike.manifest["counts"]
    # A data set's layout walk too: a TikTok folder whose output holds a video (its videos are
    # listed one folder down, "*/{clip}.mp4").
    tiktok = tmp_path / "tiktok"
    for k in range(2):
        save(tiktok / "00001" / "images" / f"{k:04d}.png", Image.fromarray(data.astronaut()).resize((96, 96)))
    write_video(tiktok / "out" / "generated.mp4", pan_zoom_frames(data.astronaut(), 2, 96), 30.0)
    (tiktok / "out" / "_journal.jsonl").write_text("")
    listed = preprocess(PreprocessConfig(source="tiktok", input=tiktok, output=tmp_path / "t-out", **options),
                        log=lambda *_: None)
    assert listed.manifest["counts"]["inputs"] == 1, listed.manifest["counts"]


def test_retry_errors_runs_the_failed_segment_of_a_video_whose_other_segments_wrote_rows(tmp_path):
    """A GPU that broke on the second segment of a sequence (the segments before and after it
    went to other tries of the actor) left the sequence partly written: --retry-errors gpu_failed
    took only inputs that wrote no rows, so that segment stayed an errors row for good (only
    --overwrite redid it, every segment). Now the failed segment's unit and its errors row leave
    the output, and the resume does that segment alone: each frame once, nothing else redone."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry
    from disco.pipeline.store.output import OutputStore

    importlib.reload(annotator_plugin)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((96, 96))).copy()
    folder = tmp_path / "in"
    for k in range(12):
        frame = photo.copy()
        if 4 <= k < 8:  # the second segment of 4 frames: the frames the broken GPU fails on
            frame[:16, :16] = annotator_plugin.FAULT
        save(folder / "00001" / "images" / f"{k:04d}.png", Image.fromarray(frame))
    options = dict(matting="flaky-device", pose="none", hands=False, actors=1, segment_frames=4)
    annotator_plugin.FLAKY.touch()
    try:
        first = _run(tmp_path, "tiktok", folder, **options)
        frames = sorted(open_triplets(tmp_path / "out").to_table(columns=["frame_index"]).column("frame_index").to_pylist())
        assert frames == [0, 1, 2, 3, 8, 9, 10, 11]
        errors = open_errors(tmp_path / "out").to_table().to_pylist()
        assert [e["error_type"] for e in errors] == ["gpu_failed"]
        assert _run(tmp_path, "tiktok", folder, **options).manifest["run"]["inputs_processed"] == 0  # a plain resume
        annotator_plugin.FLAKY.unlink()  # the GPU mended
        lines: list[str] = []
        cfg = PreprocessConfig(source="tiktok", input=folder, output=tmp_path / "out", retry_errors=["gpu_failed"],
                               **options)
        retried = preprocess(cfg, log=lines.append)
    finally:
        annotator_plugin.FLAKY.unlink(missing_ok=True)
        for name in ("flaky-device", "centre-box"):
            registry.unregister(name)
    assert first.exit_code == 0 and retried.exit_code == 0
    assert any(line.startswith("--retry-errors gpu_failed: 1 unit(s) that wrote no rows, of 1 input(s), run again")
               for line in lines), lines
    table = open_triplets(tmp_path / "out").to_table(columns=["frame_index", "sample_id"])
    assert sorted(table.column("frame_index").to_pylist()) == list(range(12))  # each frame once
    assert len(set(table.column("sample_id").to_pylist())) == 12
    assert open_errors(tmp_path / "out").count_rows() == 0
    assert retried.manifest["run"]["frames_processed"] == 4, retried.manifest["run"]  # that segment alone
    store = OutputStore(tmp_path / "out")
    named = {n for e in store.read_journal().entries for n in e["files"]}
    assert named == {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet")}


def test_a_partly_done_frame_folder_that_gained_frames_is_kept_as_it_was_cut(tmp_path):
    """Frame folders carry no version (size and time) as videos do: one that gained frames after
    its first segments were committed was cut into more units on resume, and units of the two
    cuttings were joined in the journal (the input never complete, or complete with frames twice).
    Its new units are not run; the input stays as it was cut, said in one line."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry
    from disco.pipeline.store.output import OutputStore

    importlib.reload(annotator_plugin)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((96, 96))).copy()
    folder, out = tmp_path / "in", tmp_path / "out"

    def frame(k: int) -> None:
        picture = photo.copy()
        if 4 <= k < 8:
            picture[:16, :16] = annotator_plugin.FAULT
        save(folder / "00001" / "images" / f"{k:04d}.png", Image.fromarray(picture))

    for k in range(12):
        frame(k)
    options = dict(matting="flaky-device", pose="none", hands=False, actors=1, segment_frames=4)
    annotator_plugin.FLAKY.touch()
    lines: list[str] = []
    try:
        _run(tmp_path, "tiktok", folder, **options)
        annotator_plugin.FLAKY.unlink()
        for k in range(12, 16):  # the folder gained a segment's frames
            frame(k)
        preprocess(PreprocessConfig(source="tiktok", input=folder, output=out, retry_errors=["gpu_failed"], **options),
                   log=lines.append)
    finally:
        annotator_plugin.FLAKY.unlink(missing_ok=True)
        for name in ("flaky-device", "centre-box"):
            registry.unregister(name)
    (units,) = OutputStore(out).read_journal().units().values()
    assert sorted(units) == [0, 2] and {u["unit_count"] for u in units.values()} == {3}
    frames = sorted(open_triplets(out).to_table(columns=["frame_index"]).column("frame_index").to_pylist())
    assert frames == [0, 1, 2, 3, 8, 9, 10, 11]
    assert any("1 partly done input(s) are now cut into another number of units" in line for line in lines), lines


def test_a_partly_done_video_that_cannot_be_read_again_keeps_its_units_and_fails_the_rest(tmp_path):
    """A partly done video (one segment taken out by --retry-errors, or a run stopped) whose file
    cannot be opened when the run comes back to it (a mount's passing fault) was planned as its
    errors unit, the input's first of one: committed, it took the place of the segment 0 that had
    written rows (those rows no longer counted) and left the input partly done for good. Now each
    segment still to do gets the error; the input is done, and once the file reads again
    --retry-errors finishes it."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry
    from disco.pipeline.store.output import OutputStore

    importlib.reload(annotator_plugin)
    frames = [frame.copy() for frame in pan_zoom_frames(data.astronaut(), 12, 96)]
    for k in range(4, 8):  # the second segment: the frames the broken GPU fails on
        frames[k][:16, :16] = annotator_plugin.FAULT
    folder, out = tmp_path / "in", tmp_path / "out"
    video = write_video(folder / "dance.mp4", frames, 12.0)
    options = dict(matting="flaky-device", pose="none", hands=False, actors=1, segment_frames=4)

    def run(**more):
        return preprocess(PreprocessConfig(source="video", input=folder, output=out, **options, **more),
                          log=lambda *_: None)

    def frame_indices() -> list[int]:
        return sorted(open_triplets(out).to_table(columns=["frame_index"]).column("frame_index").to_pylist())

    original, stat = video.read_bytes(), video.stat()
    annotator_plugin.FLAKY.touch()
    try:
        run()
        assert frame_indices() == [0, 1, 2, 3, 8, 9, 10, 11]
        annotator_plugin.FLAKY.unlink()  # the GPU mended; but now the file does not read (same size and time)
        video.write_bytes(b"\0" * len(original))
        os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        unreadable = run(retry_errors=["gpu_failed"])
        state = OutputStore(out).read_journal()
        assert state.partial_units() == {} and "dance.mp4" in state.complete_inputs()
        units = state.units()["dance.mp4"]
        assert {k: (u["unit_count"], u["rows"], u["errors"]) for k, u in units.items()} == {
            0: (3, 4, 0), 1: (3, 0, 1), 2: (3, 4, 0)}
        assert frame_indices() == [0, 1, 2, 3, 8, 9, 10, 11]
        assert unreadable.manifest["counts"]["rows_written"] == 8 and unreadable.manifest["counts"]["inputs_pending"] == 0
        (error,) = open_errors(out).to_table().to_pylist()
        assert error["stage"] == "decode" and error["error_type"] != "gpu_failed"
        video.write_bytes(original)  # the mount is back
        os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        mended = run(retry_errors=["all"])
    finally:
        annotator_plugin.FLAKY.unlink(missing_ok=True)
        for name in ("flaky-device", "centre-box"):
            registry.unregister(name)
    assert frame_indices() == list(range(12)) and open_errors(out).count_rows() == 0
    assert mended.manifest["run"]["frames_processed"] == 4 and mended.exit_code == 0


def test_a_call_whose_shards_kill_the_writer_is_errors_rows_after_two_tries(tmp_path, ray_local):
    """A process that dies while a call's shards are written (the out-of-memory killer while a
    shard is packed) was blamed on no unit: Ray restarted the actor and ran the call again, for
    ever. The write is a strike against the call: after two, its units are errors rows
    (--retry-errors worker_crashed runs them again), and the run ends."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry

    importlib.reload(annotator_plugin)
    folder = tmp_path / "in"
    good = tuple("abcdefg")
    _faulty_folder(folder, good)  # 8 stills on one actor: calls of 2 units
    try:
        result = _run(tmp_path, "images", folder, matting="killing-writer", pose="none", actors=1)
    finally:
        for name in ("killing-writer", "centre-box", "broken-device", "killing-input", "stuck-input", "out-of-memory"):
            registry.unregister(name)
    assert [pool["units_per_call"] for pool in result.manifest["run"]["pools"]] == [2]
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    failed = {e["input_path"] for e in errors}
    assert len(errors) == 2 and "faulty.png" in failed  # the faulty unit and the one beside it in its call
    for error in errors:
        assert (error["stage"], error["error_type"]) == ("write", "worker_crashed"), error
        assert "ended 2 times while writing the shards of this unit's call (2 units)" in error["message"], error["message"]
    written = set(open_triplets(tmp_path / "out").to_table().column("input_path").to_pylist())
    assert written == {f"{name}.png" for name in good} - failed
    assert result.exit_code == 0 and result.manifest["counts"]["inputs"] == 8
    assert not (tmp_path / "out" / ".strikes").exists()


@pytest.mark.parametrize("matting,pose,stage,work", [
    ("killing-packer", "none", "matting", "packing the matted frames of this unit's call"),
    ("centre-box", "killing-unpacker", "write", "writing the shards of this unit's call"),
])
def test_a_gpu_pipeline_call_that_kills_its_actor_between_units_is_errors_rows_after_two_tries(
        tmp_path, ray_local, matting, pose, stage, work):
    """The GPU pipeline's matting actor copies a call's matted frames into its output table, and
    the pose actor unpacks them again: each its stage's peak of memory, outside every unit's
    work. A process killed there (for memory) was blamed on nothing: Ray restarted the actor and
    ran the call again, for ever. Each is a strike against the call: after two, its units are
    errors rows, the others are written, and the run ends."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry

    importlib.reload(annotator_plugin)
    folder = tmp_path / "in"
    good = tuple("abcdefg")
    _faulty_folder(folder, good)
    try:
        result = _run(tmp_path, "images", folder, matting=matting, pose=pose, device="cpu", hands=False)
    finally:
        for name in ("killing-packer", "killing-unpacker", "centre-box", "broken-device", "killing-input",
                     "stuck-input", "killing-writer", "out-of-memory", "flaky-device", "tight-memory"):
            registry.unregister(name)
    pools = {pool["stage"]: pool for pool in result.manifest["run"]["pools"]}
    assert set(pools) == {"matting", "pose"}  # the GPU pipeline
    per_call = pools["matting" if stage == "matting" else "pose"]["units_per_call"]
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    failed = {e["input_path"] for e in errors}
    assert "faulty.png" in failed and len(errors) == min(per_call, 8), (errors, pools)
    for error in errors:
        assert (error["stage"], error["error_type"]) == (stage, "worker_crashed"), error
        assert f"ended 2 times while {work}" in error["message"], error["message"]
    written = set(open_triplets(tmp_path / "out").to_table().column("input_path").to_pylist())
    assert written == {f"{name}.png" for name in good} - failed
    assert result.exit_code == 0 and result.manifest["counts"]["inputs"] == 8


def test_a_frame_out_of_gpu_memory_is_its_errors_row_and_retry_errors_names_it(tmp_path, ray_local):
    """A frame that does not fit in GPU memory (after the one-frame-at-a-time retry) is its errors
    row typed ``gpu_out_of_memory``, as --retry-errors names it (not PyTorch's class name), and
    ``--retry-errors gpu_out_of_memory`` runs that input again."""
    import importlib

    import annotator_plugin

    from disco.pipeline.annotators import registry

    importlib.reload(annotator_plugin)
    folder = tmp_path / "in"
    _faulty_folder(folder)
    lines: list[str] = []
    try:
        first = _run(tmp_path, "images", folder, matting="out-of-memory", pose="none", actors=1)
        errors = open_errors(tmp_path / "out").to_table().to_pylist()
        again = preprocess(PreprocessConfig(source="images", input=folder, output=tmp_path / "out",
                                            matting="out-of-memory", pose="none", actors=1,
                                            retry_errors=["gpu_out_of_memory"]), log=lines.append)
    finally:
        for name in ("out-of-memory", "centre-box", "broken-device", "killing-input", "stuck-input"):
            registry.unregister(name)
    assert first.exit_code == 0
    assert [(e["input_path"], e["stage"], e["error_type"]) for e in errors] == [("faulty.png", "matting",
                                                                                  "gpu_out_of_memory")]
    assert "CUDA out of memory" in errors[0]["message"]
    assert any("gpu_out_of_memory: 1 unit(s) that wrote no rows, of 1 input(s), run again (faulty.png)" in line for line in lines), lines
    assert again.manifest["run"]["inputs_processed"] == 1


def test_after_a_gpu_fault_the_actor_restarts_at_once_and_only_the_faulty_unit_is_blamed(monkeypatch, tmp_path):
    """One call of an actor holds several units; the faulty one breaks the device (and with it
    every later call in the process). Each break ends the process at once, so the units beside
    it never fail in a broken context and never take a strike; after two breaks the faulty unit
    becomes its errors row without running, and the others are written."""
    import secrets

    from disco.pipeline import device_loss, strikes
    from disco.pipeline.actors import unit_result

    class Restarted(Exception):
        pass

    def exit_(code):
        raise Restarted(code)

    monkeypatch.setattr(device_loss.os, "_exit", exit_)
    settings = {"run": f"test-{secrets.token_hex(4)}", "output": str(tmp_path)}
    units = [{"input_path": name, "unit_index": 0, "unit_count": 1} for name in ("a", "faulty", "b", "c")]
    context = {"broken": False}

    def work(unit):
        def run():
            if unit["input_path"] == "faulty":
                context["broken"] = True
            if context["broken"]:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return "written"
        return run

    def new_process():  # what a process of its own starts from: no log, nothing read
        monkeypatch.setattr(strikes._Process, "log", None)
        monkeypatch.setattr(strikes._Process, "seen", None)

    restarts = 0
    while True:  # Ray's restart of the actor: a fresh process, the same call again
        new_process()
        context["broken"] = False
        try:
            results = [unit_result(settings, unit, "pose", work(unit)) for unit in units]
            break
        except Restarted:
            restarts += 1
    new_process()  # as the next restart would read the logs
    assert all(strikes.strikes(settings, unit, "pose") == [] for unit in units if unit["input_path"] != "faulty")
    left = strikes.strikes(settings, units[1], "pose")
    assert len(left) == 2 and all(s.startswith("gpu CUDA error") for s in left), left
    # One log per process, in the run's folder of the output: the two that broke, the one that finished.
    logs = sorted(strikes.strike_folder(settings).iterdir())
    assert len(logs) == 3 and {p.parent for p in logs} == {tmp_path / ".strikes" / settings["run"]}
    assert sorted(p.read_text().splitlines()[-1].split(" ")[0] for p in logs) == ["done", "gpu", "gpu"]
    assert restarts == 2
    assert [r for r in results if r == "written"] == ["written"] * 3
    failed = results[1]
    assert failed.errors[0]["error_type"] == "gpu_failed" and "illegal memory access" in failed.errors[0]["message"]
    assert not device_loss.device_lost(RuntimeError("CUDA error: out of memory"))
    assert not device_loss.device_lost(FileNotFoundError(2, "No such file", "CUDA error.png"))


def test_an_actor_on_a_node_without_the_input_or_output_stops_the_run_in_one_line(tmp_path):
    """A node whose mount is missing would turn every unit it gets into errors rows that a resume
    counts as done: its actors refuse to start, and the driver reports that in one line out of
    whatever Ray Data wraps the actor's error in."""
    from disco.pipeline.actors import AnnotateStage, StorageNotShared
    from disco.pipeline.annotators import resolve_backends
    from disco.pipeline.errors import stopping_error
    from disco.pipeline.run import stage_settings

    folder = tmp_path / "in"
    save(folder / "a.png", Image.fromarray(data.astronaut()).resize((64, 64)))
    cfg = PreprocessConfig(source="images", input=folder, output=tmp_path / "out").validate()
    cfg.resolved = resolve_backends(cfg.matting, cfg.pose)
    (tmp_path / "out").mkdir()
    settings = stage_settings(cfg)
    assert settings["input_root"] == str(folder) and settings["output"] == str(tmp_path / "out")
    for key, what in (("input_root", "the input"), ("output", "the output folder")):
        with pytest.raises(StorageNotShared, match=f"{what} /nowhere does not exist on node") as info:
            AnnotateStage({**settings, key: "/nowhere"})
        wrapped = RuntimeError(f"ray::MapWorker(MapBatches(AnnotateStage)).__init__()\n  ...\n{type(info.value).__name__}: "
                               f"{info.value}")
        error = stopping_error(wrapped)
        assert isinstance(error, ConfigError) and str(error).startswith(f"{what} /nowhere does not exist on node")
    empty = tmp_path / "mount-point"  # an unmounted mount point: an empty folder
    empty.mkdir()
    with pytest.raises(StorageNotShared, match=f"the input {empty} is an empty folder"):
        AnnotateStage({**settings, "input_root": str(empty)})
    assert stopping_error(RuntimeError("something else")) is None


def test_the_units_become_a_dataset_while_every_cpu_is_taken(ray_local):
    """The units reach Ray Data without a task of their own: with every CPU of the instance held
    by other work (a busy cluster), building the dataset still returns at once with every unit.
    ``from_arrow`` would start a metadata task per block at 1 CPU and wait for it for ever."""
    import threading

    import ray

    from disco.pipeline.run import unit_dataset
    from disco.pipeline.store.schema import UNIT_TYPE

    @ray.remote(num_cpus=ray.cluster_resources()["CPU"])
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    try:
        assert ray.get(hog.ready.remote(), timeout=60)
        assert ray.available_resources().get("CPU", 0) == 0
        units = [{"input_path": f"clip{k}.mp4", "source": "video", "clip_id": f"clip{k}", "kind": "video",
                  "split": "train", "unit_index": k % 3, "unit_count": 3, "src_indices": [k, k + 1]}
                 for k in range(12)]
        built: list = []
        worker = threading.Thread(target=lambda: built.append(unit_dataset(units)), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert built, "building the dataset waited for a CPU"
        dataset = built[0]
        assert dataset.count() == 12 and dataset.num_blocks() == 12
        assert dataset.schema().base_schema.equals(pa.schema(list(UNIT_TYPE)))
    finally:
        ray.kill(hog)
    rows = dataset.take_all()
    assert [(r["input_path"], r["src_indices"]) for r in rows] == [(u["input_path"], u["src_indices"]) for u in units]


def test_a_unit_timeout_in_a_calls_window_names_where_the_units_thread_was(tmp_path):
    """Past --unit-timeout inside a call's window (its table packed, its shards written), the
    errors row named the first thread faulthandler listed (the window's frame is not on the stack
    to find the unit's thread by): it names the unit's thread's innermost frame."""
    from disco.pipeline import strikes

    script = tmp_path / "stuck.py"
    script.write_text(
        "import threading, time\n"
        "from disco.pipeline import strikes\n"
        "def noise():\n"
        "    while True:\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=noise, daemon=True).start()\n"
        "def packing():\n"
        "    time.sleep(60)\n"
        f"settings = {{'output': {str(tmp_path / 'out')!r}, 'run': 'r', 'unit_timeout': 1}}\n"
        "with strikes.strike_window(settings, {'input_path': 'call x', 'unit_index': 0}, 'write'):\n"
        "    packing()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # ended by the watchdog
    folder = strikes.strike_folder({"output": str(tmp_path / "out"), "run": "r"})
    (where,) = strikes._read_deaths(folder, None).values()
    assert len(where) == 1 and where[0].startswith("timeout File ") and where[0].endswith("in packing"), where
    # A window kept open until the next unit (the matting stage's table, copied on by Ray after the
    # call returns): a death after the block is the call's; one after the next unit's start is not.
    for name, after in (("returned", ""), ("next", "strikes.end(strikes.begin(settings, {'input_path': 'u', "
                                                      "'unit_index': 0}, 'matting'))\n")):
        script.write_text(
            "import os\n"
            "from disco.pipeline import strikes\n"
            f"settings = {{'output': {str(tmp_path / name)!r}, 'run': 'r', 'unit_timeout': 1}}\n"
            "with strikes.strike_window(settings, {'input_path': 'call y', 'unit_index': 0}, 'matting', until_next=True):\n"
            "    pass\n"
            f"{after}"
            "os._exit(9)\n")  # (the watchdog of the window stopped: no timeout fires)
        assert subprocess.run([sys.executable, str(script)], timeout=60).returncode == 9
        deaths = strikes._read_deaths(strikes.strike_folder({"output": str(tmp_path / name), "run": "r"}), None)
        call = strikes._key({"input_path": "call y", "unit_index": 0}, "matting")
        assert list(deaths) == ([call] if name == "returned" else []), deaths
