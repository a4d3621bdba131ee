"""disco: data pipeline and trainer for DisCo-style human dance generation."""

import os as _os

from disco.pipeline.errors import STOPS_THE_RUN as _STOPS_THE_RUN

__version__ = "0.1.0"

# A run-stopping error raised in an actor (a node without the weights or the storage) is said by
# the run in one line; the driver's Ray would print it first, stack and all, as a "(raylet) Task
# ... failed ... will be retried" message. Ray's documented switch, read when Ray is imported
# (nothing in disco imports Ray before this), drops its messages that carry the marker; a
# regex of the user's own is kept beside it.
_SKIP = "RAY_DEDUP_LOGS_SKIP_REGEX"
if _STOPS_THE_RUN not in _os.environ.get(_SKIP, ""):
    _os.environ[_SKIP] = "|".join(filter(None, [_os.environ.get(_SKIP), _STOPS_THE_RUN]))
