"""Pure parts of the reintegration (plans, ranges, checksums, body codecs, resync frames) and
an in-memory source/target pair over two temporary directories (no sockets, no FUSE)."""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.mirror import protocol, resync, resync_target
from app.mirror.errors import ProtocolError
from app.mirror.protocol import Connection, Event, Role
from app.mirror.receiver import Receiver
from app.mirror.resync import (
    BLOCK,
    ActivityLog,
    Entry,
    blocks_in,
    differing,
    merge_ranges,
    plan_incremental,
)

KEY = b"k" * 32


def test_merge_ranges_aligns_sorts_and_joins() -> None:
    assert merge_ranges([(10, 5), (BLOCK * 3, 1), (BLOCK - 1, 2)]) == [
        (0, 2 * BLOCK),
        (3 * BLOCK, BLOCK),
    ]
    assert merge_ranges([(0, 0)]) == []


@given(st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(0, 1 << 20)), max_size=20))
def test_merge_ranges_covers_every_input(ranges: list[tuple[int, int]]) -> None:
    merged = merge_ranges(ranges)
    for (a, b), (c, _) in itertools.pairwise(merged):
        assert a + b < c  # disjoint, not touching
    for off, ln in ranges:
        if ln:
            assert any(m <= off and off + ln <= m + n for m, n in merged)


def test_blocks_in_clips_to_the_file_size() -> None:
    assert blocks_in([(0, 1 << 62)], 3 * BLOCK + 1) == [0, 1, 2, 3]
    assert blocks_in([(5 * BLOCK, 10)], 2 * BLOCK) == []
    assert blocks_in([(BLOCK + 1, 1), (BLOCK, 3)], 10 * BLOCK) == [1]


def test_differing_counts_missing_blocks() -> None:
    a, b = (False, b"a" * 16), (False, b"b" * 16)
    assert differing([a, a, a], [a, b]) == [1, 2]
    assert differing([(True, b"z" * 16)], [(False, b"z" * 16)]) == [0]


def test_plan_untrusted_or_full_means_compare_everything() -> None:
    ok = ActivityLog(True)
    assert plan_incremental(ok, ActivityLog(True, False, "torn"), False).full
    assert plan_incremental(ActivityLog(True, False, "x"), ActivityLog(False), False).deep == (b"",)
    assert plan_incremental(ok, ActivityLog(False), True).full


def test_plan_unions_both_logs_and_skips_what_a_deep_path_covers() -> None:
    src = ActivityLog(
        True, True, "", ((b"d/f", ((0, 10),)), (b"g", ((BLOCK, 1),))), (b"d",), (b"m",)
    )
    dst = ActivityLog(
        True, True, "", ((b"g", ((0, 1),)), (b"h", ((0, 1),))), (b"d/x", b"n/y"), (b"g",)
    )
    plan = plan_incremental(src, dst, False)
    assert not plan.full
    assert plan.deep == (b"d", b"n/y")
    page = resync.PAGE  # incremental ranges are page-aligned, not block-aligned
    assert plan.files == ((b"g", ((0, page), (BLOCK, page))), (b"h", ((0, page),)))
    assert plan.meta == (b"m",)


def test_codecs_round_trip_and_reject_garbage() -> None:
    e = Entry(b"n\xff", 0o100644, 1, 2, 3, 4, 5, 1, 9, b"", ((b"user.a", b"v"),))
    assert resync.decode_entries(resync.encode_entries([e, e])) == [e, e]
    assert resync.decode_stat(resync.encode_stat(None)) is None
    log = ActivityLog(True, True, "", ((b"a", ((0, 5),)),), (b"b",), (b"c",))
    assert resync.decode_log(resync.encode_log(log)) == log
    sums = [(True, b"x" * 16), (False, b"y" * 16)]
    assert resync.decode_sums(resync.encode_sums(sums)) == sums
    for bad in (b"\x00\x00\x00\x05", b"\x00" * 3):
        with pytest.raises(ProtocolError):
            resync.decode_entries(bad)
    with pytest.raises(ProtocolError):
        resync.decode_log(resync.encode_log(ActivityLog(True, True, "", ((b"../x", ()),))))
    with pytest.raises(ProtocolError):
        resync.decode_sums(b"\x02" + b"x" * 16)


def _pair() -> tuple[Connection, Connection]:
    p = Connection(Role.PRIMARY, cluster="c", node="a", key=KEY)
    s = Connection(Role.SECONDARY, cluster="c", node="b", key=KEY)
    s.receive_data(p.send(p.hello()))
    assert isinstance(s.next_event(), protocol.Hello)
    p.receive_data(s.send(s.hello()))
    assert isinstance(p.next_event(), protocol.Hello)
    s.receive_data(p.send(p.auth()))
    s.next_event()
    p.receive_data(s.send(s.auth()))
    p.next_event()
    return p, s


