"""Verify: compare the primary's copy of a replicated directory with the peer's, by checksums.

How it works
    ``Verifier(root_fd, order, outlet, ...)`` walks the local tree (the real directory, through
    the descriptor the service opened before mounting) depth first and asks the peer over the
    existing replication connection with the resync queries (resync.py): ``QUERY_LIST`` for a
    directory's entries, ``QUERY_STAT`` for one entry, ``QUERY_SUMS`` for the BLAKE2b-128 sums
    of up to ``SUMS_CHUNK`` 64 KiB blocks. No new frame or query kind is needed: the target's
    Responder answers these while the link is live (its session is "done").

    Consistency with live writes: like the resync, every local read (listing, lstat, block
    hashes) and the submit of the matching query happen under the directory's ordering lock,
    the one the live replicator holds around ``local()`` + enqueue. The peer answers in stream
    order, after every op queued before the query, so both views are of the same point of the
    op stream. Verify only reads: it sends queries, never ops, so replication order is
    untouched. A difference is still re-checked once before it is reported: ``settle()`` (the
    service waits until the link's in-flight ops are acknowledged; in the async mode it flushes
    the inotify mirror, whose local tree runs ahead of the stream), then the entry or the
    1 MiB chunk is compared again under the lock; only what still differs is reported.

    Rate: a token bucket on the bytes hashed locally (the peer hashes as many); the sleep
    happens outside the ordering lock. ``VerifyReport`` is the progress and the findings,
    readable from any thread (``snapshot()``).

    Differences (``Difference``; kinds): ``content`` (``ranges`` = differing byte ranges, block
    aligned), ``size``, ``missing_on_peer``, ``extra_on_peer``, ``mode`` (permission bits, or
    a different file type), ``owner``, ``symlink`` (target), ``xattr``, ``times`` (mtime, of
    the file types in ``times_of``: every type on a FUSE primary, regular files only in the
    async mode, which does not replicate directory and symlink times).

    Times in flight: a file open for writing gets its times on the peer when it is released,
    a directory or symlink a namespace op touched gets them from the primary's next times
    flush (primary.TIMES_PERIOD_S). ``settle()`` flushes those times before a re-check, and
    ``settling(path)`` (asked under the ordering lock, at the re-check's stream point) says a
    path's times are still on their way: such a times difference is not one.

Exceptions::

    MirrorError (errors.py)
    +-- VerifyError     the verify cannot start (not the primary, peer not live, one already
                        running) or the peer refused a query; ChannelError when the link fails

Known limits
    - atime is not compared (reads move it on the primary only); neither is ctime, which no
      system call can set.
    - Hard links are compared as separate files (inode identity is not compared); holes are
      not compared (a hole and a block of zeros are the same content).
    - When sizes differ, only the blocks wholly inside the shorter file are compared for
      content; the rest is the ``size`` difference.
    - Device nodes are skipped (never replicated); excluded paths are skipped on both sides.
    - Directories with more than LIST_PAGE entries: pages after the first are not taken at
      the same stream point (a live change shows as a difference, which the re-check drops).
    - At most MAX_DIFFERENCES differences are kept (``differences_dropped`` counts the rest).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from app.mirror.errors import ChannelError, MirrorError, ProtocolError
from app.mirror.protocol import ResyncQuery, ResyncReply
from app.mirror.resync import (
    BLOCK,
    LIST_PAGE,
    QUERY_LIST,
    QUERY_STAT,
    QUERY_SUMS,
    SUMS_CHUNK,
    Entry,
    Outlet,
    Sum,
    Ticket,
    block_sums,
    decode_entries,
    decode_stat,
    decode_sums,
    entry_in,
    open_dir,
    open_file,
    stat_path,
)
from app.mirror.resync_session import later_pages

MAX_DIFFERENCES: Final = 10_000
MAX_ENTRIES: Final = 100_000_000  # bound of the walk (entries visited)
_COMPARED: Final = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK)
TIMES_OF_ALL: Final = frozenset(_COMPARED)  # a FUSE primary replicates every type's times
TIMES_OF_FILES: Final = frozenset((stat.S_IFREG,))  # the async mode: regular files only

Kind = Literal[
    "content",
    "size",
    "missing_on_peer",
    "extra_on_peer",
    "mode",
    "owner",
    "symlink",
    "xattr",
    "times",
]


class VerifyError(MirrorError):
    """The verify cannot start or the peer refused one of its queries."""


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the peer's copy differs from ours (``path`` as the user sees it)."""

    path: str
    kind: Kind
    detail: str
    ranges: tuple[tuple[int, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "detail": self.detail,
            "ranges": [list(r) for r in self.ranges],
        }


# ---------------------------------------------------------------------------- pure parts


def _type_name(mode: int) -> str:
    names = {
        stat.S_IFREG: "regular file",
        stat.S_IFDIR: "directory",
        stat.S_IFLNK: "symlink",
        stat.S_IFIFO: "FIFO",
        stat.S_IFSOCK: "socket",
    }
    return names.get(stat.S_IFMT(mode), "special file")


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000)) + (
        f".{ns % 1_000_000_000:09d} UTC"
    )


