"""Data set manifests and listing, without Ray or models: layouts, clip ids, splits, tar safety."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import layouts
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.errors import ConfigError, InputError
from disco.pipeline.sources import list_source, webdataset
from disco.pipeline.sources.dataset_manifest import builtin_manifest, builtin_names, load_manifest, parse_manifest
from disco.pipeline.store.schema import payload

SOURCES = ["coco", "deepfashion2", "laion", "shhq", "tiktok"]


def _list(source: str, root: Path, **options):
    cfg = PreprocessConfig(source=source, input=root, output=root.parent / "out", **options).validate()
    return list_source(cfg, log=lambda *_: None)


def test_every_source_has_a_packaged_manifest_with_provenance_and_a_split_rule():
    assert builtin_names() == SOURCES
    for name in SOURCES:
        manifest = builtin_manifest(name)
        assert manifest.name == name
        assert manifest.provenance.homepage.startswith("https://")
        assert len(manifest.splits.rule) > 20 and manifest.layouts


def test_tiktok_held_out_list_is_what_its_written_rule_gives():
    manifest = builtin_manifest("tiktok")
    names = [f"{i:05d}" for i in range(1, 341)]
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"disco-tiktok-heldout:{n}".encode()).hexdigest())
    assert sorted(manifest.splits.test) == sorted(ranked[:34])
    assert "sha256" in manifest.splits.rule and "34" in manifest.splits.rule


@pytest.mark.parametrize(
    "text, words",
    [
        ("name: x\n", "layouts: Field required"),
        ("[1, 2]", "must be a YAML mapping"),
        ("name: x\n  bad: [", "not valid YAML"),
        ("name: Bad Name\ndescription: d\nprovenance: {homepage: h}\nsplits: {rule: r}\n"
         "layouts: [{name: a, kind: images, pattern: '{clip}.jpg'}]\n", "name: Value error"),
        ("name: x\ndescription: d\nprovenance: {homepage: h}\nsplits: {rule: r}\n"
         "layouts: [{name: a, kind: pictures, pattern: '{clip}.jpg'}]\n", "layouts.0.kind"),
        ("name: x\ndescription: d\nprovenance: {homepage: h}\nsplits: {rule: r}\n"
         "layouts: [{name: a, kind: images, pattern: '../{clip}.jpg'}]\n", "without '..'"),
        ("name: x\ndescription: d\nprovenance: {homepage: h}\nsplits: {rule: r}\n"
         "layouts: [{name: a, kind: frames, pattern: '{clip}/*.png'}]\n", "needs fps"),
        ("name: x\ndescription: d\nprovenance: {homepage: h}\nsplits: {rule: r}\n"
         "layouts: [{name: a, kind: images, pattern: '{clip}.jpg', colour: red}]\n", "layouts.0.colour: Extra inputs"),
    ],
)
def test_a_broken_manifest_names_the_file_and_the_field(text, words):
    with pytest.raises(ConfigError) as info:
        parse_manifest(text, "my.yaml")
    assert "my.yaml" in str(info.value) and words in str(info.value)


def test_tiktok_frame_folders_and_videos_are_listed_with_the_held_out_split(tmp_path, monkeypatch):
    root = layouts.tiktok(tmp_path / "tiktok")
    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scanned.append(str(p)) or real_scandir(p))
    listing = _list("tiktok", root)
    got = {i.clip_id: (i.kind, i.input_path, i.split) for i in listing.items}
    assert got == {
        "00001": ("frames", "00001/images", "train"),
        "00002": ("frames", "00002/images", "test"),
        "00003": ("frames", "00003/images", "train"),
        "00013": ("video", "videos/00013.mp4", "test"),
    }
    frames = next(i for i in listing.items if i.clip_id == "00001").extra
    assert frames == payload(frames=[f"{k:04d}.png".encode() for k in range(6)], fps=30.0)
    # masks/ and densepose/ are never even listed.
    assert not [p for p in scanned if "masks" in p or "densepose" in p]
    assert listing.dataset["listed_by_layout"] == {"frame-folders": 3, "videos": 1}
    # --split overrides the manifest for every row.
    assert {i.split for i in _list("tiktok", root, split="test", split_from_manifest=False).items} == {"test"}


def test_tiktok_official_split_rule_is_the_official_loaders_ranges(tmp_path):
    """--split-rule official: what the official TikTok loader reads, range(1, 335) to train and
    range(335, 340) to test, so 00340 is in neither; the default rule stays ours."""
    from PIL import Image

    for seq in ("00001", "00002", "00334", "00335", "00339", "00340"):
        for k in range(2):
            layouts.save(tmp_path / "tiktok" / seq / "images" / f"{k:04d}.png", Image.new("RGB", (8, 8)))
    official = _list("tiktok", tmp_path / "tiktok", split_rule="official")
    assert {i.clip_id: i.split for i in official.items} == {
        "00001": "train", "00002": "train", "00334": "train", "00335": "test", "00339": "test"}
    assert official.filtered == {"excluded_by_split_rule": 1}
    assert official.dataset["split_rule_name"] == "official" and "00340" in official.dataset["split_rule"]
    ours = _list("tiktok", tmp_path / "tiktok")
    assert {i.clip_id: i.split for i in ours.items}["00002"] == "test" and len(ours.items) == 6
    assert ours.dataset["split_rule_name"] == "default"
    # The official rule over every public name: 334 train, 5 test, 1 left out.
    manifest = builtin_manifest("tiktok").with_split_rule("official")
    names = [f"{k:05d}" for k in range(1, 341)]
    assert [n for n in names if n in manifest.splits.test] == [f"{k:05d}" for k in range(335, 340)]
    assert manifest.splits.exclude == ["00340"]
    with pytest.raises(ConfigError, match="default, official"):
        _list("tiktok", tmp_path / "tiktok", split_rule="theirs")
    with pytest.raises(ConfigError, match="not both"):
        _list("tiktok", tmp_path / "tiktok", split_rule="official", split="test", split_from_manifest=False)
    # The rule joins the resume options only when given.
    cfg = PreprocessConfig(source="tiktok", input=tmp_path / "tiktok", output=tmp_path / "o", split_rule="official")
    assert cfg.output_params()["split_rule"] == "official"


def test_coco_splits_by_folder_and_single_person_reads_the_annotations(tmp_path):
    root = layouts.coco(tmp_path / "coco")
    listing = _list("coco", root)
    got = {i.clip_id: (i.split, i.extra["annotated_persons"]) for i in listing.items}
    assert got == {"000000000001": ("train", 1), "000000000002": ("train", 1), "000000000003": ("train", 2),
                   "000000000005": ("train", 0), "000000000004": ("test", 1)}
    single = _list("coco", root, coco_single_person=True)
    assert sorted(i.clip_id for i in single.items) == ["000000000001", "000000000002", "000000000004"]
    assert single.filtered == {"not_single_person": 2}
    # Annotations whose categories hold no person (category 1 a bicycle): no image has one person.
    import json

    annotations = root / "annotations" / "person_keypoints_train2017.json"
    data = json.loads(annotations.read_text())
    data["categories"] = [{"id": 1, "name": "bicycle"}, {"id": 17, "name": "cat"}]
    annotations.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r'^the COCO annotations \S+ have no "person" category \(they list bicycle, cat\)'):
        _list("coco", root, coco_single_person=True)
    assert {i.extra["annotated_persons"] for i in _list("coco", root).items if i.split == "train"} == {0}
    annotations.unlink()
    with pytest.raises(ConfigError, match="needs COCO annotations"):
        _list("coco", root, coco_single_person=True)


def test_shhq_and_deepfashion2_layouts(tmp_path):
    shhq = _list("shhq", layouts.shhq(tmp_path / "shhq"))
    assert [(i.clip_id, i.input_path, i.split) for i in shhq.items] == [
        ("000001", "no_segment/000001.png", "train"), ("000002", "no_segment/000002.png", "train")]
    df2 = _list("deepfashion2", layouts.deepfashion2(tmp_path / "df2"))
    got = {i.clip_id: (i.split, i.extra["has_annotation"]) for i in df2.items}
    assert got == {"000001": ("train", True), "000002": ("test", False), "000003": ("test", False)}
    assert df2.dataset["notes"] == {"missing_annotation": 2}
    # One part passed alone (image/ and annos/ directly under --input).
    alone = _list("deepfashion2", tmp_path / "df2" / "train")
    assert [(i.clip_id, i.split) for i in alone.items] == [("000001", "train")]


def test_laion_shards_are_units_and_parquet_rows_are_stills(tmp_path):
    root = layouts.laion(tmp_path / "laion")
    listing = _list("laion", root)
    got = {i.input_path: (i.kind, i.clip_id, i.error_type) for i in listing.items}
    assert got == {
        "shards/00000.tar": ("tar", "shards/00000", None),
        "local/a.png": ("image", "p0", None),
        "local/b.png": ("image", "p1", None),
        "local/gone.png": ("image", "p2", None),  # not stat-ed when listed: its actor finds it missing
    }
    # A single shard passed as --input.
    one = _list("laion", root / "shards" / "00000.tar")
    assert [(i.input_path, i.kind) for i in one.items] == [("00000.tar", "tar")]


@pytest.mark.parametrize("source", ["video", "images", "laion"])
def test_an_input_folder_given_through_a_link_lists_files_under_its_real_place(tmp_path, source):
    """--input ~/data, a link on the head to /mnt/nfs/data: the workers' storage check stats the
    real folder (which they mount), but the generic and Parquet listings named the files through
    the link (which they lack): the check passed and every unit there was a missing_file row."""
    from disco.pipeline.run import stage_settings

    if source == "laion":
        real = layouts.laion(tmp_path / "real")
    else:
        real = tmp_path / "real"
        real.mkdir()
        (real / ("a.mp4" if source == "video" else "a.png")).write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    from disco.pipeline.annotators import resolve_backends

    cfg = PreprocessConfig(source=source, input=link, output=tmp_path / "out", pose="none", hands=False).validate()
    cfg.resolved = resolve_backends(cfg.matting, cfg.pose, device="cpu")
    root = stage_settings(cfg)["input_root"]  # what every node's storage check stats
    assert root == str(real.resolve())
    items = list_source(cfg, log=lambda *_: None).items
    assert items and all(i.abs_path.startswith(root + os.sep) for i in items), [i.abs_path for i in items]


def test_img2dataset_metadata_beside_its_shards_is_not_taken_for_a_list_of_images(tmp_path):
    """img2dataset's webdataset output holds NNNNN.parquet (url, key, caption, status) and
    NNNNN_stats.json beside every NNNNN.tar: the folder lists as its shards; a Parquet file of
    that kind with no shard beside it is still refused in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = layouts.laion(tmp_path / "laion") / "shards"
    pq.write_table(pa.table({"url": ["http://example.com/a.jpg"], "key": ["000000000"], "caption": ["an astronaut"],
                             "status": ["success"]}), shards / "00000.parquet")
    (shards / "00000_stats.json").write_text('{"count": 4, "successes": 2}')
    listing = _list("laion", shards)
    assert [(i.input_path, i.kind) for i in listing.items] == [("00000.tar", "tar")]
    assert listing.dataset["notes"] == {"shard_metadata_parquet": 1}
    (shards / "00000.tar").rename(shards / "elsewhere.tar")
    with pytest.raises(ConfigError, match="00000.parquet has no column naming image paths"):
        _list("laion", shards)


