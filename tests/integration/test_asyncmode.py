"""The inotify fallback end to end: a watched source tree, a Receiver applying the ops to a
target tree, and a workload that must leave both trees identical."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.mirror import ops
from app.mirror.asyncmode import AsyncMirror
from app.mirror.ops import Op
from app.mirror.receiver import Receiver

pytestmark = pytest.mark.integration

BLOCK = 64 * 1024


class RecordingSink:
    """Applies ops to the target with a Receiver and remembers them."""

    def __init__(self, target: Path) -> None:
        self.receiver = Receiver(target)
        self.ops: list[Op] = []
        self.lock = threading.Lock()

    def __call__(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)
        self.receiver.apply(op)

    def take(self) -> list[Op]:
        with self.lock:
            taken, self.ops = self.ops, []
        return taken


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What a user compares: each path's type, mode, size, content or link target.

    The mirror may be changing the tree while it is read: an entry gone between the listing
    and its lstat is left out (the callers poll until both trees are equal)."""
    tree: dict[str, tuple[object, ...]] = {".": ("root", stat.S_IMODE(root.stat().st_mode))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            try:
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    tree[rel] = ("link", os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    tree[rel] = ("dir", stat.S_IMODE(st.st_mode))
                else:
                    tree[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, full.read_bytes())
            except FileNotFoundError:
                continue
    return tree


def wait_identical(src: Path, dst: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        a, b = snapshot(src), snapshot(dst)
        if a == b:
            return
        if time.monotonic() > deadline:
            only_a = {k: v for k, v in a.items() if b.get(k) != v}
            only_b = {k: v for k, v in b.items() if a.get(k) != v}
            raise AssertionError(
                f"trees still differ after {seconds} s:\n"
                f"source: {_short(only_a)}\ntarget: {_short(only_b)}"
            )
        time.sleep(0.05)


def _short(d: dict[str, tuple[object, ...]]) -> dict[str, object]:
    return {
        k: tuple(x if not isinstance(x, bytes) else f"<{len(x)} bytes>" for x in v)
        for k, v in d.items()
    }


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


@pytest.fixture
def mirror(trees: tuple[Path, Path]) -> Iterator[tuple[AsyncMirror, RecordingSink]]:
    src, dst = trees
    sink = RecordingSink(dst)
    am = AsyncMirror(src, sink, settle_ms=20, exclude=("*.swp",))
    am.start()
    try:
        yield am, sink
    finally:
        am.stop()
        sink.receiver.close()


def test_initial_sync_copies_what_was_there(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a" / "b").mkdir(parents=True)
    dst.mkdir()
    (src / "a" / "b" / "f").write_bytes(os.urandom(3 * BLOCK + 5))
    (src / "top").write_text("top")
    os.chmod(src / "top", 0o640)
    os.symlink("a/b/f", src / "link")
    sink = RecordingSink(dst)
    am = AsyncMirror(src, sink)
    am.start()
    try:
        am.initial_sync(timeout=30)
        assert snapshot(src) == snapshot(dst)
    finally:
        am.stop()
        sink.receiver.close()


def test_workload_leaves_identical_trees(
    trees: tuple[Path, Path], mirror: tuple[AsyncMirror, RecordingSink]
) -> None:
    src, dst = trees
    am, _sink = mirror
    # create, append, overwrite, truncate
    (src / "small").write_bytes(b"hello")
    with open(src / "small", "ab") as f:
        f.write(b" world")
    big = src / "big"
    big.write_bytes(os.urandom(10 * BLOCK + 123))
    with open(big, "r+b") as f:
        f.seek(4 * BLOCK + 10)
        f.write(b"X" * 100)
    (src / "shrink").write_bytes(os.urandom(5 * BLOCK))
    os.truncate(src / "shrink", BLOCK + 7)
    (src / "grow").write_bytes(b"g")
    os.truncate(src / "grow", 2 * BLOCK)
    # directories, renames of files and directories
    (src / "d1" / "d2").mkdir(parents=True)
    (src / "d1" / "d2" / "inner").write_text("inner")
    (src / "d1" / "f").write_text("f")
    wait_identical(src, dst)
    os.rename(src / "d1", src / "renamed")
    os.rename(src / "small", src / "renamed" / "small-moved")
    (src / "gone").mkdir()
    (src / "gone" / "x").write_text("x")
    wait_identical(src, dst)
    os.unlink(src / "gone" / "x")
    os.rmdir(src / "gone")
    # a directory filled right away (before its watch can exist)
    os.makedirs(src / "fast" / "a" / "b")
    (src / "fast" / "a" / "b" / "c").write_text("c")
    # chmod, symlinks, delete, an atomic replace, an excluded file
    os.chmod(src / "big", 0o600)
    os.chmod(src / "renamed", 0o750)
    os.chmod(src, 0o711)
    os.symlink("big", src / "link")
    os.symlink("/nonexistent/outside", src / "dangling")
    os.unlink(src / "grow")
    (src / "tmp").write_text("new content")
    os.rename(src / "tmp", src / "shrink")
    (src / "editor.swp").write_text("not mirrored")
    wait_identical_except(src, dst, {"editor.swp"})
    assert not (dst / "editor.swp").exists()
    # a symlink replaced by another target, a file replaced by a directory
    os.unlink(src / "link")
    os.symlink("renamed", src / "link")
    os.unlink(src / "renamed" / "f")
    (src / "renamed" / "f").mkdir()
    wait_identical_except(src, dst, {"editor.swp"})

    status = am.status()
    assert status["mode"] == "async"
    assert isinstance(status["note"], str) and status["note"].startswith("async: up to ")
    assert status["note"].endswith(" ms of writes can be lost on failover")
    assert status["errors"] == 0, status["last_error"]
    lag = am.lag_ms()
    for key in ("p50", "p99", "max", "last"):
        assert isinstance(lag[key], float), lag


def wait_identical_except(src: Path, dst: Path, skip: set[str]) -> None:
    deadline = time.monotonic() + 20
    while True:
        a = {k: v for k, v in snapshot(src).items() if k not in skip}
        b = snapshot(dst)
        if a == b:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"trees differ:\n{_short(a)}\n{_short(b)}")
        time.sleep(0.05)


def test_overwrite_in_the_middle_sends_only_changed_blocks(
    trees: tuple[Path, Path], mirror: tuple[AsyncMirror, RecordingSink]
) -> None:
    src, dst = trees
    am, sink = mirror
    big = src / "big"
    big.write_bytes(os.urandom(64 * BLOCK + 1000))
    wait_identical(src, dst)
    am.flush()
    sink.take()
    sent_before = am.status()["sent_bytes"]

    with open(big, "r+b") as f:
        f.seek(20 * BLOCK + 100)
        f.write(b"Y" * 200)  # inside block 20
        f.seek(40 * BLOCK - 50)
        f.write(b"Z" * 100)  # straddles blocks 39 and 40
    wait_identical(src, dst)
    am.flush()
    sent = sink.take()
    writes = [op for op in sent if isinstance(op, ops.Write)]
    assert sum(len(w.data) for w in writes) == 3 * BLOCK, writes
    assert sorted(w.offset for w in writes) == [20 * BLOCK, 39 * BLOCK]
    assert not any(isinstance(op, ops.Create | ops.Truncate) for op in sent)
    sent_after = am.status()["sent_bytes"]
    assert isinstance(sent_before, int) and isinstance(sent_after, int)
    assert sent_after - sent_before == 3 * BLOCK


def test_moves_in_and_out_of_the_tree(tmp_path: Path) -> None:
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    for d in (src, dst, outside):
        d.mkdir()
    (outside / "dir" / "sub").mkdir(parents=True)
    (outside / "dir" / "sub" / "file").write_bytes(b"from outside")
    sink = RecordingSink(dst)
    am = AsyncMirror(src, sink, settle_ms=10)
    am.start()
    try:
        (src / "leaving").mkdir()
        (src / "leaving" / "f").write_text("bye")
        wait_identical(src, dst)
        os.rename(outside / "dir", src / "arrived")
        os.rename(src / "leaving", outside / "left")
        wait_identical(src, dst)
        # the moved-out directory is no longer followed
        (outside / "left" / "later").write_text("not mirrored")
        (src / "marker").write_text("m")
        wait_identical(src, dst)
        assert not (dst / "left").exists() and not (dst / "leaving").exists()
    finally:
        am.stop()
        sink.receiver.close()


def test_queue_overflow_rescans(tmp_path: Path) -> None:
    """Many events while the sink is slow: whatever inotify drops, a rescan repairs."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many writes to overflow it")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    receiver = Receiver(dst)
    gate = threading.Event()

    def slow_sink(op: Op) -> None:
        gate.wait(10)
        receiver.apply(op)

    am = AsyncMirror(src, slow_sink, settle_ms=0, queue_ops=2)
    am.start()
    try:
        # each rewrite queues at least MODIFY and CLOSE_WRITE: enough to overflow the queue
        for i in range(limit // 2 + 2000):
            (src / f"f{i % 200}").write_bytes(b"%d" % i)
        gate.set()
        wait_identical(src, dst, seconds=120)
        status = am.status()
        assert status["overflows"] >= 1
        assert status["errors"] == 0, status["last_error"]
    finally:
        gate.set()
        am.stop()
        receiver.close()


def test_a_file_written_continuously_is_copied_before_it_settles(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    sink = RecordingSink(dst)
    am = AsyncMirror(src, sink, settle_ms=60_000, max_delay_ms=200)
    am.start()
    try:
        copied = b""
        with open(src / "log", "ab") as f:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # never pauses long enough to settle
                f.write(b"line\n")
                f.flush()
                time.sleep(0.01)
                if (dst / "log").exists():
                    copied = (dst / "log").read_bytes()
                    if copied:
                        break
        assert copied and set(copied.split(b"\n")) <= {b"line", b""}
    finally:
        am.stop()
        sink.receiver.close()
