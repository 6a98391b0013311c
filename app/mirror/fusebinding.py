"""The libfuse binding of the primary's filesystem: mfusepy's FUSE with what it drops put back.

How it works
    ``serve(fs, mountpoint)`` mounts a ``MirrorFS`` (fusefs.py) with libfuse 3's multithreaded
    loop and blocks until the mount goes away. mfusepy's high-level wrapper drops, for libfuse 3,
    the rename flags, the file handle of truncate/chmod/chown/utimens, the writepage bit of a
    write and the lseek call; ``_Binding`` forwards them, so ``MirrorFS`` can replicate
    RENAME_NOREPLACE/RENAME_EXCHANGE, act on open handles, and tell mmap write-back from
    ``write()``. Paths are decoded with ``ENCODING``/``ERRORS`` (utf-8, surrogateescape), which
    fusefs.py reverses to get the kernel's exact bytes back.

    FUSE_HANDLE_KILLPRIV_V2: with it, the kernel leaves the clearing of set-ID bits on write,
    truncate and chown to the filesystem, and stops asking for security.capability before
    every write (a round trip to the daemon per write). libfuse 3.14 cannot ask for it, so
    ``_Binding.init_fuse_3`` (libfuse's init callback, which runs before the INIT reply is
    sent) gives libfuse a custom writev for one reply (``_InitReplyHook``): it adds the flag
    to the INIT reply and hands libfuse back the C library's writev. ``setid_cleared`` and
    ``request_caller`` are the kernel's set-ID rule and the caller it needs (from
    /proc/<pid>/status); fusefs.py applies them.

    The Python side of that boundary is here too: ``fuse_errors`` (the decorator of every
    operation: only ``OSError`` with a positive errno leaves it), ``rel_path``/``name_str``
    (libfuse's ``str`` paths to the kernel's bytes, relative to the root, and back) and
    ``stat_dict``, ``xattr_name`` and ``resolve_times`` (UTIME_NOW/UTIME_OMIT as libfuse
    passes them), and ``CacheTimeouts``, the kernel cache timeouts a mount is configured with.

Exceptions
    ``serve`` raises ``RuntimeError`` when libfuse cannot mount. ``fuse_errors`` answers EIO
    for anything but a positive-errno ``OSError`` (logged with its traceback) and EINVAL for a
    ``ValueError`` (an embedded NUL); fusefs.py's docstring has the errno table.

Known limits
    - Relies on mfusepy internals (the ``*_fuse_3`` method names, ``fip.contents``): pin the
      mfusepy version.
    - ``MOUNT_OPTIONS`` needs root (or user_allow_other) for allow_other.
    - The INIT hook declares libfuse 3.14's ``struct fuse_custom_io`` and is used with
      libfuse 3.14 to 3.16 only; with any other, the mount logs that it did not ask for
      FUSE_HANDLE_KILLPRIV_V2 and works as before (the kernel clears the bits itself, with a
      capability lookup per write). A kernel older than 5.11 ignores the flag: both it and
      the mount then clear the bits, which is harmless.
    - The kernel learns a mode the mount cleared at its next attribute refresh (a stat after
      the write always refreshes); until then its cached mode still shows the bits.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import mfusepy

if TYPE_CHECKING:
    from app.mirror.fusefs import MirrorFS

ENCODING = "utf-8"
ERRORS = "surrogateescape"
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
MAX_WRITE = 1 << 20  # bytes per FUSE write request (kernel limit: fs.fuse.max_pages_limit)

log = logging.getLogger("app.mirror.fusefs")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class CacheTimeouts:
    """Seconds the kernel may trust what it learnt (libfuse config entry/attr/negative_timeout).

    Every change goes through this mount, and the kernel updates or drops what a change
    through the mount touches, so caching is safe; only hard-linked aliases can lag (see the
    module docstring). One second keeps stat-heavy programs off the Python path.
    """

    entry: float = 1.0
    attr: float = 1.0
    negative: float = 1.0


DEFAULT_TIMEOUTS = CacheTimeouts()


def fuse_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Let only ``OSError`` with a positive errno leave an operation (see the errno table)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                raise
            log.exception("%s: OSError without errno, answering EIO", fn.__name__)
            raise mfusepy.FuseOSError(errno.EIO) from exc
        except ValueError as exc:  # embedded NUL, or an argument the os module refuses
            raise mfusepy.FuseOSError(errno.EINVAL) from exc
        except Exception as exc:
            log.exception("%s failed, answering EIO", fn.__name__)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    return wrapper


def stat_dict(st: os.stat_result) -> dict[str, int]:
    return {
        "st_mode": st.st_mode,
        "st_ino": st.st_ino,
        "st_nlink": st.st_nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_rdev": st.st_rdev,
        "st_size": st.st_size,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


def rel_path(path: str | None) -> bytes:
    """The kernel's path as bytes relative to the root (``b""`` is the root itself)."""
    if path is None:
        raise OSError(errno.ENOENT, "file has no name any more")
    return path.encode(ENCODING, ERRORS).lstrip(b"/")