def test_a_frame_name_that_is_not_utf8_travels_as_bytes_and_is_opened(tmp_path):
    """A frame folder's names go into the units as the file system's bytes: a name that is not
    UTF-8 survives the units' Arrow type and its frame is decoded like the others."""
    import numpy as np
    from PIL import Image

    from disco.pipeline.sources.generic import InputItem
    from disco.pipeline.sources.units import decode_unit, plan_units
    from disco.pipeline.store.schema import unit_blocks

    folder = tmp_path / "clip"
    folder.mkdir()
    names = [b"0001.png", b"0002\xe9.png"]
    for k, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 40 * (k + 1), np.uint8)).save(os.fsdecode(bytes(folder)) + "/" + os.fsdecode(name))
    item = InputItem(input_path="clip", abs_path=str(folder), source="tiktok", clip_id="clip", kind="frames",
                     split="train", extra=payload(frames=names, fps=30.0))
    settings = {"segment_frames": 8, "fps": 30.0, "max_side": 64, "min_side": 1, "max_pixels": 89_478_485}
    units = [{**u, "width": 0, "height": 0} for u in plan_units(item.to_dict(), settings, set())]
    (unit,) = [row for table in unit_blocks(units, 4) for row in table.to_pylist()]
    assert unit["extra"]["frames"] == names
    errors: list = []
    frames = decode_unit(unit, settings, errors)
    assert not errors and [int(f.picture.mean()) for f in frames] == [40, 80]


