"""Condition gaps (``--eval-every``, train/condition_gaps.py): the loss on fixed held-out rows with
all conditions and with each removed in turn, on a tiny model trained on the real triplets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from disco.train.condition_gaps import pose_partners
from disco.train.config import TrainConfig
from disco.train.launch import train

pytestmark = pytest.mark.usefixtures("ray_local")

# The first 150 steps of a 300-step schedule. Measured on the fixture's clip (8 frames, one clip:
# the pose swap takes the farthest frame), evaluating every 50 steps: pose gap 6.5e-5 at step 50
# (a transient), then -7.9e-7, 1.9e-6, 4.9e-6 at steps 100, 150, 200 (3.9e-6, 4.4e-6 at 250,
# 300) on one machine, and -4.9e-6, -1.7e-6 at steps 100, 150 on another (an AMD EPYC: its float
# kernels round otherwise, and the run, deterministic on each, follows another path): small,
# because the tiny random VAE's latents are mostly sampling noise that no condition predicts, and
# the pose enters through two zero-initialised layers. So its sign here says nothing: what the test
# holds is that training moved it off the exact 0 it starts at (the branch's residuals are zero
# before its first update) at both evaluations, and that the run without the pose branch gives
# exactly 0. Any nonzero gap counts: a branch that changes nothing computes the same loss twice,
# bit for bit, and how far off 0 a working one lands depends on the CPU's rounding (the gap crossed
# 0 between evaluations on one machine: a margin could catch another CPU at the crossing).
RUN = dict(stage="finetune", model="tiny", resolution=32, batch_size=4, max_steps=150, schedule_steps=300, lr=5e-3,
           warmup_steps=0, augment=False, eval_every=100, eval_rows=8, log_every=10, checkpoint_every=100000,
           sample_every=100000, sample_steps=2)
GAPS = ("eval/loss", "eval/gap_pose", "eval/gap_background", "eval/gap_reference")


def _evaluations(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval/loss" in m]


def test_pose_partners_prefer_another_clip_then_the_farthest_frame():
    clips, frames = np.array([0, 0, 1, 1]), np.array([0, 5, 2, 9])
    assert pose_partners(clips, frames).tolist() == [2, 2, 0, 0]
    one_clip = pose_partners(np.zeros(5, int), np.array([0, 1, 2, 3, 4]))
    assert one_clip.tolist() == [4, 4, 0, 0, 0]
    assert pose_partners(np.zeros(1, int), np.zeros(1, int)).tolist() == [0]  # nothing to swap with


def test_a_run_overfits_its_rows_its_pose_gap_leaves_zero_and_is_zero_with_the_pose_branch_cut(triplets, tmp_path):
    run = tmp_path / "with-pose"
    summary = train(TrainConfig(**RUN, data=[str(triplets["video"])], output=str(run)))
    # The tiny model learns its 8 rows: the objective on fixed rows and noise, before and after
    # (measured 1.15 -> 0.090), and the logged loss (the first 10 steps' mean 0.81, the last 0.063);
    # the bar, 0.2, is about twice what this run reaches.
    from disco.model.checkpoint import load_model
    from disco.train.config import load_run_config
    from disco.train.initial import initial_model
    from helpers import first_batch, objective_on

    batch = first_batch([str(triplets["video"])], stage="finetune", ref_mode="first", resolution=RUN["resolution"],
                        augment=False, seed=0, batch=8)
    before = objective_on(initial_model(load_run_config(run)), batch)
    after = objective_on(load_model(run), batch)
    assert after <= 0.2 * before, (before, after)
    logged = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(logged) == RUN["max_steps"] // RUN["log_every"] and logged[-1]["loss"] < 0.2 * logged[0]["loss"], logged
    evaluations = _evaluations(run)
    assert [m["step"] for m in evaluations] == [100, 150]
    assert all(set(GAPS) <= set(m) for m in evaluations)
    first, last = summary["eval"]["first"], summary["eval"]["last"]
    assert (first["step"], last["step"]) == (100, 150)
    assert last["gap_pose"] == evaluations[-1]["eval/gap_pose"]
    # The fixture has no test rows: a fixed slice of the training rows, said so.
    assert (summary["eval"]["split"], summary["eval"]["held_out"], summary["eval"]["rows"]) == ("train", False, 8)
    assert all(m["eval/gap_pose"] != 0 for m in evaluations), evaluations
    # TensorBoard: the evaluation's own group.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    assert set(GAPS) <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/gap_pose")] == [100, 150]

    # The same run with the pose branch cut (--pose-scale 0), through the command line (in this
    # process: a subprocess spent most of this part importing torch and diffusers), to an
    # evaluation at step 10 (the gap is exactly 0 at any step: the branch's residuals are): its
    # pose gap is 0, and the console's last lines give the gaps.
    cut = tmp_path / "no-pose"
    options = []
    for key, value in {**RUN, "max_steps": 10, "eval_every": 10}.items():
        if key == "augment":
            options.append("--no-augment")
        else:
            options += [f"--{key.replace('_', '-')}", str(value)]
    from typer.testing import CliRunner

    from disco.cli import app

    result = CliRunner().invoke(app, ["train", *options, "--data", str(triplets["video"]), "--output", str(cut),
                                      "--pose-scale", "0", "--no-progress"])
    assert result.exit_code == 0, result.output[-3000:]
    output = result.output  # the console's lines (rich writes them to stderr), in process
    cut_evaluations = _evaluations(cut)
    assert [m["step"] for m in cut_evaluations] == [10]
    assert all(m["eval/gap_pose"] == 0.0 for m in cut_evaluations), cut_evaluations
    cut_summary = json.loads((cut / "summary.json").read_text())
    assert cut_summary["eval"]["last"]["gap_pose"] == cut_evaluations[-1]["eval/gap_pose"]
    assert "condition gaps" in output and "pose +0.0000 -> +0.0000" in output.replace("-0.0000", "+0.0000")
    # generate / evaluate load the run's model with the pose scale it trained at.
    from disco.model.checkpoint import load_model

    assert load_model(cut).config.pose_scale == 0.0


def test_the_held_out_rows_are_found_by_the_driver_not_by_rank_0_inside_the_loop(triplets, tmp_path, monkeypatch):
    """Rank 0 built the held-out index itself, inside the loop, reading every shard's footer (twice
    where the data has no test rows) while the other ranks waited in their first collective: on
    30K shards over NFS that can outlast NCCL's timeout. The driver finds them now, beside the
    training index, and ships them; nothing inside the loop lists the data."""
    import inspect

    import disco.train.data as data
    import disco.train.launch as launch
    import disco.train.loop as loop

    calls = []
    real = data.build_index

    def counted(paths, split):
        inside = any(frame.function == "_train" and frame.filename == loop.__file__ for frame in inspect.stack())
        calls.append((split, inside))
        return real(paths, split)

    for module in (data, launch, loop):
        monkeypatch.setattr(module, "build_index", counted)
    run = tmp_path / "run"
    summary = train(TrainConfig(**{**RUN, "max_steps": 2, "eval_every": 2}, data=[str(triplets["video"])],
                                output=str(run)))
    assert [m["step"] for m in _evaluations(run)] == [2]
    assert (summary["eval"]["split"], summary["eval"]["held_out"]) == ("train", False)  # the fixture has no test rows
    assert calls and not any(inside for _, inside in calls), calls
    assert calls == [("train", False), ("test", False)]  # the training index serves when there are no test rows
