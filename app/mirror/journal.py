"""The dirty-extent journal: what changed under the replicated roots since the peer's generation.

How it works
------------
The journal is an activity log. ``mark(op)`` is called for every replicated operation *before*
the operation is applied locally; it makes sure that what the op will touch is durably recorded:

- data, at two granularities, per file (keyed by its current path, relative to the
  replicated root):
  * *regions* (``offset // region_size``, 1 MiB by default), durable before the op is applied
    (fdatasync'd): the activity log proper. A truncate or a FALLOC_FL_COLLAPSE/INSERT_RANGE
    marks a *tail* (every region from its start to the end of the file);
  * *fine intervals*: the exact byte ranges written, widened to pages (4 KiB), kept sorted and
    merged. They are appended to the log before the op is applied but *not* fdatasync'd, so a
    random 4 KiB write into a region already recorded costs one write(2), not one fsync. They
    are complete after a daemon crash in the same boot (the page cache outlives the process;
    the log records its boot id) or after a clean close (a final ``Clean`` record, synced);
    otherwise load drops them and the whole regions count. A write continuing a recorded
    interval records ahead as far as the interval is long (within its region): sequential I/O
    costs one fsync per region, as with regions alone, and a few appended records.
- namespace: paths whose entry was created, removed or renamed (Create, Mknod, Mkdir, Symlink,
  Link, Unlink, Rmdir, both ends of a Rename);
- metadata: paths whose attributes changed (Chmod, Chown, Utimens, xattrs, the target of Link).

When everything the op needs is already recorded (the common case: the region was marked
before) ``mark`` returns without any I/O. Otherwise it appends records to ``dirty.log`` and
fdatasyncs (only when a region or a namespace/metadata record is new: fine intervals are just
appended); concurrent callers share one fsync (group commit). A crash between ``mark`` and the
write leaves an extra dirty range, never a missing one.

Records are replayed on load by the same pure ``State.apply`` that maintains the memory state
(the record format and that state are in journal_state.py; this module holds the files, the
locking and the translation of operations into records).
Renames move the entries of the old path (and of everything below it) to the new path; Unlink
and Rmdir drop them. Open handles are followed through Open/Create/Rename/Unlink/Release, so a
Write names the file by its handle and lands under the file's current path; a handle the
journal never saw is asked of the ``resolver`` given at construction.

On disk (``state_dir``): ``dirty.snapshot`` (the whole state as records, replaced atomically:
write temp, fsync, rename, fsync dir) and ``dirty.log`` (append-only). Each record is framed as
``magic u16 | length u32 | crc32 u32 | payload``. Both files start with a head record carrying
a sequence number; a log whose number differs from the snapshot's is stale (a crash during
compaction) and ignored. On load, a torn last record (a crash during an append) is ignored; a bad
record followed by a good one is corruption: the journal loads *untrusted*, with a reason naming
the file and offset. Load always compacts, so the files are clean afterwards.

What the reintegrator may rely on (when ``trusted``)
---------------------------------------------------
- A regular file whose path is in neither ``namespace_paths()`` nor under one of them differs
  from the peer's copy at most in the ranges of ``dirty_files()`` and in its length and
  attributes (set the peer's length to the local length; clip ranges to it).
- A path in ``namespace_paths()`` (and, for a directory, its whole subtree) must be reconciled
  in full: existence, type, attributes, and content by block-checksum compare. ``origin(path)``
  says where the entry was at ``base_generation`` (None: created since); it is a hint to seed
  the peer's copy (rename or copy on the peer, then compare), never a proof. Process namespace
  paths shallowest first, then data files.
- Paths in ``metadata_paths()`` need their attributes (mode, owner, times, xattrs) re-sent.
When ``trusted`` is False, nothing above holds: compare everything by block checksums.

Covered paths record nothing: an op whose every path is a namespace path or lies below one
(a file created, or written, or chmod'ed in a directory made since the base generation; a
file renamed within such a directory) adds no record, since the reintegrator reconciles that
namespace path in full anyway. So a tree built in a new directory (an extracted tarball, a
clone, a new database) costs one durable record for the directory, not one per entry. The
wait for durability is unchanged: ``mark`` still returns only once every record queued
before it (the covering one included) is on disk.

Limits and memory bounds
------------------------
- Memory: about 60 bytes per dirty region (a Python int in a set) plus the path, for at most
  ``max_regions_per_file`` regions per file; past that the file is summarised as a tail from its
  lowest dirty region (O(1)). Fine intervals: about 100 bytes each, at most
  ``max_spans_per_file`` per file; past that they are widened (64 KiB, then 1 MiB alignment...)
  until half the cap is left, and past the region size the file falls back to whole regions
  (a ``Coarse`` record, so a replay with another cap agrees). At most ``max_paths`` paths are
  tracked (files + namespace + metadata + origins); past that the journal invalidates itself
  ("too many changes") and frees its maps: a full compare follows. The tracked paths and the
  open handles are indexed by directory (journal_index.py, about 40 bytes more per path), so
  a Rename, Unlink, Rmdir or ``clear_file`` costs O(depth + the paths it moves or drops), not
  O(tracked paths).
- A file with several hard links is recorded under the name its handle was opened by; the
  reintegrator must compare multiply-linked files (st_nlink > 1) in full.
- Writes to a file unlinked while open are not recorded (no name can reach them).
- Open handles are not persisted (they die with the process).
- ``bytes_dirty()`` is an estimate: a tail counts up to the highest region marked in it, and
  what lies at or below a namespace path (new files, new trees) is not counted at all.

Exceptions::

    MirrorError (app.mirror.errors)
    +-- JournalError            base of the journal's errors
        +-- JournalNotFound     load(): no snapshot in state_dir
        +-- JournalCorrupt      load(): the snapshot's head is unreadable (base unknown)
        +-- JournalWriteError   an append, fsync or compaction failed: the journal is broken,
        |                       every later mark raises it too (the op must not be applied)
        +-- JournalClosed       used after close() or discard()

Corruption inside the files is not an exception: the journal loads untrusted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from app.mirror import journal_state as js
from app.mirror import ops
from app.mirror.errors import MirrorError
from app.mirror.journal_index import Handles
from app.mirror.journal_state import RENAME_EXCHANGE, TO_EOF

_I64_END: Final = 1 << 63  # past any offset: "to the end" in ``_covered``

SNAPSHOT_NAME: Final = "dirty.snapshot"
LOG_NAME: Final = "dirty.log"
DEFAULT_REGION_SIZE: Final = 1 << 20
BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_INSERT_RANGE: Final = 0x20

Resolver = Callable[[int], bytes | None]

__all__ = [
    "DEFAULT_REGION_SIZE",
    "LOG_NAME",
    "SNAPSHOT_NAME",
    "TO_EOF",
    "DirtyJournal",
    "JournalClosed",
    "JournalCorrupt",
    "JournalError",
    "JournalNotFound",
    "JournalWriteError",
    "Resolver",
    "load",
]


class JournalError(MirrorError):
    """Base of the dirty journal's errors."""


