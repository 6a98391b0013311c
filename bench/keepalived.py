"""keepalived as the reference: a VRRP pair in the lab's node1 and node2, for bench/failover.py.

How it works
    :class:`KeepalivedPair` writes one keepalived configuration per node under
    ``<lab workdir>/keepalived`` and runs ``/usr/sbin/keepalived`` inside each node's namespaces
    (``lab.popen``: its own session, tracked and killed by ``lab.down()``) with every path on the
    command line (``-f`` config, ``-p``/``-r``/``-c`` pid files), VRRP only (``-P``), no fork
    (``-n``), no respawn of a dead child (``-R``), console log only (``-l -D -G``); nothing under
    /etc or /run is read or written. The instance is one VRRP router on the pub network
    (unicast to the peer's 198.18.1.x, so nothing is multicast), the lab VIP 198.18.1.100/24 on
    eth0, ``advert_int`` as asked (VRRPv3 for a sub-second interval: keepalived accepts
    fractions only there). Both nodes start BACKUP with ``nopreempt`` (node1 has the higher
    priority and wins the first election), so a restarted node stays BACKUP and the kills can
    alternate between the nodes, as the mirrorha runs do.

    A node's VRRP state is read from its own log ("(VI_1) Entering MASTER STATE"): the last
    such line of the current process. :meth:`KeepalivedPair.kill` is the crash: SIGKILL to the
    process group of the keepalived it started (parent and VRRP child at once, so no child sends
    the priority-0 "I am leaving" advert a clean stop would), then it removes the VIP the dead
    instance left on eth0 (a crashed server answers on nothing; a killed keepalived leaves its
    addresses behind).

    The demo application itself is not keepalived's business: the benchmark starts it on both
    nodes beforehand (keepalived moves the address only, and starts no application).

Exceptions
    KeepalivedError    keepalived missing, did not start, or a wait timed out (says what it saw)

Known limits
    Linux, root, keepalived 2.x. The state is parsed from keepalived's log text; another
    keepalived version that words "Entering MASTER STATE" differently makes waits time out
    with the log tail in the message.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from app.lab import VIP, VIP_PREFIXLEN, Lab, address

KEEPALIVED = "/usr/sbin/keepalived"
NODES = ("node1", "node2")
PRIORITY = {"node1": 101, "node2": 100}
ROUTER_ID = 51
_STATE_RE = re.compile(r"\(VI_1\) Entering (MASTER|BACKUP|FAULT) STATE")


class KeepalivedError(Exception):
    """keepalived is missing, did not start, or a wait timed out."""


def keepalived_path() -> str | None:
    """The keepalived binary, or None when it is not installed (Debian package keepalived)."""
    if os.access(KEEPALIVED, os.X_OK):
        return KEEPALIVED
    return shutil.which("keepalived")


def config_text(node: str, advert_int: float) -> str:
    """One node's keepalived.conf: unicast VRRP on the pub network, the lab VIP on eth0."""
    peer = "node2" if node == "node1" else "node1"
    version = 2 if advert_int >= 1 and float(advert_int).is_integer() else 3
    advert = f"{advert_int:g}"
    return f"""# Written by bench/keepalived.py for the mirrorha lab benchmark.
global_defs {{
    router_id mirrorha_bench_{node}
    vrrp_version {version}
}}

vrrp_instance VI_1 {{
    state BACKUP
    nopreempt
    interface eth0
    virtual_router_id {ROUTER_ID}
    priority {PRIORITY[node]}
    advert_int {advert}
    unicast_src_ip {address(node, "pub")}
    unicast_peer {{
        {address(peer, "pub")}
    }}
    virtual_ipaddress {{
        {VIP}/{VIP_PREFIXLEN} dev eth0
    }}
}}
"""


