"""Changes made on the secondary's copy behind the mirror's back (primary with a real FUSE mount,
secondary receiving on 127.0.0.1): the receiver's own applies are not reported; a write by
another process is, it survives a restart of the secondary as a flag, and the next resync
compares everything and repairs the file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.mirror.service import MirrorService
from tests.integration.mirror_helpers import (
    assert_same,
    free_port,
    make_pair,
    run,
    sync_pair,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def env(tmp_path: Path, fuse_required: None) -> Iterator[dict[str, MirrorService]]:
    prim, sec = make_pair(tmp_path, free_port(), ack_timeout_s=3.0)
    sec.behind_grace_s = 0.3
    services = {"prim": prim, "sec": sec}
    try:
        yield services
    finally:
        for svc in services.values():
            run(svc.stop())


def test_a_write_behind_the_back_is_reported_and_the_next_resync_is_full(
    tmp_path: Path, env: dict[str, MirrorService], caplog: pytest.LogCaptureFixture
) -> None:
    prim, sec = env["prim"], env["sec"]
    p, s = tmp_path / "p", tmp_path / "s"
    for i in range(4):
        (p / f"f{i}").write_bytes(bytes([i]) * 300_000)
    run(sec.start_receiver())
    run(prim.start_primary("gen1"))
    sync_pair(prim, sec, full=True)
    prim.peer_synced("gen1")

    # the receiver's own applies: writes, a new directory, a rename, a chmod, a removal
    with open(p / "f0", "r+b") as f:
        f.write(b"through the mirror")
    (p / "d").mkdir()
    (p / "d" / "new").write_bytes(b"new file")
    os.rename(p / "f3", p / "d" / "f3")
    os.chmod(p / "f2", 0o600)
    os.unlink(p / "d" / "new")
    assert_same(p, s)

    # another process writes the secondary's copy of f1 (not touched through the mirror)
    watcher = sec._sec[0].behind
    assert watcher is not None
    wait_for(
        lambda: not watcher.expectations.expected(b"f1", time.monotonic()),
        what="the receiver's last touch of f1 to age past the grace",
    )
    code = "import sys; f = open(sys.argv[1], 'r+b'); f.seek(1000); f.write(b'evil'); f.close()"
    subprocess.run([sys.executable, "-c", code, str(s / "f1")], check=True, timeout=60)
    wait_for(lambda: sec.status()["behind_the_back"] >= 1, what="the change to be noticed")
    status = sec.status()
    assert status["full_compare_owed"] is True
    # events are read in order: every receiver event before it was seen, none was reported
    assert status["behind_the_back_recent"]
    assert all(r.startswith("f1:") for r in status["behind_the_back_recent"]), status

    # the secondary restarts; the flag on disk makes the next (incremental) resync full
    run(sec.stop())
    _, sec2 = make_pair(tmp_path, prim.port, ack_timeout_s=3.0)
    env["sec"] = sec2
    assert sec2.status()["behind_the_back"] == 0
    run(sec2.start_receiver())
    assert sec2.status()["full_compare_owed"] is True
    wait_for(lambda: prim.mirror_state() == "dropped", what="the primary to see the drop")
    with caplog.at_level(logging.INFO, logger="test.prim"):
        sync_pair(prim, sec2, full=False)
    assert_same(p, s)
    assert (s / "f1").read_bytes() == bytes([1]) * 300_000
    assert "behind the mirror's back" in caplog.text
    assert sec2.status()["full_compare_owed"] is False
