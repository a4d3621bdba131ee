"""Feature networks of the metrics, built from local weight files only (nothing is downloaded).

| metric | network | expected file (in ``--weights DIR``) |
|---|---|---|
| FID | the standard FID Inception (TF 2015-12-05 graph, torch-fidelity port), pool3 2048-d; ``--protocol disco``: pytorch-fid's input (``official_nets.OfficialFidFeatures``) | ``weights-inception-2015-12-05-6726825d.pth`` (or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) |
| LPIPS | VGG-16 (ImageNet, torchvision) + the LPIPS linear layers that ship in torchmetrics | ``vgg16-397923af.pth`` |
| FID-VID | 3D ResNet-18 (torchvision ``r3d_18``, Kinetics-400), 112 px, pooled 512-d | ``r3d_18-b3b3357e.pth`` |
| FVD | S3D (torchvision ``s3d``, Kinetics-400), 224 px, pooled 1024-d | ``s3d-d76dad2f.pth`` |
| FID-VID (``--protocol disco``, ``--fid-vid-arch resnet3d50``) | the official one: 3D ResNet-50 (Hara et al., Kinetics-400), 16 x 112 px, 0..255 minus the Kinetics mean, pooled 2048-d | ``resnet-50-kinetics.pth`` |
| FVD (``--protocol disco``, ``--fvd-arch i3d``) | the official one: I3D (Kinetics-400, the PyTorch port's ``InceptionI3d``), 224 px in [-1, 1], 400 logits averaged over time | ``i3d_pretrained_400.pt`` |

The two official files are the ones the DisCo evaluation reads from ``ROOT/eval_fvd/``; in
``--weights DIR`` they are found in ``DIR`` or in ``DIR/eval_fvd/``. Their checkpoints (a pickled
dict with ``state_dict``, keys prefixed ``module.``) load with ``weights_only=True``, the keys
checked strictly: a missing or unexpected key is named in a one-line error.

Every file is read with ``torch.load(weights_only=True)`` (or safetensors): no pickled code runs.
"""

from __future__ import annotations

import inspect
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from disco.pipeline.annotators.weights import WEIGHTS_ENV, WeightsError, weights_dir
from disco.pipeline.safe_load import refusal


@dataclass(frozen=True)
class VideoNet:
    builder: str  # torchvision.models.video function, or "official" (evaluate/official_nets.py)
    side: int  # frames are resized to side x side
    filename: str
    # torchvision's Kinetics-400 video models share one normalisation
    mean: tuple = (0.43216, 0.394666, 0.37645)
    std: tuple = (0.22803, 0.22145, 0.216989)
    description: str = ""  # for the report


VIDEO_NETS = {
    "r3d_18": VideoNet("r3d_18", 112, "r3d_18-b3b3357e.pth",
                       description="r3d_18 (torchvision, Kinetics-400), 112 px, pooled 512-d"),
    "r2plus1d_18": VideoNet("r2plus1d_18", 112, "r2plus1d_18-91a641e6.pth",
                            description="r2plus1d_18 (torchvision, Kinetics-400), 112 px, pooled 512-d"),
    "mc3_18": VideoNet("mc3_18", 112, "mc3_18-a90a0ba3.pth",
                       description="mc3_18 (torchvision, Kinetics-400), 112 px, pooled 512-d"),
    "s3d": VideoNet("s3d", 224, "s3d-d76dad2f.pth", description="s3d (torchvision, Kinetics-400), 224 px, pooled 1024-d"),
    # The official DisCo evaluation's networks (own code from their published structure).
    "resnet3d50": VideoNet("official", 112, "resnet-50-kinetics.pth", description=(
        "resnet3d50: 3D ResNet-50 (Hara et al., Kinetics-400; official DisCo FID-VID), 16 x 112 px, "
        "0..255 minus the Kinetics mean, pooled 2048-d")),
    "i3d": VideoNet("official", 224, "i3d_pretrained_400.pt", description=(
        "i3d: I3D (Kinetics-400; official DisCo FVD), 224 px in [-1, 1], 400 logits averaged over time")),
}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid's name for the same weights (torch hub's cache of the official FID has it)
PYTORCH_FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
VGG16_FILE = "vgg16-397923af.pth"


