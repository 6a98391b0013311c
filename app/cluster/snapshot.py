"""What the decision core is given: the frozen snapshot of one tick and the node's config.

The node daemon builds a ``Snapshot`` every tick (the time is a number in it, no clock is read
here or in core.py) and hands it with the ``CoreConfig`` to ``decide()``.

Exceptions: none (plain frozen data). Known limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.cluster.actions import Outcome
from app.cluster.generation import Generation
from app.cluster.vocabulary import (
    Command,
    Goal,
    Mirror,
    PeerRequest,
    Resync,
    State,
    Sub,
    Verdict,
    Witness,
)

__all__ = ["Checker", "CoreConfig", "Peer", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Peer:
    """What this node knows of the peer."""

    seen: bool = False  # a valid heartbeat within the heartbeat timeout
    state: State | None = None  # from its latest heartbeat
    substatus: Sub | None = None
    generation: Generation | None = None
    stopping: bool = False  # its latest heartbeat announced a clean stop (app and VIP down)
    last_seen: float | None = None  # time of its latest valid heartbeat (our clock)
    request: PeerRequest | None = None


@dataclass(frozen=True, slots=True)
class Checker:
    name: str
    verdict: Verdict
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    state: State
    substatus: Sub
    since: float  # when the current state was entered
    generation: Generation
    peer: Peer = field(default_factory=Peer)
    command: Command | None = None  # pending admin command
    goal: Goal = Goal.NONE  # previous Decision.goal
    witness: Witness = Witness.UNKNOWN
    resync: Resync = Resync.NONE  # the resync this node takes part in
    mirror: Mirror = Mirror.OFF
    vip_held: bool = False
    last: Outcome | None = None
    last_tick: float | None = None  # when the previous tick finished
    checkers: tuple[Checker, ...] = ()
    generation_problem: str | None = None  # generation file unusable: running as unknown


@dataclass(frozen=True, slots=True)
class CoreConfig:
    node: str
    peer: str
    heartbeat_timeout: float
    takeover_delay: float = 2.0  # extra silence a SECOND waits before taking over
    failover: bool = True
    failback: str = "stay"  # "stay" or the name of the preferred primary
    witness: str | None = None  # witness address(es) for reasons; None: not configured
