"""Released DisCo checkpoints (the official code's DeepSpeed ``mp_rank_00_model_states.pt``) turned
into this package's checkpoint format: a run directory that ``generate``, ``evaluate`` and
``train --init-from`` load.

The official network (github.com/Wangt-CN/DisCo, built on diffusers 0.14 and transformers 4.27)
names its parts ``unet``, ``controlnet`` (fine-tuning: ``nets.0`` the pose ControlNet, ``nets.1``
the background ControlNet; HAP pre-training: the background ControlNet alone, no ``nets``),
``refer_clip_proj`` (our ``reference_projection``), ``vae`` and ``clip_image_encoder`` (our
``image_encoder``). Below the part names three things differ from diffusers 0.42 / transformers 5:

* the background ControlNet's latent conditioning is a module holding one 3 x 3 conv,
  ``controlnet_cond_embedding.conv_in`` (4 -> 320), where ours is that conv itself,
  ``controlnet_cond_embedding``: same shapes, same function;
* the VAE's mid-block attention is diffusers 0.14's ``AttentionBlock``: ``query`` / ``key`` /
  ``value`` / ``proj_attn`` for ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` (linear layers;
  older 1 x 1 convolution weights of the same layers are reshaped);
* CLIP's ``embeddings.position_ids`` was a saved buffer in transformers 4.27 and is not one
  now: it is checked (``0 .. n-1``) and dropped.

Only the trainable weights are stored (``model.trainable_parameters()``, float32); the frozen
parts are rebuilt from the base folder, so each frozen tensor of the file must equal the base's.

The file is read without running pickled code: ``torch.load(weights_only=True)`` allows tensors,
plain containers and numbers, ``OrderedDict``, ``torch.Size`` and ``set`` (what DeepSpeed's
model-states file holds besides the weights: ``buffer_names``, ``param_shapes``,
``sparse_tensor_module_names``, ``ds_config``, ``ds_version``, step counters, an LR scheduler's
state) and ``argparse.Namespace`` (``pipeline/safe_load.py``). Anything else is refused before it is
built.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from disco.model.checkpoint import (BASE_DIGEST_KEY, DamagedCheckpoint, _check_trainable, _put, base_weights_digest,
                                   list_checkpoints, save_checkpoint)
from disco.model.configs import RUN_CONFIG_FILE
from disco.pipeline.errors import ConfigError, first_line
from disco.pipeline.safe_load import load_tensors_only, refusal

OFFICIAL_DIFFUSERS = "0.14.0"  # what the official code pins (requirements.txt)
VARIANTS = ("pretrain", "finetune")

# Official prefix -> (our prefix, the part it is, as the summary names it). The first match wins.
_PARTS = {
    "finetune": (
        ("unet.", "unet.", "unet"),
        ("controlnet.nets.0.", "pose_controlnet.", "pose controlnet"),
        ("controlnet.nets.1.", "background_controlnet.", "background controlnet"),
        ("refer_clip_proj.", "reference_projection.", "projection"),
        ("vae.", "vae.", "vae"),
        ("clip_image_encoder.", "image_encoder.", "clip"),
    ),
    "pretrain": (
        ("unet.", "unet.", "unet"),
        ("controlnet.", "background_controlnet.", "background controlnet"),
        ("refer_clip_proj.", "reference_projection.", "projection"),
        ("vae.", "vae.", "vae"),
        ("clip_image_encoder.", "image_encoder.", "clip"),
    ),
}
PART_NAMES = ("unet", "pose controlnet", "background controlnet", "projection", "vae", "clip")

# Renames inside a part (regular expression on the name after the part's prefix -> replacement).
_BACKGROUND_EMBEDDING = (re.compile(r"^controlnet_cond_embedding\.conv_in\."), "controlnet_cond_embedding.")
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTENTION_NAME = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_RENAMES = {
    "background controlnet": lambda rest: _BACKGROUND_EMBEDDING[0].sub(_BACKGROUND_EMBEDDING[1], rest),
    "vae": lambda rest: _VAE_ATTENTION_NAME.sub(lambda m: m.group(1) + _VAE_ATTENTION[m.group(2)] + ".", rest),
}
# Saved buffers of the old libraries that are no parameter of ours: checked, then dropped.
_POSITION_IDS = "clip_image_encoder.vision_model.embeddings.position_ids"


class OfficialCheckpointError(ConfigError):
    """A released DisCo checkpoint that does not fit this package's model (or the given base)."""


