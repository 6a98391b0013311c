"""The application script runner, with real tiny shell scripts in a temporary directory."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cluster.scripts import ScriptError, ScriptResult, ScriptRunner, script_env


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def script_dir(tmp_path: Path) -> Path:
    d = tmp_path / "scripts"
    d.mkdir()
    return d


def make_runner(script_dir: Path, state_dir: Path, **kwargs: float) -> ScriptRunner:
    env = script_env(
        module="web",
        node="node1",
        peer="node2",
        vip="198.18.1.100/24",
        dirs=["/srv/a", "/srv/b"],
        state_dir=state_dir,
        user={"APP_PORT": "8080"},
    )
    params: dict[str, float] = {"timeout_s": 10.0, "kill_grace_s": 1.0}
    params.update(kwargs)
    return ScriptRunner(
        script_dir,
        env,
        params.pop("timeout_s"),
        logging.getLogger("test.scripts"),
        **params,  # type: ignore[arg-type]
    )


def run(coro: object) -> ScriptResult:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def kill_leftovers(state_dir: Path) -> Iterator[list[int]]:
    """Process groups to kill after the test, plus those of every *.pid file in state_dir."""
    pgids: list[int] = []
    yield pgids
    for pid_file in state_dir.glob("*.pid"):
        for word in pid_file.read_text().split():
            try:
                pgids.append(os.getpgid(int(word)))
            except (ValueError, ProcessLookupError):
                pass
    for pgid in set(pgids):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_script_sees_arguments_and_environment(script_dir: Path, state_dir: Path) -> None:
    out = state_dir / "seen"
    write_script(
        script_dir,
        "start_prim",
        f'echo "$@" > {out}\nenv | grep -E "^(MIRRORHA_|APP_PORT=)" | sort >> {out}',
    )
    result = run(make_runner(script_dir, state_dir).run("start_prim", "WAIT", "PRIM", "start"))
    assert result.ok and result.returncode == 0 and not result.timed_out
    lines = out.read_text().splitlines()
    assert lines[0] == "WAIT PRIM start"
    env = dict(line.split("=", 1) for line in lines[1:])
    assert env == {
        "APP_PORT": "8080",
        "MIRRORHA_ACTION": "start",
        "MIRRORHA_DIRS": "/srv/a:/srv/b",
        "MIRRORHA_FORCE": "",
        "MIRRORHA_MODULE": "web",
        "MIRRORHA_NEXT_STATE": "PRIM",
        "MIRRORHA_NODE": "node1",
        "MIRRORHA_PEER": "node2",
        "MIRRORHA_SCRIPT": "start_prim",
        "MIRRORHA_STATE": "WAIT",
        "MIRRORHA_STATE_DIR": str(state_dir),
        "MIRRORHA_VIP": "198.18.1.100/24",
    }


def test_failure_and_output_are_reported(
    script_dir: Path, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_script(script_dir, "stop_second", "echo going down\necho disk full >&2\nexit 3")
    with caplog.at_level(logging.INFO, logger="test.scripts"):
        result = run(
            make_runner(script_dir, state_dir).run("stop_second", "SECOND", "WAIT", "stop")
        )
    assert not result.ok
    assert result.returncode == 3
    assert result.output_tail == ("going down", "disk full")
    assert "[stop_second] disk full" in caplog.text
    assert "failed with exit code 3" in caplog.text


def test_output_tail_keeps_the_last_lines(script_dir: Path, state_dir: Path) -> None:
    write_script(script_dir, "transition", "for i in $(seq 1 50); do echo line $i; done")
    runner = make_runner(script_dir, state_dir, tail_lines=3)
    result = run(runner.run("transition", "STOP", "WAIT", "start"))
    assert result.ok
    assert result.output_tail == ("line 48", "line 49", "line 50")


def test_missing_script_is_success(script_dir: Path, state_dir: Path) -> None:
    result = run(make_runner(script_dir, state_dir).run("prestart", "STOP", "WAIT", "start"))
    assert result.ok and result.missing and result.returncode is None


def test_non_executable_script_fails_with_reason(script_dir: Path, state_dir: Path) -> None:
    write_script(script_dir, "start_both", "exit 0").chmod(0o644)
    result = run(make_runner(script_dir, state_dir).run("start_both", "WAIT", "PRIM", "start"))
    assert not result.ok
    assert "cannot execute" in result.output_tail[0]


def test_timeout_kills_the_whole_process_group(script_dir: Path, state_dir: Path) -> None:
    child_pid = state_dir / "child.pid"
    # the script ignores SIGTERM and leaves a child behind: both must be gone afterwards
    write_script(
        script_dir,
        "stop_prim",
        f"trap '' TERM\nsleep 300 &\necho $! > {child_pid}\necho started\nwait",
    )
    runner = make_runner(script_dir, state_dir, timeout_s=1.0, kill_grace_s=0.5)
    result = run(runner.run("stop_prim", "PRIM", "WAIT", "stop"))
    assert result.timed_out and not result.ok
    assert result.output_tail[0] == "started"
    assert "timed out" in result.output_tail[-1]
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_stop_runs_graceful_then_forced(script_dir: Path, state_dir: Path) -> None:
    calls = state_dir / "calls"
    write_script(script_dir, "stop_prim", f'echo "$* [$MIRRORHA_FORCE]" >> {calls}')
    runner = make_runner(script_dir, state_dir)
    result = asyncio.run(runner.run_stop("stop_prim", "PRIM", "STOP", "stop"))
    assert result.ok and result.graceful.ok and result.forced.forced
    assert calls.read_text().splitlines() == ["PRIM STOP stop []", "PRIM STOP stop force [1]"]


def test_background_app_is_tracked_and_forgotten(
    script_dir: Path, state_dir: Path, kill_leftovers: list[int]
) -> None:
    # one daemon left in the script's own group, one in its own session declared in app.pid
    write_script(
        script_dir,
        "start_prim",
        f"sleep 300 >/dev/null 2>&1 &\necho $! > {state_dir}/inside.pid\n"
        "setsid sleep 301 >/dev/null 2>&1 &\n"
        'echo $! > "$MIRRORHA_STATE_DIR/app.pid"',
    )
    write_script(
        script_dir,
        "stop_prim",
        f'kill -9 $(cat {state_dir}/inside.pid) $(cat "$MIRRORHA_STATE_DIR/app.pid") || true',
    )
    runner = make_runner(script_dir, state_dir)

    async def scenario() -> tuple[list[int], set[int], list[int]]:
        assert (await runner.run("start_prim", "WAIT", "PRIM", "start")).ok
        pids = [int((state_dir / f).read_text()) for f in ("inside.pid", "app.pid")]
        expected: set[int] = set()
        for _ in range(100):  # the setsid child may need a moment to create its session
            expected = {os.getpgid(pid) for pid in pids}
            if len(expected) == 2:
                break
            await asyncio.sleep(0.05)
        kill_leftovers.extend(expected)
        tracked = runner.app_pgids()
        await runner.run_stop("stop_prim", "PRIM", "STOP", "stop")
        return tracked, expected, runner.app_pgids()

    tracked, expected, after = asyncio.run(scenario())
    assert set(tracked) == expected and len(expected) == 2
    assert after == []
    assert not (state_dir / "app.pid").exists()


def test_daemon_keeping_output_open_does_not_hang(
    script_dir: Path, state_dir: Path, kill_leftovers: list[int]
) -> None:
    write_script(
        script_dir,
        "start_second",
        'sleep 300 &\necho $! > "$MIRRORHA_STATE_DIR/bg.pid"\necho started',
    )
    runner = make_runner(script_dir, state_dir, timeout_s=60.0)

    async def scenario() -> ScriptResult:
        result = await runner.run("start_second", "WAIT", "SECOND", "start")
        kill_leftovers.extend(runner.app_pgids())
        return result

    result = asyncio.run(scenario())
    assert result.ok and not result.timed_out
    assert result.output_tail == ("started",)
    assert len(kill_leftovers) == 1  # the sleep still runs in the script's group


def test_unknown_names_are_refused(script_dir: Path, state_dir: Path) -> None:
    runner = make_runner(script_dir, state_dir)
    with pytest.raises(ScriptError, match="unknown application script 'start_primary'"):
        run(runner.run("start_primary", "WAIT", "PRIM", "start"))
    with pytest.raises(ScriptError, match="reserved"):
        script_env(
            module="m",
            node="a",
            peer="b",
            vip=None,
            dirs=[],
            state_dir="/x",
            user={"MIRRORHA_NODE": "x"},
        )
    with pytest.raises(ScriptError, match="unknown application script"):
        ScriptRunner({"start": "/bin/true"}, {}, 1.0, logging.getLogger("x"))


def test_mapping_of_paths(tmp_path: Path, state_dir: Path) -> None:
    path = write_script(tmp_path, "anything.sh", "echo from mapping")
    runner = ScriptRunner({"start_both": path}, {}, 5.0, logging.getLogger("x"))
    result = run(runner.run("start_both", "WAIT", "PRIM", "start"))
    assert result.ok and result.output_tail == ("from mapping",)
    assert run(runner.run("start_prim", "WAIT", "PRIM", "start")).missing
