"""The output directory: its lock, the commit journal that makes runs resumable, recovery (the
shards themselves are written by ``shards.py``).

A unit of work (a still, or a segment of a video) is committed once its rows sit in a shard that
was renamed into place *and* the journal names it. A shard the journal does not name was left by
a run killed between the two steps; recovery deletes it, and its units are simply redone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import secrets
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from disco.pipeline.errors import ConfigError
from disco.pipeline.strikes import FOLDER as STRIKES_FOLDER
from disco.pipeline.store.schema import ERRORS_DIR, MANIFEST_FILE, REJECTS_DIR, TRIPLETS_DIR

JOURNAL_FILE = "_journal.jsonl"


def journal_params(folder: str | Path) -> dict | None:
    """The options a folder's rows are written with, from its journal's first line (written when
    a run begins; ``manifest.json`` only when it ends): None without one."""
    try:
        with open(Path(folder) / JOURNAL_FILE, "rb") as fh:
            record = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return record.get("params") if isinstance(record, dict) and record.get("type") == "params" else None
LOCK_FILE = ".lock"


class OutputBusy(ConfigError):
    """Another run holds the output folder's lock."""


class OutputTaken(ConfigError):
    """Another run wrote its name into the output folder's lock while this one held it: a file
    system whose locks only hold on one node (NFS mounted with ``nolock`` or ``local_lock``)."""


class OutputUnwritable(ConfigError):
    """The output folder cannot take the run's files (read-only, no permission, disk full)."""


# What flock raises on a file system that has no locks.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}

# OSError numbers that mean the output folder cannot be written, wherever they were raised.
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}


