"""Reintegration: bring the target's copy of one replicated directory up to the source's.

How it works
    The source (the up-to-date primary) drives; the target (SECOND Transient) answers. Both
    talk through the ordered replication connection, so live writes keep flowing meanwhile.
    The source asks with ``ResyncQuery`` frames (kinds ``QUERY_*`` below) and changes the
    target with the ordinary ops (Create/Open/Write/Fallocate/Truncate/Release, Mkdir, Symlink,
    Mknod, Link, Unlink, Rmdir, Chmod, Chown, Utimens, xattrs), which the target's Receiver
    applies under its root with its usual safety. Resync handles use numbers from
    ``RESYNC_FH_BASE`` up, far from the FUSE layer's.

    Consistency with live writes: every decision compares a local view and a target view
    taken at the SAME point of the op stream: the local read (lstat, listing, block hashes,
    block data) and the enqueue of the matching query or op happen under the one ordering
    lock that the live replicator holds around ``local()`` + enqueue. Writes are "set"
    operations, so a block equal at that point stays equal. What a live op can still
    invalidate (a namespace change, or an op the target refused because its tree was not in
    sync yet) is put in the ``RedoSet`` by the replicator; the source runs redo passes until
    the set is empty under the lock, and only then sends ``ResyncDone``.

    Plans (pure, ``plan_incremental``): an untrusted log on either side, or ``full``, means a
    deep compare of the whole tree. Otherwise: namespace paths of both logs (source journal
    and the target's own activity log, which covers writes a crashed ex-primary applied but
    never had acknowledged) are reconciled deeply, shallowest first; data files only in their
    dirty ranges (union of both logs, merged, page aligned); metadata paths for attributes.
    Data files of an incremental plan are not compared: the logs say every difference is in
    their ranges, so the ranges' current bytes are sent (read under the ordering lock, up to
    RANGES_PER_HOLD small ranges or 1 MiB per hold, with one fstat and one SEEK_DATA/SEEK_HOLE
    walk per hold; parts that are holes here are punched there). The target's stat of the
    next STAT_AHEAD files is asked ahead, so the source never waits for the target to catch
    up between files. Ops are windowed (WINDOW_OPS, WINDOW_BYTES): a drain blocks on the
    newest op leaving the window only, the older ones being answered before it.
    Deep paths, full plans and multiply-linked files are compared by checksum (BLAKE2b-128 per
    64 KiB block plus a "whole block is a hole" flag, SUMS_AHEAD queries in flight): only
    differing blocks are sent. A file missing or empty on the target is sent as it is.

    Durability on the target: ResyncDone is answered only after ``syncfs`` of the replicated
    directory's filesystem, so a target that says "done" holds the data on disk. Meanwhile a
    writeback thread starts the disk writes of each resync file (sync_file_range WRITE, every
    WRITEBACK_BYTES and at Release), so the final syncfs finds little left. A crash before
    the answer leaves the target not done, so it is not counted as in sync; the next session
    runs its plan again (ranges already applied are sent again, not resumed).

    Times: ``Progress`` keeps the session's start (the BEGIN the target accepted) and end
    (ResyncDone answered) on the monotonic clock (``session_s``) and the wall clock
    (``started_at``, ``finished_at``); the mirror status shows them.

Exceptions (errors.py): ``ResyncError`` (the target refused, the pass limit was hit),
``ChannelError`` (the connection failed; from the Outlet), ``ProtocolError`` (a malformed
reply body). OSError from the local tree is translated into ResyncError.

Limits
    - The target's listing and block sums for one file chunk are held in memory; a directory
      is listed in pages of LIST_PAGE entries.
    - A rename made while the peer was away re-sends the renamed file in full (``origin`` is
      not used to seed the peer's copy).
    - Hard links are rebuilt in deep passes (source inode -> first path); incremental passes
      compare multiply-linked dirty files in full but do not re-link them.
    - Directory times are set after their children; a live change inside a directory later
      moves the target's directory mtime again (directory times are not replicated live).
    - Device nodes are skipped (the protocol refuses them). ``system.*`` xattrs are skipped.
    - One Write frame per logged range (the protocol has no vectored write): many small
      scattered ranges cost one frame, one encode, one apply and one answer each.
    - syncfs flushes everything dirty on the target's filesystem, not only what the session
      wrote: other writers on the same filesystem lengthen the session's end.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, Protocol

from app.mirror import ops
from app.mirror.errors import ApplyError, ChannelError, ProtocolError, ResyncError
from app.mirror.journal_state import TO_EOF
from app.mirror.protocol import (
    MAX_DATA,
    Ack,
    Event,
    Nack,
    Request,
    ResyncDone,
    ResyncQuery,
    ResyncReply,
)
from app.mirror.receiver import Receiver

BLOCK: Final = 64 * 1024
DIGEST: Final = 16
SUMS_CHUNK: Final = 16  # blocks hashed per query (1 MiB: bounds the ordering lock hold time)
SUMS_AHEAD: Final = 8  # block-sum queries in flight per file (hides the round trip)
PAGE: Final = 4096  # alignment of the ranges an incremental plan sends
COPY_CHUNK: Final = 1 << 20  # bytes read and queued per ordering-lock hold when sending data
LIST_PAGE: Final = 2048
RESYNC_FH_BASE: Final = 1 << 62
WINDOW_OPS: Final = 1024  # ops in flight (their answers are checked later, in order)
RANGES_PER_HOLD: Final = 64  # small logged ranges read and queued per ordering-lock hold
STAT_AHEAD: Final = 8  # incremental files whose target stat is asked ahead (hides the wait)
WINDOW_BYTES: Final = 16 << 20
MAX_REDO_PASSES: Final = 50

QUERY_BIND: Final = 1  # offset = dir index, count = number of dirs
QUERY_BEGIN: Final = 2  # offset = 1 for full; reply body = the target's activity log
QUERY_STAT: Final = 3  # reply body = u8 present + entry
QUERY_LIST: Final = 4  # offset = first index, count = max entries; reply = entries
QUERY_SUMS: Final = 5  # offset = first block, count = blocks; reply = (u8 hole, digest)*

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
SEEK_DATA: Final = 3
SEEK_HOLE: Final = 4

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ENTRY = struct.Struct(">IIIQqqIQ")
_RANGE = struct.Struct(">QQ")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = _libc.syncfs
_syncfs.argtypes = (ctypes.c_int,)
_syncfs.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE: Final = 2
WRITEBACK_BYTES: Final = 8 << 20  # a resync handle's bytes written before its writeback starts
FLUSHER_IDLE_WAITS: Final = 5  # seconds without work after which the writeback thread ends


# ------------------------------------------------------------------------- wire bodies


@dataclass(frozen=True, slots=True)
class Entry:
    """What one side knows of a directory entry (``name`` is the last component)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    nlink: int
    ino: int
    target: bytes = b""
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


