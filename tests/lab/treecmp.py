"""Compare two directory trees the way an admin checking a mirror would.

How it works
    ``diff_trees(a, b)`` walks both trees without following symlinks and returns one
    human-readable line per difference (an empty list means identical): entries present on one
    side only, file type, size, content (SHA-256), the data/hole map (SEEK_DATA/SEEK_HOLE
    extents, so a punched or sparse region must be a hole on both sides), mode, owner, file
    mtimes (``times=True``; nanoseconds; with ``all_times=True`` the mtimes of directories
    (the roots included), symlinks and special files too), symlink targets, hard-link groups
    (the sets of paths that share an inode must be the same on both sides) and extended
    attributes (every namespace but ``system.*``, which holds ACLs the mirror does not
    replicate).

    ``ignore(relpath) -> bool`` leaves paths out (e.g. the lab's ``*.tmp`` exclusion) together
    with everything below them.

Limits
    Directory, symlink and special-file times are compared only with ``all_times`` (the
    mirror sends them shortly after a change, once the pair is live); atimes, ctimes and
    inode numbers never are. Whole files are read
    into a hash, so it suits test trees of up to some hundreds of MB. A tree that changes while
    it is walked gives meaningless differences: call it after the writers are quiet.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

MAX_LINES = 200


def data_map(path: Path) -> list[tuple[int, int]]:
    """The data extents of a regular file as (offset, length), holes left out."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        out: list[tuple[int, int]] = []
        off = 0
        for _ in range(1 << 20):
            if off >= size:
                break
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            off = end
        return out
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in names:
        if name.startswith("system."):
            continue
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _walk(root: Path, ignore: Callable[[str], bool]) -> dict[str, os.stat_result]:
    """relative path -> lstat of every entry below root (root itself as "")."""
    found: dict[str, os.stat_result] = {"": os.lstat(root)}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for entry in it:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if ignore(child):
                    continue
                st = entry.stat(follow_symlinks=False)
                found[child] = st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)
    return found


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def _link_groups(tree: dict[str, os.stat_result]) -> set[frozenset[str]]:
    by_ino: dict[tuple[int, int], set[str]] = {}
    for rel, st in tree.items():
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            by_ino.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    return {frozenset(g) for g in by_ino.values()}


def diff_trees(
    a: Path,
    b: Path,
    *,
    times: bool = True,
    all_times: bool = False,
    ignore: Callable[[str], bool] = lambda rel: False,
) -> list[str]:
    """Differences between trees ``a`` and ``b`` (see the module docstring); [] if identical."""
    a, b = Path(a), Path(b)
    ta, tb = _walk(a, ignore), _walk(b, ignore)
    out: list[str] = []
    for rel in sorted(ta.keys() - tb.keys()):
        out.append(f"{rel or '.'}: only in {a} ({_kind(ta[rel].st_mode)})")
    for rel in sorted(tb.keys() - ta.keys()):
        out.append(f"{rel or '.'}: only in {b} ({_kind(tb[rel].st_mode)})")
    for rel in sorted(ta.keys() & tb.keys()):
        if len(out) >= MAX_LINES:
            out.append("... (more differences not listed)")
            return out
        name = rel or "."
        sa, sb = ta[rel], tb[rel]
        ka, kb = _kind(sa.st_mode), _kind(sb.st_mode)
        if ka != kb:
            out.append(f"{name}: {ka} in {a}, {kb} in {b}")
            continue
        pa, pb = a / rel if rel else a, b / rel if rel else b
        if ka != "symlink" and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            out.append(f"{name}: mode {stat.S_IMODE(sa.st_mode):o} vs {stat.S_IMODE(sb.st_mode):o}")
        if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            out.append(f"{name}: owner {sa.st_uid}:{sa.st_gid} vs {sb.st_uid}:{sb.st_gid}")
        xa, xb = _xattrs(pa), _xattrs(pb)
        if xa != xb:
            keys = sorted(k for k in xa.keys() | xb.keys() if xa.get(k) != xb.get(k))
            out.append(f"{name}: xattrs differ: {', '.join(keys)}")
        if ka == "symlink":
            ra, rb = os.readlink(pa), os.readlink(pb)
            if ra != rb:
                out.append(f"{name}: symlink to {ra!r} vs {rb!r}")
        elif ka == "file":
            if sa.st_size != sb.st_size:
                out.append(f"{name}: size {sa.st_size} vs {sb.st_size}")
            elif _sha256(pa) != _sha256(pb):
                out.append(f"{name}: content differs (same size {sa.st_size})")
            else:
                ma, mb = data_map(pa), data_map(pb)
                if ma != mb:
                    out.append(f"{name}: data/hole map {ma[:4]}... vs {mb[:4]}...")
            if sa.st_nlink != sb.st_nlink:
                out.append(f"{name}: {sa.st_nlink} links vs {sb.st_nlink}")
            if times and sa.st_mtime_ns != sb.st_mtime_ns:
                out.append(f"{name}: mtime {sa.st_mtime_ns} vs {sb.st_mtime_ns}")
        if all_times and ka != "file" and sa.st_mtime_ns != sb.st_mtime_ns:
            out.append(f"{name}: {ka} mtime {sa.st_mtime_ns} vs {sb.st_mtime_ns}")
    ga, gb = _link_groups(ta), _link_groups(tb)
    for g in sorted(ga - gb, key=sorted):
        out.append(f"hard-link group {sorted(g)} only in {a}")
    for g in sorted(gb - ga, key=sorted):
        out.append(f"hard-link group {sorted(g)} only in {b}")
    return out
