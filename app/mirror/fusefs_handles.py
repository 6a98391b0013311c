"""The record the primary's FUSE filesystem (fusefs.py) keeps for each open file.

How it works
    ``MirrorFS`` gives every open file a handle number from a counter (never reused while the
    filesystem lives) and maps it to a ``_Handle``: the local fd and how the file was opened.
    ``writable``: opened for writing (write access, O_TRUNC, or create); only those are
    announced to the peer (``Open``/``Create``, ``Release``). ``append``: O_APPEND, which the
    local fd is opened without, so a write lands at the real file size read under ``lock``.
    ``sync``: O_SYNC/O_DSYNC, each ``Write`` is followed by an ``Fsync`` op. ``wrote``: the
    handle changed data, so its times are replicated on release. ``replicated``: False when
    opened by an excluded name (changes stay local); it follows a rename across the boundary.
    ``setid_free``: MirrorFS's mode generation when this handle last saw the file without a
    set-ID bit; while no chmod has bumped the generation since, a write needs no fstat.

    ``lock`` is one of ``_INODE_LOCKS`` locks, picked by the file's inode number, so every
    handle of one file (and every name of a hard-linked file) shares it. MirrorFS holds it
    across a ``Write`` (an append's offset and its op agree) and orders a release's time sync
    with an explicit utimens by it.

Exceptions
    None: plain data. An unknown handle number is MirrorFS's EBADF.

Known limits
    - Files whose inode numbers are equal modulo ``_INODE_LOCKS`` share a lock: their writes
      are serialized against each other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_INODE_LOCKS = 64


@dataclass(slots=True)
class _Handle:
    fd: int
    writable: bool
    append: bool
    lock: threading.Lock
    wrote: bool = False
    replicated: bool = True  # False: opened by an excluded name, changes stay local
    setid_free: int = -1  # the mode generation (MirrorFS) at which the file had no set-ID bit
