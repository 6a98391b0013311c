"""The virtual IP: claim it on an interface, announce it, release it.

How it works
    ``Vip.claim()`` adds the address to the interface through netlink (pyroute2's ``IPRoute``,
    in the network namespace of the calling process), then announces it so that neighbours
    and switches move their caches to this host at once instead of after their ARP/ND timeout:

    - IPv4: gratuitous ARP, an ARP request and an ARP reply whose sender and target protocol
      address are both the VIP (RFC 5227 announcement, RFC 5944 4.6 reply), written with
      ``struct`` and sent as raw Ethernet frames through an ``AF_PACKET`` socket bound to the
      interface; the pair is repeated ``announce_count`` times, ``announce_interval_s`` apart.
    - IPv6: unsolicited neighbour advertisement (ICMPv6 type 136, override flag set, target
      link-layer address option) to ff02::1 through a raw ICMPv6 socket with hop limit 255
      (the kernel fills the checksum). IPv6 VIPs are added with ``IFA_F_NODAD`` so they are
      usable (and announceable) at once, as a failover address must be.

    ``claim()`` and ``release()`` are idempotent: an address already present is claimed, an
    absent one (or one whose interface has vanished) is released. ``held()`` reads the
    interface's addresses.

Exception tree
    ClusterError (errors.py)
     +-- VipError    bad address or prefix, missing interface, netlink refusal; the message
                     names the interface and the address. A failed *announcement* after a
                     successful add is logged as a warning, not raised by ``claim()``: the
                     address is held, neighbours will learn it when their cache expires.
                     ``announce()`` on its own raises.

Known limits
    - Blocking calls (netlink round trips, ~0.3 s of announcement sleeps). pyroute2's
      ``IPRoute`` refuses to run inside a running asyncio loop: call from a worker thread
      (``await asyncio.to_thread(vip.claim)``).
    - Needs CAP_NET_ADMIN (address) and CAP_NET_RAW (announcements).
    - Interfaces without a 6-byte hardware address or with NOARP (loopback, tun) get the
      address but no announcement.
    - The prefix given is only used when adding; ``held()`` and ``release()`` match on the
      address alone.

``FakeVip`` has the same interface, keeps its state in memory and can share a
``FakeVipNetwork`` with other fakes, so that in-memory cluster tests can assert that no two
nodes ever hold the same VIP.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.cluster.errors import ClusterError

_log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ETH_MIN_FRAME = 60  # without the FCS, which the NIC appends

ND_NEIGHBOR_ADVERT = 136
ND_NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LL_ADDR = 2
ALL_NODES_V6 = "ff02::1"
IFA_F_NODAD = 0x02
IFF_NOARP = 0x80


class VipError(ClusterError):
    """The VIP could not be claimed, released or read; the message names interface and address."""


class VipPort(Protocol):
    """What the node's executor needs from a VIP (the real ``Vip`` and ``FakeVip``)."""

    @property
    def label(self) -> str: ...

    def claim(self) -> None: ...

    def release(self) -> None: ...

    def held(self) -> bool: ...


def parse_vip(address: str, prefix: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Validate an address and prefix; raise ``VipError`` naming what is wrong."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise VipError(f"VIP {address!r} is not an IP address") from exc
    width = 32 if ip.version == 4 else 128
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 < prefix <= width:
        raise VipError(f"VIP {address}: prefix {prefix!r} is not between 1 and {width}")
    return ip


def mac_to_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"{mac!r} is not a 6-byte hardware address")
    return bytes(int(p, 16) for p in parts)


def arp_frame(mac: bytes, ip: ipaddress.IPv4Address, op: int) -> bytes:
    """One gratuitous ARP Ethernet frame: sender = target = ``ip``, broadcast destination.

    The request carries a zero target hardware address (RFC 5227 announcement); the reply
    carries ``mac`` there (RFC 5944 4.6). Padded to the Ethernet minimum of 60 bytes.
    """
    tha = ZERO_MAC if op == ARP_REQUEST else mac
    eth = struct.pack("!6s6sH", BROADCAST_MAC, mac, ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac, ip.packed, tha, ip.packed)
    frame = eth + arp
    return frame + b"\x00" * (ETH_MIN_FRAME - len(frame))


