"""Application scripts: how mirrorha starts and stops the application it protects.

How it works
    The admin provides up to nine executables, found by name in a script directory (or given
    as a mapping name -> path): prestart, start_prim, stop_prim, start_second, stop_second,
    start_both, stop_both, poststop, transition. A missing script is a success: there is
    nothing to do for that step.

    Each is called as ``script CURRENT NEXT ACTION`` (for example ``start_prim WAIT PRIM
    start``), plus a fourth argument ``force`` on the second, forced call of a stop script
    (``run_stop()`` runs the graceful call, then the forced one, always both: the forced call
    must finish what the graceful one left; its result decides). Scripts run through asyncio
    subprocesses, never blocking the event loop, in their own session and process group, with
    stdin from /dev/null and stdout+stderr merged. Every output line is logged with the
    script's name; the last lines come back in ``ScriptResult.output_tail``.

    On timeout the script's whole process group gets SIGTERM, then SIGKILL after
    ``kill_grace_s``; the result says ``timed_out``.

Environment given to scripts (on top of the daemon's own environment)
    MIRRORHA_MODULE      module (application) name
    MIRRORHA_NODE        this node's name            MIRRORHA_PEER   the peer's name
    MIRRORHA_STATE       current state (STOP, WAIT, ALONE, PRIM, SECOND)
    MIRRORHA_NEXT_STATE  the state being entered     MIRRORHA_ACTION start/stop/stopstart/...
    MIRRORHA_SCRIPT      the script's name           MIRRORHA_FORCE  "1" on the forced call
    MIRRORHA_VIP         the VIP as address/prefix (empty if none)
    MIRRORHA_DIRS        replicated directories, colon-separated
    MIRRORHA_STATE_DIR   the daemon's state directory
    plus the user variables of the configuration (``script_env()`` builds the fixed part).

Tracking the application for fencing (the convention)
    The guardian must be able to kill the application if the daemon dies, so the runner
    remembers process groups:
    1. A start script (prestart, start_prim, start_second, start_both) runs as the leader of a
       new process group. Anything it leaves running in that group (``daemon &``,
       ``nohup daemon &``) is the application: ``app_pgids()`` returns that group while it has
       members.
    2. An application that leaves the group (``setsid``, a double-forking daemon) must be
       declared: the script writes its pid, one per line, to ``$MIRRORHA_STATE_DIR/app.pid``.
       ``app_pgids()`` adds the process group of every live pid listed there.
    A successful forced call of a stop script (and poststop) forgets the groups remembered
    for the matching start script (and removes app.pid when it forgets start_prim or
    start_both), so a recycled pgid is never fenced later.

Exception tree
    ClusterError (errors.py)
     +-- ScriptError   unknown script name, bad variable name: programming or config errors.
    A script that fails, cannot be executed or times out is not an exception: it is a
    ``ScriptResult`` with ``ok=False`` and the reason in ``output_tail``.

Known limits
    - A background process that keeps the script's stdout open is not waited for: once the
      script exits, its output is read for ``drain_s`` more, then left (redirect daemons'
      output, as with any init script).
    - Process-group tracking cannot see through a process that changes its group without
      writing app.pid; pid files are read as they are, a stale pid reused by another process
      would be fenced (the file is removed by the forced stop call's forgetting step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.cluster.errors import ClusterError

SCRIPT_NAMES = (
    "prestart",
    "start_prim",
    "stop_prim",
    "start_second",
    "stop_second",
    "start_both",
    "stop_both",
    "poststop",
    "transition",
)
START_SCRIPTS = ("prestart", "start_prim", "start_second", "start_both")
# the forced call of a stop script forgets the groups of these start scripts
FORGETS = {
    "stop_prim": ("start_prim",),
    "stop_second": ("start_second",),
    "stop_both": ("start_both",),
    "poststop": START_SCRIPTS,
}
APP_PID_FILE = "app.pid"
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ScriptError(ClusterError):
    """A script was named that does not exist in mirrorha's vocabulary, or bad variables."""


