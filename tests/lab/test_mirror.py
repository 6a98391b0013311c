"""The mirror in the lab: two real daemons, real FUSE, real kills; what the admin would check.

Each test builds its own lab (prefix "mhm-") and cluster and tears both down, even when it
fails. Copies are compared from the host (``Lab.host_path``: each node's real directory, under
the primary's FUSE mount) with tests/lab/treecmp.py, after the writers are quiet; a bounded
wait gives asynchronous FUSE releases time to arrive.

- kill -9 of the primary while a writer fsyncs numbered records: every acknowledged record is
  on the survivor, 20 rounds with roles alternating (bench/soak_records.py does the same for
  any number of rounds);
- identical copies after a multi-threaded random-operation workload, a real source tarball,
  SQLite, PostgreSQL (which also starts on the survivor's copy after a kill -9 failover);
- reintegration sends about the changed bytes; a kill -9 of either side during a resync ends
  identical; a split brain puts the loser's divergent file into quarantine with a report.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from app.lab import Lab, LabError, pid_alive
from app.labcluster import DATA_DIR, LabCluster
from bench.soak_records import check_records, prepare, run_round
from tests.lab.conftest import require_lab
from tests.lab.treecmp import diff_trees

pytestmark = pytest.mark.lab

PREFIX = "mhm-"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
BLOCK = 64 * 1024  # the resync's comparison block (app/mirror/resync.py)


@contextlib.contextmanager
def lab_cluster(**opts: Any) -> Iterator[LabCluster]:
    require_lab()
    lab = Lab(prefix=PREFIX)
    c: LabCluster | None = None
    try:
        lab.up()
        c = LabCluster(lab, **{"pulse_ms": 100, "timeout_ms": 500, **opts})
        yield c
    except BaseException:
        if c is not None:  # the daemons' last words, for the failure report
            for node in ("node1", "node2"):
                with contextlib.suppress(OSError):
                    tail = c.log_path(node).read_text(errors="replace").splitlines()[-80:]
                    print(f"---- {node}'s log (last lines)", *tail, sep="\n")
        raise
    finally:
        if c is not None:
            c.stop_all()
        lab.down()


def excluded(rel: str) -> bool:
    """The lab configuration's exclusion ("*.tmp" stays local on each node)."""
    return fnmatch(rel.rsplit("/", 1)[-1], "*.tmp")


def copies(c: LabCluster) -> tuple[Path, Path]:
    return c.lab.host_path("node1", DATA_DIR), c.lab.host_path("node2", DATA_DIR)


def wait_identical(
    c: LabCluster, timeout: float = 30, times: bool = True, all_times: bool = False
) -> list[str]:
    """Poll until both copies are identical (bounded); the last differences otherwise.

    ``all_times``: directory and symlink mtimes too (sent once the pair is live again).
    """
    a, b = copies(c)
    end = time.monotonic() + timeout
    diff = diff_trees(a, b, times=times, all_times=all_times, ignore=excluded)
    while diff and time.monotonic() < end:
        time.sleep(0.5)
        diff = diff_trees(a, b, times=times, all_times=all_times, ignore=excluded)
    return diff


def py(c: LabCluster, node: str, code: str, *args: str, timeout: float = 120) -> str:
    """Run Python code in a node's namespaces (it sees the node's replicated directory)."""
    r = c.lab.run(node, [sys.executable, "-c", code, *args], check=False, timeout=timeout)
    assert r.returncode == 0, f"{node}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def mirror(c: LabCluster, node: str) -> dict[str, Any]:
    st = c.state(node)
    assert st is not None, f"{node} does not answer"
    return dict(st["mirror"])


# ------------------------------------------------------------ 1. acknowledged records


