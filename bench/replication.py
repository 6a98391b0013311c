#!/usr/bin/env python3
"""Replication benchmark: local disk, the FUSE layer with no peer, and the replicated mount.

How it works
    One lab (prefix "mhr-", or ``--prefix``; app/lab.py) is built and three targets are set
    up side by side:

    - ``local``: a plain directory under the lab's work dir (the same filesystem as the node
      directories behind /srv/mirrorha/data);
    - ``fuse``: a MirrorMount (app/mirror/mount.py) over a scratch directory under the work
      dir, with ``LocalOnly()`` as replicator: the FUSE layer's own cost, no peer;
    - ``replicated``: a LabCluster (two real daemons, replicated=True) after first_start; the
      workloads run inside node1's namespaces on /srv/mirrorha/data, through the primary's
      mount, every change acknowledged by node2 before the call returns.

    Each workload is a fresh Python process (the script ``WORKLOAD`` written to the work dir)
    started on each target in turn (local, fuse, replicated), workload by workload, so slow
    drift of the machine touches every target alike:

    - ``seq``: 1 MiB writes of random bytes into one new file, then one fsync (MB/s, 10^6
      bytes per second, the fsync included);
    - ``sync4k``: a preallocated file overwritten 4 KiB at a time, each write followed by
      fdatasync (ops/s; p50 and p99 latency of write + fdatasync, nearest rank); the file is
      written and fsynced by a run of its own just before (``prep4k``);
    - ``meta``: create (O_EXCL, close), rename, unlink of one empty file per round (ops/s,
      three operations per round), in a directory the bench made in each target before the
      pair formed (so the peer has it: every op records its path in the primary's journal,
      durably, before it is applied);
    - ``metanew``: the same in a directory the run makes (and removes): a directory created
      since the last sync point covers what happens below it in the journal, so its entries
      need no durable record of their own (app/mirror/journal.py);
    - ``pgbench``: PostgreSQL 15 (Debian's /usr/lib/postgresql/15/bin) with its data directory
      on the target, run as user postgres, unix socket only (listen_addresses = ''), socket in
      a directory outside the targets; ``pgbench -i -s 5`` then ``pgbench -T 20 -c 4 -j 2``
      (TPS without the initial connection time).

    In the lab both copies of the replicated directory share this machine's one disk, so the
    physical limit of the replicated sequential rate is half the local rate: the benchmark
    prints that limit and the replicated rate as a fraction of it. Goals are printed next to
    the figures, never asserted: sequential >= 80 % of that limit, fsync'd 4 KiB >= 35 % of
    local ops/s, pgbench >= 50 % of local TPS.

    Where the time goes: for ``sync4k`` and ``pgbench`` the benchmark also prints the CPU
    that serves each operation (each transaction for pgbench), in microseconds: for ``fuse``
    this process's (the FUSE-only mount's threads run in it), for ``replicated`` each
    daemon's, node1 (the primary) and node2 (the secondary), read from /proc/<pid>/stat
    around the timed part; for ``sync4k`` also how many times per op the application's
    threads and those processes' went to sleep (voluntary context switches: each one is a
    wake-up later, and each costs tens of microseconds of CPU in a VM). The daemons' idle
    CPU (heartbeats, decision ticks) is measured over ``IDLE_S`` before the first workload
    and printed too: it is included in the per-operation figures, not subtracted.

    Output: one line per figure, then one JSON line (the last line) with everything.

Exceptions
    BenchError    a workload failed or a wait timed out; main() prints it and exits 1
                  (the JSON line still comes last, with "error").
    Not root, no lab, no FUSE, no PostgreSQL (without --skip-pgbench): exit 2 with the reason.

Known limits
    One machine, two cores shared by the workload, both daemons and (for ``fuse``) this
    process's FUSE threads. The page cache is not dropped between targets (``sync`` runs,
    untimed, before each workload); ``seq`` includes its fsync so the cache does not hide the
    disk, but a VM's disk cache may (the local figure is then above the physical disk's).
    seq, 4 KiB and metadata figures are medians of ``--rounds`` rounds (3 by default; every
    run is in the JSON line under "runs", and the min..max range is printed): this shared
    machine's disk speed drifts by several times between minutes. pgbench runs once per
    target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `bench/replication.py` from anywhere
    sys.path.insert(0, str(REPO))

from app.lab import Lab, LabError, unavailable_reason  # noqa: E402
from app.labcluster import DATA_DIR, LabCluster, LabClusterError  # noqa: E402

PREFIX = "mhr-"
TARGETS = ("local", "fuse", "replicated")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT = 5432
WORKLOAD_TIMEOUT_S = 900.0
IDLE_S = 2.0  # how long the daemons' idle CPU is measured before the first workload
GOALS = {"seq_of_limit": 0.80, "sync4k_of_local": 0.35, "pgbench_of_local": 0.50}

WORKLOAD = r'''
"""One benchmark workload on one directory; prints one JSON line."""
import json, os, resource, sys, time

def seq(d, mib):
    path = os.path.join(d, "seq.bin")
    buf = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for _ in range(mib):
        view = memoryview(buf)
        while view:
            view = view[os.write(fd, view):]
    os.fsync(fd)
    t1 = time.perf_counter()
    os.close(fd)
    os.unlink(path)
    return {"bytes": mib << 20, "seconds": t1 - t0, "mb_s": (mib << 20) / 1e6 / (t1 - t0)}

def prep4k(d, n):  # sync4k's file, made by its own run: its CPU is not sync4k's
    fd = os.open(os.path.join(d, "sync.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    zero = bytearray(1 << 20)  # written by the memset: no page of it is first touched by FUSE
    left = n * 4096
    while left > 0:
        left -= os.write(fd, memoryview(zero)[: min(left, len(zero))])
    os.fsync(fd)
    os.close(fd)
    return {"bytes": n * 4096}

def sync4k(d, n):
    path = os.path.join(d, "sync.bin")
    fd = os.open(path, os.O_RDWR)
    block = os.urandom(4096)
    lat = []
    slept = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter()
        os.pwrite(fd, block, i * 4096)
        os.fdatasync(fd)
        lat.append(time.perf_counter() - a)
    t1 = time.perf_counter()
    slept = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - slept
    os.close(fd)
    os.unlink(path)
    lat.sort()
    rank = lambda p: lat[max(0, -(-len(lat) * p // 100) - 1)]
    return {"ops": n, "seconds": t1 - t0, "ops_s": n / (t1 - t0),
            "p50_ms": rank(50) * 1000, "p99_ms": rank(99) * 1000, "app_sleeps": slept}

def meta_in(sub, n):  # names of this run only: no path an earlier round recorded
    t0 = time.perf_counter()
    for i in range(n):
        a, b = os.path.join(sub, f"a{os.getpid()}-{i}"), os.path.join(sub, f"b{os.getpid()}-{i}")
        os.close(os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.rename(a, b)
        os.unlink(b)
    t1 = time.perf_counter()
    return {"ops": 3 * n, "seconds": t1 - t0, "ops_s": 3 * n / (t1 - t0)}

def meta(d, n):  # in META_DIR, which the bench made before the pair formed
    return meta_in(os.path.join(d, "meta"), n)

def metanew(d, n):  # in a directory made by this run (after the last sync point)
    sub = os.path.join(d, f"meta-new-{os.getpid()}")
    os.mkdir(sub)
    out = meta_in(sub, n)
    os.rmdir(sub)
    return out

kind, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kinds = {"seq": seq, "prep4k": prep4k, "sync4k": sync4k, "meta": meta, "metanew": metanew}
print(json.dumps(kinds[kind](d, n)))
'''


class BenchError(Exception):
    """A workload failed or a wait timed out; the message says what was seen."""


# ------------------------------------------------------------------ targets


class Targets:
    """The three targets of one run; ``run(target, argv)`` runs argv where the target lives."""

    def __init__(self, lab: Lab, cluster: LabCluster, fuse_dir: Path, local_dir: Path) -> None:
        self.lab = lab
        self.cluster = cluster
        self.dirs = {"local": str(local_dir), "fuse": str(fuse_dir), "replicated": DATA_DIR}

    def run(
        self, target: str, argv: list[str], timeout: float = WORKLOAD_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        try:
            if target == "replicated":
                return self.lab.run("node1", argv, check=False, timeout=timeout)
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
            )
        except (subprocess.TimeoutExpired, LabError) as exc:
            raise BenchError(f"{target}: {' '.join(argv[:3])}... did not finish: {exc}") from exc

    def serving(self, target: str) -> dict[str, int]:
        """The processes that serve ``target``: this one (the FUSE-only mount's threads run
        in it), or each daemon of the pair; none for the local disk."""
        if target == "fuse":
            return {"fuse": os.getpid()}
        if target == "replicated":
            return {n: self.cluster.daemon_pid(n) for n in ("node1", "node2")}
        return {}

    def cpu(self, target: str) -> dict[str, float]:
        """CPU seconds used so far by each process serving ``target`` (this process's from
        process_time: finer than the clock ticks of /proc)."""
        me = os.getpid()
        return {
            k: time.process_time() if pid == me else cpu_seconds(pid)
            for k, pid in self.serving(target).items()
        }

    def sleeps(self, target: str) -> dict[str, float]:
        """Voluntary context switches so far of each process serving ``target``."""
        return {k: float(sleeps_of(pid)) for k, pid in self.serving(target).items()}

    def checked(self, target: str, argv: list[str], timeout: float = WORKLOAD_TIMEOUT_S) -> str:
        proc = self.run(target, argv, timeout)
        if proc.returncode != 0:
            raise BenchError(
                f"{target}: {' '.join(argv)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}"
            )
        return proc.stdout


KEY_OF = {"seq": "mb_s", "sync4k": "ops_s", "meta": "ops_s", "metanew": "ops_s"}
META_DIR = "meta"  # made in each target before the pair forms: a directory the peer has


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_op(
    before: dict[str, float], after: dict[str, float], ops: int, scale: float = 1.0
) -> dict[str, float]:
    """What each process measured used per operation, times ``scale`` (1e6: CPU seconds to
    microseconds); nothing when no operation was counted."""
    if ops <= 0:
        return {}
    return {k: round((after[k] - before[k]) / ops * scale, 1) for k in before}


def sleeps_of(pid: int) -> int:
    """Voluntary context switches of every thread of process ``pid`` so far (/proc)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: float(r[key]))
    return ordered[(len(ordered) - 1) // 2]


def workload(t: Targets, script: Path, target: str, kind: str, n: int) -> dict[str, Any]:
    if kind == "sync4k":  # its file first, in a run of its own: neither timed nor counted
        t.checked(target, [sys.executable, str(script), "prep4k", t.dirs[target], str(n)])
    subprocess.run(["sync"], check=False, timeout=600)  # untimed: no writeback left over
    before, slept = t.cpu(target), t.sleeps(target)
    out = t.checked(target, [sys.executable, str(script), kind, t.dirs[target], str(n)])
    after, woke = t.cpu(target), t.sleeps(target)
    try:
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise BenchError(f"{target} {kind}: no JSON from the workload: {out[-300:]!r}") from exc
    if kind == "sync4k":  # the per-op costs are reported for this workload only
        ops = int(result["ops"])
        result["cpu_us_per_op"] = per_op(before, after, ops, 1e6)
        result["sleeps_per_op"] = per_op(slept, woke, ops)
        result["sleeps_per_op"]["app"] = round(result["app_sleeps"] / ops, 1)
    return result


# ------------------------------------------------------------------ PostgreSQL


def pg_missing() -> str | None:
    missing = [
        str(PG_BIN / b) for b in ("initdb", "pg_ctl", "pgbench") if not (PG_BIN / b).exists()
    ]
    if missing:
        return f"PostgreSQL 15 is not installed ({', '.join(missing)}): Debian package postgresql"
    if shutil.which("runuser") is None:
        return "runuser is missing (Debian package util-linux)"
    return None


def as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv]


