"""The Vagrant lab files (vagrant/): they validate, parse, and the runner behaves.

- `vagrant validate --ignore-provider` on a copy of vagrant/ (with and without a built file in
  ../dist). No provider (VirtualBox, libvirt) is installed here or in CI: --ignore-provider
  skips only the provider blocks; box name, networks, provisioner paths and file sources are
  still checked (a test removes a provisioning script to prove it). No network, no box download.
- `bash -n` / `sh -n` on every shell script, the ExecStopPost helper compiles, the config loads
  with app.config, and every IPv4 address in vagrant/ is the lab's (198.18.0.0/15) or loopback.
- run-scenarios.sh against a fake `vagrant` (this module run as a script, a tiny simulated
  cluster): the happy path passes all scenarios, a VIP left on the killed node fails the
  failover scenario and exits non-zero, and missing VMs are reported before anything runs.

Limit: the real scenarios need the VMs (`cd vagrant && vagrant up && ./run-scenarios.sh`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "vagrant"
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
VAGRANT = shutil.which("vagrant")
needs_vagrant = pytest.mark.skipif(
    VAGRANT is None, reason="vagrant is not installed (apt-get install vagrant)"
)


def _lab_copy(tmp_path: Path, built: bool) -> Path:
    """vagrant/ copied to tmp_path/repo/vagrant (without .vagrant/), optionally with a dist/."""
    root = tmp_path / "repo"
    shutil.copytree(LAB, root / "vagrant", ignore=shutil.ignore_patterns(".vagrant"))
    if built:
        (root / "dist").mkdir()
        (root / "dist" / "mirrorha.pyz").write_bytes(b"#!/usr/bin/env python3\n")
    return root / "vagrant"


def _validate(lab: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert VAGRANT is not None
    env = {
        **os.environ,
        "VAGRANT_CWD": str(lab),
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check over the network
        "VAGRANT_NO_COLOR": "1",
    }
    return subprocess.run(
        [VAGRANT, "validate", "--ignore-provider"],
        cwd=lab,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@needs_vagrant
@pytest.mark.parametrize("built", [True, False], ids=["built", "not-built"])
def test_vagrantfile_validates(tmp_path: Path, built: bool) -> None:
    done = _validate(_lab_copy(tmp_path, built), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Vagrantfile validated successfully" in done.stdout


@needs_vagrant
def test_validate_catches_a_missing_provisioning_script(tmp_path: Path) -> None:
    lab = _lab_copy(tmp_path, built=True)
    (lab / "provision" / "node.sh").unlink()
    done = _validate(lab, tmp_path)
    assert done.returncode != 0
    assert "provision/node.sh" in done.stdout + done.stderr


def _scripts() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(LAB.rglob("*")):
        if ".vagrant" in path.parts or not path.is_file():
            continue
        first = path.read_text(errors="replace").split("\n", 1)[0]
        if first.startswith("#!") and first.endswith(("bash", "/sh")):
            found.append(("bash" if first.endswith("bash") else "sh", path))
    return found


def test_the_expected_shell_scripts_exist() -> None:
    names = {p.relative_to(LAB).as_posix() for _, p in _scripts()}
    assert names == {
        "run-scenarios.sh",
        "provision/packages.sh",
        "provision/node.sh",
        "provision/mirrorha",
        "provision/scripts/start_prim",
        "provision/scripts/stop_prim",
    }
    assert all(os.access(p, os.X_OK) for _, p in _scripts())


@pytest.mark.parametrize(("shell", "path"), _scripts(), ids=lambda v: getattr(v, "name", v))
def test_shell_script_parses(shell: str, path: Path) -> None:
    done = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_release_helper_compiles() -> None:
    path = LAB / "provision" / "release-after-stop"
    compile(path.read_text(), str(path), "exec")


def test_lab_config_loads_and_matches_the_topology(tmp_path: Path) -> None:
    config = pytest.importorskip("app.config", reason="app/config.py (the config loader) is absent")
    text = (LAB / "mirrorha.toml").read_text().replace("@PUB_IF@", "eth1")
    (tmp_path / "mirrorha.toml").write_text(text)
    (tmp_path / "cluster.key").write_text("k" * 64 + "\n")
    cfg = config.load(tmp_path / "mirrorha.toml")
    module = cfg.modules[0]
    assert (module.vip.address, module.vip.prefix, module.vip.interface) == (
        "198.18.1.100",
        24,
        "eth1",
    )
    assert module.splitbrain.witnesses == ("198.18.1.10",)
    nets = {n.name: n.addresses for n in cfg.cluster.networks}
    assert nets == {
        "pub": {"node1": "198.18.1.1", "node2": "198.18.1.2"},
        "repl": {"node1": "198.18.2.1", "node2": "198.18.2.2"},
    }


def test_every_address_in_the_lab_files_is_a_lab_address() -> None:
    seen = set()
    for path in LAB.rglob("*"):
        if ".vagrant" in path.parts or not path.is_file():
            continue
        for m in re.finditer(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text(errors="replace")):
            if m.group() == "255.255.255.0":  # the netmask
                continue
            seen.add(m.group())
            addr = ipaddress.ip_address(m.group())
            assert addr in LAB_NET or addr.is_loopback, f"{path}: {m.group()}"
    assert {"198.18.1.1", "198.18.1.2", "198.18.2.1", "198.18.1.10", "198.18.1.100"} <= seen


# --- run-scenarios.sh against a simulated cluster -------------------------------------------


def _run_runner(tmp_path: Path, **fake_env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vagrant"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "FAKE_LAB": str(tmp_path / "lab.json"),
        "POLL_S": "1",
        "SSH_TIMEOUT_S": "20",
        "START_WAIT_S": "3",
        "FAILOVER_WAIT_S": "3",
        "SYNC_WAIT_S": "3",
        **fake_env,
    }
    return subprocess.run(
        ["bash", str(LAB / "run-scenarios.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


SCENARIOS = ["first-start", "failover", "rejoin", "swap", "clean-stop"]


def test_runner_passes_every_scenario_on_a_healthy_cluster(tmp_path: Path) -> None:
    done = _run_runner(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in SCENARIOS:
        assert f"PASS {name}\n" in done.stdout
    assert "5 passed, 0 failed, 0 skipped" in done.stdout


def test_runner_fails_when_the_killed_node_keeps_the_vip(tmp_path: Path) -> None:
    done = _run_runner(tmp_path, FAKE_LAB_FAULT="vip-stays")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PASS first-start\n" in done.stdout
    assert "FAIL failover: timed out after 3s" in done.stdout
    assert "VIP on node2 only" in done.stdout
    assert "SKIP rejoin" in done.stdout
    assert "1 passed, 1 failed, 3 skipped" in done.stdout


def test_runner_stops_before_anything_when_a_vm_is_down(tmp_path: Path) -> None:
    done = _run_runner(tmp_path, FAKE_LAB_DOWN="client")
    assert done.returncode == 2
    assert "FAIL preflight: VM client is not running (run: vagrant up)" in done.stdout
    assert not json.loads((tmp_path / "lab.json").read_text())["commands"]


# --- the fake `vagrant`: python test_vagrant.py status|ssh ... --------------------------------

NODES = ("node1", "node2")


def _fake_vagrant(argv: list[str]) -> int:
    """Just enough of a two-node cluster, in a JSON file, for run-scenarios.sh's commands."""
    path = Path(os.environ["FAKE_LAB"])
    lab = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "up": dict.fromkeys(NODES, False),
            "state": dict.fromkeys(NODES, "STOP"),
            "vip": dict.fromkeys(NODES, False),
            "files": {n: {} for n in NODES},
            "commands": [],
        }
    )
    down = os.environ.get("FAKE_LAB_DOWN", "")
    rc = 0
    if argv[:1] == ["status"]:
        for vm in (*NODES, "client"):
            print(f"1700000000,{vm},state,{'poweroff' if vm == down else 'running'}")
    elif argv[:1] == ["ssh"] and argv[2] == "-c":
        vm, cmd = argv[1], argv[3]
        lab["commands"].append([vm, cmd])
        rc = _fake_command(lab, vm, cmd)
    else:
        print(f"fake vagrant: unexpected {argv}", file=sys.stderr)
        rc = 99
    path.write_text(json.dumps(lab))
    return rc


