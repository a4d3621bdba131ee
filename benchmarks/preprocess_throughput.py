"""Throughput of the Ray pipeline against a plain sequential loop over the same frames.

Both paths call the same code (plan_units -> process_unit: decode, MediaPipe, encode) on the same
clips, in one process. Prints frames/s of each, the ratio ray/loop and peak memory.

    python benchmarks/preprocess_throughput.py [--clips 4] [--seconds 10] [--size 320] [--no-hands]

Ray's fixed start-up (its own actors, then the annotator actors: about 4 s on 2 cores) weighs on
short runs; pass more --seconds to see the steady state.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _ray_processes() -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmd and ("default_worker" in cmd or "raylet" in cmd or "gcs_server" in cmd):
            out.append(proc)
    return out


class PeakMemory:
    """Samples the resident memory of this process plus Ray's processes every 0.2 s."""

    def __init__(self, include_ray: bool):
        self.include_ray = include_ray
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me] + (_ray_processes() if self.include_ray else [])
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_clips(folder: Path, clips: int, seconds: float, size: int) -> None:
    from skimage import data

    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    photos = [data.astronaut(), data.camera()]
    for k in range(clips):
        photo = photos[k % len(photos)]
        if photo.ndim == 2:
            photo = photo[..., None].repeat(3, axis=2)
        write_video(folder / f"clip{k}.mp4", pan_zoom_frames(photo, int(seconds * 30), size), 30.0)


def run_plain_loop(cfg, out: Path) -> int:
    """What a user would write without this project: decode each clip, run MediaPipe Holistic once
    per frame in its video (tracking) mode, and encode and write the same rows (the project's
    keypoint mapping and row builder, so the work per frame is the same)."""
    import decord
    import mediapipe as mp
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from disco.pipeline.annotators import Annotation
    from disco.pipeline.annotators.base import Matte, Pose
    from disco.pipeline.store.encode import build_row
    from disco.pipeline.annotators.keypoints import blazepose_to_body18, hand_to_pixels
    from disco.pipeline.store.schema import TRIPLET_SCHEMA

    def points(landmarks):
        return None if landmarks is None else np.array([(p.x, p.y, p.visibility) for p in landmarks.landmark])

    out.mkdir(parents=True)
    frames = 0
    for clip in sorted(Path(cfg.input).glob("*.mp4")):
        rows = []
        # Holistic for hands (as MediaPipe's docs show it), BlazePose alone without.
        graph = mp.solutions.holistic.Holistic if cfg.hands else mp.solutions.pose.Pose
        with graph(model_complexity=1, enable_segmentation=True) as holistic:
            for index, frame in enumerate(decord.VideoReader(str(clip))):
                frame = frame.asnumpy()
                result = holistic.process(frame)
                frames += 1
                landmarks = points(result.pose_landmarks)
                if landmarks is None or result.segmentation_mask is None:
                    continue
                height, width = frame.shape[:2]
                alpha = np.clip(np.round(result.segmentation_mask * 255.0), 0, 255).astype(np.uint8)
                hands = None
                if cfg.hands and (result.left_hand_landmarks or result.right_hand_landmarks):
                    hands = np.stack([hand_to_pixels(points(result.left_hand_landmarks), width, height),
                                      hand_to_pixels(points(result.right_hand_landmarks), width, height)])
                pose = Pose(body=blazepose_to_body18(landmarks, width, height, cfg.joint_threshold), hands=hands)
                matte = Matte(alpha, float(landmarks[[0, 11, 12], 2].mean()), 1, "blazepose")
                unit = {"source": "video", "clip_id": clip.stem, "split": "train", "input_path": clip.name}
                rows.append(build_row(unit, index, index / 30, frame, Annotation(matte, pose, True),
                                      image_format=cfg.image_format, jpeg_quality=cfg.jpeg_quality,
                                      pose_style=cfg.pose_style, with_pose=True))
        pq.write_table(pa.Table.from_pylist(rows, schema=TRIPLET_SCHEMA), out / f"{clip.stem}.parquet")
    return frames


def run_loop(cfg) -> int:
    from disco.pipeline.annotators import FrameAnnotator, resolve_backends
    from disco.pipeline.run import stage_settings
    from disco.pipeline.sources.generic import list_inputs
    from disco.pipeline.stages import plan_units, process_unit

    cfg.resolved = resolve_backends(cfg.matting, cfg.pose)
    settings = stage_settings(cfg)
    annotator = FrameAnnotator(settings["matting"], settings["pose"], settings["hands"], settings["min_visibility"],
                               settings["min_mask_area"], settings["joint_threshold"])
    frames = 0
    for item in list_inputs(cfg.source, cfg.input, cfg.split).items:
        for unit in plan_units(item.to_dict(), settings):
            frames += process_unit(unit, annotator, settings).unit["frames"]
    print(f"graph runs per frame (project code, the same per unit in Ray's actors): "
          f"{annotator.shared['mediapipe'].graph_runs / frames:.2f}")
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--hands", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.cluster import init_ray
    from disco.pipeline.run import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_clips(tmp / "in", args.clips, args.seconds, args.size)

        def config(name: str) -> PreprocessConfig:
            return PreprocessConfig(source="video", input=tmp / "in", output=tmp / name, hands=args.hands).validate()

        with PeakMemory(include_ray=False) as mem_plain:
            start = time.perf_counter()
            plain_frames = run_plain_loop(config("plain"), tmp / "plain")
            plain_s = time.perf_counter() - start

        with PeakMemory(include_ray=False) as mem_loop:
            start = time.perf_counter()
            loop_frames = run_loop(config("loop"))
            loop_s = time.perf_counter() - start

        init_ray()  # cluster start-up is paid once per session, not per job: kept out of the timing
        import ray

        cpus = ray.cluster_resources().get("CPU")
        with PeakMemory(include_ray=True) as mem_ray:
            start = time.perf_counter()
            result = preprocess(config("ray"), log=lambda *_: None)
            ray_s = time.perf_counter() - start
        ray_frames = result.manifest["counts"]["frames"]
        assert ray_frames == loop_frames, (ray_frames, loop_frames)

    loop_fps, ray_fps, plain_fps = loop_frames / loop_s, ray_frames / ray_s, plain_frames / plain_s
    print(f"frames: {loop_frames} ({args.clips} clips, {args.size}px, hands={args.hands}); Ray CPUs: {cpus}")
    print(f"(p) plain user loop : {plain_fps:7.2f} frames/s  ({plain_s:.1f} s)  peak RSS {mem_plain.peak / 2**20:,.0f} MiB "
          "(Holistic once per frame, tracking, same encode)")
    print(f"(a) sequential loop : {loop_fps:7.2f} frames/s  ({loop_s:.1f} s)  peak RSS {mem_loop.peak / 2**20:,.0f} MiB "
          "(the project's per-unit code)")
    print(f"(b) Ray pipeline    : {ray_fps:7.2f} frames/s  ({ray_s:.1f} s)  peak RSS {mem_ray.peak / 2**20:,.0f} MiB "
          f"(driver + Ray processes)")
    print(f"ratio b/a           : {ray_fps / loop_fps:.2f}x")
    print(f"ratio b/p           : {ray_fps / plain_fps:.2f}x")


if __name__ == "__main__":
    main()
