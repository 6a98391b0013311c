"""The lab's ownership lock (app/lablock.py), on a lock directory of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.lablock import PrefixLock, lock_path
from app.labtopology import LabBusy, LabError

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from pathlib import Path
from app.lablock import PrefixLock
PrefixLock("mht-", Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_holder_is_refused_with_the_owners_pid(tmp_path: Path) -> None:
    first, second = PrefixLock("mht-", tmp_path), PrefixLock("mht-", tmp_path)
    first.acquire()
    first.acquire()  # already held: a no-op
    with pytest.raises(LabBusy, match=rf"'mht-' is in use by PID {os.getpid()} \(.*--prefix"):
        second.acquire()
    assert first.held and not second.held
    assert second.owner() == f"PID {os.getpid()} ({_own()})"
    first.release()
    first.release()  # idempotent
    assert second.owner() is None
    assert not lock_path("mht-", tmp_path).exists(), "a release leaves its lock file"
    second.acquire()
    assert lock_path("mht-", tmp_path).read_text().split()[0] == str(os.getpid())
    second.release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_replaced_while_locking_is_locked_again(tmp_path: Path) -> None:
    """A locker that locked the inode a releasing holder just unlinked must not own the prefix:
    it opens the new file at the path and locks that one."""
    path = lock_path("mht-", tmp_path)
    stale = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # what the racing locker had opened
    try:
        os.unlink(path)
        lock = PrefixLock("mht-", tmp_path)
        opened: list[int] = []
        real = lock._open_and_lock

        def first_gets_the_stale_inode() -> int:
            if not opened:
                opened.append(stale)
                return os.dup(stale)
            return real()

        lock._open_and_lock = first_gets_the_stale_inode  # type: ignore[method-assign]
        lock.acquire()
        assert lock.held
        assert os.stat(path).st_ino != os.fstat(stale).st_ino
        assert PrefixLock("mht-", tmp_path).owner() == f"PID {os.getpid()} ({_own()})"
        lock.release()
    finally:
        os.close(stale)


def _own() -> str:
    return Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()


def test_the_lock_of_a_killed_owner_is_free(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        lock = PrefixLock("mht-", tmp_path)
        owner = lock.owner()
        assert owner is not None and owner.startswith(f"PID {child.pid} ({sys.executable} -c ")
        with pytest.raises(LabBusy, match=rf"PID {child.pid}"):
            lock.acquire()
        child.kill()
        child.wait(timeout=10)
        assert lock.owner() is None
        lock.acquire()
        lock.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def test_no_lock_file_means_no_owner_and_a_bad_directory_is_named(tmp_path: Path) -> None:
    assert PrefixLock("mht-", tmp_path).owner() is None
    missing = tmp_path / "no-such-dir"
    with pytest.raises(LabError, match=rf"lab lock {missing}/mirrorha-lab-mht-.lock: "):
        PrefixLock("mht-", missing).acquire()
