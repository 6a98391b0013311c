"""The asynchronous mirror's send thread and the items of its queue.

Part of ``AsyncMirror`` (asyncmode.py), as the mixin ``_Sender``; its state is set up by
``AsyncMirror.__init__``.

How it works
    The watch thread puts items on a bounded queue (``queue_ops`` items): ops, a
    ``_GroupEnd`` after each group of ops (one file copy, one rename), a ``_Barrier`` that
    ``initial_sync()`` and ``flush()`` wait for, and ``_STOP`` from ``stop()``. The send thread
    takes them one at a time, in order, and calls ``sink(op)`` (the service sends them on the
    channel; tests apply them with a Receiver). It counts the ops sent and the bytes of their
    Writes, and keeps the file handles the current group has opened on the peer.
    Lag: at the end of a timed group it records the time from the group's first unsent event
    to the return of the sink call of its last op (``LagStats``, asyncmode_pure.py).

Exceptions
    A sink that raises does not stop the mirror: the rest of the op's group is skipped, the
    handles the group opened are released (errors ignored), the error is logged and counted
    in ``status()`` ("errors", "last_error"), and the path goes back to the watch thread
    (``_failed``), which forgets it in the model: its next change copies it in full. A Mkdir
    answered EEXIST (``ApplyError``) counts as done. After errors the service should run a
    real resync.
    ``_Stopped`` (internal) is raised on the watch thread when ``stop()`` is called while it
    waits for queue space.

Known limits
    - The queue holds at most ``queue_ops`` ops of at most one chunk (``block_size * 16``)
      each (64 MiB at the defaults); when it is full the watch thread waits.
    - One sink call at a time, in order.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from app.mirror import ops
from app.mirror.asyncmode_pure import LagStats
from app.mirror.errors import ApplyError
from app.mirror.ops import Op


@dataclass(frozen=True, slots=True)
class _GroupEnd:
    path: bytes
    since: float | None


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event


@dataclass(frozen=True, slots=True)
class _StopItem:
    pass


class _Stopped(Exception):
    """Internal: stop() was called while the watch thread waited for queue space."""


_STOP: Final = _StopItem()
_Item = Op | _GroupEnd | _Barrier | _StopItem


class _Sender:
    """The send thread of ``AsyncMirror``; the attributes are set by ``AsyncMirror.__init__``."""

    _sink: Callable[[Op], None]
    _clock: Callable[[], float]
    _log: logging.Logger
    _queue: queue.Queue[_Item]
    _failed: queue.SimpleQueue[bytes]
    _lag: LagStats
    _errors: int
    _sent_ops: int
    _sent_bytes: int
    _last_error: str | None

    # -- send thread ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        bound: set[int] = set()
        failure: Exception | None = None
        while True:
            item = self._queue.get()
            if isinstance(item, _StopItem):
                return
            if isinstance(item, _Barrier):
                item.done.set()
            elif isinstance(item, _GroupEnd):
                if failure is not None:
                    self._group_failed(item.path, failure, bound)
                elif item.since is not None:
                    now = self._clock()
                    self._lag.record(now, (now - item.since) * 1000)
                bound.clear()
                failure = None
            elif failure is None:
                failure = self._send(item, bound)

    def _send(self, op: Op, bound: set[int]) -> Exception | None:
        try:
            self._sink(op)
        except Exception as exc:
            exists = isinstance(exc, ApplyError) and exc.errno == errno.EEXIST
            return None if exists and isinstance(op, ops.Mkdir) else exc
        self._sent_ops += 1
        if isinstance(op, ops.Write):
            self._sent_bytes += len(op.data)
        if isinstance(op, ops.Open | ops.Create):
            bound.add(op.fh)
        elif isinstance(op, ops.Release):
            bound.discard(op.fh)
        return None

    def _group_failed(self, path: bytes, exc: Exception, bound: set[int]) -> None:
        for fh in bound:
            try:
                self._sink(ops.Release(fh))
            except Exception:
                pass
        self._errors += 1
        self._last_error = f"{os.fsdecode(path)}: {exc}"
        self._log.error("async mirror: copying %r failed: %s", path, exc)
        self._failed.put(path)
