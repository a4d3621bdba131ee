"""The one checkpoint format, below training and generation: a training run's checkpoints (what
the trainer writes and resumes from, what ``generate`` and ``evaluate`` load) and the
``DisCoModel.save_pretrained`` folder, turned into models.

A run directory holds ``config.yaml`` (the resolved training configuration), ``checkpoint-XXXXXXXX/``
folders, ``logs/`` (TensorBoard), ``samples/`` (PNG grids) and ``metrics.jsonl``. A checkpoint
holds the trainable weights (``trainable.safetensors``, plus ``ema.safetensors`` with EMA), the
optimizer / LR scheduler / grad scaler / RNG states (``training_state.pt``, tensors and plain
values only, read back with ``weights_only=True``) and ``state.json`` (step, data positions,
skipped rows). It is written to a hidden temporary folder and renamed into place, so a kill at
any moment leaves either the whole checkpoint or none. The frozen parts are not stored: they are
rebuilt from the run's base model (``--pretrained`` folder, or a named architecture drawn from
the run's seed), which ``ModelSource`` names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file

from disco.model.configs import RUN_CONFIG_FILE
from disco.model.meta_init import set_tensor
from disco.pipeline.errors import ConfigError, first_line, read_options_yaml

WEIGHTS_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
STATE_FILE = "state.json"
PRETRAINED_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # of a save_pretrained folder
_NAME = re.compile(r"^checkpoint-(\d{8})$")

if TYPE_CHECKING:
    from disco.model.disco import DisCoModel

class DamagedCheckpoint(ConfigError):
    """A checkpoint file is missing, cut short, or not what its name says."""


def _read(path: Path, read):
    """``read()`` of one checkpoint file; any failure is one line naming the file. Nothing is
    unpickled beyond tensors and plain values (``weights_only``), so a refusal is final."""
    import pickle

    try:
        return read()
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing; the checkpoint is incomplete") from None
    except pickle.UnpicklingError:
        raise DamagedCheckpoint(f"{path} holds objects other than tensors and plain values; it was not "
                                "loaded (a checkpoint of this tool never does)") from None
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and json raise many kinds
        raise DamagedCheckpoint(f"{path} is damaged or not a checkpoint file ({first_line(exc)})") from None


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(run: str | Path) -> dict[int, Path]:
    """Complete checkpoints of a run by step (temporary and half-deleted folders never count)."""
    run = Path(run)
    found = {}
    if run.is_dir():
        for path in run.iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE_FILE).exists():
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


POINTER_FILE = "pointer.json"  # what a checkpoint reported to Ray Train holds: where ours lives


def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """``path`` is a checkpoint folder, or a run directory (then its latest checkpoint, or ``step``),
    or the folder Ray Train keeps for a reported checkpoint (``RUN/ray/train-*/checkpoint-N/``,
    which points at ours)."""
    path = Path(path)
    if (path / POINTER_FILE).exists() and not (path / WEIGHTS_FILE).exists():
        pointed = Path(json.loads((path / POINTER_FILE).read_text())["checkpoint"])
        parents = path.absolute().parents
        beside = parents[2] / pointed.name if len(parents) > 2 else pointed  # RUN/ray/train-*/checkpoint-N
        if (beside / WEIGHTS_FILE).exists():
            pointed = beside  # the same folder, or the run's own where it was moved or copied
        if not (pointed / WEIGHTS_FILE).exists():
            raise ConfigError(f"{path} is Ray Train's record of the checkpoint {pointed}, which is not there any "
                              f"more (pruned by --keep?); give the run directory for its latest checkpoint")
        return find_checkpoint(pointed, step)
    if (path / WEIGHTS_FILE).exists():
        if step is not None and int(json.loads((path / STATE_FILE).read_text())["step"]) != step:
            raise ConfigError(f"{path} is the checkpoint of another step than {step}")
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise ConfigError(f"{path} holds no checkpoint (expected checkpoint-XXXXXXXX/ folders or {WEIGHTS_FILE})")
    if step is None:
        return checkpoints[max(checkpoints)]
    if step not in checkpoints:
        raise ConfigError(f"{path} has no checkpoint of step {step}; it has steps {', '.join(map(str, checkpoints))}")
    return checkpoints[step]


# -- models -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a run's base model comes from: an sd-image-variations folder (``pretrained``), or a
    named architecture (``model``) with random weights drawn from ``seed``."""

    model: str | None = None
    pretrained: str | None = None
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> "ModelSource":
        """From a training configuration (or anything with its ``model``, ``pretrained``,
        ``model_seed`` and ``seed`` fields)."""
        seed = cfg.model_seed if cfg.model_seed is not None else cfg.seed
        return cls(model=cfg.model, pretrained=cfg.pretrained, seed=seed)

    @classmethod
    def of_run(cls, run: Path) -> tuple["ModelSource", str]:
        """The base model and the stage of a run directory, from its ``config.yaml``."""
        path = Path(run) / RUN_CONFIG_FILE
        if not path.exists():
            raise ConfigError(f"{run} holds no {RUN_CONFIG_FILE}; cannot tell which base model its checkpoints belong to")
        values = read_options_yaml(path)
        seed = values.get("model_seed")
        # The trainer writes every field; a hand-edited file gets the trainer's defaults.
        stage = values.get("stage") or "finetune"
        return cls(model=values.get("model"), pretrained=values.get("pretrained"),
                   seed=int(seed if seed is not None else values.get("seed") or 0)), str(stage)


