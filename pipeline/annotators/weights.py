"""Where the paper-faithful annotators find their weights: one documented folder, never a download.

Layout of ``--weights DIR`` (or ``$DISCO_WEIGHTS``)::

    DIR/
      grounding-dino/                 GroundingDINO SwinT-OGC in the transformers layout (the
        config.json                   IDEA-Research/grounding-dino-tiny folder): config, weights,
        model.safetensors             image processor and the BERT tokenizer it needs
        preprocessor_config.json
        tokenizer_config.json, vocab.txt (or tokenizer.json), special_tokens_map.json
      sam/
        sam_vit_h_4b8939.pth          segment-anything checkpoints, as Meta publishes them;
        sam_vit_l_0b3195.pth          only the variant you select must be present
        sam_vit_b_01ec64.pth
      openpose/
        body_pose_model.pth           OpenPose body-18 (lllyasviel/Annotators)
        hand_pose_model.pth           needed with --hands
        facenet.pth                   needed with --face
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_ENV = "DISCO_WEIGHTS"
SAM_VARIANTS = ("vit_h", "vit_l", "vit_b")
SAM_FILES = {
    "vit_h": "sam/sam_vit_h_4b8939.pth",
    "vit_l": "sam/sam_vit_l_0b3195.pth",
    "vit_b": "sam/sam_vit_b_01ec64.pth",
}
GROUNDING_DINO_DIR = "grounding-dino"
GROUNDING_DINO_FILES = ("config.json", "tokenizer_config.json")
# Either name holds the image processor (the hub folder has the first, transformers 5 writes the second).
GROUNDING_DINO_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
GROUNDING_DINO_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPENPOSE_FILES = {
    "body": "openpose/body_pose_model.pth",
    "hand": "openpose/hand_pose_model.pth",
    "face": "openpose/facenet.pth",
}


class WeightsError(FileNotFoundError):
    """A weights file a model needs is missing, or does not fit the network."""


@dataclass
class WeightFile:
    name: str  # path relative to the weights folder
    path: Path
    purpose: str

    @property
    def present(self) -> bool:
        return self.path.exists()


def weights_dir(explicit: str | os.PathLike | None) -> Path | None:
    """The weights folder: the flag, else the environment variable, else none."""
    value = explicit or os.environ.get(WEIGHTS_ENV)
    return Path(value).expanduser() if value else None


def grounded_sam_files(root: Path, sam_model: str) -> list[WeightFile]:
    gd = [WeightFile(f"{GROUNDING_DINO_DIR}/{n}", root / GROUNDING_DINO_DIR / n, "GroundingDINO SwinT-OGC")
          for n in GROUNDING_DINO_FILES]
    for names, purpose in ((GROUNDING_DINO_PROCESSOR, "GroundingDINO image processor"),
                           (GROUNDING_DINO_WEIGHTS, "GroundingDINO SwinT-OGC weights")):
        path = _first_present(root / GROUNDING_DINO_DIR, names)
        gd.append(WeightFile(path.relative_to(root).as_posix(), path, purpose))
    sam = SAM_FILES[sam_model]
    return gd + [WeightFile(sam, root / sam, f"SAM {sam_model}")]


def openpose_files(root: Path, hands: bool, face: bool) -> list[WeightFile]:
    parts = ["body"] + (["hand"] if hands else []) + (["face"] if face else [])
    return [WeightFile(OPENPOSE_FILES[p], root / OPENPOSE_FILES[p], f"OpenPose {p}") for p in parts]


def _first_present(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of several accepted file names that exists, else the preferred one (to name it)."""
    for name in names:
        if (folder / name).exists():
            return folder / name
    return folder / names[0]


def require(files: list[WeightFile], backend: str) -> None:
    """Raise one error naming every missing file and where it was expected."""
    missing = [f for f in files if not f.present]
    if missing:
        listed = "; ".join(f"{f.name} ({f.purpose}) expected at {f.path}" for f in missing)
        raise WeightsError(f"{backend} needs weights that are missing: {listed}")


def backend_files(backend: str, root: Path | None, *, sam_model: str = "vit_h", hands: bool = True,
                  face: bool = False) -> list[WeightFile]:
    """The files a paper-faithful backend needs; raises when no weights folder is set."""
    if root is None:
        raise WeightsError(f"{backend} needs local weights: pass --weights DIR or set ${WEIGHTS_ENV} "
                           "(see the README for the expected layout)")
    if backend == "grounded-sam":
        return grounded_sam_files(root, sam_model)
    if backend == "openpose":
        return openpose_files(root, hands, face)
    raise ValueError(f"{backend!r} does not use a weights folder")


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe(files: list[WeightFile]) -> list[dict]:
    """Manifest entries: name and sha256 of each file that ran."""
    return [{"name": f.name, "sha256": sha256(f.path) if f.present else None} for f in files]
