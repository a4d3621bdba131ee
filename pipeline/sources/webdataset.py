"""WebDataset ``.tar`` shards, read in place: headers are scanned and members read into memory one
at a time; nothing is ever extracted to disk. A member whose name could escape the shard (an
absolute path, ``..``) or that is not a regular file (links, devices, FIFOs) is refused."""

from __future__ import annotations

import contextlib
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from disco.pipeline.errors import InputError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Entry:
    """One sample (members sharing a key) or one refused member, in shard order."""

    key: str
    members: list[tarfile.TarInfo]
    problem: str | None = None  # set for a refused member


def member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return f"member {name!r} is a link (to {member.linkname!r}); links are refused"
    if member.isdev() or member.isfifo():
        return f"member {name!r} is a device or FIFO; only regular files are read"
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return f"member {name!r} has an absolute path; it could escape the shard"
    if ".." in path.parts or ".." in name.replace("\\", "/").split("/"):
        return f"member {name!r} has a '..' part; it could escape the shard"
    if not member.isfile():
        return f"member {name!r} is not a regular file"
    return None


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@contextlib.contextmanager
def _open(path: str, offset: int = 0):
    """The shard, read from the header at byte ``offset`` on ("r:": uncompressed, seeking from
    header to header, a member's bytes only read when asked for)."""
    with contextlib.ExitStack() as stack:
        try:
            fh = stack.enter_context(open(path, "rb"))
            fh.seek(offset)
            # tarfile starts at the file object's position; the members' data offsets stay absolute.
            tar = stack.enter_context(tarfile.open(fileobj=fh, mode="r:"))
        except (tarfile.TarError, OSError) as exc:
            raise InputError("decode", "corrupt_tar", f"not a readable uncompressed tar shard: {exc}") from None
        yield tar


def iter_entries(tar: tarfile.TarFile):
    """Group consecutive members by key; refused members come out as entries of their own."""
    current: Entry | None = None
    try:
        for member in tar:
            if member.isdir():
                continue
            problem = member_problem(member)
            if problem:
                if current is not None:
                    yield current
                    current = None
                yield Entry(key=member.name, members=[member], problem=problem)
                continue
            key, _ = split_key(member.name)
            if current is not None and current.key == key:
                current.members.append(member)
                continue
            if current is not None:
                yield current
            current = Entry(key=key, members=[member])
    except tarfile.TarError as exc:
        raise InputError("decode", "corrupt_tar", f"the shard is cut short or damaged: {exc}") from None
    if current is not None:
        yield current


def _image_of(entry: Entry):
    """The sample's image member, or None."""
    return next((m for m in entry.members if split_key(m.name)[1] in IMAGE_EXTENSIONS), None)


def entry_offsets(path: str, repeated: list[int] | None = None) -> list[int]:
    """The byte offset of every entry's first header, up to the end or up to where the shard is
    damaged (``read_entries`` reports the damage with the last unit's samples); a shard damaged
    before its first entry is an error. A unit of samples ``start`` onwards reads from
    ``offsets[start]``: it never walks the headers of the samples before it again. ``repeated``
    gets the indices of the entries whose key an earlier entry has (not beside it: a WebDataset
    sample's files are consecutive), whose rows would repeat that sample's id."""
    offsets: list[int] = []
    keys: set[str] = set()
    with _open(path) as tar:
        try:
            for entry in iter_entries(tar):
                # (a key whose earlier entry has no image is no sample yet: the later one is)
                if repeated is not None and not entry.problem and _image_of(entry) is not None:
                    if entry.key in keys:
                        repeated.append(len(offsets))
                    keys.add(entry.key)
                offsets.append(entry.members[0].offset)
        except InputError:
            if not offsets:
                raise
    return offsets


def read_entries(path: str, start: int, stop: int, offset: int | None = None):
    """Yield ``(entry, image_name, image_bytes)`` for entries ``start <= i < stop``; image_name is
    None for a refused member or a sample without an image. A member that cannot be read (cut
    short, damaged) comes as ``(entry, image_name, InputError)``: that sample is lost, not the
    ones around it; a shard cut short ends there with an ``InputError`` as the last item.
    ``offset``: entry ``start``'s byte offset (``entry_offsets``), where reading starts."""
    with _open(path, offset or 0) as tar:
        entries = iter_entries(tar)
        i = start - 1 if offset is not None else -1
        while True:
            try:
                entry = next(entries)
            except StopIteration:
                return
            except InputError as exc:  # headers damaged or cut short: the samples before it stay
                yield None, None, exc
                return
            i += 1
            if i < start:
                continue
            if i >= stop:
                return
            if entry.problem:
                yield entry, None, None
                continue
            image = _image_of(entry)
            if image is None:
                yield entry, None, None
                continue
            try:
                handle = tar.extractfile(image)
                yield entry, image.name, handle.read() if handle is not None else b""
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield entry, image.name, InputError("decode", "truncated_member",
                                                    f"member {image.name!r} cannot be read: {exc}")