def test_every_acknowledged_record_survives_kill9_of_the_primary_20_rounds() -> None:
    rng = random.Random(20)
    with lab_cluster() as c:
        work = c.lab.workdir / "soak"
        work.mkdir()
        c.first_start(timeout=60)
        prepare(c)
        primary, rounds = "node1", []
        for i in range(20):
            r = run_round(c, primary, i, rng, work)  # raises SoakError on a lost record
            rounds.append(r)
            primary = r.survivor
        assert {r.killed for r in rounds} == {"node1", "node2"}
        assert sum(r.acked for r in rounds) > 0
        assert all(r.on_survivor >= r.acked for r in rounds), rounds
        # Quiet now: both copies are the same tree, and every round's acknowledged records
        # are on both (the killed node's unacknowledged tail was reconciled by the resync).
        assert wait_identical(c) == []
        for r in rounds:
            acks = (work / f"acks-{r.index:04d}.log").read_bytes()
            for node in ("node1", "node2"):
                path = c.lab.host_path(node, DATA_DIR) / "soak" / f"records-{r.index:04d}.log"
                _, _, problems = check_records(acks, path.read_bytes() if path.exists() else b"")
                assert problems == [], (node, r, problems)


# ------------------------------------------------------------ 2. identical copies

WORKLOAD = r"""
import ctypes, errno, json, os, random, sys, threading
root, nthreads, nops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
counts, errors, lock = {}, {}, threading.Lock()
os.makedirs(f"{root}/shared", exist_ok=True)

def worker(t):
    rng = random.Random(1000 + t)
    top = f"{root}/t{t}"
    os.makedirs(top, exist_ok=True)
    dirs, files, links = [top], [], []
    def name(prefix):
        return f"{rng.choice(dirs)}/{prefix}{rng.randrange(10**6)}"
    for i in range(nops):
        op = rng.choice(["create", "create", "write", "write", "write", "truncate", "rename",
                         "unlink", "mkdir", "rmdir", "symlink", "link", "chmod", "chown",
                         "setxattr", "rmxattr", "punch", "utime", "cross"])
        try:
            if op == "create" or not files and op not in ("mkdir", "symlink"):
                op = "create"
                p = name("f")
                fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
                try:
                    data = rng.randbytes(rng.randrange(0, 200_000))
                    os.pwrite(fd, data, rng.choice([0, 0, 70_000]))
                finally:
                    os.close(fd)
                files.append(p)
            elif op == "write":
                p = rng.choice(files)
                fd = os.open(p, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    data = rng.randbytes(rng.randrange(1, 100_000))
                    os.pwrite(fd, data, rng.randrange(0, size + 65_536))
                    if rng.random() < 0.3:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            elif op == "truncate":
                os.truncate(rng.choice(files), rng.randrange(0, 300_000))
            elif op == "rename":
                p = rng.choice(files)
                q = name("r")
                os.rename(p, q)
                files[files.index(p)] = q
            elif op == "cross":
                p = rng.choice(files)
                q = f"{root}/shared/t{t}-{i}"
                os.rename(p, q)
                files.remove(p)
            elif op == "unlink":
                p = rng.choice(files)
                os.unlink(p)
                files.remove(p)
            elif op == "mkdir":
                p = name("d")
                os.mkdir(p, rng.choice([0o755, 0o700, 0o750]))
                dirs.append(p)
            elif op == "rmdir":
                cands = [d for d in dirs[1:] if not os.listdir(d)]
                if cands:
                    d = rng.choice(cands)
                    os.rmdir(d)
                    dirs.remove(d)
            elif op == "symlink":
                os.symlink(rng.choice(["../x", "target", "/etc/hostname", "a/b/c"]), name("s"))
            elif op == "link":
                p = rng.choice(files)
                q = name("h")
                os.link(p, q)
                files.append(q)
            elif op == "chmod":
                os.chmod(rng.choice(files), rng.choice([0o600, 0o644, 0o640, 0o755, 0o4755]))
            elif op == "chown":
                os.chown(rng.choice(files), rng.choice([0, 1000, 1001]), rng.choice([0, 1000]))
            elif op == "setxattr":
                value = rng.randbytes(rng.randrange(1, 300))
                os.setxattr(rng.choice(files), f"user.k{rng.randrange(4)}", value)
            elif op == "rmxattr":
                os.removexattr(rng.choice(files), f"user.k{rng.randrange(4)}")
            elif op == "punch":
                p = rng.choice(files)
                fd = os.open(p, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    off = rng.randrange(0, size + 1)
                    if libc.fallocate(fd, PUNCH, off, rng.randrange(1, 200_000)) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, os.strerror(e))
                finally:
                    os.close(fd)
            elif op == "utime":
                os.utime(rng.choice(files), ns=(rng.randrange(10**18), rng.randrange(10**18)))
            with lock:
                counts[op] = counts.get(op, 0) + 1
        except OSError as exc:
            with lock:
                key = f"{op}:{errno.errorcode.get(exc.errno, exc.errno)}"
                errors[key] = errors.get(key, 0) + 1

threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
for th in threads: th.start()
for th in threads: th.join(600)
print(json.dumps({"counts": counts, "errors": errors}))
"""

