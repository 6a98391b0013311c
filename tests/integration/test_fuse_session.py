"""The FUSE session (fuseloop.py) on a real mount: its worker pool, the INIT flags it asks for,
the mount's options, directory listings, and names that stay true across a rename."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.mirror import ops
from app.mirror.ops import LocalOnly
from app.mirror.receiver import Receiver

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("no_mount_left_behind"),
]

T = TypeVar("T")


def _mounted(tmp_path: Path, mount_factory: Callable[..., Any]) -> tuple[Path, Any]:
    """A fresh directory with a mount over it (no peer); the directory and its MirrorFS."""
    real = tmp_path / "data"
    real.mkdir()
    return real, mount_factory(str(real), LocalOnly())._fs


def _mount_line(path: Path) -> list[str]:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(path) and fields[2] == "fuse.mirrorha":
                return fields
    raise AssertionError(f"no fuse.mirrorha mount on {path}")


def test_the_mount_is_nosuid_nodev_and_open_to_every_user(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    real, _ = _mounted(tmp_path, mount_factory)
    fields = _mount_line(real)
    options = set(fields[3].split(","))
    assert {"nosuid", "nodev", "default_permissions", "allow_other"} <= options
    assert fields[0] == "mirrorha"


def test_sequential_requests_reuse_a_few_workers(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    real, fs = _mounted(tmp_path, mount_factory)
    statfs = fs.statfs
    threads: list[str] = []

    def recording(path: str | None) -> Any:
        threads.append(threading.current_thread().name)
        return statfs(path)

    fs.statfs = recording
    for _ in range(40):
        os.statvfs(real)
    assert len(threads) == 40
    assert all(name.startswith("fuse-") for name in threads)
    assert len(set(threads)) <= 4  # one serving, one waiting, and the odd overlap


def test_the_pool_grows_to_the_requests_that_wait(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    """Six requests that each wait for all six to arrive: with a fixed or non-growing pool
    they never all arrive and the barrier breaks."""
    real, fs = _mounted(tmp_path, mount_factory)
    statfs = fs.statfs
    barrier = threading.Barrier(6, timeout=10)
    served: list[str] = []

    def waiting(path: str | None) -> Any:
        barrier.wait()  # BrokenBarrierError: an EIO for the caller, and the test fails
        served.append(threading.current_thread().name)
        return statfs(path)

    fs.statfs = waiting
    errors: list[BaseException] = []

    def call() -> None:
        try:
            os.statvfs(real)
        except OSError as exc:
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(20)
    assert not errors
    assert len(set(served)) == 6


def test_writes_send_no_capability_lookup(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    """The mount asks for FUSE_HANDLE_KILLPRIV_V2 in its INIT reply: the kernel then looks up
    security.capability on a file's first write only, not before every write (a whole round
    trip to the daemon each)."""
    real, fs = _mounted(tmp_path, mount_factory)
    getxattr = fs.getxattr
    looked_up: list[str] = []

    def recording(path: str | None, name: str, position: int = 0) -> Any:
        looked_up.append(name)
        return getxattr(path, name, position)

    fs.getxattr = recording
    fd = os.open(real / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(50):
            os.pwrite(fd, b"x" * 4096, i * 4096)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    assert (real / "f").stat().st_size == 50 * 4096
    # the first write looks it up (the kernel learns there is none); an attribute refresh
    # may make it look once more; without the flag it is 50
    assert 1 <= looked_up.count("security.capability") <= 2


def test_ls_a_lists_dot_and_dot_dot(tmp_path: Path, mount_factory: Callable[..., Any]) -> None:
    """readdir(3) skips an entry whose inode number is 0: "." and ".." must carry theirs."""
    real, _ = _mounted(tmp_path, mount_factory)
    (real / "sub").mkdir()
    (real / "a file").write_bytes(b"x")
    for where in (real, real / "sub"):
        out = subprocess.run(
            ["ls", "-a1", str(where)], capture_output=True, text=True, timeout=20, check=True
        ).stdout.splitlines()
        assert out[:2] == [".", ".."]
    listed = subprocess.run(
        ["ls", "-a1", str(real)], capture_output=True, text=True, timeout=20, check=True
    ).stdout.splitlines()
    assert sorted(listed) == [".", "..", "a file", "sub"]


class ShadowReplicator:
    """Applies every op, in the order of the local changes, to a shadow tree with the
    secondary's Receiver, and keeps what the shadow refused."""

    def __init__(self, shadow: Path) -> None:
        self.receiver = Receiver(shadow)
        self.lock = threading.Lock()
        self.refused: list[tuple[ops.Op, OSError]] = []
        self.seen = 0

    def apply(self, op: ops.Op, local: Callable[[], T]) -> T:
        with self.lock:
            result = local()
            self.seen += 1
            try:
                self.receiver.apply(op)
            except OSError as exc:
                self.refused.append((op, exc))
            return result


def test_a_close_after_a_rename_names_the_file_where_it_is_now(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    """Write, close, rename, as editors and databases save: the close's RELEASE reaches the
    daemon after close(2) returned, and the rename may arrive while it is being served. The
    times it sends must name the file where it is once the rename is done: a stale path is
    refused by the peer (ENOENT, and the peer is dropped) or, when the application made a new
    file there meanwhile, sets the times of the wrong file. Here every rename is made while
    the RELEASE is in the middle of being served."""
    real = tmp_path / "data"
    shadow = tmp_path / "shadow"
    real.mkdir()
    shadow.mkdir()
    replicator = ShadowReplicator(shadow)
    mount = mount_factory(str(real), replicator)
    fs = mount._fs
    release = fs.release
    serving = threading.Event()

    def slow_release(path: str | None, fh: int) -> int:
        serving.set()
        time.sleep(0.02)  # the rename below arrives now
        return release(path, fh)

    fs.release = slow_release
    for i in range(25):
        serving.clear()
        fd = os.open(real / "tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"generation %d\n" % i)
        os.close(fd)
        assert serving.wait(10), "the close's RELEASE never reached the daemon"
        os.rename(real / "tmp", real / f"saved-{i}")
    assert replicator.refused == []
    for i in range(25):
        name = f"saved-{i}"
        assert (shadow / name).read_bytes() == b"generation %d\n" % i
        assert (shadow / name).stat().st_mtime_ns == (real / name).stat().st_mtime_ns, name
    assert not (shadow / "tmp").exists()
