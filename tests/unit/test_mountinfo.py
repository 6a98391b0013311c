"""Parsing /proc/self/mountinfo (app.mirror.mount.read_mountinfo): pure, no root, no mounts."""

from __future__ import annotations

from app.mirror.mount import MountInfo, read_mountinfo

SAMPLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    b"41 22 0:38 / /srv/my\\040data rw,nosuid,nodev,relatime shared:20 master:3"
    b" - fuse.mirrorha mirrorha rw,user_id=0,group_id=0,allow_other\n"
    b"42 22 0:39 / /mnt/tab\\011and\\012newline\\134slash rw - tmpfs my\\040src rw\n"
    b"43 22 0:40 / /srv/caf\\303\\251 rw - fuse.mirrorha mirrorha rw\n"
)


def test_fields_of_each_line() -> None:
    mounts = read_mountinfo(SAMPLE)
    assert mounts[0] == MountInfo(22, (8, 1), b"/", "ext4", "/dev/sda1")
    assert [m.mount_id for m in mounts] == [22, 41, 42, 43]
    assert mounts[1].device == (0, 38)
    assert mounts[1].fstype == "fuse.mirrorha"


def test_octal_escapes_in_mount_points_and_sources() -> None:
    mounts = read_mountinfo(SAMPLE)
    assert mounts[1].mountpoint == b"/srv/my data", "optional fields before '-' are skipped"
    assert mounts[2].mountpoint == b"/mnt/tab\tand\nnewline\\slash"
    assert mounts[2].source == "my src"
    assert mounts[3].mountpoint == "/srv/café".encode()


def test_a_backslash_not_followed_by_three_digits_is_kept() -> None:
    text = b"5 1 0:1 / /odd\\x\\04 rw - tmpfs none rw\n"
    assert read_mountinfo(text)[0].mountpoint == b"/odd\\x\\04"


def test_malformed_lines_are_skipped() -> None:
    text = b"\nnot a mountinfo line\n7 1 0:2 / /ok rw - tmpfs none rw\n8 1 0:3 - x\n"
    assert [m.mountpoint for m in read_mountinfo(text)] == [b"/ok"]
    assert read_mountinfo(b"") == []
