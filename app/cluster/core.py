"""The decision core of a node: one snapshot in, one decision out. No I/O, no clock.

Rule 1: everything that affects state transitions lives here and in the two modules the rules
are split into: transitions.py (how a state is entered and left, what the snapshot says about
the peer) and commands.py (the admin commands: ``check_command``, ``CoreError``,
``IllegalCommand``, re-exported from here). This module holds ``decide`` and one handler per
state. The node daemon builds a frozen ``Snapshot`` every tick (the time is a number in it),
calls ``decide(snapshot, config)`` and runs the returned ``Decision.actions`` in order through
its adapters. ``decide`` reads nothing else. The words it decides with are plain data defined
next door and re-exported from here (import them from ``app.cluster.core`` as before): the enums
(State, Sub, Command, PeerRequest, Witness, Resync, Mirror, Verdict, Goal, Script) in
vocabulary.py, Snapshot/Peer/Checker/CoreConfig in snapshot.py, the actions, Outcome and
Decision in actions.py. None of them holds a rule.

States and sub-states (the reference product's words)
    STOP -> WAIT -> ALONE | PRIM | SECOND, each NotReady / Transient / Ready. Entering a state
    with actions gives Transient; the next tick whose previous actions all succeeded settles it
    (Ready; WAIT and STOP settle NotReady). SECOND stays Transient while it resynchronises.

How a tick is run (the executor's contract)
    1. Build the snapshot. ``goal`` is the ``Decision.goal`` of the previous tick, echoed back
       (the only memory the core keeps between ticks); ``last`` is the outcome of the previous
       tick's actions; ``last_tick`` the time the previous tick finished.
    2. ``decide``. An admin command that is not allowed raises ``IllegalCommand`` (nothing
       changes): report it, drop the command, decide again without it.
    3. Publish ``new_state``/``substatus`` (heartbeat, API) *before* running the actions, so the
       peer sees "WAIT Transient" while our application stops and holds off.
    4. Run the actions in order, each to completion. When an action whose ``critical`` is true
       fails, skip the rest and report it in the next snapshot's ``last``; other failures are
       reported and the batch goes on (a stop script that fails is followed by the rest of the
       stop). A ``RunScript`` of a stop script means the graceful call then the forced one
       (``scripts.run_stop``); ``force=True`` means the forced call only (forcestop).

Ordering rules the decisions guarantee
    The sequences that release and claim the VIP and start a new generation are built in
    transitions.py, whose docstring states their order; the swap hand-over is in commands.py.

Peer loss, witness, split brain
    A primary that loses the peer stays primary alone (ALONE, new generation) if the witness
    answers, or if no witness is configured; if the witness does not answer it releases the VIP,
    stops the application and waits. A SECOND Ready (its data is up to date) takes over
    ``takeover_delay`` seconds after the primary would have given up, under the same witness
    rule, only with failover on. A clean stop announced by the peer is acted on at once. Nodes
    that meet again compare generations (generation.py): the newer becomes or stays primary;
    between two primaries the one whose generation ranks lower (a failover beats nothing, a
    running primary beats a failover, then the preferred node, then the smaller name) gives way:
    it quarantines what it wrote and takes a full resync.

Witness answers
    ``Snapshot.witness`` is REACHABLE only if the witness answered every probe since the peer
    went silent: one failed probe during the silence makes it UNREACHABLE until the peer is heard
    again. Answers at different moments prove nothing: the peer may have reached the witness,
    gone ALONE and died while this node could not reach it (found by the pair simulator).

Exception tree (defined in commands.py)
    ClusterError (errors.py)
     +-- CoreError
           +-- IllegalCommand   an admin command not allowed in this situation (says why)

Known limits
    - A node without its peer and without proof that its data is current (it restarted, it was
      isolated, it is fresh, inconsistent or diverged) waits for the peer or for ``prim``.
    - The witness is asked only when the peer is lost: a running ALONE stays ALONE when the
      witness later stops answering.
    - Checker verdicts other than ``wait`` are events: the executor clears them once a decision
      has seen them, otherwise they are applied again on the next tick.
    - Without a witness a link cut gives two primaries (as the reference product); the
      divergence is resolved when they meet, the loser's writes go to quarantine.
"""

from __future__ import annotations

from dataclasses import replace

