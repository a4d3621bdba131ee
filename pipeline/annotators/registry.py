"""The annotator backends, each declared once with ``register``.

A backend is one file that ends with a ``register(Backend(...))`` declaration: its name, the roles
it fills (matting, pose), whether it is a CUDA model, the packages it imports, the weight files it
needs, how to build it, how to fill a weights folder with random weights of its architecture, and
the options it reads. Everything else reads this registry: the ``auto`` choice and the weights
check (``resolve``), ``doctor``, the pool planner, the CLI's choices and help, the manifest's list
of model files, and the random-weight folders of the tests and benchmarks.

The built-in backends are loaded on the first question asked of the registry; so are backends
that installed packages declare under the ``disco.annotators`` entry-point group (the value is the
module to import). A backend declared anywhere else joins by importing its module; Ray actors
import it too, by the module name recorded here (``load``), so it must be importable on the nodes.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROLES = ("matting", "pose")
# In the order `auto` prefers them, within a role: SAM 2 before Grounded-SAM (masks tracked
# through a video unit instead of drawn anew per frame), DWPose before OpenPose (the field's pose
# condition since 2024: OpenPose's format, more accurate and faster).
BUILTIN_MODULES = (
    "disco.pipeline.annotators.mediapipe_backend",
    "disco.pipeline.annotators.sam2_backend",
    "disco.pipeline.annotators.grounded_sam",
    "disco.pipeline.annotators.dwpose_backend",
    "disco.pipeline.annotators.openpose_backend",
)
ENTRY_POINTS = "disco.annotators"


class BackendError(ValueError):
    """A backend that does not exist, or cannot run here as asked (no CUDA, missing weights)."""


@dataclass(frozen=True)
class Backend:
    """One annotator backend.

    ``build(role, options, shared)`` returns the annotator of ``role``: for matting an object with
    ``matte(frame) -> Matte`` (and optionally ``matte_batch(frames)``), for pose one with
    ``pose(frame) -> Pose``. ``options`` holds every backend option (``weights``, ``device``,
    ``hands``, ``face``, ``joint_threshold``, ``sam_model``, ...) and ``backends``, the name of the
    backend of each role; ``shared`` is a dict that lives as long as the annotators of one actor,
    for a model two roles share. Objects in ``shared`` and the annotators may have
    ``begin_unit(sequence)`` (a new unit of frames; ``sequence``: consecutive frames of one shot)
    and ``close()``; each is called once per object.
    """

    name: str
    roles: tuple[str, ...]
    build: Callable[[str, dict, dict], Any]
    summary: str = ""  # a few words for the CLI help and doctor
    gpu: bool = False  # a CUDA model: asked for by name it refuses the CPU unless --device cpu
    auto: bool = False  # a candidate of `auto` (GPU backends: with CUDA and their weights present)
    packages: tuple[str, ...] = ()  # the Python packages it imports (doctor)
    options: tuple[str, ...] = ()  # the CLI options it reads, for the help
    # The files it needs in the weights folder with these options (WeightFile list).
    files: Callable[[Path, dict], list] | None = None
    # Manifest entries (name, sha256) of model files that ship inside its package, from the
    # options and the resolved backends.
    embedded_files: Callable[[dict, dict], list[dict]] | None = None
    # Fills a weights folder with its architecture's files, randomly initialised (tests, benchmarks).
    random_weights: Callable[[Path, str, dict], None] | None = None
    # The detection score a person must reach, from the options and --min-visibility.
    person_score: Callable[[dict, float], float] | None = None
    # Why it cannot run on CUDA with what is installed here (a library built without CUDA), or None.
    cuda_missing: Callable[[], str | None] | None = None
    label: str = ""  # how messages name it (default: its name)
    module: str = field(default="", compare=False)  # where it was declared (set by register)


# No lock: a dict assignment is atomic, and holding one while importing the backend modules could
# deadlock against a thread importing one of them (it would wait for the lock in ``register``).
_registry: dict[str, Backend] = {}
_loaded = False
_loading = False


def register(backend: Backend) -> Backend:
    """Add ``backend`` (a later declaration of the same name replaces the earlier one)."""
    if backend.name in ("auto", "none") or not backend.name:
        raise ValueError(f"{backend.name!r} cannot name a backend")
    unknown = [r for r in backend.roles if r not in ROLES]
    if not backend.roles or unknown:
        raise ValueError(f"backend {backend.name!r}: roles must be among {', '.join(ROLES)}, not {backend.roles}")
    if backend.gpu and backend.files is None:
        raise ValueError(f"backend {backend.name!r}: a CUDA backend names its weight files")
    module = backend.module or getattr(backend.build, "__module__", None) or ""
    if module in ("", "__main__"):
        raise ValueError(f"backend {backend.name!r}: declare it in an importable module (Ray's actors import it "
                         "by name), or give module=")
    backend = replace(backend, module=module, label=backend.label or backend.name)
    _registry[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a backend (a test's own, once the test is done)."""
    _registry.pop(name, None)


def _load_all() -> None:
    global _loaded, _loading
    if _loaded or _loading:  # _loading: the modules below call register, which must not recurse here
        return
    _loading = True
    try:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        from importlib.metadata import entry_points

        for point in entry_points(group=ENTRY_POINTS):
            try:  # one broken plugin must not stop every command
                importlib.import_module(point.module)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"annotator plugin {point.name} ({point.value}) failed to load: {exc}", stacklevel=2)
        _loaded = True
    finally:
        _loading = False


def load(name: str, module: str | None = None) -> Backend:
    """The backend ``name``, importing ``module`` first where it is not known yet (a Ray actor
    building a backend that its driver's process declared)."""
    _load_all()
    if name not in _registry and module:
        importlib.import_module(module)
    return get(name)


def get(name: str) -> Backend:
    _load_all()
    try:
        return _registry[name]
    except KeyError:
        raise BackendError(f"unknown annotator backend {name!r}; known: {', '.join(sorted(_registry))}") from None


def backends(role: str | None = None) -> list[Backend]:
    """The registered backends (of ``role``): the built-in ones first, in ``BUILTIN_MODULES``
    order whatever imported them first, then the others in the order they were declared."""
    _load_all()

    def rank(b: Backend) -> int:
        return BUILTIN_MODULES.index(b.module) if b.module in BUILTIN_MODULES else len(BUILTIN_MODULES)

    return sorted((b for b in _registry.values() if role is None or role in b.roles), key=rank)


def choices(role: str) -> tuple[str, ...]:
    """What ``--matting`` / ``--pose`` accept: ``auto``, every backend of the role, and for pose ``none``."""
    return ("auto", *(b.name for b in backends(role)), *(("none",) if role == "pose" else ()))


def describe_choices(role: str) -> str:
    """The choices with what each needs, for the CLI help."""
    parts = ["auto"]
    for b in backends(role):
        needs = ", ".join((["GPU", "--weights"] if b.gpu else []))
        parts.append(f"{b.name} ({needs})" if needs else b.name)
    if role == "pose":
        parts.append("none")
    return ", ".join(parts)


def gpu_backend(name: str) -> bool:
    """Whether ``name`` (a resolved backend, or ``none``) is a CUDA model."""
    return name not in ("none", "auto") and get(name).gpu
