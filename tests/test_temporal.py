"""The temporal module (TM): zero-initialised temporal layers on a trained image model, trained
alone on clips, and windowed generation (tiny model, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from disco.model.checkpoint import find_checkpoint, list_checkpoints, load_model, read_checkpoint
from disco.model.conditioning import pose_factor
from disco.model.disco import DisCoModel
from disco.model.pipeline import DisCoPipeline
from disco.pipeline.errors import ConfigError
from disco.model.temporal import (add_temporal, clip_frames, temporal_parameter_names, window_starts,
                                  window_weights)
from disco.train.config import TrainConfig
from disco.train.data import build_index
from disco.train.data.clips import ClipStream
from disco.train.data.index import DataError
from disco.train.launch import resolve, train
from disco.train.objective import DiffusionObjective

RES = 32
F = 4  # frames per clip in these tests


def _tiny(seed: int = 0) -> DisCoModel:
    torch.manual_seed(seed)
    return DisCoModel.from_architecture("tiny")


def _inputs(model: DisCoModel, n: int, side: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pose_side = side * pose_factor(model)
    return (torch.randn(n, 4, side, side, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 257, 32, generator=g), torch.randn(n, 4, side, side, generator=g),
            torch.rand(n, 3, pose_side, pose_side, generator=g))


def test_a_tm_model_equals_its_image_model_at_initialisation(tmp_path):
    model = _tiny().eval()
    args = _inputs(model, 2 * F)
    with torch.no_grad():
        image = model(*args)
    add_temporal(model, {"frames": F})
    names = temporal_parameter_names(model)
    # Official layout: a temporal conv per ResNet block and a temporal attention per transformer
    # block, in the UNet and in both ControlNets.
    assert any(n.startswith("temporal.convs.unet-") for n in names)
    assert any(n.startswith("temporal.attentions.pose_controlnet-") for n in names)
    assert any(n.startswith("temporal.convs.background_controlnet-") for n in names)
    assert set(model.trainable_parameters()) == set(names)
    with torch.no_grad(), clip_frames(model, F):
        assert torch.equal(model(*args), image)
    # The layers mix the frames of a clip and only them.
    with torch.no_grad():
        for p in model.temporal.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
    changed = [a.clone() for a in args]
    changed[0][1] += 1.0  # frame 1 of clip 0
    with torch.no_grad(), clip_frames(model, F):
        before, after = model(*args), model(*changed)
    assert (before[0] - after[0]).abs().max() > 1e-4  # frame 0 sees frame 1
    assert torch.equal(before[F:], after[F:])  # clip 1 does not
    # save_pretrained / from_pretrained keep the TM model whole.
    model.save_pretrained(tmp_path / "tm")
    again = DisCoModel.from_pretrained(tmp_path / "tm").eval()
    with torch.no_grad(), clip_frames(again, F):
        assert torch.equal(again(*args), before)


def test_only_the_temporal_parameters_move_in_a_step():
    model = add_temporal(_tiny(), {"frames": F})
    model.set_trainable()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = DiffusionObjective(model)
    n, side = F, 4  # one clip of 16 px frames
    g = torch.Generator().manual_seed(3)
    batch = dict(target=torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, background=torch.rand(n, 3, 16, 16, generator=g),
                 pose=torch.rand(n, 3, 32, 32, generator=g), reference=torch.randn(n, 3, 224, 224, generator=g),
                 noise=torch.randn(n, 4, side, side, generator=g), latent_noise=torch.randn(n, 4, side, side, generator=g),
                 timesteps=torch.randint(0, 1000, (n,), generator=g), uniforms=torch.ones(n, 3))
    optimizer = torch.optim.AdamW(list(model.trainable_parameters().values()), lr=1e-3)
    with clip_frames(model, F):
        objective(**batch).backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all(name.startswith("temporal.") for name in moved)
    # the zero-initialised output layers are among them: the module now does something
    assert any(name.endswith("conv.weight") for name in moved)
    assert any(name.endswith("to_out.0.weight") for name in moved)


def test_a_clip_encodes_its_reference_and_background_once_with_the_same_loss(monkeypatch):
    from disco.train import objective as objective_module

    model = add_temporal(_tiny(), {"frames": F})
    model.set_trainable()
    with torch.no_grad():
        for p in model.temporal.parameters():
            p.normal_(std=0.1)  # the layers mix the frames
    objective = DiffusionObjective(model)
    clips, side = 2, 4
    g = torch.Generator().manual_seed(5)

    def per_clip(*shape):  # one picture per clip, every frame of it
        return torch.rand(clips, 1, *shape, generator=g).expand(clips, F, *shape).reshape(clips * F, *shape)

    n = clips * F
    batch = dict(target=torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, background=per_clip(3, 16, 16) * 2 - 1,
                 pose=torch.rand(n, 3, 32, 32, generator=g), reference=per_clip(3, 224, 224),
                 noise=torch.randn(n, 4, side, side, generator=g), latent_noise=torch.randn(n, 4, side, side, generator=g),
                 timesteps=torch.randint(0, 1000, (n,), generator=g), uniforms=np.ones((n, 3)))
    rows = {}
    for name in ("encode_background", "encode_reference"):
        encode = getattr(model, name)
        monkeypatch.setattr(model, name, lambda x, encode=encode, name=name: (rows.setdefault(name, len(x)), encode(x))[1])
    with clip_frames(model, F):
        once = objective(**batch)
        assert rows == {"encode_background": clips, "encode_reference": clips}
        monkeypatch.setattr(objective_module, "once_per_clip", lambda encode, pictures, frames: encode(pictures))
        every_frame = objective(**batch)
    torch.testing.assert_close(once, every_frame, rtol=1e-5, atol=1e-7)


def test_a_clip_batch_holds_consecutive_frames_of_one_clip(triplets):
    index = build_index([str(triplets["video"])])
    stream = ClipStream(index, frames=F, batch=2, ref_mode="first", resolution=RES, augment=True, seed=0)
    try:
        batch = stream.next_batch()
        second = stream.next_batch()
    finally:
        stream.close()
    assert len(batch["position"]) == 2 * F
    for b in (batch, second):
        rows = stream._plan.rows(b["position"].numpy()).reshape(-1, F)
        for clip_rows in rows:
            assert len(set(index.clip[clip_rows])) == 1  # one clip
            assert np.all(np.diff(index.frame[clip_rows]) == 1)  # consecutive, in order
    # The clip's reference and background, cropped alike: the trainer encodes them once per clip.
    for name in ("reference", "reference_mask", "background", "background_mask"):
        clips = batch[name].reshape(2, F, *batch[name].shape[1:])
        assert all(torch.equal(c[0], c[k]) for c in clips for k in range(F)), name
    targets = batch["target"].reshape(2, F, *batch["target"].shape[1:])
    assert not torch.equal(targets[0, 0], targets[0, 1])
    # A resumed stream continues at its position.
    resumed = ClipStream(index, frames=F, batch=2, ref_mode="first", resolution=RES, augment=True, seed=0,
                         position=2 * F)
    try:
        assert torch.equal(resumed.next_batch()["position"], second["position"])
    finally:
        resumed.close()

    # The trainer's preview grid of a temporal run: the first whole clip, denoised jointly (its
    # temporal layers see the clip's frames), one grid row per frame.
    from disco.train.sampling import preview_samples, write_sample_grid

    cfg = TrainConfig(stage="temporal", clip_frames=F, sample_count=2, sample_steps=2, resolution=RES)
    preview = preview_samples(batch, cfg)
    assert torch.equal(preview["position"], batch["position"][:F])
    assert len(preview_samples(batch, TrainConfig(stage="finetune", sample_count=3))["position"]) == 3
    model = add_temporal(_tiny(), {"frames": F})
    seen, grids = [], []
    layer = next(iter(model.temporal.attentions.values()))
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[1]))

    class Grids:
        def grid(self, step, columns):
            grids.append(columns)

    write_sample_grid(model, preview, cfg, 1, Grids(), torch.device("cpu"), None)
    assert seen and set(seen) == {F} and model.temporal.frames == 1
    assert [len(c) for c in grids[0]] == [F] * 4


def test_windowed_generation_of_a_sequence_longer_than_a_window():
    assert window_starts(10, 4, 1) == [0, 3, 6]
    assert window_starts(3, 4, 1) == [0]
    assert torch.equal(window_weights(4, 1), torch.tensor([0.5, 1.0, 1.0, 0.5]))
    n = 10  # 2.5 windows of 4
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 3, 224, 224, generator=g)
    background = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    poses = torch.rand(n, 3, 32, 32, generator=g)  # pose pictures at 8 x the latent side
    # At initialisation, windowed TM sampling gives the image model's per-frame frames.
    per_frame = DisCoPipeline(_tiny().eval())(reference, background, poses, num_inference_steps=2, guidance_scale=1.5)
    model = add_temporal(_tiny(), {"frames": F}).eval()
    pipeline = DisCoPipeline(model)
    pipeline.overlap = 1
    windowed = pipeline(reference, background, poses, num_inference_steps=2, guidance_scale=1.5)
    assert np.abs(windowed.astype(int) - per_frame.astype(int)).max() <= 1  # blending rounds, nothing more
    with torch.no_grad():  # the identity is broken: the windows' frames affect each other
        for p in model.temporal.parameters():
            if p.dim() > 1:
                p.normal_(std=0.05)
    seen = []
    from disco.model import temporal

    original = temporal.windowed_ddim

    def spy(*args, **kwargs):
        kwargs["on_window"] = lambda start, size: seen.append((start, size))
        return original(*args, **kwargs)

    temporal.windowed_ddim = spy
    try:
        frames = pipeline(reference, background, poses, num_inference_steps=2, guidance_scale=1.5)
    finally:
        temporal.windowed_ddim = original
    assert frames.shape == (n, 16, 16, 3) and frames.dtype == np.uint8
    starts = sorted(set(seen))
    assert starts == [(0, 4), (3, 4), (6, 4)]  # every frame covered, neighbours share a frame
    assert len(seen) == 2 * 3  # every window at every step


def _mixing_tm_model() -> DisCoModel:
    """A tiny TM model of F-frame windows whose temporal layers mix the frames of a clip."""
    model = add_temporal(_tiny(), {"frames": F}).eval()
    with torch.no_grad():
        for p in model.temporal.parameters():
            if p.dim() > 1:
                p.normal_(std=0.05)
    return model


def test_batch_size_puts_several_whole_windows_in_one_forward_pass():
    from disco.model.temporal import windowed_ddim

    model = _mixing_tm_model()
    scheduler = DisCoPipeline(model).scheduler
    n = 10  # windows at 0, 3, 6
    g = torch.Generator().manual_seed(0)
    latents, background = torch.randn(n, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    tokens, pose = torch.randn(1, 257, 32, generator=g), torch.rand(n, 3, 32, 32, generator=g)
    empty = model.unconditional_reference(1)
    passes = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    try:
        for scale in (1.5, 1.0):  # the doubled batch of guidance, and none
            run = dict(steps=2, guidance_scale=scale, overlap=1)
            with torch.no_grad():
                one = windowed_ddim(model, scheduler, latents, tokens, empty, background, pose, **run)
                passes.clear()
                two = windowed_ddim(model, scheduler, latents, tokens, empty, background, pose, batch_size=11, **run)
                doubled = 2 if scale != 1.0 else 1
                assert passes == [2 * F * doubled, F * doubled] * 2  # windows 0 and 3 together, then 6
                passes.clear()
                three = windowed_ddim(model, scheduler, latents, tokens, empty, background, pose, batch_size=12, **run)
                assert passes == [3 * F * doubled] * 2
                # a batch smaller than two windows: one window a pass
                passes.clear()
                small = windowed_ddim(model, scheduler, latents, tokens, empty, background, pose, batch_size=7, **run)
                assert passes == [F * doubled] * 6 and torch.equal(small, one)
            assert (one - latents).abs().max() > 0.1
            torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    # The frames of a window are one clip of the batch: moving window 3's first frame changes
    # windows 0 and 3 (they share it), never window 6's frames beyond the blend (frames 7 to 9).
    moved = latents.clone()
    moved[4] += 1.0  # only in window 3 (frames 3-6)
    with torch.no_grad():
        a = windowed_ddim(model, scheduler, latents, tokens, empty, background, pose, steps=1, guidance_scale=1.5,
                          overlap=1, batch_size=12)
        b = windowed_ddim(model, scheduler, moved, tokens, empty, background, pose, steps=1, guidance_scale=1.5,
                          overlap=1, batch_size=12)
    assert (a[5] - b[5]).abs().max() > 1e-4  # frame 5 sees frame 4 through the temporal layers
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-6)  # window 0 does not
    torch.testing.assert_close(a[7:], b[7:], rtol=0, atol=1e-6)  # nor window 6's own frames


def test_a_bounded_pose_embedding_cache_gives_the_same_frames_and_holds_its_budget(monkeypatch):
    import contextlib

    from disco.model import temporal

    caches = []
    original = temporal.pose_embedding_cache

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with original(*args, **kwargs) as cache:
            caches.append(cache)
            yield cache

    monkeypatch.setattr(temporal, "pose_embedding_cache", recording)
    n, steps = 10, 3
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 3, 224, 224, generator=g)
    background = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    poses = torch.rand(n, 3, 32, 32, generator=g)
    pipeline = DisCoPipeline(_mixing_tm_model())
    pipeline.overlap = 1
    run = dict(num_inference_steps=steps, guidance_scale=1.5, batch_size=1)  # a window a pass: 3 passes a step
    pipeline.pose_cache_bytes = None
    full = pipeline(reference, background, poses, **run)
    whole = caches.pop()
    assert (whole.misses, whole.hits, len(whole.seen)) == (3, 3 * (steps - 1), 3)  # each window embedded once
    entry = whole.peak_bytes // 3  # one window's embedding (guided: 2 x F items) and its pose pictures
    for budget, kept in ((entry, 1), (2 * entry + entry // 2, 2), (0, 0)):
        pipeline.pose_cache_bytes = budget
        assert np.array_equal(pipeline(reference, background, poses, **run), full)
        cache = caches.pop()
        assert cache.peak_bytes <= budget and len(cache.seen) == kept
        # the first windows stay; the others are embedded again at every step
        assert (cache.misses, cache.hits) == (kept + (3 - kept) * steps, kept * (steps - 1))
    assert pipeline.model.pose_controlnet.controlnet_cond_embedding is whole.inner  # restored


def test_windowed_generation_reports_progress_as_it_goes(tmp_path):
    from PIL import Image
    from skimage import data

    from disco.generate.config import GenerateConfig
    from disco.generate.run import generate
    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    _mixing_tm_model().save_pretrained(tmp_path / "tm")
    Image.fromarray(data.astronaut()).save(tmp_path / "person.png")
    n = 10  # windows at 0, 3, 6 (the default overlap, a quarter of F = 4)
    write_video(tmp_path / "dance.mp4", pan_zoom_frames(data.astronaut(), n, 96), fps=10)
    config = GenerateConfig(checkpoint=tmp_path / "tm", reference=tmp_path / "person.png", pose=tmp_path / "dance.mp4",
                            output=tmp_path / "out.mp4", steps=2, size=16, batch_size=2 * F, align_pose=False,
                            smooth_poses=False)
    seen = []
    result = generate(config, log=lambda message: None,
                      progress=lambda done, total, phase: seen.append((done, total, phase)))
    assert result.frames == n
    # The driving video annotated first (a batch of 32 frames: one report), then 2 passes a step
    # (windows 0 and 3, then 6), 2 steps: 24 frame-passes of work counted as 10 frames.
    assert seen == [(n, n, "annotating poses"), (3, n, "generating"), (5, n, "generating"), (8, n, "generating"),
                    (n, n, "generating")]


def test_a_temporal_model_takes_a_fast_driving_video_at_its_training_clips_rate(tmp_path):
    """Preprocess takes videos at 30 fps at most, so a temporal module learnt the motion between
    frames 1/30 s apart; a 60 fps phone video drove it with half that motion per frame. Its poses
    are now taken at 30 fps unless --fps says otherwise (a per-frame model keeps the video's rate)."""
    from PIL import Image
    from skimage import data

    from disco.generate.config import GenerateConfig
    from disco.generate.run import generate
    from disco.pipeline.demo_data import pan_zoom_frames, write_video

    _mixing_tm_model().save_pretrained(tmp_path / "tm")
    Image.fromarray(data.astronaut()).save(tmp_path / "person.png")
    write_video(tmp_path / "dance.mp4", pan_zoom_frames(data.astronaut(), 12, 96), fps=60)
    options = dict(checkpoint=tmp_path / "tm", reference=tmp_path / "person.png", pose=tmp_path / "dance.mp4",
                   steps=1, size=16, batch_size=2 * F, align_pose=False, smooth_poses=False)
    lines: list[str] = []
    result = generate(GenerateConfig(output=tmp_path / "out.mp4", **options), log=lines.append)
    assert result.fps == pytest.approx(30) and result.frames == 6
    assert any("temporal-module model: the poses are taken at 30 fps" in line for line in lines), lines
    chosen = generate(GenerateConfig(output=tmp_path / "chosen.mp4", fps=60, **options), log=lambda message: None)
    assert chosen.fps == pytest.approx(60) and chosen.frames == 12


def _finetune_run(tmp_path: Path, triplets) -> Path:
    run = tmp_path / "finetune"
    train(TrainConfig(stage="finetune", data=[str(triplets["video"])], output=str(run), model="tiny", resolution=RES,
                      batch_size=2, max_steps=1, checkpoint_every=1000, sample_every=1000, sample_steps=2,
                      log_every=1, warmup_steps=0))
    return run


@pytest.fixture(scope="module")
def image_run(triplets, tmp_path_factory) -> Path:
    """One fine-tuning run that the temporal runs which leave it as it is start from."""
    return _finetune_run(tmp_path_factory.mktemp("image-run"), triplets)


def test_a_temporal_run_trains_only_its_layers_and_resumes_exactly(triplets, tmp_path):
    image_run = _finetune_run(tmp_path, triplets)
    run = tmp_path / "temporal"
    cfg = TrainConfig(stage="temporal", data=[str(triplets["video"])], output=str(run), init_from=str(image_run),
                      clip_frames=F, resolution=RES, batch_size=1, max_steps=3, checkpoint_every=1, keep=3,
                      sample_every=1000, sample_steps=2, log_every=1, warmup_steps=0, lr=1e-3)
    lines: list[str] = []
    assert train(cfg, log=lines.append)["step"] == 3
    assert f"2 windows of {F} consecutive frames from 1 runs of 1 clips (0 gaps" in " ".join(lines)
    assert "3 steps of 1 clips: 1.50 epochs of the data" in lines  # what --max-steps covers
    from disco.model.checkpoint import trained_data

    # The data of the run and of the runs it started from (here the fine-tuning run's), which train
    # and evaluate --run compare split rules over.
    assert trained_data(run) == [str(triplets["video"])] * 2 and trained_data(image_run) == [str(triplets["video"])]
    with pytest.raises(ConfigError, match="is given twice"):  # a folder's rows would count double
        train(cfg.updated({"output": str(tmp_path / "twice"), "data": [str(triplets["video"]), str(triplets["video"]) + "/"]}))
    # Clips too short for --clip-frames: one error on the driver before the run starts (in a
    # worker, it would come after loading the model, and Ray Train would retry it).
    with pytest.raises(DataError, match="no clip has 9 consecutive frames.*the longest has 8"):
        train(cfg.updated({"output": str(tmp_path / "too-long"), "clip_frames": 9}))
    assert not (tmp_path / "too-long" / "config.yaml").exists()
    with pytest.raises(ConfigError, match="the temporal stage keeps its --init-from run's"):
        train(cfg.updated({"output": str(tmp_path / "scaled"), "pose_scale": 0.5}))  # was ignored: the image model's stands
    weights = read_checkpoint(find_checkpoint(run, 3))[0]
    assert weights and all(name.startswith("temporal.") for name in weights)
    # A crash after step 2, then --resume: the same weights as the uninterrupted run.
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("checkpoint-00000003", "summary.json"))
    assert sorted(list_checkpoints(crashed)) == [1, 2]
    assert train(TrainConfig(output=str(crashed), resume=True), given={"output", "resume"})["step"] == 3
    resumed = read_checkpoint(find_checkpoint(crashed, 3))[0]
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    # The same command again with --resume (--init-from naming the fine-tuning run, whose checkpoint
    # the run pinned) is that run; another --init-from is refused; the plan of it has no false note.
    more = {"output", "resume", "init_from", "max_steps", "schedule_steps"}
    again, _ = resolve(TrainConfig(output=str(crashed), resume=True, init_from=str(image_run), max_steps=4,
                                   schedule_steps=4), given=more)
    assert again.init_from == TrainConfig.from_yaml(crashed / "config.yaml").init_from and again.max_steps == 4
    with pytest.raises(ConfigError, match="keeps the run's init-from"):
        resolve(TrainConfig(output=str(crashed), resume=True, init_from=str(tmp_path), max_steps=4,
                            schedule_steps=4), given=more)
    from disco.train.memory import plan_config

    _, notes = plan_config(TrainConfig(output=str(crashed), resume=True))
    assert not [n for n in notes if "init-from" in n], notes
    # The run's model: the image model of its (pinned) init checkpoint plus its temporal weights.
    model = load_model(run)
    image = load_model(image_run)
    assert model.config.temporal_config["frames"] == F
    for name, tensor in image.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert all(torch.equal(model.get_parameter(k), weights[k]) for k in weights)
    assert any(weights[k].abs().sum() > 0 for k in weights if k.endswith("to_out.0.weight"))
    # The run keeps its own copy of that image model: the fine-tuning run's checkpoints may go.
    assert "image-model" in TrainConfig.from_yaml(run / "config.yaml").init_from
    assert TrainConfig.from_yaml(run / "config.yaml").background_hole == 0.0
    # An image model trained before the official hole value (its config.yaml does not say: -1):
    # the temporal run started from it conditions its background the same way.
    saved = image_run / "config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if not line.startswith("background_hole")))
    # Its batch counts clips: the log's samples/s too, and the frames/s beside them.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if "samples_per_s" in json.loads(line)]
    assert logged and all(m["frames_per_s"] == pytest.approx(m["samples_per_s"] * F) for m in logged)
    legacy, _ = resolve(cfg.updated({"output": str(tmp_path / "temporal-legacy")}))
    assert legacy.background_hole == -1.0
    # Its size too where none is given: the temporal layers learnt at 256 px on a model fine-tuned
    # at another size (and generate made 256 px videos of it by default).
    sized, _ = resolve(cfg.updated({"output": str(tmp_path / "temporal-sized"), "resolution": TrainConfig.resolution}))
    assert TrainConfig.resolution != RES and sized.resolution == RES
    chosen, _ = resolve(cfg.updated({"output": str(tmp_path / "temporal-chosen"), "resolution": TrainConfig.resolution}),
                        given={"resolution"})
    assert chosen.resolution == TrainConfig.resolution
    shutil.rmtree(image_run)
    again = load_model(run)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    # Moved (or copied to another machine): its config.yaml still names the old place of its
    # image-model copy, which came along with it.
    moved = tmp_path / "elsewhere" / "temporal"
    shutil.move(run, moved)
    loaded = load_model(moved).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_export_of_a_temporal_model_keeps_its_temporal_layers(tmp_path):
    """`disco-cli export` of a TM model: the diffusers folders plus temporal/, whose tensors are the
    model's temporal layers, with their config (nothing dropped without a word)."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from disco.cli import app

    model = add_temporal(_tiny(), {"frames": F})
    with torch.no_grad():
        for p in model.temporal.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "tm")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "tm"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = load_file(str(tmp_path / "out" / "temporal" / "temporal.safetensors"))
    ours = model.temporal.state_dict()
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)
    assert json.loads((tmp_path / "out" / "temporal" / "config.json").read_text())["temporal_config"]["frames"] == F
    assert (tmp_path / "out" / "unet" / "config.json").exists() and "temporal" in result.output
    # An image model exported over it: refused, then with --overwrite the temporal/ folder goes
    # (left, the folder read as a temporal model that the checkpoint never was).
    _tiny().save_pretrained(tmp_path / "image")
    again = ["export", "--checkpoint", str(tmp_path / "image"), "--output", str(tmp_path / "out")]
    refused = CliRunner().invoke(app, again)
    assert refused.exit_code == 2 and "holds an earlier export (unet, controlnet_pose, controlnet_background, temporal)" \
        in " ".join(refused.output.split())
    assert CliRunner().invoke(app, [*again, "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["controlnet_background", "controlnet_pose", "unet"]
    (tmp_path / "plain").write_text("mine")
    onto_file = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "image"), "-o", str(tmp_path / "plain")])
    assert onto_file.exit_code == 2 and "is a file, not a folder" in onto_file.output


def test_the_memory_plan_of_the_temporal_stage_counts_clips():
    from disco.train.memory import memory_plan

    cfg = TrainConfig(stage="temporal", model="tiny", resolution=RES, batch_size=1, clip_frames=F)
    plan = memory_plan(cfg, gpu_memory_gib=80, device="cpu", search=False)
    model = add_temporal(_tiny(), {"frames": F})
    assert plan.trainable_params == sum(p.numel() for p in model.temporal.parameters())
    assert dict((name, n) for name, n, _ in plan.lines)[f"activations (batch 1 clips x {F} frames)"] > 0


def test_two_workers_make_the_same_temporal_update_as_one_with_twice_the_batch(triplets, image_run, tmp_path):
    """The temporal stage on two Ray Train workers (gloo, under the suite's guard that behaves like
    NCCL): the clip windows dealt to two data shards, the temporal layers' gradients averaged
    across the workers, one checkpoint of those layers alone, the same update as one worker
    reading both shards with twice the batch."""
    options = dict(stage="temporal", data=[str(triplets["video"])], init_from=str(image_run), clip_frames=F,
                   resolution=RES, max_steps=2, checkpoint_every=1000, sample_every=1000, sample_steps=2,
                   log_every=1, warmup_steps=0, lr=1e-3)
    two, one = tmp_path / "temporal-two", tmp_path / "temporal-one"
    assert train(TrainConfig(**options, output=str(two), batch_size=1, num_workers=2))["step"] == 2
    assert train(TrainConfig(**options, output=str(one), batch_size=2, data_shards=2))["step"] == 2
    a, b = read_checkpoint(find_checkpoint(two, 2))[0], read_checkpoint(find_checkpoint(one, 2))[0]
    assert a.keys() == b.keys() and all(name.startswith("temporal.") for name in a)
    start = add_temporal(load_model(image_run), {"frames": F}).temporal.state_dict()
    update = torch.sqrt(sum(((b[k] - start[k.removeprefix("temporal.")]) ** 2).sum() for k in b))
    difference = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    # Same clips, noise and timesteps; only the order of float sums differs (the all-reduce of
    # two half-batch means against one mean), which Adam's division by sqrt(v) enlarges.
    assert update > 1e-3 and difference / update < 1e-5, (float(update), float(difference))


def _corrupt_frames(folder: Path, target: Path, frames: tuple[int, ...]) -> None:
    """A copy of a preprocessed folder whose stored images of these frame indices are bad bytes
    (as ``_corrupt_copy`` in test_train.py does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from disco.pipeline.store.schema import TRIPLET_SCHEMA

    shutil.copytree(folder, target)
    shard = next((target / "triplets").glob("*.parquet"))
    table = pq.read_table(shard)
    frame_index = table.column("frame_index").to_pylist()
    images = [b"\xff\xd8 not a jpeg any more" if f in frames else image
              for f, image in zip(frame_index, table.column("image").to_pylist())]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table.cast(TRIPLET_SCHEMA), shard, row_group_size=4)


