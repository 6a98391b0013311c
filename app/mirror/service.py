"""MirrorService: the node daemon's handle on replication (primary, secondary, resync).

How it works
    Per replicated directory (index i) there is one TCP connection, bound to the directory by
    a first ``ResyncQuery(QUERY_BIND, offset=i, count=len(dirs))``.

    Primary (``start_primary``): each directory is opened (``O_RDONLY``) BEFORE a MirrorMount
    goes over it; its replicator (``DirPrimary.apply``, primary.py) marks the DirtyJournal (in
    ``<state_dir>/mirror/<i>-<hash>/``, journal_dirs.py), then, under one ordering lock, runs
    ``local()`` and queues the op on the link when the peer is being resynced or live, then
    waits for the answer outside the lock (pipelined). A Write is queued before its local write
    (both sides write at once; a local failure then drops the peer, the journal covers the
    region); an Fsync is queued under the lock and the local fsync runs outside it, alongside
    the peer's. A timeout, a disconnect, or a Nack while live drops the peer (``mirror_state``
    "dropped"); the op stays in the journal; the application sees only the local result. A
    background connector keeps (re)connecting with bounded backoff; a fresh link carries nothing
    until ``start_resync("source")`` ran a resync on it (resync.py); ResyncDone is sent under
    the ordering lock once nothing is left to redo, and from then on the link is live. Handles
    the application opened before that are announced (``Open``) right before ResyncDone.

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
    applies are bracketed by ``applying(op)`` and ``applied``; a change by anyone else
    raises a flag file that the target-side ``start_resync`` turns into an untrusted
    activity log (full compare) and that a finished resync clears.

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
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from app.mirror import resync
from app.mirror.asyncmode import AsyncMirror
from app.mirror.behind import BehindError, BehindFlag, BehindWatcher
from app.mirror.channel import Link, Listener
from app.mirror.errors import ChannelError, MirrorError, ResyncError
from app.mirror.journal import DirtyJournal, JournalError, JournalNotFound
from app.mirror.journal_dirs import (
    ASYNC_MARKER,
    activity_log,
    distrust_after_async,
    journal_dir,
    load_journal,
    touch,
)
from app.mirror.mount import clean_stale_mount
from app.mirror.primary import DirPrimary, Excluder, ResyncState
from app.mirror.protocol import (
    Connection,
    Event,
    Request,
    ResyncQuery,
    ResyncReply,
    Role,
)
from app.mirror.quarantine import make_quarantine
from app.mirror.receiver import Receiver
from app.mirror.verify import (
    TIMES_OF_ALL,
    TIMES_OF_FILES,
    TokenBucket,
    Verifier,
    VerifyError,
    VerifyReport,
)

MirrorState = Literal["off", "connected", "dropped", "degraded"]


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
        self._prim: list[DirPrimary] = []
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
                    d = DirPrimary(self, i, path, Excluder(excludes))
                    self._prim.append(d)
                    d.journal = load_journal(journal_dir(self.state_dir, i, path), generation)
                    distrust_after_async(d.journal)
                    clean_stale_mount(path)  # left by a daemon that died as primary
                    d.root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    if reason is not None:
                        touch(d.journal.state_dir / ASYNC_MARKER)
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
            excluded=Excluder(excludes),
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
                    d.responder.release_all()
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
                behind = d.behind
                if behind is None or type(ev) is not Request:
                    return d.responder.handle(ev)
                paths = behind.applying(ev.op)  # the receiver's own change: not reported
                try:
                    return d.responder.handle(ev)
                finally:
                    behind.applied(paths)

        def on_close(lk: Link, reason: str) -> None:
            for d in cell:
                with d.lock:
                    if d.link is lk:
                        d.link = None
                        d.responder.state = "none"
                        d.responder.armed = None
                        d.responder.release_all()
            self.last_error = f"replication link closed: {reason}"

        def on_idle() -> None:
            for d in cell:
                with d.lock:
                    if d.link is link:
                        d.responder.receiver.kick_writeback()

        link = Link(
            sock,
            conn,
            handler=handler,
            on_close=on_close,
            on_idle=on_idle,
            log=self.log,
            name="recv",
        )
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
            distrust_after_async(journal)
            return journal
        except JournalNotFound:
            if (jdir / ASYNC_MARKER).exists():
                journal = DirtyJournal(jdir, "")
                distrust_after_async(journal)
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

    def _reset_journal(self, d: DirPrimary, current: str) -> None:
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
                        settling=d.times_settling,
                        times_of=TIMES_OF_FILES if d.async_mirror is not None else TIMES_OF_ALL,
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
