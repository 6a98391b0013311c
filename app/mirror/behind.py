"""Changes made on the secondary's copy behind the mirror's back: detect, report, and owe a
full compare.

On SECOND nothing but the receiver should change the replicated directories. A change made by
anyone else (an admin's editor, a misplaced cron job, the application started by hand) makes the
copy differ from the primary's without any record, so an incremental resync would never repair
it. This module notices such changes while the receiver runs and leaves a flag that makes the
next resync a full compare.

How it works
    ``BehindWatcher(root, ...)`` puts an inotify watch (inotify-simple) on every directory of
    the tree (CREATE, MODIFY, ATTRIB, MOVED_FROM/TO, DELETE, DELETE_SELF, MOVE_SELF) and reads
    events on one thread. New or moved-in directories get their watches (a re-added watch keeps
    its descriptor, so a renamed directory's subtree follows). The thread reads at most every
    50 ms (``_BATCH_S``): meanwhile the kernel merges an event identical to the last one
    queued (same watch, mask and name), so the receiver's stream of writes to one file costs
    about one IN_MODIFY per batch, not one per write; nothing is lost by the merge (the
    queue holds fs.inotify.max_queued_events; an overflow is reported, see below).

    Telling the receiver's own changes apart: the service brackets each apply of the
    receiver with ``applying(op)`` and ``applied`` (on the receiver's thread).
    ``Expectations`` (pure, clock injected) holds the paths an op names (by handle too:
    ``Open``/``Create`` bind a handle to its path, a ``Rename`` moves the bindings) as "in
    flight" while the op runs and for ``grace_s`` after it ends; an Fsync names none (a
    flush is no change inotify reports). An event for a path in flight or within its grace is the
    receiver's; any other event is a change behind the mirror's back. inotify queues an event
    during the system call that caused it, so the receiver's events are always read after
    their mark and, unless the watcher thread lags more than ``grace_s``, before the grace
    ends.

    A change behind the back is logged with its path, counted (``count``, ``recent``) and
    passed to ``on_change(path, reason)``; the service persists a flag file (``BehindFlag``:
    ``<state_dir>/mirror/<i>-<hash>.behind``, JSON, written atomically) that its target-side
    resync honours: the target's activity log is sent as untrusted ("changes made on this node
    behind the mirror's back"), so the plan is a full block compare. The flag is removed when
    a resync into this node finishes, unless it was raised again meanwhile (a sequence number).
    IN_Q_OVERFLOW (events lost) counts as a change: a full compare is the safe answer.

Exceptions::

    MirrorError (errors.py)
    +-- BehindError     start(): the root is not a directory or inotify is unavailable

    A flag that cannot be written is logged; the count still says what happened.

Known limits
    - Only while the receiver runs: changes made while the daemon is down, or while this node
      is primary, are not seen here (``mirrorha verify`` on the primary finds them).
    - A change by another process to a path the receiver touched less than ``grace_s`` ago is
      taken for the receiver's, and so is one made up to a batch (50 ms, more if the thread
      lags) before the receiver touches that path (the event is read after the receiver's
      mark); if the watcher thread lags more than ``grace_s`` behind, a receiver change is
      reported (a needless full compare, never a missed one in that case).
    - Writes through a shared mmap are seen only when the kernel reports IN_MODIFY (msync);
      reads, opens and closes are not changes. Excluded paths are ignored.
    - One watch per directory: past fs.inotify.max_user_watches a directory is not followed
      and ``problems`` says so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from inotify_simple import INotify
from inotify_simple import flags as inflags

from app.mirror import ops
from app.mirror.errors import MirrorError
from app.mirror.ops import Op

WATCH_MASK: Final = (
    inflags.CREATE
    | inflags.MODIFY
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
DEFAULT_GRACE_S: Final = 2.0
RECENT: Final = 20
_READ_MS: Final = 200
_BATCH_S: Final = 0.05  # read at most every 50 ms so the kernel merges repeated events
_MAX_WATCHES: Final = 1_000_000

_LOG = logging.getLogger(__name__)


class BehindError(MirrorError):
    """The watcher cannot start (not a directory, no inotify)."""


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base and name else base or name


def _under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


# ------------------------------------------------------------------------- pure part


class Expectations:
    """Paths the receiver is changing or just changed (thread-safe; time passed in)."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._fh: dict[int, bytes] = {}
        self._busy: dict[bytes, int] = {}
        self._until: dict[bytes, float] = {}

    def paths(self, op: Op) -> list[bytes]:
        """The paths ``op`` changes (a handle's path from its Open/Create)."""
        out: list[bytes] = []
        for name in ("path", "old", "new", "target"):
            value = getattr(op, name, None)
            if name == "target" and isinstance(op, ops.Symlink):
                continue  # a symlink's target is content
            if isinstance(value, bytes) and (value or not hasattr(op, "fh")):
                out.append(value)
        fh = getattr(op, "fh", None)
        if isinstance(fh, int) and fh >= 0:
            bound = self._fh.get(fh)
            if bound is not None:
                out.append(bound)
        return out

    def expect(self, op: Op) -> tuple[bytes, ...]:
        """Mark the paths ``op`` changes as in flight; pass the result to ``done``."""
        if isinstance(op, ops.Fsync):
            return ()  # a flush changes nothing inotify reports
        with self._lock:
            if isinstance(op, ops.Write):  # the hot path: the handle's file only
                bound = self._fh.get(op.fh)
                if bound is None:
                    return ()
                self._busy[bound] = self._busy.get(bound, 0) + 1
                return (bound,)
            match op:
                case ops.Open(fh=fh, path=path) | ops.Create(fh=fh, path=path):
                    self._fh[fh] = path
                case ops.Rename(old=old, new=new):
                    for fh, p in list(self._fh.items()):
                        if _under(p, old):
                            self._fh[fh] = new + p[len(old) :]
                case _:
                    pass
            paths = tuple(self.paths(op))
            for p in paths:
                self._busy[p] = self._busy.get(p, 0) + 1
            if isinstance(op, ops.Release):
                self._fh.pop(op.fh, None)
            return paths

    def done(self, paths: tuple[bytes, ...], now: float) -> None:
        """The op that ``expect`` returned ``paths`` for has ended at ``now``."""
        with self._lock:
            for p in paths:
                n = self._busy.get(p, 0) - 1
                if n > 0:
                    self._busy[p] = n
                else:
                    self._busy.pop(p, None)
                self._until[p] = now + self.grace_s

    def forget_handles(self) -> None:
        """A new connection: the primary's handle numbers start over."""
        with self._lock:
            self._fh.clear()

    def expected(self, path: bytes, now: float) -> bool:
        """True when a change at ``path`` seen at ``now`` may be the receiver's."""
        with self._lock:
            if path in self._busy:
                return True
            until = self._until.get(path)
            if until is None:
                return False
            if until >= now:
                return True
            del self._until[path]
            return False

    def prune(self, now: float) -> None:
        with self._lock:
            for p in [p for p, t in self._until.items() if t < now]:
                del self._until[p]