def _skipped_before(plan, index, bad_frame: int, good: int) -> tuple[int, int]:
    """(windows holding ``bad_frame`` that a one-shard, one-clip-per-batch stream passes before
    its ``good``-th good window, stream items consumed by then)."""
    bad, taken, window = 0, 0, 0
    while taken < good:
        rows = plan.rows(np.arange(window * F, (window + 1) * F))
        if bad_frame in index.frame[rows]:
            bad += 1
        else:
            taken += 1
        window += 1
    return bad, window * F


def test_a_clip_with_a_frame_that_does_not_decode_is_skipped_whole(triplets, tmp_path):
    bad = tmp_path / "bad"
    _corrupt_frames(triplets["video"], bad, (5,))  # the fixture's 8 frames: windows 0-3 and 4-7
    index = build_index([str(bad)])
    stream = ClipStream(index, frames=F, batch=1, ref_mode="first", resolution=RES, augment=False, seed=0)
    try:
        batches = [stream.next_batch() for _ in range(4)]
    finally:
        stream.close()
    for batch in batches:  # a whole clip of F consecutive frames each time, never the broken one
        assert len(batch["position"]) == F
        rows = stream._plan.rows(batch["position"].numpy())
        assert index.frame[rows].tolist() == [0, 1, 2, 3]
    expected, consumed = _skipped_before(stream._plan, index, 5, good=4)
    assert expected >= 1  # the broken clip came up and was passed over
    assert stream.skipped == expected * F  # every frame of a skipped clip is a skipped row
    assert stream.position == consumed  # skipped clips count as read: a resume starts after them
    # A resumed stream continues exactly where the uninterrupted one did.
    _, resume_at = _skipped_before(stream._plan, index, 5, good=2)
    resumed = ClipStream(index, frames=F, batch=1, ref_mode="first", resolution=RES, augment=False, seed=0,
                         position=resume_at)
    try:
        assert torch.equal(resumed.next_batch()["position"], batches[2]["position"])
    finally:
        resumed.close()
    # When no clip decodes whole, the stream stops saying so instead of reading for ever.
    worse = tmp_path / "worse"
    _corrupt_frames(triplets["video"], worse, (1, 5))
    broken = ClipStream(build_index([str(worse)]), frames=F, batch=1, ref_mode="first", resolution=RES,
                        augment=False, seed=0)
    try:
        with pytest.raises(DataError, match="no clip decodes"):
            broken.next_batch()
    finally:
        broken.close()


