from __future__ import annotations

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from disco.pipeline.store.reader import open_triplets
from disco.pipeline.store.schema import COMMIT_SCHEMA, TRIPLET_SCHEMA, commit_entry, commit_record
from disco.pipeline.store.output import OutputStore
from disco.pipeline.store.shards import ShardWriter


def _rows(path: str, n: int) -> pa.Table:
    rows = [{
        "sample_id": f"images/{path}/{i:06d}", "source": "images", "clip_id": path, "frame_index": i,
        "timestamp_s": None, "split": "train", "input_path": path, "width": 2, "height": 2,
        "image": b"i", "mask": b"m", "foreground": b"f", "background": b"b", "pose": None,
        "body_keypoints": [0.0] * 54, "hand_keypoints": None, "face_keypoints": None,
        "person_score": 1.0, "person_count": 1, "mask_area": 0.5,
    } for i in range(n)]
    return pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA)


def _unit(path: str, rows: int, index: int = 0, count: int = 1, errors: int = 0) -> dict:
    return {"input_path": path, "unit_index": index, "unit_count": count, "frames": rows, "rows": rows,
            "skipped": {}, "errors": errors}


def test_shards_hold_whole_units_and_respect_the_row_bound(tmp_path):
    store = OutputStore(tmp_path)
    store.prepare()
    writer = ShardWriter(store, "part-", shard_rows=5, row_group_rows=2)
    for k in range(6):
        writer.add_unit(_rows(f"v{k}", 2), _unit(f"v{k}", 2), [])
    writer.add_unit(_rows("long", 7), _unit("long", 7), [])  # one unit above the bound: its own shard
    writer.flush()
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in sorted((tmp_path / "triplets").glob("*.parquet"))]
    assert sizes == [4, 4, 4, 7]
    assert pq.ParquetFile(tmp_path / "triplets" / "part-00000.parquet").metadata.num_row_groups == 2
    state = store.read_journal()
    assert state.complete_inputs() == {f"v{k}" for k in range(6)} | {"long"}
    assert open_triplets(tmp_path).count_rows() == 19
    # A commit travels from a writing actor to the driver as a typed Arrow value, and back whole.
    entries = [{**e, "units": [{**u, "skipped": {"no_person": 1}} for u in e["units"]]} for e in state.entries]
    table = pa.Table.from_pylist([{"entry": commit_record(e), "resources": []} for e in entries], schema=COMMIT_SCHEMA)
    assert [commit_entry(r) for r in table.column("entry").to_pylist()] == entries
    with pytest.raises(ValueError, match="does not declare"):  # Arrow would drop it on the way
        commit_record({**entries[0], "units": [{**entries[0]["units"][0], "note": 1}]})


def test_recovery_drops_uncommitted_files_and_a_torn_journal_line(tmp_path):
    store = OutputStore(tmp_path)
    store.prepare()
    first = store.read_journal()
    first.params = {"p": 1}
    store.recover(first)
    writer = ShardWriter(store, "part-a-", shard_rows=2, row_group_rows=2)
    writer.add_unit(_rows("a", 2), _unit("a", 2), [])
    # A kill after the rename but before the journal line, and one in the middle of a write:
    pq.write_table(_rows("b", 2), tmp_path / "triplets" / "part-b-00000.parquet")
    (tmp_path / "triplets" / ".part-b-00001.parquet.tmp").write_bytes(b"PAR1 half")
    with open(store.journal, "a") as fh:
        fh.write('{"type": "commit", "shard_ind')
    state = store.read_journal()
    assert state.params == {"p": 1}
    assert state.complete_inputs() == {"a"}
    # Until recovery runs, readers see only what the journal names.
    assert open_triplets(tmp_path).count_rows() == 2
    removed = store.recover(state)
    assert sorted(removed) == ["triplets/.part-b-00001.parquet.tmp", "triplets/part-b-00000.parquet"]
    assert [p.name for p in (tmp_path / "triplets").iterdir()] == ["part-a-00000.parquet"]
    # The journal is whole again and the next commit lands on a line of its own.
    writer = ShardWriter(store, "part-c-", 2, 2)
    writer.add_unit(_rows("b", 2), _unit("b", 2), [])
    assert store.read_journal().complete_inputs() == {"a", "b"}



