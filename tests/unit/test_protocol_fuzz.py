"""Fuzzing the wire protocol and the receiver (Hypothesis).

Invariants: any bytes either parse or raise ProtocolError, never anything else, and an
unauthenticated connection never yields a Request; every op round-trips; any op sequence,
hostile paths included, either applies or raises ApplyError and never changes a thing outside
the replicated root.
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.mirror import ops
from app.mirror import protocol_opcodec as oc
from app.mirror.errors import ApplyError, PathEscape, ProtocolError
from app.mirror.protocol import (
    Ack,
    Connection,
    ConnectionClosed,
    Event,
    Nack,
    Ping,
    Pong,
    Request,
    Role,
    decode_op,
)
from app.mirror.receiver import Receiver

KEY = b"fuzz-key-0123456789abcdef"
GIB = 2**30
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -------------------------------------------------------------------------- strategies

names = st.binary(min_size=1, max_size=20).filter(
    lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b"..")
)
valid_paths = st.one_of(st.just(b""), st.lists(names, min_size=1, max_size=4).map(b"/".join))
fhs = st.integers(0, 2**63 - 1)
offsets = st.integers(0, 2**63 - 1)
ids = st.integers(-1, 2**32 - 1)
u32 = st.integers(0, 2**32 - 1)
ns = st.integers(-(2**63), 2**63 - 1)
targets = st.binary(min_size=1, max_size=100).filter(lambda b: b"\x00" not in b)
xnames = st.binary(min_size=1, max_size=40).filter(lambda b: b"\x00" not in b)

valid_ops: st.SearchStrategy[ops.Op] = st.one_of(
    st.builds(ops.Open, fhs, valid_paths),
    st.builds(ops.Create, fhs, valid_paths, u32, ids, ids, st.booleans()),
    st.builds(ops.Release, fhs),
    st.builds(ops.Write, fhs, offsets, st.binary(max_size=300)),
    st.builds(
        ops.WriteV,
        fhs,
        st.lists(st.tuples(st.integers(0, 2**62), st.binary(max_size=40)), max_size=5).map(tuple),
    ),
    st.builds(ops.Truncate, st.integers(-1, 2**63 - 1), valid_paths, offsets),
    st.builds(ops.Fallocate, fhs, u32, offsets, offsets),
    st.builds(ops.Fsync, st.integers(-1, 2**63 - 1), valid_paths, st.booleans()),
    st.builds(ops.Mknod, valid_paths, u32, ids, ids),
    st.builds(ops.Mkdir, valid_paths, u32, ids, ids),
    st.builds(ops.Unlink, valid_paths),
    st.builds(ops.Rmdir, valid_paths),
    st.builds(ops.Rename, valid_paths, valid_paths, u32),
    st.builds(ops.Link, valid_paths, valid_paths),
    st.builds(ops.Symlink, targets, valid_paths, ids, ids),
    st.builds(ops.Chmod, valid_paths, u32),
    st.builds(ops.Chown, valid_paths, ids, ids),
    st.builds(ops.Utimens, valid_paths, ns, ns),
    st.builds(ops.SetXattr, valid_paths, xnames, st.binary(max_size=100), u32),
    st.builds(ops.RemoveXattr, valid_paths, xnames),
)


def authenticated_pair() -> tuple[Connection, Connection]:
    p = Connection(Role.PRIMARY, cluster="c", node="n1", key=KEY)
    s = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY)
    p_hello, s_hello = p.send(p.hello()), s.send(s.hello())
    s.receive_data(p_hello)
    p.receive_data(s_hello)
    s.next_event()
    p.next_event()
    p_auth, s_auth = p.send(p.auth()), s.send(s.auth())
    s.receive_data(p_auth)
    p.receive_data(s_auth)
    s.next_event()
    p.next_event()
    assert p.authenticated and s.authenticated
    return p, s


def feed(conn: Connection, data: bytes) -> list[Event]:
    """Feed ``data`` and pull events until NEED_DATA, a close, or the protocol's own error."""
    events: list[Event] = []
    try:
        conn.receive_data(data)
        for _ in range(len(data) + 2):  # every frame takes at least 13 bytes
            ev = conn.next_event()
            if ev is None or isinstance(ev, ConnectionClosed):
                break
            events.append(ev)
    except ProtocolError:
        pass
    return events


# ---------------------------------------------------------------------- protocol fuzz


@FUZZ
@given(op=valid_ops, ident=st.integers(0, 2**64 - 1), cuts=st.lists(st.integers(0, 400)))
def test_every_op_round_trips_in_any_chunking(op: ops.Op, ident: int, cuts: list[int]) -> None:
    p, s = authenticated_pair()
    wire = p.send(Request(ident, op))
    got: list[Event] = []
    bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    for a, b in itertools.pairwise(bounds):
        s.receive_data(wire[a:b])  # never b"" here: that would mean end of stream
        while (ev := s.next_event()) is not None:
            got.append(ev)
    assert got == [Request(ident, op)]
    assert p.awaiting == {ident}
    p.receive_data(s.send(Ack(ident)))
    assert p.next_event() == Ack(ident)


