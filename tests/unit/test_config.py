"""Configuration validation: every broken file is refused with the key named, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, load, load_key, loads

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

GOOD = """
[cluster]
name = "lab"
key = "0123456789abcdef0123456789abcdef"

[[cluster.nodes]]
name = "node1"
admin = "198.18.1.1"

[[cluster.nodes]]
name = "node2"
admin = "198.18.1.2"

[[cluster.networks]]
name = "pub"
addresses = { node1 = "198.18.1.1", node2 = "198.18.1.2" }

[[cluster.networks]]
name = "repl"
addresses = { node1 = "198.18.2.1", node2 = "198.18.2.2" }
replication = true

[[modules]]
name = "demo"
pulse_ms = 700
timeout_ms = 3000

[modules.vip]
address = "198.18.1.100"
prefix = 24
interface = "eth0"

[[modules.replicated]]
path = "/srv/data"
exclude = ["*.tmp"]

[[modules.replicated]]
path = "/srv/other"

[modules.splitbrain]
witnesses = ["198.18.1.254"]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, source="t.toml")
    return info.value.problems


def test_good_config_loads_with_defaults() -> None:
    cfg = loads(GOOD)
    assert cfg.cluster.name == "lab"
    assert cfg.cluster.peer_of("node1").name == "node2"
    assert cfg.cluster.replication_network.name == "repl"
    m = cfg.module()
    assert m.vip is not None and m.vip.address == "198.18.1.100"
    assert m.heartbeat_port == 7410 and m.failback == "stay" and m.failover is True
    assert [str(r.path) for r in m.replicated] == ["/srv/data", "/srv/other"]
    assert load_key(cfg.cluster) == b"0123456789abcdef0123456789abcdef"


# Each case: (what is broken, edit of GOOD, the key the message must name, a phrase of it)
BROKEN = [
    (
        "syntax error",
        lambda t: t.replace('name = "lab"', 'name = "lab'),
        "TOML syntax error",
        "line",
    ),
    (
        "missing key",
        lambda t: t.replace('admin = "198.18.1.2"\n', ""),
        "cluster.nodes[1].admin",
        "missing",
    ),
    (
        "unknown key",
        lambda t: t.replace("pulse_ms = 700", "pulse_ms = 700\npulse = 1"),
        "modules[0].pulse",
        "unknown key",
    ),
    (
        "wrong type",
        lambda t: t.replace("timeout_ms = 3000", 'timeout_ms = "3s"'),
        "modules[0].timeout_ms",
        "must be an integer",
    ),
    (
        "bad address",
        lambda t: t.replace('admin = "198.18.1.1"', 'admin = "198.18.1.300"'),
        "cluster.nodes[0].admin",
        "is not an IP address",
    ),
    (
        "VIP outside its network",
        lambda t: t.replace('address = "198.18.1.100"', 'address = "198.18.9.100"'),
        "modules[0].vip.address",
        "outside every heartbeat network",
    ),
    (
        "same node twice",
        lambda t: t.replace('name = "node2"', 'name = "node1"'),
        "cluster.nodes[1].name",
        "same node twice",
    ),
    (
        "relative directory",
        lambda t: t.replace('path = "/srv/other"', 'path = "srv/other"'),
        "modules[0].replicated[1].path",
        "relative",
    ),
    (
        "overlapping directories",
        lambda t: t.replace('path = "/srv/other"', 'path = "/srv/data/sub"'),
        "modules[0].replicated[1].path",
        "overlaps",
    ),
    (
        "timeout shorter than pulses",
        lambda t: t.replace("timeout_ms = 3000", "timeout_ms = 1000"),
        "modules[0].timeout_ms",
        "shorter than 3 pulses",
    ),
    (
        "short key",
        lambda t: t.replace('key = "0123456789abcdef0123456789abcdef"', 'key = "secret"'),
        "cluster.key",
        "at least 32",
    ),
    (
        "three nodes",
        lambda t: t.replace(
            "[[cluster.networks]]",
            '[[cluster.nodes]]\nname = "node3"\nadmin = "198.18.1.3"\n\n[[cluster.networks]]',
            1,
        ),
        "cluster.nodes",
        "exactly 2 nodes",
    ),
    (
        "network missing a node",
        lambda t: t.replace(
            'addresses = { node1 = "198.18.2.1", node2 = "198.18.2.2" }',
            'addresses = { node1 = "198.18.2.1" }',
        ),
        "cluster.networks[1].addresses.node2",
        "missing",
    ),
    (
        "network names unknown node",
        lambda t: t.replace('node2 = "198.18.2.2"', 'node2 = "198.18.2.2", node9 = "198.18.2.9"'),
        "cluster.networks[1].addresses.node9",
        "not a node",
    ),
    (
        "bad port",
        lambda t: t.replace("pulse_ms = 700", "pulse_ms = 700\nheartbeat_port = 70000"),
        "modules[0].heartbeat_port",
        "not a port",
    ),
    (
        "bad prefix",
        lambda t: t.replace("prefix = 24", "prefix = 40"),
        "modules[0].vip.prefix",
        "not a prefix length",
    ),
    (
        "bad failback",
        lambda t: t.replace("pulse_ms = 700", 'pulse_ms = 700\nfailback = "node7"'),
        "modules[0].failback",
        "neither 'stay' nor a node",
    ),
    (
        "bad witness",
        lambda t: t.replace('witnesses = ["198.18.1.254"]', 'witnesses = ["router"]'),
        "modules[0].splitbrain.witnesses[0]",
        "not an IP address",
    ),
    (
        "root replicated",
        lambda t: t.replace('path = "/srv/other"', 'path = "/"'),
        "modules[0].replicated[1].path",
        "root directory",
    ),
    ("no modules", lambda t: t[: t.index("[[modules]]")], "modules", "missing"),
    (
        "bad checker action",
        lambda t: (
            t
            + '\n[[modules.checkers]]\nname = "c"\nkind = "tcp"\n'
            + 'target = "127.0.0.1:80"\naction = "reboot"\n'
        ),
        "modules[0].checkers[0].action",
        "not one of",
    ),
    (
        "boolean for number",
        lambda t: t.replace("pulse_ms = 700", "pulse_ms = true"),
        "modules[0].pulse_ms",
        "must be an integer",
    ),
]


