from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import save, write_counter_video
from disco.pipeline.decode import (
    decode_video_frames,
    load_image,
    probe_video,
    resample_indices,
    target_size,
)
from disco.pipeline.errors import InputError


@pytest.fixture()
def rgb() -> np.ndarray:
    # A non-square picture with distinct quadrants, so orientation mistakes show.
    a = np.zeros((40, 60, 3), np.uint8)
    a[:20, :30] = (255, 0, 0)
    a[:20, 30:] = (0, 255, 0)
    a[20:, :30] = (0, 0, 255)
    a[20:, 30:] = (255, 255, 255)
    return a


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB", "1"])
def test_every_common_mode_becomes_rgb(tmp_path, rgb, mode):
    im = Image.fromarray(rgb).convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png" if mode != "CMYK" else ".tif"
    path = save(tmp_path / f"x{suffix}", im)
    out = load_image(path, max_side=512)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    expected = np.asarray(im.convert("RGB"), dtype=np.int16)
    tolerance = 12 if mode == "CMYK" else 0  # JPEG
    assert np.abs(out.astype(np.int16) - expected).max() <= tolerance


def test_transparency_is_composited_on_black(tmp_path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:20, :, 3] = 0  # top half transparent
    out = load_image(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")), max_side=512)
    assert out[:20].max() == 0
    assert (out[20:] == rgb[20:]).all()


def test_16_bit_grey_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257 * 128, 65535]] * 40, dtype=np.uint16).repeat(20, axis=1)
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, max_side=512, min_side=1)
    assert out.shape == (40, 60, 3)
    assert out[0, 0, 0] == 0 and out[0, 25, 1] == 128 and out[0, 59, 2] == 255


