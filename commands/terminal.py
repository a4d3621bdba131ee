"""What every command shares: the error console, one-line usage errors (the commands' own and
click's), option choices as enums, the defaults of a stage's config object, the device check."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import SimpleNamespace

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

console = Console(stderr=True)

RAY_ADDRESS_HELP = ("Ray cluster to run on: HOST:PORT, or auto for the one `ray start` runs on this machine "
                    "(default: a private local instance on 127.0.0.1; $DISCO_RAY_TIMEOUT s to reach a cluster, 60).")


class ProgressLines:
    """Where no terminal shows a progress bar (a ``ray job submit`` job's log, output sent to a
    file), a line at most every ``EVERY_S`` seconds and at the end, so that an hours-long job's
    log says how far it is (rich draws a bar there only once, when it stops)."""

    EVERY_S = 10.0

    def __init__(self, bar, first_after_s: float = 0.0):
        self.console = bar.console
        self.on = not bar.console.is_terminal and not bar.disable
        self.last = time.monotonic() - self.EVERY_S + first_after_s

    def say(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if self.on and (final or now - self.last >= self.EVERY_S):
            self.last = now
            say(f"progress: {text}", self.console)


def say(message: str, on: Console | None = None) -> None:
    """A line of a command's output: paths and library messages as text, never rich markup (nor
    emoji codes: ``run:ok:`` in a path is no emoji), and
    a long line left whole for the terminal to wrap. Rich wraps at the console's width, 80 columns
    where there is no terminal (a ``ray job submit`` job's log, output sent to a file): a path
    longer than that came out cut in two lines, which no copy and paste takes back."""
    (on or console).print(message, highlight=False, markup=False, emoji=False, soft_wrap=True)


def print_error(message: str) -> None:
    # A message quotes paths and library errors: its brackets are text, never rich markup.
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While the block runs, SIGTERM (what `ray job stop`, Slurm and Kubernetes send first)
    interrupts it as Ctrl-C does (KeyboardInterrupt), so that the command says what it kept
    instead of dying without a word. Main thread only (signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def clear_progress(bar) -> None:
    """A rich ``Progress`` stopped with its bars removed: an error's line alone, not an empty bar
    under it."""
    for task in list(bar.task_ids):
        bar.remove_task(task)
    bar.stop()


def usage_error(message: str) -> None:
    print_error(message)
    raise typer.Exit(2)


class OneLineErrors(TyperGroup):
    """The app's group: click's own usage errors (an unknown option, a choice not offered, a value
    out of range, a missing option) print as one ``error:`` line naming the command's ``--help``,
    like the commands' own errors, instead of a usage block and a framed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        except TyperException as exc:  # click's usage errors, as typer vendors them
            message = _choice_message(exc) or exc.format_message()
            if not message:  # no arguments at all: the help was the answer (typer's no_args_is_help)
                sys.exit(getattr(exc, "exit_code", 2))
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                message += f" (see `{ctx.command_path} --help`)"
            print_error(message)
            sys.exit(getattr(exc, "exit_code", 2))
        # What a command returns is its exit code here (click's non-standalone mode): ours return
        # None (0) or end with typer.Exit(code).
        sys.exit(code if isinstance(code, int) else 0)


# What each set of choices is called in an error ("unknown stage 'warmup'"), by its values.
_CHOICE_NAMES: dict[tuple[str, ...], str] = {}


def choices(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """The values an option accepts, as the string enum typer lists in the help and checks;
    ``name`` says what they are in an error."""
    values = tuple(values)
    _CHOICE_NAMES[values] = name
    return enum.Enum(name.title().replace(" ", ""), {value: value for value in values}, type=str)


def _choice_message(exc: Exception) -> str | None:
    """A value outside an option's choices, said as the commands say it: what was unknown, which
    option, and what it may be."""
    found = re.search(r"'(.*)' is not one of (.+)$", getattr(exc, "message", "") or "")
    param = getattr(exc, "param", None)
    if not found or param is None:
        return None
    offered = tuple(re.findall(r"'([^']*)'", found.group(2)))
    what = _CHOICE_NAMES.get(offered, param.name.replace("_", " "))
    return f"unknown {what} {found.group(1)!r} ({param.opts[0]}); choose one of {', '.join(offered)}"


def plain(value):
    """An option's value as the stage's config object takes it: an enum member becomes its string."""
    return value.value if isinstance(value, enum.Enum) else value


def defaults(config_class) -> SimpleNamespace:
    """The field defaults of a stage's config dataclass: a command's options take their defaults
    from here, so each default is written once, in the config object."""
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(config_class)
                              if f.default is not dataclasses.MISSING})


