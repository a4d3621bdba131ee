"""The paper's metrics against independent values; feature networks are random (nothing is downloaded)."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image
import pytest
import torch
from skimage import data
from skimage.metrics import structural_similarity
from typer.testing import CliRunner

from disco.cli import app
from disco.evaluate import metrics as M
from disco.evaluate import networks as N
from disco.evaluate.config import EvaluateConfig, EvaluateInputError, NetworkConfig
from disco.evaluate.run import evaluate, score
from disco.generate.video import write_frames
from disco.pipeline.demo_data import pan_zoom_frames, write_video


class TinyFeatures(torch.nn.Module):
    """A random conv net standing in for Inception: uint8 N x 3 x H x W -> N x 16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))


class TinyVideoFeatures(torch.nn.Module):
    """uint8 N x T x H x W x 3 clips -> N x 8, sensitive to every frame of the clip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv3d(3, 8, (3, 5, 5), stride=(1, 4, 4))

    def forward(self, clips):
        x = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        return torch.tanh(self.conv(x)).mean((2, 3, 4))


@pytest.fixture(scope="module")
def frames():
    return np.stack(pan_zoom_frames(data.astronaut(), 20, 32))


def shifted(frames, amount):
    return np.clip(frames.astype(int) + amount, 0, 255).astype(np.uint8)


# -- PSNR, SSIM, L1 ---------------------------------------------------------------------------------

def test_psnr_of_known_arrays_in_float64():
    gt = np.zeros((8, 8, 3), np.uint8)
    assert M.psnr(np.full_like(gt, 10), gt) == pytest.approx(20 * math.log10(255 / 10))
    # Subtracting uint8 arrays wraps 0 - 255 to 1 (about 48 dB); the true error is the full range: 0 dB.
    assert M.psnr(np.zeros_like(gt), np.full_like(gt, 255)) == pytest.approx(0.0)
    half = gt.copy()
    half[:4] = 20  # MSE = 400 / 2
    assert M.psnr(half, gt) == pytest.approx(10 * math.log10(255 ** 2 / 200))
    assert M.psnr(gt, gt) == M.PSNR_CAP


def test_ssim_equals_scikit_image_on_grayscale():
    rng = np.random.default_rng(0)
    gray_a = data.camera()[::4, ::4]
    gray_b = np.clip(gray_a.astype(int) + rng.integers(-30, 30, gray_a.shape), 0, 255).astype(np.uint8)
    rgb = lambda g: np.repeat(g[..., None], 3, axis=2)  # noqa: E731 - gray in RGB: the conversion is exact
    assert M.ssim(rgb(gray_b), rgb(gray_a)) == structural_similarity(gray_b, gray_a, data_range=255)
    # Colour frames: the same as scikit-image on the ITU-R 601 luma.
    a, b = data.astronaut()[::4, ::4], data.coffee()[:128, :128]
    luma = lambda x: np.round(x @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)  # noqa: E731
    assert M.ssim(a, b) == pytest.approx(structural_similarity(luma(a), luma(b), data_range=255), abs=2e-3)
    assert M.ssim(a, a) == 1.0


def test_l1_by_the_papers_convention():
    gt = np.zeros((32, 16, 3), np.uint8)
    pred = np.full_like(gt, 10)
    assert M.l1(pred, gt) == pytest.approx(10 / (32 * 16))
    # At 256 x 256, the paper's L1 of 3.78e-4 is a mean absolute error of about 24.8 grey levels.
    gt = np.zeros((256, 256, 3), np.uint8)
    pred = np.full_like(gt, 25)
    assert M.l1(pred, gt) == pytest.approx(3.81e-4, rel=1e-2)


# -- LPIPS and Fréchet distances ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return N.lpips_vgg(None)


def test_lpips_plumbing_with_a_random_vgg(frames, random_lpips):
    net = random_lpips
    values = []
    for amount in (0, 20, 60):
        metric = M.Lpips(net, batch_size=8)
        metric.update(shifted(frames[:4], amount), frames[:4])
        values.append(metric.compute())
    assert values[0] == 0.0
    assert 0 < values[1] < values[2]


def test_lpips_loads_its_linear_layers_from_torchmetrics_and_the_trunk_from_a_file(tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(3)
    source = vgg16(weights=None)
    trunk = {k: v for k, v in source.state_dict().items() if k.startswith("features.")}  # the classifier is unused
    torch.save(trunk, tmp_path / N.VGG16_FILE)
    net = N.lpips_vgg(tmp_path / N.VGG16_FILE)
    assert torch.equal(getattr(net.net.slice1, "0").weight, source.features[0].weight)
    assert torch.equal(getattr(net.net.slice5, "28").weight, source.features[28].weight)
    torch.save({k: v for k, v in trunk.items() if not k.startswith("features.28.")}, tmp_path / "cut.pth")
    with pytest.raises(N.WeightsError, match="cut.pth does not fit VGG-16"):
        N.lpips_vgg(tmp_path / "cut.pth")
    # The calibrated linear layers are LPIPS's own (non-negative weights), not random ones.
    assert all((lin.model[-1].weight >= 0).all() for lin in net.lins)


def random_inception_state(seed: int = 0) -> dict:
    """The FID Inception's state dict (torch-fidelity's layout, which is pytorch-fid's too) with
    random weights that carry a picture's signal to pool3: He-initialised convolutions (PyTorch's
    default initialisation fades a picture out over the 94 layers, and then any resize gives the
    same features, to 3e-8)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # the architecture built once without weights (its constructor would download them)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        state = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=generator) * (2 / value[0].numel()) ** 0.5
    return state


