"""The paper's metrics on uint8 RGB frames (DESIGN.md, "Evaluation").

Conventions, checked against the official DisCo evaluation scripts and stated here once:

- Frame metrics are computed per (prediction, ground truth) pair and averaged over pairs; a
  prediction of another size is resized to the ground truth's size first (as the official script does).
- PSNR: 20 log10(255 / sqrt(MSE)) with the MSE in float64 (the official script subtracted uint8
  arrays, which wrap around); a pair with MSE 0 scores ``PSNR_CAP`` (100 dB, the official value).
- SSIM: scikit-image's ``structural_similarity`` on the grayscale frames (OpenCV's RGB -> gray),
  its defaults (7 x 7 uniform window, data range 255).
- L1: the official script divides the absolute difference of the 0..255 frames by H x W and then
  averages over pixels and channels, so ``L1 = mean(|pred - gt|) / (H * W)`` with pixel values
  0..255. That is why the paper's L1 is ~3.78e-4: at 256 x 256 it is a mean absolute error of
  about 24.8 grey levels.
- LPIPS: VGG, inputs scaled to [-1, 1] as LPIPS expects (the official script fed [0, 1]).
- FID: Fréchet distance of Inception pool features over all frames of each set (torch-fidelity's
  port of the FID Inception, its TF1-style resize to 299 and ``(x - 128) / 128``; torchmetrics, float64).
- FID-VID and FVD: each video is cut into every window of ``CLIP_LENGTH`` (16) consecutive
  frames, stride 1 (the official GIF clips); the Fréchet distance is over the windows' features.

``--protocol disco`` (``disco_samples``, ``psnr_legacy``, ``Lpips(legacy=True)``, ``NumpyFrechet``,
``FeatureFrechet``) reproduces the official scripts (``gen_eval.sh`` and tool/metrics/ in the DisCo
repository) instead:

- FID as ``python -m pytorch_fid`` computes it: the same Inception weights, frames in [0, 1]
  resized by PyTorch's bilinear and scaled to [-1, 1] (``official_nets.OfficialFidFeatures``).
- PSNR of uint8 frames subtracted and squared as uint8 (both wrap modulo 256), as in the script the
  paper's numbers came from (its first release; fixed later upstream).
- LPIPS fed images in [0, 1] where LPIPS expects [-1, 1].
- Video clips by input kind, as the official loaders: a sequence of frame files gives every window
  of 16 consecutive frames, stride 1, a window running past the last frame dropped (FID-VID and
  FVD alike; the image model's ``gen_eval.sh``, the paper's table). A video file gives one sample
  per video: for FID-VID its frames cut into consecutive 16-frame segments, the last one padded by
  repeating the final frame, the segments' features averaged; for FVD the whole video as one I3D
  clip (the temporal model's ``gen_eval_tm.sh``).
- Fréchet distance in numpy / scipy (``np.cov``, ``scipy.linalg.sqrtm``, 1e-6 on the diagonal if
  the product is singular), as the official ``frechet_distance``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import nn

PSNR_CAP = 100.0
CLIP_LENGTH = 16
CLIP_STRIDE = 1


def match_size(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    if pred.shape[:2] == gt.shape[:2]:
        return pred
    return cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    mse = np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2)
    if mse == 0:
        return PSNR_CAP
    return float(20 * math.log10(255.0 / math.sqrt(mse)))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    a, b = cv2.cvtColor(pred, cv2.COLOR_RGB2GRAY), cv2.cvtColor(gt, cv2.COLOR_RGB2GRAY)
    return float(structural_similarity(a, b, data_range=255))


def l1(pred: np.ndarray, gt: np.ndarray) -> float:
    """The paper's L1 (see the module docstring): mean absolute error of 0..255 values / (H * W)."""
    height, width = gt.shape[:2]
    return float(np.mean(np.abs(pred.astype(np.float64) - gt.astype(np.float64))) / (height * width))


def psnr_legacy(pred: np.ndarray, gt: np.ndarray) -> float:
    """The official script's first PSNR: uint8 frames subtracted and squared in uint8 (wrapping
    modulo 256), then averaged (``--protocol disco``; reproduces the paper's figures, not a PSNR)."""
    a, b = np.asarray(pred, np.uint8), np.asarray(gt, np.uint8)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return PSNR_CAP
    return float(20 * math.log10(255.0 / math.sqrt(mse)))


