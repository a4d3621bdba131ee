"""Bad input never stops a run: each input that fails becomes its errors row and the others give
their rows; only a problem with the run itself (its output folder) stops it, in one line."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import wave
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, PngImagePlugin
from skimage import data
from typer.testing import CliRunner

from disco.cli import app
from disco.pipeline.config import PreprocessConfig
from disco.pipeline.decode import decode_video_frames, probe_video, resample_times
from disco.pipeline.errors import InputError, display_path
from disco.pipeline.store.reader import open_errors, open_triplets
from disco.pipeline.run import preprocess
from disco.pipeline.sources.generic import list_inputs, local_path
from disco.pipeline.stages import decode_unit, plan_units
from disco.pipeline.store.schema import UNIT_FIELDS, payload
from disco.pipeline.store.output import OutputStore, OutputUnwritable
from helpers import cli_process, cut_clip, save

NON_UTF8 = os.fsdecode(b"caf\xe9-dancer.png")  # Latin-1 bytes: not valid UTF-8


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def text_bomb_png() -> bytes:
    """A small valid PNG whose compressed text chunk expands past Pillow's limit (a zip bomb in a
    zTXt chunk): Pillow raises ``ValueError: Decompressed data too large`` while opening it."""
    good = _png(Image.new("RGB", (64, 64), (200, 100, 50)))
    payload = b"comment\x00\x00" + zlib.compress(b"\x00" * (PngImagePlugin.MAX_TEXT_CHUNK + 4096), 9)
    chunk = len(payload).to_bytes(4, "big") + b"zTXt" + payload
    chunk += zlib.crc32(b"zTXt" + payload).to_bytes(4, "big")
    return good[:33] + chunk + good[33:]  # after the IHDR chunk


def _person(side: int = 256) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((side, side))


# -- listing ----------------------------------------------------------------------------------------

def test_listing_reports_links_fifos_and_keeps_names_that_are_not_utf8(tmp_path):
    folder = tmp_path / "in"
    save(folder / "good.png", _person(64))
    save(folder / NON_UTF8, _person(64))
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "loop-a.png").symlink_to(folder / "loop-b.png")
    (folder / "loop-b.png").symlink_to(folder / "loop-a.png")
    # One file under several names is one input, by its own name: a link listed before or after it,
    # a hard link (the first name listed).
    (folder / "a-link.png").symlink_to(folder / "good.png")
    (folder / "linked.png").symlink_to(folder / "good.png")
    os.link(folder / "good.png", folder / "hard.png")
    (folder / "other.png").symlink_to(tmp_path / "elsewhere.png")  # a file outside the tree: an input
    save(tmp_path / "elsewhere.png", _person(64))
    os.mkfifo(folder / "pipe.png")
    save(folder / "dance.gif", _person(64))
    listing = list_inputs("images", folder, "train")
    assert listing.filtered == {"same_file_as_another_input": 3}
    items = {i.input_path: i for i in listing.items}
    kinds = {path: item.error_type for path, item in items.items()}
    shown = display_path(NON_UTF8)
    assert shown == "caf\\xe9-dancer.png"
    assert kinds == {"good.png": None, shown: None, "dangling.png": "missing_file", "loop-a.png": "symlink_loop",
                     "loop-b.png": "symlink_loop", "other.png": None, "pipe.png": "not_a_regular_file",
                     "dance.gif": None}
    # The name travels as valid UTF-8 text; the file is opened by its exact bytes.
    odd = items[shown]
    assert odd.abs_path.endswith(shown) and os.fsdecode(odd.raw_path).endswith(NON_UTF8)
    assert Path(local_path(odd.to_dict())).read_bytes() == (folder / NON_UTF8).read_bytes()
    assert items["good.png"].raw_path == b""
    video = {i.input_path: i for i in list_inputs("video", folder, "train").items}
    assert video["dance.gif"].error_type == "unsupported_format" and "ffmpeg" in video["dance.gif"].error_message


# -- one run over a folder of bad and good inputs -------------------------------------------------------

def _adversarial_folder(folder: Path, rng: random.Random, cases: int) -> tuple[set[str], set[str]]:
    """Good stills of a person and random bad entries; returns (good, bad) input paths."""
    good_png = _png(_person(128))
    buffer = io.BytesIO()
    _person(128).save(buffer, format="JPEG")
    good_jpg = buffer.getvalue()
    good, bad = set(), set()

    def put(name: str, content: bytes, ok: bool) -> None:
        (folder / name).write_bytes(content)
        (good if ok else bad).add(display_path(name))

    folder.mkdir(parents=True)
    put("person.png", good_png, True)
    put("person.jpg", good_jpg, True)
    put(NON_UTF8, good_png, True)
    put("text-bomb.png", text_bomb_png(), False)
    put("pixel-bomb.png", _png(Image.new("1", (20000, 20000))), False)
    put("empty.jpg", b"", False)
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    (folder / "loop-a.jpg").symlink_to(folder / "loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to(folder / "loop-a.jpg")
    os.mkfifo(folder / "fifo.png")
    bad.update({"dangling.png", "loop-a.jpg", "loop-b.jpg", "fifo.png"})
    for k in range(cases):
        kind = rng.choice(["random", "truncated", "flipped", "header"])
        source = rng.choice([good_png, good_jpg])
        suffix = ".png" if source is good_png else ".jpg"
        if kind == "random":
            content = rng.randbytes(rng.randint(1, 4096))
        elif kind == "truncated":  # cut inside the picture data: never a whole decodable file
            content = source[:rng.randint(1, len(source) // 2)]
        elif kind == "flipped":  # the header kept, the rest random: decodes to garbage or fails
            content = source[:64] + rng.randbytes(len(source) - 64)
        else:
            content = source[:rng.randint(8, 100)]
        put(f"fuzz-{k:03d}-{kind}{suffix}", content, False)
    return good, bad


def test_every_bad_input_becomes_its_errors_row_and_every_good_one_its_rows(tmp_path, ray_local):
    """About 40 entries: the README's promise held against a text bomb, a pixel bomb, a name that is
    not UTF-8, dangling links, a link loop, a FIFO (opening it would block for ever) and random,
    truncated and garbled files. Each of the first ones stopped the whole run before."""
    folder = tmp_path / "in"
    good, bad = _adversarial_folder(folder, random.Random(7), cases=30)
    result = preprocess(PreprocessConfig(source="images", input=folder, output=tmp_path / "out", max_side=128),
                        log=lambda *_: None)
    assert result.exit_code == 0
    rows = open_triplets(tmp_path / "out").to_table(columns=["input_path"]).column("input_path").to_pylist()
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    failed = {e["input_path"] for e in errors}
    # A flipped file may still decode (to noise): then it is a skipped frame, not an error.
    skipped = bad - failed
    assert set(rows) == good and not failed & good
    assert all(name.startswith("fuzz-") and "flipped" in name for name in skipped), skipped
    by_path = {e["input_path"]: e["error_type"] for e in errors}
    assert by_path["text-bomb.png"] == "decompression_bomb"
    assert by_path["pixel-bomb.png"] == "image_too_large"
    assert by_path["empty.jpg"] == "empty_file"
    assert by_path["dangling.png"] == "missing_file" and by_path["loop-a.jpg"] == "symlink_loop"
    assert by_path["fifo.png"] == "not_a_regular_file"
    assert not [e for e in errors if e["error_type"].startswith("unexpected_")], errors
    counts = result.manifest["counts"]
    assert counts["inputs"] == len(good) + len(bad)


def test_decoding_never_raises_whatever_the_bytes(tmp_path):
    """The decode boundary on its own, without Ray, over many random and cut files: every one comes
    back as frames or as errors rows, never as an exception."""
    settings = {"max_side": 64, "min_side": 1, "max_pixels": 89_478_485, "fps": 30.0, "segment_frames": 8}
    rng = random.Random(11)
    sources = [_png(_person(64)), text_bomb_png()]
    video = tmp_path / "clip.mp4"
    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    write_video(video, pan_zoom_frames(data.astronaut(), 6, 64), 10.0)
    sources.append(video.read_bytes())
    outcomes = {"frames": 0, "errors": 0}
    for k in range(500):
        source = rng.choice(sources)
        cut = rng.choice([rng.randint(0, len(source)), len(source)])
        content = bytearray(source[:cut])
        for _ in range(rng.randint(0, 3)):
            if content:
                content[rng.randrange(len(content))] = rng.randrange(256)
        kind = "video" if source is sources[-1] else "image"
        path = tmp_path / f"case-{k}{'.mp4' if kind == 'video' else '.png'}"
        path.write_bytes(bytes(content))
        item = list_inputs("video" if kind == "video" else "images", path, "train").items[0].to_dict()
        for unit in plan_units(item, settings):
            assert set(unit) == UNIT_FIELDS  # every unit, failed or not, has the declared fields
            frames, errors = decode_unit(unit, settings)
            assert frames or errors
            assert not [e for e in errors if e["error_type"].startswith("unexpected_")], errors
            outcomes["frames" if frames else "errors"] += 1
    assert outcomes["frames"] and outcomes["errors"]


@pytest.mark.parametrize("decord_opens", [True, False])
def test_a_download_cut_short_keeps_the_frames_before_the_cut(tmp_path, decord_opens):
    """A video whose last part never arrived (its index at the front) opens, and its frames up to
    the cut decode: its segment was decoded as one batch, and the first missing packet lost every
    frame of it, the error row in decord's words. Now the frames that decode are rows, equal to the
    whole file's, and the run of frames past the cut is one errors row saying so. Where decord
    cannot open the cut file at all (most cuts), the whole video was one errors row: now PyAV
    reads it up to the cut, the same frames (scaled within a level of decord's) at the same times."""
    from disco.pipeline.decode import LastVideo

    settings = {"max_side": 96, "min_side": 1, "max_pixels": 89_478_485, "fps": 30.0, "segment_frames": 16}
    whole, cut_bytes = cut_clip(tmp_path, decord_opens)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(cut_bytes)

    def decoded(path: Path, videos=None):
        item = list_inputs("video", path, "train").items[0].to_dict()
        frames, errors = [], []
        for unit in plan_units(item, settings):
            got, unit_errors = decode_unit(unit, settings, videos)
            frames += got
            errors += unit_errors
        return {f.index: f for f in frames}, errors

    reference, errors = decoded(whole)
    assert sorted(reference) == list(range(40)) and not errors
    for videos in (None, LastVideo()):  # opened per segment, and kept open from one to the next
        frames, errors = decoded(cut, videos)
        kept = sorted(frames)
        assert kept == list(range(len(kept))), kept  # every frame up to the cut...
        assert settings["segment_frames"] < len(kept) < 40, kept  # ... those of the segment it falls in too
        for index in kept:
            if decord_opens:
                assert np.array_equal(frames[index].picture, reference[index].picture), index
            else:
                difference = np.abs(frames[index].picture.astype(int) - reference[index].picture)
                assert difference.mean() < 1, (index, difference.mean())
            assert frames[index].timestamp == reference[index].timestamp
        assert errors and all(e["error_type"] == "decode_failed" and "cut short" in e["message"] for e in errors)
        listed = probe_video(cut).num_frames
        if not decord_opens:  # read up to the cut: every frame it lists decodes, one row says what is missing
            assert listed == len(kept) and [e["message"] for e in errors] == [
                f"frames {len(kept)}..39 of the 40 it lists are missing: the file is cut short or damaged there "
                "(FFmpeg reads invalid data)"]
            continue
        assert all(e["message"].endswith("(the file is cut short or damaged there): FFmpeg reads invalid data")
                   for e in errors), errors  # (not decord's failed check and source file)
        # Every frame the cut file lists is a row or named in an errors row: the last ones failed.
        named = [range(int(a), int(b) + 1) for a, b in
                 (e["message"].split(" do not")[0].removeprefix("frames ").split("..") for e in errors)]
        assert sorted(i for r in named for i in r) == list(range(len(kept), listed)), errors
    # Read whole (generate's pose video, evaluate's real one): which frames fail, and why.
    from disco.generate.video import read_video
    from disco.pipeline.decode import decode_every_frame

    if not decord_opens:  # read up to the cut: what it lists; a whole video (evaluate's) says it is cut
        assert len(decode_every_frame(cut, list(range(listed)), 96, 96)[0]) == len(kept)
        with pytest.raises(InputError, match="of the 40 it lists are missing: the file is cut short"):
            read_video(cut)
    for read in (lambda: read_video(cut), lambda: decode_every_frame(cut, list(range(listed)), 96, 96)):
        if not decord_opens:
            continue
        with pytest.raises(InputError, match=rf"^frames {len(kept)}\.\.{listed - 1} do not decode \(the file is cut"):
            read()
    frames, _ = decode_every_frame(cut, kept, 96, 96)  # the frames before the cut: all of them
    assert all(np.abs(frames[k].astype(int) - reference[k].picture).mean() < (1e-9 if decord_opens else 1)
               for k in kept)
    if not decord_opens:  # at the video's own size, PyAV's frames are decord's exactly
        import decord

        info = probe_video(cut)
        assert (info.width, info.height) == (256, 256) and info.num_frames == listed
        full, _ = decode_every_frame(cut, kept, 256, 256)
        assert np.array_equal(full, decord.VideoReader(str(whole)).get_batch(kept).asnumpy())


@pytest.mark.parametrize("turn", [90, -90])
def test_a_phone_video_cut_short_that_decord_cannot_open_is_read_upright(tmp_path, turn):
    """A phone's video (a landscape picture shown turned) cut where decord cannot open it: read up
    to the cut, its frames come upright, the very frames decord gives of the whole file."""
    import decord

    whole, cut_bytes = cut_clip(tmp_path, decord_opens=False, turn=turn, width=160)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(cut_bytes)
    info, reference = probe_video(cut), decord.VideoReader(str(whole))
    assert (info.height, info.width) == reference[0].shape[:2] == (160, 256)  # upright: taller than wide
    assert 16 <= info.num_frames < 40 and info.cut_short.startswith(f"frames {info.num_frames}..39 of the 40")
    indices = list(range(info.num_frames))
    frames, times = decode_video_frames(cut, indices, info.width, info.height)
    assert np.array_equal(frames, reference.get_batch(indices).asnumpy())
    assert times == [float(t) for t in reference.get_frame_timestamp(indices)[:, 0]]
    half, _ = decode_video_frames(cut, indices[:4], 80, 128)
    expected = decord.VideoReader(str(whole), width=80, height=128).get_batch(indices[:4]).asnumpy()
    assert np.abs(half.astype(int) - expected).mean() < 3  # (scaled before it is turned: within a few levels)


@pytest.mark.parametrize("decord_opens", [True, False])
def test_a_download_cut_short_gives_its_rows_through_the_pipeline(tmp_path, ray_local, decord_opens):
    """The same cut clips through `preprocess` (its Ray actors, the journal, the errors table): the
    segment the cut falls in writes rows for its frames before the cut and one errors row; a run
    again finds nothing left to do."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.mp4").write_bytes(cut_clip(tmp_path, decord_opens)[1])
    config = PreprocessConfig(source="video", input=tmp_path / "in", output=tmp_path / "out", max_side=96,
                              segment_frames=16)
    assert preprocess(config, log=lambda *_: None).exit_code == 0
    frames = sorted(open_triplets(tmp_path / "out").to_table(columns=["frame_index"]).column("frame_index").to_pylist())
    errors = open_errors(tmp_path / "out").to_table().to_pylist()
    assert frames and max(frames) >= 16, frames  # rows from the segment the cut falls in
    assert [(e["input_path"], e["error_type"]) for e in errors] == [("cut.mp4", "decode_failed")], errors
    first, last = (int(k) for k in errors[0]["message"].split(" ")[1].split(".."))
    assert max(frames) < first <= last
    if not decord_opens:  # every frame before the cut is a row
        assert frames == list(range(first)) and last == 39, (frames, errors)
    again = preprocess(config, log=lambda *_: None)
    assert again.exit_code == 0 and again.manifest["run"]["frames_processed"] == 0


# -- videos: time, audio, GIFs --------------------------------------------------------------------------

def _vfr_clip(path: Path, gaps_ms: list[int]) -> list[float]:
    """An H.264 MP4 whose frames come ``gaps_ms`` apart (variable frame rate), made with PyAV;
    frame k is grey level 8k, so a decoded frame tells which one it is. Returns the frame times."""
    import av

    times = [0.0]
    for gap in gaps_ms:
        times.append(times[-1] + gap / 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 8 * k, np.uint8), format="rgb24")
            frame.pts = round(t * 1000)
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return times


def test_variable_frame_rate_video_is_resampled_by_time(tmp_path):
    """Ten frames 33 ms apart, then five 200 ms apart: by frame number (the old rule) the slow part
    went by as fast as the rest; by time, output frames are evenly spaced at the clip's average
    rate and each is the source frame nearest its time."""
    times = _vfr_clip(tmp_path / "vfr.mp4", [33] * 9 + [200] * 5)
    info = probe_video(tmp_path / "vfr.mp4")
    assert info.num_frames == len(times)
    assert np.allclose(info.times, times, atol=0.002)
    picked = info.resample(30.0)
    rate = (len(times) - 1) / times[-1]
    grid = [k / rate for k in range(len(picked))]
    assert all(abs(times[i] - t) <= min(abs(s - t) for s in times) + 1e-9 for i, t in zip(picked, grid))
    # Output spacing is even in time, so the slow part's source frames are each taken about as
    # often as its length asks (the old rule took each source frame once).
    assert picked.count(len(times) - 2) >= 2
    # Constant-rate timestamps give what the frame-number rule gave.
    assert resample_times([i / 60 for i in range(60)], 24.0)[:6] == [0, 3, 5, 8, 10, 13]


def test_audio_only_file_and_gif_get_their_own_error_types(tmp_path, ray_local):
    folder = tmp_path / "videos"
    folder.mkdir()
    with wave.open(str(folder / "song.mp4"), "wb") as sound:  # audio only, under a video suffix
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(np.zeros(8000, np.int16).tobytes())
    save(folder / "dance.gif", _person(64))
    result = preprocess(PreprocessConfig(source="video", input=folder, output=tmp_path / "out"), log=lambda *_: None)
    errors = {e["input_path"]: e for e in open_errors(tmp_path / "out").to_table().to_pylist()}
    assert errors["song.mp4"]["error_type"] == "no_video_stream"
    assert errors["dance.gif"]["error_type"] == "unsupported_format"
    assert result.exit_code == 1  # every input failed


def aborting_video(path: Path) -> Path:
    """A clip whose header says its first run of samples holds 2^32 - 1 of them (one damaged
    32-bit count in its "stts" box): decord throws std::bad_alloc while opening it, and the
    process that reads it aborts."""
    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    write_video(path, pan_zoom_frames(data.astronaut(), 8, 96), 30.0)
    clip = bytearray(path.read_bytes())
    at = clip.index(b"stts") + 12  # after the box's version and flags and its entry count
    clip[at:at + 4] = b"\xff" * 4
    path.write_bytes(bytes(clip))
    return path


def test_a_video_whose_header_aborts_its_reader_is_its_errors_row(tmp_path, ray_local):
    """Reading a damaged clip's header aborted the process that read it, and the driver read the
    headers: the run, and every resume of it, ended there without a word. Now the headers are read
    in Ray tasks; the task that ended is planned again one video a task, the other video goes on,
    and the damaged one is its errors row."""
    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    folder, out = tmp_path / "videos", tmp_path / "out"
    bad = aborting_video(folder / "damaged.mp4")
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom disco.pipeline.decode import probe_video\n"
                            "probe_video(sys.argv[1])", str(bad)], capture_output=True, text=True, timeout=120)
    assert probe.returncode == -signal.SIGABRT and "std::bad_alloc" in probe.stderr, probe  # it is a real abort
    write_video(folder / "dance.mp4", pan_zoom_frames(data.astronaut(), 8, 96), 30.0)
    config = PreprocessConfig(source="video", input=folder, output=out, max_side=96, pose="none", hands=False)
    result = preprocess(config, log=lambda *_: None)
    errors = {e["input_path"]: e for e in open_errors(out).to_table().to_pylist()}
    assert set(errors) == {"damaged.mp4"}
    assert (errors["damaged.mp4"]["error_type"], errors["damaged.mp4"]["stage"]) == ("worker_crashed", "decode")
    assert "ended the process that read it" in errors["damaged.mp4"]["message"]
    rows = open_triplets(out).to_table(columns=["input_path"]).column("input_path").to_pylist()
    assert rows and set(rows) == {"dance.mp4"}
    assert result.exit_code == 0 and result.manifest["counts"]["inputs_failed"] == 1
    again = preprocess(config, log=lambda *_: None)  # the resume: both inputs are done
    assert again.exit_code == 0 and again.manifest["run"]["inputs_processed"] == 0


def test_a_planning_task_whose_node_is_lost_runs_again(tmp_path, ray_local):
    """A planning task is never retried by Ray (a retry would abort again on a damaged clip), so a
    node lost under it (a spot reclaim while the headers are read) would stop the run: such a task
    runs again, and its inputs are planned as before."""
    import ray
    from ray.exceptions import NodeDiedError

    from disco.pipeline.run import _planned_in_tasks, plan_all
    from disco.pipeline.sources import list_source
    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    write_video(tmp_path / "videos" / "dance.mp4", pan_zoom_frames(data.astronaut(), 8, 96), 30.0)
    cfg = PreprocessConfig(source="video", input=tmp_path / "videos", output=tmp_path / "out", segment_frames=4)
    items = list_source(cfg, log=lambda *_: None).items
    settings = {"segment_frames": 4, "fps": 30.0, "min_side": 32, "max_side": 96, "max_pixels": 10**8}

    @ray.remote(num_cpus=0.25, max_retries=0)
    def lost():
        raise NodeDiedError("the node running this task died")

    chunks = [[item.to_dict() for item in items]]
    planned = _planned_in_tasks(chunks, [lost.remote()], settings, {})
    expected = plan_all(items, settings, {}).to_pylist()
    assert [row for table in planned[0] for row in table.to_pylist()] == expected
    assert [u["unit_index"] for u in expected] == [0, 1] and not any(u["error_type"] for u in expected)
    # Lost on every try: the input is its errors unit, not the run's end.
    last = _planned_in_tasks(chunks, [lost.remote()], settings, {}, node_tries=1)
    assert [u["error_type"] for u in last[0][0].to_pylist()] == ["worker_crashed"]


def test_retry_errors_runs_the_failed_inputs_again_and_nothing_else(tmp_path, ray_local):
    """An input that failed for a reason that has gone (a file cut short while it was copied, a
    GPU that broke) counts as done on resume; --retry-errors TYPE takes it out of the output (its
    errors row, its units in the journal) and runs it again; the other inputs stay as they were."""
    folder, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b"):
        save(folder / f"{name}.png", _person(64))
    (folder / "late.png").write_bytes((folder / "a.png").read_bytes()[:200])  # still being copied
    (folder / "text.png").write_text("not a picture")
    config = dict(source="images", input=folder, output=out, pose="none", hands=False)
    first = preprocess(PreprocessConfig(**config), log=lambda *_: None)
    before = {e["input_path"]: e["error_type"] for e in open_errors(out).to_table().to_pylist()}
    assert before == {"late.png": "truncated_image", "text.png": "not_an_image"}
    rows = sorted(open_triplets(out).to_table(columns=["sample_id"]).column("sample_id").to_pylist())
    save(folder / "late.png", _person(64))  # the copy finished
    lines: list[str] = []
    again = preprocess(PreprocessConfig(**config), log=lines.append)  # a plain resume: nothing to do
    assert again.manifest["run"]["inputs_processed"] == 0
    retried = preprocess(PreprocessConfig(**config, retry_errors=["truncated_image,missing_file"]), log=lines.append)
    assert "--retry-errors missing_file,truncated_image: 1 unit(s) that wrote no rows, of 1 input(s), run again (late.png)" in lines
    assert retried.manifest["run"]["inputs_processed"] == 1
    assert {e["input_path"]: e["error_type"] for e in open_errors(out).to_table().to_pylist()} == {"text.png": "not_an_image"}
    after = sorted(open_triplets(out).to_table(columns=["sample_id"]).column("sample_id").to_pylist())
    assert len(after) == len(rows) + 1 and set(rows) < set(after)  # its row, once; the others untouched
    assert retried.manifest["counts"]["inputs_failed"] == first.manifest["counts"]["inputs_failed"] - 1
    # Every shard on disk is one the journal names (the errors shard rewritten, the old one gone).
    store = OutputStore(out)
    named = {n for e in store.read_journal().entries for n in e["files"]}
    assert named == {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")}
    # On the command line: no such input is a line saying so; with --overwrite it makes no sense.
    result = CliRunner().invoke(app, ["preprocess", "--source", "images", "-i", str(folder), "-o", str(out), "--pose",
                                      "none", "--no-hands", "--retry-errors", "gpu_failed", "--no-progress"])
    assert result.exit_code == 0 and "0 unit(s) that wrote no rows, of 0 input(s), run again" in " ".join(result.output.split()), \
        result.output
    both = CliRunner().invoke(app, ["preprocess", "--source", "images", "-i", str(folder), "-o", str(out),
                                    "--retry-errors", "all", "--overwrite"])
    assert both.exit_code == 2 and "--overwrite redoes all of it" in both.output


# -- tar shards ------------------------------------------------------------------------------------------

def test_a_tar_member_cut_short_costs_that_sample_only(tmp_path):
    from disco.pipeline.sources import units

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("a", "b", "c"):
            content = _png(_person(64))
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    whole = shard.read_bytes()
    # Cut inside the third member's data.
    third = whole.index(b"c.png")
    shard.write_bytes(whole[:third + 512 + 100])
    settings = {"max_side": 64, "min_side": 1, "max_pixels": 89_478_485, "fps": 30.0, "segment_frames": 8}
    base = {"input_path": "shard.tar", "abs_path": str(shard), "raw_path": b"", "source": "laion",
            "clip_id": "shard", "kind": "tar", "split": "train", "error_type": None, "error_message": None,
            "extra": payload(), "error_stage": None, "unit_index": 0, "unit_count": 1, "src_indices": [],
            "frame_start": 0, "width": 0, "height": 0}
    planned = units.plan_units(base, settings, set())
    frames, errors = [], []
    for unit in planned:
        got, unit_errors = decode_unit(unit, settings)
        frames += got
        errors += unit_errors
    assert [f[3]["clip_id"] for f in frames] == ["shard/a", "shard/b"]
    assert len(errors) == 1 and errors[0]["error_type"] in ("corrupt_tar", "truncated_member")


# -- the run's own problems --------------------------------------------------------------------------------

def test_a_full_disk_or_read_only_output_is_one_line_naming_the_folder(tmp_path):
    store = OutputStore(tmp_path / "out")

    class RayTaskLike(Exception):  # Ray wraps an actor's error and keeps it as ``cause``
        def __init__(self, cause):
            super().__init__("the actor died")
            self.cause = cause

    full = OSError(28, "No space left on device", str(tmp_path / "out" / "triplets" / "part.parquet"))
    with pytest.raises(OutputUnwritable, match="No space left on device.*re-run the same command"):
        with store.locked():
            raise RayTaskLike(full)
    elsewhere = PermissionError(13, "Permission denied", "/somewhere/else.png")
    with pytest.raises(PermissionError):  # an input's problem is not the output's
        with store.locked():
            raise elsewhere


def test_preprocess_into_a_folder_it_cannot_write_exits_2_in_one_line(tmp_path):
    """An output folder that cannot be made (under /sys, where even root may not create one): exit
    2 with one line that names the folder, before Ray starts."""
    folder = tmp_path / "in"
    save(folder / "person.png", _person(64))
    out = Path("/sys/disco-cannot-write/out")
    command, env = cli_process("preprocess", "--source", "images", "--input", str(folder), "--output", str(out),
                               "--no-progress")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and str(out) in errors[0] and "Traceback" not in result.stderr, errors


# -- damaged outputs and checkpoints ------------------------------------------------------------------------

def test_damaged_shards_and_checkpoints_are_one_line_errors(triplets, tmp_path):
    runner = CliRunner()
    # A shard cut short (its footer gone).
    cut = tmp_path / "cut"
    shutil.copytree(triplets["video"], cut)
    shard = next((cut / "triplets").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])
    for args in (["inspect", str(cut)],
                 ["train", "--data", str(cut), "--output", str(tmp_path / "run"), "--model", "tiny", "--no-progress"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output[-2000:]
        assert len(result.output.strip().splitlines()) == 1 and shard.name in result.output
    # A checkpoint that is not what it says: a pickle named .safetensors, and a training state
    # that holds an object.
    from disco.model.checkpoint import DamagedCheckpoint, load_model, read_checkpoint

    run = tmp_path / "ckpt"
    cfg_run = runner.invoke(app, ["train", "--stage", "finetune", "--data", str(triplets["video"]), "--output",
                                  str(run), "--model", "tiny", "--resolution", "64", "--batch-size", "2",
                                  "--max-steps", "1", "--sample-every", "1000", "--sample-steps", "2",
                                  "--no-progress"])
    assert cfg_run.exit_code == 0, cfg_run.output[-2000:]
    checkpoint = next(run.glob("checkpoint-*"))
    spoiled = tmp_path / "spoiled"
    shutil.copytree(run, spoiled)
    spoiled_checkpoint = spoiled / checkpoint.name
    torch.save({"weights": {"a": torch.zeros(1)}}, spoiled_checkpoint / "trainable.safetensors")
    with pytest.raises(DamagedCheckpoint, match="trainable.safetensors is damaged"):
        load_model(spoiled)
    torch.save({"optimizer": InputError("x", "y", "z")}, spoiled_checkpoint / "training_state.pt")
    with pytest.raises(DamagedCheckpoint) as refused:
        read_checkpoint(spoiled_checkpoint)
    assert "weights_only=False" not in str(refused.value) and "\n" not in str(refused.value)
    result = runner.invoke(app, ["generate", "--checkpoint", str(spoiled), "--reference", str(tmp_path / "x.png"),
                                 "--pose", str(tmp_path / "x.mp4"), "--output", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def _garble_pages(shard: Path, column: str = "image") -> None:
    """Overwrite the first page header of ``column`` in row group 0: the footer stays valid, so
    the file opens, and reading that column fails."""
    metadata = pq.read_metadata(shard)
    names = [metadata.row_group(0).column(i).path_in_schema for i in range(metadata.num_columns)]
    start = metadata.row_group(0).column(names.index(column)).data_page_offset
    raw = bytearray(shard.read_bytes())
    raw[start:start + 64] = b"\xff" * 64
    shard.write_bytes(bytes(raw))


def test_garbage_inside_a_shard_and_a_damaged_shard_for_filter_humans_are_one_line(triplets, tmp_path):
    runner = CliRunner()
    garbled = tmp_path / "garbled"
    shutil.copytree(triplets["video"], garbled)
    shard = next((garbled / "triplets").glob("*.parquet"))
    _garble_pages(shard)
    for args in (["inspect", str(garbled)],
                 ["train", "--stage", "finetune", "--data", str(garbled), "--output", str(tmp_path / "run"),
                  "--model", "tiny", "--resolution", "64", "--batch-size", "2", "--max-steps", "2", "--no-progress"]):
        result = runner.invoke(app, args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1, result.output[-3000:]
        assert "Traceback" not in result.output
    assert shard.name in errors[0]  # train names the shard
    cut = tmp_path / "cut"
    shutil.copytree(triplets["video"], cut)
    shard = next((cut / "triplets").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])
    result = runner.invoke(app, ["filter-humans", "--input", str(cut), "--output", str(tmp_path / "filtered")])
    assert result.exit_code == 2 and shard.name in result.output, result.output[-2000:]
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_train_where_no_row_decodes_exits_promptly(triplets, tmp_path):
    """Every picture of the data garbled: the run stops with one line and leaves no thread of its
    data stream behind. Such threads (Ray Data's executor, a thread pool that Python joins at exit)
    made the command hang for ever after printing its error."""
    import threading

    from helpers import garbled_copy

    garbled = garbled_copy(triplets["video"], tmp_path / "garbled")
    before = set(threading.enumerate())
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", "--stage", "finetune", "--data", str(garbled), "--output",
                                      str(tmp_path / "run"), "--model", "tiny", "--resolution", "64", "--batch-size",
                                      "2", "--max-steps", "4", "--no-progress"])
    assert time.monotonic() - started < 120
    assert result.exit_code == 2 and "no row decodes" in result.output, result.output[-2000:]
    time.sleep(1)
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not [name for name in left if name.startswith(("StreamingExecutor", "ThreadPoolExecutor"))], left


def test_generate_checks_its_options_before_loading_a_model(tmp_path):
    runner = CliRunner()
    missing = tmp_path / "no-such-run"
    save(tmp_path / "ref.png", _person(64))
    result = runner.invoke(app, ["generate", "--checkpoint", str(missing), "--reference", str(tmp_path / "ref.png"),
                                 "--pose", str(tmp_path / "ref.png"), "--output", str(tmp_path / "o.mp4"),
                                 "--size", "0"])
    assert result.exit_code == 2 and "--size" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_evaluate_checks_its_options_before_loading_a_network(tmp_path):
    runner = CliRunner()
    (tmp_path / "pred").mkdir()
    for args, words in ((["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "nowhere")], "--gt"),
                        (["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "pred"), "--steps", "0"],
                         "--steps")):
        result = runner.invoke(app, ["evaluate", "--output", str(tmp_path / "report.json"), *args])
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_known_failures_get_specific_error_types_and_the_rest_name_their_class():
    """The mapping behind the boundary (unreadable files cannot be made for root, who reads
    everything, so the permission case is checked here)."""
    from PIL import Image as PILImage

    from disco.pipeline.errors import error_type_of, input_error

    cases = {
        PermissionError(13, "Permission denied", "/data/x.png"): "permission_denied",
        FileNotFoundError(2, "No such file or directory", "/data/x.png"): "missing_file",
        OSError(40, "Too many levels of symbolic links", "/data/x.png"): "symlink_loop",
        PILImage.DecompressionBombError("too many pixels"): "image_too_large",
        ValueError("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK"): "decompression_bomb",
        MemoryError(): "out_of_memory",
        ZeroDivisionError("division by zero"): "unexpected_ZeroDivisionError",
    }
    for exc, kind in cases.items():
        assert error_type_of(exc) == kind
    error = input_error("decode", PermissionError(13, "Permission denied", os.fsdecode(b"/data/caf\xe9.png")))
    assert error.message == "PermissionError: Permission denied: /data/caf\\xe9.png"
    error.message.encode("utf-8")  # an errors row's text is valid UTF-8
