"""Quarantine: keep this node's divergent files before a resync overwrites them.

How it works
    ``make_quarantine(qroot, dirs, reason)`` creates ``<qroot>/<UTC date-time>/`` and copies
    into ``<dir path without its leading slash>/<relative path>`` every regular file this node
    changed since the common generation: the paths of its DirtyJournal (dirty files, namespace
    paths and their subtrees, metadata paths); the whole directory when the journal is
    missing or untrusted. Symlinks are recorded (not followed). Then ``report.json`` and
    ``report.txt`` say why, when, and list each file with its size and SHA-256. Files are
    read without following symlinks out of the replicated root.

Exceptions: OSError from creating the folder or writing the report propagates; a file that
vanished or cannot be read is listed in the report with its error, never fatal.

Limits: copies are plain files (owner, mode and times kept, xattrs not); at most
``MAX_FILES`` entries per quarantine (the report says when it stopped); the copy is only as
consistent as the tree (nothing should write it meanwhile: the node is not primary).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from app.mirror.journal import DirtyJournal
from app.mirror.resync import list_dir, parent_of, stat_path, under

MAX_FILES = 1_000_000


def _changed(journal: DirtyJournal | None) -> tuple[list[bytes] | None, str]:
    """Paths to keep (None: everything) and why."""
    if journal is None:
        return None, "no journal: every file is kept"
    if not journal.trusted:
        return None, f"journal untrusted ({journal.reason}): every file is kept"
    paths = {p for p, _ in journal.dirty_files()}
    paths |= journal.namespace_paths() | journal.metadata_paths()
    return sorted(paths), f"journal based on generation {journal.base_generation}"


def _walk(root: int, top: bytes) -> Iterator[bytes]:
    """``top`` and everything below it (depth first, bounded)."""
    stack = [top]
    seen = 0
    while stack and seen < MAX_FILES:
        path = stack.pop()
        entry = stat_path(root, path)
        if entry is None:
            continue
        seen += 1
        yield path
        if entry.kind == stat.S_IFDIR:
            for e in reversed(list_dir(root, path)):
                stack.append(path + b"/" + e.name if path else e.name)


def _copy(root: int, rel: bytes, dest: Path) -> dict[str, Any]:
    item: dict[str, Any] = {"path": os.fsdecode(rel)}
    try:
        with parent_of(root, rel) as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                item.update(kind="symlink", target=os.fsdecode(os.readlink(name, dir_fd=parent)))
                return item
            if not stat.S_ISREG(st.st_mode):
                item["kind"] = "directory" if stat.S_ISDIR(st.st_mode) else "other"
                return item
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        digest = hashlib.sha256()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
            for _ in range(1 << 40):
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        os.chown(dest, st.st_uid, st.st_gid)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        item.update(kind="file", size=st.st_size, sha256=digest.hexdigest(), mode=oct(st.st_mode))
    except OSError as exc:
        item.update(kind="error", error=f"{errno.errorcode.get(exc.errno or 0, '')} {exc}")
    return item


def make_quarantine(
    qroot: Path,
    dirs: Sequence[tuple[Path, DirtyJournal | None]],
    reason: str,
    now: dt.datetime | None = None,
) -> Path:
    """Copy this node's changed files into a new dated folder under ``qroot``; return it."""
    now = now or dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y-%m-%dT%H-%M-%S.%fZ")
    folder = qroot / stamp
    folder.mkdir(parents=True, exist_ok=False)
    report: dict[str, Any] = {"reason": reason, "created": now.isoformat(), "dirs": []}
    count = 0
    for path, journal in dirs:
        wanted, why = _changed(journal)
        base = folder / str(path).lstrip("/")
        entry: dict[str, Any] = {"dir": str(path), "selection": why, "files": []}
        report["dirs"].append(entry)
        root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            tops = [b""] if wanted is None else wanted
            done: list[bytes] = []
            for top in tops:
                if any(under(top, d) for d in done):
                    continue
                done.append(top)
                for rel in _walk(root, top):
                    if rel == b"" or count >= MAX_FILES:
                        continue
                    item = _copy(root, rel, base / os.fsdecode(rel))
                    if item.get("kind") != "directory":
                        entry["files"].append(item)
                        count += 1
        finally:
            os.close(root)
    report["truncated"] = count >= MAX_FILES
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"mirrorha quarantine {stamp}", f"reason: {reason}", ""]
    for d in report["dirs"]:
        lines.append(f"{d['dir']} ({d['selection']}): {len(d['files'])} entries")
        for f in d["files"]:
            extra = f.get("sha256") or f.get("target") or f.get("error") or ""
            lines.append(f"  {f['kind']:8} {f.get('size', ''):>12} {f['path']}  {extra}")
    (folder / "report.txt").write_text("\n".join(lines) + "\n")
    return folder


__all__ = ["make_quarantine"]
