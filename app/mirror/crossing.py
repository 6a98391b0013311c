"""Renames across the exclusion boundary: what the FUSE layer sends so the peer stays identical.

How it works
    An excluded path exists only locally; its changes never reach the Replicator (nor the
    journal). When a rename moves an entry across the boundary, fusefs.py decides (see its
    docstring) and calls in here:

    - excluded -> replicated: the peer has never seen the entry, so ``send_as_new`` sends it
      whole as new operations under its new name: ``Create`` + ``Write`` of every data extent
      (holes stay holes) + ``Truncate`` to the length + ``Release`` for a regular file,
      ``Symlink`` or ``Mknod`` otherwise, then its ``user.*``/``trusted.*``/``security.*``
      extended attributes and a ``Utimens``. The mode and owner travel in the creating op. The
      local rename runs as the local step of the first operation, so the journal marks the new
      name before it appears locally (crash-safe), and a rename that fails locally sends
      nothing.
    - replicated -> excluded: only an ``Unlink`` of the old name is sent (fusefs.py).

    ``moves_across`` tells whether renaming a directory changes which entries below it are
    excluded (possible only with patterns that contain a ``/``); fusefs.py refuses such a rename
    with EXDEV.

Exceptions
    ``OSError`` from the local system calls, passed through (fusefs.py turns it into the
    errno). A failure after the first operation leaves the peer with part of the file: the
    ``Release`` is still sent, and the journal has the name marked for reintegration.

Known limits
    - Regular files, symlinks, FIFOs and sockets only; fusefs.py refuses to move a directory
      or a file with several hard links across the boundary (EXDEV).
    - ``moves_across`` walks the whole subtree (O(entries)), only when a path pattern exists.
    - Large files are sent in 1 MiB writes while the rename holds the file's inode lock:
      writes to that file through other handles wait until it is all sent.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from app.mirror import ops
from app.mirror.exclude import Exclusions
from app.mirror.ops import Replicator

__all__ = [
    "CHUNK",
    "check_can_cross",
    "entries_below_cross",
    "moves_across",
    "rename_across",
    "send_as_new",
]

CHUNK = 1 << 20
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1


def _nothing() -> None:
    """The local step of an op whose local change is already made."""


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data extents of ``fd``; the whole file where SEEK_DATA is missing."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)] if size else []
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        out.append((start, end))
        offset = end
    return out


def _send_data(replicator: Replicator, fd: int, fh: int, dst: bytes) -> None:
    size = os.fstat(fd).st_size
    for start, end in _extents(fd, size):
        pos = start
        while pos < end:
            data = os.pread(fd, min(CHUNK, end - pos), pos)
            if not data:
                break
            replicator.apply(ops.Write(fh, pos, data), _nothing)
            pos += len(data)
    replicator.apply(ops.Truncate(fh, dst, size), _nothing)


def _send_xattrs(replicator: Replicator, proc_root: bytes, dst: bytes) -> None:
    target = proc_root + b"/" + dst
    for name in os.listxattr(target, follow_symlinks=False):
        raw = os.fsencode(name)
        if raw.startswith(b"system."):
            continue
        value = os.getxattr(target, raw, follow_symlinks=False)
        replicator.apply(ops.SetXattr(dst, raw, value, 0), _nothing)


def send_as_new(
    replicator: Replicator,
    root_fd: int,
    dst: bytes,
    st: os.stat_result,
    fh: int,
    rename: Callable[[], None],
    symlink_target: bytes = b"",
) -> None:
    """Run ``rename`` (which puts the entry ``st`` at ``dst``) and send the entry as new.

    ``fh`` is a fresh handle number for the Create of a regular file; ``symlink_target`` the
    content of a symlink (read before the rename).
    """
    kind = stat.S_IFMT(st.st_mode)
    perm = stat.S_IMODE(st.st_mode)
    if kind == stat.S_IFLNK:
        op: ops.Op = ops.Symlink(symlink_target, dst, st.st_uid, st.st_gid)
        replicator.apply(op, rename)
    elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
        replicator.apply(ops.Mknod(dst, kind | perm, st.st_uid, st.st_gid), rename)
    elif kind == stat.S_IFREG:
        replicator.apply(ops.Create(fh, dst, perm, st.st_uid, st.st_gid, True), rename)
        try:
            fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
            try:
                _send_data(replicator, fd, fh, dst)
            finally:
                os.close(fd)
        finally:
            replicator.apply(ops.Release(fh), _nothing)
    else:
        raise OSError(errno.EXDEV, "only files, symlinks, FIFOs and sockets cross the boundary")
    proc_root = f"/proc/self/fd/{root_fd}".encode()
    if kind != stat.S_IFLNK:
        _send_xattrs(replicator, proc_root, dst)
    now = os.stat(dst, dir_fd=root_fd, follow_symlinks=False)
    replicator.apply(ops.Utimens(dst, now.st_atime_ns, now.st_mtime_ns), _nothing)


def moves_across(exclusions: Exclusions, root_fd: int, src: bytes, dst: bytes) -> bool:
    """True if an entry below directory ``src`` is excluded there but not under ``dst`` (or
    the reverse): renaming ``src`` to ``dst`` would move it across the boundary."""
    if not exclusions.has_path_patterns:
        return False
    for dirpath, dirnames, filenames, _dirfd in os.fwalk(src, dir_fd=root_fd):
        below = dirpath[len(src) :]
        for name in dirnames + filenames:
            tail = below + b"/" + name
            is_dir = name in dirnames
            if exclusions.excluded(src + tail, is_dir) != exclusions.excluded(dst + tail, is_dir):
                return True
    return False


def entries_below_cross(
    exclusions: Exclusions, root_fd: int, src: bytes, dst: bytes, st: os.stat_result, flags: int
) -> bool:
    """For a rename between two replicated names: does an entry below a renamed directory
    change sides? (``st`` is the entry at ``src``; an exchange moves the one at ``dst`` too.)"""
    if flags & RENAME_EXCHANGE and moves_across(exclusions, root_fd, dst, src):
        return True
    return stat.S_ISDIR(st.st_mode) and moves_across(exclusions, root_fd, src, dst)


def check_can_cross(st: os.stat_result, flags: int) -> None:
    """EXDEV unless the entry ``st`` may be renamed across the boundary: not a directory,
    not a file with other hard links (one inode would have names on both sides), no exchange."""
    if flags & RENAME_EXCHANGE or stat.S_ISDIR(st.st_mode) or st.st_nlink > 1:
        raise OSError(errno.EXDEV, "only a single-named file can cross the exclusion boundary")


def _exists(root_fd: int, rel: bytes) -> bool:
    try:
        os.stat(rel, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def rename_across(
    replicator: Replicator,
    root_fd: int,
    exclusions: Exclusions,
    src: bytes,
    dst: bytes,
    st: os.stat_result,
    flags: int,
    rename: Callable[[], None],
    fh: int,
) -> bool:
    """Rename the entry ``st`` from ``src`` to ``dst``, one side excluded, the other not (after
    ``check_can_cross``); return True if it is now replicated. ``fh`` is a fresh handle."""
    if exclusions.excluded(dst, False):  # replicated -> excluded: gone from the peer
        replicator.apply(ops.Unlink(src), rename)
        return False
    target = os.readlink(src, dir_fd=root_fd) if stat.S_ISLNK(st.st_mode) else b""
    if _exists(root_fd, dst):
        if flags & RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "the new name exists")
        replicator.apply(ops.Unlink(dst), rename)  # the replaced entry is gone on the peer
        rename = _nothing
    send_as_new(replicator, root_fd, dst, st, fh, rename, target)
    return True
