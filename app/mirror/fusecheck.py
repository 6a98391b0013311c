"""Can this host run the FUSE layer? If not, say exactly what is missing and how to fix it.

How it works
    ``fuse_unavailable_reason()`` runs three probes and returns None when all pass, otherwise
    one sentence per failing probe, joined by "; ". Each sentence names what is missing and
    the command that fixes it; the service shows it next to "async" when it falls back to the
    inotify mode (asyncmode.py). The probes are module-level functions so tests can replace
    them (monkeypatch) without touching the machine:

    - ``probe_dev_fuse()``: /dev/fuse exists and opens read-write (the kernel module is loaded
      and, in a container, the device was passed in);
    - ``probe_libfuse()``: libfuse 3 loads through ctypes (``ctypes.util.find_library("fuse3")``,
      else the soname ``libfuse3.so.3``), as mfusepy will load it;
    - ``probe_fusermount()``: ``fusermount3`` is on PATH, or we are root (root mounts directly).

Exceptions
    None: every failure is reported in the returned sentence, never raised.

Known limits
    - A passing check does not prove a mount will succeed (a seccomp or AppArmor profile, a
      read-only /etc/mtab, or a user namespace without CAP_SYS_ADMIN can still refuse it); the
      mount itself reports those (mount.MountError).
    - The library probe loads libfuse into this process (harmless: mfusepy does the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from typing import Final

DEV_FUSE: Final = "/dev/fuse"
LIBFUSE_SONAME: Final = "libfuse3.so.3"


def probe_dev_fuse(path: str = DEV_FUSE) -> str | None:
    """None when ``path`` opens read-write, else what is wrong with it and the fix."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return (
            f"{path} does not exist: load the kernel module with 'modprobe fuse', or in a "
            "container pass the device (docker run --device /dev/fuse --cap-add SYS_ADMIN)"
        )
    except PermissionError:
        return (
            f"{path} cannot be opened read-write (permission denied): run mirrorha as root, "
            "or in a container allow the device (--device /dev/fuse)"
        )
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        return f"{path} cannot be opened read-write ({reason}): check that the fuse module works"
    os.close(fd)
    return None


def probe_libfuse() -> str | None:
    """None when libfuse 3 loads with ctypes, else what is wrong and the fix."""
    name = ctypes.util.find_library("fuse3")
    try:
        ctypes.CDLL(name or LIBFUSE_SONAME)
    except OSError as exc:
        if name is None:
            return "libfuse 3 is not installed: apt-get install fuse3"
        return (
            f"libfuse 3 ({name}) is installed but does not load ({exc}): "
            "apt-get install --reinstall libfuse3-3"
        )
    return None


def probe_fusermount() -> str | None:
    """None when fusermount3 is on PATH or we are root, else what is missing and the fix."""
    if os.geteuid() == 0 or shutil.which("fusermount3") is not None:
        return None
    return "fusermount3 is not installed and mirrorha is not root: apt-get install fuse3"


def fuse_unavailable_reason() -> str | None:
    """None when the FUSE layer can be used, else every missing piece and its fix, in one line."""
    problems = [p for p in (probe_dev_fuse(), probe_libfuse(), probe_fusermount()) if p]
    return "; ".join(problems) if problems else None