def test_the_fid_inception_loads_from_a_local_file(tmp_path):
    """The standard FID Inception (torch-fidelity's architecture), from a file we write with random weights."""
    random_state = random_inception_state()
    torch.save(random_state, tmp_path / N.INCEPTION_FILE)
    net = N.inception(tmp_path / N.INCEPTION_FILE)
    assert torch.equal(net.state_dict()["Conv2d_1a_3x3.conv.weight"], random_state["Conv2d_1a_3x3.conv.weight"])
    features = net(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert features.reshape(2, -1).shape == (2, 2048)
    with pytest.raises(N.WeightsError, match="cannot read weights"):
        (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
        N.inception(tmp_path / "junk.pth")
    # A picture given as the weights: no advice to load it with weights_only=False.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "person.png")
    with pytest.raises(N.WeightsError) as refused:
        N.inception(tmp_path / "person.png")
    assert "person.png: it is damaged or not a tensors-only checkpoint" in str(refused.value) and \
        "weights_only" not in str(refused.value)


def test_the_fid_inception_sees_frames_as_torch_fidelity_does(tmp_path):
    """``--fid-port torch-fidelity`` promises torch-fidelity's input (TF1-style resize to 299):
    torchmetrics' Inception resized with PyTorch's antialiased bilinear unless told otherwise.
    The reference: torch-fidelity's own feature extractor on the same weights file and frames."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    torch.save(random_inception_state(), tmp_path / N.INCEPTION_FILE)
    ours = N.inception(tmp_path / N.INCEPTION_FILE).eval()
    theirs = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / N.INCEPTION_FILE)).eval()
    photo = torch.from_numpy(np.ascontiguousarray(data.astronaut()[::2, ::2])).permute(2, 0, 1)[None]  # 256 px
    with torch.no_grad():
        mine, reference = ours(photo).reshape(-1), theirs(photo)[0].reshape(-1)
    assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-4), (mine - reference).abs().max()


def test_frechet_plumbing(frames):
    features = TinyFeatures()
    results = []
    for amount in (0, 20, 60):
        metric = M.Frechet(features, (3, 32, 32), batch_size=7)
        metric.update(M.to_tensor(shifted(frames, amount)), real=False)
        metric.update(M.to_tensor(frames), real=True)
        results.append(metric.compute())
    assert results[0] == pytest.approx(0.0, abs=1e-9)
    assert 0 < results[1] < results[2]


def test_frechet_metrics_run_on_another_device_than_the_cpu(frames):
    """``meta`` stands in for a GPU (tensors that are not on the CPU): the metric is built and
    updated there, with the network and every running sum on that device. The video network is
    the product's (torchvision's, in its wrapper with normalisation buffers), random."""
    class SameDevice(TinyFeatures):  # as a GPU convolution: input and weights on one device
        def forward(self, x):
            assert x.device == self.conv.weight.device, f"input on {x.device}, weights on {self.conv.weight.device}"
            return super().forward(x)

    for metric, items in ((M.Frechet(SameDevice(), (3, 32, 32), device="meta"), M.to_tensor(frames)),
                          (M.Frechet(N.video_network("mc3_18", None), (M.CLIP_LENGTH, 32, 32, 3), device="meta"),
                           M.clips(frames, M.clip_windows(len(frames))))):
        metric.update(items, real=True)
        metric.update(items, real=False)
        assert {t.device.type for t in (*metric.metric.parameters(), *metric.metric.buffers())} == {"meta"}
        assert metric.metric.real_features_sum.device.type == "meta"


def test_scoring_runs_its_networks_without_tf32(folders):
    """cuDNN convolves fp32 in TF32 on a GPU by default, which moves the feature metrics: the
    networks run with full-precision convolutions, and the setting comes back afterwards."""
    seen = []

    class Recording(TinyFeatures):
        def forward(self, x):
            seen.append(torch.backends.cudnn.conv.fp32_precision)
            return super().forward(x)

    before = torch.backends.cudnn.conv.fp32_precision
    score(folders / "shift", folders / "gt", ["fid"], {"fid": Recording()})
    assert seen and set(seen) == {"ieee"} and before != "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == before


def test_a_frechet_distance_needs_two_samples(frames):
    metric = M.Frechet(TinyFeatures(), (3, 64, 64))
    metric.update(M.to_tensor(frames[:1]), real=False)
    metric.update(M.to_tensor(frames[:1]), real=True)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metric.compute()


def test_video_clips_are_every_16_consecutive_frames_stride_1(frames):
    windows = M.clip_windows(20)
    assert [(w.start, w.stop) for w in windows] == [(k, k + 16) for k in range(5)]
    assert M.clip_windows(15) == [] and len(M.clip_windows(16)) == 1
    stacked = M.clips(frames, windows[1:3])
    assert stacked.shape == (2, 16, 32, 32, 3)
    assert np.array_equal(stacked[0].numpy(), frames[1:17]) and np.array_equal(stacked[1].numpy(), frames[2:18])


def test_video_networks_take_clips_and_load_local_files(tmp_path):
    torch.manual_seed(0)
    net = N.video_network("mc3_18", None)
    clips = torch.randint(0, 255, (1, 16, 40, 40, 3), dtype=torch.uint8)
    assert net(clips).shape == (1, 512)
    torch.save(net.net.state_dict() | {"fc.weight": torch.zeros(400, 512), "fc.bias": torch.zeros(400)},
               tmp_path / "mc3.pth")
    loaded = N.video_network("mc3_18", tmp_path / "mc3.pth")
    torch.testing.assert_close(loaded(clips), net(clips))
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(N.WeightsError, match="wrong.pth does not fit"):
        N.video_network("mc3_18", tmp_path / "wrong.pth")


# -- scoring folders ------------------------------------------------------------------------------

NETS = {"fid": TinyFeatures(), "fid-vid": TinyVideoFeatures(), "fvd": TinyVideoFeatures()}


@pytest.fixture(scope="module")
def folders(frames, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    for name, content in (("gt", frames), ("same", frames), ("shift", shifted(frames, 30))):
        write_frames(root / name / "clip_a", content)
        write_frames(root / name / "clip_b", content[::-1][:17])
    return root


def test_scores_of_identical_and_shifted_sets(folders, random_lpips):
    nets = {**NETS, "lpips": random_lpips}
    metrics = ["fid", "ssim", "psnr", "lpips", "l1", "fid-vid", "fvd"]
    same = score(folders / "same", folders / "gt", metrics, nets)
    assert same["counts"] == {"sequences": 2, "frames": 37, "clips": 5 + 2, "frame_sizes": {"32x32": 37}}
    values = same["metrics"]
    assert values["ssim"] == 1.0 and values["psnr"] == M.PSNR_CAP and values["l1"] == 0.0 and values["lpips"] == 0.0
    for name in ("fid", "fid-vid", "fvd"):
        assert values[name] == pytest.approx(0.0, abs=1e-6)
    worse = score(folders / "shift", folders / "gt", metrics, nets)["metrics"]
    assert worse["ssim"] < 1 and worse["psnr"] < 30 and worse["l1"] > 0 and worse["lpips"] > 0
    assert all(worse[name] > 1e-6 for name in ("fid", "fid-vid", "fvd"))
    # PSNR and L1 are per-pair means.
    first = np.stack([M.psnr(shifted(f, 30), f) for f in np.stack(pan_zoom_frames(data.astronaut(), 20, 32))])
    assert worse["psnr"] == pytest.approx(np.mean(np.concatenate([first, first[::-1][:17]])), rel=1e-3)


def test_videos_score_like_their_frames(frames, folders, tmp_path):
    # Lossless frames vs the same frames through a lossy video: both sides read as videos.
    write_video(tmp_path / "pred" / "clip.mp4", list(frames), 10)
    write_video(tmp_path / "gt" / "clip.mp4", list(frames), 10)
    result = score(tmp_path / "pred", tmp_path / "gt", ["psnr", "fvd"], NETS)
    assert result["counts"] == {"sequences": 1, "frames": 20, "clips": 5, "frame_sizes": {"32x32": 20}}
    assert result["metrics"]["psnr"] == M.PSNR_CAP


def test_mismatched_sets_are_refused(folders, tmp_path):
    write_frames(tmp_path / "pred" / "clip_a", np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(EvaluateInputError, match="same sequences"):
        score(tmp_path / "pred", folders / "gt", ["psnr"], {})
    write_frames(tmp_path / "p2" / "clip_a", np.zeros((3, 8, 8, 3), np.uint8))
    write_frames(tmp_path / "g2" / "clip_a", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(EvaluateInputError, match="do not match by name"):
        score(tmp_path / "p2", tmp_path / "g2", ["psnr"], {})


def test_real_frames_of_another_shape_are_refused_or_squared_as_generate_does(frames, tmp_path):
    """Squares from ``generate`` against the wide real video they came from: resizing would
    stretch them, so the pair is refused; ``--square-gt`` crops the real frames as generate does,
    and scores exactly what the squares cut by hand would."""
    from disco.model.conditioning import square

    wide = np.stack([np.concatenate([f, f[:, :16]], axis=1) for f in frames])  # 48 x 32
    write_frames(tmp_path / "gt" / "clip", wide)
    write_frames(tmp_path / "squares" / "clip", np.stack([square(f, 32) for f in wide]))
    write_frames(tmp_path / "pred" / "clip", shifted(np.stack([square(f, 24) for f in wide]), 9))
    with pytest.raises(EvaluateInputError, match="predicted frames are 24 x 24, real ones 48 x 32.*--square-gt"):
        score(tmp_path / "pred", tmp_path / "gt", ["psnr"], {})
    cropped = score(tmp_path / "pred", tmp_path / "gt", ["psnr", "ssim"], {}, square_gt=True)
    by_hand = score(tmp_path / "pred", tmp_path / "squares", ["psnr", "ssim"], {})
    assert cropped["metrics"] == by_hand["metrics"] and 20 < cropped["metrics"]["psnr"] < 100
    # A lone video or frames folder on each side is named by its own name ('.' named nothing).
    import cv2

    large = [cv2.resize(f, (96, 64)) for f in wide]  # (decord cannot read a video 48 wide)
    write_video(tmp_path / "gen.mp4", [square(f, 64) for f in large], 10)
    write_video(tmp_path / "real.mp4", large, 10)
    with pytest.raises(EvaluateInputError, match=r"^'gen\.mp4': predicted frames are 64 x 64"):
        score(tmp_path / "gen.mp4", tmp_path / "real.mp4", ["psnr"], {})
    from pathlib import Path

    from disco.evaluate.run import shown

    assert shown(".", [Path("000000.png")]) == repr(Path.cwd().name)  # `--pred .`: the folder's name
    write_frames(tmp_path / "short", wide[:11])
    with pytest.raises(EvaluateInputError, match=r"^frames of 'clip' do not match by name .*\(20 vs 11"):
        score(tmp_path / "pred" / "clip", tmp_path / "short", ["psnr"], {})


def test_the_report_records_scores_counts_and_settings(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto: the CPU here
    config = EvaluateConfig(output=tmp_path / "m.json", pred=folders / "shift", gt=folders / "gt",
                            metrics=["fid", "ssim", "fvd"])
    report = evaluate(config, networks=NETS, log=lambda m: None)
    stored = json.loads((tmp_path / "m.json").read_text())
    assert stored["metrics"] == report["metrics"] and set(stored["metrics"]) == {"fid", "ssim", "fvd"}
    assert stored["settings"]["conventions"]["video_clips"] == "16 consecutive frames, stride 1"
    assert stored["settings"]["device"] == "cpu" and "no TF32" in stored["settings"]["conventions"]["networks"]
    assert stored["settings"]["networks"]["fvd"]["network"].startswith("s3d")


def test_a_distance_that_cannot_be_computed_keeps_the_other_scores(frames, tmp_path, monkeypatch):
    """Clips of 10 frames hold no 16-frame clip: FID-VID cannot be computed. That threw away the
    report, SSIM, PSNR and FID already computed (after hours of --run generating). Now it is null
    in the report with its reason, and the command prints the others, says why, and exits 1."""
    for name in ("pred", "gt"):
        write_frames(tmp_path / name / "clip_a", shifted(frames[:10], 20 if name == "pred" else 0))
        write_frames(tmp_path / name / "clip_b", frames[10:])
    config = EvaluateConfig(output=tmp_path / "m.json", pred=tmp_path / "pred", gt=tmp_path / "gt",
                            metrics=["ssim", "psnr", "fid", "fid-vid"])
    report = evaluate(config, networks=NETS, log=lambda m: None)
    stored = json.loads((tmp_path / "m.json").read_text())
    assert stored["metrics"] == report["metrics"] and stored["metrics"]["fid-vid"] is None
    assert stored["failed"] == {"fid-vid": stored["failed"]["fid-vid"]} and "at least 2 samples" in stored["failed"]["fid-vid"]
    assert 0 < stored["metrics"]["ssim"] < 1 and stored["metrics"]["psnr"] > 0 and stored["metrics"]["fid"] > 0
    assert stored["counts"]["clips"] == 0
    # The command: the table with the scores, one line for the one not computed, exit 1.
    from typer.testing import CliRunner

    import disco.commands.evaluate as command
    from disco.cli import app

    class RandomNetworks(NetworkConfig):
        def build(self, metrics):
            return {m: NETS[m] for m in metrics if m in NETS}

    monkeypatch.setattr(command, "NetworkConfig", RandomNetworks)
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                                      "--metrics", "ssim,fid-vid", "-o", str(tmp_path / "c.json")])
    assert result.exit_code == 1, result.output
    assert "FID-VID not computed: a Fréchet distance needs at least 2 samples" in result.output
    assert "SSIM" in result.output and json.loads((tmp_path / "c.json").read_text())["metrics"]["ssim"] > 0


def test_a_missing_weight_file_is_named(tmp_path):
    config = NetworkConfig(weights=tmp_path)
    with pytest.raises(N.WeightsError, match=N.INCEPTION_FILE):
        config.files(["ssim", "fid"])
    assert config.files(["ssim", "psnr", "l1"]) == {}
    with pytest.raises(N.WeightsError, match="--vgg16"):
        NetworkConfig().files(["lpips"])


def _cli(*args):
    return CliRunner().invoke(app, ["evaluate", *[str(a) for a in args]])


def test_evaluate_cli_prints_a_table_and_writes_json(folders, tmp_path):
    result = _cli("--pred", folders / "shift", "--gt", folders / "gt", "--metrics", "ssim,psnr,l1",
                  "--output", tmp_path / "scores.json")
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "L1" in result.output
    assert set(json.loads((tmp_path / "scores.json").read_text())["metrics"]) == {"ssim", "psnr", "l1"}


@pytest.mark.parametrize("args, message", [
    (["--metrics", "fid"], N.INCEPTION_FILE),
    (["--metrics", "psnr,bogus"], "unknown metric bogus"),
    (["--metrics", "fvd", "--fvd-arch", "c3d"], "unknown video network 'c3d'"),
    (["--metrics", "psnr", "--device", "tpu9"], "--device"),
])
def test_evaluate_usage_errors_are_one_line_exit_2(folders, tmp_path, args, message, monkeypatch):
    monkeypatch.delenv(N.WEIGHTS_ENV, raising=False)
    result = _cli("--pred", folders / "shift", "--gt", folders / "gt", "--weights", tmp_path,
                  "--output", tmp_path / "o.json", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_missing_gpu_is_a_usage_error(folders, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _cli("--pred", folders / "shift", "--gt", folders / "gt", "--metrics", "psnr", "--device", "cuda",
                  "--output", tmp_path / "o.json")
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_a_gpu_index_past_the_machines_and_running_out_of_gpu_memory_are_one_line(folders, tmp_path, monkeypatch):
    """On a machine with one GPU (made believe), --device cuda:3 is refused before any work, and a
    CUDA out-of-memory error during scoring says what to lower instead of a traceback."""
    import disco.evaluate.run as run_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = ("--pred", folders / "shift", "--gt", folders / "gt", "--metrics", "psnr", "--output", tmp_path / "o.json")
    result = _cli(*args, "--device", "cuda:3")
    assert result.exit_code == 2 and "this machine has 1 CUDA device(s), cuda:0 to cuda:0" in result.output

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_module, "score", exhausted)
    result = _cli(*args, "--device", "cuda:0", "--batch-size", "64")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "out of GPU memory on cuda:0 at --batch-size 64: lower --batch-size" in result.output


def test_evaluate_needs_pred_and_gt_or_a_run(folders, tmp_path):
    result = _cli("--pred", folders / "shift", "--output", tmp_path / "o.json")
    assert result.exit_code == 2 and "--pred and --gt go together" in result.output
    result = _cli("--run", tmp_path, "--output", tmp_path / "o.json")
    assert result.exit_code == 2 and "--data" in result.output


def test_the_command_line_offers_exactly_the_video_networks_that_can_be_built():
    from disco.evaluate.config import FID_VID_NET, FVD_NET, VIDEO_NET_NAMES

    assert tuple(N.VIDEO_NETS) == VIDEO_NET_NAMES and {FID_VID_NET, FVD_NET} <= set(VIDEO_NET_NAMES)


class NonFiniteFeatures(TinyFeatures):
    """Features that overflow (a damaged weights file, frames that are not numbers)."""

    def forward(self, x):
        return super().forward(x) * float("nan")


@pytest.mark.parametrize("port", ["torch-fidelity", "pytorch-fid"])
def test_a_nan_frechet_distance_is_null_with_its_reason_not_a_perfect_zero(folders, tmp_path, port):
    """``max(0, nan)`` is 0: NaN features reported FID 0.0, a perfect score (torchmetrics' port);
    the numpy port wrote NaN into the JSON report, which is not JSON."""
    config = EvaluateConfig(output=tmp_path / "m.json", pred=folders / "shift", gt=folders / "gt",
                            metrics=["fid", "ssim"], networks=NetworkConfig(fid_port=port))
    evaluate(config, networks={"fid": NonFiniteFeatures()}, log=lambda m: None)
    stored = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert stored["metrics"]["fid"] is None and "non-finite" in stored["failed"]["fid"]
    assert 0 < stored["metrics"]["ssim"] < 1


def test_frames_are_in_the_order_of_their_names_numbers(frames, tmp_path):
    """``frame_2`` comes before ``frame_10``: sorted as text, the 16-frame windows of the video
    metrics were cut from frames out of time order, and scored without a word."""
    from disco.evaluate.run import list_sequences

    import cv2

    for k, frame in enumerate(frames[:12], start=1):
        cv2.imwrite(str(tmp_path / f"frame_{k}.png"), frame[..., ::-1])
    (tmp_path / "._frame_3.png").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble beside a copied frame: no frame
    listed = list_sequences(tmp_path)["."]
    assert [p.name for p in listed] == [f"frame_{k}.png" for k in range(1, 13)]
    (tmp_path / "videos" / "clip").mkdir(parents=True)
    for k in (10, 9, 1):
        (tmp_path / f"frame_{k}.png").rename(tmp_path / "videos" / "clip" / f"{k}.png")
    (tmp_path / "videos" / "clip" / "._9.png").write_bytes(b"\0\5\26\7")
    assert [p.name for p in list_sequences(tmp_path / "videos")["clip"]] == ["1.png", "9.png", "10.png"]


@pytest.mark.parametrize("make", ["folder", "file-above", "a-real-frame"])
def test_a_report_that_cannot_be_written_is_refused_before_scoring(folders, tmp_path, make, monkeypatch):
    """The report was written after every score was computed (hours with --run): a folder of its
    name, or a file where its folder should be, lost them all to a traceback. A frame of --gt
    given as the report was overwritten by it."""
    import disco.evaluate.run as run

    monkeypatch.setattr(run, "score", lambda *a, **k: pytest.fail("scored before the report's path was checked"))
    if make == "folder":
        output = tmp_path / "report"
        output.mkdir()
        message = "is a folder"
    elif make == "file-above":
        (tmp_path / "plain").write_text("")
        output, message = tmp_path / "plain" / "m.json", "cannot be written"
    else:
        output = sorted((folders / "gt" / "clip_a").glob("*.png"))[0]
        message = f"is a file of the input folder {folders / 'gt'}"
    result = _cli("--pred", folders / "shift", "--gt", folders / "gt", "--metrics", "ssim", "--output", output)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    if make == "a-real-frame":  # a report kept in an input folder (the last run's) is no input: written again
        from disco.pipeline.errors import output_file_problem

        (tmp_path / "pred").mkdir()
        (tmp_path / "pred" / "metrics.json").write_text("{}")
        assert output_file_problem(tmp_path / "pred" / "metrics.json", "--output", (tmp_path / "pred",),
                                   reads=frozenset({".png", ".json"})) is not None  # (were it read)
        from disco.evaluate.config import check_report_path

        check_report_path(tmp_path / "pred" / "metrics.json", (tmp_path / "pred",))  # evaluate's: passes


def test_a_video_cut_short_is_refused_not_scored_on_its_first_frames(tmp_path):
    """A video cut short that decord cannot open is read up to its cut (``cut_video``): scored so,
    a cut real or generated video would have passed for whole on its first frames."""
    from helpers import cut_clip

    whole, cut = cut_clip(tmp_path, decord_opens=False)
    (tmp_path / "cut.mp4").write_bytes(cut)
    result = _cli("--pred", tmp_path / "cut.mp4", "--gt", whole, "--metrics", "psnr", "--output", tmp_path / "o.json")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "cut.mp4: frames" in said and "of the 40 it lists are missing" in said, said
    assert not (tmp_path / "o.json").exists()
