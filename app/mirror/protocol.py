"""The replication wire protocol, sans-IO: bytes in, events out; events in, bytes out.

A ``Connection`` holds one side's state and never touches a socket (like h11): feed it what
the socket read with ``receive_data`` (``b""`` at end of stream), pull ``next_event()``
until it returns ``None`` (it needs more data), and write whatever ``send(event)`` returns.

Frame (all integers big-endian)::

    u32 length   bytes after this field: 1 + 8 + len(payload), at most MAX_FRAME
    u8  type     HELLO 0x01, HELLO_AUTH 0x02, REQUEST 0x10, ACK 0x11, NACK 0x12,
                 PING 0x20, PONG 0x21; RESYNC_QUERY 0x30, RESYNC_REPLY 0x31,
                 RESYNC_DONE 0x32 (0x33-0x3f stay reserved for resync frames)
    u64 id       request id (Request/Ack/Nack, Ping/Pong); 0 in the handshake
    payload      per type; a REQUEST payload is a u8 op code followed by the op's fields
                 (WriteV, code 20: fh, a u32 count of at most MAX_PARTS, then per part an
                 i64 offset, a u32 length and the data; all parts at most MAX_DATA bytes)

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
``ResyncQuery`` (u8 kind, u16 path length, path, u64 offset, u32 count) and ``ResyncDone``
(empty); only the SECONDARY answers them with ``ResyncReply`` (u32 status: 0 or an errno,
then an opaque body of at most MAX_DATA bytes that resync.py decodes and validates). They
share the id space and tracking rules of Requests and need an authenticated connection.

Decoding validates everything it can without the filesystem: lengths, ranges, bools, paths
(relative, no NUL, no empty/"."/".." components, at most MAX_PATH bytes and NAME_MAX per
component; ``b""`` is the root). Symlink targets are data: any non-empty bytes without NUL.

Copies (the hot path is a Write of up to MAX_DATA bytes): encoding copies the data once, into
the frame; decoding reads a frame through a view of the receive buffer and copies each field
it keeps once, into the event (events never hold views, so the buffer can shrink).

Errors (see errors.py): any input either yields events or raises ``ProtocolError`` (``AuthError``
for the handshake); after one, the connection stays broken. Sending an event the state does
not allow, or a field out of range, raises ``ProtocolError`` too.

Limits: one op per frame (a WriteV is one op); frames up to MAX_FRAME (a 16 MiB write plus
headers); no compression, no encryption (the channel may add TLS underneath); version 1 only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final

from app.mirror import ops
from app.mirror.errors import AuthError, ProtocolError
from app.mirror.ops import Op

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"MHA\x00"
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
MIN_KEY_SIZE: Final = 16
MAX_DATA: Final = 16 * 1024 * 1024
MAX_PATH: Final = 4096
NAME_MAX: Final = 255
MAX_XATTR_VALUE: Final = 64 * 1024
MAX_MESSAGE: Final = 1024
_HEADER: Final = struct.Struct(">IBQ")
HEADER_SIZE: Final = _HEADER.size
MAX_FRAME: Final = MAX_DATA + 64 * 1024 + 9  # length field value: type + id + payload

_U64_MAX: Final = 2**64 - 1
_I64_MAX: Final = 2**63 - 1
_I64_MIN: Final = -(2**63)
_U32_MAX: Final = 2**32 - 1


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


# ---------------------------------------------------------------------------- validation


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a valid replicated path, or None when it is (``b""`` is the root)."""
    if not isinstance(path, bytes):
        return "path is not bytes"
    if len(path) > MAX_PATH:
        return f"path longer than {MAX_PATH} bytes"
    if path == b"":
        return None
    if b"\x00" in path:
        return "path contains NUL"
    if path.startswith(b"/"):
        return "path is absolute"
    for part in path.split(b"/"):
        if part == b"":
            return "path has an empty component"
        if part in (b".", b".."):
            return "path has a '.' or '..' component"
        if len(part) > NAME_MAX:
            return f"path component longer than {NAME_MAX} bytes"
    return None


def _target_problem(target: object) -> str | None:
    if not isinstance(target, bytes):
        return "symlink target is not bytes"
    if not 0 < len(target) <= MAX_PATH:
        return f"symlink target must be 1 to {MAX_PATH} bytes"
    if b"\x00" in target:
        return "symlink target contains NUL"
    return None


