"""Decoding: stills through Pillow, videos through decord, frame-rate resampling and resizing."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from disco.pipeline.errors import InputError


class Frame(NamedTuple):
    """One decoded frame of a unit of work: where it sits in its clip, and the unit its row belongs
    to (a tar member has its own clip_id)."""

    index: int
    timestamp: float | None  # seconds into the video; None for a still
    picture: np.ndarray  # H x W x 3 uint8 RGB
    unit: dict



def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after shrinking so that the long side is at most ``max_side``; never enlarges."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_square(picture: np.ndarray, size: int) -> np.ndarray:
    """A square picture resized to ``size`` x ``size`` as training resizes its crops: the area
    filter when shrinking by 2x or more, where bilinear would alias; bilinear otherwise (it reads
    every source pixel when shrinking by less than 2x, and OpenCV's area filter at such fractional
    scales costs several times as much)."""
    import cv2

    interpolation = cv2.INTER_AREA if picture.shape[0] >= 2 * size else cv2.INTER_LINEAR
    return cv2.resize(picture, (size, size), interpolation=interpolation)


def cover_size(width: int, height: int, side: int) -> tuple[int, int]:
    """Size after shrinking so that the short side is ``side`` (a centre-cropped ``side`` square
    still fits whole); never enlarges."""
    scale = min(1.0, side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_size(width: int, height: int, min_side: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(
            "decode", "image_too_large",
            f"{width} x {height} pixels exceeds the limit of {max_pixels} pixels (--max-pixels)",
        )
    if min(width, height) < min_side:
        raise InputError(
            "decode", "image_too_small",
            f"{width} x {height} pixels is below the minimum side of {min_side} (--min-side)",
        )


def _check_not_empty(path: Path) -> None:
    if os.path.getsize(path) == 0:
        raise InputError("decode", "empty_file", "the file is empty (0 bytes)")


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode as an H x W x 3 uint8 array; transparency is composited onto black."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (and 32-bit integer) grey: scale the 16-bit range down to 8 bits.
        arr = np.asarray(im).astype(np.float64)
        grey = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        grey = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def load_image(path: str | Path, max_side: int, min_side: int = 1, max_pixels: int = 89_478_485) -> np.ndarray:
    """Decode a still as RGB uint8, upright per its EXIF orientation, long side <= ``max_side``."""
    path = Path(path)
    _check_not_empty(path)
    return _decode_still(path, path.suffix, max_side, min_side, max_pixels)


def decode_image_bytes(data: bytes, name: str, max_side: int, min_side: int = 1,
                       max_pixels: int = 89_478_485) -> np.ndarray:
    """``load_image`` for a still held in memory (a member of a tar shard); ``name`` gives its suffix."""
    if not data:
        raise InputError("decode", "empty_file", "the file is empty (0 bytes)")
    return _decode_still(io.BytesIO(data), PurePosixPath(name).suffix, max_side, min_side, max_pixels)


_PILLOW_BOUND = threading.Lock()


def _decode_still(source, suffix: str, max_side: int, min_side: int, max_pixels: int) -> np.ndarray:
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses past twice its own bound (179 MP) in Image.open, before our check: a
        # --max-pixels above it (generate's reference photos, 200 MP off a phone) raises the bound
        # for the process (never lowered: each call still checks its own max_pixels below).
        with _PILLOW_BOUND:
            if Image.MAX_IMAGE_PIXELS is not None:
                Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
        with im:
            width, height = im.size
            check_size(width, height, min_side, max_pixels)
            # JPEG can decode at a reduced scale directly, which is much cheaper for huge photos.
            im.draft("RGB", (max_side, max_side))
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = Image.fromarray(to_rgb(im))
    except UnidentifiedImageError:
        raise InputError("decode", "not_an_image", f"not a readable image (suffix {suffix!r})") from None
    except Image.DecompressionBombError as exc:
        raise InputError("decode", "image_too_large", str(exc)) from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's (missing, unreadable...): the caller maps it
            raise
        raise _damaged_image(exc) from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        if "Decompressed data too large" in str(exc):
            raise InputError("decode", "decompression_bomb", f"{exc} (a compressed chunk expands past Pillow's "
                             "limit)") from None
        raise _damaged_image(exc) from None
    size = target_size(rgb.width, rgb.height, max_side)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(rgb)


def _damaged_image(exc: BaseException) -> InputError:
    kind = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
    return InputError("decode", kind, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    # Presentation time (s) of every frame, from the container's timestamps: a variable-frame-rate
    # clip (phones write them) is resampled by time, not by frame number.
    times: tuple[float, ...] = ()
    # Where the file is cut short (``cut_video``: read up to the cut), what is missing; else "".
    cut_short: str = ""

    def resample(self, target_fps: float) -> list[int]:
        """Source frames for output frames evenly spaced in time (``resample_sequence``)."""
        return resample_sequence(self.times, self.num_frames, self.fps, target_fps)[0]

    def resampled(self, target_fps: float) -> tuple[list[int], float]:
        """``resample``'s frames and the rate they play at (``resample_sequence``)."""
        return resample_sequence(self.times, self.num_frames, self.fps, target_fps)