def _causes(exc: BaseException):
    """An exception and those it wraps: ``__cause__``/``__context__`` and Ray's ``cause``."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(c for c in (getattr(current, "cause", None), current.__cause__,
                                 None if current.__suppress_context__ else current.__context__)
                     if isinstance(c, BaseException))


@contextlib.contextmanager
def folder_lock(root: Path, advice: str = "wait for it to finish, or pick another --output", tidy: bool = False):
    """Hold ``root`` for one process (a preprocessing output, a training run): a second one is
    refused with ``OutputBusy``, which names the holder. An ``flock`` dies with its process, so a
    killed run leaves no stale lock behind; the file only says who holds it (yielded: a text
    unique to this holding, which a process on another node can compare with what it reads there:
    written through to the storage, for NFS shows another node a file's new content only once it
    is flushed). ``advice``: what the refusal tells the user to do. ``tidy``: a folder the lock
    made and that holds nothing else at the end (a run refused before it wrote anything) goes."""
    root = Path(root)
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a file of that name, a folder above that is a file, no permission, read-only
        what = "a file, not a folder" if root.exists() and not root.is_dir() else (exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename and Path(os.fsdecode(exc.filename)) != root else ""
        raise OutputUnwritable(f"cannot use {root} as the output folder: {what}{where}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process"
            raise OutputBusy(f"{root} is being written by another run ({holder}); {advice}") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            # A file system without flock (Lustre mounted without it, some FUSE mounts): the run
            # goes on, said once, rather than not at all.
            warnings.warn(f"{root} is on a file system that takes no locks ({exc.strerror}): nothing keeps a second "
                          "run out of it; start one run at a time there", stacklevel=3)
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        # (The token: two holdings by one process in one second are two.)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}, holding {secrets.token_hex(4)}\n"
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        yield holder
    finally:
        if tidy and created and [p.name for p in root.iterdir()] == [LOCK_FILE]:
            # Removed while held (on NFS the open lock file lingers as a .nfs file until closed:
            # the folder then stays).
            shutil.rmtree(root, ignore_errors=True)
        os.close(fd)  # releases the lock


def taken_by(root: Path, holder: str) -> str | None:
    """Who holds ``root`` now, where its lock file no longer names ``holder`` (this process's
    holding, as ``folder_lock`` yielded it): the file's line, or that it is gone; None while it is
    still ours. Read anew each time: NFS shows a file another node wrote to a process that opens
    it after the write. A read that fails for a passing reason (a stale handle, a soft mount's
    time-out) is tried once more, and then taken as no answer (None): a hiccup of the file server
    must not stop a run of days. Any other failure (no permission) is an answer: not ours."""
    for attempt in range(2):
        try:
            now = (Path(root) / LOCK_FILE).read_text(encoding="utf-8", errors="replace")
            break
        except FileNotFoundError:
            now = ""
            break
        except OSError as exc:
            if exc.errno not in _PASSING_ERRORS:
                return f"its lock file cannot be read here ({exc.strerror or exc})"
            if attempt:
                return None
            time.sleep(1.0)
    return None if now == holder else now.strip() or "its lock file is gone"


# What a read on a network file system can meet and then not meet again.
_PASSING_ERRORS = {errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.EINTR, errno.EAGAIN}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unfinished_run(folder: Path) -> str | None:
    """What to say of ``folder`` where it holds a run that never finished (killed, stopped: its
    journal and no manifest, which the end of a run writes); None otherwise."""
    folder = Path(folder)
    if (folder / JOURNAL_FILE).is_file() and not (folder / MANIFEST_FILE).exists():
        return (f"{folder} holds a run that did not finish (its {JOURNAL_FILE}, no {MANIFEST_FILE}): run the same "
                "command again to finish it (what it committed is kept)")
    return None


@dataclass
class JournalState:
    entries: list[dict] = field(default_factory=list)
    params: dict | None = None
    # The file as read: the bytes of its whole lines, whether a line cut short by a kill follows
    # them (or the last one lacks its newline), and the options its params line holds. Recovery
    # mends only that; rewriting the journal whole (a GB at millions of inputs) on every resume
    # cost seconds and twice its size on the share.
    size: int = 0
    torn: bool = False
    unterminated: bool = False
    written_params: dict | None = None
    _units: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def units(self) -> dict[str, dict[int, dict]]:
        """input_path -> {unit_index: unit record} over every committed shard (worked out once
        per list of entries: a resume and its manifest ask for it several times, and it is a
        dict per unit)."""
        key = (id(self.entries), len(self.entries))
        if self._units is None or self._units[0] != key:
            out: dict[str, dict[int, dict]] = {}  # (not a defaultdict: a look-up must not add an input)
            for entry in self.entries:
                for unit in entry.get("units", []):
                    out.setdefault(unit["input_path"], {})[unit["unit_index"]] = unit
            self._units = key, out
        return self._units[1]

    def complete_inputs(self) -> set[str]:
        return {
            path for path, units in self.units().items()
            if len(units) == next(iter(units.values()))["unit_count"]
        }

    def partial_units(self) -> dict[str, list[int]]:
        units = self.units()
        return {path: sorted(done) for path, done in units.items()
                if len(done) != next(iter(done.values()))["unit_count"]}


class OutputStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.triplets = self.root / TRIPLETS_DIR
        self.errors = self.root / ERRORS_DIR
        self.rejects = self.root / REJECTS_DIR
        self.journal = self.root / JOURNAL_FILE
        self.manifest = self.root / MANIFEST_FILE
        self.holder: str | None = None  # what this run wrote into the lock file, while it holds it

    @contextlib.contextmanager
    def locked(self):
        """Hold the output folder for one run: a second run on the same folder is refused instead
        of interleaving its shards with ours."""
        try:
            with folder_lock(self.root) as holder:
                self.holder = holder
                try:
                    yield self
                finally:
                    self.holder = None
        except Exception as exc:
            # A write that failed anywhere (here or in an actor) because of the folder: one line.
            problem = self.unwritable(exc)
            if problem is None:
                raise
            raise problem from None

    def unwritable(self, exc: BaseException) -> OutputUnwritable | None:
        """The run-stopping error for an exception that says the output folder cannot be written
        (disk full, read-only, permission denied on a path inside it), else None."""
        root = os.path.abspath(self.root)
        for cause in _causes(exc):
            if not isinstance(cause, OSError):
                continue
            ours, unknown = False, cause.filename is None
            if not unknown:  # a path in the folder, or one of the folders above it
                failed = os.path.abspath(os.fsdecode(cause.filename))
                ours = os.path.commonpath([failed, root]) in (failed, root)
            if (cause.errno in _UNWRITABLE and (ours or unknown)) or (cause.errno in _DENIED and ours):
                return OutputUnwritable(
                    f"cannot write to the output folder {self.root}: {cause.strerror or cause}; what was "
                    "committed stays: make room or fix its permissions, then re-run the same command to "
                    "finish the rest")
        return None

    def clear(self) -> None:
        """--overwrite: remove what this tool wrote, and nothing else of the user's. The journal
        goes first: a run killed while the shards are deleted leaves shards no journal names
        (refused by the next run until --overwrite is given again), never a journal naming shards
        that are gone (their inputs counted done)."""
        for f in (self.journal, self.manifest):
            f.unlink(missing_ok=True)
        for d in (self.triplets, self.errors, self.rejects):
            if d.exists():
                shutil.rmtree(d)

    def prepare(self) -> None:
        self.triplets.mkdir(parents=True, exist_ok=True)
        self.errors.mkdir(parents=True, exist_ok=True)

    def read_journal(self) -> JournalState:
        state = JournalState()
        if not self.journal.exists():
            return state
        with open(self.journal, "rb") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    state.torn = True
                    break  # a line cut short by a kill: nothing after it was committed
                state.size += len(line)
                state.unterminated = not line.endswith(b"\n")
                if record.get("type") == "params":
                    state.params = state.written_params = record["params"]
                elif record.get("type") == "commit":
                    state.entries.append(record)
        return state

    def recover(self, state: JournalState) -> list[str]:
        """Delete temporary files and shards that no journal entry names, and mend the journal
        (a torn last line cut off, a missing newline added, ``state.params`` recorded where the
        file holds other or none: then it is rewritten whole); returns what was removed."""
        self.still_held()  # another run's uncommitted shards are not ours to delete
        named = {name for e in state.entries for name in e.get("files", [])}
        removed = []
        for d in (self.triplets, self.errors, self.rejects):
            if not d.exists():
                continue
            for path in d.iterdir():
                rel = path.relative_to(self.root).as_posix()
                if path.name.endswith(".tmp") or (path.suffix == ".parquet" and rel not in named):
                    # Gone already: a writer of the killed run on another node, still finishing
                    # for a moment, renamed its temporary file since the listing.
                    path.unlink(missing_ok=True)
                    removed.append(rel)
        # The strikes of earlier runs (pipeline/strikes.py): every attempt of theirs is over.
        shutil.rmtree(self.root / STRIKES_FOLDER, ignore_errors=True)
        if state.params != state.written_params:
            self.rewrite_journal(state)
        elif state.torn or state.unterminated:
            # So that later appends start on a line of their own.
            with open(self.journal, "r+b") as fh:
                fh.truncate(state.size)
                if state.unterminated:
                    fh.seek(state.size)
                    fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            state.size += state.unterminated
            state.torn = state.unterminated = False
        return removed

    def rewrite_journal(self, state: JournalState) -> None:
        lines = []
        if state.params is not None:
            lines.append(json.dumps({"type": "params", "params": state.params}))
        lines += [json.dumps(e) for e in state.entries]
        text = "".join(line + "\n" for line in lines).encode("utf-8")
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # a power loss must not leave an empty journal behind the rename
        os.replace(tmp, self.journal)
        fsync_dir(self.root)
        state.size, state.torn, state.unterminated, state.written_params = len(text), False, False, state.params

    def still_held(self) -> None:
        """Raise ``OutputTaken`` where another run's name is in the lock file now. Where flock only
        holds on one node (NFS with ``nolock`` or ``local_lock``, common on HPC clusters), a second
        run on another node got the lock too: it recovered the folder (deleting this run's shards
        that were not committed yet) and plans from its journal; every commit of this run from then
        on would be a duplicate of its work."""
        if self.holder is None:
            return
        theirs = taken_by(self.root, self.holder)
        if theirs is not None:
            raise OutputTaken(
                f"{self.root} was taken by another run ({theirs}) while this one ({self.holder.strip()}) wrote to it: "
                "its file system's locks did not keep the other out (NFS mounted with nolock or local_lock); this run "
                "stops here and commits nothing more, the other one goes on")

    def append(self, record: dict) -> None:
        self.still_held()  # a commit of a run another one took the folder from would be a duplicate
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _shards(self) -> list[Path]:
        return [p for d in (self.triplets, self.errors, self.rejects) if d.is_dir() for p in sorted(d.glob("*.parquet"))]

    def begin(self, params: dict, overwrite: bool = False) -> tuple[JournalState, list[str]]:
        """Open the folder for a run (call it holding ``locked()``): clear it on ``overwrite``, refuse
        other options than the ones it was written with, and recover from an interrupted run.
        Returns the journal state and the uncommitted files removed."""
        if overwrite:
            self.clear()
        elif not self.journal.exists() and self._shards():
            # Shards without the journal that names them (a copy made without it, another tool's
            # files): recovering would delete every one of them as uncommitted.
            raise ConfigError(f"{self.root} holds shards ({self._shards()[0].relative_to(self.root)}, ...) but no "
                              f"{self.journal.name} naming them (a copy made without it?); they are left alone: "
                              "pass --overwrite to replace them, or choose another --output")
        self.prepare()
        state = self.read_journal()
        if state.params is not None and state.params != params:
            changed = sorted(k for k in set(params) | set(state.params) if params.get(k) != state.params.get(k))
            # Each with its value then and now: an input recorded as a job's working-dir copy
            # ("working-dir:videos") is the same folder to a user, who must see why it differs.
            shown = ", ".join(f"{k}: {_shown(state.params.get(k))} then, {_shown(params.get(k))} now" for k in changed[:4])
            raise ConfigError(f"{self.root} was written with different options ({shown}"
                              f"{', ...' if len(changed) > 4 else ''}); re-run with the same options to resume, or pass "
                              "--overwrite to start fresh")
        state.params = params
        return state, self.recover(state)

    def committed_files(self, folder: Path) -> list[Path] | None:
        """The shards of ``folder`` the journal names, in commit order; None without a journal (an
        output written before journals named every file)."""
        if not self.journal.exists():
            return None
        rel = folder.relative_to(self.root).as_posix() + "/"
        names = [n for e in self.read_journal().entries for n in e.get("files", []) if n.startswith(rel)]
        return [self.root / n for n in dict.fromkeys(names)]


def run_token() -> str:
    """A name part no other run or writer shares: shards of several writers, and of a resumed run,
    never collide (sortable by start time, then random)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def _shown(value, width: int = 60) -> str:
    """An option's value in a message, cut short where long."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."
