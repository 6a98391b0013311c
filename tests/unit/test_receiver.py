"""The receiver: every op gives the same tree as plain os calls; nothing leaves the root."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.mirror import ops
from app.mirror.errors import ApplyError, PathEscape
from app.mirror.protocol import Ack, Nack, Request
from app.mirror.receiver import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Receiver,
)

ROOT_USER = os.geteuid() == 0
UID, GID = (1234, 5678) if ROOT_USER else (os.getuid(), os.getgid())
GIB = 2**30


def tree(base: Path) -> dict[str, Any]:
    """What a user would compare between two trees: names, types, modes, owners, contents,
    link targets, xattrs, hard-link groups, explicit times."""
    out: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(base)):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, os.fsencode(base)).decode("utf-8", "surrogateescape")
            st = os.lstat(full)
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
            }
            if not stat.S_ISLNK(st.st_mode):
                entry["mode"] = stat.S_IMODE(st.st_mode)
                entry["xattrs"] = {
                    x: os.getxattr(full, x) for x in sorted(os.listxattr(full)) if "user." in x
                }
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["digest"] = _sparse_digest(full, st.st_size)
                inodes.setdefault(st.st_ino, []).append(rel)
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(full)
                entry["mtime"] = st.st_mtime_ns
            if st.st_mtime_ns % 10**9 == 123:  # times set explicitly by the scenario
                entry["mtime"] = st.st_mtime_ns
            out[rel] = entry
    out["<hard links>"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


def _sparse_digest(path: bytes, size: int) -> str:
    """Digest of the non-zero runs and their offsets: the logical content, whatever the
    allocation; read with SEEK_DATA so 5 GiB sparse files stay cheap."""
    digest = hashlib.sha256(str(size).encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            assert end - start <= 64 << 20, "test files keep their data regions small"
            for run in re.finditer(rb"[^\x00]+", os.pread(fd, end - start, start)):
                digest.update(b"%d:%d:" % (start + run.start(), len(run.group())) + run.group())
            pos = end
    finally:
        os.close(fd)
    return digest.hexdigest()


def plain(base: Path, op: ops.Op, handles: dict[int, int]) -> None:
    """The same op with plain path-based os calls: the reference the receiver must match."""

    def p(rel: bytes) -> bytes:
        return os.path.join(os.fsencode(base), rel) if rel else os.fsencode(base)

    match op:
        case ops.Open(fh=fh, path=path):
            handles[fh] = os.open(p(path), os.O_WRONLY)
        case ops.Create(fh=fh, path=path, mode=mode, uid=uid, gid=gid, excl=excl):
            fd = os.open(p(path), os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else 0), mode)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            handles[fh] = fd
        case ops.Release(fh=fh):
            os.close(handles.pop(fh))
        case ops.Write(fh=fh, offset=offset, data=data):
            os.pwrite(handles[fh], data, offset)
        case ops.WriteV(fh=fh, parts=parts):
            for offset, data in parts:
                os.pwrite(handles[fh], data, offset)
        case ops.Truncate(fh=fh, path=path, length=length):
            if fh >= 0:
                os.ftruncate(handles[fh], length)
            else:
                os.truncate(p(path), length)
        case ops.Fallocate(fh=fh, mode=mode, offset=offset, length=length):
            if mode:  # punch hole = write zeros, as far as the contents go
                os.pwrite(handles[fh], b"\x00" * length, offset)
            else:
                os.posix_fallocate(handles[fh], offset, length)
        case ops.Fsync():
            pass
        case (
            ops.Mknod(path=path, mode=mode, uid=uid, gid=gid)
            | ops.Mkdir(path=path, mode=mode, uid=uid, gid=gid)
        ):
            if isinstance(op, ops.Mkdir):
                os.mkdir(p(path))
            else:
                os.mknod(p(path), mode)
            os.chown(p(path), uid, gid)
            os.chmod(p(path), stat.S_IMODE(mode))
        case ops.Unlink(path=path):
            os.unlink(p(path))
        case ops.Rmdir(path=path):
            os.rmdir(p(path))
        case ops.Rename(old=old, new=new, flags=flags):
            if flags == RENAME_EXCHANGE:
                os.rename(p(old), p(new) + b".swap")
                os.rename(p(new), p(old))
                os.rename(p(new) + b".swap", p(new))
            else:
                os.rename(p(old), p(new))
        case ops.Link(target=target, new=new):
            os.link(p(target), p(new), follow_symlinks=False)
        case ops.Symlink(target=target, path=path, uid=uid, gid=gid):
            os.symlink(target, p(path))
            os.chown(p(path), uid, gid, follow_symlinks=False)
        case ops.Chmod(path=path, mode=mode):
            if not os.path.islink(p(path)):
                os.chmod(p(path), mode)
        case ops.Chown(path=path, uid=uid, gid=gid):
            os.chown(p(path), uid, gid, follow_symlinks=False)
        case ops.Utimens(path=path, atime_ns=a, mtime_ns=m):
            os.utime(p(path), ns=(a, m), follow_symlinks=False)
        case ops.SetXattr(path=path, name=name, value=value, flags=flags):
            os.setxattr(p(path), name, value, flags, follow_symlinks=False)
        case ops.RemoveXattr(path=path, name=name):
            os.removexattr(p(path), name, follow_symlinks=False)


CAFE = "caf\u00e9 \u65e5\u672c".encode()
SCENARIO: list[ops.Op] = [
    ops.Mkdir(b"d", 0o2755, UID, GID),
    ops.Mkdir(b"d/" + CAFE, 0o750, -1, -1),
    ops.Create(1, b"d/big", 0o640, UID, GID, True),
    ops.Write(1, 0, b"hello"),
    ops.Write(1, 5 * GIB, b"past four gibibytes"),
    ops.Write(1, 65536, b"x" * 8192),
    ops.WriteV(1, ((70000, b"y" * 100), (3, b"ll"), (70050, b"overlaps the first part"))),
    ops.Fallocate(1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 4096),
    ops.Fallocate(1, 0, 1 << 20, 4096),
    ops.Fsync(1, b"", False),
    ops.Fsync(1, b"", True),
    ops.Fsync(-1, b"d", False),
    ops.Fsync(-1, b"", True),
    ops.Create(2, b"d/" + CAFE + b"/\xff\xfename", 0o4755, -1, -1, False),
    ops.Write(2, 0, b"0123456789"),
    ops.Truncate(2, b"", 4),
    ops.Release(2),
    ops.Open(3, b"d/" + CAFE + b"/\xff\xfename"),
    ops.Write(3, 2, b"AB"),
    ops.Release(3),
    ops.Truncate(-1, b"d/" + CAFE + b"/\xff\xfename", 3),
    ops.Link(b"d/" + CAFE + b"/\xff\xfename", b"hard"),
    ops.Symlink(b"../outside/../d", b"sym", UID, GID),
    ops.Link(b"sym", b"sym-hard"),
    ops.Mknod(b"fifo", stat.S_IFIFO | 0o640, -1, -1),
    ops.Mknod(b"sock", stat.S_IFSOCK | 0o600, -1, -1),
    ops.Mknod(b"plain", stat.S_IFREG | 0o644, UID, -1),
    ops.Create(4, b"a", 0o644, -1, -1, True),
    ops.Write(4, 0, b"file a"),
    ops.Release(4),
    ops.Create(5, b"b", 0o600, -1, -1, True),
    ops.Write(5, 0, b"file b"),
    ops.Release(5),
    ops.Rename(b"a", b"d/a2", 0),
    ops.Rename(b"b", b"d/a2", RENAME_EXCHANGE),
    ops.Rename(b"d/a2", b"c", RENAME_NOREPLACE),
    ops.Chmod(b"c", 0o604),
    ops.Chmod(b"sym", 0o777),
    ops.Chmod(b"", 0o751),
    ops.Chown(b"c", UID, GID),
    ops.Chown(b"sym", -1, GID),
    ops.Utimens(b"c", 1_000_000_000_123, 2_000_000_000_123),
    ops.Utimens(b"sym", 3_000_000_000_123, 4_000_000_000_123),
    ops.SetXattr(b"c", b"user.one", b"1", 0),
    ops.SetXattr(b"c", b"user.two", b"\x00\xff", 0),
    ops.SetXattr(b"c", b"user.two", b"2", 2),
    ops.SetXattr(b"", b"user.root", b"r", 0),
    ops.RemoveXattr(b"c", b"user.one"),
    ops.Mkdir(b"gone", 0o700, -1, -1),
    ops.Rmdir(b"gone"),
    ops.Unlink(b"plain"),
    ops.Release(1),
]


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    a, b = tmp_path / "via-receiver", tmp_path / "via-os"
    a.mkdir()
    b.mkdir()
    try:
        os.setxattr(a, "user.probe", b"1")
        os.removexattr(a, "user.probe")
    except OSError as exc:
        pytest.skip(f"the filesystem of {tmp_path} has no user xattrs ({exc})")
    yield a, b


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
def test_every_op_gives_the_tree_plain_os_calls_give(
    dirs: tuple[Path, Path], openat2: bool
) -> None:
    assert {type(op) for op in SCENARIO} == set(ops.ALL_OPS)
    a, b = dirs
    handles: dict[int, int] = {}
    with Receiver(a, openat2=openat2) as rx:
        for op in SCENARIO:
            rx.apply(op)
            plain(b, op, handles)
        assert rx.handles == frozenset()
    assert tree(a) == tree(b)
    big = os.stat(a / "d" / "big")
    assert big.st_size > 4 * GIB
    assert big.st_blocks * 512 < 16 << 20, "the 5 GiB file must stay sparse"
    assert (a / "c").read_bytes() == b"file b"  # exchanged, then renamed
    assert (a / "b").read_bytes() == b"file a"
    assert (a / "hard").read_bytes() == b"01A"
    assert os.readlink(a / "sym") == "../outside/../d"


def test_punch_hole_deallocates(tmp_path: Path) -> None:
    with Receiver(tmp_path) as rx:
        rx.apply(ops.Create(1, b"f", 0o644, -1, -1, True))
        rx.apply(ops.Write(1, 0, b"z" * (4 << 20)))
        rx.apply(ops.Fsync(1, b"", False))
        before = os.stat(tmp_path / "f").st_blocks
        rx.apply(ops.Fallocate(1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 << 20))
        after = os.stat(tmp_path / "f")
    assert after.st_size == 4 << 20
    assert after.st_blocks < before
    assert (tmp_path / "f").read_bytes() == b"\x00" * (4 << 20)


@pytest.fixture
def jail(tmp_path: Path) -> tuple[Path, Path]:
    """A replicated root with symlinks into a canary directory outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"canary")
    os.chmod(outside / "secret", 0o640)
    os.utime(outside / "secret", ns=(10**9, 10**9))
    (root / "evil").symlink_to(outside)  # absolute
    (root / "evil_rel").symlink_to("../outside")
    (root / "evil_file").symlink_to(outside / "secret")
    (root / "dangling").symlink_to(outside / "new")
    (root / "x").write_bytes(b"inside")
    (root / "dir").mkdir()
    return root, outside


