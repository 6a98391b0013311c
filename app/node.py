"""The node daemon: one asyncio process that owns every task of this node.

How it works
    ``run_node`` finds which configured node this host is (by its admin address, or --node),
    takes the state directory's lock, and runs one ``ModuleRunner`` per module plus the API
    server in one task group: a crashed child stops the node loudly instead of leaving it half
    alive. Each runner owns its tasks: the heartbeat transport, the tick loop, the guardian
    feeder, the witness prober and the checkers.

    Each part has its own module: app/noderunner.py (``ModuleRunner``: one tick, one reason;
    admin commands; self-fencing), app/nodeapi.py (``Node``, the API's controller),
    app/nodemirror.py (the mirror seam), app/nodecheck.py (checkers), app/nodeevents.py (the
    event log, SQLite in the state directory). This module wires them together and re-exports
    their names, so ``from app.node import ...`` keeps working.

    SIGTERM and SIGINT make a clean stop of every module, then the API stops; SIGHUP is logged
    and ignored. Logs go to stderr and to mirrorha.log in the state directory.

Exceptions
    NodeError: this host is not one of the configured nodes, or the state directory is
    locked by another daemon; said before anything starts (exit status 2).

Known limits
    - The HTTP API is the local control socket plus the health probes; remote control, TLS and
      tokens come with the API issue.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from app import __version__
from app.api.server import serve_api
from app.config import Config, load_key
from app.control import socket_path
from app.nodeapi import Node as Node
from app.nodecheck import CheckerState as CheckerState
from app.nodecheck import run_check as run_check
from app.nodeevents import EventLog as EventLog
from app.nodemirror import MirrorPort as MirrorPort
from app.nodemirror import NoMirror as NoMirror
from app.nodemirror import make_mirror as make_mirror
from app.noderunner import STOP_SCRIPTS as STOP_SCRIPTS
from app.noderunner import ModuleRunner as ModuleRunner
from app.noderunner import Pending as Pending
from app.noderunner import RunnerState as RunnerState
from app.noderunner import Timing as Timing
from app.noderunner import self_command as self_command

log = logging.getLogger("mirrorha")


class NodeError(Exception):
    """The node cannot start; the message says why and what to do."""


def detect_node(cfg: Config) -> str:
    """The node whose admin address can be bound on this host."""
    found = []
    for n in cfg.cluster.nodes:
        fam = socket.AF_INET6 if ":" in n.admin else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            try:
                s.bind((n.admin, 0))
                found.append(n.name)
            except OSError:
                pass
    if len(found) != 1:
        addrs = ", ".join(f"{n.name} {n.admin}" for n in cfg.cluster.nodes)
        what = "none" if not found else "both"
        raise NodeError(
            f"cannot tell which node this host is: {what} of the admin addresses ({addrs}) "
            "is local; pass --node NAME"
        )
    return found[0]


def lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise NodeError(f"another daemon (pid {other or '?'}) already uses {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def setup_logging(state_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.handlers.clear()
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(state_dir / "mirrorha.log")):
        h.setFormatter(fmt)
        root.addHandler(h)


async def serve_node(cfg: Config, me: str, state_dir: Path, start: bool) -> None:
    key = load_key(cfg.cluster)
    events = EventLog(state_dir / "events.db")
    runners = {m.name: ModuleRunner(cfg, m, me, state_dir, key, events) for m in cfg.modules}
    node = Node(cfg, me, runners)
    stop_requested = asyncio.Event()
    api_down = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    # A stray SIGHUP (a closed terminal, a careless kill -HUP) must not end the node.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))
    admin = cfg.cluster.node(me).admin
    bind = (
        f"[{admin}]:{cfg.cluster.api_port}" if ":" in admin else f"{admin}:{cfg.cluster.api_port}"
    )
    log.info("mirrorha %s: node %s of cluster %s starting", __version__, me, cfg.cluster.name)

    async def stopper() -> None:
        await stop_requested.wait()
        log.info("stopping: clean stop of every module")
        await asyncio.gather(*(r.shutdown(60.0) for r in runners.values()))
        api_down.set()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(serve_api(node, socket_path(state_dir), bind, api_down), name="api")
            for r in runners.values():
                tg.create_task(r.run(start), name=f"module-{r.m.name}")
            tg.create_task(stopper(), name="stopper")
    finally:
        events.close()
        socket_path(state_dir).unlink(missing_ok=True)
    log.info("stopped")


def run_node(cfg: Config, state_dir: Path, node_name: str | None, start: bool) -> int:
    try:
        me = node_name or detect_node(cfg)
        if me not in {n.name for n in cfg.cluster.nodes}:
            names = ", ".join(n.name for n in cfg.cluster.nodes)
            raise NodeError(f"--node {me!r} is not a node of cluster {cfg.cluster.name} ({names})")
        lock = lock_state_dir(state_dir)
    except NodeError as exc:
        print(f"mirrorha: {exc}", file=sys.stderr)
        return 2
    setup_logging(state_dir)
    try:
        asyncio.run(serve_node(cfg, me, state_dir, start))
    except Exception as exc:
        errors = exc.exceptions if isinstance(exc, ExceptionGroup) else (exc,)
        for err in errors:
            log.critical("the node stops: %s: %s", type(err).__name__, err, exc_info=err)
        return 1
    finally:
        os.close(lock)
    return 0
