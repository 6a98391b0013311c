"""MirrorService: the node daemon's handle on replication (primary, secondary, resync).

How it works
    Per replicated directory (index i) there is one TCP connection, bound to the directory by
    a first ``ResyncQuery(QUERY_BIND, offset=i, count=len(dirs))``.

    Primary (``start_primary``): each directory is opened (``O_RDONLY``) BEFORE a MirrorMount
    goes over it; its replicator (``_DirPrimary.apply``) marks the DirtyJournal (in
    ``<state_dir>/mirror/<i>-<hash>/``), then, under one ordering lock, runs ``local()`` and
    queues the op on the link when the peer is being resynced or live, then waits for the
    answer outside the lock (pipelined). A Write is queued before its local write (both sides
    write at once; a local failure then drops the peer, the journal covers the region); an
    Fsync is queued under the lock and the local fsync runs outside it, alongside the peer's.
    A timeout, a disconnect, or a Nack while live drops the peer (``mirror_state``
    "dropped"); the op stays in the journal; the application sees only the local result.
    A background connector keeps (re)connecting with bounded backoff; a fresh
    link carries nothing until ``start_resync("source")`` ran a resync on it (resync.py);
    ResyncDone is sent under the ordering lock once nothing is left to redo, and from then on
    the link is live. Handles the application opened before that are announced (``Open``)
    right before ResyncDone.

    Secondary (``start_receiver``): a Listener authenticates the primary; each link's reader
    thread hands frames to the directory's Responder (resync.py) which applies ops with a
    Receiver and answers queries in stream order. Ops are refused (EAGAIN) until a resync
    session began; ``start_resync("target")`` arms it (with this node's own activity log,
    loaded from its journal, so a crashed ex-primary's unacknowledged writes are compared
    too). A new link for a directory replaces the old one.

    Async fallback: when ``fuse_unavailable_reason()`` gives a reason (or ``force_async``),
    ``start_primary`` runs an AsyncMirror (asyncmode.py) per directory instead of a mount; its
    sink is the same replicator (journal, then the live link, waiting for the ack) with a
    no-op ``local()``. ``status()`` says ``mode`` "async", its note and why FUSE was not used.
    An ``async-primary`` marker in the journal dir, removed at a clean stop, makes the journal
    untrusted after a crash (the inotify mirror journals after the fact).

    Verify (primary, ``start_verify``/``verify_status``): a background thread runs verify.py's
    Verifier on each directory over its live link.

    Behind the back (secondary): a BehindWatcher (behind.py) per directory; the receiver's
    applies are wrapped in ``applying(op)``; a change by anyone else raises a flag file that
    the target-side ``start_resync`` turns into an untrusted activity log (full compare) and
    that a finished resync clears.

    Exceptions: nothing but ``MirrorError`` subclasses and ``OSError`` (opening a directory,
    a mount) leaves the async methods; peer trouble is reported by the state methods.

Limits
    - Ordering is per directory; fsync order across two directories is not kept.
    - The journal keeps marking while PRIM (a superset); it is reset only by ``peer_synced``.
    - Exclude patterns (fnmatch on the relative path or its last component) stop live ops whose
      every path is excluded and are skipped by resync; a rename between an excluded and a
      replicated name is replicated as is (the peer may refuse it: a drop and a resync follow).
    - A journal write error keeps the application running (degraded) and the next resync full.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.mirror import ops, resync
from app.mirror.asyncmode import AsyncMirror, AsyncMirrorError
from app.mirror.behind import BehindError, BehindFlag, BehindWatcher
from app.mirror.channel import Link, Listener, Pending, connect
from app.mirror.errors import ChannelError, MirrorError, ResyncError
from app.mirror.exclude import Exclusions
from app.mirror.journal import (
    DirtyJournal,
    JournalCorrupt,
    JournalError,
    JournalNotFound,
)
from app.mirror.mount import clean_stale_mount
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
from app.mirror.quarantine import make_quarantine
from app.mirror.receiver import Receiver
from app.mirror.verify import TokenBucket, Verifier, VerifyError, VerifyReport

T = TypeVar("T")
ResyncState = Literal["none", "running", "done", "failed"]
MirrorState = Literal["off", "connected", "dropped", "degraded"]

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
ASYNC_MARKER = "async-primary"  # in a journal dir: async mode ran; removed at a clean stop
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


def _parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def times_touched(op: ops.Op) -> tuple[bytes, ...]:
    """Paths whose own times ``op`` moves on each side to that side's clock.

    A namespace op changes its parent directory's mtime (and a new directory's, node's or
    symlink's own times) when it is applied, so the primary and the secondary each get their
    own "now". Regular files need nothing here: their times are replicated when their handle
    is released, and a truncate by path sends them at once (fusefs.py).
    """
    match op:
        case ops.Create(path=p) | ops.Unlink(path=p) | ops.Rmdir(path=p):
            return (_parent_of(p),)
        case ops.Mkdir(path=p) | ops.Mknod(path=p) | ops.Symlink(path=p):
            return (_parent_of(p), p)
        case ops.Link(new=new):
            return (_parent_of(new),)
        case ops.Rename(old=old, new=new):
            return (_parent_of(old), _parent_of(new), new)
        case _:
            return ()


def op_fh(op: ops.Op) -> int | None:
    fh = getattr(op, "fh", None)
    return fh if isinstance(fh, int) and fh >= 0 else None


def journal_dir(state_dir: Path, index: int, path: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(str(path))).hexdigest()[:12]
    return state_dir / "mirror" / f"{index}-{digest}"


def load_journal(jdir: Path, generation: str) -> DirtyJournal:
    """The journal kept in ``jdir``, or a new one at ``generation`` (untrusted if corrupt)."""
    try:
        return DirtyJournal.load(jdir)
    except JournalNotFound:
        return DirtyJournal(jdir, generation)
    except JournalCorrupt as exc:
        journal = DirtyJournal(jdir, generation)
        journal.invalidate(f"the previous journal was unreadable: {exc}")
        return journal


def activity_log(journal: DirtyJournal | None, degraded: bool = False) -> resync.ActivityLog:
    if journal is None:
        return resync.ActivityLog(present=False)
    if degraded or not journal.trusted:
        return resync.ActivityLog(True, False, journal.reason or "journal write failed")
    files = tuple((p, tuple(rs)) for p, rs in journal.dirty_files())
    return resync.ActivityLog(
        True,
        True,
        "",
        files,
        tuple(sorted(journal.namespace_paths())),
        tuple(sorted(journal.metadata_paths())),
    )


class _Excluder:
    """The directory's exclusions (the FUSE layer's own rules, app/mirror/exclude.py), for the
    ops and resync paths; a directory pattern ("cache/") excludes what is below it."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.rules = Exclusions(self.patterns)

    def __call__(self, path: bytes) -> bool:
        if not self.patterns or not path:
            return False
        return self.rules.excluded(path, is_dir=False)


