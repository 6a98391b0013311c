"""The FUSE session: /dev/fuse requests served by ``MirrorFS`` in threads of this process.

How it works
    ``serve(fs, mountpoint)`` opens /dev/fuse, mounts it over ``mountpoint`` with mount(2)
    (fstype ``fuse.mirrorha``, ``default_permissions,allow_other``: the kernel checks modes and
    owners, any user may use the mount) and serves until the kernel ends the connection (the
    mount is gone, or the connection was aborted): every worker's ``read`` then fails with
    ENODEV.

    Each worker thread reads one request (the whole of it, up to MAX_WRITE of data), handles
    it and writes the answer itself: the thread that the kernel woke for a request is the one
    that serves it, with no hand-off. A worker that takes a request when no other is waiting
    in ``read`` starts one more (at most MAX_WORKERS), so a slow request (an fsync waiting for
    the peer) never holds up the next: the pool grows to the concurrency the applications
    use. Handlers turn the request into ``MirrorFS`` calls (fusefs.py) with the path the
    node table gives (fusenodes.py: the kernel names objects by node id, MirrorFS by path),
    as libfuse's high-level API did, and an ``OSError`` into the answer's ``-errno``.

    INIT asks for fusekernel.WANTED (FUSE_HANDLE_KILLPRIV_V2 among them: the kernel then
    leaves the clearing of set-ID bits to MirrorFS and stops asking for security.capability
    before every write), 1 MiB writes and the kernel cache timeouts of ``fs.timeouts``. A
    lookup of a name that does not exist answers a negative entry for ``negative`` seconds.
    Directory listings are read whole at offset 0 (MirrorFS.readdir) and served from the
    handle by index, as libfuse did; "." and ".." carry their inode numbers (ls -a lists them).

    Paths and renames: a handler that acts on paths runs under ``Nodes.reading()``, one that
    moves or drops a name (rename, unlink, rmdir) under ``Nodes.changing()``, so an operation
    never acts on, or tells the peer about, a name that a concurrent rename already moved (a
    close's RELEASE, which sends the file's times by name, comes after the close returned,
    often after the next rename). The hot WRITE and FSYNC take the lock only in the rare
    case they need the file's name (``_name_of``).

Exceptions
    ``serve`` raises ``MountError``-worthy ``RuntimeError`` (mount.py wraps it) when /dev/fuse
    cannot be opened or mount(2) fails, with the reason. Inside, nothing escapes a worker: a
    handler's ``OSError`` is the answer's errno, a malformed request is answered EINVAL, and
    anything else is logged with its traceback and answered EIO.

Known limits
    - Root only (mount(2) needs CAP_SYS_ADMIN; no fusermount3 helper).
    - No POSIX or flock locks handled here: the kernel keeps them locally (FUSE_POSIX_LOCKS
      is not asked for), which is right for one mount of one host.
    - INTERRUPT is ignored: a request runs to its end (each has its own bound: the peer's
      answer timeout).
    - Protocol 7.28 or newer (Linux 4.20); an older kernel's INIT is refused (EPROTO).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from app.mirror import fusekernel as fk
from app.mirror.fusebinding import ENCODING, ERRORS, MAX_WRITE, UTIME_NOW, UTIME_OMIT, set_request
from app.mirror.fusenodes import Nodes

if TYPE_CHECKING:
    from app.mirror.fusefs import MirrorFS

log = logging.getLogger("app.mirror.fusefs")

FSTYPE: Final = b"fuse.mirrorha"
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MAX_WORKERS: Final = 64
RENAME_EXCHANGE: Final = 2
_FREE, _READING, _CHANGING = 0, 1, 2  # how a handler takes the namespace lock
_BUFFER: Final = MAX_WRITE + 8192  # the largest request: a write of MAX_WRITE and its header

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_mount.restype = ctypes.c_int

Handler = Callable[[int, memoryview], bytes | None]


def _text(path: bytes | None) -> str | None:
    """The path as MirrorFS takes it: "/" + the kernel's bytes, decoded reversibly."""
    if path is None:
        return None
    return "/" + path.decode(ENCODING, ERRORS)


