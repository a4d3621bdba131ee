"""One input cannot end its actor's process for ever.

Ray Data restarts a pool actor whose process dies, as often as it dies, and hands it the same
call again (``max_restarts`` and ``max_task_retries`` -1, its defaults). An input that kills the
process (FFmpeg aborting on a damaged video, a segfault in native code, the kernel's or Ray's
out-of-memory killer while it is decoded or annotated) would then run, kill and restart for
ever, the models reloaded each time, and the run would never end.

So every actor process keeps a log in the output folder (``.strikes/RUN/``, storage every node
sees): a line naming each unit as its work starts, and one when it is done, whatever Python
raised (that is the unit's errors row). A process that died left the unit it was on as its
log's last line: a strike against that unit (``device_loss`` writes why, where the GPU broke).
A restarted actor (the only one that is handed a call again) reads the logs once; a unit with
``STRIKES`` of them becomes its errors row (``worker_crashed``, or ``gpu_failed``) without
running again, and the units beside it in a call are never blamed. A death while a call's
shards are written (a kill for memory as a shard is packed, a hung mount) is a strike against
the call (``write``): after ``STRIKES`` of them, its units are errors rows. The log costs two
buffered writes per unit (one still image is a unit; four where shards are written), no file
created or removed per unit: metadata operations on NFS are synchronous. A new run (a resume)
starts from no strikes: the next run's start (``OutputStore.recover``) removes the folder.

A death costs the whole unit only where the unit is one frame (a still): a unit of several frames
(a segment of a video, a stretch of a frame folder, a range of a tar shard's samples) that one
death struck runs again with its frames apart (``frames_apart``): each frame's work is a window of
its own (``frame``), so the next death on it is a strike against that frame, and a frame with
``STRIKES`` of them is its own errors row while the others are written. A death between the
frames (the unit's own work) is the unit's second strike.

A unit that never ends (a decoder stuck in native code on a damaged file, a read from a hung
mount) would hold its actor, and the run, for ever: a unit may take ``--unit-timeout`` seconds.
Past them faulthandler's watchdog (a C thread: it needs no GIL, which a stuck extension may
hold) writes every thread's stack into the process's ``.stuck`` file beside its log and ends the
process; that death is a strike of its own kind (``unit_timeout``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import os
import secrets
import socket
import tempfile
import threading
from pathlib import Path

from disco.pipeline.errors import DeviceLost, GpuFailed, UnitTimedOut, WorkerCrashed, device_lost

STRIKES = 2
# Deaths on a unit's frames, apart, past which the unit is its errors row: two frames' worth and
# one more (a damaged stretch of a video kills every frame decoded through it, one after another).
APART_DEATHS = 2 * STRIKES + 1
FOLDER = ".strikes"
STUCK = ".stuck"  # suffix of the file beside a process's log where its watchdog writes the stacks
UNIT_THREAD = "units run on thread "  # that file's first line


class _Process:
    """This process's log and what it read of the others' (per process: a restarted actor is a
    new process)."""

    log = None  # the open log file
    stuck = None  # the open file the watchdog writes into (``STUCK``)
    seen: dict[str, list[str]] | None = None  # unit key -> what each death on it left
    apart: tuple | None = None  # (settings, unit, stage) of the unit whose frames run apart now
    frame: str | None = None  # "KEY of UNIT-KEY" of the frame at work in such a unit (``mark_gpu``)


def strike_folder(settings: dict) -> Path:
    root = Path(settings["output"]) / FOLDER if settings.get("output") else \
        Path(tempfile.gettempdir()) / f"disco-strikes-{os.getuid()}"  # outside a run (a bare loop)
    return root / (settings.get("run") or "run")


def _key(unit: dict, stage: str) -> str:
    return hashlib.sha1(f"{stage}\0{unit['input_path']}\0{unit.get('unit_index', 0)}".encode()).hexdigest()


def _restarted() -> bool:
    """Whether this process is an actor Ray started again (only such an actor is handed a call
    that a dead process was on); outside a Ray actor, always (a bare loop, a test)."""
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed())
    except Exception:  # noqa: BLE001 - not in a Ray actor
        return True


def _read_deaths(folder: Path, own: Path | None) -> dict[str, list[str]]:
    """Unit key -> one entry per log whose last line is a unit's start (its process died on it);
    a frame's line (``frame``) counts under the frame's key and under "UNIT-KEY frames"."""
    seen: dict[str, list[str]] = {}
    try:
        logs = [p for p in folder.iterdir() if p != own and not p.name.endswith(STUCK)]
    except OSError:  # no folder yet: no death
        return seen
    for path in logs:
        try:
            with open(path, "rb") as log:  # its end only: a long run's log holds two lines per unit
                log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
                lines = log.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        kind, _, rest = (lines[-1] if lines else "").partition(" ")
        key, _, rest = rest.partition(" ")
        owner = None
        if rest.startswith("of "):
            owner, _, rest = rest[len("of "):].partition(" ")
        if key and kind in ("start", "gpu"):
            stuck = _stuck_at(path) if kind == "start" else None
            entry = f"timeout {stuck}" if stuck else f"{kind} {rest}"
            seen.setdefault(key, []).append(entry)
            if owner:
                seen.setdefault(f"{owner} frames", []).append(entry)
    return seen


def _stuck_at(log: Path) -> str | None:
    """Where the unit's thread was when the watchdog ended the process (its innermost frame, from
    the stacks in the log's ``STUCK`` file); None where the watchdog never fired."""
    try:
        with open(f"{log}{STUCK}", encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 16)
    except OSError:
        return None
    header, _, stacks = text.partition("\n\n") if text.startswith(UNIT_THREAD) else ("", "", text)
    if not stacks.strip():
        return None
    threads = stacks.split("\n\n")  # faulthandler's blocks, one per thread
    unit_thread = header[len(UNIT_THREAD):].strip()
    ours = next((t for t in threads if unit_thread and f"hread {unit_thread} (" in t),
                next((t for t in threads if "unit_result" in t), stacks))
    frames = [line.strip() for line in ours.splitlines() if line.strip().startswith("File ")]
    return frames[0] if frames else "an unknown place"


