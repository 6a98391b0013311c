"""Application checkers of a module: one probe of a tcp, process or custom check.

How it works
    ``run_check`` makes one probe and answers (ok, what failed): tcp connects to
    ``host:port``; process runs ``pgrep -f PATTERN``; custom runs the command with /bin/sh and
    its exit status is the verdict. A probe is bounded by the check's interval, kept between
    0.2 s and 5 s. ``CheckerState`` holds a check's consecutive failures and verdict;
    ModuleRunner.checker_loop (app/noderunner.py) probes every interval, on a primary only
    (PRIM or ALONE, READY), and after the check's number of failures hands its verdict to the
    next tick.

Exceptions
    A refused connection, a failed command and a timeout are answers (False, why). An error
    starting pgrep or /bin/sh (OSError) passes through.

Known limits
    - Checkers: tcp, process (a command line pattern) and custom (a command whose exit status
      is the verdict); they run on the primary only.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from app.cluster import core


@dataclass
class CheckerState:
    failures: int = 0
    verdict: core.Verdict | None = None
    detail: str = ""


async def run_check(c: Any) -> tuple[bool, str]:
    """One checker probe: (ok, what failed)."""
    timeout = min(5.0, max(0.2, c.interval_s))
    if c.kind == "tcp":
        host, _, port = c.target.rpartition(":")
        try:
            _, w = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), timeout
            )
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
            return True, ""
        except (OSError, TimeoutError) as exc:
            return False, f"cannot connect to {c.target}: {exc or 'timeout'}"
    argv = ["pgrep", "-f", c.target] if c.kind == "process" else ["/bin/sh", "-c", c.target]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"{c.kind} check timed out"
    return rc == 0, "" if rc == 0 else f"{c.kind} check {c.target!r} failed (status {rc})"
