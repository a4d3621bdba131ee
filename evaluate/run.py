"""``disco-cli evaluate``: score predicted frames or videos against the ground truth, or generate
a preprocessed split with a checkpoint and score that."""

from __future__ import annotations

import contextlib
from collections import Counter
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from disco.evaluate import metrics as M
from disco.evaluate import networks as N
from disco.evaluate.config import FID_VID_NET as M_FID_VID
from disco.evaluate.config import FVD_NET as M_FVD
from disco.evaluate.config import EvaluateConfig, EvaluateInputError
from disco.pipeline.errors import read_by_suffix
from disco.pipeline.store.output import folder_lock

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}
# The official test loader writes every clip's frames into one flat folder, named
# TiktokDance_<clip>_<frame>.png (or TiktokDance_<clip>_<n>_1x1_<frame>.png), and the official
# video metrics read each clip's windows by those names: (clip prefix)(frame number)(rest).
OFFICIAL_FRAME_NAMES = (re.compile(r"^(TiktokDance_\d+)_(\d+)(\D*\.\w+)$"),
                        re.compile(r"^(TiktokDance_\d+_\d+_1x1)_(\d+)(\D*\.\w+)$"))


# -- reading the two sets ---------------------------------------------------------------------------

def _read_image(path: Path) -> np.ndarray:
    from disco.pipeline.decode import load_image
    from disco.pipeline.errors import InputError

    try:
        return load_image(path, max_side=100_000)
    except InputError as exc:
        raise EvaluateInputError(f"{path}: {exc.message}") from None


def list_sequences(root: Path) -> dict[str, list[Path] | Path]:
    """Name -> frames (sorted image files) or a video file.

    ``root`` may be a video, a folder of videos, a folder of frames (one sequence; or one per
    clip where every name is the official loader's, ``OFFICIAL_FRAME_NAMES``) or a folder of
    folders of frames (one sequence each).
    """
    if not root.exists():
        raise EvaluateInputError(f"{root} does not exist")
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise EvaluateInputError(f"{root} is neither a video nor a folder")
        return {".": root}  # a single video pairs with the other side's single video, whatever their names
    images = sorted((p for p in root.iterdir() if read_by_suffix(p, IMAGE_SUFFIXES)), key=frame_order)
    if images:
        return official_clips(images) or {".": images}
    videos = sorted(p for p in root.iterdir() if read_by_suffix(p, VIDEO_SUFFIXES))
    sequences: dict = {p.stem: p for p in videos}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # .tmp-: in the making
        frames = sorted((p for p in sub.iterdir() if read_by_suffix(p, IMAGE_SUFFIXES)), key=frame_order)
        if frames:
            sequences[sub.name] = frames
    if not sequences:
        raise EvaluateInputError(f"{root} holds no frames (png, jpg) and no videos (mp4, ...)")
    return sequences


def shown(name: str, item: list[Path] | Path) -> str:
    """A sequence's name in a message: a lone video or frames folder (named ``"."``) by its own
    name ('.' named nothing)."""
    if name != ".":
        return repr(name)
    return repr((item if isinstance(item, Path) else item[0].parent).resolve().name)


