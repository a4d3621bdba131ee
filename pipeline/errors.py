"""The error an input raises when it cannot become triplets; it becomes an ``errors`` row."""

from __future__ import annotations


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