def snapshot(path: Path) -> dict[str, Any]:
    out = tree(path)
    out["<listing>"] = sorted(os.listdir(path.parent))
    for entry in path.iterdir():
        st = os.lstat(entry)
        out[entry.name]["times"] = (st.st_mtime_ns, st.st_ctime_ns)
    return out


ESCAPES: list[ops.Op] = [
    ops.Open(1, b"evil/secret"),
    ops.Open(1, b"evil_rel/secret"),
    ops.Open(1, b"evil_file"),
    ops.Create(1, b"evil/new", 0o644, -1, -1, False),
    ops.Create(1, b"dangling", 0o644, -1, -1, False),
    ops.Mkdir(b"evil/newdir", 0o755, -1, -1),
    ops.Mkdir(b"evil_rel/sub/deeper", 0o755, -1, -1),
    ops.Mknod(b"evil/fifo", stat.S_IFIFO | 0o644, -1, -1),
    ops.Truncate(-1, b"evil_file", 0),
    ops.Truncate(-1, b"evil/secret", 0),
    ops.Fsync(-1, b"evil/secret", False),
    ops.Unlink(b"evil/secret"),
    ops.Rmdir(b"evil/sub"),
    ops.Rename(b"x", b"evil/x", 0),
    ops.Rename(b"evil/secret", b"stolen", 0),
    ops.Rename(b"x", b"evil_rel/sub", RENAME_EXCHANGE),
    ops.Link(b"evil/secret", b"stolen"),
    ops.Link(b"x", b"evil/x"),
    ops.Symlink(b"anything", b"evil/s", -1, -1),
    ops.Chmod(b"evil/secret", 0o777),
    ops.Chown(b"evil/secret", UID, GID),
    ops.Utimens(b"evil/secret", 0, 0),
    ops.SetXattr(b"evil/secret", b"user.pwned", b"1", 0),
    ops.RemoveXattr(b"evil/sub", b"user.x"),
    ops.Unlink(b"../outside/secret"),
    ops.Unlink(b"/" + b"x"),
    ops.Mkdir(b"dir/../../outside/sub/new", 0o755, -1, -1),
    ops.Symlink(b"x", b"dir/./../s", -1, -1),
]


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
@pytest.mark.parametrize("op", ESCAPES, ids=repr)
def test_escapes_are_refused_and_change_nothing(
    jail: tuple[Path, Path], op: ops.Op, openat2: bool
) -> None:
    root, outside = jail
    before_out, before_in = snapshot(outside), snapshot(root)
    with Receiver(root, openat2=openat2) as rx:
        with pytest.raises(PathEscape):
            rx.apply(op)
        assert rx.handles == frozenset()
        reply = rx.handle_request(Request(7, op))
    assert isinstance(reply, Nack) and reply.id == 7 and reply.errno == errno.ELOOP
    assert snapshot(outside) == before_out
    assert snapshot(root) == before_in


