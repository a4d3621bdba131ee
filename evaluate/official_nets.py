"""The networks of the official DisCo evaluation, built from their published structure.

- FID: the official script runs ``python -m pytorch_fid`` (pytorch-fid) on the frame folders: the
  FID Inception (the TF 2015-12-05 graph) fed frames as floats in [0, 1] resized to 299 x 299 by
  PyTorch's bilinear (``align_corners=False``, no antialiasing) and scaled to [-1, 1]; the feature
  is pool3, 2048-d (``OfficialFidFeatures``). The network is the same one torch-fidelity ports
  (``networks.inception``); only the resize and the scaling differ (torch-fidelity's: TF1's
  bilinear, ``(x - 128) / 128``).

- FID-VID: the 3D ResNet-50 of Hara et al. ("Can spatiotemporal 3D CNNs retrace the history of 2D
  CNNs and ImageNet?", CVPR 2018), trained on Kinetics-400; file ``resnet-50-kinetics.pth``.
  Clips of 16 frames at 112 x 112, pixel values 0..255 minus the Kinetics mean (114.7748,
  107.7354, 99.4750) (no division); the feature is the 2048-d output of the last average pool
  (the classifier is kept, so a checkpoint loads strictly, and not used).
- FVD: I3D (Inception-v1 inflated to 3D, Carreira and Zisserman, CVPR 2017), Kinetics-400, in the
  PyTorch port's layout (``InceptionI3d``); file ``i3d_pretrained_400.pt``. Frames at 224 x 224
  scaled to [-1, 1]; the feature is the 400 class logits averaged over time (the layer the
  official script takes).

Both resize frames as the official script does: each channel separately as a float image, with
PIL's bicubic filter, not quantised afterwards. The module and parameter names follow the
published checkpoints so that their keys load as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

RESNET_MEAN = (114.7748, 107.7354, 99.4750)  # Kinetics RGB mean on the 0..255 scale (Hara et al.)


def resize_float_bicubic(frame: np.ndarray, side: int) -> np.ndarray:
    """H x W x 3 (any dtype) -> side x side x 3 float32: PIL bicubic on each channel as an 'F' image."""
    planes = [np.asarray(Image.fromarray(frame[:, :, c].astype(np.float32), mode="F")
                         .resize((side, side), resample=Image.BICUBIC)) for c in range(3)]
    return np.stack(planes, axis=2).astype(np.float32)


# -- 3D ResNet-50 (Hara et al.) -------------------------------------------------------------------

class _Bottleneck3d(nn.Module):
    """1x1x1 reduce, 3x3x3 (carrying the stride), 1x1x1 expand by 4; shortcut B (conv + BN) when
    the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv3d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv3d(in_planes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(out))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet3d50(nn.Module):
    """3D ResNet-50, blocks 3-4-6-3, as trained by Hara et al.; ``forward`` returns the pooled features."""

    def __init__(self, num_classes: int = 400, sample_size: int = 112, sample_duration: int = 16):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, 7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        planes_in = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck3d(planes_in, planes, stride if b == 0 else 1))
                planes_in = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        # A fixed pool over the last map, sized for the training clips (16 x 112 x 112 -> 1 x 4 x 4).
        self.avgpool = nn.AvgPool3d((math.ceil(sample_duration / 16), math.ceil(sample_size / 32),
                                     math.ceil(sample_size / 32)), stride=1)
        self.fc = nn.Linear(2048, num_classes)  # in the checkpoint; not used for the features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


# -- I3D (Inception-v1 inflated) --------------------------------------------------------------------