from app.cluster.actions import (
    Action,
    ClaimVip,
    Decision,
    MarkConsistent,
    MarkInconsistent,
    MarkPeerSynced,
    MarkPrimary,
    NewGeneration,
    Outcome,
    Quarantine,
    ReleaseVip,
    RunScript,
    SendToPeer,
    StartMirrorPrimary,
    StartReceiver,
    StartResync,
    StopMirror,
)
from app.cluster.commands import CoreError, IllegalCommand, _apply_command, _swap_out, check_command
from app.cluster.generation import Origin, Relation, origin_rank
from app.cluster.snapshot import Checker, CoreConfig, Peer, Snapshot
from app.cluster.transitions import (
    _PRIMARY,
    _RUNNING,
    _enter_alone,
    _enter_second,
    _leave,
    _lone_wait_reason,
    _lost_for,
    _peer_active,
    _peer_out_cleanly,
    _peer_text,
    _quarantine_needed,
    _relation,
    _script,
    _stay,
    _to_wait,
    _up_to_date_against,
    _winner_by_name,
    _witness_text,
)
from app.cluster.vocabulary import (
    Command,
    Goal,
    Mirror,
    PeerRequest,
    Resync,
    Script,
    State,
    Sub,
    Verdict,
    Witness,
)

# Re-exported: the rules' names are defined here and in commands.py; the others in
# vocabulary.py, snapshot.py and actions.py (see the module docstring).
# fmt: off
__all__ = [
    "Action", "Checker", "ClaimVip", "Command", "CoreConfig", "CoreError", "Decision", "Goal",
    "IllegalCommand", "MarkConsistent", "MarkInconsistent", "MarkPeerSynced", "MarkPrimary",
    "Mirror", "NewGeneration", "Outcome", "Peer", "PeerRequest", "Quarantine", "ReleaseVip",
    "Resync", "RunScript", "Script", "SendToPeer", "Snapshot", "StartMirrorPrimary",
    "StartReceiver", "StartResync", "State", "StopMirror", "Sub", "Verdict", "Witness",
    "check_command", "decide",
]
# fmt: on


_STOPPING = (Goal.STOP, Goal.STOPSTART, Goal.FAILED)


# ------------------------------------------------------------------ decide


def decide(snapshot: Snapshot, config: CoreConfig) -> Decision:
    """The one rule of the node: what to do now. Raises ``IllegalCommand`` for a bad command."""
    s, cfg = snapshot, config
    if s.command is not None:
        check_command(s, s.command)
        return _apply_command(s, cfg, s.command)
    if s.state is State.STOP:
        return _decide_stop(s)
    frozen = _freeze(s, cfg)
    if frozen is not None:
        return frozen
    failed = _after_failure(s, cfg)
    if failed is not None:
        return failed
    if s.goal in _STOPPING and s.state is State.WAIT:
        reason = (
            "STOP: stopped"
            if s.goal is not Goal.FAILED
            else ("STOP: stopped after a failed action (see the previous reason and the log)")
        )
        acts = (
            _script(Script.TRANSITION, State.WAIT, State.STOP, str(s.goal)),
            _script(Script.POSTSTOP, State.WAIT, State.STOP, str(s.goal)),
        )
        goal = Goal.STOPSTART if s.goal is Goal.STOPSTART else Goal.NONE
        return Decision(State.STOP, Sub.NOT_READY, acts, reason, goal)
    checked = _checkers(s, cfg)
    if checked is not None:
        return checked
    handler = {
        State.WAIT: _decide_wait,
        State.ALONE: _decide_alone,
        State.PRIM: _decide_prim,
        State.SECOND: _decide_second,
    }[s.state]
    return handler(s, cfg)


def _decide_stop(s: Snapshot) -> Decision:
    if s.goal is Goal.STOPSTART:
        acts = (
            _script(Script.TRANSITION, State.STOP, State.WAIT, "stopstart"),
            _script(Script.PRESTART, State.STOP, State.WAIT, "stopstart"),
        )
        return Decision(State.WAIT, Sub.TRANSIENT, acts, "WAIT: starting again (stopstart)")
    if s.vip_held:
        return _stay(s, "STOP: releasing a VIP still held", (ReleaseVip(),), sub=Sub.NOT_READY)
    reason = "STOP: stopped"
    if s.last is not None and not s.last.ok:
        reason = f"STOP: stopped; last action failed: {_failure_text(s.last)}"
    return _stay(s, reason, sub=Sub.NOT_READY)


