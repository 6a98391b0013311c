"""What a source's resync session shares with the service: outlet, redo set, progress, rate.

How it works
    ``Outlet``/``Ticket``: the source sends through ``submit`` (called with the ordering lock
    held) and waits for the answer on the ticket it gets back. ``RedoSet``: the live
    replicator adds the paths a live op may have left out of sync during a session (a
    namespace change, an op the target refused); the source takes them, shallowest first,
    for its redo passes. ``Throttle`` caps the session's average rate.

    Times: ``Progress`` keeps the session's start (the BEGIN the target accepted) and end
    (ResyncDone answered) on the monotonic clock (``session_s``) and the wall clock
    (``started_at``, ``finished_at``); the mirror status shows them.

Limits
    - The throttle caps the average since its start, not bursts: after a slow spell the
      session sends at full speed until the average is back at the cap.
    - The ETA is the bytes left at the mean rate since the start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.mirror.protocol import Event
from app.mirror.resync_codec import LIST_PAGE, QUERY_LIST, Entry, decode_entries
from app.mirror.resync_plan import depth


class Ticket(Protocol):
    def wait(self, timeout: float) -> Event: ...


class Outlet(Protocol):
    """Where the source sends: ``submit`` is called with the ordering lock held."""

    def submit(self, make: Callable[[int], Event]) -> Ticket: ...


class RedoSet:
    """Paths a live op may have left out of sync during a resync (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[bytes] = set()

    def add(self, *paths: bytes | None) -> None:
        with self._lock:
            self._paths.update(p for p in paths if p is not None)

    def take(self) -> list[bytes]:
        with self._lock:
            paths, self._paths = self._paths, set()
        return sorted(paths, key=lambda p: (depth(p), p))

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._paths)


@dataclass(slots=True)
class Progress:
    """One session's progress and times: ``started``/``finished`` on the monotonic clock (the
    session's duration), ``started_at``/``finished_at`` on the wall clock (when, for people and
    for comparing with other processes' clocks). ``finished`` is None while it runs;
    ``started_at`` None means no session ran yet (a placeholder)."""

    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    started_at: float | None = field(default_factory=time.time)
    finished: float | None = None
    finished_at: float | None = None

    def finish(self, now: float | None = None, wall: float | None = None) -> None:
        self.finished = time.monotonic() if now is None else now
        self.finished_at = time.time() if wall is None else wall

    @property
    def session_s(self) -> float | None:
        """Seconds from the session's start to its end (None while it runs)."""
        return None if self.finished is None else max(0.0, self.finished - self.started)

    def snapshot(self) -> dict[str, float | int | None]:
        end = time.monotonic() if self.finished is None else self.finished
        elapsed = max(1e-3, end - self.started)
        rate = self.bytes_done / elapsed
        left = max(0, self.bytes_total - self.bytes_done)
        return {
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "rate_bps": round(rate),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "session_s": self.session_s,
        }


class Throttle:
    """Average rate cap (bytes per second; 0 = none); ``take`` sleeps outside any lock."""

    def __init__(self, bytes_per_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = bytes_per_s
        self._sleep = sleep
        self._t0 = time.monotonic()
        self._sent = 0

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        self._sent += n
        ahead = self._sent / self.rate - (time.monotonic() - self._t0)
        if ahead > 0:
            self._sleep(min(ahead, 5.0))


def later_pages(
    order: threading.Lock,
    query: Callable[[int, bytes, int, int], Ticket],
    answer: Callable[[Ticket, str], bytes],
    path: bytes,
    page: list[Entry],
    what: str,
) -> dict[bytes, Entry]:
    """The target's listing of ``path`` by name: ``page`` (the first, asked by the caller at
    its own stream point) and the pages after it, each asked under ``order``."""
    theirs = {e.name: e for e in page}
    first = LIST_PAGE
    while len(page) >= LIST_PAGE and first < (1 << 32):
        with order:
            ticket = query(QUERY_LIST, path, first, LIST_PAGE)
        page = decode_entries(answer(ticket, what))
        theirs.update((e.name, e) for e in page)
        first += LIST_PAGE
    return theirs