def constant_rate(times, fps: float) -> bool:
    """Every frame within a quarter frame of where the stated rate puts it: resampled by frame
    number, exactly as before timestamps were read (rounded time bases change no choice)."""
    if len(times) < 2:
        return True
    t = np.asarray(times, np.float64)
    return bool(np.max(np.abs((t - t[0]) - np.arange(len(t)) / fps)) <= 0.25 / fps)


def resample_sequence(times, num_frames: int, stated_fps: float, target_fps: float) -> tuple[list[int], float]:
    """The one resampling rule of a frame sequence (a video, a preprocessed clip's rows): the
    source frames for output frames evenly spaced in time at ``target_fps`` (never above the
    source's rate), and the rate they then play at. By the presentation ``times`` where every
    frame has one and they stray from the stated rate (``resample_times``: the source's average
    rate caps it), else by frame number at ``stated_fps`` (``resample_indices``)."""
    if len(times) == num_frames and not constant_rate(times, stated_fps):
        by_time = resample_times(times, target_fps)
        if by_time is not None:
            return by_time, min(target_fps, (num_frames - 1) / (float(times[-1]) - float(times[0])))
    return resample_indices(num_frames, stated_fps, target_fps), min(target_fps, stated_fps)


def _open_video(path: Path, **kwargs):
    import decord

    try:
        with _utf8_name(path) as name:
            return decord.VideoReader(name, ctx=decord.cpu(0), num_threads=1, **kwargs)
    except (decord.DECORDError, RuntimeError) as exc:
        text = str(exc)
        if "cannot find video stream" in text:  # FFmpeg found streams, none of them video
            raise InputError("decode", "no_video_stream", "the file holds no video stream (audio only?)") from None
        if any(sign in text for sign in _CUT_OR_DAMAGED):
            cut = _read_up_to_the_cut(path, kwargs.get("width", -1), kwargs.get("height", -1))
            if cut is not None:
                return cut
            raise InputError("decode", "corrupt_video", "cannot open the video: the file is cut short or damaged "
                             "(FFmpeg reads invalid data)") from None
        raise InputError("decode", "corrupt_video", f"cannot open the video: {decord_message(exc)}") from None


def _read_up_to_the_cut(path: Path, width: int, height: int):
    """The video as PyAV reads it up to where it ends (``cut_video``), where decord gave up on
    opening it; None where nothing of it reads either."""
    from disco.pipeline.cut_video import CutVideo

    try:
        with _utf8_name(path) as name:
            video = CutVideo(name, width, height)
    except InputError:
        return None
    if not len(video):
        video.close()
        return None
    return video


# decord's words where FFmpeg found invalid data opening a file (AVERROR_INVALIDDATA is
# -1094995529): a download cut short (its index missing, or a packet cut in two) or damaged.
_CUT_OR_DAMAGED = ("1094995529", "Invalid data found", "moov atom not found")


# decord prefixes each message with the time and its source file, once per layer it passed
# ("[22:23:59] /github/workspace/src/video/ffmpeg/threaded_decoder.cc:292: "), a user's error row too.
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def decord_message(exc: BaseException) -> str:
    """The first line of a decord error, without decord's time and source-file prefixes; FFmpeg's
    "invalid data" (a file cut short or damaged) in those words, not decord's check that failed."""
    text = str(exc).strip()
    if any(sign in text for sign in _CUT_OR_DAMAGED):
        return "FFmpeg reads invalid data"
    first = text.splitlines()[0] if text else ""
    return _DECORD_PREFIX.sub("", first).strip() or type(exc).__name__


def open_video(path: str | Path, width: int, height: int):
    """A video opened for ``decode_video_frames``, its frames at ``width`` x ``height``."""
    return _open_video(Path(path), width=width, height=height)