def test_tar_members_that_could_escape_are_refused_and_nothing_is_extracted(tmp_path):
    root = layouts.laion(tmp_path / "laion")
    shard = str(root / "shards" / "00000.tar")
    before = sorted(p for p in tmp_path.rglob("*"))
    entries = list(webdataset.read_entries(shard, 0, len(webdataset.entry_offsets(shard))))
    summary = [(e.key, name, bool(e.problem), len(data or b"")) for e, name, data in entries]
    assert [s[:3] for s in summary] == [
        ("000000000", "000000000.jpg", False), ("../evil.jpg", None, True), ("000000001", "000000001.jpg", False),
        ("/tmp/disco-absolute-evil.jpg", None, True), ("000000002", None, False), ("000000003.jpg", None, True)]
    assert summary[0][3] > 1000
    problems = [e.problem for e, _, _ in entries if e.problem]
    assert "'..'" in problems[0] and "absolute" in problems[1] and "link" in problems[2]
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/disco-absolute-evil.jpg").exists() and not (root / "shards" / ".." / "evil.jpg").exists()
    # A range in the middle skips the members before it, walking their headers or seeking to its
    # first entry's offset: the same samples, the same bytes.
    offsets = webdataset.entry_offsets(shard)
    for start in range(len(offsets)):
        walked = list(webdataset.read_entries(shard, start, start + 2))
        sought = list(webdataset.read_entries(shard, start, start + 2, offsets[start]))
        assert [(e.key, n, d) for e, n, d in sought] == [(e.key, n, d) for e, n, d in walked]
    middle = list(webdataset.read_entries(shard, 2, 3, offsets[2]))
    assert [(e.key, name) for e, name, _ in middle] == [("000000001", "000000001.jpg")]


