"""The error an input raises when it cannot become triplets; it becomes an ``errors`` row.

Every unit of work (a listed entry, a decoded file, an annotated frame, an encoded row) runs
inside one boundary, ``input_error``, that turns *any* exception it raises into an ``InputError``:
the known kinds get a specific ``error_type`` that users can group by, anything else a generic
``unexpected_<ExceptionClass>``, so one input never stops a run. Only problems with the run itself
(its output folder, its options) stop it, as a ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path


class ConfigError(ValueError):
    """A user-supplied option that cannot work (or a run's own problem); the CLI turns it into a
    one-line usage error. Train, generate and evaluate raise it too."""


# A run-stopping error raised in a Ray actor or task (a node without the storage or the weights,
# a training worker without the run directory) reaches the driver inside whatever Ray wraps it
# in (tracebacks, the actor's or worker group's errors): this marker leads its one line there.
STOPS_THE_RUN = "stops the run:"


def stopping_error(*errors: BaseException) -> ConfigError | None:
    """The one-line ``ConfigError`` an actor, task or worker raised with ``STOPS_THE_RUN``, out of
    whatever Ray wrapped it in; None when none of ``errors`` holds one."""
    for exc in errors:
        for line in str(exc).splitlines():
            if STOPS_THE_RUN in line:
                return ConfigError(line[line.index(STOPS_THE_RUN) + len(STOPS_THE_RUN):].strip())
    return None


@contextlib.contextmanager
def stops_in_one_line():
    """Within the block, an error of Ray's (a task's, an actor pool's, a Ray Train worker
    group's, whose ``worker_failures`` it holds) that carries a ``STOPS_THE_RUN`` line is raised
    as that line's ``ConfigError``; any other passes unchanged."""
    try:
        yield
    except Exception as exc:
        stopped = stopping_error(exc, *(getattr(exc, "worker_failures", None) or {}).values())
        if stopped is None:
            raise
        raise stopped from None


class _RunStopsOffTheConsole(logging.Filter):
    """Drops a log record about an error that carries ``STOPS_THE_RUN``: the run says it in one
    line. Ray Data reports an actor that cannot start as a Ray bug ("Exception occurred in Ray Data
    or Ray Core internal code", "actors died during initialization", then the whole stack) on
    the console; its log file (``<session>/logs/ray-data``) keeps the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
        elif record.levelno >= logging.ERROR:
            exc = sys.exc_info()[1]  # two of those errors carry none: logged inside the except block
        else:
            return True
        return exc is None or stopping_error(exc) is None


_RUN_STOPS_OFF = _RunStopsOffTheConsole()

# Ray Data's resource manager warns, once its first stage (the matting actors of the GPU
# pipeline, the annotators of the CPU one) has waited STARVATION_WARNING_DELAY_S (60 s) for the
# resources to run anything, that the job may hang for ever; the "ray.data" logger is set to ERROR
# to keep its per-run notices off the console, which hid this one too. (Ray 2.60 checks no later
# stage, and counts the cluster's total resources, not what other jobs hold.)
STARVATION_LOGGER = "ray.data._internal.execution.resource_manager"
STARVATION_TEXT = "not enough to run any task"


class _StarvedStage(logging.Handler):
    def __init__(self, log):
        super().__init__(logging.WARNING)
        self.say = log

    def emit(self, record: logging.LogRecord) -> None:
        if STARVATION_TEXT in record.getMessage():
            self.say(f"warning: {record.getMessage()} The stage's actors cannot start on what the cluster has "
                     "(GPU shares, CPUs): the run waits for them, for ever where no autoscaler adds nodes; "
                     "lower --actors or --cpus-per-actor, or free the cluster of other work")
        elif record.levelno >= logging.ERROR:
            logging.getLogger("ray.data").handle(record)  # as before: Ray Data's own handlers


@contextlib.contextmanager
def starved_stages_reported(log):
    """Within the block, Ray Data's warning that a stage cannot start any task goes to ``log``
    in one line (the rest of that logger as before: errors only)."""
    logger = logging.getLogger(STARVATION_LOGGER)
    handler = _StarvedStage(log)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run_stops_off_ray_datas_console() -> None:
    """Keeps Ray Data's console report of a run-stopping error away (every other record of it
    still prints): its console handler is a ``StreamHandler`` (a user's ``FileHandler`` is one
    too, and keeps every record), its file handler is not."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_RUN_STOPS_OFF)  # the same object twice is kept once


