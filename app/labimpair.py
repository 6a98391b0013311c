"""Userspace impairment hub for the lab: delay, jitter and loss where the kernel has no netem.

How it works
    The lab (app/lab.py) detaches the switch-side veth ends of one network (e.g. ``node1-repl``,
    ``node2-repl``) from their bridge and starts this file as a script in the switch namespace:
    ``python labimpair.py PORT...``. It opens one AF_PACKET/SOCK_RAW socket per port (ETH_P_ALL,
    promiscuous membership, PACKET_VNET_HDR so that GSO super-frames and partial checksums of
    the veth pass through intact), prints ``READY`` on stdout and waits for its first
    configuration line on stdin. From then on every frame received on a port (frames the hub
    itself sent, pkttype PACKET_OUTGOING, are ignored, so there is no loop) is forwarded to the
    other ports: to the one port that learnt its destination MAC, else to all (hub semantics
    for broadcast, ARP and unknown unicast). Each copy is first judged by :func:`plan` (a pure
    function): the sender's impairment applies (its egress), plus the receiver's when the
    receiver asked for ``both_ways``; each applicable impairment drops it with probability
    loss_pct/100 and adds delay_ms + uniform(-jitter_ms, +jitter_ms); the sum is clamped at 0.
    Copies wait in a heap of (due time, sequence, port, frame) and are sent when due, the
    select() timeout being the next due time. Like netem with jitter, copies are therefore
    REORDERED when their random delays cross (no per-destination FIFO).

    Partition flags travel in the same configuration: ``blocked`` ports forward nothing either
    way (a bridge port in state disabled), two ``isolated`` ports do not reach each other (the
    bridge's port isolation).

    Configuration: one JSON object per stdin line, replacing the previous one::

        {"ports": {"node1-repl": {"loss_pct": 1, "delay_ms": 50, "jitter_ms": 20,
                                  "both_ways": true, "isolated": false, "blocked": false}},
         "limit": 10000}

    Ports not named have no impairment. The hub exits when stdin closes (EOF) or on SIGTERM,
    printing its counters (forwarded, lost, overflow, send errors) as one JSON line on stderr.
    Before the first configuration line, received frames are discarded (the ports may still
    be bridge ports then, and the bridge forwards those).

Exceptions
    ImpairError (ValueError)   a configuration line that does not parse; the hub reports it on
                               stderr and keeps the previous configuration.

Known limits
    Linux only, root (CAP_NET_RAW) only. Python speed: fine for heartbeats, pings and a few
    MB/s, not for replication throughput. The queue holds at most ``limit`` frames; frames
    beyond it are dropped and counted as overflow. Starting and stopping the hub loses the
    frames that arrive while the ports move between bridge and hub (milliseconds).
"""

from __future__ import annotations

import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
VNET_HDR_LEN = 10  # struct virtio_net_hdr
RECV_SIZE = 262144
DEFAULT_LIMIT = 10000
READY_LINE = "READY"
BURST = 64  # frames read from one socket per wakeup, so one busy port cannot starve the others


class ImpairError(ValueError):
    """A configuration that does not parse."""


@dataclass(frozen=True)
class PortConfig:
    """Impairment and partition flags of one switch port (i.e. of the host behind it)."""

    loss_pct: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    both_ways: bool = True
    isolated: bool = False
    blocked: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "loss_pct": self.loss_pct,
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "both_ways": self.both_ways,
            "isolated": self.isolated,
            "blocked": self.blocked,
        }


NO_IMPAIRMENT = PortConfig()


def parse_config(line: str) -> tuple[dict[str, PortConfig], int]:
    """(per-port config, queue limit) from one configuration line; ImpairError if malformed."""
    try:
        raw = json.loads(line)
        ports = {str(name): PortConfig(**spec) for name, spec in raw.get("ports", {}).items()}
        limit = int(raw.get("limit", DEFAULT_LIMIT))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ImpairError(f"bad configuration line {line[:200]!r}: {exc}") from exc
    for name, cfg in ports.items():
        if not 0 <= cfg.loss_pct <= 100 or cfg.delay_ms < 0 or cfg.jitter_ms < 0:
            raise ImpairError(f"port {name}: loss_pct in 0..100, delays >= 0 ({cfg})")
    return ports, max(1, limit)


