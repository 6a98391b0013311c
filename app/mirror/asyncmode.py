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

    - Namespace changes are sent as they are read: DELETE becomes Unlink/Rmdir (the peer's
      subtree is removed deepest first), a MOVED_FROM/MOVED_TO pair (same cookie, see
      ``pair_moves``) becomes Rename when the peer already has the source, a MOVED_FROM with
      no partner (moved out of the tree) becomes a removal, a MOVED_TO with no partner (moved
      in) a copy of what arrived.
    - Content and attribute changes mark the path pending. A pending path is copied once it
      settled (no event for ``settle_ms``), at once after CLOSE_WRITE, and at least every
      ``max_delay_ms`` for a file written continuously. Copying a regular file reads it in
      chunks, hashes each block and sends only the blocks whose digest changed
      (``changed_ranges``): Create (new on the peer) or Open, Write of the changed ranges,
      Truncate when the size changed, Release, then Chmod/Chown/Utimens as needed. ATTRIB alone
      sends only the attributes. Directories become Mkdir (+ Chmod/Chown), symlinks Symlink,
      FIFOs and sockets Mknod; missing parents are created first.
    - A new directory gets its watch and is then scanned, since files can be created in it
      before the watch exists. IN_Q_OVERFLOW (events lost) triggers a full rescan against the
      model, which sends only differences; ``status()["overflows"]`` counts them.
    - ``initial_sync()`` forgets the model and sends the whole tree; ``flush()`` copies every
      pending path now; both wait until the sink has taken everything.
    - Lag: each copied change records the time from its first unsent event to the return of
      the sink call of its last op. ``lag_ms()`` gives p50/p99/max over the last minute and the
      last value; the note's N is the largest of that max, the age of the oldest change not yet
      sent, and ``settle_ms`` (an honest "up to", not a typical value).

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
    - Each copy rereads the whole file to find the changed blocks (O(file size) per change).
    - Hard links are copied as separate files; a write through one name updates only that
      name on the peer. Sparse files are copied with their holes filled. Directory mtimes,
      xattrs, ACLs and device nodes are not replicated; a symlink's times are not either.
    - Writes through a shared mmap are seen only when the kernel reports IN_MODIFY (msync)
      or the file is closed.
    - Memory: the model holds 16 bytes of digest per ``block_size`` block (256 KiB per GiB at
      64 KiB blocks) plus about 200 bytes per path; the send queue holds at most ``queue_ops``
      ops of at most one chunk (``block_size * 16``) each (64 MiB at the defaults).
    - Directory renames and removals cost O(tracked paths) and O(watches). One inotify watch
      per directory: past fs.inotify.max_user_watches the directory is not followed and
      ``status()["problems"]`` says so.
    - Excluded paths (fnmatch patterns, see ``is_excluded``) are neither watched nor copied.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import queue
import select
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Final, Generic, Protocol, TypeVar

from inotify_simple import INotify
from inotify_simple import flags as inflags

from app.mirror import ops
from app.mirror.errors import ApplyError, MirrorError
from app.mirror.ops import Op
from app.mirror.protocol import MAX_DATA

DEFAULT_BLOCK_SIZE: Final = 64 * 1024
DIGEST_SIZE: Final = 16
CHUNK_BLOCKS: Final = 16
LAG_WINDOW_S: Final = 60.0
_LAG_SAMPLES: Final = 10_000
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
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

_LOG = logging.getLogger(__name__)


class AsyncMirrorError(MirrorError):
    """The asynchronous mirror cannot start or did not finish what it was asked in time."""


# -- pure parts ----------------------------------------------------------------------------


def block_sums(data: bytes, block_size: int) -> bytes:
    """The concatenated blake2b digests (DIGEST_SIZE bytes each) of ``data``'s blocks."""
    view = memoryview(data)
    return b"".join(
        blake2b(view[i : i + block_size], digest_size=DIGEST_SIZE).digest()
        for i in range(0, len(data), block_size)
    )


