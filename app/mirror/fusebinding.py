"""The Python side of the FUSE boundary: what ``MirrorFS`` (fusefs.py) shares with the loop.

How it works
    fuseloop.py serves the kernel's requests in its own threads and calls ``MirrorFS`` with
    paths as ``str`` (the kernel's bytes decoded with ``ENCODING``/``ERRORS``: utf-8 with
    surrogateescape, which ``rel_path`` reverses to get the exact bytes back). Before each
    request it records who made it (``set_request``: uid, gid, pid from the request header);
    ``request_context`` gives that back to MirrorFS (the owner of a new file) and
    ``request_caller`` reads the caller's capabilities and groups from /proc/<pid>/status
    for ``setid_cleared``, the kernel's set-ID rule that the mount applies itself since it
    asks for FUSE_HANDLE_KILLPRIV_V2 (the kernel then stops looking up security.capability
    before every write).

    Also here: ``fuse_errors`` (the decorator of every operation: only ``OSError`` with a
    positive errno leaves it), ``xattr_name``, ``resolve_times``
    (UTIME_NOW/UTIME_OMIT as the loop passes them) and ``CacheTimeouts``, the kernel cache
    timeouts a mount is configured with.

Exceptions
    ``fuse_errors`` answers EIO for anything but a positive-errno ``OSError`` (logged with
    its traceback) and EINVAL for a ``ValueError`` (an embedded NUL); fusefs.py's docstring
    has the errno table.

Known limits
    - The kernel learns a mode the mount cleared at its next attribute refresh (a stat after
      the write always refreshes); until then its cached mode still shows the bits.
    - ``request_context`` outside a FUSE request (a test calling MirrorFS directly) gives
      this process's own uid, gid and pid.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

ENCODING = "utf-8"
ERRORS = "surrogateescape"
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
MAX_WRITE = 1 << 20  # bytes per FUSE write request (kernel limit: fs.fuse.max_pages_limit)

log = logging.getLogger("app.mirror.fusefs")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class CacheTimeouts:
    """Seconds the kernel may trust what it learnt: entries, attributes, missing names.

    Every change goes through this mount, and the kernel updates or drops what a change
    through the mount touches, so caching is safe; only hard-linked aliases can lag (see the
    module docstring). One second keeps stat-heavy programs off the Python path.
    """

    entry: float = 1.0
    attr: float = 1.0
    negative: float = 1.0


DEFAULT_TIMEOUTS = CacheTimeouts()


def fuse_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Let only ``OSError`` with a positive errno leave an operation (see the errno table)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                raise
            log.exception("%s: OSError without errno, answering EIO", fn.__name__)
            raise OSError(errno.EIO, "internal error") from exc
        except ValueError as exc:  # embedded NUL, or an argument the os module refuses
            raise OSError(errno.EINVAL, str(exc)) from exc
        except Exception as exc:
            log.exception("%s failed, answering EIO", fn.__name__)
            raise OSError(errno.EIO, "internal error") from exc

    return wrapper


def rel_path(path: str | None) -> bytes:
    """The kernel's path as bytes relative to the root (``b""`` is the root itself)."""
    if path is None:
        raise OSError(errno.ENOENT, "file has no name any more")
    return path.encode(ENCODING, ERRORS).lstrip(b"/")


def name_str(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


def xattr_name(name: str) -> bytes:
    raw = name.encode(ENCODING, ERRORS)
    if raw.startswith(b"system."):
        raise OSError(errno.EOPNOTSUPP, "system.* attributes are not supported")
    return raw


def resolve_times(atime: int, mtime: int, now: int, st: os.stat_result) -> tuple[int, int]:
    """Turn UTIME_NOW/UTIME_OMIT (as the loop passes them: 0 s + special ns) into real values."""

    def one(value: int, current: int) -> int:
        if value == UTIME_NOW:
            return now
        if value == UTIME_OMIT:
            return current
        return value

    return one(atime, st.st_atime_ns), one(mtime, st.st_mtime_ns)


CAP_FSETID = 4

_request = threading.local()  # (uid, gid, pid) of the request this thread serves


def set_request(uid: int, gid: int, pid: int) -> None:
    """The loop, before each request: who makes it (from the request's header)."""
    _request.who = (uid, gid, pid)


def request_context() -> tuple[int, int, int]:
    """(uid, gid, pid) of the request this thread serves (this process's outside one)."""
    who: tuple[int, int, int] | None = getattr(_request, "who", None)
    if who is None:
        return os.getuid(), os.getgid(), os.getpid()
    return who


@dataclass(frozen=True, slots=True)
class Caller:
    """The process behind the current request, as the kernel's set-ID rules need it."""

    fsetid: bool  # CAP_FSETID in its effective set
    groups: frozenset[int]  # its filesystem gid and supplementary groups


def request_caller() -> Caller:
    """Who made the current request, from /proc/<pid>/status (the kernel passes the thread's
    id). A caller that cannot be read (gone, or in no pid namespace we see) gets no
    privilege: the rules then clear the most."""
    _uid, _gid, pid = request_context()
    fields: dict[bytes, list[bytes]] = {}
    if pid > 0:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    name, _, rest = line.partition(b":")
                    fields[name] = rest.split()
        except OSError:
            fields = {}
    try:
        fsetid = bool(int(fields[b"CapEff"][0], 16) >> CAP_FSETID & 1)
        groups = frozenset(int(g) for g in fields[b"Groups"]) | {int(fields[b"Gid"][3])}
    except (KeyError, IndexError, ValueError):
        return Caller(fsetid=False, groups=frozenset())
    return Caller(fsetid=fsetid, groups=groups)


def setid_cleared(st: os.stat_result) -> int | None:
    """The permission bits a write, truncate or allocation by the current request's caller
    leaves, or None when it clears nothing: a local filesystem's rule (the kernel's
    ``setattr_should_drop_suidgid``). Setuid always; setgid with group execute, or when the
    caller is not in the file's group; neither when the caller holds CAP_FSETID. The cheap
    test comes first: most files have neither bit."""
    mode = st.st_mode
    if not mode & (stat.S_ISUID | stat.S_ISGID):
        return None
    caller = request_caller()
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or st.st_gid not in caller.groups):
        kill |= stat.S_ISGID
    if not kill or caller.fsetid:
        return None
    return stat.S_IMODE(mode) & ~kill