PAIR_METRICS = {"psnr": psnr, "ssim": ssim, "l1": l1}
LEGACY_PAIR_METRICS = {"psnr": psnr_legacy, "ssim": ssim, "l1": l1}


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W uint8."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()


class Lpips:
    """Mean LPIPS over pairs, with a given LPIPS module (``networks.lpips_vgg``)."""

    def __init__(self, net: nn.Module, batch_size: int = 16, device: str = "cpu", legacy: bool = False):
        self.net, self.batch_size, self.values, self.device = net.to(device), batch_size, [], device
        self.legacy = legacy  # the official script: images in [0, 1] passed as if they were [-1, 1]

    @torch.no_grad()
    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        for start in range(0, len(gt), self.batch_size):
            a = to_tensor(pred[start:start + self.batch_size]).to(self.device).float() / 255.0
            b = to_tensor(gt[start:start + self.batch_size]).to(self.device).float() / 255.0
            self.values.extend(self.net(a, b, normalize=not self.legacy).flatten().double().tolist())

    def compute(self) -> float:
        return float(np.mean(self.values))


class Frechet:
    """A Fréchet distance (torchmetrics' FID, in float64) over the features of any network."""

    def __init__(self, features: nn.Module, input_size: tuple, batch_size: int = 16, device: str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        # torchmetrics sizes a network that has no ``num_features`` with one forward of a dummy made
        # on the CPU: build the metric around the network on the CPU, then move both (on a GPU,
        # the network moved first failed there, before a single frame was scored).
        self.metric = FrechetInceptionDistance(feature=features.cpu(), input_img_size=input_size).to(device)
        self.batch_size, self.device = batch_size, device
        self.counts = {True: 0, False: 0}

    @torch.no_grad()
    def update(self, items: torch.Tensor, real: bool) -> None:
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            self.metric.update(chunk.to(self.device), real=real)
            self.counts[real] += len(chunk)

    def compute(self) -> float:
        if min(self.counts.values()) < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {self.counts[False]} "
                             f"predicted and {self.counts[True]} real")
        # Non-finite sums go no further: LAPACK's eigenvalue routine, given NaN, can end the whole
        # process with a segmentation fault (torch 2.14's eigvals on some CPUs), every score lost.
        if not all(torch.isfinite(state).all() for state in self.metric.metric_state.values()
                   if torch.is_floating_point(state)):
            finite_distance(math.nan)
        # The distance is >= 0; identical sets give rounding noise either side of 0.
        return max(0.0, finite_distance(float(self.metric.compute().double())))


def clip_windows(num_frames: int, length: int = CLIP_LENGTH, stride: int = CLIP_STRIDE) -> list[range]:
    """Frame index ranges of every window of ``length`` consecutive frames, ``stride`` apart."""
    return [range(start, start + length) for start in range(0, num_frames - length + 1, stride)]


def clips(frames: np.ndarray, windows: list[range]) -> torch.Tensor:
    """The given windows of one video's N x H x W x 3 uint8 frames -> len(windows) x T x H x W x 3."""
    if not windows:
        return torch.empty((0, 0, *frames.shape[1:]), dtype=torch.uint8)
    return torch.from_numpy(np.stack([frames[w.start:w.stop] for w in windows]))


# -- --protocol disco: the official clips and Fréchet distance ------------------------------------

def disco_samples(num_frames: int, from_video_file: bool, metric: str, length: int = CLIP_LENGTH) -> list[list[list[int]]]:
    """The official cutting of one sequence: a list of samples (one feature each), each a list of
    clips (their features averaged), each a list of frame indices (see the module docstring)."""
    if num_frames < 1:
        return []
    if not from_video_file:  # frame files: every window of ``length``, stride 1, no padding
        return [[list(range(start, start + length))] for start in range(0, num_frames - length + 1)]
    if metric == "fvd":  # the whole video, one clip of any length
        return [[list(range(num_frames))]]
    segments = math.ceil(num_frames / length)
    indices = list(range(num_frames)) + [num_frames - 1] * (segments * length - num_frames)
    return [[indices[k * length:(k + 1) * length] for k in range(segments)]]


