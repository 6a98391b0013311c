"""A lab's hosts: their names and running commands inside them (the base class of Lab).

How it works
    ``LabHosts`` holds a lab's settings (prefix, work dir, shared paths) and its state (the
    processes it started, the faults in force, up or not). ``ns(host)`` is the network
    namespace ``<prefix><host>``; each node also has a persistent mount namespace held by the
    file ``<workdir>/ns/<node>``, in which each shared path is bind-mounted from
    ``<workdir>/<node>/<path>`` (``host_path``). :meth:`LabHosts.cmd` gives the ``nsenter``
    argv that enters a host (network and, for nodes, mount namespace); ``run`` and ``popen``
    use it. ``popen`` starts a process in its own session and tracks it, so ``Lab.down`` kills
    it. app/labfaults.py adds the faults, app/lab.py building and teardown.

Exceptions
    LabError: a bad prefix or shared path, an unknown host or node, a lab that is not up, a PID
    that is not the lab's, an address outside the lab network; LabCommandError from ``run``
    with ``check``.

Known limits
    ``signal()`` refuses PIDs the lab cannot identify as its own (started by it, in a session
    it started, a descendant, or inside its namespaces).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.lablock import PrefixLock
from app.labsys import _proc_stat, _run, default_workdir, ns_inode
from app.labtopology import DEFAULT_SHARED_PATHS, HOSTS, LAB_NETWORK, NODES, SWITCH, LabError

if TYPE_CHECKING:
    from app.labfaults import _Hub


class LabHosts:
    """A lab's settings, names and processes; app/lab.py's Lab builds on it."""

    def __init__(
        self,
        prefix: str = "mh-",
        workdir: str | Path | None = None,
        shared_paths: Sequence[str] = DEFAULT_SHARED_PATHS,
    ) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,7}", prefix):
            raise LabError(f"prefix {prefix!r}: use 1-8 characters of [a-z0-9-]")
        self.prefix = prefix
        self.workdir = Path(workdir) if workdir is not None else default_workdir(prefix)
        self.shared_paths: tuple[str, ...] = tuple(shared_paths)
        for path in self.shared_paths:
            if not path.startswith("/") or ".." in Path(path).parts or path.rstrip("/") == "":
                raise LabError(f"shared path {path!r}: must be absolute, not /, without '..'")
        self._procs: list[subprocess.Popen[Any]] = []
        self._partition: tuple[bool, bool] | None = None
        self._ports_down: set[tuple[str, str]] = set()
        self._netem_fallback: set[tuple[str, str]] = set()
        self._hubs: dict[str, _Hub] = {}
        self._up = False
        self._tearing_down = False
        self._lock = PrefixLock(prefix)  # held while up (app/lablock.py)

    # -- names ------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        """Network namespace name of a host (or of the switch, ``"sw"``)."""
        if host not in (*HOSTS, SWITCH):
            raise LabError(f"unknown host {host!r} (hosts: {', '.join(HOSTS)}, {SWITCH})")
        return f"{self.prefix}{host}"

    def mount_ns_file(self, node: str) -> Path:
        """The file that holds a node's mount namespace."""
        if node not in NODES:
            raise LabError(f"{node!r} has no mount namespace (nodes: {', '.join(NODES)})")
        return self.workdir / "ns" / node

    def node_dir(self, node: str) -> Path:
        """Host-side directory behind a node's shared paths (``<node_dir>/srv/mirrorha/data``)."""
        if node not in NODES:
            raise LabError(f"unknown node {node!r} (nodes: {', '.join(NODES)})")
        return self.workdir / node

    def host_path(self, node: str, path: str) -> Path:
        """Where a node's ``path`` (one of shared_paths or below) lives on the host."""
        return self.node_dir(node) / path.lstrip("/")

    @property
    def is_up(self) -> bool:
        return self._up

    # -- running things in hosts ------------------------------------------------------------

    def cmd(self, host: str, argv: Sequence[str] = ()) -> list[str]:
        """argv that runs ``argv`` inside ``host``: network namespace, and mount namespace for
        nodes. With no argv, the bare prefix (ends with ``--``)."""
        prefix = ["nsenter", f"--net=/run/netns/{self.ns(host)}"]
        if host in NODES:
            prefix.append(f"--mount={self.mount_ns_file(host)}")
        return [*prefix, "--", *argv]

    def run(
        self,
        host: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in a host, wait (bounded), capture text output; LabCommandError if check."""
        self._require_up()
        return _run(self.cmd(host, argv), check=check, timeout=timeout, input=input)

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv in a host in its own session/process group; tracked, killed by down()."""
        self._require_up()
        kw.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.cmd(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def owns(self, pid: int) -> bool:
        """True if pid was started by the lab, or descends from / shares a session with such a
        process, or lives in one of the lab's namespaces."""
        started = {p.pid for p in self._procs}
        stat = _proc_stat(pid)
        if stat is None:
            return False
        if pid in started or stat[2] in started:
            return True
        current, steps = stat[1], 0
        while current > 1 and steps < 64:
            if current in started:
                return True
            parent = _proc_stat(current)
            if parent is None:
                break
            current, steps = parent[1], steps + 1
        net_inodes = {ns_inode(f"/run/netns/{self.ns(h)}") for h in (*HOSTS, SWITCH)}
        return ns_inode(f"/proc/{pid}/ns/net") in net_inodes - {None}

    def signal(self, target: subprocess.Popen[Any] | int, sig: int) -> None:
        """Send sig (SIGKILL, SIGSTOP, SIGCONT, ...) to a process the lab owns (see owns())."""
        pid = target.pid if isinstance(target, subprocess.Popen) else int(target)
        if not self.owns(pid):
            raise LabError(f"pid {pid} is not a process of lab {self.prefix}; not signalled")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def ping(self, src: str, dst_ip: str) -> bool:
        """One ICMP echo from a host, waiting at most 1 s. Only lab addresses are allowed."""
        if ipaddress.ip_address(dst_ip) not in LAB_NETWORK:
            raise LabError(f"{dst_ip} is outside the lab network {LAB_NETWORK}; not pinged")
        proc = self.run(src, ["ping", "-c", "1", "-W", "1", "-q", dst_ip], check=False, timeout=5)
        return proc.returncode == 0

    def _require_up(self) -> None:
        if not self._up:
            raise LabError(f"lab {self.prefix} is not up")
