"""Run history of scheduled sources: one row per run (and per skipped tick), in
`runs.db` in the pipeline's state directory. `pipeline runs` lists it; the scheduler reads
it to catch up after downtime and marks runs a crash cut short as interrupted.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from runner.sqlite import connect_read_only, use_wal

UTC = dt.timezone.utc

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    task INTEGER NOT NULL,
    trigger TEXT NOT NULL,          -- schedule | catchup | once | now
    scheduled_for TEXT,             -- the tick (ISO 8601, UTC)
    started TEXT NOT NULL,
    ended TEXT,
    outcome TEXT NOT NULL,          -- running | ok | failed | stopped | interrupted | skipped
    records INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    message TEXT,
    next_run TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_source ON runs (source, task, id);
"""


@dataclass
class Run:
    id: int
    source: str
    task: int
    trigger: str
    scheduled_for: dt.datetime | None
    started: dt.datetime
    ended: dt.datetime | None
    outcome: str
    records: int
    files: int
    errors: int
    attempts: int
    message: str | None
    next_run: dt.datetime | None

    def as_json(self) -> dict:
        out = dict(self.__dict__)
        for key in ("scheduled_for", "started", "ended", "next_run"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


def _iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat() if t is not None else None


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


class RunHistory:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        if read_only:
            self.conn = connect_read_only(path, isolation_level=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            use_wal(self.conn)
            self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def mark_interrupted(self, source: str, task: int, now: dt.datetime) -> int:
        """Runs still marked running belong to a process that died (one process owns a
        source task at a time): record them as interrupted."""
        cur = self.conn.execute(
            "UPDATE runs SET outcome = 'interrupted', ended = ?, message = 'the process ended during the run' "
            "WHERE source = ? AND task = ? AND outcome = 'running'",
            (_iso(now), source, task),
        )
        return cur.rowcount

    def start(self, source: str, task: int, trigger: str, scheduled_for: dt.datetime | None, now: dt.datetime) -> int:
        cur = self.conn.execute(
            "INSERT INTO runs (source, task, trigger, scheduled_for, started, outcome) VALUES (?, ?, ?, ?, ?, 'running')",
            (source, task, trigger, _iso(scheduled_for), _iso(now)),
        )
        return int(cur.lastrowid)

    def finish(self, run_id: int, *, outcome: str, now: dt.datetime, records: int, files: int, errors: int,
               attempts: int, message: str | None, next_run: dt.datetime | None) -> None:
        self.conn.execute(
            "UPDATE runs SET outcome = ?, ended = ?, records = ?, files = ?, errors = ?, attempts = ?, message = ?, "
            "next_run = ? WHERE id = ?",
            (outcome, _iso(now), records, files, errors, attempts, message, _iso(next_run), run_id),
        )

    def skipped(self, source: str, task: int, tick: dt.datetime, now: dt.datetime, next_run: dt.datetime | None) -> None:
        self.conn.execute(
            "INSERT INTO runs (source, task, trigger, scheduled_for, started, ended, outcome, message, next_run) "
            "VALUES (?, ?, 'schedule', ?, ?, ?, 'skipped', 'the previous run was still going', ?)",
            (source, task, _iso(tick), _iso(now), _iso(now), _iso(next_run)),
        )

    def last_started(self, source: str, task: int) -> dt.datetime | None:
        """When the last run (not a skipped tick) of this task started."""
        row = self.conn.execute(
            "SELECT started FROM runs WHERE source = ? AND task = ? AND outcome != 'skipped' ORDER BY id DESC LIMIT 1",
            (source, task),
        ).fetchone()
        return _time(row[0]) if row else None

    def list(self, source: str | None = None, limit: int | None = None) -> list[Run]:
        """Runs, oldest first (the last `limit` of them)."""
        query = "SELECT * FROM runs" + (" WHERE source = ?" if source else "") + " ORDER BY id DESC"
        args: tuple = (source,) if source else ()
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        rows = self.conn.execute(query, args).fetchall()
        return [
            Run(r[0], r[1], r[2], r[3], _time(r[4]), _time(r[5]), _time(r[6]), r[7], r[8], r[9], r[10], r[11], r[12], _time(r[13]))
            for r in reversed(rows)
        ]
