"""The failover benchmark runs end to end in the lab and leaves nothing behind.

`bench/failover.py --quick` (3 failovers per configuration, 20 s soaks) is run as a user would
run it; the test checks what its output promises (a table, then one JSON line with every
figure) and that its lab is gone afterwards. The figures themselves are not judged here: no
timing assertion (the benchmark reports them against its goals).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.lab import HOSTS, SWITCH, Lab, default_workdir
from bench.failover import PREFIX
from bench.keepalived import keepalived_path
from tests.lab.conftest import require_lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
QUICK_RUNS = 3
FIGURES = (
    "mirrorha_default",
    "mirrorha_fast",
    "keepalived_advert_1",
    "keepalived_advert_0_1",
)


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15)
    names = {f"{prefix}{h}" for h in (*HOSTS, SWITCH)}
    return sorted(n for n in out.stdout.split() if n in names)


def _bench_pids() -> list[int]:
    """Live processes (not zombies) whose command line names the bench's lab work dir:
    keepalived, the daemons, the demo applications."""
    workdir = str(default_workdir(PREFIX))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if workdir in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(900)
def test_quick_benchmark_prints_every_figure_as_json_and_cleans_up() -> None:
    require_lab()
    if keepalived_path() is None:
        pytest.skip("keepalived is not installed (Debian package keepalived)")
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "failover.py"), "--quick"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        left_namespaces, left_pids = _namespaces(PREFIX), _bench_pids()
    finally:
        Lab.cleanup_stale(PREFIX)  # only does something if the benchmark could not clean up
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    assert lines, proc.stderr
    result = json.loads(lines[-1])
    assert result["bench"] == "failover"
    for key in FIGURES:
        fig = result[key]
        assert fig["n"] == QUICK_RUNS, (key, fig)
        assert len(fig["runs_s"]) == QUICK_RUNS, (key, fig)
        for stat in ("median_s", "p95_s"):
            assert isinstance(fig[stat], int | float) and fig[stat] > 0, (key, fig)
        assert fig["p95_s"] >= fig["median_s"], (key, fig)
    replicated = result.get("mirrorha_default_replicated")
    if replicated is not None and "error" not in replicated:  # only with app/mirror/service.py
        assert replicated["n"] == QUICK_RUNS and replicated["median_s"] > 0, replicated
        assert replicated["acknowledged_write_found"] == QUICK_RUNS, replicated  # promise 1
    assert isinstance(result["false_failovers"], int) and result["false_failovers"] >= 0
    assert result["soak_s"] == 20
    assert result["loss_pct"] == 1
    assert set(result["soak"]) == {"default", "fast"}
    jitter = result["jitter"]
    # Applied (tc netem, or the lab's userspace hub where the kernel has no netem), or said
    # plainly that it was not, in the JSON and in the text: never hidden.
    assert jitter.startswith(("applied via ", "unavailable: ")), jitter
    if jitter.startswith("unavailable"):
        assert "jitter NOT applied" in proc.stdout
    else:
        assert "50 ms" in jitter and "jitter applied via" in proc.stdout, proc.stdout[-2000:]
    for ratio in ("ratio_default", "ratio_fast"):
        assert result[ratio] > 0
    table = "\n".join(lines[:-1])
    for label in ("mirrorha default", "mirrorha fast", "keepalived advert_int 1"):
        assert label in table, table
    assert left_namespaces == [], "the benchmark left its lab namespaces"
    assert left_pids == [], "the benchmark left processes running"
    assert not default_workdir(PREFIX).exists(), "the benchmark left its work dir"
