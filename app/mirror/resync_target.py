"""Resync's target side: answer the source's queries, apply its ops, make them durable.

How it works
    ``Responder`` runs on the target (SECOND Transient), fed in stream order by one thread.
    It refuses Requests (EAGAIN) until the source's BEGIN arrives, and BEGIN until it was
    armed (``arm``, after any quarantine) with its own activity log, which BEGIN's reply
    carries. Queries are answered from the tree (resync_fs); ops go to the Receiver, which
    applies them under its root with its usual safety.

    Resync data: the page-aligned parts of a resync ``WriteV`` (the ranges of an incremental
    session) go to the ``DirectWriter`` (resync_direct.py: O_DIRECT through native AIO, many
    pages per system call, completed while the next frames arrive) and the WriteV is answered
    once they are queued; the other parts are applied by the Receiver as before. Before any
    other event the Responder waits for the pages it depends on (``_settle``): those of the
    one file the op or query reads or changes (by handle, or by its path's st_dev/st_ino), or
    all of them (anything else); ops that only create inodes or change names do not wait.
    So every op sees the state the stream order says, pages included.

    Durability on the target: ResyncDone is answered only after every direct page is written
    and ``syncfs`` of the replicated directory's filesystem, so a target that says "done"
    holds the data on disk; a page that could not be written fails ResyncDone (the session
    runs again). Meanwhile a writeback thread starts the disk writes of what went through the
    page cache (sync_file_range WRITE, every WRITEBACK_BYTES and at Release), so the final
    syncfs finds little left; once done, that thread drops the clean cached pages of the
    files the session wrote through the cache (POSIX_FADV_DONTNEED, at most DROP_MAX files):
    this node serves no reads of them, and a later session's direct writes would otherwise
    drop them one large folio at a time. A crash before the answer leaves the target not
    done, so it is not counted as in sync; the next session runs its plan again (ranges
    already applied are sent again, not resumed).

Exceptions: an OSError or ApplyError while answering a query or ResyncDone, and a direct page
that could not be written, become the ResyncReply's status; a Request before BEGIN is answered
with a Nack (EAGAIN). The constructor raises OSError when the root cannot be opened.

Limits
    - The listing and block sums for one query are held in memory (at most LIST_PAGE
      entries, 256 blocks).
    - syncfs flushes everything dirty on the target's filesystem, not only what the session
      wrote: other writers on the same filesystem lengthen the session's end.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from app.mirror import ops
from app.mirror.errors import ApplyError
from app.mirror.fusefs_sys import start_writeback
from app.mirror.protocol import (
    Ack,
    Event,
    Nack,
    Request,
    ResyncDone,
    ResyncQuery,
    ResyncReply,
    path_problem,
)
from app.mirror.receiver import Receiver
from app.mirror.resync_codec import (
    LIST_PAGE,
    QUERY_BEGIN,
    QUERY_LIST,
    QUERY_STAT,
    QUERY_SUMS,
    RESYNC_FH_BASE,
    ActivityLog,
    encode_entries,
    encode_log,
    encode_stat,
    encode_sums,
)
from app.mirror.resync_direct import DirectWriter, Key
from app.mirror.resync_fs import block_sums, list_dir, open_file, stat_path

# ops that touch no existing file's data or attributes: a direct write pending for a file
# lands in its inode whatever these do to its names (a new inode has nothing pending)
_NO_DATA_OPS: Final = (
    ops.Open,
    ops.Create,
    ops.Release,
    ops.Mknod,
    ops.Mkdir,
    ops.Symlink,
    ops.Link,
    ops.Unlink,
    ops.Rmdir,
    ops.Rename,
)

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = _libc.syncfs
_syncfs.argtypes = (ctypes.c_int,)
_syncfs.restype = ctypes.c_int
WRITEBACK_BYTES: Final = 8 << 20  # a resync handle's bytes written before its writeback starts
FLUSHER_IDLE_WAITS: Final = 5  # seconds without work after which the writeback thread ends
DROP_MAX: Final = 65536  # files whose cached pages are dropped after a session (the rest stay)


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def syncfs(fd: int) -> None:
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _drop_cached(root: int, paths: list[bytes]) -> None:
    for path in paths:
        try:
            fd = open_file(root, path)
        except OSError:
            continue  # renamed or removed since
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # a hint only: the data is on disk either way
        finally:
            os.close(fd)


class _Flusher:
    """A thread that starts the writeback of the descriptors it is given (sync_file_range
    WRITE, which blocks while it submits the I/O) and closes them, so the receiving thread
    does not wait for the disk. Started at the first ``give``; ``stop`` ends it (bounded)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fds: deque[tuple[int, list[bytes] | None]] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def give(self, fd: int, drop: list[bytes] | None = None) -> None:
        """Start ``fd``'s writeback; or, given ``drop``, drop the clean cached pages of those
        files below the directory ``fd``. Then close ``fd`` (it is ours now)."""
        with self._cond:
            if self._stopping:
                os.close(fd)
                return
            self._fds.append((fd, drop))
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
                fd, drop = self._fds.popleft()
            try:
                if drop is None:
                    start_writeback(fd)
                else:
                    _drop_cached(fd, drop)
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
                os.close(self._fds.popleft()[0])
            self._stopping = False


@dataclass(slots=True)
class _Handle:
    path: bytes
    unflushed: int = 0  # bytes written since the last writeback was asked
    wrote: bool = False  # bytes went through the page cache


