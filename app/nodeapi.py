"""The API's controller: this node's module runners as the HTTP API sees them.

How it works
    app/api/server.py serves a ``Node``: ``state`` gives every module runner's state,
    ``command`` submits an admin command to a module's runner and answers with the reason of
    the tick that decided it, ``verify_start`` and ``verify_status`` drive the mirror's
    background verify, ``healthy`` tells the health probes whether this node serves the
    module (PRIM or ALONE, READY). A module of None means the first configured module.

Exceptions
    NotFound (no such module or command) and Refused (the core refused the command, the
    module has no replicated directory, the mirror refused the verify), from
    app/api/server.py, which maps them to HTTP statuses.

Known limits
    The HTTP API is the local control socket plus the health probes; remote control, TLS and
    tokens come with the API issue.
"""

from __future__ import annotations

from typing import Any

from app import __version__
from app.api.server import NotFound, Refused
from app.cluster.core import Command, State, Sub
from app.config import Config
from app.noderunner import ModuleRunner


class Node:
    """The API's controller: every module runner of this node."""

    def __init__(self, cfg: Config, me: str, runners: dict[str, ModuleRunner]) -> None:
        self.cfg, self.me, self.runners = cfg, me, runners

    def runner(self, module: str | None) -> ModuleRunner:
        if module is None:
            return next(iter(self.runners.values()))
        if module not in self.runners:
            raise NotFound(
                f"no module {module!r} on this node (modules: {', '.join(self.runners)})"
            )
        return self.runners[module]

    def state(self) -> dict[str, Any]:
        return {
            "node": self.me,
            "cluster": self.cfg.cluster.name,
            "version": __version__,
            "modules": [r.state_dict() for r in self.runners.values()],
        }

    async def command(self, name: str, module: str | None, fullsync: bool) -> str:
        if name == "second" and fullsync:
            name = Command.SECOND_FULLSYNC.value
        try:
            cmd = Command(name)
        except ValueError:
            known = ", ".join(c.value for c in Command if c is not Command.SECOND_FULLSYNC)
            raise NotFound(f"no command {name!r} (commands: {known})") from None
        return await self.runner(module).submit(cmd)

    async def verify_start(self, module: str | None, rate_mbps: float) -> str:
        """Start a background verify of the module's replicated directories (verify.py)."""
        from app.mirror.errors import MirrorError

        r = self.runner(module)
        start = getattr(r.mirror, "start_verify", None)
        if start is None:
            raise Refused(f"module {r.m.name} has no replicated directory: nothing to verify")
        try:
            await start(rate_mbps)
        except MirrorError as exc:
            raise Refused(f"verify refused on {self.me}: {exc}") from None
        limit = f"at most {rate_mbps:g} Mbit/s" if rate_mbps > 0 else "no rate limit"
        return f"verify of module {r.m.name} started on {self.me} ({limit})"

    def verify_status(self, module: str | None) -> dict[str, Any]:
        r = self.runner(module)
        status = getattr(r.mirror, "verify_status", None)
        if status is None:
            raise Refused(f"module {r.m.name} has no replicated directory: nothing to verify")
        return {"module": r.m.name, "node": self.me, "role": r.mirror.status().get("role"),
                **status()}  # fmt: skip

    def healthy(self, module: str | None) -> tuple[bool, str]:
        r = self.runner(module)
        ok = r.s.state in (State.PRIM, State.ALONE) and r.s.substatus is Sub.READY
        return ok, f"{self.me} {r.s.state.value} {r.s.substatus.value}"
