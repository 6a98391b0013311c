"""Unit tests of the dirty-extent journal (app/mirror/journal.py): tmp dirs, no root."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.mirror import journal as jm
from app.mirror.journal import TO_EOF, DirtyJournal, JournalNotFound, JournalWriteError
from app.mirror.ops import (
    Chmod,
    Create,
    Fallocate,
    Fsync,
    Link,
    Mkdir,
    Open,
    Release,
    Rename,
    Rmdir,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
    WriteV,
)
from tests.unit.test_journal_index import assert_handles_agree, assert_index_agrees

RS = 16  # region size of most tests: small numbers keep the expectations readable


def content(j: DirtyJournal) -> tuple[object, ...]:
    """Everything a reintegrator can read from the journal."""
    files = list(j.dirty_files())
    origins = {p: j.origin(p) for p, _ in files} | {p: j.origin(p) for p in j.namespace_paths()}
    return (
        j.base_generation,
        j.region_size,
        j.trusted,
        j.reason,
        files,
        j.namespace_paths(),
        j.metadata_paths(),
        origins,
    )


def write(j: DirtyJournal, path: bytes, offset: int, length: int, fh: int = 1) -> None:
    j.mark(Open(fh, path))
    j.mark(Write(fh, offset, b"x" * length))
    j.mark(Release(fh))


def log_size(d: Path) -> int:
    return (d / jm.LOG_NAME).stat().st_size


def test_mark_then_reload_yields_the_same_record(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "gen-7", RS)
    write(j, b"a", 0, 40)  # regions 0..2
    write(j, b"d/b", 100, 1)  # region 6
    j.mark(Mkdir(b"d", 0o755, 0, 0))
    j.mark(Chmod(b"a", 0o600))
    j.mark(Truncate(-1, b"c", 33))  # tail from region 2
    before = content(j)
    j.close()
    assert before[4] == [
        (b"a", [(0, 48)]),
        (b"c", [(32, TO_EOF)]),
        (b"d/b", [(96, 16)]),
    ]
    again = jm.load(tmp_path)
    assert content(again) == before
    assert again.trusted and again.base_generation == "gen-7"


def test_torn_last_record_is_ignored_and_nothing_written_before_is_lost(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    write(j, b"b", 16, 1)
    size_before = log_size(tmp_path)
    write(j, b"c", 32, 1)
    j.close()
    size_after = log_size(tmp_path)
    assert size_after > size_before
    os.truncate(tmp_path / jm.LOG_NAME, size_before + 5)  # a crash mid-append

    again = jm.load(tmp_path)
    assert again.trusted, again.reason
    assert list(again.dirty_files()) == [(b"a", [(0, 16)]), (b"b", [(16, 16)])]
    write(again, b"c", 32, 1)  # the journal keeps working after the torn tail
    again.close()
    assert [p for p, _ in jm.load(tmp_path).dirty_files()] == [b"a", b"b", b"c"]


def test_corrupt_record_in_the_middle_makes_the_journal_untrusted(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    head_size = log_size(tmp_path)
    write(j, b"a", 0, 1)
    write(j, b"b", 16, 1)
    j.close()
    log = tmp_path / jm.LOG_NAME
    data = bytearray(log.read_bytes())
    data[head_size + 12] ^= 0xFF  # a payload byte of the first record after the head
    log.write_bytes(bytes(data))

    again = jm.load(tmp_path)
    assert not again.trusted
    assert jm.LOG_NAME in again.reason and f"offset {head_size}" in again.reason
    assert list(again.dirty_files()) == []
    again.close()
    assert not jm.load(tmp_path).trusted  # the verdict is durable


def test_corrupt_snapshot_makes_the_journal_untrusted(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    j.compact()
    j.close()
    snap = tmp_path / jm.SNAPSHOT_NAME
    data = bytearray(snap.read_bytes())
    data[-1] ^= 0xFF
    snap.write_bytes(bytes(data))
    again = jm.load(tmp_path)
    assert not again.trusted and jm.SNAPSHOT_NAME in again.reason


def test_missing_journal_is_reported(tmp_path: Path) -> None:
    with pytest.raises(JournalNotFound):
        jm.load(tmp_path / "nothing")


def test_renaming_a_file_moves_its_regions(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    write(j, b"b", 32, 1)
    j.mark(Rename(b"a", b"b", 0))  # replaces b: b's own regions go
    assert list(j.dirty_files()) == [(b"b", [(0, 16)])]
    assert j.namespace_paths() == {b"a", b"b"}
    assert j.origin(b"b") == b"a"
    j.close()
    assert list(jm.load(tmp_path).dirty_files()) == [(b"b", [(0, 16)])]


def test_renaming_a_directory_moves_every_entry_below(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"d/x", 0, 1)
    write(j, b"d/sub/y", 16, 1)
    write(j, b"dx", 32, 1)  # shares a prefix, not a parent: stays
    j.mark(Chmod(b"d/x", 0o600))
    j.mark(Rename(b"d", b"e", 0))
    assert [p for p, _ in j.dirty_files()] == [b"dx", b"e/sub/y", b"e/x"]
    assert j.metadata_paths() == {b"e/x"}
    assert j.origin(b"e/sub/y") == b"d/sub/y"


def test_rename_exchange_swaps_entries(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    write(j, b"b", 16, 1)
    j.mark(Rename(b"a", b"b", jm.RENAME_EXCHANGE))
    assert list(j.dirty_files()) == [(b"a", [(16, 16)]), (b"b", [(0, 16)])]
    assert (j.origin(b"a"), j.origin(b"b")) == (b"b", b"a")


def test_open_handle_follows_renames(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    j.mark(Open(5, b"d/f"))
    j.mark(Open(6, b"g"))
    j.mark(Rename(b"d", b"e", 0))
    j.mark(Rename(b"g", b"h/g", 0))
    j.mark(Write(5, 20, b"z"))
    j.mark(Link(b"x", b"y"))
    j.mark(Unlink(b"y"))  # a handle on another name is not touched
    j.mark(Write(6, 40, b"z"))
    # the writes land under the new names, which the renames made namespace paths: they are
    # reconciled in full, so no data record is needed for them
    assert j.namespace_paths() == {b"d", b"e", b"g", b"h/g", b"y"}
    assert list(j.dirty_files()) == []
    j.mark(Rename(b"h/g", b"k", 0))
    j.mark(Release(6))
    j.reset("g2")  # a sync point: the renames are forgotten, the handle 5 is still known
    j.mark(Write(5, 20, b"z"))
    assert list(j.dirty_files()) == [(b"e/f", [(16, 16)])]


def test_unlink_drops_data_and_records_the_namespace_change(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 100)
    j.mark(Chmod(b"a", 0o600))
    j.mark(Unlink(b"a"))
    j.mark(Rmdir(b"d"))
    assert list(j.dirty_files()) == []
    assert j.metadata_paths() == set()
    assert j.namespace_paths() == {b"a", b"d"}
    j.close()
    assert jm.load(tmp_path).namespace_paths() == {b"a", b"d"}


def test_create_link_and_metadata_changes_are_recorded(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    j.mark(Create(3, b"new", 0o644, 0, 0, True))
    j.mark(Write(3, 0, b"hello"))  # a new file is reconciled in full: no data record
    j.mark(Link(b"old", b"alias"))
    j.mark(Utimens(b"t", 1, 2))
    j.mark(Open(4, b"t"))
    j.mark(Write(4, 0, b"hello"))
    assert j.namespace_paths() == {b"new", b"alias"}
    assert j.metadata_paths() == {b"old", b"t"}
    assert j.origin(b"new") is None and j.origin(b"t") == b"t"
    assert list(j.dirty_files()) == [(b"t", [(0, 16)])]


def test_changes_below_a_new_directory_need_no_record_and_no_flush(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    j.mark(Mkdir(b"new", 0o755, 0, 0))
    size = (tmp_path / jm.LOG_NAME).stat().st_size
    j.mark(Mkdir(b"new/sub", 0o755, 0, 0))
    j.mark(Create(3, b"new/sub/f", 0o644, 0, 0, True))
    j.mark(Write(3, 5 * RS, b"hello"))
    j.mark(Release(3))
    j.mark(Chmod(b"new/sub/f", 0o600))
    j.mark(Utimens(b"new/sub", 1, 2))
    j.mark(Rename(b"new/sub/f", b"new/g", 0))
    j.mark(Unlink(b"new/g"))
    j.mark(Symlink(b"target", b"new/l", 0, 0))
    # nothing appended: nothing to flush
    assert (tmp_path / jm.LOG_NAME).stat().st_size == size
    assert j.namespace_paths() == {b"new"}
    assert (list(j.dirty_files()), j.metadata_paths()) == ([], set())
    # a rename out of the new directory names a path it does not cover: recorded
    j.mark(Rename(b"new/l", b"out", 0))
    assert j.namespace_paths() == {b"new", b"new/l", b"out"}
    # and a name next to it ("newer" shares a prefix, not a parent) is recorded as before
    write(j, b"newer", 0, 1)
    assert [p for p, _ in j.dirty_files()] == [b"newer"]
    j.close()
    again = jm.load(tmp_path)
    assert again.namespace_paths() == {b"new", b"new/l", b"out"}
    assert [p for p, _ in again.dirty_files()] == [b"newer"]
    again.close()


def test_concurrent_marks_lose_nothing(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS, compact_bytes=2048)  # compactions run meanwhile
    threads, per_thread = 6, 120
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            j.mark(Open(n, b"f%d" % n))
            for i in range(per_thread):
                j.mark(Write(n, i * 2 * RS, b"w"))  # every other region
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not errors
    expected = [(b"f%d" % n, [(i * 2 * RS, RS) for i in range(per_thread)]) for n in range(threads)]
    assert list(j.dirty_files()) == sorted(expected)
    j.close()
    assert list(jm.load(tmp_path).dirty_files()) == sorted(expected)


def test_fast_path_writes_nothing_when_the_region_is_marked(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    j.mark(Open(1, b"a"))
    j.mark(Write(1, 0, b"x"))
    j.mark(Chmod(b"a", 0o600))
    size = log_size(tmp_path)
    for off in range(RS):
        j.mark(Write(1, off, b"y"))
    j.mark(Chmod(b"a", 0o644))
    j.mark(Truncate(1, b"", 5 * RS))
    size_after_truncate = log_size(tmp_path)
    j.mark(Write(1, 9 * RS, b"y"))  # inside the tail
    j.mark(Truncate(1, b"", 7 * RS))
    assert size_after_truncate > size
    assert log_size(tmp_path) == size_after_truncate


def test_compaction_keeps_content(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS, compact_bytes=512)
    for i in range(60):
        write(j, b"f%d" % (i % 7), i * RS, 1)
        if i % 10 == 0:
            j.mark(Rename(b"f%d" % (i % 7), b"r%d" % i, 0))
    j.mark(Utimens(b"f1", 0, 0))
    before = content(j)
    assert log_size(tmp_path) < 512 + 200  # the log was compacted along the way
    j.compact()
    assert content(j) == before
    j.close()
    assert content(jm.load(tmp_path)) == before


def test_stale_log_after_a_crash_during_compaction_is_ignored(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    old_log = (tmp_path / jm.LOG_NAME).read_bytes()
    j.mark(Rename(b"a", b"b", 0))
    j.compact()  # the snapshot holds the rename; put the pre-compaction log back
    j.close()
    (tmp_path / jm.LOG_NAME).write_bytes(old_log)
    again = jm.load(tmp_path)
    assert again.trusted
    assert list(again.dirty_files()) == [(b"b", [(0, 16)])]


def test_ranges_merge_and_bytes_dirty(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    write(j, b"a", RS, 1)
    write(j, b"a", 3 * RS, 2 * RS)  # regions 3 and 4
    write(j, b"a", 5 * RS - 1, 2)  # regions 4 and 5: one new
    assert list(j.dirty_files()) == [(b"a", [(0, 2 * RS), (3 * RS, 3 * RS)])]
    assert j.bytes_dirty() == 5 * RS
    j.mark(Truncate(-1, b"a", 6 * RS))  # the tail joins the last range
    assert list(j.dirty_files()) == [(b"a", [(0, 2 * RS), (3 * RS, TO_EOF)])]
    assert j.bytes_dirty() == 6 * RS


def test_a_file_with_too_many_regions_is_summarised_as_a_tail(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS, max_regions_per_file=4)
    for r in (3, 5, 7, 9, 11):
        write(j, b"big", r * RS, 1)
    assert list(j.dirty_files()) == [(b"big", [(3 * RS, TO_EOF)])]
    assert j.bytes_dirty() == 9 * RS  # regions 3..11
    size = log_size(tmp_path)
    write(j, b"big", 50 * RS, 1)
    assert log_size(tmp_path) == size
    j.mark(Open(2, b"huge"))
    j.mark(Fallocate(2, jm.FALLOC_FL_PUNCH_HOLE | jm.FALLOC_FL_KEEP_SIZE, 0, 10**9))
    assert dict(j.dirty_files())[b"huge"] == [(0, TO_EOF)]


def test_too_many_paths_invalidate_the_journal(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS, max_paths=5)
    for i in range(6):
        j.mark(Chmod(b"p%d" % i, 0o600))
    assert not j.trusted and "paths" in j.reason
    assert j.metadata_paths() == set()


def test_unknown_handle_uses_the_resolver_or_invalidates(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS, resolver={9: b"known"}.get)
    j.mark(Write(9, 0, b"x"))
    assert list(j.dirty_files()) == [(b"known", [(0, 16)])]
    assert j.trusted
    j.mark(Write(10, 0, b"x"))
    assert not j.trusted and "handle 10" in j.reason
    j.close()
    assert not jm.load(tmp_path).trusted


def test_invalidate_then_reset(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g1", RS)
    write(j, b"a", 0, 1)
    j.invalidate("writes behind the mirror's back")
    j.close()
    again = jm.load(tmp_path)
    assert not again.trusted and again.reason == "writes behind the mirror's back"
    again.reset("g2")
    assert again.trusted and again.base_generation == "g2"
    assert list(again.dirty_files()) == []
    write(again, b"b", 0, 1)
    again.close()
    final = jm.load(tmp_path)
    assert (final.trusted, final.base_generation) == (True, "g2")
    assert list(final.dirty_files()) == [(b"b", [(0, 16)])]


def test_clear_file_and_discard(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    write(j, b"a", 0, 1)
    write(j, b"b", 0, 1)
    j.mark(Chmod(b"a", 0o600))
    j.clear_file(b"a")
    assert [p for p, _ in j.dirty_files()] == [b"b"] and j.metadata_paths() == set()
    j.discard()
    assert not (tmp_path / jm.SNAPSHOT_NAME).exists()
    with pytest.raises(jm.JournalClosed):
        j.mark(Chmod(b"a", 0))
    with pytest.raises(JournalNotFound):
        jm.load(tmp_path)


def test_a_failed_fsync_refuses_every_later_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DirtyJournal(tmp_path, "g", RS)
    j.mark(Open(1, b"a"))
    j.mark(Write(1, 0, b"x"))

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(JournalWriteError, match="disk gone"):
        j.mark(Write(1, RS, b"x"))
    monkeypatch.undo()
    with pytest.raises(JournalWriteError):
        j.mark(Write(1, RS, b"x"))  # recorded in memory only: must not pass the fast path
    with pytest.raises(JournalWriteError):
        j.mark(Write(1, 0, b"x"))
    j.reset("g2")  # a sync point repairs it
    j.mark(Write(1, RS, b"x"))
    assert list(j.dirty_files()) == [(b"a", [(16, 16)])]


# --- fine intervals (exact dirty ranges inside the durable regions) ---------------------------

MIB = 1 << 20
PAGE = 4096


def count_fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def test_scattered_page_writes_are_recorded_exactly_and_survive_a_reload(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g")  # the default 1 MiB regions
    assert j.region_size == jm.DEFAULT_REGION_SIZE == MIB
    offsets = [7 * PAGE, 3 * MIB + 5 * PAGE, 3 * MIB + 9 * PAGE, 40 * MIB]
    for off in offsets:
        write(j, b"db", off, PAGE)
    write(j, b"db", 3 * MIB + 6 * PAGE + 10, 1)  # one byte: its page
    expected = [
        (7 * PAGE, PAGE),
        (3 * MIB + 5 * PAGE, 2 * PAGE),
        (3 * MIB + 9 * PAGE, PAGE),
        (40 * MIB, PAGE),
    ]
    assert list(j.dirty_files()) == [(b"db", expected)]
    assert j.bytes_dirty() == 5 * PAGE
    j.mark(Truncate(-1, b"db", 3 * MIB + 100))  # the tail starts at region 3
    tail = [(7 * PAGE, PAGE), (3 * MIB, TO_EOF)]
    assert list(j.dirty_files()) == [(b"db", tail)]
    j.close()
    assert list(jm.load(tmp_path).dirty_files()) == [(b"db", tail)]


def test_a_sequential_mib_costs_one_durable_record_not_one_per_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DirtyJournal(tmp_path, "g")
    j.mark(Open(1, b"log"))
    syncs = count_fdatasyncs(monkeypatch)
    before = len(jm.js.parse((tmp_path / jm.LOG_NAME).read_bytes()).records)
    for i in range(2 * 256):  # 2 MiB in 4 KiB writes
        j.mark(Write(1, i * PAGE, b"x" * PAGE))
    assert len(syncs) == 2  # one per region, as with regions alone
    after = len(jm.js.parse((tmp_path / jm.LOG_NAME).read_bytes()).records)
    assert after - before <= 2 * 11  # a Mark and about log2(256) Fine records per region
    assert list(j.dirty_files()) == [(b"log", [(0, 2 * MIB)])]


def test_a_new_interval_in_a_recorded_region_is_written_without_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DirtyJournal(tmp_path, "g")
    write(j, b"f", 0, PAGE)
    syncs = count_fdatasyncs(monkeypatch)
    size = log_size(tmp_path)
    write(j, b"f", 100 * PAGE, PAGE)  # same region, new page: appended, not fsync'd
    assert syncs == [] and log_size(tmp_path) > size
    write(j, b"f", 100 * PAGE + 10, 20)  # already recorded: no I/O at all
    assert log_size(tmp_path) > size and syncs == []
    size = log_size(tmp_path)
    write(j, b"f", 100 * PAGE + 10, 20)
    assert log_size(tmp_path) == size
    write(j, b"f", 5 * MIB, 1)  # a new region: durable first
    assert len(syncs) == 1


def test_fine_intervals_after_a_crash_need_this_boot_or_a_clean_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(jm, "BOOT_ID_PATH", str(boot))
    jdir = tmp_path / "j"
    j = DirtyJournal(jdir, "g")
    write(j, b"f", 0, PAGE)
    write(j, b"f", 9 * PAGE, PAGE)  # appended without fdatasync
    exact = [(b"f", [(0, PAGE), (9 * PAGE, PAGE)])]
    # a daemon crash (no close): same boot, the page cache kept every appended record
    crashed = jm.load(jdir)
    assert list(crashed.dirty_files()) == exact
    crashed.close()
    # a clean close, then a reboot: the Clean mark says every record reached the disk
    boot.write_text("boot-2\n")
    again = jm.load(jdir)
    assert list(again.dirty_files()) == exact
    write(again, b"f", 20 * PAGE, PAGE)
    # a machine crash (no close) then a reboot: records may be lost, whole regions count
    boot.write_text("boot-3\n")
    rebooted = jm.load(jdir)
    assert rebooted.trusted
    assert list(rebooted.dirty_files()) == [(b"f", [(0, MIB)])]
    write(rebooted, b"f", 3 * MIB, PAGE)  # still coarse for that file, exact for others
    write(rebooted, b"g", 3 * MIB, PAGE)
    assert list(rebooted.dirty_files()) == [
        (b"f", [(0, MIB), (3 * MIB, MIB)]),
        (b"g", [(3 * MIB, PAGE)]),
    ]
    rebooted.close()
    assert list(jm.load(jdir).dirty_files()) == list(rebooted.dirty_files())


def test_a_torn_fine_record_leaves_its_whole_region_dirty(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g")
    write(j, b"a", 0, PAGE)
    size = log_size(tmp_path)
    write(j, b"b", 2 * MIB + PAGE, PAGE)  # Mark(region 2) + Fine in one batch
    j.close()
    data = (tmp_path / jm.LOG_NAME).read_bytes()
    mark_len = len(jm.js.frame(jm.js.Mark(b"b", (2,))))
    os.truncate(tmp_path / jm.LOG_NAME, size + mark_len + 7)  # the Fine record is torn
    assert len(data) > size + mark_len + 7
    again = jm.load(tmp_path)
    assert again.trusted
    assert list(again.dirty_files()) == [(b"a", [(0, PAGE)]), (b"b", [(2 * MIB, MIB)])]


def test_too_many_intervals_are_widened_then_fall_back_to_regions(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", 1 << 20, max_spans_per_file=8)
    offsets = [i * 128 * 1024 for i in range(9)]  # nine scattered pages in two regions
    for off in offsets:
        write(j, b"f", off, PAGE)
    ranges = dict(j.dirty_files())[b"f"]
    assert len(ranges) <= 4
    for off in offsets:  # everything written is still covered
        assert any(a <= off and off + PAGE <= a + n for a, n in ranges)
    assert all(a % (64 * 1024) == 0 for a, _ in ranges)  # widened to 64 KiB
    for i in range(64):  # far too many: whole regions
        write(j, b"f", i * 64 * 1024 + PAGE, 1)
    assert dict(j.dirty_files())[b"f"] == [(0, 4 * MIB)]
    j.close()
    assert dict(jm.load(tmp_path).dirty_files())[b"f"] == [(0, 4 * MIB)]


def test_concurrent_fine_marks_in_one_region_lose_nothing(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "g", compact_bytes=4096)  # compactions run meanwhile
    write(j, b"f", 0, PAGE)
    threads, per_thread = 6, 40
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            j.mark(Open(10 + n, b"f"))
            for i in range(per_thread):
                j.mark(Write(10 + n, (2 + 2 * (i * threads + n)) * PAGE, b"w"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not errors
    pages = [(0, PAGE)] + [((2 + 2 * k) * PAGE, PAGE) for k in range(threads * per_thread)]
    assert list(j.dirty_files()) == [(b"f", pages)]
    j.close()
    assert list(jm.load(tmp_path).dirty_files()) == [(b"f", pages)]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["w", "w", "w", "t", "p"]),
            st.integers(0, 300_000),
            st.integers(1, 20_000),
        ),
        max_size=40,
    )
)
def test_every_written_byte_is_in_the_dirty_ranges(ops_list: list[tuple[str, int, int]]) -> None:
    """Writes, truncates and punched holes on one file, small caps: every changed byte is in
    ``dirty_files`` in memory, after a reload and after a reload in another boot."""
    with tempfile.TemporaryDirectory() as d:
        jdir = Path(d)
        j = DirtyJournal(jdir, "g", 64 * 1024, max_spans_per_file=6, max_regions_per_file=6)
        j.mark(Open(1, b"f"))
        changed: list[tuple[int, int]] = []
        for kind, off, ln in ops_list:
            if kind == "w":
                j.mark(Write(1, off, b"x" * ln))
                changed.append((off, off + ln))
            elif kind == "p":
                j.mark(Fallocate(1, jm.FALLOC_FL_PUNCH_HOLE | jm.FALLOC_FL_KEEP_SIZE, off, ln))
                changed.append((off, off + ln))
            else:
                j.mark(Truncate(1, b"", off))
                changed.append((off, TO_EOF))

        def check(ranges: list[tuple[int, int]]) -> None:
            for lo, hi in changed:
                pos = lo
                for a, n in ranges:
                    if a <= pos < a + n:
                        pos = min(hi, a + n)
                assert pos >= hi, (lo, hi, ranges)

        files = dict(j.dirty_files())
        check(files.get(b"f", []))
        j.close()
        check(dict(jm.load(jdir).dirty_files()).get(b"f", []))
        j2 = jm.load(jdir)
        j2.mark(Open(1, b"f"))
        j2.mark(Write(1, 0, b"y"))  # a log with no Clean mark: then "reboot"
        changed.append((0, 1))
        real = jm.BOOT_ID_PATH
        try:
            jm.BOOT_ID_PATH = os.path.join(d, "other-boot")  # type: ignore[misc]
            Path(jm.BOOT_ID_PATH).write_text("another boot")
            check(dict(jm.load(jdir).dirty_files()).get(b"f", []))
        finally:
            jm.BOOT_ID_PATH = real  # type: ignore[misc]


# --- model-based test ------------------------------------------------------------------------

PATHS = [b"a", b"b", b"d", b"d/x", b"d/y", b"e", b"e/x"]


def _under(p: bytes, top: bytes) -> bool:
    return p == top or p.startswith(top + b"/")


class Model:
    """The promise, written plainly: dirty (path, region) pairs and tails, with renames."""

    def __init__(self) -> None:
        self.regions: set[tuple[bytes, int]] = set()
        self.tails: dict[bytes, int] = {}
        self.namespace: set[bytes] = set()
        self.metadata: set[bytes] = set()
        self.handles: dict[int, bytes | None] = {}

    def covered(self, p: bytes, r: int) -> bool:
        return (p, r) in self.regions or (p in self.tails and r >= self.tails[p])

    def write(self, p: bytes, lo: int, hi: int) -> None:
        self.regions |= {(p, r) for r in range(lo, hi + 1) if not self.covered(p, r)}

    def truncate(self, p: bytes, r: int) -> None:
        self.tails[p] = min(self.tails.get(p, r), r)
        self.regions = {(q, x) for q, x in self.regions if q != p or x < self.tails[p]}

    def drop(self, top: bytes) -> None:
        self.regions = {(q, x) for q, x in self.regions if not _under(q, top)}
        self.tails = {q: t for q, t in self.tails.items() if not _under(q, top)}
        self.metadata = {q for q in self.metadata if not _under(q, top)}
        self.namespace = {q for q in self.namespace if not _under(q, top)}

    def rename(self, old: bytes, new: bytes, exchange: bool) -> None:
        if old == new:
            return

        def move(p: bytes) -> bytes | None:
            if _under(p, old):
                return new + p[len(old) :]
            if _under(p, new):
                return old + p[len(new) :] if exchange else None
            return p

        def move_all(s: set[bytes]) -> set[bytes]:
            return {m for m in map(move, s) if m is not None}

        self.regions = {(m, x) for q, x in self.regions if (m := move(q)) is not None}
        self.tails = {m: t for q, t in self.tails.items() if (m := move(q)) is not None}
        self.metadata = move_all(self.metadata)
        self.namespace = move_all(self.namespace) | {old, new}
        self.handles = {h: (None if p is None else move(p)) for h, p in self.handles.items()}

    def files(self) -> dict[bytes, tuple[set[int], int | None]]:
        """Per file: regions below the tail, and the tail extended down over adjacent regions
        (the shape merged ranges give)."""
        out: dict[bytes, tuple[set[int], int | None]] = {}
        for p in {q for q, _ in self.regions} | set(self.tails):
            regions = {r for q, r in self.regions if q == p}
            tail = self.tails.get(p)
            while tail is not None and tail - 1 in regions:
                tail -= 1
                regions.discard(tail)
            out[p] = (regions, tail)
        return out


def journal_files(j: DirtyJournal) -> dict[bytes, tuple[set[int], int | None]]:
    out: dict[bytes, tuple[set[int], int | None]] = {}
    for p, ranges in j.dirty_files():
        regions: set[int] = set()
        tail = None
        for off, length in ranges:
            if length == TO_EOF:
                tail = off // RS
            else:
                regions |= set(range(off // RS, (off + length) // RS))
        out[p] = (regions, tail)
    return out


path_st = st.sampled_from(PATHS)
op_st = st.one_of(
    st.tuples(st.just("write"), path_st, st.integers(0, 200), st.integers(1, 40)),
    st.tuples(st.just("open"), path_st, st.integers(0, 3)),
    st.tuples(st.just("write_fh"), st.integers(0, 3), st.integers(0, 200), st.integers(1, 40)),
    st.tuples(st.just("truncate"), path_st, st.integers(0, 200)),
    st.tuples(st.just("rename"), path_st, path_st, st.booleans()),
    st.tuples(st.just("unlink"), path_st),
    st.tuples(st.just("rmdir"), path_st),
    st.tuples(st.just("create"), path_st),
    st.tuples(st.just("chmod"), path_st),
    st.tuples(st.just("clear"), path_st),
    st.tuples(st.just("reload")),
    st.tuples(st.just("compact")),
)


def _step(j: DirtyJournal, m: Model, op: tuple[object, ...], d: Path) -> DirtyJournal:
    kind = op[0]
    if kind == "write":
        p, off, n = op[1], op[2], op[3]
        assert isinstance(p, bytes) and isinstance(off, int) and isinstance(n, int)
        write(j, p, off, n, fh=100)
        m.write(p, off // RS, (off + n - 1) // RS)
    elif kind == "open":
        p, h = op[1], op[2]
        assert isinstance(p, bytes) and isinstance(h, int)
        j.mark(Open(h, p))
        m.handles[h] = p
    elif kind == "write_fh":
        h, off, n = op[1], op[2], op[3]
        assert isinstance(h, int) and isinstance(off, int) and isinstance(n, int)
        if h in m.handles:
            j.mark(Write(h, off, b"w" * n))
            target = m.handles[h]
            if target is not None:
                m.write(target, off // RS, (off + n - 1) // RS)
    elif kind == "truncate":
        p, length = op[1], op[2]
        assert isinstance(p, bytes) and isinstance(length, int)
        j.mark(Truncate(-1, p, length))
        m.truncate(p, length // RS)
    elif kind == "rename":
        old, new, exchange = op[1], op[2], op[3]
        assert isinstance(old, bytes) and isinstance(new, bytes)
        j.mark(Rename(old, new, jm.RENAME_EXCHANGE if exchange else 0))
        m.rename(old, new, bool(exchange))
    elif kind in ("unlink", "rmdir"):
        p = op[1]
        assert isinstance(p, bytes)
        j.mark(Unlink(p) if kind == "unlink" else Rmdir(p))
        m.drop(p)
        m.namespace.add(p)
        if kind == "unlink":
            m.handles = {h: (None if q == p else q) for h, q in m.handles.items()}
    elif kind == "create":
        p = op[1]
        assert isinstance(p, bytes)
        j.mark(Create(100, p, 0o644, 0, 0, False))
        j.mark(Release(100))
        m.regions = {(q, x) for q, x in m.regions if q != p}
        m.tails.pop(p, None)
        m.metadata.discard(p)
        m.namespace.add(p)
    elif kind == "chmod":
        p = op[1]
        assert isinstance(p, bytes)
        j.mark(Chmod(p, 0o600))
        m.metadata.add(p)
    elif kind == "clear":
        p = op[1]
        assert isinstance(p, bytes)
        j.clear_file(p)
        m.drop(p)
    elif kind == "reload":
        j.close()
        j = jm.load(d)
        m.handles = {}  # handles die with the process
    elif kind == "compact":
        j.compact()
    return j


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=40))
def test_random_operations_agree_with_the_model(ops_list: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        j = DirtyJournal(d, "g", RS, compact_bytes=300)
        m = Model()
        for op in ops_list:
            j = _step(j, m, op, d)
            assert j.trusted, j.reason
            _assert_covers(j, m)
            _assert_indexes(j, m)
        j.close()
        again = jm.load(d)
        _assert_covers(again, m)
        again.close()


def _assert_indexes(j: DirtyJournal, m: Model) -> None:
    """The journal's path indexes (journal_index.py) agree with the paths they index: the
    tracked paths, and the open handles (the model's, by path). A stale index fails here."""
    st = j._state  # the indexes are internal: read them where they are
    for c in (st.files, st.origins, st.metadata, st.namespace):
        assert_index_agrees(c, PATHS)
    assert_handles_agree(j._handles, m.handles)


def _covered(p: bytes, tops: set[bytes]) -> bool:
    return any(_under(p, top) for top in tops)


def _assert_covers(j: DirtyJournal, m: Model) -> None:
    """The journal keeps the model's promise: every dirty path, range and attribute change of
    the model is recorded, or lies at or below a namespace path of the journal (reconciled in
    full); where no namespace path covers, the journal holds exactly the model's entries; and
    it makes nothing up (whatever it holds, the model holds or covers)."""
    ns, meta, files = j.namespace_paths(), j.metadata_paths(), journal_files(j)
    mfiles = m.files()
    assert all(_covered(p, ns) for p in m.namespace), (ns, m.namespace)
    assert all(_covered(p, m.namespace) for p in ns), (ns, m.namespace)
    for p in set(mfiles) | set(files):
        if not _covered(p, ns):
            assert files.get(p) == mfiles.get(p), (p, files.get(p), mfiles.get(p))
        else:
            assert p in mfiles or _covered(p, m.namespace), p
    for p in m.metadata | meta:
        if not _covered(p, ns):
            assert (p in meta) == (p in m.metadata), p
        else:
            assert p in m.metadata or _covered(p, m.namespace), p


def test_writev_marks_the_regions_of_every_part(tmp_path: Path) -> None:
    j = DirtyJournal(tmp_path, "gen-v", RS)
    j.mark(Open(4, b"v"))
    j.mark(WriteV(4, ((0, b"x" * 3), (100, b""), (5 * RS + 1, b"y" * 2))))
    j.mark(Release(4))
    plain = DirtyJournal(tmp_path / "plain", "gen-v", RS)
    write(plain, b"v", 0, 3, fh=4)
    write(plain, b"v", 5 * RS + 1, 2, fh=4)
    assert content(j)[4] == content(plain)[4] == [(b"v", [(0, RS), (5 * RS, RS)])]


# --- the lock-free path: writes inside what their handle has durably recorded -----------------


def count_commits(j: DirtyJournal, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every pass through the journal's locked path (``_commit_locked``)."""
    calls: list[int] = []
    real = j._commit_locked

    def counting(recs: list[object]) -> None:
        calls.append(len(recs))
        real(recs)  # type: ignore[arg-type]

    monkeypatch.setattr(j, "_commit_locked", counting)
    return calls


def test_writes_inside_a_recorded_interval_skip_the_lock_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DirtyJournal(tmp_path, "g")  # 1 MiB regions, 4 KiB fine intervals
    j.mark(Open(1, b"db"))
    j.mark(Write(1, 0, b"x" * PAGE))  # region 0, interval [0, 4 KiB)
    size = log_size(tmp_path)
    commits = count_commits(j, monkeypatch)
    for _ in range(20):
        j.mark(Write(1, 100, b"y" * 50))  # inside the recorded interval
        j.mark(Fsync(1, b"", True))  # records nothing
    assert commits == [] and log_size(tmp_path) == size
    j.mark(Write(1, 2 * PAGE, b"z"))  # a new interval: the locked path, one record
    assert commits == [1] and log_size(tmp_path) > size
    assert list(j.dirty_files()) == [(b"db", [(0, PAGE), (2 * PAGE, PAGE)])]


@pytest.mark.parametrize("change", ["rename", "unlink", "clear", "reset", "release"])
def test_what_moves_or_drops_a_record_sends_the_next_write_through_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A handle's remembered range goes stale with its file's record: the next write to it
    records again, under the file's current name (or nothing, once unlinked)."""
    j = DirtyJournal(tmp_path, "g")
    j.mark(Open(1, b"a"))
    j.mark(Write(1, 0, b"x" * PAGE))
    commits = count_commits(j, monkeypatch)
    j.mark(Write(1, 0, b"x"))
    assert commits == []
    if change == "rename":
        j.mark(Rename(b"a", b"b", 0))
    elif change == "unlink":
        j.mark(Unlink(b"a"))
    elif change == "clear":
        j.clear_file(b"a")
    elif change == "reset":
        j.reset("g2")
    else:
        j.mark(Release(1))
        j.mark(Open(1, b"c"))  # the same handle number, another file
    commits.clear()
    j.mark(Write(1, 0, b"x"))
    assert commits, "a stale range let the write pass without the lock"
    files = dict(j.dirty_files())
    if change == "rename":
        assert files == {b"b": [(0, PAGE)]}
    elif change == "unlink":
        assert files == {}  # no name reaches the file: nothing to record
    elif change == "release":
        assert files[b"c"] == [(0, PAGE)]
    else:
        assert files == {b"a": [(0, PAGE)]}


def test_a_closed_or_failed_journal_lets_no_write_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = DirtyJournal(tmp_path, "g")
    j.mark(Open(1, b"a"))
    j.mark(Write(1, 0, b"x"))
    j._failed = JournalWriteError("disk gone")
    with pytest.raises(JournalWriteError):
        j.mark(Write(1, 0, b"x"))
    with pytest.raises(JournalWriteError):
        j.mark(Fsync(1, b"", True))
    j._failed = None
    j.close()
    with pytest.raises(jm.JournalClosed):
        j.mark(Write(1, 0, b"x"))
