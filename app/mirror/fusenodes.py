"""The kernel's inodes of the FUSE mount and the paths they stand for (pure, thread-safe).

How it works
    The kernel names every object by a node id it got from us in an entry reply (LOOKUP,
    CREATE, MKDIR, ...). ``Nodes`` gives one id per (parent, name) seen, as libfuse's
    high-level API did: a hard-linked file has one node per name. It counts the kernel's
    lookups of each node (``lookup`` +1, FORGET -n) and drops a node once the kernel forgot
    it and no child names it. ``path(nodeid)`` is the node's path relative to the root as
    bytes (``b""`` the root), or None when the node lost its name (unlinked while open, or
    below a removed directory): operations on open files then go on by handle, as with
    libfuse's ``hard_remove``.

    Paths are built by walking up to the root and kept per node, stamped with ``moves``, a
    counter that every rename and removal advances: a stale stamp means "walk again", so a
    path costs a dict lookup when nothing moved.

    A path is only good while no rename or removal runs: ``reading()`` (shared) brackets an
    operation that computes paths and acts on them (a release that sends the file's times by
    name, a chmod, a lookup), ``changing()`` (exclusive) a rename, unlink or rmdir from its
    change on disk to the update of the table. So an operation never acts on a name that a
    concurrent rename already moved (the peer would be told about a path that is gone), as
    libfuse's tree locks made sure. A waiting ``changing()`` goes first: new readers wait.

Exceptions
    ``KeyError`` is never raised to callers: an unknown node id gives ``path() -> None`` and
    is ignored by ``forget``; the loop answers ESTALE.

Known limits
    - One node per name: attributes seen through one name of a hard-linked file can lag the
      other's by the attribute timeout (fusefs.py's known limits).
    - Node ids are never reused while the mount lives (a 64-bit counter).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

ROOT: Final = 1


@dataclass(slots=True)
class _Node:
    parent: int  # 0: no name any more
    name: bytes
    lookups: int = 0  # the kernel's references (entry replies not forgotten yet)
    children: int = 0  # nodes that have this one as parent
    path: bytes | None = None
    stamp: int = -1  # ``moves`` when ``path`` was computed


@dataclass(slots=True)
class Nodes:
    """See the module docstring."""

    moves: int = 0
    _nodes: dict[int, _Node] = field(default_factory=dict)
    _names: dict[tuple[int, bytes], int] = field(default_factory=dict)
    _next: int = ROOT + 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    _names_cond: threading.Condition = field(default_factory=threading.Condition)
    _readers: int = 0
    _changer: bool = False
    _changers_waiting: int = 0

    def __post_init__(self) -> None:
        self._nodes[ROOT] = _Node(parent=0, name=b"", lookups=1, path=b"", stamp=0)

    # -- the namespace lock -----------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Paths computed inside stay true until the block ends (shared)."""
        with self._names_cond:
            while self._changer or self._changers_waiting:
                self._names_cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._names_cond:
                self._readers -= 1
                if not self._readers:
                    self._names_cond.notify_all()

    @contextmanager
    def changing(self) -> Iterator[None]:
        """A rename or removal, alone (exclusive); waits for the readers in flight."""
        with self._names_cond:
            self._changers_waiting += 1
            try:
                while self._changer or self._readers:
                    self._names_cond.wait()
            finally:
                self._changers_waiting -= 1
            self._changer = True
        try:
            yield
        finally:
            with self._names_cond:
                self._changer = False
                self._names_cond.notify_all()

    # -- reading ----------------------------------------------------------------------------

    def path(self, nodeid: int) -> bytes | None:
        """The node's path (``b""``: the root), or None when it has no name any more."""
        with self._lock:
            return self._path(nodeid)

    def child(self, parent: int, name: bytes) -> bytes | None:
        """The path of ``name`` in directory ``parent`` (None: the directory has no name)."""
        with self._lock:
            top = self._path(parent)
        if top is None:
            return None
        return top + b"/" + name if top else name

    def _path(self, nodeid: int) -> bytes | None:
        node = self._nodes.get(nodeid)
        if node is None:
            return None
        if node.stamp == self.moves:
            return node.path
        parts: list[bytes] = []
        cur: _Node | None = node
        for _ in range(4096):  # deeper than PATH_MAX allows: a loop would be a bug
            if cur is None or cur.parent == 0:
                break
            parts.append(cur.name)
            cur = self._nodes.get(cur.parent)
        path: bytes | None = b"/".join(reversed(parts))
        if cur is None or cur is not self._nodes[ROOT]:
            path = None  # the chain ends in a node with no name, not at the root
        node.path, node.stamp = path, self.moves
        return path

    def __len__(self) -> int:
        return len(self._nodes)

    # -- the kernel's references ------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        """The node id for ``name`` in ``parent`` (new if unseen), one more kernel reference."""
        with self._lock:
            nodeid = self._names.get((parent, name))
            if nodeid is None:
                nodeid = self._next
                self._next += 1
                self._nodes[nodeid] = _Node(parent=parent, name=name)
                self._names[(parent, name)] = nodeid
                self._nodes[parent].children += 1
            self._nodes[nodeid].lookups += 1
            return nodeid

    def forget(self, nodeid: int, count: int) -> None:
        """The kernel dropped ``count`` references (FORGET); an unknown id is ignored."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or nodeid == ROOT:
                return
            node.lookups = max(0, node.lookups - count)
            self._drop_if_unused(nodeid)

    def _drop_if_unused(self, nodeid: int) -> None:
        for _ in range(1 << 20):  # up the chain of parents this drop frees (bounded)
            node = self._nodes.get(nodeid)
            if node is None or nodeid == ROOT or node.lookups or node.children:
                return
            del self._nodes[nodeid]
            parent = node.parent
            if parent:
                if self._names.get((parent, node.name)) == nodeid:
                    del self._names[(parent, node.name)]
                self._nodes[parent].children -= 1
            nodeid = parent

    # -- the namespace changes the filesystem made ------------------------------------------

    def remove(self, parent: int, name: bytes) -> None:
        """``name`` was unlinked or removed from ``parent``: its node keeps no name."""
        with self._lock:
            self._detach(parent, name)
            self.moves += 1

    def rename(self, old: int, oldname: bytes, new: int, newname: bytes, exchange: bool) -> None:
        """A rename (or RENAME_EXCHANGE) the filesystem made: the nodes follow their names;
        a node the rename replaced keeps no name."""
        with self._lock:
            src = self._names.pop((old, oldname), None)
            dst = self._names.pop((new, newname), None)
            if exchange:
                if dst is not None:
                    self._attach(dst, old, oldname)
            elif dst is not None:
                self._names[(new, newname)] = dst  # put back to detach it the usual way
                self._detach(new, newname)
            if src is not None:
                self._attach(src, new, newname)
            self.moves += 1

    def _attach(self, nodeid: int, parent: int, name: bytes) -> None:
        node = self._nodes[nodeid]
        if node.parent != parent:
            if node.parent:
                self._nodes[node.parent].children -= 1
            self._nodes[parent].children += 1
            old_parent = node.parent
            node.parent = parent
            if old_parent:
                self._drop_if_unused(old_parent)
        node.name = name
        self._names[(parent, name)] = nodeid

    def _detach(self, parent: int, name: bytes) -> None:
        nodeid = self._names.pop((parent, name), None)
        if nodeid is None:
            return
        node = self._nodes[nodeid]
        node.parent = 0
        self._nodes[parent].children -= 1
        self._drop_if_unused(nodeid)
        self._drop_if_unused(parent)
