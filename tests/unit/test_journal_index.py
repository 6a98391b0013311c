"""Unit tests of the journal's path indexes (app/mirror/journal_index.py): pure, no I/O.

``assert_index_agrees`` is the invariant the journal's model test (test_journal.py) also
checks after every step: the children map is exactly the one the keys call for, and
``under`` finds what a scan of every key finds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from app.mirror.journal_index import Handles, PathDict, PathSet, renamed, under, under_either

# Odd shapes included: the root, a leading, a trailing and a doubled slash.
NAMES = [b"", b"a", b"b", b"a/x", b"a/x/y", b"a/xy", b"b/x", b"a/", b"/a", b"a//x", b"ab"]


def expected_links(keys: Iterable[bytes]) -> dict[bytes, set[bytes]]:
    """The children map built from scratch: every key and its ancestors, under their parent."""
    links: dict[bytes, set[bytes]] = {}
    for k in keys:
        p = k
        while p:
            up = p.rpartition(b"/")[0]
            links.setdefault(up, set()).add(p)
            p = up
    return links


def assert_index_agrees(c: PathSet | PathDict[Any], tops: Iterable[bytes] = ()) -> None:
    """``c``'s index agrees with its keys: a stale or missing link fails here."""
    keys = set(c)
    assert {p: set(kids) for p, kids in c.links.items()} == expected_links(keys)
    for top in {b"", *keys, *tops}:
        assert sorted(c.under(top)) == sorted(k for k in keys if under(k, top)), top


def test_under_finds_a_subtree_and_nothing_beside_it() -> None:
    s = PathSet([b"d", b"d/x", b"d/x/y", b"dx", b"e/f"])
    assert sorted(s.under(b"d")) == [b"d", b"d/x", b"d/x/y"]
    assert s.under(b"d/x/y") == [b"d/x/y"]
    assert s.under(b"e") == [b"e/f"]
    assert s.under(b"nowhere") == []
    assert sorted(s.under(b"")) == sorted(s)


def test_removing_the_last_key_of_a_tree_leaves_no_link() -> None:
    d: PathDict[int] = PathDict()
    d[b"a/b/c"] = 1
    d[b"a/b"] = 2
    del d[b"a/b/c"]
    assert_index_agrees(d)
    assert d.pop(b"a/b") == 2
    assert dict(d.links) == {}


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(NAMES)), max_size=40))
def test_random_adds_and_removes_keep_the_index(steps: list[tuple[bool, bytes]]) -> None:
    s = PathSet()
    d: PathDict[int] = PathDict()
    for i, (add, path) in enumerate(steps):
        if add:
            s.add(path)
            d[path] = i
        else:
            s.discard(path)
            d.pop(path, None)
        assert_index_agrees(s, NAMES)
        assert_index_agrees(d, NAMES)


@given(
    st.lists(st.sampled_from(NAMES), max_size=12),
    st.sampled_from(NAMES),
    st.sampled_from(NAMES),
)
def test_under_either_is_a_sorted_scan(keys: list[bytes], old: bytes, new: bytes) -> None:
    s = PathSet(keys)
    assert under_either(s, old, new) == sorted(k for k in s if under(k, old) or under(k, new))


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("open"), st.integers(0, 3), st.sampled_from(NAMES)),
            st.tuples(st.just("release"), st.integers(0, 3), st.just(b"")),
            st.tuples(st.just("unlink"), st.just(0), st.sampled_from(NAMES)),
            st.tuples(st.sampled_from(["rename", "exchange"]), st.integers(0, 10), st.just(b"")),
        ),
        max_size=30,
    )
)
def test_handles_follow_like_a_scan_of_every_handle(steps: list[tuple[str, int, bytes]]) -> None:
    h = Handles()
    plain: dict[int, bytes | None] = {}  # the former scan of every handle, as the model
    for kind, n, path in steps:
        if kind == "open":
            h.open(n, path)
            plain[n] = path
        elif kind == "release":
            h.release(n)
            plain.pop(n, None)
        elif kind == "unlink":
            h.unlink(path)
            plain = {fh: (None if p == path else p) for fh, p in plain.items()}
        else:
            old, new = NAMES[n], NAMES[(n * 7 + 3) % len(NAMES)]
            h.rename(old, new, kind == "exchange")
            plain = {
                fh: None if p is None else renamed(p, old, new, kind == "exchange")
                for fh, p in plain.items()
            }
        assert_handles_agree(h, plain)


def assert_handles_agree(h: Handles, paths: dict[int, bytes | None]) -> None:
    """``h`` holds exactly the handles ``paths`` does, and finds them by path (indexed)."""
    assert len(h) == len(paths)
    assert {fh: h.path(fh) for fh in paths} == paths
    by_path: dict[bytes, set[int]] = {}
    for fh, p in paths.items():
        if p is not None:
            by_path.setdefault(p, set()).add(fh)
    assert dict(h.by_path.items()) == by_path
    assert_index_agrees(h.by_path)