@FUZZ
@given(data=st.binary(max_size=600), role=st.sampled_from(Role))
def test_random_bytes_never_deliver_anything_before_authentication(data: bytes, role: Role) -> None:
    conn = Connection(role, cluster="c", node="n", key=KEY)
    for ev in feed(conn, data):
        assert not isinstance(ev, Request | Ack | Nack | Ping | Pong)
    assert not conn.authenticated


@FUZZ
@given(data=st.binary(max_size=600), eof=st.booleans())
def test_random_bytes_after_authentication_parse_or_raise_protocol_error(
    data: bytes, eof: bool
) -> None:
    p, s = authenticated_pair()
    p.send(Request(1, ops.Unlink(b"x")))
    for conn in (p, s):
        feed(conn, data)
        if eof:
            feed(conn, b"")


@FUZZ
@given(
    frames=st.lists(st.tuples(st.integers(0, 2**64 - 1), valid_ops), min_size=1, max_size=4),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("fid")),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_frames_parse_or_raise_protocol_error(
    frames: list[tuple[int, ops.Op]], edits: list[tuple[int, int, str]]
) -> None:
    p, s = authenticated_pair()
    wire = bytearray()
    for ident, op in frames:
        if ident not in p.awaiting:
            wire += p.send(Request(ident, op))
    for pos, byte, how in edits:
        i = pos % (len(wire) + 1)
        if how == "f" and i < len(wire):
            wire[i] ^= byte or 1
        elif how == "i":
            wire[i:i] = bytes([byte])
        elif i < len(wire):
            del wire[i]
    for ev in feed(s, bytes(wire)):
        assert isinstance(ev, Request | Ping)