class _DirPrimary:
    """One replicated directory on the primary: journal, mount, link, resync."""

    def __init__(self, svc: MirrorService, index: int, path: Path, excluded: _Excluder) -> None:
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
        """Before a verify re-check: let the ops already queued be acknowledged (bounded)."""
        if self.async_mirror is not None:
            try:
                self.async_mirror.flush(max(10.0, self.svc.ack_timeout_s))
            except AsyncMirrorError as exc:
                self.svc.log.warning("verify: flushing the async mirror: %s", exc)
        link = self.link
        if link is not None:
            link.wait_idle(min(5.0, self.svc.ack_timeout_s))


def _request(op: ops.Op) -> Callable[[int], Event]:
    return lambda i: Request(i, op)


class _DirSecondary:
    def __init__(self, index: int, path: Path, flag: BehindFlag) -> None:
        self.index = index
        self.path = path
        self.lock = threading.Lock()
        self.receiver = Receiver(path)
        self.responder = resync.Responder(str(path), self.receiver)
        self.link: Link | None = None
        self.journal: DirtyJournal | None = None
        self.flag = flag  # a full compare owed: changes made behind the mirror's back
        self.flag_seq: int | None = None  # the flag's sequence when the resync was armed
        self.behind: BehindWatcher | None = None


def behind_flag_path(state_dir: Path, index: int, path: Path) -> Path:
    jdir = journal_dir(state_dir, index, path)
    return jdir.with_name(jdir.name + ".behind")


