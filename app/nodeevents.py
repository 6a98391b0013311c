"""The node's event log: every decision that changed something, kept in SQLite.

How it works
    ``EventLog`` opens ``events.db`` in the state directory (WAL journal, autocommit, opened
    with check_same_thread=False) with one table ``events (t, module, state, substatus,
    reason, actions)``. ``add`` appends a decision with the wall-clock time and its actions'
    type names; ``recent`` gives a module's last rows, newest first, for `state` and the API.

Exceptions
    None of its own: sqlite3 errors pass through.

Known limits
    Nothing prunes the table: it grows with every decision that is logged.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from app.cluster.core import Decision


class EventLog:
    """Every decision that changed something, kept in SQLite (`events.db`)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS events (t REAL, module TEXT, state TEXT, "
            "substatus TEXT, reason TEXT, actions TEXT)"
        )

    def add(self, module: str, d: Decision) -> None:
        acts = ", ".join(type(a).__name__ for a in d.actions)
        self.db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), module, d.new_state.value, d.substatus.value, d.reason, acts),
        )

    def recent(self, module: str, n: int = 20) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT t, state, substatus, reason FROM events WHERE module = ? "
            "ORDER BY rowid DESC LIMIT ?",
            (module, n),
        ).fetchall()
        return [{"t": r[0], "state": r[1], "substatus": r[2], "reason": r[3]} for r in rows]

    def close(self) -> None:
        self.db.close()
