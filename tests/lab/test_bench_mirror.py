"""The replication and resync benchmarks run end to end in the lab and leave nothing behind.

`bench/replication.py --quick` and `bench/resync.py --quick` are run as a user would run them;
each test checks what the output promises (a table, then one JSON line whose figures are
positive numbers) and that the benchmark's lab is gone afterwards: no namespace with its
prefix, no FUSE mount of its work dir in /proc/mounts, no process naming its work dir, no work
dir. The figures themselves are not judged: no timing assertion (the benchmarks print them
against their goals).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.lab import HOSTS, SWITCH, Lab, default_workdir
from bench import replication, resync
from tests.lab.conftest import require_lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("local", "fuse", "replicated")


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15)
    names = {f"{prefix}{h}" for h in (*HOSTS, SWITCH)}
    return sorted(n for n in out.stdout.split() if n in names)


def _mounts(workdir: Path) -> list[str]:
    """Lines of /proc/mounts that name the benchmark's work dir (its FUSE mount and binds)."""
    text = Path("/proc/mounts").read_text()
    return [line for line in text.splitlines() if str(workdir) in line]


def _pids(workdir: Path) -> list[int]:
    """Live processes (not zombies) whose command line names the work dir: daemons,
    workloads, PostgreSQL."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(workdir) in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _run_bench(script: str, prefix: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run bench/<script> --quick; check it exits 0 and cleans up; return (JSON, table)."""
    workdir = default_workdir(prefix)
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / script), "--quick"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        left = (_namespaces(prefix), _mounts(workdir), _pids(workdir), workdir.exists())
    finally:
        Lab.cleanup_stale(prefix)  # only does something if the benchmark could not clean up
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    result = json.loads(lines[-1])
    namespaces, mounts, pids, workdir_left = left
    assert namespaces == [], "the benchmark left its lab namespaces"
    assert mounts == [], "the benchmark left mounts of its work dir"
    assert pids == [], "the benchmark left processes running"
    assert not workdir_left, "the benchmark left its work dir"
    return result, "\n".join(lines[:-1])


def _positive(value: Any, what: str) -> None:
    assert isinstance(value, int | float) and not isinstance(value, bool), (what, value)
    assert value > 0, (what, value)


@pytest.mark.timeout(900)
def test_replication_quick_prints_every_figure_as_json_and_cleans_up() -> None:
    require_lab()
    reason = replication.pg_missing()
    if reason is not None:
        pytest.skip(reason)
    result, table = _run_bench("replication.py", replication.PREFIX, 800)
    assert result["bench"] == "replication"
    assert result["targets"] == list(TARGETS)
    for target in TARGETS:
        _positive(result["seq_mb_s"][target], f"seq {target}")
        for key in ("ops_s", "p50_ms", "p99_ms"):
            _positive(result["sync4k"][target][key], f"sync4k {key} {target}")
        assert result["sync4k"][target]["p99_ms"] >= result["sync4k"][target]["p50_ms"]
        _positive(result["meta_ops_s"][target], f"meta {target}")
        _positive(result["meta_new_dir_ops_s"][target], f"meta in a new directory {target}")
        _positive(result["pgbench_tps"][target], f"pgbench {target}")
    for name in ("seq", "sync4k_ops", "sync4k_p99", "meta", "meta_new_dir", "pgbench"):
        for pair in ("fuse_local", "replicated_local"):
            _positive(result["ratios"][name][pair], f"ratio {name} {pair}")
    assert result["sizes"]["rounds"] == 1  # --quick: one round; the medians are that run
    for kind, key in (
        ("seq", "seq_mb_s"),
        ("meta", "meta_ops_s"),
        ("metanew", "meta_new_dir_ops_s"),
    ):
        for target in TARGETS:
            (only,) = result["runs"][kind][target]
            assert round(only, 1) == pytest.approx(result[key][target], abs=0.1)
    _positive(result["seq_limit_mb_s"], "limit")
    assert result["seq_limit_mb_s"] == pytest.approx(result["seq_mb_s"]["local"] / 2, rel=0.01)
    _positive(result["seq_of_limit"], "fraction of the limit")
    assert set(result["goals"]) == {
        "seq_ge_80pct_of_limit",
        "sync4k_ge_35pct_of_local",
        "pgbench_ge_50pct_of_local",
    }
    assert all(isinstance(v, bool) for v in result["goals"].values()), result["goals"]
    # The CPU that served each op: this process for fuse, each daemon for replicated.
    for kind in ("sync4k", "pgbench"):
        cpu = result["cpu_us_per_op"][kind]
        assert cpu["local"] == {}, cpu
        _positive(cpu["fuse"]["fuse"], f"{kind} CPU of the FUSE-only mount")
        for node in ("node1", "node2"):
            _positive(cpu["replicated"][node], f"{kind} CPU of {node}'s daemon")
    sleeps = result["sync4k_sleeps_per_op"]
    assert set(sleeps["local"]) == {"app"}, sleeps
    assert set(sleeps["fuse"]) == {"app", "fuse"}, sleeps
    assert set(sleeps["replicated"]) == {"app", "node1", "node2"}, sleeps
    for target in ("fuse", "replicated"):  # a FUSE request waits for the daemon's reply
        assert sleeps[target]["app"] >= 1, sleeps
    for who in ("node1", "node2"):  # each daemon waits for every op it serves
        assert sleeps["replicated"][who] >= 1, sleeps
    assert set(result["daemon_idle_cpu_pct"]) == {"node1", "node2"}
    assert all(v >= 0 for v in result["daemon_idle_cpu_pct"].values())
    # The replicated target really went through the mirror: node2 acknowledged every op.
    mirror = result["replicated_mirror"]
    assert mirror["mirror_state"] == "connected", mirror
    _positive(mirror["acks"], "acks")
    assert mirror["drops"] == 0, mirror
    for label in (
        "sequential",
        "fdatasync",
        "create/rename/unlink",
        "a new directory",
        "pgbench",
        "CPU us per op",
        "sleeps per op, application",
        "sleeps per op, serving",
        "CPU us per transaction",
        "idle daemons use",
        "goals",
    ):
        assert label in table, table


