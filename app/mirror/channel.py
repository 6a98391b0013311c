"""The replication channel: TCP sockets, threads and framing around ``protocol.Connection``.

How it works
    ``handshake(sock, conn, timeout)`` runs the mutual HMAC handshake on a blocking socket
    (bounded by ``timeout``). A ``Link`` then owns the authenticated socket with two threads:
    the sender finishes what could not be written at once, the reader feeds the Connection
    and dispatches: Ack/Nack/ResyncReply resolve the ``Pending`` of their id; Requests, resync
    queries and Pings go to ``handler(event) -> reply`` in the reader thread, in stream order
    (the secondary applies ops there), and ``on_idle()`` runs in the reader once the answers
    of a burst are written. ``Link.submit(make)`` allocates the next id, encodes and
    queues the frame under one lock, so frames leave in the order of the calls: callers that
    need an order across threads (the replicator) call it under their own ordering lock and
    wait for the answer outside it (pipelining).

    Sending (the hot path): the thread that queues a frame, when nobody is sending, writes
    the queue itself with a non-blocking ``send`` (every frame queued meanwhile by other
    threads goes in the same call); only what the socket buffer cannot take is handed to the
    sender thread, which blocks in ``sendall``. So a caller never blocks on the socket (a
    frozen peer is caught by the caller's answer timeout, as before) and a small frame costs
    no thread switch. The reader queues its replies and writes them when it has no complete
    frame left to handle, and before handling an Fsync (which may take long): acks of a burst
    go out in one write, and still only after their op was applied. A resync query's answer
    goes out at once (with the acks before it): the source blocks on it, while the source
    only counts acks.

    Receiving on a link without a handler (the primary's: every frame it gets answers one of
    its own requests): the thread that waits for an answer reads the socket itself, with
    no reader thread in between ("leader/follower"). ``Pending.wait`` takes the read side
    when it is free and reads and dispatches until its own answer is in (answers to other
    waiters included, who are then woken); when another thread holds the read side, it
    waits to be woken by it. A round trip then costs no thread switch on this side. The
    link's watcher thread polls the socket for the peer's hang-up only (POLLRDHUP, not
    data), so a peer that closes an idle link is noticed at once; every 100 ms it also
    reads what no waiter is there to read (answers whose submitter does not wait).
    A link with a handler (the secondary's) keeps one reader thread that applies requests
    in stream order.

    ``connect(host, port, conn, timeout)`` and ``Listener`` make the sockets (TCP_NODELAY,
    SO_KEEPALIVE with short probes). The listener authenticates each client in its own thread
    and hands only authenticated links to ``on_link``; anything else is closed and counted.

Exceptions: ``ChannelError`` (closed, refused, timed out), ``ProtocolError``/``AuthError`` from
the handshake (errors.py). The threads never raise: a failure closes the link with a reason.

Limits: no TLS (the HMAC handshake authenticates; frames are not encrypted nor MACed
individually, so an on-path attacker who can inject TCP segments is out of scope); one
outstanding queue per link without a byte bound (callers bound their windows).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from app.mirror import ops
from app.mirror.errors import ChannelError, MirrorError, ProtocolError
from app.mirror.protocol import (
    Ack,
    Connection,
    ConnectionClosed,
    Event,
    Hello,
    Nack,
    Ping,
    Pong,
    Request,
    ResyncReply,
)

_RECV = 1 << 20
_READ_SLICE_S = 0.1  # a leader's blocking read returns at least this often (SO_RCVTIMEO)
_WATCH_MS = 100  # the watcher's poll period: idle hang-ups are seen at once, orphans by then
Handler = Callable[[Event], Event | None]


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def handshake(sock: socket.socket, conn: Connection, timeout: float) -> None:
    """Authenticate both ways; ProtocolError/AuthError or ChannelError on failure."""
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(conn.send(conn.hello()))
        for _ in range(64):
            while not conn.authenticated:
                ev = conn.next_event()
                if ev is None:
                    break
                if isinstance(ev, ConnectionClosed):
                    raise ChannelError("peer closed the connection during the handshake")
                if isinstance(ev, Hello):
                    sock.sendall(conn.send(conn.auth()))
            if conn.authenticated:
                sock.settimeout(None)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            conn.receive_data(sock.recv(65536))
    except OSError as exc:
        raise ChannelError(f"handshake failed: {exc}") from exc
    raise ChannelError(f"handshake not done after {timeout} s")


class Pending:
    """The answer to one submitted frame; ``wait`` returns it or raises ChannelError.

    A lock held from creation and released by ``resolve``: one primitive per frame, and the
    waiter wakes with no Condition in between.
    """

    __slots__ = ("_done", "_error", "_gate", "_link", "_result", "on_result")

    def __init__(self, link: Link | None = None) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()
        self._link = link  # set: the waiter reads the link itself (Link._await)
        self._done = False
        self._result: Event | None = None
        self._error: str | None = None
        self.on_result: Callable[[Event | None], None] | None = None

    def resolve(self, result: Event | None, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True  # resolved once: by the reader, or by close() after a pop
        self._result, self._error = result, error
        if self.on_result is not None:
            with contextlib.suppress(Exception):
                self.on_result(result)
        self._gate.release()

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float) -> Event:
        link = self._link
        if link is not None and not self._done:
            link._await(self, timeout)
            if not self._done and not link.closed:
                raise ChannelError(f"no answer within {timeout} s")
            # answered or failed by close(): the gate opens as soon as resolve() returns
        if not self._gate.acquire(timeout=max(0.0, timeout)):
            raise ChannelError(f"no answer within {timeout} s")
        self._gate.release()  # let another wait() (or a second call) see it too
        if self._result is None:
            raise ChannelError(self._error or "connection closed")
        return self._result


class Link:
    """An authenticated connection with its sender and reader threads."""

    def __init__(
        self,
        sock: socket.socket,
        conn: Connection,
        *,
        handler: Handler | None = None,
        on_close: Callable[[Link, str], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        log: logging.Logger | None = None,
        name: str = "link",
    ) -> None:
        self.sock = sock
        self.conn = conn
        self.name = name
        self.handler = handler
        self.on_close = on_close
        self.on_idle = on_idle
        self.log = log or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._out_lock = threading.Lock()
        self._out: list[bytes | memoryview] = []  # frames not written yet, in order
        self._sending = False  # a thread owns the socket's sending side (see _write_out)
        self._handoff = threading.Event()  # the sender thread owns it: finish with sendall
        self._replies = False  # the reader queued replies it has not written yet
        self._closed = threading.Event()
        self.close_reason = ""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        # the read side: with no handler, waiters read (see the module docstring)
        self._waiters_read = handler is None
        self._rcond = threading.Condition(threading.Lock())
        self._reading = False  # a thread holds the read side
        self._sleepers = 0  # waiters asleep on _rcond until the reader wakes them
        self._rbuf = bytearray(_RECV)  # the receive buffer: the Connection copies from it
        self._rview = memoryview(self._rbuf)
        reader = self._watch_loop if self._waiters_read else self._read_loop
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"{name}:send", daemon=True),
            threading.Thread(target=reader, name=f"{name}:read", daemon=True),
        ]
        if self._waiters_read:
            # a leader's blocking recv returns at least every _READ_SLICE_S (EAGAIN), so a
            # deadline is checked without making the socket non-blocking for everybody
            usec = int(_READ_SLICE_S * 1e6)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, usec))

    def start(self) -> Link:
        for t in self._threads:
            t.start()
        return self

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until every submitted frame is answered."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            with self._lock:
                newest = self._pending[max(self._pending)] if self._pending else None
            if newest is None:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._waiters_read:
                with contextlib.suppress(ChannelError):
                    newest.wait(left)  # answers come in order: the newest is the last
            else:
                time.sleep(0.002)
        return False

    def submit(
        self,
        make: Callable[[int], Event],
        on_result: Callable[[Event | None], None] | None = None,
    ) -> Pending:
        """Queue ``make(id)`` and return its Pending (already failed if the link is closed).

        ``on_result(answer or None)`` runs in the thread that reads the answer (the reader
        thread, a waiter holding the read side or the watcher) before waiters wake up.
        """
        pending = Pending(self if self._waiters_read else None)
        pending.on_result = on_result
        with self._lock:
            if self._closed.is_set():
                pending.resolve(None, f"link closed: {self.close_reason}")
                return pending
            ident = next(self._ids)
            try:
                data = self.conn.send(make(ident))
            except ProtocolError as exc:
                pending.resolve(None, f"cannot send: {exc}")
                return pending
            self._pending[ident] = pending
            self.frames_sent += 1
            mine = self._enqueue(data)
        if mine:
            self._write_out()
        return pending

    def _send_reply(self, event: Event) -> None:
        """Queue a reply (reader thread); ``_flush_replies`` writes it."""
        with self._lock:
            if self._closed.is_set():
                return
            data = self.conn.send(event)
            with self._out_lock:
                self._out.append(data)
        self._replies = True

    def _flush_replies(self) -> None:
        if self._replies:
            self._replies = False
            with self._out_lock:
                mine = bool(self._out) and not self._sending
                if mine:
                    self._sending = True
            if mine:
                self._write_out()

    def _enqueue(self, data: bytes) -> bool:
        """Queue ``data`` (caller holds ``_lock``); True: the caller must now write it out."""
        with self._out_lock:
            self._out.append(data)
            if self._sending:
                return False
            self._sending = True
            return True

    def _take_out(self) -> bytes | memoryview | None:
        """Everything queued, as one buffer; None (and the socket released) when empty."""
        with self._out_lock:
            if not self._out:
                self._sending = False
                return None
            out = self._out
            self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _write_out(self) -> None:
        """Write the queue without blocking; the sender thread takes over what is left."""
        while not self._closed.is_set():
            data = self._take_out()
            if data is None:
                return
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            self.bytes_sent += sent
            if sent < len(data):
                with self._out_lock:
                    self._out.insert(0, memoryview(data)[sent:])
                self._handoff.set()  # the sender thread owns the socket now
                return

    def close(self, reason: str) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self.close_reason = reason
            self._closed.set()
            pending, self._pending = self._pending, {}
            self._handoff.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for p in pending.values():
            p.resolve(None, f"link closed: {reason}")
        with self._rcond:
            self._rcond.notify_all()  # waiters asleep for the read side see the close
        if self.on_close is not None:
            with contextlib.suppress(Exception):
                self.on_close(self, reason)

    def join(self, timeout: float) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _send_loop(self) -> None:
        """Finish, blocking, what a caller could not write at once (it handed us the socket)."""
        try:
            while True:
                self._handoff.wait()
                self._handoff.clear()
                while not self._closed.is_set():
                    data = self._take_out()
                    if data is None:
                        break
                    self.sock.sendall(data)
                    self.bytes_sent += len(data)
                if self._closed.is_set():
                    return
        except OSError as exc:
            self.close(f"send failed: {exc}")

    def _read_loop(self) -> None:
        """The reader thread of a link with a handler: read, apply in order, answer."""
        rview = self._rview
        try:
            for _ in itertools.count():
                ev = self.conn.next_event()
                if ev is None:
                    self._flush_replies()  # nothing left to apply: acknowledge the burst
                    if self.on_idle is not None:
                        self.on_idle()  # after the acks: nobody waits for this
                    n = self.sock.recv_into(rview)
                    self.bytes_received += n
                    self.conn.receive_data(rview[:n])
                    continue
                if type(ev) is ConnectionClosed:
                    self.close("peer closed the connection")
                    return
                self._dispatch(ev)
        except (OSError, MirrorError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a handler bug: the link dies loudly, nothing half done
            self.log.exception("%s: reader failed", self.name)
            self.close(f"internal error: {exc!r}")

    def _read_round(self, block: bool) -> None:
        """Holding the read side: dispatch what is complete, else read once and dispatch.

        ``block``: wait for data (at most _READ_SLICE_S); else take only what is there.
        Never raises: a failure closes the link (which fails every Pending).
        """
        try:
            ev = self.conn.next_event()
            if ev is None:
                flags = 0 if block else socket.MSG_DONTWAIT
                try:
                    n = self.sock.recv_into(self._rview, 0, flags)
                except (BlockingIOError, InterruptedError, TimeoutError):
                    return
                self.bytes_received += n
                self.conn.receive_data(self._rview[:n])
                ev = self.conn.next_event()
            while ev is not None:
                if type(ev) is ConnectionClosed:
                    self.close("peer closed the connection")
                    return
                self._dispatch(ev)
                ev = self.conn.next_event()
        except (OSError, MirrorError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a callback bug: the link dies loudly, nothing half done
            self.log.exception("%s: reader failed", self.name)
            self.close(f"internal error: {exc!r}")

    def _take_read_side(self, pending: Pending | None, deadline: float) -> bool:
        """True: the caller now holds the read side. False: ``pending`` got its answer
        meanwhile, the link closed, or the deadline passed."""
        with self._rcond:
            while self._reading:
                left = deadline - time.monotonic()
                if (pending is not None and pending.done) or self.closed or left <= 0:
                    return False
                self._sleepers += 1
                try:
                    self._rcond.wait(left)
                finally:
                    self._sleepers -= 1
            if (pending is not None and pending.done) or self.closed:
                return False
            self._reading = True
            return True

    def _give_read_side(self) -> None:
        with self._rcond:
            self._reading = False
            if self._sleepers:
                self._rcond.notify_all()  # their answers may be in, or one of them reads next

    def _await(self, pending: Pending, timeout: float) -> None:
        """Read the link until ``pending`` is answered, the link closes or time is up."""
        deadline = time.monotonic() + timeout
        closed = self._closed.is_set
        while not pending._done and not closed() and time.monotonic() < deadline:
            if not self._take_read_side(pending, deadline):
                continue
            try:
                while not pending._done and not closed():
                    self._read_round(block=True)
                    if self._sleepers or time.monotonic() >= deadline:
                        break  # wake the others now: their answers may be in this round
            finally:
                self._give_read_side()

    def _watch_loop(self) -> None:
        """The watcher of a waiter-read link: a hang-up closes it; orphan answers are read."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLERR | select.POLLHUP)
        try:
            while not self.closed:
                hung_up = bool(poller.poll(_WATCH_MS))
                if self.closed:
                    return
                with self._lock:
                    orphans = bool(self._pending)
                if not hung_up and not orphans:
                    continue
                # bounded: a hang-up ends in EOF (or an error) once the data before it is read
                if self._take_read_side(None, time.monotonic() + _READ_SLICE_S):
                    try:
                        self._read_round(block=hung_up)
                    finally:
                        self._give_read_side()
        except (OSError, ValueError) as exc:
            self.close(f"watcher failed: {exc}")

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, (Ack, Nack, ResyncReply, Pong)):  # a tuple: faster than a union
            with self._lock:
                pending = self._pending.pop(ev.id, None)
            if pending is not None:
                pending.resolve(ev)
            return
        if isinstance(ev, Ping):
            self._send_reply(Pong(ev.id))
            return
        if self.handler is None:
            raise ProtocolError(f"unexpected {type(ev).__name__}")
        if isinstance(ev, Request) and isinstance(ev.op, ops.Fsync):
            self._flush_replies()  # a disk flush may take long: do not hold earlier acks
        reply = self.handler(ev)
        if reply is None:
            raise ProtocolError(f"no answer for {type(ev).__name__}")
        self._send_reply(reply)
        if isinstance(reply, ResyncReply):
            self._flush_replies()  # a resync query's answer: the source waits for it


