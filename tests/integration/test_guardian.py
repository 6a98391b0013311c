"""The guardian fences the application (and the VIP) when its daemon dies or freezes.

A stand-in daemon (a small Python process, below) starts the guardian, starts a dummy
application (``sleep 300`` in its own process group), optionally claims a VIP in a network
namespace, and feeds the guardian every 0.2 s. The test kills, stops or cleanly shuts down that
daemon and checks what a user would: is the application still running, is the VIP still there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.cluster.guardian import (
    GuardianClient,
    GuardianError,
    VipSpec,
    decode_message,
    encode_feed,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VIP = "198.18.200.100"

DAEMON = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
from app.cluster.guardian import GuardianClient, GuardianError, VipSpec

state = Path(sys.argv[1])
with_vip = sys.argv[2] == "vip"
clean_stop_after = float(sys.argv[3])
fence = ["sh", "-c", 'echo "$MIRRORHA_FENCE_REASON" > "$0"', str(state / "fence-command-ran")]
client = GuardianClient(state, deadline_s=1.0, kill_grace_s=1.0, fence_command=fence)
client.start()
app = subprocess.Popen(["sleep", "300"], start_new_session=True)
vip = None
if with_vip:
    from app.cluster.vip import Vip
    vip = VipSpec("198.18.200.100", 24, "vip-a")
    client.feed(vip, [app.pid])  # feed the intent before claiming
    Vip(vip.address, vip.prefix, vip.interface).claim()
client.feed(vip, [app.pid])
(state / "daemon.json").write_text(json.dumps(
    {"daemon": os.getpid(), "guardian": client.pid, "app": app.pid}))
started = time.monotonic()
while time.monotonic() - started < 120:
    if clean_stop_after and time.monotonic() - started > clean_stop_after:
        client.stop()
        (state / "outcome").write_text("stopped")
        break
    try:
        client.feed(vip, [app.pid])
    except GuardianError as exc:
        (state / "outcome").write_text(f"fenced={client.fenced()}: {exc}")
        break
    time.sleep(0.2)
"""


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def eventually(check: Callable[[], bool], limit_s: float = 20.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class Daemon:
    def __init__(self, state: Path, netns: str | None = None) -> None:
        self.state = state
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: dict[str, int] = {}

    def start(self, clean_stop_after: float = 0.0) -> None:
        argv = [sys.executable, "-c", DAEMON, str(self.state)]
        argv += ["vip" if self.netns else "novip", str(clean_stop_after)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO)
        info = self.state / "daemon.json"
        assert eventually(
            lambda: info.exists() or self.proc is None or self.proc.poll() is not None
        )
        assert info.exists(), "the stand-in daemon did not start"
        self.pids = json.loads(info.read_text())
        assert alive(self.pids["app"]) and alive(self.pids["guardian"])

    def outcome(self) -> str:
        path = self.state / "outcome"
        return path.read_text() if path.exists() else ""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        for key in ("app", "guardian"):
            pid = self.pids.get(key)
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


def test_daemon_killed_app_is_fenced(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert eventually(lambda: not alive(daemon.pids["app"])), "application survived its daemon"
    assert eventually(lambda: not alive(daemon.pids["guardian"]))
    report = json.loads((daemon.state / "guardian.fenced").read_text())
    assert report["done"] and "daemon is gone" in report["reason"]
    assert "FENCING" in (daemon.state / "guardian.log").read_text()
    assert "daemon is gone" in (daemon.state / "fence-command-ran").read_text()


def test_daemon_frozen_app_is_fenced_and_daemon_finds_out(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        assert eventually(lambda: not alive(daemon.pids["app"])), "app survived a frozen daemon"
        assert alive(daemon.proc.pid)  # still frozen: starvation, not death, fenced it
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert daemon.proc.wait(timeout=30) == 0
    assert daemon.outcome().startswith("fenced=True: guardian has fenced:")
    assert "not fed the guardian" in daemon.outcome()


def test_clean_stop_fences_nothing(daemon: Daemon) -> None:
    daemon.start(clean_stop_after=1.5)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=30) == 0
    assert daemon.outcome() == "stopped"
    assert not alive(daemon.pids["guardian"])
    assert alive(daemon.pids["app"])  # the daemon left it running, the guardian did not touch it
    assert not (daemon.state / "guardian.fenced").exists()
    assert not (daemon.state / "fence-command-ran").exists()


def test_start_reports_a_guardian_that_cannot_start(tmp_path: Path) -> None:
    client = GuardianClient(
        tmp_path, 1.0, argv_prefix=[sys.executable, "-c", "pass"], ready_timeout_s=5.0
    )
    with pytest.raises(GuardianError, match="did not get ready"):
        client.start()


def test_feed_messages_round_trip() -> None:
    op, orders = decode_message(encode_feed(VipSpec(VIP, 24, "eth0"), [123, 456]))
    assert op == "feed"
    assert orders.vip == VipSpec(VIP, 24, "eth0") and orders.pgids == (123, 456)
    with pytest.raises(ValueError):
        decode_message(b'{"op": "reboot"}')


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2's `ip` to create a network namespace",
)
def test_daemon_killed_vip_is_removed(tmp_path: Path) -> None:
    ns = f"mhtg-{os.getpid() % 100000}"
    d = Daemon(tmp_path, netns=ns)

    def addresses() -> str:
        return subprocess.run(
            ["ip", "-n", ns, "-4", "addr", "show", "dev", "vip-a"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip

    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
        for cmd in (
            ["link", "add", "vip-a", "type", "veth", "peer", "name", "vip-b"],
            ["addr", "add", "198.18.200.1/24", "dev", "vip-a"],
            ["link", "set", "vip-a", "up"],
            ["link", "set", "vip-b", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, timeout=30)
        d.start()
        assert f"{VIP}/24" in addresses()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        assert eventually(lambda: VIP not in addresses()), "the VIP survived its daemon"
        assert eventually(lambda: not alive(d.pids["app"]))
        assert eventually(lambda: not alive(d.pids["guardian"]))
        report = json.loads((tmp_path / "guardian.fenced").read_text())
        assert report["vip"] == f"released {VIP}/24 on vip-a"
    finally:
        d.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
