"""Data generations: how a node knows whether its copy of the data is up to date.

How it works
    DRBD-style. Every time a node starts writing without its peer (it goes ALONE), it first
    starts a new *generation*: a fresh random id becomes ``current`` and the previous one goes
    to the front of ``history``. Two replicas in sync carry the same ``current``. On every
    reconnect the two ``Generation`` values are compared (``compare``, pure):

    * same ``current``                       -> ``EQUAL`` (in sync)
    * the peer's ``current`` is in our history -> ``LOCAL_NEWER`` (we wrote since; the peer did
      not); incremental when our ``journal_base`` (the generation the dirty-extent journal
      counts from) is exactly the peer's ``current``, else ``LOCAL_NEWER_FULL``
    * the mirror image                         -> ``PEER_NEWER`` / ``PEER_NEWER_FULL``
    * neither is an ancestor of the other      -> ``DIVERGED`` (both wrote: split brain)
    * both never initialised (``current == ""``) -> ``UNKNOWN`` (brand-new cluster)

    Flags refine this. ``inconsistent``: a resync into this node started and has not finished
    (its data is a mix); an inconsistent copy always loses to a consistent one and is never
    ``EQUAL``. ``primary``: set before the application starts as primary, cleared after it
    stopped cleanly; found set at start, it means the node crashed while primary, so its disk
    may hold writes the peer never acknowledged: it needs a full (checksum) pass, and with an
    equal ``current`` it is the newer side. ``origin`` says how ``current`` was started (the
    tie-break of a divergence: a primary that kept running beats a secondary that failed over).

    The record lives in ``<state_dir>/generation.json``, written crash-safely (temporary file,
    fsync, rename, fsync of the directory). ``GenerationStore.load`` returns a fresh (unknown)
    generation when the file is missing and raises ``GenerationFileError`` naming the file when
    it cannot be read or parsed; the daemon then runs with ``Generation()`` (unknown), which is
    never promoted alone.

    ``to_wire``/``from_wire`` give a compact form (at most ``WIRE_MAX`` characters) for the
    heartbeat's ``generation`` field, carrying as much history as fits.

Exception tree
    ClusterError (errors.py)
     +-- GenerationError          a value that is not a generation (bad wire form, bad JSON)
           +-- GenerationFileError   the file exists but cannot be read or parsed (names it)

Known limits
    - History is bounded (``HISTORY_MAX`` ids; ``from_wire`` keeps fewer): a peer that was away
      for more generations than that compares as ``DIVERGED``: a full resync with quarantine,
      safe but slower.
    - The comparison trusts both records; a record restored from an old backup looks older,
      never newer, than it is.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.cluster.errors import ClusterError

HISTORY_MAX = 32
WIRE_MAX = 128
ID_HEX = 12
FILENAME = "generation.json"


class GenerationError(ClusterError):
    """A value that is not a valid generation."""


class GenerationFileError(GenerationError):
    """The generation file exists but cannot be used; the message names the file."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


class Origin(enum.StrEnum):
    """How the current generation was started (ranks a divergence, strongest first)."""

    PRIMARY = "primary"  # a primary lost its secondary and kept running
    FORCED = "forced"  # an admin ran prim / primforce
    FAILOVER = "failover"  # a secondary took over from a lost primary
    NONE = "none"  # never started here (fresh, or adopted from the peer)


_ORIGIN_RANK = {Origin.PRIMARY: 3, Origin.FORCED: 2, Origin.FAILOVER: 1, Origin.NONE: 0}


def origin_rank(origin: Origin) -> int:
    return _ORIGIN_RANK[origin]


class Relation(enum.Enum):
    """The local copy compared with the peer's."""

    EQUAL = "equal"
    LOCAL_NEWER = "local newer (incremental)"
    LOCAL_NEWER_FULL = "local newer (full resync)"
    PEER_NEWER = "peer newer (incremental)"
    PEER_NEWER_FULL = "peer newer (full resync)"
    DIVERGED = "diverged"
    UNKNOWN = "unknown"

    @property
    def local_newer(self) -> bool:
        return self in (Relation.LOCAL_NEWER, Relation.LOCAL_NEWER_FULL)

    @property
    def peer_newer(self) -> bool:
        return self in (Relation.PEER_NEWER, Relation.PEER_NEWER_FULL)

    @property
    def full(self) -> bool:
        """A resync between the two needs a full (checksum) pass."""
        return self in (Relation.LOCAL_NEWER_FULL, Relation.PEER_NEWER_FULL, Relation.DIVERGED)


