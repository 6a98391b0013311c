"""Mount and unmount the primary's FUSE layer over a replicated directory.

How it works
    ``MirrorMount(path, replicator)``: ``start()`` clears a stale mount left at ``path`` by a
    crashed daemon, refuses a live one, opens the real directory (``O_PATH``) BEFORE mounting, then
    runs the FUSE session (``fuseloop.serve``: /dev/fuse, mount(2), worker threads) in a background
    thread of this process, so the replicator is shared in memory. FUSE request threads call the
    replicator directly; they never touch an asyncio loop. ``wait_ready(timeout)`` returns once
    /proc/self/mountinfo lists the mount and a ``stat`` through it answers. ``stop()`` detaches the
    mount lazily (``umount2(MNT_DETACH)``, ``fusermount3 -u -z`` as fallback), waits for the loop to
    end, aborts the FUSE connection (/sys/fs/fuse/connections/N/abort) if processes still hold files
    in the detached tree, then closes the directory handle. ``start``/``stop`` are idempotent; the
    object is a context manager (start + wait_ready, then stop). ``exclude`` (the directory's
    exclude patterns, see exclude.py) is handed to ``MirrorFS``.

    ``clean_stale_mount(path)`` unmounts FUSE mounts at ``path`` whose daemon is gone
    ("transport endpoint is not connected"); ``fuse_mounts(path)`` lists them.

Exceptions
    MountError        the mount did not come up, a live mount already covers the path, or the
                      loop would not end; says which path and why.
    OSError           opening the directory (ENOENT, ENOTDIR, EACCES) propagates unchanged.

Known limits
    - Needs root: mount(2) itself, and allow_other.
    - The daemon's own process must not mmap files of its mount: a page fault taken while
      holding the GIL waits for a FUSE thread that needs the GIL (deadlock). Plain syscalls
      release the GIL and are fine (the tests run through the mount in-process this way).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from app.mirror.fusefs import DEFAULT_TIMEOUTS, CacheTimeouts, MirrorFS
from app.mirror.fuseloop import serve
from app.mirror.ops import Replicator

FSNAME = "mirrorha"
FSTYPE = "fuse.mirrorha"
MNT_DETACH = 2
_FUSECTL = "/sys/fs/fuse/connections"
_POLL = 0.02
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)

_libc = ctypes.CDLL(None, use_errno=True)
_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_umount2.restype = ctypes.c_int


class MountError(Exception):
    """The FUSE mount could not be made, confirmed or removed."""


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    device: tuple[int, int]
    mountpoint: bytes
    fstype: str
    source: str


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def read_mountinfo(text: bytes) -> list[MountInfo]:
    """Parse mountinfo (pure): octal escapes in mount points are decoded."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(b" - ")
        if not sep:
            continue
        fields = left.split(b" ")
        tail = right.split(b" ")
        if len(fields) < 5 or len(tail) < 2:
            continue
        major, _, minor = fields[2].partition(b":")
        mounts.append(
            MountInfo(
                mount_id=int(fields[0]),
                device=(int(major), int(minor)),
                mountpoint=_unescape(fields[4]),
                fstype=tail[0].decode(errors="replace"),
                source=_unescape(tail[1]).decode(errors="replace"),
            )
        )
    return mounts


def _canonical(path: str | os.PathLike[str]) -> bytes:
    """Absolute path with the parent's symlinks resolved (the last part is never stat'ed)."""
    absolute = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(absolute)
    return os.fsencode(os.path.join(os.path.realpath(parent), name))


def fuse_mounts(path: str | os.PathLike[str]) -> list[MountInfo]:
    """FUSE mounts whose mount point is ``path``, oldest first."""
    with open("/proc/self/mountinfo", "rb") as f:
        text = f.read()
    target = _canonical(path)
    return [
        m for m in read_mountinfo(text) if m.mountpoint == target and m.fstype.startswith("fuse")
    ]