class _Writeback:
    """The target's resync handles being written: their writeback is started (by a
    ``_Flusher`` thread) every WRITEBACK_BYTES and when the handle is released, so the disk
    writes overlap the transfer. Durability still comes from the syncfs before ResyncDone
    is answered; this only leaves it less to do."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._handles: dict[int, _Handle] = {}
        self._written: list[bytes] = []  # files the session wrote through the page cache
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
                    h.wrote = True
                    if h.unflushed >= WRITEBACK_BYTES:
                        self._kick(h)
            case ops.WriteV(fh=fh, parts=parts):
                h = self._handles.get(fh)
                if h is not None and applied:
                    h.unflushed += sum(len(d) for _, d in parts)
                    h.wrote = True
                    if h.unflushed >= WRITEBACK_BYTES:
                        self._kick(h)
            case ops.Release(fh=fh):
                h = self._handles.pop(fh, None)
                if h is not None and h.unflushed:
                    self._kick(h)
                if h is not None and h.wrote and len(self._written) < DROP_MAX:
                    self._written.append(h.path)
            case _:
                pass

    def _kick(self, h: _Handle) -> None:
        h.unflushed = 0
        try:
            fd = open_file(self._root, h.path)
        except OSError:
            return  # renamed or removed meanwhile: the final syncfs covers it
        self._flusher.give(fd)

    def drop_cached(self) -> None:
        """The session's data is on disk: drop what it left in the page cache (on the
        writeback thread, while the answer goes out). This node serves no reads of it, and a later
        session's direct writes would otherwise drop those pages one folio at a time."""
        written, self._written = self._written, []
        if written:
            self._flusher.give(os.dup(self._root), drop=written)

    def reset(self) -> None:
        self._handles.clear()
        self._written.clear()

    def close(self) -> None:
        self._handles.clear()
        self._flusher.stop()


class Responder:
    """The target: answers queries and applies ops, in stream order (one thread).

    ``session`` is None until the source's BEGIN arrives; Requests before that are refused
    (EAGAIN) so nothing is applied before the target armed itself (``arm``, after any
    quarantine). ``on_done()`` runs once the data is flushed, just before ResyncDone is answered.
    """

    def __init__(
        self, root: str | bytes, receiver: Receiver, direct: DirectWriter | None = None
    ) -> None:
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.receiver = receiver
        self.armed: ActivityLog | None = None
        self.state = "none"
        self.on_done: Callable[[], None] | None = None
        self._writeback = _Writeback(self._root)
        self._direct = direct or DirectWriter()

    def arm(self, log: ActivityLog) -> None:
        self.armed = log
        self._direct.warm()
        if self.state != "running":
            self.state = "none"

    def close(self) -> None:
        self._direct.close()
        self._writeback.close()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def release_all(self) -> None:
        """The link is gone or replaced: finish the direct writes, close every handle."""
        self._direct.reset()
        self.receiver.release_all()

    def handle(self, event: Event) -> Event | None:
        if isinstance(event, Request):
            if self.state not in ("running", "done"):
                return Nack(event.id, errno.EAGAIN, "no resync session yet")
            op = event.op
            if (
                isinstance(op, ops.Write | ops.Fsync)
                and op.fh < RESYNC_FH_BASE
                and not self._direct.busy
            ):
                # the live hot path: no direct page to wait for, nothing for _writeback
                return self.receiver.handle_request(event)
            if isinstance(op, ops.WriteV) and self.state == "running" and op.fh >= RESYNC_FH_BASE:
                fd = self.receiver.fd_of(op.fh)
                if fd is not None:
                    left = self._direct.submit(fd, op.fh, op.parts)
                    if not left:
                        return Ack(event.id)
                    event = Request(event.id, ops.WriteV(op.fh, tuple(left)))
            else:
                self._settle(event)
            reply = self.receiver.handle_request(event)
            if isinstance(op, ops.Release):
                self._direct.forget(op.fh)
            self._writeback.seen(event.op, isinstance(reply, Ack))
            return reply
        self._settle(event)
        if isinstance(event, ResyncDone):
            failed = self._direct.take_error()
            if failed is not None:
                return ResyncReply(event.id, failed.errno or errno.EIO, b"")
            try:
                syncfs(self._root)
            except OSError as exc:
                return ResyncReply(event.id, exc.errno or errno.EIO, b"")
            self.state = "done"
            self._writeback.drop_cached()
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

    def _settle(self, event: Event) -> None:
        """Wait for the direct writes ``event`` depends on: those of the one file it reads or
        changes, or all of them (when that file cannot be told, and for anything else)."""
        if not self._direct.busy:
            return
        key: Key | None = None
        if isinstance(event, Request):
            op = event.op
            if isinstance(op, _NO_DATA_OPS):
                return  # a new inode, or names only: pending writes go to the inode anyway
            fh = getattr(op, "fh", -1)
            if fh >= 0:
                fd = self.receiver.fd_of(fh)
                key = None if fd is None else _key(os.fstat(fd))
            else:
                key = self._path_key(getattr(op, "path", None))
        elif isinstance(event, ResyncQuery) and event.kind in (QUERY_STAT, QUERY_SUMS):
            key = self._path_key(event.path)
        if key is None:
            self._direct.barrier()
        else:
            self._direct.wait_file(key)

    def _path_key(self, path: bytes | None) -> Key | None:
        if path is None or path_problem(path) is not None:
            return None
        try:
            return _key(os.stat(path or b".", dir_fd=self._root, follow_symlinks=False))
        except OSError:
            return None

    def _answer(self, q: ResyncQuery) -> bytes:
        if q.kind == QUERY_BEGIN:
            if self.armed is None:
                raise ApplyError(errno.EAGAIN, "target not armed")
            self.release_all()
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
