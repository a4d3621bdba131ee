"""Grounded-SAM matting as DisCo made its data: GroundingDINO SwinT-OGC finds "person" boxes, SAM
turns each box into one mask, and every person's mask is merged into one.

GroundingDINO runs through transformers' port of the SwinT-OGC network: the `groundingdino-py`
package cannot build its text branch with transformers 5 (its BERT wrapper calls methods that
release removed), and the transformers checkpoint is the same network converted. The original
checkpoint (groundingdino_swint_ogc.pth) is read too, converted at load
(grounding_dino_checkpoint.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from disco.pipeline.annotators.base import Matte
from disco.pipeline.annotators.grounding_dino_checkpoint import CHECKPOINT_NAME
from disco.pipeline.annotators.registry import Backend, register
from disco.pipeline.annotators.weights import WeightFile, first_present, loading, needs_folder, require, weights_dir

PROMPT = "person."
# Boxes handed to SAM per frame, best first; bounds the cost of a crowd or of a detector gone wrong.
MAX_BOXES = 32


# In the weights folder: GroundingDINO SwinT-OGC in the transformers layout (the
# IDEA-Research/grounding-dino-tiny folder: config, weights, image processor and the BERT tokenizer
# it needs), or instead the original checkpoint alone (groundingdino_swint_ogc.pth, the file the
# Grounded-Segment-Anything instructions download), and the segment-anything checkpoints as Meta
# publishes them (only the selected variant).
GROUNDING_DINO_DIR = "grounding-dino"
GROUNDING_DINO_FILES = ("config.json", "tokenizer_config.json")
# Either name holds the image processor (the hub folder has the first, transformers 5 writes the second).
GROUNDING_DINO_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
GROUNDING_DINO_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SAM_FILES = {
    "vit_h": "sam/sam_vit_h_4b8939.pth",
    "vit_l": "sam/sam_vit_l_0b3195.pth",
    "vit_b": "sam/sam_vit_b_01ec64.pth",
}


def _original_checkpoint(folder: Path) -> Path | None:
    """The original checkpoint, when the folder holds it and no transformers layout (whose
    config.json wins: it is what ``disco-cli convert-weights`` writes beside the .pth)."""
    path = folder / CHECKPOINT_NAME
    return path if path.exists() and not (folder / GROUNDING_DINO_FILES[0]).exists() else None


def grounding_dino_files(root: Path) -> list[WeightFile]:
    """The GroundingDINO files read from the weights folder (Grounded-SAM, and SAM 2's seeds): the
    original checkpoint where the folder holds only that, else the transformers layout's files."""
    folder = root / GROUNDING_DINO_DIR
    original = _original_checkpoint(folder)
    if original is not None:
        return [WeightFile(f"{GROUNDING_DINO_DIR}/{CHECKPOINT_NAME}", original,
                           "GroundingDINO SwinT-OGC original checkpoint, converted at load")]
    files = [WeightFile(f"{GROUNDING_DINO_DIR}/{n}", folder / n, "GroundingDINO SwinT-OGC") for n in GROUNDING_DINO_FILES]
    if not folder.joinpath(GROUNDING_DINO_FILES[0]).exists():
        # Neither layout is there: the missing-files error names the other way too.
        files[0].purpose = (f"GroundingDINO SwinT-OGC in the transformers layout; or instead the original "
                            f"checkpoint alone, {GROUNDING_DINO_DIR}/{CHECKPOINT_NAME}")
    for names, purpose in ((GROUNDING_DINO_PROCESSOR, "GroundingDINO image processor"),
                           (GROUNDING_DINO_WEIGHTS, "GroundingDINO SwinT-OGC weights")):
        path = first_present(folder, names)
        files.append(WeightFile(path.relative_to(root).as_posix(), path, purpose))
    return files


def weight_files(root: Path | None, options: dict) -> list[WeightFile]:
    """The files Grounded-SAM reads from the weights folder for ``options["sam_model"]``."""
    root = needs_folder("grounded-sam", root)
    sam_model = options.get("sam_model", "vit_h")
    sam = SAM_FILES[sam_model]
    return grounding_dino_files(root) + [WeightFile(sam, root / sam, f"SAM {sam_model}")]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def by_size(frames: list[np.ndarray], among: list[int] | None = None) -> list[list[int]]:
    """The indices of ``frames`` (or of those ``among`` them) grouped by frame size, in order."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(frames)) if among is None else among:
        groups.setdefault(frames[i].shape[:2], []).append(i)
    return list(groups.values())


class PersonDetector:
    """GroundingDINO SwinT-OGC prompted with "person.": person boxes and scores per frame. Loaded
    from the weights folder's ``grounding-dino`` folder: the transformers layout, or the original
    checkpoint converted in memory where the folder holds only that."""

    def __init__(self, weights: Path, *, box_threshold: float = 0.3, text_threshold: float = 0.25,
                 device: str = "cuda"):
        import torch
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        self.device = torch.device(device)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        folder = Path(weights) / GROUNDING_DINO_DIR
        original = _original_checkpoint(folder)
        if original is not None:
            from disco.pipeline.annotators.grounding_dino_checkpoint import build_processor, model_from_checkpoint

            self.processor = build_processor()
            model = model_from_checkpoint(original)
        else:
            self.processor = GroundingDinoProcessor.from_pretrained(folder)
            model = GroundingDinoForObjectDetection.from_pretrained(folder)
        self.model = model.to(self.device).eval()
        self._torch = torch

    def detect(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Person boxes (x0, y0, x1, y1 pixels) and their scores, per frame, best first. Frames of
        one size go through the model together: the processor pads a batch of sizes to its
        largest, and the padding changes what the model finds in the smaller frames (a still's
        boxes would hang on the stills beside it in its call, and differ on a resume)."""
        found: list = [None] * len(frames)
        for indices in by_size(frames):
            for i, result in zip(indices, self._detect([frames[i] for i in indices])):
                found[i] = result
        return found

    def _detect(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        torch = self._torch
        inputs = self.processor(images=list(frames), text=[PROMPT] * len(frames), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        results = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[f.shape[:2] for f in frames],
        )
        found = []
        for result in results:
            # A box counts as a person when the prompt's word itself passes the text threshold.
            keep = [i for i, label in enumerate(result["text_labels"]) if label.strip()]
            boxes = result["boxes"][keep].float().cpu().numpy().reshape(-1, 4)
            scores = result["scores"][keep].float().cpu().numpy().reshape(-1)
            order = np.argsort(-scores)[:MAX_BOXES]
            found.append((boxes[order], scores[order]))
        return found


class GroundedSamMatting:
    name = "grounded-sam"

    def __init__(self, weights: Path | None, *, sam_model: str = "vit_h", box_threshold: float = 0.3,
                 text_threshold: float = 0.25, largest_person: bool = False, device: str = "cuda",
                 half: bool = True, batch_size: int = 8):
        import torch
        from segment_anything import sam_model_registry
        from segment_anything.utils.transforms import ResizeLongestSide

        self.files = weight_files(weights, {"sam_model": sam_model})
        require(self.files, self.name)
        self.device = torch.device(device)
        self.largest_person = largest_person
        self.batch_size = max(1, batch_size)
        # Half precision for SAM's ViT on CUDA only; GroundingDINO's deformable attention stays float32.
        self.half = half and self.device.type == "cuda"
        self.detector = PersonDetector(Path(weights), box_threshold=box_threshold, text_threshold=text_threshold,
                                       device=device)
        # segment-anything reads its checkpoint with torch.load, which loads tensors only
        # (weights_only is the default from torch 2.6, the floor of our pin).
        with loading(Path(weights) / SAM_FILES[sam_model]):
            self.sam = sam_model_registry[sam_model](checkpoint=str(Path(weights) / SAM_FILES[sam_model]))
        self.sam.to(self.device).eval()
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        self._torch = torch

    def matte(self, frame: np.ndarray) -> Matte:
        return self.matte_batch([frame])[0]

    def matte_batch(self, frames: list[np.ndarray]) -> list[Matte]:
        out: list[Matte] = []
        for chunk in _batches(frames, self.batch_size):
            detections = self.detector.detect(chunk)
            masks = self.segment(chunk, [boxes for boxes, _ in detections])
            for frame, (boxes, scores), person_masks in zip(chunk, detections, masks):
                out.append(self._merge(frame, scores, person_masks))
        return out

    def segment(self, frames: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """One mask per box (N x H x W bool), frames batched through SAM's image encoder."""
        torch = self._torch
        masks: list[np.ndarray | None] = [None] * len(frames)
        todo = [i for i, b in enumerate(boxes) if len(b)]
        for i in range(len(frames)):
            if i not in todo:
                masks[i] = np.zeros((0,) + frames[i].shape[:2], dtype=bool)
        # Frames of one size go through the encoder together (a video segment always does).
        for indices in by_size(frames, todo):
            size = frames[indices[0]].shape[:2]
            resized = [self.transform.apply_image(frames[i]) for i in indices]
            input_size = resized[0].shape[:2]
            batch = torch.as_tensor(np.stack(resized), device=self.device).permute(0, 3, 1, 2).float()
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
                embeddings = self.sam.image_encoder(self.sam.preprocess(batch))
                for row, i in enumerate(indices):
                    box = self.transform.apply_boxes_torch(torch.as_tensor(boxes[i], device=self.device), size)
                    sparse, dense = self.sam.prompt_encoder(points=None, boxes=box, masks=None)
                    low_res, _ = self.sam.mask_decoder(
                        image_embeddings=embeddings[row:row + 1].to(sparse.dtype),
                        image_pe=self.sam.prompt_encoder.get_dense_pe(),
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=False,  # one mask per box, as the paper used
                    )
                    full = self.sam.postprocess_masks(low_res.float(), input_size, size)
                    masks[i] = (full[:, 0] > self.sam.mask_threshold).cpu().numpy()
        return masks

    def _merge(self, frame: np.ndarray, scores: np.ndarray, person_masks: np.ndarray) -> Matte:
        return merge_persons(frame, scores, person_masks, self.name, self.largest_person)


def merge_persons(frame: np.ndarray, scores: np.ndarray, person_masks: np.ndarray, model: str,
                  largest_person: bool = False) -> Matte:
    """Every person's mask (N x H x W bool) in one alpha (255 inside), as DisCo merged them (or
    only the largest one); the best box's score and the number of persons."""
    height, width = frame.shape[:2]
    if len(scores) == 0:
        return Matte(alpha=np.zeros((height, width), np.uint8), score=0.0, count=0, model=model)
    if largest_person:
        person_masks = person_masks[[int(np.argmax(person_masks.reshape(len(person_masks), -1).sum(1)))]]
    alpha = np.where(person_masks.any(axis=0), 255, 0).astype(np.uint8)
    return Matte(alpha=alpha, score=float(np.max(scores)), count=int(len(scores)), model=model)


# -- random weights of the real architectures (tests, benchmarks) ------------------------------------

# A word-piece vocabulary that covers the prompt; BERT's own has 30522 entries.
SMALL_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "person", ".", "a", "the")


def _grounding_dino_config(size: str):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    if size == "full":
        return GroundingDinoConfig(text_config=BertConfig(vocab_size=len(SMALL_VOCAB)))
    return GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                                   out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(SMALL_VOCAB), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=6,
    )


def write_grounding_dino(root: Path, size: str = "small", seed: int = 0) -> Path:
    import torch
    from transformers import (
        BertTokenizerFast,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    folder = Path(root) / GROUNDING_DINO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SMALL_VOCAB) + "\n")
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(_grounding_dino_config(size)).save_pretrained(folder)
    # The small detector sees small pictures; the full one keeps GroundingDINO's 800 x 1333.
    sizes = {"shortest_edge": 800, "longest_edge": 1333} if size == "full" else {"shortest_edge": 128, "longest_edge": 160}
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=sizes),
                                       tokenizer=BertTokenizerFast(vocab_file=str(vocab)))
    processor.save_pretrained(folder)
    return folder


