"""Exclude patterns of a replicated directory (app/mirror/exclude.py): pure, no root."""

from __future__ import annotations

import pytest

from app.mirror.exclude import Exclusions


def test_no_patterns_excludes_nothing() -> None:
    ex = Exclusions()
    assert not ex
    assert not ex.excluded(b"a.tmp", False)
    assert not ex.excluded(b"cache", True)


def test_a_name_pattern_matches_at_any_depth() -> None:
    ex = Exclusions(["*.tmp"])
    assert ex
    assert ex.excluded(b"x.tmp", False)
    assert ex.excluded(b"a/b/c/x.tmp", False)
    assert ex.excluded(b"dir.tmp", True)
    assert not ex.excluded(b"x.tmp.done", False)
    assert not ex.excluded(b"tmp", False)
    assert not ex.excluded(b"a/x.txt", False)


def test_everything_below_an_excluded_directory_is_excluded() -> None:
    ex = Exclusions(["*.tmp"])
    assert ex.excluded(b"work.tmp/data.db", False)
    assert ex.excluded(b"a/work.tmp/deep/er", True)
    assert not ex.excluded(b"a/work/deep", True)


def test_a_trailing_slash_matches_directories_only() -> None:
    ex = Exclusions(["cache/"])
    assert ex.excluded(b"cache", True)
    assert ex.excluded(b"app/cache", True)
    assert ex.excluded(b"app/cache/page.html", False)
    assert ex.excluded(b"cache/sub/dir", True)
    assert not ex.excluded(b"cache", False), "a regular file named cache is replicated"
    assert not ex.excluded(b"app/cache", False)
    assert not ex.excluded(b"mycache", True)


def test_a_pattern_with_a_slash_matches_the_whole_relative_path() -> None:
    ex = Exclusions(["pg_stat_tmp/*", "logs/*.gz"])
    assert ex.excluded(b"pg_stat_tmp/global.stat", False)
    assert ex.excluded(b"pg_stat_tmp/a/b", False), "fnmatch's * also matches /"
    assert not ex.excluded(b"pg_stat_tmp", True), "the directory itself is replicated"
    assert not ex.excluded(b"base/pg_stat_tmp/x", False), "anchored at the root"
    assert ex.excluded(b"logs/old.gz", False)
    assert not ex.excluded(b"logs/old.txt", False)
    assert not ex.excluded(b"sub/logs/old.gz", False)


def test_an_anchored_directory_pattern() -> None:
    ex = Exclusions(["var/cache/", "./postmaster.pid"])
    assert ex.excluded(b"var/cache", True)
    assert ex.excluded(b"var/cache/x", False)
    assert not ex.excluded(b"var/cache", False)
    assert not ex.excluded(b"other/var/cache", True)
    assert ex.excluded(b"postmaster.pid", False)
    assert ex.excluded(b"sub/postmaster.pid", False), "no other slash: a name at any depth"


def test_the_root_is_never_excluded_and_slashes_are_tolerated() -> None:
    ex = Exclusions(["*"])
    assert not ex.excluded(b"", True)
    assert ex.excluded(b"anything", False)
    assert Exclusions(["*.tmp"]).excluded(b"/a/x.tmp/", False)


def test_names_that_are_not_utf8_and_wildcards() -> None:
    ex = Exclusions(["caf\udce9*", "?.swp", "[0-9]*.log"])
    assert ex.excluded(b"caf\xe9 menu", False)
    assert ex.excluded(b"d/a.swp", False)
    assert not ex.excluded(b"d/ab.swp", False)
    assert ex.excluded(b"2024.log", False)
    assert not ex.excluded(b"x2024.log", False)


def test_only_path_patterns_make_directory_renames_matter() -> None:
    assert not Exclusions(["*.tmp", "cache/"]).has_path_patterns
    assert Exclusions(["*.tmp", "logs/*.gz"]).has_path_patterns
    assert Exclusions(["var/cache/"]).has_path_patterns


def test_matching_is_case_sensitive() -> None:
    ex = Exclusions(["*.TMP"])
    assert ex.excluded(b"A.TMP", False)
    assert not ex.excluded(b"a.tmp", False)


@pytest.mark.parametrize("bad", ["", "/abs", "a\0b", "/", "./"])
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Exclusions([bad])


def test_the_lab_example() -> None:
    ex = Exclusions(["*.tmp", "cache/"])
    replicated = [b"index.html", b"db/data.sqlite", b"cache", b"notes.tmp.txt"]
    excluded = [b"upload.tmp", b"cache/x", b"db/cache/y.bin"]
    assert [p for p in replicated if ex.excluded(p, False)] == []
    assert [p for p in excluded if not ex.excluded(p, False)] == []