def test_a_resume_mends_the_journal_in_place_and_rewrites_it_only_for_new_options(tmp_path):
    """At millions of inputs the journal is a GB: every resume rewrote it whole (seconds, twice its
    size on the share). A clean one is left as it is, a torn last line is cut off, a last line
    without its newline gets one; only a journal without the run's options is written anew."""
    import os

    store = OutputStore(tmp_path)
    params = {"p": 1}
    store.begin(params)
    writer = ShardWriter(store, "part-a-", shard_rows=2, row_group_rows=2)
    for name in "ab":
        writer.add_unit(_rows(name, 2), _unit(name, 2), [])
    clean = store.journal.read_bytes()
    inode = os.stat(store.journal).st_ino
    state, removed = store.begin(params)
    assert removed == [] and state.complete_inputs() == {"a", "b"}
    assert store.journal.read_bytes() == clean and os.stat(store.journal).st_ino == inode
    # A kill in the middle of a line: cut off, in place; the next commit is a line of its own.
    with open(store.journal, "ab") as fh:
        fh.write(b'{"type": "commit", "files": ["triplets/x.parq')
    state, _ = store.begin(params)
    assert store.journal.read_bytes() == clean and os.stat(store.journal).st_ino == inode
    # A kill after a whole record but before its newline: the commit stands and gets one.
    store.journal.write_bytes(clean[:-1])
    state, _ = store.begin(params)
    assert state.complete_inputs() == {"a", "b"} and store.journal.read_bytes() == clean
    ShardWriter(store, "part-c-", 2, 2).add_unit(_rows("c", 2), _unit("c", 2), [])
    assert store.read_journal().complete_inputs() == {"a", "b", "c"}
    # A journal written before it held the options gets them, whole and atomically.
    lines = store.journal.read_bytes().splitlines(keepends=True)
    store.journal.write_bytes(b"".join(lines[1:]))
    state, _ = store.begin(params)
    assert store.read_journal().written_params == params and state.complete_inputs() == {"a", "b", "c"}
    assert store.journal.read_bytes() == b"".join(lines)

def test_video_input_is_complete_only_when_every_segment_is_committed(tmp_path):
    store = OutputStore(tmp_path)
    store.prepare()
    writer = ShardWriter(store, "part-", shard_rows=100, row_group_rows=10)
    writer.add_unit(_rows("clip", 3), _unit("clip", 3, index=0, count=3), [])
    writer.add_unit(_rows("clip", 0), _unit("clip", 0, index=2, count=3), [])
    writer.flush()
    state = store.read_journal()
    assert state.complete_inputs() == set()
    assert state.partial_units() == {"clip": [0, 2]}


def test_pictures_split_and_encode_without_losing_a_pixel():
    """The fast paths of the encoder (OpenCV's masked copy for the foreground / background split,
    the drawing PNG settings for masks and poses) give exactly what the plain numpy split and a
    lossless PNG give, on a real photo with a soft mask, also for a frame that is a strided view."""
    import numpy as np
    from skimage import data

    from disco.pipeline.annotators.render import render_pose
    from disco.pipeline.store.encode import decode_picture, encode_png, split_person

    photo = data.astronaut()
    yy, xx = np.mgrid[:512, :512]
    alpha = np.clip(255 - np.hypot(yy - 200, xx - 260), 0, 255).astype(np.uint8)  # a soft disc
    for frame, mask in ((photo, alpha), (photo[:, ::2], alpha[:, ::2])):
        foreground, background = split_person(frame, mask)
        person = (mask >= 128)[..., None]
        assert 0 < person.mean() < 1
        assert np.array_equal(foreground, np.where(person, frame, 0))
        assert np.array_equal(background, np.where(person, 0, frame))
        assert foreground.dtype == background.dtype == np.uint8
    body = np.zeros((18, 3), np.float32)
    body[:, :2] = np.random.default_rng(0).uniform(50, 450, (18, 2))
    body[:, 2] = 1
    pose = render_pose(512, 512, body, None, style="disco")
    assert pose.any()
    for picture in (alpha, pose):
        encoded = encode_png(picture, drawing=True)
        assert np.array_equal(decode_picture(encoded, grayscale=picture.ndim == 2), picture)
        assert len(encoded) <= len(encode_png(picture))  # the drawing settings cost no bytes either


