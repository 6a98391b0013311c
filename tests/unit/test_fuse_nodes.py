"""The FUSE mount's node table (fusenodes.py): ids per name, the kernel's references, paths
through renames and removals (checked against a model), and the namespace lock."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from app.mirror.fusenodes import ROOT, Nodes


def test_a_name_keeps_its_id_and_paths_are_built_from_the_root() -> None:
    nodes = Nodes()
    d = nodes.lookup(ROOT, b"d")
    f = nodes.lookup(d, b"f")
    assert nodes.lookup(ROOT, b"d") == d  # the same name: the same node, one more reference
    assert nodes.path(ROOT) == b""
    assert nodes.path(d) == b"d"
    assert nodes.path(f) == b"d/f"
    assert nodes.child(d, b"g") == b"d/g"
    assert nodes.child(ROOT, b"top") == b"top"
    assert nodes.path(9999) is None  # an id the kernel never got


def test_a_forgotten_node_goes_once_nothing_names_it() -> None:
    nodes = Nodes()
    d = nodes.lookup(ROOT, b"d")
    f = nodes.lookup(d, b"f")
    nodes.forget(d, 1)  # the kernel forgot the directory, but its child still names it
    assert nodes.path(f) == b"d/f"
    assert len(nodes) == 3
    nodes.forget(f, 1)  # the last reference: both go
    assert len(nodes) == 1
    assert nodes.path(f) is None and nodes.path(d) is None
    assert nodes.lookup(ROOT, b"d") not in (d, f)  # ids are never reused
    nodes.forget(12345, 3)  # unknown: ignored
    nodes.forget(ROOT, 99)  # the root is never forgotten
    assert nodes.path(ROOT) == b""


def test_a_removed_name_leaves_its_open_node_nameless() -> None:
    nodes = Nodes()
    d = nodes.lookup(ROOT, b"d")
    f = nodes.lookup(d, b"f")
    nodes.remove(d, b"f")  # unlinked while the kernel still holds it (an open file)
    assert nodes.path(f) is None
    again = nodes.lookup(d, b"f")  # a new file under the old name is a new node
    assert again != f and nodes.path(again) == b"d/f"
    nodes.remove(ROOT, b"d")  # a directory removed: what is below it has no name either
    assert nodes.path(d) is None and nodes.path(again) is None


def test_a_rename_moves_a_subtree_replaces_a_target_and_exchange_swaps() -> None:
    nodes = Nodes()
    a = nodes.lookup(ROOT, b"a")
    deep = nodes.lookup(nodes.lookup(a, b"x"), b"y")
    b = nodes.lookup(ROOT, b"b")
    nodes.rename(ROOT, b"a", ROOT, b"c", exchange=False)
    assert nodes.path(a) == b"c" and nodes.path(deep) == b"c/x/y"
    nodes.rename(ROOT, b"b", ROOT, b"c", exchange=False)  # b replaces c
    assert nodes.path(b) == b"c"
    assert nodes.path(a) is None and nodes.path(deep) is None
    e = nodes.lookup(ROOT, b"e")
    nodes.rename(ROOT, b"c", ROOT, b"e", exchange=True)
    assert nodes.path(b) == b"e" and nodes.path(e) == b"c"


# -- a model: every live node's path is the one the operations say --------------------------

NAMES = [b"a", b"b", b"c"]
steps = st.lists(
    st.tuples(
        st.sampled_from(["lookup", "lookup", "rename", "exchange", "remove"]),
        st.integers(0, 30),
        st.sampled_from(NAMES),
        st.integers(0, 30),
        st.sampled_from(NAMES),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_random_lookups_renames_and_removals_agree_with_a_model(
    ops: list[tuple[str, int, bytes, int, bytes]],
) -> None:
    nodes = Nodes()
    model: dict[int, bytes | None] = {ROOT: b""}  # node id -> its path, None: no name

    def named() -> list[int]:
        return sorted(i for i, p in model.items() if p is not None)

    def join(parent: int, name: bytes) -> bytes:
        top = model[parent]
        assert top is not None
        return top + b"/" + name if top else name

    def at(path: bytes) -> int | None:
        return next((i for i, p in model.items() if p == path and i != ROOT), None)

    for kind, pi, name, qi, other in ops:
        dirs = named()
        parent, target = dirs[pi % len(dirs)], dirs[qi % len(dirs)]
        src = join(parent, name)
        if kind == "lookup":
            known = at(src)
            got = nodes.lookup(parent, name)
            assert known is None or got == known
            model[got] = src
        elif at(src) is None:
            continue  # the kernel only renames or removes what it looked up
        elif kind == "remove":
            nodes.remove(parent, name)
            gone = src
            for i, p in model.items():
                if p is not None and (p == gone or p.startswith(gone + b"/")):
                    model[i] = None
        else:
            dst = join(target, other)
            if dst == src or dst.startswith(src + b"/") or src.startswith(dst + b"/"):
                continue  # renaming into itself, or over an ancestor: the kernel refuses
            exchange = kind == "exchange"
            if exchange and at(dst) is None:
                continue  # RENAME_EXCHANGE needs both
            nodes.rename(parent, name, target, other, exchange=exchange)
            moved = {}
            for i, p in model.items():
                if p is None:
                    continue
                if p == src or p.startswith(src + b"/"):
                    moved[i] = dst + p[len(src) :]
                elif p == dst or p.startswith(dst + b"/"):
                    moved[i] = (src + p[len(dst) :]) if exchange else None
            model.update(moved)
        for i, p in model.items():
            assert nodes.path(i) == p, (kind, src, i, p, nodes.path(i))


# -- the namespace lock ----------------------------------------------------------------------


def test_a_rename_waits_for_the_readers_in_flight_and_holds_new_ones() -> None:
    nodes = Nodes()
    events: list[str] = []
    reading = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with nodes.reading():
            reading.set()
            release.wait(10)
            events.append("reader done")

    def changer() -> None:
        with nodes.changing():
            events.append("rename")

    def late_reader() -> None:
        with nodes.reading():
            events.append("late reader")

    threads = [threading.Thread(target=reader)]
    threads[0].start()
    assert reading.wait(10)
    threads.append(threading.Thread(target=changer))
    threads[1].start()
    for _ in range(200):  # bounded: until the changer is queued
        if nodes._changers_waiting:
            break
        time.sleep(0.005)
    threads.append(threading.Thread(target=late_reader))
    threads[2].start()
    time.sleep(0.05)
    assert events == []  # the rename waits for the reader, the late reader for the rename
    release.set()
    for t in threads:
        t.join(10)
    assert events == ["reader done", "rename", "late reader"]
