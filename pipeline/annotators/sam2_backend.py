"""SAM 2.1 video matting: GroundingDINO person boxes seed SAM 2.1's video predictor on a unit's
first frame, and SAM 2.1 tracks every person's mask through the unit's frames (DESIGN.md: video
masks without per-frame flicker). Where every tracked person is lost, the detector runs again on
that frame and the tracking starts over from there. Stills go through SAM 2.1's image predictor,
one mask per box, as Grounded-SAM does with SAM.

The person detector is Grounded-SAM's (``grounded_sam.PersonDetector``, same weights folder), and
every person's mask is merged into one alpha as there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import Matte
from disco.pipeline.annotators.grounded_sam import (PersonDetector, grounding_dino_files, merge_persons,
                                                    write_grounding_dino)
from disco.pipeline.annotators.registry import Backend, BackendError, register
from disco.pipeline.annotators.weights import WeightFile, WeightsError, loading, needs_folder, require, weights_dir

# Meta's checkpoint names (the files its download script fetches), under the weights folder's
# sam2/, and the model configs that ship inside the sam2 package.
SAM2_MODELS = ("tiny", "small", "base_plus", "large")
SAM2_FILES = {model: f"sam2/sam2.1_hiera_{model}.pt" for model in SAM2_MODELS}
SAM2_CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
DEFAULT_MODEL = "large"
# What SAM 2's own video loader normalises frames with (sam2/utils/misc.py, load_video_frames).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def _model_name(options: dict) -> str:
    model = options.get("sam2_model") or DEFAULT_MODEL
    if model not in SAM2_FILES:
        raise BackendError(f"unknown SAM 2.1 model {model!r}; choose one of {', '.join(SAM2_MODELS)}")
    return model


def weight_files(root: Path | None, options: dict) -> list[WeightFile]:
    """GroundingDINO's files and the SAM 2.1 checkpoint of ``options["sam2_model"]``."""
    root = needs_folder("sam2", root)
    model = _model_name(options)
    name = SAM2_FILES[model]
    return grounding_dino_files(root) + [WeightFile(name, root / name, f"SAM 2.1 Hiera {model}")]


def build_model(sam2_model: str, checkpoint: Path | None = None, device: str = "cpu"):
    """SAM 2.1's video predictor (a SAM2Base, so the image predictor runs on it too) from the
    package's config, with the checkpoint's weights when one is given."""
    import torch

    import sam2  # noqa: F401 - importing the package points hydra at its configs
    from sam2.build_sam import build_sam2_video_predictor

    model = build_sam2_video_predictor(SAM2_CONFIGS[sam2_model], ckpt_path=None, device="cpu")
    if checkpoint is not None:
        # sam2's own loader passes weights_only=True as well, but answers a mismatch with a bare
        # RuntimeError; loading here names the file. Tensors only: a pickle cannot run code.
        with loading(checkpoint):
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise WeightsError(f"{checkpoint}: not a SAM 2.1 checkpoint (no 'model' state dict)")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{checkpoint} does not fit SAM 2.1 Hiera {sam2_model}: "
                               f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
                               f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        # Hole filling needs sam2's compiled extension; without it every frame would fail it, warn
        # and go on unfilled. Skip it outright: the same masks, without the failed attempt.
        model.fill_hole_area = 0
    return model.to(device).eval()


def _native_bfloat16(torch, device) -> bool:
    """Whether ``device`` (CUDA) does bfloat16 arithmetic itself; otherwise SAM 2 runs in float32."""
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