class InputError(Exception):
    """A problem with one input (or one frame range of it) that must not stop the run.

    ``stage`` is one of ``schema.ERROR_STAGES``; ``error_type`` is a short stable reason
    (``empty_file``, ``not_an_image``, ``image_too_large``...) that users can group by.
    """

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message


# OSError numbers that say something about the input (not about the run's output).
_OS_ERRORS = {
    errno.ENOENT: "missing_file",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.ELOOP: "symlink_loop",
    errno.EISDIR: "not_a_file",
    errno.ENAMETOOLONG: "name_too_long",
    errno.EIO: "read_error",
}


def error_type_of(exc: BaseException) -> str:
    """The ``error_type`` of an exception an input raised."""
    if isinstance(exc, InputError):
        return exc.error_type
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return "image_too_large"
    if isinstance(exc, ValueError) and "Decompressed data too large" in str(exc):
        return "decompression_bomb"  # a PNG text chunk that expands past Pillow's limit
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        return _OS_ERRORS[exc.errno]
    if isinstance(exc, UnicodeError):
        return "bad_encoding"
    if isinstance(exc, MemoryError):
        return "out_of_memory"
    if isinstance(exc, GpuFailed):
        return "gpu_failed"  # it broke the GPU on every try (the actor restarted after each)
    if isinstance(exc, UnitTimedOut):
        return "unit_timeout"  # it ran past --unit-timeout on every try
    if isinstance(exc, WorkerCrashed):
        return "worker_crashed"  # its actor's process ended on every try
    if out_of_gpu_memory(exc):
        return "gpu_out_of_memory"
    if isinstance(exc, RecursionError):
        return "too_deeply_nested"
    return f"unexpected_{type(exc).__name__}"


# What ONNX Runtime says when the GPU is full (its arena, or CUDA's allocator); its exceptions
# (RuntimeException, Fail, ...) are classes of its own, not RuntimeError.
ORT_OUT_OF_MEMORY = ("Failed to allocate memory", "BFCArena", "CUDA failure 2: out of memory")


# cuDNN's and cuBLAS's own allocation failures: a RuntimeError, not torch.OutOfMemoryError.
LIBRARY_OUT_OF_MEMORY = ("CUDNN_STATUS_NOT_ENOUGH_MEMORY", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


class GivenUp(RuntimeError):
    """A unit (or frame) that ended its actor's process too often (``strikes``): its errors row,
    without running again."""


class GpuFailed(GivenUp):
    """The errors row of a unit that broke the GPU ``STRIKES`` times (``error_type`` gpu_failed)."""


class WorkerCrashed(GivenUp):
    """The errors row of a unit whose actor's process ended ``STRIKES`` times while on it
    (``error_type`` worker_crashed)."""


class UnitTimedOut(GivenUp):
    """The errors row of a unit that ran past ``--unit-timeout`` ``STRIKES`` times (``error_type``
    unit_timeout)."""


class DeviceLost(BaseException):
    """A CUDA error that leaves the device unusable for this process (``device_loss``): a
    ``BaseException``, past every per-frame and per-unit handler; ``error``: what was raised."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# What CUDA, cuBLAS, cuDNN and ONNX Runtime's CUDA provider say when the context is gone...
DEVICE_LOST = ("CUDA error", "CUDA failure", "illegal memory access", "device-side assert",
               "CUBLAS_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_EXECUTION_FAILED", "uncorrectable ECC",
               "unspecified launch failure")
# ... and what among those leaves it usable (memory, a build without kernels for this GPU).
DEVICE_USABLE = ("out of memory", "ALLOC_FAILED", "no kernel image")


def device_lost(exc: BaseException) -> bool:
    """A CUDA error that leaves the process's context unusable (``device_loss``). Never a file's
    trouble, whatever its name or message says, nor a unit given up for the GPU failures it
    caused (its message quotes them)."""
    if isinstance(exc, (OSError, GivenUp)):
        return False
    text = str(exc)
    if any(marker in text for marker in DEVICE_USABLE):
        return False
    if out_of_gpu_memory(exc):
        return False
    torch = sys.modules.get("torch")
    accelerator = getattr(torch, "AcceleratorError", None) if torch is not None else None
    return (accelerator is not None and isinstance(exc, accelerator)) or any(marker in text for marker in DEVICE_LOST)


def out_of_gpu_memory(exc: BaseException) -> bool:
    """The GPU's memory ran out (PyTorch's error, cuDNN's or cuBLAS's workspace that could not be
    allocated, or ONNX Runtime's): the device stays usable."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in LIBRARY_OUT_OF_MEMORY):
        return True
    from_ort = type(exc).__module__.startswith("onnxruntime") or str(exc).startswith("[ONNXRuntimeError]")
    return from_ort and any(marker in str(exc) for marker in ORT_OUT_OF_MEMORY)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message in one line (its class name where it has none), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class RunFailed(RuntimeError):
    """A run that failed after its actors started (Ray Data's error: an actor that cannot start
    again, a lost connection): what was committed is kept, and its manifest (``manifest``, None
    where it could not be written) names the failure (``run.failed``); ``error``: what failed.
    Its message: the error's first line, and its last where that says more (a remote error's
    traceback ends on its cause)."""

    def __init__(self, error: BaseException, manifest: dict | None = None):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = first_line(error)
        cause = f" ({lines[-1][:200]})" if len(lines) > 1 and lines[-1] not in first else ""
        super().__init__(f"the run failed: {first}{cause}")
        self.error, self.manifest = error, manifest


def input_error(stage: str, exc: BaseException) -> InputError:
    """Any exception raised for one input, as the ``InputError`` of its errors row."""
    if isinstance(exc, InputError):
        return exc
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or text}: {display_path(exc.filename)}"
    return InputError(stage, error_type_of(exc), f"{type(exc).__name__}: {text}"[:500])


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as text that any UTF-8 consumer (Arrow, JSON, a terminal) takes: a name that is not
    valid UTF-8 keeps its bytes, escaped as ``\\xNN`` (the form ``os.fsencode`` gives)."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def error_record(stage: str, error_type: str, message: str, input_path: str, sample_id: str | None = None) -> dict:
    """One row of the errors table (ERRORS_SCHEMA): what failed, where, and why."""
    return {"input_path": input_path, "sample_id": sample_id, "stage": stage, "error_type": error_type,
            "message": message}