def _failure_text(o: Outcome) -> str:
    what = o.failed
    name = what.name.value if isinstance(what, RunScript) else type(what).__name__
    return f"{name} {'timed out' if o.timed_out else 'failed'}" + (
        f" ({o.detail})" if o.detail else ""
    )


def _freeze(s: Snapshot, cfg: CoreConfig) -> Decision | None:
    """A node that did not tick for longer than the timeout may have been replaced."""
    if s.last_tick is None or s.state not in _RUNNING:
        return None
    gap = s.now - s.last_tick
    if gap <= cfg.heartbeat_timeout:
        return None
    reason = (
        f"WAIT: woke up after {gap:.1f} s without a tick (longer than the "
        f"{cfg.heartbeat_timeout:g} s timeout); application stopped until the peer is "
        "re-evaluated"
    )
    goal = Goal.RESUME if s.state in _PRIMARY else Goal.NONE
    return _to_wait(s, "stopwait", reason, goal)


def _after_failure(s: Snapshot, cfg: CoreConfig) -> Decision | None:
    o = s.last
    if o is None or o.ok or o.failed is None:
        return None
    f = o.failed
    text = _failure_text(o)
    if isinstance(f, ReleaseVip):
        # Stay WAIT Transient (the peer holds off) and retry the whole leave.
        return Decision(
            State.WAIT,
            Sub.TRANSIENT,
            tuple(_leave(s, State.WAIT, "stopwait")) or (ReleaseVip(),),
            f"WAIT: {text}; retrying",
            s.goal,
        )
    if isinstance(f, StartResync | StartReceiver) and s.state is State.SECOND:
        return None  # the SECOND handler retries the resync
    if s.goal in _STOPPING and s.state is State.WAIT:
        return None  # keep stopping
    if f.critical:
        why = (
            "rather than leaving a half-started primary"
            if s.state in _PRIMARY
            else "rather than retrying blindly"
        )
        return Decision(
            State.WAIT,
            Sub.TRANSIENT,
            tuple(_leave(s, State.WAIT, "stop")),
            f"WAIT: {text}; stopping the module {why}",
            Goal.FAILED,
        )
    return None


def _checkers(s: Snapshot, cfg: CoreConfig) -> Decision | None:
    waits = [c for c in s.checkers if c.verdict is Verdict.WAIT]
    if waits:
        c = waits[0]
        why = f"checker {c.name} says wait" + (f" ({c.detail})" if c.detail else "")
        if s.state is State.WAIT:
            return _stay(s, f"WAIT: {why}", goal=s.goal)
        goal = Goal.RESUME if s.state in _PRIMARY else Goal.NONE
        return _to_wait(s, "stopwait", f"WAIT: {why}; application stopped", goal)
    if s.state not in _PRIMARY:
        return None
    order = [Verdict.STOP, Verdict.STOPSTART, Verdict.SWAP, Verdict.RESTART]
    for verdict in order:
        for c in s.checkers:
            if c.verdict is not verdict:
                continue
            why = f"checker {c.name} asks {verdict}" + (f" ({c.detail})" if c.detail else "")
            if verdict is Verdict.RESTART:
                return replace(
                    _apply_command(s, cfg, Command.RESTART),
                    reason=f"{s.state}: {why}; restarting the application",
                )
            if verdict is Verdict.SWAP:
                p = s.peer
                if _peer_active(p) and p.state is State.SECOND and p.substatus is Sub.READY:
                    return _swap_out(s, why)
                continue  # no SECOND to swap with: ignored
            cmd = Command.STOP if verdict is Verdict.STOP else Command.STOPSTART
            return replace(_apply_command(s, cfg, cmd), reason=f"WAIT: {why}")
    return None


def _decide_wait(s: Snapshot, cfg: CoreConfig) -> Decision:
    p = s.peer
    if s.vip_held:
        return _stay(s, "WAIT: releasing a VIP still held", (ReleaseVip(),), s.goal, Sub.TRANSIENT)
    if _peer_active(p):
        return _wait_with_peer(s, cfg)
    if s.goal is Goal.RESUME:
        return _wait_resume(s, cfg)
    rel = _relation(s)
    if _peer_out_cleanly(p) and _up_to_date_against(rel, s.generation):
        return _enter_alone(
            s,
            "start",
            Origin.FAILOVER,
            f"ALONE: {cfg.peer} stopped cleanly and this node's data is at least as new",
        )
    return _stay(s, _lone_wait_reason(s))


