"""POSIX behaviour through the primary's FUSE mount, and what it replicates.

Each test mounts ``MirrorMount`` over a fresh directory with a recording Replicator whose
fake receiver (``Shadow``) applies every op to a second directory with plain os calls, then
checks (a) what the application sees through the mount, (b) the recorded ops, (c) that the
real directory and the shadow end identical (content, sizes, holes, modes, owners, file
mtimes, hard links, symlinks, user.* xattrs). Directory and symlink mtimes are not compared:
they are the time the change was made on each side (see app/mirror/fusefs.py).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import mmap
import os
import random
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.mirror import ops

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("no_mount_left_behind"),
]

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
UTIME_OMIT = (1 << 30) - 2


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(olddir, old, newdir, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    res = _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length))
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- the fake receiver -----------------------------------------------------------------------


class Shadow:
    """Applies ops to a directory the way a secondary would: relative to its fd, no following."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        self.handles: dict[int, int] = {}

    def _x(self, path: bytes) -> tuple[bytes, bool]:
        base = f"/proc/self/fd/{self.fd}".encode()
        return (base, True) if not path else (base + b"/" + path, False)

    def apply(self, op: ops.Op) -> None:
        d = self.fd
        match op:
            case ops.Open(fh, path):
                self.handles[fh] = os.open(path, os.O_RDWR | os.O_NOFOLLOW, dir_fd=d)
            case ops.Create(fh, path, mode, uid, gid, excl):
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if excl else 0)
                fd = os.open(path, flags, mode, dir_fd=d)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                self.handles[fh] = fd
            case ops.Release(fh):
                os.close(self.handles.pop(fh))
            case ops.Write(fh, offset, data):
                assert os.pwrite(self.handles[fh], data, offset) == len(data)
            case ops.Truncate(fh, path, length):
                if fh == -1:
                    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=d)
                    os.ftruncate(fd, length)
                    os.close(fd)
                else:
                    os.ftruncate(self.handles[fh], length)
            case ops.Fallocate(fh, mode, offset, length):
                fallocate(self.handles[fh], mode, offset, length)
            case ops.Fsync(fh, path, datasync):
                sync = os.fdatasync if datasync else os.fsync
                if fh == -1:
                    fd = os.open(path or b".", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=d)
                    sync(fd)
                    os.close(fd)
                else:
                    sync(self.handles[fh])
            case ops.Mknod(path, mode, uid, gid):
                os.mknod(path, mode, 0, dir_fd=d)
                os.chown(path, uid, gid, dir_fd=d, follow_symlinks=False)
                os.chmod(path, stat.S_IMODE(mode), dir_fd=d, follow_symlinks=False)
            case ops.Mkdir(path, mode, uid, gid):
                os.mkdir(path, mode, dir_fd=d)
                os.chown(path, uid, gid, dir_fd=d, follow_symlinks=False)
                os.chmod(path, mode, dir_fd=d, follow_symlinks=False)
            case ops.Unlink(path):
                os.unlink(path, dir_fd=d)
            case ops.Rmdir(path):
                os.rmdir(path, dir_fd=d)
            case ops.Rename(old, new, flags):
                renameat2(d, old, d, new, flags)
            case ops.Link(target, new):
                os.link(target, new, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
            case ops.Symlink(target, path, uid, gid):
                os.symlink(target, path, dir_fd=d)
                os.chown(path, uid, gid, dir_fd=d, follow_symlinks=False)
            case ops.Chmod(path, mode):
                os.chmod(path or b".", mode, dir_fd=d, follow_symlinks=False)
            case ops.Chown(path, uid, gid):
                os.chown(path or b".", uid, gid, dir_fd=d, follow_symlinks=False)
            case ops.Utimens(path, atime_ns, mtime_ns):
                os.utime(path or b".", ns=(atime_ns, mtime_ns), dir_fd=d, follow_symlinks=False)
            case ops.SetXattr(path, name, value, flags):
                target, follow = self._x(path)
                os.setxattr(target, name, value, flags, follow_symlinks=follow)
            case ops.RemoveXattr(path, name):
                target, follow = self._x(path)
                os.removexattr(target, name, follow_symlinks=follow)
            case _:
                raise AssertionError(f"unknown op {op!r}")

    def close(self) -> None:
        for fd in self.handles.values():
            os.close(fd)
        os.close(self.fd)


class Recorder:
    """The recording Replicator: local change, record, apply to the shadow, in one order."""

    def __init__(self, shadow: Shadow) -> None:
        self.shadow = shadow
        self.ops: list[ops.Op] = []
        self.lock = threading.Lock()

    def apply(self, op: ops.Op, local: Callable[[], Any]) -> Any:
        with self.lock:
            result = local()
            self.ops.append(op)
            self.shadow.apply(op)
            return result

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every write handle is released: the kernel sends RELEASE after close()
        has returned, so the last handle's Utimens/Release may still be on its way."""
        deadline = time.monotonic() + timeout
        while self.shadow.handles and time.monotonic() < deadline:
            time.sleep(0.005)

    def take(self, *kinds: type, settle: bool = True) -> list[ops.Op]:
        """Ops recorded so far (of the given kinds), and forget them."""
        if settle:
            self.settle()
        with self.lock:
            taken, self.ops = self.ops, []
        return [op for op in taken if not kinds or isinstance(op, kinds)]


# -- tree snapshots ----------------------------------------------------------------------------


def _extents(fd: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    offset = 0
    for _ in range(100_000):
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, hole))
        offset = hole
    return out


def _digest_blocks(digest: Any, pos: int, block: bytes) -> None:
    """Hash the non-zero 4 KiB blocks with their offsets: equal content, sparse or not."""
    start = 0
    while start < len(block):
        end = min(len(block), ((pos + start) // 4096 + 1) * 4096 - pos)
        piece = block[start:end]
        if piece.count(0) != len(piece):
            digest.update((pos + start).to_bytes(8, "big") + piece)
        start = end


def snapshot(root_fd: int) -> dict[bytes, tuple[Any, ...]]:
    """Everything a user would compare between two copies, keyed by relative path."""
    tree: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    proc = f"/proc/self/fd/{root_fd}".encode()
    for dirpath, dirnames, filenames, dirfd in os.fwalk(b".", dir_fd=root_fd):
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(dirpath, name))
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            common = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
                try:
                    digest = hashlib.sha256()
                    for chunk_start, chunk_end in _extents(fd):
                        pos = chunk_start
                        while pos < chunk_end:
                            block = os.pread(fd, min(1 << 20, chunk_end - pos), pos)
                            if not block:
                                break
                            _digest_blocks(digest, pos, block)
                            pos += len(block)
                    xattrs = {
                        n: os.getxattr(proc + b"/" + rel, n, follow_symlinks=False)
                        for n in os.listxattr(proc + b"/" + rel, follow_symlinks=False)
                    }
                    detail: tuple[Any, ...] = (
                        st.st_size,
                        st.st_nlink,
                        st.st_mtime_ns,
                        digest.hexdigest(),
                        tuple(_extents(fd)),
                        sorted(xattrs.items()),
                    )
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(st.st_mode):
                detail = (os.readlink(name, dir_fd=dirfd),)
            elif stat.S_ISDIR(st.st_mode):
                xattrs = {
                    n: os.getxattr(proc + b"/" + rel, n, follow_symlinks=False)
                    for n in os.listxattr(proc + b"/" + rel, follow_symlinks=False)
                }
                detail = (sorted(xattrs.items()),)
            else:
                detail = ()
            tree[rel] = common + detail
    root = os.stat(root_fd)
    tree[b"."] = (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid)
    tree[b"<hard links>"] = tuple(sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1))
    return tree


