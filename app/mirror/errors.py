"""The mirror's exception tree.

Every error the replication path raises on purpose is one of these; anything else is a bug.
Adapters translate at their boundary (``raise ApplyError(...) from exc``) so callers catch
one tree, never a bare ``OSError``, ``struct.error`` or ``ValueError``::

    MirrorError                 base of everything below
    +-- ProtocolError           bytes or events that break the wire protocol (malformed frame,
    |   |                       oversized frame, bad path in a payload, event out of order, ...).
    |   |                       The connection is dead after it: close the socket.
    |   +-- AuthError           the handshake failed: wrong cluster key, wrong cluster name,
    |                           replayed or reflected proof. Nothing from that peer is applied.
    +-- ApplyError(errno)       the secondary could not apply an operation; ``errno`` is what
    |   |                       the primary hears in the Nack. The tree is unchanged unless
    |   |                       the system call itself changed it partly (a short write).
    |   +-- PathEscape          the operation would leave the replicated root (a symlink on the
    |                           way, ``..``, an absolute path); refused before any change,
    |                           errno ELOOP.
    +-- ChannelError            the peer connection closed, failed or did not answer in time
    +-- ResyncError             a reintegration could not finish (refused, interrupted)

Other mirror modules may add subclasses; keep the roots few.
"""

from __future__ import annotations

import errno as errno_codes
import os


class MirrorError(Exception):
    """Base of every deliberate error of the mirror."""


class ProtocolError(MirrorError):
    """The peer (or the local caller) broke the replication protocol."""


class AuthError(ProtocolError):
    """Mutual authentication of the connection failed."""


class ApplyError(MirrorError):
    """An operation could not be applied on the secondary.

    ``errno`` is a positive errno number sent back to the primary in a Nack.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(errno, self.message)

    def __str__(self) -> str:
        name = errno_codes.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.message}"


class PathEscape(ApplyError):
    """The path leads out of the replicated root; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno_codes.ELOOP, message)


class ChannelError(MirrorError):
    """The connection to the peer failed, closed or did not answer in time (channel.py)."""


class ResyncError(MirrorError):
    """A reintegration could not finish (resync.py): the peer refused or diverged again."""
