"""The dirty journal's paths, indexed by directory: a subtree is found without a scan.

How it works
    Paths are relative to the replicated root: ``b"d/x"``'s parent is ``b"d"``, whose parent
    is the root ``b""``. ``PathSet`` and ``PathDict`` are a set and a dict of such paths that
    also keep a children map: each path leading to a key (the key itself and its ancestors,
    the root excepted) is listed in its parent's entry, ``links[parent] = {child, ...}``.
    ``under(top)`` walks that map down from ``top``: the keys at or below ``top`` (``top``
    itself, or ``top + b"/" + ...``; every key below the root ``b""``) in O(depth + the
    subtree's size), whatever the number of keys. A key added links itself and those of its
    ancestors not linked yet; a key removed unlinks itself and the ancestors left leading
    nowhere. Every change goes through ``add``/``discard`` or ``__setitem__``/``__delitem__``
    (the ``MutableSet``/``MutableMapping`` mixins call them too), so the map cannot go stale.

    ``Handles`` keeps the journal's open file handles (journal.py) and the path of each, and
    finds the handles of a subtree the same way, for an unlink or a rename.

    ``under``, ``parent`` and ``renamed`` are the path arithmetic the journal shares.

Exceptions
    ``PathDict`` raises KeyError like a dict; nothing else is raised here.

Limits
    The map costs about 40 bytes per key (its entry in its parent's set), plus an entry per
    directory leading to keys, in each container. A rename or drop of a large subtree still
    costs its size (each key moves), and ``under_either`` sorts what it finds.
"""

from __future__ import annotations

from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    MutableSet,
    ValuesView,
)
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import TypeVar, overload

V = TypeVar("V")
T = TypeVar("T")

__all__ = ["Handles", "PathDict", "PathSet", "parent", "renamed", "under", "under_either"]


def under(path: bytes, top: bytes) -> bool:
    """Whether ``path`` is ``top`` or lies below it (everything lies below the root ``b""``)."""
    return not top or path == top or path.startswith(top + b"/")


def parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def renamed(path: bytes, old: bytes, new: bytes, exchange: bool) -> bytes | None:
    """Where ``path`` is after renaming ``old`` to ``new`` (None: it was replaced)."""
    if under(path, old):
        return new + path[len(old) :]
    if under(path, new):
        return old + path[len(new) :] if exchange else None
    return path


# --- the children map ------------------------------------------------------------------------
# ``kids[p]``: the children of ``p`` that are keys or lead to one. A path ``q`` lies at or
# below ``top`` exactly when taking ``parent`` repeatedly from ``q`` reaches ``top`` (the last
# slash of ``q`` goes first, so every prefix of ``q`` that ends before a slash is visited).


def _link(kids: dict[bytes, set[bytes]], path: bytes) -> None:
    """List ``path`` (a new key) and its ancestors in their parents' entries."""
    p = path
    for _ in range(path.count(b"/") + 2):  # one parent per slash, then the root
        if not p:
            return
        up = parent(p)
        siblings = kids.get(up)
        if siblings is None:
            kids[up] = {p}
        elif p in siblings:
            return  # linked already, and so are its ancestors
        else:
            siblings.add(p)
        p = up


def _unlink(kids: dict[bytes, set[bytes]], keys: AbstractSet[bytes], path: bytes) -> None:
    """Unlink ``path`` (no longer a key) and the ancestors left leading to no key."""
    p = path
    for _ in range(path.count(b"/") + 2):
        if not p or p in keys or p in kids:
            return
        up = parent(p)
        siblings = kids[up]
        siblings.discard(p)
        if siblings:
            return
        del kids[up]
        p = up


def _below(kids: dict[bytes, set[bytes]], keys: AbstractSet[bytes], top: bytes) -> list[bytes]:
    """The keys at or below ``top``, in no particular order."""
    out = [top] if top in keys else []
    if top not in kids:  # a leaf (a file, or a path not tracked): nothing below
        return out
    stack = [top]
    for _ in range(len(kids) + 1):  # each path of ``kids`` is stacked at most once
        if not stack:
            break
        for child in kids.get(stack.pop(), ()):
            if child in keys:
                out.append(child)
            if child in kids:
                stack.append(child)
    return out


