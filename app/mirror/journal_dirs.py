"""The journal of each replicated directory, as the service keeps and reads it.

How it works
    Each replicated directory (index i) has its DirtyJournal (journal.py) in
    ``<state_dir>/mirror/<i>-<hash>/`` (``journal_dir``), the hash naming the directory's path.
    ``load_journal`` opens it, or starts a new one at the given generation (untrusted when the
    previous one was unreadable). ``activity_log`` reads a journal as resync.py's
    ``ActivityLog``: the dirty files, namespace and metadata paths, or untrusted (full compare).

    Async mode leaves an ``async-primary`` marker (``ASYNC_MARKER``, written with ``touch``) in
    the journal dir while it runs, removed at a clean stop; ``distrust_after_async`` makes the
    journal untrusted when the marker outlived its daemon (the inotify mirror journals after
    the fact, so the record may miss writes).

    Exceptions: ``load_journal`` turns a corrupt journal (JournalCorrupt) into a new untrusted
    one and lets other JournalErrors pass; ``distrust_after_async`` keeps a JournalError to
    itself; ``touch`` raises OSError.

Limits
    - A directory renamed or moved in the configuration gets a new journal dir (the name is
      its index and a hash of its path); the old one stays on disk.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from app.mirror import resync
from app.mirror.journal import DirtyJournal, JournalCorrupt, JournalError, JournalNotFound

ASYNC_MARKER = "async-primary"  # in a journal dir: async mode ran; removed at a clean stop


def journal_dir(state_dir: Path, index: int, path: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(str(path))).hexdigest()[:12]
    return state_dir / "mirror" / f"{index}-{digest}"


def load_journal(jdir: Path, generation: str) -> DirtyJournal:
    """The journal kept in ``jdir``, or a new one at ``generation`` (untrusted if corrupt)."""
    try:
        return DirtyJournal.load(jdir)
    except JournalNotFound:
        return DirtyJournal(jdir, generation)
    except JournalCorrupt as exc:
        journal = DirtyJournal(jdir, generation)
        journal.invalidate(f"the previous journal was unreadable: {exc}")
        return journal


def activity_log(journal: DirtyJournal | None, degraded: bool = False) -> resync.ActivityLog:
    if journal is None:
        return resync.ActivityLog(present=False)
    if degraded or not journal.trusted:
        return resync.ActivityLog(True, False, journal.reason or "journal write failed")
    files = tuple((p, tuple(rs)) for p, rs in journal.dirty_files())
    return resync.ActivityLog(
        True,
        True,
        "",
        files,
        tuple(sorted(journal.namespace_paths())),
        tuple(sorted(journal.metadata_paths())),
    )


def touch(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def distrust_after_async(journal: DirtyJournal) -> None:
    """An async primary that did not stop cleanly may have written what its journal never saw
    (the inotify mirror journals after the fact): its record is not trusted (full compare)."""
    if (journal.state_dir / ASYNC_MARKER).exists() and journal.trusted:
        try:
            journal.invalidate("async mode ended without a clean stop: the record may miss writes")
        except JournalError:
            pass
