"""The lab's host-side helpers: commands, processes and mounts, seen from the host.

How it works
    ``_run`` runs one command with its text output captured and a bounded time
    (``COMMAND_TIMEOUT`` by default) and translates failures into the lab's errors.
    ``unavailable_reason`` says why the lab cannot run here (no network namespaces, not root, a
    tool of ``TOOLS`` missing, ``ip netns list`` failing). Processes are read from /proc:
    ``pid_alive`` (exists, not a zombie), ``pids_in`` (processes, not ours, in the given network
    or mount namespaces, by namespace inode); ``_kill_and_wait`` sends SIGKILL and waits,
    bounded. ``mounts_under`` reads /proc/self/mountinfo; ``_umount_all`` unmounts deepest
    first, lazily when a plain umount fails. ``default_workdir`` is the work dir of a prefix.

Exceptions
    ``_run``: LabUnavailable when the command is not found, LabError when it does not finish
    in time, LabCommandError when it exits non-zero and ``check`` is set (app/labtopology.py).

Known limits
    Linux only (/proc). Mounts are those of this process's mount namespace.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal as _signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from app.labtopology import COMMAND_TIMEOUT, TOOLS, LabCommandError, LabError, LabUnavailable


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "the lab needs Linux network namespaces (/proc/self/ns/net is missing)"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, bind mounts, bridges)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (Debian packages iproute2, util-linux, mount)"
    try:
        proc = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns list` failed: {exc}"
    if proc.returncode != 0:
        return f"`ip netns list` failed: {proc.stderr.strip()}"
    return None


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = COMMAND_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, translate failures into LabError."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input
        )
    except FileNotFoundError as exc:
        raise LabUnavailable(f"{argv[0]} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout} s") from exc
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


def mounts_under(root: Path) -> list[str]:
    """Mount points at or under ``root`` in this mount namespace, deepest last."""
    prefix = str(root).rstrip("/")
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 5:
                continue
            # mountinfo escapes space, tab, newline and backslash as octal.
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


def ns_inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw.rsplit(")", 1)[1].split()
    return rest[0], int(rest[1]), int(rest[3])


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def pids_in(net_inodes: set[int], mnt_inodes: set[int]) -> list[int]:
    """PIDs (not ours) whose network or mount namespace is one of the given ones."""
    pids: list[int] = []
    if not net_inodes and not mnt_inodes:
        return pids
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        for kind, wanted in (("net", net_inodes), ("mnt", mnt_inodes)):
            ino = ns_inode(f"/proc/{entry}/ns/{kind}")
            if ino is not None and ino in wanted:
                pids.append(int(entry))
                break
    return pids


def _kill_and_wait(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL each pid, wait (bounded) until gone; return those still alive."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, _signal.SIGKILL)
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def _umount_all(root: Path) -> list[str]:
    """Unmount everything at or under ``root``, deepest first; return what is still mounted."""
    for target in reversed(mounts_under(root)):
        proc = _run(["umount", target], check=False)
        if proc.returncode != 0:
            _run(["umount", "-l", target], check=False)
    return mounts_under(root)


def default_workdir(prefix: str) -> Path:
    """The work dir a lab uses when none is given: stable per prefix, so leftovers are found."""
    return Path(tempfile.gettempdir()) / f"mirrorha-lab-{prefix.strip('-') or 'default'}"
