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
- FID: Fréchet distance of Inception pool features over all frames of each set.
- FID-VID and FVD: each video is cut into every window of ``CLIP_LENGTH`` (16) consecutive
  frames, stride 1 (the official GIF clips); the Fréchet distance is over the windows' features.
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


PAIR_METRICS = {"psnr": psnr, "ssim": ssim, "l1": l1}


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W uint8."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()


class Lpips:
    """Mean LPIPS over pairs, with a given LPIPS module (``networks.lpips_vgg``)."""

    def __init__(self, net: nn.Module, batch_size: int = 16, device: str = "cpu"):
        self.net, self.batch_size, self.values, self.device = net.to(device), batch_size, [], device

    @torch.no_grad()
    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        for start in range(0, len(gt), self.batch_size):
            a = to_tensor(pred[start:start + self.batch_size]).to(self.device).float() / 255.0
            b = to_tensor(gt[start:start + self.batch_size]).to(self.device).float() / 255.0
            self.values.extend(self.net(a, b, normalize=True).flatten().double().tolist())

    def compute(self) -> float:
        return float(np.mean(self.values))


class Frechet:
    """A Fréchet distance (torchmetrics' FID, in float64) over the features of any network."""

    def __init__(self, features: nn.Module, input_size: tuple, batch_size: int = 16, device: str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=features.to(device), input_img_size=input_size).to(device)
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
        # The distance is >= 0; identical sets give rounding noise either side of 0.
        return max(0.0, float(self.metric.compute().double()))


def clip_windows(num_frames: int, length: int = CLIP_LENGTH, stride: int = CLIP_STRIDE) -> list[range]:
    """Frame index ranges of every window of ``length`` consecutive frames, ``stride`` apart."""
    return [range(start, start + length) for start in range(0, num_frames - length + 1, stride)]


def clips(frames: np.ndarray, windows: list[range]) -> torch.Tensor:
    """The given windows of one video's N x H x W x 3 uint8 frames -> len(windows) x T x H x W x 3."""
    if not windows:
        return torch.empty((0, 0, *frames.shape[1:]), dtype=torch.uint8)
    return torch.from_numpy(np.stack([frames[w.start:w.stop] for w in windows]))
