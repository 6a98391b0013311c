"""Probes that watch the lab from inside its namespaces, for tests and benchmarks.

A node probe runs in a node's namespaces and, every ``interval_ms``, records whether the VIP
is an address of this host (binding to it succeeds only then) and whether the demo
application accepts a connection on 127.0.0.1. A client probe runs in the client namespace
and asks the demo application through the VIP which node answers. Each prints one line per
sample (node: `time held app`; client: `asked answered node`); CLOCK_MONOTONIC is shared
by every namespace, so the lines of all probes can be merged on one time axis. Every probe
stops by itself after ``seconds`` (bounded in count and time) or when terminated.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from app.lab import VIP, Lab

NODE_PROBE = r"""
import socket, sys, time
vip, port, interval, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + seconds
out = sys.stdout
while time.monotonic() < end:
    t = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((vip, 0)); held = 1
    except OSError:
        held = 0
    finally:
        s.close()
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(interval)
    try:
        c.connect(("127.0.0.1", port)); app = 1
    except OSError:
        app = 0
    finally:
        c.close()
    out.write(f"{t:.4f} {held} {app}\n"); out.flush()
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
"""

CLIENT_PROBE = r"""
import json, socket, sys, time
vip, port, interval, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + seconds
req = f"GET / HTTP/1.0\r\nHost: {vip}\r\n\r\n".encode()
while time.monotonic() < end:
    t = time.monotonic()
    node = "-"
    try:
        with socket.create_connection((vip, port), timeout=0.05) as c:
            c.settimeout(0.5)
            c.sendall(req)
            data = b""
            while len(data) < 65536:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
        node = json.loads(data.split(b"\r\n\r\n", 1)[1]).get("node", "?")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    t1 = time.monotonic()
    sys.stdout.write(f"{t:.4f} {t1:.4f} {node}\n")
    sys.stdout.flush()
    time.sleep(max(0.0, interval - (t1 - t)))
"""


@dataclass
class ProbeReport:
    samples: dict[str, int] = field(default_factory=dict)
    both_hold: int = 0  # 10 ms windows in which node1 and node2 both held the VIP
    both_apps: int = 0  # windows in which both applications accepted connections
    client_nodes: set[str] = field(default_factory=set)
    client_answers: list[tuple[float, str]] = field(default_factory=list)

    def first_answer_after(self, t0: float, node: str) -> float | None:
        for t, n in self.client_answers:
            if t >= t0 and n == node:
                return t
        return None


class ProbeSet:
    """Node probes in node1 and node2 and a client probe, merged into one ProbeReport."""

    def __init__(
        self, lab: Lab, interval_ms: int = 10, seconds: float = 120, port: int = 8080
    ) -> None:
        self.lab = lab
        self.args = [VIP, str(port), str(interval_ms / 1000), str(seconds)]
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.window = 0.01

    def __enter__(self) -> ProbeSet:
        for node in ("node1", "node2"):
            self.procs[node] = self.lab.popen(
                node,
                [sys.executable, "-c", NODE_PROBE, *self.args],
                stdout=subprocess.PIPE,
                text=True,
            )
        self.procs["client"] = self.lab.popen(
            "client",
            [sys.executable, "-c", CLIENT_PROBE, *self.args],
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.outputs: dict[str, str] = {}
        for name, p in self.procs.items():
            p.terminate()
            try:
                out, _ = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            self.outputs[name] = out or ""

    def report(self) -> ProbeReport:
        r = ProbeReport()
        held: dict[int, set[str]] = defaultdict(set)
        apps: dict[int, set[str]] = defaultdict(set)
        for node in ("node1", "node2"):
            lines = [ln.split() for ln in self.outputs.get(node, "").splitlines()]
            lines = [ln for ln in lines if len(ln) == 3]
            r.samples[node] = len(lines)
            for t, h, a in lines:
                w = int(float(t) / self.window)
                if h == "1":
                    held[w].add(node)
                if a == "1":
                    apps[w].add(node)
        r.both_hold = sum(1 for s in held.values() if len(s) > 1)
        r.both_apps = sum(1 for s in apps.values() if len(s) > 1)
        for ln in self.outputs.get("client", "").splitlines():
            parts = ln.split()  # asked at, answered at, node ("-": no answer)
            if len(parts) == 3 and parts[2] not in ("-", "?"):
                r.client_answers.append((float(parts[0]), parts[2]))
                r.client_nodes.add(parts[2])
        r.samples["client"] = len(self.outputs.get("client", "").splitlines())
        return r