def _tar_units(shard: Path, segment_frames: int) -> tuple[dict, list[dict]]:
    """The settings, and the units a shard of the laion source is planned into, as the stages get them."""
    from disco.pipeline.sources.generic import InputItem
    from disco.pipeline.sources.units import plan_units
    from disco.pipeline.store.schema import unit_blocks

    item = InputItem(input_path="00000.tar", abs_path=str(shard), source="laion", clip_id="00000", kind="tar",
                     split="train", extra=payload())
    settings = {"segment_frames": segment_frames, "fps": 30.0, "max_side": 64, "min_side": 1, "max_pixels": 89_478_485}
    planned = [{**u, "width": 0, "height": 0} for u in plan_units(item.to_dict(), settings, set())]
    return settings, [row for table in unit_blocks(planned, 4) for row in table.to_pylist()]


def test_a_tar_unit_reads_from_its_first_sample_and_not_the_headers_before_it(tmp_path):
    """A shard of many samples is many units; each one seeks to the offset recorded when the
    shard was counted, so a unit at the end does not parse the shard's headers from the start
    (proved here by damaging the first header after planning: only the first unit sees it)."""
    import io
    import tarfile

    from disco.pipeline.sources.units import decode_unit

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for k in range(7):
            for suffix, data in ((".jpg", layouts.jpeg_bytes("astronaut" if k % 2 else "coffee")), (".txt", b"c")):
                member = tarfile.TarInfo(f"{'long-folder-name/' * 8}{k:09d}{suffix}")  # names past ustar's 100
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    settings, units = _tar_units(shard, segment_frames=3)
    assert [(u["extra"]["start"], u["extra"]["stop"], u["unit_count"]) for u in units] == [(0, 3, 3), (3, 6, 3), (6, 7, 3)]
    assert units[0]["extra"]["offset"] == 0 and units[1]["extra"]["offset"] > 0

    def keys(unit):
        errors: list = []
        frames = decode_unit(unit, settings, errors)
        return [f.unit["clip_id"].rsplit("/", 1)[-1] for f in frames], [e["error_type"] for e in errors]

    assert [keys(u) for u in units] == [(["000000000", "000000001", "000000002"], []),
                                       (["000000003", "000000004", "000000005"], []), (["000000006"], [])]
    with open(shard, "r+b") as fh:
        fh.write(b"\xff" * 512)  # the first header (its PAX block) now parses as nothing
    with pytest.raises(InputError, match="not a readable uncompressed tar shard"):  # the unit's errors row
        keys(units[0])
    assert [keys(u) for u in units[1:]] == [(["000000003", "000000004", "000000005"], []), (["000000006"], [])]


