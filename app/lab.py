"""The two-host lab: node1, node2, a client and a witness/router on one Linux host.

How it works
    Every host is a network namespace named ``<prefix><host>`` (``ip netns``); a fifth one,
    ``<prefix>sw``, holds the bridges br-pub, br-repl and br-cli. Each host interface is one end
    of a veth pair whose other end (``<host>-<net>``, e.g. ``node1-pub``) is a port of the
    bridge, so nothing is created in the root namespace. Addresses (all in 198.18.0.0/15)::

        pub    198.18.1.0/24  node1 eth0 .1, node2 eth0 .2, witness eth0 .254 (nodes' gateway)
        repl   198.18.2.0/24  node1 eth1 .1, node2 eth1 .2
        client 198.18.3.0/24  client eth0 .10 (gateway .254), witness eth1 .254

    The witness forwards between pub and client (ip_forward=1). IPv6 is off everywhere.

    Each node also gets a persistent mount namespace (``unshare --mount=<file>``, the file
    bind-mounted on a private mount under ``<workdir>/ns``) in which each of ``shared_paths`` is
    bind-mounted from ``<workdir>/<node>/<path>``, and /sys is a sysfs of the node's network
    namespace. So both nodes see /srv/mirrorha/data with their own content, as two servers would;
    the host sees neither. :meth:`Lab.cmd` gives the ``nsenter`` argv that enters a host (network
    and, for nodes, mount namespace); :meth:`Lab.run` and :meth:`Lab.popen` use it.

    The fixed plan (hosts, networks, addresses, errors) is in app/labtopology.py, the
    host-side helpers (commands, /proc, mounts) in app/labsys.py, names and running things in
    hosts in app/labhosts.py, faults (``link``, ``partition``, ``netem``) in app/labfaults.py.
    This module builds and tears down the lab, and re-exports every name of those modules that
    other code imports from app.lab.

Teardown
    :meth:`Lab.down` is idempotent: it kills (SIGKILL, by process group) every process the lab
    started and every process left inside the lab's namespaces, deletes the namespaces,
    unmounts everything under the work dir and removes it; it raises :class:`LabError` naming
    what it could not remove. Labs that are up are also torn down at interpreter exit (atexit)
    and on SIGINT/SIGTERM (the handler tears down, then hands the signal to the previous
    handler, or re-raises it with the default action). :meth:`Lab.cleanup_stale` removes what a
    crashed run (SIGKILL, power loss of the test runner) left behind; :meth:`Lab.up` calls it
    first for its own prefix.

Exceptions
    LabError
    ├── LabUnavailable     not root, a tool (ip, tc, nsenter, unshare, mount) missing, no netns
    ├── LabUnsupported     the kernel or the tools lack a feature (loss with neither netem nor nft)
    ├── LabBusy            another live process owns a lab of this prefix
    └── LabCommandError    a command failed (also a subprocess.CalledProcessError)

Ownership
    A lab owns its prefix while it is up (app/lablock.py: an flock in /run, dropped by the
    kernel when the owner dies): a second ``up`` of that prefix, ``down`` of a Lab that is not
    the owner, and ``cleanup_stale`` raise LabBusy naming the owner's PID and command, and
    touch nothing; so a crashed run's leftovers are removed, a live run's never.

Known limits
    Linux only, root only. One live lab per prefix (use distinct prefixes to run several).
    Mountpoint directories created on the host for ``shared_paths`` are left there (empty):
    removing them could detach another lab's bind mounts. Processes get SIGKILL at teardown,
    never a graceful stop. ``signal()`` refuses PIDs the lab cannot identify as its own
    (started by it, in a session it started, a descendant, or inside its namespaces).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal as _signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from app.labfaults import HUB_QUEUE_LIMIT as HUB_QUEUE_LIMIT
from app.labfaults import LabFaults
from app.lablock import PrefixLock
from app.labsys import _kill_and_wait, _run, _umount_all
from app.labsys import default_workdir as default_workdir
from app.labsys import mounts_under as mounts_under
from app.labsys import ns_inode as ns_inode
from app.labsys import pid_alive as pid_alive
from app.labsys import pids_in as pids_in
from app.labsys import unavailable_reason as unavailable_reason
from app.labtopology import ATTACHMENTS as ATTACHMENTS
from app.labtopology import BRIDGES as BRIDGES
from app.labtopology import COMMAND_TIMEOUT as COMMAND_TIMEOUT
from app.labtopology import DEFAULT_SHARED_PATHS as DEFAULT_SHARED_PATHS
from app.labtopology import GATEWAYS as GATEWAYS
from app.labtopology import HOSTS as HOSTS
from app.labtopology import LAB_NETWORK as LAB_NETWORK
from app.labtopology import NETS as NETS
from app.labtopology import NODES as NODES
from app.labtopology import SWITCH as SWITCH
from app.labtopology import TOOLS as TOOLS
from app.labtopology import VIP as VIP
from app.labtopology import VIP_PREFIXLEN as VIP_PREFIXLEN
from app.labtopology import WITNESS_CLIENT_IP as WITNESS_CLIENT_IP
from app.labtopology import WITNESS_PUB_IP as WITNESS_PUB_IP
from app.labtopology import Attachment as Attachment
from app.labtopology import LabBusy as LabBusy
from app.labtopology import LabCommandError as LabCommandError
from app.labtopology import LabError as LabError
from app.labtopology import LabUnavailable as LabUnavailable
from app.labtopology import LabUnsupported as LabUnsupported
from app.labtopology import address as address
from app.labtopology import attachment as attachment

log = logging.getLogger("mirrorha.lab")


# ---- process-wide teardown: atexit and SIGINT/SIGTERM --------------------------------------

_LIVE: dict[int, Lab] = {}
_LIVE_LOCK = threading.RLock()
_PREVIOUS_HANDLERS: dict[int, Any] = {}
_SIGNALS = (_signal.SIGINT, _signal.SIGTERM)


def _teardown_all() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE.values())
    for lab in labs:
        try:
            lab.down()
        except Exception as exc:  # teardown of the others must go on
            log.error("lab %s teardown: %s", lab.prefix, exc)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _teardown_all()
    previous = _PREVIOUS_HANDLERS.pop(signum, _signal.SIG_DFL)
    _signal.signal(signum, previous)
    if callable(previous):
        previous(signum, frame)
    elif previous == _signal.SIG_DFL:
        os.kill(os.getpid(), signum)
    # SIG_IGN: the signal was ignored before the lab came up; it still is.


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        current = _signal.getsignal(signum)
        if current is _on_signal:
            continue
        _PREVIOUS_HANDLERS[signum] = current
        _signal.signal(signum, _on_signal)


atexit.register(_teardown_all)


# ---- the lab --------------------------------------------------------------------------------


class Lab(LabFaults):
    """The lab topology; see the module docstring. Use as a context manager or up()/down()."""

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the whole topology; on any failure tear down what was built and re-raise."""
        if self._up:
            return self
        reason = unavailable_reason()
        if reason is not None:
            raise LabUnavailable(reason)
        self._lock.acquire()  # LabBusy while another run owns the prefix: it is left alone
        try:
            self._remove_leftovers(self.prefix, self.workdir)
        except BaseException:
            self._lock.release()
            raise
        with _LIVE_LOCK:
            _LIVE[id(self)] = self
        _install_handlers()
        self._up = True
        try:
            self._build_network()
            self._build_mounts()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        log.info("lab %s is up (workdir %s)", self.prefix, self.workdir)
        return self

    def _build_network(self) -> None:
        for host in (SWITCH, *HOSTS):
            _run(["ip", "netns", "add", self.ns(host)])
            self._sysctl(host, "net.ipv6.conf.all.disable_ipv6", "1")
            self._sysctl(host, "net.ipv6.conf.default.disable_ipv6", "1")
            _run(["ip", "-n", self.ns(host), "link", "set", "lo", "up"])
        sw = self.ns(SWITCH)
        for bridge in BRIDGES.values():
            _run(["ip", "-n", sw, "link", "add", bridge, "type", "bridge", "stp_state", "0"])
            _run(["ip", "-n", sw, "link", "set", bridge, "up"])
        for att in ATTACHMENTS:
            host_ns = self.ns(att.host)
            peer = ["peer", "name", att.ifname, "netns", host_ns]
            _run(["ip", "-n", sw, "link", "add", att.port, "type", "veth", *peer])
            _run(["ip", "-n", sw, "link", "set", att.port, "master", BRIDGES[att.net]])
            _run(["ip", "-n", sw, "link", "set", att.port, "up"])
            _run(["ip", "-n", host_ns, "addr", "add", att.cidr, "dev", att.ifname])
            _run(["ip", "-n", host_ns, "link", "set", att.ifname, "up"])
        for host, gateway in GATEWAYS.items():
            _run(["ip", "-n", self.ns(host), "route", "add", "default", "via", gateway])
        self._sysctl("witness", "net.ipv4.ip_forward", "1")

    def _build_mounts(self) -> None:
        ns_dir = self.workdir / "ns"
        ns_dir.mkdir(parents=True, exist_ok=True)
        # The mount-ns files must sit on a private mount, or binding them would propagate.
        _run(["mount", "--bind", str(ns_dir), str(ns_dir)])
        _run(["mount", "--make-private", str(ns_dir)])
        for path in self.shared_paths:
            Path(path).mkdir(parents=True, exist_ok=True)
        for node in NODES:
            ns_file = self.mount_ns_file(node)
            ns_file.touch()
            _run(["unshare", f"--mount={ns_file}", "--propagation", "private", "true"])
            enter = ["nsenter", f"--mount={ns_file}", "--"]
            for path in self.shared_paths:
                source = self.host_path(node, path)
                source.mkdir(parents=True, exist_ok=True)
                _run([*enter, "mount", "--bind", str(source), path])
            # /sys of the node's own network namespace, as `ip netns exec` would give.
            _run(self.cmd(node, ["mount", "-t", "sysfs", "sysfs", "/sys"]))

    def _sysctl(self, host: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        _run(
            [
                "nsenter",
                f"--net=/run/netns/{self.ns(host)}",
                "--",
                "sh",
                "-c",
                f"echo {value} > {path}",
            ]
        )

    def down(self) -> None:
        """Tear everything down (idempotent); LabError names anything that could not be removed."""
        if self._tearing_down:
            return
        self._lock.acquire()  # a lab never up here: LabBusy when another run owns the prefix
        self._tearing_down = True
        try:
            procs, self._procs = self._procs, []
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, _signal.SIGKILL)
            leftovers = _kill_and_wait(p.pid for p in procs)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    proc.wait(timeout=1)  # reap, so no zombie stays
            problems = self._remove_leftovers(self.prefix, self.workdir)
            if leftovers:
                problems.append(f"processes still alive: {leftovers}")
        finally:
            self._up = False
            self._partition = None
            self._ports_down.clear()
            self._netem_fallback.clear()
            self._hubs.clear()  # their processes were killed above, their ports deleted below
            with _LIVE_LOCK:
                _LIVE.pop(id(self), None)
            self._lock.release()
            self._tearing_down = False
        if problems:
            raise LabError(f"lab {self.prefix} teardown left: " + "; ".join(problems))

    @classmethod
    def cleanup_stale(cls, prefix: str = "mh-", workdir: str | Path | None = None) -> list[str]:
        """Remove what a lab with this prefix left: processes in its namespaces, the namespaces,
        mounts under its work dir (default: the per-prefix default) and the work dir.

        Returns the list of things it could not remove (empty when all is clean). Raises
        LabBusy, touching nothing, while a live run owns the prefix (app/lablock.py).
        """
        lock = PrefixLock(prefix)
        lock.acquire()
        try:
            return cls._remove_leftovers(prefix, workdir)
        finally:
            lock.release()

    @classmethod
    def _remove_leftovers(cls, prefix: str, workdir: str | Path | None) -> list[str]:
        """cleanup_stale's work, for a caller that holds the prefix's lock."""
        root = Path(workdir) if workdir is not None else default_workdir(prefix)
        names = [f"{prefix}{host}" for host in (*HOSTS, SWITCH)]
        existing = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        present = [n for n in names if n in existing]
        net_inodes = {i for n in present if (i := ns_inode(f"/run/netns/{n}")) is not None}
        mnt_inodes: set[int] = set()
        for node in NODES:
            ns_file = root / "ns" / node
            if str(ns_file) in mounts_under(root):
                ino = ns_inode(ns_file)
                if ino is not None:
                    mnt_inodes.add(ino)
        problems: list[str] = []
        alive = _kill_and_wait(pids_in(net_inodes, mnt_inodes))
        if alive:
            problems.append(f"processes in lab namespaces still alive: {alive}")
        for name in present:
            proc = _run(["ip", "netns", "del", name], check=False)
            if proc.returncode != 0:
                problems.append(f"namespace {name}: {proc.stderr.strip()}")
        still = _umount_all(root)
        if still:
            problems.append(f"mounts under {root}: {still}")
        elif root.exists():
            shutil.rmtree(root, ignore_errors=True)
            if root.exists():
                problems.append(f"work dir {root} could not be removed")
        return problems

    # -- description ------------------------------------------------------------------------

    def describe(self) -> str:
        """Human-readable summary: hosts, addresses, shared paths, how to enter a host."""
        lines = [f"mirrorha lab {self.prefix!r} (work dir {self.workdir})"]
        for host in HOSTS:
            addrs = ", ".join(
                f"{a.ifname} {a.cidr} ({a.net})" for a in ATTACHMENTS if a.host == host
            )
            gateway = f"; default via {GATEWAYS[host]}" if host in GATEWAYS else ""
            lines.append(f"  {self.ns(host):<14} {addrs}{gateway}")
        lines.append(f"  {self.ns(SWITCH):<14} bridges {', '.join(BRIDGES.values())}")
        for node in NODES:
            for path in self.shared_paths:
                lines.append(f"  {node}:{path} -> {self.host_path(node, path)}")
        lines.append("enter node1 by hand: " + " ".join(self.cmd("node1", ["bash"])))
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The lab command (app/labcli.py) as `mirrorha lab ...`; returns the exit status."""
    from app.labcli import main as cli_main

    return cli_main(argv, prog="mirrorha lab")
