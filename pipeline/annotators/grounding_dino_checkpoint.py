"""The original GroundingDINO SwinT-OGC checkpoint (``groundingdino_swint_ogc.pth``, the file the
Grounded-Segment-Anything instructions download) read into transformers' port of the network.

The original file holds the state dict of IDEA-Research's ``GroundingDINO`` module (config
``GroundingDINO_SwinT_OGC.py``); transformers' ``GroundingDinoForObjectDetection`` with its default
config is the same network under other module names. This module renames every tensor, splits the
fused attention projections transformers keeps apart, and refuses a file that does not fit exactly:
an unknown tensor, a tensor left unfilled or a shape that differs is an error, never a silently
random weight.

The checkpoint carries BERT's weights but not its vocabulary, and nothing may be downloaded: the
tokenizer written here knows the few word pieces the project's prompt ("person.") and GroundingDINO's
special tokens need, at their bert-base-uncased ids, and a unique placeholder everywhere else.
"""

from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from disco.pipeline.annotators.weights import WeightsError
from disco.pipeline.safe_load import load_tensors_only, refusal

CHECKPOINT_NAME = "groundingdino_swint_ogc.pth"

# bert-base-uncased has 30522 word pieces; BERT's embedding table in the checkpoint has one row each.
BERT_VOCAB_SIZE = 30522
# The bert-base-uncased ids of the pieces the prompt "person." and GroundingDINO need: the four
# special tokens every BERT input uses, and "." and "?", which GroundingDINO treats as phrase
# separators (transformers' GroundingDINO hard-codes [CLS], [SEP], ".", "?" as 101, 102, 1012, 1029).
BERT_TOKENS = {
    0: "[PAD]",
    100: "[UNK]",
    101: "[CLS]",
    102: "[SEP]",
    103: "[MASK]",
    1012: ".",
    1029: "?",
    2711: "person",
}

# Prefixes of the transformers model's modules.
_SWIN = "model.backbone.conv_encoder.model.swin."
_SWIN_NORMS = "model.backbone.conv_encoder.model.hidden_states_norms."

# Tensors of the transformers model that the original network does not have: Swin's final layer
# norm, which transformers' SwinBackbone builds but never runs (it reads the per-stage norms, and
# lists this one as expected-missing when loading). They keep LayerNorm's identity values.
NOT_IN_ORIGINAL = (_SWIN + "layernorm.weight", _SWIN + "layernorm.bias")

# Tensors of the original file that the converted model does not take, and why that loses nothing.
DROPPED = (
    # Swin's relative-position lookup table is a buffer computed from the window size, not learned;
    # transformers computes the same one (checked below before the original's is dropped).
    (re.compile(r"backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index"), "relative_position_index"),
    # BERT's position ids / token type ids: buffers older transformers saved, an arange and zeros.
    (re.compile(r"bert\.embeddings\.position_ids"), "position_ids"),
    (re.compile(r"bert\.embeddings\.token_type_ids"), "token_type_ids"),
    # BERT's pooler: GroundingDINO reads the last hidden state only, and transformers' port builds
    # its text backbone without a pooler.
    (re.compile(r"bert\.pooler\.dense\.(weight|bias)"), "unused"),
    # The label embedding of denoising training: the released inference network has no use for it.
    (re.compile(r"label_enc\.weight"), "unused"),
)