def frechet_distance_numpy(feats1: np.ndarray, feats2: np.ndarray, eps: float = 1e-6) -> float:
    """The Fréchet distance between two feature sets as the official script computes it."""
    import warnings

    from scipy import linalg

    def sqrtm(matrix):
        with warnings.catch_warnings():  # a singular product (fewer samples than dimensions) warns
            warnings.simplefilter("ignore")
            try:
                return linalg.sqrtm(matrix, disp=False)[0]  # the official call
            except TypeError:  # SciPy >= 1.18 dropped ``disp``; the matrix is the same
                return linalg.sqrtm(matrix)

    mu1, mu2 = np.mean(feats1, axis=0), np.mean(feats2, axis=0)
    sigma1, sigma2 = np.atleast_2d(np.cov(feats1, rowvar=False)), np.atleast_2d(np.cov(feats2, rowvar=False))
    diff = mu1 - mu2
    covmean = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the Fréchet distance has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def finite_distance(value: float) -> float:
    """A Fréchet distance, or a ValueError (a null score with its reason in the report) where it is
    NaN or infinite: non-finite features, from frames or a network's weights. ``max(0, nan)`` is 0,
    which reported a perfect score."""
    if not math.isfinite(value):
        raise ValueError(f"the Fréchet distance came out {value} (non-finite features: check the frames and the "
                         "feature network's weights file)")
    return value


class NumpyFrechet:
    """A Fréchet distance as the official scripts compute it: each sample's feature kept in float64,
    the distance in numpy / scipy (``frechet_distance_numpy``). ``update`` takes uint8 images
    N x 3 x H x W (``--protocol disco``'s FID: pytorch-fid's features, ``official_nets.OfficialFidFeatures``)."""

    def __init__(self, net: nn.Module, batch_size: int = 16, device: str = "cpu"):
        self.net, self.batch_size, self.device = net.to(device), batch_size, device
        self.features = {True: [], False: []}

    @torch.no_grad()
    def update(self, items: torch.Tensor, real: bool) -> None:
        for start in range(0, len(items), self.batch_size):
            feats = self.net(items[start:start + self.batch_size].to(self.device))
            self.features[real].extend(feats.reshape(len(feats), -1).double().cpu().numpy())

    def compute(self) -> float:
        counts = {real: len(f) for real, f in self.features.items()}
        if min(counts.values()) < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {counts[False]} "
                             f"predicted and {counts[True]} real")
        pred, real = np.stack(self.features[False]), np.stack(self.features[True])
        if not (np.isfinite(pred).all() and np.isfinite(real).all()):
            finite_distance(math.nan)  # (scipy's sqrtm fails on them with an "internal error")
        return finite_distance(frechet_distance_numpy(pred, real))


class FeatureFrechet(NumpyFrechet):
    """A video Fréchet distance under the official clip rule (``disco_samples``): features per clip,
    averaged per sample, distance in numpy. Networks with ``prepare``/``embed``
    (``official_nets.OfficialVideoFeatures``) resize each frame once per sequence; others get
    uint8 clips N x T x H x W x 3."""

    def __init__(self, net: nn.Module, metric: str, batch_size: int = 16, device: str = "cpu"):
        super().__init__(net, batch_size, device)
        self.metric = metric
        self.clips = {True: 0, False: 0}

    @torch.no_grad()
    def _embed(self, frames: np.ndarray, clips: list[list[int]]) -> np.ndarray:
        prepared = self.net.prepare(frames) if hasattr(self.net, "prepare") else None
        out = []
        for start in range(0, len(clips), self.batch_size):
            chunk = clips[start:start + self.batch_size]
            if len({len(c) for c in chunk}) > 1:  # clips of different lengths go one by one
                out.extend(self._embed(frames, [c]) for c in chunk)
                continue
            if prepared is not None:
                batch = torch.stack([prepared[:, c] for c in chunk])
                out.append(self.net.embed(batch).double().cpu().numpy())
            else:
                batch = torch.from_numpy(np.stack([frames[c] for c in chunk]))
                device = next(self.net.parameters()).device
                out.append(self.net(batch.to(device)).double().cpu().numpy().reshape(len(chunk), -1))
        return np.concatenate(out) if out else np.zeros((0, 0))

    def update(self, frames: np.ndarray, from_video_file: bool, real: bool) -> int:
        """Adds one sequence's samples (or one part's: ``run.sequence_parts``); returns how many."""
        samples = disco_samples(len(frames), from_video_file, self.metric)
        clips = [clip for sample in samples for clip in sample]
        if not clips:
            return 0
        feats = self._embed(frames, clips)
        k = 0
        for sample in samples:
            self.features[real].append(feats[k:k + len(sample)].mean(0))
            k += len(sample)
        self.clips[real] += len(clips)
        return len(samples)
