"""``disco-cli generate``: a person, a background and a pose sequence -> a video."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from disco.model.checkpoint import (background_hole, describe_checkpoint, load_checkpoint, trained_drawing,
                                    trained_resolution)
from disco.generate.config import GenerateConfig
from disco.model.conditioning import (
    HOLE,
    background_pixels,
    check_size,
    default_size,
    pose_pixels,
    pose_size,
    reference_pixels,
)
from disco.generate.inputs import (
    GenerateInputError,
    annotator_backends,
    check_pose_folder,
    finds_faces,
    matte_reference,
    poses_from_triplets,
    poses_from_video,
    probe_pose_video,
    read_picture,
    scale_keypoints,
)
from disco.model.pipeline import DisCoPipeline
from disco.model.precision import gpu_devices, on_cuda
from disco.generate.partial import PartialFrames, file_identity
from disco.pipeline.store.schema import MANIFEST_FILE
from disco.generate.video import side_by_side, write_frames, write_video


@dataclass
class GenerateResult:
    video: Path
    frames: int
    size: int
    fps: float
    empty_poses: int
    seconds: float
    side_by_side: Path | None = None
    frames_dir: Path | None = None


def conditions_from_reference(pipeline: DisCoPipeline, reference: np.ndarray, size: int,
                              background: np.ndarray | None = None, annotator=None, with_pose: bool = False,
                              on_matte: Callable | None = None, device: str | None = None):
    """Reference photo (and optional other scene) -> the CLIP input and background tensors (the
    reference's own background has the person's hole, mid grey; another scene has none).
    ``with_pose``: the reference's pose is found too; ``on_matte`` is given the matted ``Reference``."""
    matted = matte_reference(reference, size, annotator, with_pose=with_pose, device=device)
    if on_matte is not None:
        on_matte(matted)
    if background is None:
        return reference_pixels(matted.image, matted.alpha), background_pixels(matted.background, size, matted.alpha,
                                                                                getattr(pipeline, "background_hole", HOLE))
    return reference_pixels(matted.image, matted.alpha), background_pixels(background, size)


def reference_target(matted: list, size: int, side: int) -> np.ndarray | None:
    """The reference's body keypoints (``matte_reference(..., with_pose=True)``, pixels of the
    ``size`` square) in pixels of the ``side`` px pose pictures; None when no pose was found."""
    if not matted or matted[0].pose is None:
        return None
    return scale_keypoints(matted[0].pose, side / size)


def sampling_line(config: GenerateConfig, frames: int, size: int) -> str:
    """The line that starts sampling: what is generated, how, and in what precision where. float32
    on a GPU says what --dtype float16 gains there (2.85x frames/s on an H200, full-size model:
    README, Benchmarks); float32 stays the default, so frames match the ones evaluate scores."""
    line = (f"generating {frames} frames of {size} x {size} px, {config.steps} DDIM steps, "
            f"guidance {config.guidance_scale}, seed {config.seed}, {config.dtype} on {config.device}")
    if config.dtype == "float32" and on_cuda(config.device):
        line += " (--dtype float16 samples about 2.8x faster on a GPU)"
    return line


def native_size(checkpoint: Path, model) -> int:
    """The side a model was trained at: its training run's, else the model's own (256 for the full one)."""
    return trained_resolution(checkpoint) or default_size(model)


# Past this many times the side a model was trained at, ``--size`` is said to be far from it.
FAR_FROM_NATIVE = 2


def open_pipeline(checkpoint: Path, device: str, size: int | None, ema: bool = True,
                  dtype: str = "float32", gpus: int = 1, log: Callable[[str], None] = print) -> tuple[DisCoPipeline, int, int]:
    """The sampling pipeline of a checkpoint (its EMA weights where it kept them, unless ``ema`` is
    False; its weights in ``dtype``; on ``gpus`` GPUs from ``device`` on), the frame side (default: a
    training run's resolution, else the model's) and the pose side."""
    source = describe_checkpoint(checkpoint, ema)
    if source.get("stage") == "pretrain":
        # Said before the model loads (a minute at full size on a CPU), as DisCoPipeline would after.
        raise GenerateInputError(f"{checkpoint} is a pre-training (HAP) run, without a pose ControlNet; generation "
                                 "needs a fine-tuned model")
    # The folder resolved once: a run still training may write a newer checkpoint meanwhile.
    # Cast on its way to the device (a cast to float32 makes diffusers warn about modules kept in float32).
    model = load_checkpoint(source.get("checkpoint", checkpoint), device=device, ema=ema,
                            dtype=None if dtype == "float32" else getattr(torch, dtype))
    pipeline = DisCoPipeline(model)
    try:
        pipeline.spread(gpu_devices(device, gpus)[1:])
    except ValueError as exc:  # a temporal-module model
        raise GenerateInputError(f"--gpus {gpus}: {exc}") from None
    pipeline.background_hole = background_hole(checkpoint)  # the hole value it was trained with
    pipeline.source = source  # for the records: which checkpoint and weights
    native = native_size(checkpoint, model)
    if size and size > FAR_FROM_NATIVE * native:  # (a typo's extra digit: minutes a frame, or the GPU's memory)
        log(f"warning: --size {size} is {size / native:.3g} times the side this model was trained at ({native} px): "
            f"each frame costs at least {(size / native) ** 2:.0f} times the time and memory, and a model this far "
            "from its training size draws repeated or broken figures")
    size = size or native  # a run generates at its training side
    try:
        check_size(model, size)
    except ValueError as exc:
        raise GenerateInputError(f"--size: {exc}") from None
    return pipeline, size, pose_size(model, size)


