"""The configuration: one TOML file, identical on both nodes.

Two parts. ``[cluster]`` describes the pair of servers: their names and admin addresses, the
heartbeat networks (each with both nodes' addresses) and the credentials. ``[[modules]]``
describes one application made highly available on that pair: its VIP, replicated directories,
scripts, checkers, split-brain witnesses and timing. Several modules may share one pair; their
ports, VIPs and directories must not collide.

Loading is all-or-nothing: ``load()`` returns a frozen ``Config`` or raises ``ConfigError``
whose ``problems`` each name the key and what is wrong, in the form
``modules[0].vip.address: '198.18.1.300' is not an IP address``. Timing invariants are checked
here, at load, not when a timer fires. Unknown keys are errors (a typo must not be silently
ignored). Nothing is read but the file itself; ``key_file`` is read by ``load_key()`` when the
daemon starts.

Exceptions: ConfigError (a list of problems).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

T = TypeVar("T")

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
CHECKER_KINDS = ("tcp", "process", "custom")
CHECKER_ACTIONS = ("restart", "stopstart", "wait", "swap", "stop")
MIN_PULSE_MS = 50
MIN_TIMEOUT_MS = 300
PULSES_PER_TIMEOUT = 3
MIN_KEY_CHARS = 32


class ConfigError(Exception):
    """The file cannot be used; ``problems`` lists every reason, each naming its key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class Node:
    name: str
    admin: str


@dataclass(frozen=True)
class Network:
    """A heartbeat network: both nodes' addresses on it."""

    name: str
    addresses: dict[str, str]
    replication: bool


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, Node]
    networks: tuple[Network, ...]
    key: str | None
    key_file: Path | None
    api_port: int

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def peer_of(self, name: str) -> Node:
        a, b = self.nodes
        return b if a.name == name else a

    @property
    def replication_network(self) -> Network:
        for net in self.networks:
            if net.replication:
                return net
        return self.networks[-1]


@dataclass(frozen=True)
class Vip:
    address: str
    prefix: int
    interface: str


@dataclass(frozen=True)
class Replicated:
    path: Path
    exclude: tuple[str, ...]


@dataclass(frozen=True)
class Scripts:
    dir: Path | None
    timeout_s: float
    env: dict[str, str]


@dataclass(frozen=True)
class Checker:
    name: str
    kind: str
    target: str
    action: str
    interval_s: float
    failures: int


@dataclass(frozen=True)
class SplitBrain:
    witnesses: tuple[str, ...]
    method: str


@dataclass(frozen=True)
class Module:
    name: str
    heartbeat_port: int
    replication_port: int
    pulse_ms: int
    timeout_ms: int
    replication_timeout_ms: int
    failover: bool
    failback: str
    resync_bandwidth_mbps: float
    vip: Vip | None
    replicated: tuple[Replicated, ...]
    scripts: Scripts
    checkers: tuple[Checker, ...]
    splitbrain: SplitBrain


