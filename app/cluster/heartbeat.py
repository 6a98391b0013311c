"""Heartbeat messages: a sans-IO codec and the replay-proof peer tracker.

How it works
------------
A heartbeat is one UDP datagram, sent every pulse on every heartbeat network::

    b"MHB" | version (1 byte) | body (orjson object) | HMAC-SHA256(key, everything before)

``encode`` builds it, ``decode`` checks, in this order: size bound (``MAX_DATAGRAM``), magic,
version, MAC (constant-time, before any parsing of the body), then the body's exact schema and
the expected cluster and module. Nothing here opens a socket or reads a clock: the time is a
number passed in by the caller (``hbnet.py`` is the transport).

``PeerTracker`` decides which authenticated messages are fresh. The key stops forgery, so the
threat is the replay of captured datagrams (and the reflection of our own ones back to us):

* Every message names the ``network`` it was sent on, under the MAC: a datagram captured on one
  network and replayed on another is refused (``WrongNetwork``), so it cannot fake a second
  live link. Our own messages sent back to us are refused (``Reflected``).
* A daemon start picks a random ``boot`` id and numbers its messages with ``seq`` (monotonic
  for the whole boot, one number per datagram). For the peer's current boot, a message is fresh
  only if its ``seq`` is above the last one accepted *on that network* (``Replay`` otherwise);
  per-network counters let the two links reorder against each other.
* A message from a *different* boot (the peer restarted, or we did) is accepted only if it
  proves it was made after something we sent recently: every heartbeat echoes the ``boot`` and
  ``seq`` of the last message its sender received from us (``echo_boot``/``echo_seq``). A new
  peer boot is taken when its echo names *our current* boot with an ``echo_seq`` strictly above
  every echo accepted so far (``Unverified`` otherwise). Our boot id is random per start, so no
  message captured before our start can pass; and an old peer boot can never displace a newer
  one, because the newer one always echoes a later number of ours. This replaces a list of past
  boot ids, which cannot order two boots it has never seen and lets a delayed old boot evict
  the real one.
* The echo costs one round trip after either side starts: a peer is accepted once it has heard
  us. ``echo()`` tells the transport what to echo: the last authenticated message received,
  accepted or not (echoing an unverified message is harmless, it only proves our own freshness).

Exception tree
--------------
``HeartbeatError`` (each subclass has a short ``reason`` used as a counter name)::

    ClusterError (errors.py)
     +-- HeartbeatError
           +-- Malformed          truncated, bad magic, bad JSON, wrong fields or types, too big
           |     +-- BadVersion   a version this build does not speak
           +-- BadMac             not signed with our cluster key (or altered)
           +-- WrongCluster       a valid message for another cluster or module
           +-- Rejected           authentic but not accepted by the PeerTracker
                 +-- Replay, Unverified, Reflected, WrongPeer, WrongNetwork

``decode`` raises only ``HeartbeatError`` subclasses for any input (fuzzed). ``encode`` raises
``Malformed`` for a message it would refuse to decode (a name too long, the datagram too big).

Limits
------
* An on-path attacker can still delay or drop datagrams, or keep us echoing a stale message by
  flooding replays; both look like a lossy link (the witness rule covers a lost peer), never like
  a live one.
* ``sent_at`` is the sender's monotonic clock: informative only (not comparable between hosts).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from app.cluster.errors import ClusterError

MAGIC = b"MHB"
VERSION = 1
MAC_SIZE = 32
MAX_DATAGRAM = 1400
MAX_NAME = 64  # cluster, module, node, network, state, substatus, resource names/values
MAX_GENERATION = 128
MAX_COMMAND = 256
MAX_RESOURCES = 32
MAX_SEQ = 2**63 - 1

_HEADER = MAGIC + bytes([VERSION])


class HeartbeatError(ClusterError):
    """A heartbeat that is refused; ``reason`` names the kind (used for counters)."""

    reason = "error"


class Malformed(HeartbeatError):
    reason = "malformed"


class BadVersion(Malformed):
    reason = "version"


class BadMac(HeartbeatError):
    reason = "bad_mac"


class WrongCluster(HeartbeatError):
    reason = "wrong_cluster"


class Rejected(HeartbeatError):
    """Authentic, but refused by the PeerTracker."""

    reason = "rejected"


class Replay(Rejected):
    reason = "replay"


class Unverified(Rejected):
    reason = "unverified"


class Reflected(Rejected):
    reason = "reflected"


class WrongPeer(Rejected):
    reason = "wrong_peer"


class WrongNetwork(Rejected):
    reason = "wrong_network"


def _frozen_resources(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One heartbeat: who sends it, what state it is in, what it last heard from us."""

    cluster: str
    module: str
    node: str
    boot: str  # random per daemon start
    seq: int  # monotonic per boot, one per datagram
    network: str  # the heartbeat network it is sent on (under the MAC)
    state: str  # STOP, WAIT, ALONE, PRIM, SECOND
    substatus: str  # NotReady, Transient, Ready
    generation: str  # data generation id
    inconsistent: bool = False  # data stopped in the middle of a resync
    resources: Mapping[str, str] = field(default_factory=dict, hash=False)
    stopping: bool = False  # clean stop announced: the peer acts at once
    command: str | None = None  # peer-to-peer coordination (swap handshake, ...)
    sent_at: float = 0.0  # sender's monotonic clock, informative
    echo_boot: str = ""  # boot id of the last message the sender received from us
    echo_seq: int = 0  # ... and its seq

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", _frozen_resources(self.resources))


