"""Condition gaps: does the model use each of its controls? (``--eval-every``)

Every ``eval_every`` steps (and at the last step) rank 0 computes the denoising loss on a fixed
held-out batch (a) with all conditions and (b) with each condition removed in turn:

- pose: each row gets the pose picture of another row of the batch: the next row (in batch
  order, cyclically) from another clip; when every row comes from one clip, the row of that clip
  whose frame index is farthest from its own (a row with no other frame keeps its own pose);
- background: the background latent zeroed, as ``DisCoModel.drop_conditions`` drops it;
- reference: the zero-image CLIP encoding (``DisCoModel.unconditional_reference``), as classifier-
  free guidance drops it.

The gap of a condition is (loss without it) - (loss with all): about 0 while the model ignores
the condition, growing as it learns to use it. Pre-training (HAP) has no pose branch: no pose gap.

The batch is built once, through the training data path (``SampleStream`` over the held-out split,
no augmentation: centre crops), and every evaluation uses the same rows, noise and timesteps
(evenly spread over the schedule, one per row; noise from a fixed seed), without gradient and in
eval mode, for every variant: so gaps are comparable along the run. The held-out rows are the first
``eval_rows`` samples of the ``eval_split`` rows in the stream order of the run's seed; when the
data has no rows of that split, the same slice of the training split (then not held out: the model
also trains on those rows; the summary says ``held_out: false``).

Data-parallel runs evaluate on rank 0 only, on the bare model (not the DDP wrapper): no collective
is involved, the other workers simply wait for rank 0 at their next gradient all-reduce.

Nothing here touches the global random generators (the run's determinism and bit-exact resume).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from disco.model.conditioning import fit_pose, vae_factor
from disco.model.disco import VAE_SCALING
from disco.train.inputs import model_inputs
from disco.train.objective import sample_draws

EVAL_SALT = 0x5EEDE7A1  # the evaluation's noise seed: the run seed XOR this
STAGES = ("pretrain", "finetune")  # the stages whose batches this module knows
CONDITIONS = ("pose", "background", "reference")
LOSS_KEY = "eval/loss"


def gap_key(condition: str) -> str:
    return f"eval/gap_{condition}"


def pose_partners(clips: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """For each row, the row whose pose replaces its own: the next row (cyclically) of another
    clip; with none, the farthest frame of its own clip (the first of equally far ones)."""
    n = len(clips)
    partners = np.arange(n)
    for i in range(n):
        others = [j % n for j in range(i + 1, i + n) if clips[j % n] != clips[i]]
        if others:
            partners[i] = others[0]
            continue
        distance = np.where(clips == clips[i], np.abs(frames.astype(np.int64) - int(frames[i])), -1)
        if distance.max() > 0:
            partners[i] = int(np.argmax(distance))
    return partners


def held_out_rows(cfg, train_index=None) -> tuple:
    """The rows the gaps are measured on, as ``(index, split, held_out)``: ``cfg.eval_split``'s,
    or the training split's where the data has none (``train_index``, where given, for those).
    The driver calls it (``launch``) and ships the index with the training one: built on rank 0
    alone (every shard's footer read, twice where the split is missing: 30K shards on NFS) while
    the other ranks waited in their first collective, it could outlast NCCL's timeout."""
    from disco.train.data import DataError, build_index

    if cfg.eval_split == cfg.split and train_index is not None:
        return train_index, cfg.split, False
    try:
        return build_index(cfg.data, cfg.eval_split), cfg.eval_split, cfg.eval_split != cfg.split
    except DataError:
        return (train_index if train_index is not None else build_index(cfg.data, cfg.split)), cfg.split, False


def evaluates(cfg) -> bool:
    """Whether the run measures condition gaps (``--eval-every``, a stage this module knows)."""
    return bool(cfg.eval_every) and cfg.stage in STAGES


class ConditionGaps:
    """The held-out batch of a run and the loss variants on it (rank 0 of a run with ``eval_every``)."""

    def __init__(self, cfg, model, device, precision=None, data_cpus: float = 0.25, rows: tuple | None = None):
        self.cfg, self.model, self.device, self.precision = cfg, model, torch.device(device), precision
        self.data_cpus = data_cpus
        self.rows = rows  # held_out_rows(cfg), where the driver built it
        self.batch: dict | None = None
        self.source: dict | None = None

    @classmethod
    def for_run(cls, cfg, rank: int, model, device, precision=None, data_cpus: float = 0.25,
                rows: tuple | None = None) -> "ConditionGaps | None":
        """The evaluator of a run, or None: evaluation off, not rank 0, or a stage it does not know."""
        if not evaluates(cfg) or rank != 0:
            return None
        return cls(cfg, model, device, precision, data_cpus, rows)

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.max_steps

    # -- the held-out batch ---------------------------------------------------------------------------

    def held_out(self) -> dict:
        """The evaluation batch (uint8 pictures, as the stream gives them) and its fixed draws; built
        on the first call."""
        if self.batch is None:
            self.batch = self._build()
        return self.batch

    def _build(self) -> dict:
        from disco.train.data import SampleStream, StreamPlan

        cfg = self.cfg
        index, split, held_out = self.rows if self.rows is not None else held_out_rows(cfg)
        rows = max(1, min(cfg.eval_rows, len(index)))
        pose_render = None
        if cfg.stage == "finetune":
            from disco.train.data.pose import render_plan

            pose_render = render_plan(cfg.data, index.files, cfg.pose_style or "openpose",
                                      True if cfg.hands is None else cfg.hands)
        stream = SampleStream(index, stage=cfg.stage, ref_mode=cfg.ref_mode, resolution=cfg.resolution,
                              pose_render=pose_render, augment=False, seed=cfg.seed, batch=rows,
                              data_cpus=self.data_cpus, prefetch_batches=1)
        try:
            batch = stream.next_batch()
        finally:
            stream.close()
        ids = StreamPlan(index, cfg.seed, 1, rows).rows(batch["position"].numpy())
        partners = pose_partners(index.clip[ids], index.frame[ids])
        model = self.model
        side = cfg.resolution // vae_factor(model)
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(model.config.scheduler_config)
        timesteps = self.scheduler.config.num_train_timesteps
        draws = sample_draws(torch.arange(rows), cfg.seed ^ EVAL_SALT, (model.unet.config.in_channels, side, side),
                             timesteps, "cpu")
        # One timestep per row, evenly spread over the schedule: low variance, every noise level.
        draws["timesteps"] = ((torch.arange(rows) + 0.5) * timesteps / rows).long()
        self.source = {"split": split, "held_out": held_out, "rows": rows,
                       "pose_swap": "another clip" if (index.clip[ids] != index.clip[ids][0]).any() else "far frame"}
        pictures = {k: v for k, v in batch.items() if k not in ("position", "ok")}
        return {"pictures": pictures, "partners": torch.from_numpy(partners), "draws": draws}

    # -- the losses -----------------------------------------------------------------------------------

    def measure(self) -> dict[str, float]:
        """``eval/loss`` (all conditions) and ``eval/gap_<condition>`` for each condition the model has."""
        held = self.held_out()
        model, device = self.model, self.device
        scheduler = self.scheduler
        pictures, partners, draws = held["pictures"], held["partners"], held["draws"]
        total = len(partners)
        sums = {name: 0.0 for name in ("all", *CONDITIONS)}
        chunk = max(1, self.cfg.batch_size)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                    torch.autocast(device.type, dtype=self.precision, enabled=self.precision is not None,
                                   cache_enabled=False):  # (no cast copy of every weight kept meanwhile)
                for start in range(0, total, chunk):
                    part = slice(start, min(total, start + chunk))
                    losses = self._chunk({k: v[part] for k, v in pictures.items()},
                                         pictures["pose"][partners[part]], {k: v[part] for k, v in draws.items()},
                                         scheduler)
                    for name, value in losses.items():
                        sums[name] += value
        finally:
            model.train(was_training)
        means = {name: value / total for name, value in sums.items()}
        out = {LOSS_KEY: means["all"]}
        for condition in CONDITIONS:
            if condition == "pose" and model.pose_controlnet is None:
                continue
            out[gap_key(condition)] = means[condition] - means["all"]
        return out

    def _chunk(self, pictures: dict, other_pose: torch.Tensor, draws: dict, scheduler) -> dict[str, float]:
        """Summed per-row losses of one chunk for every variant (the objective's computation,
        ``DiffusionObjective``, with the conditions encoded once)."""
        model, device = self.model, self.device
        inputs = model_inputs(pictures, device, self.cfg.background_hole)
        noise = draws["noise"].to(device)
        timesteps = draws["timesteps"].to(device)
        posterior = model.vae.encode(inputs["target"]).latent_dist
        latents = (posterior.mean + posterior.std * draws["latent_noise"].to(device)) * VAE_SCALING
        background = model.encode_background(inputs["background"])
        tokens = model.encode_reference(inputs["reference"])
        side = latents.shape[-1]
        pose = fit_pose(model, inputs["pose"], side)
        noisy = scheduler.add_noise(latents, noise, timesteps)

        def loss(tokens, background, pose) -> float:
            predicted = model(noisy, timesteps, tokens, background, pose)
            return float(F.mse_loss(predicted.float(), noise.float(), reduction="none").mean((1, 2, 3)).sum())

        out = {"all": loss(tokens, background, pose),
               "background": loss(tokens, torch.zeros_like(background), pose),
               "reference": loss(model.unconditional_reference(len(tokens)).to(tokens.dtype), background, pose)}
        if pose is not None:
            swapped = fit_pose(model, other_pose.to(device).float() / 255.0, side)
            out["pose"] = loss(tokens, background, swapped)
        return out

    # -- the run's summary ------------------------------------------------------------------------------

    def summary(self, run) -> dict | None:
        """The first and the last evaluation of the run (from its ``metrics.jsonl``, so a resumed
        run reports its first evaluation too) and what was evaluated."""
        out = gap_summary(run)
        if out is not None and self.source is not None:
            out.update(self.source)
        return out


def gap_summary(run) -> dict | None:
    """``{"first": {...}, "last": {...}}`` of the evaluations in a run's ``metrics.jsonl`` (each
    ``step``, ``loss`` and ``gap_<condition>``), or None when it holds none."""
    from disco.train.monitor import read_metrics

    evaluations = [m for m in read_metrics(run)[0] if LOSS_KEY in m]
    if not evaluations:
        return None

    def plain(m: dict) -> dict:
        return {"step": m["step"], **{k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("eval/")}}

    return {"first": plain(evaluations[0]), "last": plain(evaluations[-1])}


def describe(gaps: dict) -> list[str]:
    """Console lines for a run summary's ``eval`` entry."""
    first, last = gaps["first"], gaps["last"]
    where = ""
    if "split" in gaps:
        where = f" on {gaps['rows']} {gaps['split']} rows" + ("" if gaps.get("held_out", True) else " (not held out)")
    lines = [f"condition gaps (eval loss without it - with all){where}, step {first['step']} -> {last['step']}:"]
    parts = [f"loss {first['loss']:.4f} -> {last['loss']:.4f}"]
    for condition in CONDITIONS:
        key = f"gap_{condition}"
        if key in last:
            parts.append(f"{condition} {first.get(key, float('nan')):+.4f} -> {last[key]:+.4f}")
    lines.append("  " + ", ".join(parts))
    return lines
