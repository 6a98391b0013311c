"""DirPrimary: the replicator of one directory on the primary (journal, link, resync).

How it works
    ``DirPrimary.apply(op, local)`` is the Replicator (ops.py) that the directory's MirrorMount
    (or AsyncMirror, through ``async_sink`` with a no-op ``local()``) calls for every op: it
    marks the DirtyJournal, then, under one ordering lock, runs ``local()`` and queues the op on
    the link when the peer is being resynced or live, then waits for the answer outside the
    lock (pipelined). A Write is queued before its local write (both sides write at once; a
    local failure then drops the peer, the journal covers the region); an Fsync is queued
    under the lock and the local fsync runs outside it, alongside the peer's. A timeout, a
    disconnect, or a Nack while live drops the peer; the op stays in the journal; the
    application sees only the local result. Ops whose every path is excluded (``Excluder``)
    stay local; handles are followed (``fh_paths``) so an op by handle names its file.

    Directory and symlink times: a namespace op moves its parent's mtime (``times_touched``)
    on each side to that side's clock; the paths are kept dirty and ``flush_times`` sends
    their times (Utimens, stat'ed under the ordering lock) every TIMES_PERIOD_S while live.

    ``connect_loop`` keeps (re)connecting with bounded backoff (``wake`` cuts the wait short);
    a link is bound to the directory by a first ``ResyncQuery(QUERY_BIND, offset=index,
    count=len(dirs))`` and carries nothing until ``resync_loop`` ran a session on it
    (resync.py's Reintegrator); ResyncDone is sent under the ordering lock once nothing is left
    to redo, and from then on the link is live. Handles the application opened before that are
    announced (``Open``) right before ResyncDone.

    The MirrorService (service.py) creates, starts and stops each DirPrimary and is its
    ``PrimaryHost``: the peer's address and key, the timeouts, the log and the counters.

    Exceptions: nothing leaves ``apply`` but what ``local()`` raises; peer trouble drops the
    link and is counted on the host. ``resync_loop`` reports a failed session in ``resync``
    ("failed") and the host's ``last_error``.

Limits
    - Ordering is per directory; fsync order across two directories is not kept.
    - A rename between an excluded and a replicated name is replicated as is (the peer may
      refuse it: a drop and a resync follow).
    - A journal write error keeps the application running (degraded) and the next resync full.
    - At most _MAX_DIRTY_TIMES paths wait for their times; beyond, changes wait for the next.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from app.mirror import ops, resync
from app.mirror.asyncmode import AsyncMirror, AsyncMirrorError
from app.mirror.channel import Link, Pending, connect
from app.mirror.errors import ChannelError, MirrorError, ResyncError
from app.mirror.exclude import Exclusions
from app.mirror.journal import DirtyJournal, JournalError
from app.mirror.journal_dirs import activity_log
from app.mirror.ops import times_touched
from app.mirror.protocol import (
    Connection,
    Event,
    Nack,
    Request,
    ResyncDone,
    ResyncQuery,
    ResyncReply,
    Role,
)

T = TypeVar("T")
ResyncState = Literal["none", "running", "done", "failed"]

_NAMESPACE_OPS = (
    ops.Create,
    ops.Mknod,
    ops.Mkdir,
    ops.Unlink,
    ops.Rmdir,
    ops.Rename,
    ops.Link,
    ops.Symlink,
)
TIMES_PERIOD_S = 0.1  # directory/symlink times reach the peer at most this long after a change
_MAX_DIRTY_TIMES = 65536  # paths waiting for their times; beyond, changes wait for the next
_TIMES_PER_FLUSH = 1024  # paths stat'ed and sent per hold of the ordering lock
_BEGIN_RETRIES = 1200  # x 0.25 s: the target arms itself within 5 minutes or the try fails


def op_paths(op: ops.Op) -> list[bytes]:
    """The relative paths an op names (a symlink's target is content, not a path)."""
    names = ("path",) if isinstance(op, ops.Symlink) else ("path", "old", "new", "target")
    out = []
    for name in names:
        value = getattr(op, name, None)
        if isinstance(value, bytes) and not (name == "path" and getattr(op, "fh", -1) >= 0):
            out.append(value)
    return out


def op_fh(op: ops.Op) -> int | None:
    fh = getattr(op, "fh", None)
    return fh if isinstance(fh, int) and fh >= 0 else None


class Excluder:
    """The directory's exclusions (the FUSE layer's own rules, app/mirror/exclude.py), for the
    ops and resync paths; a directory pattern ("cache/") excludes what is below it."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.rules = Exclusions(self.patterns)

    def __call__(self, path: bytes) -> bool:
        if not self.patterns or not path:
            return False
        return self.rules.excluded(path, is_dir=False)


class PrimaryHost(Protocol):
    """What a DirPrimary reads from its MirrorService (service.py) and counts on it."""

    cluster: str
    node: str
    key: bytes
    peer: str
    peer_ip: str
    port: int
    ack_timeout_s: float
    bandwidth_mbps: float
    log: logging.Logger
    last_error: str
    ops_sent: int
    acks: int
    drops: int
    dropped: bool

    @property
    def dirs(self) -> Sequence[tuple[Path, tuple[str, ...]]]: ...


class DirPrimary:
    """One replicated directory on the primary: journal, mount, link, resync."""

    def __init__(self, svc: PrimaryHost, index: int, path: Path, excluded: Excluder) -> None:
        self.svc = svc
        self.index = index
        self.path = path
        self.excluded = excluded
        self.order = threading.Lock()
        self.journal: DirtyJournal | None = None
        self.root_fd = -1
        self.mount: Any = None
        self.async_mirror: AsyncMirror | None = None
        self.link: Link | None = None
        self.mode: Literal["idle", "resync", "live"] = "idle"
        self.sent_open: set[int] = set()
        self.fh_paths: dict[int, bytes | None] = {}
        self.dirty_times: set[bytes] = set()  # see times_touched and flush_times
        self.wake = threading.Event()  # set: the connect loop retries now, backoff reset
        self.redo = resync.RedoSet()
        self.resync: ResyncState = "none"
        self.progress = resync.Progress(started_at=None)  # no session yet
        self.journal_error = ""
        self.worker: threading.Thread | None = None
        self.connector: threading.Thread | None = None

    # -- the Replicator -------------------------------------------------------------

    def apply(self, op: ops.Op, local: Callable[[], T]) -> T:
        journal = self.journal
        if journal is not None and not self.journal_error:
            try:
                journal.mark(op)
            except JournalError as exc:
                self.journal_error = str(exc)
                self.svc.last_error = f"journal: {exc}"
                self.svc.log.error("replication degraded: %s", exc)
        pending: Pending | None = None
        link = None
        if isinstance(op, ops.Fsync):
            # Queued in order (the peer's fsync covers every op sent before it); the local
            # fsync runs outside the ordering lock, at the same time as the peer's: writers
            # are not held up by our disk flush, and the two flushes overlap.
            with self.order:
                if self.mode != "idle" and self.link is not None:
                    link = self.link
                    pending = self._forward(link, op)
            try:
                return local()
            finally:
                self._acknowledged(link, pending)
        with self.order:
            if isinstance(op, ops.Write) and self.mode != "idle" and self.link is not None:
                # Sent before the local write so the peer writes while we do. If the local
                # write then fails, the peer has bytes we do not: drop it; the region is in
                # the journal (marked above), so the resync puts our copy back on the peer.
                link = self.link
                pending = self._forward(link, op)
                try:
                    result = local()
                except BaseException as exc:
                    if pending is not None:
                        self.drop(link, f"local write failed after it was sent: {exc}")
                    raise
            else:
                result = local()
                self._track(op)
                if self.mode != "idle" and len(self.dirty_times) < _MAX_DIRTY_TIMES:
                    self.dirty_times.update(times_touched(op))
                if self.mode != "idle" and self.link is not None:
                    link = self.link
                    pending = self._forward(link, op)
        self._acknowledged(link, pending)
        return result

    def _acknowledged(self, link: Link | None, pending: Pending | None) -> None:
        """Wait (outside the ordering lock) for the peer's answer; drop it on a timeout."""
        if pending is not None and link is not None:
            try:
                pending.wait(self.svc.ack_timeout_s)
                self.svc.acks += 1
            except ChannelError as exc:
                self.drop(link, f"no acknowledgement: {exc}")

    def _track(self, op: ops.Op) -> None:
        match op:
            case ops.Open(fh=fh, path=path) | ops.Create(fh=fh, path=path):
                self.fh_paths[fh] = path
            case ops.Release(fh=fh):
                self.fh_paths.pop(fh, None)
            case ops.Unlink(path=path):
                for fh, p in list(self.fh_paths.items()):
                    if p == path:
                        self.fh_paths[fh] = None
            case ops.Rename(old=old, new=new):
                for fh, p in list(self.fh_paths.items()):
                    if p is not None and resync.under(p, old):
                        self.fh_paths[fh] = new + p[len(old) :]
            case _:
                pass

    def _forward(self, link: Link, op: ops.Op) -> Pending | None:
        """Queue ``op`` on the link (ordering lock held); None when it stays local."""
        if isinstance(op, ops.Write | ops.Fsync) and op.fh >= 0:
            # the hot path (data by handle): the same rules as below, without the walk
            # over the op's fields
            if op.fh not in self.sent_open:
                path = self.fh_paths.get(op.fh)
                if self.mode == "resync" and path is not None:
                    self.redo.add(path)
                return None
            self.svc.ops_sent += 1
            return link.submit(lambda i: Request(i, op), self._data_result(link, op))
        paths = op_paths(op)
        fh = op_fh(op)
        if fh is not None and not isinstance(op, ops.Open | ops.Create):
            paths.append(self.fh_paths.get(fh) or b"")
            if fh not in self.sent_open:
                if self.mode == "resync" and self.fh_paths.get(fh) is not None:
                    self.redo.add(self.fh_paths.get(fh))
                return None  # the peer does not know this handle (nameless or not synced yet)
            if isinstance(op, ops.Release):
                self.sent_open.discard(fh)
        elif paths and all(self.excluded(p) for p in paths):
            return None
        if isinstance(op, ops.Open | ops.Create):
            if self.excluded(op.path):
                return None
            self.sent_open.add(op.fh)
        resyncing = self.mode == "resync"
        if resyncing and isinstance(op, _NAMESPACE_OPS):
            self.redo.add(*paths)

        def on_result(ev: Event | None) -> None:
            if not isinstance(ev, Nack):
                return
            if self.mode == "resync" and self.link is link:
                self.redo.add(*paths)
                if fh is not None and isinstance(op, ops.Open | ops.Create):
                    self.sent_open.discard(fh)
            else:
                self.drop(link, f"peer refused {type(op).__name__} {paths!r}: {ev.message}")

        self.svc.ops_sent += 1
        return link.submit(lambda i: Request(i, op), on_result)

    def _data_result(self, link: Link, op: ops.Write | ops.Fsync) -> Callable[[Event | None], None]:
        """The answer handler of a Write or Fsync by handle (``_forward``'s hot path): a
        Nack while resyncing redoes the file, otherwise it drops the peer."""

        def on_result(ev: Event | None) -> None:
            if not isinstance(ev, Nack):
                return
            path = self.fh_paths.get(op.fh) or b""
            if self.mode == "resync" and self.link is link:
                self.redo.add(path)
            else:
                self.drop(link, f"peer refused {type(op).__name__} {[path]!r}: {ev.message}")

        return on_result

    # -- link management ------------------------------------------------------------

    def drop(self, link: Link, reason: str) -> None:
        if self.link is link and self.mode in ("resync", "live"):
            self.svc.drops += 1
            self.svc.dropped = True
            self.svc.log.warning("dropping the secondary of %s: %s", self.path, reason)
        link.close(reason)

    def on_close(self, link: Link, reason: str) -> None:
        if self.link is link:
            if self.mode in ("resync", "live"):
                self.svc.dropped = True
            self.link = None
            self.mode = "idle"
            self.resync = "none"
            self.svc.last_error = f"{self.path}: {reason}"

    def note_local(self, op: ops.Op) -> None:
        """A change the FUSE layer kept local (excluded path): its parent's times still move."""
        if self.mode != "idle":
            with self.order:
                if len(self.dirty_times) < _MAX_DIRTY_TIMES:
                    self.dirty_times.update(times_touched(op))

    def flush_times(self) -> int:
        """Send the times of the directories and symlinks namespace ops touched (live only).

        Each is stat'ed and queued under the ordering lock, so its Utimens lands after every op
        that changed it before; a path changed again meanwhile is dirty again and goes in the
        next flush. A path gone since (unlinked, renamed: the new name is dirty too) is
        skipped. Returns the number sent.
        """
        if not self.dirty_times or self.mode != "live":
            return 0
        pending: list[Pending | None] = []
        with self.order:
            link = self.link
            if link is None or self.mode != "live":
                return 0
            if len(self.dirty_times) <= _TIMES_PER_FLUSH:
                paths, self.dirty_times = self.dirty_times, set()
            else:  # a bounded hold of the ordering lock; the rest goes in the next flush
                paths = set(sorted(self.dirty_times)[:_TIMES_PER_FLUSH])
                self.dirty_times -= paths
            for path in sorted(paths):
                try:
                    st = os.stat(path or b".", dir_fd=self.root_fd, follow_symlinks=False)
                except OSError:
                    continue
                pending.append(
                    self._forward(link, ops.Utimens(path, st.st_atime_ns, st.st_mtime_ns))
                )
        for p in pending:
            self._acknowledged(link, p)
        return sum(p is not None for p in pending)

    def connect_loop(self, stop: threading.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            if self.link is not None and not self.link.closed:
                stop.wait(TIMES_PERIOD_S)
                self.flush_times()
                continue
            try:
                link = self._connect()
            except (MirrorError, OSError) as exc:
                self.svc.last_error = f"connect {self.svc.peer_ip}:{self.svc.port}: {exc}"
                # a resync asked for (the peer is back) cuts the wait short: no 2 s lag
                if self.wake.wait(backoff):
                    self.wake.clear()
                    backoff = 0.2
                else:
                    backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.2
            with self.order:
                self.link, self.mode, self.sent_open = link, "idle", set()

    def _connect(self) -> Link:
        svc = self.svc
        conn = Connection(Role.PRIMARY, cluster=svc.cluster, node=svc.node, key=svc.key,
                          peer=svc.peer)  # fmt: skip
        sock = connect(svc.peer_ip, svc.port, conn, timeout=max(2.0, svc.ack_timeout_s))
        link = Link(sock, conn, on_close=self.on_close, log=svc.log, name=f"mirror{self.index}")
        link.start()
        n = len(svc.dirs)
        ticket = link.submit(lambda i: ResyncQuery(i, resync.QUERY_BIND, b"", self.index, n))
        try:
            reply = ticket.wait(max(5.0, svc.ack_timeout_s))
        except ChannelError:
            link.close("bind not answered")
            raise
        if not isinstance(reply, ResyncReply) or reply.status:
            link.close("bind refused")
            raise ChannelError(f"peer refused directory {self.index}: {reply}")
        return link

    # -- resync ---------------------------------------------------------------------

    def resync_loop(self, full: bool, stop: threading.Event) -> None:
        for _ in range(10**7):
            if stop.is_set():
                self.resync = "none"
                return
            link = self.link
            if link is None or link.closed or self.mode != "idle":
                stop.wait(0.1)
                continue
            try:
                self._session(link, full, stop)
                return
            except (MirrorError, OSError) as exc:
                self.svc.last_error = f"resync of {self.path}: {exc}"
                self.svc.log.warning("resync of %s failed: %s", self.path, exc)
                link.close(f"resync failed: {exc}")
                self.resync = "failed"
                return

    def _session(self, link: Link, full: bool, stop: threading.Event) -> None:
        svc = self.svc
        timeout = max(10.0, svc.ack_timeout_s)
        for _ in range(_BEGIN_RETRIES):
            # The session starts when the BEGIN that the target accepts is sent (waiting for
            # the target to arm itself is not part of it).
            begun, begun_at = time.monotonic(), time.time()
            with self.order:
                t = link.submit(lambda i: ResyncQuery(i, resync.QUERY_BEGIN, b"", int(full), 0))
            reply = t.wait(timeout)
            if isinstance(reply, ResyncReply) and reply.status == errno.EAGAIN:
                if stop.wait(0.25) or link.closed:
                    raise ResyncError("stopped before the target was ready")
                continue
            if not isinstance(reply, ResyncReply) or reply.status:
                raise ResyncError(f"target refused the resync: {reply}")
            target_log = resync.decode_log(reply.body)
            break
        else:
            raise ResyncError("the target never armed its resync")
        self.progress = resync.Progress(started=begun, started_at=begun_at)
        with self.order:
            self.redo = resync.RedoSet()
            self.sent_open = set()
            self.mode = "resync"
            source_log = activity_log(self.journal, bool(self.journal_error))
        plan = resync.plan_incremental(source_log, target_log, full)
        svc.log.info("resync of %s: %s", self.path, plan.reason)
        rate = svc.bandwidth_mbps * 1e6 / 8
        rein = resync.Reintegrator(
            self.root_fd,
            self.order,
            link,
            self.redo,
            timeout=timeout,
            throttle=resync.Throttle(rate),
            progress=self.progress,
            stopped=lambda: stop.is_set() or link.closed,
            excluded=self.excluded,
        )
        rein.run(plan)

        def done() -> Pending | None:
            if not link.wait_idle(timeout):
                raise ChannelError("the target stopped answering")
            if self.redo:
                return None
            for fh, path in list(self.fh_paths.items()):
                if path is not None and fh not in self.sent_open and not self.excluded(path):
                    self.sent_open.add(fh)
                    link.submit(_request(ops.Open(fh, path)), self._open_result(fh, path))
            if not link.wait_idle(timeout):
                raise ChannelError("the target stopped answering")
            if self.redo:
                return None
            self.mode = "live"
            return link.submit(lambda i: ResyncDone(i))

        rein.finish(done)
        with self.order:  # the live flush sends our times of what the session touched
            room = max(0, _MAX_DIRTY_TIMES - len(self.dirty_times))
            self.dirty_times.update(sorted(rein.times_dirty)[:room])
        self.progress.finish()
        self.resync = "done"
        svc.log.info(
            "resync of %s done in %.3f s (%d bytes sent); replicating live",
            self.path,
            self.progress.session_s or 0.0,
            self.progress.bytes_sent,
        )

    def _open_result(self, fh: int, path: bytes) -> Callable[[Event | None], None]:
        def on_result(ev: Event | None) -> None:
            if isinstance(ev, Nack):
                self.sent_open.discard(fh)
                self.redo.add(path)

        return on_result

    def async_sink(self, op: ops.Op) -> None:
        """The async mirror's sink: journal, then send on the live link and wait for the ack
        (a peer that is not live gets nothing: the journal carries it to the next resync)."""
        self.apply(op, lambda: None)

    def settle(self) -> None:
        """Before a verify re-check: send the pending directory and symlink times, let the
        ops already queued be acknowledged (bounded)."""
        self.flush_times()
        if self.async_mirror is not None:
            try:
                self.async_mirror.flush(max(10.0, self.svc.ack_timeout_s))
            except AsyncMirrorError as exc:
                self.svc.log.warning("verify: flushing the async mirror: %s", exc)
        link = self.link
        if link is not None:
            link.wait_idle(min(5.0, self.svc.ack_timeout_s))

    def times_settling(self, path: bytes) -> bool:
        """Whether ``path``'s times are still on their way to the peer (ordering lock held):
        a namespace op touched it since the last times flush, or a handle writing it is open
        (its times go with its Release)."""
        return path in self.dirty_times or any(p == path for p in self.fh_paths.values())


def _request(op: ops.Op) -> Callable[[int], Event]:
    return lambda i: Request(i, op)
