"""A mirrorha cluster in the lab: two real node daemons and the demo application.

How it works
    ``LabCluster(lab, command)`` writes one configuration (examples/lab.toml's topology), a
    cluster key and the demo application's scripts into the lab's work directory, then starts a
    daemon in node1 and node2 (each in its own network and mount namespace, state directory
    under the node's lab directory) with ``command`` (`python3 dist/mirrorha.pyz` or
    `python -m app`). It talks to each daemon through its control socket from the host (a
    file, not the network), and reads the VIP and the application from inside the namespaces.
    The `demo` command, the lab tests and the benchmarks all use it.

    The demo application (app/demoapp.py) is started by start_prim and stopped by stop_prim on
    port 8080; its data lives in the replicated directory /srv/mirrorha/data.

Known limits
    - Every wait is bounded; a wait that times out raises ``LabClusterError`` with the last
      state seen of both nodes, so a failing test says what the cluster was doing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.control import ControlError, request
from app.lab import VIP, Lab

NODES = ("node1", "node2")
DATA_DIR = "/srv/mirrorha/data"
DEMO_PORT = 8080
WITNESS = "198.18.1.254"

START_PRIM = """#!/bin/sh
# Start the demo application on the primary; its pid goes to app.pid (fencing, stop_prim).
$MIRRORHA_SELF demo-app --dir "$DATA_DIR" --port "$DEMO_PORT" --node "$MIRRORHA_NODE" \\
    </dev/null >>"$MIRRORHA_STATE_DIR/demo-app.log" 2>&1 &
echo $! > "$MIRRORHA_STATE_DIR/app.pid"
# Ready when it answers (bounded: 10 s).
i=0
while [ $i -lt 100 ]; do
    if $MIRRORHA_SELF demo-app-ready --port "$DEMO_PORT"; then exit 0; fi
    i=$((i + 1)); sleep 0.1
done
echo "demo-app did not answer on port $DEMO_PORT" >&2
exit 1
"""

STOP_PRIM = """#!/bin/sh
# Stop the demo application: SIGTERM, then SIGKILL on the forced call ($4 = force).
pidfile="$MIRRORHA_STATE_DIR/app.pid"
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
sig=TERM
[ "$4" = force ] && sig=KILL
kill -s $sig "$pid" 2>/dev/null || exit 0
i=0
while [ $i -lt 50 ]; do
    kill -0 "$pid" 2>/dev/null || exit 0
    i=$((i + 1)); sleep 0.1
done
exit 1
"""


class LabClusterError(Exception):
    """A wait timed out or a node did not come up; says what was seen."""


def dev_command() -> list[str]:
    """`python -m app` from this source tree (tests); the built file uses [python3, pyz]."""
    return [sys.executable, "-m", "app"]


def config_text(
    *,
    key_file: Path,
    scripts: Path,
    pulse_ms: int,
    timeout_ms: int,
    replicated: bool,
    witness: bool,
    failback: str = "stay",
) -> str:
    repl = (
        f'\n[[modules.replicated]]\npath = "{DATA_DIR}"\nexclude = ["*.tmp"]\n'
        if replicated
        else ""
    )
    wit = f'witnesses = ["{WITNESS}"]' if witness else "witnesses = []"
    return f"""# Written by app/labcluster.py for the lab: the topology of examples/lab.toml.
[cluster]
name = "lab"
key_file = "{key_file}"

[[cluster.nodes]]
name = "node1"
admin = "198.18.1.1"

[[cluster.nodes]]
name = "node2"
admin = "198.18.1.2"

[[cluster.networks]]
name = "pub"
addresses = {{ node1 = "198.18.1.1", node2 = "198.18.1.2" }}

[[cluster.networks]]
name = "repl"
addresses = {{ node1 = "198.18.2.1", node2 = "198.18.2.2" }}
replication = true

[[modules]]
name = "demo"
pulse_ms = {pulse_ms}
timeout_ms = {timeout_ms}
replication_timeout_ms = {max(1000, 2 * timeout_ms)}
failback = "{failback}"

