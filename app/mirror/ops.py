"""The replicated operations: what the primary's FUSE layer sends and the secondary applies.

Every change an application makes through the mount becomes exactly one of these frozen
values. They are the contract between three parts that never import each other:

    fusefs.py (primary)  --Op-->  Replicator  --protocol.py bytes-->  receiver.py (secondary)

Paths are ``bytes`` relative to the replicated root, without a leading slash, as the kernel
gives them (names need not be UTF-8). ``b""`` is the root itself. Validation of paths (no
``..``, no NUL, no absolute path) is the decoder's and the receiver's job, never the sender's
good faith.

Open files are named by a handle number ``fh`` chosen by the primary (unique among its open
handles): data operations name the handle, not the path, so writes to a file that was renamed
or unlinked while open land in the right file, as they do locally. ``Open``/``Create`` bind a
handle on the secondary, ``Release`` drops it.

The ``Replicator`` protocol is the seam between the FUSE layer and the replication channel:
``apply(op, local)`` runs the local change and replicates it, in one order for everyone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Open:
    """Bind handle ``fh`` to an existing file, opened for writing on the secondary."""

    fh: int
    path: bytes


@dataclass(frozen=True, slots=True)
class Create:
    """Create ``path`` (exclusively when ``excl``) with ``mode`` and owner, and bind ``fh``."""

    fh: int
    path: bytes
    mode: int
    uid: int
    gid: int
    excl: bool


@dataclass(frozen=True, slots=True)
class WriteV:
    """Several writes to the handle ``fh``: (offset, data) parts applied in order.

    The resync sends the small changed ranges of one file this way: one frame, one
    answer, instead of one per 4 KiB range.
    """

    fh: int
    parts: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Release:
    fh: int


@dataclass(frozen=True, slots=True)
class Write:
    fh: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Truncate:
    """Set the length of ``path`` (``fh`` is -1) or of the open handle ``fh``."""

    fh: int
    path: bytes
    length: int


@dataclass(frozen=True, slots=True)
class Fallocate:
    """fallocate(2) with its ``mode`` bits (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ...)."""

    fh: int
    mode: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Fsync:
    """fsync (``datasync`` False) or fdatasync (True); ``fh`` -1 syncs the file at ``path``."""

    fh: int
    path: bytes
    datasync: bool


@dataclass(frozen=True, slots=True)
class Mknod:
    """A regular file, FIFO or socket made with mknod(2) (device nodes are refused)."""

    path: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Mkdir:
    path: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Unlink:
    path: bytes


@dataclass(frozen=True, slots=True)
class Rmdir:
    path: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    """renameat2(2); ``flags`` may hold RENAME_NOREPLACE or RENAME_EXCHANGE."""

    old: bytes
    new: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class Link:
    """Hard link: ``new`` becomes another name of ``target`` (both inside the root)."""

    target: bytes
    new: bytes


@dataclass(frozen=True, slots=True)
class Symlink:
    """Symbolic link at ``path`` whose content is ``target`` (stored as is, never followed)."""

    target: bytes
    path: bytes
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Chmod:
    path: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class Chown:
    """lchown: -1 leaves that id unchanged, as chown(2)."""

    path: bytes
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Utimens:
    """Set atime and mtime in nanoseconds on ``path`` without following a final symlink."""

    path: bytes
    atime_ns: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SetXattr:
    path: bytes
    name: bytes
    value: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    path: bytes
    name: bytes


Op = (
    Open
    | Create
    | Release
    | Write
    | Truncate
    | Fallocate
    | Fsync
    | Mknod
    | Mkdir
    | Unlink
    | Rmdir
    | Rename
    | Link
    | Symlink
    | Chmod
    | Chown
    | Utimens
    | SetXattr
    | RemoveXattr
    | WriteV
)

ALL_OPS: tuple[type[Op], ...] = (
    Open,
    Create,
    Release,
    Write,
    Truncate,
    Fallocate,
    Fsync,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Rename,
    Link,
    Symlink,
    Chmod,
    Chown,
    Utimens,
    SetXattr,
    RemoveXattr,
    WriteV,
)


def parent_path(path: bytes) -> bytes:
    """The relative path of ``path``'s directory (b"" for the replicated root)."""
    return path.rpartition(b"/")[0]


def times_touched(op: Op) -> tuple[bytes, ...]:
    """Paths whose own times ``op`` moves on each side to that side's clock.

    A namespace op changes its parent directory's mtime (and a new directory's, node's or
    symlink's own times) when it is applied, so the primary and the secondary each get their
    own "now". Regular files need nothing here: their times are replicated when their handle
    is released, and a truncate by path sends them at once (fusefs.py).
    """
    match op:
        case Create(path=p) | Unlink(path=p) | Rmdir(path=p):
            return (parent_path(p),)
        case Mkdir(path=p) | Mknod(path=p) | Symlink(path=p):
            return (parent_path(p), p)
        case Link(new=new):
            return (parent_path(new),)
        case Rename(old=old, new=new):
            return (parent_path(old), parent_path(new), new)
        case _:
            return ()


class Replicator(Protocol):
    """What the FUSE layer calls for every change.

    ``apply`` marks what ``op`` will touch in the dirty journal (before the first byte is
    written), runs ``local()`` (the change on the real directory; an OSError from it
    propagates and nothing is sent), queues ``op`` for the peer in the same order as the local
    changes, then waits for the peer's acknowledgement and returns ``local()``'s result.

    A peer that does not acknowledge in time is dropped (the node goes ALONE) and the change
    stays recorded for reintegration: ``apply`` does not raise for peer trouble, so the
    application is never blocked forever and never sees a peer error.
    """

    def apply(self, op: Op, local: Callable[[], T]) -> T: ...


class LocalOnly:
    """A Replicator with no peer: runs the change locally and nothing else."""

    def apply(self, op: Op, local: Callable[[], T]) -> T:
        return local()
