"""The one configuration object of the training stage, with its YAML round trip."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from disco.model.configs import CONFIGS, RUN_CONFIG_FILE
from disco.pipeline.errors import ConfigError, read_options_yaml

STAGES = ("pretrain", "finetune", "temporal")
REF_MODES = ("first", "random")
PRECISIONS = ("no", "fp16", "bf16")
SUMMARY_FILE = "summary.json"
# In the run directory, written by the launcher: empty from the start, STOP_REQUESTED on Ctrl-C or
# SIGTERM. Rank 0 reads it after each step, and the step's collective tells the others; on a stop
# the run writes a checkpoint of that step and stops. A file that is there from
# the start and read, not one that appears: NFS clients take a name's absence from their cache for
# up to a minute (acdirmax), but revalidate a file they open (close-to-open), so a worker on a node
# other than the driver's saw a stop a minute late, leaving a step and a checkpoint less of
# `ray job stop`'s grace.
STOP_FILE = ".stop-requested"
STOP_REQUESTED = "stop"
# Also there from the start (empty, for the same reason), then WORKERS_STARTED once a Ray Train
# worker group began: a stop asked before that ends the run at once, since no worker would read
# STOP_FILE (a group that cannot be placed waits for room for ever).
WORKERS_FILE = ".workers-started"
WORKERS_STARTED = "started"


def stop_requested(run: Path) -> bool:
    """Whether the run's launcher asked it to stop (``STOP_FILE``)."""
    try:
        return (Path(run) / STOP_FILE).read_text().strip() == STOP_REQUESTED
    except OSError:  # none (a run started by an older version), or a passing NFS error: the next step reads again
        return False
# Per-stage defaults from the paper / official code (DESIGN.md, "Recipe").
DEFAULT_LR = {"pretrain": 1e-3, "finetune": 2e-4, "temporal": 1e-4}  # temporal: the official TM command
# Per worker: samples, or clips for the temporal stage (2: the official TM command; 8 clips of 16
# frames is 128 frames, a 138 GiB plan per GPU at full size in fp32).
DEFAULT_BATCH = {"pretrain": 8, "finetune": 8, "temporal": 2}


