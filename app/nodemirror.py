"""The mirror seam of a module runner: what the runner asks of replication.

How it works
    ``MirrorPort`` is what the runner's actions call: start as primary or as receiver, resync,
    generation updates, quarantine, stop, status. app/mirror/service.py's MirrorService is the
    real side; ``make_mirror`` builds it from the configuration (the module's replicated
    directories and replication settings, this node's and the peer's addresses on the
    replication network) and imports app.mirror only then. A module without replicated
    directories gets ``NoMirror``: always in sync, nothing to copy.

Exceptions
    None of its own. The real side raises the mirror's errors (app/mirror/errors.py); the
    runner turns any exception of an action into a failed action.

Known limits
    NoMirror keeps nothing in quarantine (it answers /dev/null).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from app.config import Config, Module


class MirrorPort(Protocol):
    """What the runner asks of replication (app/mirror/service.py's MirrorService)."""

    async def start_primary(self, generation: str) -> None: ...
    async def start_receiver(self) -> None: ...
    async def start_resync(self, role: Any, full: bool) -> None: ...
    def resync_state(self) -> Any: ...
    def mirror_state(self) -> Any: ...
    def set_generation(self, current: str) -> None: ...
    def peer_synced(self, current: str) -> None: ...
    async def quarantine(self, reason: str) -> Path: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


class NoMirror:
    """A module without replicated directories: always in sync, nothing to copy."""

    def __init__(self) -> None:
        self.role = "off"

    async def start_primary(self, generation: str) -> None:
        self.role = "primary"

    async def start_receiver(self) -> None:
        self.role = "secondary"

    async def start_resync(self, role: Any, full: bool) -> None:
        return None

    def resync_state(self) -> str:
        return "done" if self.role == "secondary" else "none"

    def mirror_state(self) -> str:
        return "connected" if self.role == "primary" else "off"

    def set_generation(self, current: str) -> None:
        return None

    def peer_synced(self, current: str) -> None:
        return None

    async def quarantine(self, reason: str) -> Path:
        return Path("/dev/null")

    async def stop(self) -> None:
        self.role = "off"

    def status(self) -> dict[str, Any]:
        return {"role": self.role, "dirs": 0, "note": "no replicated directory"}


def make_mirror(
    cfg: Config, m: Module, me: str, state_dir: Path, key: bytes, log: logging.Logger
) -> MirrorPort:
    if not m.replicated:
        return NoMirror()
    from app.mirror.service import MirrorService

    net = cfg.cluster.replication_network
    peer = cfg.cluster.peer_of(me).name
    svc: MirrorPort = MirrorService(
        dirs=[(r.path, r.exclude) for r in m.replicated],
        state_dir=state_dir,
        key=key,
        cluster=cfg.cluster.name,
        node=me,
        peer=peer,
        local_ip=net.addresses[me],
        peer_ip=net.addresses[peer],
        port=m.replication_port,
        ack_timeout_s=m.replication_timeout_ms / 1000,
        bandwidth_mbps=m.resync_bandwidth_mbps,
        log=log,
    )
    return svc