def base_model(source: ModelSource, variant: str) -> DisCoModel:
    """The model before any training: the sd-image-variations folder, or the named architecture
    with random weights drawn from ``source.seed`` (so a run directory can rebuild its frozen parts)."""
    # Imported where a model is built: the launcher reads run folders without diffusers (10 s).
    from disco.model.disco import DisCoModel

    if source.pretrained:
        return DisCoModel.from_sd_image_variations(source.pretrained, variant=variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        return DisCoModel.from_architecture(source.model, variant=variant)


def base_unet(source: ModelSource):
    """The base model's UNet alone: from the sd-image-variations folder, or drawn from
    ``source.seed`` exactly as ``base_model`` draws it (it is the first module built)."""
    if source.pretrained:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(Path(source.pretrained) / "unet", local_files_only=True)
    from disco.model.disco import DisCoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        return DisCoModel.unet_from_architecture(source.model)


# The files of an sd-image-variations folder ``DisCoModel.from_sd_image_variations`` reads: each
# part's config and weights (safetensors where there are any, as diffusers and transformers
# prefer; sharded ones too; not a variant such as ``.fp16.``), and the scheduler's config.
_BASE_PARTS = ("unet", "vae", "image_encoder")
_BASE_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
BASE_DIGEST_KEY = "pretrained_digest"


def base_weights_digest(folder: str | Path) -> str:
    """What identifies an sd-image-variations folder's weights, wherever it lies: each file the
    model is built from, by name, size and a hash of its first and last MiB (a few MiB read, not
    gigabytes). A run records it when it starts: the frozen parts (and, for HAP, the UNet's
    ResNets) are not in its checkpoints but rebuilt from the folder, so another folder at that
    path (another revision, a half-precision copy) gave another model without a word."""
    import hashlib

    from disco.pipeline.sources.generic import ends_digest

    folder = Path(folder)
    files = []
    for part in _BASE_PARTS:
        names = sorted(p.name for p in (folder / part).iterdir() if _BASE_WEIGHTS.match(p.name)) \
            if (folder / part).is_dir() else []
        if any(n.endswith(".safetensors") for n in names):
            names = [n for n in names if n.endswith(".safetensors")]
        files += [folder / part / n for n in ("config.json", *names)]
    files.append(folder / "scheduler" / "scheduler_config.json")
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0{ends_digest(path, size)}\n".encode())
    return digest.hexdigest()


def check_base_weights(pretrained: str | Path, recorded: str | None, run: str | Path, where: str = "") -> None:
    """Refuse ``pretrained`` where its weights are not those the run ``run`` recorded when it
    started (``recorded``: its config.yaml's ``pretrained_digest``; None, a run of an older
    version: nothing to check)."""
    if not recorded or not pretrained or not Path(pretrained).is_dir():
        return
    found = base_weights_digest(pretrained)
    if found != recorded:
        raise ConfigError(f"{where}{pretrained} is not the base model {run} was trained on: its weights differ from "
                          f"those recorded when the run started ({BASE_DIGEST_KEY} {recorded} in its {RUN_CONFIG_FILE}, "
                          f"{found} here); point `pretrained` there to the folder it was trained on, or, if the "
                          f"weights are the same (converted to another format, say), remove {BASE_DIGEST_KEY} from it")


def legacy_hap_names(model: DisCoModel, names) -> set[str]:
    """The names of ``names`` that a HAP checkpoint written before its trainable set followed the
    official one holds besides today's set: the UNet's Transformer2D wrappers (norm, proj_in,
    proj_out under ``.attentions.``), then trained. They are loaded as they are (the model is
    the one that was trained); such a run cannot be resumed (its optimizer state is of that set)."""
    if model.config.variant != "pretrain":
        return set()
    extra = set(names) - set(model.trainable_parameters())
    params = dict(model.named_parameters())
    ok = all(n.startswith("unet.") and ".attentions." in n and n in params for n in extra)
    return extra if ok else set()


def _check_trainable(model: DisCoModel, names, source: Path) -> None:
    expected = set(model.trainable_parameters()) | legacy_hap_names(model, names)
    if set(names) != expected:
        missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
        raise ConfigError(f"{source} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")


def _put(model: DisCoModel, name: str, tensor: torch.Tensor) -> None:
    """``tensor`` becomes parameter ``name`` (no copy) when it fits its device, dtype and shape;
    otherwise it is copied into it."""
    param = model.get_parameter(name)
    if tensor.shape != param.shape:  # copy_ would broadcast a (1,) tensor over the whole parameter
        raise DamagedCheckpoint(f"{name} is {tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} in this "
                                "model: it was written for another architecture")
    if (tensor.device, tensor.dtype) == (param.device, param.dtype):
        set_tensor(model, name, tensor.detach())
    else:
        with torch.no_grad():
            param.copy_(tensor)


def load_trainable(model: DisCoModel, weights: dict[str, torch.Tensor], source: Path) -> None:
    """The trainable weights of a checkpoint into ``model``: the loaded tensors take the
    parameters' places, so no second copy of them remains."""
    _check_trainable(model, weights, source)
    for name, tensor in weights.items():
        _put(model, name, tensor)


def load_trainable_file(model: DisCoModel, path: Path) -> None:
    """As ``load_trainable``, reading one tensor at a time: besides the model, at most one
    tensor of the file is held."""
    from safetensors import safe_open

    with _read(path, lambda: safe_open(str(path), framework="pt", device="cpu")) as weights:
        _check_trainable(model, weights.keys(), path)
        for name in weights.keys():
            _put(model, name, _read(path, lambda name=name: weights.get_tensor(name)))


def load_model(path: str | Path, step: int | None = None, device: str = "cpu", ema: bool = True,
               dtype: torch.dtype | None = None) -> DisCoModel:
    """The trained DisCo model of a run directory (its latest checkpoint, or ``step``) or of one
    checkpoint folder: frozen parts rebuilt from the run's ``config.yaml`` (``--model`` or
    ``--pretrained``), trainable weights from safetensors (the EMA weights when the run kept an
    EMA, unless ``ema`` is False). Returned in eval mode on ``device``, cast to ``dtype`` on the
    way (tensor by tensor: a float16 model never stands on the GPU in float32, 7.9 GB at full size)."""
    checkpoint = find_checkpoint(path, step)
    source, stage = ModelSource.of_run(checkpoint.parent)
    if source.pretrained and not Path(source.pretrained).is_dir():
        raise ConfigError(f"{checkpoint.parent}'s base model {source.pretrained} (`pretrained` in its "
                          f"{RUN_CONFIG_FILE}) is not on this machine: copy that sd-image-variations folder there, or "
                          "set `pretrained` in that file to where it is")
    options = read_options_yaml(checkpoint.parent / RUN_CONFIG_FILE)
    if source.pretrained and stage != "temporal":  # (a temporal run's base is its image model's, checked there)
        check_base_weights(source.pretrained, options.get(BASE_DIGEST_KEY), checkpoint.parent)
    if stage == "temporal":
        model = temporal_base(checkpoint.parent)  # its image model's pose scale included
    else:
        model = base_model(source, stage)
        pose_scale = options.get("pose_scale")
        if pose_scale is not None:  # the run's --pose-scale: its pose residuals were trained at that scale
            model.register_to_config(pose_scale=float(pose_scale))
    load_trainable_file(model, checkpoint / weights_name(checkpoint, ema))
    return _to(model, device, dtype).eval()


def _to(model: DisCoModel, device: str, dtype: torch.dtype | None) -> DisCoModel:
    """``model`` on ``device``, cast on the way where ``dtype`` is given (diffusers warns about
    modules kept in float32 whenever ``to`` is given a dtype, None included)."""
    return model.to(device) if dtype is None else model.to(device=device, dtype=dtype)


def weights_name(checkpoint: Path, ema: bool = True) -> str:
    """The weights file a model is loaded from: the EMA's where the run kept one (and ``ema``)."""
    return EMA_FILE if ema and (checkpoint / EMA_FILE).exists() else WEIGHTS_FILE


def describe_checkpoint(path: str | Path, ema: bool = True) -> dict:
    """What ``load_checkpoint(path, ema=ema)`` loads, for the records of generate and evaluate: the
    checkpoint folder a run resolves to now, its step, its run's stage and which weights (EMA or
    as trained)."""
    path = Path(path)
    if is_pretrained_folder(path):
        return {"path": str(path), "kind": "save_pretrained"}
    checkpoint = find_checkpoint(path)
    return {"path": str(path), "kind": "training run", "checkpoint": str(checkpoint),
            "step": json.loads((checkpoint / STATE_FILE).read_text()).get("step"),
            "stage": ModelSource.of_run(checkpoint.parent)[1],
            "weights": "ema" if weights_name(checkpoint, ema) == EMA_FILE else "trained"}


IMAGE_MODEL_DIR = "image-model"  # in a temporal-stage run: its own copy of the image model's checkpoint
HAP_MODEL_DIR = "hap-model"  # in a fine-tuning run: its own copy of the HAP checkpoint it started from
# The folder a run of each stage keeps its --init-from checkpoint in.
INIT_MODEL_DIRS = {"temporal": IMAGE_MODEL_DIR, "finetune": HAP_MODEL_DIR}


def keep_init_model(run: Path, checkpoint: Path, stage: str) -> Path:
    """A run's own copy of the ``checkpoint`` it starts from (``--init-from``, pinned to one
    checkpoint when the run starts): a temporal-stage run's fine-tuning checkpoint, whose image
    model its layers belong to (``RUN/image-model/``), or a fine-tuning run's HAP checkpoint
    (``RUN/hap-model/``, read until the run's own first checkpoint). The init run's config.yaml and
    that checkpoint's weights, hard links where the file system allows, so that the init run
    pruning its checkpoints (``--keep``) as it trains on never takes it away, and a restart always
    starts from the same weights. Returns the copy's checkpoint folder."""
    source_run, target_run = checkpoint.parent, Path(run) / INIT_MODEL_DIRS[stage]
    target = target_run / checkpoint.name
    tmp = target_run / f".tmp-{checkpoint.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (WEIGHTS_FILE, EMA_FILE, STATE_FILE):
        if (checkpoint / name).exists():
            try:
                os.link(checkpoint / name, tmp / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(checkpoint / name, tmp / name)
    shutil.copy2(source_run / RUN_CONFIG_FILE, target_run / RUN_CONFIG_FILE)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def own_init_model(run: Path, init: str | Path) -> Path:
    """Where a run's pinned ``init_from`` is: its own copy (``keep_init_model``), also where the run
    was moved or copied (its config.yaml names the old place), else ``init`` as saved."""
    init = Path(init)
    own = Path(run) / init.parent.name / init.name
    if init.parent.name in INIT_MODEL_DIRS.values() and own.exists():
        return own
    return init


def temporal_base(run: Path) -> DisCoModel:
    """The model a temporal-stage run's checkpoints hold the temporal layers of: the image model
    of the fine-tuning checkpoint it was initialised from (its ``init_from``, pinned to one
    checkpoint when the run started), with temporal layers of the run's clip length added."""
    from disco.model.temporal import DEFAULT_CLIP_FRAMES, TemporalConfig, add_temporal

    values = read_options_yaml(Path(run) / RUN_CONFIG_FILE)
    if not values.get("init_from"):
        raise ConfigError(f"{run} is a temporal-stage run without init_from; cannot rebuild its image model")
    image = load_model(own_init_model(run, values["init_from"]))
    frames = int(values.get("clip_frames") or DEFAULT_CLIP_FRAMES)
    with torch.random.fork_rng(devices=[]):  # the temporal layers' draws are overwritten by the checkpoint
        return add_temporal(image, TemporalConfig(frames=frames))


def pose_setting(path: str | Path) -> tuple[str, bool]:
    """The pose drawing (style, hands) a model was trained on, which generate and evaluate draw
    its driving poses with: from the run's ``config.yaml`` for a training run or one of its
    checkpoints; OpenPose colours with hands (the preprocessing defaults) for a
    ``save_pretrained`` folder or a run that recorded none."""
    from disco.pipeline.store.pose import DEFAULT_HANDS, DEFAULT_STYLE

    values = run_options(path)
    if values is None:
        return DEFAULT_STYLE, DEFAULT_HANDS
    hands = values.get("hands")
    return str(values.get("pose_style") or DEFAULT_STYLE), DEFAULT_HANDS if hands is None else bool(hands)


def trained_drawing(path: str | Path):
    """How the poses the model at ``path`` learnt from were drawn, as a ``DataPose``: the style
    and hands of its run (``pose_setting``); with or without face points, the stored frame size
    and the video rate of the data it trained on, from the manifest of the first of its data
    folders (``trained_data``: its own first) found here; the preprocessing defaults where none is
    (a ``save_pretrained`` folder, a checkpoint copied away from its data)."""
    from disco.pipeline.store.pose import MANIFEST_FILE, DataPose, data_pose

    style, hands = pose_setting(path)
    found = next((data_pose(folder) for folder in trained_data(path) if (Path(folder) / MANIFEST_FILE).is_file()),
                 DataPose())
    return dataclasses.replace(found, style=style, hands=hands, keypoints=True)


def run_options(path: str | Path) -> dict | None:
    """The ``config.yaml`` of the run that ``path`` (a run, one of its checkpoints, or Ray Train's
    record of one) belongs to; None for a ``save_pretrained`` folder (a run's own, kept inside
    it, included) or where there is none."""
    path = Path(path)
    if is_pretrained_folder(path):
        return None
    if (path / POINTER_FILE).exists() and not (path / WEIGHTS_FILE).exists():
        path = find_checkpoint(path)
    config = (path if (path / RUN_CONFIG_FILE).exists() else path.parent) / RUN_CONFIG_FILE
    return read_options_yaml(config) if config.exists() else None


def trained_data(path: str | Path) -> list[str]:
    """The data folders a run trained on, and those of the runs it started from (``init_from``:
    a fine-tuning run's HAP run, a temporal run's fine-tuning run), as their config.yaml name them."""
    folders, values = [], run_options(path)
    for _ in range(8):  # a chain of runs; a loop of init_from (hand-edited files) stops here
        if values is None:
            break
        data = values.get("data") or []
        folders += [data] if isinstance(data, str) else [str(d) for d in data]
        values = run_options(values["init_from"]) if values.get("init_from") else None
    return folders


def trained_stage(path: str | Path) -> str | None:
    """The stage of the training run ``path`` belongs to (its ``config.yaml``); of a
    ``save_pretrained`` folder, "temporal" where it holds a temporal module; None for a run that
    does not say, or a path that is none of these."""
    try:
        if is_pretrained_folder(Path(path)):
            config = json.loads((Path(path) / "config.json").read_text())
            return "temporal" if config.get("temporal_config") else None
        value = (run_options(path) or {}).get("stage")
    except (OSError, ValueError):  # (ConfigError is a ValueError, as JSON's and UTF-8's are)
        return None
    return str(value) if value else None


def trained_resolution(path: str | Path) -> int | None:
    """The side a training run trained at (its ``config.yaml``), which it generates at by
    default; None for a ``save_pretrained`` folder or a run that does not say (a converted
    official checkpoint: the model's default, the paper's 256)."""
    value = (run_options(path) or {}).get("resolution")
    return int(value) if value else None


def background_hole(path: str | Path) -> float:
    """The person-hole value of the background condition a model was trained with: a run's
    ``config.yaml`` says (one without the key was trained before it became the official 0, with
    -1); a ``save_pretrained`` folder has today's value."""
    from disco.model.conditioning import HOLE, LEGACY_HOLE

    values = run_options(path)
    if values is None:
        return HOLE
    return float(values["background_hole"]) if "background_hole" in values else LEGACY_HOLE


def is_pretrained_folder(path: Path) -> bool:
    """A ``DisCoModel.save_pretrained`` folder: its config names the class and the weights are safetensors."""
    config = path / "config.json"
    if not (config.is_file() and (path / PRETRAINED_WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "DisCoModel"
    except (OSError, ValueError):
        return False


def load_checkpoint(path: str | Path, device: str = "cpu", ema: bool = True,
                    dtype: torch.dtype | None = None) -> DisCoModel:
    """Any model path a user gives ``generate`` or ``evaluate``: a ``save_pretrained`` folder, a
    training run, or one of its checkpoints (its EMA weights where it kept them, unless ``ema`` is
    False); the model comes back in eval mode on ``device``, in ``dtype`` (None: as built)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_pretrained_folder(path):
        from disco.model.disco import DisCoModel

        # diffusers only warns of missing weights (left at random) and drops unexpected ones: refused.
        model, info = DisCoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
        wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if wrong:
            raise DamagedCheckpoint(f"{path} does not fit its config: " + "; ".join(
                f"{k.replace('_', ' ')} {sorted(map(str, v))[:3]}" for k, v in wrong.items()))
        return _to(model, device, dtype).eval()
    return load_model(path, device=device, ema=ema, dtype=dtype)


# -- writing and reading checkpoints ------------------------------------------------------------------

def save_checkpoint(run: str | Path, step: int, model: DisCoModel, training_state: dict, state: dict,
                    ema_weights: dict[str, torch.Tensor] | None, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the last ``keep``."""
    return write_checkpoint(run, step, checkpoint_snapshot(model, training_state, ema_weights, copy=False), state, keep)


def _on_host(value, copy: bool):
    """``value`` (tensors in dicts, lists and tuples, as optimizer states are) with every tensor in
    host memory; ``copy``: a tensor already there is copied too, and every container rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=copy)
    if isinstance(value, dict):
        return {k: _on_host(v, copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(v, copy) for v in value)
    return value


def checkpoint_snapshot(model: DisCoModel, training_state: dict, ema_weights: dict[str, torch.Tensor] | None,
                        copy: bool = True) -> dict:
    """What a checkpoint holds, in host memory: the trainable weights (float32), the training
    state (optimizer, scheduler, scaler, generators) and the EMA weights. ``copy``: owned copies,
    so that training can go on (its updates are in place) while ``write_checkpoint`` writes them."""
    return {"weights": {n: p.detach().to("cpu", torch.float32, copy=copy).contiguous()
                        for n, p in model.trainable_parameters().items()},
            "training": _on_host(training_state, copy),
            "ema": None if ema_weights is None else {n: _on_host(t, copy).contiguous() for n, t in ema_weights.items()}}


def write_checkpoint(run: str | Path, step: int, snapshot: dict, state: dict, keep: int,
                     still_ours: Callable[[], None] | None = None) -> Path:
    """Write ``checkpoint_snapshot``'s ``snapshot`` as checkpoint ``step`` atomically (a temporary
    folder, every file synced, then renamed), then delete all but the last ``keep``.
    ``still_ours()``: raises where the run directory is no longer this run's, checked once the
    files are written, before anything in the folder is renamed or deleted."""
    run = Path(run)
    final = run / checkpoint_name(step)
    tmp = run / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(snapshot["weights"], str(tmp / WEIGHTS_FILE), metadata={"step": str(step)})
        if snapshot["ema"] is not None:
            save_file(snapshot["ema"], str(tmp / EMA_FILE))
        torch.save(snapshot["training"], tmp / TRAINING_STATE_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        # The run that took the folder clears the temporary folders it finds, ours included: its
        # line, not the failed write's.
        _still_ours(still_ours, tmp)
        raise
    _still_ours(still_ours, tmp)
    if final.exists():  # the same step written again after a resume: replace it whole
        old = run / f"{REPLACED_PREFIX}{final.name}-{os.getpid()}"
        final.rename(old)  # a kill before the next rename: clean_temporary puts it back
        tmp.rename(final)  # before the old copy goes: a kill while it is deleted leaves the new one in place
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    for old_step, old in list(list_checkpoints(run).items())[:-keep]:
        doomed = run / f".old-{old.name}-{os.getpid()}"
        old.rename(doomed)  # no longer a checkpoint the moment it is renamed, even if rmtree is cut short
        shutil.rmtree(doomed)
    return final


def _still_ours(still_ours: Callable[[], None] | None, tmp: Path) -> None:
    """``still_ours()``; where it raises, the checkpoint in the making goes first."""
    if still_ours is None:
        return
    try:
        still_ours()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict[str, torch.Tensor] | None]:
    """Trainable weights, training state (tensors and plain values only), ``state.json``, EMA weights.

    Every file is mapped, not read: safetensors maps its files, and the training state (AdamW's
    moments, 12.6 GB for a full fine-tune) is loaded with ``mmap``, so the workers of a node that
    resume from one checkpoint share its pages in the page cache instead of each holding a private
    copy (8 GPUs: 100 GB of host memory at once), and each page is read as its tensor moves to the GPU."""
    weights = _read(path / WEIGHTS_FILE, lambda: load_file(str(path / WEIGHTS_FILE)))
    training_state = _read(path / TRAINING_STATE_FILE, lambda: torch.load(
        path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True, mmap=True))
    state = _read(path / STATE_FILE, lambda: json.loads((path / STATE_FILE).read_text()))
    ema = _read(path / EMA_FILE, lambda: load_file(str(path / EMA_FILE))) if (path / EMA_FILE).exists() else None
    return weights, training_state, state, ema


# A checkpoint being replaced by one of the same step, between its two renames.
REPLACED_PREFIX = ".replaced-"


def clean_temporary(run: str | Path) -> list[Path]:
    """Remove what an interrupted checkpoint write or prune left behind. A checkpoint a kill
    caught while it was being replaced (moved aside, its successor not yet in place) is put back
    (with ``keep`` 1 it is the run's only one)."""
    removed = []
    for path in Path(run).glob(f"{REPLACED_PREFIX}checkpoint-*"):
        final = Path(run) / path.name[len(REPLACED_PREFIX):].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        else:
            path.rename(final)
    for path in [*Path(run).glob(".tmp-checkpoint-*"), *Path(run).glob(".old-checkpoint-*")]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
