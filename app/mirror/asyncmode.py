"""The asynchronous fallback: copy changed files to the peer after the fact, using inotify.

Where FUSE cannot be used (fusecheck.py says why), the application writes straight to the real
directory and mirrorha follows behind. This is NOT the synchronous mirror of DESIGN.md: a write
is on the peer only some milliseconds after it returned, and ``status()`` says so plainly
("async: up to N ms of writes can be lost on failover", N measured).

How it works
    ``AsyncMirror(root, sink)``: ``start()`` puts an inotify watch on every directory of the
    tree (CREATE, MODIFY, CLOSE_WRITE, ATTRIB, MOVED_FROM/TO, DELETE, DELETE_SELF, MOVE_SELF)
    and starts two threads. The *watch* thread reads events and keeps a model of what the
    peer holds: for each path its type, mode, owner, size, mtime, symlink target and, for
    regular files, the blake2b digest (16 bytes) of each ``block_size`` block. The *send*
    thread takes the resulting ops from a bounded queue and calls ``sink(op)`` (the service
    sends them on the channel; tests apply them with a Receiver), one at a time, in order.
    The parts, one module each:
        asyncmode        ``AsyncMirror``: lifecycle, status, the watch thread and its events
        asyncmode_copy   ``_Copier``: the model of the peer; copying a path to it
        asyncmode_send   ``_Sender``: the send thread and the items of its queue
        asyncmode_pure   block diff, excludes, move pairing, lag statistics (no I/O)
    This module re-exports the public names of asyncmode_pure, so ``asyncmode.NAME`` works.

    - Namespace changes are sent as they are read: DELETE becomes Unlink/Rmdir (the peer's
      subtree is removed deepest first), a MOVED_FROM/MOVED_TO pair (same cookie, see
      ``pair_moves``) becomes Rename when the peer already has the source, a MOVED_FROM with
      no partner (moved out of the tree) becomes a removal, a MOVED_TO with no partner (moved
      in) a copy of what arrived.
    - Content and attribute changes mark the path pending. A pending path is copied once it
      settled (no event for ``settle_ms``), at once after CLOSE_WRITE, and at least every
      ``max_delay_ms`` for a file written continuously. How a path is copied (only the
      changed blocks of a file): asyncmode_copy.py.
    - A new directory gets its watch and is then scanned, since files can be created in it
      before the watch exists. IN_Q_OVERFLOW (events lost) triggers a full rescan against the
      model, which sends only differences; ``status()["overflows"]`` counts them.
    - ``initial_sync()`` forgets the model and sends the whole tree; ``flush()`` copies every
      pending path now; both wait until the sink has taken everything.
    - Lag: each copied change records the time from its first unsent event to the return of
      the sink call of its last op (asyncmode_send.py). ``lag_ms()`` gives p50/p99/max over
      the last minute and the last value; the note's N is the largest of that max, the age
      of the oldest change not yet sent, and ``settle_ms`` (an honest "up to", not a typical
      value).

Exceptions::

    MirrorError (errors.py)
    +-- AsyncMirrorError    start(): the root is not a directory or inotify is unavailable;
                            initial_sync()/flush(): not running, or timed out

    A sink that raises does not stop the mirror: the op's group (one file copy, one rename)
    is abandoned, its path is forgotten by the model (its next change copies it in full), the
    error is logged and counted in ``status()`` ("errors", "last_error"). A Mkdir answered
    EEXIST counts as done. After errors the service should run a real resync.

Known limits (this is the asynchronous mode: that is the deal)
    - Writes between the last copied event and a crash of the primary are lost; so is any
      change whose copy had not reached the peer. The tree on the peer is consistent per file
      only: a file copied while being written holds a mix of old and new blocks until the next
      event copies the rest.
    - Files written continuously are copied when they settle, or every ``max_delay_ms``.
    - Writes through a shared mmap are seen only when the kernel reports IN_MODIFY (msync)
      or the file is closed.
    - Directory renames and removals cost O(tracked paths) and O(watches). One inotify watch
      per directory: past fs.inotify.max_user_watches the directory is not followed and
      ``status()["problems"]`` says so.
    - Excluded paths (fnmatch patterns, see ``is_excluded``) are neither watched nor copied.
    - How a file is copied and what is not replicated: asyncmode_copy.py; the send queue's
      memory: asyncmode_send.py.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from inotify_simple import INotify
from inotify_simple import flags as inflags

from app.mirror import ops
from app.mirror.asyncmode_copy import _Copier, _Entry, _Pending
from app.mirror.asyncmode_pure import CHUNK_BLOCKS as CHUNK_BLOCKS
from app.mirror.asyncmode_pure import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from app.mirror.asyncmode_pure import DIGEST_SIZE as DIGEST_SIZE
from app.mirror.asyncmode_pure import LAG_WINDOW_S as LAG_WINDOW_S
from app.mirror.asyncmode_pure import E as E
from app.mirror.asyncmode_pure import InotifyEvent as InotifyEvent
from app.mirror.asyncmode_pure import LagStats as LagStats
from app.mirror.asyncmode_pure import Moved as Moved
from app.mirror.asyncmode_pure import MoveEvent as MoveEvent
from app.mirror.asyncmode_pure import V as V
from app.mirror.asyncmode_pure import _join, _move_keys, _under
from app.mirror.asyncmode_pure import block_sums as block_sums
from app.mirror.asyncmode_pure import changed_ranges as changed_ranges
from app.mirror.asyncmode_pure import has_unpaired_from as has_unpaired_from
from app.mirror.asyncmode_pure import is_excluded as is_excluded
from app.mirror.asyncmode_pure import pair_moves as pair_moves
from app.mirror.asyncmode_pure import percentile as percentile
from app.mirror.asyncmode_send import _STOP, _Barrier, _Item, _Sender, _Stopped
from app.mirror.errors import MirrorError
from app.mirror.ops import Op
from app.mirror.protocol import MAX_DATA

_PAIR_WAIT_MS: Final = 5
_MAX_POLL_MS: Final = 1000

WATCH_MASK: Final = (
    inflags.CREATE
    | inflags.MODIFY
    | inflags.CLOSE_WRITE
    | inflags.ATTRIB
    | inflags.MOVED_FROM
    | inflags.MOVED_TO
    | inflags.DELETE
    | inflags.DELETE_SELF
    | inflags.MOVE_SELF
    | inflags.ONLYDIR
    | inflags.DONT_FOLLOW
    | inflags.EXCL_UNLINK
)

_LOG = logging.getLogger(__name__)


class AsyncMirrorError(MirrorError):
    """The asynchronous mirror cannot start or did not finish what it was asked in time."""


@dataclass(frozen=True, slots=True)
class _Request:
    kind: str  # "initial" or "flush"
    done: threading.Event
    barrier: threading.Event = field(default_factory=threading.Event)


class AsyncMirror(_Copier, _Sender):
    """Watches ``root`` and sends its changes to ``sink`` asynchronously; see the module doc."""

    def __init__(
        self,
        root: Path,
        sink: Callable[[Op], None],
        *,
        exclude: Sequence[str] = (),
        block_size: int = DEFAULT_BLOCK_SIZE,
        settle_ms: int = 50,
        max_delay_ms: int = 1000,
        queue_ops: int = 64,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size <= 0 or block_size * CHUNK_BLOCKS > MAX_DATA:
            raise ValueError(f"block_size {block_size} must be in 1..{MAX_DATA // CHUNK_BLOCKS}")
        self.root = Path(root)
        self._root_b = os.fsencode(self.root)
        self._sink = sink
        self._exclude = tuple(exclude)
        self._bs = block_size
        self._chunk = block_size * CHUNK_BLOCKS
        self._settle = settle_ms / 1000
        self._max_delay = max_delay_ms / 1000
        self._log = log or _LOG
        self._clock = clock
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_ops)
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        # watch thread only
        self._model: dict[bytes, _Entry] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._wd_path: dict[int, bytes] = {}
        self._root_wd = -1
        self._next_fh = 0
        self._group_ops = 0
        self._inotify: INotify | None = None
        self._wake_r = self._wake_w = -1
        # read by status() from any thread (single assignments)
        self._sum_bytes = 0
        self._oldest_pending: float | None = None
        self._overflows = 0
        self._problems: dict[str, str] = {}
        self._errors = 0
        self._sent_ops = 0
        self._sent_bytes = 0
        self._last_error: str | None = None
        self._failed: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._lag = LagStats()
        self._stopping = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._send_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._watch_thread is not None and self._watch_thread.is_alive()

    def start(self) -> None:
        """Watch the whole tree, then follow it on two threads. Nothing is sent for what is
        already there: call ``initial_sync()`` for that (else the first change to a file
        copies it in full)."""
        if self._watch_thread is not None:
            return
        if not self.root.is_dir() or self.root.is_symlink():
            raise AsyncMirrorError(f"{self.root} is not a directory")
        try:
            self._inotify = INotify()
        except OSError as exc:
            raise AsyncMirrorError(f"inotify is unavailable: {exc}") from exc
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping.clear()
        self._watch_tree(b"", self._clock(), mark=False)
        if self._root_wd < 0:
            self._close_fds()
            raise AsyncMirrorError(f"cannot watch {self.root}: {self._problems}")
        self._send_thread = threading.Thread(
            target=self._send_loop, name="mirrorha-async-send", daemon=True
        )
        self._watch_thread = threading.Thread(
            target=self._watch_loop, name="mirrorha-async-watch", daemon=True
        )
        self._send_thread.start()
        self._watch_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; ops already queued are still given to the sink (within timeout)."""
        if self._watch_thread is None:
            return
        self._stopping.set()
        self._wake()
        self._watch_thread.join(timeout)
        if self._send_thread is not None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                self._log.warning("async mirror: the sink did not drain the queue on stop")
            self._send_thread.join(timeout)
        self._close_fds()
        self._watch_thread = self._send_thread = None

    def __enter__(self) -> AsyncMirror:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def initial_sync(self, timeout: float = 600.0) -> None:
        """Send the whole tree (forgetting what the peer was thought to hold) and wait until
        the sink has taken it. Changes made meanwhile are followed as usual."""
        self._ask("initial", timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Copy every pending change now, without waiting for it to settle, and wait until
        the sink has taken it."""
        self._ask("flush", timeout)

    # -- what the service and the console show --------------------------------------------

    def lag_ms(self) -> dict[str, float | None]:
        """Measured lag over the last minute: p50, p99, max, plus the last value and count."""
        return self._lag.summary(self._clock())

    def status(self) -> dict[str, object]:
        lag = self.lag_ms()
        now = self._clock()
        bound = self._settle * 1000
        if lag["max"] is not None:
            bound = max(bound, lag["max"])
        oldest = self._oldest_pending
        if oldest is not None:
            bound = max(bound, (now - oldest) * 1000)
        return {
            "mode": "async",
            "note": f"async: up to {round(bound)} ms of writes can be lost on failover",
            "running": self.running,
            "lag_ms": lag,
            "pending_paths": len(self._pending),
            "queued_ops": self._queue.qsize(),
            "overflows": self._overflows,
            "sent_ops": self._sent_ops,
            "sent_bytes": self._sent_bytes,
            "errors": self._errors,
            "last_error": self._last_error,
            "problems": sorted(self._problems.copy().values()),
            "watches": len(self._wd_path),
            "tracked_paths": len(self._model),
            "checksum_bytes": self._sum_bytes,
        }

    # -- watch thread --------------------------------------------------------------------

    def _watch_loop(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping.is_set():
                poller.poll(self._poll_timeout_ms())
                self._drain_wake()
                events: list[InotifyEvent] = list(self._inotify.read(timeout=0))
                items = pair_moves(events)
                for _ in range(2):
                    if not has_unpaired_from(items):
                        break
                    events += self._inotify.read(timeout=_PAIR_WAIT_MS)
                    items = pair_moves(events)
                now = self._clock()
                for item in items:
                    self._on_event(item, now)
                self._absorb_failures()
                self._serve_requests()
                self._sync_due(self._clock(), everything=False)
        except _Stopped:
            pass
        except Exception:
            self._log.exception("async mirror: the watch thread failed")
            self._problems["thread"] = "the watch thread failed (see the log): restart the mirror"
            raise

    def _poll_timeout_ms(self) -> int:
        if not self._pending:
            self._oldest_pending = None
            return _MAX_POLL_MS
        now = self._clock()
        first = min(p.first for p in self._pending.values())
        self._oldest_pending = first
        due = min(self._due_at(p) for p in self._pending.values())
        return max(0, min(_MAX_POLL_MS, int((due - now) * 1000) + 1))

    def _due_at(self, p: _Pending) -> float:
        if p.due_now:
            return p.last
        return min(p.last + self._settle, p.first + self._max_delay)

    def _serve_requests(self) -> None:
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            if req.kind == "initial":
                self._model.clear()
                self._sum_bytes = 0
                self._rescan(self._clock())
            self._sync_due(self._clock(), everything=True)
            self._put(_Barrier(req.barrier))
            req.done.set()

    def _sync_due(self, now: float, *, everything: bool) -> None:
        due = sorted(
            path for path, p in self._pending.items() if everything or self._due_at(p) <= now
        )
        for path in due:
            pend = self._pending.pop(path, None)
            if pend is not None:
                self._sync(path, pend)

    # -- events --------------------------------------------------------------------------

    def _on_event(self, item: InotifyEvent | Moved[InotifyEvent], now: float) -> None:
        if isinstance(item, Moved):
            self._on_move(item.src, item.dst, now)
            return
        mask, wd = item.mask, item.wd
        if mask & inflags.Q_OVERFLOW:
            self._overflows += 1
            self._log.warning("async mirror: inotify queue overflowed, rescanning %s", self.root)
            self._rescan(now)
            return
        if mask & inflags.IGNORED:
            self._wd_path.pop(wd, None)
            return
        base = self._wd_path.get(wd)
        if base is None:
            return
        if mask & (inflags.DELETE_SELF | inflags.MOVE_SELF | inflags.UNMOUNT):
            if wd == self._root_wd:
                self._problems["root"] = (
                    f"{self.root} was deleted, moved or unmounted: nothing is mirrored any more"
                )
            return
        path = _join(base, os.fsencode(item.name))
        if self._excluded(path):
            return
        isdir = bool(mask & inflags.ISDIR)
        if mask & inflags.MOVED_FROM:
            self._gone(path, now, unwatch=True)
        elif mask & inflags.MOVED_TO:
            self._arrived(path, isdir, now)
        elif mask & inflags.DELETE:
            self._gone(path, now, unwatch=False)
        elif mask & inflags.CREATE:
            self._arrived(path, isdir, now)
        elif mask & inflags.MODIFY:
            self._touch(path, now, data=True)
        elif mask & inflags.CLOSE_WRITE:
            self._touch(path, now, data=True, due_now=True)
        elif mask & inflags.ATTRIB:
            self._touch(path, now, data=False)

    def _on_move(self, src: InotifyEvent, dst: InotifyEvent, now: float) -> None:
        src_base, dst_base = self._wd_path.get(src.wd), self._wd_path.get(dst.wd)
        isdir = bool(dst.mask & inflags.ISDIR)
        old = None if src_base is None else _join(src_base, os.fsencode(src.name))
        new = None if dst_base is None else _join(dst_base, os.fsencode(dst.name))
        if old is not None and self._excluded(old):
            old = None
        if new is not None and self._excluded(new):
            new = None
        if old is None or new is None:
            if old is not None:
                self._gone(old, now, unwatch=True)
            if new is not None:
                self._arrived(new, isdir, now)
            return
        if old in self._model and self._ensure_parents(new):
            self._emit(ops.Rename(old, new, 0))
            self._drop_model(new)
            _move_keys(self._model, old, new)
            _move_keys(self._pending, old, new)
            self._move_watches(old, new)
            self._end_group(new, now)
            return
        _move_keys(self._pending, old, new)  # the peer never had ``old``: copy what arrived
        self._move_watches(old, new)
        self._arrived(new, isdir, now)

    def _arrived(self, path: bytes, isdir: bool, now: float) -> None:
        if isdir:
            self._watch_tree(path, now, mark=True)
        else:
            self._touch(path, now, data=True)

    def _gone(self, path: bytes, now: float, *, unwatch: bool) -> None:
        for key in [k for k in self._pending if _under(k, path)]:
            del self._pending[key]
        for wd, wpath in list(self._wd_path.items()):
            if _under(wpath, path):
                del self._wd_path[wd]
                if unwatch and self._inotify is not None:
                    try:
                        self._inotify.rm_watch(wd)
                    except OSError:
                        pass
        if self._remove_peer(path):
            self._end_group(path, now)

    def _touch(
        self, path: bytes, now: float, *, data: bool, due_now: bool = False, timed: bool = True
    ) -> None:
        pend = self._pending.get(path)
        if pend is None:
            self._pending[path] = _Pending(now, now, data, due_now, timed)
            return
        pend.last = now
        pend.data |= data
        pend.due_now |= due_now

    def _rescan(self, now: float) -> None:
        """Watch every directory again and compare every path with the model."""
        seen = self._watch_tree(b"", now, mark=True, timed=False)
        for path in sorted(self._model, key=len):
            if path not in seen and path in self._model and self._remove_peer(path):
                self._end_group(path, None)

    def _watch_tree(self, top: bytes, now: float, *, mark: bool, timed: bool = True) -> set[bytes]:
        """Watch ``top`` and the directories below it; mark every path pending when ``mark``
        (due at once: the directory may have been filled before its watch existed)."""
        seen: set[bytes] = set()
        stack = [top]
        while stack:
            rel = stack.pop()
            if not self._add_watch(rel):
                continue
            seen.add(rel)
            if mark:
                self._touch(rel, now, data=True, due_now=True, timed=timed)
            try:
                with os.scandir(self._abs(rel)) as it:
                    entries = list(it)
            except OSError:
                continue
            for entry in entries:
                child = _join(rel, os.fsencode(entry.name))
                if self._excluded(child):
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    stack.append(child)
                else:
                    seen.add(child)
                    if mark:
                        self._touch(child, now, data=True, due_now=True, timed=timed)
        return seen

    def _add_watch(self, rel: bytes) -> bool:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(self._abs(rel), WATCH_MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._problems["watches"] = (
                    "inotify watch limit reached: some directories are not mirrored; raise "
                    "fs.inotify.max_user_watches (sysctl -w fs.inotify.max_user_watches=524288)"
                )
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._problems[f"watch:{rel!r}"] = f"cannot watch {rel!r}: {exc.strerror}"
            return False
        self._wd_path[wd] = rel
        if rel == b"":
            self._root_wd = wd
        return True

    def _move_watches(self, old: bytes, new: bytes) -> None:
        for wd, wpath in list(self._wd_path.items()):
            if _under(wpath, old):
                self._wd_path[wd] = new + wpath[len(old) :]

    # -- helpers -------------------------------------------------------------------------

    def _ask(self, kind: str, timeout: float) -> None:
        if not self.running:
            raise AsyncMirrorError(f"the async mirror of {self.root} is not running")
        req = _Request(kind, threading.Event())
        self._requests.put(req)
        self._wake()
        deadline = time.monotonic() + timeout
        for event in (req.done, req.barrier):
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise AsyncMirrorError(f"{kind} of {self.root} did not finish in {timeout} s")

    def _excluded(self, path: bytes) -> bool:
        return is_excluded(path, self._exclude)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _close_fds(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._wd_path.clear()
        self._root_wd = -1
