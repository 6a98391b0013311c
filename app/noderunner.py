"""The module runner: one module of this node, its tick loop and its tasks.

How it works
    Each ``ModuleRunner`` owns its tasks: the heartbeat transport, the tick loop, the guardian
    feeder, the witness prober and the checkers; ``run`` starts them in one task group.
    ``Timing`` derives every period from the module's pulse and timeout.

    One tick, one reason: every ``tick_s`` the runner takes a frozen ``core.Snapshot``, calls
    the pure ``core.decide`` and executes the returned actions in order through the adapters
    (scripts, VIP, mirror, generation store, heartbeat), as the executor contract at the top of
    app/cluster/core.py says. The state is published to the peer before the actions run. The
    last reason is kept for `state`, the API and the event log (app/nodeevents.py).

    Admin commands arrive through the API: ``submit`` checks them at once against the current
    snapshot (an illegal command answers why and changes nothing), then queues them; the next
    tick decides with it and the caller gets that decision's reason.

    Self-fencing: a guardian process (app/cluster/guardian.py) is fed every few pulses with the
    VIP held and the application's process groups; when the daemon dies or freezes it drops
    the VIP and kills the application before the peer's takeover.

Exceptions
    ``submit`` raises Refused (app/api/server.py) for a command the core refuses. An action
    that fails (VipError, GuardianError, GenerationError, OSError, or any exception of an
    adapter) is logged and makes the tick's outcome failed; a critical one ends the batch.

Known limits
    - A decision that takes longer than the tick period only warns.
    - ``shutdown`` forces the VIP release and the mirror stop when the clean stop does not
      complete within its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.api.server import Refused
from app.cluster import core
from app.cluster.core import (
    Action,
    ClaimVip,
    Command,
    CoreConfig,
    Decision,
    IllegalCommand,
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
    Snapshot,
    StartMirrorPrimary,
    StartReceiver,
    StartResync,
    State,
    StopMirror,
    Sub,
)
from app.cluster.generation import Generation, GenerationError, GenerationStore, new_id
from app.cluster.guardian import GuardianClient, GuardianError, GuardianFenced, VipSpec
from app.cluster.hbnet import HeartbeatNet
from app.cluster.heartbeat import Malformed
from app.cluster.scripts import ScriptRunner, script_env
from app.cluster.vip import Vip, VipError
from app.cluster.witness import make_witnesses, probe
from app.config import Config, Module
from app.nodecheck import CheckerState, run_check
from app.nodeevents import EventLog
from app.nodemirror import make_mirror

log = logging.getLogger("mirrorha")

STOP_SCRIPTS = {core.Script.STOP_PRIM, core.Script.STOP_SECOND, core.Script.STOP_BOTH}


# ------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Timing:
    """Every period of a module, derived from its pulse and timeout."""

    pulse_s: float
    timeout_s: float
    tick_s: float
    takeover_delay_s: float
    witness_timeout_s: float
    guardian_deadline_s: float
    feed_s: float

    @classmethod
    def of(cls, m: Module) -> Timing:
        pulse, timeout = m.pulse_ms / 1000, m.timeout_ms / 1000
        takeover = max(0.1, min(1.0, timeout / 3))
        return cls(
            pulse_s=pulse,
            timeout_s=timeout,
            tick_s=max(0.02, min(0.1, pulse / 2)),
            takeover_delay_s=takeover,
            witness_timeout_s=max(0.05, takeover * 0.4),
            guardian_deadline_s=max(0.15, timeout * 0.5),
            feed_s=max(0.02, min(pulse, timeout * 0.1)),
        )


# ------------------------------------------------------------------ the runner


def self_command() -> list[str]:
    """How scripts and tools call this very program (the built file or `python -m app`)."""
    argv0 = os.path.abspath(sys.argv[0])
    if os.path.isfile(argv0) and zipfile.is_zipfile(argv0):
        return [sys.executable, argv0]
    return [sys.executable, "-m", "app"]


@dataclass
class Pending:
    command: Command
    done: asyncio.Future[str]


@dataclass
class RunnerState:
    state: State = State.STOP
    substatus: Sub = Sub.NOT_READY
    since: float = 0.0
    reason: str = "STOP: not started"
    goal: core.Goal = core.Goal.NONE
    last: Outcome | None = None
    last_tick: float | None = None
    vip_held: bool = False
    peer_request: core.PeerRequest | None = None
    witness: core.Witness = core.Witness.UNKNOWN
    witness_at: float = 0.0
    checkers: dict[str, CheckerState] = field(default_factory=dict)


class ModuleRunner:
    def __init__(
        self,
        cfg: Config,
        module: Module,
        me: str,
        state_dir: Path,
        key: bytes,
        events: EventLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.m, self.me = cfg, module, me
        self.peer = cfg.cluster.peer_of(me).name
        self.dir = state_dir / module.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events = events
        self.clock = clock
        self.log = log.getChild(module.name)
        self.t = Timing.of(module)
        self.core_cfg = CoreConfig(
            node=me,
            peer=self.peer,
            heartbeat_timeout=self.t.timeout_s,
            takeover_delay=self.t.takeover_delay_s,
            failover=module.failover,
            failback=module.failback,
            witness=", ".join(module.splitbrain.witnesses) or None,
        )
        self.s = RunnerState(since=clock())
        self.gen_store = GenerationStore(self.dir)
        self.gen_problem: str | None = None
        try:
            self.gen = self.gen_store.load()
        except GenerationError as exc:
            self.gen_problem = str(exc)
            self.gen = Generation()
            self.log.error("%s: running as 'data not known to be up to date'", exc)
        self.hb = HeartbeatNet(
            [(n.name, n.addresses[me], n.addresses[self.peer]) for n in cfg.cluster.networks],
            port=module.heartbeat_port,
            key=key,
            cluster=cfg.cluster.name,
            module=module.name,
            node=me,
            peer=self.peer,
            pulse=self.t.pulse_s,
        )
        self.vip = (
            Vip(module.vip.address, module.vip.prefix, module.vip.interface) if module.vip else None
        )
        self.vip_spec = (
            VipSpec(module.vip.address, module.vip.prefix, module.vip.interface)
            if module.vip
            else None
        )
        env = script_env(
            module=module.name,
            node=me,
            peer=self.peer,
            vip=f"{module.vip.address}/{module.vip.prefix}" if module.vip else None,
            dirs=[str(r.path) for r in module.replicated],
            state_dir=self.dir,
            user=module.scripts.env,
        )
        env["MIRRORHA_SELF"] = " ".join(self_command())
        self.scripts = ScriptRunner(
            module.scripts.dir or {}, env, module.scripts.timeout_s, self.log.getChild("script")
        )
        self.guardian = GuardianClient(self.dir, self.t.guardian_deadline_s, log=self.log)
        self.mirror = make_mirror(cfg, module, me, self.dir, key, self.log.getChild("mirror"))
        self.witnesses = make_witnesses(module.splitbrain.witnesses, module.splitbrain.method)
        self.pending: list[Pending] = []
        self.wake = asyncio.Event()
        self.autostart = self.dir / "autostart"
        self.closing = False

    # ---------------------------------------------------------------- snapshot

    def peer_view(self, now: float) -> core.Peer:
        v = self.hb.view(self.t.timeout_s)
        hb = v.latest
        if hb is None:
            return core.Peer()
        gen: Generation | None = None
        with contextlib.suppress(GenerationError, ValueError):
            gen = Generation.from_wire(str(hb.generation))
        request = None
        if hb.command:
            with contextlib.suppress(ValueError):
                request = core.PeerRequest(hb.command)
        return core.Peer(
            seen=v.seen,
            state=_enum(State, hb.state),
            substatus=_enum(Sub, hb.substatus),
            generation=gen,
            stopping=v.stopping,
            last_seen=now - v.age if v.age is not None else None,
            request=request,
        )

    def snapshot(self, now: float, command: Command | None = None) -> Snapshot:
        s = self.s
        witness = (
            s.witness if now - s.witness_at < max(1.0, self.t.timeout_s) else core.Witness.UNKNOWN
        )
        return Snapshot(
            now=now,
            state=s.state,
            substatus=s.substatus,
            since=s.since,
            generation=self.gen,
            peer=self.peer_view(now),
            command=command,
            goal=s.goal,
            witness=witness,
            resync=_enum(core.Resync, self.mirror.resync_state()) or core.Resync.NONE,
            mirror=_enum(core.Mirror, self.mirror.mirror_state()) or core.Mirror.OFF,
            vip_held=s.vip_held,
            last=s.last,
            last_tick=s.last_tick,
            checkers=tuple(
                core.Checker(name, c.verdict, c.detail)
                for name, c in s.checkers.items()
                if c.verdict is not None
            ),
            generation_problem=self.gen_problem,
        )

    # ---------------------------------------------------------------- commands

    async def submit(self, command: Command) -> str:
        """Check a command now; queue it for the next tick; answer with that tick's reason."""
        try:
            core.check_command(self.snapshot(self.clock()), command)
        except IllegalCommand as exc:
            raise Refused(f"{command.value} refused on {self.me}: {exc}") from None
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending.append(Pending(command, fut))
        self.wake.set()
        return await asyncio.wait_for(fut, timeout=max(60.0, self.m.scripts.timeout_s * 4))

    # ---------------------------------------------------------------- tick

    async def tick(self) -> None:
        now = self.clock()
        pending = self.pending.pop(0) if self.pending else None
        snap = self.snapshot(now, pending.command if pending else None)
        try:
            d = core.decide(snap, self.core_cfg)
        except IllegalCommand as exc:
            if pending:
                pending.done.set_exception(Refused(f"{pending.command.value} refused: {exc}"))
            return
        took = self.clock() - now
        if took > self.t.tick_s:
            self.log.warning(
                "decision took %.3f s, over the tick period of %.3f s", took, self.t.tick_s
            )
        if pending and pending.command in (Command.START,):
            self.autostart.touch()
        if pending and pending.command in (Command.STOP, Command.FORCESTOP):
            self.autostart.unlink(missing_ok=True)
        await self.apply(snap, d)
        if pending and not pending.done.done():
            pending.done.set_result(d.reason)

    async def apply(self, snap: Snapshot, d: Decision) -> None:
        s = self.s
        changed = (d.new_state, d.substatus) != (s.state, s.substatus) or _shape(
            d.reason
        ) != _shape(s.reason)
        if d.new_state is not s.state:
            s.since = snap.now
            s.peer_request = None
        s.state, s.substatus, s.reason, s.goal = d.new_state, d.substatus, d.reason, d.goal
        for c in s.checkers.values():
            if c.verdict is not None and c.verdict is not core.Verdict.WAIT:
                c.verdict, c.failures = None, 0
        if changed or d.actions:
            self.log.info("%s %s: %s", d.new_state.value, d.substatus.value, d.reason)
            self.events.add(self.m.name, d)
        if d.new_state is not State.STOP and snap.state is State.STOP:
            self.hb.clear_stop()
        self.publish()
        outcome = Outcome(ok=True)
        for action in d.actions:
            ok, detail = await self.execute(action)
            if not ok:
                self.log.error("%s failed: %s", _describe(action), detail)
                if outcome.ok:
                    outcome = Outcome(ok=False, failed=action, detail=detail)
                if getattr(action, "critical", False):
                    break
        s.last = outcome if d.actions else None
        s.last_tick = self.clock()
        self.publish()
        if d.new_state is State.STOP and snap.state is not State.STOP:
            await self.hb.announce_stop()

    def publish(self) -> None:
        try:
            self.hb.set_local(
                self.s.state.value,
                self.s.substatus.value,
                self.gen.to_wire(),
                inconsistent=self.gen.inconsistent,
                command=self.s.peer_request.value if self.s.peer_request else None,
            )
        except Malformed as exc:
            self.log.error("heartbeat not updated: %s", exc)
        self.hb.send_now()

    def save_gen(self, gen: Generation) -> None:
        self.gen_store.save(gen)
        self.gen = gen
        self.gen_problem = None

    async def execute(self, a: Action) -> tuple[bool, str]:
        """Run one action to completion; (ok, what went wrong)."""
        try:
            if isinstance(a, RunScript):
                if a.name in STOP_SCRIPTS and not a.force:
                    stop = await self.scripts.run_stop(
                        a.name.value, a.current.value, a.next.value, a.action
                    )
                    return stop.ok, _tail(stop.forced.output_tail)
                r = await self.scripts.run(
                    a.name.value, a.current.value, a.next.value, a.action, force=a.force
                )
                why = "timed out" if r.timed_out else f"exit status {r.returncode}"
                return r.ok, f"{a.name.value}: {why}: {_tail(r.output_tail)}"
            if isinstance(a, ClaimVip):
                # Guard the VIP before it exists: a death mid-claim still drops it.
                self.s.vip_held = True
                if self.vip is not None:
                    self.guardian_feed()
                    await asyncio.to_thread(self.vip.claim)
                return True, ""
            if isinstance(a, ReleaseVip):
                if self.vip is not None:
                    await asyncio.to_thread(self.vip.release)
                self.s.vip_held = False
                self.guardian_feed(vip=False)
                return True, ""
            if isinstance(a, StartMirrorPrimary):
                await self.mirror.start_primary(self.gen.current)
                return True, ""
            if isinstance(a, StopMirror):
                await self.mirror.stop()
                return True, ""
            if isinstance(a, StartReceiver):
                await self.mirror.start_receiver()
                return True, ""
            if isinstance(a, StartResync):
                await self.mirror.start_resync(a.role, a.full)
                return True, ""
            if isinstance(a, NewGeneration):
                self.save_gen(self.gen.started(new_id(), a.origin))
                self.mirror.set_generation(self.gen.current)
                return True, ""
            if isinstance(a, MarkInconsistent):
                self.save_gen(self.gen.marked_inconsistent())
                return True, ""
            if isinstance(a, MarkConsistent):
                self.save_gen(self.gen.adopted(a.source))
                return True, ""
            if isinstance(a, MarkPeerSynced):
                self.save_gen(self.gen.peer_synced())
                self.mirror.peer_synced(self.gen.current)
                return True, ""
            if isinstance(a, MarkPrimary):
                self.save_gen(self.gen.with_primary(a.primary))
                return True, ""
            if isinstance(a, Quarantine):
                folder = await self.mirror.quarantine(a.reason)
                self.log.warning("divergent data kept in %s (%s)", folder, a.reason)
                return True, ""
            if isinstance(a, SendToPeer):
                self.s.peer_request = a.request
                self.publish()
                return True, ""
        except (VipError, GuardianError, GenerationError, OSError) as exc:
            return False, str(exc)
        except Exception as exc:  # an adapter bug must not leave a half-applied batch unsaid
            self.log.exception("%s raised", _describe(a))
            return False, f"{type(exc).__name__}: {exc}"
        return False, f"no executor for {type(a).__name__}"

    # ---------------------------------------------------------------- background tasks

    def guardian_feed(self, vip: bool | None = None) -> None:
        held = self.s.vip_held if vip is None else vip
        try:
            self.guardian.feed(self.vip_spec if held else None, self.scripts.app_pgids())
        except GuardianFenced:
            self.on_fenced()
        except GuardianError as exc:
            self.log.error("guardian: %s", exc)

    def on_fenced(self) -> None:
        report = self.guardian.fence_report()
        self.log.error("the guardian fenced this node (%s): VIP and application are gone", report)
        self.s.vip_held = False
        with contextlib.suppress(GuardianError):
            self.guardian.start()

    async def feeder(self) -> None:
        while not self.closing:
            self.guardian_feed()
            await asyncio.sleep(self.t.feed_s)

    async def witness_prober(self) -> None:
        """Ask the witness while the peer is silent.

        Once a probe fails during a silence, the witness counts as unreachable until the peer
        is heard again: answers at different moments prove nothing (the peer may have reached
        the witness, gone ALONE and died while we could not reach it).
        """
        if not self.witnesses:
            return
        missed = False
        while not self.closing:
            v = self.hb.view(self.t.timeout_s)
            silent = v.age is None or v.age > 2 * self.t.pulse_s or not v.seen
            if silent and self.s.state is not State.STOP:
                ans = await probe(
                    self.witnesses,
                    self.t.witness_timeout_s,
                    method=self.m.splitbrain.method,
                )
                missed = missed or not ans.reachable
                self.s.witness = core.Witness.UNREACHABLE if missed else core.Witness.REACHABLE
                self.s.witness_at = self.clock()
                await asyncio.sleep(self.t.tick_s)
            else:
                missed = False
                self.s.witness = core.Witness.UNKNOWN
                await asyncio.sleep(self.t.pulse_s / 2)

    async def checker_loop(self, c: Any) -> None:
        st = self.s.checkers.setdefault(c.name, CheckerState())
        while not self.closing:
            await asyncio.sleep(c.interval_s)
            if self.s.state not in (State.PRIM, State.ALONE) or self.s.substatus is not Sub.READY:
                st.failures, st.verdict = 0, None
                continue
            ok, detail = await run_check(c)
            if ok:
                st.failures, st.verdict = 0, None
                continue
            st.failures += 1
            if st.failures >= c.failures and st.verdict is None:
                st.verdict, st.detail = core.Verdict(c.action), f"{c.name}: {detail}"
                self.log.warning(
                    "checker %s: %s (%d failures): %s", c.name, detail, st.failures, c.action
                )
                self.wake.set()

    async def loop(self) -> None:
        while not self.closing:
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.t.tick_s)
            self.wake.clear()

    async def run(self, start: bool) -> None:
        await self.hb.start()
        await asyncio.to_thread(self.guardian.start)
        self.publish()
        if start or self.autostart.exists():
            self.pending.append(Pending(Command.START, asyncio.get_running_loop().create_future()))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.loop(), name=f"{self.m.name}-tick")
            tg.create_task(self.feeder(), name=f"{self.m.name}-guardian")
            tg.create_task(self.witness_prober(), name=f"{self.m.name}-witness")
            for c in self.m.checkers:
                tg.create_task(self.checker_loop(c), name=f"{self.m.name}-checker-{c.name}")

    def stopped(self) -> bool:
        return self.s.state is State.STOP

    async def shutdown(self, deadline_s: float) -> None:
        """Clean stop: stop the module (scripts, VIP, mirror), tell the peer, stop the tasks."""
        if self.s.state is not State.STOP:
            try:
                await asyncio.wait_for(self.submit(Command.STOP), deadline_s)
                end = self.clock() + deadline_s
                while not self.stopped() and self.clock() < end:
                    await asyncio.sleep(self.t.tick_s)
            except (Refused, TimeoutError) as exc:
                self.log.error("clean stop did not complete (%s): forcing", exc)
                with contextlib.suppress(Exception):
                    await self.execute(ReleaseVip())
                    await self.mirror.stop()
        self.closing = True
        self.wake.set()
        await self.hb.announce_stop()
        await self.hb.close()
        await asyncio.to_thread(self.guardian.stop)

    # ---------------------------------------------------------------- reporting

    def state_dict(self) -> dict[str, Any]:
        now = self.clock()
        s = self.s
        v = self.hb.view(self.t.timeout_s)
        hb = v.latest
        g = self.gen
        fresh = (
            "inconsistent (stopped during a resync)"
            if g.inconsistent
            else "never synchronised"
            if g.fresh
            else "up to date"
            if s.state in (State.PRIM, State.ALONE)
            or (s.state is State.SECOND and s.substatus is Sub.READY)
            else "not known to be up to date"
        )
        counters = self.hb.counters()
        return {
            "name": self.m.name,
            "state": s.state.value,
            "substatus": s.substatus.value,
            "reason": s.reason,
            "since_s": round(now - s.since, 1),
            "goal": s.goal.value,
            "peer_name": self.peer,
            "peer": {
                "seen": v.seen,
                "stopping": v.stopping,
                "state": hb.state if hb else None,
                "substatus": hb.substatus if hb else None,
                "age_s": round(v.age, 3) if v.age is not None else None,
                "networks": dict(v.networks),
            },
            "data": {
                "generation": g.current or None,
                "freshness": fresh,
                "problem": self.gen_problem,
                "mirror": self.mirror.mirror_state(),
                "mirror_note": self.mirror.status().get("note"),
            },
            "mirror": self.mirror.status(),
            "resync": self.mirror.status().get("resync") or {"state": self.mirror.resync_state()},
            "vip": {"address": self.m.vip.address, "held": s.vip_held} if self.m.vip else None,
            "witness": {"configured": list(self.m.splitbrain.witnesses), "answer": s.witness.value},
            "checkers": {
                n: {"failures": c.failures, "verdict": c.verdict.value if c.verdict else None}
                for n, c in s.checkers.items()
            },
            "heartbeat": {
                "pulse_ms": self.m.pulse_ms,
                "timeout_ms": self.m.timeout_ms,
                "sent": counters.sent,
                "accepted": counters.accepted,
                "rejected": dict(counters.rejected),
                "send_errors": dict(counters.send_errors),
            },
            "events": self.events.recent(self.m.name, 10),
        }


def _enum(kind: Any, value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        return None


def _shape(reason: str) -> str:
    """A reason without its figures: "silent for 1.6 s" and "silent for 1.7 s" are one."""
    return "".join(ch for ch in reason if not ch.isdigit())


def _tail(lines: Any) -> str:
    return " | ".join(list(lines)[-3:])


def _describe(a: Action) -> str:
    if isinstance(a, RunScript):
        return f"script {a.name.value} {a.current.value} {a.next.value} {a.action}"
    return type(a).__name__
