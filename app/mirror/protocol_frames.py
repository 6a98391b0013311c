"""The replication frames, sans-IO: the events (frozen dataclasses) and their bytes.

``encode_event`` gives the frame for one event and ``decode_frame`` the event in one frame,
neither with any state check (``protocol.Connection`` does those).

Frame (all integers big-endian)::

    u32 length   bytes after this field: 1 + 8 + len(payload), at most MAX_FRAME
    u8  type     HELLO 0x01, HELLO_AUTH 0x02, REQUEST 0x10, ACK 0x11, NACK 0x12,
                 PING 0x20, PONG 0x21; RESYNC_QUERY 0x30, RESYNC_REPLY 0x31,
                 RESYNC_DONE 0x32 (0x33-0x3f stay reserved for resync frames)
    u64 id       request id (Request/Ack/Nack, Ping/Pong); 0 in the handshake
    payload      per type; a REQUEST payload is a u8 op code followed by the op's fields
                 (protocol_opcodec.py)

Resync frames (reintegration, see resync.py): ``ResyncQuery`` (u8 kind, u16 path length,
path, u64 offset, u32 count), ``ResyncDone`` (empty) and ``ResyncReply`` (u32 status: 0 or
an errno, then an opaque body of at most MAX_DATA bytes that resync.py decodes and
validates).

Copies: encoding copies each payload part once, into the frame; ``decode_frame`` may read
through a view of the receive buffer and copies each field it keeps once, into the event
(events never hold views, so the buffer can shrink).

Errors (see errors.py): any frame either yields an event or raises ``ProtocolError``;
encoding an event with a field out of range raises ``ProtocolError`` too.

Limits: frames up to MAX_FRAME (a 16 MiB write plus headers); version 1 only.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from app.mirror.errors import ProtocolError
from app.mirror.ops import Op
from app.mirror.protocol_opcodec import (
    _I64_MAX,
    _U8,
    _U16,
    _U32,
    _U32_MAX,
    MAX_DATA,
    NAME_MAX,
    _op_parts,
    _Reader,
    decode_op,
    path_problem,
)

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"MHA\x00"
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
MAX_MESSAGE: Final = 1024
_HEADER: Final = struct.Struct(">IBQ")
HEADER_SIZE: Final = _HEADER.size
MAX_FRAME: Final = MAX_DATA + 64 * 1024 + 9  # length field value: type + id + payload

_U64_MAX: Final = 2**64 - 1


class Role(enum.IntEnum):
    PRIMARY = 1
    SECONDARY = 2


# ---------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    role: Role
    cluster: str
    node: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class HelloAuth:
    mac: bytes


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: Op


@dataclass(frozen=True, slots=True)
class Ack:
    id: int


@dataclass(frozen=True, slots=True)
class Nack:
    id: int
    errno: int
    message: str


@dataclass(frozen=True, slots=True)
class Ping:
    id: int


@dataclass(frozen=True, slots=True)
class Pong:
    id: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream cleanly (at a frame boundary)."""


@dataclass(frozen=True, slots=True)
class ResyncQuery:
    """The resync source asks the target something (``kind``: see resync.py's QUERY_*)."""

    id: int
    kind: int
    path: bytes
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class ResyncReply:
    """The target's answer to a ResyncQuery or ResyncDone: ``status`` 0 or an errno."""

    id: int
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class ResyncDone:
    """The source finished the resync: the target now holds the source's data."""

    id: int


Event = (
    Hello
    | HelloAuth
    | Request
    | Ack
    | Nack
    | Ping
    | Pong
    | ResyncQuery
    | ResyncReply
    | ResyncDone
    | ConnectionClosed
)

HELLO: Final = 0x01
HELLO_AUTH: Final = 0x02
REQUEST: Final = 0x10
ACK: Final = 0x11
NACK: Final = 0x12
PING: Final = 0x20
PONG: Final = 0x21
RESYNC_QUERY: Final = 0x30
RESYNC_REPLY: Final = 0x31
RESYNC_DONE: Final = 0x32
_RESYNC_QUERY_HEAD: Final = struct.Struct(">BH")
_RESYNC_QUERY_TAIL: Final = struct.Struct(">QI")


