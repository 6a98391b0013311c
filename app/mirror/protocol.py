"""The replication wire protocol, sans-IO: bytes in, events out; events in, bytes out.

A ``Connection`` holds one side's state and never touches a socket (like h11): feed it what
the socket read with ``receive_data`` (``b""`` at end of stream), pull ``next_event()``
until it returns ``None`` (it needs more data), and write whatever ``send(event)`` returns.

This module is the state machine and the public entry: the events and their frames live in
protocol_frames.py, the per-op field codec in protocol_opcodec.py, and their names are
re-exported here, so other code imports from ``app.mirror.protocol`` only.

Handshake (mutual, both sides symmetric): each side sends ``Hello`` (version, role, cluster
name, node name, a 32-byte random nonce); when it has the peer's Hello it sends
``HelloAuth`` = HMAC-SHA256(cluster key, label, sender role, cluster, sender, receiver,
sender nonce, receiver nonce). The proof binds both nonces in sender order, so a replayed
or reflected proof fails. A connection is ``authenticated`` once it sent its proof and
verified the peer's; before that a Request, Ack, Nack, Ping or Pong in either direction is
a ``ProtocolError``/``AuthError``: a host without the key gets nothing applied.

Only the PRIMARY sends Requests and only the SECONDARY answers them (Ack/Nack). Ids are
tracked: a duplicate in-flight id or an answer to an id nobody asked is a ProtocolError.
Ping/Pong go either way.

Resync frames (reintegration, see resync.py): only the PRIMARY (the resync source) sends
``ResyncQuery`` and ``ResyncDone``; only the SECONDARY answers them with ``ResyncReply``.
They share the id space and tracking rules of Requests and need an authenticated connection.

Copies: a frame is decoded from a view of the receive buffer; the event holds copies only,
and the view is released before the buffer shrinks.

Errors (see errors.py): any input either yields events or raises ``ProtocolError`` (``AuthError``
for the handshake); after one, the connection stays broken. Sending an event the state does
not allow, or a field out of range, raises ``ProtocolError`` too.

Limits: one op per frame (a WriteV is one op); frames up to MAX_FRAME (a 16 MiB write plus
headers); no compression, no encryption (the channel may add TLS underneath); version 1 only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

from app.mirror.errors import AuthError, ProtocolError
from app.mirror.protocol_frames import _HEADER, _name_ok
from app.mirror.protocol_frames import ACK as ACK
from app.mirror.protocol_frames import HEADER_SIZE as HEADER_SIZE
from app.mirror.protocol_frames import HELLO as HELLO
from app.mirror.protocol_frames import HELLO_AUTH as HELLO_AUTH
from app.mirror.protocol_frames import MAC_SIZE as MAC_SIZE
from app.mirror.protocol_frames import MAGIC as MAGIC
from app.mirror.protocol_frames import MAX_FRAME as MAX_FRAME
from app.mirror.protocol_frames import MAX_MESSAGE as MAX_MESSAGE
from app.mirror.protocol_frames import NACK as NACK
from app.mirror.protocol_frames import NONCE_SIZE as NONCE_SIZE
from app.mirror.protocol_frames import PING as PING
from app.mirror.protocol_frames import PONG as PONG
from app.mirror.protocol_frames import PROTOCOL_VERSION as PROTOCOL_VERSION
from app.mirror.protocol_frames import REQUEST as REQUEST
from app.mirror.protocol_frames import RESYNC_DONE as RESYNC_DONE
from app.mirror.protocol_frames import RESYNC_QUERY as RESYNC_QUERY
from app.mirror.protocol_frames import RESYNC_REPLY as RESYNC_REPLY
from app.mirror.protocol_frames import Ack as Ack
from app.mirror.protocol_frames import ConnectionClosed as ConnectionClosed
from app.mirror.protocol_frames import Event as Event
from app.mirror.protocol_frames import Hello as Hello
from app.mirror.protocol_frames import HelloAuth as HelloAuth
from app.mirror.protocol_frames import Nack as Nack
from app.mirror.protocol_frames import Ping as Ping
from app.mirror.protocol_frames import Pong as Pong
from app.mirror.protocol_frames import Request as Request
from app.mirror.protocol_frames import ResyncDone as ResyncDone
from app.mirror.protocol_frames import ResyncQuery as ResyncQuery
from app.mirror.protocol_frames import ResyncReply as ResyncReply
from app.mirror.protocol_frames import Role as Role
from app.mirror.protocol_frames import decode_frame as decode_frame
from app.mirror.protocol_frames import encode_event as encode_event
from app.mirror.protocol_opcodec import _U32
from app.mirror.protocol_opcodec import BOOL as BOOL
from app.mirror.protocol_opcodec import DATA as DATA
from app.mirror.protocol_opcodec import FH as FH
from app.mirror.protocol_opcodec import FH_OR_PATH as FH_OR_PATH
from app.mirror.protocol_opcodec import ID as ID
from app.mirror.protocol_opcodec import MAX_DATA as MAX_DATA
from app.mirror.protocol_opcodec import MAX_PARTS as MAX_PARTS
from app.mirror.protocol_opcodec import MAX_PATH as MAX_PATH
from app.mirror.protocol_opcodec import MAX_XATTR_VALUE as MAX_XATTR_VALUE
from app.mirror.protocol_opcodec import NAME_MAX as NAME_MAX
from app.mirror.protocol_opcodec import NS as NS
from app.mirror.protocol_opcodec import OFF as OFF
from app.mirror.protocol_opcodec import OP_CODES as OP_CODES
from app.mirror.protocol_opcodec import PARTS as PARTS
from app.mirror.protocol_opcodec import PATH as PATH
from app.mirror.protocol_opcodec import TARGET as TARGET
from app.mirror.protocol_opcodec import U32 as U32
from app.mirror.protocol_opcodec import XNAME as XNAME
from app.mirror.protocol_opcodec import XVALUE as XVALUE
from app.mirror.protocol_opcodec import decode_op as decode_op
from app.mirror.protocol_opcodec import encode_op as encode_op
from app.mirror.protocol_opcodec import path_problem as path_problem

MIN_KEY_SIZE: Final = 16


def auth_mac(
    key: bytes,
    sender_role: Role,
    cluster: str,
    sender: str,
    receiver: str,
    sender_nonce: bytes,
    receiver_nonce: bytes,
) -> bytes:
    """The HelloAuth proof a sender gives; exposed for tests and tools."""
    parts = [b"mirrorha-hello-auth-v1", bytes([PROTOCOL_VERSION, sender_role])]
    for name in (cluster, sender, receiver):
        raw = name.encode("utf-8")
        parts.append(bytes([len(raw)]) + raw)
    parts += [sender_nonce, receiver_nonce]
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


# -------------------------------------------------------------------------- connection


class Connection:
    """One side of a replication connection: handshake state, in-flight ids, framing.

    ``role`` is this side's. ``peer``, when given, is the node name the peer must announce.
    ``nonce`` is injected by tests; the default is ``os.urandom``.
    """

    def __init__(
        self,
        role: Role,
        *,
        cluster: str,
        node: str,
        key: bytes,
        peer: str | None = None,
        nonce: bytes | None = None,
    ) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_SIZE:
            raise AuthError(f"the cluster key must be at least {MIN_KEY_SIZE} bytes")
        if not _name_ok(cluster) or not _name_ok(node):
            raise ProtocolError(f"cluster and node names must be 1 to {NAME_MAX} UTF-8 bytes")
        self.role = role
        self.cluster = cluster
        self.node = node
        self.expected_peer = peer
        self._key = key
        self._nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        if len(self._nonce) != NONCE_SIZE:
            raise ProtocolError(f"nonce must be {NONCE_SIZE} bytes")
        self._buf = bytearray()
        self._eof = False
        self._broken: str | None = None
        self._sent_hello = False
        self._sent_auth = False
        self._peer_hello: Hello | None = None
        self._peer_verified = False
        # ids of the Requests / Pings we sent and await an answer for, and of those we
        # received and must answer
        self._out_requests: set[int] = set()
        self._out_pings: set[int] = set()
        self._in_requests: set[int] = set()
        self._in_pings: set[int] = set()
        self._authenticated = False  # both proofs done: see ``authenticated``
        # ids of resync queries/dones we sent (primary) / received (secondary), unanswered
        self._q_out: set[int] = set()
        self._q_in: set[int] = set()

    # -- state ----------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """True once we sent our proof and verified the peer's."""
        return self._authenticated

    @property
    def peer_node(self) -> str | None:
        return None if self._peer_hello is None else self._peer_hello.node

    @property
    def awaiting(self) -> frozenset[int]:
        """Ids of the Requests we sent that the peer has not answered yet."""
        return frozenset(self._out_requests)

    def hello(self) -> Hello:
        """This side's Hello event, to pass to ``send``."""
        return Hello(PROTOCOL_VERSION, self.role, self.cluster, self.node, self._nonce)

    def auth(self) -> HelloAuth:
        """This side's proof of the key, once the peer's Hello arrived."""
        peer = self._peer_hello
        if peer is None:
            raise ProtocolError("no proof before the peer's Hello")
        mac = auth_mac(
            self._key, self.role, self.cluster, self.node, peer.node, self._nonce, peer.nonce
        )
        return HelloAuth(mac)

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the socket; ``b""`` means the peer closed the stream."""
        self._check_alive()
        if self._eof:
            raise ProtocolError("data after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | None:
        """The next complete event, or None when more data is needed."""
        self._check_alive()
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._broken = str(exc)
            raise

    def _next_event(self) -> Event | None:
        buf = self._buf
        if len(buf) < 4:
            if self._eof:
                if buf:
                    raise ProtocolError("stream closed in the middle of a frame header")
                return ConnectionClosed()
            return None
        (length,) = _U32.unpack_from(buf)
        if length < 9 or length > MAX_FRAME:
            raise ProtocolError(f"frame length {length} outside [9, {MAX_FRAME}]")
        if len(buf) < 4 + length:
            if self._eof:
                raise ProtocolError("stream closed in the middle of a frame")
            return None
        _, kind, ident = _HEADER.unpack_from(buf)
        # decode from a view of the buffer: the op's data is copied once, into the event;
        # the views are released before the buffer shrinks (a live view forbids resizing)
        with memoryview(buf) as view, view[HEADER_SIZE : 4 + length] as payload:
            event = decode_frame(kind, ident, payload)
        del buf[: 4 + length]
        self._on_receive(event)
        return event

    def _on_receive(self, event: Event) -> None:
        if isinstance(event, Request):  # the hot path first: a replicated op, then its answer
            self._require_auth(event)
            if self.role is not Role.SECONDARY:
                raise ProtocolError("the secondary sent a Request")
            self._take_new(self._in_requests, event.id)
            return
        if isinstance(event, Ack):
            self._require_auth(event)
            self._answered(self._out_requests, event)
            return
        match event:
            case Hello():
                self._receive_hello(event)
            case HelloAuth(mac=mac):
                if self._peer_hello is None or not self._sent_hello or self._peer_verified:
                    raise ProtocolError("HelloAuth out of order")
                peer = self._peer_hello
                expected = auth_mac(
                    self._key,
                    peer.role,
                    self.cluster,
                    peer.node,
                    self.node,
                    peer.nonce,
                    self._nonce,
                )
                if not hmac.compare_digest(mac, expected):
                    raise AuthError(f"peer {peer.node!r} failed to prove the cluster key")
                self._peer_verified = True
                self._authenticated = self._sent_auth
            case Ping(id=ident):
                self._require_auth(event)
                self._take_new(self._in_pings, ident)
            case Nack():
                self._require_auth(event)
                self._answered(self._out_requests, event)
            case Pong():
                self._require_auth(event)
                self._answered(self._out_pings, event)
            case ResyncQuery(id=ident) | ResyncDone(id=ident):
                self._require_auth(event)
                if self.role is not Role.SECONDARY:
                    raise ProtocolError(f"the secondary sent a {type(event).__name__}")
                if ident in self._q_in:
                    raise ProtocolError(f"resync id {ident} is already in flight")
                self._q_in.add(ident)
            case ResyncReply(id=ident):
                self._require_auth(event)
                if ident not in self._q_out:
                    raise ProtocolError(f"ResyncReply for unknown id {ident}")
                self._q_out.discard(ident)

    def _receive_hello(self, hello: Hello) -> None:
        if self._peer_hello is not None:
            raise ProtocolError("second Hello")
        if hello.cluster != self.cluster:
            raise AuthError(f"peer belongs to cluster {hello.cluster!r}, not {self.cluster!r}")
        if hello.role == self.role:
            raise ProtocolError(f"both sides claim the role {self.role.name}")
        if hello.node == self.node:
            raise ProtocolError(f"peer uses our own node name {self.node!r}")
        if self.expected_peer is not None and hello.node != self.expected_peer:
            raise AuthError(f"peer is {hello.node!r}, expected {self.expected_peer!r}")
        if hmac.compare_digest(hello.nonce, self._nonce):
            raise AuthError("peer echoed our nonce")
        self._peer_hello = hello

    def _require_auth(self, event: Event) -> None:
        if not self._authenticated:
            raise AuthError(f"{type(event).__name__} before authentication")

    @staticmethod
    def _take_new(ids: set[int], ident: int) -> None:
        """Record an id now in flight; a duplicate is a ProtocolError."""
        if ident in ids:
            raise ProtocolError(f"id {ident} is already in flight")
        ids.add(ident)

    @staticmethod
    def _answered(ids: set[int], event: Ack | Nack | Pong) -> None:
        """An answer from the peer: its id must be one we sent and still await."""
        try:
            ids.remove(event.id)
        except KeyError:
            raise ProtocolError(f"{type(event).__name__} for unknown id {event.id}") from None

    @staticmethod
    def _answering(ids: set[int], event: Ack | Nack | Pong) -> None:
        """An answer we send: its id must be one the peer sent and still awaits."""
        try:
            ids.remove(event.id)
        except KeyError:
            raise ProtocolError(f"{type(event).__name__} for an id never received") from None

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise ProtocolError(f"connection already failed: {self._broken}")

    # -- sending --------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; ProtocolError if this side may not send it now."""
        self._check_alive()
        data = encode_event(event)  # validates fields before any state change
        if isinstance(event, Request):  # the hot path first: a replicated op, then its answer
            self._require_auth(event)
            if self.role is not Role.PRIMARY:
                raise ProtocolError("only the primary sends Requests")
            self._take_new(self._out_requests, event.id)
            return data
        if isinstance(event, Ack):
            self._require_auth(event)
            self._answering(self._in_requests, event)
            return data
        match event:
            case Hello():
                if self._sent_hello or event != self.hello():
                    raise ProtocolError("send this side's own Hello, once")
                self._sent_hello = True
            case HelloAuth():
                if self._peer_hello is None or not self._sent_hello or self._sent_auth:
                    raise ProtocolError("HelloAuth goes after both Hellos, once")
                self._sent_auth = True
                self._authenticated = self._peer_verified
            case Ping(id=ident):
                self._require_auth(event)
                self._take_new(self._out_pings, ident)
            case Nack():
                self._require_auth(event)
                self._answering(self._in_requests, event)
            case Pong():
                self._require_auth(event)
                self._answering(self._in_pings, event)
            case ResyncQuery(id=ident) | ResyncDone(id=ident):
                self._require_auth(event)
                if self.role is not Role.PRIMARY:
                    raise ProtocolError("only the primary sends resync queries")
                if ident in self._q_out:
                    raise ProtocolError(f"resync id {ident} is already in flight")
                self._q_out.add(ident)
            case ResyncReply(id=ident):
                self._require_auth(event)
                if ident not in self._q_in:
                    raise ProtocolError("ResyncReply for an id never received")
                self._q_in.discard(ident)
        return data
