"""Split-brain checker probe: can this node reach a witness (typically the router)?

How it works
------------
When the peer is lost, both nodes probe the witnesses; the one that reaches a witness may run
alone, the other waits. ``probe(witnesses, timeout, method)`` probes every witness at once and
answers ``reachable`` as soon as one of them answers (the others are cancelled); otherwise when
all failed or when ``timeout`` seconds have passed, whichever comes first. The whole call is
bounded by ``timeout`` plus the time to cancel and reap (a killed ``ping`` process).

Methods (as in the config's ``splitbrain.method``):

* ``ping``: one ICMP echo. With an unprivileged ICMP socket (``SOCK_DGRAM``/``IPPROTO_ICMP``,
  allowed when our group is in ``net.ipv4.ping_group_range``) the probe is done in process;
  otherwise ``ping -n -c 1 -W <s>`` is run (iputils; needs root or its file capability). An
  answer is an echo reply with our sequence number and payload; an ICMP error from a router on
  the way (host unreachable) is not an answer.
* ``tcp:PORT``: a TCP connection to the witness completes. A refused connection is *not* an
  answer: a RST can come from a local firewall rule, and calling a witness reachable by mistake
  on both nodes would make two primaries; when in doubt the node waits.

The outside world sits behind ``Prober`` (``ping``/``tcp`` coroutines returning
``(answered, detail)``); ``SystemProber`` is the real one, unit tests pass a fake.

Exception tree
--------------
::

    ClusterError (errors.py)
     +-- WitnessError   a witness or method that cannot be parsed (names the value)

Probing never raises for network reasons: a failure is a witness that did not answer, with the
reason in ``WitnessResult.detail``.

Limits
------
Witnesses are IP literals (no DNS: a resolver that hangs would stall the decision). In-process
ICMP is IPv4 only; an IPv6 witness is pinged with ``ping -6``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import shutil
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.cluster.errors import ClusterError

PING = "ping"
TCP = "tcp"


class WitnessError(ClusterError):
    """A witness specification that cannot be used."""


@dataclass(frozen=True, slots=True)
class Witness:
    address: str
    method: str = PING  # PING or TCP
    port: int = 0  # TCP only

    def __str__(self) -> str:
        return f"{self.address} tcp:{self.port}" if self.method == TCP else self.address


@dataclass(frozen=True, slots=True)
class WitnessResult:
    witness: Witness
    answered: bool
    detail: str  # "echo reply in 0.4 ms", "no answer within 2.0 s", "connection refused", ...


@dataclass(frozen=True, slots=True)
class WitnessAnswer:
    """``reachable`` if any witness answered; ``reason`` is one sentence for the decision log."""

    reachable: bool
    results: tuple[WitnessResult, ...]
    reason: str

    @property
    def answered(self) -> tuple[Witness, ...]:
        return tuple(r.witness for r in self.results if r.answered)


def parse_method(method: str) -> tuple[str, int]:
    """``"ping"`` -> (PING, 0); ``"tcp:PORT"`` -> (TCP, PORT). Raises ``WitnessError``."""
    if method == PING:
        return PING, 0
    kind, _, port_text = method.partition(":")
    if kind == TCP and port_text.isdigit() and 1 <= int(port_text) <= 65535:
        return TCP, int(port_text)
    raise WitnessError(f"witness method {method!r} is neither 'ping' nor 'tcp:PORT'")


def make_witnesses(addresses: Sequence[str], method: str = PING) -> tuple[Witness, ...]:
    """Witnesses from the config's addresses and method. Raises ``WitnessError``."""
    kind, port = parse_method(method)
    result = []
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise WitnessError(f"witness {address!r} is not an IP address") from exc
        result.append(Witness(address, kind, port))
    return tuple(result)


class Prober(Protocol):
    async def ping(self, address: str, timeout: float) -> tuple[bool, str]: ...

    async def tcp(self, address: str, port: int, timeout: float) -> tuple[bool, str]: ...


# ---------------------------------------------------------------- the probe


