"""How the decision core enters and leaves states, and what the snapshot says about the peer.

Part of the decision core (core.py holds ``decide`` and its docstring the whole state machine;
commands.py the admin commands). Pure: no I/O, no clock. These private helpers build the action
sequences every decision is made of, and read the snapshot: is the peer active or out cleanly,
how long has it been silent, how do the two copies of the data relate.

Sub-states
    Entering a state with actions gives Transient; the next tick whose previous actions all
    succeeded settles it (Ready; WAIT and STOP settle NotReady), see ``_stay``.

Ordering rules the sequences guarantee
    Leaving ALONE/PRIM releases the VIP first (``_leave``). The VIP is claimed only after
    ``StartMirrorPrimary`` succeeded, and ``NewGeneration`` comes before the application starts
    (``_enter_alone``).

Data relation
    ``_relation`` compares the generations (generation.py). The ``primary`` crash marker counts
    only for a node that is not running as primary right now (a live primary sets it on
    purpose). Writes the peer lacks are kept in quarantine before they are overwritten
    (``_quarantine_needed``).

Exceptions: none (nothing here raises). Known limits: those of core.py.
"""

from __future__ import annotations

from dataclasses import replace

from app.cluster.actions import (
    Action,
    ClaimVip,
    Decision,
    MarkInconsistent,
    MarkPrimary,
    NewGeneration,
    Quarantine,
    ReleaseVip,
    RunScript,
    StartMirrorPrimary,
    StartReceiver,
    StartResync,
    StopMirror,
)
from app.cluster.generation import Generation, Origin, Relation, compare
from app.cluster.snapshot import CoreConfig, Peer, Snapshot
from app.cluster.vocabulary import Goal, Script, State, Sub

_PRIMARY = (State.ALONE, State.PRIM)
_RUNNING = (State.ALONE, State.PRIM, State.SECOND)


def _script(name: Script, cur: State, nxt: State, action: str, force: bool = False) -> RunScript:
    return RunScript(name, cur, nxt, action, force)


def _leave(s: Snapshot, nxt: State, action: str, force: bool = False) -> list[Action]:
    """Stop what the current state runs, VIP first, and run the transition script."""
    cur = s.state
    acts: list[Action] = []
    if cur in _PRIMARY or s.vip_held:
        acts.append(ReleaseVip())
    if cur in _PRIMARY:
        acts.append(_script(Script.STOP_PRIM, cur, nxt, action, force))
    if cur is State.SECOND and s.substatus is not Sub.TRANSIENT:
        acts.append(_script(Script.STOP_SECOND, cur, nxt, action, force))
    both_ran = cur in _PRIMARY or (cur is State.SECOND and s.substatus is not Sub.TRANSIENT)
    if both_ran and (nxt in (State.WAIT, State.STOP) or cur in _PRIMARY):
        acts.append(_script(Script.STOP_BOTH, cur, nxt, action, force))
    if cur in _RUNNING:
        acts.append(StopMirror())
    if cur in _PRIMARY:
        acts.append(MarkPrimary(False))
    if cur is not nxt:
        acts.append(_script(Script.TRANSITION, cur, nxt, action))
    return acts


def _enter_alone(s: Snapshot, action: str, origin: Origin, reason: str) -> Decision:
    """From WAIT, STOP (after start scripts) or SECOND: become primary alone."""
    cur = s.state
    acts: list[Action] = []
    if cur is State.STOP:
        acts += [_script(Script.TRANSITION, cur, State.WAIT, "start")]
        acts += [_script(Script.PRESTART, cur, State.WAIT, "start")]
        cur = State.WAIT
    if cur is State.SECOND:
        if s.substatus is not Sub.TRANSIENT:
            acts.append(_script(Script.STOP_SECOND, cur, State.ALONE, action))
        acts.append(StopMirror())
    acts += [NewGeneration(origin), MarkPrimary(True), StartMirrorPrimary()]
    acts.append(_script(Script.TRANSITION, cur, State.ALONE, action))
    acts.append(ClaimVip())
    if not (s.state is State.SECOND and s.substatus is not Sub.TRANSIENT):
        acts.append(_script(Script.START_BOTH, cur, State.ALONE, action))
    acts.append(_script(Script.START_PRIM, cur, State.ALONE, action))
    return Decision(State.ALONE, Sub.TRANSIENT, tuple(acts), reason)


