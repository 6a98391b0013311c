#!/usr/bin/env python3
"""Acknowledged-records soak: kill -9 of the primary mid-write, failover, nothing acked lost.

How it works
    A LabCluster (app/labcluster.py) with fast timing (pulse 100 ms, timeout 500 ms) forms a
    pair in a fresh lab (prefix "mhs-"). Each round: a writer process is started in the
    primary's namespaces; it appends numbered records ``"N <sha256 of N>\\n"`` to its own file
    ``soak/records-RRRR.log`` in the replicated directory (O_APPEND, then fsync) and, once
    fsync returned, appends the same line to an acknowledgement log OUTSIDE the mirror (a file
    in the lab's work dir on the host, which the node's mount namespace shares). After a random
    0.2-1.5 s the primary's daemon and the writer get SIGKILL (the daemon first, as a crashing
    server would lose both), the other node must become ALONE Ready, and its copy, read from
    the host (``Lab.host_path``), must start with every acknowledged record, byte for byte.
    The killed node is restarted and the round ends once it is SECOND Ready and the survivor
    PRIM Ready; the next round kills the other node (the primary of the next round).

    A secondary that did not acknowledge in time was dropped by the primary (promise 1); it is
    then stale and must go WAIT instead of taking over. Such a round counts only if the killed
    primary's log says it dropped the secondary; the killed node is restarted, must come back
    PRIM, and the acknowledged records are looked for on its copy.

    ``run_round`` and ``check_records`` are what tests/lab/test_mirror.py uses too.

    Output: one line per round, a summary, then one JSON line (the last line).

Exceptions
    SoakError (a wait timed out, a record was lost): main() prints it, exits 1. Not root or
    no lab: exit 2 with the reason.

Known limits
    Both "servers" share one machine and its page cache: the survivor's copy is checked as
    its daemon wrote it (the kernel's view), not after a power loss. Rounds where the writer
    had not acknowledged anything yet still count (they still check the failover).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `bench/soak_records.py` from anywhere
    sys.path.insert(0, str(REPO))

from app.lab import Lab, LabError, unavailable_reason  # noqa: E402
from app.labcluster import DATA_DIR, LabCluster, LabClusterError  # noqa: E402

PREFIX = "mhs-"
PULSE_MS, TIMEOUT_MS = 100, 500
WRITER_SECONDS = 30  # the writer stops by itself after this (it is killed long before)
WAIT_S = 60

WRITER = r"""
import hashlib, os, sys, time
path, acks, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
ack = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end and n < 10_000_000:
    n += 1
    line = f"{n} {hashlib.sha256(str(n).encode()).hexdigest()}\n".encode()
    if os.write(fd, line) != len(line):
        sys.exit(f"short write of record {n}")
    os.fsync(fd)
    os.write(ack, line)
"""


class SoakError(Exception):
    """A wait timed out or an acknowledged record is missing; says which."""


def record(n: int) -> bytes:
    return f"{n} {hashlib.sha256(str(n).encode()).hexdigest()}\n".encode()


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


@dataclass(frozen=True)
class Round:
    index: int
    killed: str
    survivor: str  # the node that holds the records afterwards: the next primary
    delay_s: float
    acked: int
    on_survivor: int  # complete records on the survivor (acked or not)
    lost: int  # acknowledged records missing or damaged on the survivor
    failover_s: float
    rejoin_s: float
    dropped: bool  # the primary had dropped the secondary before the kill: no failover


def check_records(acked: bytes, copy: bytes) -> tuple[int, int, list[str]]:
    """(acked count, complete records in copy, problems) for one round's files."""
    problems: list[str] = []
    lines = acked.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()  # the ack log line itself was cut by the kill: not acknowledged
    for i, line in enumerate(lines, 1):
        if line != record(i):
            problems.append(f"ack log line {i} is {line!r}: the writer misbehaved")
            break
    expected = b"".join(record(i) for i in range(1, len(lines) + 1))
    if not copy.startswith(expected):
        have = copy.splitlines(keepends=True)
        first = next(
            (i for i in range(1, len(lines) + 1) if i > len(have) or have[i - 1] != record(i)),
            None,
        )
        problems.append(
            f"{len(lines)} records acknowledged, the survivor's copy has {len(have)} lines; "
            f"first missing or damaged: record {first}"
        )
    complete = 0
    for i, line in enumerate(copy.splitlines(keepends=True), 1):
        if line != record(i):
            if line.endswith(b"\n"):
                problems.append(f"survivor's line {i} is damaged: {line[:80]!r}")
            break
        complete = i
    return len(lines), complete, problems