# frames whose payload is empty: the type and the id are the whole event
_SIMPLE: Final[dict[int, type[Ack | Ping | Pong | ResyncDone]]] = {
    ACK: Ack,
    PING: Ping,
    PONG: Pong,
    RESYNC_DONE: ResyncDone,
}

# ------------------------------------------------------------------------- frame codec


def _frame(kind: int, ident: int, payload: bytes = b"") -> bytes:
    return _frame_of(kind, ident, [payload])


def _frame_of(kind: int, ident: int, parts: list[bytes]) -> bytes:
    """A frame whose payload is ``parts`` joined: each part is copied once, into the frame."""
    if not 0 <= ident <= _U64_MAX:
        raise ProtocolError(f"id {ident} does not fit in u64")
    return b"".join([_HEADER.pack(9 + sum(map(len, parts)), kind, ident), *parts])


def _utf8(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _text(value: str, limit: int, what: str) -> bytes:
    raw = _utf8(value)
    if raw is None or len(raw) > limit:
        raise ProtocolError(f"{what} must be a str of at most {limit} UTF-8 bytes")
    return raw


def _read_text(r: _Reader, fmt: struct.Struct, what: str) -> str:
    raw = r.take(r.unpack(fmt))
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def _name_ok(name: object) -> bool:
    raw = _utf8(name)
    return raw is not None and 0 < len(raw) <= NAME_MAX


def _encode_hello(ev: Hello) -> bytes:
    if ev.version != PROTOCOL_VERSION or not isinstance(ev.role, Role):
        raise ProtocolError("Hello needs this protocol version and a Role")
    if not isinstance(ev.nonce, bytes) or len(ev.nonce) != NONCE_SIZE:
        raise ProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    cluster = _text(ev.cluster, NAME_MAX, "cluster name")
    node = _text(ev.node, NAME_MAX, "node name")
    if not cluster or not node:
        raise ProtocolError("empty cluster or node name")
    payload = (
        MAGIC
        + _U16.pack(ev.version)
        + _U8.pack(ev.role)
        + ev.nonce
        + _U8.pack(len(cluster))
        + cluster
        + _U8.pack(len(node))
        + node
    )
    return _frame(HELLO, 0, payload)


def _decode_hello(payload: bytes | memoryview) -> Hello:
    r = _Reader(payload)
    if r.take_bytes(len(MAGIC)) != MAGIC:
        raise ProtocolError("not a mirrorha peer (bad magic)")
    version = r.unpack(_U16)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}")
    raw_role = r.unpack(_U8)
    if raw_role not in (Role.PRIMARY, Role.SECONDARY):
        raise ProtocolError(f"unknown role {raw_role}")
    nonce = r.take_bytes(NONCE_SIZE)
    cluster = _read_text(r, _U8, "cluster name")
    node = _read_text(r, _U8, "node name")
    r.end()
    if not cluster or not node:
        raise ProtocolError("empty cluster or node name")
    return Hello(version, Role(raw_role), cluster, node, nonce)


