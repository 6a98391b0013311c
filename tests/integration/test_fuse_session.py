"""The libfuse binding (fusebinding.py) on a real mount: each libfuse worker thread keeps its
Python thread state from one request to the next instead of making and deleting one per
request (an mmap and munmap of its frame stack each time)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.mirror.ops import LocalOnly

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("no_mount_left_behind"),
]


def test_a_worker_thread_keeps_its_python_state_between_requests(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    real = tmp_path / "data"
    real.mkdir()
    mount = mount_factory(str(real), LocalOnly())
    fs = mount._fs
    statfs = fs.statfs
    mine = threading.local()  # lives in the thread state: gone with it
    calls: list[tuple[int, bool]] = []

    def recording(path: str | None) -> Any:
        calls.append((threading.get_ident(), getattr(mine, "seen", False)))
        mine.seen = True
        return statfs(path)

    fs.statfs = recording
    for _ in range(40):  # more requests than libfuse has worker threads
        os.statvfs(real)
    workers = {ident for ident, _ in calls}
    assert len(calls) == 40 and len(workers) < 40
    # every call after a thread's first found what that thread's earlier call left
    first_seen = {ident: seen for ident, seen in reversed(calls)}
    assert not any(first_seen.values())
    assert sum(seen for _, seen in calls) == 40 - len(workers)


def test_mounting_prints_no_libfuse_warning(
    tmp_path: Path, mount_factory: Callable[..., Any], capfd: pytest.CaptureFixture[str]
) -> None:
    """libfuse 3.14 printed "Ignoring invalid max threads value 4294967295" on stderr at
    every mount with its default idle-thread setting; an admin reading the daemon's log should
    not have to wonder about it."""
    real = tmp_path / "data"
    real.mkdir()
    mount = mount_factory(str(real), LocalOnly())
    (real / "f").write_bytes(b"x")  # through the mount
    assert (real / "f").read_bytes() == b"x"
    mount.stop()
    assert "Ignoring invalid" not in capfd.readouterr().err


def test_writes_send_no_capability_lookup(
    tmp_path: Path, mount_factory: Callable[..., Any]
) -> None:
    """The mount asks for FUSE_HANDLE_KILLPRIV_V2 in its INIT reply (libfuse 3.14 cannot):
    the kernel then looks up security.capability on a file's first write only, not before
    every write (a whole round trip to the daemon each)."""
    real = tmp_path / "data"
    real.mkdir()
    mount = mount_factory(str(real), LocalOnly())
    fs = mount._fs
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
