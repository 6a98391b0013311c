"""`mirrorha demo` from the built file, as the README's first command runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from app.lab import Lab
from tests.lab.conftest import require_lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "mhd-"


def test_demo_from_the_built_file_comes_up_answers_and_tears_down(tmp_path: Path) -> None:
    require_lab()
    r = subprocess.run(["./build.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
    env.pop("PYTHONPATH", None)
    out = tmp_path / "demo.out"
    with out.open("w") as f:
        demo = subprocess.Popen(
            [
                "python3",
                str(ROOT / "dist" / "mirrorha.pyz"),
                "demo",
                "--prefix",
                PREFIX,
                "--minutes",
                "5",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "The cluster is up" not in out.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert "The cluster is up" in text, text
        # The demo app answers on the VIP from the client namespace, served by node1.
        probe = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                f"{PREFIX}client",
                "curl",
                "-s",
                "-m",
                "5",
                "http://198.18.1.100:8080/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert '"node": "node1"' in probe.stdout, probe.stdout + probe.stderr
        demo.send_signal(signal.SIGINT)
        demo.wait(120)
        assert "lab removed" in out.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)
        Lab.cleanup_stale(PREFIX)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert PREFIX not in netns
    assert f"mirrorha-lab-{PREFIX}" not in Path("/proc/mounts").read_text()