def name_str(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


def xattr_name(name: str) -> bytes:
    raw = name.encode(ENCODING, ERRORS)
    if raw.startswith(b"system."):
        raise OSError(errno.EOPNOTSUPP, "system.* attributes are not supported")
    return raw


def resolve_times(atime: int, mtime: int, now: int, st: os.stat_result) -> tuple[int, int]:
    """Turn UTIME_NOW/UTIME_OMIT (as libfuse passes them: 0 s + special ns) into real values."""

    def one(value: int, current: int) -> int:
        if value == UTIME_NOW:
            return now
        if value == UTIME_OMIT:
            return current
        return value

    return one(atime, st.st_atime_ns), one(mtime, st.st_mtime_ns)


_thread_state = threading.local()


def _keep_thread_state() -> None:
    """Keep the Python thread state of this libfuse worker thread for the thread's life.

    ctypes makes a thread state for every callback from a thread Python did not start, and
    deletes it on return (each time: an mmap and munmap of its frame stack, and the state's
    set-up): that was 2 of 5 system calls per FUSE request. One more PyGILState_Ensure that is
    never released keeps the state; the worker threads live as long as the mount.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _thread_state.kept = True


FUSE_HANDLE_KILLPRIV_V2 = 1 << 28  # include/uapi/linux/fuse.h; libfuse 3.14 has no name for it
_INIT_FLAGS_AT = 12  # offset of ``flags`` in struct fuse_init_out (major, minor, max_readahead)
_CUSTOM_IO_LIBFUSE = ((3, 14), (3, 16))  # the releases whose fuse_custom_io layout we declare
CAP_FSETID = 4


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _OutHeader(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("error", ctypes.c_int32), ("unique", ctypes.c_uint64)]


class _CustomIO(ctypes.Structure):
    """libfuse 3.14's struct fuse_custom_io."""

    _fields_ = [
        ("writev", ctypes.c_void_p),
        ("read", ctypes.c_void_p),
        ("splice_receive", ctypes.c_void_p),
        ("splice_send", ctypes.c_void_p),
    ]


_WRITEV = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_int, ctypes.c_void_p
)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.writev.restype = ctypes.c_ssize_t
_libfuse = mfusepy._libfuse
_libfuse.fuse_get_session.restype = ctypes.c_void_p
_libfuse.fuse_get_session.argtypes = [ctypes.c_void_p]
_libfuse.fuse_session_fd.restype = ctypes.c_int
_libfuse.fuse_session_fd.argtypes = [ctypes.c_void_p]
_custom_io = getattr(_libfuse, "fuse_session_custom_io", None)  # libfuse >= 3.13
if _custom_io is not None:
    _custom_io.restype = ctypes.c_int
    _custom_io.argtypes = [ctypes.c_void_p, ctypes.POINTER(_CustomIO), ctypes.c_int]


def _plain_io() -> _CustomIO:
    """The C library's own read and writev: libfuse's default I/O, as a custom one."""
    return _CustomIO(
        writev=ctypes.cast(_libc.writev, ctypes.c_void_p).value,
        read=ctypes.cast(_libc.read, ctypes.c_void_p).value,
    )


class _InitReplyHook:
    """Adds FUSE_HANDLE_KILLPRIV_V2 to the one INIT reply of a mount (see ``_Binding``).

    ``install()`` (during libfuse's init callback, before the reply goes out) makes libfuse
    send its replies through ``_writev``; the first reply is INIT's: ``_writev`` sets the
    flag in it, sends it, and hands libfuse back the C library's writev, so no later reply
    passes through Python.
    """

    def __init__(self, session: int) -> None:
        self.session = session
        self.fd = _libfuse.fuse_session_fd(session)
        self._callback = _WRITEV(self._writev)

    def install(self) -> None:
        io = _plain_io()
        io.writev = ctypes.cast(self._callback, ctypes.c_void_p).value
        self._use(io)

    def _use(self, io: _CustomIO) -> None:
        if _custom_io is None:
            raise OSError(errno.ENOSYS, "libfuse has no fuse_session_custom_io")
        rc = _custom_io(self.session, ctypes.byref(io), self.fd)  # libfuse copies the struct
        if rc != 0:
            raise OSError(-rc, "fuse_session_custom_io failed")

    def _writev(self, fd: int, iov: Any, count: int, _userdata: Any) -> int:
        if count >= 2 and iov[1].len >= _INIT_FLAGS_AT + 4:
            header = _OutHeader.from_address(iov[0].base)
            if header.error == 0:
                flags = ctypes.c_uint32.from_address(iov[1].base + _INIT_FLAGS_AT)
                flags.value |= FUSE_HANDLE_KILLPRIV_V2
        sent = int(_libc.writev(fd, iov, count))
        try:
            self._use(_plain_io())
        except OSError:
            log.exception("could not give libfuse its own writev back")
        return sent


