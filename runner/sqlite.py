"""SQLite files that several processes of one pipeline may open at once (the broker, the
schema registry and the run history in a shared state directory), and that inspection
commands open read-only — also on a state directory the user cannot write to."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote


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


def connect_read_only(path: Path, **kwargs: Any) -> sqlite3.Connection:
    """A connection that never writes, even SQLite's own files beside the database.

    `mode=ro` reads a WAL database while a writer holds it (its -wal and -shm files exist).
    With no writer, SQLite would create the -shm file, which fails where the user may not
    write: then no writer can be mid-transaction, and the file is opened `immutable`.
    """
    base = f"file:{quote(str(Path(path).absolute()))}?mode=ro"
    conn = sqlite3.connect(base, uri=True, **kwargs)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if os.path.exists(f"{path}-wal") and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise
    conn = sqlite3.connect(base + "&immutable=1", uri=True, **kwargs)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return conn