@dataclass
class TrainConfig:
    stage: str = "finetune"
    data: list[str] = field(default_factory=list)
    output: str = ""
    # The base: a local sd-image-variations folder, or a named random-weight architecture.
    pretrained: str | None = None
    model: str | None = None
    # Seed of the random base weights when `model` is set (frozen VAE and CLIP come from it, so a
    # run directory can rebuild them); inherited from --init-from.
    model_seed: int | None = None
    init_from: str | None = None
    # What identifies the --pretrained folder's weights (model/checkpoint.py base_weights_digest),
    # recorded when the run starts: a resume, generate, evaluate or a run initialised from this one
    # refuses a folder whose weights are others.
    pretrained_digest: str | None = None
    # Temporal stage (model/temporal.py): frames per training clip (consecutive frames of one
    # clip); a micro-batch is batch_size clips of clip_frames frames. 16: the official TM length.
    clip_frames: int = 16
    ref_mode: str = "first"
    # The pose picture fine-tuning trains on: its style (openpose | disco) and whether hands are
    # drawn. None: what the --data folders' manifest.json recorded; fixed when the run starts,
    # and what generate / evaluate draw for this run (train/data/pose.py).
    pose_style: str | None = None
    hands: bool | None = None
    # The pose ControlNet's residual scale (DisCoModel's pose_scale); None: the model's 1.0. 0 cuts
    # the pose branch (an ablation: its residuals, and so its gradients, are zero).
    pose_scale: float | None = None
    split: str = "train"
    resolution: int = 256
    augment: bool = True
    max_steps: int = 1000
    batch_size: int | None = None  # None: DEFAULT_BATCH of the stage (set by validate_model)
    grad_accum: int = 1
    # The samples per optimizer step over all workers; when set, ``grad_accum`` is derived from it
    # (global_batch / (batch_size x num_workers)). The presets set it; --grad-accum clears it.
    global_batch: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None  # default: 10% of schedule_steps (fixed when the run starts)
    # Length of the learning-rate schedule (warm-up, then linear decay to 0 at this step). Fixed
    # when the run starts (default: max_steps), so raising --max-steps on --resume never makes
    # the rate jump; a new value on --resume stretches the decay from the current rate.
    schedule_steps: int | None = None
    # Set by a --resume that changed schedule_steps: [step, factor] -- from that step the rate
    # decays linearly from factor x lr to 0 at schedule_steps.
    decay_from: list[float] | None = None
    weight_decay: float = 1e-3
    # The background condition's person hole: 0 (mid grey, the official value). A run directory
    # whose config.yaml does not say (written before) was trained with -1 and keeps it.
    background_hole: float = 0.0
    # The temporal stage's windows start at an offset drawn per clip and epoch; a run directory
    # whose config.yaml does not say (written before) cut them from each clip's first frame, and
    # a resume of it keeps doing so (its windows stay the ones it was reading).
    window_offsets: bool = True
    # Windows are cut from runs of consecutive frames: where preprocessing dropped frames of a clip
    # (frame_index jumps), no window spans the gap. A run directory whose config.yaml does not say
    # (written before) cut them across gaps, and a resume of it keeps doing so.
    split_at_gaps: bool = True
    # The order reads a few groups of windows at a time; a group is at most this many frames of
    # one run (a Parquet row group's worth), so a read task holds a few hundred frames whatever
    # the videos' length. A run directory whose config.yaml does not say (written before) has a
    # group per run, and a resume of it keeps it (its order stays the one it was reading).
    window_group_frames: int | None = 64
    # AdamW's weight decay skips biases and norm weights, as the official parameter groups do.
    official_weight_decay: bool = False
    # The paper recipe the run started from (train/presets.py); recorded, the values are the fields.
    preset: str | None = None
    adam_betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float | None = None
    ema_decay: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep: int = 3
    sample_every: int = 500
    # Condition gaps (train/condition_gaps.py): every eval_every steps and at the last step, the
    # loss on eval_rows fixed rows of eval_split (the training split's when the data has none)
    # with all conditions and with each removed in turn. None or 0: off.
    eval_every: int | None = None
    eval_rows: int = 16
    eval_split: str = "test"
    sample_count: int = 4
    sample_steps: int = 50
    guidance_scale: float = 1.5
    log_every: int = 10
    num_workers: int = 1
    use_gpu: bool = False
    # GPU share of each Ray Train worker: 1, or below 1 to put several workers on one GPU (over
    # gloo: NCCL refuses two ranks on one device). A way to run DDP on CUDA with one GPU.
    gpus_per_worker: float = 1.0
    ray_address: str | None = None
    # Restarts from the last checkpoint after a lost worker or node (Ray Train); None: 3 when
    # training runs on Ray Train workers.
    max_failures: int | None = None
    # CPUs Ray accounts per training worker and per data task; None sizes them from the cluster.
    cpus_per_worker: float | None = None
    data_cpus: float | None = None
    # Virtual shards of the training data stream (train/data/): each worker reads only its own
    # shards, so this must be a multiple of num_workers (and batch_size of data_shards /
    # num_workers). None: num_workers. It decides the data order, so a resume keeps it.
    data_shards: int | None = None
    prefetch_batches: int = 4
    resume: bool = False

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return cls().updated(read_options_yaml(path), origin=str(path))

    def updated(self, values: dict, origin: str = "options") -> "TrainConfig":
        """A copy with ``values`` applied (keys may use dashes, as on the command line)."""
        known = {f.name for f in dataclasses.fields(self)}
        clean = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown option {key!r} in {origin}")
            clean[name] = value
        if isinstance(clean.get("data"), str):
            clean["data"] = [clean["data"]]
        hints = _field_types()
        clean = {name: _typed(name, value, hints[name], origin) for name, value in clean.items()}
        if clean.get("max_grad_norm") is not None and clean["max_grad_norm"] <= 0:
            # The official flag's "no clipping" (--max_grad_norm -1, its default), as None: a
            # negative norm given to clip_grad_norm_ turned every gradient around (gradient
            # ascent), and the same command given again with --resume must match the saved run.
            clean["max_grad_norm"] = None
        return dataclasses.replace(self, **clean)

    # -- derived values -------------------------------------------------------------------------

    @property
    def _from_preset(self) -> str:
        return f" (of --preset {self.preset})" if self.preset else ""

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps if self.schedule_steps is not None else self.max_steps

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(0, self.schedule_length // 10)

    def validate_model(self) -> "TrainConfig":
        """The checks on what the model and a batch are (also all a memory plan needs)."""
        if self.stage not in STAGES:
            raise ConfigError(f"unknown stage {self.stage!r}; choose pretrain, finetune or temporal")
        if self.clip_frames < 1:
            raise ConfigError("--clip-frames must be at least 1")
        if self.window_group_frames is not None and self.window_group_frames < 1:
            raise ConfigError(f"window_group_frames must be at least 1 (or null: a group per run of frames), "
                              f"not {self.window_group_frames}")
        if (self.pretrained is None) == (self.model is None):
            raise ConfigError("give exactly one of --pretrained DIR (sd-image-variations weights) or --model tiny")
        if self.model is not None and self.model not in CONFIGS:
            raise ConfigError(f"unknown --model {self.model!r}; choose one of {', '.join(CONFIGS)}")
        if self.pretrained is not None and not Path(self.pretrained).is_dir():
            raise ConfigError(f"--pretrained {self.pretrained} is not a folder")
        if self.pretrained is not None:
            check_prediction_type(Path(self.pretrained) / "scheduler" / "scheduler_config.json")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"unknown --mixed-precision {self.mixed_precision!r}; choose no, fp16 or bf16")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError("--resolution must be a positive multiple of 8 (the VAE downsamples by 8)")
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH[self.stage]
        for name in ("batch_size", "grad_accum", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.global_batch is not None:
            per_step = self.batch_size * self.num_workers
            if self.global_batch < per_step or self.global_batch % per_step:
                raise ConfigError(f"the global batch {self.global_batch}{self._from_preset} is not a multiple of "
                                  f"--batch-size {self.batch_size} x --num-workers {self.num_workers}; change one "
                                  "of them, or give --grad-accum")
            self.grad_accum = self.global_batch // per_step
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:  # (see ``updated``)
            self.max_grad_norm = None
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError("--ema-decay must be between 0 and 1")
        return self

    def validate(self) -> "TrainConfig":
        self.validate_model()
        if not self.output:
            raise ConfigError("--output is required")
        from disco.pipeline.cluster import check_ray_address

        check_ray_address(self.ray_address)
        if not self.data and not self.resume:
            raise ConfigError("give at least one --data folder (a `disco-cli preprocess` output)")
        twice = next((f for k, f in enumerate(self.data) if Path(f).resolve() in
                      {Path(g).resolve() for g in self.data[:k]}), None)
        if twice is not None:
            raise ConfigError(f"--data {twice} is given twice (its rows would count double)")
        for folder in self.data:
            if not (Path(folder) / "triplets").is_dir():
                raise ConfigError(f"--data {folder} holds no triplets/ folder; is it a `disco-cli preprocess` output?")
        if self.stage == "temporal" and self.init_from is None:
            raise ConfigError("--stage temporal trains temporal layers on a fine-tuned model: give --init-from FINETUNE_RUN")
        if self.stage == "temporal" and self.ref_mode != "first":
            raise ConfigError("--stage temporal takes each clip's first frame as its reference (--ref-mode first)")
        if self.init_from is not None:
            if self.stage == "pretrain":
                raise ConfigError("--init-from loads a pre-training (HAP) run into fine-tuning (--stage finetune) or "
                                  "a fine-tuning run into the temporal stage (--stage temporal)")
            # A resumed run may not need it any more: train/launch.py checks.
            if not self.resume and init_run(self.init_from) is None:
                raise ConfigError(f"--init-from {self.init_from} is not a training run (no {RUN_CONFIG_FILE})")
        if self.ref_mode not in REF_MODES:
            raise ConfigError(f"unknown --ref-mode {self.ref_mode!r}; choose first or random")
        if self.pose_style not in (None, "openpose", "disco"):
            raise ConfigError(f"unknown --pose-style {self.pose_style!r}; choose openpose or disco")
        for name in ("max_steps", "checkpoint_every", "keep", "sample_every", "log_every", "sample_steps",
                     "schedule_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_length', '_steps').replace('_', '-')} must be at least 1")
        if self.data_shards is not None:
            if self.data_shards < 1 or self.data_shards % self.num_workers:
                raise ConfigError(f"data_shards ({self.data_shards}) must be a multiple of --num-workers ({self.num_workers})")
            per_worker = self.data_shards // self.num_workers
            if self.batch_size % per_worker:
                raise ConfigError(f"--batch-size ({self.batch_size}) must be a multiple of the data shards per worker "
                                  f"({per_worker} = data_shards {self.data_shards} / --num-workers {self.num_workers})")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("--warmup-steps must be 0 or more")
        if not self.resume:  # (a resume's schedule is checked against the run's, train/launch.py)
            if self.max_steps > self.schedule_length:
                raise ConfigError(f"--max-steps {self.max_steps} goes past --schedule-steps {self.schedule_length}: "
                                  f"the learning rate would be 0 from step {self.schedule_length} on; give "
                                  f"--schedule-steps {self.max_steps} (or leave it out: the schedule is --max-steps)")
            if self.warmup >= self.schedule_length:
                raise ConfigError(f"--warmup-steps {self.warmup} leaves nothing of the {self.schedule_length}-step "
                                  "schedule after the warm-up; give fewer")
        if self.eval_every is not None and self.eval_every < 0:
            raise ConfigError("--eval-every must be 0 (off) or more")
        if self.eval_every and self.stage == "temporal":
            raise ConfigError("--eval-every measures the image model's condition gaps (pretrain, finetune); "
                              "the temporal stage has none")
        if self.eval_rows < 1:
            raise ConfigError("--eval-rows must be at least 1")
        if self.eval_split not in ("train", "test"):
            raise ConfigError(f"unknown --eval-split {self.eval_split!r}; choose test or train")
        if self.pose_scale is not None and not 0 <= self.pose_scale:
            raise ConfigError(f"--pose-scale must be 0 (the pose branch cut) or more, not {self.pose_scale:g}")
        if self.pose_scale is not None and self.stage == "pretrain":
            raise ConfigError("--pose-scale applies to fine-tuning (pre-training has no pose branch)")
        # A run that gave one before this check resumes (the image model's scale was used all along).
        if self.pose_scale is not None and self.stage == "temporal" and not self.resume:
            raise ConfigError("--pose-scale applies to fine-tuning; the temporal stage keeps its --init-from run's")
        if self.max_failures is not None and self.max_failures < 0:
            raise ConfigError("--max-failures must be 0 or more")
        if self.data_cpus is not None and self.data_cpus < 0:
            raise ConfigError("data_cpus must be 0 or more (0: Ray accounts no CPU for a decode task)")
        # A Ray Train worker's bundle must ask for something: 0 CPUs only beside a GPU.
        if self.cpus_per_worker is not None and (self.cpus_per_worker < 0 or (self.cpus_per_worker == 0 and not self.use_gpu)):
            raise ConfigError("cpus_per_worker must be above 0 (0 only with --use-gpu: the worker then asks for its GPU alone)")
        if self.learning_rate <= 0:
            raise ConfigError("--lr must be positive")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ConfigError(f"--mixed-precision fp16{self._from_preset} needs --use-gpu (on CPU give "
                              "--mixed-precision bf16)")
        if not 0 < self.gpus_per_worker <= 1:
            raise ConfigError("--gpus-per-worker must be above 0 and at most 1 (a worker uses one GPU)")
        if self.gpus_per_worker < 1 and not self.use_gpu:
            raise ConfigError("--gpus-per-worker below 1 shares GPUs between workers: it needs --use-gpu")
        if self.use_gpu:
            import torch

            if not torch.cuda.is_available() and not self.ray_address:
                raise ConfigError("--use-gpu asked for, but CUDA is not available on this machine")
        return self

    # -- saving ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RUN_CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path


@functools.cache
def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


def _number(value, kind: type):
    """``value`` as an int or float, or None where it is not one. PyYAML (YAML 1.1) reads ``1e-4``
    (no dot) as a string, the usual way to write a learning rate: numbers written so are taken."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            return None
    if isinstance(value, (int, float)):
        if kind is float:
            return float(value)
        if isinstance(value, int):
            return value
        return int(value) if math.isfinite(value) and value == int(value) else None
    return None


def _typed(name: str, value, hint, origin: str):
    """``value`` of option ``name`` as its field's type, or a one-line ``ConfigError``: a YAML of
    ``resolution: "256"`` or ``augment: "off"`` (a string, true) was taken as it was, and failed
    deep in the run with a traceback or silently did the opposite."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} in {origin} is empty (null); give a value or leave the key out")
    kind = args[0] if optional and len(args) == 1 else hint
    origin_type = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} in {origin} must be true or false (unquoted), not {value!r}")
    if kind in (int, float):
        number = _number(value, kind)
        if number is None or (kind is float and not math.isfinite(number)):
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{name} in {origin} must be {what}, not {value!r}")
        return number
    if kind is str:
        if name == "mixed_precision" and value is False:
            return "no"  # YAML 1.1 reads an unquoted `no` as false: the documented value meant
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} in {origin} must be a string, not {value!r}")
    if origin_type in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} in {origin} must be a list, not {value!r}")
        item_types = typing.get_args(kind)
        if origin_type is tuple and len(value) != len(item_types):
            raise ConfigError(f"{name} in {origin} must be a list of {len(item_types)}, not {value!r}")
        items = [_typed(name, item, item_types[k if origin_type is tuple else 0], origin)
                 for k, item in enumerate(value)]
        return tuple(items) if origin_type is tuple else items
    return value