@dataclass(frozen=True, slots=True)
class ScriptResult:
    name: str
    ok: bool
    returncode: int | None  # None: not run (missing script) or could not be started
    timed_out: bool
    output_tail: tuple[str, ...]
    duration: float  # seconds
    forced: bool = False
    missing: bool = False


@dataclass(frozen=True, slots=True)
class StopResult:
    """The graceful and the forced call of a stop script; ``ok`` is the forced call's."""

    graceful: ScriptResult
    forced: ScriptResult

    @property
    def ok(self) -> bool:
        return self.forced.ok


def script_env(
    *,
    module: str,
    node: str,
    peer: str,
    vip: str | None,
    dirs: Sequence[str],
    state_dir: str | os.PathLike[str],
    user: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The fixed part of the scripts' environment plus the user variables of the config."""
    env = {
        "MIRRORHA_MODULE": module,
        "MIRRORHA_NODE": node,
        "MIRRORHA_PEER": peer,
        "MIRRORHA_VIP": vip or "",
        "MIRRORHA_DIRS": ":".join(dirs),
        "MIRRORHA_STATE_DIR": os.fspath(state_dir),
    }
    for key, value in (user or {}).items():
        if not _VAR_NAME.fullmatch(key):
            raise ScriptError(f"script variable {key!r} is not a valid environment name")
        if key.startswith("MIRRORHA_"):
            raise ScriptError(f"script variable {key!r}: the MIRRORHA_ prefix is reserved")
        env[key] = str(value)
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ScriptRunner:
    """Runs the application scripts (see the module docstring)."""

    def __init__(
        self,
        scripts: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
        env: Mapping[str, str],
        timeout_s: float,
        log: logging.Logger,
        *,
        stop_timeout_s: float | None = None,
        kill_grace_s: float = 5.0,
        tail_lines: int = 20,
        drain_s: float = 0.5,
    ) -> None:
        if isinstance(scripts, Mapping):
            unknown = sorted(set(scripts) - set(SCRIPT_NAMES))
            if unknown:
                raise ScriptError(f"unknown application script(s): {', '.join(unknown)}")
            self._paths = {name: Path(path) for name, path in scripts.items()}
        else:
            base = Path(scripts)
            self._paths = {name: base / name for name in SCRIPT_NAMES}
        self.env = dict(env)
        self.timeout_s = timeout_s
        self.stop_timeout_s = stop_timeout_s if stop_timeout_s is not None else timeout_s
        self.kill_grace_s = kill_grace_s
        self.tail_lines = tail_lines
        self.drain_s = drain_s
        self.log = log
        self._groups: dict[str, set[int]] = {}
        state_dir = self.env.get("MIRRORHA_STATE_DIR")
        self.pid_file = Path(state_dir) / APP_PID_FILE if state_dir else None

    def path(self, name: str) -> Path | None:
        if name not in SCRIPT_NAMES:
            raise ScriptError(f"unknown application script {name!r}")
        return self._paths.get(name)

    async def run(
        self, name: str, current_state: str, next_state: str, action: str, force: bool = False
    ) -> ScriptResult:
        path = self.path(name)
        started = time.monotonic()
        if path is None or not path.exists():
            self.log.debug("script %s: none configured, nothing to do", name)
            return ScriptResult(name, True, None, False, (), 0.0, force, missing=True)
        argv = [str(path), current_state, next_state, action] + (["force"] if force else [])
        env = dict(os.environ)
        env.update(self.env)
        env.update(
            MIRRORHA_STATE=current_state,
            MIRRORHA_NEXT_STATE=next_state,
            MIRRORHA_ACTION=action,
            MIRRORHA_SCRIPT=name,
            MIRRORHA_FORCE="1" if force else "",
        )
        tail: deque[str] = deque(maxlen=self.tail_lines)
        label = f"{name} force" if force else name
        self.log.info("script %s: %s", label, " ".join(argv[1:]))
        # Our own pipe rather than asyncio's: asyncio's Process.wait() also waits for its pipes
        # to close, which a daemon left running with the script's stdout would hold forever.
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            message = f"cannot execute {path}: {exc.strerror or exc}"
            self.log.error("script %s: %s", label, message)
            return ScriptResult(
                name, False, None, False, (message,), time.monotonic() - started, force
            )
        finally:
            os.close(write_fd)
        pgid = proc.pid  # leader of its own session and group
        if name in START_SCRIPTS:
            self._groups.setdefault(name, set()).add(pgid)
        stream = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream),
            open(read_fd, "rb", buffering=0),  # noqa: SIM115 - the transport closes it
        )
        reader = asyncio.create_task(self._read(stream, label, tail))
        timeout = self.stop_timeout_s if name.startswith("stop") else self.timeout_s
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            self.log.error("script %s: timed out after %.1f s, terminating", label, timeout)
            await self._terminate(proc, pgid)
        finally:
            if proc.returncode is None:  # cancelled: do not leave the script running
                _killpg(pgid, signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(reader), self.drain_s)
            except TimeoutError:
                self.log.debug("script %s: output still open after exit, not waiting", label)
            finally:
                reader.cancel()
                transport.close()
        rc = proc.returncode
        ok = rc == 0 and not timed_out
        if force and ok and name in FORGETS:
            self.forget(*FORGETS[name])
        duration = time.monotonic() - started
        if timed_out:
            tail.append(f"timed out after {timeout:g} s")
        self.log.log(
            logging.INFO if ok else logging.ERROR,
            "script %s: %s in %.1f s",
            label,
            "ok" if ok else ("timed out" if timed_out else f"failed with exit code {rc}"),
            duration,
        )
        return ScriptResult(name, ok, rc, timed_out, tuple(tail), duration, force)

    async def run_stop(
        self, name: str, current_state: str, next_state: str, action: str
    ) -> StopResult:
        """The graceful call, then always the forced one."""
        graceful = await self.run(name, current_state, next_state, action)
        forced = await self.run(name, current_state, next_state, action, force=True)
        return StopResult(graceful, forced)

    async def _read(self, stream: asyncio.StreamReader, label: str, tail: deque[str]) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # line longer than the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            tail.append(line)
            self.log.info("[%s] %s", label, line)

    async def _terminate(self, proc: asyncio.subprocess.Process, pgid: int) -> None:
        _killpg(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_grace_s)
        except TimeoutError:
            self.log.error("script: still running %.1f s after SIGTERM, killing", self.kill_grace_s)
        _killpg(pgid, signal.SIGKILL)  # also whatever it left behind in its group
        await proc.wait()

    # -- the application's process groups, for the guardian ------------------------------------

    def app_pgids(self) -> list[int]:
        """Live process groups that hold the application (see the module docstring)."""
        pgids = {pgid for groups in self._groups.values() for pgid in groups}
        for pid in self._declared_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgids.add(os.getpgid(pid))
        own = os.getpgrp()
        return sorted(p for p in pgids if p > 1 and p != own and _group_alive(p))

    def _declared_pids(self) -> list[int]:
        if self.pid_file is None:
            return []
        try:
            text = self.pid_file.read_text()
        except OSError:
            return []
        return [int(word) for word in text.split() if word.isdigit() and int(word) > 1]

    def forget(self, *start_scripts: str) -> None:
        """Stop tracking the groups of these start scripts (all, and app.pid, when none given)."""
        for name in start_scripts or START_SCRIPTS:
            self._groups.pop(name, None)
        app_pid_owner = {"start_prim", "start_both"} & set(start_scripts)
        if (not start_scripts or app_pid_owner) and self.pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