class Sam2Matting:
    """GroundingDINO boxes seed SAM 2.1; video units are tracked, stills segmented one by one."""

    name = "sam2"

    def __init__(self, weights: Path | None, *, sam2_model: str = DEFAULT_MODEL, box_threshold: float = 0.3,
                 text_threshold: float = 0.25, device: str = "cuda", batch_size: int = 8):
        import torch
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.files = weight_files(weights, {"sam2_model": sam2_model})
        require(self.files, self.name)
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        # bfloat16 as SAM 2's own demos run it, on CUDA only (CPU autocast is slow and lossy), and
        # only on GPUs with bfloat16 arithmetic (Ampere on): a V100 or T4 would emulate it, slowly.
        self.bfloat16 = self.device.type == "cuda" and _native_bfloat16(torch, self.device)
        self.detector = PersonDetector(Path(weights), box_threshold=box_threshold, text_threshold=text_threshold,
                                       device=device)
        self.model = build_model(sam2_model, Path(weights) / SAM2_FILES[sam2_model], device)
        self.image_predictor = SAM2ImagePredictor(self.model)
        self.sequence = False
        self._torch = torch

    def shrink_batch(self, frames: int) -> int | None:
        """After a call of ``frames`` frames ran out of GPU memory (``FrameAnnotator.shrink_batch``):
        the stills' batch halved from what the call used; None for a video unit, which SAM 2
        tracks whole, whatever the batch."""
        used = min(self.batch_size, frames)
        if self.sequence or used <= 1:
            return None
        self.batch_size = used // 2
        return self.batch_size

    def begin_unit(self, sequence: bool) -> None:
        """Frames of a video unit are tracked; any other unit's frames are stills."""
        self.sequence = sequence

    def tracks_sequence(self) -> bool:
        return self.sequence

    def matte(self, frame: np.ndarray) -> Matte:
        return self.matte_batch([frame])[0]

    def matte_batch(self, frames: list[np.ndarray]) -> list[Matte]:
        frames = [np.ascontiguousarray(f) for f in frames]
        if not self.sequence:
            return self.segment_stills(frames)
        out: list[Matte] = []
        # A video's frames share one size; a frame folder's might not, and SAM 2 tracks at one size.
        for run in _runs_of_one_size(frames):
            out += self.track(run)
        return out

    @contextlib.contextmanager
    def _sam(self):
        torch = self._torch
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.bfloat16 else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            yield

    # -- stills ------------------------------------------------------------------------------------

    def segment_stills(self, frames: list[np.ndarray]) -> list[Matte]:
        """GroundingDINO boxes, one SAM 2.1 mask per box (the image predictor), merged per frame."""
        out: list[Matte] = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start:start + self.batch_size]
            detections = self.detector.detect(chunk)
            found = [i for i, (boxes, _) in enumerate(detections) if len(boxes)]
            masks: dict[int, np.ndarray] = {}
            if found:
                try:
                    with self._sam():
                        self.image_predictor.set_image_batch([chunk[i] for i in found])
                        predicted, _, _ = self.image_predictor.predict_batch(
                            box_batch=[detections[i][0] for i in found],
                            multimask_output=False,  # one mask per box, as the paper used SAM
                        )
                finally:  # drop the batch's features, also when it failed (the retry needs the memory)
                    self.image_predictor.reset_predictor()
                for i, person_masks in zip(found, predicted):
                    # predict_batch squeezes a lone box's axis away: N x H x W in every case.
                    masks[i] = np.asarray(person_masks).reshape((-1,) + chunk[i].shape[:2]) > 0
            for i, (frame, (boxes, scores)) in enumerate(zip(chunk, detections)):
                none = np.zeros((0,) + frame.shape[:2], bool)
                out.append(merge_persons(frame, scores, masks.get(i, none), self.name))
        return out

    # -- video units -------------------------------------------------------------------------------

    def track(self, frames: list[np.ndarray]) -> list[Matte]:
        """Consecutive frames of one size: persons found on the first frame are tracked through
        the others; on a frame where every one of them is lost (or before anyone was found), the
        detector looks again and the tracking restarts from there."""
        state = self.video_state(frames)
        mattes: list[Matte | None] = [None] * len(frames)
        index = 0
        while index < len(frames):
            boxes, scores = self.detector.detect([frames[index]])[0]
            if len(boxes) == 0:
                mattes[index] = merge_persons(frames[index], scores, np.zeros((0,) + frames[index].shape[:2], bool),
                                       self.name)
                index += 1
                continue
            index = self._follow(state, frames, index, boxes, scores, mattes)
        return mattes

    def _follow(self, state: dict, frames: list[np.ndarray], start: int, boxes: np.ndarray, scores: np.ndarray,
                mattes: list) -> int:
        """One object per box on frame ``start``, propagated; fills ``mattes`` and returns the
        frame where every object was lost (or the frame count)."""
        # One autocast span around the whole propagation: a generator left at a lost frame must
        # not hold the thread's autocast state past this method (``closing`` ends it here).
        with self._sam():
            self.model.reset_state(state)  # a fresh start: no memory of the persons lost before
            for obj_id, box in enumerate(boxes):
                self.model.add_new_points_or_box(state, frame_idx=start, obj_id=obj_id, box=box)
            with contextlib.closing(self.propagate(state, start)) as propagated:
                for frame_index, person_masks in propagated:
                    if frame_index == start:
                        # The seed frame: every box the detector gave counts, as in Grounded-SAM.
                        mattes[frame_index] = merge_persons(frames[frame_index], scores, person_masks, self.name)
                        continue
                    visible = person_masks.reshape(len(person_masks), -1).any(axis=1)
                    if not visible.any():
                        return frame_index
                    # The persons still in view, with the scores of the boxes that seeded them.
                    mattes[frame_index] = merge_persons(frames[frame_index], scores[visible], person_masks[visible],
                                                 self.name)
        return len(frames)

    def propagate(self, state: dict, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """(frame index, objects x H x W bool masks at the frames' size) from ``start`` on."""
        for frame_index, _, logits in self.model.propagate_in_video(state, start_frame_idx=start):
            yield frame_index, (logits[:, 0] > 0).cpu().numpy()

    def video_state(self, frames: list[np.ndarray]) -> dict:
        """SAM 2's inference state for in-memory frames: what its ``init_state`` builds from a
        folder of JPEGs (``load_video_frames``): the frames resized to ``image_size`` square,
        scaled to 0..1 and normalised, and the video's height and width; nothing written to disk."""
        from collections import OrderedDict

        from PIL import Image

        torch = self._torch
        size = self.model.image_size
        # PIL's resize, as SAM 2's JPEG loader does (bicubic for RGB).
        resized = np.stack([np.asarray(Image.fromarray(f).convert("RGB").resize((size, size), Image.BICUBIC))
                            for f in frames])
        images = torch.from_numpy(resized).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(IMAGE_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(IMAGE_STD, device=self.device)[:, None, None]
        images = (images - mean) / std
        height, width = frames[0].shape[:2]
        return {
            "images": images, "num_frames": len(frames),
            "offload_video_to_cpu": False, "offload_state_to_cpu": False,
            "video_height": height, "video_width": width,
            "device": self.device, "storage_device": self.device,
            "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
            "cached_features": {}, "constants": {},
            "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
            "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
        }


def _runs_of_one_size(frames: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    run: list[np.ndarray] = []
    for frame in frames:
        if run and frame.shape[:2] != run[0].shape[:2]:
            yield run
            run = []
        run.append(frame)
    if run:
        yield run


# -- random weights of the real architecture (tests, benchmarks) -------------------------------------

def write_sam2(root: Path, sam2_model: str = "tiny", seed: int = 0) -> Path:
    """A SAM 2.1 checkpoint of ``sam2_model``'s architecture with random weights, saved as Meta's
    files are (``{"model": state_dict}``)."""
    import torch

    torch.manual_seed(seed)
    path = Path(root) / SAM2_FILES[sam2_model]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": build_model(sam2_model).state_dict()}, path)
    return path


def _random_weights(root: Path, size: str, options: dict) -> None:
    # GroundingDINO shrinks with ``size``; SAM 2.1's smallest real network is the "tiny" model.
    write_grounding_dino(root, size)
    write_sam2(root, options.get("sam2_model") or "tiny")


def _build(role: str, options: dict, shared: dict) -> Sam2Matting:
    return Sam2Matting(
        weights_dir(options.get("weights")), sam2_model=_model_name(options),
        box_threshold=options.get("box_threshold", 0.3), text_threshold=options.get("text_threshold", 0.25),
        device=options.get("device", "cuda"), batch_size=options.get("batch_size", 8),
    )


register(Backend(
    name="sam2", roles=("matting",), build=_build, gpu=True, auto=True,
    summary="GroundingDINO person boxes seed SAM 2.1, which tracks the masks through each video unit",
    packages=("sam2", "transformers"), files=weight_files, random_weights=_random_weights,
    options=("--sam2-model", "--box-threshold", "--text-threshold", "--batch-size"),
    # A person is a box GroundingDINO proposed: its own box threshold is the detection score to reach.
    person_score=lambda options, min_visibility: options.get("box_threshold", 0.3),
))
