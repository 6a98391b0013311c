"""The lab's ownership lock: one live lab per prefix, and a cleanup never touches a live one.

How it works
    A lab's namespaces are named by its prefix, so two runs with one prefix share (and tear
    down) each other's hosts; and ``Lab.up`` first removes what a crashed run of its prefix
    left, which, without this lock, kills the processes of a run that is still alive.
    ``PrefixLock(prefix).acquire()`` takes an flock(2) on ``<LOCK_DIR>/mirrorha-lab-<prefix>.lock``
    without waiting: the process that holds it owns the prefix until ``release()`` or its death
    (the kernel drops the lock with the last descriptor, so a SIGKILLed owner leaves no stale
    lock behind). The holder writes its PID and command line into the file; a process that is
    refused reads them for its message, and ``owner()`` says who holds it now. The descriptor
    is close-on-exec, so the lab's children never hold the lock. ``release()`` removes the
    file while it still holds the lock, so a locker checks after locking that the file it
    locked is still the one at the path (same inode), and opens it again otherwise.

Exceptions
    LabBusy     another process holds the lock: the message names its PID and command line
    LabError    the lock file cannot be opened or written (the message names the file)

Known limits
    A killed owner's file stays (empty or with its PID) until the next acquire and release of
    its prefix. A child forked without exec shares its parent's lock. Two Lab objects
    of one prefix in one process also exclude each other (each opens the file on its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from app.labtopology import LabBusy, LabError

LOCK_DIR = Path("/run")
_TRIES = 5  # opens of a lock file replaced under us (each by a release racing us) before giving up


def lock_path(prefix: str, directory: Path | None = None) -> Path:
    """The lock file of ``prefix``."""
    return (directory or LOCK_DIR) / f"mirrorha-lab-{prefix}.lock"


def _own_command() -> str:
    with contextlib.suppress(OSError):
        raw = Path("/proc/self/cmdline").read_bytes()
        return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return "?"


class PrefixLock:
    """The ownership lock of one prefix; see the module docstring."""

    def __init__(self, prefix: str, directory: Path | None = None) -> None:
        self.prefix = prefix
        self.path = lock_path(prefix, directory)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise LabBusy naming its holder; a no-op when already held."""
        if self._fd is not None:
            return
        for _ in range(_TRIES):
            fd = self._open_and_lock()
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)  # a releasing holder unlinked the file we locked: lock the new one
        else:
            raise LabError(f"lab lock {self.path}: replaced {_TRIES} times while being locked")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_own_command()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise LabError(f"lab lock {self.path}: {exc.strerror}") from exc
        self._fd = fd

    def _open_and_lock(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LabError(f"lab lock {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LabBusy(
                f"lab {self.prefix!r} is in use by {holder} (lock {self.path}): let that run end "
                "(Ctrl-C stops `lab up`) or choose another --prefix"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise LabError(f"lab lock {self.path}: {exc.strerror}") from exc
        return fd

    def owner(self) -> str | None:
        """'PID n (command)' of the process that holds the lock now, None when it is free
        (or held by this object)."""
        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LabError(f"lab lock {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        finally:
            os.close(fd)  # also drops the shared lock taken when it was free
        return None

    def release(self) -> None:
        """Give the lock up and remove its file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # still locked: a process that opened it sees it replaced
            os.close(fd)


def _read_holder(fd: int) -> str:
    """'PID n (command)' from a lock file another process holds, as far as it says."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"PID {pid} ({command})" if command else f"PID {pid}"