# Within one encoder / decoder layer: original sub-module name -> transformers sub-module name. A
# name ending in "*" is an nn.MultiheadAttention input projection whose fused q/k/v tensor is split.
_DEFORMABLE = {
    "self_attn.sampling_offsets": "self_attn.sampling_offsets",
    "self_attn.attention_weights": "self_attn.attention_weights",
    "self_attn.value_proj": "self_attn.value_proj",
    "self_attn.output_proj": "self_attn.output_proj",
    "norm1": "self_attn_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
    "norm2": "final_layer_norm",
}
_TEXT_ENHANCER = {
    "self_attn.in_proj_*": "self_attn",
    "self_attn.out_proj": "self_attn.out_proj",
    "linear1": "fc1",
    "linear2": "fc2",
    "norm1": "layer_norm_before",  # after the self-attention
    "norm2": "layer_norm_after",  # after the feed-forward
}
_FUSION = {
    "gamma_v": "vision_param",
    "gamma_l": "text_param",
    "layer_norm_v": "layer_norm_vision",
    "layer_norm_l": "layer_norm_text",
    "attn.v_proj": "attn.vision_proj",
    "attn.l_proj": "attn.text_proj",
    "attn.values_v_proj": "attn.values_vision_proj",
    "attn.values_l_proj": "attn.values_text_proj",
    "attn.out_v_proj": "attn.out_vision_proj",
    "attn.out_l_proj": "attn.out_text_proj",
}
_DECODER = {
    "self_attn.in_proj_*": "self_attn",
    "self_attn.out_proj": "self_attn.out_proj",
    "norm2": "self_attn_layer_norm",  # the original numbers its norms by creation, not by order
    "ca_text.in_proj_*": "encoder_attn_text",
    "ca_text.out_proj": "encoder_attn_text.out_proj",
    "catext_norm": "encoder_attn_text_layer_norm",
    "cross_attn.sampling_offsets": "encoder_attn.sampling_offsets",
    "cross_attn.attention_weights": "encoder_attn.attention_weights",
    "cross_attn.value_proj": "encoder_attn.value_proj",
    "cross_attn.output_proj": "encoder_attn.output_proj",
    "norm1": "encoder_attn_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
    "norm3": "final_layer_norm",
}
# Swin block: original -> transformers ("attn.qkv" is split into q_proj, k_proj, v_proj).
_SWIN_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Whole-module prefixes: original -> transformers, the rest of the name kept.
_PREFIXES = (
    ("backbone.0.patch_embed.proj.", _SWIN + "embeddings.patch_embeddings.projection."),
    ("backbone.0.patch_embed.norm.", _SWIN + "embeddings.norm."),
    ("bert.embeddings.", "model.text_backbone.embeddings."),
    ("bert.encoder.", "model.text_backbone.encoder."),
    ("feat_map.", "model.text_projection."),
    ("input_proj.", "model.input_proj_vision."),
    ("transformer.enc_output.", "model.enc_output."),
    ("transformer.enc_output_norm.", "model.enc_output_norm."),
    ("transformer.enc_out_bbox_embed.", "model.encoder_output_bbox_embed."),
    ("transformer.decoder.norm.", "model.decoder.layer_norm."),
    ("transformer.decoder.ref_point_head.", "model.decoder.reference_points_head."),
    # The box head: one MLP shared by every decoder layer, registered under both names in each model.
    ("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."),
    ("bbox_embed.", "bbox_embed."),
)
_WHOLE = {
    "transformer.level_embed": "model.level_embed",
    # The learned initial decoder queries (the original's "tgt" embedding, used because the config
    # sets embed_init_tgt); transformers calls them query position embeddings.
    "transformer.tgt_embed.weight": "model.query_position_embeddings.weight",
}

_LAYER = re.compile(r"transformer\.(encoder\.layers|encoder\.text_layers|encoder\.fusion_layers|decoder\.layers)"
                    r"\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$|"
                    r"transformer\.encoder\.fusion_layers\.(\d+)\.(gamma_[vl])$")
_LAYER_TABLES = {
    "encoder.layers": ("model.encoder.layers.{}.deformable_layer.", _DEFORMABLE),
    "encoder.text_layers": ("model.encoder.layers.{}.text_enhancer_layer.", _TEXT_ENHANCER),
    "encoder.fusion_layers": ("model.encoder.layers.{}.fusion_layer.", _FUSION),
    "decoder.layers": ("model.decoder.layers.{}.", _DECODER),
}
_SWIN_KEY = re.compile(r"backbone\.0\.layers\.(\d+)\.(?:blocks\.(\d+)\.(.+)|downsample\.(.+))$")
_SWIN_OUT_NORM = re.compile(r"backbone\.0\.norm(\d)\.(weight|bias)$")

_QKV = ("query", "key", "value")


class CheckpointError(WeightsError):
    """The original GroundingDINO checkpoint cannot be read, or does not fit the SwinT-OGC network."""