# What the workload may legitimately meet (its own bookkeeping, xattr absent); an I/O error,
# a timeout or "not connected" would be the mirror failing the application.
EXPECTED_ERRNOS = {"ENODATA", "ENOENT", "EEXIST", "ENOTEMPTY"}

SQLITE = r"""
import sqlite3, sys
for name, mode in (("rollback.db", "DELETE"), ("wal.db", "WAL")):
    db = sqlite3.connect(f"{sys.argv[1]}/{name}", isolation_level=None)
    db.execute(f"PRAGMA journal_mode={mode}")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)")
    for i in range(300):
        db.execute("BEGIN")
        db.execute("INSERT INTO t (v, n) VALUES (?, ?)", ("x" * (i % 500), i))
        db.execute("UPDATE t SET n = n + 1 WHERE id % 7 = ?", (i % 7,))
        if i % 10 == 0:
            db.execute("DELETE FROM t WHERE id % 13 = ?", (i % 13,))
        db.execute("COMMIT")
    if mode == "WAL":
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(name, db.execute("SELECT count(*), sum(n) FROM t").fetchone())
    db.close()
"""


SETID = r"""
import os, struct, subprocess, sys
d = sys.argv[1]
os.makedirs(d)
for name, mode in (("by-nobody", 0o6777), ("by-root", 0o6777), ("caps", 0o755)):
    with open(f"{d}/{name}", "wb") as f:
        f.write(b"x")
    os.chmod(f"{d}/{name}", mode)
# struct vfs_cap_data, revision 2, effective, permitted CAP_NET_BIND_SERVICE
os.setxattr(f"{d}/caps", "security.capability", struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0))
fd = os.open(f"{d}/by-nobody", os.O_WRONLY | os.O_APPEND)
subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                "-c", "import os, sys; os.write(int(sys.argv[1]), b'n')", str(fd)],
               pass_fds=(fd,), check=True, timeout=60)
os.close(fd)
for name in ("by-root", "caps"):
    with open(f"{d}/{name}", "ab") as f:
        f.write(b"r")
"""