def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one dimension: (before, after), the extra one after."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    t, h, w = x.shape[2:]
    (t0, t1), (h0, h1), (w0, w1) = (_same_padding(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    return F.pad(x, (w0, w1, h0, h1, t0, t1))  # zeros, as the ported TF graph does (also before max pools)


class _Unit3d(nn.Module):
    """Conv3d with 'SAME' padding, then BN (eps 1e-3) and ReLU unless turned off."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), bn: bool = True,
                 relu: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, stride=self.stride, padding=0, bias=bias)
        if bn:
            self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01)
        else:
            self.bn = None

    def forward(self, x):
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class _MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class _Mixed(nn.Module):
    """An Inception block: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | 3x3 max pool -> 1x1, concatenated."""

    def __init__(self, cin: int, widths: tuple):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.b0 = _Unit3d(cin, w0)
        self.b1a, self.b1b = _Unit3d(cin, w1a), _Unit3d(w1a, w1b, (3, 3, 3))
        self.b2a, self.b2b = _Unit3d(cin, w2a), _Unit3d(w2a, w2b, (3, 3, 3))
        self.b3a, self.b3b = _MaxPoolSame((3, 3, 3), (1, 1, 1)), _Unit3d(cin, w3)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# Block name -> (input channels, branch widths) of Inception-v1.
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """I3D for RGB clips N x 3 x T x 224 x 224 in [-1, 1] -> N x ``num_classes`` logits averaged over time."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        stages = [
            ("Conv3d_1a_7x7", _Unit3d(3, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", _MaxPoolSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", _Unit3d(64, 64)),
            ("Conv3d_2c_3x3", _Unit3d(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", _MaxPoolSame((1, 3, 3), (1, 2, 2))),
            ("Mixed_3b", None), ("Mixed_3c", None),
            ("MaxPool3d_4a_3x3", _MaxPoolSame((3, 3, 3), (2, 2, 2))),
            ("Mixed_4b", None), ("Mixed_4c", None), ("Mixed_4d", None), ("Mixed_4e", None), ("Mixed_4f", None),
            ("MaxPool3d_5a_2x2", _MaxPoolSame((2, 2, 2), (2, 2, 2))),
            ("Mixed_5b", None), ("Mixed_5c", None),
        ]
        self.stage_names = []
        for name, module in stages:
            if module is None:
                module = _Mixed(*_MIXED[name])
            self.add_module(name, module)
            self.stage_names.append(name)
        self.logits = _Unit3d(1024, num_classes, bn=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (1, 7, 7), stride=1)  # dropout before the logits is off in eval
        return self.logits(x).squeeze(4).squeeze(3).mean(2)


# -- uint8 frames in, features out ------------------------------------------------------------------

class OfficialVideoFeatures(nn.Module):
    """The official preprocessing around one of the networks above.

    ``prepare(frames)``: T x H x W x 3 uint8 -> 3 x T x side x side float (resized and normalised);
    ``embed(x)``: N x 3 x T x side x side -> N x D; ``forward(clips)``: uint8 N x T x H x W x 3 -> N x D.
    """

    def __init__(self, net: nn.Module, side: int, normalise: str):
        super().__init__()
        if normalise not in ("kinetics_mean", "minus_one_one"):
            raise ValueError(f"unknown normalisation {normalise!r}")
        self.net, self.side, self.normalise = net.eval(), side, normalise
        self.register_buffer("mean", torch.tensor(RESNET_MEAN, dtype=torch.float32).view(3, 1, 1, 1))

    def prepare(self, frames) -> torch.Tensor:
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        video = torch.from_numpy(np.stack([resize_float_bicubic(f, self.side) for f in frames]))  # T x S x S x 3
        video = video.permute(3, 0, 1, 2).contiguous()
        if self.normalise == "kinetics_mean":
            return video - self.mean.cpu()
        return video / 127.5 - 1

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        device = self.mean.device
        return self.net(x.to(device)).flatten(1)

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.embed(torch.stack([self.prepare(clip.cpu()) for clip in clips]))


# -- FID as pytorch-fid computes it ------------------------------------------------------------------

FID_SIDE = 299
# The FID Inception's modules in graph order, in pytorch-fid's four blocks; each block's output,
# average pooled, is a feature (64, 192, 768 and 2048-d: pool3, what FID uses).
FID_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)
FID_BLOCK_DIMS = (64, 192, 768, 2048)


class OfficialFidFeatures(nn.Module):
    """uint8 N x 3 x H x W -> N x ``dims`` features as pytorch-fid computes them, from the modules
    of the FID Inception (``networks.inception``: torch-fidelity's port, same weights file): the
    frames as floats in [0, 1] (torchvision's ``ToTensor``), PyTorch's bilinear resize to 299,
    ``2x - 1``, the blocks up to the one of ``dims``, spatial average pooling."""

    def __init__(self, inception: nn.Module, dims: int = 2048):
        super().__init__()
        if dims not in FID_BLOCK_DIMS:
            raise ValueError(f"pytorch-fid's features are {FID_BLOCK_DIMS}-d, not {dims}")
        self.inception, self.dims = inception.eval(), dims
        self.num_features = dims  # torchmetrics reads it instead of sizing the network with a dummy
        self.modules_in_order = [name for block in FID_BLOCKS[:FID_BLOCK_DIMS.index(dims) + 1] for name in block]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        x = F.interpolate(x, size=(FID_SIDE, FID_SIDE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in self.modules_in_order:
            x = getattr(self.inception, name)(x)
        return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