[modules.vip]
address = "{VIP}"
prefix = 24
interface = "eth0"
{repl}
[modules.scripts]
dir = "{scripts}"
timeout_s = 30
env = {{ DEMO_PORT = "{DEMO_PORT}", DATA_DIR = "{DATA_DIR}" }}

[modules.splitbrain]
{wit}
method = "ping"
"""


class LabCluster:
    def __init__(
        self,
        lab: Lab,
        command: Sequence[str] | None = None,
        *,
        pulse_ms: int = 300,
        timeout_ms: int = 1500,
        replicated: bool = True,
        witness: bool = True,
        failback: str = "stay",
    ) -> None:
        self.lab = lab
        self.command = list(command or dev_command())
        self.dir = lab.workdir / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        scripts = self.dir / "scripts"
        scripts.mkdir(exist_ok=True)
        for name, text in (("start_prim", START_PRIM), ("stop_prim", STOP_PRIM)):
            p = scripts / name
            p.write_text(text)
            p.chmod(0o755)
        key = self.dir / "cluster.key"
        if not key.exists():
            key.write_text(secrets.token_hex(32) + "\n")
            key.chmod(0o600)
        self.config = self.dir / "mirrorha.toml"
        self.pulse_ms, self.timeout_ms = pulse_ms, timeout_ms
        self.config.write_text(
            config_text(
                key_file=key,
                scripts=scripts,
                pulse_ms=pulse_ms,
                timeout_ms=timeout_ms,
                replicated=replicated,
                witness=witness,
                failback=failback,
            )
        )
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.env = dict(os.environ)
        if self.command[1:3] == ["-m", "app"]:
            root = str(Path(__file__).resolve().parents[1])
            self.env["PYTHONPATH"] = root + os.pathsep + self.env.get("PYTHONPATH", "")

    # ------------------------------------------------------------ processes

    def state_dir(self, node: str) -> Path:
        return self.lab.node_dir(node) / "state"

    def log_path(self, node: str) -> Path:
        return self.dir / f"{node}.log"

    def start_node(self, node: str, start: bool = True) -> subprocess.Popen[Any]:
        old = self.procs.get(node)
        if old is not None and old.poll() is None:
            raise LabClusterError(f"{node}'s daemon already runs (pid {old.pid})")
        argv = [
            *self.command,
            "run",
            "--config",
            str(self.config),
            "--state-dir",
            str(self.state_dir(node)),
        ]
        if start:
            argv.append("--start")
        log = open(self.log_path(node), "ab")  # noqa: SIM115 - owned by the Popen
        proc = self.lab.popen(node, argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self.procs[node] = proc
        self.wait_for(lambda: self.state(node) is not None, 20, f"{node}'s daemon to answer")
        return proc

    def daemon_pid(self, node: str) -> int:
        """The daemon's pid (inside nsenter: the Popen's child)."""
        proc = self.procs[node]
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        with contextlib.suppress(OSError):
            kids = children.read_text().split()
            if kids:
                return int(kids[0])
        return proc.pid

    def app_pid(self, node: str) -> int | None:
        try:
            pid = int((self.state_dir(node) / "demo" / "app.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def signal_daemon(self, node: str, sig: int) -> None:
        self.lab.signal(self.daemon_pid(node), sig)

    def kill_node(self, node: str, app_too: bool = True) -> None:
        """kill -9 of the daemon (and of the application, as a crashed server would lose it)."""
        app = self.app_pid(node)
        self.signal_daemon(node, signal.SIGKILL)
        if app_too and app is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(app, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs[node].wait(10)

    def stop_node(self, node: str, timeout: float = 60) -> None:
        """Clean stop (SIGTERM): the daemon stops its module and tells the peer."""
        proc = self.procs.get(node)
        if proc is None or proc.poll() is not None:
            return
        self.signal_daemon(node, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_node(node)

    def stop_all(self) -> None:
        for node in NODES:
            with contextlib.suppress(Exception):
                self.stop_node(node, timeout=30)

    # ------------------------------------------------------------ asking

    def state(self, node: str) -> dict[str, Any] | None:
        """The module's state dict from the node's daemon, or None when it does not answer."""
        try:
            st = request(self.state_dir(node), "GET", "/v1/state", timeout=2)
        except ControlError:
            return None
        mods = st.get("modules") or [None]
        first = mods[0]
        return first if isinstance(first, dict) else None

    def state_word(self, node: str) -> str:
        st = self.state(node)
        return "DOWN" if st is None else f"{st['state']} {st['substatus']}"

    def command_on(self, node: str, name: str, **body: Any) -> str:
        reply = request(
            self.state_dir(node), "POST", f"/v1/commands/{name}", dict(body), timeout=120
        )
        return str(reply.get("message", ""))

    def vip_holders(self) -> set[str]:
        held = set()
        for node in NODES:
            r = self.lab.run(node, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=False)
            if f" {VIP}/" in r.stdout:
                held.add(node)
        return held

    def client_get(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """GET the demo application through the VIP from the client namespace."""
        code = (
            "import json,sys,urllib.request\n"
            f"r=urllib.request.urlopen('http://{VIP}:{DEMO_PORT}/',timeout={timeout})\n"
            "sys.stdout.write(r.read().decode())\n"
        )
        r = self.lab.run("client", [sys.executable, "-c", code], check=False, timeout=timeout + 10)
        if r.returncode != 0:
            return None
        import json

        try:
            out = json.loads(r.stdout)
        except ValueError:
            return None
        return out if isinstance(out, dict) else None

    def client_post(self, text: str, timeout: float = 5.0) -> dict[str, Any] | None:
        code = (
            "import json,sys,urllib.request\n"
            f"req=urllib.request.Request('http://{VIP}:{DEMO_PORT}/',data=sys.argv[1].encode())\n"
            f"r=urllib.request.urlopen(req,timeout={timeout})\n"
            "sys.stdout.write(r.read().decode())\n"
        )
        r = self.lab.run(
            "client", [sys.executable, "-c", code, text], check=False, timeout=timeout + 10
        )
        if r.returncode != 0:
            return None
        import json

        try:
            out = json.loads(r.stdout)
        except ValueError:
            return None
        return out if isinstance(out, dict) else None

    # ------------------------------------------------------------ waiting

    def describe(self) -> str:
        parts = []
        for node in NODES:
            st = self.state(node)
            parts.append(
                f"{node}: DOWN"
                if st is None
                else f"{node}: {st['state']} {st['substatus']} ({st['reason']})"
            )
        return "; ".join(parts)

    def wait_for(
        self, pred: Callable[[], bool], timeout: float, what: str, every: float = 0.1
    ) -> None:
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ControlError, OSError):
                if pred():
                    return
            if time.monotonic() > end:
                raise LabClusterError(
                    f"timed out after {timeout:.0f} s waiting for {what}; {self.describe()}"
                )
            time.sleep(every)

    def wait_state(
        self, node: str, state: str, timeout: float = 30, sub: str = "Ready", reason_has: str = ""
    ) -> dict[str, Any]:
        """Wait until ``node`` is ``state`` ``sub`` (and its reason contains ``reason_has``)."""
        seen: dict[str, Any] = {}

        def ok() -> bool:
            st = self.state(node)
            if st is None:
                return False
            seen.update(st)
            return bool(
                st["state"] == state and st["substatus"] == sub and reason_has in st["reason"]
            )

        what = f"{node} {state} {sub}" + (f" saying {reason_has!r}" if reason_has else "")
        self.wait_for(ok, timeout, what)
        return seen

    def first_start(self, timeout: float = 30) -> None:
        """Start both daemons, wait for both WAIT, run prim on node1, wait PRIM/SECOND."""
        for node in NODES:
            self.start_node(node)
        for node in NODES:
            self.wait_state(node, "WAIT", timeout, sub="NotReady", reason_has="first start")
        self.command_on("node1", "prim")
        self.wait_state("node1", "PRIM", timeout)
        self.wait_state("node2", "SECOND", timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