def _enter_second(
    s: Snapshot, action: str, full: bool, reason: str, quarantine: str | None = None
) -> Decision:
    """Become SECOND Transient: quarantine if needed, mark inconsistent, receive, resync."""
    acts: list[Action] = []
    cur = s.state
    if cur is State.STOP:
        acts += [_script(Script.TRANSITION, cur, State.WAIT, "start")]
        acts += [_script(Script.PRESTART, cur, State.WAIT, "start")]
    elif cur is not State.WAIT:
        acts += _leave(s, State.SECOND, action)
    elif s.vip_held:
        acts.append(ReleaseVip())
    if cur in (State.STOP, State.WAIT):
        acts.append(_script(Script.TRANSITION, State.WAIT, State.SECOND, action))
    if quarantine is not None:
        acts.append(Quarantine(quarantine))
    acts += [MarkInconsistent(), StartReceiver(), StartResync("target", full)]
    return Decision(State.SECOND, Sub.TRANSIENT, tuple(acts), reason)


def _to_wait(s: Snapshot, action: str, reason: str, goal: Goal = Goal.NONE) -> Decision:
    acts = _leave(s, State.WAIT, action)
    sub = (
        Sub.TRANSIENT
        if any(isinstance(a, RunScript) and a.name is not Script.TRANSITION for a in acts)
        else Sub.NOT_READY
    )
    return Decision(State.WAIT, sub, tuple(acts), reason, goal)


def _stay(
    s: Snapshot,
    reason: str,
    actions: tuple[Action, ...] = (),
    goal: Goal = Goal.NONE,
    sub: Sub | None = None,
) -> Decision:
    """Keep the state; a Transient state settles once the previous actions succeeded."""
    if sub is None:
        sub = s.substatus
        if sub is Sub.TRANSIENT and not actions and (s.last is None or s.last.ok):
            sub = Sub.NOT_READY if s.state in (State.WAIT, State.STOP) else Sub.READY
        if s.state in (State.WAIT, State.STOP) and sub is Sub.READY:
            sub = Sub.NOT_READY
    return Decision(s.state, sub, actions, reason, goal)


def _peer_active(p: Peer) -> bool:
    """The peer runs and did not announce a clean stop."""
    return p.seen and not p.stopping and p.state is not None and p.state is not State.STOP


def _peer_out_cleanly(p: Peer) -> bool:
    return p.stopping or (p.seen and p.state is State.STOP)


def _lost_for(s: Snapshot) -> float:
    ref = s.peer.last_seen if s.peer.last_seen is not None else s.since
    return max(0.0, s.now - ref)


def _witness_text(cfg: CoreConfig) -> str:
    return f"witness {cfg.witness}"


def _relation(s: Snapshot) -> Relation | None:
    """Our data against the peer's. The ``primary`` crash marker counts only for a node that
    is not running as primary right now (a live primary sets it on purpose)."""
    p = s.peer
    if p.generation is None:
        return None
    local, peer = s.generation, p.generation
    if s.state in _PRIMARY:
        local = replace(local, primary=False)
    if p.state in _PRIMARY:  # its latest heartbeat came from a live primary
        peer = replace(peer, primary=False)
    return compare(local, peer)


def _winner_by_name(cfg: CoreConfig) -> bool:
    """Tie-break between equals: the preferred node, else the smaller name. True: we win."""
    if cfg.failback in (cfg.node, cfg.peer):
        return cfg.failback == cfg.node
    return cfg.node < cfg.peer


def _lone_wait_reason(s: Snapshot) -> str:
    g = s.generation
    if s.generation_problem is not None:
        return (
            f"WAIT: generation file unusable ({s.generation_problem}); data treated as "
            "unknown: wait for the other server, or run prim if you are sure"
        )
    if g.inconsistent:
        return (
            "WAIT: data inconsistent (stopped during a resync): wait for the other server; "
            "only primforce starts this copy"
        )
    if g.fresh:
        return "WAIT: data never synchronised: run prim on the node with the good data"
    return (
        "WAIT: data may not be up to date; wait for the other server, or run prim if you are sure"
    )


def _up_to_date_against(rel: Relation | None, g: Generation) -> bool:
    return (
        rel is not None
        and not g.inconsistent
        and not g.fresh
        and (rel is Relation.EQUAL or rel.local_newer)
    )


def _peer_text(p: Peer) -> str:
    if p.stopping:
        return "stopped"
    if not p.seen or p.state is None:
        return "not seen"
    return f"{p.state} {p.substatus}"


def _quarantine_needed(s: Snapshot, rel: Relation | None, why: str) -> str | None:
    """Our data holds writes the peer lacks: keep them before they are overwritten."""
    if s.generation.inconsistent or s.generation.fresh:
        return None
    if rel is None or rel in (Relation.DIVERGED, Relation.UNKNOWN) or rel.local_newer:
        return f"{why}: this node's writes since generation {s.generation.current} kept"
    return None
