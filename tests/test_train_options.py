"""A user's training options as they write them: YAML values of the wrong type, the official
``--max_grad_norm -1``, a schedule shorter than the run, a resume given a YAML, outputs that
cannot be folders. Each is one line and exit 2, or taken as meant; none reaches a traceback."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from disco.cli import app
from disco.commands.train import configured
from disco.pipeline.errors import ConfigError
from disco.train.config import TrainConfig
from disco.train.objective import apply_update


def _train(*args):
    return CliRunner().invoke(app, ["train", *[str(a) for a in args]])


def _one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("text, message", [
    ("resolution: abc\n", "resolution in {yaml} must be an integer, not 'abc'"),
    ("resolution: null\n", "resolution in {yaml} is empty (null)"),
    ("batch_size: 2.5\n", "batch_size in {yaml} must be an integer, not 2.5"),
    ('augment: "off"\n', "augment in {yaml} must be true or false (unquoted), not 'off'"),
    ("adam_betas: 0.9\n", "adam_betas in {yaml} must be a list, not 0.9"),
    ("adam_betas: [0.9]\n", "adam_betas in {yaml} must be a list of 2"),
    ("data: 5\n", "data in {yaml} must be a list, not 5"),
    ("ema_decay: fast\n", "ema_decay in {yaml} must be a number, not 'fast'"),
])
def test_a_yaml_value_of_the_wrong_type_is_one_line(tmp_path, text, message):
    """Such values were taken as they were: a traceback deep in the plan or the run (a string
    resolution, a null worker count), or the opposite of what was meant (``augment: "off"`` is a
    non-empty string: augmentation on)."""
    yaml = tmp_path / "run.yaml"
    yaml.write_text(text)
    _one_line(_train("--model", "tiny", "--dry-run", "--gpu-memory", "10", "--config", yaml), message.format(yaml=yaml))


def test_yaml_numbers_and_words_are_taken_as_meant(tmp_path):
    """PyYAML reads ``1e-4`` (no dot) as a string and an unquoted ``no`` as false: the usual way
    to write a learning rate, and the documented precision value."""
    yaml = tmp_path / "run.yaml"
    yaml.write_text("lr: 1e-4\nmixed_precision: no\nmax_steps: 2.0e+3\nweight_decay: 0\nadam_betas: [0.9, 0.99]\n")
    cfg = configured(None, yaml, {"model": "tiny"}, resume=False).validate_model()
    assert (cfg.lr, cfg.mixed_precision, cfg.max_steps, cfg.weight_decay, cfg.adam_betas) == (
        1e-4, "no", 2000, 0.0, (0.9, 0.99))
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.weight_decay, float)


def test_max_grad_norm_at_or_below_zero_is_no_clipping_as_the_official_flag():
    """The official ``--max_grad_norm -1`` (its default, quoted by the presets' table) means no
    clipping; given to ``clip_grad_norm_`` a negative norm turned every gradient around, and the
    run climbed its loss."""
    assert TrainConfig(model="tiny", max_grad_norm=-1.0).validate_model().max_grad_norm is None
    # The same command again with --resume matches the saved run (None), as it did when -1 was kept.
    from disco.train.launch import resume_changes

    saved = TrainConfig(model="tiny").updated({"max_grad_norm": -1})
    assert saved.max_grad_norm is None
    assert resume_changes(TrainConfig(model="tiny").updated({"max_grad_norm": -1.0}), saved, {"max_grad_norm"}) == {}
    assert TrainConfig(model="tiny", max_grad_norm=0.0).validate_model().max_grad_norm is None
    assert TrainConfig(model="tiny", max_grad_norm=1.0).validate_model().max_grad_norm == 1.0
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    weight.grad = torch.tensor([1.0, 2.0, -2.0])
    assert apply_update([weight], optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), None, -1.0)
    assert weight.detach().tolist() == [-0.5, -1.0, 1.0]  # a descent step, unclipped


def test_a_new_runs_schedule_must_reach_its_last_step(tmp_path):
    """``--schedule-steps 10 --max-steps 100`` trained 90 steps at a learning rate of 0 (a resume
    refused the same); a warm-up as long as the schedule left no decay."""
    data = tmp_path / "data"
    (data / "triplets").mkdir(parents=True)

    def check(**options):
        TrainConfig(model="tiny", output=str(tmp_path / "run"), data=[str(data)], **options).validate()

    with pytest.raises(ConfigError, match="--max-steps 100 goes past --schedule-steps 10: the learning rate would be 0"):
        check(max_steps=100, schedule_steps=10)
    with pytest.raises(ConfigError, match="--warmup-steps must be 0 or more"):
        check(warmup_steps=-5)
    with pytest.raises(ConfigError, match="--warmup-steps 1000 leaves nothing"):
        check(max_steps=1000, warmup_steps=1000)
    check(max_steps=100, schedule_steps=400, warmup_steps=10)


def _saved_run(tmp_path):
    data = tmp_path / "data"
    (data / "triplets").mkdir(parents=True)
    run = tmp_path / "run"
    TrainConfig(model="tiny", output=str(run), data=[str(data)], batch_size=2, max_steps=100).validate_model().save(run)
    return run


def test_a_resume_says_which_yaml_values_it_does_not_take(tmp_path):
    """A resume keeps the run's saved options (but the few only a YAML sets): a YAML of another
    batch size or step count was dropped without a word."""
    run = _saved_run(tmp_path)
    # A path longer than a line: rich wrapped the note at 80 columns where no terminal is (a job's
    # log, this runner), the path cut in two.
    yaml = tmp_path / ("options-of-the-longer-fine-tuning-schedule-" * 2) / "more.yaml"
    yaml.parent.mkdir()
    yaml.write_text("max_steps: 5000\nbatch_size: 64\nprefetch_batches: 2\nkeep: 3\n")  # keep: the saved value
    result = _train("-o", run, "--resume", "--config", yaml, "--dry-run", "--gpu-memory", "10")
    assert result.exit_code == 0, result.output
    note = next(line for line in result.output.splitlines() if line.startswith("note: --resume"))
    # not keep (the same as saved), not prefetch_batches (applied)
    assert note.startswith(f"note: --resume keeps the run's saved batch_size, max_steps; {yaml}'s values of them are "
                           "not applied"), result.output


def test_a_resume_dry_run_refuses_what_the_resume_refuses(tmp_path):
    """``--resume --dry-run --batch-size 64`` planned the saved batch and said nothing; the resume
    itself refuses the change."""
    run = _saved_run(tmp_path)
    _one_line(_train("-o", run, "--resume", "--dry-run", "--gpu-memory", "10", "--batch-size", "64"),
              "--resume keeps the run's batch-size (2); it cannot become 64")
    planned = _train("-o", run, "--resume", "--dry-run", "--gpu-memory", "10", "--max-steps", "500")
    assert planned.exit_code == 0 and "batch 2" in " ".join(planned.output.split()), planned.output


@pytest.mark.parametrize("value", ["nan", "1e9", "0"])
def test_a_gpu_memory_out_of_range_is_one_line(value):
    """NaN passed the check (a traceback); 1e9 GiB made the largest-batch search allocate tens of
    GB of host memory for a plan that says it allocates nothing."""
    _one_line(_train("--model", "tiny", "--dry-run", "--gpu-memory", value), "--gpu-memory must be above 0")


def test_outputs_that_cannot_be_folders_are_one_line(tmp_path):
    """``train -o`` / ``demo -o`` naming a file, or a path under one: a FileExistsError or
    NotADirectoryError traceback."""
    data = tmp_path / "data"
    (data / "triplets").mkdir(parents=True)
    plain = tmp_path / "plain"
    plain.write_text("mine")
    _one_line(_train("--model", "tiny", "-d", data, "-o", plain, "--no-progress"),
              f"cannot use {plain} as the output folder: a file, not a folder")
    _one_line(_train("--model", "tiny", "-d", data, "-o", plain / "run", "--no-progress"),
              f"cannot use {plain / 'run'} as the output folder")
    _one_line(CliRunner().invoke(app, ["demo", "-o", str(plain), "--no-progress"]),
              f"--output {plain} is a file, not a folder")
    assert plain.read_text() == "mine"


def test_a_training_grid_samples_a_few_at_a_time_without_autocasts_weight_cache(monkeypatch):
    """The grid's whole 50-step loop ran on every sample at once under autocast, which keeps a cast
    copy of every weight it touches for as long (2.95 GiB beside a fine-tuning run): 16 samples at
    512 px took 13 GiB more than a training step and ran out of memory at the first grid."""
    import disco.train.sampling as sampling

    calls = []

    def sample(model, reference, background, pose, steps, guidance_scale, generator):
        calls.append((len(reference), torch.is_autocast_cache_enabled(), generator))
        return torch.zeros(len(reference), 3, 8, 8)

    n = 10
    inputs = {"reference": torch.zeros(n, 3, 8, 8), "background": torch.zeros(n, 3, 8, 8), "pose": torch.zeros(n, 3, 8, 8),
              "target": torch.zeros(n, 3, 8, 8)}
    monkeypatch.setattr(sampling, "ddim_sample", sample)
    monkeypatch.setattr(sampling, "model_inputs", lambda *a: inputs)
    monkeypatch.setattr(sampling, "reference_picture", lambda reference: reference)

    class Model(torch.nn.Module):
        pose_controlnet = object()

    grids = []

    class Monitor:
        def grid(self, step, columns):
            grids.append(columns)

    cfg = TrainConfig(stage="finetune", model="tiny", sample_count=n, sample_steps=2)
    sampling.write_sample_grid(Model(), {}, cfg, 1, Monitor(), torch.device("cpu"), torch.bfloat16)
    assert [c[0] for c in calls] == [4, 4, 2] and not any(c[1] for c in calls)
    assert len({id(c[2]) for c in calls}) == 1  # one noise stream: 4 samples draw what they drew before
    assert [len(column) for column in grids[0]] == [n] * 4


def test_a_run_that_stops_before_its_schedule_ends_says_at_what_rate():
    """A resume with a lower --max-steps (or a --schedule-steps past it) stopped with the rate far
    from 0 and nothing said; raising --max-steps past the schedule is refused."""
    from disco.train.config import schedule_note

    cfg = TrainConfig(model="tiny", max_steps=80, schedule_steps=200, warmup_steps=20)
    assert schedule_note(cfg) == ("note: the learning-rate schedule runs to step 200: stopping at --max-steps 80 leaves "
                                  "the rate at 67% of its peak (--schedule-steps 80 decays it to 0 by then)")
    assert schedule_note(TrainConfig(model="tiny", max_steps=200, schedule_steps=200)) is None