def _xname_problem(name: object) -> str | None:
    if not isinstance(name, bytes):
        return "xattr name is not bytes"
    if not 0 < len(name) <= NAME_MAX:
        return f"xattr name must be 1 to {NAME_MAX} bytes"
    if b"\x00" in name:
        return "xattr name contains NUL"
    return None


# ----------------------------------------------------------------------------- op codec


class _Reader:
    """Reads fields from a payload without copying: ``take`` returns a view into it, and
    a caller that keeps a field makes it ``bytes`` (``take_bytes``), so no view outlives
    the decode (the receive buffer can then be resized)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolError("payload truncated")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def take_bytes(self, n: int) -> bytes:
        return bytes(self.take(n))

    def unpack(self, fmt: struct.Struct) -> Any:
        end = self.pos + fmt.size
        if end > len(self.buf):
            raise ProtocolError("payload truncated")
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos = end
        return value

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(f"{len(self.buf) - self.pos} trailing bytes in payload")


_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U8 = struct.Struct(">B")


@dataclass(frozen=True)
class _Kind:
    """How one op field is encoded and what values it accepts."""

    name: str
    encode: Callable[[Any], tuple[bytes, ...]]
    decode: Callable[[_Reader], Any]
    problem: Callable[[Any], str | None]


def _int_problem(lo: int, hi: int) -> Callable[[Any], str | None]:
    def problem(value: Any) -> str | None:
        if type(value) is not int:
            return "not an int"
        if not lo <= value <= hi:
            return f"{value} not in [{lo}, {hi}]"
        return None

    return problem


def _int_kind(name: str, fmt: struct.Struct, lo: int, hi: int) -> _Kind:
    return _Kind(name, lambda v: (fmt.pack(v),), lambda r: r.unpack(fmt), _int_problem(lo, hi))


def _blob_kind(
    name: str, fmt: struct.Struct, limit: int, check: Callable[[Any], str | None]
) -> _Kind:
    def problem(value: Any) -> str | None:
        if not isinstance(value, bytes):
            return "not bytes"
        if len(value) > limit:
            return f"longer than {limit} bytes"
        return check(value)

    def encode(value: bytes) -> tuple[bytes, ...]:
        return (fmt.pack(len(value)), value)

    def decode(r: _Reader) -> bytes:
        return r.take_bytes(r.unpack(fmt))

    return _Kind(name, encode, decode, problem)


def _bool_problem(value: Any) -> str | None:
    return None if type(value) is bool else "not a bool"


def _bool_decode(r: _Reader) -> bool:
    raw = r.unpack(_U8)
    if raw > 1:
        raise ProtocolError(f"bool field is {raw}")
    return bool(raw)


FH = _int_kind("fh", _I64, 0, _I64_MAX)
FH_OR_PATH = _int_kind("fh or -1", _I64, -1, _I64_MAX)
OFF = _int_kind("offset", _I64, 0, _I64_MAX)
NS = _int_kind("nanoseconds", _I64, _I64_MIN, _I64_MAX)
ID = _int_kind("uid/gid", _I64, -1, _U32_MAX)
U32 = _int_kind("u32", _U32, 0, _U32_MAX)
BOOL = _Kind("bool", lambda v: (_U8.pack(int(v)),), _bool_decode, _bool_problem)
PATH = _blob_kind("path", _U16, MAX_PATH, path_problem)
TARGET = _blob_kind("symlink target", _U16, MAX_PATH, _target_problem)
DATA = _blob_kind("data", _U32, MAX_DATA, lambda v: None)
XNAME = _blob_kind("xattr name", _U8, NAME_MAX, _xname_problem)
_PART = struct.Struct(">qI")  # a WriteV part: offset, length, then the data
MAX_PARTS: Final = 4096


def _parts_problem(value: Any) -> str | None:
    if not isinstance(value, tuple) or len(value) > MAX_PARTS:
        return f"not a tuple of at most {MAX_PARTS} parts"
    total = 0
    for part in value:
        if not (isinstance(part, tuple) and len(part) == 2):
            return "a part is not an (offset, data) pair"
        offset, data = part
        if type(offset) is not int or not isinstance(data, bytes):
            return "a part is not an (int, bytes) pair"
        if not 0 <= offset <= _I64_MAX - len(data):
            return f"part offset {offset} out of range"
        total += len(data)
    return None if total <= MAX_DATA else f"more than {MAX_DATA} bytes of data"


def _parts_encode(value: Any) -> tuple[bytes, ...]:
    out: list[bytes] = [_U32.pack(len(value))]
    for offset, data in value:
        out += (_PART.pack(offset, len(data)), data)
    return tuple(out)


def _parts_decode(r: _Reader) -> Any:
    n = r.unpack(_U32)
    if n > MAX_PARTS:
        raise ProtocolError(f"WriteV with {n} parts (at most {MAX_PARTS})")
    out = []
    for _ in range(n):
        offset, length = _PART.unpack(r.take(_PART.size))
        out.append((offset, r.take_bytes(length)))
    return tuple(out)


PARTS = _Kind("parts", _parts_encode, _parts_decode, _parts_problem)
XVALUE = _blob_kind("xattr value", _U32, MAX_XATTR_VALUE, lambda v: None)

# op code -> (op class, field kinds in dataclass field order). Codes are forever.
OP_CODES: Final[dict[int, tuple[type[Op], tuple[_Kind, ...]]]] = {
    1: (ops.Open, (FH, PATH)),
    2: (ops.Create, (FH, PATH, U32, ID, ID, BOOL)),
    3: (ops.Release, (FH,)),
    4: (ops.Write, (FH, OFF, DATA)),
    5: (ops.Truncate, (FH_OR_PATH, PATH, OFF)),
    6: (ops.Fallocate, (FH, U32, OFF, OFF)),
    7: (ops.Fsync, (FH_OR_PATH, PATH, BOOL)),
    8: (ops.Mknod, (PATH, U32, ID, ID)),
    9: (ops.Mkdir, (PATH, U32, ID, ID)),
    10: (ops.Unlink, (PATH,)),
    11: (ops.Rmdir, (PATH,)),
    12: (ops.Rename, (PATH, PATH, U32)),
    13: (ops.Link, (PATH, PATH)),
    14: (ops.Symlink, (TARGET, PATH, ID, ID)),
    15: (ops.Chmod, (PATH, U32)),
    16: (ops.Chown, (PATH, ID, ID)),
    17: (ops.Utimens, (PATH, NS, NS)),
    18: (ops.SetXattr, (PATH, XNAME, XVALUE, U32)),
    19: (ops.RemoveXattr, (PATH, XNAME)),
    20: (ops.WriteV, (FH, PARTS)),
}
_CODE_OF: Final[dict[type[Op], int]] = {cls: code for code, (cls, _) in OP_CODES.items()}
assert set(_CODE_OF) == set(ops.ALL_OPS), "every op needs a code"
# op class -> (code, ((field name, kind), ...)): dataclasses.fields() once, not per frame
_LAYOUT: Final[dict[type[Op], tuple[int, tuple[tuple[str, _Kind], ...]]]] = {
    cls: (code, tuple((f.name, k) for f, k in zip(fields(cls), kinds, strict=True)))
    for code, (cls, kinds) in OP_CODES.items()
}


def encode_op(op: Op) -> bytes:
    """The REQUEST payload for ``op``; ProtocolError when a field is out of range."""
    return b"".join(_op_parts(op))


def _op_parts(op: Op) -> list[bytes]:
    """The REQUEST payload for ``op`` as buffers to join (data fields are not copied)."""
    layout = _LAYOUT.get(type(op))
    if layout is None:
        raise ProtocolError(f"not an op: {type(op).__name__}")
    code, named = layout
    out = [_U8.pack(code)]
    for name, kind in named:
        value = getattr(op, name)
        problem = kind.problem(value)
        if problem is not None:
            raise ProtocolError(f"{type(op).__name__}.{name}: {problem}")
        out += kind.encode(value)
    return out


def decode_op(payload: bytes | memoryview) -> Op:
    """The op in a REQUEST payload; ProtocolError for anything malformed or out of range."""
    r = _Reader(payload)
    code = r.unpack(_U8)
    entry = OP_CODES.get(code)
    if entry is None:
        raise ProtocolError(f"unknown op code {code}")
    cls = entry[0]
    values = []
    for name, kind in _LAYOUT[cls][1]:
        value = kind.decode(r)
        problem = kind.problem(value)
        if problem is not None:
            raise ProtocolError(f"{cls.__name__}.{name}: {problem}")
        values.append(value)
    r.end()
    return cls(*values)


# ------------------------------------------------------------------------- frame codec


def _frame(kind: int, ident: int, payload: bytes = b"") -> bytes:
    return _frame_of(kind, ident, [payload])


def _frame_of(kind: int, ident: int, parts: list[bytes]) -> bytes:
    """A frame whose payload is ``parts`` joined: each part is copied once, into the frame."""
    if not 0 <= ident <= _U64_MAX:
        raise ProtocolError(f"id {ident} does not fit in u64")
    size = sum(len(part) for part in parts)
    return b"".join([_HEADER.pack(9 + size, kind, ident), *parts])


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
    if kind == HELLO:
        if ident != 0:
            raise ProtocolError("Hello with a non-zero id")
        return _decode_hello(payload)
    if kind == HELLO_AUTH:
        if ident != 0 or len(payload) != MAC_SIZE:
            raise ProtocolError("malformed HelloAuth")
        return HelloAuth(bytes(payload))
    if kind == REQUEST:
        return Request(ident, decode_op(payload))
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
    simple: dict[int, type[Ack | Ping | Pong | ResyncDone]] = {
        ACK: Ack,
        PING: Ping,
        PONG: Pong,
        RESYNC_DONE: ResyncDone,
    }
    cls = simple.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown frame type 0x{kind:02x}")
    if payload:
        raise ProtocolError(f"{cls.__name__} frame with a payload")
    return cls(ident)


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
        # (is_ping, id) of what we sent and await an answer for / received and must answer
        self._out_pending: set[tuple[bool, int]] = set()
        self._in_pending: set[tuple[bool, int]] = set()
        # ids of resync queries/dones we sent (primary) / received (secondary), unanswered
        self._q_out: set[int] = set()
        self._q_in: set[int] = set()

    # -- state ----------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """True once we sent our proof and verified the peer's."""
        return self._sent_auth and self._peer_verified

    @property
    def peer_node(self) -> str | None:
        return None if self._peer_hello is None else self._peer_hello.node

    @property
    def awaiting(self) -> frozenset[int]:
        """Ids of the Requests we sent that the peer has not answered yet."""
        return frozenset(ident for is_ping, ident in self._out_pending if not is_ping)

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
            case Request(id=ident) | Ping(id=ident):
                self._require_auth(event)
                if isinstance(event, Request) and self.role is not Role.SECONDARY:
                    raise ProtocolError("the secondary sent a Request")
                key = (isinstance(event, Ping), ident)
                if key in self._in_pending:
                    raise ProtocolError(f"id {ident} is already in flight")
                self._in_pending.add(key)
            case Ack(id=ident) | Nack(id=ident) | Pong(id=ident):
                self._require_auth(event)
                key = (isinstance(event, Pong), ident)
                if key not in self._out_pending:
                    raise ProtocolError(f"{type(event).__name__} for unknown id {ident}")
                self._out_pending.discard(key)
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
        if not self.authenticated:
            raise AuthError(f"{type(event).__name__} before authentication")

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise ProtocolError(f"connection already failed: {self._broken}")

    # -- sending --------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; ProtocolError if this side may not send it now."""
        self._check_alive()
        data = encode_event(event)  # validates fields before any state change
        match event:
            case Hello():
                if self._sent_hello or event != self.hello():
                    raise ProtocolError("send this side's own Hello, once")
                self._sent_hello = True
            case HelloAuth():
                if self._peer_hello is None or not self._sent_hello or self._sent_auth:
                    raise ProtocolError("HelloAuth goes after both Hellos, once")
                self._sent_auth = True
            case Request(id=ident) | Ping(id=ident):
                self._require_auth(event)
                if isinstance(event, Request) and self.role is not Role.PRIMARY:
                    raise ProtocolError("only the primary sends Requests")
                key = (isinstance(event, Ping), ident)
                if key in self._out_pending:
                    raise ProtocolError(f"id {ident} is already in flight")
                self._out_pending.add(key)
            case Ack(id=ident) | Nack(id=ident) | Pong(id=ident):
                self._require_auth(event)
                key = (isinstance(event, Pong), ident)
                if key not in self._in_pending:
                    raise ProtocolError(f"{type(event).__name__} for an id never received")
                self._in_pending.discard(key)
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