def check_prediction_type(scheduler_file: Path) -> None:
    """The objective trains the noise (epsilon), as sd-image-variations and DisCo do: a base whose
    scheduler predicts something else (v-prediction) would be trained against the wrong target
    and sampled with the wrong one, with no error anywhere."""
    import json

    if not scheduler_file.is_file():
        return  # the model's scheduler defaults (epsilon)
    try:
        predicts = json.loads(scheduler_file.read_text()).get("prediction_type", "epsilon")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{scheduler_file} cannot be read: {exc}") from None
    if predicts != "epsilon":
        raise ConfigError(f"{scheduler_file} predicts {predicts!r}: training here predicts the noise (epsilon), "
                          "as sd-image-variations and DisCo do; use an epsilon-prediction base")


def schedule_note(cfg: TrainConfig) -> str | None:
    """Where the run stops before its learning-rate schedule ends (a lower --max-steps on a
    resume, or a --schedule-steps beyond it): what rate it ends at, said as raising --max-steps
    past the schedule is refused."""
    if cfg.max_steps >= cfg.schedule_length:
        return None
    left = lr_factor(cfg.max_steps, cfg.warmup, cfg.schedule_length, cfg.decay_from)
    return (f"note: the learning-rate schedule runs to step {cfg.schedule_length}: stopping at --max-steps "
            f"{cfg.max_steps} leaves the rate at {left:.0%} of its peak (--schedule-steps {cfg.max_steps} decays it "
            "to 0 by then)")