def changed_ranges(old: bytes, new: bytes, block_size: int, length: int) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` whose blocks differ between two digest lists.

    ``new`` holds the digests of ``length`` bytes; ``old`` those of the peer's copy of the
    same region (it may be shorter or longer). A block is changed when its digest differs or
    ``old`` has none for it. Adjacent changed blocks merge; the last range ends at ``length``.
    """
    ranges: list[tuple[int, int]] = []
    count = len(new) // DIGEST_SIZE
    for i in range(count):
        a, b = i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE
        if old[a:b] == new[a:b]:
            continue
        start = i * block_size
        end = min(start + block_size, length)
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((start, end - start))
    return ranges


def is_excluded(path: bytes, patterns: Sequence[str]) -> bool:
    """True when ``path`` (relative to the root) or one of its ancestors matches a pattern.

    Each pattern (fnmatch, case-sensitive) is tried on every ancestor's path from the root
    and on its name alone: "*.tmp" excludes any such file, "cache" any directory or file
    named cache with all below it, "logs/*.gz" only under the top-level logs.
    """
    if not patterns or not path:
        return False
    parts = os.fsdecode(path).split("/")
    for depth in range(1, len(parts) + 1):
        prefix, name = "/".join(parts[:depth]), parts[depth - 1]
        for pattern in patterns:
            if fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(name, pattern):
                return True
    return False


class MoveEvent(Protocol):
    @property
    def mask(self) -> int: ...

    @property
    def cookie(self) -> int: ...


class InotifyEvent(MoveEvent, Protocol):
    """What inotify_simple's Event carries (a namedtuple: wd, mask, cookie, name)."""

    @property
    def wd(self) -> int: ...

    @property
    def name(self) -> str: ...


E = TypeVar("E", bound=MoveEvent)


@dataclass(frozen=True, slots=True)
class Moved(Generic[E]):
    """A MOVED_FROM and the MOVED_TO with the same cookie: a rename inside the tree."""

    src: E
    dst: E


def pair_moves(events: Sequence[E]) -> list[E | Moved[E]]:
    """Events in order, with each MOVED_FROM/MOVED_TO pair (same cookie) merged into a Moved
    at the MOVED_FROM's place. Unpaired MOVED_FROM (moved out) and MOVED_TO (moved in) stay."""
    to_index: dict[int, int] = {}
    for i, ev in enumerate(events):
        if ev.mask & inflags.MOVED_TO and ev.cookie not in to_index:
            to_index[ev.cookie] = i
    used: set[int] = set()
    out: list[E | Moved[E]] = []
    for i, ev in enumerate(events):
        if i in used:
            continue
        if ev.mask & inflags.MOVED_FROM:
            j = to_index.get(ev.cookie)
            if j is not None and j > i and j not in used:
                used.add(j)
                out.append(Moved(ev, events[j]))
                continue
        out.append(ev)
    return out


def has_unpaired_from(items: Sequence[E | Moved[E]]) -> bool:
    """True when a MOVED_FROM has no partner yet (its MOVED_TO may be in the next read)."""
    return any(not isinstance(it, Moved) and it.mask & inflags.MOVED_FROM for it in items)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 < q <= 100) of a non-empty sorted sequence."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class LagStats:
    """Lag samples (ms) with their completion time; summaries over the last LAG_WINDOW_S."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=_LAG_SAMPLES)
        self._last: float | None = None
        self._lock = threading.Lock()

    def record(self, now: float, lag_ms: float) -> None:
        with self._lock:
            self._samples.append((now, lag_ms))
            self._last = lag_ms

    def summary(self, now: float) -> dict[str, float | None]:
        with self._lock:
            while self._samples and self._samples[0][0] < now - LAG_WINDOW_S:
                self._samples.popleft()
            values = sorted(v for _, v in self._samples)
            last = self._last
        if not values:
            return {"p50": None, "p99": None, "max": None, "last": last, "count": 0}
        return {
            "p50": round(percentile(values, 50), 1),
            "p99": round(percentile(values, 99), 1),
            "max": round(values[-1], 1),
            "last": None if last is None else round(last, 1),
            "count": len(values),
        }


# -- the model of the peer, and the send queue's items ---------------------------------------


@dataclass(slots=True)
class _Entry:
    kind: int
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime_ns: int = -1
    sums: bytes = b""
    target: bytes = b""


@dataclass(slots=True)
class _Pending:
    first: float
    last: float
    data: bool
    due_now: bool
    timed: bool


@dataclass(frozen=True, slots=True)
class _GroupEnd:
    path: bytes
    since: float | None


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event


@dataclass(frozen=True, slots=True)
class _Request:
    kind: str  # "initial" or "flush"
    done: threading.Event
    barrier: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class _StopItem:
    pass


class _Stopped(Exception):
    """Internal: stop() was called while the watch thread waited for queue space."""


_STOP: Final = _StopItem()
_Item = Op | _GroupEnd | _Barrier | _StopItem


def _join(base: bytes, name: bytes) -> bytes:
    if not name:
        return base
    return base + b"/" + name if base else name


def _under(path: bytes, top: bytes) -> bool:
    return path == top or top == b"" or path.startswith(top + b"/")


class AsyncMirror:
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

    # -- copying to the peer ---------------------------------------------------------------

    def _sync(self, path: bytes, pend: _Pending) -> None:
        try:
            st = os.lstat(self._abs(path))
        except OSError:
            return  # gone already: its DELETE or MOVED_FROM event follows
        if not self._ensure_parents(path):
            return
        old = self._model.get(path)
        kind = stat.S_IFMT(st.st_mode)
        if old is not None and old.kind != kind:
            self._remove_peer(path)
            old = None
        if kind == stat.S_IFDIR:
            self._sync_dir(path, st, old)
        elif kind == stat.S_IFLNK:
            self._sync_symlink(path, st, old)
        elif kind == stat.S_IFREG:
            self._sync_file(path, old, pend.data)
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
            if old is None:
                self._emit(ops.Mknod(path, st.st_mode, st.st_uid, st.st_gid))
            self._set_attrs(path, st, old, times=False)
        self._end_group(path, pend.first if pend.timed else None)

    def _ensure_parents(self, path: bytes) -> bool:
        """Create on the peer the ancestors of ``path`` it lacks; False if one is gone."""
        parts = path.split(b"/")[:-1]
        for depth in range(len(parts) + 1):
            parent = b"/".join(parts[:depth])
            if parent in self._model:
                continue
            try:
                st = os.lstat(self._abs(parent))
            except OSError:
                return False
            if not stat.S_ISDIR(st.st_mode):
                return False
            self._sync_dir(parent, st, None)
        return True

    def _sync_dir(self, path: bytes, st: os.stat_result, old: _Entry | None) -> None:
        if old is None and path:
            self._emit(ops.Mkdir(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        self._set_attrs(path, st, old, times=False)

    def _sync_symlink(self, path: bytes, st: os.stat_result, old: _Entry | None) -> None:
        try:
            target = os.readlink(self._abs(path))
        except OSError:
            return
        if old is not None and old.target != target:
            self._remove_peer(path)
            old = None
        if old is None:
            self._emit(ops.Symlink(target, path, st.st_uid, st.st_gid))
        elif (old.uid, old.gid) != (st.st_uid, st.st_gid):
            self._emit(ops.Chown(path, st.st_uid, st.st_gid))
        self._set_entry(path, _Entry(stat.S_IFLNK, 0, st.st_uid, st.st_gid, target=target))

    def _sync_file(self, path: bytes, old: _Entry | None, data: bool) -> None:
        try:
            fd = os.open(self._abs(path), _READ_FLAGS)
        except OSError:
            return  # gone or replaced: its own events follow
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            if old is not None and not data and old.mtime_ns == st.st_mtime_ns:
                self._set_attrs(path, st, old, times=False)
                return
            size, sums = self._copy_content(fd, path, st, old)
        finally:
            os.close(fd)
        entry = _Entry(stat.S_IFREG, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        entry.size, entry.sums = size, sums
        self._set_attrs(path, st, old, times=True, entry=entry)

    def _copy_content(
        self, fd: int, path: bytes, st: os.stat_result, old: _Entry | None
    ) -> tuple[int, bytes]:
        fh = self._next_fh
        self._next_fh += 1
        if old is None:
            mode = stat.S_IMODE(st.st_mode)
            self._emit(ops.Create(fh, path, mode, st.st_uid, st.st_gid, False))
            old_sums = b""
        else:
            self._emit(ops.Open(fh, path))
            old_sums = old.sums
        sums = bytearray()
        offset = 0
        while True:
            chunk = os.pread(fd, self._chunk, offset)
            if not chunk:
                break
            new = block_sums(chunk, self._bs)
            first = offset // self._bs * DIGEST_SIZE
            peer = old_sums[first : first + len(new)]
            for start, length in changed_ranges(peer, new, self._bs, len(chunk)):
                self._emit(ops.Write(fh, offset + start, chunk[start : start + length]))
            sums += new
            offset += len(chunk)
            if len(chunk) < self._chunk:
                break  # end of file (a file growing meanwhile gets another event)
        if old is None or old.size != offset:
            self._emit(ops.Truncate(fh, path, offset))
        self._emit(ops.Release(fh))
        return offset, bytes(sums)

    def _set_attrs(
        self,
        path: bytes,
        st: os.stat_result,
        old: _Entry | None,
        *,
        times: bool,
        entry: _Entry | None = None,
    ) -> None:
        """Send mode, owner and (``times``) atime/mtime where the peer differs; record them."""
        mode = stat.S_IMODE(st.st_mode)
        if old is None or old.mode != mode:
            self._emit(ops.Chmod(path, mode))
        if old is not None and (old.uid, old.gid) != (st.st_uid, st.st_gid):
            self._emit(ops.Chown(path, st.st_uid, st.st_gid))
        if entry is None:
            entry = _Entry(stat.S_IFMT(st.st_mode), mode, st.st_uid, st.st_gid)
            if old is not None:
                entry.size, entry.sums, entry.mtime_ns = old.size, old.sums, old.mtime_ns
        if times:
            self._emit(ops.Utimens(path, st.st_atime_ns, st.st_mtime_ns))
            entry.mtime_ns = st.st_mtime_ns
        self._set_entry(path, entry)

    def _remove_peer(self, path: bytes) -> bool:
        """Remove ``path`` and what the peer holds below it, deepest first."""
        doomed = sorted((k for k in self._model if _under(k, path) and k), key=len, reverse=True)
        for key in doomed:
            entry = self._model[key]
            self._emit(ops.Rmdir(key) if entry.kind == stat.S_IFDIR else ops.Unlink(key))
            self._del_entry(key)
        return bool(doomed)

    def _drop_model(self, path: bytes) -> None:
        for key in [k for k in self._model if _under(k, path)]:
            self._del_entry(key)

    def _set_entry(self, path: bytes, entry: _Entry) -> None:
        old = self._model.get(path)
        self._sum_bytes += len(entry.sums) - (len(old.sums) if old else 0)
        self._model[path] = entry

    def _del_entry(self, path: bytes) -> None:
        old = self._model.pop(path, None)
        if old is not None:
            self._sum_bytes -= len(old.sums)

    def _emit(self, op: Op) -> None:
        self._group_ops += 1
        self._put(op)

    def _end_group(self, path: bytes, since: float | None) -> None:
        if self._group_ops:
            self._group_ops = 0
            self._put(_GroupEnd(path, since))

    def _put(self, item: _Item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stopping.is_set():
                    raise _Stopped() from None

    def _absorb_failures(self) -> None:
        """Forget what the peer was thought to hold at paths whose copy failed."""
        while True:
            try:
                path = self._failed.get_nowait()
            except queue.Empty:
                return
            self._drop_model(path)

    # -- send thread ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        bound: set[int] = set()
        failure: Exception | None = None
        while True:
            item = self._queue.get()
            if isinstance(item, _StopItem):
                return
            if isinstance(item, _Barrier):
                item.done.set()
            elif isinstance(item, _GroupEnd):
                if failure is not None:
                    self._group_failed(item.path, failure, bound)
                elif item.since is not None:
                    now = self._clock()
                    self._lag.record(now, (now - item.since) * 1000)
                bound.clear()
                failure = None
            elif failure is None:
                failure = self._send(item, bound)

    def _send(self, op: Op, bound: set[int]) -> Exception | None:
        try:
            self._sink(op)
        except Exception as exc:
            exists = isinstance(exc, ApplyError) and exc.errno == errno.EEXIST
            return None if exists and isinstance(op, ops.Mkdir) else exc
        self._sent_ops += 1
        if isinstance(op, ops.Write):
            self._sent_bytes += len(op.data)
        if isinstance(op, ops.Open | ops.Create):
            bound.add(op.fh)
        elif isinstance(op, ops.Release):
            bound.discard(op.fh)
        return None

    def _group_failed(self, path: bytes, exc: Exception, bound: set[int]) -> None:
        for fh in bound:
            try:
                self._sink(ops.Release(fh))
            except Exception:
                pass
        self._errors += 1
        self._last_error = f"{os.fsdecode(path)}: {exc}"
        self._log.error("async mirror: copying %r failed: %s", path, exc)
        self._failed.put(path)

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

    def _abs(self, rel: bytes) -> bytes:
        return self._root_b + b"/" + rel if rel else self._root_b

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


V = TypeVar("V")


def _move_keys(d: dict[bytes, V], old: bytes, new: bytes) -> None:
    """Rename the keys ``old`` and ``old/...`` of ``d`` to ``new`` and ``new/...``."""
    moved = [(k, v) for k, v in d.items() if _under(k, old)]
    for k, _ in moved:
        del d[k]
    for k, v in moved:
        d[new + k[len(old) :]] = v