@pytest.mark.parametrize(
    "op",
    [
        ops.Chmod(b"evil_file", 0o777),  # a no-op on a symlink
        ops.Chown(b"evil_file", UID, GID),  # lchown: the link itself
        ops.Utimens(b"evil_file", 5 * 10**9, 5 * 10**9),  # the link itself
        ops.Rename(b"x", b"evil_file", 0),  # replaces the link, not its target
        ops.Link(b"evil_file", b"second-name"),  # a second name of the link
        ops.Unlink(b"evil"),  # removes the link
    ],
    ids=repr,
)
def test_ops_on_a_symlink_touch_the_link_never_its_target(
    jail: tuple[Path, Path], op: ops.Op
) -> None:
    root, outside = jail
    before = snapshot(outside)
    with Receiver(root) as rx:
        rx.apply(op)
    assert snapshot(outside) == before
    assert (outside / "secret").read_bytes() == b"canary"


def test_xattr_on_a_symlink_is_not_written_through(jail: tuple[Path, Path]) -> None:
    root, outside = jail
    before = snapshot(outside)
    with Receiver(root) as rx, pytest.raises(ApplyError):
        rx.apply(ops.SetXattr(b"evil_file", b"user.pwned", b"1", 0))
    assert snapshot(outside) == before
    assert "user.pwned" not in os.listxattr(outside / "secret")


