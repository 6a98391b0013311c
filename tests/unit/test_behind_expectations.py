"""The receiver's own changes as the behind-the-back watcher expects them (behind.py's pure
``Expectations``, clock passed in): what each op names, how long it stays expected."""

from __future__ import annotations

from app.mirror import ops
from app.mirror.behind import Expectations


def test_a_write_by_handle_names_its_file_while_it_runs_and_for_the_grace() -> None:
    ex = Expectations(grace_s=2.0)
    ex.done(ex.expect(ops.Open(5, b"db/wal")), now=0.0)
    paths = ex.expect(ops.Write(5, 0, b"x"))
    assert paths == (b"db/wal",)
    assert ex.expected(b"db/wal", now=100.0)  # in flight: whatever the time
    ex.done(paths, now=10.0)
    assert ex.expected(b"db/wal", now=11.9)
    assert not ex.expected(b"db/wal", now=12.1)
    assert not ex.expected(b"db/other", now=10.0)


def test_an_fsync_names_nothing_and_an_unknown_handle_nothing() -> None:
    """A flush changes nothing inotify reports; a handle never bound has no file to name."""
    ex = Expectations(grace_s=2.0)
    ex.done(ex.expect(ops.Open(5, b"f")), now=0.0)
    assert ex.expect(ops.Fsync(5, b"", True)) == ()
    assert ex.expect(ops.Write(6, 0, b"x")) == ()


def test_a_rename_moves_the_handle_and_a_release_forgets_it() -> None:
    ex = Expectations(grace_s=1.0)
    ex.done(ex.expect(ops.Open(5, b"d/f")), now=0.0)
    ex.done(ex.expect(ops.Rename(b"d", b"e", 0)), now=0.0)
    assert ex.expect(ops.Write(5, 0, b"x")) == (b"e/f",)
    ex.done((b"e/f",), now=0.0)
    ex.done(ex.expect(ops.Release(5)), now=0.0)
    assert ex.expect(ops.Write(5, 0, b"x")) == ()