class KeepalivedPair:
    """keepalived in node1 and node2 of a lab that is up; see the module docstring."""

    def __init__(self, lab: Lab, advert_int: float = 1.0) -> None:
        binary = keepalived_path()
        if binary is None:
            raise KeepalivedError("keepalived is not installed (Debian package keepalived)")
        self.binary = binary
        self.lab = lab
        self.advert_int = advert_int
        self.dir = lab.workdir / "keepalived"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}
        self._starts = 0

    # ------------------------------------------------------------ processes

    def start(self, node: str) -> None:
        """Start keepalived in ``node`` (a fresh log per start)."""
        old = self.procs.get(node)
        if old is not None and old.poll() is None:
            raise KeepalivedError(f"keepalived already runs in {node} (pid {old.pid})")
        conf = self.dir / f"{node}.conf"
        conf.write_text(config_text(node, self.advert_int))
        pids = {k: self.dir / f"{node}.{k}.pid" for k in ("main", "vrrp", "checkers")}
        for pid_file in pids.values():
            # A killed instance leaves its pid files; its orphaned VRRP child may linger as a
            # zombie, which keepalived would take for "daemon is already running".
            pid_file.unlink(missing_ok=True)
        self._starts += 1
        log = self.dir / f"{node}.{self._starts}.log"
        argv = [
            self.binary,
            "-f",
            str(conf),
            "-p",
            str(pids["main"]),
            "-r",
            str(pids["vrrp"]),
            "-c",
            str(pids["checkers"]),
            "-P",
            "-n",
            "-R",
            "-l",
            "-D",
            "-G",
        ]
        with open(log, "wb") as out:
            self.procs[node] = self.lab.popen(node, argv, stdout=out, stderr=subprocess.STDOUT)
        self.logs[node] = log

    def start_both(self, timeout: float = 30) -> str:
        """Start both, wait until one is MASTER (holding the VIP) and the other BACKUP."""
        for node in NODES:
            self.start(node)
        return self.wait_pair(timeout)

    def kill(self, node: str) -> None:
        """The crash: SIGKILL to the process group of node's keepalived, then drop the VIP it
        left on eth0. The caller takes t0 just before."""
        proc = self.procs[node]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group of a session this object started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        self.lab.run(
            node, ["ip", "addr", "del", f"{VIP}/{VIP_PREFIXLEN}", "dev", "eth0"], check=False
        )

    def stop_all(self) -> None:
        """Kill every keepalived this pair started (by its process group), reap them."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for node in NODES:
            if self.lab.is_up:
                self.lab.run(
                    node,
                    ["ip", "addr", "del", f"{VIP}/{VIP_PREFIXLEN}", "dev", "eth0"],
                    check=False,
                )

    # ------------------------------------------------------------ asking

    def state(self, node: str) -> str:
        """MASTER, BACKUP, FAULT, INIT (running, no state yet) or DOWN."""
        proc = self.procs.get(node)
        if proc is None or proc.poll() is not None:
            return "DOWN"
        try:
            text = self.logs[node].read_text(errors="replace")
        except OSError:
            return "INIT"
        found = _STATE_RE.findall(text)
        return found[-1] if found else "INIT"

    def holds_vip(self, node: str) -> bool:
        r = self.lab.run(node, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=False)
        return f" {VIP}/" in r.stdout

    def master(self) -> str | None:
        masters = [n for n in NODES if self.state(n) == "MASTER"]
        return masters[0] if len(masters) == 1 else None

    def describe(self) -> str:
        return "; ".join(f"{n}: {self.state(n)}" for n in NODES)

    def log_tail(self, node: str, lines: int = 10) -> str:
        with contextlib.suppress(OSError, KeyError):
            return "\n".join(self.logs[node].read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_pair(self, timeout: float = 30) -> str:
        """Wait until exactly one node is MASTER with the VIP and the other BACKUP; its name."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            master = self.master()
            if master is not None:
                other = "node2" if master == "node1" else "node1"
                if self.state(other) == "BACKUP" and self.holds_vip(master):
                    return master
            time.sleep(0.1)
        tails = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in NODES)
        raise KeepalivedError(
            f"keepalived pair not MASTER/BACKUP after {timeout:.0f} s ({self.describe()})\n{tails}"
        )
