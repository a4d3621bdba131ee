"""The original GroundingDINO SwinT-OGC checkpoint (groundingdino_swint_ogc.pth) read into
transformers' GroundingDinoForObjectDetection: a state dict with the original module names and
shapes, described here from IDEA-Research's model code (not from the mapping under test), filled
with random values, converted, loaded strictly, run."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from typer.testing import CliRunner

from disco.cli import app
from disco.pipeline.annotators.grounding_dino_checkpoint import (
    BERT_VOCAB_SIZE,
    CHECKPOINT_NAME,
    CheckpointError,
    build_processor,
    bert_vocab,
    convert_state_dict,
    load_original_state_dict,
)
from disco.pipeline.annotators.weights import WeightsError
from helpers import CodeRunningPickle

# -- the original network, as groundingdino/models/GroundingDINO/*.py and GroundingDINO_SwinT_OGC.py build it

SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7)
BERT_BASE = dict(vocab=30522, hidden=768, layers=12, ffn=3072, positions=512)
D_MODEL, FFN, LAYERS, QUERIES, LEVELS, HEADS, POINTS = 256, 2048, 6, 900, 4, 8, 4


def _linear(out: int, inp: int, bias: bool = True) -> dict[str, tuple]:
    return {"weight": (out, inp), **({"bias": (out,)} if bias else {})}


def _norm(dim: int) -> dict[str, tuple]:
    return {"weight": (dim,), "bias": (dim,)}


def _mha(dim: int) -> dict[str, tuple]:  # torch.nn.MultiheadAttention
    return {"in_proj_weight": (3 * dim, dim), "in_proj_bias": (3 * dim,),
            **{f"out_proj.{k}": v for k, v in _linear(dim, dim).items()}}


def _msdeform(dim: int) -> dict[str, tuple]:  # MultiScaleDeformableAttention
    parts = {"sampling_offsets": _linear(HEADS * LEVELS * POINTS * 2, dim),
             "attention_weights": _linear(HEADS * LEVELS * POINTS, dim),
             "value_proj": _linear(dim, dim), "output_proj": _linear(dim, dim)}
    return {f"{p}.{k}": v for p, sub in parts.items() for k, v in sub.items()}


def _mlp(dims: list[int]) -> dict[str, tuple]:  # groundingdino's MLP: layers.{i} Linear
    return {f"layers.{i}.{k}": v for i, (a, b) in enumerate(zip(dims, dims[1:])) for k, v in _linear(b, a).items()}


def _under(prefix: str, shapes: dict[str, tuple]) -> dict[str, tuple]:
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def original_shapes() -> dict[str, tuple]:
    """Name -> shape of every tensor in groundingdino_swint_ogc.pth's state dict (buffers included:
    the real file holds Swin's relative position indexes, BERT's position ids, the pooler and the
    training-only label embedding)."""
    s: dict[str, tuple] = {}
    # Swin-T (backbone.0): patch embedding, 4 stages of blocks with a fused qkv, patch merging
    # after the first three, and a norm on each returned stage (return_interm_indices 1, 2, 3).
    e, w = SWIN_T["embed_dim"], SWIN_T["window"]
    s.update(_under("backbone.0.patch_embed.proj", {"weight": (e, 3, 4, 4), "bias": (e,)}))
    s.update(_under("backbone.0.patch_embed.norm", _norm(e)))
    for stage, (depth, heads) in enumerate(zip(SWIN_T["depths"], SWIN_T["heads"])):
        dim = e * 2 ** stage
        for block in range(depth):
            b = f"backbone.0.layers.{stage}.blocks.{block}"
            s.update(_under(f"{b}.norm1", _norm(dim)))
            s[f"{b}.attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, heads)
            s[f"{b}.attn.relative_position_index"] = (w * w, w * w)
            s.update(_under(f"{b}.attn.qkv", _linear(3 * dim, dim)))
            s.update(_under(f"{b}.attn.proj", _linear(dim, dim)))
            s.update(_under(f"{b}.norm2", _norm(dim)))
            s.update(_under(f"{b}.mlp.fc1", _linear(4 * dim, dim)))
            s.update(_under(f"{b}.mlp.fc2", _linear(dim, 4 * dim)))
        if stage < 3:
            s[f"backbone.0.layers.{stage}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            s.update(_under(f"backbone.0.layers.{stage}.downsample.norm", _norm(4 * dim)))
    for i in (1, 2, 3):
        s.update(_under(f"backbone.0.norm{i}", _norm(e * 2 ** i)))
    # BERT base (bert.*), the pooler included, position ids saved as a buffer.
    h = BERT_BASE["hidden"]
    s["bert.embeddings.word_embeddings.weight"] = (BERT_BASE["vocab"], h)
    s["bert.embeddings.position_embeddings.weight"] = (BERT_BASE["positions"], h)
    s["bert.embeddings.token_type_embeddings.weight"] = (2, h)
    s.update(_under("bert.embeddings.LayerNorm", _norm(h)))
    s["bert.embeddings.position_ids"] = (1, BERT_BASE["positions"])
    for layer in range(BERT_BASE["layers"]):
        b = f"bert.encoder.layer.{layer}"
        for name in ("query", "key", "value"):
            s.update(_under(f"{b}.attention.self.{name}", _linear(h, h)))
        s.update(_under(f"{b}.attention.output.dense", _linear(h, h)))
        s.update(_under(f"{b}.attention.output.LayerNorm", _norm(h)))
        s.update(_under(f"{b}.intermediate.dense", _linear(BERT_BASE["ffn"], h)))
        s.update(_under(f"{b}.output.dense", _linear(h, BERT_BASE["ffn"])))
        s.update(_under(f"{b}.output.LayerNorm", _norm(h)))
    s.update(_under("bert.pooler.dense", _linear(h, h)))
    s.update(_under("feat_map", _linear(D_MODEL, h)))
    # input_proj: 1x1 conv + GroupNorm per backbone level, then a stride-2 3x3 conv for the 4th.
    for level, channels in enumerate((192, 384, 768)):
        s.update(_under(f"input_proj.{level}.0", {"weight": (D_MODEL, channels, 1, 1), "bias": (D_MODEL,)}))
        s.update(_under(f"input_proj.{level}.1", _norm(D_MODEL)))
    s.update(_under("input_proj.3.0", {"weight": (D_MODEL, 768, 3, 3), "bias": (D_MODEL,)}))
    s.update(_under("input_proj.3.1", _norm(D_MODEL)))
    # The transformer: 6 encoder layers (deformable, text enhancer, fusion), 6 decoder layers.
    t = "transformer"
    s[f"{t}.level_embed"] = (LEVELS, D_MODEL)
    s[f"{t}.tgt_embed.weight"] = (QUERIES, D_MODEL)
    s.update(_under(f"{t}.enc_output", _linear(D_MODEL, D_MODEL)))
    s.update(_under(f"{t}.enc_output_norm", _norm(D_MODEL)))
    s.update(_under(f"{t}.enc_out_bbox_embed", _mlp([D_MODEL, D_MODEL, D_MODEL, 4])))
    fusion = FFN // 2
    for layer in range(LAYERS):
        b = f"{t}.encoder.layers.{layer}"
        s.update(_under(f"{b}.self_attn", _msdeform(D_MODEL)))
        s.update(_under(f"{b}.norm1", _norm(D_MODEL)))
        s.update(_under(f"{b}.linear1", _linear(FFN, D_MODEL)))
        s.update(_under(f"{b}.linear2", _linear(D_MODEL, FFN)))
        s.update(_under(f"{b}.norm2", _norm(D_MODEL)))
        b = f"{t}.encoder.text_layers.{layer}"
        s.update(_under(f"{b}.self_attn", _mha(D_MODEL)))
        s.update(_under(f"{b}.linear1", _linear(FFN // 2, D_MODEL)))
        s.update(_under(f"{b}.linear2", _linear(D_MODEL, FFN // 2)))
        s.update(_under(f"{b}.norm1", _norm(D_MODEL)))
        s.update(_under(f"{b}.norm2", _norm(D_MODEL)))
        b = f"{t}.encoder.fusion_layers.{layer}"
        s[f"{b}.gamma_v"] = (D_MODEL,)
        s[f"{b}.gamma_l"] = (D_MODEL,)
        s.update(_under(f"{b}.layer_norm_v", _norm(D_MODEL)))
        s.update(_under(f"{b}.layer_norm_l", _norm(D_MODEL)))
        for proj in ("v_proj", "l_proj", "values_v_proj", "values_l_proj"):
            s.update(_under(f"{b}.attn.{proj}", _linear(fusion, D_MODEL)))
        for proj in ("out_v_proj", "out_l_proj"):
            s.update(_under(f"{b}.attn.{proj}", _linear(D_MODEL, fusion)))
        b = f"{t}.decoder.layers.{layer}"
        s.update(_under(f"{b}.cross_attn", _msdeform(D_MODEL)))
        s.update(_under(f"{b}.norm1", _norm(D_MODEL)))
        s.update(_under(f"{b}.ca_text", _mha(D_MODEL)))
        s.update(_under(f"{b}.catext_norm", _norm(D_MODEL)))
        s.update(_under(f"{b}.self_attn", _mha(D_MODEL)))
        s.update(_under(f"{b}.norm2", _norm(D_MODEL)))
        s.update(_under(f"{b}.linear1", _linear(FFN, D_MODEL)))
        s.update(_under(f"{b}.linear2", _linear(D_MODEL, FFN)))
        s.update(_under(f"{b}.norm3", _norm(D_MODEL)))
    s.update(_under(f"{t}.decoder.norm", _norm(D_MODEL)))
    s.update(_under(f"{t}.decoder.ref_point_head", _mlp([2 * D_MODEL, D_MODEL, D_MODEL])))
    # The box head: one MLP registered 12 times (bbox_embed.i and transformer.decoder.bbox_embed.i).
    for i in range(LAYERS):
        for prefix in ("bbox_embed", f"{t}.decoder.bbox_embed"):
            s.update(_under(f"{prefix}.{i}", _mlp([D_MODEL, D_MODEL, D_MODEL, 4])))
    s["label_enc.weight"] = (2001, D_MODEL)  # dn_labelbook_size + 1, for denoising training only
    return s


# The tensors the conversion drops (each recomputed by transformers or unused at inference).
DROPPED_KEYS = ({k for k in original_shapes() if k.endswith("relative_position_index")}
           | {"bert.embeddings.position_ids", "bert.pooler.dense.weight", "bert.pooler.dense.bias", "label_enc.weight"})


def _relative_position_index(window: int) -> torch.Tensor:
    # Swin's lookup, written from the Swin paper's definition: (dy + w - 1) * (2w - 1) + (dx + w - 1).
    ys, xs = np.divmod(np.arange(window * window), window)
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return torch.from_numpy(dy * (2 * window - 1) + dx)


def random_original(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in original_shapes().items():
        alias = re.fullmatch(r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.(layers\..+)", name)
        if alias and name != f"bbox_embed.0.{alias.group(1)}":
            # The shared box head: every alias is the very tensor of bbox_embed.0 (listed first), as
            # in the saved module.
            state[name] = state[f"bbox_embed.0.{alias.group(1)}"]
        elif name.endswith("relative_position_index"):
            state[name] = _relative_position_index(SWIN_T["window"])
        elif name.endswith("position_ids"):
            state[name] = torch.arange(shape[1])[None]
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.02
    return state


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return random_original()


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory) -> Path:
    """The original checkpoint as the release stores it: ``{"model": state_dict}``."""
    path = tmp_path_factory.mktemp("original") / CHECKPOINT_NAME
    torch.save({"model": original}, path)
    return path


def _weights_with(checkpoint: Path, root: Path) -> Path:
    folder = root / "grounding-dino"
    folder.mkdir(parents=True)
    os.link(checkpoint, folder / CHECKPOINT_NAME)  # the same bytes, no second 700 MB write
    return root


def test_conversion_is_complete_and_exact(original):
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    converted = convert_state_dict(original)
    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    # Every transformers tensor filled, none left over; strict loading agrees.
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True, assign=True)
    loaded = model.state_dict()

    # Every original tensor but the dropped buffers ends up in the model, whole or in thirds.
    sources = {id(t) for t in converted.values()}
    for name, tensor in original.items():
        if name in DROPPED_KEYS:
            continue
        if name.endswith(("qkv.weight", "qkv.bias", "in_proj_weight", "in_proj_bias")):
            continue  # split: checked below
        assert id(tensor) in sources, name

    swin = "model.backbone.conv_encoder.model.swin.encoder.layers.2.blocks.5.attention."
    qkv_w, qkv_b = original["backbone.0.layers.2.blocks.5.attn.qkv.weight"], original["backbone.0.layers.2.blocks.5.attn.qkv.bias"]
    for i, p in enumerate("qkv"):
        assert torch.equal(loaded[f"{swin}{p}_proj.weight"], qkv_w[384 * i:384 * (i + 1)])
        assert torch.equal(loaded[f"{swin}{p}_proj.bias"], qkv_b[384 * i:384 * (i + 1)])
    mha = original["transformer.decoder.layers.3.ca_text.in_proj_weight"]
    for i, p in enumerate(("query", "key", "value")):
        assert torch.equal(loaded[f"model.decoder.layers.3.encoder_attn_text.{p}.weight"], mha[256 * i:256 * (i + 1)])
    text = original["transformer.encoder.text_layers.5.self_attn.in_proj_bias"]
    assert torch.equal(loaded["model.encoder.layers.5.text_enhancer_layer.self_attn.value.bias"], text[512:])
    pairs = {
        "backbone.0.layers.0.blocks.1.attn.relative_position_bias_table":
            "model.backbone.conv_encoder.model.swin.encoder.layers.0.blocks.1.attention.relative_position_bias.relative_position_bias_table",
        "backbone.0.layers.1.downsample.reduction.weight": "model.backbone.conv_encoder.model.swin.encoder.layers.1.downsample.reduction.weight",
        "backbone.0.norm1.weight": "model.backbone.conv_encoder.model.hidden_states_norms.stage2.weight",
        "backbone.0.norm3.bias": "model.backbone.conv_encoder.model.hidden_states_norms.stage4.bias",
        "bert.encoder.layer.11.output.dense.weight": "model.text_backbone.encoder.layer.11.output.dense.weight",
        "bert.embeddings.word_embeddings.weight": "model.text_backbone.embeddings.word_embeddings.weight",
        "feat_map.weight": "model.text_projection.weight",
        "input_proj.3.0.weight": "model.input_proj_vision.3.0.weight",
        "transformer.level_embed": "model.level_embed",
        "transformer.tgt_embed.weight": "model.query_position_embeddings.weight",
        "transformer.encoder.fusion_layers.2.gamma_v": "model.encoder.layers.2.fusion_layer.vision_param",
        "transformer.encoder.fusion_layers.4.attn.values_l_proj.weight": "model.encoder.layers.4.fusion_layer.attn.values_text_proj.weight",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.bias": "model.encoder.layers.1.deformable_layer.self_attn.sampling_offsets.bias",
        "transformer.encoder.text_layers.0.norm1.weight": "model.encoder.layers.0.text_enhancer_layer.layer_norm_before.weight",
        "transformer.decoder.layers.5.norm2.weight": "model.decoder.layers.5.self_attn_layer_norm.weight",
        "transformer.decoder.layers.5.norm1.bias": "model.decoder.layers.5.encoder_attn_layer_norm.bias",
        "transformer.decoder.ref_point_head.layers.0.weight": "model.decoder.reference_points_head.layers.0.weight",
        "transformer.enc_out_bbox_embed.layers.2.weight": "model.encoder_output_bbox_embed.layers.2.weight",
        "transformer.decoder.bbox_embed.4.layers.2.bias": "model.decoder.bbox_embed.4.layers.2.bias",
        "bbox_embed.0.layers.1.weight": "bbox_embed.0.layers.1.weight",
    }
    for source, target in pairs.items():
        assert torch.equal(loaded[target], original[source]), (source, target)
    # Swin's final norm, which the backbone never runs, keeps LayerNorm's identity values.
    assert torch.equal(loaded["model.backbone.conv_encoder.model.swin.layernorm.weight"], torch.ones(768))


def test_conversion_names_what_does_not_fit(original):
    broken = dict(original)
    broken["transformer.decoder.layers.6.norm1.weight"] = torch.zeros(256)  # a 7th decoder layer
    broken["something.else"] = torch.zeros(1)
    del broken["feat_map.bias"]
    with pytest.raises(CheckpointError) as error:
        convert_state_dict(broken)
    message = str(error.value)
    assert "something.else" in message and "transformer.decoder.layers.6.norm1.weight" in message
    assert "model.text_projection.bias" in message and "\n" not in message

    wrong = dict(original, **{"feat_map.weight": torch.zeros(256, 512)})
    with pytest.raises(CheckpointError, match="model.text_projection.weight"):
        convert_state_dict(wrong)


def test_vocab_encodes_the_prompt():
    vocab = bert_vocab()
    assert len(vocab) == BERT_VOCAB_SIZE == len(set(vocab))
    assert [vocab[i] for i in (0, 100, 101, 102, 103, 1012, 2711)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "person"]
    assert build_processor().tokenizer("person.")["input_ids"] == [101, 2711, 1012, 102]


def test_convert_weights_command_writes_a_loadable_folder(checkpoint, tmp_path):
    from disco.pipeline.annotators.grounded_sam import PersonDetector, grounding_dino_files

    import disco.pipeline.annotators.grounding_dino_checkpoint as conversion

    root = _weights_with(checkpoint, tmp_path / "weights")
    (pth,) = grounding_dino_files(root)  # only the original checkpoint is needed here
    assert pth.name == f"grounding-dino/{CHECKPOINT_NAME}" and pth.present

    # A conversion cut short (here: the processor's files) leaves the folder as it was: it left
    # config.json beside missing files, and the next run refused it without --overwrite.
    real_processor = conversion.build_processor

    def cut_short():
        raise MemoryError("cut short")

    conversion.build_processor = cut_short
    try:
        cut = CliRunner().invoke(app, ["convert-weights", "--weights", str(root)])
    finally:
        conversion.build_processor = real_processor
    assert isinstance(cut.exception, MemoryError)
    assert sorted(p.name for p in (root / "grounding-dino").iterdir()) == [CHECKPOINT_NAME]

    result = CliRunner().invoke(app, ["convert-weights", "--weights", str(root)])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1 and "model.safetensors" in result.output
    folder = root / "grounding-dino"
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert len((folder / "vocab.txt").read_text().splitlines()) == BERT_VOCAB_SIZE
    # The transformers layout now wins; a second run is refused rather than overwriting it.
    assert {f.name for f in grounding_dino_files(root)} >= {"grounding-dino/config.json", "grounding-dino/model.safetensors"}
    again = CliRunner().invoke(app, ["convert-weights", "--weights", str(root)])
    assert again.exit_code == 2 and "--overwrite" in again.output

    detector = PersonDetector(root, box_threshold=0.0, text_threshold=0.0, device="cpu")
    assert detector.processor.tokenizer("person.")["input_ids"] == [101, 2711, 1012, 102]
    _detects(detector)


def _detects(detector) -> None:
    # The written / built processor keeps GroundingDINO's defaults; a smaller picture than its
    # 800 px keeps this CPU run short (the network is the same).
    assert detector.processor.image_processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    detector.processor.image_processor.size = {"shortest_edge": 256, "longest_edge": 320}
    frame = data.astronaut()
    (boxes, scores), = detector.detect([frame])
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and scores.shape == (len(boxes),)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and len(boxes) >= 1


def test_detector_converts_the_original_checkpoint_in_memory(checkpoint, original, tmp_path):
    from disco.pipeline.annotators.grounded_sam import PersonDetector

    root = _weights_with(checkpoint, tmp_path / "weights")
    detector = PersonDetector(root, box_threshold=0.0, text_threshold=0.0, device="cpu")
    assert sorted(p.name for p in (root / "grounding-dino").iterdir()) == [CHECKPOINT_NAME]  # nothing written
    state = detector.model.state_dict()
    assert torch.equal(state["model.text_projection.weight"], original["feat_map.weight"])
    assert detector.processor.tokenizer("person.")["input_ids"] == [101, 2711, 1012, 102]
    _detects(detector)


def test_files_and_errors_for_a_folder_with_neither(tmp_path):
    from disco.pipeline.annotators.grounded_sam import grounding_dino_files
    from disco.pipeline.annotators.weights import require

    (tmp_path / "grounding-dino").mkdir()
    with pytest.raises(WeightsError) as error:
        require(grounding_dino_files(tmp_path), "grounded-sam")
    assert "config.json" in str(error.value) and CHECKPOINT_NAME in str(error.value)
    missing = CliRunner().invoke(app, ["convert-weights", "--weights", str(tmp_path)])
    assert missing.exit_code == 2 and CHECKPOINT_NAME in missing.output and "Traceback" not in missing.output


def test_a_checkpoint_with_objects_is_refused(tmp_path):
    path = tmp_path / "grounding-dino" / CHECKPOINT_NAME
    path.parent.mkdir()
    torch.save({"model": {"feat_map.weight": torch.zeros(2)}, "args": CodeRunningPickle(tmp_path / "ran")}, path)
    with pytest.raises(CheckpointError) as error:
        load_original_state_dict(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value) and "refused" in str(error.value)
    result = CliRunner().invoke(app, ["convert-weights", "--weights", str(tmp_path)])
    assert result.exit_code == 2 and "refused" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists()  # refused before anything in it could run

    # The training arguments DETR-family trainers save beside the weights (argparse.Namespace) are
    # plain attributes: read, not refused.
    import argparse

    with_args = tmp_path / "with-args.pth"
    torch.save({"model": {"feat_map.weight": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-4, backbone="swin_T_224_1k"),
                "epoch": 11}, with_args)
    assert list(load_original_state_dict(with_args)) == ["feat_map.weight"]
    # Both containers are read, and a DistributedDataParallel prefix goes.
    bare = tmp_path / "bare.pth"
    torch.save({"module.feat_map.bias": torch.ones(3)}, bare)
    assert list(load_original_state_dict(bare)) == ["feat_map.bias"]
    pickle_only = tmp_path / "notes.pth"
    pickle_only.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError):
        load_original_state_dict(pickle_only)
