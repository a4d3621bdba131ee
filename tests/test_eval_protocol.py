"""`evaluate --protocol disco|ours`: the official DisCo video networks (3D ResNet-50, I3D) from
local files, the legacy LPIPS and PSNR, the official clip rule; networks have random weights
written here (nothing is downloaded)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from typer.testing import CliRunner

from disco.cli import app
from disco.evaluate import metrics as M
from disco.evaluate import networks as N
from disco.evaluate import official_nets as O
from disco.evaluate.config import EvaluateConfig, EvaluateInputError, NetworkConfig
from disco.evaluate import run as R
from disco.evaluate.run import evaluate, score
from disco.generate.video import write_frames
from disco.pipeline.demo_data import pan_zoom_frames, write_video
from test_metrics import TinyFeatures, TinyVideoFeatures, random_inception_state  # the same stand-ins

SIDE = 48  # frame size of the scored sets (the video networks resize to 112 / 224 themselves)
LENGTHS = {"clip_a": 17, "clip_b": 16}  # 33 frames: stride-1 windows 2 + 1


def _vgg16_trunk() -> torch.nn.Sequential:
    """torchvision's VGG-16 ``features`` alone (building the whole VGG-16 spends seconds on its classifier)."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])


def _randomise_norms(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return net


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The files `--weights DIR` needs for LPIPS and the official FID-VID and FVD, random."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in _vgg16_trunk().state_dict().items()}, root / N.VGG16_FILE)
    # The official files' shapes: Hara et al.'s checkpoint is a dict with a DataParallel state_dict
    # (and training state); I3D's is a bare state dict, here without BatchNorm counters as old ones.
    resnet = _randomise_norms(O.ResNet3d50(), 1).state_dict()
    (root / "eval_fvd").mkdir()
    torch.save({"epoch": 200, "arch": "resnet-50", "state_dict": {f"module.{k}": v for k, v in resnet.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]}},
               root / "eval_fvd" / N.VIDEO_NETS["resnet3d50"].filename)  # the official layout
    i3d = _randomise_norms(O.InceptionI3d(), 2).state_dict()
    torch.save({k: v for k, v in i3d.items() if not k.endswith("num_batches_tracked")},
               root / N.VIDEO_NETS["i3d"].filename)
    return root