def _detach(path: bytes) -> None:
    if _umount2(path, MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    try:
        subprocess.run(
            ["fusermount3", "-u", "-z", os.fsdecode(path)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise MountError(f"{os.fsdecode(path)}: unmount failed: {os.strerror(err)}") from exc


def _is_dead(path: bytes) -> bool:
    """statfs always reaches the daemon (stat may be answered from the kernel's cache)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in _DEAD
    return False


def clean_stale_mount(path: str | os.PathLike[str]) -> bool:
    """Detach FUSE mounts at ``path`` whose daemon is gone; True if any was removed.

    A live FUSE mount is left alone. Bounded: at most 16 stacked mounts are removed.
    """
    target = _canonical(path)
    cleaned = False
    for _ in range(16):
        if not fuse_mounts(path) or not _is_dead(target):
            break
        _detach(target)
        cleaned = True
    return cleaned


class MirrorMount:
    """The FUSE layer over one replicated directory, in a thread of this process."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        replicator: Replicator,
        *,
        timeouts: CacheTimeouts = DEFAULT_TIMEOUTS,
        exclude: Sequence[str] = (),
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.path = os.fsdecode(_canonical(path))
        self._replicator = replicator
        self._timeouts = timeouts
        self._exclude = tuple(exclude)
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._lock = threading.Lock()
        self._root_fd: int | None = None
        self._fs: MirrorFS | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._device: tuple[int, int] | None = None

    @property
    def running(self) -> bool:
        """True while the FUSE loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Open the directory and start serving the mount (returns before it is live)."""
        with self._lock:
            if self._thread is not None:
                return
            clean_stale_mount(self.path)
            if fuse_mounts(self.path):
                raise MountError(f"{self.path}: a live FUSE mount already covers it")
            self._device = None
            flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
            self._root_fd = os.open(self.path, flags)
            self._fs = MirrorFS(
                self._root_fd, self._replicator, timeouts=self._timeouts, exclude=self._exclude
            )
            self._error = None
            self._thread = threading.Thread(
                target=self._serve, args=(self._fs,), name=f"fuse:{self.path}", daemon=True
            )
            self._thread.start()

    def _serve(self, fs: MirrorFS) -> None:
        try:
            serve(fs, self.path, fsname=FSNAME)
        except BaseException as exc:  # reported by wait_ready
            self._error = exc

    def wait_ready(self, timeout: float) -> None:
        """Return once the mount is listed and answers a stat; MountError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is None:
                raise MountError(f"{self.path}: not started")
            if not thread.is_alive():
                raise MountError(f"{self.path}: FUSE loop ended: {self._error!r}")
            mine = fuse_mounts(self.path)
            if mine:
                with contextlib.suppress(OSError):
                    os.stat(self.path)
                    self._device = mine[-1].device
                    return
            if time.monotonic() >= deadline:
                raise MountError(f"{self.path}: mount not live after {timeout} s")
            time.sleep(_POLL)

    def stop(self) -> None:
        """Lazy-unmount, wait for the loop, close the handles. Safe to call twice."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            try:
                if thread.is_alive():
                    self._unmount(thread)
                    thread.join(self._stop_timeout)
                if thread.is_alive():
                    self._abort()
                    thread.join(self._stop_timeout)
                if thread.is_alive():
                    raise MountError(f"{self.path}: FUSE loop did not end after unmount")
            finally:
                if not thread.is_alive():
                    self._thread = None
                    if self._fs is not None:
                        self._fs.close_all()
                        self._fs = None
                    if self._root_fd is not None:
                        os.close(self._root_fd)
                        self._root_fd = None

    def _unmount(self, thread: threading.Thread) -> None:
        """Detach our mount; if the loop is still mounting, wait (bounded) for it first."""
        deadline = time.monotonic() + self._stop_timeout
        while thread.is_alive():
            mounts = fuse_mounts(self.path)
            if mounts:
                self._device = mounts[-1].device
                _detach(os.fsencode(self.path))
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(_POLL)

    def _abort(self) -> None:
        if self._device is None:
            return
        mounted_here = False
        if not os.path.isdir(os.path.join(_FUSECTL, "0")) and not os.listdir(_FUSECTL):
            done = subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", _FUSECTL],
                check=False,
                capture_output=True,
                timeout=10,
            )
            mounted_here = done.returncode == 0
        abort = os.path.join(_FUSECTL, str(self._device[1]), "abort")
        try:
            with contextlib.suppress(OSError), open(abort, "w") as f:
                f.write("1")
        finally:
            if mounted_here:  # leave the host's mounts as we found them
                subprocess.run(["umount", _FUSECTL], check=False, capture_output=True, timeout=10)

    def __enter__(self) -> MirrorMount:
        self.start()
        try:
            self.wait_ready(self._ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
