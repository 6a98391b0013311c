"""Two decision cores wired together in memory (h11's ConnectionPair, for a cluster).

A small simulator steps both nodes' ticks with injected time. Heartbeats go over a fake link
that can be cut (partition) or made to drop datagrams; a fake witness answers per node. The
actions each decision returns are executed on fake adapters: who holds the VIP, whose
application runs, each node's data generation, resyncs between the two.

After every step the safety rules are checked:
    - never two VIP holders, never two running applications (unless the scenario runs without a
      witness and the link is cut: the reference product's documented split brain);
    - a node never promotes itself (without an admin command) on data older than its peer's,
      inconsistent or never synchronised.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cluster.core import (
    Action,
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
    Witness,
    decide,
)
from app.cluster.generation import Generation, compare

TIMEOUT = 3.0
DELAY = 1.5
STEP = 0.5
RESYNC_TIME = 1.0
_ids = itertools.count(1)


def fresh_id() -> str:
    return f"{next(_ids):012x}"


@dataclass
class Heard:
    at: float
    state: State
    sub: Sub
    generation: Generation
    stopping: bool
    request: PeerRequest | None


@dataclass
class Node:
    name: str
    peer_name: str
    state: State = State.STOP
    sub: Sub = Sub.NOT_READY
    since: float = 0.0
    goal: Goal = Goal.NONE
    gen: Generation = field(default_factory=Generation)
    vip: bool = False
    app: bool = False
    mirror: str = "off"
    resync: Resync = Resync.NONE
    resync_role: str = ""
    resync_since: float = 0.0
    last: Outcome | None = None
    last_tick: float | None = None
    up: bool = True  # the server runs (a crash takes the VIP and the application with it)
    heard: Heard | None = None  # latest heartbeat from the peer
    request: PeerRequest | None = None  # latest peer-to-peer request received
    outbox: PeerRequest | None = None
    command: Command | None = None
    quarantined: int = 0
    was_primary: bool = False
    witness_missed: bool = False  # a witness probe failed since the peer went silent
    reasons: list[str] = field(default_factory=list)


class Pair:
    def __init__(self, witness: bool = True, failover: bool = True, failback: str = "stay"):
        self.now = 0.0
        self.a = Node("node1", "node2")
        self.b = Node("node2", "node1")
        self.cut = False  # heartbeat link between the nodes
        # Where the witness sits when the link is cut: with node1, node2, or reachable by
        # none. The topology rule: a witness can never be reached from both sides of a cut.
        self.witness_with: str | None = None
        self.witness_down = False
        self.witness = witness
        self.cfg = {
            n.name: CoreConfig(
                node=n.name,
                peer=n.peer_name,
                heartbeat_timeout=TIMEOUT,
                takeover_delay=DELAY,
                failover=failover,
                failback=failback,
                witness="198.18.1.254" if witness else None,
            )
            for n in (self.a, self.b)
        }
        self.drop_every = 0  # drop every n-th heartbeat (0: none)
        self._sent = 0

    def other(self, n: Node) -> Node:
        return self.b if n is self.a else self.a

    # ------------------------------------------------------------ one step

    def step(self, order: tuple[int, int] = (0, 1)) -> None:
        self.now += STEP
        for n in (self.a, self.b):
            self._heartbeat(n)
        self._progress_resync()
        nodes = (self.a, self.b)
        for i in order:
            if nodes[i].up:
                self.tick(nodes[i])
        self.check()

    def _heartbeat(self, n: Node) -> None:
        peer = self.other(n)
        if not n.up or not peer.up or self.cut:
            return
        self._sent += 1
        if self.drop_every and self._sent % self.drop_every == 0:
            return
        peer.heard = Heard(self.now, n.state, n.sub, n.gen, n.state is State.STOP, n.outbox)
        if n.outbox is not None:
            peer.request = n.outbox
            n.outbox = None

    def _progress_resync(self) -> None:
        a, b = self.a, self.b
        if self.cut or not (a.up and b.up):
            for n in (a, b):  # the resync session dies with the connection
                if n.resync is Resync.RUNNING:
                    n.resync = Resync.FAILED
                elif n.resync is Resync.DONE:
                    n.resync, n.resync_role = Resync.NONE, ""
            return
        roles = {a.resync_role, b.resync_role}
        both = a.resync is Resync.RUNNING and b.resync is Resync.RUNNING
        elapsed = self.now - max(a.resync_since, b.resync_since)
        if both and roles == {"source", "target"} and elapsed >= RESYNC_TIME:
            a.resync = b.resync = Resync.DONE

    def peer_view(self, n: Node) -> Peer:
        h = n.heard
        if h is None:
            return Peer()
        return Peer(
            seen=self.now - h.at <= TIMEOUT,
            state=h.state,
            substatus=h.sub,
            generation=h.generation,
            stopping=h.stopping,
            last_seen=h.at,
            request=n.request,
        )

    def snapshot(self, n: Node) -> Snapshot:
        peer = self.peer_view(n)
        answer = self.witness_answer(n)
        # As the daemon does: once a probe fails while the peer is silent, the witness counts as
        # unreachable until the peer is heard again (answers at different moments prove nothing).
        if peer.seen:
            n.witness_missed = False
        elif answer is Witness.UNREACHABLE:
            n.witness_missed = True
        if n.witness_missed and answer is Witness.REACHABLE:
            answer = Witness.UNREACHABLE
        return Snapshot(
            now=self.now,
            state=n.state,
            substatus=n.sub,
            since=n.since,
            generation=n.gen,
            peer=peer,
            command=n.command,
            goal=n.goal,
            witness=answer,
            resync=n.resync,
            vip_held=n.vip,
            last=n.last,
            last_tick=n.last_tick,
        )

    def witness_answer(self, n: Node) -> Witness:
        if not self.witness:
            return Witness.UNKNOWN
        if self.witness_down or (self.cut and self.witness_with != n.name):
            return Witness.UNREACHABLE
        return Witness.REACHABLE

    def partition(self, witness_with: Node | None) -> None:
        self.cut = True
        self.witness_with = None if witness_with is None else witness_with.name

    def tick(self, n: Node) -> Decision:
        snap = self.snapshot(n)
        try:
            d = decide(snap, self.cfg[n.name])
        except IllegalCommand as exc:
            n.reasons.append(f"refused: {exc}")
            n.command = None
            d = decide(replace(snap, command=None), self.cfg[n.name])
        by_admin = n.command is not None
        n.command = None
        n.request = None
        self._apply(n, d, snap, by_admin)
        return d

    def _apply(self, n: Node, d: Decision, snap: Snapshot, by_admin: bool) -> None:
        was_primary = n.was_primary = n.state in (State.ALONE, State.PRIM)
        before = n.gen
        if (d.new_state, d.substatus) != (n.state, n.sub):
            if d.new_state is not n.state:
                n.since = self.now
            n.state, n.sub = d.new_state, d.substatus
        n.goal = d.goal
        n.reasons.append(d.reason)
        for action in d.actions:
            self.run(n, action)
        n.last = Outcome(ok=True)
        n.last_tick = self.now
        if d.new_state in (State.ALONE, State.PRIM) and not was_primary and not by_admin:
            self.check_promotion(n, before)

    def run(self, n: Node, a: Action) -> None:
        match a:
            case ReleaseVip():
                n.vip = False
            case ClaimVip():
                assert n.mirror == "primary", "VIP claimed before the mirror serves"
                n.vip = True
            case RunScript(name=Script.START_PRIM):
                assert n.gen.primary, "application started before the crash marker"
                n.app = True
            case RunScript(name=Script.STOP_PRIM):
                n.app = False
            case RunScript():
                pass
            case StartMirrorPrimary():
                n.mirror = "primary"
            case StopMirror():
                n.mirror = "off"
                # A resync session is part of the mirror: it ends on both sides.
                for m in (n, self.other(n)):
                    if m.resync is not Resync.NONE:
                        m.resync, m.resync_role = Resync.NONE, ""
            case StartReceiver():
                n.mirror = "receiver"
            case StartResync(role=role):
                n.resync, n.resync_role, n.resync_since = Resync.RUNNING, role, self.now
            case NewGeneration(origin=origin):
                assert not n.app or n.was_primary, "new generation after the app started"
                n.gen = n.gen.started(fresh_id(), origin)
            case MarkInconsistent():
                n.gen = n.gen.marked_inconsistent()
            case MarkConsistent():
                # The adapter adopts the source's real generation (the resync carried it).
                src = self.other(n).gen
                assert n.resync is Resync.DONE
                n.gen = n.gen.adopted(src)
                n.resync, n.resync_role = Resync.NONE, ""
            case MarkPeerSynced():
                n.gen = n.gen.peer_synced()
                n.resync, n.resync_role = Resync.NONE, ""
            case MarkPrimary(primary=flag):
                n.gen = n.gen.with_primary(flag)
            case Quarantine():
                n.quarantined += 1
            case SendToPeer(request=req):
                n.outbox = req
            case _:
                raise AssertionError(f"unknown action {a!r}")

    # ------------------------------------------------------------ faults

    def crash(self, n: Node) -> None:
        """The server dies: VIP, application and mirror go with it; the disk stays."""
        n.up = False
        n.vip = n.app = False
        n.mirror = "off"
        n.resync, n.resync_role = Resync.NONE, ""
        n.heard = None

    def boot(self, n: Node, start: bool = True) -> None:
        n.up = True
        n.state, n.sub, n.since, n.goal = State.STOP, Sub.NOT_READY, self.now, Goal.NONE
        n.last = None
        n.last_tick = None
        n.witness_missed = False
        n.command = Command.START if start else None

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        tolerated = self.cut and not self.witness
        if not tolerated:
            assert not (self.a.vip and self.b.vip), self.story("two VIP holders")
            assert not (self.a.app and self.b.app), self.story("two running applications")
        for n in (self.a, self.b):
            if n.vip:
                assert n.state in (State.ALONE, State.PRIM), self.story(f"{n.name} VIP in {n}")

    def check_promotion(self, n: Node, before: Generation) -> None:
        peer = self.other(n)
        if self.cut and not self.witness:
            return  # the documented split brain without a witness
        assert not before.inconsistent and not before.fresh, self.story(
            f"{n.name} promoted itself on unusable data"
        )
        # The crash marker stands for writes never acknowledged: losing those is allowed.
        rel = compare(replace(before, primary=False), replace(peer.gen, primary=False))
        assert not rel.peer_newer, self.story(f"{n.name} promoted itself on stale data")
        if self.witness:
            assert rel.value != "diverged", self.story(f"{n.name} diverged with a witness")

    def story(self, what: str) -> str:
        tail = "\n".join(
            f"  {n.name}: {n.state} {n.sub} vip={n.vip} app={n.app} {n.reasons[-3:]}"
            for n in (self.a, self.b)
        )
        return f"t={self.now}: {what}\n{tail}"

    # ------------------------------------------------------------ helpers

    def run_for(self, seconds: float) -> None:
        for _ in range(int(seconds / STEP)):
            self.step()

    def states(self) -> tuple[tuple[State, Sub], tuple[State, Sub]]:
        return (self.a.state, self.a.sub), (self.b.state, self.b.sub)

    def primary(self) -> Node | None:
        holders = [n for n in (self.a, self.b) if n.vip]
        return holders[0] if len(holders) == 1 else None


def running_pair(**kw: object) -> Pair:
    """A fresh cluster brought to PRIM (node1) / SECOND (node2) the documented way."""
    pair = Pair(**kw)  # type: ignore[arg-type]
    pair.a.command = pair.b.command = Command.START
    pair.run_for(2)
    assert pair.a.state is State.WAIT and pair.b.state is State.WAIT
    assert "first start" in pair.a.reasons[-1]
    pair.a.command = Command.PRIM
    pair.run_for(6)
    assert pair.states() == ((State.PRIM, Sub.READY), (State.SECOND, Sub.READY))
    assert pair.a.gen.current == pair.b.gen.current
    return pair


READY_PAIR = ((State.PRIM, Sub.READY), (State.SECOND, Sub.READY))
SWAPPED = ((State.SECOND, Sub.READY), (State.PRIM, Sub.READY))


def test_first_start_waits_for_prim_then_pairs() -> None:
    pair = running_pair()
    assert pair.primary() is pair.a and pair.a.app and not pair.b.app


def test_kill_of_primary_fails_over_and_the_old_primary_returns_as_second() -> None:
    pair = running_pair()
    pair.crash(pair.a)
    pair.run_for(TIMEOUT + DELAY + 2)
    assert pair.b.state is State.ALONE and pair.primary() is pair.b
    assert "failover" in pair.b.reasons[-2] or "failover" in " ".join(pair.b.reasons[-6:])
    pair.boot(pair.a)
    pair.run_for(6)
    assert pair.states() == SWAPPED
    assert pair.a.gen.current == pair.b.gen.current and pair.a.quarantined == 0


def test_partition_with_the_witness_on_the_primary_side() -> None:
    pair = running_pair()
    pair.partition(witness_with=pair.a)
    pair.run_for(TIMEOUT + DELAY + 3)
    assert pair.a.state is State.ALONE and pair.b.state is State.WAIT
    assert "isolated" in " ".join(pair.b.reasons[-8:])
    pair.cut = False
    pair.run_for(6)
    assert pair.states() == READY_PAIR


def test_partition_with_the_witness_on_the_secondary_side() -> None:
    pair = running_pair()
    pair.partition(witness_with=pair.b)
    pair.run_for(TIMEOUT + DELAY + 3)
    assert pair.a.state is State.WAIT and pair.b.state is State.ALONE
    assert pair.primary() is pair.b
    pair.cut = False
    pair.run_for(6)
    assert pair.states() == SWAPPED


def test_both_isolated_both_wait_then_recover() -> None:
    pair = running_pair()
    pair.partition(witness_with=None)
    pair.run_for(TIMEOUT + DELAY + 3)
    assert pair.a.state is State.WAIT and pair.b.state is State.WAIT
    assert not pair.a.app and not pair.b.app and pair.primary() is None
    pair.cut = False
    pair.run_for(8)
    assert {pair.a.state, pair.b.state} == {State.PRIM, State.SECOND}
    assert pair.a.quarantined == pair.b.quarantined == 0


def test_no_witness_partition_splits_then_the_former_secondary_gives_way() -> None:
    pair = running_pair(witness=False)
    pair.cut = True
    pair.run_for(TIMEOUT + DELAY + 3)
    assert pair.a.state is State.ALONE and pair.b.state is State.ALONE  # documented split
    pair.cut = False
    pair.run_for(8)
    assert pair.states() == READY_PAIR
    assert pair.b.quarantined == 1 and pair.a.quarantined == 0


def test_clean_stop_of_the_primary_is_acted_on_at_once() -> None:
    pair = running_pair()
    pair.a.command = Command.STOP
    pair.run_for(2.5)  # far less than the heartbeat timeout
    assert pair.a.state is State.STOP
    assert pair.b.state is State.ALONE and pair.primary() is pair.b


def test_swap_exchanges_roles_and_back() -> None:
    pair = running_pair()
    pair.a.command = Command.SWAP
    pair.run_for(6)
    assert pair.states() == SWAPPED
    pair.a.command = Command.SWAP  # asked from the SECOND side this time
    pair.run_for(6)
    assert pair.states() == READY_PAIR


def test_failback_to_the_preferred_node() -> None:
    pair = running_pair(failback="node1")
    pair.crash(pair.a)
    pair.run_for(TIMEOUT + DELAY + 2)
    assert pair.primary() is pair.b
    pair.boot(pair.a)
    pair.run_for(12)
    assert pair.states() == READY_PAIR


def test_failover_off_the_secondary_waits() -> None:
    pair = running_pair(failover=False)
    pair.crash(pair.a)
    pair.run_for(TIMEOUT + DELAY + 2)
    assert pair.b.state is State.WAIT and "failover is off" in " ".join(pair.b.reasons)
    pair.b.command = Command.PRIM
    pair.step()
    pair.run_for(1)
    assert pair.b.state is State.ALONE


def test_stale_restart_waits_and_never_promotes_itself() -> None:
    pair = running_pair()
    pair.crash(pair.a)
    pair.run_for(TIMEOUT + DELAY + 2)
    assert pair.primary() is pair.b
    pair.crash(pair.b)  # double failure: node2 had the newest data
    pair.boot(pair.a)
    pair.run_for(20)
    assert pair.a.state is State.WAIT and "may not be up to date" in pair.a.reasons[-1]
    pair.boot(pair.b)
    pair.run_for(8)
    assert pair.states() == SWAPPED  # the newer side became primary when they met


def test_double_power_loss_the_crashed_primary_wins_when_they_meet() -> None:
    pair = running_pair()
    pair.crash(pair.a)
    pair.crash(pair.b)
    pair.boot(pair.b)
    pair.run_for(10)
    assert pair.b.state is State.WAIT  # alone, a node waits
    pair.boot(pair.a)
    pair.run_for(8)
    assert pair.states() == READY_PAIR


def test_stopped_mid_resync_needs_primforce_and_the_peer_gets_a_full_resync() -> None:
    pair = running_pair()
    pair.crash(pair.a)
    pair.run_for(TIMEOUT + DELAY + 2)
    pair.boot(pair.a)
    for _ in range(20):
        pair.step()
        if pair.a.state is State.SECOND and pair.a.gen.inconsistent:
            break
    assert pair.a.gen.inconsistent
    pair.crash(pair.b)
    pair.crash(pair.a)
    pair.boot(pair.a)
    pair.run_for(6)
    assert pair.a.state is State.WAIT and "primforce" in pair.a.reasons[-1]
    pair.a.command = Command.PRIM
    pair.step()
    assert "refused" in " ".join(pair.a.reasons[-3:]) and pair.a.state is State.WAIT
    pair.a.command = Command.PRIMFORCE
    pair.run_for(2)
    assert pair.a.state is State.ALONE
    pair.boot(pair.b)
    pair.run_for(8)
    assert pair.states() == READY_PAIR
    assert pair.b.quarantined == 1  # node2's divergent writes were kept


def test_lossy_link_never_breaks_the_rules() -> None:
    pair = running_pair()
    pair.drop_every = 3
    pair.run_for(30)
    assert pair.states() == READY_PAIR


# ------------------------------------------------------------ random faults

FAULTS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "crash_a",
                "crash_b",
                "boot_a",
                "boot_b",
                "cut_a",
                "cut_b",
                "cut_none",
                "heal",
                "witness_down",
                "witness_up",
                "swap_a",
                "swap_b",
                "stop_a",
                "start_a",
                "wait",
            ]
        ),
        st.integers(min_value=1, max_value=16),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FAULTS)
def test_random_faults_keep_the_safety_rules(faults: list[tuple[str, int, bool]]) -> None:
    pair = running_pair()
    for fault, steps, flip in faults:
        match fault:
            case "crash_a":
                pair.crash(pair.a)
            case "crash_b":
                pair.crash(pair.b)
            case "boot_a":
                if not pair.a.up:
                    pair.boot(pair.a)
            case "boot_b":
                if not pair.b.up:
                    pair.boot(pair.b)
            case "cut_a":
                pair.partition(witness_with=pair.a)
            case "cut_b":
                pair.partition(witness_with=pair.b)
            case "cut_none":
                pair.partition(witness_with=None)
            case "heal":
                pair.cut = False
            case "witness_down":
                pair.witness_down = True
            case "witness_up":
                pair.witness_down = False
            case "swap_a":
                pair.a.command = Command.SWAP
            case "swap_b":
                pair.b.command = Command.SWAP
            case "stop_a":
                pair.a.command = Command.STOP
            case "start_a":
                pair.a.command = Command.START
        for _ in range(steps):
            pair.step((1, 0) if flip else (0, 1))
    # Heal everything: the pair must find its way back, or wait for an admin, never both run.
    pair.cut = pair.witness_down = False
    pair.run_for(5)  # let a stop in progress finish
    for n in (pair.a, pair.b):
        if not n.up:
            pair.boot(n)
        elif n.state is State.STOP:
            n.command = Command.START
    pair.run_for(40)
    states = {pair.a.state, pair.b.state}
    assert states in ({State.PRIM, State.SECOND}, {State.WAIT}), pair.story("did not settle")


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_tick_order_does_not_matter_for_failover(order: tuple[int, int]) -> None:
    pair = running_pair()
    pair.crash(pair.a)
    for _ in range(20):
        pair.step(order)
    assert pair.primary() is pair.b


def test_cut_then_primary_crash_then_heal_does_not_promote_stale_data() -> None:
    """Found by Hypothesis: node1 goes ALONE during a cut (it reaches the witness), dies, the
    network heals; node2 now reaches the witness too, but missed it during the silence: it must
    wait, never fail over onto data older than node1's."""
    pair = running_pair()
    pair.partition(witness_with=pair.a)
    for _ in range(7):
        pair.step()
    pair.crash(pair.a)
    pair.step()
    pair.cut = False
    pair.run_for(20)
    assert pair.b.state is State.WAIT, pair.story("node2 failed over onto stale data")
    assert not pair.b.vip


