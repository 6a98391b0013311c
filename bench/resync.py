#!/usr/bin/env python3
"""Resync benchmark: mirrorha's reintegration and full sync against rsync and cp, in the lab.

How it works
    One lab (prefix "mhy-", app/lab.py). A tree of ``--size-mb`` MiB of random bytes (files of
    at most 64 MiB) is written into node1's copy of /srv/mirrorha/data before the daemons
    start; a LabCluster (replicated=True) is then formed (first_start: node1 PRIM, node2
    SECOND Ready after its initial sync).

    Incremental (reintegration), ``--rounds`` rounds (3 by default), each: node2 is stopped
    cleanly (node1 goes ALONE), a copy of node2's tree is taken as the rsync baseline's "old"
    directory, then ``--change-pct`` % of the tree (1 % by default) is overwritten through
    node1's mount in distinct random 4 KiB blocks (``CHANGE`` script, its own seed per round,
    fsync per file). node2 is started again and two times are taken:

    - the session (the figure compared with rsync): node1's own timestamps of the resync
      session, ``session_s`` in its state (``mirror.resync``: ``started_at``, ``finished_at``,
      ``session_s``), measured by node1 on its monotonic clock from the moment it sends the
      resync BEGIN that node2 accepts (node2's daemon is up, connected and armed) to node2's
      answer to ResyncDone (every range applied and node2's filesystem flushed with syncfs,
      so what it holds is on disk). The bench checks that this session started after node2's
      start (a session of this round, not an earlier one).
    - start to Ready: the bench's clock from just before node2's start to its SECOND Ready
      (polled every 0.1 s): the daemon's start (a Python process), the heartbeat handshake,
      node1's reconnection to node2's mirror port, the session, and the next decision ticks
      of both nodes.

    Bytes sent is node1's mirror status ``bytes_sent`` (the live link's counter, a fresh link
    since node2 came back: resync queries, checksums and data). Baseline: ``rsync -a --inplace
    --no-whole-file --stats`` from node1's changed tree (a plain directory seen from the host)
    into the "old" copy; time, and "Total bytes sent" from --stats. Each round pairs its
    session with its own rsync run; the summary is the round with the median rsync/session
    ratio (its figures belong together), with the range of the ratios and every round under
    "runs": this shared machine's timings drift by tens of percent between minutes.

    Full sync: node2 is stopped, its data directory emptied and its state directory removed
    (a new, empty secondary), then started; the session and the start-to-Ready times as
    above, and bytes sent. Baselines: ``cp -a`` and ``rsync -a --stats`` of the same tree
    into empty plain directories (time; rsync's bytes sent).

    After each mirrorha sync both copies are compared byte for byte (``identical`` in the
    output). Goals printed, never asserted: reintegration (the session) at least 10 times
    faster than rsync; bytes sent at most 1.2 times the bytes changed.

    Output: one line per figure, then one JSON line (the last line) with everything.

Exceptions
    BenchError    a step failed or a wait timed out; main() prints it and exits 1 (the JSON
                  line still comes last, with "error").
    Not root, no lab, no FUSE, no rsync: exit 2 with the reason.

Known limits
    One machine and one disk: both nodes, rsync and cp share them, and the page cache is warm
    for every contender (nothing is dropped); ``sync`` runs, untimed, before each timed step so
    none pays for the previous one's writeback. mirrorha's session includes flushing what it
    wrote to disk (syncfs on node2, as its durability promise requires); rsync and cp are
    timed without any flush (they return with the data in the page cache). rsync's time
    includes its process start and a local (pipe) transfer, no remote host; mirrorha's
    session includes neither a process start nor the heartbeat handshake (the start-to-Ready
    time does). The full sync runs once. ``--prefix`` names the lab (default "mhy-"), so two
    benches can run side by side.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `bench/resync.py` from anywhere
    sys.path.insert(0, str(REPO))

from app.lab import Lab, LabError, unavailable_reason  # noqa: E402
from app.labcluster import DATA_DIR, LabCluster, LabClusterError  # noqa: E402

PREFIX = "mhy-"
MIB = 1 << 20
BLOCK = 4096
FILE_MIB = 64
SEED = 20240601
GOALS = {"speedup_vs_rsync": 10.0, "sent_over_changed": 1.2}

CHANGE = r'''
"""Overwrite ``pct`` % of the tree in distinct random 4 KiB blocks; print one JSON line."""
import json, os, random, sys
root, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
names = sorted(n for n in os.listdir(root) if n.endswith(".bin"))
blocks = []
for name in names:
    size = os.path.getsize(os.path.join(root, name))
    blocks += [(name, i * 4096) for i in range(size // 4096)]
rng = random.Random(seed)
picked = sorted(rng.sample(blocks, max(1, round(len(blocks) * pct / 100))))
fds = {}
for name, offset in picked:
    if name not in fds:
        fds[name] = os.open(os.path.join(root, name), os.O_WRONLY)
    os.pwrite(fds[name], rng.randbytes(4096), offset)
for fd in fds.values():
    os.fsync(fd)
    os.close(fd)
print(json.dumps({"writes": len(picked), "bytes": 4096 * len(picked), "files": len(fds),
                  "blocks_total": len(blocks)}))
'''


class BenchError(Exception):
    """A step failed or a wait timed out; the message says what was seen."""


# ------------------------------------------------------------------ helpers


def make_tree(root: Path, size_mb: int, seed: int) -> int:
    """Files data-NNN.bin of random bytes, FILE_MIB MiB each (the last may be shorter)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    left, index = size_mb, 0
    while left > 0 and index < 100_000:
        mib = min(FILE_MIB, left)
        with open(root / f"data-{index:03d}.bin", "wb") as f:
            for _ in range(mib):
                f.write(rng.randbytes(MIB))
        left -= mib
        index += 1
    return size_mb * MIB


