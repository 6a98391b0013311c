"""FUSE fixtures for the integration tests: honest skips and mounts that never outlive a test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest


def fuse_skip_reason() -> str | None:
    """Why a real FUSE mount cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "FUSE tests need root (allow_other, chown, mounting over a directory)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE kernel module in this machine or container)"
    return None


def _mirrorha_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if " fuse.mirrorha " in line]


@pytest.fixture
def fuse_required() -> None:
    reason = fuse_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def mount_factory(fuse_required: None) -> Iterator[Callable[..., object]]:
    """``mount_factory(path, replicator, **kw)`` -> a live MirrorMount, stopped after the test."""
    from app.mirror.mount import MirrorMount

    mounts: list[MirrorMount] = []

    def make(path: str, replicator: object, **kwargs: object) -> MirrorMount:
        mount = MirrorMount(path, replicator, **kwargs)  # type: ignore[arg-type]
        mounts.append(mount)
        mount.start()
        mount.wait_ready(10.0)
        return mount

    try:
        yield make
    finally:
        for mount in reversed(mounts):
            mount.stop()


@pytest.fixture(scope="module")
def no_mount_left_behind() -> Iterator[None]:
    """Use in a FUSE test module: after its last test, no mirrorha mount may remain."""
    before = _mirrorha_mounts()
    yield
    assert _mirrorha_mounts() == before, "a mirrorha FUSE mount was left behind"
