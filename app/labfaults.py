"""Faults of the lab: pulled cables, partitions and impaired links (a base class of Lab).

How it works
    ``link(host, net, up)`` sets the switch-side port down or up (the host sees NO-CARRIER, as
    with a pulled cable; its addresses and routes stay). ``partition()`` uses the bridge's port
    isolation: node1's and node2's ports on br-pub and br-repl are ``isolated``, so no frame at
    all (IP, ARP, broadcast) passes between the nodes while both still reach the witness; a
    node cut from the witness has its br-pub port disabled (it then also loses the client, which
    it reaches through the witness). ``heal()`` undoes both. ``netem()`` uses ``tc qdisc netem``
    on the host's interface (and, with ``both_ways``, on the switch port towards it). Where the
    kernel has no sch_netem, packet loss alone falls back to an nftables netdev egress rule
    (``nft`` must be installed: Debian package ``nftables``), and delay or jitter start the
    userspace impairment hub (app/labimpair.py) for that network: its switch ports leave the
    bridge and a relay in the switch namespace forwards frames between them, impairing frames
    sent by ``host`` (and, with ``both_ways``, frames sent to it) only; once a network is in
    hub mode, every netem() on it (loss too) goes to the hub, and partition() flags are applied
    by the hub. Hub jitter reorders frames, as netem's does. ``clear_netem()`` of the last
    impaired host, ``reset_faults()`` and ``down()`` stop the hub and put the ports back on
    the bridge. netem() returns the mechanism used: "netem", "nftables" or "hub".

Exceptions
    LabError: the lab is not up, a host not on that network, arguments out of range, the
    impairment hub did not start or is gone. LabUnsupported: loss alone asked with neither
    netem nor nft. LabCommandError: a tc, ip, bridge or nft command failed.

Known limits
    A partition cuts only node1 from node2 (and a node from the witness); the client and the
    witness are never cut from each other. The hub holds at most HUB_QUEUE_LIMIT frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal as _signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from app.labhosts import LabHosts
from app.labimpair import READY_LINE as HUB_READY
from app.labimpair import PortConfig
from app.labsys import _run
from app.labtopology import (
    ATTACHMENTS,
    BRIDGES,
    COMMAND_TIMEOUT,
    NODES,
    SWITCH,
    LabCommandError,
    LabError,
    LabUnsupported,
    attachment,
)

HUB_QUEUE_LIMIT = 10000  # frames the impairment hub holds, as netem's default limit


@dataclass
class _Hub:
    """A running impairment hub: its process and the impairment asked for each host."""

    proc: subprocess.Popen[bytes]
    impaired: dict[str, PortConfig]


def _select_read(fd: int, timeout: float) -> tuple[list[int], list[int], list[int]]:
    return select.select([fd], [], [], timeout)


class LabFaults(LabHosts):
    """link, partition, netem and the impairment hub; app/lab.py's Lab builds on it."""

    # -- faults -----------------------------------------------------------------------------

    def link(self, host: str, net: str, up: bool) -> None:
        """Plug (up=True) or pull (up=False) the cable of host on net (switch-side port)."""
        self._require_up()
        att = attachment(host, net)
        state = "up" if up else "down"
        _run(["ip", "-n", self.ns(SWITCH), "link", "set", att.port, state])
        if up:
            self._ports_down.discard((host, net))
            self._apply_partition()  # a port coming up is forwarding again; re-cut if needed
        else:
            self._ports_down.add((host, net))

    def partition(self, node1_reaches_witness: bool, node2_reaches_witness: bool) -> None:
        """Cut all traffic between node1 and node2 (pub and repl, both ways); cut a node from
        the witness (and so from the client) when told. heal() undoes it."""
        self._require_up()
        self._partition = (node1_reaches_witness, node2_reaches_witness)
        self._apply_partition()

    def heal(self) -> None:
        """Undo partition(): nodes see each other and the witness again."""
        self._require_up()
        self._partition = None
        self._apply_partition()

    def _apply_partition(self) -> None:
        sw = self.ns(SWITCH)
        reach = dict(zip(NODES, self._partition or (True, True), strict=True))
        isolated = "on" if self._partition is not None else "off"
        for node in NODES:
            for net in ("pub", "repl"):
                if net in self._hubs:
                    continue  # not a bridge port now: the hub applies the flags below
                port = attachment(node, net).port
                _run(["bridge", "-n", sw, "link", "set", "dev", port, "isolated", isolated])
            if (node, "pub") not in self._ports_down and "pub" not in self._hubs:
                state = "3" if reach[node] else "0"  # 3 forwarding, 0 disabled
                port = attachment(node, "pub").port
                _run(["bridge", "-n", sw, "link", "set", "dev", port, "state", state])
        for net in self._hubs:
            self._hub_configure(net)

    def _partition_flags(self, host: str, net: str) -> tuple[bool, bool]:
        """(isolated, blocked) of host's port on net under the current partition."""
        if self._partition is None or host not in NODES or net not in ("pub", "repl"):
            return False, False
        reach = dict(zip(NODES, self._partition, strict=True))
        return True, net == "pub" and not reach[host]

    def netem(
        self,
        host: str,
        net: str,
        loss_pct: float = 0,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        both_ways: bool = True,
    ) -> str:
        """Impair host's link on net: packets it sends (and, with both_ways, packets sent to it)
        are lost with loss_pct % and delayed by delay_ms ± jitter_ms. Replaces earlier settings.

        Returns the mechanism used: "netem"; where the kernel has no sch_netem, "nftables"
        (loss only) or "hub" (delay or jitter asked, or net already in hub mode: the userspace
        impairment hub, app/labimpair.py, impairs frames from host and, with both_ways, to
        host; its jitter reorders frames like netem's). LabUnsupported if loss alone is asked
        and neither netem nor nft is there.
        """
        self._require_up()
        if not 0 <= loss_pct <= 100 or delay_ms < 0 or jitter_ms < 0:
            raise LabError(f"netem: loss_pct in 0..100, delays >= 0 (got {loss_pct}, {delay_ms})")
        self._clear_qdisc_and_nft(host, net)
        impairment = PortConfig(loss_pct, delay_ms, jitter_ms, both_ways)
        if net in self._hubs:  # the network is in hub mode: the hub does it all
            self._hub_impair(host, net, impairment)
            return "hub"
        targets = self._impair_targets(host, net, both_ways)
        args = ["netem", "limit", "10000"]
        if delay_ms or jitter_ms:
            args += ["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        if loss_pct:
            args += ["loss", f"{loss_pct}%"]
        first = _run(
            ["tc", "-n", targets[0][0], "qdisc", "replace", "dev", targets[0][1], "root", *args],
            check=False,
        )
        if first.returncode == 0:
            for ns, dev in targets[1:]:
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *args])
            return "netem"
        if "unknown" not in first.stderr.lower():
            raise LabCommandError(first.returncode, first.args, first.stdout, first.stderr)
        if delay_ms or jitter_ms:
            self._hub_impair(host, net, impairment)
            return "hub"
        if shutil.which("nft") is None:
            raise LabUnsupported(
                "this kernel has no sch_netem and nft is not installed (Debian package nftables)"
            )
        if loss_pct:
            for ns, dev in targets:
                self._nft_loss(ns, dev, loss_pct)
            self._netem_fallback.add((host, net))
        return "nftables"

    def clear_netem(self, host: str, net: str) -> None:
        """Remove any netem() impairment of host on net (both directions); stops the hub of
        net when host was the last impaired host on it."""
        self._require_up()
        self._clear_qdisc_and_nft(host, net)
        hub = self._hubs.get(net)
        if hub is not None:
            hub.impaired.pop(host, None)
            if hub.impaired:
                self._hub_configure(net)
            else:
                self._hub_stop(net)

    def _clear_qdisc_and_nft(self, host: str, net: str) -> None:
        for ns, dev in self._impair_targets(host, net, both_ways=True):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            if shutil.which("nft") is not None:
                _run(
                    self._nft(ns, "delete", "chain", "netdev", "mirrorha_lab", f"egress_{dev}"),
                    check=False,
                )
        self._netem_fallback.discard((host, net))

    def _impair_targets(self, host: str, net: str, both_ways: bool) -> list[tuple[str, str]]:
        att = attachment(host, net)
        targets = [(self.ns(host), att.ifname)]
        if both_ways:
            targets.append((self.ns(SWITCH), att.port))
        return targets

    # -- the userspace impairment hub (app/labimpair.py) -------------------------------------

    def hub_pid(self, net: str) -> int | None:
        """PID of the impairment hub of net, or None when net is a plain bridge."""
        hub = self._hubs.get(net)
        return hub.proc.pid if hub is not None else None

    def _hub_impair(self, host: str, net: str, impairment: PortConfig) -> None:
        attachment(host, net)  # LabError if host is not on net
        if net not in self._hubs:
            self._hub_start(net)
        self._hubs[net].impaired[host] = impairment
        self._hub_configure(net)

    def _hub_start(self, net: str) -> None:
        sw = self.ns(SWITCH)
        ports = [a.port for a in ATTACHMENTS if a.net == net]
        script = str(Path(__file__).with_name("labimpair.py"))
        log_path = self.workdir / f"hub-{net}.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as errlog:
            proc = self.popen(
                SWITCH,
                [sys.executable, script, *ports],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errlog,
            )
        hub = _Hub(proc, {})
        self._hubs[net] = hub
        try:
            assert proc.stdout is not None
            ready, _, _ = _select_read(proc.stdout.fileno(), COMMAND_TIMEOUT)
            line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
            if line != HUB_READY:
                raise LabError(f"impairment hub of {net} did not start (see {log_path})")
            for port in ports:  # the hub discards frames until configured: no duplicates
                _run(["ip", "-n", sw, "link", "set", port, "nomaster"])
        except BaseException:
            self._hub_stop(net)
            raise

    def _hub_configure(self, net: str) -> None:
        hub = self._hubs[net]
        config: dict[str, dict[str, object]] = {}
        for att in ATTACHMENTS:
            if att.net != net:
                continue
            base = hub.impaired.get(att.host, PortConfig())
            isolated, blocked = self._partition_flags(att.host, net)
            config[att.port] = {**base.to_json(), "isolated": isolated, "blocked": blocked}
        line = json.dumps({"ports": config, "limit": HUB_QUEUE_LIMIT}) + "\n"
        assert hub.proc.stdin is not None
        try:
            hub.proc.stdin.write(line.encode())
            hub.proc.stdin.flush()
        except OSError as exc:
            raise LabError(f"impairment hub of {net} is gone: {exc}") from exc

    def _hub_stop(self, net: str) -> None:
        """Stop the hub of net (stdin closed, then SIGKILL if it lingers) and put the ports
        back on the bridge, with the current partition flags."""
        hub = self._hubs.pop(net, None)
        if hub is None:
            return
        with contextlib.suppress(OSError):
            if hub.proc.stdin is not None:
                hub.proc.stdin.close()
        try:
            hub.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hub.proc.pid, _signal.SIGKILL)
            hub.proc.wait(timeout=5)
        if hub.proc.stdout is not None:
            hub.proc.stdout.close()
        with contextlib.suppress(ValueError):
            self._procs.remove(hub.proc)
        sw = self.ns(SWITCH)
        for att in ATTACHMENTS:
            if att.net == net:
                _run(["ip", "-n", sw, "link", "set", att.port, "master", BRIDGES[net]])
        self._apply_partition()

    def _nft(self, ns: str, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", "--", "nft", *args]

    def _nft_loss(self, ns: str, dev: str, loss_pct: float) -> None:
        verdict = (
            "drop" if loss_pct >= 100 else f"numgen random mod 1000 < {round(loss_pct * 10)} drop"
        )
        hook = f'type filter hook egress device "{dev}" priority 0;'
        ruleset = (
            f"table netdev mirrorha_lab {{\n  chain egress_{dev} {{ {hook} {verdict}; }}\n}}\n"
        )
        _run(self._nft(ns, "-f", "-"), input=ruleset)

    def reset_faults(self) -> None:
        """heal(), all cables plugged, no impairment: the state right after up()."""
        self._require_up()
        for att in ATTACHMENTS:
            self.clear_netem(att.host, att.net)
        for net in list(self._hubs):
            self._hub_stop(net)
        for host, net in list(self._ports_down):
            self.link(host, net, True)
        self.heal()
