"""A matting backend on a make-believe GPU (tests only): declared a CUDA backend, so the GPU
pipeline gives its actors GPU shares and ``--device cuda`` accepts it, while it computes the
centre box on the CPU. Imported by a ``disco-cli`` process of its own (and so by its Ray actors,
by the module name the registry records), never by the test session: the session's registry
stays as it is."""

from __future__ import annotations

from annotator_plugin import CentreBox

from disco.pipeline.annotators.registry import Backend, register

register(Backend(name="centre-box-gpu", roles=("matting",), gpu=True, files=lambda root, options: [],
                 build=lambda role, options, shared: CentreBox(options),
                 summary="the centre box on a make-believe GPU (tests only)"))
