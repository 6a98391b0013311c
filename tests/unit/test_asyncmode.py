"""Pure parts of the async mirror (block diff, excludes, move pairing, lag) and fusecheck."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st
from inotify_simple import flags

from app.mirror import fusecheck
from app.mirror.asyncmode import (
    DIGEST_SIZE,
    AsyncMirror,
    LagStats,
    Moved,
    block_sums,
    changed_ranges,
    has_unpaired_from,
    is_excluded,
    pair_moves,
    percentile,
)

BS = 4


# -- block diff ---------------------------------------------------------------------------


def test_block_sums_are_one_digest_per_block() -> None:
    assert block_sums(b"", BS) == b""
    assert len(block_sums(b"abcdefghi", BS)) == 3 * DIGEST_SIZE
    assert block_sums(b"abcd", BS) == block_sums(b"abcdXXXX", BS)[:DIGEST_SIZE]


def test_identical_data_has_no_changed_range() -> None:
    data = b"0123456789abcdef"
    sums = block_sums(data, BS)
    assert changed_ranges(sums, sums, BS, len(data)) == []


def test_one_changed_block_in_the_middle() -> None:
    old, new = b"aaaabbbbccccdddd", b"aaaabbXbccccdddd"
    assert changed_ranges(block_sums(old, BS), block_sums(new, BS), BS, len(new)) == [(4, 4)]


def test_adjacent_changed_blocks_merge_and_gaps_split() -> None:
    old, new = b"aaaabbbbccccddddeeee", b"XaaabbbXccccXddde"
    got = changed_ranges(block_sums(old, BS), block_sums(new, BS), BS, len(new))
    assert got == [(0, 8), (12, 5)]  # the last range ends at the new length


def test_growth_sends_the_new_blocks_and_a_partial_last_block() -> None:
    old, new = b"aaaabb", b"aaaabbbbcc"
    assert changed_ranges(block_sums(old, BS), block_sums(new, BS), BS, len(new)) == [(4, 6)]


def test_new_file_is_sent_whole() -> None:
    new = b"0123456789"
    assert changed_ranges(b"", block_sums(new, BS), BS, len(new)) == [(0, 10)]


def test_shrink_sends_only_a_changed_partial_last_block() -> None:
    old = b"aaaabbbbcccc"
    assert changed_ranges(block_sums(old, BS), block_sums(b"aaaabbbb", BS), BS, 8) == []
    assert changed_ranges(block_sums(old, BS), block_sums(b"aaaab", BS), BS, 5) == [(4, 1)]


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_applying_the_ranges_rebuilds_the_new_data(old: bytes, new: bytes) -> None:
    peer = bytearray(old)
    for offset, length in changed_ranges(block_sums(old, BS), block_sums(new, BS), BS, len(new)):
        assert length > 0 and offset % BS == 0 and offset + length <= len(new)
        peer[offset : offset + length] = new[offset : offset + length]
    del peer[len(new) :]  # the Truncate that follows the writes
    assert bytes(peer) == new


# -- excludes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "patterns", "excluded"),
    [
        (b"a/b/file.tmp", ("*.tmp",), True),
        (b"a/b/file.txt", ("*.tmp",), False),
        (b"cache", ("cache",), True),
        (b"x/cache/deep/file", ("cache",), True),
        (b"x/cachet/file", ("cache",), False),
        (b"logs/old.gz", ("logs/*.gz",), True),
        (b"sub/logs/old.gz", ("logs/*.gz",), False),
        (b"anything", (), False),
        (b"", ("*",), False),  # the root itself is never excluded
        (b"caf\xe9/x", ("caf*",), True),  # names need not be UTF-8
    ],
)
def test_is_excluded(path: bytes, patterns: tuple[str, ...], excluded: bool) -> None:
    assert is_excluded(path, patterns) is excluded


# -- move pairing -------------------------------------------------------------------------


class Ev(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: str


FROM, TO, CREATE = int(flags.MOVED_FROM), int(flags.MOVED_TO), int(flags.CREATE)


def test_a_from_and_its_to_become_one_move_in_place() -> None:
    a = Ev(1, CREATE, 0, "a")
    f = Ev(1, FROM, 7, "old")
    t = Ev(2, TO, 7, "new")
    b = Ev(1, CREATE, 0, "b")
    assert pair_moves([a, f, t, b]) == [a, Moved(f, t), b]


def test_pairs_are_found_across_interleaved_events() -> None:
    f1, f2 = Ev(1, FROM, 1, "x"), Ev(1, FROM, 2, "y")
    other = Ev(3, CREATE, 0, "z")
    t2, t1 = Ev(1, TO, 2, "y2"), Ev(1, TO, 1, "x2")
    assert pair_moves([f1, f2, other, t2, t1]) == [Moved(f1, t1), Moved(f2, t2), other]


def test_unpaired_moves_stay_as_moves_out_and_in() -> None:
    out = Ev(1, FROM, 5, "leaving")
    into = Ev(1, TO, 6, "arriving")
    items = pair_moves([out, into])
    assert items == [out, into]
    assert has_unpaired_from(items)
    assert not has_unpaired_from(pair_moves([into]))


def test_a_to_before_its_from_is_not_paired() -> None:
    t, f = Ev(1, TO, 9, "b"), Ev(1, FROM, 9, "a")
    assert pair_moves([t, f]) == [t, f]


# -- lag ----------------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


def test_lag_summary_covers_the_last_minute() -> None:
    lag = LagStats()
    assert lag.summary(0.0)["p99"] is None
    lag.record(0.0, 5000.0)
    for i in range(10):
        lag.record(100.0 + i, float(i + 1))
    summary = lag.summary(120.0)
    assert summary == {"p50": 5.0, "p99": 10.0, "max": 10.0, "last": 10.0, "count": 10}
    assert lag.summary(1000.0)["last"] == 10.0  # old samples age out, the last value stays


def test_status_says_async_with_a_bound(tmp_path: Path) -> None:
    mirror = AsyncMirror(tmp_path, lambda op: None, settle_ms=50)
    status = mirror.status()
    assert status["mode"] == "async"
    assert status["note"] == "async: up to 50 ms of writes can be lost on failover"
    assert status["running"] is False


def test_block_size_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_size"):
        AsyncMirror(tmp_path, lambda op: None, block_size=0)


# -- fusecheck ----------------------------------------------------------------------------


def _probes(monkeypatch: pytest.MonkeyPatch, dev: str | None, root: str | None) -> None:
    monkeypatch.setattr(fusecheck, "probe_dev_fuse", lambda: dev)
    monkeypatch.setattr(fusecheck, "probe_root", lambda: root)


def test_fuse_usable_when_every_probe_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    _probes(monkeypatch, None, None)
    assert fusecheck.fuse_unavailable_reason() is None


def test_every_missing_piece_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _probes(monkeypatch, "/dev/fuse does not exist: x", "mirrorha is not root: y")
    assert fusecheck.fuse_unavailable_reason() == (
        "/dev/fuse does not exist: x; mirrorha is not root: y"
    )


def test_missing_dev_fuse(tmp_path: Path) -> None:
    reason = fusecheck.probe_dev_fuse(os.path.join(tmp_path, "fuse"))
    assert reason is not None and "does not exist" in reason and "modprobe fuse" in reason


def test_dev_fuse_that_cannot_be_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fusecheck.os, "open", refuse)
    reason = fusecheck.probe_dev_fuse()
    assert reason is not None and "cannot be opened read-write" in reason


def test_mounting_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fusecheck.os, "geteuid", lambda: 0)
    assert fusecheck.probe_root() is None
    monkeypatch.setattr(fusecheck.os, "geteuid", lambda: 1000)
    reason = fusecheck.probe_root()
    assert reason is not None and "not root" in reason and "CAP_SYS_ADMIN" in reason
