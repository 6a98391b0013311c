"""Resync plans: which paths and ranges a reintegration reconciles (pure, no I/O).

How it works
    ``plan_incremental`` reads both sides' activity logs. An untrusted log on either side,
    or ``full``, means a deep compare of the whole tree. Otherwise: namespace paths of both
    logs (source journal and the target's own activity log, which covers writes a crashed
    ex-primary applied but never had acknowledged) are reconciled deeply, shallowest first;
    data files only in their dirty ranges (union of both logs, merged, page aligned);
    metadata paths for attributes. A path below a deep path is left to that deep pass.
    ``merge_ranges``, ``blocks_in`` and ``differing`` are the range and block-sum helpers
    the source uses while it executes the plan.

Limits
    - Ranges are aligned to PAGE: a one-byte change sends its whole page.
    - A rename made while the peer was away re-sends the renamed file in full (``origin`` is
      not used to seed the peer's copy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from app.mirror.resync_codec import BLOCK, ActivityLog, Sum

PAGE: Final = 4096  # alignment of the ranges an incremental plan sends


def under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


def depth(path: bytes) -> int:
    return 0 if not path else path.count(b"/") + 1


def merge_ranges(ranges: Iterable[tuple[int, int]], block: int = BLOCK) -> list[tuple[int, int]]:
    """Block-aligned, sorted, non-overlapping (offset, length) covering every input range."""
    spans = sorted(
        ((off // block) * block, -(-(off + ln) // block) * block) for off, ln in ranges if ln > 0
    )
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return [(lo, hi - lo) for lo, hi in out]


def blocks_in(ranges: Iterable[tuple[int, int]], size: int, block: int = BLOCK) -> list[int]:
    """Indexes of the blocks of a ``size``-byte file touched by ``ranges`` (clipped to size)."""
    nblocks = -(-size // block)
    out: list[int] = []
    for off, ln in merge_ranges(ranges, block):
        first = off // block
        last = min(nblocks, (off + ln) // block)
        out.extend(range(first, last))
    return sorted(set(out))


def differing(local: list[Sum], remote: list[Sum]) -> list[int]:
    """Positions where the sums differ (a block the remote lacks differs)."""
    return [i for i, s in enumerate(local) if i >= len(remote) or remote[i] != s]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to reconcile: ``deep`` subtrees (shallowest first), ``files`` data ranges, ``meta``."""

    full: bool
    deep: tuple[bytes, ...] = ()
    files: tuple[tuple[bytes, tuple[tuple[int, int], ...]], ...] = ()
    meta: tuple[bytes, ...] = ()
    reason: str = ""


def plan_incremental(source: ActivityLog, target: ActivityLog, full: bool = False) -> Plan:
    """The reintegration plan for both activity logs (see the module docstring)."""
    for side, log in (("source", source), ("target", target)):
        if log.present and not log.trusted:
            return Plan(True, (b"",), reason=f"{side} journal untrusted: {log.reason}")
    if full:
        return Plan(True, (b"",), reason="full resync requested")
    deep: list[bytes] = []
    for p in sorted(set(source.namespace) | set(target.namespace), key=lambda p: (depth(p), p)):
        if not any(under(p, d) for d in deep):
            deep.append(p)
    ranges: dict[bytes, list[tuple[int, int]]] = {}
    for log in (source, target):
        for path, rs in log.files:
            if not any(under(path, d) for d in deep):
                ranges.setdefault(path, []).extend(rs)
    files = tuple(sorted((p, tuple(merge_ranges(rs, PAGE))) for p, rs in ranges.items()))
    meta = sorted(
        {
            p
            for p in (*source.metadata, *target.metadata)
            if p not in ranges and not any(under(p, d) for d in deep)
        }
    )
    return Plan(False, tuple(deep), files, tuple(meta), reason="incremental")
