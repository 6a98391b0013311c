#!/usr/bin/env python3
"""Failover benchmark in the lab: mirrorha against keepalived, and a false-failover soak.

How it works
    Every phase builds a fresh lab (prefix "mhf-", app/lab.py) and tears it down, so each one
    starts from clean state directories; all phases use the same topology.

    Failover time, mirrorha: a LabCluster (app/labcluster.py: two real daemons, the demo
    application started by start_prim) with the default timing (pulse 300 ms, timeout 1500 ms)
    and with the fastest the configuration accepts (50 ms, 300 ms). A client probe in the
    client namespace asks the demo application through the VIP every 10 ms and prints
    ``start end node`` per try (connect timeout 50 ms). Per run: wait until the probe gets an
    answer from the primary, take t0 = CLOCK_MONOTONIC just before LabCluster.kill_node (kill -9
    of the primary's daemon and of its application, as a crash), and the failover time is
    ``end - t0`` of the first answer from the other node (CLOCK_MONOTONIC is one clock for all
    namespaces). Then the killed node is restarted and the pair re-forms (it SECOND, the other
    PRIM), and the next run kills the other node: the kills alternate.

    Failover time, keepalived (bench/keepalived.py): the demo application runs on both nodes
    all the time (keepalived starts no application and moves no data), keepalived runs in both
    nodes with unicast VRRP on the pub network, advert_int 1 (its default) and then 0.1. Per
    run: kill -9 of the MASTER's keepalived (parent and VRRP child) and removal of the VIP it
    left on eth0, then the same measure as above; the restarted keepalived stays BACKUP
    (nopreempt), so the kills alternate too.

    False failovers: a pair formed with the default, then with the fast timing, runs for
    --soak-seconds with both cores loaded (two busy loops, one per core, started in the
    witness namespace and killed by pid) and 1 % packet loss on both heartbeat links (pub and
    repl) in each direction (each node's egress on both networks), and 50 ms of jitter on the
    same egress: delay 50 ms +- 50 ms, so each frame waits uniformly 0 to 100 ms (netem's
    ``delay 50ms 50ms``; a base of 0 would clamp half the frames at 0 and make it less than
    50 ms of jitter). Where the kernel has no sch_netem, the lab applies it with its userspace
    impairment hub (app/labimpair.py; it reorders frames, as netem does); the JSON says which
    mechanism ("jitter": "applied via hub: ..."). Only if the lab cannot do it at all
    (LabUnsupported) does the soak run without jitter, and the output says so. A false failover
    is a departure, while nobody was killed, of node1 from PRIM or of node2 from SECOND, read
    from each daemon's event log (every decision that changed something, events.db), so a
    short flap between two polls is not missed; departures of both nodes less than 10 s apart
    count as one incident.

    Output: one line per figure, then one JSON line (the last line) with everything.
    p95 is the nearest-rank percentile: with 10 runs it is the slowest run.

Exceptions
    BenchError    a wait timed out or a phase could not run; main() prints it and exits 1.
    Not root, no lab or no keepalived: exit 2 with the reason.

Known limits
    One machine, two cores shared by both "servers", the client, the probes and the load:
    times include the scheduling noise of that. The default and
    fast figures are without a mirror (replicated=False); when app/mirror/service.py exists
    and imports, one more configuration (default timing, replicated=True, a fresh lab and
    first start per run, always killing node1) measures the failover with the mirror; its
    failure is reported in the output and JSON, not fatal. keepalived's figure is its takeover
    of the address only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `bench/failover.py` from anywhere
    sys.path.insert(0, str(REPO))

from app.lab import VIP, Lab, LabError, LabUnsupported, unavailable_reason  # noqa: E402
from app.labcluster import DEMO_PORT, LabCluster, LabClusterError  # noqa: E402
from app.labprobe import CLIENT_PROBE  # noqa: E402
from bench.keepalived import KeepalivedError, KeepalivedPair, keepalived_path  # noqa: E402

PREFIX = "mhf-"
NODES = ("node1", "node2")
TIMINGS: dict[str, tuple[int, int]] = {"default": (300, 1500), "fast": (50, 300)}
ADVERTS: dict[str, float] = {"advert_1": 1.0, "advert_0_1": 0.1}
PROBE_INTERVAL_MS = 10
LOSS_PCT = 1.0
JITTER_MS = 50.0
LOAD_PROCS = 2
INCIDENT_GAP_S = 10.0
FAILOVER_TIMEOUT_S = 60.0
REFORM_TIMEOUT_S = 90.0
GOALS = {"default": 3.0, "fast": 1.0}


BURNER = "import time\nend = time.monotonic() + float(__import__('sys').argv[1])\n" + (
    "while time.monotonic() < end:\n    pass\n"
)


class BenchError(Exception):
    """A wait timed out or a phase could not run; the message says what was seen."""


# ------------------------------------------------------------------ figures


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (with 10 values: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summary(times: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(times), 3),
        "p95_s": round(p95(times), 3),
        "n": len(times),
        "runs_s": [round(t, 3) for t in times],
        **extra,
    }


def count_incidents(departures: list[tuple[float, str, str]]) -> int:
    """Departures (t, node, what) closer than INCIDENT_GAP_S to the previous one are one."""
    incidents, last = 0, -math.inf
    for t, _node, _what in sorted(departures):
        if t - last > INCIDENT_GAP_S:
            incidents += 1
        last = t
    return incidents


# ------------------------------------------------------------------ client probe


@dataclass
class ClientProbe:
    """The 10 ms client probe through the VIP; lines are read by a thread as they come."""

    lab: Lab
    seconds: float = 300.0
    answers: list[tuple[float, float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None

    def __enter__(self) -> ClientProbe:
        args = [VIP, str(DEMO_PORT), str(PROBE_INTERVAL_MS / 1000), str(self.seconds)]
        self.proc = self.lab.popen(
            "client",
            [sys.executable, "-c", CLIENT_PROBE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) != 3 or parts[2] in ("-", "?"):
                continue
            with self.cond:
                self.answers.append((float(parts[0]), float(parts[1]), parts[2]))
                self.cond.notify_all()

    def wait_answer(self, node: str, after: float, timeout: float) -> float | None:
        """End time of the first answer from ``node`` that arrived at or after ``after``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for _t, end, who in self.answers:
                    if who == node and end >= after:
                        return end
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.1))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.reader is not None:
            self.reader.join(5)


