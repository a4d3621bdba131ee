"""Where the CUDA annotators find their weights: one documented folder, never a download.

``--weights DIR`` (or ``$DISCO_WEIGHTS``) holds one sub-folder per backend; each backend's own file
says what it needs there (``files`` in its ``register`` declaration), and the README lists them.
This module holds what every backend shares: the folder, a file it needs, the check that names
every missing file at once, and the manifest's record of what ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_ENV = "DISCO_WEIGHTS"


class WeightsError(FileNotFoundError):
    """A weights file a model needs is missing, or does not fit the network."""


@contextlib.contextmanager
def loading(path: str | os.PathLike):
    """Reading the weights file ``path`` (by a library's own loader: segment-anything's,
    controlnet-aux's): whatever it raises for a damaged or foreign file is a ``WeightsError``
    naming the file, which an actor turns into the run's one line (``actors._annotator``). A file
    that would run code when unpickled stays refused (``weights_only``), said in a few words."""
    import pickle

    import torch

    real_load = torch.load

    def tensors_only(*args, **kwargs):
        # Those loaders call torch.load without weights_only: safe only by torch's default, which
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment turns off. Asked for here.
        return real_load(*args, **{**kwargs, "weights_only": True})

    torch.load = tensors_only
    try:
        yield
    except (WeightsError, MemoryError):  # the host out of memory is not the file's fault
        raise
    except pickle.UnpicklingError as exc:
        from disco.pipeline.safe_load import refusal

        raise WeightsError(f"{path} was not loaded: {refusal(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load and the state-dict loaders raise many kinds
        from disco.pipeline.errors import first_line

        raise WeightsError(f"{path} is damaged or not the expected file ({type(exc).__name__}: "
                           f"{first_line(exc)})") from None
    finally:
        torch.load = real_load


@dataclass
class WeightFile:
    name: str  # path relative to the weights folder
    path: Path
    purpose: str

    @property
    def present(self) -> bool:
        return self.path.exists()


def weights_dir(explicit: str | os.PathLike | None) -> Path | None:
    """The weights folder: the flag, else the environment variable, else none. Absolute: the
    actors that load from it run in other working directories (Ray's workers, other nodes, a
    ``ray job submit`` job's)."""
    value = explicit or os.environ.get(WEIGHTS_ENV)
    return Path(os.path.abspath(Path(value).expanduser())) if value else None  # links kept: they may be per node


def first_present(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of several accepted file names that exists, else the preferred one (to name it)."""
    for name in names:
        if (folder / name).exists():
            return folder / name
    return folder / names[0]


def require(files: list[WeightFile], backend: str) -> None:
    """Raise one error naming every missing file and where it was expected."""
    missing = [f for f in files if not f.present]
    if missing:
        listed = "; ".join(f"{f.name} ({f.purpose}) expected at {f.path}" for f in missing)
        raise WeightsError(f"{backend} needs weights that are missing: {listed}")


def needs_folder(backend: str, root: Path | None) -> Path:
    """The weights folder, or the error that says how to give one."""
    if root is None:
        raise WeightsError(f"{backend} needs local weights: pass --weights DIR or set ${WEIGHTS_ENV} "
                           "(see the README for the expected layout)")
    return root


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe(files: list[WeightFile]) -> list[dict]:
    """Manifest entries: name and sha256 of each file that ran."""
    return [{"name": f.name, "sha256": sha256(f.path) if f.present else None} for f in files]
