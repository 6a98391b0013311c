"""Pure parts of the asynchronous mirror (asyncmode.py): block diff, excludes, move pairing, lag.

No I/O and no threads: bytes, paths and events in, values out. ``LagStats`` holds a lock, as
the send thread records samples while ``status()`` reads them.

How it works
    - ``block_sums`` gives the blake2b digest (DIGEST_SIZE = 16 bytes) of each ``block_size``
      block of some data; ``changed_ranges`` compares two such digest lists and returns the
      byte ranges whose blocks differ, adjacent ones merged. The copier (asyncmode_copy.py)
      sends only those ranges.
    - ``is_excluded`` tries each fnmatch pattern on every ancestor's path and on its name.
    - ``pair_moves`` merges each MOVED_FROM/MOVED_TO pair (same cookie) into a ``Moved`` at
      the MOVED_FROM's place; ``has_unpaired_from`` says when a MOVED_FROM still has no
      partner (its MOVED_TO may be in the next read). ``MoveEvent`` and ``InotifyEvent`` are
      what these need of inotify_simple's events, so tests can pass their own.
    - ``LagStats`` keeps the last ``_LAG_SAMPLES`` lag samples with their completion time
      and summarises those of the last LAG_WINDOW_S: p50/p99 (nearest rank, ``percentile``),
      max, the last value and the count.
    - ``_join``, ``_under`` and ``_move_keys`` handle paths relative to the root (bytes;
      b"" is the root itself).

Exceptions
    None of its own. ``percentile`` needs a non-empty sorted sequence.

Known limits
    - ``pair_moves`` pairs only the events it is given: a MOVED_TO read later stays unpaired.
    - ``is_excluded`` is case-sensitive.
    - A minute with more than ``_LAG_SAMPLES`` copied changes is summarised by its latest
      ``_LAG_SAMPLES`` only.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final, Generic, Protocol, TypeVar

from inotify_simple import flags as inflags

DEFAULT_BLOCK_SIZE: Final = 64 * 1024
DIGEST_SIZE: Final = 16
CHUNK_BLOCKS: Final = 16
LAG_WINDOW_S: Final = 60.0
_LAG_SAMPLES: Final = 10_000


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


def _join(base: bytes, name: bytes) -> bytes:
    if not name:
        return base
    return base + b"/" + name if base else name


def _under(path: bytes, top: bytes) -> bool:
    return path == top or top == b"" or path.startswith(top + b"/")


V = TypeVar("V")


def _move_keys(d: dict[bytes, V], old: bytes, new: bytes) -> None:
    """Rename the keys ``old`` and ``old/...`` of ``d`` to ``new`` and ``new/...``."""
    moved = [(k, v) for k, v in d.items() if _under(k, old)]
    for k, _ in moved:
        del d[k]
    for k, v in moved:
        d[new + k[len(old) :]] = v