def lr_factor(step: int, warmup: int, total: int, decay_from: list[float] | None = None) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up over ``warmup``
    steps, then linear decay to 0 at ``total`` (from ``decay_from = [step, factor]`` on, when a
    resume stretched the schedule: linear from that factor to 0)."""
    if decay_from is not None and step >= decay_from[0]:
        start, factor = int(decay_from[0]), float(decay_from[1])
        return factor * max(0.0, float(total - step)) / float(max(1, total - start))
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def lr_schedule(cfg: TrainConfig):
    """The run's schedule as a ``LambdaLR`` function (a picklable partial)."""
    import functools

    return functools.partial(lr_factor, warmup=cfg.warmup, total=cfg.schedule_length, decay_from=cfg.decay_from)


def init_run(path: str | Path) -> Path | None:
    """The training run an ``--init-from`` names: the run itself, or the run of one of its
    checkpoint folders (a run pins its init run's checkpoint when it starts: train/launch.py);
    None where neither holds a config.yaml."""
    path = Path(path)
    return next((folder for folder in (path, path.parent) if (folder / RUN_CONFIG_FILE).exists()), None)


def load_run_config(run: str | Path) -> TrainConfig:
    """The resolved configuration saved in a run directory."""
    path = Path(run) / RUN_CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{run} is not a training run: {RUN_CONFIG_FILE} is missing")
    # Fields added after runs were written: such a run goes on as it was trained (windows from
    # each clip's first frame, windows across gaps, the hole value).
    saved = read_options_yaml(path)
    legacy = {"window_offsets": False, "split_at_gaps": False, "window_group_frames": None}
    if "background_hole" not in saved:
        from disco.model.conditioning import LEGACY_HOLE  # (torch: imported for such old runs only)

        legacy["background_hole"] = LEGACY_HOLE
    return TrainConfig().updated(saved, origin=str(path)).updated(
        {k: v for k, v in legacy.items() if k not in saved})
