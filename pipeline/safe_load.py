"""Reading a pickled torch checkpoint that someone else made without running pickled code:
``torch.load(weights_only=True)`` takes tensors, plain containers and numbers, ``OrderedDict``,
``torch.Size`` and ``set``; ``SAFE_GLOBALS`` adds ``argparse.Namespace`` (a bag of attributes
that trainers save beside the weights: DeepSpeed client state, the ``args`` of DETR-family
checkpoints such as GroundingDINO's). Anything else is refused before it is built."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

SAFE_GLOBALS = (argparse.Namespace,)


def load_tensors_only(path: str | Path, mmap: bool = False):
    """``torch.load`` of ``path`` on the CPU, nothing but tensors, plain values and SAFE_GLOBALS;
    a refused file raises ``pickle.UnpicklingError`` (``refusal`` says why in one line)."""
    import torch

    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def refusal(exc: pickle.UnpicklingError) -> str:
    """Why the unpickler refused a file, in a few words (torch's message spans many lines and
    suggests ``weights_only=False``, which would run whatever code the file carries)."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found:
        return f"it holds a pickled {found.group(1)}, not only tensors and plain values"
    opcode = re.search(r"Unsupported operand (\d+)", str(exc))
    return "it is damaged or not a tensors-only checkpoint" + (
        f" (pickle opcode {opcode.group(1)} is not allowed)" if opcode else "")
