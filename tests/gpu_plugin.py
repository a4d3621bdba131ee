"""A matting backend on a make-believe GPU (tests only): declared a CUDA backend, so the GPU
pipeline gives its actors GPU shares and ``--device cuda`` accepts it, while it computes the
centre box on the CPU. Imported by a ``disco-cli`` process of its own (and so by its Ray actors,
by the module name the registry records), never by the test session: the session's registry
stays as it is."""

from __future__ import annotations

import os

from annotator_plugin import CentreBox

from disco.pipeline import decode
from disco.pipeline.annotators.registry import Backend, register

register(Backend(name="centre-box-gpu", roles=("matting",), gpu=True, files=lambda root, options: [],
                 build=lambda role, options, shared: CentreBox(options),
                 summary="the centre box on a make-believe GPU (tests only)"))


# Where ``DISCO_TEST_VIDEO_OPENS`` names a file (set before the cluster starts, so every Ray
# process has it): each video a pipeline actor opens to decode frames (a probe opens none at a
# size) is a line there, with the actor's process id.
if os.environ.get("DISCO_TEST_VIDEO_OPENS"):
    _open_video = decode._open_video

    def _counted(path, **kwargs):
        if "width" in kwargs:
            with open(os.environ["DISCO_TEST_VIDEO_OPENS"], "a") as log:
                log.write(f"{os.getpid()} {os.path.basename(path)}\n")
        return _open_video(path, **kwargs)

    decode._open_video = _counted