def test_copies_identical_after_random_workload_tarball_and_sqlite() -> None:
    with lab_cluster() as c:
        c.first_start(timeout=60)
        # Multi-threaded random operations through node1's mount (fixed seeds, bounded).
        out = py(c, "node1", WORKLOAD, f"{DATA_DIR}/random", "4", "300", timeout=300)
        result = json.loads(out.strip().splitlines()[-1])
        assert sum(result["counts"].values()) > 600, result
        unexpected = {k: n for k, n in result["errors"].items() if k.split(":")[1] not in
                      EXPECTED_ERRNOS}  # fmt: skip
        assert unexpected == {}, result
        assert wait_identical(c, all_times=True) == []
        st = mirror(c, "node1")
        assert st["mirror_state"] == "connected" and st["drops"] == 0, st

        # A real source tree: this repository's HEAD, extracted with tar on the mount.
        tarball = c.lab.workdir / "src.tar"
        subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parents[2]), "archive",
             "--format=tar", "-o", str(tarball), "HEAD"],
            check=True, timeout=60,
        )  # fmt: skip
        c.lab.run("node1", ["mkdir", "-p", f"{DATA_DIR}/src"])
        c.lab.run("node1", ["tar", "-xf", str(tarball), "-C", f"{DATA_DIR}/src"], timeout=300)
        n1 = c.lab.host_path("node1", DATA_DIR) / "src"
        assert (n1 / "app" / "mirror" / "service.py").is_file()
        assert wait_identical(c, all_times=True) == []

        # SQLite: a few hundred transactions, rollback journal and WAL.
        c.lab.run("node1", ["mkdir", "-p", f"{DATA_DIR}/sqlite"])
        out = py(c, "node1", SQLITE, f"{DATA_DIR}/sqlite", timeout=300)
        assert "rollback.db" in out and "wal.db" in out, out
        assert wait_identical(c, all_times=True) == []
        # The secondary's copy is a sound database with the same rows.
        n2 = c.lab.host_path("node2", DATA_DIR) / "sqlite"
        for name in ("rollback.db", "wal.db"):
            # immutable: read only, no -wal/-shm files made next to it in the secondary's copy
            check = "import sqlite3,sys; print(sqlite3.connect(f'file:{sys.argv[1]}?immutable=1', uri=True).execute('PRAGMA integrity_check').fetchone()[0])"  # noqa: E501
            r = subprocess.run(
                [sys.executable, "-c", check, str(n2 / name)],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            assert r.stdout.strip() == "ok", (name, r.stdout, r.stderr)

        # Set-ID bits and file capabilities: the mount clears setuid/setgid for a writer
        # without CAP_FSETID (the kernel leaves it to the mount), each kernel drops the
        # capability attribute on a write; the secondary's copy ends the same.
        py(c, "node1", SETID, f"{DATA_DIR}/setid")
        assert wait_identical(c, all_times=True) == []
        n2 = c.lab.host_path("node2", DATA_DIR) / "setid"
        assert (n2 / "by-nobody").stat().st_mode & 0o7777 == 0o777
        assert (n2 / "by-root").stat().st_mode & 0o7777 == 0o6777
        assert "security.capability" not in os.listxattr(n2 / "caps")
        assert (n2 / "by-nobody").read_bytes() == b"xn"
        st = mirror(c, "node1")
        assert st["mirror_state"] == "connected" and st["drops"] == 0, st


# ------------------------------------------------------------ PostgreSQL


class Postgres:
    """PostgreSQL 15 (Debian) run as the postgres user in a node, data dir on the mirror."""

    def __init__(self, c: LabCluster, node: str, pgdata: str) -> None:
        self.c, self.node, self.pgdata = c, node, pgdata
        self.sock = c.lab.workdir / f"pgsock-{node}"
        self.sock.mkdir(exist_ok=True)
        shutil.chown(self.sock, "postgres", "postgres")
        self.logfile = c.lab.workdir / f"pg-{node}.log"
        self.logfile.touch()
        shutil.chown(self.logfile, "postgres", "postgres")
        c.lab.workdir.chmod(0o755)

    def run(self, *argv: str, timeout: float = 300) -> str:
        r = self.c.lab.run(
            self.node, ["runuser", "-u", "postgres", "--", *argv], check=False, timeout=timeout
        )
        assert r.returncode == 0, (
            f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}\n"
            + self.logfile.read_text(errors="replace")[-3000:]
        )
        return r.stdout

    def start(self) -> None:
        opts = f"-c listen_addresses='' -k {self.sock}"
        self.run(str(PG_BIN / "pg_ctl"), "-D", self.pgdata, "-o", opts, "-l", str(self.logfile),
                 "-w", "-t", "120", "start")  # fmt: skip

    def stop(self) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", self.pgdata, "-m", "fast", "-w", "-t", "120",
                 "stop")  # fmt: skip

    def sql(self, query: str) -> str:
        return self.run(str(PG_BIN / "psql"), "-h", str(self.sock), "-At", "-c", query,
                        "postgres").strip()  # fmt: skip

    def pgbench(self, *args: str) -> str:
        return self.run(str(PG_BIN / "pgbench"), "-h", str(self.sock), *args, "postgres")


def postmaster_pids(c: LabCluster, node: str) -> list[int]:
    """The postmaster (first line of postmaster.pid) and its children."""
    pidfile = c.lab.host_path(node, DATA_DIR) / "pg" / "postmaster.pid"
    master = int(pidfile.read_text().split()[0])
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                    kids.append(int(entry))
    return [master, *kids]


@pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason=f"{PG_BIN}/initdb missing: "
                    "install the Debian package postgresql-15")  # fmt: skip
def test_postgresql_on_the_mirror_identical_and_starts_on_the_survivor() -> None:
    with lab_cluster() as c:
        c.first_start(timeout=60)
        pgdata = f"{DATA_DIR}/pg"
        c.lab.run("node1", ["mkdir", "-m", "0700", pgdata])
        c.lab.run("node1", ["chown", "postgres:postgres", pgdata])
        pg1 = Postgres(c, "node1", pgdata)
        pg1.run(str(PG_BIN / "initdb"), "-D", pgdata, "-A", "trust", "-U", "postgres")
        pg1.start()
        pg1.pgbench("-i", "-s", "1")
        out = pg1.pgbench("-c", "2", "-t", "150")
        assert "number of failed transactions: 0" in out, out
        pg1.stop()
        assert wait_identical(c) == []

        # Under load again, then a crash of the whole server (daemon and every postgres
        # process, kill -9): the survivor's copy must start and hold the tables.
        pg1.start()
        bench = c.lab.popen(
            "node1",
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "pgbench"), "-h", str(pg1.sock),
             "-c", "2", "-T", "30", "postgres"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(3)
        pids = postmaster_pids(c, "node1")
        c.signal_daemon("node1", signal.SIGKILL)
        for pid in pids:
            try:
                c.lab.signal(pid, signal.SIGKILL)
            except LabError:
                # It had exited, or is exiting: a postgres child leaves its namespaces (so the
                # lab cannot tell it is its own) before it is a zombie, once the postmaster
                # above was killed. Give it up to 5 s to be gone.
                for _ in range(50):
                    if not pid_alive(pid):
                        break
                    time.sleep(0.1)
                assert not pid_alive(pid), f"postgres pid {pid} not signalled"
        c.kill_node("node1")
        c.lab.signal(bench, signal.SIGKILL)
        bench.wait(10)
        c.wait_state("node2", "ALONE", timeout=60)
        # The lab's hosts share one PID namespace: postgres on node2 would take a node1 PID
        # that is still being reaped for a live postmaster. Two real servers do not share
        # PIDs, so wait (bounded) until node1's postgres processes are gone from /proc.
        c.wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
            30,
            "node1's killed postgres processes to be reaped",
        )
        pg2 = Postgres(c, "node2", pgdata)
        pg2.start()
        try:
            assert pg2.sql("SELECT count(*) FROM pgbench_accounts") == "100000"
            assert int(pg2.sql("SELECT count(*) FROM pgbench_history")) >= 300
        finally:
            pg2.stop()


# ------------------------------------------------------------ 3. reintegration


def write_files(c: LabCluster, node: str, spec: list[tuple[str, int]], seed: int) -> None:
    code = (
        "import os, random, sys\n"
        "rng = random.Random(int(sys.argv[1]))\n"
        "for arg in sys.argv[2:]:\n"
        "    path, size = arg.rsplit(':', 1)\n"
        "    with open(path, 'wb') as f:\n"
        "        left = int(size)\n"
        "        while left:\n"
        "            n = min(left, 1 << 20); f.write(rng.randbytes(n)); left -= n\n"
        "        f.flush(); os.fsync(f.fileno())\n"
    )
    py(c, node, code, str(seed), *(f"{DATA_DIR}/{p}:{n}" for p, n in spec), timeout=600)


def change_ranges(c: LabCluster, node: str, changes: list[tuple[str, int, int]]) -> None:
    """pwrite fresh random bytes (path, offset, length) through the node's mount."""
    code = (
        "import os, sys\n"
        "for arg in sys.argv[1:]:\n"
        "    path, off, ln = arg.rsplit(':', 2)\n"
        "    fd = os.open(path, os.O_WRONLY)\n"
        "    os.pwrite(fd, os.urandom(int(ln)), int(off)); os.fsync(fd); os.close(fd)\n"
    )
    py(c, node, code, *(f"{DATA_DIR}/{p}:{o}:{n}" for p, o, n in changes), timeout=600)