def write_sam(root: Path, sam_model: str = "vit_b", seed: int = 0) -> Path:
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    path = Path(root) / SAM_FILES[sam_model]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam_model_registry[sam_model]().state_dict(), path)
    return path


def _random_weights(root: Path, size: str, options: dict) -> None:
    write_grounding_dino(root, size)
    write_sam(root, options.get("sam_model", "vit_b"))


def _build(role: str, options: dict, shared: dict) -> GroundedSamMatting:
    return GroundedSamMatting(
        weights_dir(options.get("weights")), sam_model=options.get("sam_model", "vit_h"),
        box_threshold=options.get("box_threshold", 0.3), text_threshold=options.get("text_threshold", 0.25),
        largest_person=options.get("largest_person", False), device=options.get("device", "cuda"),
        half=options.get("half", True), batch_size=options.get("batch_size", 8),
    )


register(Backend(
    name="grounded-sam", roles=("matting",), build=_build, gpu=True, auto=True,
    summary="GroundingDINO person boxes, one SAM mask per box, merged (DisCo's own)",
    packages=("segment_anything", "transformers"), files=weight_files, random_weights=_random_weights,
    options=("--sam-model", "--box-threshold", "--text-threshold", "--largest-person", "--half", "--batch-size"),
    # A person is a box GroundingDINO proposed: its own box threshold is the detection score to reach.
    person_score=lambda options, min_visibility: options.get("box_threshold", 0.3),
))