class UnsafeCheckpoint(DamagedCheckpoint):
    """A checkpoint file whose pickle holds code or objects beyond tensors and plain values."""


# -- reading --------------------------------------------------------------------------------------

@dataclasses.dataclass
class OfficialFile:
    weights: Mapping[str, torch.Tensor]
    step: int = 0
    info: dict = dataclasses.field(default_factory=dict)  # ds_version, global_steps, ... (plain values)


def read_official(path: str | Path) -> OfficialFile:
    """The weights of a DeepSpeed model-states file (under ``module``), of a plain state dict
    (``torch.save``) or of a safetensors file, read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
            raise DamagedCheckpoint(f"{path} is damaged or not a safetensors file ({first_line(exc)})") from None
        return _state_dict(path, data, {})
    try:
        data = load_tensors_only(path, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(f"{path}: {refusal(exc)}; refused without running it") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise DamagedCheckpoint(f"{path} is damaged or not a checkpoint file ({first_line(exc)})") from None
    info = {}
    if isinstance(data, Mapping) and "module" in data and not isinstance(data["module"], Mapping):
        raise DamagedCheckpoint(f"{path} holds no weights under 'module' (DeepSpeed kept them elsewhere, e.g. in "
                                "ZeRO-3 shards); convert the consolidated weights instead")
    if isinstance(data, Mapping):
        for key in ("module", "models", "state_dict"):  # DeepSpeed, the official non-DeepSpeed save, Lightning
            if isinstance(data.get(key), Mapping):
                info = {k: v for k, v in data.items()
                        if k in ("ds_version", "global_steps", "global_samples", "skipped_steps", "epoch", "global_step")
                        and isinstance(v, (int, str))}
                data = data[key]
                break
    return _state_dict(path, data, info)


def _state_dict(path: Path, data, info: dict) -> OfficialFile:
    """The weights of a file as read: a dict of name -> tensor, a DDP wrapper's prefix stripped."""
    if not isinstance(data, Mapping) or not data:
        raise DamagedCheckpoint(f"{path} holds no state dict (expected DeepSpeed's model states with the weights "
                                "under 'module', or a dict of name -> tensor)")
    bad = next((k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise DamagedCheckpoint(f"{path}: entry {bad!r} of its state dict is not a tensor")
    if all(v.numel() == 0 for v in data.values()):  # ZeRO-3 keeps the weights in its shards, 0-size stand-ins here
        raise DamagedCheckpoint(f"{path} holds only empty tensors (DeepSpeed ZeRO-3 keeps the weights in its "
                                "optimizer shards); consolidate them (DeepSpeed's zero_to_fp32.py) and convert that file")
    if all(k.startswith("module.") for k in data):  # saved from a DDP wrapper
        data = {k[len("module."):]: v for k, v in data.items()}
    step = info.get("global_steps", info.get("global_step", 0))
    return OfficialFile(dict(data), int(step) if isinstance(step, int) else 0, info)


def detect_variant(keys) -> str:
    """``finetune`` (``controlnet.nets.0`` / ``nets.1``: pose and background) or ``pretrain``
    (HAP: one ControlNet, the background's, directly under ``controlnet``)."""
    keys = list(keys)
    if any(k.startswith("controlnet.nets.") for k in keys):
        return "finetune"
    if any(k.startswith("controlnet.") for k in keys):
        return "pretrain"
    raise OfficialCheckpointError("no ControlNet weights (controlnet.*) in the file: not a DisCo checkpoint of the "
                                  "official code")


# -- the key map ------------------------------------------------------------------------------------

@dataclasses.dataclass
class KeyMap:
    """Official name -> ours, with the part of each; dropped official names; unmapped ones."""

    ours: dict[str, str]
    part: dict[str, str]
    dropped: list[str]
    leftover: list[str]


def map_keys(keys, variant: str) -> KeyMap:
    """Our parameter name for each official name of a ``variant`` checkpoint."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    ours, part, dropped, leftover = {}, {}, [], []
    for key in keys:
        if key == _POSITION_IDS:
            dropped.append(key)
            continue
        for prefix, target, name in _PARTS[variant]:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                rename = _RENAMES.get(name)
                ours[key] = target + (rename(rest) if rename else rest)
                part[key] = name
                break
        else:
            leftover.append(key)
    return KeyMap(ours, part, dropped, leftover)


def _refusal(keys, variant: str) -> str | None:
    """Why a checkpoint of the official code is another architecture than ours, if it is."""
    keys = set(keys)
    temporal = next((k for k in keys if ".tem_conv." in k or ".tem_attn." in k or ".tem_norm." in k), None)
    if temporal is not None:
        return (f"it is a temporal-module (TM) model ({temporal}, ...), whose ResNet blocks also normalise over all "
                "16 frames of a clip (GroupNorm on 5-D tensors) where ours normalise each frame: its weights would not "
                "give its outputs here; convert the fine-tuned image model it was trained from, then train the "
                "temporal stage on it (train --stage temporal --init-from RUN)")
    if any(k.startswith("text_encoder.") for k in keys):
        return ("it holds a text encoder (text_encoder.*): it was trained with --ref_null_caption, whose background "
                "ControlNet attends to SD 1.5 text embeddings, not to the reference's CLIP tokens as ours does")
    background = "controlnet.nets.1." if variant == "finetune" else "controlnet."
    if f"{background}controlnet_cond_embedding.conv_out.weight" in keys:
        return ("its background ControlNet has the pixel-space conditioning embedding (trained without --refer_sdvae); "
                "ours conditions on the background's VAE latent through one 3 x 3 conv")
    if "clip_image_encoder.visual_projection.weight" in keys and "refer_clip_proj.weight" not in keys:
        return ("it has no refer_clip_proj: it was trained with the CLIP projection itself (--refer_clip_proj) or "
                "the pooled CLIP embedding, not the trainable projection of all 257 tokens ours has")
    return None


# -- conversion ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Conversion:
    output: Path
    checkpoint: Path
    variant: str
    step: int
    counts: dict[str, dict[str, int]]  # part -> {"tensors", "trainable", "checked"}
    dropped: int
    reshaped: int
    dtypes: list[str]

    def summary(self) -> list[str]:
        lines = []
        for name in PART_NAMES:
            c = self.counts.get(name)
            if c:
                lines.append(f"{name}: {c['tensors']} tensors, {c['trainable']} trainable (stored), "
                             f"{c['checked']} frozen (equal to the base)")
        lines.append(f"dropped: {self.dropped} (CLIP position_ids, checked); reshaped: {self.reshaped}")
        return lines


def _frozen_equal(found: torch.Tensor, base: torch.Tensor, trained_in: torch.dtype | None = None) -> bool:
    """Equal at the lowest of the two precisions and ``trained_in`` (a DeepSpeed fp16 file holds
    the fp32 base rounded to fp16, and its CLIP encoder in fp32 but rounded too: the official
    ``Net.half`` halves the whole network, then turns CLIP back to float): both rounded to it,
    then allclose within a unit of its last place."""
    if found.dtype.is_floating_point != base.dtype.is_floating_point:
        return False
    low = found.dtype
    if low.is_floating_point:
        low = max((found.dtype, base.dtype, trained_in or found.dtype), key=lambda t: torch.finfo(t).eps)
    elif found.dtype != base.dtype:
        return False
    a, b = found.to(low).to(torch.float64), base.detach().to(low).to(torch.float64)
    if not low.is_floating_point:
        return torch.equal(a, b)
    eps = torch.finfo(low).eps
    return torch.allclose(a, b, rtol=eps, atol=eps * 1e-3)


def fp16_file(found: "OfficialFile") -> bool:
    """A file of DeepSpeed's fp16 training: it holds fp16 tensors (all but CLIP's)."""
    return any(t.dtype == torch.float16 for t in found.weights.values())


def _fit(found: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``found`` in ``shape``: as it is, or a 1 x 1 convolution's weight as a linear layer's."""
    if found.shape == shape:
        return found
    if found.dim() == 4 and len(shape) == 2 and found.shape[:2] == shape and found.shape[2:] == (1, 1):
        return found.reshape(shape)
    return None


def _check_output(output: Path, overwrite: bool) -> None:
    from disco.pipeline.errors import output_folder_problem

    if output.exists() and not output.is_dir():
        raise OfficialCheckpointError(f"--output {output} is a file, not a folder")
    if (output / RUN_CONFIG_FILE).exists() or list_checkpoints(output):
        if not overwrite:
            raise OfficialCheckpointError(f"--output {output} already holds a run ({RUN_CONFIG_FILE} / checkpoints); "
                                          "pass --overwrite to replace it")
    # Before the checkpoint is read and checked (minutes at full size): a file above the folder,
    # or no permission, was found only when the run was written.
    problem = output_folder_problem(output, "--output")
    if problem:
        raise OfficialCheckpointError(problem)


def _write_run(output: Path, base: Path, variant: str, step: int, model, state: dict, overwrite: bool) -> Path:
    """``config.yaml`` (the training configuration of a run on ``base``) and one checkpoint."""
    import shutil

    import yaml

    output.mkdir(parents=True, exist_ok=True)
    # The checkpoint first, every old one kept: a write that fails (a full disk) leaves an
    # overwritten run as it was. Then its config, then (--overwrite) the checkpoints of other steps.
    written = save_checkpoint(output, step, model, {}, state, None, keep=len(list_checkpoints(output)) + 1)
    # The fields a run's config.yaml must say for its checkpoints to load (the trainer reads any
    # other field as its default; this layer does not import the trainer).
    options = dict(stage=variant, pretrained=str(base.resolve()), model=None, output=str(output.resolve()),
                   background_hole=0.0, **{BASE_DIGEST_KEY: base_weights_digest(base)})
    if variant == "finetune":
        # The official pose pictures it was trained on: the official renderer, body only;
        # generate and evaluate draw the driving poses the same way.
        options.update(pose_style="disco", hands=False)
    tmp = output / f"{RUN_CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(options, sort_keys=False))
    tmp.replace(output / RUN_CONFIG_FILE)
    if overwrite:  # only what a run holds: the old checkpoints (of any step) and its config
        for old in list_checkpoints(output).values():
            if old != written:
                shutil.rmtree(old)
    return written


def convert_official(checkpoint: str | Path, base: str | Path, output: str | Path, variant: str = "auto",
                     overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Conversion:
    """Convert a released DisCo checkpoint into a run directory on ``base`` (the local
    sd-image-variations folder it was trained from). Every official tensor is mapped or dropped,
    every one of our parameters is found, the frozen ones equal the base's; otherwise one
    ``ConfigError`` line names the first key that does not fit, and nothing is written."""
    from disco.model.disco import DisCoModel

    checkpoint, base, output = Path(checkpoint), Path(base), Path(output)
    say = progress or (lambda message: None)
    if variant not in ("auto", *VARIANTS):
        raise OfficialCheckpointError(f"unknown variant {variant!r}; choose auto, pretrain or finetune")
    if not base.is_dir():
        raise OfficialCheckpointError(f"--base {base} is not a folder")
    _check_output(output, overwrite)
    say(f"reading {checkpoint}")
    found = read_official(checkpoint)
    detected = detect_variant(found.weights)
    if variant != "auto" and variant != detected:
        evidence = "controlnet.nets.0 / nets.1" if detected == "finetune" else "one ControlNet, no controlnet.nets"
        raise OfficialCheckpointError(f"{checkpoint} is a {detected} checkpoint ({evidence}); --variant {variant} "
                                      "does not fit it")
    variant = detected
    why = _refusal(found.weights, variant)
    if why:
        raise OfficialCheckpointError(f"{checkpoint} is not the DisCo architecture this package builds: {why}")
    keymap = map_keys(found.weights, variant)
    if keymap.leftover:
        raise OfficialCheckpointError(f"{checkpoint}: key {keymap.leftover[0]} is not mapped to any of our parameters "
                                      f"({len(keymap.leftover)} such keys); is it a {variant} DisCo checkpoint?")
    say(f"building the {variant} model on {base}")
    try:
        model = DisCoModel.from_sd_image_variations(base, variant=variant)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise OfficialCheckpointError(f"--base {base}: {first_line(exc)}") from None
    params = dict(model.named_parameters())
    trainable_names = set(model.trainable_parameters())
    targets: dict[str, str] = {}
    for key, name in keymap.ours.items():
        if name in targets:
            raise OfficialCheckpointError(f"{checkpoint}: keys {targets[name]} and {key} both map to our {name}")
        targets[name] = key
    missing = [name for name in params if name not in targets]
    if missing:
        raise OfficialCheckpointError(f"{checkpoint} lacks our parameter {missing[0]} ({len(missing)} missing); "
                                      f"is it a {variant} DisCo checkpoint?")
    extra = [name for name in targets if name not in params]
    if extra:
        raise OfficialCheckpointError(f"{checkpoint}: key {targets[extra[0]]} maps to {extra[0]}, which our {variant} "
                                      f"model does not have ({len(extra)} such keys)")
    for key in keymap.dropped:
        ids = found.weights[key]
        if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
            raise OfficialCheckpointError(f"{checkpoint}: {key} is not 0 .. {ids.numel() - 1}")
    counts = {name: {"tensors": 0, "trainable": 0, "checked": 0} for name in PART_NAMES}
    reshaped, dtypes = 0, set()
    _check_trainable(model, [name for name in params if name in trainable_names], checkpoint)
    say("checking the frozen tensors against the base and collecting the trainable ones")
    trained_in = torch.float16 if fp16_file(found) else None
    for name, param in params.items():  # in our model's order: the first difference is reported
        key = targets[name]
        tensor = _fit(found.weights[key], param.shape)
        if tensor is None:
            raise OfficialCheckpointError(f"{checkpoint}: {key} has shape {tuple(found.weights[key].shape)}, our {name} "
                                          f"{tuple(param.shape)}")
        reshaped += tensor.shape != found.weights[key].shape
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
        count = counts[keymap.part[key]]
        count["tensors"] += 1
        if name in trainable_names:
            # In place at once (the base's tensor is freed): the peak stays the model plus one tensor.
            _put(model, name, tensor.to(torch.float32).contiguous())
            count["trainable"] += 1
        else:
            if not _frozen_equal(tensor, param, trained_in):
                raise OfficialCheckpointError(f"{checkpoint}: frozen {key} differs from the base's {name} in {base}; "
                                              "was the checkpoint trained from another base?")
            count["checked"] += 1
    state = {"converted_from": str(checkpoint.resolve()), "official_variant": variant,
             "official": {k: v for k, v in found.info.items()}, "file_dtypes": sorted(dtypes)}
    say(f"writing {output}")
    written = _write_run(output, base, variant, found.step, model, state, overwrite)
    return Conversion(output, written, variant, found.step, {k: v for k, v in counts.items() if v["tensors"]},
                      len(keymap.dropped), int(reshaped), sorted(dtypes))