def strikes(settings: dict, unit: dict, stage: str) -> list[str]:
    """What each death of a process on ``unit`` left ("start <where>" or "gpu <message>")."""
    if _Process.seen is None:
        own = Path(_Process.log.name) if _Process.log is not None else None
        _Process.seen = _read_deaths(strike_folder(settings), own) if _restarted() else {}
    return _Process.seen.get(_key(unit, stage), [])


def given_up(settings: dict, unit: dict, stage: str, what: str = "this unit") -> Exception | None:
    """The error for ``unit``'s row when processes died on it ``STRIKES`` times, or on its frames
    apart ``APART_DEATHS`` times (``what``: the work they died in, as the message names it)."""
    left = strikes(settings, unit, stage)
    apart = _Process.seen.get(f"{_key(unit, stage)} frames", [])
    if len(left) < STRIKES and len(apart) < APART_DEATHS:
        return None
    left = left + apart
    gpu = [s[len("gpu "):] for s in left if s.startswith("gpu ")]
    if gpu:
        return GpuFailed(f"the GPU failed {len(left)} times on {what} ({gpu[-1]})")
    stuck = [s[len("timeout "):] for s in left if s.startswith("timeout ")]
    if stuck:
        return UnitTimedOut(
            f"{what} ran past --unit-timeout ({settings.get('unit_timeout'):g} s) {len(left)} times (a decoder stuck on "
            f"a damaged file, a hung mount, or a limit too low for these backends); the last time in {stuck[-1]}")
    where = left[-1][len("start "):]
    during = f"on {what}" if what.startswith("this ") else what
    return WorkerCrashed(f"the actor's process ended {len(left)} times while {during} (killed, e.g. for "
                         f"memory, or crashed in native code; the last: {where}); its log on that node says more")


def call_of(units: list[dict]) -> dict:
    """The pseudo-unit that names a call's units together (its shards hold them all): Ray hands a
    restarted actor the same call again, so its key is the same."""
    names = "\0".join(f"{u['input_path']}\0{u.get('unit_index', 0)}" for u in units)
    return {"input_path": "call " + hashlib.sha1(names.encode()).hexdigest(), "unit_index": 0}


def _log(settings: dict):
    if _Process.log is None:
        folder = strike_folder(settings)
        folder.mkdir(parents=True, exist_ok=True)
        # Written by this process alone, line by line, never appended to by name: an O_APPEND
        # write over NFS asks the server for the file's size each time.
        _Process.log = open(folder / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}", "w",
                            buffering=1, encoding="utf-8")
    return _Process.log


