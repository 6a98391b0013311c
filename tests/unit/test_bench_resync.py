"""bench/resync.py's pure parts: the median round, and the arguments it refuses."""

from __future__ import annotations

import pytest

from bench import resync


def _round(speedup: float, session: float, identical: bool = True) -> dict[str, object]:
    return {
        "speedup_vs_rsync": speedup,
        "mirrorha_s": session,
        "mirrorha_identical": identical,
        "rsync_identical": True,
    }


def test_the_summary_is_the_median_round_with_its_own_figures_and_every_run() -> None:
    runs = [_round(9.1, 0.07), _round(6.8, 0.1), _round(7.5, 0.09)]
    out = resync.median_round(runs)
    # the figures of one round stay together: 7.5x is the round whose session took 0.09 s
    assert (out["speedup_vs_rsync"], out["mirrorha_s"]) == (7.5, 0.09)
    assert out["speedup_range"] == [6.8, 9.1]
    assert out["rounds"] == 3
    assert out["runs"] == runs


def test_an_even_count_takes_the_lower_middle_and_one_bad_round_spoils_identical() -> None:
    out = resync.median_round([_round(9.0, 0.07), _round(8.0, 0.08, identical=False)])
    # never flattered by the choice of the middle
    assert out["speedup_vs_rsync"] == 8.0
    assert out["mirrorha_identical"] is False


@pytest.mark.parametrize(
    "argv", [["--rounds", "0"], ["--rounds", "51"], ["--size-mb", "0"], ["--change-pct", "0"]]
)
def test_out_of_range_arguments_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        resync.main(argv)
    assert exc.value.code == 2
    assert "--rounds in 1..50" in capsys.readouterr().err