class PathSet(MutableSet[bytes]):
    """A set of paths that finds the ones at or below a path without a scan (``under``)."""

    __slots__ = ("_keys", "_kids")

    def __init__(self, paths: Iterable[bytes] = ()) -> None:
        self._keys: set[bytes] = set()
        self._kids: dict[bytes, set[bytes]] = {}
        for p in paths:
            self.add(p)

    def __contains__(self, path: object) -> bool:
        return path in self._keys

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"PathSet({self._keys!r})"

    def add(self, path: bytes) -> None:
        if path not in self._keys:
            self._keys.add(path)
            _link(self._kids, path)

    def discard(self, path: bytes) -> None:
        if path in self._keys:
            self._keys.remove(path)
            _unlink(self._kids, self._keys, path)

    def under(self, top: bytes) -> list[bytes]:
        """The paths at or below ``top``: O(depth + their number)."""
        return _below(self._kids, self._keys, top)

    @property
    def links(self) -> Mapping[bytes, AbstractSet[bytes]]:
        """The children map, read-only (tests check it against the keys)."""
        return MappingProxyType(self._kids)


class PathDict(MutableMapping[bytes, V]):
    """A dict keyed by path that finds the keys at or below a path without a scan."""

    __slots__ = ("_items", "_keys", "_kids")

    def __init__(self) -> None:
        self._items: dict[bytes, V] = {}
        self._keys = self._items.keys()
        self._kids: dict[bytes, set[bytes]] = {}

    def __getitem__(self, path: bytes) -> V:
        return self._items[path]

    def __setitem__(self, path: bytes, value: V) -> None:
        if path not in self._items:
            _link(self._kids, path)
        self._items[path] = value

    def __delitem__(self, path: bytes) -> None:
        del self._items[path]
        _unlink(self._kids, self._keys, path)

    def __contains__(self, path: object) -> bool:
        return path in self._items

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"PathDict({self._items!r})"

    @overload
    def get(self, path: bytes, /) -> V | None: ...
    @overload
    def get(self, path: bytes, default: V | T, /) -> V | T: ...
    def get(self, path: bytes, default: V | T | None = None, /) -> V | T | None:
        return self._items.get(path, default)

    def keys(self) -> KeysView[bytes]:
        return self._keys

    def items(self) -> ItemsView[bytes, V]:
        return self._items.items()

    def values(self) -> ValuesView[V]:
        return self._items.values()

    def under(self, top: bytes) -> list[bytes]:
        """The keys at or below ``top``: O(depth + their number)."""
        return _below(self._kids, self._keys, top)

    @property
    def links(self) -> Mapping[bytes, AbstractSet[bytes]]:
        """The children map, read-only (tests check it against the keys)."""
        return MappingProxyType(self._kids)


def under_either(paths: PathSet | PathDict[V], old: bytes, new: bytes) -> list[bytes]:
    """The keys of ``paths`` at or below ``old`` or ``new``, each once, sorted (so what a
    rename does never depends on the order the keys were added in)."""
    if under(new, old):
        return sorted(paths.under(old))
    if under(old, new):
        return sorted(paths.under(new))
    return sorted(paths.under(old) + paths.under(new))


class Handles:
    """Open file handles and the current path of each (None: unlinked while open)."""

    __slots__ = ("_by_path", "_path")

    def __init__(self) -> None:
        self._path: dict[int, bytes | None] = {}
        self._by_path: PathDict[set[int]] = PathDict()  # the handles open on each path

    def __contains__(self, fh: object) -> bool:
        return fh in self._path

    def __len__(self) -> int:
        return len(self._path)

    def path(self, fh: int) -> bytes | None:
        """The current path of ``fh`` (KeyError: not open)."""
        return self._path[fh]

    @property
    def by_path(self) -> PathDict[set[int]]:
        """The handles open on each path, read-only (tests check it against ``path``)."""
        return self._by_path

    def open(self, fh: int, path: bytes) -> None:
        self.release(fh)
        self._path[fh] = path
        self._by_path.setdefault(path, set()).add(fh)

    def release(self, fh: int) -> None:
        path = self._path.pop(fh, None)
        if path is not None:
            fhs = self._by_path[path]
            fhs.discard(fh)
            if not fhs:
                del self._by_path[path]

    def unlink(self, path: bytes) -> None:
        """``path`` was unlinked: its handles reach no name any more."""
        for fh in self._by_path.pop(path, ()):
            self._path[fh] = None

    def rename(self, old: bytes, new: bytes, exchange: bool) -> None:
        """Follow the handles below ``old`` (and ``new``) to where the rename puts them."""
        moved = [(p, self._by_path.pop(p)) for p in under_either(self._by_path, old, new)]
        for p, fhs in moved:
            p2 = renamed(p, old, new, exchange)
            for fh in fhs:
                self._path[fh] = p2
            if p2 is not None:
                self._by_path.setdefault(p2, set()).update(fhs)
