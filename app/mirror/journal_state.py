"""The dirty journal's record format and its in-memory state: pure, no I/O, no locks.

How it works
    A journal is a sequence of records (``Head``, ``Mark``, ``Tail``, ``New``, ``Gone``,
    ``Rename``, ``Meta``, ``Ns``, ``Origin``, ``Clear``, ``Invalid``). ``State.apply(record)``
    is the only way the in-memory state changes, both while recording and when replaying the
    files on load, so memory and disk cannot disagree. ``State.records()`` gives the records
    that rebuild the state (the snapshot's content); ``merge`` turns a file's dirty regions into
    byte ranges.

    Framing: ``magic u16 | length u32 | crc32 u32 | payload``, the crc covering the length and
    the payload; the payload is a one-byte kind then big-endian fields, byte strings as
    ``u32 length | bytes``. ``parse(data)`` returns the valid records, where they stop, and
    whether a bad record is followed by a good one (corruption) or only by garbage (a torn
    append, ignored).

    The files, the locking, group commit and the translation of replicated operations into
    records are journal.py's (``DirtyJournal``), whose docstring describes the whole design.

Exceptions
    None leave this module: a record that does not decode is reported by ``parse`` as the
    place where the valid records stop.

Known limits
    A rename, ``Gone`` or ``Clear`` costs O(depth + the tracked paths it moves or drops), not
    O(tracked paths): the tracked paths are ``PathSet``s and ``PathDict``s (journal_index.py),
    which index them by directory. Their children maps cost memory (see there).
"""

from __future__ import annotations

import bisect
import struct
import zlib
from dataclasses import dataclass, field
from typing import Final, TypeVar

from app.mirror.journal_index import PathDict, PathSet, parent, renamed, under_either

#: Length of a range that runs to the end of the file (clip every range to the file's length).
TO_EOF: Final = 1 << 62
#: Alignment of the fine (exact) dirty intervals: a page.
FINE_SIZE: Final = 4096
#: Fine intervals kept per file before they are widened (see ``State._add_fine``).
MAX_SPANS: Final = 8192
RENAME_EXCHANGE: Final = 2

V = TypeVar("V")

__all__ = [
    "FINE_SIZE",
    "MAX_SPANS",
    "RENAME_EXCHANGE",
    "TO_EOF",
    "Boot",
    "Clean",
    "Clear",
    "Coarse",
    "FileState",
    "Fine",
    "Gone",
    "Head",
    "Invalid",
    "Mark",
    "Meta",
    "New",
    "Ns",
    "Origin",
    "Parsed",
    "Record",
    "Rename",
    "State",
    "Tail",
    "add_span",
    "align",
    "frame",
    "merge",
    "parse",
    "renamed",
    "span_covering",
]


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    base_generation: str
    region_size: int


@dataclass(frozen=True, slots=True)
class Mark:
    path: bytes
    regions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Tail:
    path: bytes
    start: int
    high: int


@dataclass(frozen=True, slots=True)
class Fine:
    """Exact dirty byte intervals ``(start, end)`` of ``path`` (aligned to the fine size)."""

    path: bytes
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Coarse:
    """``path``'s fine intervals are not known: its dirty ranges are its whole regions."""

    path: bytes


@dataclass(frozen=True, slots=True)
class Boot:
    """The boot the log was started in (a log of this boot lost no appended record)."""

    boot_id: str


@dataclass(frozen=True, slots=True)
class Clean:
    """The journal was closed cleanly: every record before it is on disk."""


@dataclass(frozen=True, slots=True)
class New:
    path: bytes


@dataclass(frozen=True, slots=True)
class Gone:
    path: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    old: bytes
    new: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class Meta:
    path: bytes


@dataclass(frozen=True, slots=True)
class Ns:
    path: bytes


@dataclass(frozen=True, slots=True)
class Origin:
    path: bytes
    origin: bytes | None


@dataclass(frozen=True, slots=True)
class Clear:
    path: bytes


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str


