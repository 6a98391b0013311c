"""Every benchmark script answers ``--help`` (argparse expands ``%`` in help strings: a bare
one crashed ``bench/resync.py --help``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the runnable ones (keepalived.py is a module that bench/failover.py imports)
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if "__main__" in p.read_text())


def test_there_are_bench_scripts() -> None:
    assert len(SCRIPTS) >= 4, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_prints_usage(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:200]
