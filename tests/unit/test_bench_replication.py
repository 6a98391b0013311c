"""bench/replication.py's pure parts: the median run, and the argument bounds it refuses."""

from __future__ import annotations

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