@pytest.mark.parametrize(
    ("op", "code"),
    [
        (ops.Mknod(b"dev", stat.S_IFCHR | 0o600, -1, -1), errno.EPERM),
        (ops.Mknod(b"dev", stat.S_IFBLK | 0o600, -1, -1), errno.EPERM),
        (ops.Rename(b"x", b"y", 4), errno.EINVAL),  # RENAME_WHITEOUT
        (ops.Rename(b"x", b"dir", RENAME_NOREPLACE), errno.EEXIST),
        (ops.Unlink(b""), errno.EBUSY),
        (ops.Rename(b"", b"y", 0), errno.EBUSY),
        (ops.Create(1, b"x", 0o644, -1, -1, True), errno.EEXIST),
        (ops.Open(1, b"dir"), errno.EISDIR),
        (ops.Open(1, b"missing"), errno.ENOENT),
        (ops.Open(1, b"x/below-a-file"), errno.ENOTDIR),
        (ops.Write(9, 0, b"x"), errno.EBADF),
        (ops.Release(9), errno.EBADF),
        (ops.Truncate(-2, b"x", 0), errno.EBADF),  # only -1 means "by path"
        (ops.Fsync(-2, b"x", False), errno.EBADF),
        (ops.SetXattr(b"x", b"user.x", b"1", 8), errno.EINVAL),
    ],
    ids=repr,
)
def test_failures_become_apply_errors_with_errno(
    jail: tuple[Path, Path], op: ops.Op, code: int
) -> None:
    root, _ = jail
    before = snapshot(root)
    with Receiver(root) as rx:
        with pytest.raises(ApplyError) as info:
            rx.apply(op)
        assert info.value.errno == code
        assert rx.handle_request(Request(3, op)) == Nack(3, code, str(info.value))
    assert snapshot(root) == before


