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

Faults
    ``link(host, net, up)`` sets the switch-side port down or up (the host sees NO-CARRIER, as
    with a pulled cable; its addresses and routes stay). ``partition()`` uses the bridge's port
    isolation: node1's and node2's ports on br-pub and br-repl are ``isolated``, so no frame at
    all (IP, ARP, broadcast) passes between the nodes while both still reach the witness; a
    node cut from the witness has its br-pub port disabled (it then also loses the client, which
    it reaches through the witness). ``heal()`` undoes both. ``netem()`` uses ``tc qdisc netem``
    on the host's interface (and, with ``both_ways``, on the switch port towards it). Where the
    kernel has no sch_netem, packet loss alone falls back to an nftables netdev egress rule
    (``nft`` must be installed: Debian package ``nftables``), and delay or jitter start the
    userspace impairment hub (app/labimpair.py) for that network: its switch ports leave the
    bridge and a relay in the switch namespace forwards frames between them, impairing frames
    sent by ``host`` (and, with ``both_ways``, frames sent to it) only; once a network is in
    hub mode, every netem() on it (loss too) goes to the hub, and partition() flags are applied
    by the hub. Hub jitter reorders frames, as netem's does. ``clear_netem()`` of the last
    impaired host, ``reset_faults()`` and ``down()`` stop the hub and put the ports back on
    the bridge. netem() returns the mechanism used: "netem", "nftables" or "hub".

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
    └── LabCommandError    a command failed (also a subprocess.CalledProcessError)

Known limits
    Linux only, root only. Two labs with the same prefix clobber each other (use distinct
    prefixes). Mountpoint directories created on the host for ``shared_paths`` are left there
    (empty): removing them could detach another lab's bind mounts. Processes get SIGKILL at
    teardown, never a graceful stop. ``signal()`` refuses PIDs the lab cannot identify as its own
    (started by it, in a session it started, a descendant, or inside its namespaces).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import signal as _signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from app.labimpair import READY_LINE as HUB_READY
from app.labimpair import PortConfig

log = logging.getLogger("mirrorha.lab")

NODES: tuple[str, ...] = ("node1", "node2")
HOSTS: tuple[str, ...] = ("node1", "node2", "client", "witness")
SWITCH = "sw"
NETS: tuple[str, ...] = ("pub", "repl", "client")
BRIDGES: dict[str, str] = {"pub": "br-pub", "repl": "br-repl", "client": "br-cli"}
_NET_SHORT: dict[str, str] = {"pub": "pub", "repl": "repl", "client": "cli"}
LAB_NETWORK = ipaddress.ip_network("198.18.0.0/15")
VIP = "198.18.1.100"
VIP_PREFIXLEN = 24
WITNESS_PUB_IP = "198.18.1.254"
WITNESS_CLIENT_IP = "198.18.3.254"
DEFAULT_SHARED_PATHS: tuple[str, ...] = ("/srv/mirrorha/data",)
TOOLS: tuple[str, ...] = ("ip", "tc", "bridge", "nsenter", "unshare", "mount", "umount")
COMMAND_TIMEOUT = 15.0


class LabError(Exception):
    """Base of every error the lab raises."""


class LabUnavailable(LabError):
    """The lab cannot run on this machine (not root, tool missing, no network namespaces)."""


class LabUnsupported(LabError):
    """The kernel or the installed tools lack a feature the call needs."""


