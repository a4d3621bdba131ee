"""A weights folder in the documented layout, filled with randomly initialised networks.

The tests and the annotator benchmark use it where no real weights may be downloaded: the
architectures are the real ones (each backend's ``random_weights`` in its declaration), so the
loading code and every tensor shape are exercised; only the values are random. ``size="small"``
shrinks what a backend can shrink (GroundingDINO's widths and query count) to keep a CPU test
quick; ``"full"`` is each network's own configuration.
"""

from __future__ import annotations

from pathlib import Path

from disco.pipeline.annotators.registry import backends


def write_random_weights(root: Path, *, size: str = "small", sam_model: str = "vit_b", sam2_model: str = "tiny",
                         hands: bool = True, face: bool = True, only: tuple[str, ...] | None = None) -> Path:
    """The weight files under ``root`` of every registered backend (or of the backends named in
    ``only``); returns ``root``."""
    root = Path(root)
    options = {"sam_model": sam_model, "sam2_model": sam2_model, "hands": hands, "face": face}
    for backend in backends():
        if backend.random_weights is not None and (only is None or backend.name in only):
            backend.random_weights(root, size, options)
    return root
