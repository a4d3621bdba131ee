"""Throughput of the Ray pipeline against a plain sequential loop over the same frames.

In one process on the same clips: (p) the plain loop a user would write (MediaPipe Holistic once
per frame in its video mode, the same keypoint mapping, encoding and Parquet rows), (s) that
loop in one process per core at once, the clips dealt out (parallelism by hand, nothing in
between: about the most these cores give any parallel run), (a) a sequential loop over the
project's own per-unit code (decode, MediaPipe, encode), (b) the Ray pipeline as the first job
on a fresh local instance and (b2) the same job again on that running instance. Prints
frames/s, CPU time per frame of each loop, the ratios, peak memory, and the ceiling the machine's
cores put on any parallel run: cores / (CPU per frame of the project's loop), against the plain
loop.

    python benchmarks/preprocess_throughput.py [--clips 4] [--seconds 10] [--size 320] [--no-hands]

Why two Ray lines: the first job on an instance also starts Ray Data's own per-cluster actors
(its stats actor, autoscaling coordinator and actor-location tracker, detached: they outlive the
job), about 2 s of start-up on 2 cores; every later job on that instance (``ray job submit`` to a
running cluster, a second ``preprocess`` in one session) starts only its own annotator actors.
Ray's cluster start (``ray.init``) is kept out of both.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakMemory:
    """Samples the resident memory of this process and every process under it (the side-by-side
    loops; the private Ray instance's raylet, GCS and workers) every 0.2 s."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
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


def run_loop(cfg, stats: dict | None = None) -> int:
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
    if stats is not None:  # the same per-unit code runs in Ray's actors
        stats["graph_runs_per_frame"] = annotator.shared["mediapipe"].graph_runs / frames
    return frames


def run_plain_loops_side_by_side(cfg, out: Path, processes: int) -> int:
    """The plain loop in several processes at once, the clips dealt round robin: parallelism by
    hand with nothing in between, what these cores give at most to any parallel run (each process
    pays its own start, as each Ray actor does)."""
    import subprocess

    clips = sorted(Path(cfg.input).glob("*.mp4"))
    parts = []
    for k in range(min(processes, len(clips))):
        part = out / f"in-{k}"
        part.mkdir(parents=True)
        for clip in clips[k::processes]:
            (part / clip.name).symlink_to(clip.resolve())  # the same file, not a copy
        parts.append(part)
    children = [subprocess.Popen([sys.executable, __file__, "--plain-loop", str(part), str(out / f"out-{k}"),
                                  "--hands" if cfg.hands else "--no-hands"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for k, part in enumerate(parts)]
    frames = 0
    for child in children:
        output, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"a side-by-side plain loop exited {child.returncode}")
        frames += int(output.split()[-1])
    return frames


def _cpu_seconds() -> float:
    """CPU time of this process, MediaPipe's graph threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(run, in_process: bool = True) -> dict:
    with PeakMemory() as mem:
        cpu, start = _cpu_seconds(), time.perf_counter()
        frames = run()
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    out = {"frames": frames, "seconds": wall, "frames_per_s": frames / wall, "peak_rss_mib": mem.peak / 2**20}
    if in_process:  # the Ray jobs and the side-by-side loops spend theirs in other processes
        out["cpu_ms_per_frame"] = 1000 * cpu / frames
    return out


def measure(clips: int = 4, seconds: float = 10.0, size: int = 320, hands: bool = True, work: Path | None = None) -> dict:
    """Every line of the comparison, measured one after the other on the same frames."""
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.cluster import init_ray
    from disco.pipeline.run import preprocess

    cores = len(psutil.Process().cpu_affinity()) or 1  # what this process may run on (a container's share)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        make_clips(tmp / "in", clips, seconds, size)

        def config(name: str) -> PreprocessConfig:
            return PreprocessConfig(source="video", input=tmp / "in", output=tmp / name, hands=hands).validate()

        # The one-time imports are paid before any timing: the first line timed would pay them alone.
        import decord  # noqa: F401
        import mediapipe  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        from disco.pipeline.stages import process_unit  # noqa: F401

        plain = _timed(lambda: run_plain_loop(config("plain"), tmp / "plain"))
        side = _timed(lambda: run_plain_loops_side_by_side(config("side"), tmp / "side", cores), in_process=False)
        side["processes"] = min(cores, clips)
        graph: dict = {}
        loop = _timed(lambda: run_loop(config("loop"), graph))
        init_ray(num_cpus=cores)  # cluster start-up is paid once per session, not per job: kept out of the timing
        import ray

        cpus = ray.cluster_resources().get("CPU", 0.0)

        def ray_job(name: str):
            def run() -> int:
                result = preprocess(config(name), log=lambda *_: None)
                return result.manifest["counts"]["frames"]
            return run

        first = _timed(ray_job("ray"), in_process=False)
        again = _timed(ray_job("ray-again"), in_process=False)
    for line in (plain, side, first, again):
        if line["frames"] != loop["frames"]:
            raise RuntimeError(f"the lines saw different frames: {line['frames']} against {loop['frames']}")
    # No parallel run on these cores beats cores / (CPU per frame): the project's loop spends the
    # same CPU per frame as one of Ray's actors (its per-unit code is theirs).
    ceiling = cores * 1000 / loop["cpu_ms_per_frame"]
    return {"frames": loop["frames"], "clips": clips, "size": size, "hands": hands, "cores": cores, "ray_cpus": cpus,
            "plain_loop": plain, "plain_side_by_side": side, "project_loop": loop, "ray_first_job": first, "ray_again": again,
            "graph_runs_per_frame": graph["graph_runs_per_frame"],
            "ratio_first_over_plain": first["frames_per_s"] / plain["frames_per_s"],
            "ratio_again_over_plain": again["frames_per_s"] / plain["frames_per_s"],
            "ratio_first_over_project_loop": first["frames_per_s"] / loop["frames_per_s"],
            "ratio_side_by_side_over_plain": side["frames_per_s"] / plain["frames_per_s"],
            "ceiling_frames_per_s": ceiling, "ceiling_over_plain": ceiling / plain["frames_per_s"]}


def report(m: dict) -> str:
    def line(tag: str, r: dict, note: str) -> str:
        cpu = f", {r['cpu_ms_per_frame']:.1f} ms CPU/frame" if "cpu_ms_per_frame" in r else ""
        return (f"{tag}: {r['frames_per_s']:7.2f} frames/s  ({r['seconds']:.1f} s{cpu})  "
                f"peak RSS {r['peak_rss_mib']:,.0f} MiB  {note}")

    return "\n".join([
        f"frames: {m['frames']} ({m['clips']} clips, {m['size']}px, hands={m['hands']}); cores: {m['cores']}, "
        f"Ray CPUs: {m['ray_cpus']:g}",
        line("(p)  plain user loop   ", m["plain_loop"], "(Holistic once per frame, tracking, same encode)"),
        line("(s)  plain side by side", m["plain_side_by_side"],
             f"({m['plain_side_by_side']['processes']} processes of (p) at once, the clips dealt out: no Ray)"),
        line("(a)  sequential loop   ", m["project_loop"],
             f"(the project's per-unit code: {m['graph_runs_per_frame']:.2f} graph runs per frame)"),
        line("(b)  Ray, first job    ", m["ray_first_job"], "(fresh instance: Ray Data's own actors start too)"),
        line("(b2) Ray, next job     ", m["ray_again"], "(the same job on the running instance)"),
        f"ratio b/p {m['ratio_first_over_plain']:.2f}x   b2/p {m['ratio_again_over_plain']:.2f}x   "
        f"s/p {m['ratio_side_by_side_over_plain']:.2f}x   b/a {m['ratio_first_over_project_loop']:.2f}x",
        f"ceiling on {m['cores']} cores: {m['ceiling_frames_per_s']:.1f} frames/s = "
        f"{m['ceiling_over_plain']:.2f}x the plain loop (cores / the project loop's CPU per frame)",
    ])


def main() -> None:
    if sys.argv[1:2] == ["--plain-loop"]:  # one process of the side-by-side line
        from disco.pipeline.config import PreprocessConfig

        source, out = Path(sys.argv[2]), Path(sys.argv[3])
        cfg = PreprocessConfig(source="video", input=source, output=out, hands=sys.argv[4] == "--hands").validate()
        print(run_plain_loop(cfg, out))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--hands", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    m = measure(args.clips, args.seconds, args.size, args.hands)
    print(report(m))
    if args.json:
        args.json.write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