def plan(
    src: str, dst: str, ports: Mapping[str, PortConfig], rand: Callable[[], float]
) -> float | None:
    """Delay in seconds for one copy of a frame from port src to port dst, or None to drop it.

    ``rand`` returns uniform floats in [0, 1) (injected, so tests can fix it)."""
    s, d = ports.get(src, NO_IMPAIRMENT), ports.get(dst, NO_IMPAIRMENT)
    if s.blocked or d.blocked or (s.isolated and d.isolated):
        return None
    delay_ms = 0.0
    for cfg in (s, d) if d.both_ways else (s,):
        if cfg.loss_pct and rand() * 100 < cfg.loss_pct:
            return None
        delay_ms += cfg.delay_ms
        if cfg.jitter_ms:
            delay_ms += (rand() * 2 - 1) * cfg.jitter_ms
    return max(0.0, delay_ms) / 1000.0


def _open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, ETH_P_ALL))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


class _Stop(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def serve(port_names: list[str]) -> dict[str, int]:
    """Run the hub until stdin closes or SIGTERM; return the counters."""
    socks = {name: _open_port(name) for name in port_names}
    by_fd = {s.fileno(): name for name, s in socks.items()}
    stdin = sys.stdin.fileno()
    counters = {"forwarded": 0, "lost": 0, "overflow": 0, "send_errors": 0, "config_errors": 0}
    ports: dict[str, PortConfig] = {}
    limit = DEFAULT_LIMIT
    configured = False
    macs: dict[bytes, str] = {}  # learnt source MAC -> port
    heap: list[tuple[float, int, str, bytes]] = []
    seq = 0
    pending = b""
    rng = random.Random()
    print(READY_LINE, flush=True)
    try:
        while True:
            now = time.monotonic()
            timeout = max(0.0, heap[0][0] - now) if heap else None
            ready, _, _ = select.select([stdin, *by_fd], [], [], timeout)
            for fd in ready:
                if fd == stdin:
                    chunk = os.read(stdin, 65536)
                    if not chunk:
                        return counters
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        try:
                            ports, limit = parse_config(line.decode())
                        except (ImpairError, UnicodeDecodeError) as exc:
                            counters["config_errors"] += 1
                            print(f"labimpair: {exc}", file=sys.stderr, flush=True)
                            continue
                        configured = True
                    continue
                src = by_fd[fd]
                for _ in range(BURST):
                    try:
                        data, addr = socks[src].recvfrom(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        break
                    if addr[2] == PACKET_OUTGOING or not configured:
                        continue
                    frame = data[VNET_HDR_LEN:]
                    if len(frame) < 14:
                        continue
                    macs[frame[6:12]] = src
                    dst_port = macs.get(frame[0:6]) if not frame[0] & 1 else None
                    targets = [dst_port] if dst_port else [p for p in socks if p != src]
                    now = time.monotonic()
                    for dst in targets:
                        if dst == src:
                            continue
                        delay = plan(src, dst, ports, rng.random)
                        if delay is None:
                            counters["lost"] += 1
                        elif len(heap) >= limit:
                            counters["overflow"] += 1
                        else:
                            seq += 1
                            heapq.heappush(heap, (now + delay, seq, dst, data))
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, _, dst, data = heapq.heappop(heap)
                try:
                    socks[dst].send(data)
                    counters["forwarded"] += 1
                except OSError:  # port down (a pulled cable), or a frame the port refuses
                    counters["send_errors"] += 1
    except _Stop:
        return counters
    finally:
        for s in socks.values():
            s.close()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: labimpair.py PORT...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    counters = serve(argv)
    print(json.dumps(counters), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
