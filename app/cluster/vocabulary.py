"""The words of the decision core: states, commands, peer requests, verdicts, goals, scripts.

Plain string enums (their values are what the heartbeat, the API and the scripts see), shared by
the snapshot (snapshot.py), the actions (actions.py) and the rules (core.py). Nothing here
decides anything: the transitions live in core.py.

Exceptions: none. Known limits: none; changing a value changes the wire and the API.
"""

from __future__ import annotations

import enum

__all__ = [
    "Command",
    "Goal",
    "Mirror",
    "PeerRequest",
    "Resync",
    "Script",
    "State",
    "Sub",
    "Verdict",
    "Witness",
]


class State(enum.StrEnum):
    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"


class Sub(enum.StrEnum):
    NOT_READY = "NotReady"
    TRANSIENT = "Transient"
    READY = "Ready"


class Command(enum.StrEnum):
    START = "start"
    STOP = "stop"
    FORCESTOP = "forcestop"
    RESTART = "restart"
    STOPSTART = "stopstart"
    SWAP = "swap"
    PRIM = "prim"
    PRIMFORCE = "primforce"
    SECOND = "second"
    SECOND_FULLSYNC = "second_fullsync"


class PeerRequest(enum.StrEnum):
    """Peer-to-peer coordination carried by the heartbeat's ``command`` field."""

    SWAP = "swap"  # sent by a SECOND Ready: please hand PRIM over to me
    TAKE_OVER = "take_over"  # sent by a primary that stopped its application for a swap


class Witness(enum.StrEnum):
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    UNKNOWN = "unknown"  # no answer yet


class Resync(enum.StrEnum):
    NONE = "none"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Mirror(enum.StrEnum):
    OFF = "off"
    CONNECTED = "connected"
    DROPPED = "dropped"  # the primary dropped a secondary that did not acknowledge in time
    DEGRADED = "degraded"  # replication itself fails on the primary


class Verdict(enum.StrEnum):
    RESTART = "restart"
    STOPSTART = "stopstart"
    WAIT = "wait"
    SWAP = "swap"
    STOP = "stop"


class Goal(enum.StrEnum):
    """What a multi-tick move is heading for (echoed back by the executor)."""

    NONE = "none"
    STOP = "stop"  # WAIT on the way to STOP
    STOPSTART = "stopstart"  # stop, then start again
    SWAP = "swap"  # this primary stopped for a swap; wait for the peer to take over
    RESUME = "resume"  # a primary paused (freeze, checker wait): may resume alone
    FAILED = "failed"  # a critical action failed: WAIT on the way to STOP
    LOST = "lost"  # a primary already reacted to losing its SECOND (new generation)


class Script(enum.StrEnum):
    PRESTART = "prestart"
    START_PRIM = "start_prim"
    STOP_PRIM = "stop_prim"
    START_SECOND = "start_second"
    STOP_SECOND = "stop_second"
    START_BOTH = "start_both"
    STOP_BOTH = "stop_both"
    POSTSTOP = "poststop"
    TRANSITION = "transition"
