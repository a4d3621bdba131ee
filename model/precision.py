"""The precisions a DisCo model samples in (``generate --dtype``, ``evaluate --run --dtype``):
checkpoints hold float32 weights, cast on loading."""

from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")


def on_cuda(device) -> bool:
    """Whether a torch device string (``cuda``, ``cuda:1``, ``cpu``) names a CUDA GPU."""
    return str(device).split(":")[0] == "cuda"


def resolve_device(device: str) -> str:
    """``auto``: the GPU where there is one (the full model samples a frame in seconds there, in
    minutes on a CPU), else the CPU; any other device as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def no_cuda_reason() -> str:
    """Why PyTorch here cannot use a GPU it was given."""
    import torch

    return "a PyTorch built without CUDA" if torch.version.cuda is None else "no CUDA device it can open"


def dtype_problem(dtype: str, device) -> str | None:
    """Why ``dtype`` cannot sample on ``device``, or None: float16 only where it is fast and
    complete, on a GPU; bfloat16 and float32 anywhere."""
    if dtype not in DTYPES:
        return f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}"
    if dtype == "float16" and not on_cuda(device):
        return "--dtype float16 needs a CUDA --device; on the CPU use bfloat16 or float32"
    return None


def gpu_devices(device, gpus: int) -> list[str]:
    """The ``gpus`` CUDA devices frames are generated on, from ``device``'s index on (``cuda``:
    from 0)."""
    if gpus <= 1:
        return [str(device)]
    first = int(str(device).split(":")[1]) if ":" in str(device) else 0
    return [f"cuda:{first + k}" for k in range(gpus)]


def gpus_problem(gpus: int, device) -> str | None:
    """Why ``--gpus`` cannot be had on ``device``, or None."""
    if gpus < 1:
        return f"--gpus must be at least 1, not {gpus}"
    if gpus == 1:
        return None
    if not on_cuda(device):
        return f"--gpus {gpus} needs CUDA devices (--device cuda); it is {device}"
    import torch

    from disco.pipeline.cluster import in_ray_job

    last = int(gpu_devices(device, gpus)[-1].split(":")[1])
    if last >= torch.cuda.device_count():
        # The GPUs of this process's node: a `ray job submit` driver sees those Ray reserved for it.
        hint = (f" (a `ray job submit` job sees the GPUs it reserves: submit it with --entrypoint-num-gpus {last + 1}; "
                "--gpus uses the GPUs of the driver's node only)") if in_ray_job() else ""
        return (f"--gpus {gpus} from {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}{hint}")
    return None