# ---------------------------------------------------------------- codec

_STR_FIELDS: dict[str, int] = {
    "cluster": MAX_NAME,
    "module": MAX_NAME,
    "node": MAX_NAME,
    "boot": MAX_NAME,
    "network": MAX_NAME,
    "state": MAX_NAME,
    "substatus": MAX_NAME,
    "generation": MAX_GENERATION,
    "echo_boot": MAX_NAME,
}
_INT_FIELDS = ("seq", "echo_seq")
_BOOL_FIELDS = ("inconsistent", "stopping")
_ALL_FIELDS = frozenset(
    [*_STR_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS, "resources", "command", "sent_at"]
)


def _check_str(name: str, value: object, limit: int) -> str:
    if type(value) is not str:
        raise Malformed(f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise Malformed(f"{name}: longer than {limit} characters")
    return value


def _check_int(name: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise Malformed(f"{name}: expected an integer in 0..2**63-1")
    return value


def _check_bool(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise Malformed(f"{name}: expected true or false")
    return value


def _check_message(fields: Mapping[str, Any]) -> Heartbeat:
    """Build a Heartbeat from untrusted fields, checking every type and bound."""
    keys = set(fields)
    if keys != _ALL_FIELDS:
        missing = sorted(_ALL_FIELDS - keys)
        extra = sorted(keys - _ALL_FIELDS)
        raise Malformed(f"fields: missing {missing}, unexpected {extra}")
    strs = {name: _check_str(name, fields[name], limit) for name, limit in _STR_FIELDS.items()}
    ints = {name: _check_int(name, fields[name]) for name in _INT_FIELDS}
    bools = {name: _check_bool(name, fields[name]) for name in _BOOL_FIELDS}
    command = fields["command"]
    if command is not None:
        command = _check_str("command", command, MAX_COMMAND)
    sent_at = fields["sent_at"]
    if type(sent_at) not in (int, float) or not math.isfinite(sent_at):
        raise Malformed("sent_at: expected a finite number")
    resources = fields["resources"]
    if type(resources) is not dict:
        raise Malformed("resources: expected an object")
    if len(resources) > MAX_RESOURCES:
        raise Malformed(f"resources: more than {MAX_RESOURCES} entries")
    for rname, rstate in resources.items():
        _check_str("resources name", rname, MAX_NAME)
        _check_str(f"resources[{rname!r}]", rstate, MAX_NAME)
    return Heartbeat(
        cluster=strs["cluster"],
        module=strs["module"],
        node=strs["node"],
        boot=strs["boot"],
        seq=ints["seq"],
        network=strs["network"],
        state=strs["state"],
        substatus=strs["substatus"],
        generation=strs["generation"],
        inconsistent=bools["inconsistent"],
        resources=resources,
        stopping=bools["stopping"],
        command=command,
        sent_at=float(sent_at),
        echo_boot=strs["echo_boot"],
        echo_seq=ints["echo_seq"],
    )


def _mac(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()


def encode(msg: Heartbeat, key: bytes) -> bytes:
    """The datagram for ``msg``; raises ``Malformed`` if it breaks a bound ``decode`` enforces."""
    fields: dict[str, Any] = {
        "cluster": msg.cluster,
        "module": msg.module,
        "node": msg.node,
        "boot": msg.boot,
        "seq": msg.seq,
        "network": msg.network,
        "state": msg.state,
        "substatus": msg.substatus,
        "generation": msg.generation,
        "inconsistent": msg.inconsistent,
        "resources": dict(msg.resources),
        "stopping": msg.stopping,
        "command": msg.command,
        "sent_at": msg.sent_at,
        "echo_boot": msg.echo_boot,
        "echo_seq": msg.echo_seq,
    }
    _check_message(fields)  # the same rules as the receiver: never send what it would refuse
    signed = _HEADER + orjson.dumps(fields)
    data = signed + _mac(key, signed)
    if len(data) > MAX_DATAGRAM:
        raise Malformed(f"heartbeat of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def decode(
    data: bytes, key: bytes, *, cluster: str | None = None, module: str | None = None
) -> Heartbeat:
    """Check and parse one datagram. Raises only ``HeartbeatError`` subclasses, for any input.

    ``cluster``/``module``, when given, must match the message (``WrongCluster`` otherwise).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Malformed(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_DATAGRAM:
        raise Malformed(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if len(data) < len(_HEADER) + MAC_SIZE or not data.startswith(MAGIC):
        raise Malformed("not a mirrorha heartbeat (bad magic or too short)")
    if data[len(MAGIC)] != VERSION:
        raise BadVersion(f"heartbeat version {data[len(MAGIC)]}, this node speaks {VERSION}")
    signed, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, signed)):
        raise BadMac("heartbeat MAC does not match the cluster key")
    try:
        fields = orjson.loads(signed[len(_HEADER) :])
    except orjson.JSONDecodeError as exc:
        raise Malformed(f"body is not JSON: {exc}") from exc
    if type(fields) is not dict:
        raise Malformed("body is not a JSON object")
    msg = _check_message(fields)
    if cluster is not None and msg.cluster != cluster:
        raise WrongCluster(f"heartbeat for cluster {msg.cluster!r}, this node is in {cluster!r}")
    if module is not None and msg.module != module:
        raise WrongCluster(f"heartbeat for module {msg.module!r}, this node runs {module!r}")
    return msg


# ---------------------------------------------------------------- tracker


@dataclass(frozen=True, slots=True)
class PeerView:
    """What the tracker knows of the peer at time ``now`` (for the decision snapshot)."""

    seen: bool  # a fresh heartbeat within the timeout, and no clean stop announced
    stopping: bool  # the latest heartbeat announced a clean stop
    networks: Mapping[str, bool]  # per network: a fresh heartbeat within the timeout
    latest: Heartbeat | None
    age: float | None  # seconds since the last accepted heartbeat


class PeerTracker:
    """Accepts fresh heartbeats from the peer; pure: the time is always passed in.

    ``node``/``boot``: our own node name and boot id. ``networks``: the heartbeat network names.
    ``peer``: the peer's node name, when known (messages from any other node are refused).
    """

    def __init__(
        self, node: str, boot: str, networks: Iterable[str], peer: str | None = None
    ) -> None:
        self.node = node
        self.boot = boot
        self.peer = peer
        self.networks: tuple[str, ...] = tuple(networks)
        self._boot: str | None = None  # the peer's current boot
        self._last_seq: dict[str, int] = {}  # per network, for the current peer boot
        self._max_echo = -1  # highest echo_seq of ours accepted from any peer boot
        self._last_seen: dict[str, float] = {}  # per network: time of the last acceptance
        self._latest: Heartbeat | None = None  # highest seq accepted (current boot)
        self._echo: tuple[str, int] = ("", 0)

    def accept(self, msg: Heartbeat, network: str, now: float) -> None:
        """Take ``msg`` received on ``network`` at ``now``, or raise a ``Rejected`` subclass."""
        if network not in self.networks:
            raise WrongNetwork(f"received on unknown network {network!r}")
        if msg.network != network:
            raise WrongNetwork(f"sent on network {msg.network!r}, received on {network!r}")
        if msg.node == self.node:
            raise Reflected(f"our own heartbeat (node {msg.node!r}) came back")
        if self.peer is not None and msg.node != self.peer:
            raise WrongPeer(f"heartbeat from node {msg.node!r}, the peer is {self.peer!r}")
        if msg.boot == self._boot:
            last = self._last_seq.get(network, -1)
            if msg.seq <= last:
                raise Replay(f"seq {msg.seq} <= last {last} on {network!r} for this boot")
        else:
            # The echo is authentic data of the sender, so the peer's freshness can be proven
            # even when the boot itself will be refused below.
            self._echo = (msg.boot, msg.seq)
            if msg.echo_boot != self.boot:
                raise Unverified(f"new peer boot {msg.boot!r} has not heard this node yet")
            if msg.echo_seq <= self._max_echo:
                raise Unverified(
                    f"peer boot {msg.boot!r} echoes seq {msg.echo_seq}, "
                    f"not after {self._max_echo}: an old boot or a replay"
                )
            self._boot = msg.boot
            self._last_seq = {}
            self._latest = None
        self._echo = (msg.boot, msg.seq)
        if msg.echo_boot == self.boot:
            self._max_echo = max(self._max_echo, msg.echo_seq)
        self._last_seq[network] = msg.seq
        self._last_seen[network] = now
        if self._latest is None or msg.seq > self._latest.seq:
            self._latest = msg

    def echo(self) -> tuple[str, int]:
        """(boot, seq) of the last authentic peer message, to echo in our next heartbeat."""
        return self._echo

    def latest(self) -> Heartbeat | None:
        return self._latest

    def networks_alive(self, now: float, timeout: float) -> dict[str, bool]:
        """Per network, whether a heartbeat was accepted on it in the last ``timeout`` s."""
        result = {}
        for name in self.networks:
            seen = self._last_seen.get(name)
            result[name] = seen is not None and now - seen <= timeout
        return result

    def peer_seen(self, now: float, timeout: float) -> bool:
        """True if the peer is alive on some network and did not announce a clean stop."""
        return self.view(now, timeout).seen

    def view(self, now: float, timeout: float) -> PeerView:
        networks = self.networks_alive(now, timeout)
        latest = self._latest
        stopping = latest is not None and latest.stopping
        last = max(self._last_seen.values(), default=None)
        return PeerView(
            seen=any(networks.values()) and not stopping,
            stopping=stopping,
            networks=MappingProxyType(networks),
            latest=latest,
            age=None if last is None else now - last,
        )