# The phases ``generate`` reports progress in: the driving video's frames annotated, then frames generated.
ANNOTATE, GENERATE = "annotating poses", "generating"


def generate(config: GenerateConfig, log: Callable[[str], None] = print,
             progress: Callable[[int, int, str], None] | None = None) -> GenerateResult:
    """``progress(done, total, phase)``: frames of ``phase`` (ANNOTATE, then GENERATE) done so far."""
    config.validate()
    started = time.time()
    # The driving poses are drawn as the model's training poses were (its run's config.yaml and
    # the manifests of the data it trained on, where they are found).
    drawing = trained_drawing(config.checkpoint)
    style, hands = drawing.style, drawing.hands
    # Inputs that cannot be read are refused before the model loads (a minute and GBs at full size).
    if config.clip is not None:
        check_pose_folder(config.pose, style, hands, drawing.face)  # pictures it cannot redraw
    else:
        probe_pose_video(config.pose)
    reference = read_picture(config.reference, "reference picture")
    background = read_picture(config.background, "background picture") if config.background else None
    pipeline, size, side = open_pipeline(config.checkpoint, config.device, config.size, ema=config.ema,
                                         dtype=config.dtype, gpus=config.gpus, log=log)
    matted = []
    reference_in, background_in = conditions_from_reference(pipeline, reference, size, background,
                                                            with_pose=config.align_pose, on_matte=matted.append,
                                                            device=config.device)
    # --align-pose: the driving skeletons refitted to the reference person (its pose, in pose-picture pixels).
    target = reference_target(matted, size, side) if config.align_pose else None
    fps = config.fps
    if fps is None and getattr(getattr(pipeline, "model", None), "temporal", None) is not None:
        # A temporal module learnt the motion between frames of clips preprocess took at its --fps
        # (its data's manifest; 30 by default; a slower source kept its own): a 60 fps phone video
        # would give it half the motion per frame it was trained on. Never up-sampled (24 stays 24).
        fps = drawing.fps
        log(f"a temporal-module model: the poses are taken at {fps:g} fps at most, as its training clips were "
            "(--fps to choose)")
    face = drawing.face and (config.clip is not None or finds_faces(config.device))
    if drawing.face and not face:
        log("the model learnt face points, which the pose annotator here does not find: the driving poses have none")
    if config.clip is not None:
        poses = poses_from_triplets(config.pose, config.clip, side, style=style, hands=hands, reference=target,
                                    fps=fps, max_frames=config.max_frames, face=face)
    else:
        poses = poses_from_video(config.pose, side, fps=fps, style=style, hands=hands, face=face,
                                 max_side=drawing.max_side,
                                 smooth=config.smooth_poses, reference=target, max_frames=config.max_frames,
                                 device=config.device,
                                 progress=None if progress is None else lambda done, total: progress(done, total, ANNOTATE))
    unaligned = None if not config.align_pose or poses.alignment else \
        "no pose found in the reference picture" if target is None else "no skeleton in the pose source to measure"
    if poses.cut_short:  # the frames before the cut drive the model; the user must know the rest are not there
        log(f"warning: the pose video {config.pose} is cut short: {poses.cut_short}; the frames before the cut are used")
    if poses.alignment:
        log(f"poses aligned to the reference person (scale {poses.alignment['scale']:.3g})")
    elif unaligned:
        log(f"{unaligned}: the driver's skeletons are drawn as they are")
    frames_in = poses.frames  # --max-frames: cut before any frame was decoded or annotated
    if poses.empty:
        log(f"{poses.empty} of {len(poses.frames)} pose frames show no person: they get an empty skeleton")
    log(sampling_line(config, len(frames_in), size))
    pose_in = pose_pixels(frames_in, side)
    partial, finished = None, {}
    source = getattr(pipeline, "source", None)
    # (A TM model's windows are blended at every step: nothing to keep.)
    if source is not None and getattr(pipeline.model, "temporal", None) is None:
        partial = PartialFrames(config.output, partial_key(config, source, size, len(pose_in), drawing))
        finished = partial.resume(len(pose_in), (size, size, 3))
        if finished:
            log(f"resuming: {len(finished)} of {len(pose_in)} frames were generated by a run that stopped (kept in "
                f"{partial.folder})")
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(frames_in), GENERATE)

    if finished:
        step(len(finished))
    frames = pipeline(reference_in, background_in, pose_in, num_inference_steps=config.steps,
                      guidance_scale=config.guidance_scale, seed=config.seed, batch_size=config.batch_size,
                      progress=step, done=finished, on_batch=None if partial is None else partial.save)
    del pose_in, finished  # (a long video's copies: the side-by-side and the frames files come next)
    fps = poses.fps  # the rate the poses were taken at: --fps above the source's would play them too fast
    write_video(config.output, frames, fps)
    result = GenerateResult(video=config.output, frames=len(frames), size=size, fps=fps, empty_poses=poses.empty,
                            seconds=0.0)
    if config.side_by_side:
        result.side_by_side = config.output.with_name(config.output.stem + "_side_by_side.mp4")
        write_video(result.side_by_side, side_by_side(frames_in, frames), fps)
    if config.frames is not None:
        write_frames(config.frames, frames)
        result.frames_dir = config.frames
    result.seconds = time.time() - started
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    record = {"settings": settings, "checkpoint": getattr(pipeline, "source", None),
              "frames": result.frames, "size": size, "fps": fps,
              "empty_poses": poses.empty, "wall_time_s": round(result.seconds, 3),
              "align_pose": {"ran": poses.alignment is not None, **(poses.alignment or {}),
                             **({"skipped": unaligned} if unaligned else {})},
              "smooth_poses": poses.smoothed, **({"pose_video_cut_short": poses.cut_short} if poses.cut_short else {})}
    config.output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    if partial is not None:
        partial.finish()
    return result