def test_open_of_a_fifo_neither_blocks_nor_binds(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with Receiver(tmp_path) as rx:
        with pytest.raises(ApplyError) as info:
            rx.apply(ops.Open(1, b"fifo"))
        assert info.value.errno in (errno.ENXIO, errno.EINVAL)
        assert rx.handles == frozenset()


def test_handle_request_acks_and_a_handle_cannot_be_bound_twice(tmp_path: Path) -> None:
    with Receiver(tmp_path) as rx:
        assert rx.handle_request(Request(1, ops.Create(1, b"f", 0o644, -1, -1, True))) == Ack(1)
        reply = rx.handle_request(Request(2, ops.Open(1, b"f")))
        assert isinstance(reply, Nack) and reply.errno == errno.EBADF
        assert rx.handles == {1}


def test_close_closes_every_descriptor(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    rx = Receiver(tmp_path)
    for fh in range(5):
        rx.apply(ops.Create(fh, b"f%d" % fh, 0o644, -1, -1, True))
    assert len(set(os.listdir("/proc/self/fd")) - before) >= 6
    rx.close()
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ApplyError):
        rx.apply(ops.Mkdir(b"late", 0o755, -1, -1))
    assert not (tmp_path / "late").exists()


def test_release_all_drops_handles_but_keeps_the_root(tmp_path: Path) -> None:
    with Receiver(tmp_path) as rx:
        rx.apply(ops.Create(1, b"f", 0o644, -1, -1, True))
        rx.release_all()
        assert rx.handles == frozenset()
        rx.apply(ops.Open(1, b"f"))
        rx.apply(ops.Write(1, 0, b"again"))
    assert (tmp_path / "f").read_bytes() == b"again"


def test_falls_back_to_the_walk_when_openat2_is_missing(
    jail: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.mirror.receiver as receiver_module

    def no_openat2(dirfd: int, path: bytes) -> int:
        raise OSError(errno.ENOSYS, "openat2 is not implemented")

    monkeypatch.setattr(receiver_module, "_openat2_beneath", no_openat2)
    root, outside = jail
    before = snapshot(outside)
    with Receiver(root) as rx:
        rx.apply(ops.Mkdir(b"dir/sub", 0o755, -1, -1))
        with pytest.raises(PathEscape):
            rx.apply(ops.Mkdir(b"evil/sub/new", 0o755, -1, -1))
    assert (root / "dir" / "sub").is_dir()
    assert snapshot(outside) == before


def test_writes_to_a_file_the_primary_fsyncs_get_their_writeback_started(tmp_path: Path) -> None:
    """Early writeback: after an Fsync by handle, the ranges written to that handle are
    handed to ``writeback`` by ``kick_writeback`` (merged per descriptor); other files and
    ranges already flushed by an Fsync are not, and a Release forgets the handle."""
    root = tmp_path / "root"
    root.mkdir()
    kicked: list[tuple[int, int, int]] = []
    r = Receiver(root, writeback=lambda fd, off, ln: kicked.append((fd, off, ln)))
    try:
        r.apply(ops.Create(1, b"log", 0o644, -1, -1, False))
        r.apply(ops.Create(2, b"data", 0o644, -1, -1, False))
        log_fd, data_fd = r.fd_of(1), r.fd_of(2)
        r.apply(ops.Write(1, 0, b"a" * 100))  # not fsync'd yet: the kernel's business
        r.apply(ops.Write(2, 0, b"b" * 100))
        r.kick_writeback()
        assert kicked == []
        r.apply(ops.Fsync(1, b"", True))
        r.apply(ops.Write(1, 4096, b"c" * 10))
        r.apply(ops.Write(1, 100, b"d" * 50))
        r.apply(ops.Write(2, 200, b"e" * 10))  # never fsync'd
        r.kick_writeback()
        assert kicked == [(log_fd, 100, 4096 + 10 - 100)]
        r.kick_writeback()  # nothing new
        assert len(kicked) == 1
        r.apply(ops.Write(1, 0, b"f"))
        r.apply(ops.Fsync(1, b"", True))  # this flush writes it: nothing left to start
        r.kick_writeback()
        assert len(kicked) == 1
        r.apply(ops.Write(1, 8192, b"g"))
        r.apply(ops.Release(1))  # the descriptor is closed: its range is dropped
        r.kick_writeback()
        assert len(kicked) == 1
        r.apply(ops.Open(3, b"log"))  # a new handle starts unsynced
        r.apply(ops.Write(3, 0, b"h"))
        r.kick_writeback()
        assert len(kicked) == 1
        assert data_fd is not None
    finally:
        r.close()
    assert (root / "log").read_bytes()[:1] == b"h"