def test_a_custom_manifest_describes_a_new_data_set_without_code(tmp_path):
    root = tmp_path / "mine"
    for name, picture in (("a1", "astronaut"), ("b2", "coffee")):
        layouts.save(root / "photos" / f"{name}.jpg", layouts.photo(picture))
    (root / "photos" / "notes.md").write_text("x")
    manifest = tmp_path / "mine.yaml"
    manifest.write_text(
        "name: mine\ndescription: my photos\nprovenance: {homepage: https://example.org}\n"
        "layouts:\n  - {name: photos, kind: images, pattern: 'photos/{clip}.*'}\n"
        "splits: {rule: b2 is held out, test: [b2]}\nexpected: {images: 2}\n"
    )
    assert load_manifest(manifest).name == "mine"
    listing = _list("mine", root, manifest=manifest)
    assert [(i.source, i.clip_id, i.split) for i in listing.items] == [("mine", "a1", "train"), ("mine", "b2", "test")]
    assert listing.ignored == 1
    with pytest.raises(ConfigError, match="unknown source 'mine'"):
        PreprocessConfig(source="mine", input=root, output=tmp_path / "o").validate()


def test_a_key_that_comes_again_later_in_a_shard_is_one_sample_not_two_rows_of_one_id(tmp_path):
    """WebDataset keeps a sample's files together; a key that comes back later in the shard (a
    shard written twice over, a tool's bug) gave two rows of one sample_id, which the contract
    promises unique. The first is the sample; the later entry is an errors row that says so, in
    whichever unit it falls."""
    import io
    import tarfile

    from disco.pipeline.sources.units import decode_unit

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, photo in (("k", "astronaut"), ("m", "coffee"), ("k", "coffee"), ("K", "astronaut")):
            data = layouts.jpeg_bytes(photo)
            member = tarfile.TarInfo(f"{key}.jpg")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    settings, units = _tar_units(shard, segment_frames=2)
    kept, errors = [], []
    for unit in units:
        kept += [f.unit["clip_id"] for f in decode_unit(unit, settings, errors)]
    assert kept == ["00000/k", "00000/m", "00000/K"]  # names differing in case are keys of their own
    assert [(e["error_type"], e["sample_id"]) for e in errors] == [("repeated_key", None)]
    assert "sample 'k' appears again (entry 2 of the shard): the first one is kept" in errors[0]["message"]


