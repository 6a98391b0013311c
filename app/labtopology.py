"""The lab's fixed plan: hosts, networks, bridges, addresses; and the lab's exception tree.

How it works
    Every host is a network namespace named ``<prefix><host>`` (``HOSTS``); a fifth one,
    ``<prefix>sw`` (``SWITCH``), holds the bridges (``BRIDGES``). Each host interface is an
    ``Attachment``: one end of a veth pair whose other end (its ``port``, ``<host>-<net>``, e.g.
    ``node1-pub``) is a port of the bridge. Addresses (all in 198.18.0.0/15, ``LAB_NETWORK``)::

        pub    198.18.1.0/24  node1 eth0 .1, node2 eth0 .2, witness eth0 .254 (nodes' gateway)
        repl   198.18.2.0/24  node1 eth1 .1, node2 eth1 .2
        client 198.18.3.0/24  client eth0 .10 (gateway .254), witness eth1 .254

    ``GATEWAYS`` holds each host's default route; the witness forwards between pub and client.
    This module only describes the plan; app/lab.py builds it.

Exceptions
    LabError
    ├── LabUnavailable     not root, a tool (ip, tc, nsenter, unshare, mount) missing, no netns
    ├── LabUnsupported     the kernel or the tools lack a feature (loss with neither netem nor nft)
    ├── LabBusy            another live process owns a lab of this prefix (app/lablock.py)
    └── LabCommandError    a command failed (also a subprocess.CalledProcessError)

Known limits
    The plan is fixed: two nodes, one client, one witness, three networks; IPv4 only (IPv6 is
    off everywhere in the lab).
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass

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


class LabBusy(LabError):
    """Another live process owns a lab of this prefix; the message names it."""


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
