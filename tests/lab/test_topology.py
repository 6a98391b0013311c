"""The lab itself: topology, faults, per-node mount namespaces, and teardown that leaves nothing.

Every address used is a lab address in 198.18.0.0/15; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.lab import (
    HOSTS,
    SWITCH,
    Lab,
    LabBusy,
    LabError,
    LabUnsupported,
    address,
    mounts_under,
    pid_alive,
)
from app.labcli import READY_LINE

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_COMMAND = REPO / "tests" / "lab" / "lab"

N1_PUB, N1_REPL = address("node1", "pub"), address("node1", "repl")
N2_PUB, N2_REPL = address("node2", "pub"), address("node2", "repl")
WITNESS = address("witness", "pub")


# ---- helpers -------------------------------------------------------------------------------


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15)
    names = {f"{prefix}{h}" for h in (*HOSTS, SWITCH)}
    return sorted(n for n in out.stdout.split() if n in names)


def _assert_nothing_left(prefix: str, workdir: Path, pids: list[int]) -> None:
    assert _namespaces(prefix) == [], "namespaces of the lab are still there"
    assert mounts_under(workdir) == [], "mounts under the lab's work dir are still there"
    with open("/proc/mounts", encoding="utf-8") as fh:
        assert str(workdir) not in fh.read()
    assert [p for p in pids if pid_alive(p)] == [], "processes of the lab are still alive"
    assert not workdir.exists()


def _read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """Read proc's stdout until a line contains marker (bounded in time); return all read."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    text = buf.decode(errors="replace")
    assert marker in text, f"no {marker!r} within {timeout} s; output so far: {text!r}"
    return text


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env


# ---- topology ------------------------------------------------------------------------------


def test_nodes_reach_each_other_on_both_networks(lab: Lab) -> None:
    assert lab.ping("node1", N2_PUB)
    assert lab.ping("node1", N2_REPL)
    assert lab.ping("node2", N1_PUB)
    assert lab.ping("node2", N1_REPL)


def test_nodes_reach_the_witness(lab: Lab) -> None:
    assert lab.ping("node1", WITNESS)
    assert lab.ping("node2", WITNESS)


def test_client_reaches_the_nodes_through_the_witness_router(lab: Lab) -> None:
    assert lab.ping("client", N1_PUB)
    assert lab.ping("client", N2_PUB)
    forward = "/proc/sys/net/ipv4/ip_forward"
    lab.run("witness", ["sh", "-c", f"echo 0 > {forward}"])
    try:
        assert not lab.ping("client", N1_PUB), "client reached node1 with the router off"
    finally:
        lab.run("witness", ["sh", "-c", f"echo 1 > {forward}"])
    assert lab.ping("client", N1_PUB)


def test_nodes_interfaces_are_named_eth0_and_eth1(lab: Lab) -> None:
    out = lab.run("node1", ["ip", "-br", "-4", "addr"]).stdout
    assert f"{N1_PUB}/24" in next(line for line in out.splitlines() if line.startswith("eth0"))
    assert f"{N1_REPL}/24" in next(line for line in out.splitlines() if line.startswith("eth1"))
    route = lab.run("node2", ["ip", "route", "show", "default"]).stdout
    assert f"via {WITNESS}" in route


def test_ping_refuses_addresses_outside_the_lab(lab: Lab) -> None:
    with pytest.raises(LabError, match="outside the lab network"):
        lab.ping("node1", "192.0.2.1")


# ---- faults --------------------------------------------------------------------------------


def test_partition_cuts_the_nodes_apart_and_node2_from_the_witness(lab: Lab) -> None:
    lab.partition(node1_reaches_witness=True, node2_reaches_witness=False)
    assert not lab.ping("node1", N2_PUB)
    assert not lab.ping("node1", N2_REPL)
    assert not lab.ping("node2", N1_PUB)
    assert not lab.ping("node2", N1_REPL)
    assert lab.ping("node1", WITNESS)
    assert not lab.ping("node2", WITNESS)

    lab.heal()
    assert lab.ping("node1", N2_PUB)
    assert lab.ping("node2", N1_REPL)
    assert lab.ping("node2", WITNESS)