def weight_file(explicit: str | Path | None, weights_folder: str | Path | None, filename: str, flag: str,
                also: tuple[str, ...] = ()) -> Path:
    """The file given by its flag, else ``filename`` (or one of the names in ``also``) in the
    weights directory (flag or $DISCO_WEIGHTS) or its ``eval_fvd/``."""
    if explicit is not None:
        path = Path(explicit)
    else:
        names = " or ".join((filename, *also))
        folder = weights_dir(weights_folder)
        if folder is None:
            raise WeightsError(f"no weights: pass {flag} FILE, or --weights DIR (or ${WEIGHTS_ENV}) holding {names}")
        # the official evaluation's layout has its files in eval_fvd/
        found = [Path(folder) / sub / name for name in (filename, *also) for sub in ("", "eval_fvd")]
        path = next((p for p in found if p.is_file()), Path(folder) / filename)
    if not path.is_file():
        raise WeightsError(f"weight file {path} is missing ({flag} FILE or {' or '.join((filename, *also))} in "
                           "--weights DIR)")
    return path


def load_state_dict(path: str | Path) -> dict:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # (PyTorch's words advise weights_only=False: never for a file not ours)
        raise WeightsError(f"cannot read weights {path}: {refusal(exc)}") from None
    except Exception as exc:
        raise WeightsError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def load_strict(module: nn.Module, path: Path, what: str) -> nn.Module:
    """``path``'s tensors into ``module``, every key checked first; a ``module.`` prefix (a
    DataParallel checkpoint) is dropped, and a missing BatchNorm counter (``num_batches_tracked``,
    not a weight; old checkpoints lack it) is allowed. Any other difference is one line."""
    state = load_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def named(keys):
        return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    if missing:
        raise WeightsError(f"{path} does not fit {what}: missing key {named(missing)}")
    if unexpected:
        raise WeightsError(f"{path} does not fit {what}: unexpected key {named(unexpected)}")
    if shapes:
        k = shapes[0]
        raise WeightsError(f"{path} does not fit {what}: key {k!r} has shape {tuple(state[k].shape)}, "
                           f"the network's is {tuple(own[k].shape)}")
    module.load_state_dict({**{k: v for k, v in own.items() if k not in state}, **state}, strict=True)
    return module


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
            # antialias=False: torch-fidelity's TF1-style resize to 299 (torchmetrics' default since
            # it took the option is PyTorch's antialiased bilinear: 7 grey levels off on average at
            # 256 px, 28 at 512; before it, the TF1 resize was the only one).
            tf1 = {"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters else {}
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(safe), **tf1)
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


def official_video_network(arch: str, path: Path | None) -> nn.Module:
    """The official DisCo FID-VID (``resnet3d50``) or FVD (``i3d``) network with its official
    preprocessing (``official_nets.OfficialVideoFeatures``); weights from ``path`` (random when None)."""
    from disco.evaluate import official_nets as O

    if arch == "resnet3d50":
        build, normalise, what = O.ResNet3d50, "kinetics_mean", "the 3D ResNet-50 (Hara et al.)"
    elif arch == "i3d":
        build, normalise, what = O.InceptionI3d, "minus_one_one", "I3D (InceptionI3d, 400 classes)"
    else:
        raise ValueError(f"{arch!r} is not an official DisCo video network")
    if path is None:
        net = build()
    else:  # no random initialisation of weights the file replaces (seconds for the ResNet's 47 M)
        with torch.device("meta"):
            net = build()
        net = net.to_empty(device="cpu")
        for name, buffer in net.named_buffers():
            if name.endswith("num_batches_tracked"):
                buffer.zero_()
        load_strict(net, path, what)
    return O.OfficialVideoFeatures(net, VIDEO_NETS[arch].side, normalise)


def video_network(arch: str, path: Path | None) -> nn.Module:
    """A torchvision video model with its classifier removed, or one of the official DisCo
    networks; weights from ``path`` (random when None)."""
    import torchvision.models.video as video

    if arch not in VIDEO_NETS:
        raise ValueError(f"unknown video network {arch!r}; choose one of {', '.join(VIDEO_NETS)}")
    spec = VIDEO_NETS[arch]
    if spec.builder == "official":
        return official_video_network(arch, path)
    net = getattr(video, spec.builder)(weights=None)
    if path is not None:
        _load_into(net, path)
    if hasattr(net, "fc"):
        net.fc = nn.Identity()
    else:  # S3D: the classifier is a 1x1x1 conv after pooling; keep the pooled 1024 channels
        net.classifier = nn.Identity()
    return VideoFeatures(net, spec)