Record = (
    Head
    | Mark
    | Tail
    | Fine
    | Coarse
    | Boot
    | Clean
    | New
    | Gone
    | Rename
    | Meta
    | Ns
    | Origin
    | Clear
    | Invalid
)

_MAGIC: Final = 0xD17E
_FRAME = struct.Struct(">HII")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


class _Malformed(Exception):
    pass


def _blob(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


def _payload(rec: Record) -> bytes:
    match rec:
        case Head(seq, base, rs):
            return b"H" + _U64.pack(seq) + _blob(base.encode()) + _U64.pack(rs)
        case Mark(path, regions):
            n = len(regions)
            return b"M" + _blob(path) + _U32.pack(n) + struct.pack(f">{n}Q", *regions)
        case Tail(path, start, high):
            return b"T" + _blob(path) + _U64.pack(start) + _U64.pack(high)
        case Fine(path, spans):
            flat = [x for span in spans for x in span]
            return b"F" + _blob(path) + _U32.pack(len(spans)) + struct.pack(f">{len(flat)}Q", *flat)
        case Coarse(path):
            return b"W" + _blob(path)
        case Boot(boot_id):
            return b"B" + _blob(boot_id.encode())
        case Clean():
            return b"K"
        case New(path):
            return b"N" + _blob(path)
        case Gone(path):
            return b"G" + _blob(path)
        case Rename(old, new, flags):
            return b"R" + _blob(old) + _blob(new) + _U64.pack(flags)
        case Meta(path):
            return b"A" + _blob(path)
        case Ns(path):
            return b"S" + _blob(path)
        case Origin(path, origin):
            tail = b"\x00" if origin is None else b"\x01" + _blob(origin)
            return b"O" + _blob(path) + tail
        case Clear(path):
            return b"C" + _blob(path)
        case Invalid(reason):
            return b"X" + _blob(reason.encode())


def frame(rec: Record) -> bytes:
    payload = _payload(rec)
    crc = zlib.crc32(payload, zlib.crc32(_U32.pack(len(payload))))
    return _FRAME.pack(_MAGIC, len(payload), crc) + payload


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed("short payload")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def blob(self) -> bytes:
        return self.take(self.u32())


def _decode(payload: bytes) -> Record:
    r = _Reader(payload)
    kind = r.take(1)
    rec: Record
    try:
        if kind == b"H":
            rec = Head(r.u64(), r.blob().decode(), r.u64())
        elif kind == b"M":
            path = r.blob()
            n = r.u32()
            rec = Mark(path, struct.unpack(f">{n}Q", r.take(8 * n)))
        elif kind == b"T":
            rec = Tail(r.blob(), r.u64(), r.u64())
        elif kind == b"F":
            path = r.blob()
            n = r.u32()
            flat = struct.unpack(f">{2 * n}Q", r.take(16 * n))
            spans = tuple(zip(flat[0::2], flat[1::2], strict=True))
            if any(a >= b for a, b in spans):
                raise _Malformed("empty or reversed fine interval")
            rec = Fine(path, spans)
        elif kind == b"W":
            rec = Coarse(r.blob())
        elif kind == b"B":
            rec = Boot(r.blob().decode())
        elif kind == b"K":
            rec = Clean()
        elif kind == b"N":
            rec = New(r.blob())
        elif kind == b"G":
            rec = Gone(r.blob())
        elif kind == b"R":
            rec = Rename(r.blob(), r.blob(), r.u64())
        elif kind == b"A":
            rec = Meta(r.blob())
        elif kind == b"S":
            rec = Ns(r.blob())
        elif kind == b"O":
            path = r.blob()
            rec = Origin(path, r.blob() if r.take(1) == b"\x01" else None)
        elif kind == b"C":
            rec = Clear(r.blob())
        elif kind == b"X":
            rec = Invalid(r.blob().decode())
        else:
            raise _Malformed(f"unknown record kind {kind!r}")
    except UnicodeDecodeError as exc:
        raise _Malformed("text field is not UTF-8") from exc
    if r.pos != len(payload):
        raise _Malformed("trailing bytes in record")
    return rec


def _frame_at(data: bytes, off: int) -> tuple[Record, int] | None:
    """The record framed at ``off`` and the offset after it, or None if none is valid there."""
    if off + _FRAME.size > len(data):
        return None
    magic, length, crc = _FRAME.unpack_from(data, off)
    end = off + _FRAME.size + length
    if magic != _MAGIC or end > len(data):
        return None
    payload = data[off + _FRAME.size : end]
    if zlib.crc32(payload, zlib.crc32(_U32.pack(length))) != crc:
        return None
    try:
        return _decode(payload), end
    except _Malformed:
        return None


@dataclass(frozen=True, slots=True)
class Parsed:
    records: list[Record]
    end: int  # where the valid records stop (len(data) when all are valid)
    corrupt_at: int | None  # offset of a bad record followed by a good one


def parse(data: bytes) -> Parsed:
    records: list[Record] = []
    off = 0
    while off < len(data):
        got = _frame_at(data, off)
        if got is None:
            # Torn tail (ignored) unless a valid record follows: then it is corruption.
            magic = _MAGIC.to_bytes(2, "big")
            probe = data.find(magic, off + 1)
            while probe != -1:
                if _frame_at(data, probe) is not None:
                    return Parsed(records, off, off)
                probe = data.find(magic, probe + 1)
            return Parsed(records, off, None)
        rec, off = got
        records.append(rec)
    return Parsed(records, off, None)


# --- the state --------------------------------------------------------------------------


def _rekey_dict(d: PathDict[V], old: bytes, new: bytes, exchange: bool) -> None:
    """Move the keys at or below ``old`` (and ``new``) of ``d`` where the rename puts them
    (O(depth + keys moved): ``under_either`` walks ``d``'s index, it does not scan ``d``)."""
    hit = under_either(d, old, new)
    values = [d.pop(k) for k in hit]
    for k, value in zip(hit, values, strict=True):
        k2 = renamed(k, old, new, exchange)
        if k2 is not None:
            d[k2] = value


def _rekey_set(s: PathSet, old: bytes, new: bytes, exchange: bool) -> None:
    hit = under_either(s, old, new)
    for k in hit:
        s.discard(k)
    for k in hit:
        k2 = renamed(k, old, new, exchange)
        if k2 is not None:
            s.add(k2)


def add_span(spans: list[tuple[int, int]], lo: int, hi: int) -> None:
    """Insert ``[lo, hi)`` into sorted disjoint ``spans``, joining overlapping or touching ones."""
    i = bisect.bisect_left(spans, (lo, lo))
    if i > 0 and spans[i - 1][1] >= lo:
        i -= 1
        lo = spans[i][0]
    j = i
    while j < len(spans) and spans[j][0] <= hi:
        hi = max(hi, spans[j][1])
        j += 1
    spans[i:j] = [(lo, hi)]


def span_covering(spans: list[tuple[int, int]], pos: int) -> tuple[int, int] | None:
    """The span of ``spans`` holding byte ``pos`` or ending exactly at it (None: none)."""
    i = bisect.bisect_right(spans, (pos, 1 << 63)) - 1
    if i >= 0 and spans[i][1] >= pos:
        return spans[i]
    return None


def align(spans: list[tuple[int, int]], grain: int) -> list[tuple[int, int]]:
    """``spans`` widened to multiples of ``grain`` and joined."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        add_span(out, a // grain * grain, -(-b // grain) * grain)
    return out


@dataclass(slots=True)
class FileState:
    regions: set[int] = field(default_factory=set)
    tail: int | None = None  # every region >= tail is dirty
    high: int = 0  # highest region marked inside the tail (for estimates)
    # Exact dirty byte intervals [start, end), sorted and disjoint; None: not known (coarse:
    # the dirty ranges are the whole regions).
    spans: list[tuple[int, int]] | None = field(default_factory=list)
    grain: int = 0  # alignment of new spans after a collapse (0: the fine size)

    def covers(self, region: int) -> bool:
        return region in self.regions or (self.tail is not None and region >= self.tail)


class State:
    """Everything the journal knows, changed only by ``apply(record)``; no I/O."""

    def __init__(
        self, seq: int, base_generation: str, region_size: int, max_spans: int = MAX_SPANS
    ) -> None:
        self.seq = seq
        self.base_generation = base_generation
        self.region_size = region_size
        self.max_spans = max(2, max_spans)
        self.trusted = True
        self.reason = ""
        # The tracked paths, indexed by directory (a rename finds its subtree without a scan).
        self.files: PathDict[FileState] = PathDict()
        self.namespace = PathSet()
        self.metadata = PathSet()
        self.origins: PathDict[bytes | None] = PathDict()

    @property
    def fine_size(self) -> int:
        return min(FINE_SIZE, self.region_size)

    def _add_fine(self, f: FileState, spans: tuple[tuple[int, int], ...]) -> None:
        if f.spans is None:
            return
        grain = f.grain or self.fine_size
        limit = TO_EOF if f.tail is None else f.tail * self.region_size
        for lo, hi in spans:
            hi = min(hi, limit)
            if lo < hi:
                add_span(f.spans, lo // grain * grain, -(-hi // grain) * grain)
        if len(f.spans) <= self.max_spans:
            return
        # Too many intervals: widen them (x16 each step) until at most half the cap is left;
        # past the region size the file falls back to its whole regions.
        while len(f.spans) > self.max_spans // 2:
            grain *= 16
            if grain >= self.region_size:
                f.spans, f.grain = None, 0
                return
            f.spans, f.grain = align(f.spans, grain), grain

    def file_ranges(self, f: FileState) -> list[tuple[int, int]]:
        """The dirty (offset, length) ranges of ``f``, merged; a length TO_EOF runs to the end."""
        rs = self.region_size
        if f.spans is None:
            return merge(list(f.regions), f.tail, rs)
        spans = list(f.spans)
        for r in f.regions:  # a region marked without a fine interval counts whole (defensive)
            lo, hi = r * rs, (r + 1) * rs
            i = bisect.bisect_left(f.spans, (hi, 0)) - 1
            if i < 0 or f.spans[i][1] <= lo:
                add_span(spans, lo, hi)
        ranges = [(a, b - a) for a, b in spans]
        if f.tail is not None:
            t = f.tail * rs
            ranges = [(a, min(n, t - a)) for a, n in ranges if a < t]
            if ranges and ranges[-1][0] + ranges[-1][1] >= t:
                ranges[-1] = (ranges[-1][0], TO_EOF)
            else:
                ranges.append((t, TO_EOF))
        return ranges

    def file_bytes(self, f: FileState) -> int:
        """Estimated dirty bytes of ``f``: its ranges, and its tail up to its highest region."""
        rs = self.region_size
        if f.spans is None:
            total = len(f.regions) * rs
        else:
            total = sum(n for _, n in self.file_ranges(FileState(f.regions, None, 0, f.spans)))
        if f.tail is not None:
            total += (max(f.high, f.tail) - f.tail + 1) * rs
        return total

    def drop_fine(self) -> None:
        """Forget every fine interval (they may be incomplete): whole regions count."""
        for f in self.files.values():
            f.spans, f.grain = None, 0

    def path_count(self) -> int:
        return len(self.files) + len(self.namespace) + len(self.metadata) + len(self.origins)

    def origin(self, path: bytes) -> bytes | None:
        p = path
        for _ in range(path.count(b"/") + 2):  # one parent per slash, then the root
            if p in self.origins:
                o = self.origins[p]
                return None if o is None else o + path[len(p) :]
            if not p:
                return path
            p = parent(p)
        return path

    def covered(self, path: bytes) -> bool:
        """Whether ``path`` is a namespace path or lies below one: the resync reconciles it in
        full (existence, type, attributes and content), so it needs no record of its own."""
        p = path
        for _ in range(path.count(b"/") + 2):
            if p in self.namespace:
                return True
            if not p:
                return False
            p = parent(p)
        return False

    def _drop_under(self, top: bytes) -> None:
        """Forget the paths at or below ``top`` (O(depth + their number))."""
        for k in self.files.under(top):
            del self.files[k]
        for k in self.origins.under(top):
            del self.origins[k]
        for k in self.metadata.under(top):
            self.metadata.discard(k)
        for k in self.namespace.under(top):
            self.namespace.discard(k)

    def apply(self, rec: Record) -> None:
        if not self.trusted:
            return
        match rec:
            case Head(seq, base, rs):
                self.seq, self.base_generation, self.region_size = seq, base, rs
            case Mark(path, regions):
                f = self.files.setdefault(path, FileState())
                f.regions.update(r for r in regions if not f.covers(r))
            case Tail(path, start, high):
                f = self.files.setdefault(path, FileState())
                f.tail = start if f.tail is None else min(f.tail, start)
                f.high = max(f.high, high, start)
                f.regions = {r for r in f.regions if r < f.tail}
                if f.spans is not None:
                    t = f.tail * self.region_size
                    f.spans = [(a, min(b, t)) for a, b in f.spans if a < t]
            case Fine(path, spans):
                self._add_fine(self.files.setdefault(path, FileState()), spans)
            case Coarse(path):
                f = self.files.setdefault(path, FileState())
                f.spans, f.grain = None, 0
            case Boot() | Clean():
                pass
            case New(path):
                self.files.pop(path, None)
                self.metadata.discard(path)
                self.namespace.add(path)
                self.origins[path] = None
            case Gone(path):
                self._drop_under(path)
                self.namespace.add(path)
            case Rename(old, new, flags):
                if old == new:
                    return
                exchange = bool(flags & RENAME_EXCHANGE)
                o_old, o_new = self.origin(old), self.origin(new)
                _rekey_dict(self.files, old, new, exchange)
                _rekey_dict(self.origins, old, new, exchange)
                _rekey_set(self.metadata, old, new, exchange)
                _rekey_set(self.namespace, old, new, exchange)
                self.origins[new] = o_old
                if exchange:
                    self.origins[old] = o_new
                self.namespace.add(old)
                self.namespace.add(new)
            case Meta(path):
                self.metadata.add(path)
            case Ns(path):
                self.namespace.add(path)
            case Origin(path, origin):
                self.origins[path] = origin
            case Clear(path):
                # what a namespace path covered went unrecorded (journal.py): it goes too
                self._drop_under(path)
                self.origins.pop(path, None)
                if self.origin(path) != path:
                    self.origins[path] = path
            case Invalid(reason):
                self.trusted, self.reason = False, reason
                self.files, self.origins = PathDict(), PathDict()
                self.namespace, self.metadata = PathSet(), PathSet()

    def records(self) -> list[Record]:
        """Records that rebuild this state from an empty one (the snapshot's content)."""
        out: list[Record] = [Head(self.seq, self.base_generation, self.region_size)]
        if not self.trusted:
            out.append(Invalid(self.reason))
            return out
        for path, f in self.files.items():
            if f.regions:
                out.append(Mark(path, tuple(sorted(f.regions))))
            if f.tail is not None:
                out.append(Tail(path, f.tail, f.high))
            if f.spans is None:
                out.append(Coarse(path))
            elif f.spans:
                out.append(Fine(path, tuple(f.spans)))
        out.extend(Ns(p) for p in self.namespace)
        out.extend(Meta(p) for p in self.metadata)
        out.extend(Origin(p, o) for p, o in self.origins.items())
        return out


def merge(regions: list[int], tail: int | None, size: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for r in sorted(regions):
        if ranges and ranges[-1][0] + ranges[-1][1] == r * size:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + size)
        else:
            ranges.append((r * size, size))
    if tail is not None:
        if ranges and ranges[-1][0] + ranges[-1][1] == tail * size:
            ranges[-1] = (ranges[-1][0], TO_EOF)
        else:
            ranges.append((tail * size, TO_EOF))
    return ranges