@dataclass(frozen=True, slots=True)
class ActivityLog:
    """A side's record of what it changed (``present`` False: it never was primary)."""

    present: bool
    trusted: bool = True
    reason: str = ""
    files: tuple[tuple[bytes, tuple[tuple[int, int], ...]], ...] = ()
    namespace: tuple[bytes, ...] = ()
    metadata: tuple[bytes, ...] = ()


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError("resync body truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def num(self, fmt: struct.Struct) -> int:
        return int(fmt.unpack(self.take(fmt.size))[0])

    def blob(self, fmt: struct.Struct) -> bytes:
        return self.take(self.num(fmt))

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("trailing bytes in resync body")


def _blob(fmt: struct.Struct, b: bytes) -> bytes:
    return fmt.pack(len(b)) + b


def encode_entry(e: Entry) -> bytes:
    out = [
        _blob(_U16, e.name),
        _ENTRY.pack(e.mode, e.uid, e.gid, e.size, e.atime_ns, e.mtime_ns, e.nlink, e.ino),
        _blob(_U16, e.target),
        _U16.pack(len(e.xattrs)),
    ]
    for name, value in e.xattrs:
        out += [_blob(_U8, name), _blob(_U32, value)]
    return b"".join(out)


def _decode_entry(r: _Reader) -> Entry:
    name = r.blob(_U16)
    if b"/" in name or b"\x00" in name or name in (b".", b".."):
        raise ProtocolError(f"bad entry name {name!r}")
    mode, uid, gid, size, atime, mtime, nlink, ino = _ENTRY.unpack(r.take(_ENTRY.size))
    target = r.blob(_U16)
    xattrs = tuple((r.blob(_U8), r.blob(_U32)) for _ in range(r.num(_U16)))
    return Entry(name, mode, uid, gid, size, atime, mtime, nlink, ino, target, xattrs)


def encode_entries(entries: Iterable[Entry]) -> bytes:
    items = [encode_entry(e) for e in entries]
    return _U32.pack(len(items)) + b"".join(items)


def decode_entries(body: bytes) -> list[Entry]:
    r = _Reader(body)
    out = [_decode_entry(r) for _ in range(r.num(_U32))]
    r.end()
    return out


def encode_stat(entry: Entry | None) -> bytes:
    return b"\x00" if entry is None else b"\x01" + encode_entry(entry)


def decode_stat(body: bytes) -> Entry | None:
    r = _Reader(body)
    present = r.num(_U8)
    entry = _decode_entry(r) if present else None
    r.end()
    return entry


Sum = tuple[bool, bytes]  # (whole block is a hole, digest of its bytes)


def encode_sums(sums: Iterable[Sum]) -> bytes:
    return b"".join(_U8.pack(hole) + digest for hole, digest in sums)


def decode_sums(body: bytes) -> list[Sum]:
    step = 1 + DIGEST
    if len(body) % step:
        raise ProtocolError("block sums body is not a whole number of entries")
    out: list[Sum] = []
    for i in range(0, len(body), step):
        flag = body[i]
        if flag > 1:
            raise ProtocolError(f"hole flag {flag}")
        out.append((bool(flag), body[i + 1 : i + step]))
    return out


def encode_log(log: ActivityLog) -> bytes:
    out = [_U8.pack(log.present), _U8.pack(log.trusted), _blob(_U16, log.reason.encode()[:4096])]
    out.append(_U32.pack(len(log.files)))
    for path, ranges in log.files:
        out += [_blob(_U16, path), _U32.pack(len(ranges))]
        out += [_RANGE.pack(off, ln) for off, ln in ranges]
    for paths in (log.namespace, log.metadata):
        out.append(_U32.pack(len(paths)))
        out += [_blob(_U16, p) for p in paths]
    body = b"".join(out)
    if len(body) > MAX_DATA:
        return encode_log(ActivityLog(True, False, "activity log too large to send"))
    return body


def decode_log(body: bytes) -> ActivityLog:
    from app.mirror.protocol import path_problem

    r = _Reader(body)
    present, trusted = r.num(_U8), r.num(_U8)
    try:
        reason = r.blob(_U16).decode()
    except UnicodeDecodeError:
        raise ProtocolError("log reason is not UTF-8") from None

    def path() -> bytes:
        p = r.blob(_U16)
        if (problem := path_problem(p)) is not None:
            raise ProtocolError(f"log path {p!r}: {problem}")
        return p

    files = []
    for _ in range(r.num(_U32)):
        p = path()
        files.append((p, tuple(_RANGE.unpack(r.take(_RANGE.size)) for _ in range(r.num(_U32)))))
    namespace = tuple(path() for _ in range(r.num(_U32)))
    metadata = tuple(path() for _ in range(r.num(_U32)))
    r.end()
    return ActivityLog(bool(present), bool(trusted), reason, tuple(files), namespace, metadata)


# ------------------------------------------------------------------------- pure planning


def under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


def depth(path: bytes) -> int:
    return 0 if not path else path.count(b"/") + 1


def merge_ranges(ranges: Iterable[tuple[int, int]], block: int = BLOCK) -> list[tuple[int, int]]:
    """Block-aligned, sorted, non-overlapping (offset, length) covering every input range."""
    spans = sorted(
        ((off // block) * block, -(-(off + ln) // block) * block) for off, ln in ranges if ln > 0
    )
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return [(lo, hi - lo) for lo, hi in out]


def blocks_in(ranges: Iterable[tuple[int, int]], size: int, block: int = BLOCK) -> list[int]:
    """Indexes of the blocks of a ``size``-byte file touched by ``ranges`` (clipped to size)."""
    nblocks = -(-size // block)
    out: list[int] = []
    for off, ln in merge_ranges(ranges, block):
        first = off // block
        last = min(nblocks, (off + ln) // block)
        out.extend(range(first, last))
    return sorted(set(out))


def differing(local: list[Sum], remote: list[Sum]) -> list[int]:
    """Positions where the sums differ (a block the remote lacks differs)."""
    return [i for i, s in enumerate(local) if i >= len(remote) or remote[i] != s]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to reconcile: ``deep`` subtrees (shallowest first), ``files`` data ranges, ``meta``."""

    full: bool
    deep: tuple[bytes, ...] = ()
    files: tuple[tuple[bytes, tuple[tuple[int, int], ...]], ...] = ()
    meta: tuple[bytes, ...] = ()
    reason: str = ""


def plan_incremental(source: ActivityLog, target: ActivityLog, full: bool = False) -> Plan:
    """The reintegration plan for both activity logs (see the module docstring)."""
    for side, log in (("source", source), ("target", target)):
        if log.present and not log.trusted:
            return Plan(True, (b"",), reason=f"{side} journal untrusted: {log.reason}")
    if full:
        return Plan(True, (b"",), reason="full resync requested")
    deep: list[bytes] = []
    for p in sorted(set(source.namespace) | set(target.namespace), key=lambda p: (depth(p), p)):
        if not any(under(p, d) for d in deep):
            deep.append(p)
    ranges: dict[bytes, list[tuple[int, int]]] = {}
    for log in (source, target):
        for path, rs in log.files:
            if not any(under(path, d) for d in deep):
                ranges.setdefault(path, []).extend(rs)
    files = tuple(sorted((p, tuple(merge_ranges(rs, PAGE))) for p, rs in ranges.items()))
    meta = sorted(
        {
            p
            for p in (*source.metadata, *target.metadata)
            if p not in ranges and not any(under(p, d) for d in deep)
        }
    )
    return Plan(False, tuple(deep), files, tuple(meta), reason="incremental")


# ------------------------------------------------------------------------- filesystem


def _xattrs(where: int | str) -> tuple[tuple[bytes, bytes], ...]:
    follow = isinstance(where, int)
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
            return ()
        raise
    out = []
    for name in sorted(names):
        if name.startswith("system."):
            continue
        try:
            out.append((os.fsencode(name), os.getxattr(where, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return tuple(out)


def _entry(
    name: bytes, st: os.stat_result, target: bytes, xattrs: tuple[tuple[bytes, bytes], ...]
) -> Entry:
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return Entry(
        name,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_nlink,
        st.st_ino,
        target,
        xattrs,
    )


@contextmanager
def parent_of(root: int, path: bytes) -> Iterator[tuple[int, bytes]]:
    """(descriptor of the parent beneath ``root``, final name); symlinks are never followed.

    OSError ENOENT/ENOTDIR/ELOOP when a component is missing or is not a real directory.
    """
    head, _, name = path.rpartition(b"/")
    fd = root
    try:
        for part in head.split(b"/") if head else ():
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            if fd != root:
                os.close(fd)
            fd = nxt
        yield fd, name
    finally:
        if fd != root:
            os.close(fd)


def entry_in(parent: int, name: bytes) -> Entry | None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    target = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else b""
    link = stat.S_ISLNK(st.st_mode)
    xattrs = () if link else _xattrs(f"/proc/self/fd/{parent}/" + os.fsdecode(name))
    return _entry(name, st, target, xattrs)


def stat_path(root: int, path: bytes) -> Entry | None:
    """The entry at ``path`` beneath ``root`` (None: absent, or a symlink/non-dir on the way)."""
    if path == b"":
        return _entry(b"", os.fstat(root), b"", _xattrs(root))
    try:
        with parent_of(root, path) as (parent, name):
            return entry_in(parent, name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


@contextmanager
def open_dir(root: int, path: bytes) -> Iterator[int]:
    if path == b"":
        yield root
        return
    with parent_of(root, path) as (parent, name):
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        yield fd
    finally:
        os.close(fd)


def list_dir(root: int, path: bytes, first: int = 0, count: int = 1 << 30) -> list[Entry]:
    """Entries of the directory ``path`` sorted by name, from index ``first`` (at most count)."""
    try:
        with open_dir(root, path) as fd:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))[first : first + count]
            return [e for n in names if (e := entry_in(fd, n)) is not None]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return []
        raise


def _is_hole(fd: int, off: int, end: int) -> bool:
    try:
        return os.lseek(fd, off, SEEK_DATA) >= end
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return True
        raise


def data_extents(fd: int, off: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the data (non-hole) parts of [off, end)."""
    out: list[tuple[int, int]] = []
    pos = off
    for _ in range(4096):
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if start >= end:
            break
        stop = min(end, os.lseek(fd, start, SEEK_HOLE))
        out.append((start, stop - start))
        pos = stop
        if pos >= end:
            break
    else:
        return [(off, end - off)]
    return out


def clip_extents(extents: list[tuple[int, int]], off: int, end: int) -> list[tuple[int, int]]:
    """The parts of sorted, disjoint ``extents`` that fall in [off, end)."""
    k = max(0, bisect.bisect_right(extents, (off, 1 << 64)) - 1)
    out: list[tuple[int, int]] = []
    for start, length in extents[k:]:
        if start >= end:
            break
        lo, hi = max(start, off), min(start + length, end)
        if lo < hi:
            out.append((lo, hi - lo))
    return out


def block_sums(fd: int, first: int, count: int, size: int, block: int = BLOCK) -> list[Sum]:
    """Sums of blocks first..first+count-1 of the open file (stopping at ``size``)."""
    out: list[Sum] = []
    for i in range(first, first + count):
        off = i * block
        if off >= size:
            break
        end = min(size, off + block)
        data = os.pread(fd, end - off, off)
        hole = _is_hole(fd, off, end)
        out.append((hole, hashlib.blake2b(data, digest_size=DIGEST).digest()))
    return out


def open_file(root: int, path: bytes) -> int:
    with parent_of(root, path) as (parent, name):
        fd = os.open(name, _READ_FLAGS, dir_fd=parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def syncfs(fd: int) -> None:
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting (sync_file_range WRITE):
    the flush at the end of the session then finds little left. Advisory: errors ignored."""
    _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


class _Flusher:
    """A thread that starts the writeback of the descriptors it is given (sync_file_range
    WRITE, which blocks while it submits the I/O) and closes them, so the receiving thread
    does not wait for the disk. Started at the first ``give``; ``stop`` ends it (bounded)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fds: deque[int] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def give(self, fd: int) -> None:
        with self._cond:
            if self._stopping:
                os.close(fd)
                return
            self._fds.append(fd)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="resync-writeback", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        idle = 0
        while idle < FLUSHER_IDLE_WAITS:  # ends after a few idle seconds; give() restarts it
            with self._cond:
                if not self._fds and not self._stopping:
                    self._cond.wait(1.0)
                if not self._fds:
                    idle += 1
                    if self._stopping or idle >= FLUSHER_IDLE_WAITS:
                        self._thread = None
                        return
                    continue
                idle = 0
                fd = self._fds.popleft()
            try:
                start_writeback(fd)
            finally:
                os.close(fd)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            while self._fds:
                os.close(self._fds.popleft())
            self._stopping = False


@dataclass(slots=True)
class _Handle:
    path: bytes
    unflushed: int = 0  # bytes written since the last writeback was asked


class _Writeback:
    """The target's resync handles being written: their writeback is started (by a
    ``_Flusher`` thread) every WRITEBACK_BYTES and when the handle is released, so the disk
    writes overlap the transfer. Durability still comes from the syncfs before ResyncDone
    is answered; this only leaves it less to do."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._handles: dict[int, _Handle] = {}
        self._flusher = _Flusher()

    def seen(self, op: ops.Op, applied: bool) -> None:
        match op:
            case ops.Open(fh=fh, path=path) | ops.Create(fh=fh, path=path):
                if applied and fh >= RESYNC_FH_BASE:
                    self._handles[fh] = _Handle(path)
            case ops.Write(fh=fh, data=data):
                h = self._handles.get(fh)
                if h is not None and applied:
                    h.unflushed += len(data)
                    if h.unflushed >= WRITEBACK_BYTES:
                        self._kick(h)
            case ops.WriteV(fh=fh, parts=parts):
                h = self._handles.get(fh)
                if h is not None and applied:
                    h.unflushed += sum(len(d) for _, d in parts)
                    if h.unflushed >= WRITEBACK_BYTES:
                        self._kick(h)
            case ops.Release(fh=fh):
                h = self._handles.pop(fh, None)
                if h is not None and h.unflushed:
                    self._kick(h)
            case _:
                pass

    def _kick(self, h: _Handle) -> None:
        h.unflushed = 0
        try:
            fd = open_file(self._root, h.path)
        except OSError:
            return  # renamed or removed meanwhile: the final syncfs covers it
        self._flusher.give(fd)

    def reset(self) -> None:
        self._handles.clear()

    def close(self) -> None:
        self._handles.clear()
        self._flusher.stop()


# ------------------------------------------------------------------------- target side


class Responder:
    """The target: answers queries and applies ops, in stream order (one thread).

    ``session`` is None until the source's BEGIN arrives; Requests before that are refused
    (EAGAIN) so nothing is applied before the target armed itself (``arm``, after any
    quarantine). ``on_state(state)`` is told "running"/"done".
    """

    def __init__(self, root: str | bytes, receiver: Receiver) -> None:
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.receiver = receiver
        self.armed: ActivityLog | None = None
        self.state = "none"
        self.on_done: Callable[[], None] | None = None
        self._writeback = _Writeback(self._root)

    def arm(self, log: ActivityLog) -> None:
        self.armed = log
        if self.state != "running":
            self.state = "none"

    def close(self) -> None:
        self._writeback.close()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def handle(self, event: Event) -> Event | None:
        if isinstance(event, Request):
            if self.state not in ("running", "done"):
                return Nack(event.id, errno.EAGAIN, "no resync session yet")
            reply = self.receiver.handle_request(event)
            self._writeback.seen(event.op, isinstance(reply, Ack))
            return reply
        if isinstance(event, ResyncDone):
            try:
                syncfs(self._root)
            except OSError as exc:
                return ResyncReply(event.id, exc.errno or errno.EIO, b"")
            self.state = "done"
            if self.on_done is not None:
                self.on_done()
            return ResyncReply(event.id, 0, b"")
        if isinstance(event, ResyncQuery):
            try:
                return ResyncReply(event.id, 0, self._answer(event))
            except OSError as exc:
                return ResyncReply(event.id, exc.errno or errno.EIO, b"")
            except ApplyError as exc:
                return ResyncReply(event.id, exc.errno, b"")
        return None

    def _answer(self, q: ResyncQuery) -> bytes:
        if q.kind == QUERY_BEGIN:
            if self.armed is None:
                raise ApplyError(errno.EAGAIN, "target not armed")
            self.receiver.release_all()
            self._writeback.reset()
            self.state = "running"
            return encode_log(self.armed)
        if self.state not in ("running", "done"):
            raise ApplyError(errno.EAGAIN, "no resync session yet")
        if q.kind == QUERY_STAT:
            return encode_stat(stat_path(self._root, q.path))
        if q.kind == QUERY_LIST:
            return encode_entries(list_dir(self._root, q.path, q.offset, min(q.count, LIST_PAGE)))
        if q.kind == QUERY_SUMS:
            try:
                fd = open_file(self._root, q.path)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL):
                    return b""
                raise
            try:
                size = os.fstat(fd).st_size
                return encode_sums(block_sums(fd, q.offset, min(q.count, 256), size))
            finally:
                os.close(fd)
        raise ApplyError(errno.EINVAL, f"unknown resync query kind {q.kind}")


# ------------------------------------------------------------------------- source side


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


class Reintegrator:
    """The source side of one directory's resync (see the module docstring)."""

    def __init__(
        self,
        root: int,
        order: threading.Lock,
        outlet: Outlet,
        redo: RedoSet,
        *,
        timeout: float,
        throttle: Throttle | None = None,
        progress: Progress | None = None,
        stopped: Callable[[], bool] = lambda: False,
        excluded: Callable[[bytes], bool] = lambda path: False,
    ) -> None:
        self.excluded = excluded
        self.root = root
        self.order = order
        self.outlet = outlet
        self.redo = redo
        self.timeout = timeout
        self.throttle = throttle or Throttle(0)
        self.progress = progress or Progress()
        self.stopped = stopped
        self._fh = RESYNC_FH_BASE
        self._window: deque[tuple[Ticket, bytes, int]] = deque()
        self._window_bytes = 0
        self._links: dict[int, bytes] = {}  # source inode -> first path (deep passes)
        # progress: entries found while listing are added to files_total, except in a full
        # sync's first pass, whose _estimate counted the whole tree already
        self._count_found = True

    # -- plumbing -------------------------------------------------------------------

    def _check(self) -> None:
        if self.stopped():
            raise ResyncError("resync stopped")

    def _reply(self, ticket: Ticket, what: str) -> bytes:
        ev = ticket.wait(self.timeout)
        if not isinstance(ev, ResyncReply):
            raise ProtocolError(f"{what}: unexpected answer {type(ev).__name__}")
        if ev.status:
            raise ResyncError(
                f"{what}: target answered {errno.errorcode.get(ev.status, ev.status)}"
            )
        return ev.body

    def _query(self, kind: int, path: bytes, offset: int = 0, count: int = 0) -> Ticket:
        return self.outlet.submit(lambda i: ResyncQuery(i, kind, path, offset, count))

    def _send(self, op: ops.Op, path: bytes) -> None:
        """Queue ``op`` (ordering lock held); its answer is checked later (windowed)."""
        ticket = self.outlet.submit(lambda i: Request(i, op))
        size = _data_size(op)
        self._window.append((ticket, path, size))
        self._window_bytes += size
        self.progress.bytes_sent += size

    def _drain(self, keep: int = 0, keep_bytes: int = 1 << 62) -> None:
        """Wait for answers until at most ``keep`` ops / ``keep_bytes`` are in flight.

        The newest op leaving the window is waited for first: the target answers in stream
        order, so once it is in, the older ones are too and their waits return at once (one
        blocking wait per drain instead of one per op)."""
        done: list[tuple[Ticket, bytes]] = []
        while self._window and (len(self._window) > keep or self._window_bytes > keep_bytes):
            ticket, path, size = self._window.popleft()
            self._window_bytes -= size
            done.append((ticket, path))
        if done:
            done[-1][0].wait(self.timeout)
        for ticket, path in done:
            ev = ticket.wait(self.timeout)
            if isinstance(ev, Nack):
                self.redo.add(path)  # our view was overtaken by a live change: look again
            elif not isinstance(ev, Ack):
                raise ProtocolError(f"unexpected answer {type(ev).__name__} to an op")

    def _next_fh(self) -> int:
        self._fh += 1
        return self._fh

    # -- entry points ---------------------------------------------------------------

    def run(self, plan: Plan) -> None:
        """Execute ``plan`` and then the redo passes until nothing is left (bounded)."""
        if plan.full:
            self._count_found = False
            self._estimate(b"")
        else:
            self.progress.files_total = len(plan.files) + len(plan.deep) + len(plan.meta)
            self.progress.bytes_total = sum(
                min(ln, 1 << 40) for _, rs in plan.files for _, ln in rs
            )
        for path in plan.deep:
            self.reconcile(path, deep=True)
        self._shallow([(path, list(ranges)) for path, ranges in plan.files])
        self._shallow([(path, []) for path in plan.meta])
        self.redo_passes()

    def _shallow(self, todo: list[tuple[bytes, list[tuple[int, int]]]]) -> None:
        """``reconcile(path, deep=False, ranges)`` for each, the target's stat of the next
        STAT_AHEAD paths asked ahead. Each stat is still queued with our lstat under the
        ordering lock (the same stream point); it is answered before the ops we send for the
        paths before it, which touch other paths only (an incremental plan's files are
        distinct and outside every deep path)."""
        ahead: deque[tuple[bytes, list[tuple[int, int]], Entry | None, Ticket]] = deque()
        pending = iter(todo)

        def ask() -> None:
            for path, ranges in pending:
                self._check()
                with self.order:
                    local = self._local(path)
                    ticket = self._query(QUERY_STAT, path)
                ahead.append((path, ranges, local, ticket))
                return

        for _ in range(STAT_AHEAD):
            ask()
        while ahead:
            path, ranges, local, ticket = ahead.popleft()
            ask()
            remote = decode_stat(self._reply(ticket, f"stat {path!r}"))
            self._entry(path, local, remote, False, ranges)

    def redo_passes(self) -> None:
        for _ in range(MAX_REDO_PASSES):
            self._drain()
            paths = self.redo.take()
            if not paths:
                return
            self._links.clear()
            self._count_found = True
            self.progress.files_total += len(paths)
            done: list[bytes] = []
            for path in paths:
                if not any(under(path, d) for d in done):
                    self.reconcile(path, deep=True)
                    done.append(path)
        raise ResyncError(f"still changing after {MAX_REDO_PASSES} redo passes")

    def _estimate(self, path: bytes) -> None:
        """Entries (``path`` and every one below, directories included) and bytes to do."""
        files, total = 1, 0
        stack = [path]
        while stack and files < 10_000_000:
            top = stack.pop()
            for e in list_dir(self.root, top):
                child = top + b"/" + e.name if top else e.name
                if self.excluded(child):
                    continue
                files += 1
                if e.kind == stat.S_IFDIR:
                    stack.append(child)
                else:
                    total += e.size
        self.progress.files_total, self.progress.bytes_total = files, total

    def reconcile(
        self, path: bytes, deep: bool, ranges: list[tuple[int, int]] | None = None
    ) -> None:
        """Make the target's entry at ``path`` match ours (``ranges`` None: every block)."""
        self._check()
        with self.order:
            local = self._local(path)
            ticket = self._query(QUERY_STAT, path)
        remote = decode_stat(self._reply(ticket, f"stat {path!r}"))
        self._entry(path, local, remote, deep, ranges)

    def _local(self, path: bytes) -> Entry | None:
        try:
            return stat_path(self.root, path)
        except OSError as exc:
            raise ResyncError(f"cannot read {path!r} locally: {exc}") from exc

    def _entry(
        self,
        path: bytes,
        local: Entry | None,
        remote: Entry | None,
        deep: bool,
        ranges: list[tuple[int, int]] | None,
    ) -> None:
        """Reconcile one entry; a local one counts as one entry done (progress)."""
        self._entry_once(path, local, remote, deep, ranges)
        if local is not None:
            self.progress.files_done += 1

    def _entry_once(
        self,
        path: bytes,
        local: Entry | None,
        remote: Entry | None,
        deep: bool,
        ranges: list[tuple[int, int]] | None,
    ) -> None:
        self._check()
        if local is None:
            if remote is not None and path:
                self._remove(path, remote)
            return
        kind = local.kind
        if remote is not None and path and remote.kind != kind:
            self._remove(path, remote)
            remote = None
        if kind == stat.S_IFDIR:
            if remote is None and path:
                with self.order:
                    self._send(
                        ops.Mkdir(path, stat.S_IMODE(local.mode), local.uid, local.gid), path
                    )
            if deep:
                self._children(path)
            self._attrs(path, local, remote, times=True)
        elif kind == stat.S_IFREG:
            if local.nlink > 1 and deep and local.ino in self._links and path:
                self._relink(path, self._links[local.ino], remote)
                return
            if local.nlink > 1 and deep:
                self._links[local.ino] = path
            self._file(path, local, remote, ranges if local.nlink == 1 else None)
        elif kind == stat.S_IFLNK:
            if remote is None or remote.target != local.target:
                with self.order:
                    if remote is not None:
                        self._send(ops.Unlink(path), path)
                    self._send(ops.Symlink(local.target, path, local.uid, local.gid), path)
                remote = None
            self._attrs(path, local, remote, times=True)
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
            if remote is None:
                with self.order:
                    self._send(ops.Mknod(path, local.mode, local.uid, local.gid), path)
            self._attrs(path, local, remote, times=True)
        # device nodes are not replicated

    def _children(self, path: bytes) -> None:
        with self.order:
            try:
                with open_dir(self.root, path) as fd:
                    names = sorted(os.fsencode(n) for n in os.listdir(fd))
                    mine = {n: e for n in names if (e := entry_in(fd, n)) is not None}
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    self.redo.add(path)
                    return
                raise ResyncError(f"cannot list {path!r}: {exc}") from exc
            ticket = self._query(QUERY_LIST, path, 0, LIST_PAGE)
        page = decode_entries(self._reply(ticket, f"list {path!r}"))
        theirs = {e.name: e for e in page}
        first = LIST_PAGE
        while len(page) >= LIST_PAGE and first < (1 << 32):
            # Later pages are not taken at the same stream point; a live namespace change
            # meanwhile is in the redo set anyway.
            with self.order:
                ticket = self._query(QUERY_LIST, path, first, LIST_PAGE)
            page = decode_entries(self._reply(ticket, f"list {path!r}"))
            theirs.update((e.name, e) for e in page)
            first += LIST_PAGE
        if self._count_found:
            self.progress.files_total += sum(
                1 for n in mine if not self.excluded(path + b"/" + n if path else n)
            )
        for name in sorted(set(mine) | set(theirs)):
            child = path + b"/" + name if path else name
            if self.excluded(child):
                continue
            self._entry(child, mine.get(name), theirs.get(name), True, None)

    def _remove(self, path: bytes, remote: Entry) -> None:
        if remote.kind == stat.S_IFDIR:
            for _ in range(1 << 20):
                with self.order:
                    ticket = self._query(QUERY_LIST, path, 0, LIST_PAGE)
                children = decode_entries(self._reply(ticket, f"list {path!r}"))
                for e in children:
                    self._remove(path + b"/" + e.name, e)
                self._drain()
                if len(children) < LIST_PAGE:
                    break
            with self.order:
                self._send(ops.Rmdir(path), path)
        else:
            with self.order:
                self._send(ops.Unlink(path), path)

    def _relink(self, path: bytes, first: bytes, remote: Entry | None) -> None:
        self._drain()
        with self.order:
            ticket = self._query(QUERY_STAT, first)
        anchor = decode_stat(self._reply(ticket, f"stat {first!r}"))
        if anchor is not None and remote is not None and remote.ino == anchor.ino:
            return
        with self.order:
            if remote is not None:
                self._send(ops.Unlink(path), path)
            self._send(ops.Link(first, path), path)

    def _file(
        self, path: bytes, local: Entry, remote: Entry | None, ranges: list[tuple[int, int]] | None
    ) -> None:
        fh = self._next_fh()
        with self.order:
            try:
                fd = open_file(self.root, path)
            except OSError:
                self.redo.add(path)  # changed under us: a live op moved it; look again later
                return
            st = os.fstat(fd)
            if st.st_ino != local.ino:
                os.close(fd)
                self.redo.add(path)
                return
            size = st.st_size
            if remote is None:
                self._send(
                    ops.Create(fh, path, stat.S_IMODE(local.mode), local.uid, local.gid, False),
                    path,
                )
            else:
                self._send(ops.Open(fh, path), path)
            if remote is None or remote.size != size:
                self._send(ops.Truncate(fh, b"", size), path)
        try:
            if remote is None or remote.size == 0:
                # Nothing to compare with: send the data as it is.
                self._send_range(fd, fh, path, 0, TO_EOF)
            elif ranges is not None:
                # Incremental, trusted logs: the ranges hold every difference; send their
                # current bytes without asking the target for checksums first.
                self._send_ranges(fd, fh, path, ranges)
            else:
                self._compare(fd, fh, path, list(range(-(-size // BLOCK))))
            with self.order:
                self._send(ops.Release(fh), path)
        finally:
            os.close(fd)
        self._attrs(path, local, remote, times=True, force_times=True)

    def _send_range(self, fd: int, fh: int, path: bytes, off: int, ln: int) -> None:
        """Make the target's bytes [off, off + ln) (clipped to our size) equal ours: holes are
        punched, data written; COPY_CHUNK bytes per ordering-lock hold (BLOCK if throttled)."""
        pos, stop = off, off + ln
        # Throttled: one block per step, so the sleeps stay short and a stop is seen soon.
        step = BLOCK if self.throttle.rate > 0 else COPY_CHUNK
        for _ in range(1 << 40):
            self._check()
            sent = 0
            with self.order:
                end = min(os.fstat(fd).st_size, stop, pos + step)
                if pos >= end:
                    return
                extents = data_extents(fd, pos, end)
                if extents != [(pos, end - pos)]:
                    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                    self._send(ops.Fallocate(fh, mode, pos, end - pos), path)
                for eoff, eln in extents:
                    data = os.pread(fd, eln, eoff)
                    if data:
                        self._send(ops.Write(fh, eoff, data), path)
                        sent += len(data)
            self.progress.bytes_done += end - pos
            pos = end
            self._drain(WINDOW_OPS, WINDOW_BYTES)
            self.throttle.take(sent)

    def _send_ranges(self, fd: int, fh: int, path: bytes, ranges: list[tuple[int, int]]) -> None:
        """``_send_range`` for each of ``ranges`` (sorted, disjoint): small ones in groups of
        up to RANGES_PER_HOLD ranges or COPY_CHUNK bytes per ordering-lock hold, with one
        fstat and one data-extent walk per group."""
        i, n = 0, len(ranges)
        for _ in range(n + 1):
            if i >= n:
                return
            self._check()
            if self.throttle.rate > 0 or ranges[i][1] >= COPY_CHUNK:
                self._send_range(fd, fh, path, *ranges[i])
                i += 1
                continue
            j, budget = i, 0
            while j < n and j - i < RANGES_PER_HOLD and budget + ranges[j][1] <= COPY_CHUNK:
                budget += ranges[j][1]
                j += 1
            covered = 0
            batch: list[tuple[int, bytes]] = []
            with self.order:
                size = os.fstat(fd).st_size
                lo, hi = ranges[i][0], min(size, ranges[j - 1][0] + ranges[j - 1][1])
                extents = data_extents(fd, lo, hi) if lo < hi else []
                for off, ln in ranges[i:j]:
                    end = min(size, off + ln)
                    if off >= end:
                        continue
                    parts = clip_extents(extents, off, end)
                    batch += self._hole_then_data(fd, fh, path, off, end, parts)
                    covered += end - off
                if batch:
                    self._send(ops.WriteV(fh, tuple(batch)), path)
            self.progress.bytes_done += covered
            i = j
            self._drain(WINDOW_OPS, WINDOW_BYTES)

    def _hole_then_data(
        self, fd: int, fh: int, path: bytes, off: int, end: int, extents: list[tuple[int, int]]
    ) -> list[tuple[int, bytes]]:
        """[off, end) of our file, whose data extents are ``extents``: punch the range on the
        target first when it is not all data (ordering lock held), then our data, read."""
        if extents != [(off, end - off)]:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            self._send(ops.Fallocate(fh, mode, off, end - off), path)
        out = []
        for eoff, eln in extents:
            data = os.pread(fd, eln, eoff)
            if data:
                out.append((eoff, data))
        return out

    def _compare(self, fd: int, fh: int, path: bytes, todo: list[int]) -> None:
        """Compare ``todo`` blocks by checksum, SUMS_AHEAD queries in flight, and send the
        differing ones."""
        ahead: deque[tuple[list[int], list[Sum], Ticket]] = deque()
        for i in range(0, len(todo), SUMS_CHUNK):
            self._check()
            chunk = todo[i : i + SUMS_CHUNK]
            lo, hi = chunk[0], chunk[-1]
            with self.order:
                size = os.fstat(fd).st_size
                mine = block_sums(fd, lo, hi - lo + 1, size)
                ticket = self._query(QUERY_SUMS, path, lo, hi - lo + 1)
            ahead.append((chunk, mine, ticket))
            if len(ahead) >= SUMS_AHEAD:
                self._compared(fd, fh, path, *ahead.popleft())
        while ahead:
            self._compared(fd, fh, path, *ahead.popleft())

    def _compared(
        self, fd: int, fh: int, path: bytes, chunk: list[int], mine: list[Sum], ticket: Ticket
    ) -> None:
        theirs = decode_sums(self._reply(ticket, f"sums {path!r}"))
        lo, wanted = chunk[0], set(chunk)
        diff = [lo + i for i in differing(mine, theirs) if lo + i in wanted]
        self.progress.bytes_done += (len(chunk) - len(diff)) * BLOCK
        self._copy_blocks(fd, fh, path, diff, [])

    def _copy_blocks(self, fd: int, fh: int, path: bytes, blocks: list[int], _: list[int]) -> None:
        for index in blocks:
            self._check()
            off = index * BLOCK
            sent = 0
            with self.order:
                size = os.fstat(fd).st_size
                end = min(size, off + BLOCK)
                if off >= end:
                    continue
                extents = data_extents(fd, off, end)
                for eoff, data in self._hole_then_data(fd, fh, path, off, end, extents):
                    self._send(ops.Write(fh, eoff, data), path)
                    sent += len(data)
            self.progress.bytes_done += end - off
            self._drain(WINDOW_OPS, WINDOW_BYTES)
            self.throttle.take(sent)

    def _attrs(
        self,
        path: bytes,
        local: Entry,
        remote: Entry | None,
        *,
        times: bool,
        force_times: bool = False,
    ) -> None:
        """Owner, mode, xattrs, then times, read fresh under the ordering lock."""
        with self.order:
            now = self._local(path)
            if now is None or now.kind != local.kind:
                self.redo.add(path)
                return
            link = now.kind == stat.S_IFLNK
            if remote is None or (remote.uid, remote.gid) != (now.uid, now.gid):
                self._send(ops.Chown(path, now.uid, now.gid), path)
            if not link and (remote is None or remote.mode != now.mode or remote.uid != now.uid):
                self._send(ops.Chmod(path, stat.S_IMODE(now.mode)), path)
            theirs = dict(remote.xattrs) if remote is not None else {}
            mine = dict(now.xattrs)
            for name, value in mine.items():
                if theirs.get(name) != value:
                    self._send(ops.SetXattr(path, name, value, 0), path)
            for name in theirs.keys() - mine.keys():
                self._send(ops.RemoveXattr(path, name), path)
            if times and (
                force_times
                or remote is None
                or now.kind == stat.S_IFDIR
                or (remote.mtime_ns, remote.atime_ns) != (now.mtime_ns, now.atime_ns)
            ):
                self._send(ops.Utimens(path, now.atime_ns, now.mtime_ns), path)

    def finish(self, done: Callable[[], Ticket | None]) -> None:
        """Drain, then call ``done`` with the ordering lock held until it sends ResyncDone.

        ``done`` returns None when the redo set refilled meanwhile (another pass runs).
        """
        for _ in range(MAX_REDO_PASSES):
            self.redo_passes()
            self._drain()
            with self.order:
                ticket = done()
            if ticket is not None:
                self._reply(ticket, "resync done")
                return
        raise ResyncError(f"still changing after {MAX_REDO_PASSES} final passes")


__all__ = [
    "ActivityLog",
    "ChannelError",
    "Entry",
    "Plan",
    "Reintegrator",
    "Responder",
]


def _data_size(op: ops.Op) -> int:
    """Bytes an op carries, for the window (64 for an op without data)."""
    if isinstance(op, ops.Write):
        return len(op.data)
    if isinstance(op, ops.WriteV):
        return sum(len(data) for _, data in op.parts)
    return 64