async def probe(
    witnesses: Sequence[Witness | str],
    timeout: float,
    method: str = PING,
    *,
    prober: Prober | None = None,
) -> WitnessAnswer:
    """Probe every witness at once; reachable as soon as one answers. Bounded by ``timeout``.

    Plain strings are addresses probed with ``method``. Raises ``WitnessError`` only for a bad
    specification, before any probe is sent.
    """
    items = tuple(
        w if isinstance(w, Witness) else make_witnesses([w], method)[0] for w in witnesses
    )
    if not items:
        return WitnessAnswer(False, (), "no witness configured")
    real = prober if prober is not None else SystemProber()
    # Each probe gets a little less than the whole budget, so that it reports its own reason
    # ("no echo reply within ...") before the overall deadline cuts it short.
    tasks = {asyncio.create_task(_one(real, w, timeout * 0.9)): w for w in items}
    done_results: dict[Witness, WitnessResult] = {}
    try:
        pending = set(tasks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                break
            done, pending = await asyncio.wait(
                pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                done_results[tasks[task]] = task.result()
            if any(r.answered for r in done_results.values()):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    answered = any(r.answered for r in done_results.values())
    results = tuple(
        done_results.get(w)
        or WitnessResult(
            w, False, "not needed: another witness answered" if answered else "no answer in time"
        )
        for w in items
    )
    if answered:
        who = ", ".join(str(r.witness) for r in results if r.answered)
        reason = f"witness {who} answers"
    else:
        details = "; ".join(f"{r.witness}: {r.detail}" for r in results)
        reason = f"no witness answers within {timeout:g} s ({details})"
    return WitnessAnswer(answered, results, reason)


async def _one(prober: Prober, witness: Witness, timeout: float) -> WitnessResult:
    if witness.method == TCP:
        ok, detail = await prober.tcp(witness.address, witness.port, timeout)
    else:
        ok, detail = await prober.ping(witness.address, timeout)
    return WitnessResult(witness, ok, detail)


# ---------------------------------------------------------------- the real prober


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _icmp_socket() -> socket.socket | None:
    """An unprivileged ICMP socket, or None when ping_group_range does not allow it."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    except OSError:
        return None


class SystemProber:
    """Real probes: in-process ICMP when allowed, else the ``ping`` command; TCP connect."""

    def __init__(self, ping_command: str | None = None, use_icmp_socket: bool = True) -> None:
        self.ping_command = ping_command
        self.use_icmp_socket = use_icmp_socket

    async def ping(self, address: str, timeout: float) -> tuple[bool, str]:
        if self.use_icmp_socket and ipaddress.ip_address(address).version == 4:
            sock = _icmp_socket()
            if sock is not None:
                with sock:
                    return await self._icmp(sock, address, timeout)
        return await self._ping_command(address, timeout)

    async def _icmp(self, sock: socket.socket, address: str, timeout: float) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        seq = int.from_bytes(os.urandom(2), "big")
        payload = os.urandom(16)
        header = struct.pack("!BBHHH", 8, 0, 0, 0, seq)  # the kernel sets the identifier
        packet = header[:2] + struct.pack("!H", _checksum(header + payload)) + header[4:] + payload
        start = loop.time()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendto(sock, packet, (address, 0))
                while True:
                    data = await loop.sock_recv(sock, 2048)
                    if len(data) >= 8 and data[0] == 0 and data[8:] == payload:
                        (got_seq,) = struct.unpack("!H", data[6:8])
                        if got_seq == seq:
                            ms = (loop.time() - start) * 1000
                            return True, f"echo reply in {ms:.1f} ms"
        except TimeoutError:
            return False, f"no echo reply within {timeout:g} s"
        except OSError as exc:
            return False, f"ping failed: {exc.strerror or exc}"

    async def _ping_command(self, address: str, timeout: float) -> tuple[bool, str]:
        command = self.ping_command or shutil.which("ping")
        if command is None:
            return False, "no ICMP socket allowed and no ping command found"
        family = "-6" if ipaddress.ip_address(address).version == 6 else "-4"
        wait = str(max(1, math.ceil(timeout)))
        try:
            proc = await asyncio.create_subprocess_exec(
                command, family, "-n", "-q", "-c", "1", "-W", wait, "--", address,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            return False, f"cannot run {command}: {exc.strerror or exc}"
        try:
            async with asyncio.timeout(timeout):
                _, err = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False, f"no echo reply within {timeout:g} s"
        if proc.returncode == 0:
            return True, "echo reply (ping command)"
        text = err.decode(errors="replace").strip().splitlines()
        why = text[-1] if text else f"ping exited with {proc.returncode}"
        return False, f"no echo reply: {why}"

    async def tcp(self, address: str, port: int, timeout: float) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(address, port)
        except TimeoutError:
            return False, f"no TCP answer on port {port} within {timeout:g} s"
        except ConnectionRefusedError:
            return False, f"connection to port {port} refused (not counted as an answer)"
        except OSError as exc:
            return False, f"TCP port {port}: {exc.strerror or exc}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, f"TCP port {port} connected in {(loop.time() - start) * 1000:.1f} ms"