def test_resync_frames_round_trip_and_are_tracked() -> None:
    p, s = _pair()
    s.receive_data(p.send(protocol.ResyncQuery(7, resync.QUERY_SUMS, b"a/b", 3, 4)))
    assert s.next_event() == protocol.ResyncQuery(7, resync.QUERY_SUMS, b"a/b", 3, 4)
    p.receive_data(s.send(protocol.ResyncReply(7, 0, b"body")))
    assert p.next_event() == protocol.ResyncReply(7, 0, b"body")
    s.receive_data(p.send(protocol.ResyncDone(8)))
    assert s.next_event() == protocol.ResyncDone(8)
    with pytest.raises(ProtocolError):
        s.send(protocol.ResyncQuery(9, 1, b"", 0, 0))  # the secondary never asks
    p.receive_data(protocol.encode_event(protocol.ResyncReply(99, 0, b"")))
    with pytest.raises(ProtocolError):
        p.next_event()  # an answer nobody asked for


# ---------------------------------------------------------------- in-memory pair


class _Done:
    def __init__(self, ev: Event) -> None:
        self.ev = ev

    def wait(self, timeout: float) -> Event:
        return self.ev


class MemoryOutlet:
    """Delivers each frame to the Responder at once, in order; counts data bytes."""

    def __init__(self, responder: resync.Responder) -> None:
        self.responder = responder
        self.ids = 0
        self.data_bytes = 0
        self.writev_frames = 0
        self.sums_queries = 0
        self.progress = resync.Progress()

    def submit(self, make):  # type: ignore[no-untyped-def]
        self.ids += 1
        ev = make(self.ids)
        if isinstance(ev, protocol.Request) and isinstance(ev.op, resync.ops.Write):
            self.data_bytes += len(ev.op.data)
        elif isinstance(ev, protocol.Request) and isinstance(ev.op, resync.ops.WriteV):
            self.data_bytes += sum(len(data) for _, data in ev.op.parts)
            self.writev_frames += 1
        if isinstance(ev, protocol.ResyncQuery) and ev.kind == resync.QUERY_SUMS:
            self.sums_queries += 1
        reply = self.responder.handle(ev)
        assert reply is not None
        return _Done(reply)


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st_ = os.lstat(full)
            data = b""
            if os.path.isfile(full) and not os.path.islink(full):
                data = Path(full).read_bytes()
            out[os.path.relpath(full, root)] = (st_.st_mode, st_.st_size, data)
    return out


def _sync(src: Path, dst: Path, full: bool, src_log: ActivityLog | None = None) -> MemoryOutlet:
    receiver = Receiver(dst)
    responder = resync.Responder(str(dst), receiver)
    responder.arm(ActivityLog(False))
    outlet = MemoryOutlet(responder)
    outlet.submit(lambda i: protocol.ResyncQuery(i, resync.QUERY_BEGIN, b"", int(full), 0))
    root = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rein = resync.Reintegrator(root, threading.Lock(), outlet, resync.RedoSet(), timeout=5)
        rein.run(plan_incremental(src_log or ActivityLog(True), ActivityLog(False), full))
        rein.finish(lambda: outlet.submit(lambda i: protocol.ResyncDone(i)))
        outlet.progress = rein.progress
    finally:
        os.close(root)
        receiver.close()
        responder.close()
    assert responder.state == "done"
    return outlet


def test_full_sync_in_memory_copies_only_differing_blocks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "d").mkdir()
    (src / "d" / "big").write_bytes(os.urandom(10 * BLOCK))
    (src / "small").write_bytes(b"hello")
    os.symlink("d/big", src / "ln")
    (dst / "extra").mkdir()
    (dst / "extra" / "junk").write_bytes(b"junk")
    first = _sync(src, dst, True)
    assert _tree(src) == _tree(dst)
    # every entry, directories and the root included, once: the console never shows 17 of 16
    assert first.progress.files_done == first.progress.files_total == 5
    assert first.data_bytes == 10 * BLOCK + 5
    with open(dst / "d" / "big", "r+b") as f:  # damage two blocks on the target
        f.seek(3 * BLOCK + 7)
        f.write(b"XX")
        f.seek(8 * BLOCK)
        f.write(b"YY")
    second = _sync(src, dst, True)
    assert _tree(src) == _tree(dst)
    assert second.data_bytes == 2 * BLOCK


