"""Split-brain witness probe: the logic with a fake prober, real ping/TCP on loopback only."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.cluster import witness as w
from app.cluster.witness import Witness, WitnessAnswer

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


class FakeProber:
    """Answers per address: True/False immediately, or None to hang until cancelled."""

    def __init__(self, answers: dict[str, bool | None]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, int]] = []
        self.cancelled: list[str] = []

    async def _answer(self, address: str) -> tuple[bool, str]:
        answer = self.answers[address]
        if answer is None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.append(address)
                raise
        return bool(answer), "fake answer" if answer else "fake silence"

    async def ping(self, address: str, timeout: float) -> tuple[bool, str]:
        self.calls.append(("ping", address, 0))
        return await self._answer(address)

    async def tcp(self, address: str, port: int, timeout: float) -> tuple[bool, str]:
        self.calls.append(("tcp", address, port))
        return await self._answer(address)


# ---------------------------------------------------------------- parsing


def test_methods_parse() -> None:
    assert w.parse_method("ping") == ("ping", 0)
    assert w.parse_method("tcp:22") == ("tcp", 22)
    for bad in ("icmp", "tcp:", "tcp:0", "tcp:70000", "tcp:x", "TCP:22", "udp:53"):
        with pytest.raises(w.WitnessError, match="neither 'ping' nor 'tcp:PORT'"):
            w.parse_method(bad)


def test_witnesses_are_ip_addresses() -> None:
    assert w.make_witnesses(["198.18.1.254", "::1"], "tcp:80") == (
        Witness("198.18.1.254", "tcp", 80),
        Witness("::1", "tcp", 80),
    )
    with pytest.raises(w.WitnessError, match=r"'router\.lan' is not an IP address"):
        w.make_witnesses(["router.lan"])


def test_bad_spec_raises_before_any_probe() -> None:
    fake = FakeProber({})
    with pytest.raises(w.WitnessError):
        run(w.probe(["198.18.1.254"], 1.0, "tcp:0", prober=fake))
    assert fake.calls == []


# ---------------------------------------------------------------- logic (fake prober)


def test_any_answer_is_enough_and_the_rest_is_cancelled() -> None:
    fake = FakeProber({"198.18.1.254": None, "198.18.2.254": True})
    answer = run(w.probe(["198.18.1.254", "198.18.2.254"], 3600.0, prober=fake))
    assert answer.reachable
    assert answer.answered == (Witness("198.18.2.254"),)
    assert answer.reason == "witness 198.18.2.254 answers"
    assert fake.cancelled == ["198.18.1.254"]  # did not wait an hour for it
    assert answer.results[0].detail == "not needed: another witness answered"


def test_no_answer_names_every_witness() -> None:
    fake = FakeProber({"198.18.1.254": False, "198.18.2.254": False})
    answer = run(w.probe(["198.18.1.254", "198.18.2.254"], 5.0, "tcp:22", prober=fake))
    assert not answer.reachable and answer.answered == ()
    assert fake.calls == [("tcp", "198.18.1.254", 22), ("tcp", "198.18.2.254", 22)]
    assert "198.18.1.254 tcp:22: fake silence" in answer.reason
    assert "198.18.2.254 tcp:22: fake silence" in answer.reason


def test_silent_witnesses_are_given_up_after_the_timeout() -> None:
    fake = FakeProber({"198.18.1.254": None, "198.18.2.254": False})
    answer = run(w.probe(["198.18.1.254", "198.18.2.254"], 0.2, prober=fake))
    assert not answer.reachable
    assert answer.results[0].detail == "no answer in time"
    assert answer.results[1].detail == "fake silence"
    assert fake.cancelled == ["198.18.1.254"]


def test_no_witness_is_not_reachable() -> None:
    answer = run(w.probe([], 1.0, prober=FakeProber({})))
    assert answer == WitnessAnswer(False, (), "no witness configured")


def test_mixed_witness_objects() -> None:
    fake = FakeProber({"198.18.1.254": False, "198.18.2.254": True})
    specs = [Witness("198.18.1.254"), Witness("198.18.2.254", "tcp", 443)]
    assert run(w.probe(specs, 5.0, prober=fake)).reachable
    assert fake.calls == [("ping", "198.18.1.254", 0), ("tcp", "198.18.2.254", 443)]


# ---------------------------------------------------------------- real probes, loopback only

needs_ping = pytest.mark.skipif(
    shutil.which("ping") is None, reason="the ping command (iputils-ping) is not installed"
)
needs_root_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip to make a private network namespace whose "
    "net.ipv4.ping_group_range allows ICMP sockets",
)


@needs_ping
def test_ping_command_reaches_loopback() -> None:
    prober = w.SystemProber(use_icmp_socket=False)
    answer = run(w.probe(["127.0.0.1"], 5.0, prober=prober))
    assert answer.reachable, answer.reason


def test_tcp_connect_to_a_listening_port_answers_a_closed_one_does_not() -> None:
    async def scenario() -> tuple[WitnessAnswer, WitnessAnswer]:
        async def accept(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            up = await w.probe(["127.0.0.1"], 5.0, f"tcp:{port}")
        finally:
            server.close()
            await server.wait_closed()
        down = await w.probe(["127.0.0.1"], 5.0, f"tcp:{port}")
        return up, down

    up, down = run(scenario())
    assert up.reachable, up.reason
    assert not down.reachable and "refused" in down.reason


def test_a_hanging_ping_command_is_killed_at_the_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = tmp_path / "ping"
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 600\n")
    script.chmod(0o755)
    prober = w.SystemProber(ping_command=str(script), use_icmp_socket=False)
    answer = run(w.probe(["127.0.0.1"], 0.5, prober=prober))
    assert not answer.reachable
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the ping process was left running"


_NETNS_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from app.cluster import witness as w

    async def main():
        icmp = w.SystemProber(ping_command="/bin/false")  # must not fall back to the command
        up = await w.probe(["127.0.0.1"], 5.0, prober=icmp)
        down = await w.probe(["198.18.0.2"], 0.5, prober=icmp)
        cmd = w.SystemProber(use_icmp_socket=False)
        down_cmd = await w.probe(["198.18.0.2"], 1.0, prober=cmd)
        print(up.reachable, up.results[0].detail)
        print(down.reachable, down.results[0].detail)
        print(down_cmd.reachable, down_cmd.results[0].detail)

    asyncio.run(main())
    """
)


@needs_ping
@needs_root_netns
def test_icmp_socket_in_a_private_namespace() -> None:
    """In-process ICMP in a throw-away network namespace, where 198.18.0.2 is routed into lo
    and never answers; the namespace disappears with the process."""
    setup = (
        "ip link set lo up && "
        "sysctl -q -w net.ipv4.ping_group_range='0 2147483647' && "
        "ip route add 198.18.0.0/24 dev lo && "
        f'exec {sys.executable} -c "$0"'
    )
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, _NETNS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    up, down, down_cmd = proc.stdout.splitlines()
    assert up.startswith("True echo reply in")
    assert down.startswith("False no echo reply within")
    assert down_cmd.startswith("False no echo reply")
