"""Two real HeartbeatNet instances over UDP on loopback (127.0.0.0/8 only).

Network "pub" joins 127.0.0.1 (node1) and 127.0.0.2 (node2); network "repl" joins 127.0.0.3
and 127.0.0.4. Waits are bounded polling loops, never timing assertions.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.cluster import heartbeat as hb
from app.cluster.hbnet import HeartbeatNet, HeartbeatNetError

pytestmark = pytest.mark.integration

KEY = b"integration-test-cluster-key-000"
PULSE = 0.1
TIMEOUT = 1.0  # heartbeat timeout used for the liveness questions
LIMIT = 20.0  # generous bound of every wait

A_NETS = [("pub", "127.0.0.1", "127.0.0.2"), ("repl", "127.0.0.3", "127.0.0.4")]
B_NETS = [("pub", "127.0.0.2", "127.0.0.1"), ("repl", "127.0.0.4", "127.0.0.3")]


def free_port() -> int:
    """A UDP port free on every address the tests use."""
    for _ in range(50):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        probe.close()
        others = []
        try:
            for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                others.append(s)
                s.bind((ip, port))
        except OSError:
            continue
        finally:
            for s in others:
                s.close()
        return port
    raise RuntimeError("no free UDP port found on 127.0.0.1-5")


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 120))


async def until(what: str, predicate: Callable[[], bool]) -> None:
    for _ in range(int(LIMIT / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true after {LIMIT} s: {what}")


def make(node: str, nets: list[tuple[str, str, str]], port: int, **kw: Any) -> HeartbeatNet:
    peer = "node2" if node == "node1" else "node1"
    return HeartbeatNet(nets, port, KEY, "c1", "mirror", node, peer=peer, pulse=PULSE, **kw)


@asynccontextmanager
async def pair(port: int) -> AsyncIterator[tuple[HeartbeatNet, HeartbeatNet]]:
    a, b = make("node1", A_NETS, port), make("node2", B_NETS, port)
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await a.close()
        await b.close()


def udp_from(ip: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    return s


def test_nodes_see_each_other_on_both_networks_and_follow_state() -> None:
    async def scenario() -> None:
        async with pair(free_port()) as (a, b):
            a.set_local("PRIM", "Ready", "gen-7", resources={"fs": "up"})
            a.send_now()
            await until(
                "both see each other", lambda: a.peer_seen(TIMEOUT) and b.peer_seen(TIMEOUT)
            )
            await until(
                "both networks alive",
                lambda: (
                    b.networks_alive(TIMEOUT) == {"pub": True, "repl": True}
                    and a.networks_alive(TIMEOUT) == {"pub": True, "repl": True}
                ),
            )
            seen = b.latest()
            assert seen is not None
            assert (seen.node, seen.state, seen.generation) == ("node1", "PRIM", "gen-7")
            assert dict(seen.resources) == {"fs": "up"}

            a.set_local("ALONE", "Transient", "gen-8", command="swap-request")
            a.send_now()

            def updated() -> bool:
                m = b.latest()
                return m is not None and m.state == "ALONE" and m.command == "swap-request"

            await until("node2 sees the new state and command", updated)
            assert b.counters().accepted > 0 and a.counters().sent > 0

    run(scenario)


def test_peer_lost_after_timeout_when_it_closes() -> None:
    async def scenario() -> None:
        async with pair(free_port()) as (a, b):
            await until("node1 sees node2", lambda: a.peer_seen(TIMEOUT))
            await b.close()
            await until("node1 loses node2", lambda: not a.peer_seen(TIMEOUT))
            assert a.networks_alive(TIMEOUT) == {"pub": False, "repl": False}
            assert a.latest() is not None and not a.latest().stopping  # type: ignore[union-attr]

    run(scenario)


def test_one_network_missing_is_reported_per_network() -> None:
    async def scenario() -> None:
        port = free_port()
        a = make("node1", A_NETS[:1], port)  # node1 only speaks on "pub"
        b = make("node2", B_NETS, port)
        try:
            await a.start()
            await b.start()
            await until(
                "node2 sees pub alive, repl dead",
                lambda: b.networks_alive(TIMEOUT) == {"pub": True, "repl": False},
            )
            assert b.peer_seen(TIMEOUT)
        finally:
            await a.close()
            await b.close()

    run(scenario)


def test_forged_and_garbage_datagrams_are_counted_and_harmless() -> None:
    async def scenario() -> None:
        port = free_port()
        async with pair(port) as (a, b):
            await until("node1 sees node2", lambda: a.peer_seen(TIMEOUT))
            forged = hb.Heartbeat(
                cluster="c1",
                module="mirror",
                node="node2",
                boot=b.boot,
                seq=10**12,
                network="pub",
                state="PRIM",
                substatus="Ready",
                generation="evil",
            )
            spoof = udp_from("127.0.0.2")  # from node2's address, but without the key
            stranger = udp_from("127.0.0.5")
            try:
                spoof.sendto(hb.encode(forged, b"not-the-cluster-key"), ("127.0.0.1", port))
                spoof.sendto(b"\x00garbage", ("127.0.0.1", port))
                spoof.sendto(b"MHB\x01" + b"x" * 3000, ("127.0.0.1", port))
                stranger.sendto(hb.encode(forged, KEY), ("127.0.0.1", port))
            finally:
                spoof.close()
                stranger.close()
            await until("bad MAC counted", lambda: a.counters().rejected.get("bad_mac", 0) >= 1)
            await until("garbage counted", lambda: a.counters().rejected.get("malformed", 0) >= 2)
            await until(
                "stranger counted", lambda: a.counters().rejected.get("wrong_source", 0) >= 1
            )
            latest = a.latest()
            assert latest is not None and latest.generation != "evil"
            before = a.counters().accepted
            await until("still receiving node2", lambda: a.counters().accepted > before)
            assert a.peer_seen(TIMEOUT)

    run(scenario)


class Relay(asyncio.DatagramProtocol):
    """A man in the middle on "pub": forwards node1 -> node2 and keeps copies to replay."""

    def __init__(self, out: socket.socket, dest: tuple[str, int]) -> None:
        self.out, self.dest = out, dest
        self.captured: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.captured.append(data)
        self.out.sendto(data, self.dest)


def test_replayed_datagrams_are_refused() -> None:
    async def scenario() -> None:
        port = free_port()
        # node1 sends "pub" heartbeats to the relay at 127.0.0.5, which forwards them to node2
        # from node1's address, as an on-path attacker could.
        a_nets = [("pub", "127.0.0.1", "127.0.0.5"), A_NETS[1]]
        a = make("node1", a_nets, port)
        b = make("node2", B_NETS, port)
        out = udp_from("127.0.0.1")
        loop = asyncio.get_running_loop()
        transport, relay = await loop.create_datagram_endpoint(
            lambda: Relay(out, ("127.0.0.2", port)), local_addr=("127.0.0.5", port)
        )
        try:
            await a.start()
            await b.start()
            await until("node2 sees node1 on pub", lambda: b.networks_alive(TIMEOUT)["pub"])
            captured = relay.captured[-1]
            accepted = b.counters().accepted
            out.sendto(captured, ("127.0.0.2", port))
            await until("replay counted", lambda: b.counters().rejected.get("replay", 0) >= 1)
            # the same datagram on the other network does not fake a live "repl" link
            wrong_net = udp_from("127.0.0.3")
            try:
                wrong_net.sendto(captured, ("127.0.0.4", port))
            finally:
                wrong_net.close()
            await until(
                "cross-network replay counted",
                lambda: b.counters().rejected.get("wrong_network", 0) >= 1,
            )
            await until("genuine heartbeats still flow", lambda: b.counters().accepted > accepted)
            assert b.peer_seen(TIMEOUT)
        finally:
            transport.close()
            out.close()
            await a.close()
            await b.close()

    run(scenario)


def test_announce_stop_is_seen_at_once() -> None:
    async def scenario() -> None:
        async with pair(free_port()) as (a, b):
            await until("node1 sees node2", lambda: a.peer_seen(TIMEOUT))
            await b.announce_stop()
            # With an hour of heartbeat timeout, only the announcement can make node2 unseen.
            await until("node1 sees the clean stop", lambda: not a.peer_seen(3600.0))
            view = a.view(3600.0)
            assert view.stopping and view.latest is not None and view.latest.stopping

    run(scenario)


def test_send_errors_are_counted_and_do_not_stop_the_pulse() -> None:
    async def scenario() -> None:
        port = free_port()
        # "v6" cannot send (an IPv6 peer on an IPv4 socket): every send fails locally.
        a = make("node1", [*A_NETS[:1], ("v6", "127.0.0.3", "::1")], port)
        b = make("node2", B_NETS[:1], port)
        try:
            await a.start()
            await b.start()
            await until("send errors counted", lambda: a.counters().send_errors.get("v6", 0) >= 3)
            await until("node2 still sees node1", lambda: b.peer_seen(TIMEOUT))
        finally:
            await a.close()
            await b.close()

    run(scenario)


def test_bind_failure_names_the_network() -> None:
    async def scenario() -> None:
        port = free_port()
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        holder.bind(("127.0.0.3", port))
        a = make("node1", A_NETS, port)
        try:
            with pytest.raises(HeartbeatNetError, match=r"'repl'.*127\.0\.0\.3"):
                await a.start()
            holder.close()
            await a.start()  # nothing half-open was left behind: a retry works
        finally:
            holder.close()
            await a.close()

    run(scenario)


def test_restarted_peer_is_accepted_again_with_its_new_boot() -> None:
    async def scenario() -> None:
        port = free_port()
        async with pair(port) as (a, b):
            await until("node1 sees node2", lambda: a.peer_seen(TIMEOUT))
            await b.close()
            b2 = make("node2", B_NETS, port)  # the daemon restarts: a new boot id
            try:
                await b2.start()

                def new_boot_seen() -> bool:
                    latest = a.latest()
                    return latest is not None and latest.boot == b2.boot and a.peer_seen(TIMEOUT)

                await until("node1 accepts node2's new boot", new_boot_seen)
                await until("node2 sees node1 again", lambda: b2.peer_seen(TIMEOUT))
            finally:
                await b2.close()

    run(scenario)


def test_restart_of_this_node_is_accepted_by_the_peer() -> None:
    async def scenario() -> None:
        port = free_port()
        async with pair(port) as (a, b):
            await until("node2 sees node1", lambda: b.peer_seen(TIMEOUT))
            await a.close()
            a2 = make("node1", A_NETS, port)
            try:
                await a2.start()

                def new_boot_seen() -> bool:
                    latest = b.latest()
                    return latest is not None and latest.boot == a2.boot

                await until("node2 accepts node1's new boot", new_boot_seen)
                await until("node1 sees node2", lambda: a2.peer_seen(TIMEOUT))
            finally:
                await a2.close()

    run(scenario)