def test_rows_are_taken_from_their_row_groups_alone(tmp_path):
    """``take_rows`` (the contact sheet's and the temporal report's reader): the rows asked for, in
    the order asked, reading only the row groups that hold them, where pyarrow's ``Dataset.take``
    reads every file up to the last row asked for."""
    import os

    import fsspec.implementations.local
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from disco.pipeline.store.reader import take_rows

    class Counting(fsspec.implementations.local.LocalFileSystem):
        read = 0

        def _open(self, *args, **kwargs):
            file = super()._open(*args, **kwargs)
            read = file.read

            def counted(*a):
                data = read(*a)
                Counting.read += len(data)
                return data

            file.read = counted
            return file

    files = []
    for s in range(3):  # 3 files of 4 row groups of 25 rows, 20 kB of picture a row: 2 MB a file
        table = _rows(f"shard-{s}", 100).set_column(10, "mask", pa.array([os.urandom(20_000) for _ in range(100)]))
        table = table.set_column(3, "frame_index", pa.array(range(100 * s, 100 * (s + 1)), pa.int32()))
        pq.write_table(table, tmp_path / f"part-{s}.parquet", row_group_size=25)
        files.append(str(tmp_path / f"part-{s}.parquet"))
    dataset = pads.dataset(files, schema=TRIPLET_SCHEMA, format="parquet",
                           filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(Counting())))
    positions = [299, 0, 150, 150, 298]
    taken = take_rows(dataset, positions, ["frame_index", "mask"])
    assert taken.column("frame_index").to_pylist() == positions
    assert taken.column("mask").to_pylist()[0] == dataset.take([299], columns=["mask"]).column("mask")[0].as_py()
    Counting.read = 0
    take_rows(dataset, [0, 299], ["sample_id", "mask"])
    # Two row groups of 500 kB (and the footers): not the 6 MB that Dataset.take reads.
    assert Counting.read < 1.5e6, Counting.read
    Counting.read = 0
    dataset.take([0, 299], columns=["sample_id", "mask"])
    assert Counting.read > 4e6  # what the test guards against
    assert take_rows(dataset, [], ["mask"]).num_rows == 0
    with pytest.raises(IndexError, match="row 300 is past the dataset's last row"):
        take_rows(dataset, [2, 300], ["mask"])