def timed(argv: list[str], timeout: float) -> tuple[float, str]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return took, proc.stdout


def settle() -> None:
    """Write back dirty pages (untimed) so a timed step does not pay for the one before."""
    subprocess.run(["sync"], check=False, timeout=600)


def rsync_sent(stats: str) -> int:
    m = re.search(r"Total bytes sent: ([0-9,.]+)", stats)
    if m is None:
        raise BenchError(f"no 'Total bytes sent' in rsync --stats: {stats[-400:]!r}")
    return int(re.sub(r"[,.]", "", m.group(1)))


def same_tree(a: Path, b: Path) -> bool:
    """Byte-for-byte comparison of two flat trees of files (names and contents)."""
    names_a = sorted(p.name for p in a.iterdir() if p.is_file())
    names_b = sorted(p.name for p in b.iterdir() if p.is_file())
    if names_a != names_b:
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def mirror_status(cluster: LabCluster) -> dict[str, Any]:
    st = cluster.state("node1") or {}
    mirror = st.get("mirror")
    if not isinstance(mirror, dict):
        raise BenchError(f"node1's state has no mirror status: {cluster.describe()}")
    return mirror


def empty_dir(path: Path) -> None:
    for child in list(path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ------------------------------------------------------------------ phases


def rejoin(cluster: LabCluster, timeout: float) -> tuple[float, float, float, dict[str, Any]]:
    """Start node2, time until it is SECOND Ready; (start to Ready, until its daemon
    answered, node1's session time of the resync, node1's mirror status then)."""
    settle()
    wall0 = time.time()
    t0 = time.monotonic()
    cluster.start_node("node2")
    answered = time.monotonic() - t0
    cluster.wait_state("node2", "SECOND", timeout, sub="Ready")
    took = time.monotonic() - t0
    cluster.wait_state("node1", "PRIM", timeout)
    mirror = mirror_status(cluster)
    session = mirror.get("resync") or {}
    started, took_s = session.get("started_at"), session.get("session_s")
    if not isinstance(started, (int, float)) or not isinstance(took_s, (int, float)):
        raise BenchError(f"node1's state shows no finished resync session: {session}")
    if started < wall0:
        raise BenchError(
            f"node1's last resync session started {wall0 - started:.3f} s before node2's "
            f"start: not this round's ({session})"
        )
    return took, answered, float(took_s), mirror


def incremental_round(
    lab: Lab, cluster: LabCluster, args: argparse.Namespace, seed: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """One reintegration round: node2 away, ``--change-pct`` % changed with ``seed``, node2
    back (mirrorha's session), then rsync of the same change into a copy of node2's old tree."""
    src = lab.host_path("node1", DATA_DIR)
    dst = lab.host_path("node2", DATA_DIR)
    plain = lab.workdir / "plain"
    old = plain / "old"
    cluster.stop_node("node2")
    cluster.wait_state("node1", "ALONE", 60)
    plain.mkdir(parents=True, exist_ok=True)
    timed(["cp", "-a", f"{dst}/.", str(old)], args.timeout)  # rsync's "old" copy
    script = lab.workdir / "change.py"
    script.write_text(CHANGE)
    out = lab.run(
        "node1",
        [sys.executable, str(script), DATA_DIR, str(args.change_pct), str(seed)],
        timeout=args.timeout,
    ).stdout
    change = json.loads(out.strip().splitlines()[-1])
    dirty = (mirror_status(cluster).get("journal") or {}).get("bytes_dirty")
    say(
        f"  node2 stopped; {change['writes']} random 4 KiB writes ({change['bytes']} bytes) "
        f"in {change['files']} files through node1's mount; node1's journal marks {dirty} bytes"
    )
    took, answered, session, mirror = rejoin(cluster, args.timeout)
    sent = int(mirror.get("bytes_sent") or 0)
    identical = same_tree(src, dst)
    say(
        f"  mirrorha reintegration: session {session:.3f} s (node1's timestamps); "
        f"{took:.2f} s from node2's start to SECOND Ready (daemon answering after "
        f"{answered:.2f} s), {sent} bytes sent, identical={identical}"
    )
    settle()
    rs_s, stats = timed(
        ["rsync", "-a", "--inplace", "--no-whole-file", "--stats", f"{src}/", f"{old}/"],
        args.timeout,
    )
    rs_sent = rsync_sent(stats)
    rs_identical = same_tree(src, old)
    say(
        f"  rsync --inplace --no-whole-file: {rs_s:.3f} s, {rs_sent} bytes sent; "
        f"rsync / session = {rs_s / session:.2f}"
    )
    shutil.rmtree(old)
    return {
        "changed_bytes": change["bytes"],
        "changed_writes": change["writes"],
        "files_changed": change["files"],
        "journal_bytes_dirty": dirty,
        "mirrorha_s": round(session, 4),
        "mirrorha_start_to_ready_s": round(took, 3),
        "mirrorha_daemon_answer_s": round(answered, 3),
        "mirrorha_bytes_sent": sent,
        "mirrorha_identical": identical,
        "rsync_s": round(rs_s, 3),
        "rsync_bytes_sent": rs_sent,
        "rsync_identical": rs_identical,
        "speedup_vs_rsync": round(rs_s / session, 2),
        "start_to_ready_speedup_vs_rsync": round(rs_s / took, 2),
        "sent_over_changed": round(sent / change["bytes"], 3),
        "rsync_sent_over_changed": round(rs_sent / change["bytes"], 3),
    }


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of ``runs``: the round whose speedup over rsync is the median (lower
    median for an even count), so its figures belong together; every round in "runs",
    the speedups' range in "speedup_range", and "identical" only if every round was."""
    order = sorted(runs, key=lambda r: r["speedup_vs_rsync"])
    out = dict(order[(len(order) - 1) // 2])
    out["rounds"] = len(runs)
    out["speedup_range"] = [order[0]["speedup_vs_rsync"], order[-1]["speedup_vs_rsync"]]
    out["mirrorha_identical"] = all(r["mirrorha_identical"] for r in runs)
    out["rsync_identical"] = all(r["rsync_identical"] for r in runs)
    out["runs"] = runs
    return out


def incremental(
    lab: Lab, cluster: LabCluster, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    """``--rounds`` reintegration rounds, each with its own change (another seed), each
    paired with its rsync run: the median round by speedup."""
    runs = []
    for n in range(args.rounds):
        say(f" round {n + 1} of {args.rounds}")
        runs.append(incremental_round(lab, cluster, args, SEED + 1 + n, say))
    return median_round(runs)


def full(
    lab: Lab, cluster: LabCluster, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    src = lab.host_path("node1", DATA_DIR)
    dst = lab.host_path("node2", DATA_DIR)
    cluster.stop_node("node2")
    cluster.wait_state("node1", "ALONE", 60)
    empty_dir(dst)
    shutil.rmtree(cluster.state_dir("node2"))
    say("  node2 stopped, its data directory emptied and its state removed")
    took, answered, session, mirror = rejoin(cluster, args.timeout)
    sent = int(mirror.get("bytes_sent") or 0)
    identical = same_tree(src, dst)
    say(
        f"  mirrorha full sync: session {session:.3f} s (node1's timestamps); {took:.2f} s "
        f"from node2's start to SECOND Ready (daemon answering after {answered:.2f} s), "
        f"{sent} bytes sent, identical={identical}"
    )
    plain = lab.workdir / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    settle()
    cp_s, _ = timed(["cp", "-a", f"{src}/.", str(plain / "cp")], args.timeout)
    say(f"  cp -a: {cp_s:.2f} s")
    shutil.rmtree(plain / "cp")
    settle()
    rs_s, stats = timed(["rsync", "-a", "--stats", f"{src}/", f"{plain / 'rsync'}/"], args.timeout)
    rs_sent = rsync_sent(stats)
    say(f"  rsync -a: {rs_s:.2f} s, {rs_sent} bytes sent")
    shutil.rmtree(plain / "rsync")
    return {
        "mirrorha_s": round(session, 4),
        "mirrorha_start_to_ready_s": round(took, 3),
        "mirrorha_daemon_answer_s": round(answered, 3),
        "mirrorha_bytes_sent": sent,
        "mirrorha_identical": identical,
        "cp_s": round(cp_s, 3),
        "rsync_s": round(rs_s, 3),
        "rsync_bytes_sent": rs_sent,
        "mirrorha_over_cp": round(session / cp_s, 2),
        "mirrorha_over_rsync": round(session / rs_s, 2),
        "mirrorha_mb_s": round(args.size_mb * MIB / 1e6 / session, 1),
        "cp_mb_s": round(args.size_mb * MIB / 1e6 / cp_s, 1),
        "rsync_mb_s": round(args.size_mb * MIB / 1e6 / rs_s, 1),
    }


def measure(args: argparse.Namespace, result: dict[str, Any], say: Callable[[str], None]) -> None:
    lab = Lab(prefix=args.prefix)
    cluster: LabCluster | None = None
    try:
        lab.up()
        src = lab.host_path("node1", DATA_DIR)
        t0 = time.monotonic()
        result["size_bytes"] = make_tree(src, args.size_mb, SEED)
        took = time.monotonic() - t0
        say(f"lab {args.prefix} up; {args.size_mb} MiB tree written in {took:.1f} s")
        cluster = LabCluster(lab, replicated=True)
        t0 = time.monotonic()
        cluster.first_start(timeout=args.timeout)
        say(f"pair formed with the initial sync in {time.monotonic() - t0:.1f} s")
        say(f"incremental: {args.change_pct:g} % changed while node2 was away")
        result["incremental"] = incremental(lab, cluster, args, say)
        say("full sync: node2 with an empty data directory")
        result["full"] = full(lab, cluster, args, say)
    finally:
        try:
            if cluster is not None:
                cluster.stop_all()
        finally:
            lab.down()


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/resync.py",
        description="Reintegration after a peer's absence and full sync, against rsync and cp.",
    )
    ap.add_argument("--size-mb", type=int, default=1024, help="tree size in MiB (1024)")
    ap.add_argument(
        "--change-pct", type=float, default=1.0, help="%% of the data changed meanwhile (1)"
    )
    ap.add_argument("--timeout", type=float, default=1200.0, help="bound of every wait, s")
    ap.add_argument(
        "--rounds", type=int, default=3, help="reintegration rounds, median reported (3)"
    )
    ap.add_argument("--prefix", default=PREFIX, help=f"lab namespace prefix ({PREFIX})")
    ap.add_argument("--quick", action="store_true", help="a 64 MiB tree (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mb = 64
    if (
        args.size_mb < 1
        or not 0 < args.change_pct <= 100
        or args.timeout <= 0
        or not 1 <= args.rounds <= 50
    ):
        ap.error("--size-mb >= 1, --change-pct in (0, 100], --timeout > 0, --rounds in 1..50")
    if os.geteuid() != 0:
        print("bench/resync.py needs root (lab namespaces, FUSE mounts)", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason is None:
        from app.mirror.fusecheck import fuse_unavailable_reason

        reason = fuse_unavailable_reason()
    if reason is None and shutil.which("rsync") is None:
        reason = "rsync is not installed (Debian package rsync)"
    if reason is not None:
        print(f"bench/resync.py cannot run here: {reason}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.monotonic()
    result: dict[str, Any] = {
        "bench": "resync",
        "size_mb": args.size_mb,
        "change_pct": args.change_pct,
    }
    try:
        measure(args, result, say)
    except (BenchError, LabError, LabClusterError, OSError, ValueError) as exc:
        print(f"bench/resync.py: {exc}", file=sys.stderr)
        result["error"] = str(exc)[:1000]
        print(json.dumps(result), flush=True)
        return 1
    inc, fs = result["incremental"], result["full"]
    result["goals"] = {
        "speedup_ge_10x_rsync": inc["speedup_vs_rsync"] >= GOALS["speedup_vs_rsync"],
        "sent_le_1_2x_changed": inc["sent_over_changed"] <= GOALS["sent_over_changed"],
    }
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    say("")
    say(
        f"reintegration of {inc['changed_bytes']} changed bytes "
        f"({args.change_pct:g} % of {args.size_mb} MiB, {inc['changed_writes']} x 4 KiB)"
    )
    say(f"{'':34}{'time s':>10}{'bytes sent':>16}{'sent/changed':>14}")
    say(
        f"{'mirrorha session':<34}{inc['mirrorha_s']:>10.3f}"
        f"{inc['mirrorha_bytes_sent']:>16}{inc['sent_over_changed']:>14.3f}"
    )
    say(
        f"{'mirrorha start->Ready (+start)':<34}{inc['mirrorha_start_to_ready_s']:>10.3f}"
        f"{'':>16}{'':>14}"
    )
    say(
        f"{'rsync --inplace --no-whole-file':<34}{inc['rsync_s']:>10.3f}"
        f"{inc['rsync_bytes_sent']:>16}{inc['rsync_sent_over_changed']:>14.3f}"
    )
    lo, hi = inc["speedup_range"]
    say(
        f"rsync time / mirrorha session = {inc['speedup_vs_rsync']:.2f} "
        f"(rsync time / mirrorha start->Ready = {inc['start_to_ready_speedup_vs_rsync']:.2f})"
    )
    say(
        f"the median of {inc['rounds']} rounds by rsync / session (each round its own change "
        f"and its own rsync run): range {lo:.2f}..{hi:.2f}"
    )
    say(f"full sync of {args.size_mb} MiB into an empty directory")
    say(f"{'':34}{'time s':>10}{'MB/s':>10}{'bytes sent':>16}")
    say(
        f"{'mirrorha session (flushed)':<34}{fs['mirrorha_s']:>10.3f}"
        f"{fs['mirrorha_mb_s']:>10.1f}{fs['mirrorha_bytes_sent']:>16}"
    )
    say(f"{'mirrorha start->Ready (+start)':<34}{fs['mirrorha_start_to_ready_s']:>10.3f}")
    say(f"{'cp -a (no flush)':<34}{fs['cp_s']:>10.3f}{fs['cp_mb_s']:>10.1f}{'-':>16}")
    say(
        f"{'rsync -a (no flush)':<34}{fs['rsync_s']:>10.3f}{fs['rsync_mb_s']:>10.1f}"
        f"{fs['rsync_bytes_sent']:>16}"
    )
    say(
        f"mirrorha session / cp time = {fs['mirrorha_over_cp']:.2f}, "
        f"mirrorha session / rsync time = {fs['mirrorha_over_rsync']:.2f}"
    )
    say(
        "copies identical after mirrorha's syncs: "
        f"reintegration {inc['mirrorha_identical']}, full {fs['mirrorha_identical']}"
    )
    g = result["goals"]
    say(
        "goals (not asserted): reintegration session >= 10x faster than rsync: "
        + ("met" if g["speedup_ge_10x_rsync"] else "MISSED")
        + f" ({inc['speedup_vs_rsync']:.2f}x); bytes sent <= 1.2x changed: "
        + ("met" if g["sent_le_1_2x_changed"] else "MISSED")
        + f" ({inc['sent_over_changed']:.3f}x)"
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
