"""The FUSE kernel protocol, sans-IO: request bytes in, fields out; reply fields in, bytes out.

How it works
    The kernel speaks to a FUSE daemon over /dev/fuse in fixed little structures
    (include/uapi/linux/fuse.h), in the host's byte order: one ``read`` gives one request, a
    ``fuse_in_header`` then the opcode's arguments; one ``write`` answers it, a
    ``fuse_out_header`` (length, ``-errno``, the request's ``unique``) then the reply's
    structure. This module holds those structures as ``struct.Struct`` values, the opcode and
    flag numbers, ``Request`` (the header, parsed once) with the argument parsers the loop
    needs, and the reply builders. It never touches a file descriptor: fuseloop.py reads,
    dispatches and writes.

    Protocol 7.28 or newer is required (FUSE_MAX_PAGES, for 1 MiB writes: Linux 4.20); the
    INIT reply announces 7.36 or the kernel's own minor if lower, and every structure below is
    the one of those versions (``fuse_write_in`` of 40 bytes, ``fuse_create_in`` of 16, ...).

Exceptions
    ``FuseProtocolError`` (a ``ValueError``): a request too short for its opcode's arguments,
    a name without its NUL, a length field that does not match the request. The loop answers
    such a request with EINVAL (EPROTO for INIT) and goes on.

Known limits
    - Host byte order only (the kernel and the daemon are always on the same host).
    - No FUSE_INIT_EXT (flags2), no security contexts, no DAX, no notifications: none is asked
      for in INIT, so the kernel never sends them.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Final

# -- versions -------------------------------------------------------------------------------

KERNEL_MAJOR: Final = 7
MIN_MINOR: Final = 28  # FUSE_MAX_PAGES
OUR_MINOR: Final = 36
ROOT_ID: Final = 1

# -- opcodes --------------------------------------------------------------------------------

LOOKUP: Final = 1
FORGET: Final = 2
GETATTR: Final = 3
SETATTR: Final = 4
READLINK: Final = 5
SYMLINK: Final = 6
MKNOD: Final = 8
MKDIR: Final = 9
UNLINK: Final = 10
RMDIR: Final = 11
RENAME: Final = 12
LINK: Final = 13
OPEN: Final = 14
READ: Final = 15
WRITE: Final = 16
STATFS: Final = 17
RELEASE: Final = 18
FSYNC: Final = 20
SETXATTR: Final = 21
GETXATTR: Final = 22
LISTXATTR: Final = 23
REMOVEXATTR: Final = 24
FLUSH: Final = 25
INIT: Final = 26
OPENDIR: Final = 27
READDIR: Final = 28
RELEASEDIR: Final = 29
FSYNCDIR: Final = 30
ACCESS: Final = 34
CREATE: Final = 35
INTERRUPT: Final = 36
DESTROY: Final = 38
BATCH_FORGET: Final = 42
FALLOCATE: Final = 43
RENAME2: Final = 45
LSEEK: Final = 46

NO_REPLY: Final = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# -- INIT flags (fuse_init_in/out.flags) ----------------------------------------------------

ASYNC_READ: Final = 1 << 0
ATOMIC_O_TRUNC: Final = 1 << 3
BIG_WRITES: Final = 1 << 5
AUTO_INVAL_DATA: Final = 1 << 12
WRITEBACK_CACHE: Final = 1 << 16
ASYNC_DIO: Final = 1 << 15
PARALLEL_DIROPS: Final = 1 << 18
HANDLE_KILLPRIV: Final = 1 << 19
MAX_PAGES: Final = 1 << 22
HANDLE_KILLPRIV_V2: Final = 1 << 28

#: what the mount asks for, as libfuse 3.14's high-level API did by default for this
#: filesystem (async reads, atomic O_TRUNC, automatic page-cache invalidation on a changed
#: mtime, async direct I/O, parallel lookups and readdirs, the filesystem clearing set-ID bits,
#: FUSE_HANDLE_KILLPRIV_V2 added), never the writeback cache (fusefs.py says why).
WANTED: Final = (
    ASYNC_READ
    | ATOMIC_O_TRUNC
    | BIG_WRITES
    | AUTO_INVAL_DATA
    | ASYNC_DIO
    | PARALLEL_DIROPS
    | HANDLE_KILLPRIV
    | MAX_PAGES
    | HANDLE_KILLPRIV_V2
)

# -- request flags --------------------------------------------------------------------------

GETATTR_FH: Final = 1 << 0
WRITE_CACHE: Final = 1 << 0  # the write is the kernel writing back cached (mmap'ed) pages
FSYNC_FDATASYNC: Final = 1 << 0
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8

# -- structures (host byte order, the kernel's exact sizes) ---------------------------------

_BO = "<" if sys.byteorder == "little" else ">"
IN_HEADER: Final = struct.Struct(_BO + "IIQQIIIHH")  # len opcode unique nodeid uid gid pid ...
OUT_HEADER: Final = struct.Struct(_BO + "IiQ")  # len error unique
# times are u64 in fuse.h and read as time64_t: signed here, so 1969 stays 1969
ATTR: Final = struct.Struct(_BO + "QQQqqqIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_HEAD: Final = struct.Struct(_BO + "QQQQII")  # fuse_entry_out without its attr
ATTR_HEAD: Final = struct.Struct(_BO + "QII")  # fuse_attr_out without its attr
OPEN_OUT: Final = struct.Struct(_BO + "QII")
WRITE_IN: Final = struct.Struct(_BO + "QQIIQII")  # fh offset size write_flags lock flags pad
WRITE_OUT: Final = struct.Struct(_BO + "II")
READ_IN: Final = struct.Struct(_BO + "QQIIQII")
FSYNC_IN: Final = struct.Struct(_BO + "QII")
RELEASE_IN: Final = struct.Struct(_BO + "QIIQ")
GETATTR_IN: Final = struct.Struct(_BO + "IIQ")
SETATTR_IN: Final = struct.Struct(_BO + "IIQQQqqqIIIIIIII")  # fuse_setattr_in, 88 bytes
OPEN_IN: Final = struct.Struct(_BO + "II")
CREATE_IN: Final = struct.Struct(_BO + "IIII")  # flags mode umask open_flags
MKNOD_IN: Final = struct.Struct(_BO + "IIII")  # mode rdev umask padding
MKDIR_IN: Final = struct.Struct(_BO + "II")  # mode umask
RENAME_IN: Final = struct.Struct(_BO + "Q")
RENAME2_IN: Final = struct.Struct(_BO + "QII")
LINK_IN: Final = struct.Struct(_BO + "Q")
FORGET_IN: Final = struct.Struct(_BO + "Q")
BATCH_FORGET_IN: Final = struct.Struct(_BO + "II")
FORGET_ONE: Final = struct.Struct(_BO + "QQ")
SETXATTR_IN: Final = struct.Struct(_BO + "II")  # size flags (no FUSE_SETXATTR_EXT)
GETXATTR_IN: Final = struct.Struct(_BO + "II")
GETXATTR_OUT: Final = struct.Struct(_BO + "II")
FALLOCATE_IN: Final = struct.Struct(_BO + "QQQII")
LSEEK_IN: Final = struct.Struct(_BO + "QQII")
LSEEK_OUT: Final = struct.Struct(_BO + "Q")
INIT_IN: Final = struct.Struct(_BO + "IIII")  # major minor max_readahead flags
INIT_OUT: Final = struct.Struct(_BO + "IIIIHHIIHHI7I")  # fuse_init_out, 64 bytes
KSTATFS: Final = struct.Struct(_BO + "QQQQQIIII6I")  # fuse_statfs_out, 80 bytes
DIRENT_HEAD: Final = struct.Struct(_BO + "QQII")  # ino off namelen type, then the name

assert ATTR.size == 88 and SETATTR_IN.size == 88 and INIT_OUT.size == 64 and KSTATFS.size == 80


class FuseProtocolError(ValueError):
    """A request the kernel would never send: too short, a name without its NUL."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request's header; ``args`` is everything after it (a view into the read buffer)."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    args: memoryview