def failed_unit(unit: dict, exc: InputError) -> dict:
    """A unit that carries the error of its input instead of work (it becomes one errors row)."""
    return {**unit, "error_type": exc.error_type, "error_message": exc.message, "error_stage": exc.stage}


def read_options_yaml(path: Path) -> dict:
    """A YAML file of option: value (a training config, a run's config.yaml) as a dict, its keys
    as field names (``batch-size`` as on the command line is ``batch_size``); a file that is not
    valid YAML or not a mapping is a one-line ``ConfigError``."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _unwritable(path: Path) -> str | None:
    """Why a file or folder could not be made at ``path`` (nothing is made here): the nearest part
    of it that exists must be a folder this process may write into."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + (" (a read-only file system)" if _read_only(existing) else "")
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def output_file_problem(path: Path, flag: str, inputs: tuple = (), reads: frozenset = frozenset()) -> str | None:
    """What keeps ``path`` from being written as a command's output file, checked before the
    work (the write came last: a folder of that name, or a file where its folder should be, lost
    the work to a traceback), or None. ``inputs``: files the command reads, which the output must
    not replace; ``reads``: the suffixes of the files it reads in an input folder. Nothing is written."""
    path = Path(path)
    if path.is_dir():
        return f"{flag} {path} is a folder; give a file name"
    for given in inputs:
        if given is not None and Path(given).exists() and path.exists() and os.path.samefile(path, given):
            return f"{flag} {path} is an input of this command ({given}); it would be overwritten"
        # A picture or video inside an input folder (a frame of --gt) is the command's input too
        # (not any file there: a report written into it last time is no input).
        if given is not None and Path(given).is_dir() and path.is_file() and read_by_suffix(path, reads) and \
                Path(os.path.realpath(path)).is_relative_to(os.path.realpath(given)):
            return f"{flag} {path} is a file of the input folder {given}; it would be overwritten"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{flag} {path} cannot be written: it is not writable"
    why = _unwritable(path.parent)
    return f"{flag} {path} cannot be written: {why}" if why else None


def read_by_suffix(path: Path, suffixes) -> bool:
    """A file a command reads in a folder, by its suffix, and not a hidden file (macOS copies leave
    ``._0003.png`` beside ``0003.png``: AppleDouble metadata, not a picture)."""
    return path.suffix.lower() in suffixes and not path.name.startswith(".")


def output_folder_problem(path: Path, flag: str) -> str | None:
    """What keeps ``path`` from being a command's output folder (a file of that name, a file
    above it, no permission), checked before the work; None where it can be. Nothing is made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{flag} {path} is a file, not a folder"
    why = _unwritable(path)
    return f"{flag} {path} cannot be written: {why}" if why else None