def run_round(
    cluster: LabCluster, primary: str, index: int, rng: random.Random, work: Path
) -> Round:
    """One kill/failover/rejoin round with ``primary`` PRIM Ready at the start."""
    lab = cluster.lab
    secondary = other(primary)
    name = f"records-{index:04d}.log"
    acks = work / f"acks-{index:04d}.log"
    acks.touch()
    err = open(work / f"writer-{index:04d}.err", "wb")  # noqa: SIM115 - owned by the Popen
    writer = lab.popen(
        primary,
        [sys.executable, "-c", WRITER, f"{DATA_DIR}/soak/{name}", str(acks), str(WRITER_SECONDS)],
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    err.close()
    delay = rng.uniform(0.2, 1.5)
    log_from = _size(cluster.log_path(primary))
    time.sleep(delay)
    cluster.signal_daemon(primary, signal.SIGKILL)
    lab.signal(writer, signal.SIGKILL)
    t0 = time.monotonic()
    cluster.kill_node(primary)
    writer.wait(10)
    seen: dict[str, Any] = {}

    def settled() -> bool:
        st = cluster.state(secondary) or {}
        seen.update(st)
        return (st.get("state"), st.get("substatus")) in (("ALONE", "Ready"), ("WAIT", "NotReady"))

    try:
        cluster.wait_for(settled, WAIT_S, f"{secondary} ALONE Ready (or WAIT)")
    except LabClusterError as exc:
        raise SoakError(f"round {index}: no failover to {secondary}: {exc}") from exc
    failover = time.monotonic() - t0
    holder = secondary
    dropped = seen.get("state") == "WAIT"
    if dropped:
        # Promise 1: a secondary that did not answer in time is dropped (the primary goes
        # ALONE); it is then stale and must not be promoted. Only that excuses a WAIT.
        log = cluster.log_path(primary).read_bytes()[log_from:]
        if b"dropping the secondary" not in log:
            raise SoakError(
                f"round {index}: {secondary} went WAIT ({seen.get('reason')}) although "
                f"{primary} never dropped it"
            )
    t1 = time.monotonic()
    try:
        cluster.start_node(primary)
        if dropped:  # the killed node has the newer data: it comes back as the primary
            holder = primary
            cluster.wait_state(secondary, "SECOND", WAIT_S)
            cluster.wait_state(primary, "PRIM", WAIT_S)
    except LabClusterError as exc:
        raise SoakError(f"round {index}: {primary} did not come back: {exc}") from exc
    copy_path = lab.host_path(holder, DATA_DIR) / "soak" / name
    copy = copy_path.read_bytes() if copy_path.exists() else b""
    acked, complete, problems = check_records(acks.read_bytes(), copy)
    if problems:
        raise SoakError(
            f"round {index} (killed {primary} after {delay:.2f} s, records read on {holder}): "
            + "; ".join(problems)
        )
    try:
        if not dropped:
            cluster.wait_state(primary, "SECOND", WAIT_S)
            cluster.wait_state(secondary, "PRIM", WAIT_S)
    except LabClusterError as exc:
        raise SoakError(f"round {index}: {primary} did not rejoin: {exc}") from exc
    return Round(
        index, primary, holder, round(delay, 3), acked, complete, 0,
        round(failover, 3), round(time.monotonic() - t1, 3), dropped,
    )  # fmt: skip


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def prepare(cluster: LabCluster, primary: str = "node1") -> None:
    """The soak directory, made through the primary's mount (so it is replicated)."""
    cluster.lab.run(primary, ["mkdir", "-p", f"{DATA_DIR}/soak"])


def summary(rounds: list[Round]) -> dict[str, Any]:
    fo = sorted(r.failover_s for r in rounds)
    return {
        "rounds": len(rounds),
        "acked_records": sum(r.acked for r in rounds),
        "records_on_holders": sum(r.on_survivor for r in rounds),
        "unacked_records_kept": sum(r.on_survivor - r.acked for r in rounds),
        "lost_acked_records": sum(r.lost for r in rounds),
        "rounds_without_ack": sum(1 for r in rounds if r.acked == 0),
        "rounds_secondary_dropped": sum(1 for r in rounds if r.dropped),
        "failover_s_median": round(statistics.median(fo), 3) if fo else None,
        "failover_s_max": fo[-1] if fo else None,
        "rejoin_s_median": round(statistics.median(r.rejoin_s for r in rounds), 3)
        if rounds
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"soak_records: cannot run: {reason}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    error = ""
    lab = Lab(prefix=PREFIX)
    cluster: LabCluster | None = None
    try:
        lab.up()
        cluster = LabCluster(lab, pulse_ms=PULSE_MS, timeout_ms=TIMEOUT_MS)
        work = lab.workdir / "soak"
        work.mkdir(exist_ok=True)
        cluster.first_start(timeout=WAIT_S)
        prepare(cluster)
        primary = "node1"
        for i in range(args.rounds):
            r = run_round(cluster, primary, i, rng, work)
            rounds.append(r)
            print(
                f"round {i + 1}/{args.rounds}: killed {r.killed} after {r.delay_s:.2f} s, "
                f"{r.acked} acked, {r.on_survivor} on {r.survivor}, failover {r.failover_s} s, "
                f"rejoin {r.rejoin_s} s",
                flush=True,
            )
            primary = r.survivor  # the primary of the next round
    except (SoakError, LabError, LabClusterError, OSError, subprocess.SubprocessError) as exc:
        error = str(exc)
        print(f"soak_records: {error}", file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.stop_all()
        lab.down()
    result = {**summary(rounds), "error": error or None, "seed": args.seed}
    result["per_round"] = [asdict(r) for r in rounds]
    s = {k: v for k, v in result.items() if k != "per_round"}
    print(
        f"{s['rounds']} rounds, {s['acked_records']} acknowledged records, "
        f"{s['lost_acked_records']} lost; {s['unacked_records_kept']} unacknowledged records "
        f"also survived; failover median {s['failover_s_median']} s, max {s['failover_s_max']} s"
    )
    print(json.dumps(result))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
