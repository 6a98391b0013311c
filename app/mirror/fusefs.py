"""The primary's FUSE filesystem: every change is applied locally and replicated, reads stay local.

How it works
    ``MirrorFS`` is the filesystem fuseloop.py serves, mounted OVER the replicated directory.
    The daemon opened that directory (``root_fd``) before mounting, so every operation works
    relative to it with ``*at()`` calls (``dir_fd=root_fd``, ``follow_symlinks=False``) and never
    walks back into its own mount. Paths arrive from the loop as ``str`` decoded with
    ``utf-8``/``surrogateescape`` and are turned back into the kernel's exact ``bytes``, so names
    that are not UTF-8 round-trip. Extended attributes, which have no ``*at()`` call, go through
    ``/proc/self/fd/<root_fd>/<path>`` (still relative to the handle, final link not followed).
    The FUSE session (the kernel's requests, the node table, the threads) is fuseloop.py,
    what both share (paths, the request's caller, the set-ID rule) fusebinding.py; the
    per-handle record is fusefs_handles.py, the system calls ``os`` lacks fusefs_sys.py.

    A change calls ``replicator.apply(op, local)`` with the ``app.mirror.ops`` value and a closure
    that makes the local change; reads, getattr, readdir, readlink, statfs, lseek and xattr reads
    are served locally only. Open files get a handle number mapped to a ``_Handle`` (local fd,
    flags; fusefs_handles.py); handles opened for writing are announced with ``Open``/``Create``
    and dropped with ``Release``.

    Offsets: the kernel computes O_APPEND offsets from its cached size, which is wrong for a file
    written through another hard-linked name (the loop gives every name its own kernel inode, as
    libfuse's high-level API did). So the local fd is opened without O_APPEND and an append handle's
    offset is the real file size, read under a per-inode lock held across the ``Write``: the op
    always carries the offset the bytes really landed at. Writeback caching is switched off (the
    kernel would then compute O_APPEND itself and ``write()`` would return before the data reached
    us, breaking "acknowledged means replicated"); mmap writes reach ``write()`` when the kernel
    writes the pages back (msync, munmap, fsync).

    Times: writes change mtime on each side at a different moment, so when a handle that
    changed data is released, and after a truncate by path, a ``Utimens`` with the local
    atime/mtime follows (its local step does nothing): closed files end with equal times.
    UTIME_NOW and UTIME_OMIT are resolved here, so ``Utimens`` always carries real values.
    O_SYNC/O_DSYNC: the kernel follows each write to such a file with an FSYNC request, in the
    same write(2) call (generic_write_sync; fsync for O_SYNC, fdatasync for O_DSYNC), and that
    fsync is replicated like any other. So the local descriptors are opened without those
    flags, and a write sends no Fsync of its own: each was a second round trip and a second
    flush per write (a 4 KiB O_DSYNC write took 820 us in the lab, as against 513 us for the
    same write + fdatasync).

    Set-ID bits: the mount takes from the kernel (FUSE_HANDLE_KILLPRIV_V2, asked for in
    fuseloop.py's INIT) the clearing of setuid/setgid when a caller without CAP_FSETID writes,
    truncates or allocates (``_drop_setid``: a ``Chmod`` before the change, replicated like
    any), so the kernel no longer asks for security.capability before every write: that was a
    round trip of its own per write (the application slept 3 times per 4 KiB write +
    fdatasync, now 2). Nor does a write fstat the file each time to look for those bits:
    a handle remembers the mode generation at which it saw none (``setid_free``), and only a
    chmod bumps the generation. An fstat before every write cost a disk write per fdatasync
    on both nodes: a stat makes the file's next time update fine-grained (the kernel's
    multigrain timestamps, which also raise the coarse clock's floor for every other file),
    so every write changed the times, and on this lab's ext4 each fdatasync then wrote the
    inode too (three waits for the disk per op instead of two). security.capability itself
    is removed by each copy's own kernel when root writes there, and a chown clears setuid
    there, as on a local filesystem.

    Exclusions (``exclude``, patterns as in exclude.py): a change to an excluded path is made
    locally only, without ``replicator.apply`` (neither sent nor journaled); a handle opened
    by an excluded name stays local. Crossing the boundary: a rename from an excluded name to
    a replicated one sends the file as new (crossing.py: Create + Writes + length, xattrs,
    times), from a replicated name to an excluded one sends ``Unlink`` of the old name; open
    write handles of that file follow it (``Open`` / ``Release`` on the peer). A directory, a
    file with several hard links, an exchange, a hard link with names on both sides, or a
    directory rename that moves entries below it across (path patterns) fail with EXDEV, as
    between two filesystems (``mv`` then copies, which replicates correctly).

Errors (the only way out of an operation is ``OSError(errno)``):
    errno from the local system call   passed through unchanged (ENOENT, EEXIST, ENOTEMPTY,
                                       ENOTDIR, EISDIR, EACCES, EPERM, ENOSPC, EDQUOT, EFBIG,
                                       ENODATA, ERANGE, ENXIO for SEEK_DATA/HOLE, EXDEV, ...)
    EBADF      unknown handle number, or a data operation on a handle not opened for writing
    EXDEV      a link or rename that would cross the exclusion boundary and cannot (above)
    EPERM      mknod of a character or block device (the Mknod op refuses devices)
    EINVAL     rename flags other than RENAME_NOREPLACE/RENAME_EXCHANGE; a name with NUL
    EOPNOTSUPP system.* extended attributes (POSIX ACLs would not be enforced by FUSE)
    EIO        anything else raised inside an operation (a bug, or a Replicator that raised
               something other than OSError); logged with its traceback
    The Replicator never raises for peer trouble (a silent peer is dropped, the node goes
    ALONE): the application never sees a peer error, so no errno is reserved for it.

Known limits
    - Hard links: each name is its own kernel inode, so attributes seen through one name
      (st_nlink after unlinking another name, size) can lag by up to ``attr_timeout`` (1 s).
    - fstat() of a file unlinked while open fails with ESTALE once its cached attributes
      expire: the kernel sends no handle with GETATTR and the node has no path any more.
      read/write/ftruncate/fsync on the handle keep working.
    - Directory and symlink times follow a namespace change on the peer up to
      primary.TIMES_PERIOD_S later (the primary sends them; regular files get their times
      replicated when the handle is released).
    - A change made through a handle whose file was unlinked (fchmod, fchown, futimens on a
      nameless file) is made locally only: no op can name the file on the peer.
    - A write that fails half way (ENOSPC) leaves the written part locally, not on the peer.
    - No POSIX ACLs, no ioctl, no copy_file_range (the kernel falls back to read/write).
    - ``chown(path, -1, -1)`` (no owner change) of a setuid file keeps setuid, where a local
      filesystem clears it: with FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that to the
      filesystem but sends no request that says so. A real owner change clears it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from app.mirror import crossing, ops
from app.mirror.exclude import Exclusions
from app.mirror.fusebinding import DEFAULT_TIMEOUTS as DEFAULT_TIMEOUTS
from app.mirror.fusebinding import (
    ENCODING,
    ERRORS,
    MAX_WRITE,
    UTIME_NOW,
    UTIME_OMIT,
    fuse_errors,
    name_str,
    rel_path,
    request_context,
    resolve_times,
    setid_cleared,
    xattr_name,
)
from app.mirror.fusebinding import CacheTimeouts as CacheTimeouts
from app.mirror.fusefs_handles import _INODE_LOCKS, _Handle
from app.mirror.fusefs_sys import FALLOC_FL_KEEP_SIZE as FALLOC_FL_KEEP_SIZE
from app.mirror.fusefs_sys import FALLOC_FL_PUNCH_HOLE as FALLOC_FL_PUNCH_HOLE
from app.mirror.fusefs_sys import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    _fallocate,
    _pwrite_all,
    _raise_errno,
    _renameat2,
)
from app.mirror.ops import Replicator

# CacheTimeouts and DEFAULT_TIMEOUTS live in fusebinding.py and are re-exported from here.
__all__ = [
    "DEFAULT_TIMEOUTS",
    "MAX_WRITE",
    "UTIME_NOW",
    "UTIME_OMIT",
    "CacheTimeouts",
    "MirrorFS",
]

log = logging.getLogger(__name__)

R = TypeVar("R")
#: how the loop gives a hot operation its file's path: a context manager, the path true
#: (no rename can move it) while it is open
Name = Callable[[], AbstractContextManager[str | None]]

_SETID = stat.S_ISUID | stat.S_ISGID

_STATVFS_KEYS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


class MirrorFS:
    """Pass-through filesystem over ``root_fd`` that replicates every change via ``replicator``."""

    def __init__(
        self,
        root_fd: int,
        replicator: Replicator,
        *,
        timeouts: CacheTimeouts = DEFAULT_TIMEOUTS,
        exclude: Sequence[str] = (),
    ) -> None:
        self._root = root_fd
        self._exclusions = Exclusions(exclude)
        self._proc_root = f"/proc/self/fd/{root_fd}".encode()
        self._replicator = replicator
        self.timeouts = timeouts
        self._handles: dict[int, _Handle] = {}
        self._next_fh = itertools.count(1)
        self._table_lock = threading.Lock()
        self._inode_locks = [threading.Lock() for _ in range(_INODE_LOCKS)]
        # bumped after every chmod (the only way a set-ID bit comes to an existing file): a
        # handle that saw no set-ID bit at the current generation writes without an fstat
        self._modes = itertools.count()
        self._mode_gen = next(self._modes)

    # -- helpers -------------------------------------------------------------------------

    def _handle(self, fh: int | None) -> _Handle:
        handle = self._handles.get(fh) if fh is not None else None
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return handle

    def _writable(self, fh: int | None) -> _Handle:
        handle = self._handle(fh)
        if not handle.writable:
            raise OSError(errno.EBADF, "handle not open for writing")
        return handle

    def _new_handle(self, fd: int, flags: int, writable: bool, replicated: bool = True) -> int:
        fh = self._reserve_fh()
        self._register(fh, fd, flags, writable, replicated)
        return fh

    def _excluded(self, rel: bytes, is_dir: bool | None = None) -> bool:
        """Whether changes to ``rel`` stay local (``is_dir`` None: look at what is there)."""
        if not self._exclusions or not rel:
            return False
        if is_dir is None:
            try:
                st = os.stat(rel, dir_fd=self._root, follow_symlinks=False)
            except OSError:
                is_dir = False
            else:
                is_dir = stat.S_ISDIR(st.st_mode)
        return self._exclusions.excluded(rel, is_dir)

    def _change(self, replicated: bool, op: ops.Op, local: Callable[[], R]) -> R:
        """Run ``local``; through the replicator (journal, peer) only when ``replicated``.

        A change left local (an excluded path) is still told to a replicator that has
        ``note_local(op)``: it moved its parent directory's mtime, which is replicated.
        """
        if replicated:
            return self._replicator.apply(op, local)
        result = local()
        note = getattr(self._replicator, "note_local", None)
        if note is not None:
            note(op)
        return result

    def _reserve_fh(self) -> int:
        with self._table_lock:
            return next(self._next_fh)

    def _creator(self, rel: bytes) -> tuple[int, int, bool]:
        """Owner of a new entry: the caller, with the parent's group if it is setgid."""
        uid, gid, _pid = request_context()
        parent = rel.rpartition(b"/")[0] or b"."
        pst = os.stat(parent, dir_fd=self._root, follow_symlinks=False)
        if pst.st_mode & stat.S_ISGID:
            return int(uid), pst.st_gid, True
        return int(uid), int(gid), False

    def _xattr_path(self, rel: bytes) -> tuple[bytes, bool]:
        """A path for the xattr calls and whether to follow it (only the root's magic link)."""
        if not rel:
            return self._proc_root, True
        return self._proc_root + b"/" + rel, False

    def _sync_times(self, rel: bytes, fd: int | None = None) -> None:
        """Replicate the local atime/mtime of ``rel`` (a no-op locally).

        Read and queued under the file's inode lock, like ``utimens``: a release (which the
        kernel sends after close() returned) must not queue times read before an explicit
        utimens that the application made meanwhile after that utimens.
        """

        def read() -> os.stat_result:
            return os.fstat(fd) if fd is not None else os.stat(rel, dir_fd=self._root)

        with self._inode_lock(read().st_ino):
            st = read()
            self._replicator.apply(ops.Utimens(rel, st.st_atime_ns, st.st_mtime_ns), _nothing)

    @staticmethod
    def _at(rel: bytes) -> bytes:
        return rel or b"."

    # -- reads (local only) --------------------------------------------------------------

    @fuse_errors
    def stat(self, path: str | None, fh: int | None = None) -> os.stat_result:
        """The attributes of the open handle ``fh`` or, without one, of ``path`` (not
        following a final symlink)."""
        handle = self._handles.get(fh) if fh else None
        if handle is not None:
            return os.fstat(handle.fd)
        return os.stat(self._at(rel_path(path)), dir_fd=self._root, follow_symlinks=False)

    @fuse_errors
    def readdir(self, path: str | None, fh: int) -> list[tuple[str, int, int]]:
        """The directory's entries as (name, inode number, file type bits), "." and ".."
        first."""
        rel = rel_path(path)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        dfd = os.open(self._at(rel), flags, dir_fd=self._root)
        try:
            # "." and ".." with their inode numbers: an entry with d_ino 0 is one that
            # readdir(3) skips, and ls -a would not list them
            here = os.fstat(dfd)
            up = os.stat("..", dir_fd=dfd, follow_symlinks=False)
            entries = [(".", here.st_ino, stat.S_IFDIR), ("..", up.st_ino, stat.S_IFDIR)]
            with os.scandir(dfd) as it:
                for entry in it:
                    if entry.is_symlink():
                        kind = stat.S_IFLNK
                    elif entry.is_dir(follow_symlinks=False):
                        kind = stat.S_IFDIR
                    elif entry.is_file(follow_symlinks=False):
                        kind = stat.S_IFREG
                    else:
                        kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                    entries.append((entry.name, entry.inode(), kind))
        finally:
            os.close(dfd)
        return entries

    @fuse_errors
    def readlink(self, path: str | None) -> str:
        return name_str(os.readlink(rel_path(path), dir_fd=self._root))

    @fuse_errors
    def statfs(self, path: str | None) -> dict[str, int]:
        sv = os.statvfs(self._root)
        return {key: int(getattr(sv, key)) for key in _STATVFS_KEYS}

    @fuse_errors
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return os.pread(self._handle(fh).fd, size, offset)

    @fuse_errors
    def lseek(self, path: str | None, offset: int, whence: int, fh: int) -> int:
        return os.lseek(self._handle(fh).fd, offset, whence)

    @fuse_errors
    def getxattr(self, path: str | None, name: str, position: int = 0) -> bytes:
        target, follow = self._xattr_path(rel_path(path))
        return os.getxattr(target, name.encode(ENCODING, ERRORS), follow_symlinks=follow)

    @fuse_errors
    def listxattr(self, path: str | None) -> list[str]:
        target, follow = self._xattr_path(rel_path(path))
        return os.listxattr(target, follow_symlinks=follow)

    # -- handles -------------------------------------------------------------------------

    @fuse_errors
    def open(self, path: str | None, flags: int) -> int:
        rel = rel_path(path)
        accmode = flags & os.O_ACCMODE
        writable = accmode != os.O_RDONLY or bool(flags & os.O_TRUNC)
        base = os.O_CLOEXEC | os.O_NOFOLLOW  # no O_SYNC/O_DSYNC: see the module docstring
        if not writable:
            fd = os.open(rel, os.O_RDONLY | base, dir_fd=self._root)
            return self._new_handle(fd, flags, writable=False)
        if self._excluded(rel, is_dir=False):
            fd = os.open(rel, os.O_RDWR | base, dir_fd=self._root)
            try:
                if flags & os.O_TRUNC:
                    self._drop_setid(fd, False, path, os.fstat(fd))
                    os.ftruncate(fd, 0)
                return self._new_handle(fd, flags, writable=True, replicated=False)
            except BaseException:
                os.close(fd)
                raise
        fh = self._reserve_fh()

        def local_open() -> int:
            fd = os.open(rel, os.O_RDWR | base, dir_fd=self._root)
            try:
                self._register(fh, fd, flags)
            except BaseException:
                os.close(fd)
                raise
            return fd

        fd = self._replicator.apply(ops.Open(fh, rel), local_open)
        if flags & os.O_TRUNC:
            handle = self._handles[fh]
            with handle.lock:
                self._drop_setid(fd, True, path, os.fstat(fd))
                self._replicator.apply(ops.Truncate(fh, rel, 0), lambda: os.ftruncate(fd, 0))
                handle.wrote = True
        return fh

    def _register(
        self, fh: int, fd: int, flags: int, writable: bool = True, replicated: bool = True
    ) -> None:
        ino = os.fstat(fd).st_ino
        handle = _Handle(
            fd=fd,
            writable=writable,
            append=bool(flags & os.O_APPEND),
            lock=self._inode_lock(ino),
            replicated=replicated,
        )
        with self._table_lock:
            self._handles[fh] = handle

    def _inode_lock(self, ino: int) -> threading.Lock:
        return self._inode_locks[ino % _INODE_LOCKS]

    @fuse_errors
    def create(self, path: str | None, mode: int, flags: int) -> int:
        rel = rel_path(path)
        uid, gid, _setgid = self._creator(rel)
        perm = stat.S_IMODE(mode)
        excl = bool(flags & os.O_EXCL)
        base = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW  # no O_SYNC/O_DSYNC (module docstring)
        fh = self._reserve_fh()
        replicated = not self._excluded(rel, is_dir=False)

        def local_create() -> int:
            fd = os.open(rel, base | os.O_CREAT | os.O_EXCL, perm, dir_fd=self._root)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, perm)
                self._register(fh, fd, flags, replicated=replicated)
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            self._change(replicated, ops.Create(fh, rel, perm, uid, gid, excl), local_create)
        except FileExistsError:
            if excl:
                raise
            # Created by someone else between the kernel's lookup and us: open it instead.
            fh_open = self.open(path, flags & ~(os.O_CREAT | os.O_EXCL))
            return fh_open
        self._handles[fh].wrote = True  # new file: replicate its times on release
        return fh

    @fuse_errors
    def release(self, path: str | None, fh: int) -> int:
        handle = self._handle(fh)

        def local_close() -> None:
            with self._table_lock:
                self._handles.pop(fh, None)
            os.close(handle.fd)

        if not handle.writable or not handle.replicated:
            local_close()
            return 0
        if handle.wrote and path is not None:
            try:
                self._sync_times(rel_path(path), handle.fd)
            except OSError:
                log.warning("could not replicate the times of %r on release", path)
        self._replicator.apply(ops.Release(fh), local_close)
        return 0

    # -- data ----------------------------------------------------------------------------

    def write_fh(self, fh: int, data: bytes, offset: int, writepage: int, name: Name) -> int:
        """The loop's write. ``name()`` is a context manager giving the file's path, true
        while it is open: asked only when a set-ID bit must be cleared by name (most writes
        never need it), and before the file's inode lock, the order every other operation
        takes them in (a rename holds the name lock and may take the inode lock)."""
        handle = self._handles.get(fh)
        if handle is None or not handle.writable:
            raise OSError(errno.EBADF, "unknown file handle, or not open for writing")
        if writepage:  # mmap'ed pages written back clear nothing, as on a local fs
            return self._write_locked(handle, fh, data, offset, setid=False)
        done = self._write_locked(handle, fh, data, offset)
        if done < 0:  # a set-ID bit to clear by name: again, with the name held
            with name() as path:
                done = self._write_locked(handle, fh, data, offset, named=(path,))
        return done

    def _write_locked(
        self,
        handle: _Handle,
        fh: int,
        data: bytes,
        offset: int,
        *,
        setid: bool = True,
        named: tuple[str | None] | None = None,
    ) -> int:
        """The write under the file's inode lock; -1 (nothing written) when a set-ID bit
        must be cleared and no name is held (``named`` None): the caller comes back with
        ``named=(path,)``, path None when the file has no name any more."""
        with handle.lock:
            if setid and (handle.append or handle.setid_free != self._mode_gen):
                gen = self._mode_gen  # before the fstat: a chmod after it bumps it again
                st = os.fstat(handle.fd)
                if not st.st_mode & _SETID:
                    handle.setid_free = gen
                elif setid_cleared(st) is not None:
                    if named is None:
                        return -1
                    self._drop_setid(handle.fd, handle.replicated, named[0], st)
                if handle.append:
                    offset = st.st_size
            fd = handle.fd
            if handle.replicated:
                self._replicator.apply(
                    ops.Write(fh, offset, data), lambda: _pwrite_all(fd, data, offset)
                )
            else:
                _pwrite_all(fd, data, offset)
            handle.wrote = True
        return len(data)

    @fuse_errors
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        handle = self._handles.get(fh) if fh else None
        if handle is not None and handle.writable:
            rel = b"" if path is None else rel_path(path)
            with handle.lock:
                self._drop_setid(handle.fd, handle.replicated, path, os.fstat(handle.fd))
                self._change(
                    handle.replicated,
                    ops.Truncate(fh or -1, rel, length),
                    lambda: os.ftruncate(handle.fd, length),
                )
                handle.wrote = True
            return 0
        rel = rel_path(path)
        perm = setid_cleared(os.stat(rel, dir_fd=self._root, follow_symlinks=False))
        if perm is not None:
            self.chmod(path, perm)

        def local() -> None:
            fd = os.open(rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._root)
            try:
                os.ftruncate(fd, length)
            finally:
                os.close(fd)

        if self._excluded(rel, is_dir=False):
            local()
            return 0
        self._replicator.apply(ops.Truncate(-1, rel, length), local)
        self._sync_times(rel)
        return 0

    @fuse_errors
    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fh: int) -> int:
        handle = self._writable(fh)
        with handle.lock:
            # every mode, as ext4 does
            self._drop_setid(handle.fd, handle.replicated, path, os.fstat(handle.fd))
            self._change(
                handle.replicated,
                ops.Fallocate(fh, mode, offset, length),
                lambda: _raise_errno(_fallocate(handle.fd, mode, offset, length)),
            )
            handle.wrote = True
        return 0

    def fsync_fh(self, fh: int, datasync: int, name: Name) -> None:
        """The loop's fsync. ``name()`` (as for ``write_fh``) is asked only for a handle the
        peer does not know (opened read-only: the peer syncs the file by path)."""
        handle = self._handle(fh)
        sync = os.fdatasync if datasync else os.fsync
        if handle.writable and handle.replicated:
            self._replicator.apply(ops.Fsync(fh, b"", bool(datasync)), lambda: sync(handle.fd))
            return
        if handle.writable:
            sync(handle.fd)  # excluded: local only
            return
        with name() as path:
            if path is None or self._excluded(rel_path(path), is_dir=False):
                sync(handle.fd)  # excluded, or a read-only handle of an unlinked file
                return
            op = ops.Fsync(-1, rel_path(path), bool(datasync))
            self._replicator.apply(op, lambda: sync(handle.fd))

    @fuse_errors
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        rel = rel_path(path)

        def local() -> None:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            dfd = os.open(self._at(rel), flags, dir_fd=self._root)
            try:
                (os.fdatasync if datasync else os.fsync)(dfd)
            finally:
                os.close(dfd)

        self._change(not self._excluded(rel, True), ops.Fsync(-1, rel, bool(datasync)), local)
        return 0

    # -- namespace -----------------------------------------------------------------------

    @fuse_errors
    def mknod(self, path: str | None, mode: int, dev: int) -> int:
        rel = rel_path(path)
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EPERM, "device nodes are not replicated")
        uid, gid, _setgid = self._creator(rel)
        perm = stat.S_IMODE(mode)

        def local() -> None:
            os.mknod(rel, kind | perm, 0, dir_fd=self._root)
            os.chown(rel, uid, gid, dir_fd=self._root, follow_symlinks=False)
            os.chmod(rel, perm, dir_fd=self._root, follow_symlinks=False)

        self._change(not self._excluded(rel, False), ops.Mknod(rel, kind | perm, uid, gid), local)
        return 0

    @fuse_errors
    def mkdir(self, path: str | None, mode: int) -> int:
        rel = rel_path(path)
        uid, gid, setgid = self._creator(rel)
        perm = stat.S_IMODE(mode) | (stat.S_ISGID if setgid else 0)

        def local() -> None:
            os.mkdir(rel, perm, dir_fd=self._root)
            os.chown(rel, uid, gid, dir_fd=self._root, follow_symlinks=False)
            os.chmod(rel, perm, dir_fd=self._root, follow_symlinks=False)

        self._change(not self._excluded(rel, True), ops.Mkdir(rel, perm, uid, gid), local)
        return 0

    @fuse_errors
    def unlink(self, path: str | None) -> int:
        rel = rel_path(path)
        unlink = functools.partial(os.unlink, rel, dir_fd=self._root)
        self._change(not self._excluded(rel, False), ops.Unlink(rel), unlink)
        return 0

    @fuse_errors
    def rmdir(self, path: str | None) -> int:
        rel = rel_path(path)
        rmdir = functools.partial(os.rmdir, rel, dir_fd=self._root)
        self._change(not self._excluded(rel, True), ops.Rmdir(rel), rmdir)
        return 0

    @fuse_errors
    def symlink(self, target: str | None, source: str) -> int:
        """``target`` is the new link's path, ``source`` its content (fusepy's naming)."""
        rel = rel_path(target)
        content = source.encode(ENCODING, ERRORS)
        uid, gid, _setgid = self._creator(rel)

        def local() -> None:
            os.symlink(content, rel, dir_fd=self._root)
            os.chown(rel, uid, gid, dir_fd=self._root, follow_symlinks=False)

        replicated = not self._excluded(rel, False)
        self._change(replicated, ops.Symlink(content, rel, uid, gid), local)
        if replicated:
            # The peer made its link a moment later: give it ours (symlinks have times too).
            st = os.stat(rel, dir_fd=self._root, follow_symlinks=False)
            self._replicator.apply(ops.Utimens(rel, st.st_atime_ns, st.st_mtime_ns), lambda: None)
        return 0

    @fuse_errors
    def rename(self, old: str | None, new: str | None, flags: int = 0) -> int:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        src, dst = rel_path(old), rel_path(new)

        def local() -> None:
            if flags:
                _raise_errno(_renameat2(self._root, src, self._root, dst, flags))
            else:
                os.rename(src, dst, src_dir_fd=self._root, dst_dir_fd=self._root)

        if not self._exclusions:
            self._replicator.apply(ops.Rename(src, dst, flags), local)
            return 0
        st = os.stat(src, dir_fd=self._root, follow_symlinks=False)
        sides = {self._exclusions.excluded(p, stat.S_ISDIR(st.st_mode)) for p in (src, dst)}
        if flags & RENAME_EXCHANGE:
            other = os.stat(dst, dir_fd=self._root, follow_symlinks=False)
            sides |= {self._exclusions.excluded(p, stat.S_ISDIR(other.st_mode)) for p in (src, dst)}
        if sides == {True}:
            local()
        elif sides == {False}:
            if crossing.entries_below_cross(self._exclusions, self._root, src, dst, st, flags):
                raise OSError(errno.EXDEV, "entries below would cross the exclusion boundary")
            self._replicator.apply(ops.Rename(src, dst, flags), local)
        else:
            crossing.check_can_cross(st, flags)
            with self._inode_lock(st.st_ino):
                fh = self._reserve_fh()
                now = crossing.rename_across(
                    self._replicator, self._root, self._exclusions, src, dst, st, flags, local, fh
                )
                self._follow_name(st, replicated=now, rel=dst)
        return 0

    def _follow_name(self, st: os.stat_result, *, replicated: bool, rel: bytes) -> None:
        """Open write handles of the renamed file follow its new name across the boundary:
        bound on the peer (``Open``) when it becomes replicated, released there when not.
        The caller holds the file's inode lock, so no write through them is in flight."""
        with self._table_lock:
            handles = [(fh, h) for fh, h in self._handles.items() if h.writable]
        for fh, handle in handles:
            if handle.replicated == replicated:
                continue
            hst = os.fstat(handle.fd)
            if (hst.st_ino, hst.st_dev) != (st.st_ino, st.st_dev):
                continue
            if replicated:
                self._replicator.apply(ops.Open(fh, rel), _nothing)
            else:
                self._replicator.apply(ops.Release(fh), _nothing)
            handle.replicated = replicated

    @fuse_errors
    def link(self, target: str | None, source: str | None) -> int:
        """``target`` is the new name, ``source`` the existing file (fusepy's naming)."""
        new, existing = rel_path(target), rel_path(source)
        replicated = not self._excluded(new, False)
        if replicated == self._excluded(existing, False):
            raise OSError(errno.EXDEV, "hard links do not cross the exclusion boundary")

        def local() -> None:
            os.link(
                existing,
                new,
                src_dir_fd=self._root,
                dst_dir_fd=self._root,
                follow_symlinks=False,
            )

        self._change(replicated, ops.Link(existing, new), local)
        return 0

    # -- attributes ----------------------------------------------------------------------

    def _drop_setid(self, fd: int, replicated: bool, path: str | None, st: os.stat_result) -> None:
        """Clear what a write, truncate or allocation by this request's caller clears of the
        set-ID bits of ``fd``'s file (``setid_cleared``), before the change itself: a chmod,
        replicated when ``replicated``, as a chmod is.

        The kernel leaves that to the mount: it asked for FUSE_HANDLE_KILLPRIV_V2
        (fuseloop.py), so the kernel does not look up security.capability before each
        write. The capability attribute itself goes away by the real file's own kernel, on
        each copy, when root writes, truncates or allocates there.
        """
        perm = setid_cleared(st)
        if perm is None:
            return
        if path is None:  # no name any more: nothing on the peer to change
            os.fchmod(fd, perm)
            return
        self._change(replicated, ops.Chmod(rel_path(path), perm), lambda: os.fchmod(fd, perm))

    def _nameless(self, path: str | None, fh: int | None) -> _Handle | None:
        """The handle to change locally only when the file has no name any more."""
        if path is None and fh:
            return self._handle(fh)
        return None

    @fuse_errors
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        perm = stat.S_IMODE(mode)
        try:
            handle = self._nameless(path, fh)
            if handle is not None:
                os.fchmod(handle.fd, perm)
                return 0
            rel = rel_path(path)
            self._change(
                not self._excluded(rel),
                ops.Chmod(rel, perm),
                lambda: os.chmod(self._at(rel), perm, dir_fd=self._root, follow_symlinks=False),
            )
            return 0
        finally:
            self._mode_gen = next(self._modes)  # set-ID bits may have come: writes look again

    @fuse_errors
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        handle = self._nameless(path, fh)
        if handle is not None:
            os.fchown(handle.fd, uid, gid)
            return 0
        rel = rel_path(path)
        self._change(
            not self._excluded(rel),
            ops.Chown(rel, uid, gid),
            lambda: os.chown(self._at(rel), uid, gid, dir_fd=self._root, follow_symlinks=False),
        )
        return 0

    @fuse_errors
    def utimens(
        self, path: str | None, times: tuple[int, int] | None = None, fh: int | None = None
    ) -> int:
        atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
        handle = self._nameless(path, fh)
        if handle is not None:
            now = time.time_ns()
            st = os.fstat(handle.fd)
            os.utime(handle.fd, ns=resolve_times(atime, mtime, now, st))
            return 0
        rel = rel_path(path)
        at = self._at(rel)
        st = os.stat(at, dir_fd=self._root, follow_symlinks=False)
        with self._inode_lock(st.st_ino):  # ordered with a release's time sync (_sync_times)
            st = os.stat(at, dir_fd=self._root, follow_symlinks=False)  # UTIME_OMIT keeps this
            a_ns, m_ns = resolve_times(atime, mtime, time.time_ns(), st)
            self._change(
                not self._exclusions.excluded(rel, stat.S_ISDIR(st.st_mode)),
                ops.Utimens(rel, a_ns, m_ns),
                lambda: os.utime(at, ns=(a_ns, m_ns), dir_fd=self._root, follow_symlinks=False),
            )
        return 0

    @fuse_errors
    def setxattr(
        self, path: str | None, name: str, value: bytes, options: int, position: int = 0
    ) -> int:
        rel = rel_path(path)
        raw = xattr_name(name)
        target, follow = self._xattr_path(rel)
        self._change(
            not self._excluded(rel),
            ops.SetXattr(rel, raw, value, options),
            lambda: os.setxattr(target, raw, value, options, follow_symlinks=follow),
        )
        return 0

    @fuse_errors
    def removexattr(self, path: str | None, name: str) -> int:
        rel = rel_path(path)
        raw = xattr_name(name)
        target, follow = self._xattr_path(rel)
        self._change(
            not self._excluded(rel),
            ops.RemoveXattr(rel, raw),
            lambda: os.removexattr(target, raw, follow_symlinks=follow),
        )
        return 0

    # -- lifecycle -----------------------------------------------------------------------

    def close_all(self) -> None:
        """Close the local fds of handles the kernel never released (after an abort)."""
        with self._table_lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            try:
                os.close(handle.fd)
            except OSError:
                pass


def _nothing() -> None:
    """The local step of an op whose local change is already made."""