def test_a_temporal_run_skips_and_counts_a_clip_that_does_not_decode(triplets, image_run, tmp_path):
    bad = tmp_path / "bad"
    _corrupt_frames(triplets["video"], bad, (5,))
    run = tmp_path / "temporal"
    cfg = TrainConfig(stage="temporal", data=[str(bad)], output=str(run), init_from=str(image_run), clip_frames=F,
                      resolution=RES, batch_size=1, max_steps=2, checkpoint_every=1000, sample_every=1000,
                      sample_steps=2, log_every=1, warmup_steps=0, lr=1e-3)
    summary = train(cfg)
    assert summary["step"] == 2
    from disco.train.data.clips import ClipPlan

    index = build_index([str(bad)])
    expected, consumed = _skipped_before(ClipPlan(index, F, cfg.seed, 1, F), index, 5, good=2)
    assert expected >= 1 and summary["skipped_rows"] == expected * F
    state = json.loads((find_checkpoint(run, 2) / "state.json").read_text())
    assert state["skipped"] == expected * F and state["positions"] == [consumed]


def test_each_epoch_draws_its_own_window_offsets_from_the_seed(triplets):
    from disco.train.data.clips import ClipPlan

    index = build_index([str(triplets["video"])])

    def starts(frames: int, seed: int, epochs: int = 12, offsets: bool = True) -> list[tuple[int, ...]]:
        """Per epoch, the first frames of the clip's windows (a micro-batch is one epoch's windows)."""
        count = 8 // frames
        plan = ClipPlan(index, frames, seed, 1, frames * count, offsets)
        out = []
        for epoch in range(epochs):
            rows = plan.rows(np.arange(epoch * frames * count, (epoch + 1) * frames * count)).reshape(count, frames)
            assert all(np.all(np.diff(index.frame[r]) == 1) for r in rows)  # consecutive frames
            out.append(tuple(sorted(int(index.frame[r[0]]) for r in rows)))
        return out

    three = starts(3, seed=0)  # 8 frames: 2 windows of 3 and 2 frames to spare
    assert set(three) == {(0, 3), (1, 4), (2, 5)}  # every offset in [0, 8 - 2 * 3] comes up
    assert three[0] != three[1] or three[1] != three[2]  # epochs differ
    assert starts(3, seed=0) == three  # the seed decides: a resumed run reads the same windows
    assert starts(3, seed=1) != three
    assert set(starts(4, seed=0)) == {(0, 4)}  # a whole number of windows: offset 0 every epoch
    # A run started before offsets (its config.yaml does not say) resumes on the windows it read.
    assert set(starts(3, seed=0, offsets=False)) == {(0, 3)}
    from disco.train.config import load_run_config

    run = Path(str(TrainConfig(output="x", stage="temporal").save(triplets["video"].parent / "offsets-run"))).parent
    assert load_run_config(run).window_offsets is True
    saved = run / "config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if not line.startswith("window_offsets")))
    assert load_run_config(run).window_offsets is False
    from disco.train.temporal import stream_class

    assert stream_class(load_run_config(run)).keywords["offsets"] is False
    assert stream_class(load_run_config(run)).keywords["group_frames"] == 64
    # Nor of window groups (written before them): a group per run, as it was reading.
    saved.write_text("\n".join(line for line in saved.read_text().splitlines()
                               if not line.startswith("window_group_frames")))
    assert stream_class(load_run_config(run)).keywords["group_frames"] is None


