"""Resync's source side: the Reintegrator executes a plan against the target, then redoes.

How it works
    The source (the up-to-date primary) drives. It asks the target with ``ResyncQuery``
    frames (stat, listing, block sums; resync_codec) and changes it with the ordinary ops,
    each sent through the ``Outlet`` with the ordering lock held, right after the local read
    it depends on (see resync.py on consistency with live writes).

    Executing a plan (resync_plan): deep paths are reconciled first, then the data files in
    their ranges (their owners, modes, xattrs and times after all of their data: the target
    writes resync pages in the background and makes an op on a file's attributes wait for
    that file's pages, so sending them file by file would make it wait file by file), then
    the metadata paths. Data files of an incremental plan are not
    compared: the logs say every difference is in their ranges, so the ranges' current
    bytes are sent (read under the ordering lock, up to RANGES_PER_HOLD small ranges or
    1 MiB per hold, with one fstat and one SEEK_DATA/SEEK_HOLE walk per hold; parts that are
    holes here are punched there). The target's stat of the next STAT_AHEAD files is asked
    ahead, so the source never waits for the target to catch up between files. Ops are
    windowed (WINDOW_OPS, WINDOW_BYTES): a drain blocks on the newest op leaving the window
    only, the older ones being answered before it.
    Deep paths, full plans and multiply-linked files are compared by checksum (BLAKE2b-128 per
    64 KiB block plus a "whole block is a hole" flag, SUMS_AHEAD queries in flight): only
    differing blocks are sent. A file missing or empty on the target is sent as it is.
    An op the target refused, or a path that changed under us, goes to the ``RedoSet``; redo
    passes run until it is empty, and ``finish`` sends ResyncDone under the ordering lock.

Exceptions (errors.py): ``ResyncError`` (the target refused, the pass limit was hit, the
session was stopped), ``ChannelError`` (the connection failed; from the Outlet),
``ProtocolError`` (a malformed reply body). OSError from the local tree is translated into
ResyncError.

Limits
    - The target's listing and block sums for one file chunk are held in memory; a directory
      is listed in pages of LIST_PAGE entries.
    - Hard links are rebuilt in deep passes (source inode -> first path); incremental passes
      compare multiply-linked dirty files in full but do not re-link them.
    - Directory times are set after their children in a deep pass; the directories a session
      touched (its namespace ops, the parents of the paths it reconciled; ``times_dirty``, at
      most TIMES_DIRTY_MAX) get the primary's times from the live flush once the pair is live.
    - Device nodes are skipped (the protocol refuses them).
    - Small logged ranges go as one WriteV op per ordering-lock hold; ranges of COPY_CHUNK
      or more, the differing blocks of a compare and a throttled session's ranges go as one
      Write frame per data extent: many scattered extents cost one frame, one encode, one
      apply and one answer each.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from app.mirror import ops
from app.mirror.errors import ProtocolError, ResyncError
from app.mirror.journal_state import TO_EOF
from app.mirror.protocol import Ack, Nack, Request, ResyncQuery, ResyncReply
from app.mirror.resync_codec import (
    BLOCK,
    LIST_PAGE,
    QUERY_LIST,
    QUERY_STAT,
    QUERY_SUMS,
    RESYNC_FH_BASE,
    Entry,
    Sum,
    decode_entries,
    decode_stat,
    decode_sums,
)
from app.mirror.resync_fs import (
    block_sums,
    clip_extents,
    data_extents,
    entry_in,
    list_dir,
    open_dir,
    open_file,
    stat_path,
)
from app.mirror.resync_plan import Plan, differing, under
from app.mirror.resync_session import Outlet, Progress, RedoSet, Throttle, Ticket, later_pages

SUMS_CHUNK: Final = 16  # blocks hashed per query (1 MiB: bounds the ordering lock hold time)
SUMS_AHEAD: Final = 8  # block-sum queries in flight per file (hides the round trip)
COPY_CHUNK: Final = 1 << 20  # bytes read and queued per ordering-lock hold when sending data
WINDOW_OPS: Final = 1024  # ops in flight (their answers are checked later, in order)
RANGES_PER_HOLD: Final = 64  # small logged ranges read and queued per ordering-lock hold
TIMES_DIRTY_MAX: Final = 65536  # directories remembered for the times flush (a full sync's
# directories get their times from the walk itself, after their children)
STAT_AHEAD: Final = 8  # incremental files whose target stat is asked ahead (hides the wait)
WINDOW_BYTES: Final = 16 << 20
MAX_REDO_PASSES: Final = 50

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


class Reintegrator:
    """The source side of one directory's resync (see the module docstring)."""

    def __init__(
        self,
        root: int,
        order: threading.Lock,
        outlet: Outlet,
        redo: RedoSet,
        *,
        timeout: float,
        throttle: Throttle | None = None,
        progress: Progress | None = None,
        stopped: Callable[[], bool] = lambda: False,
        excluded: Callable[[bytes], bool] = lambda path: False,
    ) -> None:
        self.excluded = excluded
        self.root = root
        self.order = order
        self.outlet = outlet
        self.redo = redo
        self.timeout = timeout
        self.throttle = throttle or Throttle(0)
        self.progress = progress or Progress()
        self.stopped = stopped
        self._fh = RESYNC_FH_BASE
        self._window: deque[tuple[Ticket, bytes, int]] = deque()
        self._window_bytes = 0
        self._links: dict[int, bytes] = {}  # source inode -> first path (deep passes)
        # progress: entries found while listing are added to files_total, except in a full
        # sync's first pass, whose _estimate counted the whole tree already
        self._count_found = True
        # directories whose times this session moved on the target (its namespace ops, the
        # parents of the paths it reconciled): the live flush sends ours afterwards
        self.times_dirty: set[bytes] = set()
        # files whose attributes wait for the end of the data phase (see run)
        self._defer: list[tuple[bytes, Entry, Entry | None]] | None = None

    # -- plumbing -------------------------------------------------------------------

    def _check(self) -> None:
        if self.stopped():
            raise ResyncError("resync stopped")

    def _reply(self, ticket: Ticket, what: str) -> bytes:
        ev = ticket.wait(self.timeout)
        if not isinstance(ev, ResyncReply):
            raise ProtocolError(f"{what}: unexpected answer {type(ev).__name__}")
        if ev.status:
            raise ResyncError(
                f"{what}: target answered {errno.errorcode.get(ev.status, ev.status)}"
            )
        return ev.body

    def _query(self, kind: int, path: bytes, offset: int = 0, count: int = 0) -> Ticket:
        return self.outlet.submit(lambda i: ResyncQuery(i, kind, path, offset, count))

    def _send(self, op: ops.Op, path: bytes) -> None:
        """Queue ``op`` (ordering lock held); its answer is checked later (windowed)."""
        ticket = self.outlet.submit(lambda i: Request(i, op))
        if len(self.times_dirty) < TIMES_DIRTY_MAX:
            self.times_dirty.update(ops.times_touched(op))
        size = _data_size(op)
        self._window.append((ticket, path, size))
        self._window_bytes += size
        self.progress.bytes_sent += size

    def _drain(self, keep: int = 0, keep_bytes: int = 1 << 62) -> None:
        """Wait for answers until at most ``keep`` ops / ``keep_bytes`` are in flight.

        The newest op leaving the window is waited for first: the target answers in stream
        order, so once it is in, the older ones are too and their waits return at once (one
        blocking wait per drain instead of one per op)."""
        done: list[tuple[Ticket, bytes]] = []
        while self._window and (len(self._window) > keep or self._window_bytes > keep_bytes):
            ticket, path, size = self._window.popleft()
            self._window_bytes -= size
            done.append((ticket, path))
        if done:
            done[-1][0].wait(self.timeout)
        for ticket, path in done:
            ev = ticket.wait(self.timeout)
            if isinstance(ev, Nack):
                self.redo.add(path)  # our view was overtaken by a live change: look again
            elif not isinstance(ev, Ack):
                raise ProtocolError(f"unexpected answer {type(ev).__name__} to an op")

    def _next_fh(self) -> int:
        self._fh += 1
        return self._fh

    # -- entry points ---------------------------------------------------------------

    def run(self, plan: Plan) -> None:
        """Execute ``plan`` and then the redo passes until nothing is left (bounded)."""
        if plan.full:
            self._count_found = False
            self._estimate(b"")
        else:
            self.progress.files_total = len(plan.files) + len(plan.deep) + len(plan.meta)
            self.progress.bytes_total = sum(
                min(ln, 1 << 40) for _, rs in plan.files for _, ln in rs
            )
        for path in plan.deep:
            self.reconcile(path, deep=True)
        # the files' data first, their owners, modes and times after all of it: the target
        # writes data pages in the background, and an op on a file's attributes waits for them
        self._defer = []
        try:
            self._shallow([(path, list(ranges)) for path, ranges in plan.files])
        finally:
            deferred, self._defer = self._defer, None
        for path, local, remote in deferred:
            self._check()
            self._attrs(path, local, remote, times=True, force_times=True)
        self._shallow([(path, []) for path in plan.meta])
        self.redo_passes()

    def _shallow(self, todo: list[tuple[bytes, list[tuple[int, int]]]]) -> None:
        """``reconcile(path, deep=False, ranges)`` for each, the target's stat of the next
        STAT_AHEAD paths asked ahead. Each stat is still queued with our lstat under the
        ordering lock (the same stream point); it is answered before the ops we send for the
        paths before it, which touch other paths only (an incremental plan's files are
        distinct and outside every deep path)."""
        ahead: deque[tuple[bytes, list[tuple[int, int]], Entry | None, Ticket]] = deque()
        pending = iter(todo)

        def ask() -> None:
            for path, ranges in pending:
                self._check()
                with self.order:
                    local = self._local(path)
                    ticket = self._query(QUERY_STAT, path)
                ahead.append((path, ranges, local, ticket))
                return

        for _ in range(STAT_AHEAD):
            ask()
        while ahead:
            path, ranges, local, ticket = ahead.popleft()
            ask()
            remote = decode_stat(self._reply(ticket, f"stat {path!r}"))
            self._entry(path, local, remote, False, ranges)

    def redo_passes(self) -> None:
        for _ in range(MAX_REDO_PASSES):
            self._drain()
            paths = self.redo.take()
            if not paths:
                return
            self._links.clear()
            self._count_found = True
            self.progress.files_total += len(paths)
            done: list[bytes] = []
            for path in paths:
                if not any(under(path, d) for d in done):
                    self.reconcile(path, deep=True)
                    done.append(path)
        raise ResyncError(f"still changing after {MAX_REDO_PASSES} redo passes")

    def _estimate(self, path: bytes) -> None:
        """Entries (``path`` and every one below, directories included) and bytes to do."""
        files, total = 1, 0
        stack = [path]
        while stack and files < 10_000_000:
            top = stack.pop()
            for e in list_dir(self.root, top):
                child = top + b"/" + e.name if top else e.name
                if self.excluded(child):
                    continue
                files += 1
                if e.kind == stat.S_IFDIR:
                    stack.append(child)
                else:
                    total += e.size
        self.progress.files_total, self.progress.bytes_total = files, total

    def reconcile(
        self, path: bytes, deep: bool, ranges: list[tuple[int, int]] | None = None
    ) -> None:
        """Make the target's entry at ``path`` match ours (``ranges`` None: every block)."""
        self._check()
        with self.order:
            local = self._local(path)
            ticket = self._query(QUERY_STAT, path)
        remote = decode_stat(self._reply(ticket, f"stat {path!r}"))
        self._entry(path, local, remote, deep, ranges)

    def _local(self, path: bytes) -> Entry | None:
        try:
            return stat_path(self.root, path)
        except OSError as exc:
            raise ResyncError(f"cannot read {path!r} locally: {exc}") from exc

    def _entry(
        self,
        path: bytes,
        local: Entry | None,
        remote: Entry | None,
        deep: bool,
        ranges: list[tuple[int, int]] | None,
    ) -> None:
        """Reconcile one entry; a local one counts as one entry done (progress)."""
        if path and len(self.times_dirty) < TIMES_DIRTY_MAX:
            # the entry may have come and gone here meanwhile: its directory's time moved
            self.times_dirty.add(ops.parent_path(path))
        self._entry_once(path, local, remote, deep, ranges)
        if local is not None:
            self.progress.files_done += 1

    def _entry_once(
        self,
        path: bytes,
        local: Entry | None,
        remote: Entry | None,
        deep: bool,
        ranges: list[tuple[int, int]] | None,
    ) -> None:
        self._check()
        if local is None:
            if remote is not None and path:
                self._remove(path, remote)
            return
        kind = local.kind
        if remote is not None and path and remote.kind != kind:
            self._remove(path, remote)
            remote = None
        if kind == stat.S_IFDIR:
            if remote is None and path:
                with self.order:
                    self._send(
                        ops.Mkdir(path, stat.S_IMODE(local.mode), local.uid, local.gid), path
                    )
            if deep:
                self._children(path)
            self._attrs(path, local, remote, times=True)
        elif kind == stat.S_IFREG:
            if local.nlink > 1 and deep and local.ino in self._links and path:
                self._relink(path, self._links[local.ino], remote)
                return
            if local.nlink > 1 and deep:
                self._links[local.ino] = path
            self._file(path, local, remote, ranges if local.nlink == 1 else None)
        elif kind == stat.S_IFLNK:
            if remote is None or remote.target != local.target:
                with self.order:
                    if remote is not None:
                        self._send(ops.Unlink(path), path)
                    self._send(ops.Symlink(local.target, path, local.uid, local.gid), path)
                remote = None
            self._attrs(path, local, remote, times=True)
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
            if remote is None:
                with self.order:
                    self._send(ops.Mknod(path, local.mode, local.uid, local.gid), path)
            self._attrs(path, local, remote, times=True)
        # device nodes are not replicated

    def _children(self, path: bytes) -> None:
        with self.order:
            try:
                with open_dir(self.root, path) as fd:
                    names = sorted(os.fsencode(n) for n in os.listdir(fd))
                    mine = {n: e for n in names if (e := entry_in(fd, n)) is not None}
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    self.redo.add(path)
                    return
                raise ResyncError(f"cannot list {path!r}: {exc}") from exc
            ticket = self._query(QUERY_LIST, path, 0, LIST_PAGE)
        what = f"list {path!r}"
        page = decode_entries(self._reply(ticket, what))
        # Later pages are not taken at the same stream point; a live namespace change
        # meanwhile is in the redo set anyway.
        theirs = later_pages(self.order, self._query, self._reply, path, page, what)
        if self._count_found:
            self.progress.files_total += sum(
                1 for n in mine if not self.excluded(path + b"/" + n if path else n)
            )
        for name in sorted(set(mine) | set(theirs)):
            child = path + b"/" + name if path else name
            if self.excluded(child):
                continue
            self._entry(child, mine.get(name), theirs.get(name), True, None)

    def _remove(self, path: bytes, remote: Entry) -> None:
        if remote.kind == stat.S_IFDIR:
            for _ in range(1 << 20):
                with self.order:
                    ticket = self._query(QUERY_LIST, path, 0, LIST_PAGE)
                children = decode_entries(self._reply(ticket, f"list {path!r}"))
                for e in children:
                    self._remove(path + b"/" + e.name, e)
                self._drain()
                if len(children) < LIST_PAGE:
                    break
            with self.order:
                self._send(ops.Rmdir(path), path)
        else:
            with self.order:
                self._send(ops.Unlink(path), path)

    def _relink(self, path: bytes, first: bytes, remote: Entry | None) -> None:
        self._drain()
        with self.order:
            ticket = self._query(QUERY_STAT, first)
        anchor = decode_stat(self._reply(ticket, f"stat {first!r}"))
        if anchor is not None and remote is not None and remote.ino == anchor.ino:
            return
        with self.order:
            if remote is not None:
                self._send(ops.Unlink(path), path)
            self._send(ops.Link(first, path), path)

    def _file(
        self, path: bytes, local: Entry, remote: Entry | None, ranges: list[tuple[int, int]] | None
    ) -> None:
        fh = self._next_fh()
        with self.order:
            try:
                fd = open_file(self.root, path)
            except OSError:
                self.redo.add(path)  # changed under us: a live op moved it; look again later
                return
            st = os.fstat(fd)
            if st.st_ino != local.ino:
                os.close(fd)
                self.redo.add(path)
                return
            size = st.st_size
            if remote is None:
                self._send(
                    ops.Create(fh, path, stat.S_IMODE(local.mode), local.uid, local.gid, False),
                    path,
                )
            else:
                self._send(ops.Open(fh, path), path)
            if remote is None or remote.size != size:
                self._send(ops.Truncate(fh, b"", size), path)
        try:
            if remote is None or remote.size == 0:
                # Nothing to compare with: send the data as it is.
                self._send_range(fd, fh, path, 0, TO_EOF)
            elif ranges is not None:
                # Incremental, trusted logs: the ranges hold every difference; send their
                # current bytes without asking the target for checksums first.
                self._send_ranges(fd, fh, path, ranges)
            else:
                self._compare(fd, fh, path, list(range(-(-size // BLOCK))))
            with self.order:
                self._send(ops.Release(fh), path)
        finally:
            os.close(fd)
        if self._defer is not None:
            self._defer.append((path, local, remote))
        else:
            self._attrs(path, local, remote, times=True, force_times=True)

    def _send_range(self, fd: int, fh: int, path: bytes, off: int, ln: int) -> None:
        """Make the target's bytes [off, off + ln) (clipped to our size) equal ours: holes are
        punched, data written; COPY_CHUNK bytes per ordering-lock hold (BLOCK if throttled)."""
        pos, stop = off, off + ln
        # Throttled: one block per step, so the sleeps stay short and a stop is seen soon.
        step = BLOCK if self.throttle.rate > 0 else COPY_CHUNK
        for _ in range(1 << 40):
            self._check()
            sent = 0
            with self.order:
                end = min(os.fstat(fd).st_size, stop, pos + step)
                if pos >= end:
                    return
                extents = data_extents(fd, pos, end)
                if extents != [(pos, end - pos)]:
                    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                    self._send(ops.Fallocate(fh, mode, pos, end - pos), path)
                for eoff, eln in extents:
                    data = os.pread(fd, eln, eoff)
                    if data:
                        self._send(ops.Write(fh, eoff, data), path)
                        sent += len(data)
            self.progress.bytes_done += end - pos
            pos = end
            self._drain(WINDOW_OPS, WINDOW_BYTES)
            self.throttle.take(sent)

    def _send_ranges(self, fd: int, fh: int, path: bytes, ranges: list[tuple[int, int]]) -> None:
        """``_send_range`` for each of ``ranges`` (sorted, disjoint): small ones in groups of
        up to RANGES_PER_HOLD ranges or COPY_CHUNK bytes per ordering-lock hold, with one
        fstat and one data-extent walk per group."""
        i, n = 0, len(ranges)
        for _ in range(n + 1):
            if i >= n:
                return
            self._check()
            if self.throttle.rate > 0 or ranges[i][1] >= COPY_CHUNK:
                self._send_range(fd, fh, path, *ranges[i])
                i += 1
                continue
            j, budget = i, 0
            while j < n and j - i < RANGES_PER_HOLD and budget + ranges[j][1] <= COPY_CHUNK:
                budget += ranges[j][1]
                j += 1
            covered = 0
            batch: list[tuple[int, bytes]] = []
            with self.order:
                size = os.fstat(fd).st_size
                lo, hi = ranges[i][0], min(size, ranges[j - 1][0] + ranges[j - 1][1])
                extents = data_extents(fd, lo, hi) if lo < hi else []
                for off, ln in ranges[i:j]:
                    end = min(size, off + ln)
                    if off >= end:
                        continue
                    parts = clip_extents(extents, off, end)
                    batch += self._hole_then_data(fd, fh, path, off, end, parts)
                    covered += end - off
                if batch:
                    self._send(ops.WriteV(fh, tuple(batch)), path)
            self.progress.bytes_done += covered
            i = j
            self._drain(WINDOW_OPS, WINDOW_BYTES)

    def _hole_then_data(
        self, fd: int, fh: int, path: bytes, off: int, end: int, extents: list[tuple[int, int]]
    ) -> list[tuple[int, bytes]]:
        """[off, end) of our file, whose data extents are ``extents``: punch the range on the
        target first when it is not all data (ordering lock held), then our data, read."""
        if extents != [(off, end - off)]:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            self._send(ops.Fallocate(fh, mode, off, end - off), path)
        out = []
        for eoff, eln in extents:
            data = os.pread(fd, eln, eoff)
            if data:
                out.append((eoff, data))
        return out

    def _compare(self, fd: int, fh: int, path: bytes, todo: list[int]) -> None:
        """Compare ``todo`` blocks by checksum, SUMS_AHEAD queries in flight, and send the
        differing ones."""
        ahead: deque[tuple[list[int], list[Sum], Ticket]] = deque()
        for i in range(0, len(todo), SUMS_CHUNK):
            self._check()
            chunk = todo[i : i + SUMS_CHUNK]
            lo, hi = chunk[0], chunk[-1]
            with self.order:
                size = os.fstat(fd).st_size
                mine = block_sums(fd, lo, hi - lo + 1, size)
                ticket = self._query(QUERY_SUMS, path, lo, hi - lo + 1)
            ahead.append((chunk, mine, ticket))
            if len(ahead) >= SUMS_AHEAD:
                self._compared(fd, fh, path, *ahead.popleft())
        while ahead:
            self._compared(fd, fh, path, *ahead.popleft())

    def _compared(
        self, fd: int, fh: int, path: bytes, chunk: list[int], mine: list[Sum], ticket: Ticket
    ) -> None:
        theirs = decode_sums(self._reply(ticket, f"sums {path!r}"))
        lo, wanted = chunk[0], set(chunk)
        diff = [lo + i for i in differing(mine, theirs) if lo + i in wanted]
        self.progress.bytes_done += (len(chunk) - len(diff)) * BLOCK
        self._copy_blocks(fd, fh, path, diff, [])

    def _copy_blocks(self, fd: int, fh: int, path: bytes, blocks: list[int], _: list[int]) -> None:
        for index in blocks:
            self._check()
            off = index * BLOCK
            sent = 0
            with self.order:
                size = os.fstat(fd).st_size
                end = min(size, off + BLOCK)
                if off >= end:
                    continue
                extents = data_extents(fd, off, end)
                for eoff, data in self._hole_then_data(fd, fh, path, off, end, extents):
                    self._send(ops.Write(fh, eoff, data), path)
                    sent += len(data)
            self.progress.bytes_done += end - off
            self._drain(WINDOW_OPS, WINDOW_BYTES)
            self.throttle.take(sent)

    def _attrs(
        self,
        path: bytes,
        local: Entry,
        remote: Entry | None,
        *,
        times: bool,
        force_times: bool = False,
    ) -> None:
        """Owner, mode, xattrs, then times, read fresh under the ordering lock."""
        with self.order:
            now = self._local(path)
            if now is None or now.kind != local.kind:
                self.redo.add(path)
                return
            link = now.kind == stat.S_IFLNK
            if remote is None or (remote.uid, remote.gid) != (now.uid, now.gid):
                self._send(ops.Chown(path, now.uid, now.gid), path)
            if not link and (remote is None or remote.mode != now.mode or remote.uid != now.uid):
                self._send(ops.Chmod(path, stat.S_IMODE(now.mode)), path)
            theirs = dict(remote.xattrs) if remote is not None else {}
            mine = dict(now.xattrs)
            for name, value in mine.items():
                if theirs.get(name) != value:
                    self._send(ops.SetXattr(path, name, value, 0), path)
            for name in theirs.keys() - mine.keys():
                self._send(ops.RemoveXattr(path, name), path)
            if times and (
                force_times
                or remote is None
                or now.kind == stat.S_IFDIR
                or (remote.mtime_ns, remote.atime_ns) != (now.mtime_ns, now.atime_ns)
            ):
                self._send(ops.Utimens(path, now.atime_ns, now.mtime_ns), path)

    def finish(self, done: Callable[[], Ticket | None]) -> None:
        """Drain, then call ``done`` with the ordering lock held until it sends ResyncDone.

        ``done`` returns None when the redo set refilled meanwhile (another pass runs).
        """
        for _ in range(MAX_REDO_PASSES):
            self.redo_passes()
            self._drain()
            with self.order:
                ticket = done()
            if ticket is not None:
                self._reply(ticket, "resync done")
                return
        raise ResyncError(f"still changing after {MAX_REDO_PASSES} final passes")


def _data_size(op: ops.Op) -> int:
    """Bytes an op carries, for the window (64 for an op without data)."""
    if isinstance(op, ops.Write):
        return len(op.data)
    if isinstance(op, ops.WriteV):
        return sum(len(data) for _, data in op.parts)
    return 64
