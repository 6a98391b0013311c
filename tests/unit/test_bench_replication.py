"""bench/replication.py's pure parts: the median run, the CPU accounting, and the argument
bounds it refuses."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bench import replication


def test_median_run_is_the_middle_one_by_its_key() -> None:
    runs = [{"ops_s": 900.0, "p99_ms": 3.0}, {"ops_s": 1500.0, "p99_ms": 1.0}, {"ops_s": 1200.0}]
    assert replication.median_run(runs, "ops_s") == {"ops_s": 1200.0}
    # an even count takes the lower middle: a figure is never flattered by the choice
    assert replication.median_run(runs[:2], "ops_s")["ops_s"] == 900.0
    assert replication.median_run(runs[:1], "ops_s")["ops_s"] == 900.0


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--rounds", "16"], ["--seq-mib", "0"]])
def test_out_of_range_arguments_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        replication.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--rounds must be between 1 and 15" in err or "must be >= 1" in err


def test_cpu_seconds_reads_this_process_from_proc() -> None:
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # bounded: burn 50 ms of CPU
        pass
    got = replication.cpu_seconds(os.getpid())
    tick = 1 / os.sysconf("SC_CLK_TCK")
    # the same counters as process_time, at clock-tick resolution
    assert got + tick >= 0.05
    assert got <= time.process_time() + tick


def test_per_op_gives_cpu_microseconds_per_operation_for_each_process() -> None:
    before = {"node1": 10.0, "node2": 4.0}
    after = {"node1": 10.5, "node2": 4.2}
    assert replication.per_op(before, after, 2000, 1e6) == {"node1": 250.0, "node2": 100.0}
    assert replication.per_op(before, after, 0, 1e6) == {}  # no count (pgbench said nothing)
    assert replication.per_op({}, {}, 10, 1e6) == {}  # the local disk: nothing to measure


def test_cpu_text_joins_the_processes_of_a_target() -> None:
    assert replication.cpu_text({"node1": 180.2, "node2": 110.5}) == "180+110"
    assert replication.cpu_text({"fuse": 95.0}) == "95"
    assert replication.cpu_text({}) == "-"


def _own_sleeps() -> int:
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("voluntary_ctxt")).split()[1])


def test_sleeps_of_counts_the_voluntary_switches_of_every_thread() -> None:
    slept, release = threading.Event(), threading.Event()

    def sleeper() -> None:
        for _ in range(5):
            time.sleep(0.002)
        slept.set()
        release.wait(10)  # alive while it is counted: a thread that ended leaves /proc

    t = threading.Thread(target=sleeper)
    before, own = replication.sleeps_of(os.getpid()), _own_sleeps()
    t.start()
    try:
        assert slept.wait(10)
        total = replication.sleeps_of(os.getpid()) - before
        assert total - (_own_sleeps() - own) >= 5  # the other thread's five sleeps at least
    finally:
        release.set()
        t.join(10)


def test_sleeps_per_op_and_their_text() -> None:
    per = replication.per_op({"node1": 100, "node2": 50}, {"node1": 750, "node2": 370}, 100)
    assert per == {"node1": 6.5, "node2": 3.2}
    both = {**per, "app": 3.0}
    assert replication.sleeps_text(both, app=True) == "3.0"
    assert replication.sleeps_text(both, app=False) == "6.5+3.2"
    assert replication.sleeps_text({"app": 2.0}, app=False) == "-"  # the local disk
    assert replication.sleeps_text({}, app=True) == "-"
