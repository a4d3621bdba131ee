"""DISCO_STACK_SAMPLES: where a training process spends its time, sampled in the process."""

from __future__ import annotations

import threading
import time

from disco.train.stack_samples import ENV, stack_samples


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _sleeper(stop: threading.Event) -> None:
    stop.wait()


def test_samples_every_thread_and_names_where_the_time_went(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "stacks"))
    stop = threading.Event()
    helper = threading.Thread(target=_sleeper, args=(stop,), name="helper")
    helper.start()
    try:
        with stack_samples("rank0-test") as sampler:
            _spin(0.4)
    finally:
        stop.set()
        helper.join()
    (written,) = (tmp_path / "stacks").glob("stacks-rank0-test-*.txt")
    counts: dict[str, int] = {}
    for line in written.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        counts[stack] = counts.get(stack, 0) + int(n)
    assert sum(counts.values()) >= sampler.samples * 2 >= 2 * 10  # both threads, every sample
    main = {s: n for s, n in counts.items() if s.startswith("MainThread;")}
    spinning = sum(n for s, n in main.items() if s.split(";")[-1].startswith("_spin (test_stack_samples.py:"))
    assert spinning >= 0.8 * sum(main.values())  # the main thread's time went to _spin
    assert any(s.startswith("helper;") and "_sleeper (test_stack_samples.py:" in s for s in counts)


def test_off_unless_the_variable_names_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with stack_samples("rank0-test") as sampler:
        _spin(0.05)
    assert sampler is None and not list(tmp_path.rglob("stacks-*"))