class LabCommandError(LabError, subprocess.CalledProcessError):
    """A command of the lab failed; carries argv, returncode, stdout and stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else ""
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {err or 'no stderr'}"


@dataclass(frozen=True)
class Attachment:
    """One host interface on one lab network."""

    host: str
    net: str
    ifname: str
    cidr: str

    @property
    def ip(self) -> str:
        return self.cidr.split("/", 1)[0]

    @property
    def port(self) -> str:
        """Name of the switch-side end of the veth pair (a bridge port in the sw namespace)."""
        return f"{self.host}-{_NET_SHORT[self.net]}"


ATTACHMENTS: tuple[Attachment, ...] = (
    Attachment("node1", "pub", "eth0", "198.18.1.1/24"),
    Attachment("node1", "repl", "eth1", "198.18.2.1/24"),
    Attachment("node2", "pub", "eth0", "198.18.1.2/24"),
    Attachment("node2", "repl", "eth1", "198.18.2.2/24"),
    Attachment("witness", "pub", "eth0", f"{WITNESS_PUB_IP}/24"),
    Attachment("witness", "client", "eth1", f"{WITNESS_CLIENT_IP}/24"),
    Attachment("client", "client", "eth0", "198.18.3.10/24"),
)
GATEWAYS: dict[str, str] = {
    "node1": WITNESS_PUB_IP,
    "node2": WITNESS_PUB_IP,
    "client": WITNESS_CLIENT_IP,
}


def attachment(host: str, net: str) -> Attachment:
    """The interface of ``host`` on ``net``; LabError if the host is not on that network."""
    for att in ATTACHMENTS:
        if att.host == host and att.net == net:
            return att
    raise LabError(f"host {host!r} has no interface on net {net!r} (hosts: {', '.join(HOSTS)})")


def address(host: str, net: str) -> str:
    """IP address of ``host`` on ``net``, e.g. ``address("node2", "repl") == "198.18.2.2"``."""
    return attachment(host, net).ip


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


HUB_QUEUE_LIMIT = 10000  # frames the impairment hub holds, as netem's default limit


@dataclass
class _Hub:
    """A running impairment hub: its process and the impairment asked for each host."""

    proc: subprocess.Popen[bytes]
    impaired: dict[str, PortConfig]


def _select_read(fd: int, timeout: float) -> tuple[list[int], list[int], list[int]]:
    return select.select([fd], [], [], timeout)


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


class Lab:
    """The lab topology; see the module docstring. Use as a context manager or up()/down()."""

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
        self.cleanup_stale(self.prefix, self.workdir)
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
            problems = self.cleanup_stale(self.prefix, self.workdir)
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
            self._tearing_down = False
        if problems:
            raise LabError(f"lab {self.prefix} teardown left: " + "; ".join(problems))

    @classmethod
    def cleanup_stale(cls, prefix: str = "mh-", workdir: str | Path | None = None) -> list[str]:
        """Remove what a lab with this prefix left: processes in its namespaces, the namespaces,
        mounts under its work dir (default: the per-prefix default) and the work dir.

        Returns the list of things it could not remove (empty when all is clean).
        """
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

    # -- faults -----------------------------------------------------------------------------

    def link(self, host: str, net: str, up: bool) -> None:
        """Plug (up=True) or pull (up=False) the cable of host on net (switch-side port)."""
        self._require_up()
        att = attachment(host, net)
        state = "up" if up else "down"
        _run(["ip", "-n", self.ns(SWITCH), "link", "set", att.port, state])
        if up:
            self._ports_down.discard((host, net))
            self._apply_partition()  # a port coming up is forwarding again; re-cut if needed
        else:
            self._ports_down.add((host, net))

    def partition(self, node1_reaches_witness: bool, node2_reaches_witness: bool) -> None:
        """Cut all traffic between node1 and node2 (pub and repl, both ways); cut a node from
        the witness (and so from the client) when told. heal() undoes it."""
        self._require_up()
        self._partition = (node1_reaches_witness, node2_reaches_witness)
        self._apply_partition()

    def heal(self) -> None:
        """Undo partition(): nodes see each other and the witness again."""
        self._require_up()
        self._partition = None
        self._apply_partition()

    def _apply_partition(self) -> None:
        sw = self.ns(SWITCH)
        reach = dict(zip(NODES, self._partition or (True, True), strict=True))
        isolated = "on" if self._partition is not None else "off"
        for node in NODES:
            for net in ("pub", "repl"):
                if net in self._hubs:
                    continue  # not a bridge port now: the hub applies the flags below
                port = attachment(node, net).port
                _run(["bridge", "-n", sw, "link", "set", "dev", port, "isolated", isolated])
            if (node, "pub") not in self._ports_down and "pub" not in self._hubs:
                state = "3" if reach[node] else "0"  # 3 forwarding, 0 disabled
                port = attachment(node, "pub").port
                _run(["bridge", "-n", sw, "link", "set", "dev", port, "state", state])
        for net in self._hubs:
            self._hub_configure(net)

    def _partition_flags(self, host: str, net: str) -> tuple[bool, bool]:
        """(isolated, blocked) of host's port on net under the current partition."""
        if self._partition is None or host not in NODES or net not in ("pub", "repl"):
            return False, False
        reach = dict(zip(NODES, self._partition, strict=True))
        return True, net == "pub" and not reach[host]

    def netem(
        self,
        host: str,
        net: str,
        loss_pct: float = 0,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        both_ways: bool = True,
    ) -> str:
        """Impair host's link on net: packets it sends (and, with both_ways, packets sent to it)
        are lost with loss_pct % and delayed by delay_ms ± jitter_ms. Replaces earlier settings.

        Returns the mechanism used: "netem"; where the kernel has no sch_netem, "nftables"
        (loss only) or "hub" (delay or jitter asked, or net already in hub mode: the userspace
        impairment hub, app/labimpair.py, impairs frames from host and, with both_ways, to
        host; its jitter reorders frames like netem's). LabUnsupported if loss alone is asked
        and neither netem nor nft is there.
        """
        self._require_up()
        if not 0 <= loss_pct <= 100 or delay_ms < 0 or jitter_ms < 0:
            raise LabError(f"netem: loss_pct in 0..100, delays >= 0 (got {loss_pct}, {delay_ms})")
        self._clear_qdisc_and_nft(host, net)
        impairment = PortConfig(loss_pct, delay_ms, jitter_ms, both_ways)
        if net in self._hubs:  # the network is in hub mode: the hub does it all
            self._hub_impair(host, net, impairment)
            return "hub"
        targets = self._impair_targets(host, net, both_ways)
        args = ["netem", "limit", "10000"]
        if delay_ms or jitter_ms:
            args += ["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        if loss_pct:
            args += ["loss", f"{loss_pct}%"]
        first = _run(
            ["tc", "-n", targets[0][0], "qdisc", "replace", "dev", targets[0][1], "root", *args],
            check=False,
        )
        if first.returncode == 0:
            for ns, dev in targets[1:]:
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *args])
            return "netem"
        if "unknown" not in first.stderr.lower():
            raise LabCommandError(first.returncode, first.args, first.stdout, first.stderr)
        if delay_ms or jitter_ms:
            self._hub_impair(host, net, impairment)
            return "hub"
        if shutil.which("nft") is None:
            raise LabUnsupported(
                "this kernel has no sch_netem and nft is not installed (Debian package nftables)"
            )
        if loss_pct:
            for ns, dev in targets:
                self._nft_loss(ns, dev, loss_pct)
            self._netem_fallback.add((host, net))
        return "nftables"

    def clear_netem(self, host: str, net: str) -> None:
        """Remove any netem() impairment of host on net (both directions); stops the hub of
        net when host was the last impaired host on it."""
        self._require_up()
        self._clear_qdisc_and_nft(host, net)
        hub = self._hubs.get(net)
        if hub is not None:
            hub.impaired.pop(host, None)
            if hub.impaired:
                self._hub_configure(net)
            else:
                self._hub_stop(net)

    def _clear_qdisc_and_nft(self, host: str, net: str) -> None:
        for ns, dev in self._impair_targets(host, net, both_ways=True):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            if shutil.which("nft") is not None:
                _run(
                    self._nft(ns, "delete", "chain", "netdev", "mirrorha_lab", f"egress_{dev}"),
                    check=False,
                )
        self._netem_fallback.discard((host, net))

    def _impair_targets(self, host: str, net: str, both_ways: bool) -> list[tuple[str, str]]:
        att = attachment(host, net)
        targets = [(self.ns(host), att.ifname)]
        if both_ways:
            targets.append((self.ns(SWITCH), att.port))
        return targets

    # -- the userspace impairment hub (app/labimpair.py) -------------------------------------

    def hub_pid(self, net: str) -> int | None:
        """PID of the impairment hub of net, or None when net is a plain bridge."""
        hub = self._hubs.get(net)
        return hub.proc.pid if hub is not None else None

    def _hub_impair(self, host: str, net: str, impairment: PortConfig) -> None:
        attachment(host, net)  # LabError if host is not on net
        if net not in self._hubs:
            self._hub_start(net)
        self._hubs[net].impaired[host] = impairment
        self._hub_configure(net)

    def _hub_start(self, net: str) -> None:
        sw = self.ns(SWITCH)
        ports = [a.port for a in ATTACHMENTS if a.net == net]
        script = str(Path(__file__).with_name("labimpair.py"))
        log_path = self.workdir / f"hub-{net}.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as errlog:
            proc = self.popen(
                SWITCH,
                [sys.executable, script, *ports],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errlog,
            )
        hub = _Hub(proc, {})
        self._hubs[net] = hub
        try:
            assert proc.stdout is not None
            ready, _, _ = _select_read(proc.stdout.fileno(), COMMAND_TIMEOUT)
            line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
            if line != HUB_READY:
                raise LabError(f"impairment hub of {net} did not start (see {log_path})")
            for port in ports:  # the hub discards frames until configured: no duplicates
                _run(["ip", "-n", sw, "link", "set", port, "nomaster"])
        except BaseException:
            self._hub_stop(net)
            raise

    def _hub_configure(self, net: str) -> None:
        hub = self._hubs[net]
        config: dict[str, dict[str, object]] = {}
        for att in ATTACHMENTS:
            if att.net != net:
                continue
            base = hub.impaired.get(att.host, PortConfig())
            isolated, blocked = self._partition_flags(att.host, net)
            config[att.port] = {**base.to_json(), "isolated": isolated, "blocked": blocked}
        line = json.dumps({"ports": config, "limit": HUB_QUEUE_LIMIT}) + "\n"
        assert hub.proc.stdin is not None
        try:
            hub.proc.stdin.write(line.encode())
            hub.proc.stdin.flush()
        except OSError as exc:
            raise LabError(f"impairment hub of {net} is gone: {exc}") from exc

    def _hub_stop(self, net: str) -> None:
        """Stop the hub of net (stdin closed, then SIGKILL if it lingers) and put the ports
        back on the bridge, with the current partition flags."""
        hub = self._hubs.pop(net, None)
        if hub is None:
            return
        with contextlib.suppress(OSError):
            if hub.proc.stdin is not None:
                hub.proc.stdin.close()
        try:
            hub.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hub.proc.pid, _signal.SIGKILL)
            hub.proc.wait(timeout=5)
        if hub.proc.stdout is not None:
            hub.proc.stdout.close()
        with contextlib.suppress(ValueError):
            self._procs.remove(hub.proc)
        sw = self.ns(SWITCH)
        for att in ATTACHMENTS:
            if att.net == net:
                _run(["ip", "-n", sw, "link", "set", att.port, "master", BRIDGES[net]])
        self._apply_partition()

    def _nft(self, ns: str, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", "--", "nft", *args]

    def _nft_loss(self, ns: str, dev: str, loss_pct: float) -> None:
        verdict = (
            "drop" if loss_pct >= 100 else f"numgen random mod 1000 < {round(loss_pct * 10)} drop"
        )
        hook = f'type filter hook egress device "{dev}" priority 0;'
        ruleset = (
            f"table netdev mirrorha_lab {{\n  chain egress_{dev} {{ {hook} {verdict}; }}\n}}\n"
        )
        _run(self._nft(ns, "-f", "-"), input=ruleset)

    def reset_faults(self) -> None:
        """heal(), all cables plugged, no impairment: the state right after up()."""
        self._require_up()
        for att in ATTACHMENTS:
            self.clear_netem(att.host, att.net)
        for net in list(self._hubs):
            self._hub_stop(net)
        for host, net in list(self._ports_down):
            self.link(host, net, True)
        self.heal()

    def _require_up(self) -> None:
        if not self._up:
            raise LabError(f"lab {self.prefix} is not up")

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