@dataclass
class Mirror:
    """A mounted directory (``root``), its real fd, the shadow copy and the recorder."""

    root: str
    real_fd: int
    shadow_path: str
    shadow: Shadow
    rec: Recorder
    mount: Any
    _closed: list[int] = field(default_factory=list)

    def p(self, *parts: str | bytes) -> bytes:
        out = os.fsencode(self.root)
        for part in parts:
            out = os.path.join(out, os.fsencode(part))
        return out

    def assert_identical(self) -> None:
        self.rec.settle()
        real = snapshot(self.real_fd)
        shadow = snapshot(self.shadow.fd)
        assert real == shadow


@pytest.fixture
def mirror(tmp_path: Path, mount_factory: Callable[..., Any]) -> Iterator[Mirror]:
    real = tmp_path / "data"
    shadow_dir = tmp_path / "shadow"
    real.mkdir()
    shadow_dir.mkdir()
    real_fd = os.open(real, os.O_PATH | os.O_DIRECTORY)
    shadow = Shadow(str(shadow_dir))
    rec = Recorder(shadow)
    try:
        mount = mount_factory(str(real), rec)
        yield Mirror(str(real), real_fd, str(shadow_dir), shadow, rec, mount)
        mount.stop()
    finally:
        shadow.close()
        os.close(real_fd)


