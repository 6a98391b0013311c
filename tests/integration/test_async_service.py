"""The async fallback inside MirrorService: two services on 127.0.0.1, the primary forced to the
inotify mode (no FUSE mount over its directory). Writes made straight to the primary's directory
reach the secondary; the status says "async" with a measured lag; verify works in that mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.mirror.service import MirrorService
from tests.integration.mirror_helpers import free_port, make_pair, run, sync_pair, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _contents(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = full.read_bytes()
    return out


def mirror_idle(prim: MirrorService) -> bool:
    m = prim.status()["async"]["dirs"][0]
    return bool(m["pending_paths"] == 0 and m["queued_ops"] == 0)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[MirrorService, MirrorService]]:
    prim, sec = make_pair(tmp_path, free_port(), ack_timeout_s=3.0)
    prim.force_async = True
    try:
        yield prim, sec
    finally:
        run(prim.stop())
        run(sec.stop())


def test_writes_on_the_primarys_directory_reach_the_secondary(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, sec = pair
    p, s = tmp_path / "p", tmp_path / "s"
    (p / "old").write_bytes(b"o" * 100_000)
    run(sec.start_receiver())
    run(prim.start_primary("gen1"))
    assert not _mounted(p), "async mode must not mount anything over the directory"
    sync_pair(prim, sec, full=True)
    assert (s / "old").read_bytes() == b"o" * 100_000

    (p / "d").mkdir()
    (p / "d" / "a.bin").write_bytes(os.urandom(300_000))
    with open(p / "old", "r+b") as f:
        f.seek(70_000)
        f.write(b"changed")
    os.symlink("d/a.bin", p / "link")
    (p / "gone").write_bytes(b"x")
    os.rename(p / "gone", p / "d" / "moved")
    wait_for(lambda: _contents(p) == _contents(s), what="the async copy to catch up")

    status = prim.status()
    assert status["mode"] == "async"
    assert status["note"].startswith("async: up to ")
    assert "ms of writes can be lost on failover" in status["note"]
    assert "forced" in status["fuse_unavailable"]
    lag = status["async"]["lag_ms"]
    assert lag["count"] and lag["max"] is not None
    assert status["mirror_state"] == "connected"

    run(prim.start_verify(0.0))
    wait_for(lambda: not prim.verify_status()["running"], what="the verify to finish")
    v = prim.verify_status()
    assert v["last_error"] == "" and v["differences"] == [], v


def test_changes_while_the_secondary_is_away_are_resynced(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, sec = pair
    p, s = tmp_path / "p", tmp_path / "s"
    run(sec.start_receiver())
    run(prim.start_primary("gen1"))
    sync_pair(prim, sec, full=True)
    run(sec.stop())
    wait_for(lambda: prim.mirror_state() == "dropped", what="the drop")
    (p / "while-away").write_bytes(b"w" * 200_000)
    wait_for(lambda: mirror_idle(prim), what="the async mirror to hand the file to its sink")
    _, sec2 = make_pair(tmp_path, prim.port, ack_timeout_s=3.0)
    try:
        run(sec2.start_receiver())
        sync_pair(prim, sec2)
        wait_for(lambda: _contents(p) == _contents(s), what="the resync")
    finally:
        run(sec2.stop())
