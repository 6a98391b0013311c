"""The real VIP adapter in two network namespaces joined by a veth pair (root).

node ns: vip-a 198.18.200.1/24, the side that claims 198.18.200.100/24.
peer ns: vip-b 198.18.200.2/24, whose neighbour table must learn the VIP's MAC from the
gratuitous ARP alone (it holds a wrong, "poisoned" entry before the claim).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cluster.vip import (
    ARP_REPLY,
    ARP_REQUEST,
    FakeVip,
    FakeVipNetwork,
    VipError,
    arp_frame,
    neighbour_advert,
    parse_vip,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VIP = "198.18.200.100"
POISON_MAC = "02:00:00:00:0b:ad"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2's `ip` to create network namespaces",
)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


class Pair:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.node = f"mhtv-node-{tag}"
        self.peer = f"mhtv-peer-{tag}"

    def up(self) -> None:
        sh("ip", "netns", "add", self.node)
        sh("ip", "netns", "add", self.peer)
        sh(
            "ip",
            "-n",
            self.node,
            "link",
            "add",
            "vip-a",
            "type",
            "veth",
            "peer",
            "name",
            "vip-b",
            "netns",
            self.peer,
        )
        sh("ip", "-n", self.node, "addr", "add", "198.18.200.1/24", "dev", "vip-a")
        sh("ip", "-n", self.peer, "addr", "add", "198.18.200.2/24", "dev", "vip-b")
        for ns, dev in ((self.node, "vip-a"), (self.peer, "vip-b")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def down(self) -> None:
        for ns in (self.node, self.peer):
            sh("ip", "netns", "del", ns, check=False)

    def run_vip(self, calls: str, interface: str = "vip-a") -> dict[str, object]:
        """Run Vip methods inside the node namespace; return {"held": ..., "error": ...}."""
        code = (
            "import json\n"
            "from app.cluster.vip import Vip, VipError\n"
            f"v = Vip({VIP!r}, 24, {interface!r})\n"
            "out = {'error': None}\n"
            "try:\n"
            f"    {calls}\n"
            "    out['held'] = v.held()\n"
            "except VipError as exc:\n"
            "    out['error'] = str(exc)\n"
            "print(json.dumps(out))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def addresses(self) -> str:
        return sh("ip", "-n", self.node, "-4", "addr", "show", "dev", "vip-a").stdout

    def mac(self) -> str:
        link = json.loads(sh("ip", "-n", self.node, "-j", "link", "show", "vip-a").stdout)
        return str(link[0]["address"])

    def peer_neighbour(self) -> str:
        return sh("ip", "-n", self.peer, "neigh", "show", VIP, "dev", "vip-b").stdout


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        p.up()
        yield p
    finally:
        p.down()


@needs_root
def test_claim_adds_and_announces_release_removes(pair: Pair) -> None:
    sh(
        "ip",
        "-n",
        pair.peer,
        "neigh",
        "replace",
        VIP,
        "lladdr",
        POISON_MAC,
        "dev",
        "vip-b",
        "nud",
        "stale",
    )
    assert POISON_MAC in pair.peer_neighbour()

    out = pair.run_vip("v.claim(); v.claim()")  # twice: idempotent
    assert out == {"error": None, "held": True}
    assert f"{VIP}/24" in pair.addresses()

    mac = pair.mac()
    deadline = time.monotonic() + 10
    while mac not in pair.peer_neighbour() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mac in pair.peer_neighbour(), pair.peer_neighbour()
    assert POISON_MAC not in pair.peer_neighbour()

    out = pair.run_vip("v.release(); v.release()")
    assert out == {"error": None, "held": False}
    assert VIP not in pair.addresses()


@needs_root
def test_claim_of_present_address_is_fine(pair: Pair) -> None:
    sh("ip", "-n", pair.node, "addr", "add", f"{VIP}/24", "dev", "vip-a")
    assert pair.run_vip("v.claim()") == {"error": None, "held": True}


@needs_root
def test_missing_interface_is_named(pair: Pair) -> None:
    out = pair.run_vip("v.claim()", interface="eth9")
    assert out["error"] == f"interface eth9 does not exist (VIP {VIP})"
    # releasing on a vanished interface is not an error: nothing is held there
    assert pair.run_vip("v.release()", interface="eth9") == {"error": None, "held": False}


def test_frames_are_gratuitous_arp() -> None:
    mac = bytes.fromhex("020000000001")
    ip = ipaddress.IPv4Address(VIP)
    for op, tha in ((ARP_REQUEST, b"\x00" * 6), (ARP_REPLY, mac)):
        frame = arp_frame(mac, ip, op)
        assert len(frame) == 60
        dst, src, ethertype = struct.unpack("!6s6sH", frame[:14])
        assert (dst, src, ethertype) == (b"\xff" * 6, mac, 0x0806)
        fields = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
        assert fields == (1, 0x0800, 6, 4, op, mac, ip.packed, tha, ip.packed)


def test_neighbour_advert_has_override_and_target_mac() -> None:
    mac = bytes.fromhex("020000000001")
    ip = ipaddress.IPv6Address("2001:db8::100")
    packet = neighbour_advert(mac, ip)
    icmp_type, code, _csum, flags, target = struct.unpack("!BBHI16s", packet[:24])
    assert (icmp_type, code, target) == (136, 0, ip.packed)
    assert flags == 0x20000000  # override, not solicited, not router
    assert packet[24:] == b"\x02\x01" + mac


def test_bad_vip_is_named() -> None:
    with pytest.raises(VipError, match=re.escape("'198.18.0.300' is not an IP address")):
        parse_vip("198.18.0.300", 24)
    with pytest.raises(VipError, match="prefix 33 is not between 1 and 32"):
        parse_vip(VIP, 33)


def test_fake_vips_share_a_network() -> None:
    net = FakeVipNetwork()
    a = FakeVip(VIP, 24, "eth0", node="node1", network=net)
    b = FakeVip(VIP, 24, "eth0", node="node2", network=net)
    a.claim()
    assert a.held() and not b.held()
    a.release()
    b.claim()
    assert net.holders_of(VIP) == {"node2"}
    with pytest.raises(VipError, match="interface eth9 does not exist"):
        FakeVip(VIP, 24, "eth9", interfaces={"eth0"}).claim()
