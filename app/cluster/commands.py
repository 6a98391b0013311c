"""The admin commands in the decision core: which are allowed now, and what each one does.

Part of the decision core (core.py holds ``decide`` and its docstring the whole state machine).
Pure: no I/O, no clock. ``decide`` first checks a snapshot's ``command`` with ``check_command``
and then applies it with ``_apply_command``; the executor may call ``check_command`` alone to
refuse a command before it is queued.

An admin command that is not allowed raises ``IllegalCommand`` (nothing changes): the executor
reports it, drops the command and decides again without it.

Swap
    In a swap the primary stops its application (``stop_prim``) and only then tells the peer to
    take over (``_swap_out``); the peer takes over only from a primary that is WAIT and not
    Transient.

Exception tree
    ClusterError (errors.py)
     +-- CoreError
           +-- IllegalCommand   an admin command not allowed in this situation (says why)

Known limits: those of core.py.
"""

from __future__ import annotations

from app.cluster.actions import Action, Decision, SendToPeer
from app.cluster.errors import ClusterError
from app.cluster.generation import Origin
from app.cluster.snapshot import CoreConfig, Snapshot
from app.cluster.transitions import (
    _PRIMARY,
    _RUNNING,
    _enter_alone,
    _enter_second,
    _leave,
    _peer_active,
    _peer_text,
    _quarantine_needed,
    _relation,
    _script,
    _stay,
)
from app.cluster.vocabulary import Command, Goal, PeerRequest, Script, State, Sub


class CoreError(ClusterError):
    """Base of the decision core's errors."""


class IllegalCommand(CoreError):
    """An admin command that is refused here and now; the message says why."""


def check_command(snapshot: Snapshot, command: Command) -> None:
    """Raise ``IllegalCommand`` (saying why) if ``command`` is not allowed now."""
    s, p = snapshot, snapshot.peer
    st = s.state
    peer_primary = _peer_active(p) and p.state in _PRIMARY
    if command is Command.START and st is not State.STOP:
        raise IllegalCommand(f"start: the module is already started (state {st})")
    if command in (Command.STOP, Command.FORCESTOP, Command.STOPSTART) and st is State.STOP:
        raise IllegalCommand(f"{command}: the module is already stopped")
    if command is Command.RESTART and st not in _RUNNING:
        raise IllegalCommand(
            f"restart restarts the application, which runs only in ALONE, PRIM or SECOND "
            f"(state {st}): use start or stopstart"
        )
    if command is Command.SWAP:
        peer_second_ready = (
            _peer_active(p) and p.state is State.SECOND and (p.substatus is Sub.READY)
        )
        if st is State.PRIM and peer_second_ready and s.substatus is Sub.READY:
            return
        if (
            st is State.SECOND
            and s.substatus is Sub.READY
            and _peer_active(p)
            and (p.state is State.PRIM)
        ):
            return
        raise IllegalCommand(
            f"swap needs PRIM Ready and SECOND Ready (here {st} {s.substatus}, peer "
            f"{_peer_text(p)})"
        )
    if command in (Command.PRIM, Command.PRIMFORCE):
        if st in _PRIMARY:
            raise IllegalCommand(f"{command}: this node is already primary ({st})")
        if peer_primary:
            raise IllegalCommand(
                f"{command}: the peer is primary ({p.state}); run second here, or stop the "
                "peer first"
            )
        if command is Command.PRIM and s.generation.inconsistent:
            raise IllegalCommand(
                "prim: this node was stopped in the middle of a resync and its data is "
                "inconsistent; use primforce only if you accept this copy (the peer then gets "
                "a full resync)"
            )
    if command in (Command.SECOND, Command.SECOND_FULLSYNC):
        if not peer_primary:
            raise IllegalCommand(
                f"{command}: the peer must be primary (ALONE or PRIM), it is {_peer_text(p)}"
            )
        if st is State.SECOND and command is Command.SECOND:
            raise IllegalCommand("second: already SECOND; use second fullsync to copy again")


def _apply_command(s: Snapshot, cfg: CoreConfig, cmd: Command) -> Decision:
    st = s.state
    acts: tuple[Action, ...]
    if cmd is Command.START:
        acts = (
            _script(Script.TRANSITION, st, State.WAIT, "start"),
            _script(Script.PRESTART, st, State.WAIT, "start"),
        )
        return Decision(State.WAIT, Sub.TRANSIENT, acts, "WAIT: starting (prestart)")
    if cmd in (Command.STOP, Command.FORCESTOP, Command.STOPSTART):
        goal = Goal.STOPSTART if cmd is Command.STOPSTART else Goal.STOP
        acts = tuple(_leave(s, State.WAIT, str(cmd), force=cmd is Command.FORCESTOP))
        return Decision(State.WAIT, Sub.TRANSIENT, acts, f"WAIT: {cmd} requested", goal)
    if cmd is Command.RESTART:
        if st in _PRIMARY:
            acts = (
                _script(Script.STOP_PRIM, st, st, "restart"),
                _script(Script.START_PRIM, st, st, "restart"),
            )
        else:
            acts = (
                _script(Script.STOP_SECOND, st, st, "restart"),
                _script(Script.START_SECOND, st, st, "restart"),
            )
        # SECOND Transient means resynchronising: a SECOND keeps its sub-state here.
        sub = s.substatus if st is State.SECOND else Sub.TRANSIENT
        return Decision(st, sub, acts, f"{st}: restarting the application")
    if cmd is Command.SWAP:
        if st is State.SECOND:
            return _stay(
                s,
                "SECOND: swap requested; asking the primary to hand over",
                (SendToPeer(PeerRequest.SWAP),),
            )
        return _swap_out(s, "swap requested by the admin")
    if cmd in (Command.PRIM, Command.PRIMFORCE):
        why = "data inconsistent, forced" if s.generation.inconsistent else "forced by the admin"
        return _enter_alone(s, str(cmd), Origin.FORCED, f"ALONE: {cmd} ({why})")
    # second / second fullsync
    rel = _relation(s)
    full = cmd is Command.SECOND_FULLSYNC or rel is None or rel.full
    quarantine = _quarantine_needed(s, rel, "second forced by the admin")
    return _enter_second(
        s, str(cmd), full, f"SECOND: {cmd} requested; resynchronising from {cfg.peer}", quarantine
    )


def _swap_out(s: Snapshot, why: str) -> Decision:
    acts = _leave(s, State.WAIT, "swap")
    acts.append(SendToPeer(PeerRequest.TAKE_OVER))
    return Decision(
        State.WAIT,
        Sub.TRANSIENT,
        tuple(acts),
        f"WAIT: {why}; application stopped here, the peer takes over",
        Goal.SWAP,
    )