class MirrorService:
    """See the module docstring; the interface is the node daemon's MirrorPort."""

    def __init__(
        self,
        *,
        dirs: Sequence[tuple[Path, tuple[str, ...]]],
        state_dir: Path,
        key: bytes,
        cluster: str,
        node: str,
        peer: str,
        local_ip: str,
        peer_ip: str,
        port: int,
        ack_timeout_s: float,
        bandwidth_mbps: float,
        log: logging.Logger,
        behind_grace_s: float = 2.0,
        force_async: bool = False,
    ) -> None:
        self.dirs = [(Path(p), tuple(ex)) for p, ex in dirs]
        self.state_dir = state_dir
        self.key = key
        self.cluster, self.node, self.peer = cluster, node, peer
        self.local_ip, self.peer_ip, self.port = local_ip, peer_ip, port
        self.ack_timeout_s = ack_timeout_s
        self.bandwidth_mbps = bandwidth_mbps
        self.log = log
        self.behind_grace_s = behind_grace_s
        self.force_async = force_async
        self.async_reason: str | None = None  # why FUSE is not used (async mode), else None
        self.role: Literal["off", "primary", "secondary"] = "off"
        self.generation = ""
        self.last_error = ""
        self.ops_sent = 0
        self.acks = 0
        self.drops = 0
        self.dropped = False
        self._prim: list[_DirPrimary] = []
        self._sec: list[_DirSecondary] = []
        self._listener: Listener | None = None
        self._stop = threading.Event()
        self._resync_stop = threading.Event()
        self._target_armed = False
        self._lock = threading.Lock()
        self._verify = VerifyReport()
        self._verify_thread: threading.Thread | None = None
        self._verify_stop = threading.Event()

    # -- primary --------------------------------------------------------------------

    async def start_primary(self, generation: str) -> None:
        await asyncio.to_thread(self._start_primary, generation)

    def _start_primary(self, generation: str) -> None:
        from app.mirror.fusecheck import fuse_unavailable_reason
        from app.mirror.mount import MirrorMount

        with self._lock:
            if self.role == "primary":
                return
            self._stop_secondary()
            self.role = "primary"
            self.generation = generation
            self._stop = threading.Event()
            self._prim = []
            reason = "forced (force_async)" if self.force_async else fuse_unavailable_reason()
            self.async_reason = reason
            if reason is not None:
                self.log.warning("FUSE unavailable (%s): asynchronous mirror (inotify)", reason)
            try:
                for i, (path, excludes) in enumerate(self.dirs):
                    d = _DirPrimary(self, i, path, _Excluder(excludes))
                    self._prim.append(d)
                    d.journal = load_journal(journal_dir(self.state_dir, i, path), generation)
                    _distrust_after_async(d.journal)
                    clean_stale_mount(path)  # left by a daemon that died as primary
                    d.root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    if reason is not None:
                        _touch(d.journal.state_dir / ASYNC_MARKER)
                        d.async_mirror = AsyncMirror(path, d.async_sink, exclude=excludes,
                                                     log=self.log)  # fmt: skip
                        d.async_mirror.start()
                        continue
                    d.mount = MirrorMount(path, d, exclude=excludes)
                    d.mount.start()
                    d.mount.wait_ready(10.0)
                for d in self._prim:
                    stop = self._stop
                    d.connector = threading.Thread(
                        target=d.connect_loop, args=(stop,), name=f"connect{d.index}", daemon=True
                    )
                    d.connector.start()
            except BaseException:
                self._stop_primary()
                raise

    def _stop_primary(self) -> None:
        self._stop.set()
        for d in self._prim:
            d.wake.set()  # out of a connect backoff now
        self._resync_stop.set()
        self._verify_stop.set()
        if self._verify_thread is not None:
            self._verify_thread.join(max(15.0, self.ack_timeout_s * 2))
            self._verify_thread = None
        for d in self._prim:
            if d.mount is not None:
                try:
                    d.mount.stop()
                except Exception as exc:
                    self.log.error("unmount of %s failed: %s", d.path, exc)
            if d.async_mirror is not None:
                d.async_mirror.stop(max(5.0, self.ack_timeout_s * 2))
                d.async_mirror = None
                if d.journal is not None and not d.journal_error:
                    (d.journal.state_dir / ASYNC_MARKER).unlink(missing_ok=True)
            link = d.link
            if link is not None:
                link.close("stopping")
                link.join(2.0)
            for t in (d.worker, d.connector):
                if t is not None:
                    t.join(5.0)
            if d.journal is not None:
                try:
                    d.journal.close()
                except JournalError as exc:
                    self.log.error("closing the journal of %s: %s", d.path, exc)
            if d.root_fd >= 0:
                os.close(d.root_fd)
                d.root_fd = -1
        self._prim = []
        self.role = "off"

    # -- secondary ------------------------------------------------------------------

    async def start_receiver(self) -> None:
        await asyncio.to_thread(self._start_receiver)

    def _start_receiver(self) -> None:
        with self._lock:
            if self.role == "secondary":
                return
            if self.role == "primary":
                self._stop_primary()
            # A daemon that died as primary leaves a dead FUSE mount over the directory
            # ("transport endpoint is not connected"): the receiver works on the real one.
            for path, _ in self.dirs:
                clean_stale_mount(path)
            self._sec = [
                _DirSecondary(i, p, BehindFlag(behind_flag_path(self.state_dir, i, p)))
                for i, (p, _) in enumerate(self.dirs)
            ]
            self.role = "secondary"
            for sd, (_, excludes) in zip(self._sec, self.dirs, strict=True):
                self._watch_behind(sd, excludes)

            def make_conn() -> Connection:
                return Connection(Role.SECONDARY, cluster=self.cluster, node=self.node,
                                  key=self.key, peer=self.peer)  # fmt: skip

            self._listener = Listener(
                self.local_ip, self.port, make_conn, self._on_link, log=self.log
            )

    def _watch_behind(self, sd: _DirSecondary, excludes: tuple[str, ...]) -> None:
        """Watch the directory for changes not made by the receiver (behind.py)."""

        def on_change(path: bytes, what: str) -> None:
            sd.flag.raise_(path, what)

        watcher = BehindWatcher(
            sd.path,
            on_change=on_change,
            excluded=_Excluder(excludes),
            grace_s=self.behind_grace_s,
            log=self.log,
        )
        try:
            watcher.start()
        except BehindError as exc:
            self.last_error = f"changes behind the mirror's back go unseen in {sd.path}: {exc}"
            self.log.warning("%s", self.last_error)
            return
        sd.behind = watcher

    def _on_link(self, sock: socket.socket, conn: Connection) -> None:
        cell: list[_DirSecondary] = []
        link: Link

        def handler(ev: Event) -> Event | None:
            if not cell:
                if not (isinstance(ev, ResyncQuery) and ev.kind == resync.QUERY_BIND):
                    raise ChannelError("the first frame must bind a directory")
                if ev.count != len(self._sec) or ev.offset >= len(self._sec):
                    return ResyncReply(ev.id, errno.EINVAL, b"")
                d = self._sec[ev.offset]
                with d.lock:
                    old, d.link = d.link, link
                    d.receiver.release_all()
                    d.responder.state = "none"
                    if d.behind is not None:
                        d.behind.expectations.forget_handles()
                if old is not None:
                    old.close("replaced by a new connection")
                cell.append(d)
                return ResyncReply(ev.id, 0, b"")
            d = cell[0]
            with d.lock:
                if d.link is not link:
                    raise ChannelError("connection replaced")
                if d.behind is not None and isinstance(ev, Request):
                    with d.behind.applying(ev.op):  # the receiver's own change: not reported
                        return d.responder.handle(ev)
                return d.responder.handle(ev)

        def on_close(lk: Link, reason: str) -> None:
            for d in cell:
                with d.lock:
                    if d.link is lk:
                        d.link = None
                        d.responder.state = "none"
                        d.responder.armed = None
                        d.receiver.release_all()
            self.last_error = f"replication link closed: {reason}"

        link = Link(sock, conn, handler=handler, on_close=on_close, log=self.log, name="recv")
        link.start()

    def _stop_secondary(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for d in self._sec:
            if d.behind is not None:
                d.behind.stop()
                d.behind = None
            link = d.link
            if link is not None:
                link.close("stopping")
                link.join(2.0)
            with d.lock:
                d.receiver.close()
                d.responder.close()
                if d.journal is not None:
                    d.journal.close()
                    d.journal = None
        self._sec = []
        self._target_armed = False
        if self.role == "secondary":
            self.role = "off"

    # -- resync ---------------------------------------------------------------------

    async def start_resync(self, role: Literal["source", "target"], full: bool) -> None:
        await asyncio.to_thread(self._start_resync, role, full)

    def _start_resync(self, role: Literal["source", "target"], full: bool) -> None:
        if role == "source":
            # A session cut short (the link dropped) may still have its worker winding down:
            # stop it and wait (bounded), or the new session would never start for that dir.
            with self._lock:
                old = [d.worker for d in self._prim if d.worker is not None and d.worker.is_alive()]
                if old:
                    self._resync_stop.set()
            for w in old:
                w.join(timeout=15)
        with self._lock:
            if role == "source":
                if self.role != "primary":
                    raise ResyncError("start_resync('source') needs start_primary first")
                self._resync_stop = threading.Event()
                for d in self._prim:
                    d.wake.set()  # the peer is back: its connect loop retries at once
                    if d.worker is not None and d.worker.is_alive():
                        self.log.error("resync of %s: the previous session did not end", d.path)
                        continue
                    if d.mode != "idle" and d.resync == "done":
                        continue
                    d.resync = "running"
                    d.worker = threading.Thread(
                        target=d.resync_loop,
                        args=(full, self._resync_stop),
                        name=f"resync{d.index}",
                        daemon=True,
                    )
                    d.worker.start()
                return
            if self.role != "secondary":
                raise ResyncError("start_resync('target') needs start_receiver first")
            self._target_armed = True
            for i, sd in enumerate(self._sec):
                with sd.lock:
                    if sd.responder.state in ("running", "done") and sd.link is not None:
                        continue
                    if sd.journal is None:
                        sd.journal = self._load_target_journal(i, sd.path)
                    log = activity_log(sd.journal)
                    if full:
                        log = resync.ActivityLog(True, False, "full resync asked by the target")
                    flag = sd.flag.read()
                    sd.flag_seq = None
                    if flag is not None:
                        seq = flag.get("seq")
                        sd.flag_seq = seq if isinstance(seq, int) else None
                        log = resync.ActivityLog(True, False, BehindFlag.describe(flag))
                    sd.responder.arm(log)
                    sd.responder.on_done = self._target_done(sd)

    def _load_target_journal(self, index: int, path: Path) -> DirtyJournal | None:
        jdir = journal_dir(self.state_dir, index, path)
        try:
            journal = DirtyJournal.load(jdir)
            _distrust_after_async(journal)
            return journal
        except JournalNotFound:
            if (jdir / ASYNC_MARKER).exists():
                journal = DirtyJournal(jdir, "")
                _distrust_after_async(journal)
                return journal
            return None
        except JournalError as exc:
            self.log.warning("journal of %s unreadable (%s): full compare", path, exc)
            journal = DirtyJournal(jdir, "")
            journal.invalidate(f"unreadable: {exc}")
            return journal

    def _target_done(self, d: _DirSecondary) -> Callable[[], None]:
        def done() -> None:
            if d.flag_seq is not None:
                try:
                    if d.flag.clear(d.flag_seq):
                        self.log.info("%s: full compare done after changes behind the back", d.path)
                except OSError as exc:
                    self.log.warning("cannot remove %s: %s", d.flag.path, exc)
                d.flag_seq = None
            if d.journal is not None:
                try:
                    d.journal.discard()
                except JournalError as exc:
                    self.log.warning("cannot discard the journal of %s: %s", d.path, exc)
                d.journal = None

        return done

    def resync_state(self) -> ResyncState:
        if self.role == "primary":
            states = [d.resync for d in self._prim]
        elif self.role == "secondary" and self._target_armed:
            states = []
            for d in self._sec:
                if d.responder.state == "done":
                    states.append("done")
                elif d.responder.state == "running" or d.responder.armed is not None:
                    states.append("running")
                else:
                    states.append("none")
        else:
            return "none"
        if "failed" in states:
            return "failed"
        if all(s == "done" for s in states):
            return "done"
        if "running" in states:
            return "running"
        return "none"

    def mirror_state(self) -> MirrorState:
        if self.role != "primary":
            return "off"
        if any(d.journal_error for d in self._prim):
            return "degraded"
        if all(d.mode == "live" and d.link is not None for d in self._prim):
            return "connected"
        return "dropped"

    # -- generations ----------------------------------------------------------------

    def set_generation(self, current: str) -> None:
        self.generation = current

    def peer_synced(self, current: str) -> None:
        self.generation = current
        for d in list(self._prim):
            threading.Thread(target=self._reset_journal, args=(d, current), daemon=True).start()

    def _reset_journal(self, d: _DirPrimary, current: str) -> None:
        with d.order:
            link = d.link
            if link is not None and d.mode == "live":
                link.wait_idle(self.ack_timeout_s)
            if d.mode != "live" or d.journal is None:
                return  # the peer dropped meanwhile: keep the record
            try:
                d.journal.reset(current)
                d.journal_error = ""
            except JournalError as exc:
                d.journal_error = str(exc)

    # -- verify -----------------------------------------------------------------------

    async def start_verify(self, rate_mbps: float) -> None:
        """Start comparing both copies by checksums in the background (verify.py)."""
        await asyncio.to_thread(self._start_verify, rate_mbps)

    def _start_verify(self, rate_mbps: float) -> None:
        with self._lock:
            if self.role != "primary":
                raise VerifyError(f"verify runs on the primary; this node's mirror is {self.role}")
            if self._verify_thread is not None and self._verify_thread.is_alive():
                raise VerifyError("a verify is already running: see its status")
            if not rate_mbps >= 0:
                raise VerifyError(f"rate_mbps must be 0 (no limit) or more, not {rate_mbps}")
            idle = [str(d.path) for d in self._prim if d.mode != "live" or d.link is None]
            if idle:
                raise VerifyError(
                    f"the secondary is not connected and in sync for {', '.join(idle)}: "
                    "verify needs a live mirror (wait for the resync to finish)"
                )
            report = VerifyReport(running=True, started=time.time(), rate_mbps=rate_mbps)
            self._verify = report
            self._verify_stop = stop = threading.Event()
            self._verify_thread = threading.Thread(
                target=self._verify_run, args=(report, stop), name="verify", daemon=True
            )
            self._verify_thread.start()

    def _verify_run(self, report: VerifyReport, stop: threading.Event) -> None:
        bucket = TokenBucket(report.rate_mbps * 1e6 / 8)
        try:
            verifiers = []
            for d in list(self._prim):
                link = d.link
                if link is None or d.mode != "live":
                    raise VerifyError(f"the secondary of {d.path} dropped before the verify")
                verifiers.append(
                    Verifier(
                        d.root_fd,
                        d.order,
                        link,
                        report,
                        label=str(d.path),
                        timeout=max(10.0, self.ack_timeout_s),
                        bucket=bucket,
                        settle=d.settle,
                        stopped=stop.is_set,
                        excluded=d.excluded,
                    )
                )
            for v in verifiers:
                v.estimate()
            for v in verifiers:
                v.run()
            found = len(report.differences) + report.differences_dropped
            self.log.info("verify done: %d difference(s)", found)
        except (MirrorError, OSError) as exc:
            report.last_error = str(exc)
            self.log.warning("verify failed: %s", exc)
        finally:
            report.running = False
            report.finished = time.time()

    def verify_status(self) -> dict[str, Any]:
        """The last verify's progress and findings (``running`` False and no ``started``:
        none ran since the daemon started)."""
        return {"dirs": [str(p) for p, _ in self.dirs], **self._verify.snapshot()}

    # -- quarantine -----------------------------------------------------------------

    async def quarantine(self, reason: str) -> Path:
        return await asyncio.to_thread(self._quarantine, reason)

    def _quarantine(self, reason: str) -> Path:
        journals: list[DirtyJournal | None] = []
        opened: list[DirtyJournal] = []
        for i, (path, _) in enumerate(self.dirs):
            own = next((d.journal for d in self._prim if d.index == i), None)
            if own is None:
                own = next((d.journal for d in self._sec if d.index == i), None)
            if own is None:
                try:
                    own = DirtyJournal.load(journal_dir(self.state_dir, i, path))
                    opened.append(own)
                except JournalError:
                    own = None
            journals.append(own)
        try:
            return make_quarantine(
                self.state_dir / "quarantine",
                [(p, j) for (p, _), j in zip(self.dirs, journals, strict=True)],
                reason,
            )
        finally:
            for j in opened:
                j.close()

    # -- lifecycle ------------------------------------------------------------------

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop_all)

    def _stop_all(self) -> None:
        with self._lock:
            if self.role == "primary":
                self._stop_primary()
            self._stop_secondary()
            self.role = "off"

    def _mode_status(self) -> dict[str, Any]:
        if self.role != "primary":
            return {"mode": None}
        if self.async_reason is None:
            return {"mode": "sync", "note": None}
        mirrors = [d.async_mirror.status() for d in self._prim if d.async_mirror is not None]
        lags = [m["lag_ms"] for m in mirrors]
        notes = [str(m["note"]) for m in mirrors]
        worst = "; ".join(dict.fromkeys(notes))
        return {
            "mode": "async",
            "note": f"{worst or 'async'} (FUSE unavailable: {self.async_reason})",
            "fuse_unavailable": self.async_reason,
            "async": {"lag_ms": lags[0] if len(lags) == 1 else lags, "dirs": mirrors},
        }

    def status(self) -> dict[str, Any]:
        links = [d.link for d in self._prim] + [d.link for d in self._sec]
        live = [lk for lk in links if lk is not None and not lk.closed]
        journals = [d.journal for d in self._prim if d.journal is not None]
        progress: dict[str, Any] = {}
        if self._prim:
            snaps = [d.progress.snapshot() for d in self._prim]
            for key in ("bytes_done", "bytes_total", "files_done", "files_total", "rate_bps"):
                progress[key] = sum(int(s[key] or 0) for s in snaps)
            etas = [float(s["eta_s"]) for s in snaps if s["eta_s"] is not None]
            progress["eta_s"] = max(etas) if etas else None
            # The last session's times (wall clock; session_s from the monotonic clock): from
            # the first directory's BEGIN to the last one's ResyncDone answer.
            ps = [d.progress for d in self._prim]
            starts = [p.started_at for p in ps]
            known = [t for t in starts if t is not None]
            progress["started_at"] = min(known) if len(known) == len(starts) else None
            ends = [p.finished for p in ps]
            done = None not in starts and all(e is not None for e in ends)
            progress["finished_at"] = max(p.finished_at or 0.0 for p in ps) if done else None
            progress["session_s"] = (
                round(max(e or 0.0 for e in ends) - min(p.started for p in ps), 6) if done else None
            )
        return {
            "role": self.role,
            **self._mode_status(),
            "mirror_state": self.mirror_state(),
            "resync_state": self.resync_state(),
            "connected": bool(live) and len(live) == len(self.dirs),
            "dirs": [str(p) for p, _ in self.dirs],
            "bytes_sent": sum(lk.bytes_sent for lk in live),
            "ops_sent": self.ops_sent,
            "acks": self.acks,
            "drops": self.drops,
            "journal": {
                "trusted": all(j.trusted for j in journals)
                and not any(d.journal_error for d in self._prim),
                "reason": "; ".join(
                    [j.reason for j in journals if j.reason]
                    + [d.journal_error for d in self._prim if d.journal_error]
                ),
                "bytes_dirty": sum(j.bytes_dirty() for j in journals),
                "files": sum(1 for j in journals for _ in j.dirty_files()),
            },
            "resync": {"state": self.resync_state(), **progress},
            "last_error": self.last_error,
            "rejected": self._listener.rejected if self._listener is not None else 0,
            "behind_the_back": sum(d.behind.count for d in self._sec if d.behind is not None),
            "behind_the_back_recent": [
                r for d in self._sec if d.behind is not None for r in d.behind.recent
            ],
            "full_compare_owed": any(d.flag.read() is not None for d in self._sec),
            "at": time.time(),
        }


def _touch(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distrust_after_async(journal: DirtyJournal) -> None:
    """An async primary that did not stop cleanly may have written what its journal never saw
    (the inotify mirror journals after the fact): its record is not trusted (full compare)."""
    if (journal.state_dir / ASYNC_MARKER).exists() and journal.trusted:
        try:
            journal.invalidate("async mode ended without a clean stop: the record may miss writes")
        except JournalError:
            pass
