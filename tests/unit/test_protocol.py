"""The replication wire protocol: framing, handshake, id tracking, validation of payloads."""

from __future__ import annotations

import struct

import pytest

from app.mirror import ops
from app.mirror.errors import AuthError, ProtocolError
from app.mirror.protocol import (
    MAX_DATA,
    MAX_FRAME,
    Ack,
    Connection,
    ConnectionClosed,
    Event,
    Hello,
    HelloAuth,
    Nack,
    Ping,
    Pong,
    Request,
    Role,
    encode_op,
)

KEY = b"k" * 32
ALL_EXAMPLES: list[ops.Op] = [
    ops.Open(3, b"dir/file"),
    ops.Create(4, "caf\u00e9/\u65e5\u672c".encode(), 0o640, 1000, 1000, True),
    ops.Release(4),
    ops.Write(3, 5 * 2**30, b"\x00\xffdata"),
    ops.WriteV(3, ((0, b"a"), (2**40, b"\x00" * 5000), (7, b""))),
    ops.WriteV(3, ()),
    ops.Truncate(-1, b"a", 0),
    ops.Truncate(7, b"", 2**40),
    ops.Fallocate(3, 0x3, 4096, 8192),
    ops.Fsync(-1, b"", True),
    ops.Fsync(3, b"", False),
    ops.Mknod(b"fifo", 0o10644, 0, 0),
    ops.Mkdir(b"d/e", 0o755, -1, -1),
    ops.Unlink(b"\xff\xfe"),
    ops.Rmdir(b"d"),
    ops.Rename(b"a", b"b/c", 1),
    ops.Link(b"a", b"b"),
    ops.Symlink(b"/etc/../../outside", b"s", 0, 0),
    ops.Chmod(b"", 0o7777),
    ops.Chown(b"x", -1, 2**32 - 1),
    ops.Utimens(b"x", -(2**63), 2**63 - 1),
    ops.SetXattr(b"x", b"user.a", b"\x00" * 10, 1),
    ops.RemoveXattr(b"x", b"user.a"),
]