# -- the official networks ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch, side, dim", [("resnet3d50", 112, 2048), ("i3d", 224, 400)])
def test_the_official_networks_load_strictly_from_local_files(weights, arch, side, dim, tmp_path):
    net = NetworkConfig(weights=weights, fid_vid_arch=arch, fvd_arch=arch).build(["fvd"])["fvd"]
    assert isinstance(net, O.OfficialVideoFeatures) and net.side == side
    clips = torch.from_numpy(np.stack([np.stack(pan_zoom_frames(data.astronaut(), 16, 40))] * 2))
    clips[1] = torch.flip(clips[1], dims=(0,))
    features = net(clips)
    assert features.shape == (2, dim) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    # The file's tensors are the network's (the DataParallel prefix dropped).
    state = N.load_state_dict(N.weight_file(None, weights, N.VIDEO_NETS[arch].filename, "--fvd-net"))
    first = next(iter(net.net.state_dict()))
    assert torch.equal(net.net.state_dict()[first], state.get(first, state.get(f"module.{first}")))
    if arch == "resnet3d50":  # the feature is the last pool over layer4's 1 x 4 x 4 map
        x = net.prepare(clips[0])[None]
        with torch.no_grad():
            r = net.net
            last = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
        assert last.shape == (1, 2048, 1, 4, 4)
        torch.testing.assert_close(features[:1], last.mean((2, 3, 4)))
    # A file that does not fit: one line naming the key.
    own = net.net.state_dict()
    dropped = list(own)[3]
    torch.save({k: v for k, v in own.items() if k != dropped}, tmp_path / "cut.pth")
    with pytest.raises(N.WeightsError) as missing:
        N.load_strict(net.net, tmp_path / "cut.pth", arch)
    assert f"missing key {dropped!r}" in str(missing.value) and "\n" not in str(missing.value)
    torch.save({**own, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(N.WeightsError, match="unexpected key 'extra.weight'"):
        N.load_strict(net.net, tmp_path / "extra.pth", arch)
    torch.save({**own, dropped: torch.zeros(3)}, tmp_path / "shape.pth")
    with pytest.raises(N.WeightsError, match=f"key {dropped!r} has shape"):
        N.load_strict(net.net, tmp_path / "shape.pth", arch)


def test_official_preprocessing():
    frames = np.stack(pan_zoom_frames(data.astronaut(), 3, 64))
    resnet = O.OfficialVideoFeatures(torch.nn.Identity(), 112, "kinetics_mean")
    i3d = O.OfficialVideoFeatures(torch.nn.Identity(), 224, "minus_one_one")
    x, y = resnet.prepare(frames), i3d.prepare(frames)
    assert x.shape == (3, 3, 112, 112) and y.shape == (3, 3, 224, 224)
    # Per-channel float bicubic (PIL, not quantised), then the Kinetics mean off / [-1, 1].
    from PIL import Image

    def plane(channel, side):
        image = Image.fromarray(frames[1][:, :, channel].astype(np.float32), mode="F")
        return torch.from_numpy(np.array(image.resize((side, side), Image.BICUBIC)))

    torch.testing.assert_close(x[0, 1], plane(0, 112) - 114.7748)
    torch.testing.assert_close(x[2, 1], plane(2, 112) - 99.4750)
    torch.testing.assert_close(y[1, 1], plane(1, 224) / 127.5 - 1)  # not clipped: bicubic overshoots a little


# -- the official clip rule --------------------------------------------------------------------------

def test_the_official_clip_rule():
    # Frame files: every window of 16, stride 1, no padding.
    assert M.disco_samples(18, False, "fvd") == [[list(range(s, s + 16))] for s in range(3)]
    assert M.disco_samples(15, False, "fid-vid") == []
    # A video file, FID-VID: 16-frame segments, the last padded with the final frame, averaged.
    assert M.disco_samples(20, True, "fid-vid") == [[list(range(16)), [16, 17, 18, 19] + [19] * 12]]
    assert M.disco_samples(32, True, "fid-vid") == [[list(range(16)), list(range(16, 32))]]
    # A video file, FVD: the whole video, one clip.
    assert M.disco_samples(20, True, "fvd") == [[list(range(20))]]


def test_videos_are_cut_as_the_official_loader_does(tmp_path):
    for side, name in (("pred", "a"), ("gt", "a"), ("pred", "b"), ("gt", "b")):
        n = 20 if name == "a" else 35
        frames = pan_zoom_frames(data.astronaut(), n, 32)
        if side == "pred":
            frames = [np.roll(f, 3, axis=1) for f in frames]
        write_video(tmp_path / side / f"{name}.mp4", frames, 10)
    nets = {"fid-vid": TinyVideoFeatures(), "fvd": TinyVideoFeatures()}
    ours = score(tmp_path / "pred", tmp_path / "gt", ["fid-vid", "fvd"], nets)
    assert ours["counts"]["clips"] == 5 + 20
    disco = score(tmp_path / "pred", tmp_path / "gt", ["fid-vid", "fvd"], nets, protocol="disco")
    # FID-VID: 2 + 3 segments, one averaged sample per video; FVD: one whole-video clip per video.
    assert disco["counts"]["clips"] == {"fid-vid": 2 + 3, "fvd": 2}
    assert disco["counts"]["video_samples"] == {"fid-vid": 2, "fvd": 2}
    assert all(v > 0 for v in disco["metrics"].values())


def test_a_flat_folder_of_the_official_loaders_frames_is_one_sequence_per_clip(tmp_path):
    """The official test loader writes every clip into one folder (TiktokDance_<clip>_<frame>.png)
    and its video metrics window each clip alone: read as one sequence, the folder's windows ran
    from one clip into the next. Frame numbers order a clip's frames, whatever their width."""
    from PIL import Image

    from disco.evaluate.run import list_sequences

    lengths = {"TiktokDance_00001": 17, "TiktokDance_00002": 18}
    for side, shift in (("pred", 3), ("gt", 0)):
        (tmp_path / side).mkdir()
        for clip, n in lengths.items():
            for k, frame in enumerate(pan_zoom_frames(data.astronaut(), n, 32)):
                Image.fromarray(np.roll(frame, shift, axis=1)).save(tmp_path / side / f"{clip}_{k + 1}.png")
    sequences = list_sequences(tmp_path / "gt")
    assert {clip: len(frames) for clip, frames in sequences.items()} == lengths
    assert [p.name for p in sequences["TiktokDance_00001"][8:10]] == ["TiktokDance_00001_9.png", "TiktokDance_00001_10.png"]
    nets = {"fid-vid": TinyVideoFeatures(), "fvd": TinyVideoFeatures()}
    for protocol in ("ours", "disco"):
        counts = score(tmp_path / "pred", tmp_path / "gt", ["fid-vid", "fvd"], nets, protocol=protocol)["counts"]
        assert counts["sequences"] == 2 and counts["frames"] == 35
        clips = (17 - 15) + (18 - 15)  # one folder as one sequence: 35 - 15
        assert counts["clips"] == (clips if protocol == "ours" else {"fid-vid": clips, "fvd": clips}), counts
    # A missing frame number cuts its clip: the official takes a window only where the next 15
    # numbers are all there (frames 1-4 and 6-18 of clip 2: too short for any window).
    for side in ("pred", "gt"):
        (tmp_path / side / "TiktokDance_00002_5.png").unlink()
    sequences = list_sequences(tmp_path / "gt")
    assert {clip: len(frames) for clip, frames in sequences.items()} == {
        "TiktokDance_00001": 17, "TiktokDance_00002": 4, "TiktokDance_00002#2": 13}
    assert sequences["TiktokDance_00002#2"][0].name == "TiktokDance_00002_6.png"
    for protocol in ("ours", "disco"):
        counts = score(tmp_path / "pred", tmp_path / "gt", ["fid-vid", "fvd"], nets, protocol=protocol)["counts"]
        assert counts["sequences"] == 3 and counts["frames"] == 34
        assert counts["clips"] == (2 if protocol == "ours" else {"fid-vid": 2, "fvd": 2}), counts
    # A frame missing on one side is named (its clip is cut at another gap there).
    (tmp_path / "pred" / "TiktokDance_00001_9.png").unlink()
    with pytest.raises(EvaluateInputError, match=r"1 only on one side \(e.g. \['TiktokDance_00001_9'\]\)"):
        score(tmp_path / "pred", tmp_path / "gt", ["psnr"], {})
    # Two frames of one number are refused, not read as a gap.
    shutil.copy(tmp_path / "gt" / "TiktokDance_00001_3.png", tmp_path / "gt" / "TiktokDance_00001_03.png")
    with pytest.raises(EvaluateInputError, match="two frames of TiktokDance_00001 have the number 3"):
        list_sequences(tmp_path / "gt")
    (tmp_path / "gt" / "TiktokDance_00001_03.png").unlink()
    # Any other name keeps the folder one sequence.
    (tmp_path / "gt" / "TiktokDance_00002_18.png").rename(tmp_path / "gt" / "extra.png")
    assert list(list_sequences(tmp_path / "gt")) == ["."]


def test_the_numpy_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(1.0, 1.0, size=(60, 4))
    assert M.frechet_distance_numpy(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, shifted mean: the distance is |mu1 - mu2|^2.
    assert M.frechet_distance_numpy(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)
    assert M.frechet_distance_numpy(a, b) > 1


# -- FID as the official script computes it (gen_eval.sh: python -m pytorch_fid) ----------------------

@pytest.fixture(scope="module")
def inception_state(tmp_path_factory) -> tuple[Path, dict]:
    """The FID Inception's weights (``random_inception_state``), written under pytorch-fid's file name."""
    state = random_inception_state(3)
    folder = tmp_path_factory.mktemp("inception")
    torch.save(state, folder / N.PYTORCH_FID_INCEPTION_FILE)
    return folder, state


def _pytorch_fid_inception(state: dict, dims: int = 2048):
    """pytorch-fid's own network, its download replaced by ``state``."""
    from unittest import mock

    import pytorch_fid.inception as P

    with mock.patch.object(P, "load_state_dict_from_url", lambda *a, **k: state):
        return P.InceptionV3([P.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()


def test_the_official_fid_features_are_pytorch_fids(inception_state, sets, monkeypatch):
    """``--protocol disco`` feeds the FID Inception (found under pytorch-fid's file name) as
    pytorch-fid does: its features equal pytorch-fid's own network's on the same weights, on real
    photos of other sizes (resized to 299 inside); torch-fidelity's input (``--protocol ours``)
    gives others."""
    folder, state = inception_state
    config = EvaluateConfig(output=folder / "r.json", pred=folder, gt=folder, metrics=["fid"], protocol="disco",
                            networks=NetworkConfig(weights=folder)).validate()
    assert config.networks.fid_port == "pytorch-fid"
    tf_port = config.networks.build(["fid"])["fid"]  # the Inception; score() feeds it by the port
    fed = []
    monkeypatch.setattr(M.NumpyFrechet, "compute", lambda self: fed.append(self.net) or 1.0)
    score(sets / "pred", sets / "gt", ["fid"], {"fid": tf_port}, protocol="disco", fid_port="pytorch-fid")
    ours = fed[0]
    assert isinstance(ours, O.OfficialFidFeatures) and ours.inception is tf_port
    theirs = _pytorch_fid_inception(state)
    for photo in (data.astronaut()[:320, 60:380], data.coffee()):  # 320 x 320 and 400 x 600
        images = torch.from_numpy(np.stack([photo, photo[::-1].copy()])).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            expected = theirs(images.float() / 255)[0].flatten(1)  # torchvision's ToTensor: / 255
            got, other = ours(images), tf_port(images).reshape(2, -1)
        assert got.shape == (2, 2048)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (other - expected).abs().max() > 1e-3 * expected.abs().max()


def test_the_disco_protocols_fid_is_what_python_m_pytorch_fid_prints(sets, inception_state, tmp_path):
    """``evaluate --protocol disco`` on the frame folders against pytorch-fid's own
    ``calculate_fid_given_paths`` (what ``python -m pytorch_fid pred gt`` prints) on the same PNG
    files and weights. pytorch-fid's 64-d features keep scipy's ``sqrtm`` fast (2048-d: 18 s a
    distance on 2 cores); the 2048-d features are equal in the test above."""
    from unittest import mock

    import pytorch_fid.fid_score as fid_score
    import pytorch_fid.inception as P

    folder, state = inception_state
    config = EvaluateConfig(output=tmp_path / "disco.json", pred=sets / "pred", gt=sets / "gt", metrics=["fid"],
                            networks=NetworkConfig(weights=folder), batch_size=5, protocol="disco")
    net = O.OfficialFidFeatures(N.inception(folder / N.PYTORCH_FID_INCEPTION_FILE), dims=64)
    report = evaluate(config, networks={"fid": net}, log=lambda m: None)
    assert report["counts"]["frames"] == 33 and "pytorch-fid" in report["settings"]["conventions"]["fid"]
    flat = {}
    for side in ("pred", "gt"):  # pytorch-fid reads one flat folder of images per set
        flat[side] = tmp_path / f"flat_{side}"
        flat[side].mkdir()
        for clip in LENGTHS:
            for frame in (sets / side / clip).glob("*.png"):
                (flat[side] / f"{clip}_{frame.name}").symlink_to(frame)
    with mock.patch.object(P, "load_state_dict_from_url", lambda *a, **k: state):
        official = fid_score.calculate_fid_given_paths([str(flat["pred"]), str(flat["gt"])], batch_size=50,
                                                       device="cpu", dims=64, num_workers=0)
    assert official > 1e-3  # shifted, noised frames
    # Batches of 5 against pytorch-fid's 50: a CPU's convolution kernels may round features
    # otherwise per batch size (and the distance is a difference of near-equal terms); another
    # convention (resize, weights, layer) moves it by percents.
    assert report["metrics"]["fid"] == pytest.approx(official, rel=1e-4)


def test_a_long_sequence_of_frame_files_is_read_part_by_part_and_scores_the_same(tmp_path, monkeypatch):
    """A flat folder of 41 frames (one sequence): read 6 frames at a time (and the 15 after them
    that the 16-frame windows starting among them need), never more; every metric under both
    protocols equals the whole sequence read at once, clips and samples counted the same."""
    rng = np.random.default_rng(3)
    gt = np.stack(pan_zoom_frames(data.astronaut(), 41, 32))
    pred = np.clip(gt.astype(int) + rng.integers(-30, 31, gt.shape), 0, 255).astype(np.uint8)
    write_frames(tmp_path / "gt", gt)
    write_frames(tmp_path / "pred", pred)
    metrics = ["ssim", "psnr", "l1", "fid", "fid-vid", "fvd"]
    reads = []
    read_sequence = R.read_sequence

    def recording(item):
        reads.append(len(item))
        return read_sequence(item)

    monkeypatch.setattr(R, "read_sequence", recording)
    for protocol, port in (("ours", "torch-fidelity"), ("disco", "pytorch-fid")):
        results = {}
        for chunk in (6, 10_000):
            monkeypatch.setattr(R, "CHUNK_FRAMES", chunk)
            reads.clear()
            nets = {"fid": TinyFeatures(), "fid-vid": TinyVideoFeatures(), "fvd": TinyVideoFeatures()}
            results[chunk] = score(tmp_path / "pred", tmp_path / "gt", metrics, nets, batch_size=4,
                                   protocol=protocol, fid_port=port)
            assert max(reads) == (6 + 15 if chunk == 6 else 41)
        parts, whole = results[6], results[10_000]
        assert parts["counts"] == whole["counts"] and whole["counts"]["frames"] == 41
        clips = whole["counts"]["clips"]
        assert clips == (26 if protocol == "ours" else {"fid-vid": 26, "fvd": 26})  # windows 0..25
        for metric in metrics:
            # (batches cut otherwise by the parts: rounding may differ with the CPU's kernels)
            assert parts["metrics"][metric] == pytest.approx(whole["metrics"][metric], rel=1e-5), (protocol, metric)
    # A frame of another size in a later part is refused as in one read.
    odd = np.ascontiguousarray(pred[30, :24, :24])
    write_frames(tmp_path / "odd", odd[None])[0].rename(tmp_path / "pred" / "000030.png")
    monkeypatch.setattr(R, "CHUNK_FRAMES", 6)
    with pytest.raises(EvaluateInputError, match="pred differ in size"):
        score(tmp_path / "pred", tmp_path / "gt", ["psnr"], {})


def test_a_long_video_file_is_decoded_once_part_by_part_and_scores_the_same(tmp_path, monkeypatch):
    """A video file was read whole (a 10-minute 1080p one: 112 GB): it is decoded part by part
    from one reader, each frame once, and scores exactly as read whole; a part of large frames
    holds fewer of them."""
    import disco.pipeline.decode as decode

    rng = np.random.default_rng(5)
    gt = np.stack(pan_zoom_frames(data.astronaut(), 41, 64))
    write_video(tmp_path / "gt.mp4", gt, 10)
    pred = np.clip(R.read_sequence(tmp_path / "gt.mp4").astype(int) + rng.integers(-30, 31, gt.shape), 0, 255)
    write_frames(tmp_path / "pred", pred.astype(np.uint8))
    metrics = ["ssim", "psnr", "l1", "fid", "fid-vid", "fvd"]
    decoded, opened = [], []
    real_decode, real_open = decode.decode_video_frames, decode._open_video
    monkeypatch.setattr(decode, "decode_video_frames", lambda path, indices, *a: (decoded.append(list(indices)),
                                                                                   real_decode(path, indices, *a))[1])
    monkeypatch.setattr(decode, "_open_video", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    results = {}
    for chunk in (6, 10_000):
        monkeypatch.setattr(R, "CHUNK_FRAMES", chunk)
        decoded.clear(), opened.clear()
        nets = {"fid": TinyFeatures(), "fid-vid": TinyVideoFeatures(), "fvd": TinyVideoFeatures()}
        results[chunk] = score(tmp_path / "pred", tmp_path / "gt.mp4", metrics, nets, batch_size=4)
        assert sum(decoded, []) == list(range(41)) and len(opened) == 2  # each frame once; the probe and one reader
        assert max(map(len, decoded)) == (6 + 15 if chunk == 6 else 41)
    assert results[6]["counts"] == results[10_000]["counts"]
    assert {k: results[6]["counts"][k] for k in ("sequences", "frames", "clips")} == {"sequences": 1, "frames": 41, "clips": 26}
    for metric in metrics:
        assert results[6]["metrics"][metric] == pytest.approx(results[10_000]["metrics"][metric], rel=1e-6), metric
    # A part holds CHUNK_PIXELS' worth of frames (512 frames of 512 px): here 4 frames of 64 px.
    monkeypatch.setattr(R, "CHUNK_PIXELS", 64 * 64 * 4)
    decoded.clear()
    score(tmp_path / "pred", tmp_path / "gt.mp4", ["psnr"], {})
    assert max(map(len, decoded)) == 4 + 15
    # Parts are sized by the larger side's frames (the predictions here, at 128 px: one frame's own).
    for path in sorted((tmp_path / "pred").glob("*.png")):
        write_frames(tmp_path / "big", np.kron(R.read_sequence([path]), np.ones((1, 2, 2, 1), np.uint8)))[0].replace(path)
    decoded.clear()
    score(tmp_path / "pred", tmp_path / "gt.mp4", ["psnr"], {})
    assert max(map(len, decoded)) == 1 + 15
    # A pair of other lengths is refused before anything is scored.
    (tmp_path / "pred" / "000040.png").unlink()
    with pytest.raises(EvaluateInputError, match="40 predicted frames but 41 real ones"):
        score(tmp_path / "pred", tmp_path / "gt.mp4", ["psnr"], {})


# -- both protocols through the command line ------------------------------------------------------------

@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    """Deterministic frames: the astronaut panned (gt) and the same shifted and noised (pred)."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(7)
    for name, n in LENGTHS.items():
        gt = np.stack(pan_zoom_frames(data.astronaut(), n, SIDE))
        noise = rng.integers(-40, 41, gt.shape)
        pred = np.clip(np.roll(gt, 2, axis=2).astype(int) + noise, 0, 255).astype(np.uint8)
        write_frames(root / "gt" / name, gt)
        write_frames(root / "pred" / name, pred)
    return root


def _pairs(root: Path):
    from PIL import Image

    for name in sorted(LENGTHS):
        for p in sorted((root / "pred" / name).glob("*.png")):
            yield np.array(Image.open(p).convert("RGB")), np.array(Image.open(root / "gt" / name / p.name).convert("RGB"))


def _lpips_by_hand(root: Path, vgg_file: Path) -> dict[str, float]:
    """LPIPS (VGG, v0.1) written out: the VGG-16 trunk from the file, the linear layers from
    torchmetrics' packaged weights; images in [-1, 1] ("ours") or in [0, 1] passed as is ("disco")."""
    import torchmetrics

    trunk = _vgg16_trunk().eval()
    trunk.load_state_dict({k[len("features."):]: v for k, v in torch.load(vgg_file, weights_only=True).items()})
    lins = torch.load(Path(torchmetrics.__file__).parent / "functional/image/lpips_models/vgg.pth",
                      map_location="cpu", weights_only=True)
    weights = [lins[f"lin{i}.model.1.weight"] for i in range(5)]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    cuts = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def features(images, legacy):
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        x = x if legacy else 2 * x - 1
        x, out, start = (x - shift) / scale, [], 0
        for stop in cuts:
            x = trunk[start:stop](x)
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            start = stop
        return out

    preds, gts = zip(*_pairs(root))
    values = {}
    with torch.no_grad():
        for protocol, legacy in (("ours", False), ("disco", True)):
            fa, fb = features(preds, legacy), features(gts, legacy)
            per_pair = sum(torch.nn.functional.conv2d((a - b) ** 2, w).mean((1, 2, 3)).double()
                           for a, b, w in zip(fa, fb, weights))
            values[protocol] = float(per_pair.mean())
    return values


def _psnr_by_hand(root: Path, legacy: bool) -> float:
    values = []
    for pred, gt in _pairs(root):
        if legacy:  # uint8 arithmetic, wrapping: what the official script computed
            squared = ((pred.astype(np.int64) - gt) % 256) ** 2 % 256
        else:
            squared = (pred.astype(np.float64) - gt) ** 2
        values.append(20 * math.log10(255 / math.sqrt(squared.mean())))
    return float(np.mean(values))


@pytest.fixture(scope="module")
def reports(sets, weights, tmp_path_factory):
    """Both protocols through ``evaluate`` (the command's code path): LPIPS from the VGG file in
    ``weights``; small random video networks stand in for the 2048-d ones, whose Fréchet distance
    (scipy's sqrtm of a 2048 x 2048 matrix, as the official script) takes a minute on 2 cores."""
    out = tmp_path_factory.mktemp("reports")
    lpips = N.lpips_vgg(weights / N.VGG16_FILE)
    reports = {}
    for protocol in ("ours", "disco"):
        config = EvaluateConfig(output=out / f"{protocol}.json", pred=sets / "pred", gt=sets / "gt",
                                metrics=["ssim", "psnr", "lpips", "l1", "fid-vid", "fvd"],
                                networks=NetworkConfig(weights=weights), batch_size=4, protocol=protocol)
        nets = {"lpips": lpips, "fid-vid": TinyVideoFeatures(), "fvd": TinyVideoFeatures()}
        evaluate(config, networks=nets, log=lambda m: None)
        reports[protocol] = json.loads((out / f"{protocol}.json").read_text())
    return reports


def test_both_protocols_score_the_same_frames(reports, sets, weights):
    ours, disco = reports["ours"], reports["disco"]
    # The clip rule: 17 and 16 frame files give 2 + 1 stride-1 windows under both protocols.
    assert {k: ours["counts"][k] for k in ("sequences", "frames", "clips")} == {"sequences": 2, "frames": 33, "clips": 3}
    assert sum(ours["counts"]["frame_sizes"].values()) == 33 and ours["counts"]["frame_sizes"] == disco["counts"]["frame_sizes"]
    assert disco["counts"]["clips"] == {"fid-vid": 3, "fvd": 3}
    assert disco["counts"]["video_samples"] == {"fid-vid": 3, "fvd": 3}
    a, b = ours["metrics"], disco["metrics"]
    # LPIPS: each protocol's figure is LPIPS computed by hand with its input range; they differ.
    by_hand = _lpips_by_hand(sets, weights / N.VGG16_FILE)
    assert a["lpips"] == pytest.approx(by_hand["ours"], rel=1e-4)
    assert b["lpips"] == pytest.approx(by_hand["disco"], rel=1e-4)
    assert abs(a["lpips"] - b["lpips"]) > 1e-3
    # PSNR: float64 (ours) vs the official uint8 wraparound; the noise has negative differences.
    assert a["psnr"] == pytest.approx(_psnr_by_hand(sets, legacy=False), rel=1e-9)
    assert b["psnr"] == pytest.approx(_psnr_by_hand(sets, legacy=True), rel=1e-9)
    assert abs(b["psnr"] - a["psnr"]) > 1
    # SSIM and L1 are computed the same way by both; so are the windows of frame files (the
    # Fréchet distance in float64 either way: torchmetrics for ours, numpy / scipy for disco).
    assert a["ssim"] == b["ssim"] and a["l1"] == b["l1"]
    assert b["fvd"] == pytest.approx(a["fvd"], rel=1e-3, abs=1e-6)


def test_the_report_names_the_protocol_and_the_networks(reports, weights):
    ours, disco = reports["ours"], reports["disco"]
    assert ours["settings"]["protocol"] == "ours" and disco["settings"]["protocol"] == "disco"
    assert disco["settings"]["lpips_legacy"] is True and ours["settings"]["lpips_legacy"] is False
    assert disco["settings"]["psnr_legacy"] is True and ours["settings"]["psnr_legacy"] is False
    assert disco["settings"]["conventions"]["protocol"].startswith("disco")
    assert "[0, 1]" in disco["settings"]["conventions"]["lpips"]
    nets = disco["settings"]["networks"]
    assert nets["fid-vid"]["network"].startswith("resnet3d50: 3D ResNet-50 (Hara et al.")
    assert nets["fid-vid"]["file"] == str(weights / "eval_fvd" / "resnet-50-kinetics.pth")
    assert nets["fvd"]["network"].startswith("i3d: I3D") and nets["fvd"]["file"].endswith("i3d_pretrained_400.pt")
    assert ours["settings"]["networks"]["fvd"]["network"].startswith("s3d")
    assert ours["settings"]["networks"]["fid-vid"]["network"].startswith("r3d_18")


def test_the_command_line_runs_the_official_i3d_and_prints_the_protocol(sets, weights, tmp_path):
    clip = Path("pred") / "clip_a"  # one sequence, 17 frames: 2 windows per set
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(sets / "pred" / "clip_a"), "--gt",
                                      str(sets / "gt" / "clip_a"), "--weights", str(weights), "--protocol", "disco",
                                      "--metrics", "psnr,fvd", "--output", str(tmp_path / "disco.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "disco.json").read_text())
    assert report["settings"]["networks"]["fvd"]["network"].startswith("i3d") and clip.name in report["pred"]
    assert report["counts"]["clips"] == {"fvd": 2} and np.isfinite(report["metrics"]["fvd"])
    assert "--protocol disco" in result.output and "I3D" in result.output and "wrapping" in result.output


def test_single_switches_override_the_protocol(tmp_path):
    config = EvaluateConfig(output=tmp_path / "o.json", pred=tmp_path, gt=tmp_path, protocol="disco",
                            lpips_legacy=False, networks=NetworkConfig(fvd_arch="s3d")).validate()
    assert (config.lpips_legacy, config.psnr_legacy) == (False, True)
    assert (config.networks.fid_vid_arch, config.networks.fvd_arch) == ("resnet3d50", "s3d")
    config = EvaluateConfig(output=tmp_path / "o.json", pred=tmp_path, gt=tmp_path, psnr_legacy=True).validate()
    assert (config.lpips_legacy, config.psnr_legacy) == (False, True)
    assert (config.networks.fid_vid_arch, config.networks.fvd_arch) == ("r3d_18", "s3d")


def test_a_wrong_official_file_is_one_line(sets, weights, tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(sets / "pred"), "--gt", str(sets / "gt"),
                                      "--protocol", "disco", "--metrics", "fid-vid", "--fid-vid-net",
                                      str(tmp_path / "bad.pth"), "--output", str(tmp_path / "o.json")])
    assert result.exit_code == 2, result.output
    assert "bad.pth does not fit the 3D ResNet-50" in result.output
    assert "key 'conv1.weight' has shape" in result.output or "missing key" in result.output
    assert len(result.output.strip().splitlines()) == 1