@FUZZ
@given(kind=st.integers(0, 255), ident=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_any_frame_type_parses_or_raises_protocol_error(kind: int, ident: int, body: bytes) -> None:
    p, s = authenticated_pair()
    raw = struct.pack(">IBQ", 9 + len(body), kind, ident) + body
    feed(p, raw)
    feed(s, raw)


# ---------------------------------------------------------------------- receiver fuzz

# Names that exist in the jail (symlinks to the canary among them) or get created by the ops.
NAMES = [b"a", b"b", b"d", b"f", "\u00e9".encode(), b"\xff", b"evil", b"evil_rel", b"evil_file"]
NAMES += [b"dangling", b"secret", b"sub"]
hostile_paths = st.one_of(
    st.sampled_from(NAMES),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(b"/".join),
    st.lists(st.sampled_from([*NAMES, b"..", b".", b""]), min_size=1, max_size=3).map(b"/".join),
    st.sampled_from([b"", b"/", b"/tmp", b"a\x00b", b"../outside/secret", b"evil/../x"]),
)


def hostile_ops(outside: bytes) -> st.SearchStrategy[ops.Op]:
    fh = st.integers(-1, 2)
    off = st.sampled_from([0, 1, 4096, 5 * GIB])
    own = st.sampled_from([-1, os.getuid()])
    mode = st.sampled_from(
        [0o644, 0o755, 0o4755, stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o600, stat.S_IFCHR | 0o666]
    )
    tgt = st.sampled_from(
        [outside, outside + b"/secret", b"../outside", b"../outside/secret", b"a", b"evil/.."]
    )
    xname = st.sampled_from([b"user.x", b"user.y"])
    path = hostile_paths
    return st.one_of(
        st.builds(ops.Open, fh, path),
        st.builds(ops.Create, fh, path, mode, own, own, st.booleans()),
        st.builds(ops.Release, fh),
        st.builds(ops.Write, fh, off, st.binary(max_size=32)),
        st.builds(ops.Truncate, fh, path, st.sampled_from([0, 3, 5 * GIB])),
        st.builds(ops.Fallocate, fh, st.sampled_from([0, 1, 3, 0x10]), off, st.just(4096)),
        st.builds(ops.Fsync, fh, path, st.booleans()),
        st.builds(ops.Mknod, path, mode, own, own),
        st.builds(ops.Mkdir, path, mode, own, own),
        st.builds(ops.Unlink, path),
        st.builds(ops.Rmdir, path),
        st.builds(ops.Rename, path, path, st.sampled_from([0, 1, 2, 4])),
        st.builds(ops.Link, path, path),
        st.builds(ops.Symlink, tgt, path, own, own),
        st.builds(ops.Chmod, path, st.sampled_from([0o777, 0o000, 0o4700])),
        st.builds(ops.Chown, path, own, own),
        st.builds(ops.Utimens, path, st.just(0), st.just(0)),
        st.builds(ops.SetXattr, path, xname, st.just(b"pwned"), st.sampled_from([0, 1, 2])),
        st.builds(ops.RemoveXattr, path, xname),
    )


def outside_state(top: Path) -> dict[str, Any]:
    """Everything observable about ``top`` (the canary) and its parent's listing."""
    state: dict[str, Any] = {"<parent>": sorted(os.listdir(top.parent))}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st_ = os.lstat(full)
            entry: tuple[Any, ...] = (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size)
            entry += (st_.st_mtime_ns, st_.st_ctime_ns, sorted(os.listxattr(full)))
            if stat.S_ISREG(st_.st_mode):
                entry += (Path(full).read_bytes(),)
            state[full] = entry
    return state


# Bound handles 0 and 1 and a few more names, so that random steps find things to act on.
PROLOGUE = [
    ops.Create(0, b"a", 0o644, -1, -1, True),
    ops.Mkdir(b"sub", 0o755, -1, -1),
    ops.Create(1, b"sub/secret", 0o600, -1, -1, True),
    ops.Write(1, 0, b"inside secret"),
    ops.Mkdir(b"d/sub", 0o755, -1, -1),
    ops.Symlink(b"../../outside", b"d/sub/evil", -1, -1),
]
OUTSIDE = b"@OUTSIDE@"  # stands for the canary's absolute path, known only per example


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(hostile_ops(OUTSIDE), min_size=1, max_size=15), openat2=st.booleans())
def test_any_op_sequence_never_touches_anything_outside_the_root(
    steps: list[ops.Op], openat2: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="mirrorha-fuzz-") as tmp:
        root, outside = Path(tmp) / "root", Path(tmp) / "outside"
        root.mkdir()
        (outside / "sub").mkdir(parents=True)
        (outside / "secret").write_bytes(b"canary")
        (root / "evil").symlink_to(outside)
        (root / "evil_rel").symlink_to("../outside")
        (root / "evil_file").symlink_to(outside / "secret")
        (root / "dangling").symlink_to(outside / "new")
        (root / "d").mkdir()
        (root / "f").write_bytes(b"inside")
        before = outside_state(outside)
        applied = escapes = 0
        with Receiver(root, openat2=openat2) as rx:
            for op in PROLOGUE:
                rx.apply(op)
            for op in steps:
                if isinstance(op, ops.Symlink):
                    op = replace(op, target=op.target.replace(OUTSIDE, os.fsencode(outside)))
                try:
                    rx.apply(op)
                    applied += 1
                except PathEscape:
                    escapes += 1
                except ApplyError:
                    pass
        event(f"random ops applied: {min(applied, 5)}{'+' if applied >= 5 else ''}")
        event(f"escapes refused: {min(escapes, 2)}{'+' if escapes >= 2 else ''}")
        assert outside_state(outside) == before


# ------------------------------------------------------- the hot ops' own layouts

hot_ops: st.SearchStrategy[ops.Op] = st.one_of(
    st.builds(ops.Write, fhs, offsets, st.binary(max_size=300)),
    st.builds(ops.Fsync, st.integers(-1, 2**63 - 1), valid_paths, st.booleans()),
)


@FUZZ
@given(hot_ops)
def test_the_hot_ops_layouts_give_the_tables_bytes_both_ways(op: ops.Op) -> None:
    """Write and Fsync have a layout of their own (one struct call each way); it must be the
    per-field table's, byte for byte, in both directions."""
    fast = b"".join(oc._op_parts(op))
    assert fast == b"".join(oc._table_parts(op))
    assert decode_op(fast) == oc._table_decode(fast) == op


@FUZZ
@given(
    st.sampled_from([4, 7]),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=40),
)
def test_hot_looking_payloads_decode_as_the_table_says(
    code: int, a: int, b: int, n: int, tail: bytes
) -> None:
    """A payload that starts like a Write or an Fsync is decoded exactly as the table decodes
    it: the same op, or a ProtocolError (negative handle or offset, a length that is not the
    data's, a bool of 2, a path where the fast Fsync has none)."""
    if code == 4:
        payload = struct.pack(">Bqq", 4, a, b) + struct.pack(">I", n % 64) + tail
    else:
        payload = struct.pack(">Bq", 7, a) + struct.pack(">H", n % 3) + tail[: n % 3 + 1]
    try:
        expected: ops.Op | str = oc._table_decode(payload)
    except ProtocolError:
        expected = "refused"
    try:
        got: ops.Op | str = decode_op(payload)
    except ProtocolError:
        got = "refused"
    assert got == expected