@dataclass(frozen=True, slots=True)
class Caller:
    """The process behind the current request, as the kernel's set-ID rules need it."""

    fsetid: bool  # CAP_FSETID in its effective set
    groups: frozenset[int]  # its filesystem gid and supplementary groups


def request_caller() -> Caller:
    """Who made the current request, from /proc/<pid>/status (the kernel passes the thread's
    id). A caller that cannot be read (gone, or in no pid namespace we see) gets no
    privilege: the rules then clear the most."""
    _uid, _gid, pid = mfusepy.fuse_get_context()
    fields: dict[bytes, list[bytes]] = {}
    if pid > 0:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    name, _, rest = line.partition(b":")
                    fields[name] = rest.split()
        except OSError:
            fields = {}
    try:
        fsetid = bool(int(fields[b"CapEff"][0], 16) >> CAP_FSETID & 1)
        groups = frozenset(int(g) for g in fields[b"Groups"]) | {int(fields[b"Gid"][3])}
    except (KeyError, IndexError, ValueError):
        return Caller(fsetid=False, groups=frozenset())
    return Caller(fsetid=fsetid, groups=groups)


def setid_cleared(st: os.stat_result) -> int | None:
    """The permission bits a write, truncate or allocation by the current request's caller
    leaves, or None when it clears nothing: a local filesystem's rule (the kernel's
    ``setattr_should_drop_suidgid``). Setuid always; setgid with group execute, or when the
    caller is not in the file's group; neither when the caller holds CAP_FSETID. The cheap
    test comes first: most files have neither bit."""
    mode = st.st_mode
    if not mode & (stat.S_ISUID | stat.S_ISGID):
        return None
    caller = request_caller()
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or st.st_gid not in caller.groups):
        kill |= stat.S_ISGID
    if not kill or caller.fsetid:
        return None
    return stat.S_IMODE(mode) & ~kill


class _Binding(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with what it drops for libfuse 3 put back.

    mfusepy passes no rename flags, no handle to truncate/chmod/chown/utimens, no writepage
    bit, and has no lseek wrapper; this subclass forwards them to ``MirrorFS``.
    """

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not getattr(_thread_state, "kept", False):
            _keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    init_hook: _InitReplyHook | None = None  # holds the ctypes callback while libfuse may call it

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        version = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
        if _CUSTOM_IO_LIBFUSE[0] <= version <= _CUSTOM_IO_LIBFUSE[1]:
            try:
                session = _libfuse.fuse_get_session(_libfuse.fuse_get_context().contents.fuse)
                hook = _InitReplyHook(session)
                hook.install()
                self.init_hook = hook
            except OSError:
                log.exception("FUSE_HANDLE_KILLPRIV_V2 not asked for: a capability lookup "
                              "will precede every write")  # fmt: skip
        else:
            log.warning("libfuse %d.%d: FUSE_HANDLE_KILLPRIV_V2 not asked for", *version)
        super().init_fuse_3(conn, config)

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip: Any) -> int | None:
        return int(fip.contents.fh) if fip else None

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(self.operations.rename(self._path(old), self._path(new), flags))

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return int(self.operations.truncate(self._path(path), length, self._fh(fip)))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return int(self.operations.chmod(self._path(path), mode, self._fh(fip)))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        if ctypes.c_uint32(uid + 1).value == 0:
            uid = -1
        if ctypes.c_uint32(gid + 1).value == 0:
            gid = -1
        return int(self.operations.chown(self._path(path), uid, gid, self._fh(fip)))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            atime = buf.contents.actime
            mtime = buf.contents.modtime
            times = (
                atime.tv_sec * 10**9 + atime.tv_nsec,
                mtime.tv_sec * 10**9 + mtime.tv_nsec,
            )
        return int(self.operations.utimens(self._path(path), times, self._fh(fip)))

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        data = ctypes.string_at(buf, size)
        fi = fip.contents
        return int(
            self.operations.write_at(self._path(path), data, offset, fi.fh, bool(fi.writepage))
        )

    def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
        return int(self.operations.lseek(self._path(path), offset, whence, self._fh(fip)))


MOUNT_OPTIONS: dict[str, bool | str] = {
    "default_permissions": True,  # the kernel checks modes/owners against getattr
    "allow_other": True,  # the application may run as any user (we are root)
    # above libfuse's 10 worker threads, so no idle worker ever ends (each keeps its Python
    # thread state, _keep_thread_state); libfuse 3.14's default (unlimited) also made it log
    # "Ignoring invalid max threads value 4294967295" at every mount
    "max_idle_threads": "100",
}


def serve(fs: MirrorFS, mountpoint: str, *, fsname: str = "mirrorha") -> None:
    """Mount ``fs`` on ``mountpoint`` and serve it (multithreaded) until it is unmounted.

    Blocks; run it in a thread. Raises ``RuntimeError`` if libfuse fails to mount.
    """
    _Binding(
        fs,
        mountpoint,
        foreground=True,
        nothreads=False,
        encoding=ENCODING,
        errors=ERRORS,
        fsname=fsname,
        subtype="mirrorha",
        **MOUNT_OPTIONS,
    )
