"""The FUSE kernel protocol, sans-IO (fusekernel.py): what a request parses to, and replies
built to the byte sizes and fields of include/uapi/linux/fuse.h."""

from __future__ import annotations

import os
import struct

import pytest

from app.mirror import fusekernel as fk


def header(opcode: int, unique: int, nodeid: int, body: bytes, total: int | None = None) -> bytes:
    size = fk.IN_HEADER.size + len(body)
    return fk.IN_HEADER.pack(total or size, opcode, unique, nodeid, 1000, 100, 42, 0, 0) + body


def test_a_request_parses_to_its_header_and_arguments() -> None:
    req = fk.parse(memoryview(header(fk.LOOKUP, 7, 1, b"name\0")))
    assert (req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid) == (
        fk.LOOKUP,
        7,
        1,
        1000,
        100,
        42,
    )
    assert fk.names(req.args, 0, 1) == [b"name"]


@pytest.mark.parametrize(
    "raw",
    [
        b"\0" * 39,  # shorter than the header
        header(fk.LOOKUP, 1, 1, b"x\0", total=100),  # the length field lies
    ],
)
def test_a_request_the_kernel_would_never_send_is_refused(raw: bytes) -> None:
    with pytest.raises(fk.FuseProtocolError):
        fk.parse(memoryview(raw))


def test_names_need_their_nul() -> None:
    assert fk.names(memoryview(b"old\0new\0"), 0, 2) == [b"old", b"new"]
    with pytest.raises(fk.FuseProtocolError, match="NUL"):
        fk.names(memoryview(b"old\0new"), 0, 2)


def test_replies_have_the_kernels_sizes() -> None:
    st = os.stat(".")
    assert len(fk.reply(5, b"abc")) == 16 + 3
    assert struct.unpack("<IiQ", fk.reply_error(5, 2)) == (16, -2, 5)
    assert len(fk.entry_out(9, st, 1.0, 1.0)) == 128  # fuse_entry_out
    assert len(fk.attr_out(st, 1.0)) == 104  # fuse_attr_out
    assert len(fk.open_out(3)) == 16
    assert len(fk.init_out(36, 131072, fk.WANTED, 1 << 20)) == 64
    sv = {k: 1 for k in ("f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")}
    sv |= {"f_bsize": 4096, "f_namemax": 255, "f_frsize": 4096}
    assert len(fk.statfs_out(sv)) == 80


def test_attributes_carry_the_local_stat_with_nanoseconds_and_old_times(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "f")
    with open(path, "wb") as f:
        f.write(b"x" * 10)
    os.utime(path, ns=(-1_500_000_000, 1_700_000_000_123_456_789))  # 1969 and 2023
    st = os.stat(path)
    fields = fk.ATTR.unpack(fk.attr(st))
    ino, size, _blocks, atime, mtime, _ctime, atimens, mtimens = fields[:8]
    assert (ino, size) == (st.st_ino, 10)
    assert (atime, atimens) == (-2, 500_000_000)  # -1.5 s: second -2, +0.5 s
    assert (mtime, mtimens) == (1_700_000_000, 123_456_789)
    assert fields[9] == st.st_mode and fields[11] == st.st_uid


def test_a_negative_entry_has_no_node_and_the_negative_timeout() -> None:
    nodeid, _gen, entry_valid, attr_valid, entry_nsec, _ = fk.ENTRY_HEAD.unpack_from(
        fk.entry_out(0, None, 1.5, 0.0)
    )
    assert (nodeid, entry_valid, entry_nsec, attr_valid) == (0, 1, 500_000_000, 0)


def test_init_out_grants_what_it_is_given_and_pages_for_the_write_size() -> None:
    out = fk.INIT_OUT.unpack(fk.init_out(33, 65536, fk.HANDLE_KILLPRIV_V2, 1 << 20))
    major, minor, readahead, flags, _bg, _cong, max_write, gran, max_pages = out[:9]
    assert (major, minor, readahead, flags) == (7, 33, 65536, fk.HANDLE_KILLPRIV_V2)
    assert (max_write, gran, max_pages) == (1 << 20, 1, 256)
    assert not fk.WANTED & fk.WRITEBACK_CACHE  # never: write() must mean replicated


def test_a_dirent_is_padded_to_eight_bytes_and_names_its_type() -> None:
    rec = fk.dirent(77, 3, 0o040755, b"dir")
    assert len(rec) == 32 and len(rec) % 8 == 0
    ino, off, namelen, kind = fk.DIRENT_HEAD.unpack_from(rec)
    assert (ino, off, namelen, kind) == (77, 3, 3, 4)  # DT_DIR
    assert rec[24:27] == b"dir" and rec[27:] == b"\0" * 5