def _targets(key: str) -> list[tuple[str, int | None]] | None:
    """The transformers names one original tensor fills, each with the third of a fused q/k/v
    projection it takes (None: the whole tensor); None for a name this mapping does not know."""
    if key in _WHOLE:
        return [(_WHOLE[key], None)]
    found = _SWIN_KEY.match(key)
    if found:
        stage, block, rest, downsample = found.groups()
        if downsample is not None:  # PatchMerging: same names in both (reduction, norm)
            return [(f"{_SWIN}encoder.layers.{stage}.downsample.{downsample}", None)]
        head = f"{_SWIN}encoder.layers.{stage}.blocks.{block}."
        if rest == "attn.relative_position_bias_table":
            return [(head + "attention.relative_position_bias.relative_position_bias_table", None)]
        module, _, leaf = rest.rpartition(".")
        if module == "attn.qkv":  # rows: all heads' queries, then keys, then values
            return [(f"{head}attention.{p}_proj.{leaf}", i) for i, p in enumerate("qkv")]
        if module in _SWIN_BLOCK:
            return [(f"{head}{_SWIN_BLOCK[module]}.{leaf}", None)]
        return None
    found = _SWIN_OUT_NORM.match(key)
    if found:
        # The original's norm{i} normalises the output of stage i counted from 0; transformers
        # counts its stages from 1 (its stem is "stem"), so the same norm is stage{i + 1}.
        return [(f"{_SWIN_NORMS}stage{int(found.group(1)) + 1}.{found.group(2)}", None)]
    found = _LAYER.match(key)
    if found:
        if found.group(6):  # a fusion layer's gamma, a bare parameter
            return [(f"model.encoder.layers.{found.group(5)}.fusion_layer.{_FUSION[found.group(6)]}", None)]
        group, index, module, leaf = found.group(1, 2, 3, 4)
        head, table = _LAYER_TABLES[group]
        head = head.format(index)
        if leaf.startswith("in_proj_"):  # nn.MultiheadAttention: q, k, v stacked along the rows
            target = table.get(f"{module}.in_proj_*")
            if target is None:
                return None
            return [(f"{head}{target}.{p}.{leaf[len('in_proj_'):]}", i) for i, p in enumerate(_QKV)]
        if module not in table:
            return None
        return [(f"{head}{table[module]}.{leaf}", None)]
    for old, new in _PREFIXES:
        if key.startswith(old):
            return [(new + key[len(old):], None)]
    return None


def _dropped(key: str) -> str | None:
    for pattern, why in DROPPED:
        if pattern.fullmatch(key):
            return why
    return None


@lru_cache(maxsize=1)
def transformers_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of
    ``GroundingDinoForObjectDetection(GroundingDinoConfig())`` (built on the meta device: no memory)."""
    import torch
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _relative_position_index(window: int):
    """Swin's table of relative-position bias rows for one window, as Swin (and transformers) build it."""
    import torch

    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def _check_dropped(key: str, tensor, why: str) -> str | None:
    """A problem with a buffer about to be dropped (its value is recomputed, so it must be the usual one)."""
    import torch

    if why == "relative_position_index":
        window = round(tensor.shape[0] ** 0.5) if tensor.dim() == 2 else 0
        if window * window != tensor.shape[0] or not torch.equal(tensor.long(), _relative_position_index(window)):
            return f"{key} is not Swin's relative position index"
    elif why == "position_ids":
        if not torch.equal(tensor.reshape(-1).long(), torch.arange(tensor.numel())):
            return f"{key} is not 0, 1, 2, ..."
    return None


