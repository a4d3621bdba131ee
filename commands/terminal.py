"""What every command shares: the error console, one-line usage errors, the device check."""

from __future__ import annotations


import typer
from rich.console import Console
from rich.markup import escape


console = Console(stderr=True)


def usage_error(message: str) -> None:
    # A message quotes paths and library errors: its brackets are text, never rich markup.
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)



RAY_ADDRESS_HELP = ("Ray cluster to run on: HOST:PORT, or auto for the one `ray start` runs on this machine "
                    "(default: a private local instance on 127.0.0.1; $DISCO_RAY_TIMEOUT s to reach a cluster, 60).")


def check_device(device: str) -> None:
    """A GPU asked for where there is none is the user's mistake, never a silent fallback to CPU."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        usage_error(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if kind == "cuda" and not torch.cuda.is_available():
        usage_error(f"--device {device}: no CUDA device is available on this machine")