@contextlib.contextmanager
def _utf8_name(path: Path):
    """A name decord (a C library taking UTF-8) can open: the path itself, or where the name is not
    valid UTF-8, a temporary symbolic link to it (the opened file outlives the link)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="disco-video-") as folder:
            link = os.path.join(folder, "video" + "".join(c for c in Path(path).suffix if c.isascii()))
            os.symlink(os.path.abspath(path), link)
            yield link
        return
    yield str(path)


def probe_video(path: str | Path) -> VideoInfo:
    path = Path(path)
    _check_not_empty(path)
    reader = _open_video(path)
    try:
        return _probed(reader)
    finally:
        _close(reader)


def probe_whole_video(path: str | Path) -> VideoInfo:
    """``probe_video`` for a reader that needs the whole video (evaluate's, generate's whole
    reads): a video cut short is its error, not its frames before the cut passed off as all."""
    info = probe_video(path)
    if info.cut_short:
        raise InputError("decode", "decode_failed", info.cut_short)
    return info


def _close(reader) -> None:
    """A reader let go at once: a PyAV one (``cut_video``) holds its file and decoder until closed."""
    close = getattr(reader, "close", None)
    if close is not None:
        close()


def _probed(reader) -> VideoInfo:
    num_frames = len(reader)
    if num_frames == 0:
        raise InputError("decode", "no_frames", "the video holds no frames")
    fps = float(reader.get_avg_fps())
    if not math.isfinite(fps) or fps <= 0:
        raise InputError("decode", "bad_frame_rate", f"the video reports a frame rate of {fps}")
    try:
        height, width = reader[0].shape[:2]
    except Exception as exc:  # decord raises a bare DECORDError subclass of RuntimeError
        raise InputError("decode", "corrupt_video", f"cannot decode the first frame: {decord_message(exc)}") from None
    try:  # read from the container's index: nothing is decoded
        times = tuple(float(t) for t in reader.get_frame_timestamp(list(range(num_frames)))[:, 0])
    except Exception:  # noqa: BLE001 - without timestamps, frame numbers at the average rate
        times = ()
    cut_short = reader.cut_message() if hasattr(reader, "cut_message") else ""
    return VideoInfo(num_frames=num_frames, fps=fps, width=int(width), height=int(height), times=times,
                     cut_short=cut_short)


def resample_times(times, target_fps: float) -> list[int] | None:
    """Source frames (indices into ``times``, their presentation times in s) for output frames
    evenly spaced in time at ``min(target_fps, the source's average rate)``: output frame k sits
    at ``times[0] + k / fps_out`` and takes the source frame nearest in time (ties to the later).
    A clip whose frames come 33 ms and then 200 ms apart keeps its motion's speed: where the
    source has no frame for a while, its last frame is taken again, as a player shows it.
    None where the times are not a usable time line (not increasing)."""
    t = np.asarray(times, np.float64)
    n = len(t)
    if n < 2 or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        return None
    duration = t[-1] - t[0]
    fps_out = min(target_fps, (n - 1) / duration)
    # A quarter of a source frame's spacing of slack: timestamps are rounded to the container's
    # time base, and a clip 1 ms short of its length must not lose its last frame.
    slack = 0.25 * duration / (n - 1)
    grid = t[0] + np.arange(math.floor((duration + slack) * fps_out) + 1) / fps_out
    right = np.clip(np.searchsorted(t, grid), 1, n - 1)
    left = right - 1
    nearest = np.where(grid - t[left] < t[right] - grid - 1e-9, left, right)  # a tie within float error: later
    return [int(i) for i in nearest]


def resample_indices(num_frames: int, source_fps: float, target_fps: float) -> list[int]:
    """Source frame indices for output frames at ``target_fps``; a slower source is never up-sampled.

    Output frame k sits at time k / fps_out and takes the nearest source frame (frame folders,
    whose rate the data set states; videos go by their timestamps, ``resample_times``).
    """
    if num_frames <= 0:
        return []
    fps_out = min(target_fps, source_fps)
    if fps_out >= source_fps:
        return list(range(num_frames))
    step = source_fps / fps_out
    count = math.floor((num_frames - 1) / step + 1e-9) + 1
    indices: list[int] = []
    for k in range(count):
        idx = min(num_frames - 1, int(math.floor(k * step + 0.5)))
        if not indices or idx != indices[-1]:
            indices.append(idx)
    return indices


# decord's scaling fails for a few small widths whatever the source (2, 3, 4, 6, 8, 12, 16, 24,
# 48 and 72 px: a 16:9 video at --max-side 48), with this in its message: those frames are
# decoded at the source's size and shrunk here instead.
_RESIZE_FAULT = "DECORDArrayCopyFromTo"


def _decoded_then_resized(path, indices: list[int], width: int, height: int, chunk: int = 8) -> np.ndarray:
    import cv2

    reader = _open_video(Path(path))
    out = np.empty((len(indices), height, width, 3), np.uint8)
    for start in range(0, len(indices), chunk):  # a few source frames at a time (4K: 25 MB each)
        for k, frame in enumerate(reader.get_batch(indices[start:start + chunk]).asnumpy()):
            out[start + k] = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    return out


class LastVideo:
    """The video a pipeline actor decoded last, kept open. A call's units are consecutive segments
    of a video far more often than not (Ray Data hands an actor consecutive blocks), so the next
    unit decodes on from where the last one ended; opened anew, each unit seeks back to its
    keyframe and decodes from there (32-frame units of a 720p video with x264's default 250-frame
    GOP: 5x the decoding). Units in any other order still decode right: the reader seeks."""

    def __init__(self):
        self._key: tuple | None = None
        self._reader = None

    def reader(self, path: str | Path, width: int, height: int):
        key = (str(path), int(width), int(height))
        if key != self._key:
            self.close()
            self._reader = open_video(path, width, height)
            self._key = key
        return self._reader

    def close(self) -> None:
        """Lets the reader go (after a failure: a reader that failed is not trusted again)."""
        if self._reader is not None:
            _close(self._reader)
        self._key, self._reader = None, None


def decode_video_frames(
    path: str | Path, indices: list[int], width: int, height: int, reader=None
) -> tuple[np.ndarray, list[float]]:
    """Decode the given source frames at ``width`` x ``height``; returns frames and their times (s).
    ``reader``: the video already opened (``open_video``) by a caller that reads it batch after
    batch in order: opened anew, each batch seeks back to its keyframe and decodes from there (a
    1200-frame 720p video with x264's default 250-frame GOP, in batches of 32: 5x the decoding)."""
    reader = open_video(path, width, height) if reader is None else reader
    try:
        try:
            frames = reader.get_batch(indices).asnumpy()
        except Exception as exc:
            if _RESIZE_FAULT not in str(exc):
                raise
            frames = _decoded_then_resized(path, indices, width, height)
        times = [float(reader.get_frame_timestamp(i)[0]) for i in indices]
    except Exception as exc:
        first, last = indices[0], indices[-1]
        raise InputError(
            "decode", "decode_failed", f"frames {first}..{last}: {decord_message(exc)}"
        ) from None
    return frames, times


def decode_every_frame(path: str | Path, indices: list[int], width: int, height: int,
                       reader=None) -> tuple[np.ndarray, list[float]]:
    """``decode_video_frames`` for a caller that needs every frame (generate's pose video,
    evaluate's): where the batch fails, the error names the frames that do not decode (a video cut
    short: from where it ends); a batch that failed though each frame decodes on its own is
    returned whole."""
    try:
        return decode_video_frames(path, indices, width, height, reader)
    except InputError:
        decoded, failed = salvage_video_frames(path, indices, width, height)
        if not decoded:
            raise
        if failed:
            raise failed[0] from None
        return np.stack([frame for _, frame, _ in decoded]), [time for _, _, time in decoded]


# Readers a segment that failed as a whole may open to decode frame by frame. decord reads a
# file's packet index on opening (a long video: seconds): a video that fails everywhere must not
# cost each of its segments a reader per frame.
SALVAGE_OPENS = 2


def salvage_video_frames(path: str | Path, indices: list[int], width: int, height: int):
    """After a batch of ``indices`` failed to decode: the frames that still do, one at a time on
    one reader. A download cut short decodes up to where it ends (decoded as one batch, the first
    missing packet lost every frame of the segment). A frame that fails is tried once more on a
    fresh reader (decord's decoding thread reads ahead, and a bad packet a few frames on can fail
    a good frame now and then); past ``SALVAGE_OPENS`` readers, the frames left count as failed.
    Returns the decoded frames as (position in ``indices``, frame, time), and the failures as
    InputErrors, one per run of consecutive frames that do not decode."""
    decoded, failed, run = [], [], None
    reader, opens, message = None, 0, ""

    def close_run(last: int) -> None:
        if run is not None:
            failed.append(InputError("decode", "decode_failed", f"frames {indices[run]}..{indices[last]} do not "
                                     f"decode (the file is cut short or damaged there): {message}"))

    for position, index in enumerate(indices):
        frames = None
        while frames is None and (reader is not None or opens < SALVAGE_OPENS):
            try:
                if reader is None:
                    opens += 1
                    reader = open_video(path, width, height)
                frames, times = decode_video_frames(path, [index], width, height, reader)
            except InputError as exc:
                if reader is not None:
                    _close(reader)
                reader, message = None, exc.message.split(": ", 1)[-1]
        if frames is None:
            run = position if run is None else run
            continue
        close_run(position - 1)
        run = None
        decoded.append((position, frames[0], times[0]))
    close_run(len(indices) - 1)
    if reader is not None:
        _close(reader)
    return decoded, failed