def test_alone_primary_that_loses_its_fresh_second_starts_one_generation_and_settles() -> None:
    """Found in the lab: an ALONE node that lost a SECOND it had just resynced made a new
    generation on every tick and never left ALONE Transient."""
    pair = running_pair(witness=False)
    pair.crash(pair.a)
    pair.run_for(10)
    assert pair.b.state is State.ALONE
    pair.boot(pair.a)
    pair.run_for(20)
    assert pair.primary() is pair.b and pair.a.state is State.SECOND
    pair.crash(pair.a)  # the freshly resynced SECOND dies while b is PRIM or ALONE
    pair.run_for(10)
    gen = pair.b.gen.current
    pair.run_for(10)
    assert pair.b.state is State.ALONE and pair.b.sub is Sub.READY, pair.story("not settled")
    assert pair.b.gen.current == gen, pair.story("a new generation on every tick")


def test_cut_while_the_rejoined_second_finishes_its_resync_never_gives_two_primaries() -> None:
    """Found by Hypothesis: node1 crashes and rejoins as SECOND; a cut (witness with node1)
    falls between its resync finishing and node2 hearing of it. node1 takes over with the
    witness; node2, which lost a SECOND, must ask the witness too (and step down)."""
    pair = running_pair()
    pair.crash(pair.a)
    for _ in range(9):
        pair.step()
    pair.boot(pair.a)
    for _ in range(5):
        pair.step()
    pair.partition(witness_with=pair.a)
    for _ in range(9):
        pair.step()
    pair.run_for(10)
    assert not (pair.a.vip and pair.b.vip), pair.story("two VIP holders")
