"""The libfuse binding of the primary's filesystem: mfusepy's FUSE with what it drops put back.

How it works
    ``serve(fs, mountpoint)`` mounts a ``MirrorFS`` (fusefs.py) with libfuse 3's multithreaded
    loop and blocks until the mount goes away. mfusepy's high-level wrapper drops, for libfuse 3,
    the rename flags, the file handle of truncate/chmod/chown/utimens, the writepage bit of a
    write and the lseek call; ``_Binding`` forwards them, so ``MirrorFS`` can replicate
    RENAME_NOREPLACE/RENAME_EXCHANGE, act on open handles, and tell mmap write-back from
    ``write()``. Paths are decoded with ``ENCODING``/``ERRORS`` (utf-8, surrogateescape), which
    fusefs.py reverses to get the kernel's exact bytes back.

Exceptions
    ``serve`` raises ``RuntimeError`` when libfuse cannot mount; errors inside operations are
    fusefs.py's (``OSError(errno)`` only).

Known limits
    - Relies on mfusepy internals (the ``*_fuse_3`` method names, ``fip.contents``): pin the
      mfusepy version.
    - ``MOUNT_OPTIONS`` needs root (or user_allow_other) for allow_other.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import mfusepy

if TYPE_CHECKING:
    from app.mirror.fusefs import MirrorFS

ENCODING = "utf-8"
ERRORS = "surrogateescape"


class _Binding(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with what it drops for libfuse 3 put back.

    mfusepy passes no rename flags, no handle to truncate/chmod/chown/utimens, no writepage
    bit, and has no lseek wrapper; this subclass forwards them to ``MirrorFS``.
    """

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
