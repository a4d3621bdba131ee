"""Feature networks of the metrics, built from local weight files only (nothing is downloaded).

| metric | network | expected file (in ``--weights DIR``) |
|---|---|---|
| FID | the standard FID Inception (TF 2015-12-05 graph, torch-fidelity port), pool3 2048-d | ``weights-inception-2015-12-05-6726825d.pth`` |
| LPIPS | VGG-16 (ImageNet, torchvision) + the LPIPS linear layers that ship in torchmetrics | ``vgg16-397923af.pth`` |
| FID-VID | 3D ResNet-18 (torchvision ``r3d_18``, Kinetics-400), 112 px, pooled 512-d | ``r3d_18-b3b3357e.pth`` |
| FVD | S3D (torchvision ``s3d``, Kinetics-400), 224 px, pooled 1024-d | ``s3d-d76dad2f.pth`` |

Every file is read with ``torch.load(weights_only=True)`` (or safetensors): no pickled code runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from disco.pipeline.annotators.weights import WEIGHTS_ENV, WeightsError, weights_dir


@dataclass(frozen=True)
class VideoNet:
    builder: str  # torchvision.models.video function
    side: int  # frames are resized to side x side
    filename: str
    # torchvision's Kinetics-400 video models share one normalisation
    mean: tuple = (0.43216, 0.394666, 0.37645)
    std: tuple = (0.22803, 0.22145, 0.216989)


VIDEO_NETS = {
    "r3d_18": VideoNet("r3d_18", 112, "r3d_18-b3b3357e.pth"),
    "r2plus1d_18": VideoNet("r2plus1d_18", 112, "r2plus1d_18-91a641e6.pth"),
    "mc3_18": VideoNet("mc3_18", 112, "mc3_18-a90a0ba3.pth"),
    "s3d": VideoNet("s3d", 224, "s3d-d76dad2f.pth"),
}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
VGG16_FILE = "vgg16-397923af.pth"


def weight_file(explicit: str | Path | None, weights_folder: str | Path | None, filename: str, flag: str) -> Path:
    """The file given by its flag, else ``filename`` in the weights directory (flag or $DISCO_WEIGHTS)."""
    if explicit is not None:
        path = Path(explicit)
    else:
        folder = weights_dir(weights_folder)
        if folder is None:
            raise WeightsError(f"no weights for this metric: pass {flag} FILE, or --weights DIR (or ${WEIGHTS_ENV}) "
                               f"holding {filename}")
        path = Path(folder) / filename
    if not path.is_file():
        raise WeightsError(f"weight file {path} is missing ({flag} FILE or {filename} in --weights DIR)")
    return path


def load_state_dict(path: str | Path) -> dict:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def _load_into(module: nn.Module, path: Path, strict: bool = True) -> nn.Module:
    try:
        module.load_state_dict(load_state_dict(path), strict=strict)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit the network: {str(exc).splitlines()[0]}") from None
    return module


# -- FID ------------------------------------------------------------------------------------------

def inception(path: Path) -> nn.Module:
    """The standard FID Inception: uint8 N x 3 x H x W -> N x 2048 (resized to 299 inside, TF-style)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = load_state_dict(path)
    # torch-fidelity unpickles its file without weights_only; hand it a copy we wrote ourselves.
    with tempfile.TemporaryDirectory() as tmp:
        safe = Path(tmp) / "inception.pth"
        torch.save(state, safe)
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(safe))
        except RuntimeError as exc:
            raise WeightsError(f"{path} does not fit the FID Inception: {str(exc).splitlines()[0]}") from None


# -- LPIPS ----------------------------------------------------------------------------------------

def lpips_vgg(vgg16_path: Path | None) -> nn.Module:
    """LPIPS (VGG) from torchmetrics with its packaged linear layers; the VGG-16 trunk from
    ``vgg16_path`` (torchvision's ImageNet file), or random when None (tests)."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    metric = _NoTrainLpips(pretrained=True, net="vgg", pnet_rand=True)  # random trunk: no download
    if vgg16_path is not None:
        # torchvision's file: the trunk is ``features.N.*``; the classifier is not needed.
        state = {k[len("features."):]: v for k, v in load_state_dict(vgg16_path).items() if k.startswith("features.")}
        blocks = (metric.net.slice1, metric.net.slice2, metric.net.slice3, metric.net.slice4, metric.net.slice5)
        try:
            for block in blocks:
                for name, layer in block.named_children():
                    own = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == name}
                    if own or any(True for _ in layer.parameters()):
                        layer.load_state_dict(own)
        except RuntimeError as exc:
            raise WeightsError(f"{vgg16_path} does not fit VGG-16: {str(exc).splitlines()[0]}") from None
    return metric.eval()


# -- video networks -------------------------------------------------------------------------------

class VideoFeatures(nn.Module):
    """uint8 clips N x T x H x W x 3 -> pooled features of a torchvision video network."""

    def __init__(self, net: nn.Module, spec: VideoNet):
        super().__init__()
        self.net, self.spec = net.eval(), spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1, 1))

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        n, t, h, w, _ = clips.shape
        x = clips.permute(0, 1, 4, 2, 3).reshape(n * t, 3, h, w).float() / 255.0
        x = F.interpolate(x, size=(self.spec.side, self.spec.side), mode="bilinear", align_corners=False,
                          antialias=True)
        x = x.reshape(n, t, 3, self.spec.side, self.spec.side).permute(0, 2, 1, 3, 4)
        return self.net((x - self.mean) / self.std).flatten(1)


def video_network(arch: str, path: Path | None) -> VideoFeatures:
    """A torchvision video model with its classifier removed; weights from ``path`` (random when None)."""
    import torchvision.models.video as video

    if arch not in VIDEO_NETS:
        raise ValueError(f"unknown video network {arch!r}; choose one of {', '.join(VIDEO_NETS)}")
    spec = VIDEO_NETS[arch]
    net = getattr(video, spec.builder)(weights=None)
    if path is not None:
        _load_into(net, path)
    if hasattr(net, "fc"):
        net.fc = nn.Identity()
    else:  # S3D: the classifier is a 1x1x1 conv after pooling; keep the pooled 1024 channels
        net.classifier = nn.Identity()
    return VideoFeatures(net, spec)
