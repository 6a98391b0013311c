"""Live replication between two MirrorServices on 127.0.0.1: a primary with a real FUSE mount
over its directory and a secondary that receives. Trees must end identical; a host without the
key gets nothing applied; a secondary that stops answering is dropped and the writer goes on."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.mirror import protocol
from app.mirror.protocol import Connection, Role
from app.mirror.service import MirrorService
from tests.integration.mirror_helpers import (
    assert_same,
    free_port,
    make_pair,
    run,
    snapshot,
    sync_pair,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def pair(tmp_path: Path, fuse_required: None) -> Iterator[tuple[MirrorService, MirrorService]]:
    prim, sec = make_pair(tmp_path, free_port(), ack_timeout_s=2.0)
    try:
        yield prim, sec
    finally:
        run(prim.stop())
        run(sec.stop())


def start(prim: MirrorService, sec: MirrorService) -> None:
    run(sec.start_receiver())
    run(prim.start_primary("gen1"))
    sync_pair(prim, sec, full=True)


def test_initial_full_copy_then_live_writes_end_identical(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, sec = pair
    p, s = tmp_path / "p", tmp_path / "s"
    (p / "before").mkdir()
    (p / "before" / "old.txt").write_bytes(b"x" * 200_000)
    (s / "stale").write_bytes(b"the secondary had this")
    start(prim, sec)
    assert_same(p, s)

    # a writer through the mount
    with open(p / "a.bin", "wb") as f:
        f.write(b"A" * 100_000)
        f.flush()
        os.fsync(f.fileno())
        f.seek(5 << 20)
        f.write(b"tail")  # a hole in between
    os.mkdir(p / "d")
    os.rename(p / "a.bin", p / "d" / "a.bin")
    (p / "gone").write_bytes(b"bye")
    os.unlink(p / "gone")
    os.chmod(p / "d" / "a.bin", 0o640)
    os.setxattr(p / "d" / "a.bin", "user.color", b"blue")
    os.truncate(p / "before" / "old.txt", 1234)
    os.symlink("d/a.bin", p / "link")
    os.link(p / "d" / "a.bin", p / "hard")
    os.chown(p / "before" / "old.txt", 1234, 5678)
    fd = os.open(p / "sparse", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"z" * 70000, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert prim.mirror_state() == "connected"
    assert_same(p, s)
    st = prim.status()
    assert st["ops_sent"] > 0 and st["acks"] > 0 and st["drops"] == 0


def test_wrong_key_and_garbage_get_nothing_applied(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    _, sec = pair
    run(sec.start_receiver())
    run(sec.start_resync("target", False))
    port = sec.port
    before = snapshot(tmp_path / "s")
    # 1. a client with a wrong key that tries to create a file
    conn = Connection(Role.PRIMARY, cluster="c1", node="n1", key=b"w" * 32, peer="n2")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(conn.send(conn.hello()))
        with contextlib.suppress(OSError):
            for _ in range(10):
                data = sock.recv(65536)
                if not data:
                    break
                conn.receive_data(data)
                ev = conn.next_event()
                if isinstance(ev, protocol.Hello):
                    sock.sendall(conn.send(conn.auth()))
                    break
            # pretend authenticated: send raw frames anyway
            from app.mirror import ops

            frame = protocol.encode_event(protocol.Request(1, ops.Mkdir(b"evil", 0o755, 0, 0)))
            sock.sendall(frame)
            sock.settimeout(2)
            while sock.recv(65536):
                pass
    # 2. garbage
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        contextlib.suppress(OSError),
    ):
        sock.sendall(os.urandom(4096))
        sock.settimeout(2)
        while sock.recv(65536):
            pass
    wait_for(lambda: sec.status()["rejected"] >= 2, what="both refused")
    assert not (tmp_path / "s" / "evil").exists()
    assert snapshot(tmp_path / "s") == before


def test_a_silent_secondary_is_dropped_and_the_writer_goes_on(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, sec = pair
    p = tmp_path / "p"
    start(prim, sec)
    (p / "one").write_bytes(b"1")
    # make the secondary's apply hang: its reader thread sleeps on every frame
    d = sec._sec[0]
    real = d.responder.handle

    def slow(ev: protocol.Event) -> protocol.Event | None:
        time.sleep(3.5)
        return real(ev)

    d.responder.handle = slow  # type: ignore[method-assign]
    for i in range(5):
        (p / f"w{i}").write_bytes(b"data %d" % i)
    assert prim.mirror_state() == "dropped"
    assert prim.status()["drops"] >= 1
    assert sorted(x.name for x in p.iterdir()) == ["one", "w0", "w1", "w2", "w3", "w4"]
    journal = prim._prim[0].journal
    assert journal is not None
    assert {b"w0", b"w4"} <= journal.namespace_paths()


def test_directory_and_symlink_times_follow_live_changes(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, sec = pair
    p, s = tmp_path / "p", tmp_path / "s"
    start(prim, sec)
    time.sleep(0.05)  # so every change below gets a clock distinct from the initial copy's
    os.makedirs(p / "d" / "e")
    (p / "d" / "f").write_bytes(b"f")
    os.rename(p / "d" / "f", p / "d" / "e" / "g")
    os.symlink("e/g", p / "d" / "ln")
    os.mkfifo(p / "d" / "fifo")
    (p / "top").write_bytes(b"t")
    os.unlink(p / "top")
    os.link(p / "d" / "e" / "g", p / "d" / "e" / "h")

    def same() -> bool:
        return snapshot(p, dir_times=True) == snapshot(s, dir_times=True) and (
            os.stat(p).st_mtime_ns == os.stat(s).st_mtime_ns
        )

    wait_for(same, timeout=10, what="directory, symlink and fifo times on the secondary")
    assert prim.mirror_state() == "connected"
    # each side really applied its changes at its own time: only the flush made them equal
    assert os.lstat(p / "d" / "ln").st_mtime_ns == os.lstat(s / "d" / "ln").st_mtime_ns
    assert os.stat(p / "d").st_mtime_ns == os.stat(s / "d").st_mtime_ns
