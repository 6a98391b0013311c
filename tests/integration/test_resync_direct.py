"""The resync target's direct writer (resync_direct.py): page-aligned resync data written with
O_DIRECT through native AIO on a real file, and the Responder's ordering of later ops after it.

The ordering tests use ``HeldAio``: an AIO stand-in that writes nothing when a page is queued
and writes the queued pages in reverse order when they are reaped, as a disk may complete
them. A later op that did not wait for the pages of its file would then see them land after
it (older bytes, or a moved mtime), and the test fails.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.mirror import ops, protocol, resync
from app.mirror.receiver import Receiver
from app.mirror.resync_codec import RESYNC_FH_BASE, ActivityLog
from app.mirror.resync_direct import PAGE, Aio, DirectWriter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def o_direct_works(directory: Path) -> bool:
    probe = directory / ".probe"
    probe.write_bytes(b"\0" * PAGE)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


class HeldAio:
    """Queued pages are written only when reaped with a wait (a slow disk: a reap without
    waiting finds nothing done), newest first (see the module docstring)."""

    def __init__(self, slots: int = 64, result: int | None = None) -> None:
        self.slots = slots
        self.ring = mmap.mmap(-1, slots * PAGE)
        self.view = memoryview(self.ring)
        self._iocbs: dict[int, tuple[int, int, int]] = {}
        self._queued: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()
        self.result = result  # a fixed result for every page (a failing disk), else PAGE
        self.submitted = 0

    def prepare(self, slot: int, fd: int, offset: int) -> int:
        self._iocbs[slot + 1] = (slot, fd, offset)
        return slot + 1  # an "address" (0 would read back as None)

    def submit(self, ptrs: Any, first: int, n: int) -> int:
        with self._lock:
            self._queued += [self._iocbs[ptrs[i]] for i in range(first, first + n)]
            self.submitted += n
        return n

    def reap(self, wait: float) -> list[tuple[int, int]]:
        if wait <= 0:
            return []
        with self._lock:
            done, self._queued = self._queued[::-1], []
        if not done:
            time.sleep(min(wait, 0.001))  # the submitter thread has not queued them yet
        out = []
        for slot, fd, offset in done:
            if self.result is None:
                os.pwrite(fd, self.view[slot * PAGE : (slot + 1) * PAGE], offset)
            out.append((slot, PAGE if self.result is None else self.result))
        return out

    def release_pages(self) -> None:
        pass

    def close(self) -> None:
        self.view.release()
        self.ring.close()


def plain_open(fd: int) -> int:
    """The stand-in's 'O_DIRECT' descriptor: the same file, through the page cache."""
    return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Path, Receiver]]:
    root = tmp_path / "target"
    root.mkdir()
    receiver = Receiver(root)
    try:
        yield root, receiver
    finally:
        receiver.close()


def begin(responder: resync.Responder) -> None:
    responder.arm(ActivityLog(False))
    reply = responder.handle(protocol.ResyncQuery(1, resync.QUERY_BEGIN, b"", 0, 0))
    assert isinstance(reply, protocol.ResyncReply) and reply.status == 0