def write_file(path: bytes, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def read_file(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- data --------------------------------------------------------------------------------------


def test_reads_and_writes_at_offsets(mirror: Mirror) -> None:
    fd = os.open(mirror.p("f"), os.O_RDWR | os.O_CREAT, 0o640)
    try:
        assert os.pwrite(fd, b"hello", 0) == 5
        assert os.pwrite(fd, b"world", 10) == 5
        assert os.pread(fd, 15, 0) == b"hello\0\0\0\0\0world"
        assert os.pread(fd, 3, 11) == b"orl"
        assert os.pread(fd, 10, 15) == b""
    finally:
        os.close(fd)
    assert os.stat(mirror.p("f")).st_size == 15
    recorded = mirror.rec.take()
    create = recorded[0]
    assert isinstance(create, ops.Create)
    assert (create.path, create.mode, create.uid, create.excl) == (b"f", 0o640, 0, False)
    writes = [op for op in recorded if isinstance(op, ops.Write)]
    assert [(w.fh, w.offset, w.data) for w in writes] == [
        (create.fh, 0, b"hello"),
        (create.fh, 10, b"world"),
    ]
    assert isinstance(recorded[-1], ops.Release) and recorded[-1].fh == create.fh
    mirror.assert_identical()


def test_o_append_sends_the_real_offset(mirror: Mirror) -> None:
    write_file(mirror.p("log"), b"start\n")
    mirror.rec.take()
    a = os.open(mirror.p("log"), os.O_WRONLY | os.O_APPEND)
    b = os.open(mirror.p("log"), os.O_WRONLY | os.O_APPEND)
    c = os.open(mirror.p("log"), os.O_WRONLY)
    try:
        os.write(a, b"a1\n")
        os.write(b, b"b1\n")
        os.pwrite(c, b"XX", 20)  # extends the file with a hole: appends go after it
        os.write(a, b"a2\n")
    finally:
        for fd in (a, b, c):
            os.close(fd)
    expected = b"start\na1\nb1\n" + b"\0" * 8 + b"XXa2\n"
    assert read_file(mirror.p("log")) == expected
    writes = mirror.rec.take(ops.Write)
    assert [(w.offset, w.data) for w in writes] == [
        (6, b"a1\n"),
        (9, b"b1\n"),
        (20, b"XX"),
        (22, b"a2\n"),
    ]
    mirror.assert_identical()


def test_o_trunc_and_o_excl(mirror: Mirror) -> None:
    write_file(mirror.p("t"), b"0123456789")
    mirror.rec.take()
    fd = os.open(mirror.p("t"), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(mirror.p("t")).st_size == 0
    recorded = mirror.rec.take()
    assert isinstance(recorded[0], ops.Open) and recorded[0].path == b"t"
    assert recorded[1] == ops.Truncate(recorded[0].fh, b"t", 0)

    with pytest.raises(FileExistsError):
        os.open(mirror.p("t"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert mirror.rec.take() == []
    fd = os.open(mirror.p("new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    create = mirror.rec.take(ops.Create)
    assert [(c.path, c.mode, c.excl) for c in create] == [(b"new", 0o600, True)]
    mirror.assert_identical()


def test_truncate_and_ftruncate(mirror: Mirror) -> None:
    write_file(mirror.p("t"), b"x" * 100)
    mirror.rec.take()
    os.truncate(mirror.p("t"), 10)
    assert read_file(mirror.p("t")) == b"x" * 10
    assert mirror.rec.take(ops.Truncate) == [ops.Truncate(-1, b"t", 10)]
    fd = os.open(mirror.p("t"), os.O_RDWR)
    try:
        os.ftruncate(fd, 50_000)
        assert os.fstat(fd).st_size == 50_000
        assert os.pread(fd, 20, 0) == b"x" * 10 + b"\0" * 10
    finally:
        os.close(fd)
    opened = mirror.rec.take()
    assert isinstance(opened[0], ops.Open)
    assert ops.Truncate(opened[0].fh, b"t", 50_000) in opened
    mirror.assert_identical()


def test_fallocate_and_punch_hole_keep_files_sparse(mirror: Mirror) -> None:
    size = 1 << 20
    fd = os.open(mirror.p("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, os.urandom(size), 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, size - 2 * 65536)
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 16, 70_000) == b"\0" * 16
        # Holes are visible through the mount (lseek is forwarded).
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 65536
        assert os.lseek(fd, 65536, os.SEEK_DATA) == size - 65536
        fallocate(fd, 0, size, 65536)  # plain allocation past the end grows the file
        assert os.fstat(fd).st_size == size + 65536
    finally:
        os.close(fd)
    st = os.stat(mirror.p("sparse"))
    assert st.st_blocks * 512 < size // 2
    falloc = mirror.rec.take(ops.Fallocate)
    assert [(f.mode, f.offset, f.length) for f in falloc] == [
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, size - 2 * 65536),
        (0, size, 65536),
    ]
    mirror.assert_identical()


def test_file_over_4_gib_stays_sparse(mirror: Mirror) -> None:
    offset = 5 << 30
    fd = os.open(mirror.p("big"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"tail", offset)
        assert os.pread(fd, 4, offset) == b"tail"
        assert os.pread(fd, 4, 1 << 32) == b"\0" * 4
    finally:
        os.close(fd)
    st = os.stat(mirror.p("big"))
    assert st.st_size == offset + 4
    assert st.st_blocks * 512 < 1 << 20
    assert [w.offset for w in mirror.rec.take(ops.Write)] == [offset]
    mirror.assert_identical()


def test_fsync_fdatasync_and_o_dsync_are_forwarded(mirror: Mirror) -> None:
    fd = os.open(mirror.p("db"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    recorded = mirror.rec.take()
    fh = recorded[0].fh  # type: ignore[union-attr]
    assert [op for op in recorded if isinstance(op, ops.Fsync)] == [
        ops.Fsync(fh, b"", False),
        ops.Fsync(fh, b"", True),
    ]
    # O_DSYNC / O_SYNC: the kernel's own fsync after each write is what is forwarded, once
    # per write (fdatasync for O_DSYNC, fsync for O_SYNC), before the write returns
    for flag, datasync in ((os.O_DSYNC, True), (os.O_SYNC, False)):
        fd = os.open(mirror.p("db"), os.O_WRONLY | flag)
        try:
            os.write(fd, b"b")
            after_first = mirror.rec.take()
            os.pwrite(fd, b"c", 1)
        finally:
            os.close(fd)
        recorded = after_first + mirror.rec.take()
        writes = [i for i, op in enumerate(recorded) if isinstance(op, ops.Write)]
        syncs = [i for i, op in enumerate(recorded) if isinstance(op, ops.Fsync)]
        assert len(writes) == 2 and len(syncs) == 2, recorded
        fh = recorded[writes[0]].fh  # type: ignore[union-attr]
        assert [recorded[i + 1] for i in writes] == [ops.Fsync(fh, b"", datasync)] * 2
        assert syncs[0] < len(after_first)  # forwarded before write() returned
    dfd = os.open(mirror.p(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert mirror.rec.take(ops.Fsync) == [ops.Fsync(-1, b"", False)]
    mirror.assert_identical()


_MMAP_WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
with mmap.mmap(fd, int(sys.argv[2]), mmap.MAP_SHARED) as mm:
    mm[mmap.PAGESIZE : mmap.PAGESIZE + 5] = b"mmap!"
    mm.flush()
    print("flushed", flush=True)
    sys.stdin.readline()
os.close(fd)
"""


def test_mmap_writes_reach_the_peer_on_msync(mirror: Mirror) -> None:
    # The mmap'ing program must be another process: a page fault on the mount taken while
    # holding this interpreter's GIL would wait for a FUSE thread that needs that GIL.
    size = 3 * mmap.PAGESIZE
    write_file(mirror.p("m"), b"\0" * size)
    mirror.rec.take()
    child = subprocess.Popen(
        [sys.executable, "-c", _MMAP_WRITER, os.fsdecode(mirror.p("m")), str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"flushed\n"
        writes = mirror.rec.take(ops.Write, settle=False)
        assert any(b"mmap!" in w.data for w in writes), "msync returned before the Write op"
        child.stdin.write(b"\n")
        child.stdin.close()
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert read_file(mirror.p("m"))[mmap.PAGESIZE : mmap.PAGESIZE + 5] == b"mmap!"
    mirror.assert_identical()


# -- namespace ---------------------------------------------------------------------------------


def test_mkdir_rmdir(mirror: Mirror) -> None:
    os.mkdir(mirror.p("d"), 0o750)
    os.mkdir(mirror.p("d", "e"))
    assert stat.S_IMODE(os.stat(mirror.p("d")).st_mode) == 0o750 & ~_umask()
    with pytest.raises(OSError) as info:
        os.rmdir(mirror.p("d"))
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(mirror.p("d"))
    os.rmdir(mirror.p("d", "e"))
    recorded = mirror.rec.take()
    assert [type(op).__name__ for op in recorded] == ["Mkdir", "Mkdir", "Rmdir"]
    assert recorded[1] == ops.Mkdir(b"d/e", 0o777 & ~_umask(), 0, 0)
    assert sorted(os.listdir(mirror.p())) == [b"d"]
    mirror.assert_identical()


def test_setgid_directory_gives_its_group(mirror: Mirror) -> None:
    os.mkdir(mirror.p("g"))
    os.chown(mirror.p("g"), 0, 4321)
    os.chmod(mirror.p("g"), 0o2775)
    os.mkdir(mirror.p("g", "sub"))
    write_file(mirror.p("g", "f"), b"x")
    assert os.stat(mirror.p("g", "sub")).st_gid == 4321
    assert os.stat(mirror.p("g", "sub")).st_mode & stat.S_ISGID
    assert os.stat(mirror.p("g", "f")).st_gid == 4321
    mirror.assert_identical()


def test_unlink_of_an_open_file(mirror: Mirror) -> None:
    fd = os.open(mirror.p("gone"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before")
        os.unlink(mirror.p("gone"))
        assert not os.path.exists(mirror.p("gone"))
        os.write(fd, b"+after")
        assert os.pread(fd, 100, 0) == b"before+after"
        os.ftruncate(fd, 9)
        assert os.pread(fd, 100, 0) == b"before+af"
        assert os.listdir(mirror.p()) == []
    finally:
        os.close(fd)
    kinds = [type(op).__name__ for op in mirror.rec.take()]
    assert kinds == ["Create", "Write", "Unlink", "Write", "Truncate", "Release"]
    mirror.assert_identical()


def test_rename_over_files_dirs_and_flags(mirror: Mirror) -> None:
    write_file(mirror.p("a"), b"A")
    write_file(mirror.p("b"), b"B")
    os.makedirs(mirror.p("d1", "inner"))
    write_file(mirror.p("d1", "inner", "x"), b"X")
    mirror.rec.take()

    os.rename(mirror.p("a"), mirror.p("b"))  # over an existing file
    assert read_file(mirror.p("b")) == b"A" and not os.path.exists(mirror.p("a"))
    os.rename(mirror.p("d1"), mirror.p("d2"))  # a directory with content
    assert read_file(mirror.p("d2", "inner", "x")) == b"X"
    write_file(mirror.p("c"), b"C")
    mirror.rec.take(ops.Rename)
    with pytest.raises(FileExistsError):
        renameat2(AT_FDCWD, mirror.p("c"), AT_FDCWD, mirror.p("b"), RENAME_NOREPLACE)
    assert read_file(mirror.p("b")) == b"A"
    renameat2(AT_FDCWD, mirror.p("c"), AT_FDCWD, mirror.p("b"), RENAME_EXCHANGE)
    assert read_file(mirror.p("b")) == b"C" and read_file(mirror.p("c")) == b"A"
    renameat2(AT_FDCWD, mirror.p("c"), AT_FDCWD, mirror.p("e"), RENAME_NOREPLACE)
    assert mirror.rec.take(ops.Rename) == [
        ops.Rename(b"c", b"b", RENAME_EXCHANGE),
        ops.Rename(b"c", b"e", RENAME_NOREPLACE),
    ]
    mirror.assert_identical()


def test_hard_links(mirror: Mirror) -> None:
    write_file(mirror.p("one"), b"shared")
    mirror.rec.take()
    os.link(mirror.p("one"), mirror.p("two"))
    assert os.stat(mirror.p("one")).st_nlink == 2
    assert os.stat(mirror.p("two")).st_ino == os.stat(mirror.p("one")).st_ino
    assert mirror.rec.take() == [ops.Link(b"one", b"two")]
    write_file(mirror.p("two"), b"SHARED")
    assert read_file(mirror.p("one")) == b"SHARED"
    mirror.assert_identical()


def test_symlinks_are_stored_as_is(mirror: Mirror) -> None:
    write_file(mirror.p("target"), b"t")
    mirror.rec.take()
    os.symlink(b"target", mirror.p("rel"))
    os.symlink(b"/etc/passwd", mirror.p("abs"))
    os.symlink(b"../../nowhere", mirror.p("dangling"))
    assert os.readlink(mirror.p("rel")) == b"target"
    assert os.readlink(mirror.p("abs")) == b"/etc/passwd"
    assert read_file(mirror.p("rel")) == b"t"
    assert stat.S_ISLNK(os.lstat(mirror.p("dangling")).st_mode)
    os.chown(mirror.p("rel"), 1001, 1002, follow_symlinks=False)
    assert os.lstat(mirror.p("rel")).st_uid == 1001
    assert os.stat(mirror.p("target")).st_uid == 0
    got = mirror.rec.take()
    links = [(b"target", b"rel"), (b"/etc/passwd", b"abs"), (b"../../nowhere", b"dangling")]
    expected: list[object] = []
    for content, name in links:
        mtime = os.lstat(mirror.p(name.decode())).st_mtime_ns
        # Each link's own times follow it, so the peer's link is not a few ms younger (the
        # atime sent is the one at creation; readlink above may have moved it since).
        sent = next(o for o in got if isinstance(o, ops.Utimens) and o.path == name)
        expected += [ops.Symlink(content, name, 0, 0), ops.Utimens(name, sent.atime_ns, mtime)]
    expected.append(ops.Chown(b"rel", 1001, 1002))
    assert got == expected
    mirror.assert_identical()


def test_fifo_and_devices(mirror: Mirror) -> None:
    os.mkfifo(mirror.p("pipe"), 0o600)
    assert stat.S_ISFIFO(os.lstat(mirror.p("pipe")).st_mode)
    with pytest.raises(PermissionError):
        os.mknod(mirror.p("null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert mirror.rec.take() == [ops.Mknod(b"pipe", stat.S_IFIFO | 0o600, 0, 0)]
    mirror.assert_identical()


def test_names_with_spaces_and_non_ascii_bytes(mirror: Mirror) -> None:
    names = [b"with space", b"caf\xc3\xa9", b"raw\xff\xfe", b"tab\tand\nnewline"]
    for name in names:
        write_file(mirror.p(name), name)
    os.mkdir(mirror.p(b"dir \xe2\x98\x83"))
    os.rename(mirror.p(b"raw\xff\xfe"), mirror.p(b"dir \xe2\x98\x83", b"moved\xff"))
    assert sorted(os.listdir(mirror.p())) == sorted(
        [b"with space", b"caf\xc3\xa9", b"tab\tand\nnewline", b"dir \xe2\x98\x83"]
    )
    assert read_file(mirror.p(b"dir \xe2\x98\x83", b"moved\xff")) == b"raw\xff\xfe"
    paths = {op.path for op in mirror.rec.take(ops.Create)}  # type: ignore[union-attr]
    assert paths == set(names)
    mirror.assert_identical()


# -- metadata ----------------------------------------------------------------------------------


def test_chmod_chown_utimens(mirror: Mirror) -> None:
    write_file(mirror.p("f"), b"x")
    mirror.rec.take()
    os.chmod(mirror.p("f"), 0o4751)
    assert stat.S_IMODE(os.stat(mirror.p("f")).st_mode) == 0o4751
    os.chown(mirror.p("f"), 1234, 5678)
    st = os.stat(mirror.p("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(mirror.p("f"), -1, 99)
    assert os.stat(mirror.p("f")).st_uid == 1234
    os.utime(mirror.p("f"), ns=(1_234_567_890_123_456_789, 987_654_321_987_654_321))
    st = os.stat(mirror.p("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_234_567_890_123_456_789, 987_654_321_987_654_321)
    assert stat.S_IMODE(os.stat(mirror.p("f")).st_mode) == 0o751  # chown cleared setuid
    assert mirror.rec.take() == [
        ops.Chmod(b"f", 0o4751),
        ops.Chown(b"f", 1234, 5678),  # clears setuid on each copy, as chown does there
        ops.Chown(b"f", -1, 99),
        ops.Utimens(b"f", 1_234_567_890_123_456_789, 987_654_321_987_654_321),
    ]

    os.utime(mirror.p("f"))  # "now": the op carries the real time, not UTIME_NOW
    now = mirror.rec.take(ops.Utimens)
    st = os.stat(mirror.p("f"))
    assert now == [ops.Utimens(b"f", st.st_atime_ns, st.st_mtime_ns)]
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * 10**9

    times = (ctypes.c_long * 4)(0, UTIME_OMIT, 42, 7)  # keep atime, set mtime to 42.000000007
    assert _libc.utimensat(AT_FDCWD, mirror.p("f"), times, 0) == 0
    st2 = os.stat(mirror.p("f"))
    assert (st2.st_atime_ns, st2.st_mtime_ns) == (st.st_atime_ns, 42_000_000_007)
    assert mirror.rec.take(ops.Utimens) == [ops.Utimens(b"f", st.st_atime_ns, 42_000_000_007)]
    os.chmod(mirror.p(), 0o711)
    assert mirror.rec.take() == [ops.Chmod(b"", 0o711)]
    mirror.assert_identical()


def test_extended_attributes(mirror: Mirror) -> None:
    write_file(mirror.p("f"), b"x")
    os.mkdir(mirror.p("d"))
    mirror.rec.take()
    os.setxattr(mirror.p("f"), b"user.one", b"1")
    os.setxattr(mirror.p("f"), b"user.bin", b"\0\xff" * 100)
    os.setxattr(mirror.p("d"), b"user.dir", b"d")
    assert os.getxattr(mirror.p("f"), b"user.bin") == b"\0\xff" * 100
    assert sorted(os.listxattr(mirror.p("f"))) == ["user.bin", "user.one"]
    with pytest.raises(FileExistsError):
        os.setxattr(mirror.p("f"), b"user.one", b"2", os.XATTR_CREATE)
    with pytest.raises(OSError) as info:
        os.setxattr(mirror.p("f"), b"user.missing", b"2", os.XATTR_REPLACE)
    assert info.value.errno == errno.ENODATA
    os.removexattr(mirror.p("f"), b"user.one")
    with pytest.raises(OSError) as info:
        os.getxattr(mirror.p("f"), b"user.one")
    assert info.value.errno == errno.ENODATA
    assert mirror.rec.take() == [
        ops.SetXattr(b"f", b"user.one", b"1", 0),
        ops.SetXattr(b"f", b"user.bin", b"\0\xff" * 100, 0),
        ops.SetXattr(b"d", b"user.dir", b"d", 0),
        ops.RemoveXattr(b"f", b"user.one"),
    ]
    mirror.assert_identical()


def test_statfs_is_the_real_filesystem(mirror: Mirror) -> None:
    through = os.statvfs(mirror.root)
    real = os.statvfs(mirror.real_fd)
    assert (through.f_bsize, through.f_blocks, through.f_files) == (
        real.f_bsize,
        real.f_blocks,
        real.f_files,
    )
    assert mirror.rec.take() == []


# -- workloads ---------------------------------------------------------------------------------


def _random_worker(mirror: Mirror, n: int, steps: int, errors: list[BaseException]) -> None:
    """Random ops in its own directory, each checked against an in-memory model."""
    rng = random.Random(1000 + n)
    top = mirror.p(f"t{n}")
    names = [f"f{i}".encode() for i in range(5)]
    inode_of: dict[bytes, int] = {}  # name -> model inode
    data: dict[int, bytearray] = {}
    next_inode = 0
    dirs: set[bytes] = set()
    try:
        os.mkdir(top)
        for _ in range(steps):
            action = rng.choice(["write", "append", "truncate", "rename", "unlink", "link", "dir"])
            name = rng.choice(names)
            path = os.path.join(top, name)
            if action == "write":
                offset, chunk = rng.randrange(0, 9000), rng.randbytes(rng.randrange(1, 3000))
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                os.pwrite(fd, chunk, offset)
                os.close(fd)
                if name not in inode_of:
                    inode_of[name], next_inode = next_inode, next_inode + 1
                    data[inode_of[name]] = bytearray()
                buf = data[inode_of[name]]
                buf.extend(b"\0" * max(0, offset + len(chunk) - len(buf)))
                buf[offset : offset + len(chunk)] = chunk
            elif action == "append":
                chunk = rng.randbytes(rng.randrange(1, 500))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.write(fd, chunk)
                os.close(fd)
                if name not in inode_of:
                    inode_of[name], next_inode = next_inode, next_inode + 1
                    data[inode_of[name]] = bytearray()
                data[inode_of[name]].extend(chunk)
            elif action == "truncate":
                length = rng.randrange(0, 12000)
                if name in inode_of:
                    os.truncate(path, length)
                    buf = data[inode_of[name]]
                    del buf[length:]
                    buf.extend(b"\0" * (length - len(buf)))
                else:
                    with pytest.raises(FileNotFoundError):
                        os.truncate(path, length)
            elif action == "rename":
                new = rng.choice(names)
                if name in inode_of:
                    os.rename(path, os.path.join(top, new))
                    if new != name and inode_of.get(new) != inode_of[name]:
                        inode_of[new] = inode_of.pop(name)
                else:
                    with pytest.raises(FileNotFoundError):
                        os.rename(path, os.path.join(top, new))
            elif action == "unlink":
                if name in inode_of:
                    os.unlink(path)
                    del inode_of[name]
                else:
                    with pytest.raises(FileNotFoundError):
                        os.unlink(path)
            elif action == "link":
                new = rng.choice(names)
                if name in inode_of and new not in inode_of:
                    os.link(path, os.path.join(top, new))
                    inode_of[new] = inode_of[name]
                elif name in inode_of:
                    with pytest.raises(FileExistsError):
                        os.link(path, os.path.join(top, new))
            else:
                sub = rng.choice([b"d0", b"d1"])
                if sub in dirs:
                    os.rmdir(os.path.join(top, sub))
                    dirs.remove(sub)
                else:
                    os.mkdir(os.path.join(top, sub))
                    dirs.add(sub)
            # Step check: the listing and every file's content match the model.
            assert sorted(os.listdir(top)) == sorted([*inode_of, *dirs])
            for entry, ino in inode_of.items():
                assert read_file(os.path.join(top, entry)) == bytes(data[ino])
    except BaseException as exc:
        errors.append(exc)


def test_multithreaded_random_workload_matches_model(mirror: Mirror) -> None:
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_random_worker, args=(mirror, n, 150, errors)) for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not any(thread.is_alive() for thread in threads), "worker threads hung"
    if errors:
        raise errors[0]
    mirror.assert_identical()


def _make_source_tree(base: Path) -> None:
    rng = random.Random(7)
    for d in range(4):
        sub = base / f"dir {d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(6):
            target = sub / f"file-{f}.bin"
            target.write_bytes(rng.randbytes(rng.randrange(0, 200_000)))
            os.chmod(target, rng.choice([0o644, 0o600, 0o755, 0o4755]))
            os.utime(target, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789 + f))
            os.chown(target, 1000 + f, 2000 + d)
    (base / "caf\u00e9.txt").write_text("unicode name")
    (base / "link").symlink_to("dir 0/nested/file-0.bin")
    os.link(base / "dir 1" / "nested" / "file-1.bin", base / "hard")
    with open(base / "sparse", "wb") as f:
        f.seek(10 << 20)
        f.write(b"end")


def test_extract_a_tarball_through_the_mount(mirror: Mirror, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    _make_source_tree(source)
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w") as tar:
        tar.add(source, arcname=".")
    blob.seek(0)
    with tarfile.open(fileobj=blob, mode="r") as tar:
        tar.extractall(os.fsdecode(mirror.p()), numeric_owner=True, filter="fully_trusted")
    src_fd = os.open(source, os.O_PATH | os.O_DIRECTORY)
    try:
        expected = snapshot(src_fd)
    finally:
        os.close(src_fd)
    got = snapshot(mirror.real_fd)
    # tarfile writes sparse files densely, keeps mtimes as float seconds and sets the root's
    # own times: compare what a user would, the extent map aside, mtimes to the millisecond.
    for tree in (expected, got):
        tree.pop(b".")
        for key, value in list(tree.items()):
            if key != b"<hard links>" and stat.S_ISREG(value[0]):
                tree[key] = (*value[:6], value[6] // 10**6, value[7], value[9])
    assert got == expected
    mirror.assert_identical()


def test_sqlite_transactions(mirror: Mirror) -> None:
    db = os.fsdecode(mirror.p("app.db"))
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)")
        rng = random.Random(3)
        for i in range(300):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t (v, n) VALUES (?, ?)", (rng.randbytes(200).hex(), i))
            if i % 7 == 0:
                conn.execute("UPDATE t SET n = n + 1 WHERE id % 5 = ?", (i % 5,))
            if i % 11 == 0:
                conn.execute("DELETE FROM t WHERE id = ?", (rng.randrange(1, i + 2),))
            conn.execute("COMMIT")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count = conn.execute("SELECT count(*), sum(n) FROM t").fetchone()
    finally:
        conn.close()
    assert mirror.rec.take(ops.Fsync), "SQLite's fsyncs must be forwarded"
    mirror.assert_identical()
    shadow = sqlite3.connect(os.path.join(mirror.shadow_path, "app.db"))
    try:
        assert shadow.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert shadow.execute("SELECT count(*), sum(n) FROM t").fetchone() == count
    finally:
        shadow.close()


# -- lifecycle ---------------------------------------------------------------------------------


def test_mount_lifecycle_is_idempotent(tmp_path: Path, fuse_required: None) -> None:
    from app.mirror.mount import MirrorMount, fuse_mounts
    from app.mirror.ops import LocalOnly

    data = tmp_path / "data"
    data.mkdir()
    (data / "before").write_bytes(b"kept")
    mount = MirrorMount(data, LocalOnly())
    try:
        mount.start()
        mount.start()
        mount.wait_ready(10)
        assert [m.fstype for m in fuse_mounts(data)] == ["fuse.mirrorha"]
        assert (data / "before").read_bytes() == b"kept"
        held = os.open(data / "before", os.O_RDONLY)  # lazy unmount with a file still open
        try:
            mount.stop()
            assert fuse_mounts(data) == []
            assert not mount.running
        finally:
            os.close(held)
        mount.stop()
        with MirrorMount(data, LocalOnly()) as again:
            (data / "after").write_bytes(b"new")
            assert again.running
        assert fuse_mounts(data) == []
        assert (data / "after").read_bytes() == b"new"
    finally:
        mount.stop()


_CRASHER = """
import os, sys
from app.mirror.mount import MirrorMount
from app.mirror.ops import LocalOnly
m = MirrorMount(sys.argv[1], LocalOnly())
m.start(); m.wait_ready(10)
print("ready", flush=True)
sys.stdin.read()
"""


def test_stale_mount_of_a_crashed_daemon_is_cleaned(tmp_path: Path, fuse_required: None) -> None:
    from app.mirror.mount import MirrorMount, clean_stale_mount, fuse_mounts
    from app.mirror.ops import LocalOnly

    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_bytes(b"x")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        with pytest.raises(OSError) as info:
            os.listdir(data)
        assert info.value.errno == errno.ENOTCONN
        assert clean_stale_mount(data) is True
        assert fuse_mounts(data) == []
        assert (data / "file").read_bytes() == b"x"
        assert clean_stale_mount(data) is False
        # A new mount over a stale one cleans it by itself.
        with MirrorMount(data, LocalOnly()):
            assert (data / "file").read_bytes() == b"x"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        clean_stale_mount(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- exclusions --------------------------------------------------------------------------------

EXCLUDE = ("*.tmp", "cache/")


@pytest.fixture
def excl(tmp_path: Path, mount_factory: Callable[..., Any]) -> Iterator[Mirror]:
    """A mirror whose mount excludes ``EXCLUDE`` (as examples/lab.toml)."""
    real = tmp_path / "data"
    shadow_dir = tmp_path / "shadow"
    real.mkdir()
    shadow_dir.mkdir()
    real_fd = os.open(real, os.O_PATH | os.O_DIRECTORY)
    shadow = Shadow(str(shadow_dir))
    rec = Recorder(shadow)
    try:
        mount = mount_factory(str(real), rec, exclude=EXCLUDE)
        yield Mirror(str(real), real_fd, str(shadow_dir), shadow, rec, mount)
        mount.stop()
    finally:
        shadow.close()
        os.close(real_fd)


def assert_identical_but_excluded(m: Mirror) -> None:
    """The shadow equals the real tree minus its excluded entries."""
    from app.mirror.exclude import Exclusions

    ex = Exclusions(EXCLUDE)
    m.rec.settle()
    real = snapshot(m.real_fd)
    kept = {
        k: v
        for k, v in real.items()
        if k in (b".", b"<hard links>") or not ex.excluded(k, v[0] == stat.S_IFDIR)
    }
    groups = (tuple(p for p in g if not ex.excluded(p, False)) for g in real[b"<hard links>"])
    kept[b"<hard links>"] = tuple(sorted(g for g in groups if len(g) > 1))
    assert kept == snapshot(m.shadow.fd)


def _paths(recorded: list[ops.Op]) -> set[bytes]:
    names = ("path", "old", "new")
    return {getattr(op, n) for op in recorded for n in names if hasattr(op, n)} | {
        op.new for op in recorded if isinstance(op, ops.Link)
    }


def test_excluded_files_and_directories_stay_local(excl: Mirror) -> None:
    os.mkdir(excl.p("sub"))
    write_file(excl.p("sub", "work.tmp"), b"scratch")
    os.truncate(excl.p("sub", "work.tmp"), 3)
    os.chmod(excl.p("sub", "work.tmp"), 0o600)
    os.setxattr(excl.p("sub", "work.tmp"), b"user.k", b"v")
    os.rename(excl.p("sub", "work.tmp"), excl.p("sub", "other.tmp"))
    os.mkdir(excl.p("cache"))
    os.mkdir(excl.p("sub", "cache"))
    os.makedirs(excl.p("cache", "deep", "er"))
    write_file(excl.p("cache", "deep", "page.html"), b"<p>")
    os.symlink(b"page.html", excl.p("cache", "deep", "link"))
    fd = os.open(excl.p("sub", "cache", "blob"), os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
    os.write(fd, b"x" * 5000)
    os.fsync(fd)
    os.close(fd)
    write_file(excl.p("cache.txt"), b"kept")  # neither *.tmp nor a directory named cache
    write_file(excl.p("sub", "notes"), b"kept too")
    os.mkdir(excl.p("keep.d"))
    write_file(excl.p("keep.d", "cache"), b"a file named cache is replicated")
    assert read_file(excl.p("sub", "other.tmp")) == b"scr"
    assert read_file(excl.p("cache", "deep", "page.html")) == b"<p>"
    sent = _paths(excl.rec.take())
    assert sent == {b"sub", b"cache.txt", b"sub/notes", b"keep.d", b"keep.d/cache"}
    assert sorted(os.listdir(excl.shadow_path)) == ["cache.txt", "keep.d", "sub"]
    assert os.listdir(os.path.join(excl.shadow_path, "sub")) == ["notes"]
    assert_identical_but_excluded(excl)
    shutil.rmtree(excl.p("cache"))
    os.unlink(excl.p("sub", "other.tmp"))
    assert excl.rec.take() == [], "removing excluded entries sends nothing"


def test_rename_from_excluded_to_replicated_sends_the_whole_file(excl: Mirror) -> None:
    data = os.urandom(70_000)
    fd = os.open(excl.p("upload.tmp"), os.O_WRONLY | os.O_CREAT, 0o640)
    os.pwrite(fd, data, 0)
    os.pwrite(fd, b"end", 3 << 20)  # a hole between the two extents
    os.close(fd)
    os.setxattr(excl.p("upload.tmp"), b"user.origin", b"browser")
    os.utime(excl.p("upload.tmp"), ns=(1_000_000_000, 2_000_000_000))
    write_file(excl.p("config"), b"old")
    write_file(excl.p("config.tmp"), b"new config")
    excl.rec.take()
    os.rename(excl.p("upload.tmp"), excl.p("upload.bin"))
    recorded = excl.rec.take()
    kinds = [type(op) for op in recorded]
    assert kinds[0] is ops.Create and kinds[-2:] == [ops.SetXattr, ops.Utimens]
    assert ops.Release in kinds and ops.Truncate in kinds
    assert b"upload.tmp" not in _paths(recorded)
    create = recorded[0]
    assert isinstance(create, ops.Create)
    assert (create.path, create.mode, create.excl) == (b"upload.bin", 0o640, True)
    writes = [op for op in recorded if isinstance(op, ops.Write)]
    assert sum(len(w.data) for w in writes) < 200_000, "the hole is not sent as zeros"
    last = recorded[-1]
    assert isinstance(last, ops.Utimens)
    assert (last.path, last.mtime_ns) == (b"upload.bin", 2_000_000_000)
    # Replacing a replicated file: the old one is unlinked on the peer first.
    os.rename(excl.p("config.tmp"), excl.p("config"))
    recorded = excl.rec.take()
    assert recorded[0] == ops.Unlink(b"config")
    assert isinstance(recorded[1], ops.Create) and recorded[1].path == b"config"
    with open(os.path.join(excl.shadow_path, "config"), "rb") as f:
        assert f.read() == b"new config"
    assert_identical_but_excluded(excl)


def test_open_handles_follow_their_file_across_the_boundary(excl: Mirror) -> None:
    fd = os.open(excl.p("log.tmp"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"one\n")
        assert excl.rec.take(settle=False) == []
        os.rename(excl.p("log.tmp"), excl.p("log"))
        os.write(fd, b"two\n")  # now replicated through the same handle
    finally:
        os.close(fd)
    recorded = excl.rec.take()
    create = recorded[0]
    assert isinstance(create, ops.Create) and create.path == b"log"
    opened = [op for op in recorded if isinstance(op, ops.Open)]
    assert [op.path for op in opened] == [b"log"]
    assert ops.Write(opened[0].fh, 4, b"two\n") in recorded
    assert read_file(excl.p("log")) == b"one\ntwo\n"
    assert_identical_but_excluded(excl)

    fd = os.open(excl.p("log"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"three\n")
        os.rename(excl.p("log"), excl.p("log.1.tmp"))
        os.write(fd, b"four\n")  # local only now
    finally:
        os.close(fd)
    recorded = excl.rec.take()
    assert ops.Unlink(b"log") in recorded
    after = recorded[recorded.index(ops.Unlink(b"log")) + 1 :]
    assert [type(op) for op in after] == [ops.Release], "the handle is released on the peer"
    assert read_file(excl.p("log.1.tmp")) == b"one\ntwo\nthree\nfour\n"
    assert not os.path.exists(os.path.join(excl.shadow_path, "log"))
    assert_identical_but_excluded(excl)


def test_rename_from_replicated_to_excluded_sends_an_unlink(excl: Mirror) -> None:
    write_file(excl.p("report"), b"draft")
    os.symlink(b"report", excl.p("current"))
    excl.rec.take()
    os.rename(excl.p("report"), excl.p("report.tmp"))
    assert excl.rec.take() == [ops.Unlink(b"report")]
    os.rename(excl.p("current"), excl.p("current.tmp"))
    assert excl.rec.take() == [ops.Unlink(b"current")]
    os.rename(excl.p("current.tmp"), excl.p("current"))  # a symlink comes back as a Symlink
    recorded = excl.rec.take()
    assert recorded[0] == ops.Symlink(b"report", b"current", 0, 0)
    assert read_file(excl.p("report.tmp")) == b"draft"
    assert_identical_but_excluded(excl)


def test_links_and_directories_do_not_cross_the_boundary(excl: Mirror) -> None:
    write_file(excl.p("a.tmp"), b"a")
    write_file(excl.p("b"), b"b")
    os.mkdir(excl.p("cache"))
    os.mkdir(excl.p("dir"))
    write_file(excl.p("dir", "f"), b"f")
    excl.rec.take()
    crossing = [
        lambda: os.link(excl.p("a.tmp"), excl.p("a")),
        lambda: os.link(excl.p("b"), excl.p("b.tmp")),
        lambda: os.rename(excl.p("cache"), excl.p("kept")),
        lambda: os.rename(excl.p("dir"), excl.p("dir.tmp")),
        lambda: renameat2(AT_FDCWD, excl.p("a.tmp"), AT_FDCWD, excl.p("b"), RENAME_EXCHANGE),
    ]
    for call in crossing:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EXDEV
    os.link(excl.p("b"), excl.p("b2"))
    with pytest.raises(OSError) as info:
        os.rename(excl.p("b2"), excl.p("b2.tmp"))  # one inode, names on both sides: refused
    assert info.value.errno == errno.EXDEV
    os.link(excl.p("a.tmp"), excl.p("a2.tmp"))  # on one side each: fine
    os.rename(excl.p("dir"), excl.p("dir2"))
    assert excl.rec.take() == [ops.Link(b"b", b"b2"), ops.Rename(b"dir", b"dir2", 0)]
    assert sorted(os.listdir(excl.root)) == ["a.tmp", "a2.tmp", "b", "b2", "cache", "dir2"]
    assert_identical_but_excluded(excl)


NOBODY = ("--reuid=65534", "--regid=65534")


def _unprivileged(fd: int, code: str, *setpriv: str) -> None:
    """Run ``code`` (with ``fd`` as ``sys.argv[1]``) as nobody, which holds no CAP_FSETID.

    Root opens and the child inherits the descriptor: the tmp dirs above the mount are not
    searchable by others.
    """
    subprocess.run(
        ["setpriv", *NOBODY, *(setpriv or ("--clear-groups",)), "/usr/bin/python3", "-c",
         "import os, sys; fd = int(sys.argv[1]); " + code, str(fd)],
        pass_fds=(fd,), check=True, timeout=60,
    )  # fmt: skip


def _mode(mirror: Mirror, name: str) -> int:
    return stat.S_IMODE(os.stat(mirror.p(name)).st_mode)


def test_write_by_an_unprivileged_user_clears_setuid_and_setgid(mirror: Mirror) -> None:
    # the kernel leaves this to the mount (FUSE_HANDLE_KILLPRIV_V2): the mount clears them
    write_file(mirror.p("s"), b"x")
    os.chmod(mirror.p("s"), 0o6777)
    mirror.rec.take()
    fd = os.open(mirror.p("s"), os.O_WRONLY | os.O_APPEND)
    try:
        _unprivileged(fd, "os.write(fd, b'y')")
    finally:
        os.close(fd)
    assert _mode(mirror, "s") == 0o777
    assert ops.Chmod(b"s", 0o777) in mirror.rec.take()
    assert read_file(mirror.p("s")) == b"xy"
    mirror.assert_identical()


def test_setuid_set_while_a_handle_is_open_is_still_cleared_by_its_next_write(
    mirror: Mirror,
) -> None:
    """A handle that wrote while the file had no set-ID bit skips the mode check on later
    writes only until a chmod: one made by name, or through another handle, counts."""
    write_file(mirror.p("s"), b"")
    fd = os.open(mirror.p("s"), os.O_WRONLY)
    other = os.open(mirror.p("s"), os.O_RDONLY)
    try:
        _unprivileged(fd, "os.pwrite(fd, b'a', 0)")  # no set-ID bit: remembered
        for i, chmod in enumerate(
            (lambda: os.chmod(mirror.p("s"), 0o4777), lambda: os.fchmod(other, 0o2777))
        ):
            chmod()
            mirror.rec.take()
            _unprivileged(fd, f"os.pwrite(fd, b'b', {i + 1})")
            assert _mode(mirror, "s") == 0o777, i
            assert mirror.rec.take(ops.Chmod) == [ops.Chmod(b"s", 0o777)], i
    finally:
        os.close(fd)
        os.close(other)
    assert read_file(mirror.p("s")) == b"abb"
    mirror.assert_identical()


def test_truncate_and_allocation_by_an_unprivileged_user_clear_setuid(mirror: Mirror) -> None:
    write_file(mirror.p("s"), b"x" * 10)
    changes = {
        "ftruncate": "os.ftruncate(fd, 3)",
        "fallocate": "os.posix_fallocate(fd, 0, 8192)",
        "truncate by name": "os.truncate(f'/proc/self/fd/{fd}', 2)",  # no handle
    }
    for what, code in changes.items():
        os.chmod(mirror.p("s"), 0o4777)
        mirror.rec.take()
        fd = os.open(mirror.p("s"), os.O_RDWR)
        try:
            _unprivileged(fd, code)
        finally:
            os.close(fd)
        assert _mode(mirror, "s") == 0o777, what
        assert mirror.rec.take(ops.Chmod) == [ops.Chmod(b"s", 0o777)], what
        mirror.assert_identical()


def test_writes_by_root_and_mmap_keep_setuid(mirror: Mirror) -> None:
    # root holds CAP_FSETID: its write clears nothing, as on a local filesystem; nor does an
    # mmap'ed page written back, whoever wrote it (in a child: see the msync test)
    write_file(mirror.p("s"), b"x" * 4096)
    os.chmod(mirror.p("s"), 0o6777)
    mirror.rec.take()
    fd = os.open(mirror.p("s"), os.O_RDWR)
    try:
        os.pwrite(fd, b"root", 0)
        os.ftruncate(fd, 4096)
        _unprivileged(fd, "import mmap; m = mmap.mmap(fd, 4096); m[4:8] = b'mmap'; m.flush()")
    finally:
        os.close(fd)
    assert _mode(mirror, "s") == 0o6777
    assert mirror.rec.take(ops.Chmod) == []
    assert read_file(mirror.p("s"))[:8] == b"rootmmap"
    mirror.assert_identical()


def test_setgid_without_group_execute_is_cleared_only_for_a_writer_outside_the_group(
    mirror: Mirror,
) -> None:
    write_file(mirror.p("g"), b"x")
    os.chown(mirror.p("g"), 0, 0)
    os.chmod(mirror.p("g"), 0o2666)  # setgid, no group execute: kept for a group member
    mirror.rec.take()
    fd = os.open(mirror.p("g"), os.O_WRONLY | os.O_APPEND)
    try:
        _unprivileged(fd, "os.write(fd, b'1')", "--groups=0")
        assert _mode(mirror, "g") == 0o2666
        _unprivileged(fd, "os.write(fd, b'2')")  # in no group
    finally:
        os.close(fd)
    assert _mode(mirror, "g") == 0o666
    assert mirror.rec.take(ops.Chmod) == [ops.Chmod(b"g", 0o666)]
    mirror.assert_identical()


# struct vfs_cap_data, revision 2, effective, permitted CAP_NET_BIND_SERVICE
FILE_CAPS = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


def test_a_write_removes_file_capabilities_on_both_copies(mirror: Mirror) -> None:
    write_file(mirror.p("c"), b"x")
    os.setxattr(mirror.p("c"), b"security.capability", FILE_CAPS)
    assert os.getxattr(mirror.p("c"), b"security.capability") == FILE_CAPS
    mirror.assert_identical()  # the shadow has them too
    with open(mirror.p("c"), "r+b") as f:
        f.write(b"y")
    for copy in (mirror.p("c"), os.path.join(mirror.shadow_path.encode(), b"c")):
        with pytest.raises(OSError) as caught:
            os.getxattr(copy, b"security.capability")
        assert caught.value.errno == errno.ENODATA, copy
    mirror.assert_identical()


def _fusectl_mounted() -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == "/sys/fs/fuse/connections" for line in f)


def test_stop_aborts_a_mount_a_process_still_holds_and_leaves_fusectl_as_found(
    tmp_path: Path, fuse_required: None
) -> None:
    from app.mirror.mount import MirrorMount

    real = tmp_path / "held"
    real.mkdir()
    fusectl_before = _fusectl_mounted()
    mount = MirrorMount(real, ops.LocalOnly(), stop_timeout=1.0)
    mount.start()
    mount.wait_ready(10.0)
    # a process whose working directory is inside the mount keeps the detached tree alive
    holder = subprocess.Popen(["sleep", "60"], cwd=real)
    try:
        mount.stop()  # detach, the loop goes on for the holder, so the connection is aborted
        assert not mount.running
        assert _fusectl_mounted() == fusectl_before
    finally:
        holder.kill()
        holder.wait(10)
        mount.stop()


class _PauseFirstUtimens:
    """A replicator that records ops and, once armed, holds the next Utimens until told."""

    def __init__(self) -> None:
        self.ops: list[ops.Op] = []
        self.armed = threading.Event()
        self.paused = threading.Event()
        self.go = threading.Event()

    def apply(self, op: ops.Op, local: Callable[[], Any]) -> Any:
        if isinstance(op, ops.Utimens) and self.armed.is_set():
            self.armed.clear()
            self.paused.set()
            self.go.wait(10)
        result = local()
        self.ops.append(op)
        return result


def test_times_read_at_release_never_land_after_a_later_utimens(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    # The kernel sends RELEASE after close() returned; an application that sets the file's
    # times right after closing it (tar, cp -p) races with the release's own time sync.
    real = tmp_path / "real"
    real.mkdir()
    rec = _PauseFirstUtimens()
    mount_factory(str(real), rec)
    path = real / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"data")
    rec.armed.set()
    os.close(fd)
    assert rec.paused.wait(10), "the release never synced the file's times"
    setter = threading.Thread(target=os.utime, args=(path,), kwargs={"ns": (1, 2)})
    setter.start()
    setter.join(0.5)  # before the fix it finished here, while the release's times were held
    rec.go.set()
    setter.join(10)
    assert not setter.is_alive()
    assert os.stat(path).st_mtime_ns == 2
    times = [op for op in rec.ops if isinstance(op, ops.Utimens) and op.path == b"f"]
    assert times[-1] == ops.Utimens(b"f", 1, 2), times