def frame(kind: int, ident: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBQ", 9 + len(payload), kind, ident) + payload


def make_pair(
    primary_key: bytes = KEY, secondary_key: bytes = KEY
) -> tuple[Connection, Connection]:
    p = Connection(Role.PRIMARY, cluster="c", node="n1", key=primary_key)
    s = Connection(Role.SECONDARY, cluster="c", node="n2", key=secondary_key, peer="n1")
    return p, s


def drain(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) is not None:
        events.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return events


def handshake(p: Connection, s: Connection) -> None:
    p_hello, s_hello = p.send(p.hello()), s.send(s.hello())
    assert drain(s, p_hello) == [p.hello()]
    assert drain(p, s_hello) == [s.hello()]
    p_auth, s_auth = p.send(p.auth()), s.send(s.auth())
    assert [type(e) for e in drain(s, p_auth)] == [HelloAuth]
    assert [type(e) for e in drain(p, s_auth)] == [HelloAuth]
    assert p.authenticated and s.authenticated
    assert p.peer_node == "n2" and s.peer_node == "n1"


@pytest.fixture
def pair() -> tuple[Connection, Connection]:
    p, s = make_pair()
    handshake(p, s)
    return p, s


@pytest.mark.parametrize("op", ALL_EXAMPLES, ids=lambda op: type(op).__name__)
def test_every_op_round_trips_and_is_acked(pair: tuple[Connection, Connection], op: ops.Op) -> None:
    p, s = pair
    assert drain(s, p.send(Request(9, op))) == [Request(9, op)]
    assert p.awaiting == {9}
    assert drain(p, s.send(Ack(9))) == [Ack(9)]
    assert p.awaiting == frozenset()


def test_every_op_type_has_an_example() -> None:
    assert {type(op) for op in ALL_EXAMPLES} == set(ops.ALL_OPS)


def test_pipelined_requests_fed_byte_by_byte_and_answered_out_of_order(
    pair: tuple[Connection, Connection],
) -> None:
    p, s = pair
    wire = b"".join(p.send(Request(i, op)) for i, op in enumerate(ALL_EXAMPLES))
    got: list[Event] = []
    for i in range(len(wire)):
        got += drain(s, wire[i : i + 1])
    assert got == [Request(i, op) for i, op in enumerate(ALL_EXAMPLES)]
    replies: list[Event] = [
        Nack(i, 28, "no space left \u2014 disk full") if i % 2 else Ack(i)
        for i in reversed(range(len(ALL_EXAMPLES)))
    ]
    assert drain(p, b"".join(s.send(r) for r in replies)) == replies
    assert p.awaiting == frozenset()


def test_ping_pong_both_ways(pair: tuple[Connection, Connection]) -> None:
    p, s = pair
    assert drain(s, p.send(Ping(1))) == [Ping(1)]
    assert drain(p, s.send(Pong(1))) == [Pong(1)]
    assert drain(p, s.send(Ping(1))) == [Ping(1)]
    assert drain(s, p.send(Pong(1))) == [Pong(1)]


def test_partial_frame_needs_data_and_clean_eof_closes(pair: tuple[Connection, Connection]) -> None:
    p, s = pair
    wire = p.send(Request(1, ops.Unlink(b"x")))
    s.receive_data(wire[:-1])
    assert s.next_event() is None
    assert drain(s, wire[-1:]) == [Request(1, ops.Unlink(b"x"))]
    assert drain(s, b"") == [ConnectionClosed()]


def test_eof_inside_a_frame_is_an_error(pair: tuple[Connection, Connection]) -> None:
    p, s = pair
    s.receive_data(p.send(Request(1, ops.Unlink(b"x")))[:-3])
    s.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a frame"):
        s.next_event()


def test_oversized_frame_is_refused_from_its_header(pair: tuple[Connection, Connection]) -> None:
    _, s = pair
    s.receive_data(struct.pack(">IBQ", MAX_FRAME + 1, 0x10, 1))
    with pytest.raises(ProtocolError, match="frame length"):
        s.next_event()
    with pytest.raises(ProtocolError, match="already failed"):
        s.next_event()


@pytest.mark.parametrize(
    "wire",
    [
        frame(0x30, 1),  # a resync frame type this version does not know
        frame(0xFF, 1),
        frame(0x11, 1, b"x"),  # Ack with a payload
        struct.pack(">IBQ", 3, 0x11, 0),  # length below the header
        frame(0x10, 1, b""),  # Request without op code
        frame(0x10, 1, b"\x63"),  # unknown op code
        frame(0x10, 1, b"\x0a\x00\x01x!"),  # trailing byte after Unlink(b"x")
        frame(0x10, 1, b"\x0a\x00\x05x"),  # path length beyond the payload
        frame(0x10, 1, encode_op(ops.Fsync(1, b"", True))[:-1] + b"\x02"),  # bool = 2
        frame(0x10, 1, b"\x03" + struct.pack(">q", -5)),  # Release(-5)
        frame(0x10, 1, b"\x04" + struct.pack(">qqI", 1, -1, 0)),  # Write at offset -1
        frame(0x10, 1, b"\x10\x00\x01x" + struct.pack(">qq", 0, 2**32)),  # uid 2**32
        frame(0x10, 1, b"\x14" + struct.pack(">qI", 1, 4097)),  # WriteV with 4097 parts
        frame(0x10, 1, b"\x14" + struct.pack(">qIqI", 1, 1, -8, 1) + b"z"),  # part at -8
        frame(0x10, 1, b"\x14" + struct.pack(">qIqI", 1, 2, 0, 1) + b"z"),  # 2nd part missing
        frame(0x10, 1, b"\x14" + struct.pack(">qIqI", 1, 1, 0, 9) + b"z"),  # data cut short
        frame(0x10, 1, b"\x14" + struct.pack(">qIqI", 1, 1, 2**63 - 2, 4) + b"four"),  # past 2**63
        frame(0x12, 1, struct.pack(">IH", 5, 2) + b"\xff\xfe"),  # Nack message not UTF-8
        frame(0x12, 1, struct.pack(">IH", 0, 0)),  # Nack errno 0
    ],
)
def test_malformed_frames_raise_protocol_error(
    pair: tuple[Connection, Connection], wire: bytes
) -> None:
    p, s = pair
    p.send(Request(1, ops.Unlink(b"x")))  # so an answer for id 1 would be legitimate
    s.receive_data(wire)
    p.receive_data(wire)
    with pytest.raises(ProtocolError):
        s.next_event()
    with pytest.raises(ProtocolError):
        p.next_event()


HOSTILE_PATHS = [
    b"/etc/passwd",
    b"..",
    b"a/../../b",
    b"./a",
    b"a/.",
    b"a//b",
    b"a/",
    b"a\x00b",
    b"x" * 256,
    b"a/" * 2049,
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_paths_are_refused_by_the_decoder(
    pair: tuple[Connection, Connection], path: bytes
) -> None:
    _, s = pair
    payload = b"\x0a" + struct.pack(">H", len(path) & 0xFFFF) + path  # Unlink, hand-made
    s.receive_data(frame(0x10, 1, payload))
    with pytest.raises(ProtocolError):
        s.next_event()


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_paths_are_refused_by_the_encoder(
    pair: tuple[Connection, Connection], path: bytes
) -> None:
    p, _ = pair
    with pytest.raises(ProtocolError):
        p.send(Request(1, ops.Link(b"ok", path)))
    assert p.awaiting == frozenset()


def test_symlink_target_is_data_but_not_nul_or_empty(pair: tuple[Connection, Connection]) -> None:
    p, s = pair
    op = ops.Symlink(b"../../../../etc//./passwd", b"s", 0, 0)
    assert drain(s, p.send(Request(1, op))) == [Request(1, op)]
    for target in (b"", b"a\x00b"):
        with pytest.raises(ProtocolError):
            p.send(Request(2, ops.Symlink(target, b"s", 0, 0)))


def test_request_before_authentication_is_never_delivered() -> None:
    p, s = make_pair()
    forged = frame(0x10, 1, encode_op(ops.Unlink(b"victim")))
    s.receive_data(forged)
    with pytest.raises(AuthError):
        s.next_event()
    # after the Hellos but before the proof: still refused
    p, s = make_pair()
    s.send(s.hello())
    s.receive_data(p.send(p.hello()) + forged)
    assert s.next_event() == p.hello()
    with pytest.raises(AuthError):
        s.next_event()


def test_primary_cannot_send_before_authentication() -> None:
    p, _ = make_pair()
    with pytest.raises(AuthError):
        p.send(Request(1, ops.Unlink(b"x")))


def test_wrong_key_fails_helloauth_on_both_sides() -> None:
    p, s = make_pair(secondary_key=b"w" * 32)
    s_hello = s.send(s.hello())
    drain(s, p.send(p.hello()))
    drain(p, s_hello)
    p_auth, s_auth = p.send(p.auth()), s.send(s.auth())
    s.receive_data(p_auth + frame(0x10, 1, encode_op(ops.Unlink(b"victim"))))
    with pytest.raises(AuthError):
        s.next_event()
    p.receive_data(s_auth)
    with pytest.raises(AuthError):
        p.next_event()
    assert not p.authenticated and not s.authenticated


def test_reflected_and_replayed_proofs_fail() -> None:
    p, s = make_pair()
    p_hello = p.send(p.hello())
    drain(p, s.send(s.hello()))
    p_auth = p.send(p.auth())
    # an attacker without the key plays "secondary" and sends the primary's proof back
    p.receive_data(p_auth)
    with pytest.raises(AuthError):
        p.next_event()
    # replay of the primary's proof to a fresh secondary (new nonce) fails
    s2 = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY)
    s2.send(s2.hello())
    s2.receive_data(p_hello + p_auth)
    assert isinstance(s2.next_event(), Hello)
    with pytest.raises(AuthError):
        s2.next_event()


def test_echoed_nonce_is_refused() -> None:
    nonce = b"n" * 32
    p = Connection(Role.PRIMARY, cluster="c", node="n1", key=KEY, nonce=nonce)
    s = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY, nonce=nonce)
    p.receive_data(s.send(s.hello()))
    with pytest.raises(AuthError):
        p.next_event()