def _wait_resume(s: Snapshot, cfg: CoreConfig) -> Decision:
    waited = s.now - s.since
    if waited < cfg.heartbeat_timeout:
        return _stay(
            s,
            f"WAIT: re-evaluating the peer ({waited:.1f} s of "
            f"{cfg.heartbeat_timeout:g} s) before resuming as primary",
            goal=Goal.RESUME,
        )
    if cfg.witness is not None and s.witness is not Witness.REACHABLE:
        return _stay(
            s,
            f"WAIT: peer absent and {_witness_text(cfg)} does not answer: not resuming as primary",
            goal=Goal.RESUME,
        )
    return _enter_alone(
        s,
        "start",
        Origin.PRIMARY,
        f"ALONE: peer still absent after {waited:.1f} s; resuming as primary",
    )


def _wait_with_peer(s: Snapshot, cfg: CoreConfig) -> Decision:
    p = s.peer
    rel = _relation(s)
    keep = Goal.SWAP if s.goal is Goal.SWAP else Goal.NONE
    if rel is None:
        return _stay(s, "WAIT: peer seen, its data generation not known yet", goal=keep)
    if p.state in _PRIMARY:
        if p.substatus is Sub.TRANSIENT:
            return _stay(s, f"WAIT: peer is starting as {p.state}", goal=keep)
        if rel is Relation.UNKNOWN:
            return _stay(s, "WAIT: neither copy can be trusted; run primforce on the one to keep")
        quarantine = _quarantine_needed(s, rel, f"{cfg.peer} is primary")
        return _enter_second(
            s,
            "start",
            rel.full or quarantine is not None,
            f"SECOND: {cfg.peer} is {p.state}; resynchronising ({rel.value})",
            quarantine,
        )
    if p.substatus is Sub.TRANSIENT:
        return _stay(s, f"WAIT: peer is {p.state} Transient (scripts running)", goal=keep)
    if p.state is State.SECOND:
        if s.goal is Goal.SWAP:
            return _stay(s, "WAIT: swap: waiting for the peer to take over", goal=Goal.SWAP)
        return _stay(s, "WAIT: peer is SECOND and takes over if its data allows")
    # Both wait.
    if rel.local_newer:
        return _enter_alone(
            s,
            "start",
            Origin.FAILOVER,
            f"ALONE: both nodes wait; this node has the newer data ({rel.value})",
        )
    if rel.peer_newer:
        return _stay(s, f"WAIT: {cfg.peer} has the newer data and becomes primary")
    if rel is Relation.EQUAL:
        if _winner_by_name(cfg):
            return _enter_alone(
                s,
                "start",
                Origin.FAILOVER,
                "ALONE: both nodes wait with the same data; this node is chosen",
            )
        return _stay(s, f"WAIT: both nodes wait with the same data; {cfg.peer} is chosen")
    if rel is Relation.DIVERGED:
        return _stay(
            s,
            "WAIT: the two copies diverged (both wrote); run prim on the node whose "
            "data you keep, the other keeps its changes in quarantine",
        )
    return _stay(
        s,
        "WAIT: first start (no data generation on either side): run prim on the "
        "node with the good data",
    )


def _split_brain(s: Snapshot, cfg: CoreConfig) -> Decision:
    """Both primary: one gives way (quarantine, full resync)."""
    p = s.peer
    rel = _relation(s)
    assert p.generation is not None and rel is not None
    if rel.local_newer:
        win = True
    elif rel.peer_newer:
        win = False
    else:
        mine, theirs = origin_rank(s.generation.origin), origin_rank(p.generation.origin)
        win = mine > theirs if mine != theirs else _winner_by_name(cfg)
    if win:
        return _stay(
            s,
            f"{s.state}: {cfg.peer} is also {p.state}; this node keeps primary "
            f"({rel.value}), the peer gives way",
        )
    return _enter_second(
        s,
        "stopstart",
        True,
        f"SECOND: split brain, {cfg.peer} is also {p.state} and wins ({rel.value}); this "
        "node's writes go to quarantine before a full resync",
        f"split brain with {cfg.peer}",
    )


