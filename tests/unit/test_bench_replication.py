"""bench/replication.py's pure parts: the median run, the CPU accounting, and the argument
bounds it refuses."""

from __future__ import annotations

import os
import time

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


def test_cpu_per_op_is_microseconds_per_operation_for_each_process() -> None:
    before = {"node1": 10.0, "node2": 4.0}
    after = {"node1": 10.5, "node2": 4.2}
    assert replication.cpu_per_op(before, after, 2000) == {"node1": 250.0, "node2": 100.0}
    assert replication.cpu_per_op(before, after, 0) == {}  # no count (pgbench said nothing)
    assert replication.cpu_per_op({}, {}, 10) == {}  # the local disk: nothing to measure


def test_cpu_text_joins_the_processes_of_a_target() -> None:
    assert replication.cpu_text({"node1": 180.2, "node2": 110.5}) == "180+110"
    assert replication.cpu_text({"fuse": 95.0}) == "95"
    assert replication.cpu_text({}) == "-"