@pytest.mark.parametrize(
    ("peer", "error"),
    [
        (Connection(Role.SECONDARY, cluster="other", node="n2", key=KEY), AuthError),
        (Connection(Role.PRIMARY, cluster="c", node="n2", key=KEY), ProtocolError),
        (Connection(Role.SECONDARY, cluster="c", node="n1", key=KEY), ProtocolError),
    ],
    ids=["cluster", "role", "node"],
)
def test_hello_mismatch(peer: Connection, error: type[Exception]) -> None:
    p = Connection(Role.PRIMARY, cluster="c", node="n1", key=KEY)
    p.receive_data(peer.send(peer.hello()))
    with pytest.raises(error):
        p.next_event()


def test_unexpected_peer_name_is_refused() -> None:
    s = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY, peer="n1")
    intruder = Connection(Role.PRIMARY, cluster="c", node="n3", key=KEY)
    s.receive_data(intruder.send(intruder.hello()))
    with pytest.raises(AuthError, match="expected 'n1'"):
        s.next_event()


def test_foreign_protocol_is_refused() -> None:
    s = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY)
    s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ProtocolError):
        s.next_event()
    s = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY)
    p = Connection(Role.PRIMARY, cluster="c", node="n1", key=KEY)
    hello = bytearray(p.send(p.hello()))
    hello[13 + 4 + 1] = 2  # version 2
    s.receive_data(bytes(hello))
    with pytest.raises(ProtocolError, match="version"):
        s.next_event()