def test_a_long_clips_windows_are_read_a_few_row_groups_at_a_time():
    """The order reads windows a few groups at a time (``WINDOW_GROUPS``); a group was a whole
    run of frames, so a read task of a minute-long video held its every frame. A group is at
    most ``window_group_frames`` frames of one run now: the same windows, each epoch the same
    offsets, read tasks of a few hundred frames; a run written before keeps a group per run."""
    from disco.train.data.clips import ClipPlan, window_index
    from disco.train.data.index import TripletIndex
    from disco.train.data.order import WINDOW_GROUPS

    # Two clips, of 1,000 and 90 frames, in row groups of 64.
    n, frames, rows_per_group, lengths = 1090, 16, 64, (1000, 90)
    rows = np.arange(n)
    clip = np.repeat([0, 1], lengths).astype(np.int64)
    frame = np.concatenate([np.arange(k) for k in lengths]).astype(np.int32)
    index = TripletIndex(["a.parquet"], np.zeros(n, np.int32), (rows // rows_per_group).astype(np.int32),
                         (rows % rows_per_group).astype(np.int32), clip, frame,
                         np.append(np.arange(0, n, rows_per_group), n).astype(np.int64), rows.astype(np.int64),
                         np.array([0, 1000, n], np.int64))
    whole, grouped = window_index(index, frames), window_index(index, frames, group_frames=64)
    assert np.array_equal(whole.first, grouped.first) and len(grouped) == 62 + 5
    assert np.diff(grouped.group_starts).tolist() == [4] * 15 + [2] + [4, 1]
    assert grouped.run.tolist() == [0] * 16 + [1] * 2 and grouped.slack.tolist() == [8] * 16 + [10] * 2
    for epoch in range(5):  # one offset per run, shared by its groups: windows stay end to end
        assert np.array_equal(grouped.offsets(0, epoch), whole.offsets(0, epoch)[grouped.run])
    assert "67 windows of 16 consecutive frames from 2 runs of 2 clips" in grouped.describe(frames)
    epoch_frames = len(grouped) * frames
    for group_frames in (64, None):
        plan = ClipPlan(index, frames, 0, 1, frames, group_frames=group_frames)
        tasks = np.diff(np.append(plan.window_starts(0, 0), epoch_frames))  # frames each read task holds
        if group_frames:
            assert tasks.max() <= WINDOW_GROUPS * 64 and len(tasks) == 3, tasks
        else:
            assert tasks.tolist() == [epoch_frames]  # both clips whole in one task
        read = plan.rows(np.arange(epoch_frames)).reshape(-1, frames)
        assert all(np.all(np.diff(index.frame[r]) == 1) for r in read)  # whole windows, in order
        assert len({int(r[0]) for r in read}) == len(read)  # each window once an epoch


def test_no_window_spans_frames_that_preprocessing_dropped(triplets, tmp_path):
    """Preprocessing leaves out frames of a clip (no person, a failed pose: the row is rejected)
    and their frame indices with them. A window is F consecutive frames, so it is cut from the
    stretches between such gaps, never across one (a run started before keeps its windows)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from disco.train.config import load_run_config
    from disco.train.data.clips import ClipPlan, window_index
    from disco.train.temporal import stream_class

    gapped = tmp_path / "gapped"
    shutil.copytree(triplets["video"], gapped)
    shard = next((gapped / "triplets").glob("*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.filter(pc.not_equal(table.column("frame_index"), 2)), shard, row_group_size=4)
    index = build_index([str(gapped)])
    assert sorted(index.frame.tolist()) == [0, 1, 3, 4, 5, 6, 7]
    frames = 3
    windows = window_index(index, frames)  # runs 0-1 (too short) and 3-7: one window, 2 frames to spare
    assert (len(windows), windows.runs, windows.clips, windows.unused, windows.slack.tolist()) == (1, 2, 1, 2, [2])
    assert "1 windows of 3 consecutive frames from 1 runs of 1 clips (1 gaps" in windows.describe(frames)
    starts = set()
    for epoch in range(12):
        plan = ClipPlan(index, frames, 0, 1, frames)
        rows = plan.rows(np.arange(epoch * frames, (epoch + 1) * frames))
        assert np.all(np.diff(index.frame[rows]) == 1), index.frame[rows]
        starts.add(int(index.frame[rows[0]]))
    assert starts == {3, 4, 5}  # every offset of the run comes up, none reaches back over the gap
    legacy = ClipPlan(index, frames, 0, 1, frames * 2, offsets=False, split_at_gaps=False)
    assert index.frame[legacy.rows(np.arange(frames * 2))].tolist() == [0, 1, 3, 4, 5, 6]
    # A run directory written before says nothing of gaps: its resume keeps its windows.
    run = Path(str(TrainConfig(output="x", stage="temporal").save(tmp_path / "gaps-run"))).parent
    assert stream_class(load_run_config(run)).keywords["split_at_gaps"] is True
    saved = run / "config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if not line.startswith("split_at_gaps")))
    assert stream_class(load_run_config(run)).keywords["split_at_gaps"] is False
    # The stream itself (Ray Data reading the shard) hands out whole windows of consecutive frames.
    stream = ClipStream(index, frames=frames, batch=1, ref_mode="first", resolution=RES, augment=False, seed=0)
    try:
        batch = stream.next_batch()
    finally:
        stream.close()
    assert index.frame[stream._plan.rows(batch["position"].numpy())].tolist() in ([3, 4, 5], [4, 5, 6], [5, 6, 7])
    with pytest.raises(DataError, match="no clip has 6 consecutive frames.*the longest has 5"):
        window_index(index, 6)


def test_temporal_attention_runs_many_sequences_in_parts_with_the_same_result(monkeypatch):
    """A clip batch's temporal attention is one sequence per clip and token position: past
    MAX_SEQUENCES it runs in parts (CUDA's memory-efficient kernel fails past 65,535 sequences),
    the same values and gradients as in one call."""
    from disco.model import temporal

    torch.manual_seed(0)
    layer = temporal.TemporalAttention(32, 4)
    with torch.no_grad():
        layer.attention.to_out[0].weight.normal_(std=0.2)
    x = torch.randn(3 * F, 10, 32, requires_grad=True)  # 3 clips of F frames, 10 token positions: 30 sequences
    whole = layer(x, F)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), x)
    calls = []
    monkeypatch.setattr(temporal, "MAX_SEQUENCES", 7)
    monkeypatch.setattr(layer.attention, "forward", lambda y, _f=layer.attention.forward: calls.append(len(y)) or _f(y))
    parts = layer(x, F)
    (grad_parts,) = torch.autograd.grad(parts.square().sum(), x)
    assert calls == [7, 7, 7, 7, 2]
    assert torch.allclose(parts, whole, atol=1e-6) and torch.allclose(grad_parts, grad_whole, atol=1e-5)