@pytest.mark.parametrize(("what", "edit", "key", "phrase"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_names_the_key(what: str, edit, key: str, phrase: str) -> None:
    text = edit(GOOD)
    assert text != GOOD, f"the edit for {what!r} changed nothing"
    problems = problems_of(text)
    assert any(p.startswith(key) and phrase in p for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    text = GOOD.replace('admin = "198.18.1.1"', 'admin = "x"').replace("prefix = 24", "prefix = 99")
    problems = problems_of(text)
    assert any(p.startswith("cluster.nodes[0].admin") for p in problems)
    assert any(p.startswith("modules[0].vip.prefix") for p in problems)


def test_two_modules_must_not_collide() -> None:
    second = """
[[modules]]
name = "demo"

[[modules.replicated]]
path = "/srv/data/inner"
"""
    problems = problems_of(GOOD + second)
    assert any(p.startswith("modules[1].name") and "defined twice" in p for p in problems)
    assert any(p.startswith("modules[1].heartbeat_port") and "already used" in p for p in problems)
    assert any(p.startswith("modules[1].replicated") and "overlaps" in p for p in problems)


def test_missing_file_and_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")
    text = GOOD.replace('key = "0123456789abcdef0123456789abcdef"', 'key_file = "k.key"')
    (tmp_path / "c.toml").write_text(text)
    cfg = load(tmp_path / "c.toml")
    assert cfg.cluster.key_file == tmp_path / "k.key"
    with pytest.raises(ConfigError, match="keygen"):
        load_key(cfg.cluster)
    (tmp_path / "k.key").write_text("ab" * 32 + "\n")
    assert load_key(cfg.cluster) == b"ab" * 32


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_are_accepted(example: Path) -> None:
    cfg = load(example)
    assert cfg.modules


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_cli_config_check_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("timeout_ms = 3000", "timeout_ms = 100"))
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2
    assert "modules[0].timeout_ms" in r.stderr
    assert "Traceback" not in r.stderr
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    r = run_cli("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_cli_run_refuses_bad_config_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('name = "lab"', 'name = "Lab!"'))
    state = tmp_path / "state"
    r = run_cli("run", "--config", str(bad), "--state-dir", str(state))
    assert r.returncode == 2
    assert "cluster.name" in r.stderr
    assert not state.exists(), "a refused configuration must not create the state directory"


def test_cli_usage_errors_exit_2() -> None:
    assert run_cli("frobnicate").returncode == 2
    assert run_cli().returncode == 2
    r = run_cli("version")
    assert r.returncode == 0 and r.stdout.startswith("mirrorha ")