def test_short_key_is_refused() -> None:
    with pytest.raises(AuthError):
        Connection(Role.PRIMARY, cluster="c", node="n1", key=b"short")


def test_id_tracking(pair: tuple[Connection, Connection]) -> None:
    p, s = pair
    wire = p.send(Request(5, ops.Unlink(b"x")))
    with pytest.raises(ProtocolError, match="in flight"):
        p.send(Request(5, ops.Unlink(b"y")))
    with pytest.raises(ProtocolError, match="never received"):
        s.send(Ack(5))  # not received yet
    with pytest.raises(ProtocolError, match="only the primary"):
        s.send(Request(6, ops.Unlink(b"x")))
    drain(s, wire)
    p.receive_data(frame(0x11, 77))  # Ack for an id never sent
    with pytest.raises(ProtocolError, match="unknown id"):
        p.next_event()


def test_a_request_to_the_primary_is_refused(pair: tuple[Connection, Connection]) -> None:
    p, _ = pair
    p.receive_data(frame(0x10, 1, encode_op(ops.Unlink(b"x"))))
    with pytest.raises(ProtocolError, match="secondary sent a Request"):
        p.next_event()


def test_handshake_events_are_sent_once_and_in_order() -> None:
    p, s = make_pair()
    with pytest.raises(ProtocolError):
        p.auth()  # no peer Hello yet
    p.send(p.hello())
    with pytest.raises(ProtocolError):
        p.send(p.hello())
    with pytest.raises(ProtocolError):
        p.send(HelloAuth(b"x" * 32))  # before the peer's Hello
    with pytest.raises(ProtocolError):
        s.send(Hello(1, Role.SECONDARY, "c", "forged", b"n" * 32))


@pytest.mark.parametrize(
    "parts",
    [
        tuple((i, b"") for i in range(4097)),  # too many parts
        ((0, b"x" * (8 << 20)), (0, b"y" * (8 << 20) + b"z")),  # more than MAX_DATA in all
        ((-1, b"x"),),
        ((0, "text"),),
        ((0,),),
    ],
    ids=["parts", "data", "offset", "str", "pair"],
)
def test_bad_writev_is_refused_by_the_encoder(
    pair: tuple[Connection, Connection], parts: object
) -> None:
    p, _ = pair
    with pytest.raises(ProtocolError, match=r"WriteV\.parts"):
        p.send(Request(1, ops.WriteV(3, parts)))  # type: ignore[arg-type]
    assert p.awaiting == frozenset()


def test_a_write_past_max_data_is_refused_even_inside_a_legal_frame(
    pair: tuple[Connection, Connection],
) -> None:
    """The frame limit leaves room for headers above MAX_DATA; the Write's own data must
    still stay within MAX_DATA, on the hot path as in the table."""
    _, s = pair
    data = bytes(MAX_DATA + 1)
    s.receive_data(frame(0x10, 1, struct.pack(">BqqI", 4, 1, 0, len(data)) + data))
    with pytest.raises(ProtocolError, match="data"):
        s.next_event()