def compare_attrs(
    path: str, mine: Entry, theirs: Entry, times_of: frozenset[int] = frozenset()
) -> list[Difference]:
    """Type, mode, owner, symlink target, xattrs, size and (for the file types in
    ``times_of``) mtime of two entries; not content."""
    if mine.kind != theirs.kind:
        return [
            Difference(
                path,
                "mode",
                f"a {_type_name(mine.mode)} here, a {_type_name(theirs.mode)} on the peer",
            )
        ]
    out: list[Difference] = []
    if mine.kind != stat.S_IFLNK and stat.S_IMODE(mine.mode) != stat.S_IMODE(theirs.mode):
        out.append(
            Difference(
                path,
                "mode",
                f"mode {stat.S_IMODE(mine.mode):o} here, {stat.S_IMODE(theirs.mode):o} on the peer",
            )
        )
    if (mine.uid, mine.gid) != (theirs.uid, theirs.gid):
        out.append(
            Difference(
                path,
                "owner",
                f"owner {mine.uid}:{mine.gid} here, {theirs.uid}:{theirs.gid} on the peer",
            )
        )
    if mine.kind == stat.S_IFLNK and mine.target != theirs.target:
        out.append(
            Difference(
                path,
                "symlink",
                f"points to {os.fsdecode(mine.target)!r} here, "
                f"{os.fsdecode(theirs.target)!r} on the peer",
            )
        )
    a, b = dict(mine.xattrs), dict(theirs.xattrs)
    if a != b:
        names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        out.append(
            Difference(path, "xattr", "xattrs differ: " + ", ".join(os.fsdecode(n) for n in names))
        )
    if mine.kind == stat.S_IFREG and mine.size != theirs.size:
        out.append(Difference(path, "size", f"{mine.size} bytes here, {theirs.size} on the peer"))
    if mine.kind in times_of and mine.mtime_ns != theirs.mtime_ns:
        out.append(
            Difference(
                path,
                "times",
                f"modified {_when(mine.mtime_ns)} here, {_when(theirs.mtime_ns)} on the peer",
            )
        )
    return out


def differing_blocks(first: int, mine: list[Sum], theirs: list[Sum], limit: int) -> list[int]:
    """Block indexes (from ``first``) below ``limit`` whose digests differ (holes ignored)."""
    out = []
    for i, (_, digest) in enumerate(mine):
        index = first + i
        if index >= limit or i >= len(theirs):
            break
        if theirs[i][1] != digest:
            out.append(index)
    return out


def block_ranges(blocks: list[int], size: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """(offset, length) runs covering ``blocks`` of a ``size``-byte file, merged."""
    out: list[tuple[int, int]] = []
    for index in sorted(set(blocks)):
        off = index * block
        end = min(size, off + block)
        if end <= off:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, end - off))
    return out


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to ``burst`` (0 rate: none)."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = max(0.0, rate)
        self.burst = burst if burst is not None else max(self.rate, float(SUMS_CHUNK * BLOCK))
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._at = clock()

    def take(self, n: int, stopped: Callable[[], bool] = lambda: False) -> None:
        """Wait until ``n`` bytes may be hashed (bounded; returns early when ``stopped``)."""
        if self.rate <= 0:
            return
        for _ in range(100_000):
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= min(n, self.burst) or stopped():
                self._tokens -= n
                return
            self._sleep(min(1.0, (min(n, self.burst) - self._tokens) / self.rate))


# ---------------------------------------------------------------------------- report


@dataclass
class VerifyReport:
    """Progress and findings of one verify (all directories); read with ``snapshot()``."""

    running: bool = False
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    differences: list[Difference] = field(default_factory=list)
    differences_dropped: int = 0
    rechecked: int = 0
    started: float | None = None
    finished: float | None = None
    last_error: str = ""
    rate_mbps: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, diff: Difference) -> None:
        with self._lock:
            if len(self.differences) < MAX_DIFFERENCES:
                self.differences.append(diff)
            else:
                self.differences_dropped += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            diffs = [d.as_dict() for d in self.differences]
        return {
            "running": self.running,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "differences": diffs,
            "differences_dropped": self.differences_dropped,
            "rechecked": self.rechecked,
            "started": self.started,
            "finished": self.finished,
            "last_error": self.last_error,
            "rate_mbps": self.rate_mbps,
        }