def parse(buf: memoryview) -> Request:
    """The request in ``buf`` (exactly what one read returned)."""
    if len(buf) < IN_HEADER.size:
        raise FuseProtocolError(f"request of {len(buf)} bytes: shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise FuseProtocolError(f"request says {length} bytes, the read gave {len(buf)}")
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER.size :])


def unpack(fmt: struct.Struct, args: memoryview) -> tuple[int, ...]:
    """The fixed arguments at the start of ``args``."""
    if len(args) < fmt.size:
        raise FuseProtocolError(f"arguments of {len(args)} bytes, {fmt.size} expected")
    return fmt.unpack_from(args)


def names(args: memoryview, offset: int, count: int) -> list[bytes]:
    """``count`` NUL-terminated names from ``args[offset:]`` (LOOKUP's name, RENAME's two)."""
    out: list[bytes] = []
    raw = bytes(args[offset:])
    pos = 0
    for _ in range(count):
        end = raw.find(b"\0", pos)
        if end < 0:
            raise FuseProtocolError("a name without its terminating NUL")
        out.append(raw[pos:end])
        pos = end + 1
    return out


# -- replies --------------------------------------------------------------------------------


def reply(unique: int, body: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def reply_error(unique: int, err: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def attr(st: os.stat_result) -> bytes:
    """``fuse_attr`` of a local ``stat``: st_ino is the real inode number (use_ino). A time
    before 1970 has negative seconds and nanoseconds >= 0, as the kernel reads it."""
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return ATTR.pack(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        a // 1_000_000_000,
        m // 1_000_000_000,
        c // 1_000_000_000,
        a % 1_000_000_000,
        m % 1_000_000_000,
        c % 1_000_000_000,
        st.st_mode,
        min(st.st_nlink, 0xFFFFFFFF),
        st.st_uid,
        st.st_gid,
        st.st_rdev & 0xFFFFFFFF,
        st.st_blksize,
        0,
    )


def attr_out(st: os.stat_result, valid: float) -> bytes:
    sec, nsec = _split(valid)
    return ATTR_HEAD.pack(sec, nsec, 0) + attr(st)


def entry_out(nodeid: int, st: os.stat_result | None, entry: float, attrs: float) -> bytes:
    """``fuse_entry_out``; ``st`` None with ``nodeid`` 0 is a negative entry (cached ENOENT)."""
    esec, ensec = _split(entry)
    asec, ansec = _split(attrs)
    body = attr(st) if st is not None else bytes(ATTR.size)
    return ENTRY_HEAD.pack(nodeid, 0, esec, asec, ensec, ansec) + body


def open_out(fh: int, flags: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, flags, 0)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def statfs_out(sv: dict[str, int]) -> bytes:
    return KSTATFS.pack(
        sv["f_blocks"],
        sv["f_bfree"],
        sv["f_bavail"],
        sv["f_files"],
        sv["f_ffree"],
        sv["f_bsize"],
        sv["f_namemax"],
        sv["f_frsize"],
        0,
        *([0] * 6),
    )


def init_out(minor: int, max_readahead: int, flags: int, max_write: int) -> bytes:
    max_pages = -(-max_write // 4096)
    return INIT_OUT.pack(
        KERNEL_MAJOR,
        minor,
        max_readahead,
        flags,
        12,  # max_background: libfuse's default
        9,  # congestion_threshold: 3/4 of it
        max_write,
        1,  # time_gran: nanoseconds
        max_pages,
        0,  # map_alignment
        0,  # flags2
        *([0] * 7),
    )


def dirent(ino: int, offset: int, mode: int, name: bytes) -> bytes:
    """One ``fuse_dirent``, padded to 8 bytes; ``offset`` is where the next one starts."""
    rec = DIRENT_HEAD.pack(ino, offset, len(name), stat.S_IFMT(mode) >> 12) + name
    return rec + bytes(-len(rec) % 8)