def _listed(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert_state_dict(original: dict) -> dict:
    """The original checkpoint's state dict renamed (and the fused attention projections split) into
    the state dict of ``GroundingDinoForObjectDetection(GroundingDinoConfig())``: every one of its
    tensors filled exactly once with a tensor of its shape. Raises ``CheckpointError`` naming the
    original tensors it does not know and the transformers tensors left unfilled or misshapen."""
    import torch

    expected = transformers_shapes()
    converted: dict = {}
    unknown, twice, problems = [], [], []
    for key, tensor in original.items():
        why = _dropped(key)
        if why is not None:
            problem = _check_dropped(key, tensor, why)
            if problem:
                problems.append(problem)
            continue
        targets = _targets(key)
        if targets is None:
            unknown.append(key)
            continue
        for name, third in targets:
            if name not in expected:  # a name the mapping builds that this network lacks (an extra layer)
                unknown.append(key)
                break
            if name in converted:
                twice.append(name)
            if third is not None:
                if tensor.shape[0] % 3:
                    problems.append(f"{key} has {tensor.shape[0]} rows, not a q/k/v stack")
                    break
                # A copy: three views of one storage would be saved as shared tensors.
                tensor_part = tensor.chunk(3, dim=0)[third].clone()
            else:
                tensor_part = tensor
            converted[name] = tensor_part
    for name in NOT_IN_ORIGINAL:
        converted[name] = (torch.ones if name.endswith("weight") else torch.zeros)(expected[name])
    unfilled = [name for name in expected if name not in converted]
    misshapen = [f"{name} {tuple(converted[name].shape)} != {expected[name]}"
                 for name in expected if name in converted and tuple(converted[name].shape) != expected[name]]
    problems += _shared_box_head(converted)
    errors = []
    if unknown:
        errors.append(f"{len(unknown)} original tensors it does not know ({_listed(unknown)})")
    if unfilled:
        errors.append(f"{len(unfilled)} transformers tensors left unfilled ({_listed(unfilled)})")
    if misshapen:
        errors.append(f"{len(misshapen)} tensors of another shape ({_listed(misshapen, 4)})")
    if twice:
        errors.append(f"{len(twice)} tensors filled twice ({_listed(twice)})")
    if problems:
        errors.append("; ".join(problems[:4]))
    if errors:
        raise CheckpointError("not the GroundingDINO SwinT-OGC checkpoint: " + "; ".join(errors))
    return converted


def _shared_box_head(converted: dict) -> list[str]:
    """SwinT-OGC shares one box MLP across the decoder layers (dec_pred_bbox_embed_share), and
    transformers ties the copies into one: the copies in the file must therefore be equal."""
    import torch

    problems = []
    for name, tensor in converted.items():
        found = re.fullmatch(r"(?:model\.decoder\.)?bbox_embed\.\d+\.(.+)", name)
        first = converted.get(f"bbox_embed.0.{found.group(1)}") if found else None
        if first is not None and tensor.shape == first.shape and not torch.equal(tensor, first):
            problems.append(f"{name} differs from bbox_embed.0 (the box head is not shared)")
    return problems[:1]


def load_original_state_dict(path: str | Path) -> dict:
    """The state dict in an original GroundingDINO checkpoint: ``{"model": state_dict}`` or a bare
    state dict, a ``module.`` prefix (a DistributedDataParallel save) stripped. Tensors only: the
    file is read with ``weights_only=True``, and a file that needs more is refused, never unpickled."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (the original GroundingDINO checkpoint {CHECKPOINT_NAME})")
    try:
        data = load_tensors_only(path)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, {refusal(exc)}; only tensors are read") from None
    except Exception as exc:  # a truncated download, a file of another kind
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a GroundingDINO state dict (expected a dict of tensors, "
                              "or one under \"model\")")
    return {(key[len("module."):] if key.startswith("module.") else key): value for key, value in state.items()}


def model_from_checkpoint(path: str | Path):
    """``GroundingDinoForObjectDetection`` (default SwinT-OGC config) holding the original
    checkpoint's weights, converted in memory; nothing is written."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    converted = convert_state_dict(load_original_state_dict(path))
    # transformers builds the model on the meta device and takes these tensors as they are (no copy).
    with _no_progress_bars():
        return GroundingDinoForObjectDetection.from_pretrained(None, config=GroundingDinoConfig(), state_dict=converted)


@contextmanager
def _no_progress_bars():
    """transformers' progress bars (loading tensors already in memory, writing one file) are noise
    on a command's one line of output."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def bert_vocab() -> list[str]:
    """A bert-base-uncased-sized vocabulary: the real word pieces at their ids for the tokens the
    prompt and GroundingDINO use (``BERT_TOKENS``), a unique placeholder on every other line."""
    return [BERT_TOKENS.get(i, f"[unused{i}]") for i in range(BERT_VOCAB_SIZE)]


def build_processor():
    """GroundingDINO's processor: the image processor's defaults (800 / 1333, ImageNet mean and std),
    and the BERT tokenizer over ``bert_vocab()``."""
    from transformers import BertTokenizer, GroundingDinoImageProcessor, GroundingDinoProcessor

    vocab = {token: i for i, token in enumerate(bert_vocab())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer)


def write_transformers_folder(pth: str | Path, folder: str | Path) -> list[Path]:
    """Convert the original checkpoint ``pth`` into the transformers layout in ``folder``: config.json
    (the default SwinT-OGC config), model.safetensors, the processor config and the tokenizer files
    (vocab.txt among them). Returns the files written."""
    import os
    import shutil

    folder = Path(folder)
    model = model_from_checkpoint(pth)
    folder.mkdir(parents=True, exist_ok=True)
    # Written aside, then moved in with config.json last: a conversion cut short left a
    # config.json beside missing files, a layout the next run refused to touch without --overwrite.
    staging = folder / f".convert-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        (staging / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")
        with _no_progress_bars():
            model.save_pretrained(staging)
        build_processor().save_pretrained(staging)
        names = sorted((p.name for p in staging.iterdir() if p.is_file()), key=lambda name: name == "config.json")
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(folder / name for name in names)