@pytest.mark.parametrize("orientation,turn", [(1, None), (3, Image.Transpose.ROTATE_180),
                                              (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path, rgb, orientation, turn):
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "o.jpg", im, exif=exif, quality=100)
    out = load_image(path, max_side=512)
    upright = np.asarray(im if turn is None else im.transpose(turn), dtype=np.int16)
    assert out.shape == upright.shape
    assert np.abs(out.astype(np.int16) - upright).mean() < 6


def test_resize_keeps_aspect_and_never_enlarges(tmp_path, astronaut):
    big = save(tmp_path / "big.png", Image.fromarray(astronaut).resize((1024, 768)))
    assert load_image(big, max_side=256).shape == (192, 256, 3)
    assert load_image(big, max_side=4096).shape == (768, 1024, 3)
    assert target_size(1000, 10, 100) == (100, 1)


def test_bad_stills_raise_specific_errors(tmp_path, astronaut):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture\n")
    save(tmp_path / "dot.png", Image.new("RGB", (1, 1)))
    save(tmp_path / "huge.png", Image.new("1", (20000, 20000)))
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected = {"empty.png": "empty_file", "text.png": "not_an_image", "dot.png": "image_too_small",
                "huge.png": "image_too_large", "cut.jpg": "truncated_image"}
    for name, error_type in expected.items():
        with pytest.raises(InputError) as info:
            load_image(tmp_path / name, max_side=512, min_side=32)
        assert info.value.error_type == error_type, name
        assert info.value.stage == "decode"


def test_resample_indices_rules():
    assert resample_indices(90, 30.0, 10.0) == list(range(0, 90, 3))
    assert resample_indices(50, 25.0, 30.0) == list(range(50))  # never up-sampled
    assert resample_indices(60, 60.0, 24.0)[:6] == [0, 3, 5, 8, 10, 13]  # nearest frame at k/24 s, ties upward
    assert resample_indices(0, 30.0, 10.0) == []


def test_resampled_sequences_say_the_rate_they_play_at():
    """What a video is written at after resampling: a clip stated at 30 fps whose timestamps
    average 24 (a phone's variable rate) asked for 28 gives frames 1/24 s apart, so it plays at
    24, not 28; a constant-rate clip plays at the lower of the two rates."""
    from disco.pipeline.decode import resample_sequence

    times = np.cumsum([0.0] + [1 / 30, 1 / 20] * 30)[:61]  # 60 gaps: 30 of 33 ms, 30 of 50 ms
    average = 60 / times[-1]
    indices, rate = resample_sequence(times, 61, 30.0, 28.0)
    assert rate == pytest.approx(average) and rate < 28 and len(indices) == 61
    assert resample_sequence((), 90, 30.0, 10.0) == (list(range(0, 90, 3)), 10.0)
    assert resample_sequence((), 50, 25.0, 30.0) == (list(range(50)), 25.0)


def test_video_at_lower_fps_gives_a_third_of_the_frames_with_their_times(tmp_path):
    path = write_counter_video(tmp_path / "counter.mp4", frames=90, fps=30.0)
    info = probe_video(path)
    assert (info.num_frames, round(info.fps), info.width, info.height) == (90, 30, 64, 64)
    indices = resample_indices(info.num_frames, info.fps, 10.0)
    assert len(indices) == 30
    frames, times = decode_video_frames(path, indices, 32, 32)
    assert frames.shape == (30, 32, 32, 3)
    np.testing.assert_allclose(times, [k / 10.0 for k in range(30)], atol=1e-3)
    # Each decoded frame is the source frame it claims to be (grey level 10 + 2 * index).
    levels = frames.reshape(30, -1).mean(axis=1)
    np.testing.assert_allclose(levels, [10 + 2 * i for i in indices], atol=3)


def test_bad_videos_raise_specific_errors(tmp_path):
    good = write_counter_video(tmp_path / "good.mp4", frames=30, fps=30.0)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    for name, error_type in {"empty.mp4": "empty_file", "noise.mp4": "corrupt_video", "cut.mp4": "corrupt_video"}.items():
        with pytest.raises(InputError) as info:
            probe_video(tmp_path / name)
        assert info.value.error_type == error_type, name


def _long_gop_clip(path, frames: int, size: int = 64):
    """An H.264 clip through the project's own writer (x264's defaults: a 250-frame GOP and
    B-frames), every frame different."""
    from disco.generate.video import write_video

    base = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return write_video(path, [np.roll(base, 3 * i, axis=1) for i in range(frames)], 30.0)


def test_an_actor_decodes_a_videos_next_segment_on_from_the_last(tmp_path, monkeypatch):
    """A pipeline actor keeps the video it read last open (``LastVideo``): the segments of a call
    decode from one reader instead of each seeking back to the keyframe, and give the very frames
    a reader opened anew gives, in order or not; a failed decode lets the reader go."""
    from disco.pipeline import decode
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.run import stage_settings
    from disco.pipeline.sources.generic import list_inputs
    from disco.pipeline.stages import decode_unit, plan_units

    _long_gop_clip((tmp_path / "videos").mkdir() or tmp_path / "videos" / "long.mp4", 90)
    cfg = PreprocessConfig(source="video", input=tmp_path / "videos", output=tmp_path / "out", segment_frames=8,
                           fps=15.0, max_side=32)
    cfg.resolved = {"matting": "mediapipe", "pose": "mediapipe"}
    settings = stage_settings(cfg)
    (item,) = list_inputs(cfg.source, cfg.input, cfg.split).items
    units = plan_units(item.to_dict(), settings)
    assert len(units) == 6 and units[1]["src_indices"][:2] == [16, 18]  # every other frame, 8 a unit

    opened = []
    real_open = decode._open_video
    monkeypatch.setattr(decode, "_open_video", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    videos = decode.LastVideo()
    kept_open = [decode_unit(unit, settings, videos) for unit in units]
    assert len(opened) == 1
    fresh = [decode_unit(unit, settings) for unit in units]
    assert len(opened) == 1 + len(units)
    backwards = [decode_unit(unit, settings, videos) for unit in reversed(units)][::-1]
    assert len(opened) == 1 + len(units)
    for (a, a_errors), (b, b_errors), (c, c_errors) in zip(kept_open, fresh, backwards):
        assert not a_errors and not b_errors and not c_errors and len(a) == len(b) == len(c) > 0
        for x, y, z in zip(a, b, c):
            assert (x.index, x.timestamp) == (y.index, y.timestamp) == (z.index, z.timestamp)
            assert x.picture.shape == (32, 32, 3)
            assert np.array_equal(x.picture, y.picture) and np.array_equal(x.picture, z.picture)

    # A segment that fails as a whole is tried frame by frame, on at most SALVAGE_OPENS readers
    # whatever its length (opening reads the file's packet index: seconds for a long video).
    past_the_end = {**units[0], "src_indices": [10_000 + k for k in range(8)]}
    before = len(opened)
    frames, errors = decode_unit(past_the_end, settings, videos)
    assert frames == [] and [e["error_type"] for e in errors] == ["decode_failed"]
    assert len(opened) - before == decode.SALVAGE_OPENS
    before = len(opened)
    again, _ = decode_unit(units[0], settings, videos)
    assert len(opened) == before + 1  # opened anew after the failure
    assert all(np.array_equal(x.picture, y.picture) for x, y in zip(again, fresh[0][0]))


@pytest.mark.parametrize("width", [48, 72])
def test_a_width_decords_scaling_fails_on_is_decoded_whole_and_shrunk(tmp_path, width):
    """decord's scaling fails on a few small widths whatever the source (48 px: a square video
    at --max-side 48): those frames are decoded at the source size and shrunk instead of every
    unit of the video failing."""
    import cv2
    import decord

    path = _long_gop_clip(tmp_path / "clip.mp4", 6, size=96)
    with pytest.raises(Exception, match="DECORDArrayCopyFromTo"):  # decord itself, still
        decord.VideoReader(str(path), width=width, height=width).get_batch([0])
    frames, times = decode_video_frames(path, [1, 3, 4], width, width)
    full = decord.VideoReader(str(path)).get_batch([1, 3, 4]).asnumpy()
    assert frames.shape == (3, width, width, 3) and len(times) == 3
    expected = [cv2.resize(frame, (width, width), interpolation=cv2.INTER_AREA) for frame in full]
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected))


@pytest.mark.parametrize("turn", [90, -90, 180])
def test_a_phone_video_with_a_display_rotation_is_decoded_upright(tmp_path, turn):
    """Phones store an upright video as a landscape picture and a rotation to show it with: the
    frames come out as a player shows them, at full size and scaled (a sideways person is cut by
    the square crop and no pose is found)."""
    import av

    picture = np.zeros((64, 96, 3), np.uint8)
    picture[:8] = 255  # a white band on top, a red one on the left: every turn looks different
    picture[:, :8, 0] = 255
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display rotation")
        stream.set_display_rotation(turn)  # counter-clockwise degrees
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    upright = np.rot90(picture, turn // 90)
    info = probe_video(path)
    assert (info.height, info.width) == upright.shape[:2]
    frames, _ = decode_video_frames(path, [0, 2], info.width, info.height)
    assert np.abs(frames.astype(int) - upright).mean(axis=(1, 2, 3)).max() < 2
    half, _ = decode_video_frames(path, [1], info.width // 2, info.height // 2)
    assert np.abs(half[0].astype(int) - upright[::2, ::2]).mean() < 12