def _decide_prim(s: Snapshot, cfg: CoreConfig) -> Decision:
    p = s.peer
    if _peer_active(p):
        if p.state in _PRIMARY:
            return _split_brain(s, cfg)
        if p.state is State.SECOND and p.substatus is Sub.READY:
            if s.mirror in (Mirror.DROPPED, Mirror.DEGRADED):
                return _go_alone_from_prim(s, f"the mirror {s.mirror}: {cfg.peer} dropped")
            if p.request is PeerRequest.SWAP and s.substatus is Sub.READY:
                return _swap_out(s, f"{cfg.peer} asks for a swap")
            return _stay(s, f"PRIM: replicating to {cfg.peer}")
        return _go_alone_from_prim(s, f"{cfg.peer} is {p.state} {p.substatus}")
    if _peer_out_cleanly(p):
        return _go_alone_from_prim(s, f"{cfg.peer} stopped cleanly")
    return _primary_lost_peer(s, cfg)


def _primary_lost_peer(s: Snapshot, cfg: CoreConfig) -> Decision:
    """A primary whose up-to-date SECOND went silent: stay alone if allowed, else wait."""
    lost = _lost_for(s)
    if cfg.witness is None:
        return _go_alone_from_prim(s, f"peer lost for {lost:.1f} s, no witness configured")
    if s.witness is Witness.REACHABLE:
        return _go_alone_from_prim(s, f"peer lost for {lost:.1f} s, {_witness_text(cfg)} answers")
    if s.witness is Witness.UNKNOWN and lost < cfg.heartbeat_timeout + cfg.takeover_delay / 2:
        return _stay(s, f"PRIM: peer lost for {lost:.1f} s; waiting for {_witness_text(cfg)}")
    return _to_wait(
        s,
        "stopwait",
        f"WAIT: peer lost for {lost:.1f} s and {_witness_text(cfg)} "
        "does not answer: isolated, application stopped",
    )


def _go_alone_from_prim(s: Snapshot, why: str) -> Decision:
    acts: list[Action] = [NewGeneration(Origin.PRIMARY)]
    if s.state is not State.ALONE:
        acts.append(_script(Script.TRANSITION, s.state, State.ALONE, "peerlost"))
    return Decision(State.ALONE, Sub.TRANSIENT, tuple(acts), f"ALONE: {why}; staying primary alone")


def _decide_alone(s: Snapshot, cfg: CoreConfig) -> Decision:
    p = s.peer
    rel = _relation(s)
    if not _peer_active(p) and not _peer_out_cleanly(p) and p.state is State.SECOND:
        # The peer was a SECOND: it may have finished its resync and consider itself up to
        # date (and take over), and our writes since then were replicated under the shared
        # generation. Treat the loss as a PRIM does: new generation, witness rule; once,
        # not on every tick (Goal.LOST remembers it until the peer is heard again).
        if s.goal is Goal.LOST:
            return _stay(s, f"ALONE: {cfg.peer} {_peer_text(p)}; primary alone", goal=Goal.LOST)
        d = _primary_lost_peer(s, cfg)
        if any(isinstance(a, NewGeneration) for a in d.actions):
            d = replace(d, goal=Goal.LOST)
        return d
    if not _peer_active(p):
        return _stay(
            s,
            f"ALONE: {cfg.peer} {_peer_text(p)}; primary alone"
            + (f", mirror {s.mirror}" if s.mirror is Mirror.DEGRADED else ""),
        )
    if p.state in _PRIMARY:
        return _split_brain(s, cfg)
    if p.state is State.SECOND and p.substatus is Sub.READY and rel is Relation.EQUAL:
        acts: tuple[Action, ...] = (
            MarkPeerSynced(),
            _script(Script.TRANSITION, State.ALONE, State.PRIM, "peerback"),
        )
        return Decision(State.PRIM, Sub.TRANSIENT, acts, f"PRIM: {cfg.peer} is SECOND Ready")
    if p.state is State.SECOND and p.substatus is Sub.TRANSIENT:
        full = rel is None or rel.full
        if s.resync in (Resync.NONE, Resync.FAILED):
            return _stay(
                s,
                f"ALONE: resynchronising {cfg.peer}" + (" (full)" if full else ""),
                (StartResync("source", full),),
            )
        return _stay(s, f"ALONE: {cfg.peer} resynchronising ({s.resync})")
    return _stay(s, f"ALONE: {cfg.peer} is {p.state} {p.substatus}")


