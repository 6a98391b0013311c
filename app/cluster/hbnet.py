"""Heartbeat transport: one UDP socket per heartbeat network, driven by asyncio.

How it works
------------
``HeartbeatNet`` binds one non-blocking UDP socket per network to ``local_ip:port`` and, every
``pulse`` seconds, sends the current local heartbeat (``set_local``) to ``peer_ip:peer_port`` on
each network. Each datagram gets the next ``seq`` of this boot and names its network, and echoes
the last peer message received (see ``heartbeat.py`` for why). Received datagrams are checked
in order: source address (must be the peer's address on that network), ``heartbeat.decode``
(MAC, schema, cluster and module), then ``PeerTracker.accept`` (replays, new boots). Each refusal
is counted by reason and logged at most once per ``LOG_EVERY`` seconds per reason; nothing a
datagram contains can stop the loop. Send errors (a link down: ENETUNREACH, EADDRNOTAVAIL...) are
counted per network and logged at the same rate; the next pulse simply tries again.

The sockets are read with ``loop.add_reader`` and written with ``sock.sendto`` directly: a
datagram that cannot be sent at once is dropped (a heartbeat is worth nothing late), never
queued. Sockets are bound with ``IP_FREEBIND`` so a node starts even while one heartbeat
interface is down or its address not yet configured; that network just counts send errors and
stays not alive until the address appears.

The time used for liveness comes from the injectable ``clock`` (``time.monotonic`` by default);
the pulse itself sleeps on the event loop.

Exception tree
--------------
::

    ClusterError (errors.py)
     +-- HeartbeatNetError   a socket could not be bound (address in use, bad address)

``start()`` raises ``HeartbeatNetError``; the constructor and ``set_local`` raise
``heartbeat.Malformed`` for names or values too long for the wire (``set_local`` then keeps
the previous values). Nothing here raises on network input.

Limits
------
* IPv4 and IPv6 addresses, no host names. One peer per network (two-node clusters).
* ``command`` and the advertised state are repeated in every heartbeat until changed: the
  channel is lossy, so a command is a level, not an edge; the peer acts on its appearance.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from app.cluster import heartbeat as hb
from app.cluster.errors import ClusterError
from app.cluster.heartbeat import Heartbeat, PeerTracker, PeerView

log = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two log lines of the same kind
_DRAIN = 64  # datagrams read per wake-up at most, so one socket cannot starve the loop
_RECV_SIZE = 2048  # above MAX_DATAGRAM: an oversized datagram is seen (and refused) as such
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


class HeartbeatNetError(ClusterError):
    """A heartbeat socket could not be set up."""


@dataclass(frozen=True, slots=True)
class HbNetwork:
    name: str
    local_ip: str
    peer_ip: str


@dataclass(frozen=True, slots=True)
class NetCounters:
    """Totals since start: datagrams sent, accepted, refused (by reason), send errors."""

    sent: int
    accepted: int
    rejected: Mapping[str, int] = field(hash=False)
    send_errors: Mapping[str, int] = field(hash=False)


@dataclass(slots=True)
class _Local:
    state: str = "STOP"
    substatus: str = "NotReady"
    generation: str = ""
    inconsistent: bool = False
    resources: Mapping[str, str] = field(default_factory=dict)
    command: str | None = None
    stopping: bool = False


class _RateLimitedLog:
    """Logs the first event of a kind, then at most one line per ``every`` s with a count."""

    def __init__(self, clock: Callable[[], float], every: float = LOG_EVERY) -> None:
        self._clock = clock
        self._every = every
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, kind: str, text: str) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._suppressed[kind] += 1
            return
        more = self._suppressed.pop(kind, 0)
        suffix = f" ({more} more since the last report)" if more else ""
        self._last[kind] = now
        log.warning("%s%s", text, suffix)


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b)
    except ValueError:
        return False


class HeartbeatNet:
    """Sends our heartbeat and tracks the peer's on every heartbeat network.

    ``networks``: ``(name, local_ip, peer_ip)`` per network. ``port``: the module's heartbeat
    port, bound locally and sent to (``peer_port`` overrides the destination, for tests).
    ``peer``: the peer's node name, when known, to refuse any other sender.
    """

    def __init__(
        self,
        networks: Sequence[tuple[str, str, str] | HbNetwork],
        port: int,
        key: bytes,
        cluster: str,
        module: str,
        node: str,
        *,
        peer: str | None = None,
        pulse: float = 0.7,
        peer_port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        boot: str | None = None,
    ) -> None:
        self.networks = tuple(n if isinstance(n, HbNetwork) else HbNetwork(*n) for n in networks)
        if not self.networks:
            raise ValueError("at least one heartbeat network is needed")
        if len({n.name for n in self.networks}) != len(self.networks):
            raise ValueError("heartbeat network names must be unique")
        for net in self.networks:
            for role, ip in (("local", net.local_ip), ("peer", net.peer_ip)):
                try:
                    ipaddress.ip_address(ip)
                except ValueError:
                    raise ValueError(
                        f"heartbeat network {net.name!r}: {role} {ip!r} is not an IP address"
                    ) from None
        if not key:
            raise ValueError("the cluster key must not be empty")
        if pulse <= 0:
            raise ValueError("pulse must be positive")
        self.port = port
        self.peer_port = port if peer_port is None else peer_port
        self.cluster = cluster
        self.module = module
        self.node = node
        self.pulse = pulse
        self.boot = boot if boot is not None else os.urandom(12).hex()
        self._key = key
        self._clock = clock
        self._tracker = PeerTracker(node, self.boot, [n.name for n in self.networks], peer)
        self._local = _Local()
        self._seq = 0
        self._socks: dict[str, socket.socket] = {}
        self._pulse_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = _RateLimitedLog(clock)
        self._sent = 0
        self._accepted = 0
        self._rejected: Counter[str] = Counter()
        self._send_errors: Counter[str] = Counter()
        self.received = asyncio.Event()
        """Set on every accepted heartbeat; the daemon may wait on it and clear it."""
        for net in self.networks:  # names too long for the wire fail here, not on every pulse
            hb.encode(self._message(net.name, 0), self._key)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind every network's socket and start pulsing. Raises ``HeartbeatNetError``."""
        if self._loop is not None:
            raise HeartbeatNetError("heartbeat transport already started")
        self._loop = asyncio.get_running_loop()
        try:
            for net in self.networks:
                self._socks[net.name] = self._bind(net)
        except HeartbeatNetError:
            self._close_sockets()
            self._loop = None
            raise
        for name, sock in self._socks.items():
            self._loop.add_reader(sock.fileno(), self._readable, name, sock)
        self._pulse_task = asyncio.create_task(self._pulse(), name=f"heartbeat-{self.module}")
        self._pulse_task.add_done_callback(self._pulse_done)

    async def close(self) -> None:
        """Stop pulsing and close the sockets (the peer loses us after its timeout)."""
        task, self._pulse_task = self._pulse_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_sockets()
        self._loop = None

    def _bind(self, net: HbNetwork) -> socket.socket:
        try:
            family = (
                socket.AF_INET6
                if ipaddress.ip_address(net.local_ip).version == 6
                else socket.AF_INET
            )
        except ValueError as exc:
            raise HeartbeatNetError(
                f"heartbeat network {net.name!r}: {net.local_ip!r} is not an IP address"
            ) from exc
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_INET:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
            sock.bind((net.local_ip, self.port))
        except OSError as exc:
            sock.close()
            raise HeartbeatNetError(
                f"heartbeat network {net.name!r}: cannot bind {net.local_ip} port {self.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        return sock

    def _close_sockets(self) -> None:
        for sock in self._socks.values():
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = {}

    @staticmethod
    def _pulse_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("heartbeat pulse stopped", exc_info=task.exception())

    async def _pulse(self) -> None:
        while True:
            self.send_now()
            await asyncio.sleep(self.pulse)

    # ------------------------------------------------------------ what we advertise

    def set_local(
        self,
        state: str,
        substatus: str,
        generation: str,
        *,
        inconsistent: bool = False,
        resources: Mapping[str, str] | None = None,
        command: str | None = None,
    ) -> None:
        """What the next heartbeats advertise (call ``send_now`` to send it at once)."""
        local = _Local(
            state,
            substatus,
            generation,
            inconsistent,
            dict(resources or {}),
            command,
            self._local.stopping,
        )
        # Refuse here, in the caller, what could not be sent (``heartbeat.Malformed``), and
        # keep advertising the previous state.
        hb.encode(self._message(self.networks[0].name, 0, local), self._key)
        self._local = local

    def send_now(self) -> None:
        """Send the current heartbeat on every network now; errors are counted, not raised."""
        for net in self.networks:
            sock = self._socks.get(net.name)
            if sock is None:
                continue
            self._seq += 1
            data = hb.encode(self._message(net.name, self._seq), self._key)
            try:
                sock.sendto(data, (net.peer_ip, self.peer_port))
            except OSError as exc:
                self._send_errors[net.name] += 1
                reason = errno.errorcode.get(exc.errno or 0, "error")
                self._log.warning(
                    f"send:{net.name}:{reason}",
                    f"heartbeat on {net.name!r} to {net.peer_ip}: {exc.strerror or exc}",
                )
            else:
                self._sent += 1

    async def announce_stop(self, repeat: int = 3, gap: float = 0.05) -> None:
        """Tell the peer we stop cleanly (it acts at once): ``repeat`` quick sends per network.

        Later heartbeats keep saying ``stopping`` until ``clear_stop``.
        """
        self._local.stopping = True
        for i in range(repeat):
            if i:
                await asyncio.sleep(gap)
            self.send_now()

    def clear_stop(self) -> None:
        self._local.stopping = False

    def _message(self, network: str, seq: int, local: _Local | None = None) -> Heartbeat:
        local = local or self._local
        echo_boot, echo_seq = self._tracker.echo()
        return Heartbeat(
            cluster=self.cluster,
            module=self.module,
            node=self.node,
            boot=self.boot,
            seq=seq,
            network=network,
            state=local.state,
            substatus=local.substatus,
            generation=local.generation,
            inconsistent=local.inconsistent,
            resources=local.resources,
            stopping=local.stopping,
            command=local.command,
            sent_at=self._clock(),
            echo_boot=echo_boot,
            echo_seq=echo_seq,
        )

    # ------------------------------------------------------------ receiving

    def _readable(self, name: str, sock: socket.socket) -> None:
        for _ in range(_DRAIN):
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED reported by an ICMP error
                self._send_errors[name] += 1
                self._log.warning(f"recv:{name}", f"heartbeat socket {name!r}: {exc}")
                return
            self._datagram(name, data, addr[0])

    def _datagram(self, name: str, data: bytes, source: str) -> None:
        net = next(n for n in self.networks if n.name == name)
        if not _same_ip(source, net.peer_ip):
            self._refuse(name, "wrong_source", f"from {source}, the peer is {net.peer_ip}")
            return
        try:
            msg = hb.decode(data, self._key, cluster=self.cluster, module=self.module)
            self._tracker.accept(msg, name, self._clock())
        except hb.HeartbeatError as exc:
            self._refuse(name, exc.reason, str(exc))
            return
        self._accepted += 1
        self.received.set()

    def _refuse(self, network: str, reason: str, text: str) -> None:
        self._rejected[reason] += 1
        self._log.warning(f"refused:{reason}", f"heartbeat refused on {network!r}: {text}")

    # ------------------------------------------------------------ what we know of the peer

    def latest(self) -> Heartbeat | None:
        return self._tracker.latest()

    def peer_seen(self, timeout: float) -> bool:
        """Peer heard within ``timeout`` s on some network and no clean stop announced."""
        return self._tracker.peer_seen(self._clock(), timeout)

    def networks_alive(self, timeout: float) -> dict[str, bool]:
        return self._tracker.networks_alive(self._clock(), timeout)

    def view(self, timeout: float) -> PeerView:
        """Everything at once, for the decision snapshot."""
        return self._tracker.view(self._clock(), timeout)

    def counters(self) -> NetCounters:
        return NetCounters(
            sent=self._sent,
            accepted=self._accepted,
            rejected=MappingProxyType(dict(self._rejected)),
            send_errors=MappingProxyType(dict(self._send_errors)),
        )