def connect(host: str, port: int, conn: Connection, timeout: float) -> socket.socket:
    """A TCP connection to host:port, authenticated; ChannelError/ProtocolError otherwise."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        tune(sock)
        handshake(sock, conn, timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts connections on host:port; ``on_link(sock, conn)`` gets authenticated ones."""

    def __init__(
        self,
        host: str,
        port: int,
        make_conn: Callable[[], Connection],
        on_link: Callable[[socket.socket, Connection], None],
        *,
        handshake_timeout: float = 5.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.log = log or logging.getLogger(__name__)
        self._make_conn = make_conn
        self._on_link = on_link
        self._timeout = handshake_timeout
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self.rejected = 0
        self.last_reject = ""
        self._thread = threading.Thread(target=self._loop, name=f"listen:{port}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            threading.Thread(
                target=self._authenticate, args=(sock, addr), name="auth", daemon=True
            ).start()

    def _authenticate(self, sock: socket.socket, addr: object) -> None:
        try:
            tune(sock)
            conn = self._make_conn()
            handshake(sock, conn, self._timeout)
        except (MirrorError, OSError) as exc:
            self.rejected += 1
            self.last_reject = f"{addr}: {exc}"
            self.log.warning("replication connection from %s refused: %s", addr, exc)
            sock.close()
            return
        if self._stop.is_set():
            sock.close()
            return
        self._on_link(sock, conn)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(2.0)
