"""Frames/s of each annotator and of the whole pipeline; on a GPU, Grounded-SAM loaded once and
batched against the reference scripts' way (SAM and the detector rebuilt for every image).

    python benchmarks/annotators.py --weights DIR               # real weights, CUDA
    python benchmarks/annotators.py --random-weights full       # no weights: SwinT-OGC / SAM / OpenPose
                                                                # architectures with random values
    python benchmarks/annotators.py --device cpu --random-weights small --sam-model vit_b --frames 4

All figures come from one process, on the same frames (a clip panned over scikit-image's
astronaut photo). Random weights time the same computation as real ones except for the number of
boxes GroundingDINO proposes, which is fixed here by keeping the best ``--boxes`` per frame (in
this process; the whole-pipeline run keeps the pipeline's own limit).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _frames(count: int, size: int) -> list[np.ndarray]:
    from skimage import data

    from disco.pipeline.demo_data import pan_zoom_frames

    return [np.ascontiguousarray(f) for f in pan_zoom_frames(data.astronaut(), count, size)]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder in the documented layout")
    parser.add_argument("--random-weights", choices=("small", "full"), help="build random weights instead")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--sam-model", default="vit_h", choices=("vit_h", "vit_l", "vit_b"))
    parser.add_argument("--sam2-model", default="large", choices=("tiny", "small", "base_plus", "large"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="long side of the frames")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=2, help="person boxes per frame kept for SAM")
    parser.add_argument("--reload-images", type=int, default=4, help="images for the reload-per-image loop")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the whole preprocess job (Ray, GPU pipeline)")
    args = parser.parse_args()

    import torch

    from disco.pipeline.annotators import FrameAnnotator, grounded_sam, registry
    from disco.pipeline.annotators.grounded_sam import GroundedSamMatting
    from disco.pipeline.annotators.openpose_backend import OpenPosePose
    from disco.pipeline.annotators.random_weights import write_random_weights

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grounded_sam.MAX_BOXES = args.boxes
    tmp = tempfile.TemporaryDirectory()
    weights = args.weights
    if weights is None:
        if args.random_weights is None:
            parser.error("pass --weights DIR, or --random-weights small|full")
        weights = write_random_weights(Path(tmp.name) / "weights", size=args.random_weights, sam_model=args.sam_model,
                                       sam2_model=args.sam2_model)
    threshold = 0.0 if args.random_weights else 0.3  # random detectors score near chance
    frames = _frames(args.frames, args.size)
    print(f"device: {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'}), "
          f"{len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}, SAM {args.sam_model}, "
          f"weights: {'random ' + args.random_weights if args.random_weights else weights}")

    def gsam() -> GroundedSamMatting:
        return GroundedSamMatting(weights, sam_model=args.sam_model, box_threshold=threshold,
                                  text_threshold=threshold, device=device, batch_size=args.batch_size)

    results = {}
    mp = FrameAnnotator("mediapipe", "mediapipe", hands=True, min_visibility=0.5, min_mask_area=0.01)
    mp.annotate(frames[0])  # warm-up
    results["mediapipe matting+pose (CPU)"] = len(frames) / _timed(lambda: [mp.annotate(f) for f in frames], "cpu")
    mp.close()

    matting = gsam()
    matting.matte_batch(frames[:1])  # warm-up (CUDA kernels, allocator)
    results["grounded-sam, loaded once, batched"] = len(frames) / _timed(lambda m=matting: m.matte_batch(frames), device)
    once_per_image = len(frames) / _timed(lambda m=matting: [m.matte_batch([f]) for f in frames], device)
    results["grounded-sam, loaded once, one image at a time"] = once_per_image

    reload_frames = frames[: args.reload_images]

    def reload_loop():
        for f in reload_frames:
            gsam().matte_batch([f])  # the reference scripts rebuilt SAM for every image

    results["grounded-sam, reloaded per image (reference scripts)"] = len(reload_frames) / _timed(reload_loop, device)
    del matting

    pose = OpenPosePose(weights, hands=True, face=False, device=device)
    pose.pose(frames[0])
    results["openpose body+hands"] = len(frames) / _timed(lambda p=pose: [p.pose(f) for f in frames], device)
    del pose

    # The field's newer annotators, where this install has them: DWPose (whole body, ONNX Runtime)
    # and SAM 2 tracking the GroundingDINO-seeded masks through the frames as one video unit.
    options = dict(weights=str(weights), device=device, sam_model=args.sam_model, sam2_model=args.sam2_model,
                   box_threshold=threshold, text_threshold=threshold, batch_size=args.batch_size)
    if "dwpose" in registry.choices("pose"):
        dwpose = FrameAnnotator("mediapipe", "dwpose", hands=True, min_visibility=0.5, min_mask_area=0.01,
                                roles=("pose",), **options)
        dwpose.pose_of(frames[0])
        results["dwpose whole body"] = len(frames) / _timed(lambda a=dwpose: [a.pose_of(f) for f in frames], device)
        dwpose.close()
    if "sam2" in registry.choices("matting"):
        sam2 = FrameAnnotator("sam2", "none", hands=False, min_visibility=0.5, min_mask_area=0.01,
                              roles=("matting",), **options)

        def track(a=sam2):
            a.begin_unit({"kind": "video"})
            a.matte_batch(frames)

        sam2.begin_unit({"kind": "image"})
        sam2.matte_batch(frames[:1])  # warm-up
        results[f"sam2 {args.sam2_model}, one video unit"] = len(frames) / _timed(track, device)
        sam2.close()

    if args.pipeline:
        from disco.pipeline.config import PreprocessConfig
        from disco.pipeline.demo_data import write_video
        from disco.pipeline.cluster import init_ray
        from disco.pipeline.run import preprocess

        clip = Path(tmp.name) / "in"
        write_video(clip / "clip.mp4", frames, 30.0)
        init_ray()
        cfg = PreprocessConfig(source="video", input=clip, output=Path(tmp.name) / "out", matting="grounded-sam",
                               pose="openpose", weights=weights, device=device, sam_model=args.sam_model,
                               box_threshold=threshold, text_threshold=threshold, batch_size=args.batch_size,
                               max_side=args.size, min_mask_area=0.0,
                               **({"matting_gpus": 0.0, "pose_gpus": 0.0} if device == "cpu" else {}))
        start = time.perf_counter()
        result = preprocess(cfg, log=lambda *_: None)
        wall = time.perf_counter() - start
        processed = result.manifest["run"]["frames_processed"]
        results["whole pipeline (decode, grounded-sam, openpose, encode, write)"] = processed / wall

    width = max(len(k) for k in results)
    for name, fps in results.items():
        print(f"{name:<{width}} : {fps:8.2f} frames/s")
    base = results["grounded-sam, reloaded per image (reference scripts)"]
    print(f"{'ratio: batched, loaded once / reloaded per image':<{width}} : "
          f"{results['grounded-sam, loaded once, batched'] / base:8.2f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
