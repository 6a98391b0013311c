"""ops.times_touched: which paths' own times a namespace op moves on each side."""

from __future__ import annotations

from app.mirror import ops
from app.mirror.ops import times_touched


def test_namespace_ops_touch_their_parents_and_new_inodes() -> None:
    assert times_touched(ops.Create(3, b"a/b/f", 0o644, 0, 0, False)) == (b"a/b",)
    assert times_touched(ops.Unlink(b"top")) == (b"",)  # the replicated root itself
    assert times_touched(ops.Rmdir(b"a/d")) == (b"a",)
    assert times_touched(ops.Mkdir(b"a/d", 0o755, 0, 0)) == (b"a", b"a/d")
    assert times_touched(ops.Mknod(b"p", 0o10644, 0, 0)) == (b"", b"p")
    assert times_touched(ops.Symlink(b"../x", b"a/ln", 0, 0)) == (b"a", b"a/ln")
    assert times_touched(ops.Link(b"a/f", b"b/f2")) == (b"b",)
    assert times_touched(ops.Rename(b"a/x", b"b/c/y", 0)) == (b"a", b"b/c", b"b/c/y")


def test_data_and_attribute_ops_touch_nothing() -> None:
    # files get their times on release; explicit utimens and attribute ops carry no dir change
    for op in (
        ops.Write(3, 0, b"x"),
        ops.Truncate(-1, b"f", 0),
        ops.Fsync(3, b"", True),
        ops.Chmod(b"d", 0o700),
        ops.Chown(b"d", 1, 1),
        ops.Utimens(b"d", 1, 2),
        ops.SetXattr(b"d", b"user.a", b"v", 0),
        ops.Release(3),
    ):
        assert times_touched(op) == (), op
