"""The channel's Link over a real socket pair: answers reach the right waiter when waiters read
the socket themselves (many threads at once), answers nobody waits for are still read, a peer
that hangs up an idle link is noticed without any traffic, a silent peer times out, and a
resync query's answer does not wait for the ops queued behind it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from app.mirror import ops
from app.mirror.channel import Link, handshake
from app.mirror.errors import ChannelError
from app.mirror.protocol import Ack, Connection, Event, Request, ResyncQuery, ResyncReply, Role

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEY = b"k" * 32


def _pair(
    handler: Callable[[Event], Event | None], on_idle: Callable[[], None] | None = None
) -> tuple[Link, Link, list[str]]:
    a, b = socket.socketpair()
    prim = Connection(Role.PRIMARY, cluster="c", node="n1", key=KEY, peer="n2")
    sec = Connection(Role.SECONDARY, cluster="c", node="n2", key=KEY, peer="n1")
    t = threading.Thread(target=handshake, args=(b, sec, 5.0))
    t.start()
    handshake(a, prim, 5.0)
    t.join(5.0)
    closed: list[str] = []
    client = Link(a, prim, on_close=lambda _lk, why: closed.append(why), name="client").start()
    server = Link(b, sec, handler=handler, on_idle=on_idle, name="server").start()
    return client, server, closed


def _ack(ev: Event) -> Event | None:
    assert isinstance(ev, Request)
    return Ack(ev.id)


@pytest.fixture
def links() -> Iterator[tuple[Link, Link, list[str]]]:
    client, server, closed = _pair(_ack)
    try:
        yield client, server, closed
    finally:
        client.close("test over")
        server.close("test over")
        client.join(5.0)
        server.join(5.0)


def _fsync(i: int) -> Callable[[int], Event]:
    return lambda ident: Request(ident, ops.Fsync(-1, b"f%d" % i, True))


def test_concurrent_waiters_each_get_their_own_answer(links: tuple[Link, Link, list[str]]) -> None:
    client, _server, _ = links
    errors: list[str] = []

    def writer(n: int) -> None:
        for i in range(300):
            pending = client.submit(_fsync(i))
            ev = pending.wait(10.0)
            ident = getattr(ev, "id", None)
            if not isinstance(ev, Ack) or ident is None:
                errors.append(f"writer {n} op {i}: {ev!r}")
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    assert client.in_flight() == 0
    assert client.frames_sent == 6 * 300


def test_answers_nobody_waits_for_are_read(links: tuple[Link, Link, list[str]]) -> None:
    client, _server, _ = links
    seen: list[Event | None] = []
    done = threading.Event()

    def on_result(ev: Event | None) -> None:
        seen.append(ev)
        if len(seen) == 20:
            done.set()

    for i in range(20):
        client.submit(_fsync(i), on_result)
    assert done.wait(10.0), f"only {len(seen)} of 20 answers were read by the watcher"
    assert all(isinstance(ev, Ack) for ev in seen)
    assert client.wait_idle(5.0)
    assert client.in_flight() == 0


def test_wait_idle_reads_the_answers_itself(links: tuple[Link, Link, list[str]]) -> None:
    client, _server, _ = links
    tickets = [client.submit(_fsync(i)) for i in range(50)]
    assert client.wait_idle(10.0)
    assert all(t.done for t in tickets)
    assert all(isinstance(t.wait(1.0), Ack) for t in tickets)


def test_idle_hang_up_is_noticed(links: tuple[Link, Link, list[str]]) -> None:
    client, server, closed = links
    assert isinstance(client.submit(_fsync(0)).wait(5.0), Ack)
    server.close("peer goes away")
    deadline = time.monotonic() + 10.0
    while not client.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.closed, "the client never noticed the hang-up of an idle link"
    assert closed and "closed" in closed[0]
    with pytest.raises(ChannelError, match="link closed"):
        client.submit(_fsync(1)).wait(1.0)


def test_silent_peer_times_out_and_close_wakes_waiters() -> None:
    release = threading.Event()

    def stall(ev: Event) -> Event | None:
        release.wait(20.0)
        return _ack(ev)

    client, server, _ = _pair(stall)
    try:
        with pytest.raises(ChannelError, match=r"no answer within 0\.3 s"):
            client.submit(_fsync(0)).wait(0.3)
        # a second waiter asleep behind a reader: close() wakes both with the reason
        results: list[str] = []

        def waiter() -> None:
            try:
                client.submit(_fsync(1)).wait(15.0)
                results.append("answered")
            except ChannelError as exc:
                results.append(str(exc))

        threads = [threading.Thread(target=waiter) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        client.close("admin stop")
        for t in threads:
            t.join(10.0)
        assert results == ["link closed: admin stop"] * 2
    finally:
        release.set()
        client.close("test over")
        server.close("test over")
        client.join(5.0)
        server.join(5.0)


def test_a_resync_answer_goes_out_before_the_ops_queued_behind_it_are_applied() -> None:
    """The resync source blocks on a query's answer and only counts acks: the secondary
    writes that answer at once, not when it has applied every frame it already holds."""
    r0_holds, r1_holds = threading.Event(), threading.Event()

    def handler(ev: Event) -> Event | None:
        if isinstance(ev, ResyncQuery):
            return ResyncReply(ev.id, 0, b"stat")
        assert isinstance(ev, Request) and isinstance(ev.op, ops.Chmod)
        hold = r0_holds if ev.op.path == b"f0" else r1_holds
        hold.wait(10.0)  # bounded: the test releases it
        return Ack(ev.id)

    def chmod(i: int) -> Callable[[int], Event]:  # an op that flushes nothing before it
        return lambda ident: Request(ident, ops.Chmod(b"f%d" % i, 0o644))

    client, server, _closed = _pair(handler)
    try:
        first = client.submit(chmod(0))  # held until the query and the next op are queued
        query = client.submit(lambda i: ResyncQuery(i, 1, b"f", 0, 0))
        second = client.submit(chmod(1))  # held until the test saw the query's answer
        r0_holds.set()
        answer = query.wait(5.0)  # without the early write: stuck behind the held op
        assert answer == ResyncReply(answer.id, 0, b"stat")
        assert not second.done
        r1_holds.set()
        assert isinstance(first.wait(5.0), Ack) and isinstance(second.wait(5.0), Ack)
    finally:
        r0_holds.set()
        r1_holds.set()
        client.close("test over")
        server.close("test over")
        client.join(5.0)
        server.join(5.0)


def test_the_idle_hook_runs_after_the_answers_are_out() -> None:
    """``on_idle`` (the receiver's early writeback) runs once a burst is answered: an ack
    never waits for it."""
    idle_may_return = threading.Event()
    handled: list[int] = []
    idle_after: list[int] = []

    def handler(ev: Event) -> Event | None:
        handled.append(1)
        return _ack(ev)

    def on_idle() -> None:  # also runs before any frame came: then it does not block
        if handled:
            idle_after.append(len(handled))
            idle_may_return.wait(10.0)  # held until the test saw the ack

    client, server, _closed = _pair(handler, on_idle)
    try:
        answer = client.submit(_fsync(0)).wait(5.0)  # answered while on_idle is held
        assert isinstance(answer, Ack)
        deadline = time.monotonic() + 5.0
        while not idle_after and time.monotonic() < deadline:
            time.sleep(0.01)
        assert idle_after == [1]
    finally:
        idle_may_return.set()
        client.close("test over")
        server.close("test over")
        client.join(5.0)
        server.join(5.0)