def check_device(device: str) -> None:
    """A GPU asked for where there is none is the user's mistake, never a silent fallback to CPU
    (``auto`` picks what there is)."""
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        usage_error(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if kind not in ("cpu", "cuda"):  # mps, xpu, meta...: a traceback deep in the run otherwise
        usage_error(f"--device {device}: this command runs on cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        usage_error(f"--device {device}: no CUDA device is available on this machine")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        usage_error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                    f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def job_outputs(**paths) -> None:
    """Under ``ray job submit --working-dir``, a relative output would be written into Ray's
    temporary copy of that folder, deleted after the job: one line, exit 2 (``check_job_paths``)."""
    from disco.pipeline.cluster import check_job_paths
    from disco.pipeline.errors import ConfigError

    try:
        check_job_paths(**paths)
    except ConfigError as exc:
        usage_error(str(exc))


def command_device(device: str) -> str:
    """``check_device``, then the device resolved (the one a GPU message names). A ``ray job
    submit`` job's driver gets a GPU only when the job asks for one (``--entrypoint-num-gpus``):
    ``auto`` on a driver that sees none says so in one line as it goes on on the CPU."""
    from disco.model.precision import on_cuda, resolve_device
    from disco.pipeline.cluster import in_ray_job, job_gpus_unreserved

    check_device(device)
    resolved = resolve_device(device)
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device == "auto" and resolved == "cpu" and in_ray_job() and given and not job_gpus_unreserved():
        # The job's driver has GPUs named (Ray's, for --entrypoint-num-gpus, or the node's own
        # CUDA_VISIBLE_DEVICES), and PyTorch cannot use them: submitting with that flag is no cure.
        from disco.model.precision import no_cuda_reason

        say(f"this job's driver has GPU {given} (CUDA_VISIBLE_DEVICES), and PyTorch here finds {no_cuda_reason()} "
            "(check the node's NVIDIA driver and PyTorch build), so it runs on the CPU")
    elif device == "auto" and resolved == "cpu" and in_ray_job():
        say("this job's driver sees no GPU, so it runs on the CPU (Ray gives a job's driver a GPU only when it is "
            "submitted with --entrypoint-num-gpus 1)")
    elif on_cuda(resolved) and job_gpus_unreserved():
        # Ray shows such a driver every GPU of its node and reserves none: its actors and other
        # jobs' get the same GPUs (out of memory, or both at half speed), and nothing says why.
        say(f"this job's driver runs on {resolved}, a GPU Ray did not reserve for it (the job was submitted without "
            "--entrypoint-num-gpus): Ray may give it to other work too; submit with --entrypoint-num-gpus N (N: the "
            "GPUs it uses) to have them reserved")
    return resolved


def gpus_named(device: str, gpus: int | None) -> str:
    """The GPUs a run sampled on, for its out-of-memory line: with ``--gpus N`` any of them may be
    the one that ran out."""
    return device if (gpus or 1) <= 1 else f"{device} or another of the --gpus {gpus}"


def out_of_memory(device: str, batch_size: int, generating: bool = True, kept: str = "",
                  temporal: bool = False) -> None:
    """A GPU that runs out of memory: one line saying what to lower, not a CUDA traceback
    (``kept``: what of the work stays, said after it; ``temporal``: a temporal-module model,
    which samples a whole window of frames at once whatever the batch size)."""
    lower = "--batch-size (or --size)" if generating else "--batch-size"
    if generating and temporal:
        lower += (" (a temporal-module model samples whole windows of its clip length, at least one at a time: "
                  "below two windows' frames --batch-size changes nothing, --size does)")
    usage_error(f"out of GPU memory on {device} at --batch-size {batch_size}: lower {lower}, "
                f"or free the GPU of other work{kept}")