def test_aligned_pages_are_written_direct_and_the_rest_is_handed_back(tmp_path: Path) -> None:
    path = tmp_path / "data"
    size = 8 << 20
    path.write_bytes(b"\0" * size)
    expect = bytearray(size)
    rng = random.Random(7)
    writer = DirectWriter()
    fd = os.open(path, os.O_RDWR)
    aligned = 0
    try:
        for _ in range(30):  # more pages in all than fit in the ring at once
            offsets = sorted({rng.randrange(size // PAGE) * PAGE for _ in range(200)})
            parts = [(off, rng.randbytes(PAGE)) for off in offsets[:-1]]
            parts.append((offsets[-1] + 100, b"not a whole page"))  # goes back, buffered
            left = writer.submit(fd, RESYNC_FH_BASE, tuple(parts))
            if writer.supported:
                assert left == parts[-1:]
            for off, data in left:
                os.pwrite(fd, data, off)
            for off, data in parts:
                expect[off : off + len(data)] = data
            aligned += PAGE * (len(parts) - 1)
        writer.barrier()
    finally:
        writer.forget(RESYNC_FH_BASE)
        writer.close()
        os.close(fd)
    assert writer.take_error() is None
    assert path.read_bytes() == bytes(expect)
    # where this filesystem has O_DIRECT (ext4, xfs, tmpfs since Linux 6.6) the pages went direct
    assert writer.supported == o_direct_works(tmp_path)
    assert writer.written == (aligned if writer.supported else 0)


def test_an_overlapping_writev_waits_for_the_pages_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"\0" * (4 * PAGE))
    aio = HeldAio()
    writer = DirectWriter(make_aio=lambda: aio, open_direct=plain_open)
    fd = os.open(path, os.O_RDWR)
    try:
        assert (
            writer.submit(fd, RESYNC_FH_BASE, ((PAGE, b"a" * PAGE), (2 * PAGE, b"b" * PAGE))) == []
        )
        assert writer.busy
        # page 1 again: queued only once the first pages landed, else "a" would win
        assert writer.submit(fd, RESYNC_FH_BASE, ((PAGE, b"c" * PAGE),)) == []
        writer.barrier()
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == b"\0" * PAGE + b"c" * PAGE + b"b" * PAGE + b"\0" * PAGE


def test_a_failed_direct_page_is_written_again_through_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"\0" * (2 * PAGE))
    aio = HeldAio(result=-errno.EIO)
    writer = DirectWriter(make_aio=lambda: aio, open_direct=plain_open)
    fd = os.open(path, os.O_RDWR)
    try:
        writer.submit(fd, RESYNC_FH_BASE, ((PAGE, b"x" * PAGE),))
        writer.barrier()
    finally:
        writer.close()
        os.close(fd)
    assert writer.take_error() is None
    assert path.read_bytes() == b"\0" * PAGE + b"x" * PAGE


def test_without_aio_everything_is_handed_back(tmp_path: Path) -> None:
    def no_aio() -> HeldAio:
        raise OSError(errno.ENOSYS, "no native AIO")

    path = tmp_path / "data"
    path.write_bytes(b"\0" * PAGE)
    writer = DirectWriter(make_aio=no_aio)  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDWR)
    try:
        parts = ((0, b"y" * PAGE),)
        assert writer.submit(fd, RESYNC_FH_BASE, parts) == list(parts)
        assert not writer.supported and not writer.busy
    finally:
        writer.close()
        os.close(fd)


def responder_with(root: Path, receiver: Receiver, aio: HeldAio, **kw: object) -> resync.Responder:
    writer = DirectWriter(make_aio=lambda: aio, open_direct=plain_open, **kw)  # type: ignore[arg-type]
    responder = resync.Responder(str(root), receiver, direct=writer)
    begin(responder)
    return responder


def request(ident: int, op: ops.Op) -> protocol.Request:
    return protocol.Request(ident, op)


def test_later_ops_on_the_file_see_the_direct_pages_written(
    target: tuple[Path, Receiver],
) -> None:
    root, receiver = target
    (root / "f").write_bytes(b"\0" * (3 * PAGE))
    aio = HeldAio()
    responder = responder_with(root, receiver, aio)
    fh, live = RESYNC_FH_BASE, 7
    try:
        steps: list[ops.Op] = [
            ops.Open(fh, b"f"),
            ops.WriteV(fh, ((0, b"r" * PAGE), (PAGE, b"r" * PAGE))),
            ops.Open(live, b"f"),
            ops.Write(live, PAGE, b"L" * 10),  # a live write after the resync's page
            ops.WriteV(fh, ((2 * PAGE, b"s" * PAGE),)),
            ops.Release(fh),  # does not wait: the pages still go to the inode
            ops.Utimens(b"f", 1_000_000_000, 2_000_000_000),  # must come after the data
        ]
        for i, op in enumerate(steps, start=10):
            assert responder.handle(request(i, op)) == protocol.Ack(i)
        assert aio.submitted == 3
        done = responder.handle(protocol.ResyncDone(99))
        assert done == protocol.ResyncReply(99, 0, b"")
    finally:
        responder.close()
    assert (root / "f").read_bytes() == b"r" * PAGE + b"L" * 10 + b"r" * (PAGE - 10) + b"s" * PAGE
    assert os.stat(root / "f").st_mtime_ns == 2_000_000_000


def test_a_page_that_cannot_be_written_fails_resync_done(target: tuple[Path, Receiver]) -> None:
    root, receiver = target
    (root / "f").write_bytes(b"\0" * PAGE)

    def broken(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.EIO, "the disk refused")

    responder = responder_with(root, receiver, HeldAio(result=-errno.EIO), pwrite=broken)
    fh = RESYNC_FH_BASE
    try:
        assert responder.handle(request(10, ops.Open(fh, b"f"))) == protocol.Ack(10)
        assert responder.handle(request(11, ops.WriteV(fh, ((0, b"z" * PAGE),)))) == protocol.Ack(
            11
        )
        done = responder.handle(protocol.ResyncDone(12))
    finally:
        responder.close()
    assert done == protocol.ResyncReply(12, errno.EIO, b"")
    assert responder.state != "done"


