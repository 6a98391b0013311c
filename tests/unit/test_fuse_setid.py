"""The set-ID rule the mount applies for the kernel (fusebinding.setid_cleared) and how it
learns who made a request (request_caller)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from app.mirror import fusebinding
from app.mirror.fusebinding import Caller, request_caller, setid_cleared


@pytest.fixture(autouse=True)
def no_request_left() -> Iterator[None]:
    """The caller a test sets for this thread does not outlive the test."""
    yield
    fusebinding.set_request(os.getuid(), os.getgid(), os.getpid())


def _st(mode: int, gid: int = 100) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, 0, gid, 0, 0, 0, 0))


PLAIN = Caller(fsetid=False, groups=frozenset({65534}))
MEMBER = Caller(fsetid=False, groups=frozenset({65534, 100}))
ROOT = Caller(fsetid=True, groups=frozenset({0}))


@pytest.mark.parametrize(
    ("mode", "caller", "left"),
    [
        (0o755, PLAIN, None),  # nothing to clear
        (0o4755, PLAIN, 0o755),
        (0o4755, ROOT, None),  # CAP_FSETID keeps everything
        (0o2755, PLAIN, 0o755),  # setgid with group execute: cleared for anyone
        (0o2755, MEMBER, 0o755),
        (0o2745, MEMBER, None),  # without group execute (mandatory locking): a member keeps it
        (0o2745, PLAIN, 0o745),  # ... a writer outside the group does not
        (0o6777, PLAIN, 0o777),
        (0o6777, ROOT, None),
        (0o7777, PLAIN, 0o1777),  # the sticky bit is not a set-ID bit
    ],
)
def test_setid_cleared_follows_the_kernels_rule(
    monkeypatch: pytest.MonkeyPatch, mode: int, caller: Caller, left: int | None
) -> None:
    monkeypatch.setattr(fusebinding, "request_caller", lambda: caller)
    assert setid_cleared(_st(mode)) == left


def test_a_file_without_set_id_bits_never_asks_who_the_caller_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unexpected() -> Caller:
        raise AssertionError("request_caller called for a plain file")

    monkeypatch.setattr(fusebinding, "request_caller", unexpected)
    assert setid_cleared(_st(0o644)) is None


def test_request_caller_reads_the_callers_capabilities_and_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fusebinding.set_request(0, 0, os.getpid())
    me = request_caller()
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    assert me.fsetid == bool(int(status["CapEff"], 16) >> fusebinding.CAP_FSETID & 1)
    assert me.groups == set(os.getgroups()) | {int(status["Gid"].split()[3])}


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 12345])  # none, unmapped, above pid_max
def test_a_caller_that_cannot_be_read_gets_no_privilege(
    monkeypatch: pytest.MonkeyPatch, pid: int
) -> None:
    fusebinding.set_request(0, 0, pid)
    assert request_caller() == Caller(fsetid=False, groups=frozenset())
