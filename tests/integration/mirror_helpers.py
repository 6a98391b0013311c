"""Helpers shared by the channel and resync integration tests: two services on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.mirror.service import MirrorService

KEY = b"k" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pair(tmp: Path, port: int, **kw: Any) -> tuple[MirrorService, MirrorService]:
    """(primary service on tmp/p, secondary service on tmp/s), both not started."""
    for name in ("p", "s", "pstate", "sstate"):
        (tmp / name).mkdir(exist_ok=True)
    common: dict[str, Any] = dict(
        key=KEY,
        cluster="c1",
        port=port,
        ack_timeout_s=kw.pop("ack_timeout_s", 5.0),
        bandwidth_mbps=kw.pop("bandwidth_mbps", 0.0),
    )
    prim = MirrorService(
        dirs=[(tmp / "p", ())],
        state_dir=tmp / "pstate",
        node="n1",
        peer="n2",
        local_ip="127.0.0.1",
        peer_ip="127.0.0.1",
        log=logging.getLogger("test.prim"),
        **common,
    )
    sec = MirrorService(
        dirs=[(tmp / "s", ())],
        state_dir=tmp / "sstate",
        node="n2",
        peer="n1",
        local_ip="127.0.0.1",
        peer_ip="127.0.0.1",
        log=logging.getLogger("test.sec"),
        **common,
    )
    return prim, sec


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.02)


def sync_pair(prim: MirrorService, sec: MirrorService, full: bool = False) -> None:
    run(sec.start_resync("target", full))
    run(prim.start_resync("source", full))
    wait_for(
        lambda: prim.mirror_state() == "connected" and sec.resync_state() == "done",
        what=f"resync: {prim.status()} / {sec.resync_state()}",
    )


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    for _ in range(100000):
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
        if pos >= size:
            break
    return out


def snapshot(root: Path, *, dir_times: bool = False) -> dict[str, tuple[Any, ...]]:
    """Everything a user would compare: type, content digest, size, holes, mode, owner,
    file times, links (by inode groups), xattrs."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            xattrs = (
                ()
                if stat.S_ISLNK(st.st_mode)
                else tuple(sorted((n, os.getxattr(full, n)) for n in os.listxattr(full)))
            )
            base = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                    holes = _extents(f.fileno(), st.st_size)
                link = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
                out[rel] = (*base, st.st_size, digest, holes, st.st_mtime_ns, link)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (*base, os.readlink(full), st.st_mtime_ns)
            else:
                out[rel] = (*base, st.st_mtime_ns if dir_times else 0)
    return out


def assert_same(a: Path, b: Path, **kw: Any) -> None:
    sa, sb = snapshot(a, **kw), snapshot(b, **kw)
    if sa != sb:
        diff = {
            k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)
        }
        raise AssertionError(f"trees differ: {diff}")
