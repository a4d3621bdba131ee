"""Where a training process spends its time: with ``DISCO_STACK_SAMPLES=DIR`` set, every thread's
Python stack is sampled every 10 ms while the training loop runs, and written at its end as
``DIR/stacks-<label>-<pid>.txt`` in the collapsed format flame-graph tools read (one line per
distinct stack, ``thread;outer;...;inner count``).

Why in the process: the GPU machines this is meant for run under a sandbox where py-spy and perf
cannot attach, and a Ray Train worker is a process the user does not start. Off unless the
variable is set (the sampler holds the GIL a few microseconds per thread every sample).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
from pathlib import Path

ENV = "DISCO_STACK_SAMPLES"


def _frame_name(frame) -> str:
    code = frame.f_code
    return f"{getattr(code, 'co_qualname', code.co_name)} ({Path(code.co_filename).name}:{code.co_firstlineno})"


class StackSampler:
    def __init__(self, path: Path, interval_s: float = 0.01):
        self.path, self.interval_s = path, interval_s
        self.counts: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disco-stack-sampler", daemon=True)

    def _run(self) -> None:
        own = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == own:
                    continue
                stack = []
                while frame is not None:
                    stack.append(_frame_name(frame))
                    frame = frame.f_back
                self.counts[(names.get(ident, str(ident)), *reversed(stack))] += 1
            self.samples += 1

    def start(self) -> "StackSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{';'.join(s.replace(';', ',') for s in stack)} {n}" for stack, n in self.counts.most_common()]
        self.path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def stack_samples(label: str):
    """Sample this process's stacks while the block runs, if ``DISCO_STACK_SAMPLES`` names a folder."""
    folder = os.environ.get(ENV)
    if not folder:
        yield None
        return
    sampler = StackSampler(Path(folder) / f"stacks-{label}-{os.getpid()}.txt").start()
    try:
        yield sampler
    finally:
        sampler.stop()