def frame_order(path: Path) -> tuple:
    """A frame file's place in time: its name's numbers as numbers (``frame_2`` before
    ``frame_10``; by text, the video metrics' 16-frame windows were cut from shuffled frames)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.stem)), path.name


GAP_MARK = "#"  # CLIP#2: the frames of CLIP after the first gap in its frame numbers


def official_clips(images: list[Path]) -> dict[str, list[Path]] | None:
    """The clips of a flat folder the official test loader wrote, each in frame-number order
    (as one sequence, every clip's last windows would run into the next clip's frames); None
    where a name is not of that form. A clip whose frame numbers skip is cut at the gap into
    runs of consecutive numbers (``CLIP#2``, ...): the official video metrics take a 16-frame
    window only where every next number is there."""
    clips: dict[str, list[tuple[int, Path]]] = {}
    for path in images:
        match = next(filter(None, (pattern.match(path.name) for pattern in OFFICIAL_FRAME_NAMES)), None)
        if match is None:
            return None
        clips.setdefault(match.group(1), []).append((int(match.group(2)), path))
    runs: dict[str, list[Path]] = {}
    for clip, frames in clips.items():
        frames.sort()
        part, previous = 1, None
        for number, path in frames:
            if number == previous:
                raise EvaluateInputError(f"two frames of {clip} have the number {number} ({path.name} and another)")
            if previous is not None and number != previous + 1:
                part += 1
            runs.setdefault(clip if part == 1 else f"{clip}{GAP_MARK}{part}", []).append(path)
            previous = number
    return runs


def read_sequence(item: list[Path] | Path) -> np.ndarray:
    if isinstance(item, Path):
        from disco.generate.video import read_video
        from disco.pipeline.errors import InputError

        try:
            return read_video(item)[0]
        except InputError as exc:
            raise EvaluateInputError(f"{item}: {exc.message}") from None
    frames = [_read_image(p) for p in item]
    if len({f.shape for f in frames}) > 1:
        raise EvaluateInputError(f"frames of {item[0].parent} differ in size")
    return np.stack(frames)


# Frames of one sequence held in memory at once (and the next CLIP_LENGTH - 1 with them, for the
# 16-frame windows that start in a part): a flat folder of 50,000 generated 512 px frames is one
# sequence, 39 GB read whole, and a 10-minute 1080p video 112 GB. Larger frames: fewer a part, so
# that a part holds at most CHUNK_FRAMES frames' worth of 512 px pictures.
CHUNK_FRAMES = 512
CHUNK_PIXELS = 512 * 512 * 512


class _Sequence:
    """One side of a pair read on in order, part after part: frame files, or a video file opened
    once and decoded once through (a part opened anew would seek back to its keyframe)."""

    def __init__(self, item: list[Path] | Path):
        from disco.pipeline.decode import open_video, probe_whole_video
        from disco.pipeline.errors import InputError

        self.item, self.shape = item, None
        if isinstance(item, Path):
            try:
                info = probe_whole_video(item)  # (scored on its frames before a cut, it would pass for whole)
                self.video = open_video(item, info.width, info.height)
            except InputError as exc:
                raise EvaluateInputError(f"{item}: {exc.message}") from None
            self.length, self.size = info.num_frames, (info.width, info.height)
        else:
            from PIL import Image

            self.length = len(item)
            try:
                with Image.open(item[0]) as first:  # the header only: the part size is planned from it
                    self.size = first.size
            except Exception:  # read in full below, where a bad file gets its own message
                self.size = _read_image(item[0]).shape[1::-1]

    def read(self, start: int, stop: int) -> np.ndarray:
        if isinstance(self.item, Path):
            from disco.pipeline.decode import decode_every_frame
            from disco.pipeline.errors import InputError

            try:
                frames = decode_every_frame(self.item, list(range(start, stop)), *self.size, self.video)[0]
            except InputError as exc:
                raise EvaluateInputError(f"{self.item}: {exc.message}") from None
        else:
            frames = read_sequence(self.item[start:stop])
        if self.shape is not None and frames.shape[1:] != self.shape:
            where = self.item if isinstance(self.item, Path) else self.item[0].parent
            raise EvaluateInputError(f"frames of {where} differ in size")
        self.shape = frames.shape[1:]
        return frames


def sequence_parts(name: str, item_pred: list[Path] | Path, item_gt: list[Path] | Path,
                   whole_videos: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """One sequence's (pred, gt, own) frames part by part, each part with the next
    ``CLIP_LENGTH - 1`` frames too, ``own`` saying how many frames are the part's own (frame
    metrics score those). A part's 16-frame windows are then exactly those that start among its
    own frames, each window in one part. Each frame is read once: those a part shares with the
    next are kept for it. ``whole_videos``: a pair with a video file comes in one go (the official
    rule scores a video file whole)."""
    if whole_videos and (isinstance(item_pred, Path) or isinstance(item_gt, Path)):
        gt = read_sequence(item_gt)
        yield read_sequence(item_pred), gt, len(gt)
        return
    pred, gt = _Sequence(item_pred), _Sequence(item_gt)
    if pred.length != gt.length:
        raise EvaluateInputError(f"{shown(name, item_pred)}: {pred.length} predicted frames but {gt.length} real ones")
    largest = max(pred.size[0] * pred.size[1], gt.size[0] * gt.size[1])  # (pred is resized to gt's size)
    chunk = max(1, min(CHUNK_FRAMES, CHUNK_PIXELS // max(1, largest)))
    kept, read_to = None, 0
    for start in range(0, gt.length, chunk):
        stop = min(start + chunk + M.CLIP_LENGTH - 1, gt.length)
        part = (pred.read(read_to, stop), gt.read(read_to, stop)) if stop > read_to else None
        if kept is not None:
            part = kept if part is None else tuple(np.concatenate(pair) for pair in zip(kept, part))
        read_to = stop
        kept = tuple(frames[chunk:] for frames in part)  # [start + chunk, stop): the next part's first frames
        yield part[0], part[1], min(chunk, gt.length - start)


def pair_sequences(pred: Path, gt: Path) -> list[tuple[str, list[Path] | Path, list[Path] | Path]]:
    a, b = list_sequences(pred), list_sequences(gt)
    if set(a) != set(b):
        clips = {side: {name.split(GAP_MARK)[0] for name in seqs} for side, seqs in (("pred", a), ("gt", b))}
        if clips["pred"] == clips["gt"]:  # the same clips, cut at other gaps: frames missing on one side
            stems = [{p.stem for frames in seqs.values() if isinstance(frames, list) for p in frames} for seqs in (a, b)]
            missing = sorted(stems[0] ^ stems[1])
            raise EvaluateInputError(f"frames do not match by name between --pred and --gt: {len(missing)} only on "
                                     f"one side (e.g. {missing[:3]})")
        only_pred, only_gt = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise EvaluateInputError(f"--pred and --gt do not hold the same sequences: only in pred {only_pred[:3]}, "
                                 f"only in gt {only_gt[:3]}")
    pairs = []
    for name in sorted(a):
        if isinstance(a[name], list) and isinstance(b[name], list):
            names_a, names_b = [p.name for p in a[name]], [p.name for p in b[name]]
            if [p.stem for p in a[name]] != [p.stem for p in b[name]]:
                missing = sorted({p.stem for p in a[name]} ^ {p.stem for p in b[name]})
                raise EvaluateInputError(f"frames of {shown(name, a[name])} do not match by name between --pred and --gt "
                                         f"({len(names_a)} vs {len(names_b)}; e.g. {missing[:3]})")
        pairs.append((name, a[name], b[name]))
    return pairs


# -- scoring --------------------------------------------------------------------------------------

def check_framing(name: str, pred: np.ndarray, gt: np.ndarray, tolerance: float = 0.02) -> None:
    """A prediction of another size is resized to the real frame's; of another shape it would be
    stretched, and every score would compare misaligned pictures: refused, saying why."""
    (ph, pw), (gh, gw) = pred.shape[:2], gt.shape[:2]
    if abs((pw / ph) / (gw / gh) - 1) > tolerance:
        raise EvaluateInputError(
            f"{name}: predicted frames are {pw} x {ph}, real ones {gw} x {gh}: another shape, which resizing "
            "would stretch; pass --square-gt where the predictions are squares from `generate` (it centre-crops "
            "its inputs the same way), or give real frames framed as the predictions")


@contextlib.contextmanager
def ieee_convolutions():
    """fp32 convolutions in full precision within the block: cuDNN's default on a GPU is TF32 (a
    10-bit mantissa), which moves FID, LPIPS and FVD away from the figures the same frames score
    on the CPU. The setting before is restored after."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


