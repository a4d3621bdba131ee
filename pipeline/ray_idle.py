"""A rest for Ray Data's scheduling loop while it only polls.

Ray Data's streaming executor loops without pausing while nothing it waits for has changed
(ray-project/ray#65060): while the consumer holds a training stream back, or while the annotator
actors of ``preprocess`` work through their units, the driver's loop takes most of a core. On a
machine with few cores that core is taken from the model or from the actors. A step that blocked
waiting for a task spent little CPU for its wall time and is left alone; a step that spent its
whole interval on the CPU was polling, and the loop rests ``IDLE_PAUSE_S``, far less than a block
or a unit takes.
"""

from __future__ import annotations

import functools
import time

IDLE_PAUSE_S = 0.03


class IdlePause:
    """Call ``step()`` once per scheduling step; it sleeps when the last interval was all CPU."""

    def __init__(self):
        self._last: tuple[float, float] | None = None

    def step(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        if self._last is not None and cpu - self._last[1] > 0.5 * (wall - self._last[0]):
            time.sleep(IDLE_PAUSE_S)
        self._last = (time.perf_counter(), time.thread_time())


@functools.cache
def idle_pause_callback():
    """The Ray Data execution callback class that rests the loop (see above; one class, so it is
    registered once however many runs a process makes), or None where this Ray lacks the callback
    interface. Register it in a dataset's own ``context.custom_execution_callback_classes``."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:
        return None

    class RestWhilePolling(ExecutionCallback):
        def __init__(self):
            self._pause = IdlePause()

        def on_execution_step(self, executor) -> None:
            self._pause.step()

    return RestWhilePolling