def test_link_down_cuts_only_that_network(lab: Lab) -> None:
    lab.link("node2", "repl", up=False)
    assert not lab.ping("node1", N2_REPL)
    assert lab.ping("node1", N2_PUB)
    lab.link("node2", "repl", up=True)
    assert lab.ping("node1", N2_REPL)


def test_packet_loss_applies_to_one_network_and_clears(lab: Lab) -> None:
    try:
        backend = lab.netem("node1", "pub", loss_pct=100)
    except LabUnsupported as exc:  # no sch_netem and no nft: says which package is missing
        pytest.skip(f"this lab can drop no packets (neither sch_netem nor nftables): {exc}")
    if backend == "netem":
        qdisc = lab.run("node1", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "netem" in qdisc and "loss 100%" in qdisc
    else:
        rules = lab.run("node1", ["nft", "list", "ruleset"]).stdout
        assert 'device "eth0"' in rules and "drop" in rules
    assert not lab.ping("node1", N2_PUB)
    assert lab.ping("node1", N2_REPL)

    lab.clear_netem("node1", "pub")
    assert "netem" not in lab.run("node1", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert lab.ping("node1", N2_PUB)


def _mean_rtt_ms(lab: Lab, src: str, dst_ip: str) -> float:
    """Mean RTT of 5 pings (0.2 s apart), from ping's summary line; fails if none came back."""
    out = lab.run(src, ["ping", "-c", "5", "-i", "0.2", "-W", "2", "-q", dst_ip], timeout=30)
    summary = next(line for line in out.stdout.splitlines() if "min/avg/max" in line)
    return float(summary.split("=", 1)[1].split("/")[1])


def test_delay_and_jitter_make_the_round_trip_longer_and_clear(lab: Lab) -> None:
    delay_ms, jitter_ms = 50.0, 20.0
    before = _mean_rtt_ms(lab, "node1", N2_REPL)
    backend = lab.netem("node1", "repl", delay_ms=delay_ms, jitter_ms=jitter_ms)
    assert backend in ("netem", "hub")
    if backend == "netem":
        qdisc = lab.run("node1", ["tc", "qdisc", "show", "dev", "eth1"]).stdout
        assert "netem" in qdisc and "delay 50" in qdisc
    else:
        hub = lab.hub_pid("repl")
        assert hub is not None and pid_alive(hub)
    # both_ways: each echo is delayed on the way out and its reply on the way back, each by
    # delay +- jitter, so the mean grows by about 2 x delay; asserting + delay cannot pass
    # without the impairment and leaves room for the jitter.
    impaired = _mean_rtt_ms(lab, "node1", N2_REPL)
    assert impaired >= before + delay_ms, (before, impaired)
    assert lab.ping("node1", N2_PUB), "the other network was impaired too"

    lab.clear_netem("node1", "repl")
    if backend == "hub":
        assert hub is not None and not pid_alive(hub), "the hub process is still there"
        assert lab.hub_pid("repl") is None
    assert lab.ping("node1", N2_REPL)
    assert lab.ping("node2", N1_REPL)


def test_loss_through_the_hub_cuts_only_that_host_and_clears(lab: Lab) -> None:
    backend = lab.netem("node1", "pub", loss_pct=100, delay_ms=5)
    if backend != "hub":
        pytest.skip(f"this kernel has sch_netem (backend {backend}): the hub is not used")
    assert not lab.ping("node1", N2_PUB)
    assert not lab.ping("node2", N1_PUB)
    assert lab.ping("node2", WITNESS), "node2 is not impaired and should still reach the witness"
    assert lab.ping("node1", N2_REPL)

    lab.clear_netem("node1", "pub")
    assert lab.hub_pid("pub") is None
    assert lab.ping("node1", N2_PUB)


def test_tcp_and_partition_work_through_the_hub(lab: Lab) -> None:
    backend = lab.netem("node2", "repl", delay_ms=1, jitter_ms=1)
    if backend != "hub":
        pytest.skip(f"this kernel has sch_netem (backend {backend}): the hub is not used")
    payload = "x" * 200_000  # several segments, GSO and checksum offload through the hub
    server = lab.popen(
        "node2",
        [
            sys.executable,
            "-c",
            "import socket,sys\n"
            "s=socket.create_server(('" + N2_REPL + "',7777));s.settimeout(20)\n"
            "c,_=s.accept();c.settimeout(20);n=0\n"
            "while (b:=c.recv(65536)):n+=len(b)\n"
            "print(n,flush=True)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    script = (
        "import socket,sys,time\n"
        "for _ in range(50):\n"
        "  try: c=socket.create_connection(('" + N2_REPL + "',7777),timeout=5);break\n"
        "  except OSError: time.sleep(0.1)\n"
        "c.sendall(sys.stdin.read().encode());c.close()"
    )
    lab.run("node1", [sys.executable, "-c", script], input=payload, timeout=30)
    out, _ = server.communicate(timeout=30)
    assert out.strip() == str(len(payload))

    lab.partition(node1_reaches_witness=True, node2_reaches_witness=True)
    assert not lab.ping("node1", N2_REPL)
    lab.heal()
    assert lab.ping("node1", N2_REPL)


def test_signal_stops_continues_and_kills_a_lab_process(lab: Lab) -> None:
    proc = lab.popen("node1", ["sleep", "300"])
    lab.signal(proc, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "process did not stop"
        time.sleep(0.02)
    lab.signal(proc, signal.SIGCONT)
    lab.signal(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_signal_refuses_a_process_the_lab_did_not_start(lab: Lab) -> None:
    with pytest.raises(LabError, match="not a process of lab"):
        lab.signal(os.getpid(), signal.SIGCONT)


# ---- mount namespaces ----------------------------------------------------------------------


def test_each_node_sees_its_own_content_at_the_shared_path(lab: Lab) -> None:
    name = f"probe-{uuid.uuid4().hex}"
    path = f"/srv/mirrorha/data/{name}"
    lab.run("node1", ["sh", "-c", f"echo from-node1 > {path}"])

    assert lab.run("node1", ["cat", path]).stdout == "from-node1\n"
    assert lab.run("node2", ["test", "-e", path], check=False).returncode == 1
    assert not Path(path).exists(), "the node's file leaked to the host"
    assert (lab.host_path("node1", path)).read_text() == "from-node1\n"

    lab.run("node2", ["sh", "-c", f"echo from-node2 > {path}"])
    assert lab.run("node1", ["cat", path]).stdout == "from-node1\n"
    assert lab.run("node2", ["cat", path]).stdout == "from-node2\n"


# ---- teardown ------------------------------------------------------------------------------

FAILING_CHILD = """
import sys
from app.lab import Lab
lab = Lab(prefix={prefix!r}, workdir={workdir!r})
{body}
"""
BODY_WITH = """
with lab:
    proc = lab.popen("node1", ["sleep", "300"])
    print(proc.pid, flush=True)
    raise RuntimeError("simulated failure halfway")
"""
BODY_BARE = """
lab.up()
proc = lab.popen("node2", ["sleep", "300"])
print(proc.pid, flush=True)
raise RuntimeError("simulated failure halfway")
"""


@pytest.mark.parametrize(("prefix", "body"), [("mhw-", BODY_WITH), ("mhb-", BODY_BARE)])
def test_a_failure_halfway_leaves_nothing(
    lab_available: None, tmp_path: Path, prefix: str, body: str
) -> None:
    workdir = tmp_path / "labwork"
    script = FAILING_CHILD.format(prefix=prefix, workdir=str(workdir), body=body)
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=_child_env(),
        )
        assert done.returncode != 0
        assert "simulated failure halfway" in done.stderr
        sleep_pid = int(done.stdout.split()[0])
        _assert_nothing_left(prefix, workdir, [sleep_pid])
    finally:
        Lab.cleanup_stale(prefix, workdir)


BODY_OWNER = """
lab.up()
proc = lab.popen("node1", ["sleep", "300"])
print(proc.pid, flush=True)
import time
time.sleep(300)
"""


@contextlib.contextmanager
def _owner_run(prefix: str, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A child that brings a lab up, starts a sleep inside it and waits: yields the child and
    the sleep's PID; afterwards the child is killed and what it left removed."""
    script = FAILING_CHILD.format(prefix=prefix, workdir=str(workdir), body=BODY_OWNER)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, env=_child_env()
    )
    try:
        yield child, int(_read_until(child, "\n", timeout=30).split()[0])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        Lab.cleanup_stale(prefix, workdir)


def test_cleanup_stale_removes_what_a_killed_run_left(lab_available: None, tmp_path: Path) -> None:
    prefix, workdir = "mhk-", tmp_path / "labwork"
    with _owner_run(prefix, workdir) as (child, sleep_pid):
        child.kill()  # a crash: no atexit, no handler
        child.wait(timeout=10)
        assert _namespaces(prefix), "the killed run should have left its namespaces"
        assert pid_alive(sleep_pid)

        assert Lab.cleanup_stale(prefix, workdir) == []
        _assert_nothing_left(prefix, workdir, [sleep_pid])


def test_ctrl_c_on_lab_up_tears_everything_down(lab_available: None, tmp_path: Path) -> None:
    prefix, workdir = "mhc-", tmp_path / "labwork"
    cmd = [str(LAB_COMMAND), "--prefix", prefix, "--workdir", str(workdir), "up"]
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env()
    )
    try:
        out = _read_until(child, READY_LINE, timeout=30)
        assert f"{prefix}node1" in out
        deadline = time.monotonic() + 10
        while len(_namespaces(prefix)) < len(HOSTS) + 1:
            assert time.monotonic() < deadline, "the lab's namespaces did not appear"
            time.sleep(0.05)
        assert mounts_under(workdir), "the lab's mount-namespace files are not mounted"

        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 0
        _assert_nothing_left(prefix, workdir, [])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        Lab.cleanup_stale(prefix, workdir)


def test_a_live_lab_is_refused_to_a_second_run_and_left_intact(
    lab_available: None, tmp_path: Path
) -> None:
    """A second up, a cleanup and `lab down` of a prefix a live run owns raise LabBusy naming
    the owner and touch nothing of it; once the owner is killed, its leftovers are removed."""
    prefix, workdir = "mho-", tmp_path / "labwork"
    with _owner_run(prefix, workdir) as (child, sleep_pid):
        built = _namespaces(prefix)
        assert len(built) == len(HOSTS) + 1

        second = Lab(prefix=prefix, workdir=tmp_path / "other")
        with pytest.raises(LabBusy, match=rf"in use by PID {child.pid} \("):
            second.up()
        assert not second.is_up
        with pytest.raises(LabBusy, match=rf"PID {child.pid}"):
            Lab.cleanup_stale(prefix, workdir)
        cli = [str(LAB_COMMAND), "--prefix", prefix, "--workdir", str(workdir)]
        down = subprocess.run(
            [*cli, "down"], capture_output=True, text=True, timeout=60, cwd=REPO, env=_child_env()
        )
        assert down.returncode == 1
        assert f"in use by PID {child.pid}" in down.stderr
        status = subprocess.run(
            [*cli, "status"], capture_output=True, text=True, timeout=60, cwd=REPO, env=_child_env()
        )
        assert f"owner: PID {child.pid} (" in status.stdout
        # the owner's lab is untouched: its namespaces, mounts and process are there
        assert _namespaces(prefix) == built
        assert mounts_under(workdir), "the owner's mount-namespace files were unmounted"
        assert pid_alive(sleep_pid)

        child.kill()  # the owner dies: the kernel drops its lock, its leftovers are stale
        child.wait(timeout=10)
        assert Lab.cleanup_stale(prefix, workdir) == []
        _assert_nothing_left(prefix, workdir, [sleep_pid])
