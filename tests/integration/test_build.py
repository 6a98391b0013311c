"""The single file: build.sh makes dist/mirrorha.pyz, which runs with a plain python3."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def plain_python() -> str:
    """A python3 outside the project's venv (the system one when there is one)."""
    for cand in ("/usr/bin/python3", shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if cand and Path(cand).exists():
            return cand
    pytest.skip("no python3 outside the venv on this machine (install the python3 package)")


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = subprocess.run(["./build.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "built dist/mirrorha.pyz" in r.stdout and "bytes" in r.stdout, r.stdout
    out = ROOT / "dist" / "mirrorha.pyz"
    assert out.stat().st_size > 100_000
    return out


def run_pyz(pyz: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp),
        "SHIV_ROOT": str(tmp / "shiv"),
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        [plain_python(), str(pyz), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=120,
    )


def test_built_file_runs_without_venv(pyz: Path, tmp_path: Path) -> None:
    r = run_pyz(pyz, "version", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mirrorha ")
    r = run_pyz(pyz, "--help", tmp=tmp_path)
    assert r.returncode == 0 and "swap" in r.stdout and "config" in r.stdout


@pytest.mark.parametrize(
    "example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name
)
def test_built_file_accepts_every_example(pyz: Path, tmp_path: Path, example: Path) -> None:
    r = run_pyz(pyz, "config", "check", str(example), tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_built_file_rejects_a_bad_config(pyz: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (ROOT / "examples" / "lab.toml").read_text().replace('198.18.1.2"', '198.18.1.999"', 1)
    )
    r = run_pyz(pyz, "config", "check", str(bad), tmp=tmp_path)
    assert r.returncode == 2
    assert "cluster.nodes[1].admin" in r.stderr and "not an IP address" in r.stderr


def test_built_file_imports_every_runtime_module(pyz: Path, tmp_path: Path) -> None:
    """Everything the daemon needs is inside the file: orjson, starlette, hypercorn, pyroute2..."""
    r = run_pyz(pyz, "version", tmp=tmp_path)  # shiv unpacks its site-packages on first run
    assert r.returncode == 0, r.stderr
    site = next((tmp_path / "shiv").glob("*/site-packages"))
    code = (
        "import orjson, starlette, hypercorn, pyroute2, inotify_simple, httpx\n"
        "import app.node, app.cluster.core, app.mirror.protocol, app.api.server\n"
        "print('ok', orjson.dumps({'a': 1}).decode())\n"
    )
    r = subprocess.run(
        [plain_python(), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(site)},
    )
    assert r.returncode == 0, r.stderr
    assert 'ok {"a":1}' in r.stdout
