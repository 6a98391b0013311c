"""The asynchronous mirror's copier: the model of what the peer holds, and the ops that update it.

Part of ``AsyncMirror`` (asyncmode.py), as the mixin ``_Copier``; it runs on the watch thread
and its state is set up by ``AsyncMirror.__init__``.

How it works
    The model maps each path (relative to the root) to an ``_Entry``: its type, mode, owner,
    size, mtime, symlink target and, for regular files, the blake2b digest (16 bytes) of each
    ``block_size`` block. ``_sync(path, pending)`` compares the path on disk with the model,
    puts on the send queue (asyncmode_send.py) the ops that make the peer equal, then ends
    the group, and records the new state in the model:
    - Copying a regular file reads it in chunks (``block_size * 16``), hashes each block and
      sends only the blocks whose digest changed (``changed_ranges``): Create (new on the
      peer) or Open, Write of the changed ranges, Truncate when the size changed, Release,
      then Chmod/Chown/Utimens as needed. ATTRIB alone sends only the attributes.
    - Directories become Mkdir (+ Chmod/Chown), symlinks Symlink, FIFOs and sockets Mknod;
      missing parents are created first. A path whose type (or symlink target) changed is
      removed on the peer first.
    - ``_remove_peer`` removes a path and the peer's subtree below it, deepest first.
    - ``_absorb_failures`` forgets in the model the paths whose copy failed on the send
      thread, so that their next change copies them in full.

Exceptions
    ``_Stopped`` (asyncmode_send.py) when ``stop()`` is called while waiting for queue space.
    A path that is gone or replaced while it is read is skipped (its own events follow).

Known limits
    - Each copy rereads the whole file to find the changed blocks (O(file size) per change).
      A file copied while being written holds a mix of old and new blocks on the peer until
      the next event copies the rest.
    - Hard links are copied as separate files; a write through one name updates only that
      name on the peer. Sparse files are copied with their holes filled. Directory mtimes,
      xattrs, ACLs and device nodes are not replicated; a symlink's times are not either.
    - Memory: the model holds 16 bytes of digest per ``block_size`` block (256 KiB per GiB at
      64 KiB blocks) plus about 200 bytes per path.
    - Removing a directory costs O(tracked paths).
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from dataclasses import dataclass
from typing import Final

from app.mirror import ops
from app.mirror.asyncmode_pure import DIGEST_SIZE, _under, block_sums, changed_ranges
from app.mirror.asyncmode_send import _GroupEnd, _Item, _Stopped
from app.mirror.ops import Op

_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


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


class _Copier:
    """The copier of ``AsyncMirror``; the attributes are set by ``AsyncMirror.__init__``."""

    _root_b: bytes
    _bs: int
    _chunk: int
    _queue: queue.Queue[_Item]
    _failed: queue.SimpleQueue[bytes]
    _stopping: threading.Event
    _model: dict[bytes, _Entry]
    _next_fh: int
    _group_ops: int
    _sum_bytes: int

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

    def _abs(self, rel: bytes) -> bytes:
        return self._root_b + b"/" + rel if rel else self._root_b