@dataclass(frozen=True)
class Config:
    source: str
    cluster: Cluster
    modules: tuple[Module, ...]

    def module(self, name: str | None = None) -> Module:
        if name is None:
            return self.modules[0]
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass
class _Reader:
    """Walks a parsed TOML table, collecting problems with the key path of each."""

    problems: list[str] = field(default_factory=list)

    def fail(self, key: str, msg: str) -> None:
        self.problems.append(f"{key}: {msg}")

    def table(self, data: Any, key: str, allowed: set[str]) -> dict[str, Any] | None:
        if not isinstance(data, dict):
            self.fail(key, f"must be a table, not {_kind(data)}")
            return None
        for k in sorted(set(data) - allowed):
            self.fail(
                f"{key}.{k}" if key else k, f"unknown key (allowed: {', '.join(sorted(allowed))})"
            )
        return data

    def get(
        self,
        data: dict[str, Any],
        key: str,
        name: str,
        typ: type[T] | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        full = f"{key}.{name}" if key else name
        if name not in data:
            if default is ...:
                self.fail(full, "missing")
            return None if default is ... else default
        value = data[name]
        ok = isinstance(value, typ)
        if ok and isinstance(value, bool) and typ in (int, float, (int, float)):
            ok = False
        if not ok:
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            self.fail(full, f"must be {_article(want)}, not {_kind(value)} {value!r}")
            return None
        return value

    def array(self, data: dict[str, Any], key: str, name: str, required: bool = True) -> list[Any]:
        full = f"{key}.{name}" if key else name
        if name not in data:
            if required:
                self.fail(full, "missing")
            return []
        value = data[name]
        if not isinstance(value, list):
            self.fail(full, f"must be an array, not {_kind(value)}")
            return []
        return value

    def check(self, full: str, value: Any, pred: Callable[[Any], bool], msg: str) -> None:
        if value is not None and not pred(value):
            self.fail(full, msg)


def _kind(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _article(word: str) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean"}
    return " or ".join(names.get(w, w) for w in word.split(" or "))


def _ip(r: _Reader, full: str, value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        r.fail(full, f"{value!r} is not an IP address")
        return None


def _name(r: _Reader, full: str, value: Any) -> None:
    r.check(
        full,
        value,
        lambda v: bool(NAME_RE.match(v)),
        f"{value!r} is not a valid name "
        "(a lower-case letter, then letters, digits or '-'; at most 32)",
    )


def _port(r: _Reader, full: str, value: Any) -> None:
    r.check(full, value, lambda v: 1 <= v <= 65535, f"{value} is not a port (1 to 65535)")


def load(path: str | Path) -> Config:
    """Read and validate a configuration file; raise ConfigError naming every problem."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [f"cannot be read: {exc}"]) from None
    return loads(text, source=str(p), base_dir=p.parent)


def loads(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"TOML syntax error: {exc}"]) from None
    r = _Reader()
    top = r.table(data, "", {"cluster", "modules"})
    cluster = None
    modules: list[Module] = []
    if top is not None:
        if "cluster" not in top:
            r.fail("cluster", "missing")
        else:
            cluster = _cluster(r, top["cluster"], base_dir or Path("."))
        if "modules" not in top:
            r.fail("modules", "missing (at least one [[modules]] table)")
        elif not isinstance(top["modules"], list) or not top["modules"]:
            r.fail("modules", "must be one or more [[modules]] tables")
        else:
            for i, m in enumerate(top["modules"]):
                mod = _module(r, m, f"modules[{i}]", cluster, base_dir or Path("."))
                if mod is not None:
                    modules.append(mod)
            _check_modules(r, modules)
    if r.problems or cluster is None:
        raise ConfigError(source, r.problems or ["cluster: missing"])
    return Config(source=source, cluster=cluster, modules=tuple(modules))


def _cluster(r: _Reader, data: Any, base_dir: Path) -> Cluster | None:
    key = "cluster"
    t = r.table(data, key, {"name", "key", "key_file", "api_port", "nodes", "networks"})
    if t is None:
        return None
    name = r.get(t, key, "name", str)
    _name(r, "cluster.name", name)
    secret = r.get(t, key, "key", str, None)
    key_file = r.get(t, key, "key_file", str, None)
    if secret is None and key_file is None and "key" not in t and "key_file" not in t:
        r.fail("cluster.key", "missing (set key, at least 32 characters, or key_file)")
    if secret is not None and key_file is not None:
        r.fail("cluster.key", "set key or key_file, not both")
    r.check(
        "cluster.key",
        secret,
        lambda v: len(v) >= MIN_KEY_CHARS,
        f"is {len(secret or '')} characters; use at least {MIN_KEY_CHARS} "
        "(`mirrorha keygen` makes one)",
    )
    api_port = r.get(t, key, "api_port", int, 9453)
    _port(r, "cluster.api_port", api_port)

    nodes: list[Node] = []
    raw_nodes = r.array(t, key, "nodes")
    if "nodes" in t and len(raw_nodes) != 2:
        r.fail("cluster.nodes", f"must list exactly 2 nodes, not {len(raw_nodes)}")
    for i, n in enumerate(raw_nodes):
        nk = f"cluster.nodes[{i}]"
        nt = r.table(n, nk, {"name", "admin"})
        if nt is None:
            continue
        nname = r.get(nt, nk, "name", str)
        _name(r, f"{nk}.name", nname)
        admin = r.get(nt, nk, "admin", str)
        _ip(r, f"{nk}.admin", admin)
        if nname is not None and admin is not None:
            nodes.append(Node(nname, admin))
    if len(nodes) == 2:
        if nodes[0].name == nodes[1].name:
            r.fail("cluster.nodes[1].name", f"{nodes[1].name!r} is the same node twice")
        if nodes[0].admin == nodes[1].admin:
            r.fail(
                "cluster.nodes[1].admin", f"{nodes[1].admin} is node {nodes[0].name}'s address too"
            )
    names = {n.name for n in nodes}

    networks: list[Network] = []
    raw_nets = r.array(t, key, "networks")
    if "networks" in t and not raw_nets:
        r.fail("cluster.networks", "needs at least one heartbeat network (two are recommended)")
    seen_nets: set[str] = set()
    for i, n in enumerate(raw_nets):
        nk = f"cluster.networks[{i}]"
        nt = r.table(n, nk, {"name", "addresses", "replication"})
        if nt is None:
            continue
        nname = r.get(nt, nk, "name", str)
        _name(r, f"{nk}.name", nname)
        if nname in seen_nets:
            r.fail(f"{nk}.name", f"network {nname!r} is listed twice")
        seen_nets.add(nname)
        repl = r.get(nt, nk, "replication", bool, False)
        addrs = r.get(nt, nk, "addresses", dict)
        parsed: dict[str, str] = {}
        if addrs is not None:
            for node_name in sorted(set(addrs) - names):
                r.fail(
                    f"{nk}.addresses.{node_name}",
                    f"is not a node of the cluster ({', '.join(sorted(names))})",
                )
            for node_name in sorted(names - set(addrs)):
                r.fail(
                    f"{nk}.addresses.{node_name}",
                    "missing: every network needs both nodes' addresses",
                )
            for node_name, addr in addrs.items():
                full = f"{nk}.addresses.{node_name}"
                if not isinstance(addr, str):
                    r.fail(full, f"must be a string, not {_kind(addr)}")
                elif _ip(r, full, addr) is not None:
                    parsed[node_name] = addr
            vals = list(parsed.values())
            if len(vals) == 2 and vals[0] == vals[1]:
                r.fail(f"{nk}.addresses", f"both nodes have the address {vals[0]}")
        if nname is not None:
            networks.append(Network(nname, parsed, bool(repl)))
    if sum(1 for n in networks if n.replication) > 1:
        r.fail("cluster.networks", "only one network may carry replication (replication = true)")
    key_path = None
    if key_file is not None:
        kp = Path(key_file)
        key_path = kp if kp.is_absolute() else base_dir / kp
    if name is None or len(nodes) != 2 or not networks:
        return None
    return Cluster(name, (nodes[0], nodes[1]), tuple(networks), secret, key_path, api_port)


MODULE_KEYS = {
    "name",
    "heartbeat_port",
    "replication_port",
    "pulse_ms",
    "timeout_ms",
    "replication_timeout_ms",
    "failover",
    "failback",
    "resync_bandwidth_mbps",
    "vip",
    "replicated",
    "scripts",
    "checkers",
    "splitbrain",
}


def _module(
    r: _Reader, data: Any, key: str, cluster: Cluster | None, base_dir: Path
) -> Module | None:
    t = r.table(data, key, MODULE_KEYS)
    if t is None:
        return None
    before = len(r.problems)
    name = r.get(t, key, "name", str)
    _name(r, f"{key}.name", name)
    hb_port = r.get(t, key, "heartbeat_port", int, 7410)
    _port(r, f"{key}.heartbeat_port", hb_port)
    repl_port = r.get(t, key, "replication_port", int, 7411)
    _port(r, f"{key}.replication_port", repl_port)
    if hb_port is not None and hb_port == repl_port:
        r.fail(f"{key}.replication_port", f"{repl_port} is the heartbeat port too")
    pulse = r.get(t, key, "pulse_ms", int, 300)
    timeout = r.get(t, key, "timeout_ms", int, 1500)
    repl_timeout = r.get(t, key, "replication_timeout_ms", int, 5000)
    r.check(
        f"{key}.pulse_ms",
        pulse,
        lambda v: v >= MIN_PULSE_MS,
        f"{pulse} ms is below the minimum of {MIN_PULSE_MS} ms",
    )
    r.check(
        f"{key}.timeout_ms",
        timeout,
        lambda v: v >= MIN_TIMEOUT_MS,
        f"{timeout} ms is below the minimum of {MIN_TIMEOUT_MS} ms",
    )
    if pulse is not None and timeout is not None and timeout < PULSES_PER_TIMEOUT * pulse:
        r.fail(
            f"{key}.timeout_ms",
            f"{timeout} ms is shorter than {PULSES_PER_TIMEOUT} pulses of {pulse} ms: "
            f"the peer would be declared lost after fewer than {PULSES_PER_TIMEOUT} missed "
            f"heartbeats; use at least {PULSES_PER_TIMEOUT * pulse} ms",
        )
    r.check(
        f"{key}.replication_timeout_ms",
        repl_timeout,
        lambda v: v >= 100,
        f"{repl_timeout} ms is below the minimum of 100 ms",
    )
    failover = r.get(t, key, "failover", bool, True)
    failback = r.get(t, key, "failback", str, "stay")
    node_names = [n.name for n in cluster.nodes] if cluster else []
    if (
        failback is not None
        and cluster is not None
        and failback != "stay"
        and failback not in node_names
    ):
        r.fail(
            f"{key}.failback",
            f"{failback!r} is neither 'stay' nor a node name ({', '.join(node_names)})",
        )
    bw = r.get(t, key, "resync_bandwidth_mbps", (int, float), 0)
    r.check(
        f"{key}.resync_bandwidth_mbps",
        bw,
        lambda v: v >= 0,
        "must be 0 (no cap) or a positive rate",
    )

    vip = _vip(r, t.get("vip"), f"{key}.vip", cluster) if "vip" in t else None
    replicated = tuple(_replicated(r, t, key))
    scripts = _scripts(r, t.get("scripts", {}), f"{key}.scripts", base_dir)
    checkers = tuple(_checkers(r, t, key))
    splitbrain = _splitbrain(r, t.get("splitbrain", {}), f"{key}.splitbrain")
    if len(r.problems) != before or name is None or scripts is None or splitbrain is None:
        return None
    return Module(
        name=name,
        heartbeat_port=hb_port,
        replication_port=repl_port,
        pulse_ms=pulse,
        timeout_ms=timeout,
        replication_timeout_ms=repl_timeout,
        failover=bool(failover),
        failback=failback,
        resync_bandwidth_mbps=float(bw),
        vip=vip,
        replicated=replicated,
        scripts=scripts,
        checkers=checkers,
        splitbrain=splitbrain,
    )


def _vip(r: _Reader, data: Any, key: str, cluster: Cluster | None) -> Vip | None:
    t = r.table(data, key, {"address", "prefix", "interface"})
    if t is None:
        return None
    addr = r.get(t, key, "address", str)
    ip = _ip(r, f"{key}.address", addr)
    prefix = r.get(t, key, "prefix", int)
    iface = r.get(t, key, "interface", str)
    r.check(
        f"{key}.interface",
        iface,
        lambda v: 0 < len(v) < 16 and "/" not in v and " " not in v,
        f"{iface!r} is not an interface name",
    )
    if ip is None or prefix is None:
        return None
    if not 1 <= prefix <= ip.max_prefixlen:
        r.fail(
            f"{key}.prefix",
            f"{prefix} is not a prefix length for IPv{ip.version} (1 to {ip.max_prefixlen})",
        )
        return None
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    if ip in (net.network_address, net.broadcast_address) and net.num_addresses > 2:
        r.fail(f"{key}.address", f"{ip} is the network or broadcast address of {net}")
    if cluster is not None:
        homes = [
            n.name
            for n in cluster.networks
            if len(n.addresses) == 2
            and all(ipaddress.ip_address(a) in net for a in n.addresses.values())
        ]
        if not homes:
            r.fail(
                f"{key}.address",
                f"{ip}/{prefix} is outside every heartbeat network: both nodes need an address "
                f"in {net} for the VIP to move between them",
            )
        for n in cluster.networks:
            if str(ip) in n.addresses.values():
                r.fail(f"{key}.address", f"{ip} is a node's own address on network {n.name}")
    return Vip(str(ip), prefix, iface) if iface else None


def _replicated(r: _Reader, t: dict[str, Any], key: str) -> Iterator[Replicated]:
    items = r.array(t, key, "replicated", required=False)
    paths: list[tuple[str, PurePosixPath]] = []
    for i, item in enumerate(items):
        k = f"{key}.replicated[{i}]"
        it = r.table(item, k, {"path", "exclude"})
        if it is None:
            continue
        raw = r.get(it, k, "path", str)
        excl = r.get(it, k, "exclude", list, [])
        if raw is None:
            continue
        p = PurePosixPath(raw)
        if not p.is_absolute():
            r.fail(f"{k}.path", f"{raw!r} is relative: give the absolute path")
            continue
        if ".." in p.parts or (raw != str(p) and raw.rstrip("/") != str(p)):
            r.fail(f"{k}.path", f"{raw!r} is not a normalised path (no '..', '.', or '//')")
            continue
        if p == PurePosixPath("/"):
            r.fail(f"{k}.path", "the root directory cannot be replicated")
            continue
        for j, pat in enumerate(excl or []):
            if not isinstance(pat, str) or not pat or pat.startswith("/") or "\0" in pat:
                r.fail(
                    f"{k}.exclude[{j}]",
                    f"{pat!r} must be a non-empty pattern relative to the directory",
                )
        paths.append((k, p))
        yield Replicated(Path(p), tuple(x for x in (excl or []) if isinstance(x, str)))
    for i, (ka, a) in enumerate(paths):
        for kb, b in paths[i + 1 :]:
            if a == b:
                r.fail(f"{kb}.path", f"{b} is listed twice (also {ka})")
            elif a in b.parents or b in a.parents:
                r.fail(
                    f"{kb}.path",
                    f"{b} overlaps {a} ({ka}): replicated directories must be disjoint",
                )


def _scripts(r: _Reader, data: Any, key: str, base_dir: Path) -> Scripts | None:
    t = r.table(data, key, {"dir", "timeout_s", "env"})
    if t is None:
        return None
    d = r.get(t, key, "dir", str, None)
    timeout = r.get(t, key, "timeout_s", (int, float), 60)
    r.check(
        f"{key}.timeout_s",
        timeout,
        lambda v: 0 < v <= 3600,
        f"{timeout} is not between 0 and 3600 seconds",
    )
    env = r.get(t, key, "env", dict, {})
    clean: dict[str, str] = {}
    for k, v in (env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            r.fail(f"{key}.env.{k}", "is not a valid environment variable name")
        elif not isinstance(v, str):
            r.fail(f"{key}.env.{k}", f"must be a string, not {_kind(v)}")
        elif k.startswith("MIRRORHA_"):
            r.fail(f"{key}.env.{k}", "MIRRORHA_* variables are set by mirrorha itself")
        else:
            clean[k] = v
    path = None
    if d is not None:
        path = Path(d) if Path(d).is_absolute() else base_dir / d
    return Scripts(path, float(timeout or 60), clean)


def _checkers(r: _Reader, t: dict[str, Any], key: str) -> Iterator[Checker]:
    seen: set[str] = set()
    for i, item in enumerate(r.array(t, key, "checkers", required=False)):
        k = f"{key}.checkers[{i}]"
        ct = r.table(item, k, {"name", "kind", "target", "action", "interval_s", "failures"})
        if ct is None:
            continue
        name = r.get(ct, k, "name", str)
        _name(r, f"{k}.name", name)
        if name in seen:
            r.fail(f"{k}.name", f"checker {name!r} is defined twice")
        seen.add(name)
        kind = r.get(ct, k, "kind", str)
        r.check(
            f"{k}.kind",
            kind,
            lambda v: v in CHECKER_KINDS,
            f"{kind!r} is not one of {', '.join(CHECKER_KINDS)}",
        )
        target = r.get(ct, k, "target", str)
        if kind == "tcp" and target is not None:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                r.fail(f"{k}.target", f"{target!r} is not HOST:PORT")
            else:
                _ip(r, f"{k}.target", host.strip("[]"))
        action = r.get(ct, k, "action", str, "restart")
        r.check(
            f"{k}.action",
            action,
            lambda v: v in CHECKER_ACTIONS,
            f"{action!r} is not one of {', '.join(CHECKER_ACTIONS)}",
        )
        interval = r.get(ct, k, "interval_s", (int, float), 10)
        r.check(
            f"{k}.interval_s",
            interval,
            lambda v: 0.1 <= v <= 3600,
            f"{interval} is not between 0.1 and 3600",
        )
        failures = r.get(ct, k, "failures", int, 3)
        r.check(
            f"{k}.failures",
            failures,
            lambda v: 1 <= v <= 100,
            f"{failures} is not between 1 and 100",
        )
        if None not in (name, kind, target, action, interval, failures):
            yield Checker(name, kind, target, action, float(interval), failures)


def _splitbrain(r: _Reader, data: Any, key: str) -> SplitBrain | None:
    t = r.table(data, key, {"witnesses", "method"})
    if t is None:
        return None
    wit = r.get(t, key, "witnesses", list, [])
    method = r.get(t, key, "method", str, "ping")
    good: list[str] = []
    for i, w in enumerate(wit or []):
        if not isinstance(w, str):
            r.fail(f"{key}.witnesses[{i}]", f"must be a string, not {_kind(w)}")
        elif _ip(r, f"{key}.witnesses[{i}]", w) is not None:
            good.append(w)
    if method is not None and method != "ping":
        m = re.match(r"^tcp:(\d+)$", method)
        if not m or not 1 <= int(m.group(1)) <= 65535:
            r.fail(f"{key}.method", f"{method!r} is neither 'ping' nor 'tcp:PORT'")
    return SplitBrain(tuple(good), method or "ping")


def _check_modules(r: _Reader, modules: list[Module]) -> None:
    ports: dict[int, str] = {}
    vips: dict[str, str] = {}
    dirs: list[tuple[str, Path]] = []
    names: set[str] = set()
    for i, m in enumerate(modules):
        k = f"modules[{i}]"
        if m.name in names:
            r.fail(f"{k}.name", f"module {m.name!r} is defined twice")
        names.add(m.name)
        for pk, port in (
            ("heartbeat_port", m.heartbeat_port),
            ("replication_port", m.replication_port),
        ):
            if port in ports:
                r.fail(f"{k}.{pk}", f"{port} is already used by {ports[port]}")
            ports[port] = f"{k}.{pk}"
        if m.vip is not None:
            if m.vip.address in vips:
                r.fail(
                    f"{k}.vip.address",
                    f"{m.vip.address} is already the VIP of {vips[m.vip.address]}",
                )
            vips[m.vip.address] = k
        for rep in m.replicated:
            for other_k, other in dirs:
                if rep.path == other or rep.path in other.parents or other in rep.path.parents:
                    r.fail(f"{k}.replicated", f"{rep.path} overlaps {other} of {other_k}")
            dirs.append((k, rep.path))


def load_key(cluster: Cluster) -> bytes:
    """The cluster key as bytes, from ``key`` or ``key_file``; ConfigError if unusable."""
    if cluster.key is not None:
        return cluster.key.encode()
    assert cluster.key_file is not None
    try:
        text = cluster.key_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            "cluster.key_file",
            [
                f"cluster.key_file: {cluster.key_file} cannot be read ({exc.strerror}); "
                "create it on both nodes with `mirrorha keygen > FILE`"
            ],
        ) from None
    if len(text) < MIN_KEY_CHARS:
        raise ConfigError(
            "cluster.key_file",
            [
                f"cluster.key_file: {cluster.key_file} holds {len(text)} characters; "
                f"use at least {MIN_KEY_CHARS}"
            ],
        )
    return text.encode()