def measure_once(lab: Lab, old: str, new: str, kill: Callable[[str], None], what: str) -> float:
    """One failover: kill ``old`` (after the probe has seen it answer), time to ``new``'s
    first answer through the VIP."""
    with ClientProbe(lab) as probe:
        if probe.wait_answer(old, after=time.monotonic(), timeout=20) is None:
            raise BenchError(f"{what}: the client gets no answer from {old} before the kill")
        t0 = time.monotonic()
        kill(old)
        t1 = probe.wait_answer(new, after=t0, timeout=FAILOVER_TIMEOUT_S)
    if t1 is None:
        raise BenchError(f"{what}: no answer from {new} within {FAILOVER_TIMEOUT_S:.0f} s")
    return t1 - t0


# ------------------------------------------------------------------ phases


@contextlib.contextmanager
def fresh_lab() -> Iterator[Lab]:
    lab = Lab(prefix=PREFIX)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


def mirrorha_failovers(
    timing: str, runs: int, replicated: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Without a mirror: one pair, re-formed after each kill (the kills alternate). With a
    mirror: a fresh lab and first start per run (kill node1 each time), so the figure does
    not depend on the reintegration of the killed node; an acknowledged POST is written before
    each kill and looked for on the survivor."""
    pulse_ms, timeout_ms = TIMINGS[timing]
    label = f"mirrorha {timing}" + (" replicated" if replicated else "")
    times: list[float] = []
    found = 0
    if not replicated:
        with fresh_lab() as lab:
            cluster = LabCluster(lab, pulse_ms=pulse_ms, timeout_ms=timeout_ms, replicated=False)
            try:
                cluster.first_start(timeout=60)
                primary = "node1"
                for i in range(runs):
                    took = measure_once(
                        lab, primary, other(primary), cluster.kill_node, f"{label} run {i}"
                    )
                    times.append(took)
                    say(f"  {label} run {i + 1}/{runs}: kill {primary}, {took:.3f} s")
                    # Re-form the pair: the killed node comes back SECOND, the next run kills
                    # the other one.
                    cluster.start_node(primary)
                    cluster.wait_state(primary, "SECOND", REFORM_TIMEOUT_S)
                    cluster.wait_state(other(primary), "PRIM", REFORM_TIMEOUT_S)
                    primary = other(primary)
            except LabClusterError as exc:
                raise BenchError(f"{label}: {exc}") from exc
            finally:
                cluster.stop_all()
        return summary(times, pulse_ms=pulse_ms, timeout_ms=timeout_ms, replicated=False)
    for i in range(runs):
        with fresh_lab() as lab:
            cluster = LabCluster(lab, pulse_ms=pulse_ms, timeout_ms=timeout_ms, replicated=True)
            try:
                cluster.first_start(timeout=60)
                mark = f"bench run {i}"
                if cluster.client_post(mark) is None:
                    raise BenchError(f"{label} run {i}: the POST before the kill got no answer")
                took = measure_once(lab, "node1", "node2", cluster.kill_node, f"{label} run {i}")
                got = cluster.client_get(timeout=5) or {}
                kept = got.get("node") == "node2" and mark in str(got.get("last"))
                found += int(kept)
            except LabClusterError as exc:
                raise BenchError(f"{label}: {exc}") from exc
            finally:
                cluster.stop_all()
        times.append(took)
        say(
            f"  {label} run {i + 1}/{runs}: kill node1, {took:.3f} s, acknowledged write "
            + ("found on node2" if kept else "MISSING on node2")
        )
    return summary(
        times,
        pulse_ms=pulse_ms,
        timeout_ms=timeout_ms,
        replicated=True,
        acknowledged_write_found=found,
    )


def start_demo_apps(lab: Lab) -> None:
    """The demo application on both nodes (for keepalived, which starts none)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for node in NODES:
        data = lab.workdir / "demo" / node
        data.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "app", "demo-app", "--dir", str(data)]
        argv += ["--port", str(DEMO_PORT), "--node", node]
        lab.popen(node, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = [sys.executable, "-m", "app", "demo-app-ready", "--port", str(DEMO_PORT)]
    for node in NODES:
        deadline = time.monotonic() + 20
        while lab.run(node, ready, check=False, timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise BenchError(f"the demo application does not answer in {node}")
            time.sleep(0.1)


def keepalived_failovers(
    lab: Lab, name: str, runs: int, say: Callable[[str], None]
) -> dict[str, Any]:
    advert = ADVERTS[name]
    times: list[float] = []
    pair = KeepalivedPair(lab, advert)
    try:
        master = pair.start_both(timeout=30)
        for i in range(runs):
            took = measure_once(lab, master, other(master), pair.kill, f"keepalived {name} run {i}")
            times.append(took)
            say(f"  keepalived {name} run {i + 1}/{runs}: kill {master}, {took:.3f} s")
            pair.start(master)
            now = pair.wait_pair(timeout=30)
            if now != other(master):
                raise BenchError(f"keepalived {name}: {master} took the VIP back on restart")
            master = now
    except KeepalivedError as exc:
        raise BenchError(f"keepalived {name}: {exc}") from exc
    finally:
        pair.stop_all()
    return summary(times, advert_int_s=advert)


def read_events(db: Path, since: float) -> list[tuple[float, str, str, str]]:
    """(wall time, state, substatus, reason) of a node's decisions since ``since``."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute(
            "SELECT t, state, substatus, reason FROM events WHERE t >= ? ORDER BY rowid",
            (since,),
        ).fetchall()
    finally:
        con.close()
    return [(float(t), str(s), str(sub), str(r)) for t, s, sub, r in rows]


def soak(timing: str, seconds: float, say: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    """False failovers of a formed pair under load and loss; returns (figures, jitter)."""
    pulse_ms, timeout_ms = TIMINGS[timing]
    burners: list[subprocess.Popen[Any]] = []
    with fresh_lab() as lab:
        cluster = LabCluster(lab, pulse_ms=pulse_ms, timeout_ms=timeout_ms, replicated=False)
        try:
            cluster.first_start(timeout=60)
            jitter = ""
            backend = ""
            for node in NODES:
                for net in ("pub", "repl"):
                    try:
                        backend = jitter_backend = lab.netem(
                            node,
                            net,
                            loss_pct=LOSS_PCT,
                            delay_ms=JITTER_MS,
                            jitter_ms=JITTER_MS,
                            both_ways=False,
                        )
                        if not jitter.startswith("unavailable"):
                            jitter = (
                                f"applied via {jitter_backend}: delay {JITTER_MS:g} ms "
                                f"+- {JITTER_MS:g} ms on each node's egress on pub and repl"
                            )
                    except LabUnsupported as exc:
                        jitter = f"unavailable: {exc}"
                        backend = lab.netem(node, net, loss_pct=LOSS_PCT, both_ways=False)
            for _ in range(LOAD_PROCS):
                burners.append(
                    lab.popen("witness", [sys.executable, "-c", BURNER, str(seconds + 30)])
                )
            wall0 = time.time()
            end = time.monotonic() + seconds
            down_polls = 0
            while time.monotonic() < end:
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                if any(cluster.state(n) is None for n in NODES):
                    down_polls += 1
            departures: list[tuple[float, str, str]] = []
            stayed: list[tuple[float, str, str]] = []  # decisions logged without leaving home
            for node, home in (("node1", "PRIM"), ("node2", "SECOND")):
                for t, state, sub, reason in read_events(
                    cluster.state_dir(node) / "events.db", wall0
                ):
                    seen = (t - wall0, node, f"{state} {sub}: {reason}")
                    (departures if state != home else stayed).append(seen)
            final = {n: cluster.state_word(n) for n in NODES}
        except LabClusterError as exc:
            raise BenchError(f"soak {timing}: {exc}") from exc
        finally:
            for proc in burners:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            cluster.stop_all()
    incidents = count_incidents(departures)
    say(
        f"  soak {timing}: {seconds:g} s, {incidents} false failover(s), "
        f"{len(stayed)} other decision(s) logged, final {final['node1']} / {final['node2']}"
    )
    for t, node, what in departures[:5]:
        say(f"    +{t:.1f} s {node} -> {what}")
    return (
        {
            "false_failovers": incidents,
            "departures": [
                {"t_s": round(t, 2), "node": n, "to": w[:200]} for t, n, w in departures[:10]
            ],
            "final": final,
            "events_without_departure": len(stayed),
            "events_sample": [
                {"t_s": round(t, 2), "node": n, "what": w[:200]} for t, n, w in stayed[:5]
            ],
            "daemon_unanswered_polls": down_polls,
            "pulse_ms": pulse_ms,
            "timeout_ms": timeout_ms,
            "loss_backend": backend,
        },
        jitter,
    )


def replication_available() -> tuple[bool, str]:
    """Whether the replication service exists, to run a replicated configuration too."""
    service = REPO / "app" / "mirror" / "service.py"
    if not service.exists():
        return False, "app/mirror/service.py does not exist: failover measured without a mirror"
    try:
        __import__("app.mirror.service")
    except Exception as exc:
        return False, f"app/mirror/service.py does not import ({exc}): measured without a mirror"
    return True, "app/mirror/service.py present"


# ------------------------------------------------------------------ main


def table_line(label: str, fig: dict[str, Any]) -> str:
    return f"{label:<34} median {fig['median_s']:7.3f} s   p95 {fig['p95_s']:7.3f} s   n {fig['n']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/failover.py",
        description="Failover time of mirrorha vs keepalived in the lab, and false failovers.",
    )
    ap.add_argument("--runs", type=int, default=10, help="failovers per configuration (10)")
    ap.add_argument(
        "--soak-seconds", type=float, default=180.0, help="soak length per timing (180)"
    )
    ap.add_argument("--quick", action="store_true", help="3 runs and a 20 s soak (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.soak_seconds = 3, 20.0
    if args.runs < 1 or args.soak_seconds <= 0:
        ap.error("--runs must be >= 1 and --soak-seconds > 0")
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces of the lab)", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/failover.py: the lab cannot run here: {reason}", file=sys.stderr)
        return 2
    if keepalived_path() is None:
        print(
            "bench/failover.py: keepalived is not installed (Debian package keepalived)",
            file=sys.stderr,
        )
        return 2

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.monotonic()
    result: dict[str, Any] = {"bench": "failover", "runs": args.runs}
    try:
        replicated, note = replication_available()
        result["replicated_note"] = note
        say(f"mirrorha failover, kill -9 of daemon and application ({note})")
        for timing in TIMINGS:
            result[f"mirrorha_{timing}"] = mirrorha_failovers(timing, args.runs, False, say)
        if replicated:
            # One configuration with the mirror (the default timing, the one with a promise);
            # the replication service is new, so its failure is reported, not fatal.
            try:
                result["mirrorha_default_replicated"] = mirrorha_failovers(
                    "default", args.runs, True, say
                )
            except BenchError as exc:
                say(f"  mirrorha default replicated: FAILED: {exc}")
                result["mirrorha_default_replicated"] = {"error": str(exc)[:500]}
        say("keepalived VRRP failover, kill -9 of the MASTER's keepalived")
        with fresh_lab() as lab:
            start_demo_apps(lab)
            for name in ADVERTS:
                result[f"keepalived_{name}"] = keepalived_failovers(lab, name, args.runs, say)
        say(
            f"false failovers: both cores loaded, {LOSS_PCT:g} % loss on pub and repl, "
            f"{args.soak_seconds:g} s per timing"
        )
        soaks: dict[str, Any] = {}
        jitter = ""
        for timing in TIMINGS:
            soaks[timing], jitter = soak(timing, args.soak_seconds, say)
        result["soak"] = soaks
        result["false_failovers"] = sum(s["false_failovers"] for s in soaks.values())
        result["soak_s"] = args.soak_seconds
        result["loss_pct"] = LOSS_PCT
        result["jitter"] = jitter
        result["load_procs"] = LOAD_PROCS
    except (BenchError, LabError) as exc:
        print(f"bench/failover.py: {exc}", file=sys.stderr)
        result["error"] = str(exc)
        print(json.dumps(result), flush=True)
        return 1

    ka1, ka01 = result["keepalived_advert_1"], result["keepalived_advert_0_1"]
    result["ratio_default"] = round(result["mirrorha_default"]["median_s"] / ka1["median_s"], 2)
    result["ratio_fast"] = round(result["mirrorha_fast"]["median_s"] / ka01["median_s"], 2)
    result["goals"] = {
        "default_le_3s": result["mirrorha_default"]["median_s"] <= GOALS["default"],
        "fast_le_1s": result["mirrorha_fast"]["median_s"] <= GOALS["fast"],
        "false_failovers_0": result["false_failovers"] == 0,
    }
    result["elapsed_s"] = round(time.monotonic() - started, 1)

    say("")
    say(f"failover time, kill -9 to first client answer through the VIP ({args.runs} runs)")
    for key, label in (
        ("mirrorha_default", "mirrorha default (300/1500 ms)"),
        ("mirrorha_fast", "mirrorha fast (50/300 ms)"),
        ("mirrorha_default_replicated", "mirrorha default, replicated"),
        ("keepalived_advert_1", "keepalived advert_int 1"),
        ("keepalived_advert_0_1", "keepalived advert_int 0.1"),
    ):
        if key in result and "error" not in result[key]:
            say(table_line(label, result[key]))
        elif key in result:
            say(f"{label:<34} failed: {result[key]['error'][:200]}")
    say(
        f"ratio mirrorha/keepalived (medians): default/advert 1 = {result['ratio_default']}, "
        f"fast/advert 0.1 = {result['ratio_fast']}"
    )
    rep = result.get("mirrorha_default_replicated")
    if rep is None:
        say(f"replication: {note}")
    elif "error" not in rep:
        say(
            f"replicated runs: the write acknowledged before the kill was on the survivor in "
            f"{rep['acknowledged_write_found']} of {rep['n']}"
        )
    say(
        f"false failovers: {result['false_failovers']} in {args.soak_seconds:g} s per timing "
        f"(default {soaks['default']['false_failovers']}, fast {soaks['fast']['false_failovers']}),"
        f" {LOAD_PROCS} busy loops, {LOSS_PCT:g} % loss on both heartbeat links"
    )
    if jitter.startswith("unavailable"):
        say(f"jitter NOT applied: {jitter[len('unavailable: ') :]}")
    else:
        say(f"jitter {jitter}")
    goals = result["goals"]
    say(
        "goals: default <= 3 s "
        + ("met" if goals["default_le_3s"] else "MISSED")
        + ", fast <= 1 s "
        + ("met" if goals["fast_le_1s"] else "MISSED")
        + ", no false failover "
        + ("met" if goals["false_failovers_0"] else "MISSED")
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