def _decide_second(s: Snapshot, cfg: CoreConfig) -> Decision:
    p = s.peer
    active = _peer_active(p)
    rel = _relation(s)
    if s.substatus is Sub.TRANSIENT:
        if not active or p.state not in _PRIMARY:
            return _to_wait(
                s,
                "stopwait",
                f"WAIT: resync interrupted, {cfg.peer} is "
                f"{_peer_text(p)}; this copy is not up to date",
            )
        if s.resync is Resync.DONE and p.generation is not None:
            acts: tuple[Action, ...] = (
                MarkConsistent(p.generation),
                _script(Script.START_BOTH, State.SECOND, State.SECOND, "start"),
                _script(Script.START_SECOND, State.SECOND, State.SECOND, "start"),
            )
            return Decision(State.SECOND, Sub.READY, acts, f"SECOND: in sync with {cfg.peer}")
        if s.resync in (Resync.NONE, Resync.FAILED):
            full = rel is None or rel.full
            return _stay(
                s,
                f"SECOND: (re)starting the resync from {cfg.peer}",
                (StartReceiver(), StartResync("target", full)),
                sub=Sub.TRANSIENT,
            )
        return _stay(s, f"SECOND: resynchronising from {cfg.peer}", sub=Sub.TRANSIENT)
    # SECOND Ready: this copy is up to date.
    if active:
        if p.state in _PRIMARY:
            if rel is not None and rel.peer_newer:
                return _enter_second(
                    s,
                    "resync",
                    rel.full,
                    f"SECOND: {cfg.peer} went {p.state} ({rel.value}); resynchronising",
                )
            if (
                cfg.failback == cfg.node
                and p.state is State.PRIM
                and p.substatus is Sub.READY
                and s.substatus is Sub.READY
            ):
                return _stay(
                    s,
                    f"SECOND: preferred primary; asking {cfg.peer} to swap",
                    (SendToPeer(PeerRequest.SWAP),),
                )
            return _stay(s, f"SECOND: replicated from {cfg.peer}")
        if p.substatus is Sub.TRANSIENT:
            return _stay(s, f"SECOND: {cfg.peer} is {p.state} Transient; holding")
        if p.state is State.SECOND:
            return _to_wait(s, "stopwait", "WAIT: both nodes are SECOND; re-deciding")
        # Peer WAIT, not running its application.
        if p.request is PeerRequest.TAKE_OVER or cfg.failover:
            return _failover(s, cfg, f"{cfg.peer} is {p.state}")
        return _to_wait(
            s,
            "stopwait",
            f"WAIT: {cfg.peer} is {p.state} and failover is off; run prim to start here",
        )
    if _peer_out_cleanly(p):
        if cfg.failover:
            return _failover(s, cfg, f"{cfg.peer} stopped cleanly")
        return _to_wait(s, "stopwait", f"WAIT: {cfg.peer} stopped and failover is off")
    lost = _lost_for(s)
    if lost < cfg.heartbeat_timeout + cfg.takeover_delay:
        return _stay(s, f"SECOND: {cfg.peer} silent for {lost:.1f} s")
    if not cfg.failover:
        return _to_wait(
            s,
            "stopwait",
            f"WAIT: {cfg.peer} lost for {lost:.1f} s and failover is off; run prim to start here",
        )
    if cfg.witness is None:
        return _failover(s, cfg, f"{cfg.peer} lost for {lost:.1f} s, no witness configured")
    if s.witness is Witness.REACHABLE:
        return _failover(s, cfg, f"{cfg.peer} lost for {lost:.1f} s, {_witness_text(cfg)} answers")
    if s.witness is Witness.UNKNOWN:
        return _stay(
            s, f"SECOND: {cfg.peer} lost for {lost:.1f} s; waiting for {_witness_text(cfg)}"
        )
    return _to_wait(
        s,
        "stopwait",
        f"WAIT: {cfg.peer} lost for {lost:.1f} s and "
        f"{_witness_text(cfg)} does not answer: isolated",
    )


def _failover(s: Snapshot, cfg: CoreConfig, why: str) -> Decision:
    rel = _relation(s)
    if rel is not None and not _up_to_date_against(rel, s.generation):
        return _to_wait(
            s,
            "stopwait",
            f"WAIT: {why} but this copy is not up to date ({rel.value}); run prim if you are sure",
        )
    return _enter_alone(s, "failover", Origin.FAILOVER, f"ALONE: {why}; failover")
