"""`preprocess` and `filter-humans` on miniature copies of each data set's layout, on a local
2-CPU Ray instance: row counts, clip ids, splits, rejection reasons, tar shards kept shut."""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import layouts
from disco.cli import app
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.reader import shard_files, open_errors, open_rejects, open_triplets
from disco.pipeline.run import preprocess
from disco.pipeline.store.schema import REJECT_SCHEMA, TRIPLET_SCHEMA

pytestmark = pytest.mark.usefixtures("ray_local")


def _run(source: str, root: Path, out: Path, **options):
    cfg = PreprocessConfig(source=source, input=root, output=out, pose="none", hands=False, **options)
    return preprocess(cfg, log=lambda *_: None)


def _rows(out: Path) -> dict:
    table = open_triplets(out).to_table(columns=["sample_id", "clip_id", "split", "frame_index", "timestamp_s",
                                                 "source", "input_path"])
    return {r["sample_id"]: r for r in table.to_pylist()}


def _errors(out: Path) -> list[tuple[str, str]]:
    table = open_errors(out).to_table()
    return sorted(zip(table.column("input_path").to_pylist(), table.column("error_type").to_pylist()))


def test_tiktok_frame_folders_and_videos(tmp_path):
    root = layouts.tiktok(tmp_path / "tiktok")
    (root / "00001" / "images" / "0004.png").write_text("a damaged frame")
    result = _run("tiktok", root, tmp_path / "out", fps=15, segment_frames=2)
    assert result.exit_code == 0
    rows = _rows(tmp_path / "out")
    # 6 frames at 30 fps resampled to 15 fps: frames 0, 2, 4 of each sequence, at 0, 2/30, 4/30 s;
    # 00001's third one is damaged: an error row, and the rest of the sequence goes on.
    expected = {f"tiktok/{seq}/{k:06d}" for seq in ("00001", "00002", "00013") for k in range(3)}
    assert set(rows) == expected - {"tiktok/00001/000002"}
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    assert [(e["sample_id"], e["error_type"], e["input_path"]) for e in errors] == [
        ("tiktok/00001/000002", "not_an_image", "00001/images")]
    for sid, row in rows.items():
        assert row["split"] == ("train" if row["clip_id"] == "00001" else "test")
        assert row["timestamp_s"] == pytest.approx(row["frame_index"] * 2 / 30, abs=1e-3)
    assert rows["tiktok/00001/000001"]["input_path"] == "00001/images"
    counts = result.manifest["counts"]
    assert counts["inputs"] == 4 and counts["rows_skipped"] == {"no_person": 1}  # coffee's 2 frames -> 1
    assert result.manifest["dataset"]["name"] == "tiktok" and result.manifest["dataset"]["test_clips"] == 34
    # A second run resumes with nothing left to do.
    again = _run("tiktok", root, tmp_path / "out", fps=15, segment_frames=2)
    assert again.manifest["run"]["inputs_processed"] == 0 and len(_rows(tmp_path / "out")) == 8
    # The split rule is recorded; folders of one data set split by different rules are named
    # (train and evaluate warn: a clip one holds out, the other trains on).
    from disco.pipeline.store.manifest import split_conflicts, split_rule

    assert split_rule(tmp_path / "out") == ("tiktok", "default")
    official = tmp_path / "out-official"  # as `--split-rule official` records it
    shutil.copytree(tmp_path / "out", official)
    manifest = json.loads((official / "manifest.json").read_text())
    manifest["dataset"]["split_rule_name"] = "official"
    (official / "manifest.json").write_text(json.dumps(manifest))
    assert split_conflicts([tmp_path / "out", tmp_path / "out"]) == [] and split_conflicts([root]) == []
    (line,) = split_conflicts([tmp_path / "out"], [official])
    assert line == f"tiktok data split by different rules: 'default' in {tmp_path / 'out'}; 'official' in {official}"


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    root = layouts.coco(tmp / "coco")
    return root, tmp / "out", _run("coco", root, tmp / "out")