def postmaster_pid(t: Targets, target: str, datadir: str) -> int | None:
    proc = t.run(target, ["cat", f"{datadir}/postmaster.pid"], timeout=30)
    first = proc.stdout.split("\n", 1)[0].strip() if proc.returncode == 0 else ""
    return int(first) if first.isdigit() else None


def pgbench(
    t: Targets, target: str, sockdir: Path, scale: int, seconds: int, clients: int
) -> dict[str, Any]:
    """initdb, start, pgbench -i, pgbench -T; PostgreSQL is stopped (fast, then by pid)."""
    datadir = f"{t.dirs[target]}/pg"
    t.checked(target, ["install", "-d", "-o", "postgres", "-g", "postgres", "-m", "700", datadir])
    t.checked(
        target,
        as_postgres(
            str(PG_BIN / "initdb"), "-D", datadir, "-A", "trust", "-E", "UTF8", "--no-locale"
        ),
        timeout=300,
    )
    opts = f"-c listen_addresses='' -c unix_socket_directories='{sockdir}' -c port={PG_PORT}"
    log = sockdir / f"postgres-{target}.log"
    started = False
    try:
        t.checked(
            target,
            as_postgres(
                str(PG_BIN / "pg_ctl"),
                "-D",
                datadir,
                "-l",
                str(log),
                "-o",
                opts,
                "-w",
                "-t",
                "120",
                "start",
            ),
            timeout=180,
        )
        started = True
        bench = [str(PG_BIN / "pgbench"), "-h", str(sockdir), "-p", str(PG_PORT)]
        t0 = time.monotonic()
        t.checked(target, as_postgres(*bench, "-i", "-q", "-s", str(scale), "postgres"), 900)
        init_s = time.monotonic() - t0
        jobs = str(min(clients, 2))
        before = t.cpu(target)
        out = t.checked(
            target,
            as_postgres(*bench, "-T", str(seconds), "-c", str(clients), "-j", jobs, "postgres"),
            timeout=seconds + 300,
        )
        after = t.cpu(target)
        m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
        if m is None:
            raise BenchError(f"{target}: no TPS in pgbench's output: {out[-500:]!r}")
        txn = re.search(r"number of transactions actually processed: (\d+)", out)
        transactions = int(txn.group(1)) if txn else None
        return {
            "tps": float(m.group(1)),
            "transactions": transactions,
            "init_s": round(init_s, 2),
            "cpu_us_per_op": per_op(before, after, transactions or 0, 1e6),
        }
    finally:
        if started or postmaster_pid(t, target, datadir) is not None:
            stop_postgres(t, target, datadir)


