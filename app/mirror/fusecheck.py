"""Can this host run the FUSE layer? If not, say exactly what is missing and how to fix it.

How it works
    ``fuse_unavailable_reason()`` runs two probes and returns None when both pass, otherwise
    one sentence per failing probe, joined by "; ". Each sentence names what is missing and
    the command that fixes it; the service shows it next to "async" when it falls back to the
    inotify mode (asyncmode.py). The probes are module-level functions so tests can replace
    them (monkeypatch) without touching the machine:

    - ``probe_dev_fuse()``: /dev/fuse exists and opens read-write (the kernel module is loaded
      and, in a container, the device was passed in);
    - ``probe_root()``: we run as root. The FUSE session (fuseloop.py) mounts with mount(2),
      which needs CAP_SYS_ADMIN; there is no fusermount3 helper and no libfuse to load.

Exceptions
    None: every failure is reported in the returned sentence, never raised.

Known limits
    - A passing check does not prove a mount will succeed (a seccomp or AppArmor profile, a
      read-only /etc/mtab, or a user namespace without CAP_SYS_ADMIN can still refuse it); the
      mount itself reports those (mount.MountError).
    - The root probe looks at the effective uid, not at capabilities: a root without
      CAP_SYS_ADMIN passes it and fails at the mount, which says so.
"""

from __future__ import annotations

import errno
import os
from typing import Final

DEV_FUSE: Final = "/dev/fuse"


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


def probe_root() -> str | None:
    """None when we run as root, else why the mount cannot be made and the fix."""
    if os.geteuid() == 0:
        return None
    return "mirrorha is not root and mounting FUSE needs root (CAP_SYS_ADMIN): run it as root"


def fuse_unavailable_reason() -> str | None:
    """None when the FUSE layer can be used, else every missing piece and its fix, in one line."""
    problems = [p for p in (probe_dev_fuse(), probe_root()) if p]
    return "; ".join(problems) if problems else None