# ------------------------------------------------------------------------- the flag


class BehindFlag:
    """The persisted "a full compare is owed" flag of one replicated directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any] | None:
        """The flag's content, None when there is none (an unreadable flag still counts)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return {"seq": -1, "reason": f"flag unreadable: {exc}"}
        try:
            data = json.loads(raw)
        except ValueError:
            return {"seq": -1, "reason": "flag unreadable"}
        return data if isinstance(data, dict) else {"seq": -1, "reason": "flag unreadable"}

    def raise_(self, path: bytes, reason: str) -> None:
        """Record a change behind the back (OSError when the file cannot be written)."""
        old = self.read() or {}
        seq = int(old.get("seq", 0)) + 1 if isinstance(old.get("seq"), int) else 1
        data = {
            "seq": seq,
            "count": int(old.get("count", 0) or 0) + 1,
            "first_at": old.get("first_at") or time.time(),
            "last_at": time.time(),
            "last_path": os.fsdecode(path),
            "reason": reason,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clear(self, seq: int | None) -> bool:
        """Remove the flag if its sequence is still ``seq`` (raised again meanwhile: kept)."""
        now = self.read()
        if now is None:
            return True
        if seq is None or now.get("seq") != seq:
            return False
        self.path.unlink(missing_ok=True)
        return True

    @staticmethod
    def describe(data: dict[str, Any]) -> str:
        count = data.get("count", "?")
        last = data.get("last_path", "?")
        return (
            f"changes made on this node behind the mirror's back ({count}, last {last!r}: "
            f"{data.get('reason', '')})"
        )


# ------------------------------------------------------------------------- the watcher


class BehindWatcher:
    """Watches ``root`` while the receiver runs; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        on_change: Callable[[bytes, str], None],
        excluded: Callable[[bytes], bool] = lambda path: False,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ) -> None:
        self.root = Path(root)
        self._root_b = os.fsencode(self.root)
        self.expectations = Expectations(grace_s)
        self._on_change = on_change
        self._excluded = excluded
        self._clock = clock
        self._log = log or _LOG
        self._inotify: INotify | None = None
        self._wd_path: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.count = 0
        self.recent: deque[str] = deque(maxlen=RECENT)
        self.problems: dict[str, str] = {}

    # -- the receiver's side ----------------------------------------------------------

    def applying(self, op: Op) -> tuple[bytes, ...]:
        """The receiver is about to apply ``op``: its changes are not reported. Pass what
        this returns to ``applied`` once the op has ended, failed or not (a try/finally:
        this sits on every replicated op, where a generator context manager costs more
        than the rest of the bookkeeping)."""
        return self.expectations.expect(op)

    def applied(self, paths: tuple[bytes, ...]) -> None:
        """The op ``applying`` returned ``paths`` for has ended; its grace starts now."""
        self.expectations.done(paths, self._clock())

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        if not self.root.is_dir() or self.root.is_symlink():
            raise BehindError(f"{self.root} is not a directory")
        try:
            self._inotify = INotify()
        except OSError as exc:
            raise BehindError(f"inotify is unavailable: {exc}") from exc
        self._stop.clear()
        self._watch_tree(b"")
        self._thread = threading.Thread(target=self._loop, name="behind-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._wd_path.clear()

    def status(self) -> dict[str, Any]:
        return {
            "behind_the_back": self.count,
            "recent": list(self.recent),
            "watches": len(self._wd_path),
            "problems": sorted(self.problems.values()),
        }

    # -- the watch thread ---------------------------------------------------------------

    def _loop(self) -> None:
        inotify = self._inotify
        assert inotify is not None
        try:
            while not self._stop.is_set():
                try:
                    events = inotify.read(timeout=_READ_MS)
                except OSError as exc:
                    if exc.errno in (errno.EBADF, errno.EINVAL) and self._stop.is_set():
                        return
                    raise
                now = self._clock()
                for ev in events:
                    self._on_event(ev.wd, ev.mask, os.fsencode(ev.name), now)
                self.expectations.prune(now)
                if events:
                    # let the next events queue up: the kernel merges an event identical to
                    # the last unread one, so a stream of writes to one file costs one
                    # event per batch instead of one per write
                    self._stop.wait(_BATCH_S)
        except Exception:
            self._log.exception("behind-the-back watcher of %s failed", self.root)
            self.problems["thread"] = "the watcher thread failed (see the log)"
            self._report(b"", "the watcher failed: changes may go unseen")

    def _on_event(self, wd: int, mask: int, name: bytes, now: float) -> None:
        if mask & inflags.Q_OVERFLOW:
            self._report(b"", "inotify queue overflow: events were lost")
            return
        if mask & inflags.IGNORED:
            self._wd_path.pop(wd, None)
            return
        base = self._wd_path.get(wd)
        if base is None:
            return
        path = _join(base, name)
        if mask & (inflags.DELETE_SELF | inflags.MOVE_SELF) and path:
            return  # the parent's watch reports it with the name
        if mask & inflags.ISDIR and mask & (inflags.CREATE | inflags.MOVED_TO):
            self._watch_tree(path)
        if self._excluded(path) or self.expectations.expected(path, now):
            return
        what = _describe(mask)
        self._report(path, what)

    def _report(self, path: bytes, what: str) -> None:
        shown = os.fsdecode(path) or "."
        self._log.warning(
            "change behind the mirror's back in %s: %s (%s); the next resync compares everything",
            self.root,
            shown,
            what,
        )
        # the flag first: whoever sees the count (the status) sees the full compare owed too
        try:
            self._on_change(path, what)
        except Exception as exc:
            self._log.error("cannot record the change behind the back: %s", exc)
        self.recent.append(f"{shown}: {what}")
        self.count += 1

    def _watch_tree(self, top: bytes) -> None:
        inotify = self._inotify
        if inotify is None:
            return
        stack = [top]
        for _ in range(_MAX_WATCHES):
            if not stack:
                return
            rel = stack.pop()
            if rel and self._excluded(rel):
                continue
            full = _join(self._root_b, rel) if rel else self._root_b
            try:
                wd = inotify.add_watch(full, WATCH_MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.problems["watches"] = (
                        "inotify watch limit reached: some directories are not watched; raise "
                        "fs.inotify.max_user_watches"
                    )
                continue
            self._wd_path[wd] = rel
            try:
                with os.scandir(full) as it:
                    subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            stack.extend(_join(rel, os.fsencode(n)) for n in subdirs)


def _describe(mask: int) -> str:
    names = [
        (inflags.CREATE, "created"),
        (inflags.MODIFY, "written"),
        (inflags.ATTRIB, "attributes changed"),
        (inflags.MOVED_FROM, "moved away"),
        (inflags.MOVED_TO, "moved in"),
        (inflags.DELETE, "deleted"),
        (inflags.DELETE_SELF, "deleted"),
        (inflags.MOVE_SELF, "moved"),
    ]
    return ", ".join(n for flag, n in names if mask & flag) or f"event 0x{mask:x}"


__all__ = ["BehindError", "BehindFlag", "BehindWatcher", "Expectations"]