def neighbour_advert(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    """An unsolicited ICMPv6 neighbour advertisement for ``ip`` (override set, solicited not).

    The checksum field is zero: the kernel computes it for raw ICMPv6 sockets.
    """
    header = struct.pack("!BBHI16s", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE, ip.packed)
    option = struct.pack("!BB6s", ND_OPT_TARGET_LL_ADDR, 1, mac)
    return header + option


class Vip:
    """A VIP on one interface of this network namespace (see the module docstring)."""

    def __init__(
        self,
        address: str,
        prefix: int,
        interface: str,
        *,
        announce_count: int = 3,
        announce_interval_s: float = 0.1,
        sleep: Callable[[float], None] = time.sleep,
        log: logging.Logger = _log,
    ) -> None:
        self.ip = parse_vip(address, prefix)
        self.address = str(self.ip)
        self.prefix = prefix
        if not interface or len(interface) > 15 or "/" in interface:
            raise VipError(f"VIP {self.address}: {interface!r} is not an interface name")
        self.interface = interface
        self.announce_count = announce_count
        self.announce_interval_s = announce_interval_s
        self._sleep = sleep
        self._log = log

    @property
    def label(self) -> str:
        return f"{self.address}/{self.prefix} on {self.interface}"

    # -- netlink ----------------------------------------------------------------------------

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        try:
            return IPRoute()
        except OSError as exc:
            raise VipError(f"VIP {self.label}: cannot open netlink: {exc}") from exc

    def _index(self, ipr: Any) -> int | None:
        found: list[int] = ipr.link_lookup(ifname=self.interface)
        return found[0] if found else None

    def _missing(self) -> VipError:
        return VipError(f"interface {self.interface} does not exist (VIP {self.address})")

    def claim(self) -> None:
        """Add the address (already present is fine), then announce it."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self._ipr() as ipr:
            index = self._index(ipr)
            if index is None:
                raise self._missing()
            kwargs: dict[str, Any] = {}
            if self.ip.version == 6:
                kwargs["flags"] = IFA_F_NODAD
            try:
                ipr.addr("add", index=index, address=self.address, prefixlen=self.prefix, **kwargs)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise VipError(f"cannot add VIP {self.label}: {exc}") from exc
        self._log.info("VIP %s claimed", self.label)
        try:
            self.announce()
        except VipError as exc:
            self._log.warning("%s; neighbours will learn it when their caches expire", exc)

    def release(self) -> None:
        """Remove the address; absent address or vanished interface is fine."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self._ipr() as ipr:
            index = self._index(ipr)
            if index is None:
                self._log.info("VIP %s: interface is gone, nothing to release", self.label)
                return
            for prefixlen in self._held_prefixes(ipr, index):
                try:
                    ipr.addr("del", index=index, address=self.address, prefixlen=prefixlen)
                except NetlinkError as exc:
                    if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                        raise VipError(f"cannot remove VIP {self.label}: {exc}") from exc
                self._log.info("VIP %s released", self.label)

    def held(self) -> bool:
        with self._ipr() as ipr:
            index = self._index(ipr)
            return index is not None and bool(self._held_prefixes(ipr, index))

    def _held_prefixes(self, ipr: Any, index: int) -> list[int]:
        family = socket.AF_INET if self.ip.version == 4 else socket.AF_INET6
        prefixes = []
        for msg in ipr.get_addr(family=family, index=index):
            text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if text is not None and ipaddress.ip_address(text) == self.ip:
                prefixes.append(int(msg["prefixlen"]))
        return prefixes

    # -- announcement -----------------------------------------------------------------------

    def _link(self) -> tuple[int, bytes | None]:
        """Interface index and hardware address (None when it cannot be announced)."""
        with self._ipr() as ipr:
            index = self._index(ipr)
            if index is None:
                raise self._missing()
            link = ipr.get_links(index)[0]
            text = link.get("IFLA_ADDRESS")
            flags = int(link["flags"])
        try:
            mac = mac_to_bytes(text) if text else None
        except ValueError:
            mac = None
        if mac is None or mac == ZERO_MAC or flags & IFF_NOARP:
            return index, None
        return index, mac

    def announce(self) -> None:
        """Send the gratuitous ARP frames or the unsolicited neighbour advertisements."""
        index, mac = self._link()
        if mac is None:
            self._log.info("VIP %s: interface has no hardware address, not announced", self.label)
            return
        try:
            if isinstance(self.ip, ipaddress.IPv4Address):
                self._send_garp(mac, self.ip)
            else:
                self._send_na(index, mac, self.ip)
        except OSError as exc:
            raise VipError(f"cannot announce VIP {self.label}: {exc}") from exc
        self._log.info("VIP %s announced (%d rounds)", self.label, self.announce_count)

    def _send_garp(self, mac: bytes, ip: ipaddress.IPv4Address) -> None:
        frames = [arp_frame(mac, ip, ARP_REQUEST), arp_frame(mac, ip, ARP_REPLY)]
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((self.interface, 0))
            for round_ in range(self.announce_count):
                if round_:
                    self._sleep(self.announce_interval_s)
                for frame in frames:
                    sock.send(frame)

    def _send_na(self, index: int, mac: bytes, ip: ipaddress.IPv6Address) -> None:
        packet = neighbour_advert(mac, ip)
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            for round_ in range(self.announce_count):
                if round_:
                    self._sleep(self.announce_interval_s)
                sock.sendto(packet, (ALL_NODES_V6, 0, 0, index))


# -- fake ------------------------------------------------------------------------------------


@dataclass
class FakeVipNetwork:
    """Shared by several ``FakeVip``: which nodes hold which address."""

    holders: dict[str, set[str]] = field(default_factory=dict)

    def holders_of(self, address: str) -> set[str]:
        return set(self.holders.get(str(ipaddress.ip_address(address)), set()))


class FakeVip:
    """In-memory VIP with the interface of ``Vip``, for unit tests.

    Set ``interfaces`` to the names that "exist" (default: the one given) and ``fail`` to a
    ``VipError`` to make the next calls fail. ``announcements`` counts successful claims.
    """

    def __init__(
        self,
        address: str,
        prefix: int,
        interface: str,
        *,
        node: str = "local",
        network: FakeVipNetwork | None = None,
        interfaces: set[str] | None = None,
    ) -> None:
        self.ip = parse_vip(address, prefix)
        self.address = str(self.ip)
        self.prefix = prefix
        self.interface = interface
        self.node = node
        self.network = network if network is not None else FakeVipNetwork()
        self.interfaces = interfaces if interfaces is not None else {interface}
        self.fail: VipError | None = None
        self.announcements = 0

    @property
    def label(self) -> str:
        return f"{self.address}/{self.prefix} on {self.interface}"

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def claim(self) -> None:
        self._check()
        if self.interface not in self.interfaces:
            raise VipError(f"interface {self.interface} does not exist (VIP {self.address})")
        self.network.holders.setdefault(self.address, set()).add(self.node)
        self.announcements += 1

    def release(self) -> None:
        self._check()
        self.network.holders.get(self.address, set()).discard(self.node)

    def held(self) -> bool:
        self._check()
        return self.node in self.network.holders.get(self.address, set())
