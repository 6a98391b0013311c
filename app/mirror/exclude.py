"""Which paths under a replicated root are excluded from replication (pure, no I/O).

How it works
    ``Exclusions(patterns).excluded(relpath, is_dir)`` answers for one path relative to the
    replicated root (``bytes``, no leading slash, ``b""`` is the root, never excluded). The
    patterns come from the config (``[[modules.replicated]] exclude = ["*.tmp", "cache/"]``) and
    use ``fnmatch`` syntax (``*``, ``?``, ``[...]``), case-sensitive:

    - no ``/`` in the pattern (``*.tmp``, ``postmaster.pid``): matched against the final name
      of the path, at any depth;
    - a trailing ``/`` (``cache/``, ``.cache/``): matches only a directory, by name at any depth
      when no other ``/`` is in the pattern, by its whole relative path otherwise
      (``var/cache/``);
    - a ``/`` elsewhere (``pg_stat_tmp/*``, ``logs/*.gz``): matched against the whole path
      relative to the root; ``*`` also matches ``/`` (fnmatch), so ``pg_stat_tmp/*`` covers
      the whole tree under it. A leading ``./`` is ignored.

    A path is excluded when it or any directory above it matches: everything below an excluded
    directory is excluded too, whatever its own name.

Exceptions
    ``ValueError`` from the constructor for an empty pattern, an absolute one (``/x``) or one
    with a NUL byte (the config loader refuses these first, naming the key).

Known limits
    - No negation (``!pattern``) and no ``**``: fnmatch's ``*`` already crosses ``/``.
    - Names are matched as bytes; a pattern is encoded as UTF-8 (surrogateescape), like the
      paths the FUSE session hands the FUSE layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Exclusions"]


@dataclass(frozen=True, slots=True)
class _Pattern:
    glob: bytes
    anchored: bool  # matched against the whole relative path, not the final name
    dir_only: bool


def _compile(pattern: str) -> _Pattern:
    if not pattern or pattern.startswith("/") or "\0" in pattern:
        raise ValueError(f"{pattern!r} must be a non-empty pattern relative to the directory")
    raw = pattern.encode("utf-8", "surrogateescape")
    while raw.startswith(b"./"):
        raw = raw[2:]
    dir_only = raw.endswith(b"/")
    raw = raw.rstrip(b"/")
    if not raw:
        raise ValueError(f"{pattern!r} names no file or directory")
    return _Pattern(raw, b"/" in raw, dir_only)


class Exclusions:
    """The exclude patterns of one replicated directory."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._compiled = tuple(_compile(p) for p in self.patterns)

    def __bool__(self) -> bool:
        return bool(self._compiled)

    @property
    def has_path_patterns(self) -> bool:
        """True if a pattern matches whole relative paths: renaming a directory can then change
        whether the entries below it are excluded (name patterns cannot)."""
        return any(p.anchored for p in self._compiled)

    def __repr__(self) -> str:
        return f"Exclusions({list(self.patterns)!r})"

    def excluded(self, relpath: bytes, is_dir: bool) -> bool:
        """True if ``relpath`` (a directory when ``is_dir``) or a directory above it matches."""
        if not self._compiled or not relpath:
            return False
        parts = relpath.strip(b"/").split(b"/")
        for depth in range(1, len(parts) + 1):
            last = depth == len(parts)
            if self._matches(b"/".join(parts[:depth]), parts[depth - 1], is_dir or not last):
                return True
        return False

    def _matches(self, path: bytes, name: bytes, is_dir: bool) -> bool:
        for p in self._compiled:
            if p.dir_only and not is_dir:
                continue
            if fnmatch.fnmatchcase(path if p.anchored else name, p.glob):
                return True
        return False