def test_the_readme_example_manifest_is_valid():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("**A new data set, no code.**")[1].split("```yaml\n")[1].split("```")[0]
    manifest = parse_manifest(block, "README.md")
    assert [layout.kind for layout in manifest.layouts] == ["video", "images", "frames"]
    assert manifest.split_of("take07", manifest.layouts[0]) == "test"


def test_an_empty_shard_is_one_error_unit_and_a_shard_is_cut_into_ranges(tmp_path):
    import tarfile

    from disco.pipeline.stages import plan_units

    root = layouts.laion(tmp_path / "laion")
    with tarfile.open(root / "shards" / "00009.tar", "w"):
        pass
    items = {i.input_path: i for i in _list("laion", root).items}
    settings = {"segment_frames": 4, "fps": 30.0}
    empty = plan_units(items["shards/00009.tar"].to_dict(), settings)
    assert [(u["error_type"], u["error_stage"]) for u in empty] == [("empty_shard", "list")]
    # Six entries (3 samples, 3 refused members) in units of 4: [0, 4) and [4, 6); a resume skips unit 0.
    units = plan_units(items["shards/00000.tar"].to_dict(), settings)
    offsets = webdataset.entry_offsets(str(root / "shards" / "00000.tar"))
    assert [(u["unit_index"], u["unit_count"], u["extra"]) for u in units] == [
        (0, 2, payload(start=0, stop=4, offset=0)), (1, 2, payload(start=4, stop=6, offset=offsets[4]))]
    resumed = plan_units(items["shards/00000.tar"].to_dict(), settings, {"shards/00000.tar": [0]})
    assert [u["unit_index"] for u in resumed] == [1]


def test_editing_the_manifest_changes_the_options_a_resume_must_match(tmp_path):
    root = tmp_path / "mine"
    layouts.save(root / "photos" / "a1.jpg", layouts.photo("astronaut"))
    manifest = tmp_path / "mine.yaml"
    text = ("name: mine\ndescription: d\nprovenance: {homepage: h}\n"
            "layouts: [{name: p, kind: images, pattern: 'photos/{clip}.jpg'}]\nsplits: {rule: r, test: [%s]}\n")
    manifest.write_text(text % "a1")
    cfg = PreprocessConfig(source="mine", manifest=manifest, input=root, output=tmp_path / "o").validate()
    before = cfg.output_params()
    manifest.write_text(text % "b2")
    assert cfg.output_params()["dataset_manifest"] != before["dataset_manifest"]


def test_a_patterns_suffix_matches_in_any_case(tmp_path):
    """A camera's IMG_0001.JPG and a phone's .MP4 were passed over without a word by patterns
    written in lower case (``*.png``, ``{clip}.mp4``), though the suffix check reads any case."""
    root = layouts.tiktok(tmp_path / "tiktok", frames=2)
    folder = root / "00001" / "images"
    for frame in sorted(folder.iterdir()):
        frame.rename(frame.with_suffix(".PNG"))
    (root / "videos" / "00013.mp4").rename(root / "videos" / "00013.MP4")
    listing = _list("tiktok", root)
    got = {i.clip_id: i for i in listing.items}
    assert set(got) == {"00001", "00002", "00003", "00013"} and listing.ignored == 0
    assert got["00013"].input_path == "videos/00013.MP4"
    assert got["00001"].extra == payload(frames=[b"0000.PNG", b"0001.PNG"], fps=30.0)


