"""The decision core, one transition at a time (time injected, no sleeping)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.cluster.core import (
    Action,
    Checker,
    ClaimVip,
    Command,
    CoreConfig,
    Decision,
    Goal,
    IllegalCommand,
    MarkConsistent,
    MarkInconsistent,
    MarkPeerSynced,
    MarkPrimary,
    Mirror,
    NewGeneration,
    Outcome,
    Peer,
    PeerRequest,
    Quarantine,
    ReleaseVip,
    Resync,
    RunScript,
    Script,
    SendToPeer,
    Snapshot,
    StartMirrorPrimary,
    StartReceiver,
    StartResync,
    State,
    StopMirror,
    Sub,
    Verdict,
    Witness,
    check_command,
    decide,
)
from app.cluster.generation import Generation, Origin

G1, G2, G3 = "a1" * 6, "b2" * 6, "c3" * 6
CFG = CoreConfig(
    node="node1", peer="node2", heartbeat_timeout=3.0, takeover_delay=1.5, witness="198.18.1.254"
)
NOW = 100.0
SYNCED = Generation(current=G1)
LIVE_PRIMARY = Generation(current=G1, primary=True)


def snap(state: State, sub: Sub = Sub.READY, **kw: object) -> Snapshot:
    base = dict(
        now=NOW,
        state=state,
        substatus=sub,
        since=NOW - 50,
        generation=SYNCED,
        last=Outcome(ok=True),
        last_tick=NOW - 0.5,
    )
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def peer(state: State, sub: Sub = Sub.READY, gen: Generation = SYNCED, **kw: object) -> Peer:
    base = dict(seen=True, state=state, substatus=sub, generation=gen, last_seen=NOW - 0.5)
    base.update(kw)
    return Peer(**base)  # type: ignore[arg-type]


def lost(state: State, sub: Sub = Sub.READY, gen: Generation = SYNCED, ago: float = 10.0) -> Peer:
    return Peer(seen=False, state=state, substatus=sub, generation=gen, last_seen=NOW - ago)


def scripts(d: Decision) -> list[str]:
    return [
        a.name.value + (" force" if a.force else "") for a in d.actions if isinstance(a, RunScript)
    ]


def kinds(d: Decision) -> list[str]:
    return [a.name.value if isinstance(a, RunScript) else type(a).__name__ for a in d.actions]


def before(d: Decision, first: type | str, second: type | str) -> bool:
    names = kinds(d)
    f = first if isinstance(first, str) else first.__name__
    s = second if isinstance(second, str) else second.__name__
    return names.index(f) < names.index(s)


# ------------------------------------------------------------ start and stop


def test_start_goes_wait_transient_with_transition_then_prestart() -> None:
    d = decide(snap(State.STOP, Sub.NOT_READY, command=Command.START), CFG)
    assert (d.new_state, d.substatus) == (State.WAIT, Sub.TRANSIENT)
    assert scripts(d) == ["transition", "prestart"]
    a = d.actions[0]
    assert isinstance(a, RunScript) and (a.current, a.next, a.action) == (
        State.STOP,
        State.WAIT,
        "start",
    )


def test_first_start_both_wait_until_prim() -> None:
    s = snap(
        State.WAIT,
        Sub.NOT_READY,
        generation=Generation(),
        peer=peer(State.WAIT, Sub.NOT_READY, Generation()),
    )
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and "run prim" in d.reason and d.actions == ()


def test_wait_to_prim_order_transition_vip_start_both_start_prim() -> None:
    s = snap(State.WAIT, Sub.NOT_READY, generation=Generation(), command=Command.PRIM)
    d = decide(s, CFG)
    assert d.new_state is State.ALONE and d.substatus is Sub.TRANSIENT
    assert scripts(d) == ["transition", "start_both", "start_prim"]
    assert kinds(d)[:3] == ["NewGeneration", "MarkPrimary", "StartMirrorPrimary"]
    assert before(d, StartMirrorPrimary, ClaimVip) and before(d, ClaimVip, "start_prim")
    assert NewGeneration(Origin.FORCED) in d.actions


def test_transient_settles_ready_after_successful_actions() -> None:
    d = decide(snap(State.ALONE, Sub.TRANSIENT, peer=Peer()), CFG)
    assert (d.new_state, d.substatus, d.actions) == (State.ALONE, Sub.READY, ())
    d = decide(snap(State.WAIT, Sub.TRANSIENT, peer=Peer()), CFG)
    assert d.substatus is Sub.NOT_READY


def test_stop_from_prim_releases_vip_first_then_passes_wait_to_stop() -> None:
    s = snap(State.PRIM, generation=LIVE_PRIMARY, peer=peer(State.SECOND), command=Command.STOP)
    d = decide(s, CFG)
    assert (d.new_state, d.substatus, d.goal) == (State.WAIT, Sub.TRANSIENT, Goal.STOP)
    assert kinds(d)[0] == "ReleaseVip"
    assert scripts(d) == ["stop_prim", "stop_both", "transition"]
    assert before(d, "stop_prim", StopMirror) and MarkPrimary(False) in d.actions
    d2 = decide(snap(State.WAIT, Sub.TRANSIENT, goal=Goal.STOP), CFG)
    assert d2.new_state is State.STOP and scripts(d2) == ["transition", "poststop"]


def test_forcestop_runs_the_forced_stop_only() -> None:
    d = decide(snap(State.ALONE, command=Command.FORCESTOP), CFG)
    assert all(
        a.force for a in d.actions if isinstance(a, RunScript) and a.name is Script.STOP_PRIM
    )


def test_stopstart_stops_then_starts_again() -> None:
    d = decide(snap(State.SECOND, peer=peer(State.PRIM), command=Command.STOPSTART), CFG)
    assert d.goal is Goal.STOPSTART and scripts(d) == ["stop_second", "stop_both", "transition"]
    d = decide(snap(State.WAIT, Sub.TRANSIENT, goal=Goal.STOPSTART), CFG)
    assert d.new_state is State.STOP and d.goal is Goal.STOPSTART
    d = decide(snap(State.STOP, Sub.NOT_READY, goal=Goal.STOPSTART), CFG)
    assert d.new_state is State.WAIT and scripts(d) == ["transition", "prestart"]


def test_restart_restarts_the_application_in_place() -> None:
    d = decide(snap(State.PRIM, peer=peer(State.SECOND), command=Command.RESTART), CFG)
    assert d.new_state is State.PRIM and scripts(d) == ["stop_prim", "start_prim"]
    assert not any(isinstance(a, ReleaseVip) for a in d.actions)


# ------------------------------------------------------------ peer lost


def test_prim_peer_lost_witness_answers_goes_alone_with_new_generation() -> None:
    s = snap(
        State.PRIM,
        generation=LIVE_PRIMARY,
        peer=lost(State.SECOND, ago=3.1),
        witness=Witness.REACHABLE,
    )
    d = decide(s, CFG)
    assert d.new_state is State.ALONE and NewGeneration(Origin.PRIMARY) in d.actions
    assert d.reason == (
        "ALONE: peer lost for 3.1 s, witness 198.18.1.254 answers; staying primary alone"
    )
    assert not any(isinstance(a, ReleaseVip) for a in d.actions)


def test_prim_isolated_releases_vip_and_waits() -> None:
    s = snap(
        State.PRIM, generation=LIVE_PRIMARY, peer=lost(State.SECOND), witness=Witness.UNREACHABLE
    )
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and kinds(d)[0] == "ReleaseVip"
    assert "isolated" in d.reason


def test_prim_waits_briefly_for_an_unknown_witness_then_gives_up() -> None:
    s = snap(State.PRIM, peer=lost(State.SECOND, ago=3.2), witness=Witness.UNKNOWN)
    assert decide(s, CFG).new_state is State.PRIM
    s = snap(State.PRIM, peer=lost(State.SECOND, ago=3.9), witness=Witness.UNKNOWN)
    assert decide(s, CFG).new_state is State.WAIT


def test_prim_no_witness_configured_goes_alone() -> None:
    cfg = replace(CFG, witness=None)
    d = decide(snap(State.PRIM, peer=lost(State.SECOND)), cfg)
    assert d.new_state is State.ALONE and "no witness" in d.reason


def test_second_failover_order_stop_second_transition_start_prim() -> None:
    s = snap(
        State.SECOND, peer=lost(State.PRIM, gen=LIVE_PRIMARY, ago=4.6), witness=Witness.REACHABLE
    )
    d = decide(s, CFG)
    assert d.new_state is State.ALONE and "failover" in d.reason
    assert scripts(d) == ["stop_second", "transition", "start_prim"]
    assert NewGeneration(Origin.FAILOVER) in d.actions
    assert before(d, NewGeneration, "start_prim") and before(d, StartMirrorPrimary, ClaimVip)


def test_second_waits_out_the_takeover_delay() -> None:
    s = snap(State.SECOND, peer=lost(State.PRIM, ago=4.0), witness=Witness.REACHABLE)
    d = decide(s, CFG)
    assert d.new_state is State.SECOND and "silent for 4.0 s" in d.reason


def test_second_isolated_waits() -> None:
    s = snap(State.SECOND, peer=lost(State.PRIM), witness=Witness.UNREACHABLE)
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and "isolated" in d.reason


def test_second_failover_off_waits() -> None:
    s = snap(State.SECOND, peer=lost(State.PRIM), witness=Witness.REACHABLE)
    d = decide(s, replace(CFG, failover=False))
    assert d.new_state is State.WAIT and "failover is off" in d.reason


def test_second_resyncing_never_takes_over() -> None:
    s = snap(
        State.SECOND,
        Sub.TRANSIENT,
        generation=SYNCED.marked_inconsistent(),
        peer=lost(State.ALONE),
        witness=Witness.REACHABLE,
        resync=Resync.RUNNING,
    )
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and "not up to date" in d.reason


def test_clean_peer_stop_is_acted_on_at_once() -> None:
    p = replace(peer(State.STOP, Sub.NOT_READY, SYNCED), stopping=True)
    d = decide(snap(State.SECOND, peer=p, witness=Witness.UNREACHABLE), CFG)
    assert d.new_state is State.ALONE
    d = decide(snap(State.PRIM, peer=p), CFG)
    assert d.new_state is State.ALONE and "stopped cleanly" in d.reason


def test_second_holds_while_primary_stops_its_application() -> None:
    d = decide(snap(State.SECOND, peer=peer(State.WAIT, Sub.TRANSIENT)), CFG)
    assert d.new_state is State.SECOND


# ------------------------------------------------------------ peer back, resync


def test_returning_node_resyncs_then_alone_becomes_prim() -> None:
    alone = Generation(
        current=G2, history=(G1,), journal_base=G1, primary=True, origin=Origin.FAILOVER
    )
    s = snap(State.WAIT, Sub.NOT_READY, generation=SYNCED, peer=peer(State.ALONE, gen=alone))
    d = decide(s, CFG)
    assert (d.new_state, d.substatus) == (State.SECOND, Sub.TRANSIENT)
    assert kinds(d)[-3:] == ["MarkInconsistent", "StartReceiver", "StartResync"]
    assert StartResync("target", False) in d.actions
    # The ALONE side serves the resync, then turns PRIM when the SECOND is Ready.
    src = snap(
        State.ALONE,
        generation=alone,
        peer=peer(State.SECOND, Sub.TRANSIENT, SYNCED.marked_inconsistent()),
    )
    d = decide(src, CFG)
    assert StartResync("source", False) in d.actions
    d = decide(replace(s, state=State.SECOND, substatus=Sub.TRANSIENT, resync=Resync.DONE), CFG)
    assert d.new_state is State.SECOND and d.substatus is Sub.READY
    assert MarkConsistent(alone) in d.actions and scripts(d) == ["start_both", "start_second"]
    synced = alone.peer_synced()
    d = decide(
        replace(src, peer=peer(State.SECOND, gen=Generation(current=G2, history=(G1,)))), CFG
    )
    assert d.new_state is State.PRIM and MarkPeerSynced() in d.actions
    assert synced.journal_base is None


def test_crashed_primary_returning_gets_a_full_resync() -> None:
    alone = Generation(current=G2, history=(G1,), journal_base=G1, origin=Origin.FAILOVER)
    s = snap(State.WAIT, Sub.NOT_READY, generation=LIVE_PRIMARY, peer=peer(State.ALONE, gen=alone))
    d = decide(s, CFG)
    assert StartResync("target", True) in d.actions
    assert not any(isinstance(a, Quarantine) for a in d.actions)


def test_resync_failure_is_retried() -> None:
    s = snap(State.SECOND, Sub.TRANSIENT, peer=peer(State.ALONE), resync=Resync.FAILED)
    d = decide(s, CFG)
    assert d.substatus is Sub.TRANSIENT and StartReceiver() in d.actions


def test_both_isolated_then_network_back_equal_data_picks_one() -> None:
    s = snap(State.WAIT, Sub.NOT_READY, peer=peer(State.WAIT, Sub.NOT_READY))
    assert decide(s, CFG).new_state is State.ALONE  # node1 < node2
    assert decide(s, replace(CFG, node="node2", peer="node1")).new_state is State.WAIT
    # A preferred node wins the tie.
    assert decide(s, replace(CFG, failback="node2")).new_state is State.WAIT


def test_both_waiting_the_newer_data_wins() -> None:
    newer = Generation(current=G2, history=(G1,), journal_base=G1)
    s = snap(State.WAIT, Sub.NOT_READY, generation=newer, peer=peer(State.WAIT, Sub.NOT_READY))
    assert decide(s, replace(CFG, node="node9")).new_state is State.ALONE
    s = snap(State.WAIT, Sub.NOT_READY, peer=peer(State.WAIT, Sub.NOT_READY, newer))
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and "newer data" in d.reason


def test_both_waiting_diverged_waits_for_the_admin() -> None:
    a = Generation(current=G2, history=(G1,))
    b = Generation(current=G3, history=(G1,))
    d = decide(
        snap(State.WAIT, Sub.NOT_READY, generation=a, peer=peer(State.WAIT, Sub.NOT_READY, b)), CFG
    )
    assert d.new_state is State.WAIT and "diverged" in d.reason


def test_split_brain_without_witness_the_former_secondary_gives_way() -> None:
    mine = Generation(
        current=G3, history=(G1,), journal_base=G1, primary=True, origin=Origin.FAILOVER
    )
    theirs = Generation(
        current=G2, history=(G1,), journal_base=G1, primary=True, origin=Origin.PRIMARY
    )
    d = decide(snap(State.ALONE, generation=mine, peer=peer(State.ALONE, gen=theirs)), CFG)
    assert (d.new_state, d.substatus) == (State.SECOND, Sub.TRANSIENT)
    assert kinds(d)[0] == "ReleaseVip" and before(d, "stop_prim", Quarantine)
    assert before(d, Quarantine, MarkInconsistent) and StartResync("target", True) in d.actions
    d = decide(snap(State.ALONE, generation=theirs, peer=peer(State.ALONE, gen=mine)), CFG)
    assert d.new_state is State.ALONE and "gives way" in d.reason


def test_stale_node_alone_waits_with_the_reason_and_prim_forces_it() -> None:
    s = snap(State.WAIT, Sub.NOT_READY, peer=Peer())
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and "may not be up to date" in d.reason
    d = decide(replace(s, command=Command.PRIM), CFG)
    assert d.new_state is State.ALONE and NewGeneration(Origin.FORCED) in d.actions


def test_inconsistent_node_refuses_prim_and_accepts_primforce() -> None:
    s = snap(State.WAIT, Sub.NOT_READY, generation=SYNCED.marked_inconsistent(), peer=Peer())
    assert "primforce" in decide(s, CFG).reason
    with pytest.raises(IllegalCommand, match="primforce"):
        decide(replace(s, command=Command.PRIM), CFG)
    d = decide(replace(s, command=Command.PRIMFORCE), CFG)
    assert d.new_state is State.ALONE


def test_unusable_generation_file_is_named_and_never_promoted() -> None:
    s = snap(
        State.WAIT,
        Sub.NOT_READY,
        generation=Generation(),
        peer=Peer(),
        generation_problem="/var/lib/mirrorha/generation.json: is not valid JSON",
    )
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and "generation.json" in d.reason


# ------------------------------------------------------------ commands


@pytest.mark.parametrize(
    ("state", "sub", "p", "command", "why"),
    [
        (State.PRIM, Sub.READY, peer(State.SECOND), Command.START, "already started"),
        (State.STOP, Sub.NOT_READY, Peer(), Command.STOP, "already stopped"),
        (State.WAIT, Sub.NOT_READY, Peer(), Command.RESTART, "runs only"),
        (State.WAIT, Sub.NOT_READY, peer(State.ALONE), Command.PRIM, "peer is primary"),
        (State.ALONE, Sub.READY, Peer(), Command.PRIM, "already primary"),
        (State.WAIT, Sub.NOT_READY, Peer(), Command.SECOND, "must be primary"),
        (State.SECOND, Sub.READY, peer(State.PRIM), Command.SECOND, "fullsync"),
        (State.PRIM, Sub.READY, peer(State.SECOND, Sub.TRANSIENT), Command.SWAP, "swap needs"),
        (State.ALONE, Sub.READY, Peer(), Command.SWAP, "swap needs"),
    ],
)
def test_illegal_commands_say_why_and_change_nothing(
    state: State, sub: Sub, p: Peer, command: Command, why: str
) -> None:
    s = snap(state, sub, peer=p, command=command)
    with pytest.raises(IllegalCommand, match=why):
        check_command(s, command)
    with pytest.raises(IllegalCommand, match=why):
        decide(s, CFG)


def test_second_fullsync_copies_everything_again() -> None:
    s = snap(State.SECOND, peer=peer(State.PRIM), command=Command.SECOND_FULLSYNC)
    d = decide(s, CFG)
    assert d.substatus is Sub.TRANSIENT and StartResync("target", True) in d.actions
    assert not any(isinstance(a, Quarantine) for a in d.actions)


def test_second_on_a_diverged_primary_quarantines_first() -> None:
    mine = Generation(current=G3, history=(G1,), primary=True)
    theirs = Generation(current=G2, history=(G1,))
    s = snap(
        State.ALONE, generation=mine, peer=peer(State.ALONE, gen=theirs), command=Command.SECOND
    )
    d = decide(s, CFG)
    assert d.new_state is State.SECOND and before(d, Quarantine, MarkInconsistent)


def test_swap_stop_prim_completes_before_the_peer_is_told() -> None:
    s = snap(State.PRIM, peer=peer(State.SECOND), command=Command.SWAP)
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and d.goal is Goal.SWAP
    assert kinds(d)[0] == "ReleaseVip" and kinds(d)[-1] == "SendToPeer"
    assert before(d, "stop_prim", SendToPeer)
    # The waiting old primary does not take PRIM back while the peer takes over.
    w = snap(State.WAIT, Sub.NOT_READY, goal=Goal.SWAP, peer=peer(State.SECOND))
    assert decide(w, CFG).new_state is State.WAIT
    # The SECOND takes over from a WAIT peer that asked it to.
    sec = snap(State.SECOND, peer=peer(State.WAIT, Sub.NOT_READY, request=PeerRequest.TAKE_OVER))
    assert decide(sec, replace(CFG, failover=False)).new_state is State.ALONE


def test_swap_from_the_second_asks_the_primary() -> None:
    s = snap(State.SECOND, peer=peer(State.PRIM), command=Command.SWAP)
    d = decide(s, CFG)
    assert d.new_state is State.SECOND and d.actions == (SendToPeer(PeerRequest.SWAP),)
    p = snap(State.PRIM, peer=peer(State.SECOND, request=PeerRequest.SWAP))
    assert decide(p, CFG).goal is Goal.SWAP


def test_failback_preferred_node_asks_for_the_swap_once_ready() -> None:
    s = snap(State.SECOND, peer=peer(State.PRIM))
    assert SendToPeer(PeerRequest.SWAP) in decide(s, replace(CFG, failback="node1")).actions
    assert decide(s, CFG).actions == ()


# ------------------------------------------------------------ failures, checkers, freeze


def test_failed_start_prim_stops_the_module_with_a_reason() -> None:
    failed = Outcome(
        ok=False,
        failed=RunScript(Script.START_PRIM, State.WAIT, State.ALONE, "start"),
        detail="exit 1",
    )
    d = decide(snap(State.ALONE, Sub.TRANSIENT, last=failed, vip_held=True), CFG)
    assert d.new_state is State.WAIT and d.goal is Goal.FAILED
    assert "start_prim failed (exit 1)" in d.reason and kinds(d)[0] == "ReleaseVip"
    d = decide(snap(State.WAIT, Sub.TRANSIENT, goal=Goal.FAILED), CFG)
    assert d.new_state is State.STOP and "failed" in d.reason


def test_failed_vip_release_is_retried_and_keeps_transient() -> None:
    failed = Outcome(ok=False, failed=ReleaseVip(), detail="netlink error")
    d = decide(snap(State.WAIT, Sub.TRANSIENT, last=failed, vip_held=True), CFG)
    assert d.substatus is Sub.TRANSIENT and kinds(d)[0] == "ReleaseVip"


def test_checker_verdicts_map_to_actions() -> None:
    def with_checker(verdict: Verdict, state: State = State.PRIM) -> Decision:
        c = Checker("app-port", verdict, "connect refused")
        other = State.SECOND if state is State.PRIM else State.PRIM
        return decide(snap(state, peer=peer(other), checkers=(c,)), CFG)

    assert scripts(with_checker(Verdict.RESTART)) == ["stop_prim", "start_prim"]
    assert with_checker(Verdict.STOPSTART).goal is Goal.STOPSTART
    assert with_checker(Verdict.STOP).goal is Goal.STOP
    assert with_checker(Verdict.SWAP).goal is Goal.SWAP
    d = with_checker(Verdict.WAIT)
    assert d.new_state is State.WAIT and d.goal is Goal.RESUME and "app-port" in d.reason
    assert with_checker(Verdict.RESTART, State.SECOND).actions == ()  # primary-only checkers


def test_paused_primary_resumes_alone_once_the_peer_is_re_evaluated() -> None:
    s = snap(
        State.WAIT,
        Sub.NOT_READY,
        goal=Goal.RESUME,
        since=NOW - 1,
        peer=lost(State.SECOND),
        witness=Witness.REACHABLE,
    )
    assert decide(s, CFG).new_state is State.WAIT
    d = decide(replace(s, since=NOW - 4), CFG)
    assert d.new_state is State.ALONE
    assert decide(replace(s, since=NOW - 4, witness=Witness.UNREACHABLE), CFG).new_state is (
        State.WAIT
    )


def test_wake_up_after_a_freeze_releases_the_vip_and_waits() -> None:
    s = snap(State.ALONE, peer=Peer(), last_tick=NOW - 20, vip_held=True)
    d = decide(s, CFG)
    assert d.new_state is State.WAIT and kinds(d)[0] == "ReleaseVip"
    assert "woke up after 20.0 s" in d.reason and d.goal is Goal.RESUME
    sec = decide(snap(State.SECOND, peer=Peer(), last_tick=NOW - 20), CFG)
    assert sec.new_state is State.WAIT and sec.goal is Goal.NONE


def test_prim_drops_a_secondary_the_mirror_gave_up_on() -> None:
    d = decide(snap(State.PRIM, peer=peer(State.SECOND), mirror=Mirror.DROPPED), CFG)
    assert d.new_state is State.ALONE and NewGeneration(Origin.PRIMARY) in d.actions


def test_nothing_but_wait_and_stop_holds_the_vip() -> None:
    d = decide(snap(State.WAIT, Sub.NOT_READY, vip_held=True), CFG)
    assert d.actions == (ReleaseVip(),)
    d = decide(snap(State.STOP, Sub.NOT_READY, vip_held=True), CFG)
    assert d.actions == (ReleaseVip(),)


def test_critical_flags() -> None:
    crit: list[Action] = [
        ClaimVip(),
        ReleaseVip(),
        StartMirrorPrimary(),
        MarkPrimary(True),
        RunScript(Script.START_PRIM, State.WAIT, State.ALONE, "start"),
    ]
    assert all(a.critical for a in crit)
    assert not RunScript(Script.STOP_PRIM, State.PRIM, State.WAIT, "stop").critical
    assert not MarkPrimary(False).critical
