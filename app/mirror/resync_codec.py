"""Resync wire bodies: the query kinds and the sans-IO codecs of their bodies.

How it works
    The source asks with ``ResyncQuery`` frames (kinds ``QUERY_*`` below); the target answers
    with a ``ResyncReply`` whose body is encoded here: one entry (``Entry``, what one side
    knows of a directory entry) or none, a page of entries, block sums (per BLOCK-byte
    block: a "whole block is a hole" flag and a BLAKE2b-128 digest), or a side's activity
    log (``ActivityLog``). Numbers are big-endian, byte strings carry their length first.
    Resync handles use numbers from ``RESYNC_FH_BASE`` up, far from the FUSE layer's.

Exceptions (errors.py): ``ProtocolError`` for any malformed body (truncated, trailing
bytes, a bad entry name, a log path that is not a safe relative path, a bad hole flag).

Limits
    - An activity log whose body would pass MAX_DATA is sent as untrusted instead (which
      means a full resync); its reason is cut to 4096 bytes.
    - A directory is listed in pages of LIST_PAGE entries.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from app.mirror.errors import ProtocolError
from app.mirror.protocol import MAX_DATA

BLOCK: Final = 64 * 1024
DIGEST: Final = 16
LIST_PAGE: Final = 2048
RESYNC_FH_BASE: Final = 1 << 62

QUERY_BIND: Final = 1  # offset = dir index, count = number of dirs
QUERY_BEGIN: Final = 2  # offset = 1 for full; reply body = the target's activity log
QUERY_STAT: Final = 3  # reply body = u8 present + entry
QUERY_LIST: Final = 4  # offset = first index, count = max entries; reply = entries
QUERY_SUMS: Final = 5  # offset = first block, count = blocks; reply = (u8 hole, digest)*

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ENTRY = struct.Struct(">IIIQqqIQ")
_RANGE = struct.Struct(">QQ")


@dataclass(frozen=True, slots=True)
class Entry:
    """What one side knows of a directory entry (``name`` is the last component)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    nlink: int
    ino: int
    target: bytes = b""
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


@dataclass(frozen=True, slots=True)
class ActivityLog:
    """A side's record of what it changed (``present`` False: it never was primary)."""

    present: bool
    trusted: bool = True
    reason: str = ""
    files: tuple[tuple[bytes, tuple[tuple[int, int], ...]], ...] = ()
    namespace: tuple[bytes, ...] = ()
    metadata: tuple[bytes, ...] = ()


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError("resync body truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def num(self, fmt: struct.Struct) -> int:
        return int(fmt.unpack(self.take(fmt.size))[0])

    def blob(self, fmt: struct.Struct) -> bytes:
        return self.take(self.num(fmt))

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("trailing bytes in resync body")


def _blob(fmt: struct.Struct, b: bytes) -> bytes:
    return fmt.pack(len(b)) + b


def encode_entry(e: Entry) -> bytes:
    out = [
        _blob(_U16, e.name),
        _ENTRY.pack(e.mode, e.uid, e.gid, e.size, e.atime_ns, e.mtime_ns, e.nlink, e.ino),
        _blob(_U16, e.target),
        _U16.pack(len(e.xattrs)),
    ]
    for name, value in e.xattrs:
        out += [_blob(_U8, name), _blob(_U32, value)]
    return b"".join(out)


def _decode_entry(r: _Reader) -> Entry:
    name = r.blob(_U16)
    if b"/" in name or b"\x00" in name or name in (b".", b".."):
        raise ProtocolError(f"bad entry name {name!r}")
    mode, uid, gid, size, atime, mtime, nlink, ino = _ENTRY.unpack(r.take(_ENTRY.size))
    target = r.blob(_U16)
    xattrs = tuple((r.blob(_U8), r.blob(_U32)) for _ in range(r.num(_U16)))
    return Entry(name, mode, uid, gid, size, atime, mtime, nlink, ino, target, xattrs)


def encode_entries(entries: Iterable[Entry]) -> bytes:
    items = [encode_entry(e) for e in entries]
    return _U32.pack(len(items)) + b"".join(items)


def decode_entries(body: bytes) -> list[Entry]:
    r = _Reader(body)
    out = [_decode_entry(r) for _ in range(r.num(_U32))]
    r.end()
    return out


def encode_stat(entry: Entry | None) -> bytes:
    return b"\x00" if entry is None else b"\x01" + encode_entry(entry)


def decode_stat(body: bytes) -> Entry | None:
    r = _Reader(body)
    present = r.num(_U8)
    entry = _decode_entry(r) if present else None
    r.end()
    return entry


Sum = tuple[bool, bytes]  # (whole block is a hole, digest of its bytes)


def encode_sums(sums: Iterable[Sum]) -> bytes:
    return b"".join(_U8.pack(hole) + digest for hole, digest in sums)


def decode_sums(body: bytes) -> list[Sum]:
    step = 1 + DIGEST
    if len(body) % step:
        raise ProtocolError("block sums body is not a whole number of entries")
    out: list[Sum] = []
    for i in range(0, len(body), step):
        flag = body[i]
        if flag > 1:
            raise ProtocolError(f"hole flag {flag}")
        out.append((bool(flag), body[i + 1 : i + step]))
    return out


def encode_log(log: ActivityLog) -> bytes:
    out = [_U8.pack(log.present), _U8.pack(log.trusted), _blob(_U16, log.reason.encode()[:4096])]
    out.append(_U32.pack(len(log.files)))
    for path, ranges in log.files:
        out += [_blob(_U16, path), _U32.pack(len(ranges))]
        out += [_RANGE.pack(off, ln) for off, ln in ranges]
    for paths in (log.namespace, log.metadata):
        out.append(_U32.pack(len(paths)))
        out += [_blob(_U16, p) for p in paths]
    body = b"".join(out)
    if len(body) > MAX_DATA:
        return encode_log(ActivityLog(True, False, "activity log too large to send"))
    return body


def decode_log(body: bytes) -> ActivityLog:
    from app.mirror.protocol import path_problem

    r = _Reader(body)
    present, trusted = r.num(_U8), r.num(_U8)
    try:
        reason = r.blob(_U16).decode()
    except UnicodeDecodeError:
        raise ProtocolError("log reason is not UTF-8") from None

    def path() -> bytes:
        p = r.blob(_U16)
        if (problem := path_problem(p)) is not None:
            raise ProtocolError(f"log path {p!r}: {problem}")
        return p

    files = []
    for _ in range(r.num(_U32)):
        p = path()
        files.append((p, tuple(_RANGE.unpack(r.take(_RANGE.size)) for _ in range(r.num(_U32)))))
    namespace = tuple(path() for _ in range(r.num(_U32)))
    metadata = tuple(path() for _ in range(r.num(_U32)))
    r.end()
    return ActivityLog(bool(present), bool(trusted), reason, tuple(files), namespace, metadata)
