"""A weights folder in the documented layout, filled with randomly initialised networks.

The tests and the annotator benchmark use it where no real weights may be downloaded: the
architectures are the real ones (GroundingDINO, SAM, OpenPose body / hand / face), so the loading
code and every tensor shape are exercised; only the values are random. ``size="small"`` shrinks
GroundingDINO's widths and query count to keep a CPU test quick; ``"full"`` is SwinT-OGC's own
configuration.
"""

from __future__ import annotations

from pathlib import Path

from disco.pipeline.annotators.weights import GROUNDING_DINO_DIR, OPENPOSE_FILES, SAM_FILES

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


def write_openpose(root: Path, hands: bool = True, face: bool = True, seed: int = 0) -> list[Path]:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.face import FaceNet
        from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(seed)
    written = []
    parts = [("body", bodypose_model, True), ("hand", handpose_model, hands), ("face", FaceNet, face)]
    for part, build, wanted in parts:
        if not wanted:
            continue
        state = build().state_dict()
        if part != "face":
            # The published body and hand files name layers without the block prefix
            # ("conv1_1.weight" for "model0.conv1_1.weight"); controlnet-aux maps them back.
            state = {key.split(".", 1)[1]: value for key, value in state.items()}
        path = Path(root) / OPENPOSE_FILES[part]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        written.append(path)
    return written


def write_random_weights(root: Path, *, size: str = "small", sam_model: str = "vit_b", hands: bool = True,
                         face: bool = True) -> Path:
    root = Path(root)
    write_grounding_dino(root, size)
    write_sam(root, sam_model)
    write_openpose(root, hands, face)
    return root