def test_incremental_sends_only_the_logged_ranges(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    payload = os.urandom(20 * BLOCK)
    (src / "f").write_bytes(payload)
    (dst / "f").write_bytes(payload)
    with open(src / "f", "r+b") as f:
        f.seek(5 * BLOCK)
        f.write(b"new" * 100)
    log = ActivityLog(True, True, "", ((b"f", ((5 * BLOCK, 300),)),))
    out = _sync(src, dst, False, log)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert out.data_bytes == resync.PAGE  # the page written, not its 64 KiB block
    assert out.sums_queries == 0  # a trusted log needs no checksum round trip


def test_incremental_scattered_pages_send_about_the_bytes_changed(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    rng = random.Random(5)
    size = 4 << 20
    for name in ("a", "b"):
        payload = rng.randbytes(size)
        (src / name).write_bytes(payload)
        (dst / name).write_bytes(payload)
    ranges: dict[bytes, list[tuple[int, int]]] = {b"a": [], b"b": []}
    page = resync.PAGE
    for _ in range(60):
        name = rng.choice((b"a", b"b"))
        off = rng.randrange(size // page) * page
        with open(src / name.decode(), "r+b") as f:
            f.seek(off)
            f.write(rng.randbytes(page))
        ranges[name].append((off, page))
    changed = sum(ln for rs in ranges.values() for _, ln in set(rs))
    log = ActivityLog(True, True, "", tuple((p, tuple(rs)) for p, rs in sorted(ranges.items())))
    out = _sync(src, dst, False, log)
    assert _tree(src) == _tree(dst)
    assert out.data_bytes == changed
    # scattered pages of one file travel together: far fewer frames than pages
    assert 0 < out.writev_frames < 10
    assert out.progress.files_done == out.progress.files_total == 2
    assert out.progress.bytes_done == out.progress.bytes_total


def test_incremental_range_that_is_a_hole_on_the_source_is_punched(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    payload = os.urandom(64 * resync.PAGE)
    (src / "f").write_bytes(payload)
    (dst / "f").write_bytes(payload)
    fd = os.open(src / "f", os.O_RDWR)
    try:
        punch = resync.FALLOC_FL_PUNCH_HOLE | resync.FALLOC_FL_KEEP_SIZE
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
        if libc.fallocate(fd, punch, 8 * resync.PAGE, 8 * resync.PAGE) != 0:
            pytest.skip(f"this filesystem cannot punch holes (errno {ctypes.get_errno()})")
    finally:
        os.close(fd)
    log = ActivityLog(True, True, "", ((b"f", ((8 * resync.PAGE, 8 * resync.PAGE),)),))
    out = _sync(src, dst, False, log)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert out.data_bytes == 0
    fd = os.open(dst / "f", os.O_RDONLY)
    try:
        assert os.lseek(fd, 8 * resync.PAGE, resync.SEEK_DATA) >= 16 * resync.PAGE
    finally:
        os.close(fd)


def test_full_sync_into_missing_or_empty_files_asks_for_no_checksums(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "new").write_bytes(os.urandom(3 * BLOCK + 5))
    (src / "empty-there").write_bytes(os.urandom(2 * BLOCK))
    (dst / "empty-there").write_bytes(b"")
    out = _sync(src, dst, True)
    assert _tree(src) == _tree(dst)
    assert out.sums_queries == 0
    assert out.data_bytes == 5 * BLOCK + 5


def test_incremental_many_ranges_with_holes_in_a_group_end_identical(tmp_path: Path) -> None:
    """More logged ranges than one ordering-lock hold takes, some over holes of the source:
    the target ends byte for byte equal, holes punched, and only the data pages are sent."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    page, npages = resync.PAGE, 1024
    payload = os.urandom(npages * page)
    (src / "f").write_bytes(payload)
    (dst / "f").write_bytes(payload)
    rng = random.Random(9)
    picked = sorted(rng.sample(range(npages), 3 * resync.RANGES_PER_HOLD))
    with open(src / "f", "r+b") as f:
        for i in picked:
            f.seek(i * page)
            f.write(rng.randbytes(page))
    hole = range(100, 140)  # pages punched on the source (some of them logged)
    fd = os.open(src / "f", os.O_RDWR)
    try:
        punch = resync.FALLOC_FL_PUNCH_HOLE | resync.FALLOC_FL_KEEP_SIZE
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
        if libc.fallocate(fd, punch, hole.start * page, len(hole) * page) != 0:
            pytest.skip(f"this filesystem cannot punch holes (errno {ctypes.get_errno()})")
    finally:
        os.close(fd)
    logged = sorted(set(picked) | set(range(95, 145)))
    log = ActivityLog(True, True, "", ((b"f", tuple((i * page, page) for i in logged)),))
    out = _sync(src, dst, False, log)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert out.data_bytes == page * sum(1 for i in logged if i not in hole)


def test_clip_extents_keeps_the_parts_inside_the_window() -> None:
    extents = [(0, 10), (20, 10), (40, 10)]
    assert resync.clip_extents(extents, 5, 25) == [(5, 5), (20, 5)]
    assert resync.clip_extents(extents, 10, 20) == []
    assert resync.clip_extents(extents, 42, 100) == [(42, 8)]
    assert resync.clip_extents([], 0, 100) == []


def test_progress_times_are_ordered_and_the_session_length_is_from_the_monotonic_clock() -> None:
    p = resync.Progress(started=100.0, started_at=1_700_000_000.0)
    snap = p.snapshot()
    assert snap["started_at"] == 1_700_000_000.0
    assert snap["finished_at"] is None and snap["session_s"] is None  # still running
    p.finish(now=100.25, wall=1_700_000_000.3)
    snap = p.snapshot()
    assert snap["session_s"] == 0.25
    assert snap["finished_at"] == 1_700_000_000.3
    assert resync.Progress(started_at=None).snapshot()["started_at"] is None  # no session


def test_flusher_closes_every_descriptor_it_was_given(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 8192)
    flusher = resync_target._Flusher()
    fds = [os.open(tmp_path / "f", os.O_RDONLY) for _ in range(5)]
    for fd in fds:
        flusher.give(fd)
    flusher.stop()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed (by the thread, or by stop for what was left)