def encode_event(event: Event) -> bytes:
    """Bytes for one event, without any state check (``Connection.send`` does those)."""
    if isinstance(event, Request):  # the hot path first: a replicated op, then its answer
        return _frame_of(REQUEST, event.id, _op_parts(event.op))
    if isinstance(event, Ack):
        return _frame(ACK, event.id)
    match event:
        case Hello():
            return _encode_hello(event)
        case HelloAuth(mac=mac):
            if not isinstance(mac, bytes) or len(mac) != MAC_SIZE:
                raise ProtocolError(f"HelloAuth mac must be {MAC_SIZE} bytes")
            return _frame(HELLO_AUTH, 0, mac)
        case Request(id=ident, op=op):
            return _frame_of(REQUEST, ident, _op_parts(op))
        case Ack(id=ident):
            return _frame(ACK, ident)
        case Nack(id=ident, errno=err, message=message):
            if type(err) is not int or not 0 < err <= _U32_MAX:
                raise ProtocolError(f"Nack errno {err!r} is not a positive u32")
            raw = _text(message, MAX_MESSAGE, "Nack message")
            return _frame(NACK, ident, _U32.pack(err) + _U16.pack(len(raw)) + raw)
        case Ping(id=ident):
            return _frame(PING, ident)
        case Pong(id=ident):
            return _frame(PONG, ident)
        case ResyncQuery(id=ident, kind=kind, path=path, offset=offset, count=count):
            if type(kind) is not int or not 0 <= kind <= 255:
                raise ProtocolError(f"ResyncQuery kind {kind!r} is not a u8")
            if (problem := path_problem(path)) is not None:
                raise ProtocolError(f"ResyncQuery path: {problem}")
            if type(offset) is not int or not 0 <= offset <= _I64_MAX:
                raise ProtocolError(f"ResyncQuery offset {offset!r} out of range")
            if type(count) is not int or not 0 <= count <= _U32_MAX:
                raise ProtocolError(f"ResyncQuery count {count!r} out of range")
            payload = (
                _RESYNC_QUERY_HEAD.pack(kind, len(path))
                + path
                + _RESYNC_QUERY_TAIL.pack(offset, count)
            )
            return _frame(RESYNC_QUERY, ident, payload)
        case ResyncReply(id=ident, status=status, body=body):
            if type(status) is not int or not 0 <= status <= _U32_MAX:
                raise ProtocolError(f"ResyncReply status {status!r} is not a u32")
            if not isinstance(body, bytes) or len(body) > MAX_DATA:
                raise ProtocolError(f"ResyncReply body must be bytes of at most {MAX_DATA}")
            return _frame(RESYNC_REPLY, ident, _U32.pack(status) + body)
        case ResyncDone(id=ident):
            return _frame(RESYNC_DONE, ident)
        case ConnectionClosed():
            raise ProtocolError("ConnectionClosed is not sent: close the socket instead")
    raise ProtocolError(f"not an event: {type(event).__name__}")


def decode_frame(kind: int, ident: int, payload: bytes | memoryview) -> Event:
    """One event from a frame's fields, without any state check.

    ``payload`` may be a view into the receive buffer: the event holds copies only.
    """
    if kind == REQUEST:  # the hot path first: a replicated op, then its answer
        return Request(ident, decode_op(payload))
    if kind == ACK:
        if payload:
            raise ProtocolError("Ack frame with a payload")
        return Ack(ident)
    if kind == HELLO:
        if ident != 0:
            raise ProtocolError("Hello with a non-zero id")
        return _decode_hello(payload)
    if kind == HELLO_AUTH:
        if ident != 0 or len(payload) != MAC_SIZE:
            raise ProtocolError("malformed HelloAuth")
        return HelloAuth(bytes(payload))
    if kind == NACK:
        r = _Reader(payload)
        err = r.unpack(_U32)
        message = _read_text(r, _U16, "Nack message")
        r.end()
        if err == 0 or len(message.encode()) > MAX_MESSAGE:
            raise ProtocolError("malformed Nack")
        return Nack(ident, err, message)
    if kind == RESYNC_QUERY:
        r = _Reader(payload)
        qkind, plen = _RESYNC_QUERY_HEAD.unpack(r.take(_RESYNC_QUERY_HEAD.size))
        path = r.take_bytes(plen)
        offset, count = _RESYNC_QUERY_TAIL.unpack(r.take(_RESYNC_QUERY_TAIL.size))
        r.end()
        if (problem := path_problem(path)) is not None:
            raise ProtocolError(f"ResyncQuery path: {problem}")
        if offset > _I64_MAX:
            raise ProtocolError("ResyncQuery offset out of range")
        return ResyncQuery(ident, qkind, path, offset, count)
    if kind == RESYNC_REPLY:
        if len(payload) < 4:
            raise ProtocolError("malformed ResyncReply")
        (status,) = _U32.unpack_from(payload)
        return ResyncReply(ident, status, bytes(payload[4:]))
    cls = _SIMPLE.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown frame type 0x{kind:02x}")
    if payload:
        raise ProtocolError(f"{cls.__name__} frame with a payload")
    return cls(ident)