def _name(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


class FuseLoop:
    """One mount's session: the node table, the directory handles, the worker threads."""

    def __init__(self, fs: MirrorFS, fd: int) -> None:
        self.fs = fs
        self.fd = fd
        self.nodes = Nodes()
        self._entry = fs.timeouts.entry
        self._attr = fs.timeouts.attr
        self._negative = fs.timeouts.negative
        self._dirs: dict[int, list[tuple[bytes, int, int]] | None] = {}
        self._next_dir = 1
        self._lock = threading.Lock()  # the worker counts and the directory handles
        self._idle = 0
        self._workers = 0
        self._done = threading.Event()
        # each opcode's handler; READING ones act on paths and run under nodes.reading(),
        # CHANGING ones move or drop names and run under nodes.changing()
        self._handlers: dict[int, tuple[Handler, int]] = {
            fk.INIT: (self._init, _FREE),
            fk.DESTROY: (lambda nodeid, args: b"", _FREE),
            fk.LOOKUP: (self._lookup, _READING),
            fk.FORGET: (self._forget, _FREE),
            fk.BATCH_FORGET: (self._batch_forget, _FREE),
            fk.GETATTR: (self._getattr, _FREE),  # takes the lock itself without a handle
            fk.SETATTR: (self._setattr, _READING),
            fk.READLINK: (self._readlink, _READING),
            fk.SYMLINK: (self._symlink, _READING),
            fk.MKNOD: (self._mknod, _READING),
            fk.MKDIR: (self._mkdir, _READING),
            fk.UNLINK: (self._unlink, _CHANGING),
            fk.RMDIR: (self._rmdir, _CHANGING),
            fk.RENAME: (self._rename, _CHANGING),
            fk.RENAME2: (self._rename2, _CHANGING),
            fk.LINK: (self._link, _READING),
            fk.OPEN: (self._open, _READING),
            fk.CREATE: (self._create, _READING),
            fk.READ: (self._read, _FREE),
            fk.WRITE: (self._write, _FREE),  # the rare path it needs comes with _name_of
            fk.FLUSH: (self._flush, _FREE),
            fk.RELEASE: (self._release, _READING),
            fk.FSYNC: (self._fsync, _FREE),  # likewise
            fk.STATFS: (self._statfs, _FREE),
            fk.SETXATTR: (self._setxattr, _READING),
            fk.GETXATTR: (self._getxattr, _READING),
            fk.LISTXATTR: (self._listxattr, _READING),
            fk.REMOVEXATTR: (self._removexattr, _READING),
            fk.OPENDIR: (self._opendir, _READING),
            fk.READDIR: (self._readdir, _READING),
            fk.RELEASEDIR: (self._releasedir, _FREE),
            fk.FSYNCDIR: (self._fsyncdir, _READING),
            fk.FALLOCATE: (self._fallocate, _READING),
            fk.LSEEK: (self._lseek, _FREE),
            fk.INTERRUPT: (lambda nodeid, args: None, _FREE),
        }

    # -- threads ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the kernel ends the connection (every worker saw ENODEV)."""
        self._spawn()
        self._done.wait()

    def _spawn(self) -> None:
        with self._lock:
            if self._workers >= MAX_WORKERS:
                return
            self._workers += 1
            n = self._workers
        threading.Thread(target=self._work, name=f"fuse-{n}", daemon=True).start()

    def _work(self) -> None:
        buf = bytearray(_BUFFER)
        view = memoryview(buf)
        try:
            while True:  # until the connection ends (ENODEV)
                with self._lock:
                    self._idle += 1
                try:
                    n = os.readv(self.fd, [buf])
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                        continue  # a request withdrawn before we read it; a signal
                    if exc.errno != errno.ENODEV:
                        log.error("reading /dev/fuse failed, the mount stops: %s", exc)
                    return
                finally:
                    with self._lock:
                        self._idle -= 1
                        grow = self._idle == 0
                if grow:
                    self._spawn()  # nobody is left waiting for the next request
                self._serve_one(view, n)
        finally:
            with self._lock:
                self._workers -= 1
                last = self._workers == 0
            if last:
                self._done.set()

    def _serve_one(self, view: memoryview, n: int) -> None:
        if n < fk.IN_HEADER.size:
            log.error("a request of %d bytes from the kernel: shorter than its header", n)
            return
        length, opcode, unique, nodeid, uid, gid, pid, _, _ = fk.IN_HEADER.unpack_from(view)
        set_request(uid, gid, pid)
        entry = self._handlers.get(opcode)
        try:
            if length != n:
                raise fk.FuseProtocolError(f"request says {length} bytes, the read gave {n}")
            if entry is None:
                raise OSError(errno.ENOSYS, f"FUSE opcode {opcode} is not implemented")
            handler, kind = entry
            args = view[fk.IN_HEADER.size : n]
            if kind == _FREE:
                body = handler(nodeid, args)
            elif kind == _READING:
                with self.nodes.reading():
                    body = handler(nodeid, args)
            else:
                with self.nodes.changing():
                    body = handler(nodeid, args)
            if body is None:
                return  # FORGET, BATCH_FORGET, INTERRUPT: the kernel waits for no answer
            out = fk.reply(unique, body)
        except OSError as exc:
            code = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
            out = fk.reply_error(unique, code)
        except (fk.FuseProtocolError, struct.error) as exc:
            log.error("malformed request (opcode %d): %s", opcode, exc)
            out = fk.reply_error(unique, errno.EINVAL)
        except ValueError:  # an embedded NUL, or an argument the os module refuses
            out = fk.reply_error(unique, errno.EINVAL)
        except Exception:
            log.exception("FUSE opcode %d failed, answering EIO", opcode)
            out = fk.reply_error(unique, errno.EIO)
        try:
            os.write(self.fd, out)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                log.warning("answering FUSE opcode %d failed: %s", opcode, exc)

    # -- paths ------------------------------------------------------------------------------

    def _path(self, nodeid: int) -> str | None:
        return _text(self.nodes.path(nodeid))

    def _named(self, nodeid: int) -> str:
        """The node's path for an operation that needs one: ESTALE when it has none."""
        path = self.nodes.path(nodeid)
        if path is None:
            raise OSError(errno.ESTALE, "the file has no name any more")
        return "/" + path.decode(ENCODING, ERRORS)

    @contextlib.contextmanager
    def _name_of(self, nodeid: int) -> Iterator[str | None]:
        """The node's path, true until the block ends (a write that must clear a set-ID bit
        by name, an fsync of a read-only handle: the rare cases of the hot operations)."""
        with self.nodes.reading():
            yield self._path(nodeid)

    def _child(self, parent: int, name: bytes) -> str:
        path = self.nodes.child(parent, name)
        if path is None:
            raise OSError(errno.ESTALE, "the directory has no name any more")
        return "/" + path.decode(ENCODING, ERRORS)

    def _entry_of(self, parent: int, name: bytes, st: os.stat_result) -> bytes:
        nodeid = self.nodes.lookup(parent, name)
        return fk.entry_out(nodeid, st, self._entry, self._attr)

    # -- session ----------------------------------------------------------------------------

    def _init(self, nodeid: int, args: memoryview) -> bytes:
        major, minor, readahead, flags = fk.INIT_IN.unpack_from(args)
        if major != fk.KERNEL_MAJOR or minor < fk.MIN_MINOR:
            log.error("kernel FUSE protocol %d.%d: 7.%d or newer needed", major, minor,
                      fk.MIN_MINOR)  # fmt: skip
            raise OSError(errno.EPROTO, "FUSE protocol too old")
        granted = flags & fk.WANTED
        return fk.init_out(min(minor, fk.OUR_MINOR), readahead, granted, MAX_WRITE)

    # -- names (under nodes.reading, or nodes.changing for what moves a name) ---------------

    def _lookup(self, nodeid: int, args: memoryview) -> bytes:
        (name,) = fk.names(args, 0, 1)
        try:
            st = self.fs.stat(self._child(nodeid, name))
        except FileNotFoundError:
            if self._negative <= 0:
                raise
            return fk.entry_out(0, None, self._negative, 0.0)
        return self._entry_of(nodeid, name, st)

    def _forget(self, nodeid: int, args: memoryview) -> None:
        (count,) = fk.FORGET_IN.unpack_from(args)
        self.nodes.forget(nodeid, count)

    def _batch_forget(self, nodeid: int, args: memoryview) -> None:
        count, _ = fk.BATCH_FORGET_IN.unpack_from(args)
        size = fk.FORGET_ONE.size
        start = fk.BATCH_FORGET_IN.size
        if len(args) < start + count * size:
            raise fk.FuseProtocolError(f"BATCH_FORGET of {count} nodes is cut short")
        for i in range(count):
            node, n = fk.FORGET_ONE.unpack_from(args, start + i * size)
            self.nodes.forget(node, n)

    def _made(self, nodeid: int, name: bytes, make: Callable[[str], object]) -> bytes:
        """Run ``make(path)`` for a new entry ``name`` in directory ``nodeid``; its entry."""
        path = self._child(nodeid, name)
        make(path)
        return self._entry_of(nodeid, name, self.fs.stat(path))

    def _mknod(self, nodeid: int, args: memoryview) -> bytes:
        mode, rdev, _umask, _ = fk.MKNOD_IN.unpack_from(args)
        (name,) = fk.names(args, fk.MKNOD_IN.size, 1)
        return self._made(nodeid, name, lambda path: self.fs.mknod(path, mode, rdev))

    def _mkdir(self, nodeid: int, args: memoryview) -> bytes:
        mode, _umask = fk.MKDIR_IN.unpack_from(args)
        (name,) = fk.names(args, fk.MKDIR_IN.size, 1)
        return self._made(nodeid, name, lambda path: self.fs.mkdir(path, mode))

    def _symlink(self, nodeid: int, args: memoryview) -> bytes:
        name, target = fk.names(args, 0, 2)
        return self._made(nodeid, name, lambda path: self.fs.symlink(path, _name(target)))

    def _link(self, nodeid: int, args: memoryview) -> bytes:
        (old,) = fk.LINK_IN.unpack_from(args)
        (name,) = fk.names(args, fk.LINK_IN.size, 1)
        return self._made(nodeid, name, lambda path: self.fs.link(path, self._named(old)))

    def _unlink(self, nodeid: int, args: memoryview) -> bytes:
        (name,) = fk.names(args, 0, 1)
        self.fs.unlink(self._child(nodeid, name))
        self.nodes.remove(nodeid, name)
        return b""

    def _rmdir(self, nodeid: int, args: memoryview) -> bytes:
        (name,) = fk.names(args, 0, 1)
        self.fs.rmdir(self._child(nodeid, name))
        self.nodes.remove(nodeid, name)
        return b""

    def _rename(self, nodeid: int, args: memoryview) -> bytes:
        (newdir,) = fk.RENAME_IN.unpack_from(args)
        old, new = fk.names(args, fk.RENAME_IN.size, 2)
        return self._renamed(nodeid, old, newdir, new, 0)

    def _rename2(self, nodeid: int, args: memoryview) -> bytes:
        newdir, flags, _ = fk.RENAME2_IN.unpack_from(args)
        old, new = fk.names(args, fk.RENAME2_IN.size, 2)
        return self._renamed(nodeid, old, newdir, new, flags)

    def _renamed(self, olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> bytes:
        self.fs.rename(self._child(olddir, old), self._child(newdir, new), flags)
        self.nodes.rename(olddir, old, newdir, new, exchange=bool(flags & RENAME_EXCHANGE))
        return b""

    # -- attributes -------------------------------------------------------------------------

    def _getattr(self, nodeid: int, args: memoryview) -> bytes:
        flags, _, fh = fk.GETATTR_IN.unpack_from(args)
        if flags & fk.GETATTR_FH:
            return fk.attr_out(self.fs.stat(None, fh), self._attr)
        with self.nodes.reading():
            return fk.attr_out(self.fs.stat(self._named(nodeid)), self._attr)

    def _setattr(self, nodeid: int, args: memoryview) -> bytes:
        (valid, _, fh, size, _lock, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode,
         _u4, uid, gid, _u5) = fk.SETATTR_IN.unpack_from(args)  # fmt: skip
        handle = fh if valid & fk.FATTR_FH else None
        # libfuse's order: mode, owner, size, times; then the attributes now
        path = self._path(nodeid) if handle is not None else self._named(nodeid)
        if valid & fk.FATTR_MODE:
            self.fs.chmod(path, mode, handle)
        if valid & (fk.FATTR_UID | fk.FATTR_GID):
            self.fs.chown(
                path,
                uid if valid & fk.FATTR_UID else -1,
                gid if valid & fk.FATTR_GID else -1,
                handle,
            )
        if valid & fk.FATTR_SIZE:
            self.fs.truncate(path, size, handle)
        if valid & (fk.FATTR_ATIME | fk.FATTR_MTIME):
            a = m = UTIME_OMIT
            if valid & fk.FATTR_ATIME_NOW:
                a = UTIME_NOW
            elif valid & fk.FATTR_ATIME:
                a = atime * 1_000_000_000 + atimens
            if valid & fk.FATTR_MTIME_NOW:
                m = UTIME_NOW
            elif valid & fk.FATTR_MTIME:
                m = mtime * 1_000_000_000 + mtimens
            self.fs.utimens(path, (a, m), handle)
        return fk.attr_out(self.fs.stat(path, handle), self._attr)

    def _readlink(self, nodeid: int, args: memoryview) -> bytes:
        return self.fs.readlink(self._named(nodeid)).encode(ENCODING, ERRORS)

    def _statfs(self, nodeid: int, args: memoryview) -> bytes:
        return fk.statfs_out(self.fs.statfs("/"))

    # -- files ------------------------------------------------------------------------------

    def _open(self, nodeid: int, args: memoryview) -> bytes:
        flags, _ = fk.OPEN_IN.unpack_from(args)
        return fk.open_out(self.fs.open(self._named(nodeid), flags))

    def _create(self, nodeid: int, args: memoryview) -> bytes:
        flags, mode, _umask, _ = fk.CREATE_IN.unpack_from(args)
        (name,) = fk.names(args, fk.CREATE_IN.size, 1)
        path = self._child(nodeid, name)
        fh = self.fs.create(path, mode, flags)
        try:
            st = self.fs.stat(path, fh)
        except BaseException:
            self.fs.release(path, fh)
            raise
        return self._entry_of(nodeid, name, st) + fk.open_out(fh)

    def _read(self, nodeid: int, args: memoryview) -> bytes:
        fh, offset, size, _, _, _, _ = fk.READ_IN.unpack_from(args)
        return self.fs.read(None, size, offset, fh)

    def _write(self, nodeid: int, args: memoryview) -> bytes:
        fh, offset, size, flags, _, _, _ = fk.WRITE_IN.unpack_from(args)
        if len(args) != fk.WRITE_IN.size + size:
            raise fk.FuseProtocolError(
                f"WRITE of {size} bytes carries {len(args) - fk.WRITE_IN.size}"
            )
        data = bytes(args[fk.WRITE_IN.size :])
        n = self.fs.write_fh(
            fh, data, offset, flags & fk.WRITE_CACHE, lambda: self._name_of(nodeid)
        )
        return fk.WRITE_OUT.pack(n, 0)

    def _fsync(self, nodeid: int, args: memoryview) -> bytes:
        fh, flags, _ = fk.FSYNC_IN.unpack_from(args)
        self.fs.fsync_fh(fh, flags & fk.FSYNC_FDATASYNC, lambda: self._name_of(nodeid))
        return b""

    @staticmethod
    def _flush(nodeid: int, args: memoryview) -> bytes:
        """ENOSYS, as libfuse answered for a filesystem without flush: the kernel then sends
        no FLUSH at close any more (one round trip less per close(2), and a close after the
        connection was aborted does not fail)."""
        raise OSError(errno.ENOSYS, "no flush")

    def _release(self, nodeid: int, args: memoryview) -> bytes:
        fh, _, _, _ = fk.RELEASE_IN.unpack_from(args)
        self.fs.release(self._path(nodeid), fh)
        return b""

    def _fallocate(self, nodeid: int, args: memoryview) -> bytes:
        fh, offset, length, mode, _ = fk.FALLOCATE_IN.unpack_from(args)
        self.fs.fallocate(self._path(nodeid), mode, offset, length, fh)
        return b""

    def _lseek(self, nodeid: int, args: memoryview) -> bytes:
        fh, offset, whence, _ = fk.LSEEK_IN.unpack_from(args)
        return fk.LSEEK_OUT.pack(self.fs.lseek(None, offset, whence, fh))

    # -- extended attributes ----------------------------------------------------------------

    def _setxattr(self, nodeid: int, args: memoryview) -> bytes:
        size, flags = fk.SETXATTR_IN.unpack_from(args)
        (name,) = fk.names(args, fk.SETXATTR_IN.size, 1)
        start = fk.SETXATTR_IN.size + len(name) + 1
        value = bytes(args[start : start + size])
        if len(value) != size:
            raise fk.FuseProtocolError("SETXATTR value cut short")
        self.fs.setxattr(self._named(nodeid), _name(name), value, flags, 0)
        return b""

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        """getxattr/listxattr's answer: the size alone when asked with 0, else the value."""
        if size == 0:
            return fk.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "the buffer is too small")
        return value

    def _getxattr(self, nodeid: int, args: memoryview) -> bytes:
        size, _ = fk.GETXATTR_IN.unpack_from(args)
        (name,) = fk.names(args, fk.GETXATTR_IN.size, 1)
        return self._sized(self.fs.getxattr(self._named(nodeid), _name(name)), size)

    def _listxattr(self, nodeid: int, args: memoryview) -> bytes:
        size, _ = fk.GETXATTR_IN.unpack_from(args)
        listed = self.fs.listxattr(self._named(nodeid))
        return self._sized(b"".join(n.encode(ENCODING, ERRORS) + b"\0" for n in listed), size)

    def _removexattr(self, nodeid: int, args: memoryview) -> bytes:
        (name,) = fk.names(args, 0, 1)
        self.fs.removexattr(self._named(nodeid), _name(name))
        return b""

    # -- directories ------------------------------------------------------------------------

    def _opendir(self, nodeid: int, args: memoryview) -> bytes:
        self._named(nodeid)  # ESTALE for a directory with no name
        with self._lock:
            dh = self._next_dir
            self._next_dir += 1
            self._dirs[dh] = None
        return fk.open_out(dh)

    def _readdir(self, nodeid: int, args: memoryview) -> bytes:
        dh, offset, size, _, _, _, _ = fk.READ_IN.unpack_from(args)
        with self._lock:
            if dh not in self._dirs:
                raise OSError(errno.EBADF, "unknown directory handle")
            listing = self._dirs[dh]
        if offset == 0 or listing is None:  # rewinddir() reads the directory again
            listing = self._listing(nodeid, dh)
            with self._lock:
                if dh in self._dirs:
                    self._dirs[dh] = listing
        out: list[bytes] = []
        used = 0
        for index in range(offset, len(listing)):
            name, ino, mode = listing[index]
            rec = fk.dirent(ino, index + 1, mode, name)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def _listing(self, nodeid: int, dh: int) -> list[tuple[bytes, int, int]]:
        return [
            (name.encode(ENCODING, ERRORS), ino, kind)
            for name, ino, kind in self.fs.readdir(self._named(nodeid), dh)
        ]

    def _releasedir(self, nodeid: int, args: memoryview) -> bytes:
        dh, _, _, _ = fk.RELEASE_IN.unpack_from(args)
        with self._lock:
            self._dirs.pop(dh, None)
        return b""

    def _fsyncdir(self, nodeid: int, args: memoryview) -> bytes:
        dh, flags, _ = fk.FSYNC_IN.unpack_from(args)
        self.fs.fsyncdir(self._named(nodeid), flags & fk.FSYNC_FDATASYNC, dh)
        return b""


def serve(fs: MirrorFS, mountpoint: str, *, fsname: str = "mirrorha") -> None:
    """Mount ``fs`` on ``mountpoint`` and serve it until the mount goes away.

    Blocks; run it in a thread. Raises ``RuntimeError`` when /dev/fuse cannot be opened or
    the mount is refused (the reason included).
    """
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeError(f"cannot open /dev/fuse: {exc.strerror or exc}") from exc
    try:
        kind = stat.S_IFMT(os.stat(mountpoint).st_mode)
        options = (
            f"fd={fd},rootmode={kind:o},user_id={os.getuid()},group_id={os.getgid()},"
            "default_permissions,allow_other"
        )
        rc = _mount(
            fsname.encode(), os.fsencode(mountpoint), FSTYPE, MS_NOSUID | MS_NODEV,
            options.encode(),
        )  # fmt: skip
        if rc != 0:
            err = ctypes.get_errno()
            raise RuntimeError(f"mount of {mountpoint} refused: {os.strerror(err)}")
        FuseLoop(fs, fd).run()
    finally:
        os.close(fd)