def stop_postgres(t: Targets, target: str, datadir: str) -> None:
    pid = postmaster_pid(t, target, datadir)
    with contextlib.suppress(BenchError):
        t.run(
            target,
            as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", datadir, "-m", "fast", "-w", "-t", "60", "stop"
            ),
            timeout=90,
        )
    if pid is not None and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the postmaster we started; its children follow


# ------------------------------------------------------------------ figures


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f} %"


def cpu_text(per: dict[str, float]) -> str:
    """``{"node1": 180.0, "node2": 110.5}`` -> ``"180+110"``; "-" when nothing was measured."""
    return "+".join(f"{v:.0f}" for v in per.values()) or "-"


def sleeps_text(per: dict[str, float], app: bool) -> str:
    """The application's sleeps per op (``app``) or those of what serves it, "+"-joined:
    ``{"app": 3.0, "node1": 6.5, "node2": 3.2}`` -> ``"3.0"`` / ``"6.5+3.2"``; "-" if none."""
    return "+".join(f"{v:.1f}" for k, v in per.items() if (k == "app") == app) or "-"


def cpu_row(
    label: str, per_target: dict[str, dict[str, float]], say: Callable[[str], None]
) -> None:
    say(f"{label:<34}" + "".join(f"{cpu_text(per_target.get(t, {})):>12}" for t in TARGETS))


