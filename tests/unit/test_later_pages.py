"""resync_session.later_pages: a listing longer than one page is asked page by page, each
under the ordering lock, and merged by name (the source's deep pass and verify share it)."""

from __future__ import annotations

import threading

from app.mirror.resync_codec import LIST_PAGE, QUERY_LIST, Entry, encode_entries
from app.mirror.resync_session import later_pages


class _Done:
    def __init__(self, body: bytes) -> None:
        self.body = body


def test_every_page_is_asked_under_the_lock_and_merged() -> None:
    entries = [Entry(b"n%05d" % i, 0o100644, 0, 0, i, 0, 0, 1, i) for i in range(2 * LIST_PAGE + 5)]
    order = threading.Lock()
    asked: list[tuple[int, int, int, bool]] = []

    def query(kind: int, path: bytes, offset: int, count: int) -> _Done:
        assert path == b"d"
        asked.append((kind, offset, count, order.locked()))
        return _Done(encode_entries(entries[offset : offset + count]))

    def answer(ticket: _Done, what: str) -> bytes:
        assert what == "list d"
        return ticket.body

    first = entries[:LIST_PAGE]
    got = later_pages(order, query, answer, b"d", first, "list d")  # type: ignore[arg-type]
    assert asked == [
        (QUERY_LIST, LIST_PAGE, LIST_PAGE, True),
        (QUERY_LIST, 2 * LIST_PAGE, LIST_PAGE, True),
    ]
    assert got == {e.name: e for e in entries}


def test_a_short_first_page_asks_nothing_more() -> None:
    def query(kind: int, path: bytes, offset: int, count: int) -> _Done:
        raise AssertionError("no further page should be asked")

    one = [Entry(b"a", 0o40755, 0, 0, 0, 0, 0, 2, 1)]
    got = later_pages(threading.Lock(), query, lambda t, w: b"", b"", one, "x")  # type: ignore[arg-type]
    assert got == {b"a": one[0]}