def reform(c: LabCluster, back: str, primary: str = "node1", timeout: float = 120) -> None:
    c.start_node(back)
    c.wait_state(primary, "PRIM", timeout)
    c.wait_state("node2" if primary == "node1" else "node1", "SECOND", timeout)


def test_reintegration_after_a_clean_absence_sends_only_the_changed_ranges() -> None:
    rng = random.Random(6)
    files = [(f"big{i}.bin", 2 << 20) for i in range(4)]  # 8 MiB
    with lab_cluster() as c:
        c.first_start(timeout=60)
        write_files(c, "node1", files, seed=1)
        assert wait_identical(c, all_times=True) == []
        c.stop_node("node2")
        c.wait_state("node1", "ALONE", timeout=30)

        # ~1 %: whole 64 KiB blocks at random offsets (the resync compares 64 KiB blocks).
        changes = []
        for _ in range(2):
            for name, size in files:
                changes.append((name, rng.randrange(size // BLOCK) * BLOCK, BLOCK))
        changed = {(p, o) for p, o, _ in changes}
        changed_bytes = len(changed) * BLOCK
        change_ranges(c, "node1", changes)
        reform(c, "node2")
        st = mirror(c, "node1")
        assert st["resync_state"] == "done", st
        sent = st["bytes_sent"]
        assert sent <= 1.2 * changed_bytes + 64 * 1024, (sent, changed_bytes, st)
        assert sent >= changed_bytes, (sent, changed_bytes, st)  # the changes were sent
        assert wait_identical(c, all_times=True) == []

        # Small writes scattered at unaligned offsets: each costs its 64 KiB block, no more.
        c.stop_node("node2")
        c.wait_state("node1", "ALONE", timeout=30)
        small = [(n, rng.randrange(s - 4096), 4096) for n, s in files for _ in range(5)]
        blocks = {
            (p, b) for p, o, ln in small for b in range(o // BLOCK, (o + ln - 1) // BLOCK + 1)
        }
        change_ranges(c, "node1", small)
        reform(c, "node2")
        sent = mirror(c, "node1")["bytes_sent"]
        assert sent <= 1.2 * len(blocks) * BLOCK + 64 * 1024, (sent, len(blocks))
        assert wait_identical(c, all_times=True) == []


def set_bandwidth(c: LabCluster, mbps: float) -> None:
    """Cap the resync (the module's resync_bandwidth_mbps) in the lab's configuration."""
    text = c.config.read_text()
    assert "resync_bandwidth_mbps" not in text
    c.config.write_text(
        text.replace('failback = "', f'resync_bandwidth_mbps = {mbps}\nfailback = "', 1)
    )


@pytest.mark.parametrize("victim", ["source", "target"])
def test_kill9_during_a_resync_ends_identical(victim: str) -> None:
    rng = random.Random(7)
    files = [(f"big{i}.bin", 8 << 20) for i in range(4)]  # 32 MiB
    with lab_cluster() as c:
        set_bandwidth(c, 40)  # ~5 MB/s: 32 MiB of changes take seconds to resync
        c.first_start(timeout=60)
        write_files(c, "node1", files, seed=2)
        assert wait_identical(c, all_times=True) == []
        c.stop_node("node2")
        c.wait_state("node1", "ALONE", timeout=30)
        write_files(c, "node1", files, seed=3)  # every byte changes
        extra = [(name, rng.randrange(size), 1000) for name, size in files]
        c.start_node("node2")

        def midway() -> bool:
            st = mirror(c, "node1")
            r = st["resync"]
            return bool(st["resync_state"] == "running" and 4 << 20 <= r["bytes_done"] < 24 << 20)

        c.wait_for(midway, 120, "the resync to node2 to be midway", every=0.05)
        if victim == "source":
            c.kill_node("node1")
            # node2 is half synced: it must not be promoted.
            time.sleep(2)
            st2 = c.state("node2")
            assert st2 is not None and st2["state"] not in ("PRIM", "ALONE"), st2
            assert c.vip_holders() == set()
            c.start_node("node1")
        else:
            c.kill_node("node2")
            # State only: a primary that lost its SECOND stays ALONE *Transient* (see
            # test_split_brain_without_witness...); it serves writes all the same.
            c.wait_for(lambda: mirror(c, "node1")["mirror_state"] == "dropped", 30, "a drop")
            change_ranges(c, "node1", extra)  # and the primary keeps writing meanwhile
            c.start_node("node2")
        c.wait_state("node1", "PRIM", timeout=180)
        c.wait_state("node2", "SECOND", timeout=180)
        assert wait_identical(c, all_times=True) == []


def check_split_brain_resolved(c: LabCluster) -> None:
    """After a heal: one PRIM, one SECOND, identical copies without the loser's file, and the
    loser's divergent file in a dated quarantine folder with a report."""

    def one_second() -> bool:
        words = {n: (c.state(n) or {}).get("state") for n in ("node1", "node2")}
        return sorted(words.values()) == ["PRIM", "SECOND"]

    c.wait_for(one_second, 60, "one PRIM and one SECOND after the heal")
    winner = "node1" if (c.state("node1") or {}).get("state") == "PRIM" else "node2"
    loser = "node2" if winner == "node1" else "node1"
    c.wait_state(winner, "PRIM", timeout=60)
    c.wait_state(loser, "SECOND", timeout=60)
    assert wait_identical(c) == []
    names = {p.name for p in c.lab.host_path(winner, DATA_DIR).iterdir()}
    assert {"common.txt", f"only-{winner}.txt"} <= names, names
    assert f"only-{loser}.txt" not in names, names

    qroot = c.state_dir(loser) / "demo" / "quarantine"
    folders = sorted(p for p in qroot.iterdir() if p.is_dir())
    assert len(folders) == 1, folders
    kept = list(folders[0].rglob(f"only-{loser}.txt"))
    assert len(kept) == 1, sorted(folders[0].rglob("*"))
    assert kept[0].read_text() == f"{loser} wrote this\n"
    report = json.loads((folders[0] / "report.json").read_text())
    assert f"only-{loser}.txt" in json.dumps(report), report
    assert (folders[0] / "report.txt").is_file()
    wq = c.state_dir(winner) / "demo" / "quarantine"
    assert not wq.exists() or not any(wq.iterdir()), sorted(wq.rglob("*"))


def write_marks(c: LabCluster, node: str) -> None:
    c.lab.run(node, ["sh", "-c", f"echo {node} wrote this > {DATA_DIR}/only-{node}.txt"])


def test_split_brain_without_witness_loser_keeps_its_file_in_quarantine() -> None:
    with lab_cluster(witness=False) as c:
        c.first_start(timeout=60)
        c.lab.run("node1", ["sh", "-c", f"echo common > {DATA_DIR}/common.txt"])
        assert wait_identical(c) == []
        c.lab.partition(node1_reaches_witness=False, node2_reaches_witness=False)
        c.wait_state("node1", "ALONE", timeout=30)
        c.wait_state("node2", "ALONE", timeout=30)
        for node in ("node1", "node2"):
            write_marks(c, node)
        c.lab.heal()
        check_split_brain_resolved(c)


def test_forced_start_divergence_loser_keeps_its_file_in_quarantine() -> None:
    """Both sides write: node2 is stopped, node1 goes on alone and writes; cut off, node2 is
    restarted and forced primary (prim) and writes too; then the network heals."""
    with lab_cluster(witness=False) as c:
        c.first_start(timeout=60)
        c.lab.run("node1", ["sh", "-c", f"echo common > {DATA_DIR}/common.txt"])
        assert wait_identical(c) == []
        c.stop_node("node2")
        c.wait_state("node1", "ALONE", timeout=30)
        write_marks(c, "node1")
        c.lab.partition(node1_reaches_witness=False, node2_reaches_witness=False)
        c.start_node("node2")
        c.wait_state("node2", "WAIT", timeout=30, sub="NotReady")
        c.command_on("node2", "prim")
        c.wait_state("node2", "ALONE", timeout=30)
        write_marks(c, "node2")
        c.lab.heal()
        check_split_brain_resolved(c)
