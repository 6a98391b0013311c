"""What the decision core asks for: actions as plain data, the decision, and how they went.

``decide()`` (core.py) returns a ``Decision``: the new state and sub-state, the ``actions`` to run
in order, one sentence of reason and the ``goal`` to echo back next tick. The node daemon runs
each action through an adapter; an action whose ``critical`` is true stops the batch when it
fails. The next snapshot carries an ``Outcome`` saying how the batch went.

Exceptions: none (plain frozen data). Known limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.cluster.generation import Generation, Origin
from app.cluster.vocabulary import Goal, PeerRequest, Script, State, Sub

__all__ = [
    "Action",
    "ClaimVip",
    "Decision",
    "MarkConsistent",
    "MarkInconsistent",
    "MarkPeerSynced",
    "MarkPrimary",
    "NewGeneration",
    "Outcome",
    "Quarantine",
    "ReleaseVip",
    "RunScript",
    "SendToPeer",
    "StartMirrorPrimary",
    "StartReceiver",
    "StartResync",
    "StopMirror",
]

_START_SCRIPTS = {Script.PRESTART, Script.START_PRIM, Script.START_SECOND, Script.START_BOTH}
_STOP_SCRIPTS = {Script.STOP_PRIM, Script.STOP_SECOND, Script.STOP_BOTH}


@dataclass(frozen=True, slots=True)
class RunScript:
    """``name CURRENT NEXT ACTION``; stop scripts: graceful then forced (forced only if force)."""

    name: Script
    current: State
    next: State
    action: str
    force: bool = False

    @property
    def critical(self) -> bool:
        return self.name in _START_SCRIPTS


@dataclass(frozen=True, slots=True)
class ClaimVip:
    critical = True


@dataclass(frozen=True, slots=True)
class ReleaseVip:
    critical = True


@dataclass(frozen=True, slots=True)
class StartMirrorPrimary:
    """Serve the replicated directories through the mount and replicate to the peer."""

    critical = True


@dataclass(frozen=True, slots=True)
class StopMirror:
    """Stop whichever side runs: the primary's mount or the SECOND's receiver."""

    critical = False


@dataclass(frozen=True, slots=True)
class StartReceiver:
    """SECOND side: accept the primary's operations and resync."""

    critical = True


@dataclass(frozen=True, slots=True)
class StartResync:
    """Take part in a resync; the pair copies everything if either side asks ``full``."""

    role: Literal["source", "target"]
    full: bool
    critical = True


@dataclass(frozen=True, slots=True)
class NewGeneration:
    """Start a new data generation (before the application writes as ALONE)."""

    origin: Origin
    critical = True


@dataclass(frozen=True, slots=True)
class MarkInconsistent:
    critical = True


@dataclass(frozen=True, slots=True)
class MarkConsistent:
    """The resync finished: adopt ``source`` (the peer's generation)."""

    source: Generation
    critical = True


@dataclass(frozen=True, slots=True)
class MarkPeerSynced:
    """The peer holds our current generation: the journal base is no longer needed."""

    critical = False


@dataclass(frozen=True, slots=True)
class MarkPrimary:
    """Persist the crash marker: set before the application starts as primary."""

    primary: bool

    @property
    def critical(self) -> bool:
        return self.primary


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Keep what this node wrote since the common generation in a dated folder, with a report."""

    reason: str
    critical = True


@dataclass(frozen=True, slots=True)
class SendToPeer:
    request: PeerRequest
    critical = False


Action = (
    RunScript
    | ClaimVip
    | ReleaseVip
    | StartMirrorPrimary
    | StopMirror
    | StartReceiver
    | StartResync
    | NewGeneration
    | MarkInconsistent
    | MarkConsistent
    | MarkPeerSynced
    | MarkPrimary
    | Quarantine
    | SendToPeer
)


@dataclass(frozen=True, slots=True)
class Decision:
    new_state: State
    substatus: Sub
    actions: tuple[Action, ...]
    reason: str
    goal: Goal = Goal.NONE


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the previous tick's actions went."""

    ok: bool
    failed: Action | None = None  # the first action that failed
    detail: str = ""
    timed_out: bool = False