def test_shard_footers_are_checked_in_threads_and_the_first_damaged_shard_is_named(tmp_path, monkeypatch):
    """``open_triplets`` checks every committed shard's footer, several at once (one after
    another, 30 K shards on NFS held a training run's start for a minute and more); of two
    damaged shards the first in order is the one named, whichever check ends first, and the
    checks still queued then do not run."""
    import threading
    import time

    from disco.pipeline.io_threads import map_in_threads
    from disco.pipeline.store import reader

    names, ended = set(), []

    def check(k):
        names.add(threading.current_thread().name)
        time.sleep(0.02 * (3 - k) if k < 3 else 0.01)  # of the first three, item 0 ends last
        if k in (1, 2):
            raise ValueError(f"item {k}")
        ended.append(k)
        return k * k

    assert map_in_threads(check, [0, 3, 4], 8, "t") == [0, 9, 16]
    with pytest.raises(ValueError, match="item 1"):
        map_in_threads(check, range(200), 4, "t")
    assert len(names) > 1 and len(ended) < 3 + 100  # most of the queue never ran

    # Through open_triplets: the committed shards' footers, the first damaged one named.
    store = OutputStore(tmp_path)
    store.prepare()
    writer = ShardWriter(store, "part-", shard_rows=2, row_group_rows=2)
    for k in range(12):
        writer.add_unit(_rows(f"v{k}", 2), _unit(f"v{k}", 2), [])
    writer.flush()
    shards = sorted((tmp_path / "triplets").glob("*.parquet"))
    assert len(shards) == 12 and open_triplets(tmp_path).count_rows() == 24
    for k in (3, 9):
        shards[k].write_bytes(shards[k].read_bytes()[:-40])  # the footer cut off
    checked = []
    real_check = reader.check_shard

    def slow_check(path, schema):
        checked.append(threading.current_thread().name)
        time.sleep(0.05 if path == shards[3] else 0)  # the first damaged one is checked last
        return real_check(path, schema)

    monkeypatch.setattr(reader, "check_shard", slow_check)
    with pytest.raises(reader.DamagedShard, match=shards[3].name):
        open_triplets(tmp_path)
    assert len(set(checked)) > 1 and all(name.startswith("disco-footers") for name in checked)


def test_the_lock_files_reader_tells_a_passing_failure_from_a_lasting_one(tmp_path, monkeypatch):
    """Read at every checkpoint of a run of days: a stale NFS handle (a passing failure) is tried
    again and then no answer, never a stop; no permission to read it, or no file, is an answer."""
    import errno
    from pathlib import Path

    from disco.pipeline.errors import ConfigError
    from disco.pipeline.store import output
    from disco.train.loop import check_run_directory

    def failing(error):
        def read_text(self, *args, **kwargs):
            tries.append(self.name)
            raise error
        return read_text

    with output.folder_lock(tmp_path / "run") as holder:
        assert output.taken_by(tmp_path / "run", holder) is None
        tries: list[str] = []
        monkeypatch.setattr(output.time, "sleep", lambda seconds: None)
        monkeypatch.setattr(Path, "read_text", failing(OSError(errno.ESTALE, "Stale file handle")))
        assert output.taken_by(tmp_path / "run", holder) is None and len(tries) == 2
        check_run_directory(tmp_path / "run", holder, 1)  # no answer: goes on
        monkeypatch.setattr(Path, "read_text", failing(PermissionError(errno.EACCES, "Permission denied")))
        assert output.taken_by(tmp_path / "run", holder) == "its lock file cannot be read here (Permission denied)"
        with pytest.raises(ConfigError, match=r"does not see the run directory .* cannot be read here"):
            check_run_directory(tmp_path / "run", holder, 1)
        monkeypatch.undo()
        (tmp_path / "run" / output.LOCK_FILE).unlink()
        assert output.taken_by(tmp_path / "run", holder) == "its lock file is gone"


def _error(path: str, kind: str, frame: int | None = None) -> dict:
    return {"input_path": path, "sample_id": None if frame is None else f"images/{path}/{frame:06d}", "stage": "matting",
            "error_type": kind, "message": "m"}


def _reject(path: str, frame: int) -> dict:
    return {"sample_id": f"images/{path}/{frame:06d}", "source": "images", "clip_id": path, "frame_index": frame,
            "timestamp_s": None, "split": "train", "input_path": path, "width": 2, "height": 2, "reason": "no_person",
            "person_score": 0.0, "person_count": 0, "mask_area": 0.0}