def test_the_writer_serves_a_second_session_after_a_reset(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"\0" * (2 * PAGE))
    writer = DirectWriter()
    try:
        for fh, page, fill in ((RESYNC_FH_BASE, 0, b"1"), (RESYNC_FH_BASE + 1, PAGE, b"2")):
            fd = os.open(path, os.O_RDWR)
            try:
                for off, data in writer.submit(fd, fh, ((page, fill * PAGE),)):
                    os.pwrite(fd, data, off)
                writer.reset()  # a session ends: the same writer serves the next one
            finally:
                os.close(fd)
    finally:
        writer.close()
    assert writer.take_error() is None
    assert path.read_bytes() == b"1" * PAGE + b"2" * PAGE


def test_a_writev_whose_parts_overlap_is_applied_in_order_through_the_cache(
    tmp_path: Path,
) -> None:
    """Parts in flight complete in any order, so overlapping parts are never queued together:
    the WriteV goes back to the caller, which applies its parts in order."""
    path = tmp_path / "data"
    path.write_bytes(b"\0" * PAGE)
    writer = DirectWriter(make_aio=lambda: HeldAio(), open_direct=plain_open)
    fd = os.open(path, os.O_RDWR)
    try:
        parts = ((0, b"a" * PAGE), (0, b"b" * PAGE))
        left = writer.submit(fd, RESYNC_FH_BASE, parts)
        assert left == list(parts)
        for off, data in left:
            os.pwrite(fd, data, off)
        writer.barrier()
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == b"b" * PAGE


def test_arming_the_target_makes_the_ring_before_the_first_page(
    target: tuple[Path, Receiver],
) -> None:
    """The AIO context and its ring are made when the target arms itself, once, so the
    session's first page does not pay for them; a second session reuses them."""
    root, receiver = target
    (root / "f").write_bytes(b"\0" * PAGE)
    made: list[HeldAio] = []

    def make() -> HeldAio:
        made.append(HeldAio())
        return made[-1]

    writer = DirectWriter(make_aio=make, open_direct=plain_open)  # type: ignore[arg-type]
    responder = resync.Responder(str(root), receiver, direct=writer)
    try:
        assert made == []
        begin(responder)
        assert len(made) == 1 and made[0].submitted == 0
        fh = RESYNC_FH_BASE
        assert responder.handle(request(10, ops.Open(fh, b"f"))) == protocol.Ack(10)
        assert responder.handle(request(11, ops.WriteV(fh, ((0, b"w" * PAGE),)))) == protocol.Ack(
            11
        )
        assert responder.handle(request(12, ops.Release(fh))) == protocol.Ack(12)
        assert responder.handle(protocol.ResyncDone(13)) == protocol.ResyncReply(13, 0, b"")
        begin(responder)  # the next session
        assert len(made) == 1 and made[0].submitted == 1
    finally:
        responder.close()
    assert (root / "f").read_bytes() == b"w" * PAGE


def test_the_real_ring_is_page_aligned_and_its_iocbs_name_their_slots() -> None:
    """The packed iocbs (resync_direct's layout of struct iocb) as the kernel reads them."""
    try:
        aio = Aio(slots=8)
    except OSError as exc:
        pytest.skip(f"no native AIO on this machine: {exc}")

    def iocb(addr: int) -> tuple[int, ...]:
        raw = ctypes.string_at(addr, 64)
        return struct.unpack_from("<Q8xHxxIQQq", raw)  # data, opcode, fildes, buf, nbytes, off

    try:
        data, opcode, fildes, buf5, nbytes, offset = iocb(aio.prepare(5, 42, 7 * PAGE))
        assert (data, opcode, fildes, nbytes, offset) == (5, 1, 42, PAGE, 7 * PAGE)
        buf0 = iocb(aio.prepare(0, 3, 0))[3]
        assert buf0 % PAGE == 0 and buf5 == buf0 + 5 * PAGE
        aio.view[5 * PAGE : 6 * PAGE] = b"q" * PAGE  # the slot's page is what buf points at
        assert ctypes.string_at(buf5, PAGE) == b"q" * PAGE
    finally:
        aio.close()