class JournalNotFound(JournalError):
    """There is no journal in the state directory."""


class JournalCorrupt(JournalError):
    """The snapshot's head cannot be read, so not even the base generation is known."""


class JournalWriteError(JournalError):
    """The journal could not be made durable; it is broken until reset or reloaded."""


class JournalClosed(JournalError):
    """The journal was closed or discarded."""


# --- files -----------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def boot_id() -> str:
    """This boot's id (Linux); "" where unknown (then no log is trusted across a crash)."""
    try:
        return Path(BOOT_ID_PATH).read_text().strip()
    except OSError:
        return ""


# --- the journal -----------------------------------------------------------------------------


class DirtyJournal:
    """A persisted, crash-safe record of what changed since ``base_generation``.

    Creating one starts an empty journal in ``state_dir`` (replacing any journal there); use
    ``DirtyJournal.load`` (or ``load``) to restore an existing one. Thread-safe: ``mark`` is
    called concurrently by the FUSE request threads. ``resolver(fh)`` is called with the
    journal's lock held and must not call back into the journal.
    """

    def __init__(
        self,
        state_dir: Path,
        base_generation: str,
        region_size: int = DEFAULT_REGION_SIZE,
        *,
        resolver: Resolver | None = None,
        max_regions_per_file: int = 65536,
        max_spans_per_file: int = js.MAX_SPANS,
        max_paths: int = 1_000_000,
        compact_bytes: int = 4 << 20,
    ) -> None:
        if region_size <= 0:
            raise ValueError(f"region_size must be positive, not {region_size}")
        self._setup(
            state_dir, resolver, max_regions_per_file, max_spans_per_file, max_paths, compact_bytes
        )
        self._state = js.State(0, base_generation, region_size, max_spans_per_file)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._compact_locked()
        except OSError as exc:
            raise JournalWriteError(f"cannot create the journal in {state_dir}: {exc}") from exc

    def _setup(
        self,
        state_dir: Path,
        resolver: Resolver | None,
        max_regions_per_file: int,
        max_spans_per_file: int,
        max_paths: int,
        compact_bytes: int,
    ) -> None:
        self._dir = state_dir
        self._resolver = resolver
        self._max_regions = max_regions_per_file
        self._max_spans = max_spans_per_file
        self._max_paths = max_paths
        self._compact_bytes = compact_bytes
        self._cond = threading.Condition(threading.Lock())
        self._handles = Handles()  # open handles by path: a rename finds its own
        self._queue: list[bytes] = []
        self._enqueued = 0  # batches enqueued
        self._written = 0  # batches written to the log (in the page cache at least)
        self._durable = 0  # batches durable (fdatasync'd)
        self._last_sync = 0  # the last batch enqueued that needs an fdatasync
        self._queue_sync = False  # a batch in the queue needs an fdatasync
        self._flushing = False
        self._failed: JournalWriteError | None = None
        self._closed = False
        # What each handle may write with no record (``mark``'s fast path): fh -> (epoch,
        # start, end), bytes already durably recorded. ``_epoch`` moves on every change
        # that can move a handle's file or shrink what is recorded (rename, unlink, clear,
        # reset, close), which makes every remembered range stale at once.
        self._covered: dict[int, tuple[int, int, int]] = {}
        self._epoch = 0
        self._log_fd = -1
        self._log_size = 0

    @classmethod
    def load(
        cls,
        state_dir: Path,
        *,
        resolver: Resolver | None = None,
        max_regions_per_file: int = 65536,
        max_spans_per_file: int = js.MAX_SPANS,
        max_paths: int = 1_000_000,
        compact_bytes: int = 4 << 20,
    ) -> DirtyJournal:
        """Restore the journal kept in ``state_dir`` (then compact it).

        Raises JournalNotFound without a snapshot, JournalCorrupt when the snapshot's head is
        unreadable, JournalWriteError when the compaction fails. Damage elsewhere loads an
        untrusted journal whose ``reason`` names the file and offset.
        """
        self = cls.__new__(cls)
        self._setup(
            state_dir, resolver, max_regions_per_file, max_spans_per_file, max_paths, compact_bytes
        )
        snap_path, log_path = state_dir / SNAPSHOT_NAME, state_dir / LOG_NAME
        try:
            snap = snap_path.read_bytes()
        except FileNotFoundError as exc:
            raise JournalNotFound(f"no dirty journal in {state_dir}") from exc
        except OSError as exc:
            raise JournalCorrupt(f"cannot read {snap_path}: {exc}") from exc
        parsed = js.parse(snap)
        head = parsed.records[0] if parsed.records else None
        if not isinstance(head, js.Head):
            raise JournalCorrupt(f"{snap_path}: no valid head record at offset 0")
        state = js.State(head.seq, head.base_generation, head.region_size, max_spans_per_file)
        for rec in parsed.records[1:]:
            state.apply(rec)
        if parsed.end != len(snap):  # the snapshot is written atomically: never torn
            state.apply(js.Invalid(f"{snap_path}: corrupt record at offset {parsed.end}"))
        try:
            log = log_path.read_bytes()
        except FileNotFoundError:
            log = b""  # a crash right after the snapshot was replaced: nothing was logged
        except OSError as exc:
            log = b""
            state.apply(js.Invalid(f"cannot read {log_path}: {exc}"))
        fine_complete = True  # no log, or a stale one: the (fsync'd) snapshot has everything
        if log:
            lp = js.parse(log)
            lhead = lp.records[0] if lp.records else None
            if not isinstance(lhead, js.Head) or lp.corrupt_at == 0:
                state.apply(js.Invalid(f"{log_path}: corrupt record at offset 0"))
            elif lhead.seq == head.seq:
                for rec in lp.records[1:]:
                    state.apply(rec)
                if lp.corrupt_at is not None:
                    state.apply(js.Invalid(f"{log_path}: corrupt record at offset {lp.corrupt_at}"))
                # Fine records are appended without fdatasync: all of them are in the file if
                # it was written in this boot (the page cache outlives the process) or closed
                # cleanly; otherwise some may be lost and only the regions are reliable.
                boot = lp.records[1] if len(lp.records) > 1 else None
                same_boot = isinstance(boot, js.Boot) and boot.boot_id == boot_id() != ""
                clean = isinstance(lp.records[-1], js.Clean)
                fine_complete = same_boot or clean
            # else: a stale log (a crash during compaction): its content is in the snapshot
        if not fine_complete:
            state.drop_fine()
        self._state = state
        try:
            self._compact_locked()
        except OSError as exc:
            raise JournalWriteError(f"cannot compact the journal in {state_dir}: {exc}") from exc
        return self

    # --- properties ---------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def base_generation(self) -> str:
        return self._state.base_generation

    @property
    def region_size(self) -> int:
        return self._state.region_size

    @property
    def trusted(self) -> bool:
        return self._state.trusted

    @property
    def reason(self) -> str:
        """Why the journal is untrusted ("" while trusted)."""
        return self._state.reason

    # --- recording ----------------------------------------------------------------------

    def mark(self, op: ops.Op) -> None:
        """Make what ``op`` will change durable in the journal; call before applying ``op``.

        Returns without I/O when everything is recorded already. Raises JournalWriteError
        (the op must then not be applied) or JournalClosed.

        The hot path takes no lock: a Write inside a range its handle is known to have
        durably recorded (``_covered``, remembered after a Write's records are durable), and
        an Fsync (it records nothing: the writes it makes durable were marked before they
        were made) return at once.
        """
        if self._failed is None and not self._closed:
            if isinstance(op, ops.Fsync):
                return
            if isinstance(op, ops.Write):
                known = self._covered.get(op.fh)
                if (
                    known is not None
                    and known[0] == self._epoch
                    and known[1] <= op.offset
                    and op.offset + len(op.data) <= known[2]
                ):
                    return
        with self._cond:
            self._check_usable()
            self._commit_locked(self._records_for(op))
            if isinstance(op, ops.Write):
                self._remember_covered(op)

    def _remember_covered(self, op: ops.Write) -> None:
        """After a Write's records are durable: the bytes around it its handle may write
        with no record, if the state says so simply (one region, one fine span, a tail, a
        namespace path above, an untrusted journal)."""
        st = self._state
        fh, lo = op.fh, op.offset
        everything = (self._epoch, 0, _I64_END)
        if not st.trusted:
            self._covered[fh] = everything
            return
        path = self._handles.path(fh) if fh in self._handles else None
        if path is None:
            return
        if st.covered(path):
            self._covered[fh] = everything
            return
        f = st.files.get(path)
        rs = st.region_size
        if f is None or not f.covers(lo // rs):
            return
        if f.tail is not None and lo >= f.tail * rs:
            self._covered[fh] = (self._epoch, f.tail * rs, _I64_END)
            return
        start, end = lo // rs * rs, (lo // rs + 1) * rs
        if f.spans is not None:
            span = js.span_covering(f.spans, lo)
            if span is None:
                return
            start, end = max(start, span[0]), min(end, span[1])
        if start <= lo < end:
            self._covered[fh] = (self._epoch, start, end)

    def invalidate(self, reason: str) -> None:
        """Record, durably, that the journal cannot be trusted (e.g. writes behind the mirror)."""
        with self._cond:
            self._check_usable()
            self._commit_locked([js.Invalid(reason)])

    def clear_file(self, path: bytes) -> None:
        """Reintegration finished ``path``: drop its data, metadata and namespace entries, and
        those of everything below it (which a namespace ``path`` covered unrecorded)."""
        with self._cond:
            self._check_usable()
            self._epoch += 1
            self._commit_locked([js.Clear(path)])

    def reset(self, new_base_generation: str) -> None:
        """The peer has everything up to now: start empty (and trusted) at a new base.

        Call at a sync point, when no marked op is still waiting for the peer's acknowledgement.
        """
        with self._cond:
            self._check_open()
            self._quiesce_locked()
            self._epoch += 1
            rs = self._state.region_size
            self._state = js.State(self._state.seq, new_base_generation, rs, self._max_spans)
            self._queue, self._queue_sync = [], False
            self._written = self._durable = self._enqueued
            try:
                self._compact_locked()
            except OSError as exc:
                self._failed = JournalWriteError(f"reset of the journal failed: {exc}")
                raise self._failed from exc
            self._failed = None

    def compact(self) -> None:
        """Rewrite the snapshot and start an empty log (done by itself past compact_bytes)."""
        with self._cond:
            self._check_usable()
            self._quiesce_locked()
            self._compact_or_fail_locked()

    def discard(self) -> None:
        """A full sync replaces the journal: delete its files; the object is closed after."""
        with self._cond:
            if self._closed:
                return
            while self._flushing:
                self._cond.wait()
            self._close_locked()
            try:
                for name in (SNAPSHOT_NAME, LOG_NAME):
                    (self._dir / name).unlink(missing_ok=True)
                _fsync_dir(self._dir)
            except OSError as exc:
                raise JournalWriteError(f"cannot delete the journal in {self._dir}: {exc}") from exc

    def close(self) -> None:
        """Flush what is queued and close the log file; the files stay for ``load``."""
        with self._cond:
            if self._closed:
                return
            if self._failed is None:
                self._quiesce_locked()
            while self._flushing:
                self._cond.wait()
            if self._failed is None and self._state.trusted:
                try:  # every record is on disk: a later boot may trust the fine intervals
                    _write_all(self._log_fd, js.frame(js.Clean()))
                    os.fdatasync(self._log_fd)
                except OSError:
                    pass  # without the mark, a later boot uses whole regions: still correct
            self._close_locked()

    def __enter__(self) -> DirtyJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def dirty_files(self) -> Iterator[tuple[bytes, list[tuple[int, int]]]]:
        """(path, merged (offset, length) ranges) per file; a length TO_EOF runs to the end."""
        with self._cond:
            st = self._state
            out = [(path, st.file_ranges(f)) for path, f in st.files.items()]
        return iter(sorted(out))

    def namespace_paths(self) -> set[bytes]:
        """Paths whose entry was created, removed or renamed (reconcile them in full)."""
        with self._cond:
            return set(self._state.namespace)

    def metadata_paths(self) -> set[bytes]:
        """Paths whose attributes (mode, owner, times, xattrs) changed."""
        with self._cond:
            return set(self._state.metadata)

    def origin(self, path: bytes) -> bytes | None:
        """Where the entry now at ``path`` was at base_generation (None: created since)."""
        with self._cond:
            return self._state.origin(path)

    def bytes_dirty(self) -> int:
        """Estimated bytes to send: dirty ranges, and tails up to their highest marked region."""
        with self._cond:
            st = self._state
            return sum(st.file_bytes(f) for f in st.files.values())

    # --- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosed(f"the journal in {self._dir} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise self._failed

    def _handle_path(self, fh: int) -> bytes | None:
        """The current path of handle ``fh``; None: no name reaches it (record nothing)."""
        if fh in self._handles:
            return self._handles.path(fh)
        path = self._resolver(fh) if self._resolver is not None else None
        if path is None:
            raise _UnknownHandle(fh)
        return path

    def _data(self, path: bytes | None, lo: int, hi: int) -> list[js.Record]:
        """Records that make regions lo..hi of ``path`` dirty (none if they are already)."""
        if path is None or hi < lo:
            return []
        f = self._state.files.get(path, js.FileState())
        if f.tail is not None and lo >= f.tail:
            return []
        if hi - lo + 1 > self._max_regions:
            return [js.Tail(path, lo, hi)]
        needed = tuple(r for r in range(lo, hi + 1) if not f.covers(r))
        if not needed:
            return []
        if len(f.regions) + len(needed) > self._max_regions:
            return [js.Tail(path, min(lo, *f.regions), max(hi, *f.regions))]
        return [js.Mark(path, needed)]

    def _fine(self, path: bytes | None, lo: int, hi: int) -> list[js.Record]:
        """A Fine record for bytes [lo, hi) of ``path`` unless they are recorded already.

        A write that continues a recorded interval (sequential I/O) records as far ahead as
        the interval is long, within its region: a stream of small writes costs about
        log2(region / write) appended records per region (one fsync), two random neighbouring
        pages one extra page.
        """
        if path is None or hi <= lo:
            return []
        st = self._state
        f = st.files.get(path)
        if f is not None:
            if f.spans is None or (f.tail is not None and lo >= f.tail * st.region_size):
                return []
            span = js.span_covering(f.spans, lo)
            if span is not None:
                if span[1] >= hi:
                    return []
                # Sequential: record ahead as far as the run is long (so a stream costs a few
                # records per region, two random neighbours a page), within the region.
                rs = st.region_size
                region_end = ((hi - 1) // rs + 1) * rs
                hi = max(hi, min(region_end, hi + (span[1] - span[0])))
        return [js.Fine(path, ((lo, hi),))]

    def _tail(self, path: bytes | None, start: int) -> list[js.Record]:
        if path is None:
            return []
        f = self._state.files.get(path)
        if f is not None and f.tail is not None and f.tail <= start:
            return []
        return [js.Tail(path, start, start)]

    def _records_for(self, op: ops.Op) -> list[js.Record]:
        """Follow handles and translate ``op`` into the records still missing."""
        rs = self._state.region_size
        try:
            recs = self._translate(op, rs)
        except _UnknownHandle as exc:
            recs = [js.Invalid(f"an operation named handle {exc.fh}, whose file is unknown")]
        if not self._state.trusted:
            return []
        if recs and self._state.namespace:
            recs = [rec for rec in recs if not self._redundant(rec)]
        return recs

    def _redundant(self, rec: js.Record) -> bool:
        """A record whose every path is covered (``State.covered``) adds nothing to the plan."""
        covered = self._state.covered
        match rec:
            case (
                js.New(path)
                | js.Gone(path)
                | js.Meta(path)
                | js.Mark(path=path)
                | js.Tail(path=path)
                | js.Fine(path=path)
            ):
                return covered(path)
            case js.Rename(old=old, new=new):
                return covered(old) and covered(new)
            case _:
                return False

    def _translate(self, op: ops.Op, rs: int) -> list[js.Record]:
        st = self._state
        match op:
            case ops.Open(fh, path):
                self._covered.pop(fh, None)
                self._handles.open(fh, path)
                return []
            case ops.Create(fh=fh, path=path):
                self._covered.pop(fh, None)
                self._handles.open(fh, path)
                return [js.New(path)]
            case ops.Release(fh):
                self._covered.pop(fh, None)
                self._handles.release(fh)
                return []
            case ops.Fsync():
                return []
            case ops.Write(fh, offset, data):
                if not data:
                    return []
                target = self._handle_path(fh)
                end = offset + len(data)
                coarse = self._data(target, offset // rs, (end - 1) // rs)
                return coarse + self._fine(target, offset, end)
            case ops.WriteV(fh, parts):
                target = self._handle_path(fh)
                vrecs: list[js.Record] = []
                for offset, data in parts:
                    if data:
                        end = offset + len(data)
                        vrecs += self._data(target, offset // rs, (end - 1) // rs)
                        vrecs += self._fine(target, offset, end)
                return vrecs
            case ops.Truncate(fh, path, length):
                target = self._handle_path(fh) if fh >= 0 else path
                return self._tail(target, length // rs)
            case ops.Fallocate(fh, mode, offset, length):
                target = self._handle_path(fh)
                if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE):
                    return self._tail(target, offset // rs)
                if length <= 0:
                    return []
                end = offset + length
                if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                    data_recs = self._data(target, offset // rs, (end - 1) // rs)
                    return data_recs + self._fine(target, offset, end)
                if mode & FALLOC_FL_KEEP_SIZE:
                    return []
                last = (end - 1) // rs  # the size may grow: list the file
                return self._data(target, last, last) + self._fine(target, end - 1, end)
            case ops.Mknod(path=path) | ops.Mkdir(path=path) | ops.Symlink(path=path):
                return [js.New(path)]
            case ops.Unlink(path):
                self._epoch += 1
                self._handles.unlink(path)
                return [js.Gone(path)]
            case ops.Rmdir(path):
                return [js.Gone(path)]
            case ops.Rename(old, new, flags):
                if old == new:
                    return []
                self._epoch += 1
                self._handles.rename(old, new, bool(flags & RENAME_EXCHANGE))
                return [js.Rename(old, new, flags)]
            case ops.Link(target, new):
                recs: list[js.Record] = [js.New(new)]
                if target not in st.metadata:
                    recs.append(js.Meta(target))
                return recs
            case (
                ops.Chmod(path=path)
                | ops.Chown(path=path)
                | ops.Utimens(path=path)
                | ops.SetXattr(path=path)
                | ops.RemoveXattr(path=path)
            ):
                return [] if path in st.metadata else [js.Meta(path)]

    def _fell_back(self, path: bytes) -> bool:
        f = self._state.files.get(path)
        return f is not None and f.spans is None

    def _commit_locked(self, recs: list[js.Record]) -> None:
        """Apply ``recs`` in memory, queue them, and wait until they are written and every
        record that must be durable (all but Fine records) is fdatasync'd, theirs and those
        queued before."""
        if recs:
            sync = not all(isinstance(rec, js.Fine) for rec in recs)
            for rec in recs:
                self._state.apply(rec)
                self._queue.append(js.frame(rec))
                if isinstance(rec, js.Fine) and self._fell_back(rec.path):
                    # Past the cap the file fell back to whole regions and later writes inside
                    # them record nothing: say so explicitly, whatever cap a replay uses.
                    self._queue.append(js.frame(js.Coarse(rec.path)))
            if self._state.trusted and self._state.path_count() > self._max_paths:
                rec = js.Invalid(f"more than {self._max_paths} paths changed; compare everything")
                self._state.apply(rec)
                self._queue.append(js.frame(rec))
                sync = True
            self._enqueued += 1
            if sync:
                self._last_sync = self._enqueued
                self._queue_sync = True
        written, durable = self._enqueued, self._last_sync
        while self._written < written or self._durable < durable:
            if self._failed is not None:
                raise self._failed
            if self._flushing:
                self._cond.wait()
                continue
            self._flush_locked(release=True)
        if self._log_size >= self._compact_bytes and not self._queue and not self._flushing:
            self._compact_or_fail_locked()

    def _flush_locked(self, *, release: bool) -> None:
        """Write every queued record, fdatasync if one of them needs it (releasing the lock
        during I/O if asked)."""
        batch, self._queue = b"".join(self._queue), []
        sync, self._queue_sync = self._queue_sync, False
        upto = self._enqueued
        self._flushing = True
        error: OSError | None = None
        if release:
            self._cond.release()
        try:
            _write_all(self._log_fd, batch)
            if sync:
                os.fdatasync(self._log_fd)
        except OSError as exc:
            error = exc
        finally:
            if release:
                self._cond.acquire()
            self._flushing = False
            self._cond.notify_all()
        if error is not None:
            self._failed = JournalWriteError(f"cannot append to {self._dir / LOG_NAME}: {error}")
            raise self._failed from error
        self._log_size += len(batch)
        self._written = max(self._written, upto)
        if sync:
            self._durable = max(self._durable, upto)

    def _quiesce_locked(self) -> None:
        """Wait for the running flush, then flush the queue: memory == disk afterwards."""
        while self._flushing:
            self._cond.wait()
        if self._failed is not None:
            return
        if self._queue:
            self._flush_locked(release=False)
        self._written = self._durable = self._enqueued

    def _compact_or_fail_locked(self) -> None:
        try:
            self._compact_locked()
        except OSError as exc:
            self._failed = JournalWriteError(f"compaction of {self._dir} failed: {exc}")
            raise self._failed from exc

    def _compact_locked(self) -> None:
        """Write the state as a new snapshot and start a new log (memory must equal disk)."""
        st = self._state
        st.seq += 1
        _replace_file(self._dir / SNAPSHOT_NAME, b"".join(map(js.frame, st.records())))
        head = js.frame(js.Head(st.seq, st.base_generation, st.region_size))
        head += js.frame(js.Boot(boot_id()))
        _replace_file(self._dir / LOG_NAME, head)
        fd = os.open(self._dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd = fd
        self._log_size = len(head)

    def _close_locked(self) -> None:
        self._closed = True
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        self._cond.notify_all()


class _UnknownHandle(Exception):
    def __init__(self, fh: int) -> None:
        super().__init__(fh)
        self.fh = fh


#: ``load(state_dir, *, resolver=None, ...) -> DirtyJournal``: see ``DirtyJournal.load``.
load = DirtyJournal.load