@pytest.mark.timeout(900)
def test_resync_quick_prints_every_figure_as_json_and_cleans_up() -> None:
    require_lab()
    result, table = _run_bench("resync.py", resync.PREFIX, 800)
    assert result["bench"] == "resync"
    assert result["size_mb"] == 64
    assert result["size_bytes"] == 64 << 20
    inc, full = result["incremental"], result["full"]
    for key in (
        "changed_bytes",
        "mirrorha_s",  # the session, from node1's own timestamps
        "mirrorha_start_to_ready_s",  # node2's start to its SECOND Ready, the bench's clock
        "mirrorha_bytes_sent",
        "rsync_s",
        "rsync_bytes_sent",
        "speedup_vs_rsync",
        "sent_over_changed",
    ):
        _positive(inc[key], f"incremental {key}")
    # 1 % of the tree, in whole 4 KiB blocks.
    assert inc["changed_bytes"] == inc["changed_writes"] * 4096
    assert inc["changed_bytes"] == pytest.approx(0.01 * result["size_bytes"], rel=0.01)
    for key in (
        "mirrorha_s",
        "mirrorha_start_to_ready_s",
        "mirrorha_bytes_sent",
        "cp_s",
        "rsync_s",
        "rsync_bytes_sent",
    ):
        _positive(full[key], f"full {key}")
    # A full sync into an empty directory sends at least the whole tree.
    assert full["mirrorha_bytes_sent"] >= result["size_bytes"]
    # What a user checks after a sync: both copies hold the same bytes.
    assert inc["mirrorha_identical"] is True
    assert full["mirrorha_identical"] is True
    assert inc["rsync_identical"] is True
    # three rounds by default, each its own change and rsync run; the summary is the median
    assert inc["rounds"] == len(inc["runs"]) == 3
    assert sorted(r["speedup_vs_rsync"] for r in inc["runs"])[1] == inc["speedup_vs_rsync"]
    assert all(r["mirrorha_identical"] and r["rsync_identical"] for r in inc["runs"])
    assert set(result["goals"]) == {"speedup_ge_10x_rsync", "sent_le_1_2x_changed"}
    for label in (
        "reintegration",
        "session",
        "start->Ready",
        "rsync",
        "cp -a",
        "full sync",
        "goals",
        "median of 3 rounds",
    ):
        assert label in table, table
