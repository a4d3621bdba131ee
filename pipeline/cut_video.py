"""Videos decord cannot open because FFmpeg meets invalid data in them: most often a download that
stopped part way (its index at the front, its last packet cut in two). decord reads every packet
when it opens a file and gives up at the first bad one, so about two cuts in three lost the whole
video, though every frame before the cut decodes. ``CutVideo`` reads such a file with PyAV up to
where it ends, behind the few methods of decord's ``VideoReader`` that ``decode`` uses, so the
frames before the cut are rows and the ones at it are errors rows, as for a cut file decord opens.
"""

from __future__ import annotations

import os

import numpy as np

from disco.pipeline.errors import InputError

# Decoding on from the last frame decoded instead of seeking, up to this many frames ahead (a
# video's next segment, a resampled rate skipping frames): a seek decodes from a keyframe anyway.
READ_ON_FRAMES = 300


class _Batch:
    def __init__(self, frames: np.ndarray):
        self._frames = frames

    def asnumpy(self) -> np.ndarray:
        return self._frames


class CutVideo:
    """A video read by PyAV: its frames are the packets its container yields before it ends (the
    last one maybe cut in two: that frame fails to decode), upright by its display rotation (as
    decord turns them), at ``width`` x ``height`` where given (the upright size)."""

    def __init__(self, path: str | os.PathLike, width: int = -1, height: int = -1):
        import av

        self.path = os.fspath(path)
        try:
            self._container = av.open(self.path)
        except av.FFmpegError as exc:
            raise InputError("decode", "corrupt_video", f"cannot open the video: {exc}") from None
        try:
            if not self._container.streams.video:
                raise InputError("decode", "no_video_stream", "the file holds no video stream (audio only?)")
            self._stream = self._container.streams.video[0]
            self._stream.thread_count = 1  # one actor per core, as decord's readers are opened
            pts, decoded_by, self._damaged, ends_badly = [], None, 0, False
            try:
                with av.logging.Capture():  # FFmpeg's "partial file" lines, known: not on the console
                    for packet in self._container.demux(self._stream):
                        if packet.is_corrupt:  # (a codec that hides errors would make it a damaged picture)
                            self._damaged, ends_badly = self._damaged + 1, True
                            continue
                        if packet.size and packet.pts is not None:
                            pts.append(int(packet.pts))
                            decoded_by = int(packet.dts if packet.dts is not None else packet.pts)
                            ends_badly = False
            except av.FFmpegError:  # where the file ends: the packets before it are the video
                ends_badly = True
            self._listed = int(self._stream.frames or 0)  # the container's index, where it has one
            self._ends_cut = ends_badly or len(pts) + self._damaged < self._listed
            # Cut short: the frames shown up to the last packet's decoding time. A frame missing
            # past the cut is decoded after it, so shown no earlier (pts >= dts); later ones (a
            # P-frame whose B-frames were cut off) would leave gaps that resampling by time would
            # stretch. (Up to x264's reordering delay, two frames, of those that decode go too.)
            self._pts = sorted(p for p in pts if not self._ends_cut or p <= decoded_by)
            self._index = {p: k for k, p in enumerate(self._pts)}
            base = self._stream.time_base
            # float32 seconds, as decord gives them (a frame's time is the same read either way)
            self._times = np.array([float(p * base) for p in self._pts], np.float32)
            rate = self._stream.average_rate or self._stream.guessed_rate
            self._fps = float(rate) if rate else 0.0
            self._turn = 0
            self._size = (int(width), int(height))
            # MPEG-TS and -PS seek by bytes, and land some keyframes late now and then
            self._seeks_by_bytes = any(name in ("mpegts", "mpeg", "mpegvideo")
                                       for name in self._container.format.name.split(","))
            self._last = None  # index of the last frame decoded, while decoding on is possible
            self._frames = None  # the decoding generator that frame came from
        except BaseException:
            self._container.close()
            raise

    def __len__(self) -> int:
        return len(self._pts)

    def cut_message(self) -> str:
        """What of the video is missing, for its errors row; "" where it reads to its end whole
        (damage in frames that do not decode is their own errors rows)."""
        if not self._ends_cut:
            return (f"{self._damaged} damaged packet(s) of the video left out (FFmpeg reads invalid data): "
                    "their frames are missing") if self._damaged else ""
        if self._listed > len(self._pts):
            return (f"frames {len(self._pts)}..{self._listed - 1} of the {self._listed} it lists are missing: the "
                    "file is cut short or damaged there (FFmpeg reads invalid data)")
        return (f"the file is cut short or damaged after frame {len(self._pts) - 1} (FFmpeg reads invalid data): "
                "what follows is missing")

    def get_avg_fps(self) -> float:
        return self._fps

    def get_frame_timestamp(self, index):
        """[start, end] in seconds per frame, as decord gives them."""
        ends = np.append(self._times[1:], self._times[-1] + (1.0 / self._fps if self._fps else 0.0)) \
            if len(self._times) else self._times
        if isinstance(index, (list, tuple, np.ndarray)):
            return np.stack([self._times[list(index)], ends[list(index)]], axis=1)
        return np.array([self._times[index], ends[index]])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get_batch([index]).asnumpy()[0]

    def get_batch(self, indices) -> _Batch:
        """The frames at ``indices``; raises where one of them does not decode (naming the first)."""
        indices = [int(i) for i in indices]
        if not indices:
            return _Batch(np.zeros((0, max(self._size[1], 0), max(self._size[0], 0), 3), np.uint8))
        for i in indices:
            if not 0 <= i < len(self._pts):
                raise IndexError(f"frame {i} is past the {len(self._pts)} frames of the video")
        wanted = set(indices)
        got: dict[int, np.ndarray] = {}
        first, last = min(wanted), max(wanted)
        import av

        with av.logging.Capture():  # (FFmpeg's lines on the cut packet)
            if self._last is None or not self._last < first <= self._last + READ_ON_FRAMES:
                self._seek(first)
            sought = self._last is None and self._seeks_by_bytes
            while True:
                try:
                    index, frame = next(self._frames)
                except StopIteration:
                    if sought:  # a seek whose frames' times match none listed (MPEG-PS): from the start
                        self._seek(None)
                        sought = False
                        continue
                    self._last = None  # the decoding ended (the file's end, or where it is cut)
                    break
                if sought and index > first:  # the seek landed past the frame: from the start
                    self._seek(None)
                    sought = False
                    continue
                sought = False
                self._last = index
                if index in wanted:
                    got[index] = self._picture(frame)
                if index >= last:
                    break
        missing = [i for i in indices if i not in got]
        if missing:
            self._last = None
            # FFmpeg's own words for it, as decord passes them on (``decode.decord_message``)
            raise RuntimeError(f"frame {missing[0]}: Invalid data found when processing input")
        return _Batch(np.stack([got[i] for i in indices]))

    def _seek(self, index: int | None) -> None:
        """To the keyframe at or before frame ``index``; None: to the file's start."""
        if self._frames is not None:
            self._frames.close()
        if index is None:
            self._container.seek(0, backward=True, any_frame=False)
        else:
            self._container.seek(self._pts[index], stream=self._stream, backward=True, any_frame=False)
        self._last = None
        # (a generator of its own, holding no reference to this reader: dropped, it closes at once)
        self._frames = _decoded(self._container, self._stream, self._index)

    def _picture(self, frame) -> np.ndarray:
        self._turn = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
        width, height = self._size
        if width <= 0 or height <= 0:
            picture = frame.to_ndarray(format="rgb24")  # (the same pixels as decord's)
        else:
            if self._turn % 2:  # the stored picture is the upright one turned a quarter
                width, height = height, width
            # Bilinear: within half a level of decord's scaling on average (bicubic: 2.7 levels)
            picture = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BILINEAR")
        return np.ascontiguousarray(np.rot90(picture, self._turn)) if self._turn else picture

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self._container.close()

    def __del__(self):
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - at interpreter exit
            pass


def _decoded(container, stream, index: dict[int, int]):
    """(index, frame) in decoding order from where ``container`` stands, until it ends; a packet
    that does not decode (one cut in two) is skipped, and the decoder flushed at the end (x264's
    reordering holds its last frames back)."""
    import av

    codec = stream.codec_context
    codec.flush_buffers()
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, av.FFmpegError):
            packet = None
        if packet is not None and packet.is_corrupt:
            continue  # (listed as no frame: ``CutVideo``)
        try:
            frames = codec.decode(packet)
        except av.FFmpegError:
            frames = []
        for frame in frames:
            position = index.get(frame.pts)
            if position is not None:
                yield position, frame
        if packet is None or packet.size == 0 and packet.pts is None:
            return