def test_coco_rows_clip_ids_and_splits(coco_run):
    _, out, result = coco_run
    assert result.exit_code == 0
    rows = _rows(out)
    assert {sid: (r["clip_id"], r["split"], r["input_path"]) for sid, r in rows.items()} == {
        "coco/000000000001/000000": ("000000000001", "train", "train2017/000000000001.jpg"),
        "coco/000000000003/000000": ("000000000003", "train", "train2017/000000000003.jpg"),
        "coco/000000000004/000000": ("000000000004", "test", "val2017/000000000004.jpg"),
    }
    assert result.manifest["counts"]["rows_skipped"] == {"no_person": 2}


def test_filter_humans_with_coco_single_person_counts_every_rejection(coco_run, tmp_path):
    root, _, _ = coco_run
    runner = CliRunner()
    out = tmp_path / "hap"
    result = runner.invoke(app, ["filter-humans", "--source", "coco", "--input", str(root), "--output", str(out),
                                 "--coco-single-person", "--keep-rejects", "--no-progress",
                                 # the actors' resources, as preprocess takes them (filter-humans had no flag)
                                 "--actors", "1", "--cpus-per-actor", "0.5"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["cpus_per_actor"] == 0.5
    assert [(p["actors"], p["cpus_per_actor"]) for p in manifest["run"]["pools"]] == [(1, 0.5)], manifest["run"]
    # Listing keeps the three one-person images (coffee's annotation is wrong); matting turns coffee away.
    assert manifest["filtered_at_listing"] == {"not_single_person": 2}
    assert manifest["counts"]["rows_skipped"] == {"no_person": 1}
    assert sorted(_rows(out)) == ["coco/000000000001/000000", "coco/000000000004/000000"]
    rejects = open_rejects(out).to_table()
    assert rejects.schema.equals(REJECT_SCHEMA)
    assert rejects.column("sample_id").to_pylist() == ["coco/000000000002/000000"]
    assert rejects.column("reason").to_pylist() == ["no_person"]
    assert manifest["reject_shards"][0]["rows"] == 1
    assert manifest["filter"] == {"min_score": 0.5, "min_area": 0.05, "max_persons": None}
    # Pose only with --with-pose.
    assert open_triplets(out).to_table(columns=["pose"]).column("pose").null_count == 2


def test_filter_humans_on_a_triplets_folder_runs_no_model(coco_run, tmp_path, monkeypatch):
    _, source_out, _ = coco_run
    # Give the three stored rows known scores: kept, a crowd, a small person.
    copy = tmp_path / "triplets-in"
    shutil.copytree(source_out, copy)
    ids = sorted(open_triplets(copy).to_table(columns=["sample_id"]).column("sample_id").to_pylist())
    assert len(ids) == 3
    known = {ids[0]: (1, 0.3), ids[1]: (4, 0.9), ids[2]: (1, 0.1)}
    for shard in shard_files(copy, "triplets"):  # the shards the journal names, rewritten in place
        part = pq.read_table(shard)
        rows = [known[i] for i in part.column("sample_id").to_pylist()]
        for k, (name, kind) in enumerate((("person_count", pa.int32()), ("mask_area", pa.float32()))):
            part = part.set_column(part.schema.get_field_index(name), name, pa.array([r[k] for r in rows], kind))
        pq.write_table(part, shard)
    table = open_triplets(copy).to_table().sort_by("sample_id")
    # As if preprocessed with --max-side 768 --fps 25 --face (what generate draws by, not the defaults).
    source_manifest = json.loads((copy / "manifest.json").read_text())
    source_manifest["parameters"].update(max_side=768, fps=25.0, face=True)
    (copy / "manifest.json").write_text(json.dumps(source_manifest))
    import disco.pipeline.annotators as annotators

    monkeypatch.setattr(annotators, "FrameAnnotator", None)  # nothing may build a model
    out = tmp_path / "filtered"
    command = ["filter-humans", "--input", str(copy), "--output", str(out), "--min-area", "0.2",
               "--max-persons", "2", "--keep-rejects"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows_skipped"] == {"too_many_people": 1, "too_small": 1}
    assert manifest["backends"]["matting"]["name"] is None
    # The rows are the source's: how their poses were drawn (here: none, no hands) comes along.
    from disco.pipeline.store.pose import data_pose

    assert data_pose(out) == data_pose(copy) and (data_pose(out).keypoints, data_pose(out).hands) == (False, False)
    kept = open_triplets(out).to_table()
    assert kept.schema.equals(TRIPLET_SCHEMA) and kept.column("sample_id").to_pylist() == [ids[0]]
    assert kept.column("image").equals(table.slice(0, 1).column("image"))  # copied, not re-encoded
    rejects = open_rejects(out).to_table().sort_by("sample_id").to_pylist()
    assert [(r["sample_id"], r["reason"], r["person_count"]) for r in rejects] == [
        (ids[1], "too_many_people", 4), (ids[2], "too_small", 1)]
    assert [r["mask_area"] for r in rejects] == pytest.approx([0.9, 0.1])
    # Same options resume without duplicating; different ones are refused with one line.
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0 and open_triplets(out).count_rows() == 1
    refused = CliRunner().invoke(app, ["filter-humans", "--input", str(copy), "--output", str(out)])
    assert refused.exit_code == 2 and "different options" in refused.output
    # Options that choose models, sizes or splits did nothing here (rows kept split train, their
    # size): refused by name, in one line, before anything is written.
    unused = CliRunner().invoke(app, ["filter-humans", "--input", str(copy), "--output", str(tmp_path / "u"),
                                      "--split", "test", "--max-side", "64", "--coco-single-person"])
    said = " ".join(unused.output.split())
    assert unused.exit_code == 2 and "--coco-single-person, --split, --max-side: not used on a triplets folder" in said, said
    assert not (tmp_path / "u").exists()
    with monkeypatch.context() as env:  # a job's RAY_ADDRESS is no option the user gave
        env.setenv("RAY_ADDRESS", "127.0.0.1:6379")
        assert CliRunner().invoke(app, ["filter-humans", "--input", str(copy), "--output", str(tmp_path / "e"),
                                        "--shard-rows", "0"]).output.strip() == "error: --shard-rows must be positive"
    assert len(refused.output.strip().splitlines()) == 1, refused.output  # no empty progress bar under it
    # A filtered folder filtered again (and again): the pose backend is still the source's (none:
    # no keypoints to draw from); --max-side, --fps and --face come along for generate's drawing.
    twice = tmp_path / "twice"
    assert CliRunner().invoke(app, ["filter-humans", "--input", str(out), "--output", str(twice)]).exit_code == 0
    thrice = tmp_path / "thrice"
    assert CliRunner().invoke(app, ["filter-humans", "--input", str(twice), "--output", str(thrice)]).exit_code == 0
    assert data_pose(thrice) == data_pose(copy) and data_pose(thrice).keypoints is False
    # inspect names the models that made the rows, through the chain (not "matting=None pose=None").
    source_backends = json.loads((copy / "manifest.json").read_text())["backends"]
    said = CliRunner().invoke(app, ["inspect", str(thrice), "--sheet", str(tmp_path / "sheet.png")])
    assert said.exit_code == 0 and f"backends: matting={source_backends['matting']['name']} " \
        f"pose={source_backends['pose']['name']} (filtered by the stored" in " ".join(said.output.split()), said.output
    source_params = json.loads((copy / "manifest.json").read_text())["parameters"]
    assert {k: json.loads((thrice / "manifest.json").read_text())["parameters"][k]
            for k in ("max_side", "fps", "face")} == {k: source_params[k] for k in ("max_side", "fps", "face")}
    # One written before they were carried: its source's; one still being written (no manifest yet): its
    # source's too (the rows are the source's).
    old_style = json.loads((thrice / "manifest.json").read_text())
    for key in ("max_side", "fps", "face"):
        del old_style["parameters"][key]
    (thrice / "manifest.json").write_text(json.dumps({**old_style, "filtered_from": {"path": str(copy)}}))
    assert data_pose(thrice) == data_pose(copy) and (data_pose(copy).max_side, data_pose(copy).face) == (768, True)
    (twice / "manifest.json").unlink()
    assert data_pose(twice) == data_pose(out)
    # The source written again since (--overwrite gives its shards new names): the rows filtered
    # from its old shards would be kept beside its new ones (twice the rows); refused.
    shard = shard_files(copy, "triplets")[0]
    journal = (copy / "_journal.jsonl").read_text()
    shard.rename(shard.with_name("part-rebuilt-00000.parquet"))
    (copy / "_journal.jsonl").write_text(journal.replace(shard.name, "part-rebuilt-00000.parquet"))
    rebuilt = CliRunner().invoke(app, command)
    assert rebuilt.exit_code == 2 and "are gone" in rebuilt.output and "--overwrite" in rebuilt.output, rebuilt.output
    assert open_triplets(out).count_rows() == 1
    # A damaged manifest is one line, not a traceback.
    (copy / "manifest.json").write_text("{")
    damaged = CliRunner().invoke(app, command)
    assert damaged.exit_code == 2 and "manifest.json is damaged" in damaged.output and "Traceback" not in damaged.output


def test_shhq_and_deepfashion2(tmp_path):
    shhq = _run("shhq", layouts.shhq(tmp_path / "shhq"), tmp_path / "shhq-out")
    assert {s: (r["clip_id"], r["split"]) for s, r in _rows(tmp_path / "shhq-out").items()} == {
        "shhq/000001/000000": ("000001", "train")}
    assert shhq.manifest["counts"]["rows_skipped"] == {"no_person": 1} and shhq.manifest["counts"]["inputs"] == 2
    # filter-humans on the same layout, with the pose this time.
    hap = CliRunner().invoke(app, ["filter-humans", "--source", "shhq", "--input", str(tmp_path / "shhq"),
                                   "--output", str(tmp_path / "shhq-hap"), "--with-pose", "--no-progress"])
    assert hap.exit_code == 0, hap.output
    kept = open_triplets(tmp_path / "shhq-hap").to_table(columns=["sample_id", "pose", "body_keypoints"])
    assert kept.column("sample_id").to_pylist() == ["shhq/000001/000000"]
    assert kept.column("pose").null_count == 0 and max(kept.column("body_keypoints")[0].as_py()) > 0
    hap_manifest = json.loads((tmp_path / "shhq-hap" / "manifest.json").read_text())
    assert hap_manifest["counts"]["rows_skipped"] == {"no_person": 1} and not (tmp_path / "shhq-hap" / "rejects").exists()
    # What training reads of each: the first has no pose (preprocessed with --pose none), the second has.
    from disco.pipeline.store.pose import data_pose

    assert not data_pose(tmp_path / "shhq-out").keypoints and data_pose(tmp_path / "shhq-hap").keypoints
    df2 = _run("deepfashion2", layouts.deepfashion2(tmp_path / "df2"), tmp_path / "df2-out")
    assert {s: (r["clip_id"], r["split"]) for s, r in _rows(tmp_path / "df2-out").items()} == {
        "deepfashion2/000001/000000": ("000001", "train"), "deepfashion2/000002/000000": ("000002", "test")}
    assert df2.manifest["counts"]["rows_skipped"] == {"no_person": 1}
    assert df2.manifest["dataset"]["notes"] == {"missing_annotation": 2}


def test_laion_shards_are_streamed_and_no_member_escapes(tmp_path):
    root = layouts.laion(tmp_path / "laion")
    (root / "shards" / "00001.tar").write_bytes(b"not a tar" * 100)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    result = _run("laion", root, out, segment_frames=2)
    assert result.exit_code == 0
    rows = _rows(out)
    assert {s: (r["clip_id"], r["input_path"]) for s, r in rows.items()} == {
        "laion/shards/00000/000000000/000000": ("shards/00000/000000000", "shards/00000.tar"),
        "laion/p0/000000": ("p0", "local/a.png"),
    }
    assert _errors(out) == [("local/gone.png", "missing_file")] + [("shards/00000.tar", t) for t in (
        "missing_image", "unsafe_member", "unsafe_member", "unsafe_member")] + [("shards/00001.tar", "corrupt_tar")]
    messages = open_errors(out).to_table().column("message").to_pylist()
    assert any("../evil.jpg" in m for m in messages) and any("/etc/passwd" in m for m in messages)
    assert result.manifest["counts"]["rows_skipped"] == {"no_person": 2}  # coffee in the shard, rocket on disk
    # Nothing was written anywhere but the output folder.
    after = sorted(str(p) for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert after == before
    assert not Path("/tmp/disco-absolute-evil.jpg").exists() and not (root / "evil.jpg").exists()
    assert not (root / "shards" / "000000000.jpg").exists()
    # The shard grows after its units were committed (img2dataset was still writing it): a resume
    # keeps the rows and says, in its log and manifest, that they come from the earlier file.
    import io
    import tarfile

    shard = root / "shards" / "00000.tar"
    with tarfile.open(shard, "a") as tar:
        member = tarfile.TarInfo("000000009.jpg")
        member.size = len(layouts.jpeg_bytes("astronaut"))
        tar.addfile(member, io.BytesIO(layouts.jpeg_bytes("astronaut")))
    lines: list[str] = []
    again = preprocess(PreprocessConfig(source="laion", input=root, output=out, pose="none", hands=False,
                                        segment_frames=2), log=lines.append)
    assert again.manifest["changed_inputs"] == ["shards/00000.tar"] and _rows(out).keys() == rows.keys()
    assert any("1 input(s) changed since their units were committed (shards/00000.tar)" in line for line in lines)
    assert "changed_inputs" not in result.manifest
    # Partly done when it changed (its last unit's commit lost, as to a kill): the rest is not cut
    # from the new file either (its units would not fit the ones committed).
    journal = out / "_journal.jsonl"
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    last = max(u["unit_index"] for r in records for u in r.get("units", []) if u["input_path"] == "shards/00000.tar")
    for record in (r for r in records if "units" in r):
        record["units"] = [u for u in record["units"] if (u["input_path"], u["unit_index"]) != ("shards/00000.tar", last)]
    journal.write_text("".join(json.dumps(r) + "\n" for r in records))
    partly = preprocess(PreprocessConfig(source="laion", input=root, output=out, pose="none", hands=False,
                                         segment_frames=2), log=lines.append)
    assert partly.manifest["changed_inputs"] == ["shards/00000.tar"] and partly.manifest["run"]["inputs_processed"] == 0


def test_many_tar_shards_are_counted_in_ray_tasks_with_the_same_units(tmp_path, monkeypatch, ray_local, capfd):
    """Counting a shard walks every header in Python; many shards are counted in Ray tasks across
    the cluster instead of on the driver, with the same units in the same order (a resumed
    input's done units left out as before, a damaged shard its one errors unit). A task on a node
    that does not see the input stops the run in one line: its shards are not listing errors."""
    from disco.pipeline import run as run_module
    from disco.pipeline.run import plan_all
    from disco.pipeline.sources import list_source

    root = layouts.laion(tmp_path / "laion")
    for k in range(1, 5):
        shutil.copy(root / "shards" / "00000.tar", root / "shards" / f"0000{k}.tar")
    (root / "shards" / "00005.tar").write_bytes(b"not a tar" * 100)
    cfg = PreprocessConfig(source="laion", input=root, output=tmp_path / "out", pose="none", hands=False,
                           segment_frames=4).validate()
    pending = list_source(cfg, log=lambda *_: None).items
    settings, partial = {"segment_frames": 4, "fps": 30.0}, {"shards/00002.tar": [0]}
    on_driver = plan_all(pending, settings, partial, ray_from=10**9).to_pylist()
    monkeypatch.setattr(run_module, "SHARDS_PER_PLAN_TASK", 2)
    lines: list[str] = []
    on_ray = plan_all(pending, settings, partial, log=lines.append, ray_from=3).to_pylist()
    assert lines == ["counting the samples of 6 tar shards in Ray tasks"]
    # The shards' units come after the others' (the stills of the layout's Parquet file).
    assert [u["kind"] for u in on_ray] == sorted((u["kind"] for u in on_ray), key=lambda kind: kind == "tar")

    def key(unit):
        return unit["input_path"], unit["unit_index"]

    assert sorted(on_ray, key=key) == sorted(on_driver, key=key)
    # Planned a few inputs at a time, their units turned into Arrow rows a few at a time: the same.
    monkeypatch.setattr(run_module, "PLAN_CHUNK", 2)
    monkeypatch.setattr(run_module, "UNITS_PER_TABLE", 3)
    table = plan_all(pending, settings, partial, ray_from=10**9)
    assert table.to_pylist() == on_driver
    # What the pool planner reads of them: samples per unit (a still is 1), the same from the rows.
    from disco.pipeline.sources.units import unit_frames

    frames = unit_frames(table).tolist()
    assert frames == unit_frames(on_driver).tolist() and sorted(set(frames)) == [1, 2, 4]
    shards = [(u["input_path"], u["unit_index"], u.get("error_type")) for u in on_ray if u["kind"] == "tar"]
    assert shards == [("shards/00000.tar", 0, None), ("shards/00000.tar", 1, None), ("shards/00001.tar", 0, None),
                      ("shards/00001.tar", 1, None), ("shards/00002.tar", 1, None), ("shards/00003.tar", 0, None),
                      ("shards/00003.tar", 1, None), ("shards/00004.tar", 0, None), ("shards/00004.tar", 1, None),
                      ("shards/00005.tar", 0, "corrupt_tar")]
    unmounted = tmp_path / "mount-point"
    unmounted.mkdir()
    for root, state in ((unmounted, "is an empty folder (a mount point not mounted?)"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(ConfigError) as info:
            plan_all(pending, {**settings, "input_root": str(root)}, partial, ray_from=3)
        assert str(info.value).startswith(f"the input {root} {state} on node"), info.value
    # Said once: the other tasks' failures are read too (Ray prints a failure nobody read, with
    # its stack, as an "Unhandled error" when its reference goes: with the traceback that holds it).
    del info
    gc.collect()
    time.sleep(0.5)
    printed = "".join(capfd.readouterr())
    assert "Unhandled error" not in printed and "Traceback" not in printed, printed[-3000:]


def test_task_results_are_read_a_window_at_a_time_in_order(tmp_path, monkeypatch, ray_local):
    """The planning tasks' results were read one at a time, each ``ray.wait`` over every task not
    read yet: the square of the count (62,500 tasks for a million videos: about an hour of driver
    time). A window of the first ones left is watched, every ended one read at once: results in
    order whatever order the tasks end in, kept errors in their place; at another error the rest
    are cancelled and it is raised."""
    import ray

    from disco.pipeline import run as run_module

    @ray.remote(num_cpus=0.1, max_retries=0)
    def task(k: int, marker: str | None = None):
        time.sleep(0.02 * (10 - k % 10))  # the later ones of each ten end first
        if k == 4:
            raise KeyError("kept")
        if k == 13:
            raise ValueError("stops the run")
        if marker is not None:
            time.sleep(30)
            Path(marker).write_text("ran to the end")
        return k

    seen = []
    real_wait = ray.wait
    monkeypatch.setattr(ray, "wait", lambda refs, **kw: (seen.append(len(refs)), real_wait(refs, **kw))[1])
    refs = [task.remote(k) for k in range(12)]
    results = run_module._every_result(refs, keep=lambda exc: "kept" in str(exc), window=5)
    assert [r if isinstance(r, int) else "error" for r in results] == [0, 1, 2, 3, "error", *range(5, 12)]
    assert max(seen) == 5
    marker = tmp_path / "late"
    refs = [task.remote(k) for k in range(14)] + [task.remote(20, str(marker))]
    cancelled, real_cancel = [], ray.cancel
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: (cancelled.append(ref), real_cancel(ref, **kw))[1])
    started = time.monotonic()
    with pytest.raises(Exception, match="stops the run"):
        run_module._every_result(refs, keep=lambda exc: "kept" in str(exc), window=5, settle_s=2)
    # Not waiting for the 30-s task: it is cancelled. (How it then ends is Ray's: interrupted where
    # it sleeps, or, in a worker whose SIGINT handler an earlier test's task changed, not at all.)
    assert time.monotonic() - started < 20 and refs[-1] in cancelled


def test_a_new_data_set_from_a_manifest_alone(tmp_path):
    root = tmp_path / "mine"
    for name, picture in (("a1", "astronaut"), ("b2", "hopper"), ("c3", "rocket")):
        layouts.save(root / "photos" / f"{name}.jpg", layouts.photo(picture))
    manifest = tmp_path / "mine.yaml"
    manifest.write_text(
        "name: mine\ndescription: my photos\nprovenance: {homepage: https://example.org}\n"
        "layouts:\n  - {name: photos, kind: images, pattern: 'photos/{clip}.jpg'}\n"
        "splits: {rule: b2 is held out, test: [b2]}\n"
    )
    result = CliRunner().invoke(app, ["preprocess", "--manifest", str(manifest), "--input", str(root),
                                      "--output", str(tmp_path / "out"), "--pose", "none", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "out")
    assert {s: (r["source"], r["split"]) for s, r in rows.items()} == {
        "mine/a1/000000": ("mine", "train"), "mine/b2/000000": ("mine", "test")}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: mine\nlayouts: []\n")
    refused = CliRunner().invoke(app, ["preprocess", "--manifest", str(bad), "--input", str(root),
                                       "--output", str(tmp_path / "o2")])
    assert refused.exit_code == 2 and "bad.yaml" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_input_versions_are_read_by_several_threads_and_match_each_file(tmp_path, monkeypatch):
    """Each video's version (size and time, or size and its ends' digest) is read by a pool of
    threads: on NFS one stat after another kept a run of a million videos from starting for
    minutes. Every file gets its own version; one gone since the listing gets none."""
    import os
    import threading

    from disco.pipeline.run import input_versions
    from disco.pipeline.sources.generic import ends_digest, list_inputs

    folder = tmp_path / "videos"
    folder.mkdir()
    for k in range(40):
        (folder / f"v{k:02d}.mp4").write_bytes(bytes([k]) * (1000 + k))
    items = list_inputs("video", folder, "train").items
    assert len(items) == 40
    (folder / "v07.mp4").unlink()  # gone since the listing
    real_stat, threads = os.stat, set()

    def slow_stat(path, *args, **kwargs):
        if str(path).endswith(".mp4"):
            threads.add(threading.current_thread().name)
            time.sleep(0.01)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", slow_stat)
    by_time = input_versions(items)
    by_content = input_versions(items, by_content=True)
    monkeypatch.undo()
    assert len(threads) > 1 and all(name.startswith("disco-versions") for name in threads)
    names = [f"v{k:02d}.mp4" for k in range(40) if k != 7]
    assert sorted(by_time) == sorted(by_content) == names
    for name in names:
        stat = os.stat(folder / name)
        assert by_time[name] == f"{stat.st_size}-{stat.st_mtime_ns}"
        assert by_content[name] == f"{stat.st_size}-c{ends_digest(str(folder / name), stat.st_size)}"


def test_a_run_that_did_not_finish_is_named_so_by_inspect_and_filter_humans(coco_run, tmp_path):
    """A killed run's folder (its journal and shards, no manifest yet): ``inspect`` asked whether it
    was a preprocess output at all, and ``filter-humans`` wanted a --source (then, given one,
    found no inputs in it). Both say the run did not finish and that the same command finishes it."""
    _, source_out, _ = coco_run
    killed = tmp_path / "killed"
    shutil.copytree(source_out, killed)
    (killed / "manifest.json").unlink()  # what a run killed before its wind-up leaves
    for command in (["inspect", str(killed)], ["filter-humans", "--input", str(killed), "--output", str(tmp_path / "f")]):
        said = CliRunner().invoke(app, command)
        text = " ".join(said.output.split())
        assert said.exit_code == 2 and "holds a run that did not finish (its _journal.jsonl, no manifest.json): run " \
            "the same command again to finish it" in text, text
    assert not (tmp_path / "f").exists()
