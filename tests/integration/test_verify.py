"""Verify between two MirrorServices on 127.0.0.1 (primary with a real FUSE mount): identical
trees report nothing; a block changed, a file removed and a file added behind the mirror's back
on the secondary are reported with their path (and range); live writes during a verify are not
reported; verify is refused on the secondary."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.mirror.resync import BLOCK
from app.mirror.service import MirrorService
from app.mirror.verify import VerifyError
from tests.integration.mirror_helpers import free_port, make_pair, run, sync_pair, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SIZE = 1 << 20


@pytest.fixture
def pair(tmp_path: Path, fuse_required: None) -> Iterator[tuple[MirrorService, MirrorService]]:
    prim, sec = make_pair(tmp_path, free_port(), ack_timeout_s=3.0)
    try:
        rng = random.Random(7)
        p = tmp_path / "p"
        (p / "sub").mkdir()
        for i in range(5):
            (p / f"f{i}").write_bytes(rng.randbytes(SIZE))
        (p / "sub" / "small").write_bytes(b"hello")
        os.symlink("f1", p / "link")
        run(sec.start_receiver())
        run(prim.start_primary("gen1"))
        sync_pair(prim, sec, full=True)
        yield prim, sec
    finally:
        run(prim.stop())
        run(sec.stop())


def verify(prim: MirrorService, rate_mbps: float = 0.0) -> dict[str, Any]:
    run(prim.start_verify(rate_mbps))
    wait_for(lambda: not prim.verify_status()["running"], what="the verify to finish")
    status = prim.verify_status()
    assert status["last_error"] == "", status
    assert status["finished"] is not None
    return status


def test_identical_trees_have_no_difference(pair: tuple[MirrorService, MirrorService]) -> None:
    prim, _ = pair
    status = verify(prim, rate_mbps=400.0)
    assert status["differences"] == []
    assert status["files_total"] == 6
    assert status["files_done"] == 6
    assert status["bytes_done"] == status["bytes_total"] == 5 * SIZE + 5


def test_changes_behind_the_mirrors_back_are_reported(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, _ = pair
    s, p = tmp_path / "s", tmp_path / "p"
    # the sync hands the directories it touched to the live times flush: let it pass first, or
    # it would put the primary's times back over the changes made below
    wait_for(lambda: not any(d.dirty_times for d in prim._prim), what="the times flush")
    with open(s / "f2", "r+b") as f:  # one block changed on the secondary only
        f.seek(3 * BLOCK + 10)
        f.write(b"behind the back")
    os.unlink(s / "f4")
    (s / "sub" / "extra").write_bytes(b"only on the secondary")
    os.chmod(s / "sub" / "small", 0o600)
    os.chmod(p / "sub" / "small", 0o644)  # through the mount: replicated, then changed again
    os.chmod(s / "sub" / "small", 0o600)
    os.remove(s / "link")
    os.symlink("f0", s / "link")

    status = verify(prim)
    found = {(d["path"], d["kind"]): d for d in status["differences"]}
    assert set(found) == {
        (f"{p}/f2", "content"),
        (f"{p}/f2", "times"),  # written on the secondary: its mtime moved there
        (f"{p}/f4", "missing_on_peer"),
        (f"{p}/", "times"),  # an entry removed and a symlink replaced in the root
        (f"{p}/sub", "times"),  # an entry added
        (f"{p}/sub/extra", "extra_on_peer"),
        (f"{p}/sub/small", "mode"),  # chmod moves ctime only, not mtime: no times difference
        (f"{p}/link", "symlink"),
        (f"{p}/link", "times"),  # a new symlink, made later
    }, status["differences"]
    assert found[(f"{p}/f2", "content")]["ranges"] == [[3 * BLOCK, BLOCK]]
    assert "644" in found[(f"{p}/sub/small", "mode")]["detail"]
    assert "UTC here" in found[(f"{p}/f2", "times")]["detail"]


def test_live_writes_during_a_verify_are_not_differences(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, _ = pair
    p = tmp_path / "p"
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(3)
        try:
            for n in range(100_000):
                if stop.is_set():
                    return
                with open(p / f"f{rng.randrange(5)}", "r+b") as f:
                    f.seek(rng.randrange(SIZE))
                    f.write(rng.randbytes(rng.randrange(1, 9000)))
                if n % 20 == 0:
                    (p / "sub" / f"new{n}").write_bytes(b"n" * n)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        status = verify(prim, rate_mbps=80.0)
    finally:
        stop.set()
        thread.join(30)
    assert not errors
    assert status["differences"] == []


def test_a_file_open_for_writing_has_its_times_in_flight_until_it_is_released(
    tmp_path: Path, pair: tuple[MirrorService, MirrorService]
) -> None:
    prim, _ = pair
    p, s = tmp_path / "p", tmp_path / "s"
    wait_for(lambda: not any(d.dirty_times for d in prim._prim), what="the times flush")
    with open(p / "f3", "r+b") as f:
        f.write(b"written while open")
        f.flush()
        # Each side moves an open file's mtime to its own clock as it applies a write (here
        # both often land in the same coarse clock tick, so the peer's is set apart by hand):
        # the primary's times reach the peer with the handle's release, not before.
        os.utime(s / "f3", ns=(10**18, 10**18))
        assert verify(prim)["differences"] == []
    wait_for(
        lambda: os.stat(s / "f3").st_mtime_ns == os.stat(p / "f3").st_mtime_ns,
        what="the times sent with the release",
    )
    assert verify(prim)["differences"] == []
    # once released, the same change behind the mirror's back is a difference
    os.utime(s / "f3", ns=(10**18, 10**18))
    found = [(d["path"], d["kind"]) for d in verify(prim)["differences"]]
    assert found == [(f"{p}/f3", "times")]


def test_verify_is_refused_on_the_secondary(pair: tuple[MirrorService, MirrorService]) -> None:
    _, sec = pair
    with pytest.raises(VerifyError, match="primary"):
        run(sec.start_verify(10.0))
