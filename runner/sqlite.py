"""SQLite files that several processes of one pipeline may open at once (the schema
registry and the run history in a shared state directory)."""

from __future__ import annotations

import sqlite3
import time


def use_wal(conn: sqlite3.Connection, attempts: int = 50) -> None:
    """Switch to write-ahead logging. SQLite may answer "database is locked" at once,
    without waiting for its busy timeout, while another connection makes the same switch
    on a new file: try again briefly."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)
