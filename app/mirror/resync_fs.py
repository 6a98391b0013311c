"""Resync's reads of a local tree: entries, listings, data extents and block sums.

How it works
    Every path is resolved beneath an open root directory descriptor one component at a time
    with O_NOFOLLOW (``parent_of``), so a symlink or a non-directory on the way reads as
    absent and nothing outside the root is touched. ``stat_path``/``entry_in`` give an
    ``Entry`` (lstat, link target, xattrs); ``list_dir`` a page of a directory, sorted by
    name; ``data_extents`` the non-hole parts of a range (SEEK_DATA/SEEK_HOLE);
    ``block_sums`` the hole flag and BLAKE2b-128 digest of BLOCK-byte blocks. The source
    reads its own view with them, the target answers queries with them (verify and
    quarantine use them too).

Exceptions: OSError from the tree. A path that is missing or has a symlink or non-directory
on the way reads as None (``stat_path``) or as an empty listing (``list_dir``).

Limits
    - ``system.*`` xattrs are skipped; a filesystem without xattrs reads as having none.
    - ``list_dir`` reads and sorts the whole directory for every page it returns.
    - ``data_extents`` walks at most 4096 extents; past that the whole range counts as data.
    - An entry's size is 0 for anything but a regular file.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from app.mirror.resync_codec import BLOCK, DIGEST, Entry, Sum

SEEK_DATA: Final = 3
SEEK_HOLE: Final = 4

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


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
