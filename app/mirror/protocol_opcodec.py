"""The replication op codec, sans-IO: one ``Op`` to a REQUEST payload and back.

A REQUEST payload (see protocol_frames.py for the frame around it) is a u8 op code followed
by the op's fields in dataclass field order, all integers big-endian. ``OP_CODES`` maps each
code (codes are forever) to the op class and one field kind per field: how the field is
encoded and what values it accepts. WriteV, code 20: fh, a u32 count of at most MAX_PARTS,
then per part an i64 offset, a u32 length and the data; all parts at most MAX_DATA bytes.

Decoding validates everything it can without the filesystem: lengths, ranges, bools, paths
(relative, no NUL, no empty/"."/".." components, at most MAX_PATH bytes and NAME_MAX per
component; ``b""`` is the root). Symlink targets are data: any non-empty bytes without NUL.

Copies (the hot path is a Write of up to MAX_DATA bytes): ``_op_parts`` gives the payload as
buffers to join, so the data is copied once, into the frame; decoding reads the payload
through a view and copies each field it keeps once, into the op.

Errors (see errors.py): any payload either yields an op or raises ``ProtocolError``; encoding
an op with a field out of range raises ``ProtocolError`` too.

Limits: one op per frame (a WriteV is one op).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final

from app.mirror import ops
from app.mirror.errors import ProtocolError
from app.mirror.ops import Op

MAX_DATA: Final = 16 * 1024 * 1024
MAX_PATH: Final = 4096
NAME_MAX: Final = 255
MAX_XATTR_VALUE: Final = 64 * 1024

_I64_MAX: Final = 2**63 - 1
_I64_MIN: Final = -(2**63)
_U32_MAX: Final = 2**32 - 1


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


# The hot ops, Write and Fsync by handle, have a layout of their own: one struct call each way
# instead of the per-field table walk (the same bytes; anything the fast path does not take
# falls through to the table, which raises the precise error).
_WRITE_HEAD: Final = struct.Struct(">BqqI")  # code 4, fh, offset, data length
_FSYNC_FH: Final = struct.Struct(">BqHB")  # code 7, fh, path length 0, datasync
_WRITE_CODE: Final = 4
_FSYNC_CODE: Final = 7


def encode_op(op: Op) -> bytes:
    """The REQUEST payload for ``op``; ProtocolError when a field is out of range."""
    return b"".join(_op_parts(op))


def _op_parts(op: Op) -> list[bytes]:
    """The REQUEST payload for ``op`` as buffers to join (data fields are not copied)."""
    if isinstance(op, ops.Write):
        fh, offset, data = op.fh, op.offset, op.data
        if (
            type(fh) is int
            and type(offset) is int
            and type(data) is bytes
            and 0 <= fh <= _I64_MAX
            and 0 <= offset <= _I64_MAX
            and len(data) <= MAX_DATA
        ):
            return [_WRITE_HEAD.pack(_WRITE_CODE, fh, offset, len(data)), data]
    elif isinstance(op, ops.Fsync):
        fh, path, datasync = op.fh, op.path, op.datasync
        if type(fh) is int and 0 <= fh <= _I64_MAX and path == b"" and type(datasync) is bool:
            return [_FSYNC_FH.pack(_FSYNC_CODE, fh, 0, datasync)]
    return _table_parts(op)


def _table_parts(op: Op) -> list[bytes]:
    """``_op_parts`` by the per-field table (every op; the hot ones give the same bytes)."""
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
    size = len(payload)
    if size >= _WRITE_HEAD.size and payload[0] == _WRITE_CODE:
        _, fh, offset, length = _WRITE_HEAD.unpack_from(payload)
        if fh >= 0 and offset >= 0 and length == size - _WRITE_HEAD.size and length <= MAX_DATA:
            return ops.Write(fh, offset, bytes(payload[_WRITE_HEAD.size :]))
    elif size == _FSYNC_FH.size and payload[0] == _FSYNC_CODE:
        _, fh, plen, datasync = _FSYNC_FH.unpack_from(payload)
        if fh >= 0 and plen == 0 and datasync <= 1:
            return ops.Fsync(fh, b"", bool(datasync))
    return _table_decode(payload)


def _table_decode(payload: bytes | memoryview) -> Op:
    """``decode_op`` by the per-field table (every op, and every error message)."""
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
