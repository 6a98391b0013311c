"""Reintegration between two MirrorServices on 127.0.0.1 (primary with a real FUSE mount):
incremental after a secondary was away, live writes during a resync, full sync sending only
differing blocks, an interrupted resync rerun, and quarantine of a diverged target."""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.mirror.resync import BLOCK
from app.mirror.service import MirrorService
from tests.integration.mirror_helpers import (
    assert_same,
    free_port,
    make_pair,
    run,
    snapshot,
    sync_pair,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
FILES = 20
SIZE = 1 << 20


@pytest.fixture
def env(tmp_path: Path, fuse_required: None) -> Iterator[dict[str, MirrorService]]:
    port = free_port()
    prim, sec = make_pair(tmp_path, port, ack_timeout_s=3.0)
    services = {"prim": prim, "sec": sec}
    try:
        yield services
    finally:
        for svc in services.values():
            run(svc.stop())


def seed(root: Path) -> None:
    rng = random.Random(1)
    for i in range(FILES):
        (root / f"f{i:02}").write_bytes(rng.randbytes(SIZE))


def new_secondary(tmp_path: Path, env: dict[str, MirrorService], **kw: object) -> MirrorService:
    run(env["sec"].stop())
    _, sec = make_pair(tmp_path, env["prim"].port, **kw)  # type: ignore[arg-type]
    env["sec"] = sec
    run(sec.start_receiver())
    return sec


def start_synced(tmp_path: Path, env: dict[str, MirrorService]) -> None:
    seed(tmp_path / "p")
    run(env["sec"].start_receiver())
    run(env["prim"].start_primary("gen1"))
    sync_pair(env["prim"], env["sec"], full=True)
    env["prim"].peer_synced("gen1")
    journal = env["prim"]._prim[0].journal
    assert journal is not None
    wait_for(lambda: not list(journal.dirty_files()) and not journal.namespace_paths())


def test_incremental_resync_sends_only_the_changed_ranges(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    start_synced(tmp_path, env)
    prim, p, s = env["prim"], tmp_path / "p", tmp_path / "s"
    run(env["sec"].stop())  # the secondary goes away
    wait_for(lambda: prim.mirror_state() == "dropped")
    prim.set_generation("gen2")
    changed = 0
    rng = random.Random(2)
    for i in (1, 7, 13):  # 1% of 20 MiB, in 64 KiB-aligned pieces
        with open(p / f"f{i:02}", "r+b") as f:
            f.seek(rng.randrange(SIZE // BLOCK) * BLOCK)
            f.write(rng.randbytes(BLOCK))
            changed += BLOCK
    with open(p / "f03", "r+b") as f:
        f.seek(100)
        f.write(b"tiny")
        changed += 4
    sec = new_secondary(tmp_path, env)
    sync_pair(prim, sec)
    assert_same(p, s)
    sent = prim.status()["bytes_sent"]
    assert sent <= 1.2 * changed + 4 * BLOCK + 4096 * 4, sent


def test_scattered_page_writes_send_about_the_bytes_changed(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    """The bench's pattern, small: random 4 KiB writes while the peer was away; the bytes on
    the wire stay within 1.2x the bytes changed plus a small per-file overhead."""
    start_synced(tmp_path, env)
    prim, p, s = env["prim"], tmp_path / "p", tmp_path / "s"
    run(env["sec"].stop())
    wait_for(lambda: prim.mirror_state() == "dropped")
    prim.set_generation("gen2")
    rng = random.Random(4)
    pages = sorted(rng.sample([(i, o) for i in range(FILES) for o in range(SIZE // 4096)], 200))
    for i, page in pages:
        with open(p / f"f{i:02}", "r+b") as f:
            f.seek(page * 4096)
            f.write(rng.randbytes(4096))
    changed = 4096 * len(pages)
    files = len({i for i, _ in pages})
    sec = new_secondary(tmp_path, env)
    sync_pair(prim, sec)
    assert_same(p, s)
    sent = prim.status()["bytes_sent"]
    assert sent <= 1.2 * changed + 1024 * files, (sent, changed, files)


def test_live_writes_during_a_resync_end_identical(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    start_synced(tmp_path, env)
    prim, p, s = env["prim"], tmp_path / "p", tmp_path / "s"
    run(env["sec"].stop())
    wait_for(lambda: prim.mirror_state() == "dropped")
    for i in range(0, FILES, 2):
        with open(p / f"f{i:02}", "r+b") as f:
            f.write(os.urandom(SIZE))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(3)
        try:
            for n in range(100_000):
                if stop.is_set():
                    return
                name = p / f"f{rng.randrange(FILES):02}"
                with open(name, "r+b") as f:
                    f.seek(rng.randrange(SIZE))
                    f.write(rng.randbytes(rng.randrange(1, 9000)))
                if n % 50 == 0:
                    (p / f"new{n}").write_bytes(b"n" * n)
                if n % 70 == 0 and (p / f"new{n - 50}").exists():
                    os.rename(p / f"new{n - 50}", p / f"moved{n}")
        except BaseException as exc:
            errors.append(exc)

    sec = new_secondary(tmp_path, env, bandwidth_mbps=40.0)
    prim.bandwidth_mbps = 40.0  # slow the resync so the writer overlaps it
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        sync_pair(prim, sec)
    finally:
        stop.set()
        thread.join(30)
    assert not errors
    assert prim.mirror_state() == "connected"
    assert_same(p, s)


def test_full_sync_of_a_target_with_differing_blocks_sends_only_those(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    p, s = tmp_path / "p", tmp_path / "s"
    seed(p)
    seed(s)
    for i in (2, 9):
        with open(s / f"f{i:02}", "r+b") as f:
            f.seek(3 * BLOCK + 11)
            f.write(b"damage")
    (s / "only-on-target").write_bytes(b"x")
    os.truncate(s / "f05", SIZE // 2)
    run(env["sec"].start_receiver())
    run(env["prim"].start_primary("gen1"))
    sync_pair(env["prim"], env["sec"], full=True)
    assert_same(p, s)
    sent = env["prim"].status()["bytes_sent"]
    expected = 2 * BLOCK + SIZE // 2
    assert sent <= 1.2 * expected + 64 * 1024, sent


def test_an_interrupted_resync_reruns_to_identical(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    p, s = tmp_path / "p", tmp_path / "s"
    seed(p)
    env["prim"].bandwidth_mbps = 16.0  # 2 MB/s: the full copy takes seconds
    run(env["sec"].start_receiver())
    run(env["prim"].start_primary("gen1"))
    run(env["sec"].start_resync("target", True))
    run(env["prim"].start_resync("source", True))
    wait_for(lambda: env["prim"].status()["resync"]["bytes_done"] > 2 * SIZE)
    link = env["prim"]._prim[0].link
    assert link is not None
    link.close("test: connection cut")  # abrupt cut of the source's connection
    wait_for(lambda: env["prim"].resync_state() == "none")
    assert env["sec"].resync_state() in ("none", "running")
    sec = new_secondary(tmp_path, env)  # the target restarts too
    env["prim"].bandwidth_mbps = 0.0
    sync_pair(env["prim"], sec, full=True)
    assert_same(p, s)


def test_a_diverged_target_keeps_its_files_in_quarantine(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    p, s = tmp_path / "p", tmp_path / "s"
    start_synced(tmp_path, env)
    run(env["sec"].stop())
    # the secondary's node becomes primary alone (split brain) and writes
    _, alone = make_pair(tmp_path, free_port())
    alone.dirs, alone.state_dir = [(s, ())], tmp_path / "sstate"
    env["alone"] = alone
    run(alone.start_primary("genB"))
    (s / "mine.txt").write_bytes(b"written during the split")
    with open(s / "f04", "r+b") as f:
        f.write(b"diverged")
    run(alone.stop())
    # meanwhile the primary wrote too
    (p / "theirs.txt").write_bytes(b"primary side")
    sec = new_secondary(tmp_path, env)
    folder = run(sec.quarantine("split brain with n1"))
    kept = folder / str(s).lstrip("/")
    assert (kept / "mine.txt").read_bytes() == b"written during the split"
    assert (kept / "f04").read_bytes()[:8] == b"diverged"
    assert not (kept / "f00").exists()  # unchanged files are not copied
    report = json.loads((folder / "report.json").read_text())
    assert report["reason"] == "split brain with n1"
    names = {f["path"]: f for d in report["dirs"] for f in d["files"]}
    assert names["mine.txt"]["size"] == len(b"written during the split")
    assert len(names["f04"]["sha256"]) == 64
    assert "mine.txt" in (folder / "report.txt").read_text()
    sync_pair(env["prim"], sec, full=True)
    assert_same(p, s)
    assert not (s / "mine.txt").exists()


def test_the_state_shows_each_sessions_times_in_order(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    prim = env["prim"]
    seed(tmp_path / "p")
    run(env["sec"].start_receiver())
    run(prim.start_primary("gen1"))
    before = prim.status()["resync"]
    assert before["started_at"] is None and before["session_s"] is None  # no session yet
    sync_pair(prim, env["sec"], full=True)
    first = prim.status()["resync"]
    assert first["state"] == "done"
    assert first["started_at"] <= first["finished_at"] <= prim.status()["at"]
    assert first["session_s"] > 0
    prim.peer_synced("gen1")
    run(env["sec"].stop())
    wait_for(lambda: prim.mirror_state() == "dropped")
    with open(tmp_path / "p" / "f00", "r+b") as f:
        f.write(b"changed")
    sec = new_secondary(tmp_path, env)
    sync_pair(prim, sec)
    second = prim.status()["resync"]
    assert first["finished_at"] <= second["started_at"] <= second["finished_at"]
    assert second["session_s"] > 0
    assert_same(tmp_path / "p", tmp_path / "s")


def test_directory_times_are_the_primarys_after_a_reintegration(
    tmp_path: Path, env: dict[str, MirrorService]
) -> None:
    """Namespace changes made while the peer was away (one of them undone before it came
    back) move directory times on the primary; the resync's own ops move them again on the
    target; once live, the target has the primary's times."""
    start_synced(tmp_path, env)
    prim, p, s = env["prim"], tmp_path / "p", tmp_path / "s"
    run(env["sec"].stop())
    wait_for(lambda: prim.mirror_state() == "dropped")
    prim.set_generation("gen2")
    os.makedirs(p / "new" / "deeper")
    (p / "new" / "deeper" / "file").write_bytes(b"made while alone")
    (p / "came-and-went").write_bytes(b"x")
    os.unlink(p / "came-and-went")  # only the root's time says it happened
    os.unlink(p / "f05")
    sec = new_secondary(tmp_path, env)
    sync_pair(prim, sec)
    wait_for(
        lambda: (
            snapshot(p, dir_times=True) == snapshot(s, dir_times=True)
            and os.stat(p).st_mtime_ns == os.stat(s).st_mtime_ns
        ),
        timeout=10,
        what="directory times on the target after the resync",
    )
    assert not (s / "f05").exists() and (s / "new" / "deeper" / "file").is_file()
