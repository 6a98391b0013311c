"""Heartbeat codec and PeerTracker: fuzzed decoding, round trips, tampering, replays."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.cluster import heartbeat as hb
from app.cluster.heartbeat import Heartbeat, PeerTracker

KEY = b"k" * 32
OTHER_KEY = b"x" * 32

names = st.text(max_size=hb.MAX_NAME)
seqs = st.integers(min_value=0, max_value=hb.MAX_SEQ)

heartbeats = st.builds(
    Heartbeat,
    cluster=names,
    module=names,
    node=names,
    boot=names,
    seq=seqs,
    network=names,
    state=names,
    substatus=names,
    generation=st.text(max_size=hb.MAX_GENERATION),
    inconsistent=st.booleans(),
    resources=st.dictionaries(st.text(max_size=16), st.text(max_size=16), max_size=4),
    stopping=st.booleans(),
    command=st.none() | st.text(max_size=64),
    sent_at=st.floats(allow_nan=False, allow_infinity=False),
    echo_boot=names,
    echo_seq=seqs,
)


def make(**changes: object) -> Heartbeat:
    base = Heartbeat(
        cluster="c1",
        module="mirror",
        node="node2",
        boot="peerboot1",
        seq=1,
        network="pub",
        state="SECOND",
        substatus="Ready",
        generation="g-42",
        resources={"fs": "up"},
        sent_at=12.5,
        echo_boot="myboot",
        echo_seq=1,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def encodable(msg: Heartbeat) -> bytes | None:
    try:
        return hb.encode(msg, KEY)
    except hb.Malformed:
        return None  # very long unicode names can exceed the datagram bound


# ---------------------------------------------------------------- codec


@settings(max_examples=300)
@given(heartbeats)
def test_round_trip(msg: Heartbeat) -> None:
    data = encodable(msg)
    if data is None:
        return
    assert len(data) <= hb.MAX_DATAGRAM
    assert hb.decode(data, KEY, cluster=msg.cluster, module=msg.module) == msg


@settings(max_examples=1000)
@given(st.binary(max_size=2000))
def test_any_bytes_decode_or_raise_heartbeat_error(data: bytes) -> None:
    try:
        msg = hb.decode(data, KEY)
    except hb.HeartbeatError:
        return
    assert isinstance(msg, Heartbeat)


@settings(max_examples=300)
@given(st.binary(max_size=1200))
def test_signed_garbage_bodies_raise_only_heartbeat_error(body: bytes) -> None:
    """Bodies that pass the MAC (an insider bug, say) are still checked field by field."""
    signed = hb.MAGIC + bytes([hb.VERSION]) + body
    data = signed + hb._mac(KEY, signed)
    try:
        hb.decode(data, KEY)
    except hb.HeartbeatError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(sorted(hb._ALL_FIELDS)), json_values))
def test_signed_json_objects_raise_only_heartbeat_error(fields: dict[str, object]) -> None:
    try:
        body = orjson.dumps(fields)
    except TypeError:
        return  # orjson refuses some values (huge ints): nothing to send
    signed = hb.MAGIC + bytes([hb.VERSION]) + body
    try:
        msg = hb.decode(signed + hb._mac(KEY, signed), KEY)
    except hb.HeartbeatError:
        return
    assert isinstance(msg, Heartbeat)


@settings(max_examples=300)
@given(heartbeats, st.data())
def test_tampered_bytes_are_rejected(msg: Heartbeat, data: st.DataObject) -> None:
    encoded = encodable(msg)
    if encoded is None:
        return
    pos = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(encoded)
    tampered[pos] ^= flip
    with pytest.raises(hb.HeartbeatError):
        hb.decode(bytes(tampered), KEY)


def test_wrong_key_is_bad_mac() -> None:
    with pytest.raises(hb.BadMac):
        hb.decode(hb.encode(make(), OTHER_KEY), KEY)


def test_truncated_is_malformed_or_bad_mac() -> None:
    data = hb.encode(make(), KEY)
    with pytest.raises(hb.Malformed):
        hb.decode(data[:10], KEY)
    with pytest.raises(hb.BadMac):
        hb.decode(data[:-1], KEY)


def test_other_version_is_named() -> None:
    data = bytearray(hb.encode(make(), KEY))
    data[3] = 9
    with pytest.raises(hb.BadVersion, match="version 9"):
        hb.decode(bytes(data), KEY)


def test_wrong_cluster_and_module() -> None:
    data = hb.encode(make(), KEY)
    with pytest.raises(hb.WrongCluster, match="cluster 'c1'"):
        hb.decode(data, KEY, cluster="c2")
    with pytest.raises(hb.WrongCluster, match="module 'mirror'"):
        hb.decode(data, KEY, cluster="c1", module="other")


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(hb.Malformed, match="node"):
        hb.encode(make(node="n" * (hb.MAX_NAME + 1)), KEY)
    many = {f"r{i}": "x" for i in range(hb.MAX_RESOURCES + 1)}
    with pytest.raises(hb.Malformed, match="resources"):
        hb.encode(make(resources=many), KEY)
    big = {f"{i:02d}" + "r" * 60: "s" * 60 for i in range(hb.MAX_RESOURCES)}
    with pytest.raises(hb.Malformed, match="exceeds"):
        hb.encode(make(resources=big), KEY)


def test_message_is_frozen_and_resources_read_only() -> None:
    msg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.seq = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        msg.resources["fs"] = "down"  # type: ignore[index]


# ---------------------------------------------------------------- tracker


def tracker() -> PeerTracker:
    return PeerTracker("node1", "myboot", ["pub", "repl"], peer="node2")


def test_accepts_increasing_seq_and_rejects_replay() -> None:
    t = tracker()
    t.accept(make(seq=5), "pub", now=1.0)
    t.accept(make(seq=6), "pub", now=2.0)
    assert t.latest() == make(seq=6)
    with pytest.raises(hb.Replay):
        t.accept(make(seq=6), "pub", now=3.0)
    with pytest.raises(hb.Replay):
        t.accept(make(seq=2), "pub", now=3.0)
    assert t.latest() == make(seq=6)


def test_networks_reorder_independently() -> None:
    t = tracker()
    t.accept(make(seq=11, network="repl"), "repl", now=1.0)
    t.accept(make(seq=10, network="pub"), "pub", now=1.0)  # older, but first on its network
    assert t.latest() is not None and t.latest().seq == 11  # type: ignore[union-attr]
    assert t.networks_alive(1.5, timeout=1.0) == {"pub": True, "repl": True}


def test_datagram_replayed_on_another_network_is_refused() -> None:
    t = tracker()
    with pytest.raises(hb.WrongNetwork):
        t.accept(make(network="pub"), "repl", now=1.0)
    with pytest.raises(hb.WrongNetwork):
        t.accept(make(network="lan"), "lan", now=1.0)


def test_own_and_foreign_nodes_are_refused() -> None:
    t = tracker()
    with pytest.raises(hb.Reflected):
        t.accept(make(node="node1"), "pub", now=1.0)
    with pytest.raises(hb.WrongPeer):
        t.accept(make(node="node3"), "pub", now=1.0)


def test_new_boot_needs_an_echo_of_our_boot() -> None:
    t = tracker()
    with pytest.raises(hb.Unverified):
        t.accept(make(echo_boot="", echo_seq=0), "pub", now=1.0)
    assert t.latest() is None
    assert t.echo() == ("peerboot1", 1)  # so our next heartbeat lets the peer verify us
    with pytest.raises(hb.Unverified):  # captured before our start: echoes our old boot
        t.accept(make(seq=2, echo_boot="myoldboot", echo_seq=900), "pub", now=1.0)
    t.accept(make(seq=3, echo_boot="myboot", echo_seq=0), "pub", now=1.0)
    assert t.peer_seen(1.0, timeout=5.0)


def test_old_boot_never_displaces_a_newer_one() -> None:
    t = tracker()
    old = make(boot="old", seq=50, echo_seq=7)  # captured by an attacker, never delivered
    t.accept(make(boot="new", seq=1, echo_seq=9), "pub", now=1.0)
    with pytest.raises(hb.Unverified):
        t.accept(old, "pub", now=2.0)
    t.accept(make(boot="new", seq=2, echo_seq=9), "pub", now=3.0)
    assert t.latest() == make(boot="new", seq=2, echo_seq=9)


def test_delayed_old_boot_is_replaced_by_the_new_one() -> None:
    t = tracker()
    t.accept(make(boot="old", seq=50, echo_seq=7), "pub", now=1.0)
    with pytest.raises(hb.Unverified):  # heard the same seq of ours: not provably newer yet
        t.accept(make(boot="new", seq=1, echo_seq=7), "pub", now=2.0)
    t.accept(make(boot="new", seq=2, echo_seq=8), "pub", now=3.0)
    with pytest.raises(hb.Unverified):
        t.accept(make(boot="old", seq=51, echo_seq=7), "pub", now=4.0)
    assert t.latest() == make(boot="new", seq=2, echo_seq=8)


def test_peer_lost_after_timeout_per_network() -> None:
    t = tracker()
    t.accept(make(seq=1, network="pub"), "pub", now=10.0)
    t.accept(make(seq=2, network="repl"), "repl", now=20.0)
    assert t.networks_alive(25.0, timeout=10.0) == {"pub": False, "repl": True}
    assert t.peer_seen(25.0, timeout=10.0)
    assert not t.peer_seen(31.0, timeout=10.0)
    view = t.view(31.0, timeout=10.0)
    assert not view.seen and view.age == 11.0 and view.latest is not None


def test_never_seen_peer() -> None:
    view = tracker().view(100.0, timeout=30.0)
    assert not view.seen and view.latest is None and view.age is None
    assert dict(view.networks) == {"pub": False, "repl": False}


def test_clean_stop_is_seen_at_once_and_a_restart_clears_it() -> None:
    t = tracker()
    t.accept(make(seq=1), "pub", now=1.0)
    t.accept(make(seq=2, stopping=True), "pub", now=1.1)
    view = t.view(1.2, timeout=30.0)
    assert view.stopping and not view.seen
    t.accept(make(boot="again", seq=1, echo_seq=5), "pub", now=9.0)
    assert t.peer_seen(9.0, timeout=30.0)