@ieee_convolutions()  # the feature networks' convolutions in full fp32 precision
def score(pred: Path, gt: Path, metrics: list[str], networks: dict[str, torch.nn.Module],
          batch_size: int = 16, log: Callable[[str], None] = lambda message: None, device: str = "cpu",
          protocol: str = "ours", lpips_legacy: bool = False, psnr_legacy: bool = False,
          square_gt: bool = False, fid_port: str = "torch-fidelity") -> dict:
    """Every requested metric over the paired sequences; ``networks`` holds the built feature nets.
    ``protocol`` "disco" cuts videos into clips as the official scripts (``M.disco_samples``);
    ``fid_port`` "pytorch-fid": FID's distance in numpy as pytorch-fid's (its network, built for
    that port, is ``official_nets.OfficialFidFeatures``).
    ``square_gt``: the real frames centre-cropped to squares first (``generate``'s framing)."""
    from disco.model.conditioning import square

    pairs = pair_sequences(pred, gt)
    pair_values = {m: [] for m in ("psnr", "ssim", "l1") if m in metrics}
    pair_functions = {**M.PAIR_METRICS, "psnr": M.psnr_legacy if psnr_legacy else M.psnr}
    lpips = M.Lpips(networks["lpips"], batch_size, device, legacy=lpips_legacy) if "lpips" in metrics else None
    fid = None
    if "fid" in metrics:
        if fid_port == "pytorch-fid":
            from disco.evaluate.official_nets import OfficialFidFeatures

            net = networks["fid"]
            if hasattr(net, "Mixed_7c"):  # the Inception itself (networks.inception): fed as pytorch-fid does
                net = OfficialFidFeatures(net)
            fid = M.NumpyFrechet(net, batch_size, device)
        else:
            fid = M.Frechet(networks["fid"], (3, 64, 64), batch_size, device)
    if protocol == "disco":
        videos = {m: M.FeatureFrechet(networks[m], m, batch_size, device) for m in ("fid-vid", "fvd") if m in metrics}
    else:
        videos = {m: M.Frechet(networks[m], (M.CLIP_LENGTH, 64, 64, 3), batch_size, device)
                  for m in ("fid-vid", "fvd") if m in metrics}
    samples = {m: 0 for m in videos}
    frames_total, windows_total = 0, 0
    # The sizes the pairs were scored at (the real frames', after --square-gt): L1 is per pixel
    # of that size, and every score moves with it (the paper's are at 256 x 256).
    sizes: Counter = Counter()
    for name, item_pred, item_gt in pairs:
        frames, windows_of_sequence = 0, 0
        for part, (pred_frames, gt_frames, own) in enumerate(sequence_parts(name, item_pred, item_gt,
                                                                            protocol == "disco")):
            if square_gt:
                gt_frames = np.stack([square(g, min(g.shape[:2])) for g in gt_frames])
            if len(pred_frames) != len(gt_frames):
                raise EvaluateInputError(f"{shown(name, item_pred)}: {len(pred_frames)} predicted frames but "
                                         f"{len(gt_frames)} real ones")
            if part == 0:
                check_framing(shown(name, item_pred), pred_frames[0], gt_frames[0])
            pred_frames = np.stack([M.match_size(p, g) for p, g in zip(pred_frames, gt_frames)])
            frames += own
            sizes.update(f"{g.shape[1]}x{g.shape[0]}" for g in gt_frames[:own])
            pred_own, gt_own = pred_frames[:own], gt_frames[:own]
            for metric, values in pair_values.items():
                values.extend(pair_functions[metric](p, g) for p, g in zip(pred_own, gt_own))
            if lpips is not None:
                lpips.update(pred_own, gt_own)
            if fid is not None:
                fid.update(M.to_tensor(pred_own), real=False)
                fid.update(M.to_tensor(gt_own), real=True)
            if protocol == "disco":  # the official rule: by input kind (frame files or a video file) and metric
                for metric_name, metric in videos.items():
                    metric.update(pred_frames, isinstance(item_pred, Path), real=False)
                    samples[metric_name] += metric.update(gt_frames, isinstance(item_gt, Path), real=True)
                continue
            windows = M.clip_windows(len(gt_frames))  # those starting among the part's own frames
            windows_of_sequence += len(windows)
            for start in range(0, len(windows), batch_size):
                chunk = windows[start:start + batch_size]
                for metric in videos.values():
                    metric.update(M.clips(pred_frames, chunk), real=False)
                    metric.update(M.clips(gt_frames, chunk), real=True)
        frames_total += frames
        windows_total += windows_of_sequence
        log(f"scored {name if name != '.' else pred.name}: {frames} frames"
            + (f", {windows_of_sequence} clips" if protocol != "disco" else ""))
    results = {m: float(np.mean(v)) for m, v in pair_values.items()}
    if lpips is not None:
        results["lpips"] = lpips.compute()
    # A distance that cannot be computed (too few samples: no sequence of 16 frames for the video
    # metrics, one video under --protocol disco) is null in the report with its reason; the other
    # scores, maybe hours of generating and scoring, are kept.
    failed = {}
    for metric_name, metric in (({"fid": fid} if fid is not None else {}) | videos).items():
        try:
            results[metric_name] = metric.compute()
        except ValueError as exc:
            results[metric_name], failed[metric_name] = None, str(exc)
    counts = {"sequences": len(pairs), "frames": frames_total, "clips": windows_total,
              "frame_sizes": dict(sizes.most_common())}
    if protocol == "disco":  # features per set, and the 16-frame (or whole-video) clips behind them
        counts["clips"] = {m: metric.clips[True] for m, metric in videos.items()}
        counts["video_samples"] = samples
    return {"metrics": {m: results[m] for m in metrics}, "counts": counts, **({"failed": failed} if failed else {})}


