"""verify.compare_attrs: which attribute differences it names, times included by file type."""

from __future__ import annotations

import stat

from app.mirror.resync_codec import Entry
from app.mirror.verify import TIMES_OF_ALL, TIMES_OF_FILES, compare_attrs


def _entry(mode: int, mtime_ns: int, size: int = 0) -> Entry:
    return Entry(b"x", mode, 0, 0, size, 5, mtime_ns, 1, 1)


def test_an_mtime_difference_is_named_with_both_times_in_utc() -> None:
    mine, theirs = _entry(stat.S_IFREG | 0o644, 10**18), _entry(stat.S_IFREG | 0o644, 2 * 10**18)
    diffs = compare_attrs("/d/x", mine, theirs, TIMES_OF_ALL)
    assert [(d.path, d.kind) for d in diffs] == [("/d/x", "times")]
    assert diffs[0].detail == (
        "modified 2001-09-09 01:46:40.000000000 UTC here, "
        "2033-05-18 03:33:20.000000000 UTC on the peer"
    )


def test_times_are_compared_only_for_the_types_asked_and_atime_never() -> None:
    d1, d2 = _entry(stat.S_IFDIR | 0o755, 1), _entry(stat.S_IFDIR | 0o755, 2)
    assert [d.kind for d in compare_attrs("/d", d1, d2, TIMES_OF_ALL)] == ["times"]
    # the async mode does not replicate directory times: not a difference there
    assert compare_attrs("/d", d1, d2, TIMES_OF_FILES) == []
    assert compare_attrs("/d", d1, d2) == []  # no types given: no times compared
    f1 = _entry(stat.S_IFREG | 0o600, 7)
    f2 = Entry(b"x", stat.S_IFREG | 0o600, 0, 0, 0, 999, 7, 1, 1)  # another atime only
    assert compare_attrs("/f", f1, f2, TIMES_OF_ALL) == []


def test_a_type_change_is_one_mode_difference_whatever_the_times() -> None:
    diffs = compare_attrs(
        "/p", _entry(stat.S_IFREG | 0o644, 1), _entry(stat.S_IFDIR | 0o755, 2), TIMES_OF_ALL
    )
    assert [(d.kind, d.detail) for d in diffs] == [
        ("mode", "a regular file here, a directory on the peer")
    ]