def begin(settings: dict, unit: dict, stage: str, of: str | None = None) -> str | None:
    """The unit's work starts (its line in this process's log, and the watchdog of its
    ``unit_timeout`` set); None where the log cannot be written (then the unit runs unguarded
    rather than not at all). ``of``: the key of the unit whose frame this is."""
    key = _key(unit, stage) if of is None else f"{_key(unit, stage)} of {of}"
    if of is None:
        _Process.frame = None  # (a frame whose GPU error was caught without a restart: over)
    try:
        log = _log(settings)
        log.write(f"start {key} process {os.getpid()} on {socket.gethostname()}, {stage}\n")
        if settings.get("unit_timeout"):
            if _Process.stuck is None:
                _Process.stuck = open(f"{log.name}{STUCK}", "w", encoding="utf-8")
                # Whose stack to read there: an actor's units run on one thread, named as
                # faulthandler names it (a context manager's frame is not on the stack to find it by).
                _Process.stuck.write(f"{UNIT_THREAD}0x{threading.get_ident():016x}\n\n")
                _Process.stuck.flush()
            log.flush()  # the start line is on storage before the watchdog can end the process
            faulthandler.dump_traceback_later(float(settings["unit_timeout"]), exit=True, file=_Process.stuck)
    except (OSError, ValueError, OverflowError):  # (a limit faulthandler does not take: unguarded)
        return None
    return key


def end(attempt: str | None) -> None:
    """The unit's work is over (its result, or its errors row, goes on): no strike."""
    if attempt is not None:
        faulthandler.cancel_dump_traceback_later()
        try:
            _Process.log.write("done\n")
        except OSError:
            pass


@contextlib.contextmanager
def strike_window(settings: dict, unit: dict, stage: str, until_next: bool = False):
    """Work on ``unit`` (often a call's pseudo-unit, ``call_of``) that is not one unit's own but
    can end the process (a call's frames copied into its output table, its shards packed): a
    death inside is a strike against it, as inside ``unit_result``. Whatever Python raises is no
    death: the call fails with it. ``until_next``: the window stays open after the block (its
    watchdog stopped) until the process's next unit or window starts: what the block returns is
    copied on by Ray (a call's table into the object store) after it, and a death there is the
    call's too; a call whose result Ray delivered is never handed to a restarted actor again."""
    attempt = begin(settings, unit, stage)
    try:
        yield
    finally:
        if until_next and attempt is not None:
            faulthandler.cancel_dump_traceback_later()
        else:
            end(attempt)


def mark_gpu(attempt: str | None, message: str) -> None:
    """The process ends on this unit because the GPU broke: its strike says so."""
    if attempt is not None:
        # (a unit's frame, where its frames run apart: the frame's strike, not the unit's)
        _Process.log.write(f"gpu {_Process.frame or attempt} {message}\n")
        _Process.log.flush()


@contextlib.contextmanager
def frames_apart(settings: dict, unit: dict, stage: str, frames: int):
    """Inside ``unit_result``'s window: where a death already struck this unit of several
    ``frames``, its frames run apart while the block runs (``frame``, ``one_by_one``)."""
    if frames < 2 or not strikes(settings, unit, stage) or _Process.log is None:
        yield
        return
    _Process.apart = (settings, unit, stage)
    try:
        yield
    finally:
        _Process.apart = None


def one_by_one() -> bool:
    """Whether the unit at work runs its frames apart (a batched model call goes frame by frame)."""
    return _Process.apart is not None


_NOT_APART = contextlib.nullcontext()


def frame(sample: str):
    """The window of one frame's work (``sample``: its sample id) in a unit whose frames run apart;
    nothing otherwise. It raises the frame's error (``WorkerCrashed``, ...) where the process died
    on that frame ``STRIKES`` times: the caller's per-frame handling makes it the frame's errors row."""
    if _Process.apart is None:
        return _NOT_APART
    return _frame_window(sample)


@contextlib.contextmanager
def _frame_window(sample: str):
    settings, unit, stage = _Process.apart
    part = {"input_path": unit["input_path"], "unit_index": f"{unit.get('unit_index', 0)} {sample}"}
    error = given_up(settings, part, stage, what="this frame")
    if error is not None:
        raise error
    _Process.frame = begin(settings, part, stage, of=_key(unit, stage))
    broke = False
    try:
        yield
    except DeviceLost:
        broke = True
        raise
    except Exception as exc:
        # A broken CUDA context ends the process on this frame (``device_loss.restart``, where
        # ``mark_gpu`` names the frame): so a caller's per-frame handler cannot swallow it.
        broke = device_lost(exc)
        if broke:
            raise DeviceLost(exc) from exc
        raise
    finally:
        if not broke:
            _Process.frame = None
            begin(settings, unit, stage)  # back in the unit's window: a death now is the unit's strike
