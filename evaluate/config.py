"""The settings of ``disco-cli evaluate``: the metrics, where the feature networks' weights are,
and what to generate with ``--run`` (light to import: the command line reads its defaults and
choices from here; the networks are built by ``NetworkConfig.build``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from disco.model.precision import dtype_problem, gpus_problem, resolve_device

METRICS = ("fid", "ssim", "psnr", "lpips", "l1", "fid-vid", "fvd")
# The video networks FID-VID and FVD can use (built in evaluate/networks.py), and the defaults.
VIDEO_NET_NAMES = ("r3d_18", "r2plus1d_18", "mc3_18", "s3d", "resnet3d50", "i3d")
FID_VID_NET = "r3d_18"
FVD_NET = "s3d"
# How frames reach the FID Inception (one network, one weights file): torch-fidelity's TF1-style
# resize and (x - 128) / 128, or pytorch-fid's (PyTorch bilinear, 2x - 1: the official FID).
FID_PORTS = ("torch-fidelity", "pytorch-fid")
# --protocol: "ours" (default) is the corrected evaluation; "disco" reproduces the official DisCo
# scripts: pytorch-fid's FID, their video networks, LPIPS fed [0, 1] images, PSNR on uint8
# differences (which wrap around, as in the script behind the paper's table) and their cutting of
# videos into clips.
PROTOCOLS = ("ours", "disco")
PROTOCOL_DEFAULTS = {
    "ours": {"fid_port": "torch-fidelity", "fid_vid_arch": FID_VID_NET, "fvd_arch": FVD_NET,
             "lpips_legacy": False, "psnr_legacy": False},
    "disco": {"fid_port": "pytorch-fid", "fid_vid_arch": "resnet3d50", "fvd_arch": "i3d",
              "lpips_legacy": True, "psnr_legacy": True},
}


class EvaluateInputError(ValueError):
    """Folders or options that cannot be scored (a user's mistake)."""


@dataclass
class NetworkConfig:
    """Where the feature networks' weights are: one flag per file, or a weights directory."""

    weights: Path | None = None
    inception: Path | None = None
    vgg16: Path | None = None
    fid_vid_net: Path | None = None
    fvd_net: Path | None = None
    # None: EvaluateConfig.validate sets its --protocol's network (alone, FID_VID_NET and FVD_NET)
    fid_vid_arch: str | None = None
    fvd_arch: str | None = None
    fid_port: str | None = None  # FID_PORTS (None: the protocol's; alone, torch-fidelity)

    def files(self, metrics: list[str]) -> dict[str, Path]:
        """The weight file of every requested metric that needs one; a missing file raises WeightsError."""
        from disco.evaluate import networks as N

        wanted = {
            "fid": (self.inception, N.INCEPTION_FILE, "--inception"),
            "lpips": (self.vgg16, N.VGG16_FILE, "--vgg16"),
            "fid-vid": (self.fid_vid_net, N.VIDEO_NETS[self.fid_vid_arch or FID_VID_NET].filename, "--fid-vid-net"),
            "fvd": (self.fvd_net, N.VIDEO_NETS[self.fvd_arch or FVD_NET].filename, "--fvd-net"),
        }
        also = {"fid": (N.PYTORCH_FID_INCEPTION_FILE,)}  # the same weights under pytorch-fid's name
        found, missing = {}, {}
        for metric in (m for m in metrics if m in wanted):
            explicit, filename, flag = wanted[metric]
            try:
                found[metric] = N.weight_file(explicit, self.weights, filename, flag, also=also.get(metric, ()))
            except N.WeightsError as exc:
                missing[metric] = str(exc)
        if missing:  # every metric that lacks its file, at once, and what runs without any
            others = [m for m in metrics if m not in missing]
            raise N.WeightsError("; ".join(f"{m.upper()}: {why}" for m, why in missing.items())
                                 + (f" (or leave {'it' if len(missing) == 1 else 'them'} out: --metrics "
                                    f"{','.join(others)})" if others else ""))
        return found

    def build(self, metrics: list[str]) -> dict:
        """The feature networks of ``metrics`` (name -> torch module), from their weight files."""
        from disco.evaluate import networks as N

        files = self.files(metrics)  # all files are checked before any network is built
        built = {}
        if "fid" in files:
            built["fid"] = N.inception(files["fid"])  # score() feeds it as its --fid-port says
        if "lpips" in files:
            built["lpips"] = N.lpips_vgg(files["lpips"])
        if "fid-vid" in files:
            built["fid-vid"] = N.video_network(self.fid_vid_arch or FID_VID_NET, files["fid-vid"])
        if "fvd" in files:
            built["fvd"] = N.video_network(self.fvd_arch or FVD_NET, files["fvd"])
        return built


def parse_metrics(text: str) -> list[str]:
    chosen = [m.strip().lower() for m in text.split(",") if m.strip()]
    if chosen == ["all"]:
        return list(METRICS)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise EvaluateInputError(f"unknown metric {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)} or all")
    return [m for m in METRICS if m in chosen]


@dataclass
class EvaluateConfig:
    output: Path  # JSON report
    pred: Path | None = None
    gt: Path | None = None
    run: Path | None = None  # a checkpoint: generate --data's split first
    data: Path | None = None
    split: str = "test"
    work_dir: Path | None = None  # where generated and real frames go (default beside the report)
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    networks: NetworkConfig = field(default_factory=NetworkConfig)
    batch_size: int = 16
    protocol: str = "ours"  # PROTOCOLS; sets the defaults of the two legacy switches and the video networks
    lpips_legacy: bool | None = None  # LPIPS on [0, 1] images as the official script (None: the protocol's)
    psnr_legacy: bool | None = None  # PSNR of uint8 differences, wrapping, as the official script (None: the protocol's)
    square_gt: bool = False  # centre-crop the real frames to squares first, as generate squares its inputs
    # generation, for --run
    steps: int = 50
    guidance_scale: float = 1.5
    seed: int = 0
    size: int | None = None
    max_frames: int | None = None
    device: str = "auto"  # resolve_device: the GPU where there is one
    gpus: int = 1  # frames generated on this many GPUs, from --device's on (``gpu_devices``)
    ema: bool = True  # with --run: its EMA weights where it kept them; False: the weights as trained
    dtype: str = "float32"  # with --run: what the model samples in (generate's DTYPES)

    def validate(self) -> "EvaluateConfig":
        if (self.pred is None) != (self.gt is None):
            raise EvaluateInputError("--pred and --gt go together")
        if (self.pred is None) == (self.run is None):
            raise EvaluateInputError("pass either --pred DIR --gt DIR, or --run RUN --data TRIPLETS_DIR")
        self.device = resolve_device(self.device)
        if self.run is not None and dtype_problem(self.dtype, self.device):
            raise EvaluateInputError(dtype_problem(self.dtype, self.device))
        if gpus_problem(self.gpus, self.device):
            raise EvaluateInputError(gpus_problem(self.gpus, self.device))
        if self.run is not None and self.split not in ("train", "test"):  # (the splits preprocess writes)
            raise EvaluateInputError(f"unknown --split {self.split!r}; choose test or train")
        if self.run is not None and self.data is None:
            raise EvaluateInputError("--run needs --data TRIPLETS_DIR (a `disco-cli preprocess` output)")
        if self.networks.fid_port not in (None, *FID_PORTS):
            raise EvaluateInputError(f"unknown --fid-port {self.networks.fid_port!r}; choose {' or '.join(FID_PORTS)}")
        if self.protocol not in PROTOCOLS:
            raise EvaluateInputError(f"unknown --protocol {self.protocol!r}; choose {' or '.join(PROTOCOLS)}")
        for name, value in PROTOCOL_DEFAULTS[self.protocol].items():  # unset switches follow the protocol
            holder = self.networks if hasattr(self.networks, name) else self
            if getattr(holder, name) is None:
                setattr(holder, name, value)
        if self.batch_size < 1:
            raise EvaluateInputError("--batch-size must be at least 1")
        for name in ("steps", "size", "max_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvaluateInputError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if self.guidance_scale < 0:
            raise EvaluateInputError("--guidance-scale must be 0 or more (1 turns guidance off)")
        # Every path is checked here, before a feature network or a model is loaded.
        for name in ("pred", "gt", "run", "data"):
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise EvaluateInputError(f"--{name}: {path} does not exist")
        check_report_path(Path(self.output), inputs=(self.pred, self.gt))
        return self


def check_report_path(path: Path, inputs: tuple = ()) -> None:
    """Refuse a report that could not be written, before any scoring: it was written last, and a
    folder of that name, or a file where its folder should be, lost hours of scores to a traceback."""
    from disco.pipeline.errors import output_file_problem
    from disco.pipeline.sources.generic import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    problem = output_file_problem(path, "--output", inputs, reads=IMAGE_SUFFIXES | VIDEO_SUFFIXES)  # (its frames, videos)
    if problem:
        raise EvaluateInputError(problem)
