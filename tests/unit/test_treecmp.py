"""tests/lab/treecmp.py, the lab's tree comparison: times of directories and symlinks are
compared only when asked (``all_times``), and each difference is named."""

from __future__ import annotations

import os
from pathlib import Path

from tests.lab.treecmp import diff_trees


def _tree(root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"same")
    os.symlink("f", root / "d" / "ln")
    os.utime(root / "d" / "f", ns=(1, 10))


def test_directory_root_and_symlink_times(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _tree(a)
    _tree(b)
    for root in (a, b):
        os.utime(root / "d" / "ln", ns=(1, 20), follow_symlinks=False)
        os.utime(root / "d", ns=(1, 30))
        os.utime(root, ns=(1, 40))
    assert diff_trees(a, b, all_times=True) == []
    os.utime(b / "d" / "ln", ns=(1, 21), follow_symlinks=False)
    os.utime(b / "d", ns=(1, 31))
    os.utime(b, ns=(1, 41))
    assert diff_trees(a, b) == []  # files only, by default
    assert diff_trees(a, b, all_times=True) == [
        ".: directory mtime 40 vs 41",
        "d: directory mtime 30 vs 31",
        "d/ln: symlink mtime 20 vs 21",
    ]
    os.utime(b / "d" / "f", ns=(1, 11))
    assert diff_trees(a, b) == ["d/f: mtime 10 vs 11"]