def test_retry_errors_takes_out_failed_units_with_their_own_errors_and_rejects_rows(tmp_path):
    """--retry-errors works unit by unit: a failed segment of a video whose other segments wrote rows
    leaves the journal with its own errors and rejects rows (known by their place in the commit's
    shards), and nothing of the segments beside it in the same shards. A commit written before
    units counted their rejects says whose its rejects rows are no more: its inputs go only whole."""
    from disco.pipeline.store.reader import open_errors, open_rejects
    from disco.pipeline.store.shards import failed_units, retract_units

    store = OutputStore(tmp_path)
    store.prepare()
    writer = ShardWriter(store, "part-a-", shard_rows=100, row_group_rows=10)
    # clip: segment 0 wrote rows beside a frame's error; 1 failed on the GPU after a rejected frame;
    # 2 failed for another reason; 3 is fine. still: one failed still.
    writer.add_unit(_rows("clip", 2), _unit("clip", 2, 0, 4, errors=1), [_error("clip", "gpu_failed", 2)])
    writer.add_unit(_rows("clip", 0), _unit("clip", 0, 1, 4, errors=2),
                    [_error("clip", "gpu_failed", 4), _error("clip", "gpu_failed", 5)], [_reject("clip", 6)])
    writer.add_unit(_rows("clip", 0), _unit("clip", 0, 2, 4, errors=1), [_error("clip", "read_error")],
                    [_reject("clip", 8)])
    writer.add_unit(_rows("clip", 2), _unit("clip", 2, 3, 4), [], [_reject("clip", 14)])
    writer.add_unit(_rows("still", 0), _unit("still", 0, errors=1), [_error("still", "gpu_failed")])
    writer.flush()
    # A commit of an older writer: no rejects counts in its units.
    old = ShardWriter(store, "part-b-", shard_rows=100, row_group_rows=10, commit=lambda e: store.append(
        {**e, "units": [{k: v for k, v in u.items() if k != "rejects"} for u in e["units"]]}))
    old.add_unit(_rows("old", 0), _unit("old", 0, 0, 2, errors=1), [_error("old", "gpu_failed")], [_reject("old", 0)])
    old.add_unit(_rows("old", 1), _unit("old", 1, 1, 2), [], [_reject("old", 3)])
    old.add_unit(_rows("gone", 0), _unit("gone", 0, errors=1), [_error("gone", "gpu_failed")], [_reject("gone", 0)])
    old.flush()

    state = store.read_journal()
    assert failed_units(store, state, {"gpu_failed"}) == {("clip", 1), ("still", 0), ("gone", 0)}
    assert failed_units(store, state, {"all"}) == {("clip", 1), ("clip", 2), ("still", 0), ("gone", 0)}
    retracted = retract_units(store, state, failed_units(store, state, {"gpu_failed"}), 10)

    assert retracted.partial_units() == {"clip": [0, 2, 3]} and "old" in retracted.complete_inputs()
    assert "still" not in retracted.units() and "gone" not in retracted.units()
    errors = sorted((e["input_path"], e["error_type"], e["sample_id"]) for e in open_errors(tmp_path).to_table().to_pylist())
    assert errors == [("clip", "gpu_failed", "images/clip/000002"), ("clip", "read_error", None),
                      ("old", "gpu_failed", None)]
    rejects = sorted(r["sample_id"] for r in open_rejects(tmp_path).to_table().to_pylist())
    assert rejects == ["images/clip/000008", "images/clip/000014", "images/old/000000", "images/old/000003"]
    assert open_triplets(tmp_path).count_rows() == 5  # triplet shards untouched
    assert store.read_journal().units() == retracted.units()  # the journal on disk says the same
    named = {n for e in store.read_journal().entries for n in e["files"]}
    assert named == {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")}
    # The rewritten shards' rows still follow their commit's units: a second retry takes the rest.
    again = retract_units(store, retracted, failed_units(store, retracted, {"all"}), 10)
    assert again.partial_units() == {"clip": [0, 3]} and "old" in again.complete_inputs()
    assert sorted(e["sample_id"] or "" for e in open_errors(tmp_path).to_table().to_pylist()) == ["", "images/clip/000002"]
    assert sorted(r["sample_id"] for r in open_rejects(tmp_path).to_table().to_pylist()) == [
        "images/clip/000014", "images/old/000000", "images/old/000003"]


def test_retry_errors_leaves_the_failed_units_of_a_changed_partly_done_input(tmp_path):
    """An input whose file changed since its units were committed is not read again (the rest would
    be cut from another file): taking out one failed unit of it deleted its errors row and left the
    input unfinished for good. Its failed units stay; an input failed whole starts afresh."""
    from types import SimpleNamespace

    from disco.pipeline.run import _retry_errors
    from disco.pipeline.store.reader import open_errors

    store = OutputStore(tmp_path)
    store.prepare()
    writer = ShardWriter(store, "part-a-", shard_rows=100, row_group_rows=10)
    writer.add_unit(_rows("clip", 2), _unit("clip", 2, 0, 2), [])
    writer.add_unit(_rows("clip", 0), _unit("clip", 0, 1, 2, errors=1), [_error("clip", "read_error")])
    writer.add_unit(_rows("whole", 0), _unit("whole", 0, 0, 1, errors=1), [_error("whole", "read_error")])
    writer.add_unit(_rows("other", 0), _unit("other", 0, 0, 1, errors=1), [_error("other", "read_error")])
    writer.flush()
    lines: list[str] = []
    cfg = SimpleNamespace(retry_errors=["read_error"], row_group_rows=10)
    state = _retry_errors(cfg, store, store.read_journal(), {"clip", "whole"}, lines.append)
    assert set(state.units()) == {"clip"} and set(state.units()["clip"]) == {0, 1}
    assert sorted(e["input_path"] for e in open_errors(tmp_path).to_table().to_pylist()) == ["clip"]
    assert lines == ["--retry-errors read_error: 2 unit(s) that wrote no rows, of 2 input(s), run again (other, whole); "
                     "1 partly done input(s) changed since are left as they are"]


def test_shards_without_their_journal_are_refused_not_deleted_and_overwrite_drops_the_journal_first(
        tmp_path, monkeypatch):
    """A copy of an output made without ``_journal.jsonl`` (or one whose journal was removed):
    recovery took every shard for uncommitted and deleted them all. An --overwrite killed while
    it deleted the shards left a journal naming shards that were gone (their inputs counted done)."""
    from disco.pipeline.errors import ConfigError

    store = OutputStore(tmp_path / "out")
    store.begin({"p": 1})
    ShardWriter(store, "part-a-", 2, 2).add_unit(_rows("a", 2), _unit("a", 2), [])
    copy = tmp_path / "copy"
    (copy / "triplets").mkdir(parents=True)
    for shard in (tmp_path / "out" / "triplets").glob("*.parquet"):
        (copy / "triplets" / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(ConfigError, match="holds shards .* but no _journal.jsonl naming them"):
        OutputStore(copy).begin({"p": 1})
    assert [p.name for p in (copy / "triplets").iterdir()] == ["part-a-00000.parquet"]
    OutputStore(copy).begin({"p": 1}, overwrite=True)  # asked for: replaced
    assert not list((copy / "triplets").iterdir())
    # --overwrite killed in the middle of deleting the shards: no journal is left naming them.
    import shutil

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.clear()
    assert not store.journal.exists() and list((tmp_path / "out" / "triplets").glob("*.parquet"))


def test_other_options_are_refused_with_their_values_then_and_now(tmp_path):
    """A resume with other options is refused naming each with its value then and now: an input
    recorded as a job's working-dir copy looked like the same folder given again."""
    from disco.pipeline.errors import ConfigError

    store = OutputStore(tmp_path)
    store.begin({"input": "working-dir:videos", "fps": 15.0, "hands": True})
    with pytest.raises(ConfigError) as refused:
        store.begin({"input": "/data/videos", "fps": 15.0, "hands": False})
    assert ("was written with different options (hands: true then, false now, input: 'working-dir:videos' then, "
            "'/data/videos' now); re-run") in str(refused.value)