# ---------------------------------------------------------------------------- the walk


class Verifier:
    """Compares one replicated directory with the peer's (see the module docstring).

    ``label`` is prefixed to relative paths in the report (the directory's path);
    ``settle()`` is called before a re-check; ``settling(path)`` (ordering lock held) is True
    while that path's times are still on their way to the peer; ``times_of`` the file types
    whose mtime is compared (TIMES_OF_ALL by default); ``stopped()`` ends the walk early.
    """

    def __init__(
        self,
        root: int,
        order: threading.Lock,
        outlet: Outlet,
        report: VerifyReport,
        *,
        label: str,
        timeout: float,
        bucket: TokenBucket,
        settle: Callable[[], None] = lambda: None,
        settling: Callable[[bytes], bool] = lambda path: False,
        times_of: frozenset[int] | None = None,
        stopped: Callable[[], bool] = lambda: False,
        excluded: Callable[[bytes], bool] = lambda path: False,
    ) -> None:
        self.root, self.order, self.outlet = root, order, outlet
        self.report = report
        self.label = label.rstrip("/")
        self.timeout = timeout
        self.bucket = bucket
        self.settle = settle
        self.settling = settling
        self.times_of = TIMES_OF_ALL if times_of is None else times_of
        self.stopped = stopped
        self.excluded = excluded

    # -- plumbing -------------------------------------------------------------------

    def _name(self, path: bytes) -> str:
        return f"{self.label}/{os.fsdecode(path)}" if path else self.label + "/"

    def _query(self, kind: int, path: bytes, offset: int = 0, count: int = 0) -> Ticket:
        return self.outlet.submit(lambda i: ResyncQuery(i, kind, path, offset, count))

    def _reply(self, ticket: Ticket, what: str) -> bytes:
        ev = ticket.wait(self.timeout)
        if not isinstance(ev, ResyncReply):
            raise ProtocolError(f"{what}: unexpected answer {type(ev).__name__}")
        if ev.status:
            name = errno.errorcode.get(ev.status, str(ev.status))
            raise VerifyError(f"{what}: the peer answered {name}")
        return ev.body

    # -- entry points ---------------------------------------------------------------

    def estimate(self) -> None:
        """Add this tree's regular files and bytes to the report's totals (local walk)."""
        stack = [b""]
        seen = 0
        while stack and seen < MAX_ENTRIES:
            top = stack.pop()
            for e in self._list_local(top).values():
                seen += 1
                child = top + b"/" + e.name if top else e.name
                if self.excluded(child):
                    continue
                if e.kind == stat.S_IFDIR:
                    stack.append(child)
                elif e.kind == stat.S_IFREG:
                    self.report.files_total += 1
                    self.report.bytes_total += e.size

    def run(self) -> None:
        """Walk the whole tree; differences go to the report."""
        with self.order:
            mine = stat_path(self.root, b"")
            ticket = self._query(QUERY_STAT, b"")
        theirs = decode_stat(self._reply(ticket, "stat of the root"))
        if mine is not None and theirs is not None:
            for diff in compare_attrs(self._name(b""), mine, theirs, self.times_of):
                self._confirm(b"", diff)
        stack = [b""]
        seen = 0
        while stack and seen < MAX_ENTRIES:
            if self.stopped():
                raise VerifyError("verify stopped")
            top = stack.pop()
            for child, is_dir in self._directory(top):
                seen += 1
                if is_dir:
                    stack.append(child)

    # -- directories ----------------------------------------------------------------

    def _list_local(self, path: bytes) -> dict[bytes, Entry]:
        try:
            with open_dir(self.root, path) as fd:
                names = sorted(os.fsencode(n) for n in os.listdir(fd))
                return {n: e for n in names if (e := entry_in(fd, n)) is not None}
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return {}
            raise VerifyError(f"cannot list {self._name(path)}: {exc}") from exc

    def _directory(self, path: bytes) -> list[tuple[bytes, bool]]:
        """Compare one directory's entries; the subdirectories present on both sides."""
        with self.order:
            mine = self._list_local(path)
            ticket = self._query(QUERY_LIST, path, 0, LIST_PAGE)
        what = f"list {self._name(path)}"
        page = decode_entries(self._reply(ticket, what))
        theirs = later_pages(self.order, self._query, self._reply, path, page, what)
        subdirs: list[tuple[bytes, bool]] = []
        for name in sorted(set(mine) | set(theirs)):
            child = path + b"/" + name if path else name
            if self.excluded(child):
                continue
            a, b = mine.get(name), theirs.get(name)
            if a is not None and a.kind not in _COMPARED:
                continue  # device nodes are not replicated
            if a is None and b is not None:
                self._confirm(
                    child, Difference(self._name(child), "extra_on_peer", _only("peer", b))
                )
                continue
            if a is None or b is None:
                assert a is not None
                self._confirm(child, Difference(self._name(child), "missing_on_peer", _only("", a)))
                if a.kind == stat.S_IFREG:
                    self._count_file(a.size)
                continue
            for diff in compare_attrs(self._name(child), a, b, self.times_of):
                self._confirm(child, diff)
            if a.kind != b.kind:
                continue
            if a.kind == stat.S_IFDIR:
                subdirs.append((child, True))
            elif a.kind == stat.S_IFREG:
                self._file(child, a, b)
        return subdirs

    def _confirm(self, path: bytes, diff: Difference) -> None:
        """Report ``diff`` if a second look at the same stream point still finds it."""
        self.settle()
        self.report.rechecked += 1
        with self.order:
            mine = stat_path(self.root, path)
            ticket = self._query(QUERY_STAT, path)
            in_flight = diff.kind == "times" and self.settling(path)
        theirs = decode_stat(self._reply(ticket, f"stat {diff.path}"))
        if (mine is not None and mine.kind not in _COMPARED) or in_flight:
            return
        if diff.kind == "extra_on_peer":
            if mine is None and theirs is not None:
                self.report.add(diff)
        elif diff.kind == "missing_on_peer":
            if mine is not None and theirs is None:
                self.report.add(diff)
        elif mine is not None and theirs is not None:
            for again in compare_attrs(diff.path, mine, theirs, self.times_of):
                if again.kind == diff.kind:
                    self.report.add(again)

    # -- files ----------------------------------------------------------------------

    def _count_file(self, size: int) -> None:
        self.report.files_done += 1
        self.report.bytes_done += size

    def _file(self, path: bytes, mine: Entry, theirs: Entry) -> None:
        try:
            fd = open_file(self.root, path)
        except OSError:
            self._count_file(mine.size)
            return  # gone or replaced meanwhile: a live change, which replication carries
        try:
            limit_bytes = min(mine.size, theirs.size)
            limit = -(-limit_bytes // BLOCK) if mine.size == theirs.size else limit_bytes // BLOCK
            differing: list[int] = []
            for lo in range(0, limit, SUMS_CHUNK):
                if self.stopped():
                    raise VerifyError("verify stopped")
                count = min(SUMS_CHUNK, limit - lo)
                self.bucket.take(count * BLOCK, self.stopped)
                diff = self._chunk(fd, path, lo, count, limit)
                if diff:
                    self.settle()
                    self.report.rechecked += 1
                    diff = self._chunk(fd, path, lo, count, limit)
                differing += diff
                self.report.bytes_done += min(count * BLOCK, max(0, mine.size - lo * BLOCK))
            if differing:
                ranges = tuple(block_ranges(differing, limit_bytes))
                total = sum(ln for _, ln in ranges)
                self.report.add(
                    Difference(
                        self._name(path),
                        "content",
                        f"{total} bytes in {len(ranges)} range(s) differ",
                        ranges,
                    )
                )
        finally:
            os.close(fd)
        self.report.files_done += 1

    def _chunk(self, fd: int, path: bytes, lo: int, count: int, limit: int) -> list[int]:
        with self.order:
            size = os.fstat(fd).st_size
            mine = block_sums(fd, lo, count, size)
            ticket = self._query(QUERY_SUMS, path, lo, count)
        theirs = decode_sums(self._reply(ticket, f"sums {self._name(path)}"))
        return differing_blocks(lo, mine, theirs, limit)


def _only(side: str, e: Entry) -> str:
    what = _type_name(e.mode)
    size = f" of {e.size} bytes" if e.kind == stat.S_IFREG else ""
    return f"a {what}{size} only on the peer" if side else f"a {what}{size} not on the peer"


__all__ = [
    "TIMES_OF_ALL",
    "TIMES_OF_FILES",
    "ChannelError",
    "Difference",
    "TokenBucket",
    "Verifier",
    "VerifyError",
    "VerifyReport",
    "block_ranges",
    "compare_attrs",
    "differing_blocks",
]