def pose_data_key(drawing, config: GenerateConfig) -> dict:
    """The training data's frame size and face points in the key where the drawing is not what
    it was before they were read (the frames a run kept then stay valid where it is): a frame
    size or face points other than the defaults, or a clip's stored face points drawn out."""
    from disco.pipeline.store.pose import DataPose, data_pose

    if drawing is None:
        return {}
    redrawn = config.clip is not None and data_pose(config.pose).face and not drawing.face
    if (drawing.max_side, drawing.face) == (DataPose.max_side, DataPose.face) and not redrawn:
        return {}
    return {"pose_data": {"max_side": drawing.max_side, "face": drawing.face}}


def partial_key(config: GenerateConfig, source: dict, size: int, frames: int, drawing=None) -> dict:
    """What a run's frames depend on (``generate/partial.py``): the checkpoint and the input files
    (by content), the settings that make the poses and the frames (not the batch size or the number
    of GPUs: a frame's noise is its own, and its values differ by a grey level at most), and the
    annotators that matte the reference and find the driving poses (``auto`` picks by machine: a
    run that stopped on a GPU node with $DISCO_WEIGHTS, resumed on the CPU, would join frames
    driven by two pose models)."""
    weights = source.get("checkpoint", source.get("path"))
    # The reference's pose is found too where --align-pose fits the driving skeletons to it.
    backends = annotator_backends(config.clip is None or config.align_pose, config.device)
    settings = ("clip", "steps", "guidance_scale", "seed", "fps", "max_frames", "align_pose", "smooth_poses", "ema",
                "dtype")
    return {"checkpoint": {**source, "files": file_identity(weights)}, "size": size, "frames": frames,
            # A `preprocess` folder (--clip) by its manifest, rewritten by every run that adds to it.
            "inputs": {"reference": file_identity(config.reference), "background": file_identity(config.background),
                       "pose": file_identity(config.pose / MANIFEST_FILE if config.clip else config.pose)},
            "annotators": {"matting": backends["matting"], "pose": backends["pose"]},
            # How a driving video's skeletons are drawn: 2 since they are drawn as training drew
            # them (``generate.inputs.drawing_side``); frames kept from before are not joined. Then
            # the training data's frame size and face points (``trained_drawing``).
            "pose_drawing": 2, **pose_data_key(drawing, config),
            **{name: getattr(config, name) for name in settings}}