@pytest.mark.parametrize("source", ["video", "images"])
def test_linked_folders_are_listed_once_and_an_unreadable_folder_is_an_errors_row(tmp_path, source, monkeypatch):
    """A collection gathered from links (``videos/extra -> /elsewhere``) lost the linked folders'
    files without a word (``os.walk`` does not follow links), a folder that cannot be read was a
    silent gap; a link back up must not list the files twice, nor a link to a folder of the tree
    rename them (an output's journal knows them by their names)."""
    name = "c.webm" if source == "video" else "c.png"
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    for folder in (root / "own", elsewhere, root / "locked"):
        folder.mkdir(parents=True)
    (root / "own" / name).write_bytes(b"x")
    (elsewhere / name).write_bytes(b"x")
    (root / "locked" / name).write_bytes(b"x")
    (root / "extra").symlink_to(elsewhere, target_is_directory=True)
    (root / "own" / "up").symlink_to(root, target_is_directory=True)  # a loop back to the root
    # A link to a folder of the tree, sorted before it: its files keep the names they always had.
    (root / "aaa").symlink_to(root / "own", target_is_directory=True)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = _list(source, root, pose="none", hands=False).items
    got = {i.input_path: i.error_type for i in items}
    assert got == {f"extra/{name}": None, f"own/{name}": None, "locked": "permission_denied"}, got


def test_parquet_lists_in_subfolders_are_inputs_by_their_place_and_bad_rows_are_errors(tmp_path):
    """Two tables (``A/list.parquet``, ``B/list.parquet``) naming ``img/1.png`` beside each were
    listed as one input path (one journal entry: B's image never ran after A's, and one sample
    id for both); the second is named by its place now. A row naming a URL became a local path (``A/s3:/b/x.jpg``) and a missing_file
    row; a bytes column, a damaged table and a Latin-1 manifest were tracebacks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "lists"
    for folder, picture in (("A", "astronaut"), ("B", "coffee"), ("D", "rocket")):
        layouts.save(root / folder / "img" / "1.png", layouts.photo(picture))
    layouts.save(root / "C" / "img" / "2.png", layouts.photo("hopper"))
    # One file under three spellings: from the root's table, its absolute path, A's own table.
    pq.write_table(pa.table({"path": ["A/img/1.png", str(root / "A" / "img" / "1.png")]}), root / "list.parquet")
    pq.write_table(pa.table({"path": ["img/1.png", "img/1.png", "s3://bucket/x.jpg"]}), root / "A" / "list.parquet")
    pq.write_table(pa.table({"path": ["img/1.png"]}), root / "B" / "list.parquet")
    pq.write_table(pa.table({"path": pa.array([b"img/2.png"], pa.binary())}), root / "C" / "list.parquet")
    pq.write_table(pa.table({"path": ["img/1.png"]}), root / "D" / "list.parquet")
    manifest = tmp_path / "lists.yaml"
    manifest.write_text("name: lists\ndescription: d\nprovenance: {homepage: https://example.org}\n"
                        "layouts: [{name: lists, kind: parquet, pattern: '**/*.parquet'}]\nsplits: {rule: r}\n")
    listing = _list("mine", root, manifest=manifest)
    got = {i.input_path: (i.clip_id, i.error_type) for i in listing.items}
    # Named as written (as outputs listed before know them), but where an earlier table took the
    # name for another file: by the table's folder.
    assert got == {"A/img/1.png": ("A/img/1", None), "img/1.png": ("img/1.png", None), "D/img/1.png": ("D/img/1.png", None),
                   "img/2.png": ("img/2", None), "s3://bucket/x.jpg": ("s3://bucket/x", "remote_url")}, got
    files = {i.input_path: i.abs_path for i in listing.items}
    assert (files["img/1.png"], files["D/img/1.png"]) == (str(root.resolve() / "B/img/1.png"),
                                                          str(root.resolve() / "D/img/1.png"))
    assert listing.dataset["notes"]["duplicate_path"] == 3
    # A table whose pages are damaged behind a good footer: one line naming it.
    table = root / "B" / "list.parquet"
    raw = bytearray(table.read_bytes())
    raw[4:40] = b"\xff" * 36
    table.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"cannot read the Parquet file .*B/list.parquet") as failed:
        _list("mine", root, manifest=manifest)
    assert "\n" not in str(failed.value)
    manifest.write_bytes("name: lists\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_manifest(manifest)
