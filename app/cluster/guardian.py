"""Self-fencing: a guardian process that takes the VIP and the application down with the daemon.

Why
    The kernel keeps an address and a process alive after the daemon that set them up has
    died or frozen. Meanwhile the peer stops hearing heartbeats and, after its timeout, takes
    the VIP and starts the application: two primaries. The guardian closes that window: it is
    a separate, tiny process that the daemon must keep feeding; when the feeding stops for
    longer than a deadline chosen *shorter than the peer's heartbeat timeout*, or the daemon
    dies, it removes the VIP, kills the application's process groups and runs an optional
    fence command, before the peer acts.

How it works
    ``GuardianClient.start()`` runs ``[python, -m, app.cluster.guardian, ...]`` (or any
    ``argv_prefix`` that ends in ``guardian_main``, e.g. ``[sys.executable, sys.argv[0],
    "guardian"]`` from the single-file build) in its own session and process group, so a
    SIGSTOP or a terminal signal sent to the daemon's group does not reach it. The two talk
    over a ``SOCK_SEQPACKET`` socket pair, one JSON datagram per message:

        daemon -> guardian  {"op": "feed", "vip": {"address", "prefix", "interface"} | null,
                             "pgids": [int, ...]}         every pulse: what to fence now
                            {"op": "stop"}                 clean shutdown, fence nothing
        guardian -> daemon  {"op": "ready"}                once, after start-up

    The guardian fences when
      - the channel reaches end-of-file or its parent pid changes (the daemon died: at once),
      - no feed arrived for ``deadline_s`` while there is something to fence (starvation:
        the daemon is frozen, SIGSTOPped, or its loop is stuck),
      - it receives SIGTERM (nobody would be left to fence on the daemon's behalf).
    Fencing: write the marker ``<state_dir>/guardian.fenced`` (first, so a daemon waking up
    mid-fence already sees it), remove the VIP (``vip.Vip.release``), SIGTERM each process
    group, SIGKILL what is left after ``kill_grace_s``, run the fence command, rewrite the
    marker with the full report (JSON), log every step to stderr and
    ``<state_dir>/guardian.log``, exit with status 2.

    A daemon that wakes up finds out through ``fenced()`` (the marker) and through ``feed()``
    raising ``GuardianFenced``; it must then consider the VIP and the application gone, and
    call ``start()`` again for a new guardian (which clears the marker).

    Feed what you are *about* to hold before acquiring it (the VIP spec before ``claim()``):
    releasing a VIP that is not there and killing a group that is gone are harmless.

Exception tree
    ClusterError (errors.py)
     +-- GuardianError     cannot start the guardian, or the channel to it is broken
          +-- GuardianFenced   the guardian has fenced (marker present)

Known limits
    - Detection relies on the socket (end-of-file needs every copy of the daemon's end closed:
      it is close-on-exec, but a plain ``fork()`` without exec would keep it open) and on a
      parent-pid poll every ``POLL_S``. PR_SET_PDEATHSIG is not used: it fires when the
      *thread* that spawned the guardian exits, which asyncio worker threads do.
    - SIGKILL of the guardian itself fences nothing; the daemon sees ``feed()`` fail and must
      stop. A frozen *host* freezes the guardian too (the peer's witness rule covers it).
    - Process groups are killed by number: a group that ended and whose number was reused
      before the fence would be hit. The daemon feeds live groups only, every pulse.
    - The deadline is measured with CLOCK_MONOTONIC inside the guardian.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import app
from app.cluster.errors import ClusterError

MARKER = "guardian.fenced"
LOG_FILE = "guardian.log"
POLL_S = 0.2
EXIT_STOPPED = 0
EXIT_FENCED = 2
MAX_MESSAGE = 65536

_log = logging.getLogger(__name__)


class GuardianError(ClusterError):
    """The guardian could not be started or the channel to it is broken."""


class GuardianFenced(GuardianError):
    """The guardian has fenced: the VIP and the application are gone."""


@dataclass(frozen=True, slots=True)
class VipSpec:
    address: str
    prefix: int
    interface: str


@dataclass(frozen=True, slots=True)
class FenceOrders:
    """What the guardian would fence right now."""

    vip: VipSpec | None = None
    pgids: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return self.vip is None and not self.pgids


def encode_feed(vip: VipSpec | None, pgids: Sequence[int]) -> bytes:
    body: dict[str, Any] = {"op": "feed", "vip": None, "pgids": [int(p) for p in pgids]}
    if vip is not None:
        body["vip"] = {"address": vip.address, "prefix": vip.prefix, "interface": vip.interface}
    return json.dumps(body).encode()


def decode_message(data: bytes) -> tuple[str, FenceOrders]:
    """Parse one datagram; raise ValueError on anything malformed."""
    msg = json.loads(data)
    if not isinstance(msg, dict) or msg.get("op") not in ("feed", "stop", "ready"):
        raise ValueError(f"unknown guardian message {data[:80]!r}")
    if msg["op"] != "feed":
        return str(msg["op"]), FenceOrders()
    vip = None
    if msg.get("vip") is not None:
        v = msg["vip"]
        vip = VipSpec(str(v["address"]), int(v["prefix"]), str(v["interface"]))
    pgids = tuple(int(p) for p in msg.get("pgids", []))
    return "feed", FenceOrders(vip, pgids)


# -- the daemon's side -------------------------------------------------------------------------


class GuardianClient:
    """Starts, feeds and stops the guardian (see the module docstring).

    ``start()`` blocks until the guardian says it is ready (at most ``ready_timeout_s``);
    ``feed()``, ``fenced()`` are non-blocking and safe on the event loop; ``stop()`` waits
    up to ``ready_timeout_s`` for the guardian to exit.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        deadline_s: float,
        *,
        kill_grace_s: float = 2.0,
        fence_command: Sequence[str] | None = None,
        fence_timeout_s: float = 30.0,
        argv_prefix: Sequence[str] | None = None,
        ready_timeout_s: float = 15.0,
        log: logging.Logger = _log,
    ) -> None:
        if deadline_s <= 0:
            raise GuardianError(f"guardian deadline must be positive, not {deadline_s}")
        self.state_dir = Path(state_dir)
        self.deadline_s = deadline_s
        self.kill_grace_s = kill_grace_s
        self.fence_command = list(fence_command) if fence_command else []
        self.fence_timeout_s = fence_timeout_s
        self.argv_prefix = list(argv_prefix or [sys.executable, "-m", "app.cluster.guardian"])
        self.ready_timeout_s = ready_timeout_s
        self.log = log
        self.marker = self.state_dir / MARKER
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self, fd: int) -> list[str]:
        args = [
            "--fd", str(fd),
            "--state-dir", str(self.state_dir),
            "--deadline", repr(self.deadline_s),
            "--kill-grace", repr(self.kill_grace_s),
            "--fence-timeout", repr(self.fence_timeout_s),
        ]  # fmt: skip
        if self.fence_command:
            args += ["--fence-command", json.dumps(self.fence_command)]
        return self.argv_prefix + args

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise GuardianError(f"guardian already running (pid {self._proc.pid})")
        self._close()
        report = self.fence_report()
        if report is not None:
            self.log.warning("previous guardian had fenced: %s", report.get("reason"))
            with contextlib.suppress(FileNotFoundError):
                self.marker.unlink()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        # where the app package lives (a checkout, a venv, or shiv's extracted site-packages)
        root = str(Path(app.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            with theirs:
                self._proc = subprocess.Popen(
                    self.argv(theirs.fileno()),
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                    env=env,
                )
        except OSError as exc:
            ours.close()
            raise GuardianError(f"cannot start the guardian: {exc}") from exc
        self._sock = ours
        ready, _, _ = select.select([ours], [], [], self.ready_timeout_s)
        data = ours.recv(MAX_MESSAGE) if ready else b""
        if data != b'{"op": "ready"}':
            self._kill()
            raise GuardianError(
                f"guardian did not get ready within {self.ready_timeout_s:g} s "
                f"(command: {' '.join(self.argv_prefix)})"
            )
        ours.setblocking(False)
        self.log.info("guardian started (pid %d, deadline %.1f s)", self._proc.pid, self.deadline_s)

    def feed(self, vip: VipSpec | None, pgids: Sequence[int]) -> None:
        """Tell the guardian what to fence from now on; also proves the daemon is alive."""
        if self._sock is None:
            raise GuardianError("guardian not started")
        if self.marker.exists():
            raise GuardianFenced(f"guardian has fenced: {self._reason()}")
        try:
            self._sock.send(encode_feed(vip, pgids))
        except OSError as exc:
            if self.fenced():
                raise GuardianFenced(f"guardian has fenced: {self._reason()}") from exc
            raise GuardianError(f"guardian channel broken: {exc}") from exc

    def fenced(self) -> bool:
        if self._proc is not None:
            self._proc.poll()  # reap it if it has exited
        return self.marker.exists()

    def fence_report(self) -> dict[str, Any] | None:
        try:
            report = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return {"reason": "unreadable marker"} if self.marker.exists() else None
        return report if isinstance(report, dict) else {"reason": str(report)}

    def _reason(self) -> str:
        report = self.fence_report()
        return str(report.get("reason")) if report else "unknown reason"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Clean shutdown: the guardian exits and fences nothing."""
        proc = self._proc
        if proc is None:
            return
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(b'{"op": "stop"}')
        try:
            proc.wait(self.ready_timeout_s)
        except subprocess.TimeoutExpired:
            self.log.error("guardian did not stop within %.1f s, killing it", self.ready_timeout_s)
            self._kill()
        self._close()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the guardian's side -----------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _group_alive(pgid: int) -> bool:
    """True if any process of the group is alive (not a zombie)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class Guardian:
    """The fencing process's loop and actions."""

    def __init__(
        self,
        sock: socket.socket,
        state_dir: Path,
        deadline_s: float,
        kill_grace_s: float,
        fence_command: list[str],
        fence_timeout_s: float,
        log: logging.Logger,
    ) -> None:
        self.sock = sock
        self.state_dir = state_dir
        self.deadline_s = deadline_s
        self.kill_grace_s = kill_grace_s
        self.fence_command = fence_command
        self.fence_timeout_s = fence_timeout_s
        self.log = log
        self.parent = os.getppid()
        self.orders = FenceOrders()

    def watch(self) -> str | None:
        """Wait until the daemon stops us (None) or fails (the reason to fence)."""
        last_feed = time.monotonic()
        starving_logged = False
        while True:
            ready, _, _ = select.select([self.sock], [], [], POLL_S)
            if ready:
                try:
                    data = self.sock.recv(MAX_MESSAGE)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return "the daemon is gone (guardian channel closed)"
                try:
                    op, orders = decode_message(data)
                except (ValueError, KeyError, TypeError) as exc:
                    self.log.error("ignoring malformed message: %s", exc)
                    continue
                if op == "stop":
                    return None
                if op == "feed":
                    if orders != self.orders:
                        self.log.info("guarding %s", _describe(orders))
                    self.orders = orders
                    last_feed = time.monotonic()
                    starving_logged = False
            if os.getppid() != self.parent:
                return f"the daemon is gone (parent {self.parent} exited)"
            starved = time.monotonic() - last_feed
            if starved > self.deadline_s:
                if not self.orders.empty:
                    return f"the daemon has not fed the guardian for {starved:.1f} s"
                if not starving_logged:
                    self.log.warning("daemon silent for %.1f s, nothing to fence", starved)
                    starving_logged = True

    def fence(self, reason: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "reason": reason,
            "time": time.time(),
            "orders": _describe(self.orders),
            "done": False,
        }
        self._write_marker(report)
        self.log.error("FENCING: %s; fencing %s", reason, _describe(self.orders))
        report["vip"] = self._release_vip()
        report["pgids"] = self._kill_groups()
        report["fence_command"] = self._run_fence_command(reason)
        report["done"] = True
        self._write_marker(report)
        self.log.error("fenced: %s", json.dumps(report))
        return report

    def _write_marker(self, report: dict[str, Any]) -> None:
        tmp = self.state_dir / (MARKER + ".tmp")
        try:
            tmp.write_text(json.dumps(report))
            os.replace(tmp, self.state_dir / MARKER)
        except OSError as exc:
            self.log.error("cannot write the fenced marker: %s", exc)

    def _release_vip(self) -> str:
        spec = self.orders.vip
        if spec is None:
            return "none"
        from app.cluster.vip import Vip

        try:
            Vip(spec.address, spec.prefix, spec.interface, log=self.log).release()
        except ClusterError as exc:
            self.log.error("VIP %s: %s", spec.address, exc)
            return f"failed: {exc}"
        return f"released {spec.address}/{spec.prefix} on {spec.interface}"

    def _kill_groups(self) -> dict[str, str]:
        own = os.getpgrp()
        targets = [p for p in dict.fromkeys(self.orders.pgids) if p > 1 and p != own]
        result = {str(p): "gone" for p in targets}
        alive = [p for p in targets if _group_alive(p)]
        for pgid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
                result[str(pgid)] = "terminated"
                self.log.error("sent SIGTERM to process group %d", pgid)
        deadline = time.monotonic() + self.kill_grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if _group_alive(p)]
        for pgid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
                result[str(pgid)] = "killed"
                self.log.error("sent SIGKILL to process group %d", pgid)
        return result

    def _run_fence_command(self, reason: str) -> str:
        if not self.fence_command:
            return "none"
        env = dict(os.environ, MIRRORHA_FENCE_REASON=reason)
        if self.orders.vip is not None:
            env["MIRRORHA_VIP"] = f"{self.orders.vip.address}/{self.orders.vip.prefix}"
        try:
            done = subprocess.run(
                self.fence_command,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.fence_timeout_s,
                start_new_session=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log.error("fence command failed: %s", exc)
            return f"failed: {exc}"
        for line in (done.stdout + done.stderr).decode(errors="replace").splitlines():
            self.log.error("[fence command] %s", line)
        return f"exit code {done.returncode}"


def _describe(orders: FenceOrders) -> str:
    if orders.empty:
        return "nothing"
    parts = []
    if orders.vip is not None:
        parts.append(f"VIP {orders.vip.address}/{orders.vip.prefix} on {orders.vip.interface}")
    if orders.pgids:
        parts.append("process groups " + ", ".join(map(str, orders.pgids)))
    return " and ".join(parts)


class _SafeStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr may be a pipe whose reader (the daemon) is dead: never fail on it."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _setup_log(state_dir: Path) -> logging.Logger:
    log = logging.getLogger("mirrorha.guardian")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s guardian[{os.getpid()}] %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [_SafeStreamHandler(sys.stderr)]
    with contextlib.suppress(OSError):
        handlers.append(logging.FileHandler(state_dir / LOG_FILE))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    logging.raiseExceptions = False
    return log


def guardian_main(argv: Sequence[str]) -> int:
    """Entry point of the guardian process (``python -m app.cluster.guardian`` or the CLI)."""
    parser = argparse.ArgumentParser(prog="mirrorha guardian")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--kill-grace", type=float, default=2.0)
    parser.add_argument("--fence-command", default="")
    parser.add_argument("--fence-timeout", type=float, default=30.0)
    args = parser.parse_args(list(argv))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    log = _setup_log(args.state_dir)
    sock = socket.socket(fileno=args.fd)
    fence_command = json.loads(args.fence_command) if args.fence_command else []
    guardian = Guardian(
        sock,
        args.state_dir,
        args.deadline,
        args.kill_grace,
        [str(a) for a in fence_command],
        args.fence_timeout,
        log,
    )
    try:
        sock.send(b'{"op": "ready"}')
        reason = guardian.watch()
    except _Terminated:
        reason = "the guardian received SIGTERM"
    except OSError as exc:
        reason = f"guardian channel failed: {exc}"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish fencing once started
    if reason is None:
        log.info("stopped cleanly, nothing fenced")
        return EXIT_STOPPED
    guardian.fence(reason)
    return EXIT_FENCED


if __name__ == "__main__":
    raise SystemExit(guardian_main(sys.argv[1:]))