def evaluate(config: EvaluateConfig, networks: dict[str, torch.nn.Module] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Score (generating first for ``--run``) and write the JSON report; returns it.

    ``networks`` replaces the feature networks built from weight files (tests use random ones).
    """
    config.validate()
    started = time.time()
    if networks is None:
        networks = config.networks.build(config.metrics)  # missing weights fail before any work
    pred, gt = config.pred, config.gt
    generated = None
    with contextlib.ExitStack() as held:
        if config.run is not None:
            work = Path(config.work_dir or config.output.with_suffix(""))
            # One --run at a time in a work folder (a second would clear or take over its clips).
            held.enter_context(folder_lock(work, "wait for it to finish, or pick another --work-dir", tidy=True))
            generated = generate_split(config, work, log)
            pred, gt = work / "pred", work / "gt"
        report = score(pred, gt, config.metrics, networks, config.batch_size, log, config.device,
                       config.protocol, bool(config.lpips_legacy), bool(config.psnr_legacy), config.square_gt,
                       config.networks.fid_port)
    generation = ("run", "data", "split", "work_dir", "steps", "guidance_scale", "seed", "size", "max_frames", "ema",
                  "dtype")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
                if k != "networks" and (config.run is not None or k not in generation)}
    settings["networks"] = describe_networks(config)
    settings["conventions"] = conventions(config)
    report = {**report, "pred": str(pred), "gt": str(gt), "settings": settings,
              "generated": generated, "wall_time_s": round(time.time() - started, 3)}
    config.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = config.output.with_name(f".{config.output.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(config.output)  # whole or not at all (an earlier report is not cut short)
    return report


def conventions(config: EvaluateConfig) -> dict:
    """How each number was computed, for the report (after ``config.validate()``)."""
    disco = config.protocol == "disco"
    return {
        "protocol": config.protocol + (" (the official DisCo evaluation scripts)" if disco else " (corrected)"),
        "pairs": ("per (pred, gt) frame, averaged; " + ("gt centre-cropped to a square, " if config.square_gt else "")
                  + "pred resized to gt size if they differ (same shape)"),
        "psnr": ("uint8 differences squared in uint8 (wrapping modulo 256, the official script), 255 peak"
                 if config.psnr_legacy else "float64 MSE, 255 peak") + f", identical frames score {M.PSNR_CAP}",
        "ssim": "skimage structural_similarity on grayscale, data_range 255",
        "fid": ("pytorch-fid (python -m pytorch_fid, the official script): frames in [0, 1] resized to 299 by "
                "PyTorch's bilinear, scaled to [-1, 1], pool3; Fréchet distance in numpy/scipy"
                if config.networks.fid_port == "pytorch-fid" else
                "torch-fidelity: frames resized to 299 TF1-style, (x - 128) / 128, pool3; torchmetrics' Fréchet "
                "distance in float64"),
        "l1": "mean |pred - gt| of 0..255 values divided by H*W (official DisCo convention)",
        "networks": "float32, full-precision convolutions (no TF32) on any device",
        "lpips": ("VGG, inputs in [0, 1] (legacy: the official script's range)" if config.lpips_legacy
                  else "VGG, inputs scaled to [-1, 1]"),
        "video_clips": ("official: frame files -> every 16 consecutive frames, stride 1, incomplete windows "
                        "dropped; a video file -> one sample per video (FID-VID: 16-frame segments, the last "
                        "padded with the final frame, features averaged; FVD: the whole video as one clip); "
                        "Fréchet distance in numpy/scipy" if disco else
                        f"{M.CLIP_LENGTH} consecutive frames, stride {M.CLIP_STRIDE}"),
    }


def describe_networks(config: EvaluateConfig) -> dict:
    out = {}
    try:
        files = config.networks.files(config.metrics)
    except N.WeightsError:
        files = {}
    names = {"fid": f"FID Inception (2015-12-05) pool3, {config.networks.fid_port or 'torch-fidelity'}'s input",
             "lpips": "LPIPS VGG-16",
             "fid-vid": N.VIDEO_NETS[config.networks.fid_vid_arch or M_FID_VID].description,
             "fvd": N.VIDEO_NETS[config.networks.fvd_arch or M_FVD].description}
    for metric in ("fid", "lpips", "fid-vid", "fvd"):
        if metric in config.metrics:
            out[metric] = {"network": names[metric], "file": str(files[metric]) if metric in files else None}
    return out


# -- --run: generate a preprocessed split -----------------------------------------------------------

WORK_MARK = ".disco-evaluate-run"  # in a work folder whose pred/ and gt/ evaluate --run wrote


def check_work_dir(work: Path) -> list[Path]:
    """The pred/ and gt/ of ``work`` that ``--run`` wrote before (its mark is there), to clear
    before it writes again: every folder in them is scored, so the frames of an earlier run
    (another checkpoint, split or --max-frames) would be scored with the new ones. Anything else
    there is refused, never deleted: a user's frames look the same as ours (an output of
    ``evaluate --run`` from before the mark included)."""
    old = [work / name for name in ("pred", "gt") if (work / name).exists() or (work / name).is_symlink()]
    if old and not ((work / WORK_MARK).is_file() and all(p.is_dir() and not p.is_symlink() for p in old)):
        raise EvaluateInputError(
            f"{work} already holds {' and '.join(p.name for p in old)}, not marked as written by `evaluate --run`: "
            "choose another --work-dir, or delete them if they are an earlier run's frames")
    return old


def start_work_dir(work: Path, old: list[Path], generation: dict, earlier: tuple[dict, ...] = ()) -> dict[str, int]:
    """The clips an earlier ``--run`` into ``work`` finished with the same ``generation`` (its
    mark holds them: the same checkpoint, data, split and sampling settings give the same frames),
    by folder name with their frame counts, kept; anything else is removed first, and ``work``
    marked with ``generation``. A clip is finished once its pred/ folder has its final name (its
    gt/ is renamed first); a clip folder in the making (``.tmp-``) goes. ``earlier``: the same
    generation as an earlier version wrote its mark (then rewritten as ``generation``)."""
    mark = work / WORK_MARK
    try:
        before = json.loads(mark.read_text()) if old else None
    except (OSError, ValueError):  # an empty mark (older versions) or a damaged one: nothing kept
        before = None
    if before is not None and (before == generation or before in earlier):
        if before != generation:
            _write_mark(mark, generation)
        for leftover in work.glob(f"*/{TEMPORARY_CLIP}*"):
            shutil.rmtree(leftover)
        pred, gt = work / "pred", work / "gt"
        return {p.name: len(list(p.glob("*.png"))) for p in sorted(pred.iterdir()) if p.is_dir()
                and not p.name.startswith(".") and (gt / p.name).is_dir()} if pred.is_dir() else {}
    for folder in old:
        shutil.rmtree(folder)
    work.mkdir(parents=True, exist_ok=True)
    _write_mark(mark, generation)
    return {}


def _write_mark(mark: Path, generation: dict) -> None:
    temporary = mark.with_name(mark.name + ".tmp")
    temporary.write_text(json.dumps(generation))
    temporary.replace(mark)


TEMPORARY_CLIP = ".tmp-"  # a clip's folder while its frames are written


def _model_identity(source: dict) -> dict:
    """What decides the weights ``--run`` samples: the checkpoint's record, its folder's files by
    content (``generate.partial.file_identity``: a save_pretrained folder written over in place, a
    run's checkpoint of a step written again), not by path or time: the same checkpoint reached
    through another mount, or copied for a ``ray job submit``, keeps the clips already generated."""
    from disco.generate.partial import file_identity

    identity = {k: v for k, v in source.items() if k not in ("path", "checkpoint")}
    folder = source.get("checkpoint") or source.get("path")
    if folder:
        identity["files"] = file_identity(folder)
    return identity


def _model_identity_by_path(source: dict) -> dict:
    """``_model_identity`` as versions before 2026-11-29 wrote it (absolute paths, files' sizes
    and times): a work folder they marked keeps its clips where nothing changed."""
    identity = {k: str(Path(v).resolve()) if k in ("path", "checkpoint") else v for k, v in source.items()}
    folder = source.get("checkpoint") or source.get("path")
    if folder:
        folder = Path(folder)
        identity["files"] = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                   for p in folder.rglob("*") if p.is_file())
    return identity


def write_clip(work: Path, folder: str, pred: np.ndarray, gt: np.ndarray) -> None:
    """One clip's frames under ``work/gt/`` then ``work/pred/``, each written under a temporary
    name and renamed whole: a crash leaves no clip that looks finished and is not."""
    from disco.generate.video import write_frames

    for side, frames in (("gt", gt), ("pred", pred)):
        final, temporary = work / side / folder, work / side / f"{TEMPORARY_CLIP}{folder}"
        for stale in (temporary, final):  # a gt/ written before a crash, whose pred/ never was
            if stale.exists():
                shutil.rmtree(stale)
        write_frames(temporary, frames)
        temporary.rename(final)


def generate_split(config: EvaluateConfig, work: Path, log: Callable[[str], None]) -> dict:
    """Every clip of ``config.split`` in ``config.data``: the clip's first frame is the reference
    (its picture, cut by its stored mask into person and background), its stored poses drive the model; generated
    frames go to ``work/pred/CLIP/``, the real frames, squared to the same size, to ``work/gt/CLIP/``."""
    import pyarrow.compute as pc

    from disco.model.conditioning import background_pixels, pose_pixels, reference_pixels, square
    from disco.generate.inputs import POSE_READ_COLUMNS, check_pose_folder, pose_pictures, read_clip
    from disco.model.checkpoint import trained_data, trained_drawing
    from disco.pipeline.store.pose import data_pose
    from disco.generate.run import open_pipeline
    from disco.pipeline.store.manifest import split_conflicts
    from disco.pipeline.store.encode import decode_picture
    from disco.pipeline.store.reader import open_triplets

    dataset = open_triplets(config.data)
    if not dataset.files:
        raise EvaluateInputError(f"{config.data} holds no triplets/*.parquet; is it a `disco-cli preprocess` output?")
    table = dataset.to_table(columns=["clip_id"], filter=pc.field("split") == config.split)
    clip_ids = sorted(set(table.column("clip_id").to_pylist()))
    if not clip_ids:
        splits = sorted(set(dataset.to_table(columns=["split"]).column("split").to_pylist()))
        raise EvaluateInputError(f"{config.data} has no rows in split {config.split!r} (it holds {', '.join(splits)}): "
                                 "preprocess held-out clips into their own folder with --split test (or a data set "
                                 "manifest's --split-rule), or pass --split " + (splits[0] if splits else "train"))
    drawing = trained_drawing(config.run)  # its training poses' drawing, face points included
    check_pose_folder(config.data, drawing.style, drawing.hands, drawing.face)  # poses it cannot draw: refused now
    for line in split_conflicts(trained_data(config.run), [config.data]):
        log(f"warning: {line} (the run, the runs it started from, and the folder scored): clips scored here may "
            "have been trained on")
    old = check_work_dir(work)
    pipeline, size, side = open_pipeline(config.run, config.device, config.size, ema=config.ema, dtype=config.dtype,
                                         gpus=config.gpus, log=log)
    generation = {"checkpoint": _model_identity(getattr(pipeline, "source", None) or {}),
                  "data": str(Path(config.data).resolve()), "shards": sorted(Path(f).name for f in dataset.files),
                  "split": config.split, "size": size, "steps": config.steps, "guidance_scale": config.guidance_scale,
                  "seed": config.seed, "max_frames": config.max_frames, "dtype": str(config.dtype),
                  "device": pipeline.device.type, "clips": clip_ids}
    # After the model loads: a refused command leaves the last run's frames alone.
    by_path = {**generation, "checkpoint": _model_identity_by_path(getattr(pipeline, "source", None) or {})}
    # Frames an earlier version made are drawn as today's unless the folder's stored face points
    # are now drawn out for a model that learnt none (it took the stored pictures as they were).
    same_drawing = not (data_pose(config.data).face and not drawing.face)
    finished = start_work_dir(work, old, json.loads(json.dumps(generation, default=str)),
                              earlier=(json.loads(json.dumps(by_path, default=str)),) if same_drawing else ())
    frames_done = sum(finished.values())
    if finished:
        log(f"resuming: {len(finished)} of {len(clip_ids)} clips were generated by an earlier --run with the same "
            "checkpoint and settings; they are kept")
    for clip in clip_ids:
        folder = clip.replace("/", "__")
        if folder in finished:
            continue
        rows = read_clip(config.data, clip, ["image", "mask", *POSE_READ_COLUMNS], split=config.split)
        if config.max_frames:
            rows = rows[:config.max_frames]
        # Drawn as the run's training poses were (its config.yaml): stored, or from the keypoints.
        drawn = pose_pictures(config.data, rows, drawing.style, drawing.hands, clip=clip, face=drawing.face)
        first = rows[0]
        image, mask = decode_picture(first["image"]), decode_picture(first["mask"], grayscale=True)
        reference = reference_pixels(square(image, size), square(mask, size, nearest=True))
        # Cut from the whole picture at this size, as training and generate cut it (the stored
        # background, cut at the stored size and shrunk, blends the cut's black into the hole's edge).
        background = background_pixels(image, size, mask, pipeline.background_hole)
        poses = pose_pixels(drawn, side)
        frames = pipeline(reference, background, poses, num_inference_steps=config.steps,
                          guidance_scale=config.guidance_scale, seed=config.seed, batch_size=config.batch_size)
        write_clip(work, folder, frames, np.stack([square(decode_picture(r["image"]), size) for r in rows]))
        frames_done += len(rows)
        log(f"generated {clip}: {len(rows)} frames")
    return {"run": str(config.run), "checkpoint": getattr(pipeline, "source", None),
            "data": str(config.data), "split": config.split, "clips": len(clip_ids), "clips_kept": len(finished),
            "frames": frames_done, "size": size, "steps": config.steps, "guidance_scale": config.guidance_scale,
            "seed": config.seed}
