"""The FUSE session's dispatcher (fuseloop.py) without a kernel: requests built by hand go in,
the answers come out of a pipe standing for /dev/fuse; the filesystem is a small fake that
records what it was asked. What a real mount does is in tests/integration/test_fuse_*.py."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from app.mirror import fusekernel as fk
from app.mirror.fusebinding import CacheTimeouts
from app.mirror.fuseloop import FuseLoop


class FakeFS:
    """Paths that exist (with a stat of this directory), and a log of the calls."""

    def __init__(self, negative: float = 1.0) -> None:
        self.timeouts = CacheTimeouts(entry=1.0, attr=1.0, negative=negative)
        self.paths = {"/", "/d", "/d/f"}
        self.calls: list[tuple[Any, ...]] = []

    def stat(self, path: str | None, fh: int | None = None) -> os.stat_result:
        self.calls.append(("stat", path, fh))
        if fh is None and path not in self.paths:
            raise FileNotFoundError(errno.ENOENT, "no such file")
        return os.stat(".")

    def rename(self, old: str, new: str, flags: int) -> None:
        self.calls.append(("rename", old, new, flags))
        self.paths = {new + p[len(old) :] if p.startswith(old) else p for p in self.paths}

    def write_fh(self, fh: int, data: bytes, offset: int, writepage: int, name: Any) -> int:
        self.calls.append(("write", fh, data, offset, writepage))
        return len(data)


@pytest.fixture
def session() -> Iterator[tuple[FuseLoop, FakeFS, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    fs = FakeFS()
    loop = FuseLoop(fs, w)  # type: ignore[arg-type]
    try:
        yield loop, fs, r
    finally:
        os.close(r)
        os.close(w)


def ask(loop: FuseLoop, opcode: int, nodeid: int, body: bytes, unique: int = 1) -> None:
    raw = bytearray(fk.IN_HEADER.size + len(body))
    fk.IN_HEADER.pack_into(raw, 0, len(raw), opcode, unique, nodeid, 0, 0, os.getpid(), 0, 0)
    raw[fk.IN_HEADER.size :] = body
    loop._serve_one(memoryview(raw), len(raw))


def answer(r: int) -> tuple[int, int, bytes] | None:
    """(errno, unique, body) of the one answer written, None when there is none."""
    try:
        data = os.read(r, 1 << 16)
    except BlockingIOError:
        return None
    length, error, unique = fk.OUT_HEADER.unpack_from(data)
    assert length == len(data)
    return -error, unique, data[fk.OUT_HEADER.size :]


def test_init_grants_only_what_the_kernel_offers_and_we_want(
    session: tuple[FuseLoop, FakeFS, int],
) -> None:
    loop, _, r = session
    offered = fk.WANTED | fk.WRITEBACK_CACHE  # the kernel offers more than we take
    ask(loop, fk.INIT, 0, fk.INIT_IN.pack(7, 41, 131072, offered) + bytes(48))
    err, _, body = answer(r) or (None, None, b"")
    assert err == 0
    major, minor, _ra, flags = struct.unpack_from("<IIII", body)
    assert (major, minor, flags) == (7, fk.OUR_MINOR, fk.WANTED)


def test_init_of_a_kernel_too_old_is_refused(session: tuple[FuseLoop, FakeFS, int]) -> None:
    loop, _, r = session
    ask(loop, fk.INIT, 0, fk.INIT_IN.pack(7, 27, 131072, fk.WANTED) + bytes(48))
    assert (answer(r) or (0,))[0] == errno.EPROTO


def test_lookup_gives_a_node_then_a_path_and_a_missing_name_a_negative_entry(
    session: tuple[FuseLoop, FakeFS, int],
) -> None:
    loop, fs, r = session
    ask(loop, fk.LOOKUP, fk.ROOT_ID, b"d\0")
    err, _, body = answer(r) or (None, None, b"")
    nodeid = fk.ENTRY_HEAD.unpack_from(body)[0]
    assert err == 0 and nodeid > fk.ROOT_ID and loop.nodes.path(nodeid) == b"d"
    ask(loop, fk.LOOKUP, nodeid, b"nope\0", unique=2)
    err, unique, body = answer(r) or (None, None, b"")
    assert (err, unique, fk.ENTRY_HEAD.unpack_from(body)[0]) == (0, 2, 0)  # cached ENOENT
    assert ("stat", "/d/nope", None) in fs.calls


def test_without_a_negative_timeout_a_missing_name_is_enoent() -> None:
    r, w = os.pipe()
    try:
        loop = FuseLoop(FakeFS(negative=0.0), w)  # type: ignore[arg-type]
        ask(loop, fk.LOOKUP, fk.ROOT_ID, b"nope\0")
        assert (answer(r) or (0,))[0] == errno.ENOENT
    finally:
        os.close(r)
        os.close(w)


def test_a_renamed_node_is_served_by_its_new_path(session: tuple[FuseLoop, FakeFS, int]) -> None:
    loop, fs, r = session
    d = loop.nodes.lookup(fk.ROOT_ID, b"d")
    f = loop.nodes.lookup(d, b"f")
    ask(loop, fk.RENAME, fk.ROOT_ID, fk.RENAME_IN.pack(fk.ROOT_ID) + b"d\0e\0")
    assert (answer(r) or (None,))[0] == 0
    ask(loop, fk.GETATTR, f, fk.GETATTR_IN.pack(0, 0, 0), unique=2)
    assert (answer(r) or (None,))[0] == 0
    assert fs.calls[-1] == ("stat", "/e/f", None)


def test_malformed_unknown_and_stale_requests_get_their_errno_and_change_nothing(
    session: tuple[FuseLoop, FakeFS, int],
) -> None:
    loop, fs, r = session
    args = fk.WRITE_IN.pack(3, 0, 10, 0, 0, 0, 0) + b"short"  # says 10 bytes, carries 5
    ask(loop, fk.WRITE, fk.ROOT_ID, args)
    assert (answer(r) or (0,))[0] == errno.EINVAL
    ask(loop, fk.LOOKUP, fk.ROOT_ID, b"no-nul")
    assert (answer(r) or (0,))[0] == errno.EINVAL
    ask(loop, 4000, fk.ROOT_ID, b"")  # an opcode we do not serve
    assert (answer(r) or (0,))[0] == errno.ENOSYS
    ask(loop, fk.GETATTR, 777, fk.GETATTR_IN.pack(0, 0, 0))  # a node we never gave
    assert (answer(r) or (0,))[0] == errno.ESTALE
    assert not any(call[0] == "write" for call in fs.calls)


def test_forget_and_interrupt_are_not_answered_and_a_short_read_is_dropped(
    session: tuple[FuseLoop, FakeFS, int],
) -> None:
    loop, _, r = session
    node = loop.nodes.lookup(fk.ROOT_ID, b"d")
    ask(loop, fk.FORGET, node, fk.FORGET_IN.pack(1))
    ask(loop, fk.INTERRUPT, 0, struct.pack("<Q", 5))
    loop._serve_one(memoryview(b"\0" * 10), 10)
    assert answer(r) is None
    assert loop.nodes.path(node) is None  # forgotten: gone


def test_a_write_hands_its_bytes_and_the_writeback_bit_to_the_filesystem(
    session: tuple[FuseLoop, FakeFS, int],
) -> None:
    loop, fs, r = session
    ask(
        loop, fk.WRITE, fk.ROOT_ID, fk.WRITE_IN.pack(3, 4096, 5, fk.WRITE_CACHE, 0, 0, 0) + b"hello"
    )
    err, _, body = answer(r) or (None, None, b"")
    assert err == 0 and fk.WRITE_OUT.unpack(body) == (5, 0)
    assert fs.calls[-1] == ("write", 3, b"hello", 4096, fk.WRITE_CACHE)