def _fake_command(lab: dict, vm: str, cmd: str) -> int:  # type: ignore[type-arg]
    up, state, vip, files = lab["up"], lab["state"], lab["vip"], lab["files"]
    peer = {"node1": "node2", "node2": "node1"}.get(vm, "")
    primary = ("PRIM", "ALONE")
    if cmd.startswith("test -x"):
        return 0
    if "find /var/lib/mirrorha" in cmd:
        up[vm], state[vm], vip[vm], files[vm] = False, "STOP", False, {}
        return 0
    if m := re.fullmatch(r"printf '%s\\n' '(.*)' \| sudo tee \S+/(\S+) >/dev/null", cmd):
        files[vm][m[2]] = m[1]
        if state[vm] == "PRIM" and state[peer] == "SECOND":
            files[peer][m[2]] = m[1]
        return 0
    if m := re.fullmatch(r"sudo cat \S+/(\S+) 2>/dev/null", cmd):
        print(files[vm].get(m[1], ""))
        return 0
    if cmd == "sudo systemctl start mirrorha":
        up[vm] = True
        if state[peer] == "ALONE":  # rejoin: resync from the survivor
            state[vm], state[peer], files[vm] = "SECOND", "PRIM", dict(files[peer])
        else:
            state[vm] = "WAIT"
        return 0
    if cmd == "sudo systemctl stop mirrorha":
        up[vm] = False
        return 0
    if m := re.match(r"sudo mirrorha (\w+) ", cmd):
        if not up[vm]:
            return 1
        if m[1] == "state":
            print(f"{state[vm]} (peer {state[peer]})")
        elif m[1] == "prim":
            state[vm], vip[vm] = "PRIM", True
            if state[peer] == "WAIT":
                state[peer], files[peer] = "SECOND", dict(files[vm])
        elif m[1] == "swap":
            state[vm], state[peer] = state[peer], state[vm]
            vip[vm], vip[peer] = vip[peer], vip[vm]
        elif m[1] == "stop":
            if state[vm] == "SECOND" and state[peer] == "PRIM":
                state[peer] = "ALONE"
            state[vm], vip[vm] = "STOP", False
        return 0
    if "MainPID" in cmd:
        print("4242 4343" if up[vm] and state[vm] in primary else "0")
        return 0
    if cmd.startswith("sudo kill -9"):
        up[vm], state[vm] = False, "STOP"
        vip[vm] = os.environ.get("FAKE_LAB_FAULT") == "vip-stays"
        if state[peer] == "SECOND":
            state[peer], vip[peer] = "ALONE", True
        return 0
    if cmd.startswith("ip -o -4 addr show to 198.18.1.100/32"):
        print("yes" if vip[vm] else "no")
        return 0
    if cmd.startswith("curl") and vm == "client":
        serving = [n for n in NODES if vip[n] and up[n] and state[n] in primary]
        print("up" if serving and not (vip["node1"] and vip["node2"]) else "down")
        return 0
    if "systemctl show -p Result" in cmd:
        print("success")
        return 0
    if cmd.startswith("findmnt"):
        print("none")
        return 0
    print(f"fake vagrant: unexpected command on {vm}: {cmd}", file=sys.stderr)
    return 99


if __name__ == "__main__":
    raise SystemExit(_fake_vagrant(sys.argv[1:]))
