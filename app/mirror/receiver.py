"""The receiver: applies replicated operations to the real directory on the secondary.

``Receiver(root)`` opens the replicated directory once (``O_RDONLY|O_DIRECTORY``) and does
everything relative to that descriptor, so nothing depends on the process's view of paths.

Resolution. Every path is checked (``protocol.path_problem``: relative, no NUL, no empty,
"." or ".." component), then its parent directory is opened beneath the root with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` when the kernel has it (Linux >= 5.6),
otherwise component by component with ``O_PATH|O_NOFOLLOW|O_DIRECTORY``. A symlink anywhere
on the way raises ``PathEscape`` before any change, whatever it points to. The final name
is handled with ``*at()`` calls relative to the parent that never follow a final symlink:
``O_NOFOLLOW`` opens, ``unlinkat``/``renameat2``/``linkat`` without AT_SYMLINK_FOLLOW,
``fchownat``/``utimensat`` with AT_SYMLINK_NOFOLLOW, l*xattr through
``/proc/self/fd/<parent>/<name>``; chmod of a symlink is a no-op (Linux has no lchmod),
other chmods go through an ``O_PATH`` descriptor of the very inode. Symlink targets are
stored as given and never followed.

Handles. ``Open``/``Create`` bind the primary's ``fh`` to a descriptor of a regular file
(``O_WRONLY|O_NOFOLLOW|O_CLOEXEC|O_NONBLOCK``, so a FIFO never blocks us); ``Write``,
``Truncate``, ``Fallocate`` and ``Fsync`` by handle use it; ``Release`` closes it.
``release_all()`` drops every handle (a new connection); ``close()`` also closes the root.

Early writeback. A file the primary fsyncs by handle (a database's log) will be fsync'd
again soon: what a ``Write`` puts in it afterwards is remembered, and ``kick_writeback()``
(called by the link's reader once the acks of a burst are out, so no ack waits for it)
starts writing that range to disk (sync_file_range WRITE). The next Fsync then finds the
data on its way and only waits for it and the disk's cache flush: measured on the lab's
disk, 4 KiB fdatasync 49 to 50 us instead of 99 to 104 when the writeback started 150 us
earlier. Files never fsync'd are left to the kernel's writeback.

Modes and owners. Created objects get exactly ``mode & 0o7777`` (our umask is not applied)
and the owner sent, -1 meaning "leave it". Mknod makes regular files, FIFOs and sockets only.

Errors (errors.py): every failure is an ``ApplyError(errno)`` (what the primary hears in a
Nack); ``PathEscape`` (errno ELOOP) for a path that would leave the root. Anything else
escaping ``apply`` is a bug.

Limits: single-threaded (one apply at a time); assumes nothing else changes the tree
meanwhile (the secondary runs no application); chmod and xattrs need /proc mounted;
a Create or Mknod whose chown fails leaves the object created with our owner; mount points
inside the root are crossed like directories.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

from app.mirror import ops
from app.mirror.errors import ApplyError, PathEscape
from app.mirror.fusefs_sys import start_writeback
from app.mirror.ops import Op
from app.mirror.protocol import MAX_MESSAGE, Ack, Nack, Request, path_problem

RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
XATTR_CREATE: Final = 1
XATTR_REPLACE: Final = 2

_SYS_OPENAT2: Final = 437  # same number on every architecture (added in Linux 5.6)
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_NO_SYMLINKS: Final = 0x04
_RESOLVE_BENEATH: Final = 0x08
_AT_FDCWD: Final = -100

_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_WRITE_FLAGS: Final = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _openat2_beneath(dirfd: int, path: bytes) -> int:
    how = _OpenHow(_DIR_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    return _check(
        _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )


class Receiver:
    """Applies ops under ``root``; see the module docstring."""

    def __init__(
        self,
        root: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        openat2: bool = True,
        writeback: Callable[[int, int, int], None] = start_writeback,
    ) -> None:
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._handles: dict[int, int] = {}
        self._openat2 = openat2
        # early writeback (see the module docstring): handles that were fsync'd, and the
        # range each of their descriptors was written in since the last kick_writeback()
        self._writeback = writeback
        self._synced: set[int] = set()
        self._written: dict[int, tuple[int, int]] = {}  # fd -> (start, end)

    # -- lifecycle ------------------------------------------------------------------

    @property
    def handles(self) -> frozenset[int]:
        """The primary's handle numbers currently bound."""
        return frozenset(self._handles)

    def fd_of(self, fh: int) -> int | None:
        """The descriptor bound to the primary's handle ``fh`` (None: not bound)."""
        return self._handles.get(fh)

    def kick_writeback(self) -> None:
        """Start the writeback of what was written, since the last call, to files the
        primary fsyncs (the reader calls it once the acks of a burst are out)."""
        written, self._written = self._written, {}
        for fd, (start, end) in written.items():
            self._writeback(fd, start, end - start)

    def _wrote(self, fd: int, start: int, end: int) -> None:
        """Remember that [start, end) of a file the primary fsyncs was written (see
        ``kick_writeback``)."""
        old = self._written.get(fd, (start, end))
        self._written[fd] = (min(old[0], start), max(old[1], end))

    def release_all(self) -> None:
        """Close every bound handle (the connection that opened them is gone)."""
        self._synced.clear()
        self._written.clear()
        handles, self._handles = self._handles, {}
        for fd in handles.values():
            os.close(fd)

    def close(self) -> None:
        self.release_all()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server-side helper -----------------------------------------------------

    def handle_request(self, event: Request) -> Ack | Nack:
        """Apply the request's op and return the reply to send back."""
        try:
            self.apply(event.op)
        except ApplyError as exc:
            message = str(exc).encode()[:MAX_MESSAGE].decode("utf-8", "ignore")
            return Nack(event.id, exc.errno, message)
        return Ack(event.id)

    # -- applying -------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        """Apply ``op``; ApplyError (PathEscape) when it fails or would leave the root."""
        if self._root < 0:
            raise ApplyError(errno.EBADF, "receiver is closed")
        write = isinstance(op, ops.Write)
        if write or (isinstance(op, ops.Fsync) and op.fh != -1 and op.path == b""):
            # the hot path: by handle, no path to check; the same steps as in _apply
            try:
                if isinstance(op, ops.Write):
                    self._write(op)
                elif isinstance(op, ops.Fsync):
                    self._fsync_fh(op)
            except OSError as exc:
                code = exc.errno or errno.EIO
                raise ApplyError(code, f"{_describe(op)}: {exc.strerror or exc}") from exc
            return
        for name in ("path", "old", "new") + (() if isinstance(op, ops.Symlink) else ("target",)):
            value = getattr(op, name, None)
            if value is not None and (problem := path_problem(value)) is not None:
                raise PathEscape(f"{type(op).__name__}.{name} {value!r}: {problem}")
        try:
            self._apply(op)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise ApplyError(code, f"{_describe(op)}: {exc.strerror or exc}") from exc
        except (ValueError, OverflowError) as exc:
            raise ApplyError(errno.EINVAL, f"{_describe(op)}: {exc}") from exc

    def _apply(self, op: Op) -> None:
        match op:
            case ops.Open(fh=fh, path=path):
                self._bind_check(fh)
                with self._parent(path) as (parent, name):
                    self._handles[fh] = self._open_regular(parent, name, _WRITE_FLAGS)
            case ops.Create():
                self._create(op)
            case ops.Release(fh=fh):
                fd = self._fd(fh)
                self._written.pop(fd, None)
                self._synced.discard(fh)
                os.close(fd)
                del self._handles[fh]
            case ops.WriteV(fh=fh, parts=parts):
                fd = self._fd(fh)
                for offset, data in parts:
                    view = memoryview(data)
                    while view:
                        written = os.pwrite(fd, view, offset)
                        view, offset = view[written:], offset + written
            case ops.Write():
                self._write(op)
            case ops.Truncate(fh=fh, path=path, length=length):
                if fh != -1:
                    os.ftruncate(self._fd(fh), length)
                else:
                    with self._parent(path) as (parent, name):
                        fd = self._open_regular(parent, name, _WRITE_FLAGS)
                        try:
                            os.ftruncate(fd, length)
                        finally:
                            os.close(fd)
            case ops.Fallocate(fh=fh, mode=mode, offset=offset, length=length):
                fd = self._fd(fh)
                if _fallocate is None:
                    raise ApplyError(errno.ENOSYS, "fallocate is not in this libc")
                _check(_fallocate(fd, mode, offset, length))
            case ops.Fsync(fh=fh, path=path, datasync=datasync):
                sync = os.fdatasync if datasync else os.fsync
                if fh != -1:
                    self._fsync_fh(op)
                elif path == b"":
                    sync(self._root)
                else:
                    with self._parent(path) as (parent, name):
                        fd = self._open_final(parent, name, _READ_FLAGS)
                        try:
                            sync(fd)
                        finally:
                            os.close(fd)
            case ops.Mknod(path=path, mode=mode, uid=uid, gid=gid):
                kind = stat.S_IFMT(mode) or stat.S_IFREG
                if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
                    raise ApplyError(
                        errno.EPERM, f"mknod {path!r}: device nodes are not replicated"
                    )
                with self._parent(path) as (parent, name):
                    os.mknod(name, kind | 0o600, dir_fd=parent)
                    self._set_owner_mode(parent, name, mode, uid, gid)
            case ops.Mkdir(path=path, mode=mode, uid=uid, gid=gid):
                with self._parent(path) as (parent, name):
                    os.mkdir(name, 0o700, dir_fd=parent)
                    self._set_owner_mode(parent, name, mode, uid, gid)
            case ops.Unlink(path=path):
                with self._parent(path) as (parent, name):
                    os.unlink(name, dir_fd=parent)
            case ops.Rmdir(path=path):
                with self._parent(path) as (parent, name):
                    os.rmdir(name, dir_fd=parent)
            case ops.Rename(old=old, new=new, flags=flags):
                self._rename(old, new, flags)
            case ops.Link(target=target, new=new):
                with (
                    self._parent(target) as (tparent, tname),
                    self._parent(new) as (nparent, nname),
                ):
                    os.link(
                        tname, nname, src_dir_fd=tparent, dst_dir_fd=nparent, follow_symlinks=False
                    )
            case ops.Symlink(target=target, path=path, uid=uid, gid=gid):
                with self._parent(path) as (parent, name):
                    os.symlink(target, name, dir_fd=parent)
                    if uid != -1 or gid != -1:
                        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
            case ops.Chmod(path=path, mode=mode):
                if path == b"":
                    os.chmod(self._root, stat.S_IMODE(mode))
                else:
                    with self._parent(path) as (parent, name):
                        _chmod_nofollow(parent, name, mode)
            case ops.Chown(path=path, uid=uid, gid=gid):
                if path == b"":
                    os.chown(self._root, uid, gid)
                else:
                    with self._parent(path) as (parent, name):
                        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
            case ops.Utimens(path=path, atime_ns=atime, mtime_ns=mtime):
                if path == b"":
                    os.utime(self._root, ns=(atime, mtime))
                else:
                    with self._parent(path) as (parent, name):
                        os.utime(name, ns=(atime, mtime), dir_fd=parent, follow_symlinks=False)
            case ops.SetXattr(path=path, name=xname, value=value, flags=flags):
                if flags & ~(XATTR_CREATE | XATTR_REPLACE):
                    raise ApplyError(errno.EINVAL, f"setxattr flags {flags:#x}")
                with self._xattr_target(path) as xtarget:
                    os.setxattr(
                        xtarget, xname, value, flags, follow_symlinks=isinstance(xtarget, int)
                    )
            case ops.RemoveXattr(path=path, name=xname):
                with self._xattr_target(path) as xtarget:
                    os.removexattr(xtarget, xname, follow_symlinks=isinstance(xtarget, int))
            case _:
                raise ApplyError(errno.ENOSYS, f"unknown op {type(op).__name__}")

    # -- op helpers -----------------------------------------------------------------

    def _write(self, op: ops.Write) -> None:
        fh, offset = op.fh, op.offset
        fd = self._fd(fh)
        written = os.pwrite(fd, op.data, offset)
        if written < len(op.data):  # a short write: go on with the rest
            view = memoryview(op.data)[written:]
            end = offset + written
            while view:
                written = os.pwrite(fd, view, end)
                view, end = view[written:], end + written
        if fh in self._synced:
            self._wrote(fd, offset, offset + len(op.data))

    def _fsync_fh(self, op: ops.Fsync) -> None:
        fd = self._fd(op.fh)
        self._written.pop(fd, None)  # this flush writes it
        (os.fdatasync if op.datasync else os.fsync)(fd)
        self._synced.add(op.fh)

    def _create(self, op: ops.Create) -> None:
        self._bind_check(op.fh)
        with self._parent(op.path) as (parent, name):
            try:
                fd = os.open(name, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=parent)
            except FileExistsError:
                if op.excl:
                    raise
                self._handles[op.fh] = self._open_regular(parent, name, _WRITE_FLAGS)
                return
            try:
                if op.uid != -1 or op.gid != -1:
                    os.fchown(fd, op.uid, op.gid)
                os.fchmod(fd, stat.S_IMODE(op.mode))  # after chown, which clears setuid
            except BaseException:
                os.close(fd)
                raise
            self._handles[op.fh] = fd

    def _rename(self, old: bytes, new: bytes, flags: int) -> None:
        if old == b"" or new == b"":
            raise ApplyError(errno.EBUSY, "the replicated root cannot be renamed")
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise ApplyError(errno.EINVAL, f"rename flags {flags:#x} are not replicated")
        with self._parent(old) as (oparent, oname), self._parent(new) as (nparent, nname):
            if flags == 0:
                os.rename(oname, nname, src_dir_fd=oparent, dst_dir_fd=nparent)
            elif _renameat2 is None:
                raise ApplyError(errno.ENOSYS, "renameat2 is not in this libc")
            else:
                _check(_renameat2(oparent, oname, nparent, nname, flags))

    def _set_owner_mode(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> None:
        if uid != -1 or gid != -1:
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        _chmod_nofollow(parent, name, mode)  # after chown, which may clear setuid bits

    def _bind_check(self, fh: int) -> None:
        if fh < 0 or fh in self._handles:
            raise ApplyError(errno.EBADF, f"handle {fh} is already bound or invalid")

    def _fd(self, fh: int) -> int:
        fd = self._handles.get(fh)
        if fd is None:
            raise ApplyError(errno.EBADF, f"handle {fh} is not open")
        return fd

    def _open_final(self, parent: int, name: bytes, flags: int) -> int:
        try:
            return os.open(name, flags, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathEscape(f"{name!r} is a symlink; it is never followed") from exc
            raise

    def _open_regular(self, parent: int, name: bytes, flags: int) -> int:
        fd = self._open_final(parent, name, flags)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ApplyError(errno.EINVAL, f"{name!r} is not a regular file")
        return fd

    # -- path resolution ------------------------------------------------------------

    @contextmanager
    def _parent(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """The parent directory's descriptor (beneath the root) and the final name."""
        if path == b"":
            raise ApplyError(errno.EBUSY, "not allowed on the replicated root itself")
        head, _, name = path.rpartition(b"/")
        fd = self._open_dir(head) if head else self._root
        try:
            yield fd, name
        finally:
            if fd != self._root:
                os.close(fd)

    @contextmanager
    def _xattr_target(self, path: bytes) -> Iterator[int | bytes]:
        """The root's descriptor, or /proc/self/fd/<parent>/<name> for l*xattr (int: an fd,
        for which Python wants follow_symlinks=True; a path is never followed at its end)."""
        if path == b"":
            yield self._root
            return
        with self._parent(path) as (parent, name):
            yield b"/proc/self/fd/%d/%s" % (parent, name)

    def _open_dir(self, path: bytes) -> int:
        if self._openat2:
            try:
                return _openat2_beneath(self._root, path)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EXDEV):
                    raise PathEscape(f"{path!r} goes through a symlink") from exc
                if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
                    raise
                self._openat2 = False  # old kernel or seccomp: walk instead
        return self._walk(path)

    def _walk(self, path: bytes) -> int:
        fd = self._root
        try:
            for part in path.split(b"/"):
                try:
                    nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                    ):
                        raise PathEscape(f"{path!r} goes through a symlink") from exc
                    raise
                if fd != self._root:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self._root:
                os.close(fd)
            raise
        return fd


def _chmod_nofollow(parent: int, name: bytes, mode: int) -> None:
    """chmod ``name`` unless it is a symlink (no-op), without following anything."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))
    finally:
        os.close(fd)


def _describe(op: Op) -> str:
    where = getattr(op, "path", getattr(op, "old", None))
    return f"{type(op).__name__} {where!r}" if where is not None else type(op).__name__