def goal_word(v: float | None, goal: float) -> str:
    if v is None:
        return "not measured"
    return "met" if v >= goal else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/replication.py",
        description="Write throughput, fsync latency, metadata and pgbench: local disk, the "
        "FUSE layer with no peer, and the replicated mount, side by side in the lab.",
    )
    ap.add_argument("--seq-mib", type=int, default=256, help="sequential MiB (256)")
    ap.add_argument("--sync-ops", type=int, default=2000, help="4 KiB write+fdatasync (2000)")
    ap.add_argument("--meta-rounds", type=int, default=2000, help="create/rename/unlink (2000)")
    ap.add_argument("--pg-scale", type=int, default=5, help="pgbench -i -s (5)")
    ap.add_argument("--pg-seconds", type=int, default=20, help="pgbench -T (20)")
    ap.add_argument("--pg-clients", type=int, default=4, help="pgbench -c (4)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds of seq, 4 KiB and metadata; medians (3)"
    )
    ap.add_argument("--skip-pgbench", action="store_true", help="no PostgreSQL run")
    ap.add_argument("--prefix", default=PREFIX, help=f"lab namespace prefix ({PREFIX})")
    ap.add_argument("--quick", action="store_true", help="small sizes, short pgbench (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_mib, args.sync_ops, args.meta_rounds = 16, 200, 200
        args.pg_scale, args.pg_seconds, args.pg_clients = 1, 3, 2
        args.rounds = 1
    if min(args.seq_mib, args.sync_ops, args.meta_rounds, args.pg_scale, args.pg_seconds) < 1:
        ap.error("sizes, counts and durations must be >= 1")
    if not 1 <= args.rounds <= 15:
        ap.error("--rounds must be between 1 and 15")
    if os.geteuid() != 0:
        print("bench/replication.py needs root (lab namespaces, FUSE mounts)", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason is None:
        from app.mirror.fusecheck import fuse_unavailable_reason

        reason = fuse_unavailable_reason()
    if reason is None and not args.skip_pgbench:
        reason = pg_missing()
        if reason is not None:
            reason += " (or run with --skip-pgbench)"
    if reason is not None:
        print(f"bench/replication.py cannot run here: {reason}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.monotonic()
    result: dict[str, Any] = {
        "bench": "replication",
        "targets": list(TARGETS),
        "sizes": {
            "rounds": args.rounds,
            "seq_mib": args.seq_mib,
            "sync_ops": args.sync_ops,
            "meta_rounds": args.meta_rounds,
            "pgbench": None
            if args.skip_pgbench
            else {"scale": args.pg_scale, "seconds": args.pg_seconds, "clients": args.pg_clients},
        },
    }
    try:
        measure(args, result, say)
    except (BenchError, LabError, LabClusterError, OSError) as exc:
        print(f"bench/replication.py: {exc}", file=sys.stderr)
        result["error"] = str(exc)[:1000]
        print(json.dumps(result), flush=True)
        return 1
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    report(result, say)
    print(json.dumps(result), flush=True)
    return 0


def measure(args: argparse.Namespace, result: dict[str, Any], say: Callable[[str], None]) -> None:
    from app.mirror.mount import MirrorMount
    from app.mirror.ops import LocalOnly

    lab = Lab(prefix=args.prefix)
    cluster: LabCluster | None = None
    mount: MirrorMount | None = None
    try:
        lab.up()
        base = lab.workdir / "bench"
        local_dir, fuse_dir, sockdir = base / "local", base / "fuse", base / "pgsock"
        for d in (local_dir, fuse_dir, sockdir):
            d.mkdir(parents=True, exist_ok=True)
        if not args.skip_pgbench:
            shutil.chown(sockdir, "postgres", "postgres")
        base.chmod(0o755)
        script = base / "workload.py"
        script.write_text(WORKLOAD)
        say(
            f"lab {args.prefix} up; local {local_dir}, fuse (no peer) {fuse_dir}, "
            f"replicated {DATA_DIR}"
        )
        for d in (local_dir, fuse_dir, lab.host_path("node1", DATA_DIR)):
            (d / META_DIR).mkdir(parents=True, exist_ok=True)
        mount = MirrorMount(fuse_dir, LocalOnly())
        mount.start()
        mount.wait_ready(10.0)
        cluster = LabCluster(lab, replicated=True)
        cluster.first_start(timeout=120)
        say(f"pair formed: {cluster.describe()}")
        t = Targets(lab, cluster, fuse_dir, local_dir)
        idle = t.cpu("replicated")
        time.sleep(IDLE_S)
        result["daemon_idle_cpu_pct"] = {
            k: round((v - idle[k]) / IDLE_S * 100, 1) for k, v in t.cpu("replicated").items()
        }

        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            kind: {target: [] for target in TARGETS} for kind in KEY_OF
        }
        for n in range(1, args.rounds + 1):
            for target in TARGETS:
                r = workload(t, script, target, "seq", args.seq_mib)
                runs["seq"][target].append(r)
                say(f"  [{n}] seq {target}: {r['mb_s']:.1f} MB/s")
            for target in TARGETS:
                r = workload(t, script, target, "sync4k", args.sync_ops)
                runs["sync4k"][target].append(r)
                say(
                    f"  [{n}] 4 KiB+fdatasync {target}: {r['ops_s']:.0f} ops/s, "
                    f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
                )
            for kind, where in (("meta", "an existing"), ("metanew", "a new")):
                for target in TARGETS:
                    r = workload(t, script, target, kind, args.meta_rounds)
                    runs[kind][target].append(r)
                    say(f"  [{n}] metadata in {where} directory {target}: {r['ops_s']:.0f} ops/s")
        result["runs"] = {
            kind: {target: [r[KEY_OF[kind]] for r in rs] for target, rs in per.items()}
            for kind, per in runs.items()
        }
        seq = {target: median_run(rs, "mb_s") for target, rs in runs["seq"].items()}
        sync = {target: median_run(rs, "ops_s") for target, rs in runs["sync4k"].items()}
        meta = {target: median_run(rs, "ops_s") for target, rs in runs["meta"].items()}
        metanew = {target: median_run(rs, "ops_s") for target, rs in runs["metanew"].items()}
        pg: dict[str, Any] | None = None
        if not args.skip_pgbench:
            pg = {}
            for target in TARGETS:
                pg[target] = pgbench(
                    t, target, sockdir, args.pg_scale, args.pg_seconds, args.pg_clients
                )
                say(f"  pgbench {target}: {pg[target]['tps']:.1f} TPS")
        mirror = (cluster.state("node1") or {}).get("mirror") or {}
        result["replicated_mirror"] = {
            k: mirror.get(k) for k in ("mirror_state", "bytes_sent", "ops_sent", "acks", "drops")
        }
    finally:
        if cluster is not None:
            cluster.stop_all()
        if mount is not None:
            try:
                mount.stop()
            finally:
                lab.down()
        else:
            lab.down()
    figures(result, seq, sync, meta, metanew, pg)


def figures(
    result: dict[str, Any],
    seq: dict[str, Any],
    sync: dict[str, Any],
    meta: dict[str, Any],
    metanew: dict[str, Any],
    pg: dict[str, Any] | None,
) -> None:
    def rnd(v: float, n: int = 2) -> float:
        return round(v, n)

    result["seq_mb_s"] = {k: rnd(v["mb_s"]) for k, v in seq.items()}
    result["sync4k"] = {
        k: {
            "ops_s": rnd(v["ops_s"], 1),
            "p50_ms": rnd(v["p50_ms"], 3),
            "p99_ms": rnd(v["p99_ms"], 3),
        }
        for k, v in sync.items()
    }
    result["meta_ops_s"] = {k: rnd(v["ops_s"], 1) for k, v in meta.items()}
    result["meta_new_dir_ops_s"] = {k: rnd(v["ops_s"], 1) for k, v in metanew.items()}
    result["pgbench_tps"] = {k: rnd(v["tps"]) for k, v in pg.items()} if pg else None
    result["sync4k_sleeps_per_op"] = {k: v.get("sleeps_per_op", {}) for k, v in sync.items()}
    result["cpu_us_per_op"] = {
        "sync4k": {k: v.get("cpu_us_per_op", {}) for k, v in sync.items()},
        "pgbench": {k: v.get("cpu_us_per_op", {}) for k, v in pg.items()} if pg else None,
    }
    result["pgbench"] = pg
    ratios: dict[str, dict[str, float | None]] = {}
    pairs: list[tuple[str, dict[str, float]]] = [
        ("seq", result["seq_mb_s"]),
        ("sync4k_ops", {k: v["ops_s"] for k, v in result["sync4k"].items()}),
        ("sync4k_p99", {k: v["p99_ms"] for k, v in result["sync4k"].items()}),
        ("meta", result["meta_ops_s"]),
        ("meta_new_dir", result["meta_new_dir_ops_s"]),
    ]
    if result["pgbench_tps"]:
        pairs.append(("pgbench", result["pgbench_tps"]))
    for name, fig in pairs:
        ratios[name] = {
            "fuse_local": ratio(fig["fuse"], fig["local"]),
            "replicated_local": ratio(fig["replicated"], fig["local"]),
        }
    result["ratios"] = ratios
    limit = result["seq_mb_s"]["local"] / 2
    result["seq_limit_mb_s"] = rnd(limit)
    result["seq_of_limit"] = ratio(result["seq_mb_s"]["replicated"], limit)
    sync_frac = ratios["sync4k_ops"]["replicated_local"]
    pg_frac = ratios["pgbench"]["replicated_local"] if "pgbench" in ratios else None
    result["goals"] = {
        "seq_ge_80pct_of_limit": None
        if result["seq_of_limit"] is None
        else result["seq_of_limit"] >= GOALS["seq_of_limit"],
        "sync4k_ge_35pct_of_local": None
        if sync_frac is None
        else sync_frac >= GOALS["sync4k_of_local"],
        "pgbench_ge_50pct_of_local": None
        if pg_frac is None
        else pg_frac >= GOALS["pgbench_of_local"],
    }


def report(result: dict[str, Any], say: Callable[[str], None]) -> None:
    r = result["ratios"]
    s = result["sizes"]
    say("")
    say(f"{'':34}{'local':>12}{'fuse':>12}{'replicated':>12}   fuse/local  repl/local")

    def row(label: str, fig: dict[str, float], key: str, spec: str = ".1f") -> None:
        say(
            f"{label:<34}"
            + "".join(f"{fmt(fig[t], spec):>12}" for t in TARGETS)
            + f"   {fmt(r[key]['fuse_local'], '.3f'):>10}"
            + f"  {fmt(r[key]['replicated_local'], '.3f'):>10}"
        )

    row(f"sequential 1 MiB+fsync MB/s ({s['seq_mib']} MiB)", result["seq_mb_s"], "seq")
    sync = result["sync4k"]
    row(
        f"4 KiB+fdatasync ops/s ({s['sync_ops']})",
        {k: v["ops_s"] for k, v in sync.items()},
        "sync4k_ops",
        ".0f",
    )
    say(f"{'  p50 latency ms':<34}" + "".join(f"{sync[t]['p50_ms']:>12.3f}" for t in TARGETS))
    row("  p99 latency ms", {k: v["p99_ms"] for k, v in sync.items()}, "sync4k_p99", ".3f")
    cpu_row("  CPU us per op", result["cpu_us_per_op"]["sync4k"], say)
    sleeps = result["sync4k_sleeps_per_op"]
    for label, app in (("  sleeps per op, application", True), ("  sleeps per op, serving", False)):
        say(f"{label:<34}" + "".join(f"{sleeps_text(sleeps[t], app):>12}" for t in TARGETS))
    row(f"create/rename/unlink ops/s ({s['meta_rounds']}x3)", result["meta_ops_s"], "meta", ".0f")
    row("  the same in a new directory", result["meta_new_dir_ops_s"], "meta_new_dir", ".0f")
    if result["pgbench_tps"]:
        pgs = s["pgbench"]
        row(
            f"pgbench TPS (-s {pgs['scale']} -T {pgs['seconds']} -c {pgs['clients']})",
            result["pgbench_tps"],
            "pgbench",
        )
        cpu_row("  CPU us per transaction", result["cpu_us_per_op"]["pgbench"], say)
    else:
        say("pgbench: skipped (--skip-pgbench)")
    rounds = s.get("rounds", 1)
    if rounds > 1:
        say(f"medians of {rounds} rounds (each round: local, fuse, replicated); range min..max:")
        for kind, unit in (
            ("seq", "MB/s"),
            ("sync4k", "ops/s"),
            ("meta", "ops/s"),
            ("metanew", "ops/s"),
        ):
            spread = result["runs"][kind]
            say(
                f"  {kind:<7}"
                + "".join(f"  {t} {min(spread[t]):.0f}..{max(spread[t]):.0f}" for t in TARGETS)
                + f" {unit}"
            )
    idle = result.get("daemon_idle_cpu_pct") or {}
    say(
        "CPU: fuse = this process (the FUSE-only mount's threads); replicated = node1 + node2, "
        "each daemon's; idle daemons use "
        + ", ".join(f"{k} {v:.1f} %" for k, v in idle.items())
        + " of a core (included above)"
    )
    say(
        f"sequential: both copies share one disk, physical limit = local/2 = "
        f"{result['seq_limit_mb_s']:.1f} MB/s; replicated = {pct(result['seq_of_limit'])} of it"
    )
    say(
        "goals (not asserted): sequential >= 80 % of the limit: "
        + goal_word(result["seq_of_limit"], GOALS["seq_of_limit"])
        + f" ({pct(result['seq_of_limit'])}); fsync'd 4 KiB >= 35 % of local: "
        + goal_word(r["sync4k_ops"]["replicated_local"], GOALS["sync4k_of_local"])
        + f" ({pct(r['sync4k_ops']['replicated_local'])}); pgbench >= 50 % of local: "
        + (
            goal_word(r["pgbench"]["replicated_local"], GOALS["pgbench_of_local"])
            + f" ({pct(r['pgbench']['replicated_local'])})"
            if "pgbench" in r
            else "not measured"
        )
    )


if __name__ == "__main__":
    sys.exit(main())