def new_id() -> str:
    """A fresh random generation id."""
    return secrets.token_hex(ID_HEX // 2)


@dataclass(frozen=True, slots=True)
class Generation:
    """The persisted record of which data this node holds. Immutable: changes return copies."""

    current: str = ""  # "" = never initialised
    history: tuple[str, ...] = ()  # previous ids, newest first
    journal_base: str | None = None  # generation the dirty journal counts changes from
    inconsistent: bool = False  # a resync into this node is running or was interrupted
    primary: bool = False  # the application may run here as primary (not stopped cleanly)
    origin: Origin = Origin.NONE

    @property
    def fresh(self) -> bool:
        return self.current == ""

    def started(self, gen_id: str, origin: Origin) -> Generation:
        """Go ALONE: ``gen_id`` becomes current, before the application writes anything.

        The journal keeps counting from the generation the peer last had: the old base if
        there is one, else the old current. An inconsistent copy has no usable base (its
        content matches no generation), so the next resync of the peer is a full one.
        """
        if self.inconsistent:
            base = None
        elif self.journal_base is not None:
            base = self.journal_base
        else:
            base = self.current or None
        history = self.history if self.fresh else (self.current, *self.history)
        return Generation(
            current=gen_id,
            history=history[:HISTORY_MAX],
            journal_base=base,
            inconsistent=False,
            primary=self.primary,
            origin=origin,
        )

    def marked_inconsistent(self) -> Generation:
        """A resync into this node is about to overwrite it."""
        return replace(self, inconsistent=True, primary=False)

    def adopted(self, source: Generation) -> Generation:
        """A resync from ``source`` finished: this node now holds exactly the source's data."""
        return Generation(
            current=source.current,
            history=source.history[:HISTORY_MAX],
            journal_base=None,
            inconsistent=False,
            primary=False,
            origin=Origin.NONE,
        )

    def peer_synced(self) -> Generation:
        """The peer now holds our ``current``: the journal no longer needs a base."""
        return replace(self, journal_base=None)

    def with_primary(self, primary: bool) -> Generation:
        return replace(self, primary=primary)

    # ------------------------------------------------------------ serialisation

    def to_json(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "history": list(self.history),
            "journal_base": self.journal_base,
            "inconsistent": self.inconsistent,
            "primary": self.primary,
            "origin": self.origin.value,
        }

    @classmethod
    def from_json(cls, data: object) -> Generation:
        if not isinstance(data, dict):
            raise GenerationError("a generation must be a JSON object")
        expected = {"current", "history", "journal_base", "inconsistent", "primary", "origin"}
        if set(data) != expected:
            raise GenerationError(f"fields must be exactly {sorted(expected)}, got {sorted(data)}")
        current = _check_id("current", data["current"], allow_empty=True)
        history_raw = data["history"]
        if not isinstance(history_raw, list) or len(history_raw) > HISTORY_MAX:
            raise GenerationError(f"history must be a list of at most {HISTORY_MAX} ids")
        history = tuple(_check_id("history", h) for h in history_raw)
        base_raw = data["journal_base"]
        base = None if base_raw is None else _check_id("journal_base", base_raw)
        flags = {}
        for name in ("inconsistent", "primary"):
            if not isinstance(data[name], bool):
                raise GenerationError(f"{name} must be true or false")
            flags[name] = data[name]
        try:
            origin = Origin(data["origin"])
        except ValueError:
            raise GenerationError(f"origin: unknown value {data['origin']!r}") from None
        return cls(current, history, base, flags["inconsistent"], flags["primary"], origin)

    def to_wire(self) -> str:
        """Compact form, at most ``WIRE_MAX`` characters (history trimmed to fit)."""
        flags = ("i" if self.inconsistent else "") + ("p" if self.primary else "")
        head = f"{self.current or '-'}/{self.journal_base or '-'}/{flags or '-'}/{self.origin}/"
        kept: list[str] = []
        for h in self.history:
            if len(head) + len(",".join([*kept, h])) > WIRE_MAX:
                break
            kept.append(h)
        return head + ",".join(kept)

    @classmethod
    def from_wire(cls, text: str) -> Generation:
        parts = text.split("/")
        if len(text) > WIRE_MAX or len(parts) != 5:
            raise GenerationError(f"not a wire generation: {text[:40]!r}")
        cur, base, flags, origin_raw, hist = parts
        if set(flags) - {"i", "p", "-"}:
            raise GenerationError(f"unknown generation flags {flags!r}")
        try:
            origin = Origin(origin_raw)
        except ValueError:
            raise GenerationError(f"origin: unknown value {origin_raw!r}") from None
        return cls(
            current="" if cur == "-" else _check_id("current", cur),
            history=tuple(_check_id("history", h) for h in hist.split(",") if h),
            journal_base=None if base == "-" else _check_id("journal_base", base),
            inconsistent="i" in flags,
            primary="p" in flags,
            origin=origin,
        )


def _check_id(name: str, value: object, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise GenerationError(f"{name}: a generation id must be a string")
    if value == "" and allow_empty:
        return value
    if not (1 <= len(value) <= 64) or any(c not in "0123456789abcdef" for c in value):
        raise GenerationError(f"{name}: {value[:70]!r} is not a hexadecimal generation id")
    return value


def compare(local: Generation, peer: Generation) -> Relation:
    """How ``local`` relates to ``peer`` (pure; see the module docstring)."""
    if local.inconsistent and peer.inconsistent:
        return Relation.UNKNOWN
    if local.inconsistent or peer.inconsistent:
        flipped = local.inconsistent
        target, source = (local, peer) if flipped else (peer, local)
        if source.fresh:
            return Relation.UNKNOWN
        incremental = (
            not target.fresh
            and target.current in source.history
            and source.journal_base == target.current
            and not target.primary
        )
        if flipped:
            return Relation.PEER_NEWER if incremental else Relation.PEER_NEWER_FULL
        return Relation.LOCAL_NEWER if incremental else Relation.LOCAL_NEWER_FULL
    if local.fresh and peer.fresh:
        return Relation.UNKNOWN
    if local.fresh:
        return Relation.PEER_NEWER_FULL
    if peer.fresh:
        return Relation.LOCAL_NEWER_FULL
    if local.current == peer.current:
        if local.primary and peer.primary:
            return Relation.DIVERGED
        if local.primary:
            return Relation.LOCAL_NEWER_FULL
        if peer.primary:
            return Relation.PEER_NEWER_FULL
        return Relation.EQUAL
    if peer.current in local.history:
        incremental = local.journal_base == peer.current and not peer.primary
        return Relation.LOCAL_NEWER if incremental else Relation.LOCAL_NEWER_FULL
    if local.current in peer.history:
        incremental = peer.journal_base == local.current and not local.primary
        return Relation.PEER_NEWER if incremental else Relation.PEER_NEWER_FULL
    return Relation.DIVERGED


class GenerationStore:
    """The generation file of one node: ``<state_dir>/generation.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME

    def load(self) -> Generation:
        """The stored generation; ``Generation()`` (unknown) when there is no file yet.

        Raises ``GenerationFileError`` naming the file when it exists but is unusable.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Generation()
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerationFileError(self.path, f"cannot be read: {exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise GenerationFileError(self.path, f"is not valid JSON: {exc}") from exc
        try:
            return Generation.from_json(data)
        except GenerationError as exc:
            raise GenerationFileError(self.path, str(exc)) from exc

    def save(self, generation: Generation) -> None:
        """Replace the file atomically and durably (temp, fsync, rename, fsync dir)."""
        directory = self.path.parent
        tmp = directory / f".{FILENAME}.tmp"
        body = json.dumps(generation.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise GenerationFileError(self.path, f"cannot be written: {exc}") from exc
