"""The cluster in the lab: two real daemons in network namespaces, real VIP, real kills.

Each test builds its own lab and cluster (fresh state directories, the replicated directory
/srv/mirrorha/data mirrored) and tears both down, even when it fails. Replication has its own lab
tests: here what is checked is who is primary, who holds the VIP and who answers on it.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator

import pytest

from app.lab import Lab
from app.labcluster import LabCluster
from app.labprobe import ProbeSet
from tests.lab.conftest import require_lab

pytestmark = pytest.mark.lab


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[LabCluster]:
    require_lab()
    opts = getattr(request, "param", {})
    lab = Lab(prefix="mhq-")
    c: LabCluster | None = None
    try:
        lab.up()
        c = LabCluster(lab, replicated=True, **opts)
        yield c
    finally:
        if c is not None:
            c.stop_all()
        lab.down()


def test_first_start_then_prim_makes_node1_primary(cluster: LabCluster) -> None:
    for node in ("node1", "node2"):
        cluster.start_node(node)
    for node in ("node1", "node2"):
        st = cluster.wait_state(node, "WAIT", sub="NotReady", reason_has="first start")
        assert "first start" in st["reason"], st["reason"]
    assert cluster.vip_holders() == set()
    cluster.command_on("node1", "prim")
    cluster.wait_state("node1", "PRIM")
    cluster.wait_state("node2", "SECOND")
    assert cluster.vip_holders() == {"node1"}
    got = cluster.client_get()
    assert got is not None and got["node"] == "node1"
    # The health probe a cloud load balancer polls: 200 on the Ready primary only.
    assert health_status(cluster, "198.18.1.1") == 200
    assert health_status(cluster, "198.18.1.2") == 503


def health_status(cluster: LabCluster, admin: str) -> int:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    print(urllib.request.urlopen('http://{admin}:9453/health', timeout=5).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    r = cluster.lab.run("client", [sys.executable, "-c", code], timeout=20)
    return int(r.stdout.strip())


def test_kill_primary_fails_over_and_it_rejoins_as_second(cluster: LabCluster) -> None:
    cluster.first_start()
    assert cluster.client_post("before the crash") is not None
    cluster.kill_node("node1")
    st = cluster.wait_state("node2", "ALONE", timeout=30)
    assert "node1" in st["reason"]
    cluster.wait_for(lambda: cluster.vip_holders() == {"node2"}, 10, "the VIP on node2 only")
    cluster.wait_for(
        lambda: (cluster.client_get() or {}).get("node") == "node2", 15, "the demo app on node2"
    )
    cluster.start_node("node1")
    cluster.wait_state("node1", "SECOND", timeout=30)
    cluster.wait_state("node2", "PRIM", timeout=30)
    assert cluster.vip_holders() == {"node2"}


def test_swap_moves_primary_and_vip(cluster: LabCluster) -> None:
    cluster.first_start()
    cluster.command_on("node1", "swap")
    cluster.wait_state("node2", "PRIM", timeout=30)
    cluster.wait_state("node1", "SECOND", timeout=30)
    assert cluster.vip_holders() == {"node2"}
    got = cluster.client_get()
    assert got is not None and got["node"] == "node2"


def test_clean_stop_hands_over_without_waiting_for_the_timeout(cluster: LabCluster) -> None:
    cluster.first_start()
    cluster.stop_node("node1")
    st = cluster.wait_state("node2", "ALONE", timeout=30)
    events = [e["reason"] for e in st["events"]]
    assert any("stopped cleanly" in r for r in events), events
    assert not any("lost for" in r or "silent for" in r for r in events), events
    assert cluster.vip_holders() == {"node2"}


def test_illegal_command_answers_why_and_changes_nothing(cluster: LabCluster) -> None:
    cluster.first_start()
    from app.control import ControlError

    with pytest.raises(ControlError, match="refused"):
        cluster.command_on("node2", "prim")
    assert cluster.state("node1")["state"] == "PRIM"  # type: ignore[index]
    assert cluster.state("node2")["state"] == "SECOND"  # type: ignore[index]


@pytest.mark.parametrize("fault", ["kill_daemon_only", "sigstop_daemon"])
def test_never_two_primaries_when_the_primary_daemon_dies_or_freezes(
    cluster: LabCluster, fault: str
) -> None:
    """Probes every 10 ms from the client and on both nodes: at most one holds/answers."""
    cluster.first_start()
    assert cluster.app_pid("node1") is not None
    with ProbeSet(cluster.lab, interval_ms=10) as probes:
        time.sleep(0.5)
        if fault == "kill_daemon_only":
            cluster.signal_daemon("node1", signal.SIGKILL)  # the application is left running
        else:
            cluster.signal_daemon("node1", signal.SIGSTOP)
        cluster.wait_state("node2", "ALONE", timeout=30)
        cluster.wait_for(
            lambda: (cluster.client_get() or {}).get("node") == "node2",
            15,
            "node2 answers on the VIP",
        )
        if fault == "sigstop_daemon":
            cluster.signal_daemon("node1", signal.SIGCONT)
            cluster.wait_for(
                lambda: (cluster.state("node1") or {}).get("state") in ("SECOND", "WAIT"),
                30,
                "node1 to wake up and give way",
            )
        time.sleep(1.0)
    report = probes.report()
    assert report.samples["node1"] > 50 and report.samples["node2"] > 50, report
    assert report.both_hold == 0, report
    assert report.both_apps == 0, report
    assert report.client_nodes >= {"node2"}, report
    assert cluster.app_pid("node1") is None, "the guardian must have stopped node1's application"
    assert cluster.vip_holders() == {"node2"}


def test_heartbeats_cut_only_the_side_that_reaches_the_witness_stays_primary(
    cluster: LabCluster,
) -> None:
    cluster.first_start()
    cluster.lab.partition(node1_reaches_witness=False, node2_reaches_witness=True)
    cluster.wait_state("node2", "ALONE", timeout=30)
    cluster.wait_state("node1", "WAIT", timeout=30, sub="NotReady")
    assert cluster.vip_holders() == {"node2"}
    cluster.lab.heal()
    cluster.wait_state("node1", "SECOND", timeout=40)
    cluster.wait_state("node2", "PRIM", timeout=30)


def test_all_links_cut_and_no_witness_both_wait(cluster: LabCluster) -> None:
    cluster.first_start()
    cluster.lab.partition(node1_reaches_witness=False, node2_reaches_witness=False)
    cluster.wait_state("node1", "WAIT", timeout=30, sub="NotReady")
    cluster.wait_state("node2", "WAIT", timeout=30, sub="NotReady")
    assert cluster.vip_holders() == set()
    assert cluster.app_pid("node1") is None and cluster.app_pid("node2") is None


def test_stale_node_restarted_alone_waits_and_prim_forces_it(cluster: LabCluster) -> None:
    cluster.first_start()
    cluster.kill_node("node1")
    cluster.wait_state("node2", "ALONE", timeout=30)
    cluster.stop_node("node2")  # node2 has the newer data and is now stopped
    cluster.start_node("node1")  # node1 comes back alone with stale data
    st = cluster.wait_state("node1", "WAIT", timeout=30, sub="NotReady", reason_has="prim")
    assert "up to date" in st["reason"], st["reason"]
    assert cluster.vip_holders() == set()
    cluster.command_on("node1", "prim")
    cluster.wait_state("node1", "ALONE", timeout=30)
    assert cluster.vip_holders() == {"node1"}


@pytest.mark.parametrize("cluster", [{"failback": "node1"}], indirect=True)
def test_preferred_node_takes_primary_back_once_up_to_date(cluster: LabCluster) -> None:
    cluster.first_start()
    cluster.kill_node("node1")
    cluster.wait_state("node2", "ALONE", timeout=30)
    cluster.start_node("node1")
    cluster.wait_state("node1", "PRIM", timeout=60)
    cluster.wait_state("node2", "SECOND", timeout=30)
    assert cluster.vip_holders() == {"node1"}


def test_restart_keeps_primary_and_stopstart_fails_over(cluster: LabCluster) -> None:
    cluster.first_start()
    before = cluster.app_pid("node1")
    assert before is not None
    cluster.command_on("node1", "restart")
    cluster.wait_for(
        lambda: cluster.app_pid("node1") not in (None, before), 30, "a new application pid"
    )
    assert cluster.state("node1")["state"] == "PRIM"  # type: ignore[index]
    assert cluster.vip_holders() == {"node1"}
    cluster.command_on("node1", "stopstart")
    cluster.wait_state("node2", "PRIM", timeout=60)
    cluster.wait_state("node1", "SECOND", timeout=60)
    assert cluster.vip_holders() == {"node2"}


def test_failed_start_prim_stops_the_module_instead_of_half_starting(cluster: LabCluster) -> None:
    cluster.first_start()
    script = cluster.dir / "scripts" / "start_prim"
    script.write_text("#!/bin/sh\necho 'the application cannot start' >&2\nexit 3\n")
    cluster.kill_node("node1")
    st = cluster.wait_state("node2", "STOP", timeout=60, sub="NotReady")
    assert "start_prim" in " ".join(e["reason"] for e in st["events"]) or "failed" in st["reason"]
    assert cluster.vip_holders() == set()
    assert cluster.app_pid("node2") is None
